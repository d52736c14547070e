"""The continuous image representation: visual encoder + diffusion decoder (tiny, random)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from anygen.errors import CheckpointError, UserInputError
from anygen.tokenizers.visual import (
    VISUAL_PRESETS,
    VisualCodec,
    VisualConfig,
    build_unet,
    build_vae,
    load_visual_codec,
)

CFG = VISUAL_PRESETS["tiny"]


@pytest.fixture(scope="module")
def codec() -> VisualCodec:
    torch.manual_seed(0)
    return VisualCodec(CFG).eval()


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, CFG.image_size, CFG.image_size, generator=g) * 2 - 1


def test_embeddings_are_a_grid_of_normalised_vectors(codec):
    e = codec.encode(images())
    assert e.shape == (3, CFG.grid**2, CFG.visual_dim)
    assert torch.allclose(e.mean(-1), torch.zeros(3, CFG.grid**2), atol=1e-5)
    assert torch.allclose(e.var(-1, unbiased=False), torch.ones(3, CFG.grid**2), atol=1e-3)


def test_decoding_is_seeded_and_row_independent(codec):
    e = codec.encode(images())
    gens = lambda *s: [torch.Generator().manual_seed(x) for x in s]  # noqa: E731
    a = codec.decode(e, gens(0, 1, 2))
    assert a.shape == (3, 3, CFG.image_size, CFG.image_size) and torch.isfinite(a).all()
    assert torch.equal(a, codec.decode(e, gens(0, 1, 2)))
    alone = codec.decode(e[1:2], gens(1))
    assert torch.allclose(a[1:2], alone, atol=1e-5)
    assert not torch.allclose(a[0], codec.decode(e[:1], gens(9))[0])
    guided = codec.decode(e[:1], gens(0), guidance_scale=3.0)
    assert not torch.allclose(a[:1], guided)


def test_the_encoder_learns_through_the_decoder_loss():
    torch.manual_seed(0)
    codec = VisualCodec(CFG).train()
    out = codec.loss(images(), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert codec.encoder.proj.weight.grad.abs().sum() > 0
    assert next(codec.unet.parameters()).grad is not None
    assert all(p.grad is None for p in codec.vae.parameters())
    assert not codec.vae.training


def test_given_embeddings_the_encoders_own_are_learnt_through_and_others_are_not():
    """``embeddings=``: the encoder's own, computed once, learnt through as if the loss had
    called the encoder; ``cond=``: rendered only, the encoder does not learn."""
    torch.manual_seed(0)
    codec = VisualCodec(CFG).train()
    x = images()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    own = codec.loss(x, generator=gen())["loss"]
    own.backward()
    reference = codec.encoder.proj.weight.grad.clone()
    codec.zero_grad()
    given = codec.loss(x, generator=gen(), embeddings=codec.encoder(x))["loss"]
    torch.testing.assert_close(given, own)
    given.backward()
    torch.testing.assert_close(codec.encoder.proj.weight.grad, reference)  # learnt through
    codec.zero_grad()
    with torch.no_grad():
        mine = codec.encoder(x)
    # the encoder's own embeddings as cond: the same loss
    torch.testing.assert_close(codec.loss(x, generator=gen(), cond=mine)["loss"], own)
    other = codec.loss(x, generator=gen(), cond=torch.randn_like(mine))["loss"]
    assert not torch.allclose(other, own)
    other.backward()
    assert next(codec.unet.parameters()).grad is not None
    assert all(p.grad is None for p in codec.encoder.parameters())
    n, d = CFG.grid**2, CFG.visual_dim
    with pytest.raises(ValueError, match=rf"cond must be \(3, {n}, {d}\) embeddings, got \(3, 5,"):
        codec.loss(x, cond=torch.zeros(3, 5, d))
    with pytest.raises(ValueError, match=rf"embeddings must be \(3, {n}, {d}\) embeddings"):
        codec.loss(x, embeddings=torch.zeros(3, 5, d))
    with pytest.raises(ValueError, match="give cond .* or embeddings, not both"):
        codec.loss(x, cond=torch.zeros(3, n, d), embeddings=torch.zeros(3, n, d))


@pytest.mark.parametrize("margin", [0, 2])
def test_the_foreground_weight_weighs_the_latent_positions_over_an_object(monkeypatch, margin):
    """The weighted denoising loss equals a reference computed from the same noise and
    prediction: per image, latent positions over the object (or within ``margin`` pixels of
    it) weigh 1 + w, the rest 1, normalised to mean 1; then Min-SNR-5 over the batch."""
    torch.manual_seed(0)
    codec = VisualCodec(CFG).train()
    x = torch.full((2, 3, CFG.image_size, CFG.image_size), -0.8)
    x[0, :, 4:8, 20:26] = 0.9  # image 0: an object over latent rows 2-3, columns 10-12
    x[1, :, 16:18, 2:4] = 0.5  # image 1: over latent row 8, column 1
    seen = {}
    unet, add_noise = codec._unet, codec.scheduler.add_noise

    def record_unet(noisy, t, cond):
        seen["pred"], seen["t"] = unet(noisy, t, cond), t
        return seen["pred"]

    def record_noise(latents, noise, t):
        seen["noise"] = noise
        return add_noise(latents, noise, t)

    monkeypatch.setattr(codec, "_unet", record_unet)
    monkeypatch.setattr(codec.scheduler, "add_noise", record_noise)
    w = 4.0
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = codec.loss(x, generator=gen(), foreground_weight=w, foreground_margin=margin)
    plain = codec.loss(x, generator=gen())

    f = CFG.vae_factor  # pixels per latent position, per side
    mask = torch.zeros(2, 1, 16, 16)
    for b, (r0, r1, c0, c1) in enumerate([(4, 8, 20, 26), (16, 18, 2, 4)]):
        r0, c0, r1, c1 = max(r0 - margin, 0), max(c0 - margin, 0), r1 + margin, c1 + margin
        mask[b, 0, r0 // f : (r1 - 1) // f + 1, c0 // f : (c1 - 1) // f + 1] = 1
    weights = 1 + w * mask
    weights = weights / weights.mean(dim=(1, 2, 3), keepdim=True)
    sq = ((seen["pred"].float() - seen["noise"].float()) ** 2).mean(dim=1, keepdim=True)
    alphas = codec.scheduler.alphas_cumprod[seen["t"]]
    snr = alphas / (1 - alphas)
    want = (snr.clamp(max=5.0) / snr * (weights * sq).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(out["loss"], want)
    torch.testing.assert_close(out["mse"], plain["mse"])  # the logged error stays the plain one
    assert not torch.allclose(out["loss"], plain["loss"])
    for weight in (w, 0.0):  # refused at any weight, as vq.reconstruction_errors does
        with pytest.raises(ValueError, match="foreground_margin must be >= 0"):
            codec.loss(x, foreground_weight=weight, foreground_margin=-1)


def test_save_and_load_round_trip(codec, tmp_path):
    codec.save_pretrained(tmp_path / "visual")
    again = load_visual_codec(tmp_path / "visual")
    x = images()
    assert torch.allclose(codec.encode(x), again.encode(x), atol=1e-6)
    g = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    assert torch.allclose(
        codec.decode(codec.encode(x), g()), again.decode(again.encode(x), g()), atol=1e-5
    )
    resaved = again.save_pretrained(tmp_path / "resaved")  # no trace of where it came from
    assert str(tmp_path / "visual") not in "".join(f.read_text() for f in resaved.rglob("*.json"))


def test_a_codec_over_another_vae_keeps_its_encoder_and_decoder(codec, tmp_path):
    torch.manual_seed(5)
    vae = build_vae(CFG).eval()
    swapped = codec.with_vae(vae)
    assert swapped.unet is codec.unet and swapped.spatial is codec.spatial
    assert not swapped.training and swapped.vae is vae
    x = images()
    assert torch.equal(swapped.encode(x), codec.encode(x))
    want = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(swapped.latents_of(x), want)
    assert not torch.allclose(swapped.latents_of(x), codec.latents_of(x))
    g = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    e = codec.encode(x)
    assert not torch.allclose(swapped.decode(e, g()), codec.decode(e, g()))
    again = load_visual_codec(swapped.save_pretrained(tmp_path / "swapped"))
    torch.testing.assert_close(again.latents_of(x), want)
    torch.testing.assert_close(again.decode(e, g()), swapped.decode(e, g()), atol=1e-5, rtol=0)
    coarser = build_vae(dataclasses.replace(CFG, vae_factor=2 * CFG.vae_factor))
    with pytest.raises(CheckpointError, match=f"downsamples by {2 * CFG.vae_factor}"):
        codec.with_vae(coarser)


def test_bad_inputs_and_mismatched_parts_are_named(codec, tmp_path):
    with pytest.raises(UserInputError, match="takes"):
        codec.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(UserInputError, match="embeddings"):
        codec.decode(torch.zeros(1, 3, CFG.visual_dim))
    with pytest.raises(UserInputError, match="grid"):
        VisualConfig(image_size=32, patch_size=8, grid=3)
    wide = dataclasses.replace(CFG, visual_dim=CFG.visual_dim * 2)
    with pytest.raises(CheckpointError, match="context"):
        VisualCodec(CFG, unet=build_unet(wide))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text('{"_class_name": "VitVQGAN"}')
    with pytest.raises(CheckpointError, match="not a VisualCodec"):
        load_visual_codec(tmp_path / "x")


def test_reconstruction_suite_scores_a_visual_codec(codec, tmp_path):
    """`anygen eval --suite reconstruction` on a codec directory: decode(encode(x)) through
    its embeddings, the decoder's noise seeded per image as the emu recipe seeds it."""
    import numpy as np

    from anygen.data import shapes
    from anygen.data.datasets import images_to_tensor, tensor_to_images
    from anygen.data.render import render_image
    from anygen.eval.run import evaluate_model

    codec.save_pretrained(tmp_path / "codec")
    report = evaluate_model(
        str(tmp_path / "codec"), "reconstruction", n=3, seed=2, batch_size=2, progress=False
    )
    assert report.meta["suite"] == "reconstruction" and len(report.records) == 3
    scenes = [shapes.task_sample("t2i", 2, i, "test").scene for i in range(3)]
    originals = [render_image(s, CFG.image_size) for s in scenes]
    gens = [torch.Generator().manual_seed(2 * 100_003 + i) for i in range(3)]
    with torch.no_grad():
        rebuilt = tensor_to_images(codec.decode(codec.encode(images_to_tensor(originals)), gens))
    a = np.stack([np.asarray(x, np.float64) for x in originals])
    b = np.stack([np.asarray(x, np.float64) for x in rebuilt])
    psnr = np.mean(10 * np.log10(255.0**2 / ((a - b) ** 2).mean(axis=(1, 2, 3))))
    assert report.metrics["psnr_db"] == pytest.approx(psnr, abs=0.05)
