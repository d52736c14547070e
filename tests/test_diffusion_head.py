"""The diffusion head (MAR): it draws what a regression would average, guides, and grafts
onto a model trained with a regression head."""

import dataclasses

import pytest
import torch

from anygen.errors import UserInputError
from anygen.models.diffusion_head import DiffusionHead
from anygen.models.fusion import FUSION_PRESETS, FusionConfig, FusionTransformer


def test_the_head_draws_both_modes_where_a_regression_would_average_them():
    """Targets are (1, 1) or (-1, -1) with equal chance whatever the condition: the l2
    optimum is (0, 0), the head must draw points near the two modes, both of them."""
    torch.manual_seed(0)
    head = DiffusionHead(dim=2, cond_dim=4, width=64, depth=2)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    cond = torch.ones(256, 4)
    for _ in range(600):
        target = torch.randint(0, 2, (256, 1)).float().mul(2).sub(1).expand(256, 2)
        loss = head.loss(cond, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = torch.Generator().manual_seed(1)
    x = head.sample(cond[:200], torch.randn(200, 2, generator=g), steps=25)
    near = torch.minimum((x - 1).norm(dim=1), (x + 1).norm(dim=1))
    assert (near < 0.4).float().mean() > 0.8  # drawn at a mode, not between them
    assert 0.25 < (x[:, 0] > 0).float().mean() < 0.75  # and at both
    assert x.mean(0).abs().max() < 0.4


def test_guidance_combines_conditional_and_unconditional_noise_predictions():
    torch.manual_seed(0)
    head = DiffusionHead(dim=3, cond_dim=5, width=16, depth=1)
    with torch.no_grad():
        for p in head.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    cond, null = torch.randn(2, 5), torch.randn(2, 5)
    noise = torch.randn(2, 3)
    plain = head.sample(cond, noise, steps=4)
    assert torch.allclose(head.sample(torch.cat([cond, cond]), noise, 4, 3.0), plain, atol=1e-5)
    guided = head.sample(torch.cat([cond, null]), noise, 4, 3.0)
    assert not torch.allclose(guided, plain, atol=1e-3)
    # scale 0 is the unconditional rows alone
    assert torch.allclose(
        head.sample(torch.cat([cond, null]), noise, 4, 0.0), head.sample(null, noise, 4), atol=1e-5
    )


def test_the_head_refuses_shapes_that_do_not_fit():
    head = DiffusionHead(dim=3, cond_dim=5, width=8, depth=1)
    with pytest.raises(ValueError, match="do not fit"):
        head.loss(torch.zeros(4, 5), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="2 conditions for 1 rows"):
        head.sample(torch.zeros(2, 5), torch.zeros(1, 3), steps=2)
    with pytest.raises(ValueError, match="steps >= 1"):
        head.sample(torch.zeros(1, 5), torch.zeros(1, 3), steps=0)


def test_a_regression_model_takes_a_diffusion_head_and_keeps_the_rest():
    c = dataclasses.replace(FUSION_PRESETS["tiny-continuous"])
    torch.manual_seed(0)
    model = FusionTransformer(c)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_diffusion_head(scale=5.0)
    assert model.config.visual_head == "diffusion" and model.config.diffusion_scale == 5.0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k.split(".")[0] for k in set(after) - set(before)} == {"diffusion"}
    with pytest.raises(UserInputError, match="with a diffusion head"):
        model.add_diffusion_head(scale=1.0)
    with pytest.raises(UserInputError, match="discrete with a regression head"):
        FusionTransformer(FUSION_PRESETS["tiny"]).add_diffusion_head(scale=1.0)


def test_the_written_embedding_is_the_regression_plus_the_draw_over_the_scale():
    c = dataclasses.replace(
        FUSION_PRESETS["tiny-continuous"], visual_head="diffusion", diffusion_steps=2
    )
    torch.manual_seed(0)
    model = FusionTransformer(c).eval()
    h = torch.randn(3, c.hidden_size)
    noise = torch.randn(3, c.visual_dim)
    with torch.no_grad():
        drawn = model.next_embeddings(h, noise)
        residual = model.diffusion.sample(h, noise, c.diffusion_steps)
        assert residual.abs().min() > 0  # a draw to add, not zeros
        assert torch.equal(model.diffusion.sample(h, noise, c.diffusion_steps), residual)
        assert torch.allclose(drawn, model.regress(h) + residual, atol=1e-6)
        model.config.diffusion_scale = 4.0
        assert torch.allclose(model.next_embeddings(h, noise), model.regress(h) + residual / 4)


def test_configs_name_bad_heads():
    with pytest.raises(UserInputError, match="visual_head must be one of"):
        FusionConfig(image_mode="continuous", visual_dim=4, visual_head="flow")
    with pytest.raises(UserInputError, match="must be continuous"):
        FusionConfig(visual_head="diffusion")
    with pytest.raises(UserInputError, match="diffusion_steps must be >= 1"):
        FusionConfig(image_mode="continuous", visual_dim=4, diffusion_steps=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_head_trains_and_draws(dtype):
    """diffusers' sinusoidal timestep features are fp32 whatever the model's dtype: the
    head casts them before its own layers."""
    head = DiffusionHead(dim=8, cond_dim=16, width=32, depth=2).to(dtype)
    cond = torch.randn(4, 16, dtype=dtype)
    x = torch.randn(4, 8, dtype=dtype)
    assert torch.isfinite(head.loss(cond, x).float()).all()
    drawn = head.sample(cond, torch.randn(4, 8), steps=3)
    assert drawn.shape == (4, 8) and torch.isfinite(drawn.float()).all()
