"""Logits processing and token draws: parity with transformers' warpers, per-row seeding."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from anygen.errors import UserInputError
from anygen.sampling import guide, process_logits, sample_tokens


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_keeps_the_same_tokens_as_transformers(logits, k):
    ours = process_logits(logits, top_k=k)
    ref = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert (~torch.isinf(ours)).sum(-1).tolist() == [k] * 6


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_same_tokens_as_transformers(logits, p):
    ours = process_logits(logits, top_p=p)
    ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ours.softmax(-1)
    # the kept set holds at least p of the original mass
    mass = (logits.softmax(-1) * torch.isfinite(ours)).sum(-1)
    assert torch.all(mass >= p - 1e-6), (mass, kept.shape)


def test_temperature_scales_and_disabled_filters_change_nothing(logits):
    assert torch.allclose(process_logits(logits, temperature=0.5), logits * 2)
    assert torch.equal(process_logits(logits, top_k=0, top_p=1.0), logits)


def test_guidance_interpolates_and_extrapolates():
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.equal(guide(cond, uncond, 0.0), uncond)
    assert torch.equal(guide(cond, uncond, 3.0), torch.tensor([[4.0, -2.0]]))


def test_each_row_draws_from_its_own_generator(logits):
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    batch = sample_tokens(logits, gens)
    for i in range(6):
        alone = sample_tokens(logits[i : i + 1], [torch.Generator().manual_seed(i)])
        assert alone.item() == batch[i].item()


def test_greedy_is_argmax_and_a_one_token_support_is_always_drawn(logits):
    assert torch.equal(sample_tokens(logits, greedy=True), logits.argmax(-1))
    only = process_logits(logits, top_k=1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_tokens(only, g), logits.argmax(-1))


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(20000, 3)
    counts = torch.bincount(sample_tokens(logits, torch.Generator().manual_seed(1)), minlength=3)
    assert torch.allclose(counts / 20000, probs, atol=0.015)


def test_bad_settings_are_named():
    with pytest.raises(UserInputError, match="temperature"):
        process_logits(torch.zeros(1, 3), temperature=-1)
    with pytest.raises(UserInputError, match="top-p"):
        process_logits(torch.zeros(1, 3), top_p=1.5)
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample_tokens(torch.zeros(3, 4), [torch.Generator()] * 2)


def test_options_refuse_names_the_first_setting_given_and_passes_unset_ones():
    from anygen.pipelines.base import SETTING_LABELS, TOKEN_SETTINGS, Options

    Options(steps=4).refuse(TOKEN_SETTINGS, "means nothing here")  # none of them set
    with pytest.raises(UserInputError, match=r"^top-p means nothing here$"):
        Options(top_p=0.9, steps=4).refuse(TOKEN_SETTINGS, "means nothing here")
    # top-k 0 ("off") is still a setting the user gave
    with pytest.raises(UserInputError, match=r"^top-k is odd$"):
        Options(top_k=0).refuse(("top_k",), "is odd")
    assert set(SETTING_LABELS) <= set(Options.__dataclass_fields__)
