"""anygen.attention: every backend equals the math reference; backend choice; bridges."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from anygen import attention as attn
from anygen.attention import (
    BACKENDS,
    attention,
    attention_backend,
    available_backends,
    set_diffusers_attention,
    transformers_attn_implementation,
)
from anygen.errors import UserInputError

FAST_BACKENDS = [b for b in available_backends() if b != "math"]


def qkv(t_q=5, t_k=7, B=2, nh=3, hs=8, hv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, t_q, hs, generator=g, dtype=dtype)
    k = torch.randn(B, nh, t_k, hs, generator=g, dtype=dtype)
    v = torch.randn(B, nh, t_k, hv or hs, generator=g, dtype=dtype)
    return q, k, v


def padding_mask(B=2, t_k=7):
    m = torch.ones(B, 1, 1, t_k, dtype=torch.bool)  # (B, 1, 1, Tk)
    m[1, ..., :3] = False  # left padding in the second row
    return m


CASES = {
    "plain": dict(t_q=6, t_k=6),
    "causal": dict(t_q=6, t_k=6, is_causal=True),
    "cross lengths": dict(t_q=3, t_k=9),
    "causal cached": dict(t_q=3, t_k=9, is_causal=True),
    "one query causal": dict(t_q=1, t_k=9, is_causal=True),
    "bool mask": dict(t_q=5, t_k=7, mask="bool"),
    "float mask": dict(t_q=5, t_k=7, mask="float"),
    "causal and mask": dict(t_q=7, t_k=7, is_causal=True, mask="bool"),
    "scale, other value size": dict(t_q=4, t_k=6, scale=0.3, hv=5),
}


def run_case(backend, t_q, t_k, is_causal=False, mask=None, scale=None, hv=None):
    q, k, v = qkv(t_q, t_k, hv=hv)
    m = None
    if mask == "bool":
        m = padding_mask(t_k=t_k)
    elif mask == "float":
        m = torch.randn(1, 3, t_q, t_k, generator=torch.Generator().manual_seed(1))
    return attention(q, k, v, attn_mask=m, is_causal=is_causal, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_backend_equals_math(backend, case):
    got = run_case(backend, **CASES[case])
    want = run_case("math", **CASES[case])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_math_matches_explicit_formula():
    q, k, v = qkv(4, 6)
    mask = padding_mask(t_k=6)
    scores = (q @ k.transpose(-2, -1)) / 8**0.5  # (B, nh, Tq, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))
    want = scores.softmax(-1) @ v
    torch.testing.assert_close(attention(q, k, v, attn_mask=mask, backend="math"), want)


def test_causal_is_bottom_right_aligned():
    q, k, v = qkv(t_q=3, t_k=5)
    # query i sees keys 0 .. i + 2
    tril = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2)
    want = attention(q, k, v, attn_mask=tril, backend="math")
    for backend in available_backends():
        torch.testing.assert_close(attention(q, k, v, is_causal=True, backend=backend), want)
    # for Tq == Tk it is SDPA's own causal mask
    q, k, v = qkv(t_q=6, t_k=6)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention(q, k, v, is_causal=True, backend="math"), ref)


def test_fully_masked_row_gives_zeros_in_every_backend():
    q, k, v = qkv(t_q=3, t_k=4, B=1, nh=1)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    for backend in available_backends():
        q.grad = None
        y = attention(q.requires_grad_(), k, v, attn_mask=mask, backend=backend)
        assert torch.isfinite(y).all()
        assert (y[0, 0, 1] == 0).all()
        y.sum().backward()
        assert torch.isfinite(q.grad).all()


def test_math_accumulates_in_fp32_and_keeps_dtype():
    q, k, v = qkv(dtype=torch.float32)
    ref = attention(q, k, v, backend="math")
    y = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="math")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.fixture
def spies(monkeypatch):
    calls = []
    for name in ("sdpa", "math"):
        real = BACKENDS[name]

        def spy(*args, _name=name, _real=real):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setitem(BACKENDS, name, spy)
    return calls


def test_backend_choice_is_honoured(spies):
    q, k, v = qkv()
    attention(q, k, v)
    attention(q, k, v, backend="math")
    with attention_backend("math"):
        attention(q, k, v)
        attention(q, k, v, backend="sdpa")  # explicit wins
        with attention_backend("sdpa"):
            attention(q, k, v)
        attention(q, k, v)  # the outer choice is restored
    attention(q, k, v)
    assert spies == ["sdpa", "math", "math", "sdpa", "sdpa", "math", "sdpa"]


def test_unknown_backend_is_a_clear_error():
    q, k, v = qkv()
    with pytest.raises(UserInputError, match=r"unknown attention backend 'flash'.*sdpa, math"):
        attention(q, k, v, backend="flash")
    with (
        pytest.raises(UserInputError, match="unknown attention backend"),
        attention_backend("nope"),
    ):
        pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_xformers_refused_without_cuda():
    q, k, v = qkv()
    assert "xformers" not in available_backends()
    with pytest.raises(UserInputError, match="xformers"):
        attention(q, k, v, backend="xformers")
    # the backend itself names the device problem, installed or not
    with pytest.raises(UserInputError, match="CUDA tensors only, got cpu"):
        BACKENDS["xformers"](q, k, v, None, False, 0.0, None)
    with pytest.raises(UserInputError, match="xformers"):
        transformers_attn_implementation("xformers")


def test_bad_inputs_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="grouped-query"):
        attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="Tq <= Tk"):
        attention(*qkv(t_q=5, t_k=3), is_causal=True)
    with pytest.raises(ValueError, match=r"\(B, nh, T, hs\)"):
        attention(q[0], k[0], v[0])


def test_import_loads_no_library_and_registers_nothing():
    code = (
        "import sys, anygen.attention; "
        "print('diffusers' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# -----------------------------------------------------------------------------
# bridges


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def test_diffusers_unet_same_output_under_sdpa_and_math(tiny_unet):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)  # (B, C, H, W)
    text = torch.randn(2, 5, 16, generator=g)  # (B, T, cross_attention_dim)
    outs = {}
    for backend, processor in [("math", AttnProcessor), ("sdpa", AttnProcessor2_0)]:
        assert set_diffusers_attention(tiny_unet, backend) == 8  # 2 blocks x (self + cross) x 2
        assert {type(p) for p in tiny_unet.attn_processors.values()} == {processor}
        with torch.no_grad():
            outs[backend] = tiny_unet(x, 10, text).sample
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=1e-5, rtol=1e-5)


def test_diffusers_unknown_processor_refused_before_any_change(tiny_unet):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    class Custom(AttnProcessor2_0):
        pass

    set_diffusers_attention(tiny_unet, "sdpa")
    name = next(iter(tiny_unet.attn_processors))
    tiny_unet.set_attn_processor({**tiny_unet.attn_processors, name: Custom()})
    try:
        with pytest.raises(UserInputError, match=r"1 layers have processors .*\(Custom\)"):
            set_diffusers_attention(tiny_unet, "math")
        assert AttnProcessor not in {type(p) for p in tiny_unet.attn_processors.values()}
    finally:
        tiny_unet.set_attn_processor(AttnProcessor2_0())


def test_transformers_names():
    assert transformers_attn_implementation("sdpa") == "sdpa"
    assert transformers_attn_implementation("math") == "eager"
    with attention_backend("math"):
        assert transformers_attn_implementation() == "eager"


def test_transformers_llama_same_output_under_every_implementation():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    keep = torch.ones(2, 9, dtype=torch.long)
    keep[1, :3] = 0  # left padding
    # the function anygen registers for xformers, run through the math backend on CPU
    names = ["eager", "sdpa", attn._register_transformers_attention("math")]
    logits, tokens = {}, {}
    for name in names:
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
        with torch.no_grad():
            logits[name] = model(ids, attention_mask=keep).logits[keep.bool()]  # padded rows differ
            tokens[name] = model.generate(ids[:1], max_new_tokens=6, do_sample=False)  # KV cache
    for name in names[1:]:
        torch.testing.assert_close(logits[name], logits["eager"], atol=1e-5, rtol=1e-5)
        assert torch.equal(tokens[name], tokens["eager"])


def test_an_offloaded_model_is_switched_by_the_device_it_will_run_on(monkeypatch):
    """With --offload a pipeline's models sit on the CPU when attention is configured:
    xformers is chosen (auto) or accepted (explicit) by the device they will run on, not
    refused because the weights are not on CUDA yet. This machine has neither CUDA nor
    xformers, so both are stood in for; the processors are diffusers' real ones."""
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    import anygen.attention as attn
    from anygen.pipelines.runtime import auto_attention, set_attention

    monkeypatch.setattr(attn, "_xformers_ops", lambda: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attn, "xformers_usable", lambda d: torch.device(d).type == "cuda")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)

    def kinds():
        return {type(p) for p in vae.attn_processors.values()}

    assert kinds() == {AttnProcessor2_0}
    with pytest.raises(UserInputError, match="move the model to a CUDA device first"):
        attn.set_diffusers_attention(vae, "xformers")  # where its weights are: the CPU
    assert kinds() == {AttnProcessor2_0}
    assert attn.set_diffusers_attention(vae, "xformers", device="cuda") == len(vae.attn_processors)
    assert kinds() == {XFormersAttnProcessor}
    attn.set_diffusers_attention(vae, "sdpa", device="cuda")
    assert auto_attention({"vae": vae}, torch.device("cuda")) == "xformers"
    assert kinds() == {XFormersAttnProcessor}
    # --attention given: what configure_pipeline does for an offloaded pipeline
    set_attention({"vae": vae}, "sdpa", torch.device("cuda"))
    assert kinds() == {AttnProcessor2_0}
    monkeypatch.setattr(attn, "_register_transformers_attention", lambda backend: backend)
    with pytest.raises(UserInputError, match="move the model to a CUDA device first"):
        set_attention({"vae": vae}, "xformers")
    set_attention({"vae": vae}, "xformers", torch.device("cuda"))
    assert kinds() == {XFormersAttnProcessor}
