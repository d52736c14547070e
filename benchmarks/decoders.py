"""Decode throughput of the three image decoders, per attention backend, batch 1 and 8:

- ``vae``: diffusers' AutoencoderKL latents -> image (real: SD 1.5's VAE, 64 x 64 x 4 ->
  512 px, fp16; tiny: the ldm tiny preset's, 32 px);
- ``vq``: anygen's ViT-VQGAN codes -> image (real: ViT-VQGAN-Base's shape, Yu et al. 2022:
  12 decoder layers, width 768, 32 x 32 codes of 8192 -> 256 px; tiny: the tiny preset);
- ``visual``: the continuous fusion path's diffusion decoder, embeddings -> image (real:
  an SD-1.5-sized UNet over 32 x 32 x 4 latents, 256 px, 25 DPM-Solver++ steps; tiny:
  the tiny preset, 4 steps).

Every backend's images are compared with sdpa's (``max_abs_diff_vs_sdpa``, in [-1, 1]
units).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from anygen.attention import attention_backend, set_diffusers_attention
from anygen.models.ldm import LDM_PRESETS, build_vae
from anygen.tokenizers.visual import VISUAL_PRESETS, VisualCodec, VisualConfig
from anygen.tokenizers.vq import VQ_PRESETS, VitVQConfig, VitVQGAN
from benchmarks import ldm_vs_diffusers
from benchmarks.common import Recorder, Settings, attention_backends, interleaved

VQ_BASE = VitVQConfig(
    image_size=256,
    patch_size=8,
    hidden_size=768,
    encoder_layers=12,
    decoder_layers=12,
    num_heads=12,
    mlp_ratio=4.0,
    codebook_size=8192,
    code_dim=32,
)
VISUAL_REAL = VisualConfig(
    image_size=256,
    patch_size=16,
    encoder_hidden=768,
    encoder_layers=12,
    encoder_heads=12,
    grid=8,  # 64 embeddings an image, as Emu2's
    visual_dim=1024,
    vae_factor=8,
    unet_channels=(320, 640, 1280, 1280),
    unet_layers_per_block=2,
    unet_groups=32,
    attention_head_dim=8,
    decode_steps=25,
)
BATCHES = (1, 8)


def _time_backends(
    s: Settings,
    rec: Recorder,
    decoder: str,
    backends: list[str],
    switch: Callable[[str], None],
    decode: Callable[[int], torch.Tensor],
    extra: dict,
) -> None:
    """Time ``decode(batch)`` under each backend (``switch`` selects it); rows per batch."""
    reference: dict[int, torch.Tensor] = {}
    for backend in sorted(backends, key=lambda b: b != "sdpa"):  # sdpa first: the reference
        switch(backend)
        for batch in BATCHES:
            t, out = interleaved({"decode": lambda b=batch: decode(b)}, s.repeats, s.device)
            images = out["decode"].float()  # (B, 3, H, W)
            if backend == "sdpa":
                reference[batch] = images
            side = images.shape[-1]
            rec.row(
                "decoders",
                {
                    "decoder": decoder,
                    **extra,
                    "attention": backend,
                    "batch": batch,
                    "s": round(t["decode"], 6),
                    "images_per_s": round(batch / t["decode"], 2),
                    "megapixels_per_s": round(batch * side * side / t["decode"] / 1e6, 3),
                    "max_abs_diff_vs_sdpa": (
                        round(float((images - reference[batch]).abs().max()), 5)
                        if batch in reference
                        else None
                    ),
                },
            )


def bench_decoders(s: Settings, rec: Recorder) -> None:
    """VAE, VQ and visual-decoder decode throughput per attention backend."""
    if not s.eager:
        rec.skip("decoders", "compiled variants", "not built: the decoders run eager only")
        return
    backends = attention_backends(s, rec, "decoders")
    dtype = s.dtype_or(torch.float16)
    for bench in (vae_decode, vq_decode, visual_decode):
        torch.manual_seed(0)
        bench(s, rec, backends, dtype)  # each frees its model on return
        if s.cuda:
            torch.cuda.empty_cache()


def vae_decode(s: Settings, rec: Recorder, backends: list[str], dtype: torch.dtype) -> None:
    """(B, 4, h, w) scaled latents -> (B, 3, H, W)."""
    with torch.device(s.device):
        if s.real:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL(**ldm_vs_diffusers.SD15_VAE)
        else:
            vae = build_vae(LDM_PRESETS["tiny"])
    vae = vae.to(dtype=dtype).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = vae.config.sample_size // factor
    g = torch.Generator(s.device.type).manual_seed(0)
    latents = torch.randn(max(BATCHES), 4, side, side, generator=g, device=s.device, dtype=dtype)

    @torch.no_grad()
    def decode(batch: int) -> torch.Tensor:
        return vae.decode(latents[:batch] / vae.config.scaling_factor).sample

    _time_backends(
        s,
        rec,
        "vae",
        backends,
        lambda b: set_diffusers_attention(vae, b),
        decode,
        {"config": "sd15" if s.real else "tiny", "dtype": str(dtype).removeprefix("torch.")},
    )


def vq_decode(s: Settings, rec: Recorder, backends: list[str], dtype: torch.dtype) -> None:
    """(B, g, g) codes -> (B, 3, H, W); attention through ``anygen.attention``."""
    config = VQ_BASE if s.real else VQ_PRESETS["tiny"]
    with torch.device(s.device):
        vq = VitVQGAN(config).to(dtype=dtype).eval()
    g = torch.Generator(s.device.type).manual_seed(0)
    codes = torch.randint(
        0,
        config.codebook_size,
        (max(BATCHES), config.grid_size, config.grid_size),
        generator=g,
        device=s.device,
    )
    chosen = {"backend": "sdpa"}

    def decode(batch: int) -> torch.Tensor:
        with attention_backend(chosen["backend"]):
            return vq.decode(codes[:batch])

    _time_backends(
        s,
        rec,
        "vq",
        backends,
        lambda b: chosen.update(backend=b),
        decode,
        {
            "config": "vit-vqgan-base" if s.real else "tiny",
            "dtype": str(dtype).removeprefix("torch."),
        },
    )


def visual_decode(s: Settings, rec: Recorder, backends: list[str], dtype: torch.dtype) -> None:
    """(B, N, visual_dim) embeddings -> (B, 3, H, W) by the diffusion decoder."""
    vc = VISUAL_REAL if s.real else VISUAL_PRESETS["tiny"]
    with torch.device(s.device):
        codec = VisualCodec(vc).to(dtype=dtype).eval()
    g = torch.Generator(s.device.type).manual_seed(0)
    embeds = torch.randn(
        max(BATCHES), vc.num_embeddings, vc.visual_dim, generator=g, device=s.device
    )

    def switch(backend: str) -> None:
        set_diffusers_attention(codec.unet, backend)
        set_diffusers_attention(codec.vae, backend)

    def decode(batch: int) -> torch.Tensor:
        gens = [torch.Generator(s.device.type).manual_seed(i) for i in range(batch)]
        return codec.decode(embeds[:batch], gens)

    _time_backends(
        s,
        rec,
        "visual",
        backends,
        switch,
        decode,
        {
            "config": "sd15-unet-256px" if s.real else "tiny",
            "dtype": str(dtype).removeprefix("torch."),
            "steps": vc.decode_steps,
        },
    )
