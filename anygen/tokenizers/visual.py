"""Continuous image representation (Emu2, Sun et al. 2024): a visual encoder that turns an
image into N embeddings, and a diffusion decoder that renders images from them.

- ``VisualEncoder``: a transformers ``ViTModel`` over ``patch_size`` patches; its patch
  states are average-pooled to a ``grid`` x ``grid`` map and projected to ``visual_dim``,
  then layer-normalised without affine parameters, so every embedding has zero mean and
  unit variance: a well-scaled target for the fusion transformer's l2 regression.
- The decoder is latent diffusion: a diffusers ``UNet2DConditionModel`` over an
  ``AutoencoderKL``'s latents, conditioned by cross-attention on the N embeddings, trained
  to reconstruct images from their own embeddings (as Emu2's decoder is). Cross-attention
  alone does not say where an embedding belongs (neither the context tokens nor the UNet's
  queries carry positions; a first codec of the shapes world drew the right kinds of
  shapes in the wrong places), so the grid of embeddings is also laid over the latents:
  upsampled to the latent size, projected to ``spatial_channels`` and concatenated to the
  UNet's input. The embeddings are dropped to zeros for 10% of training images, so the
  decoder also has an unconditional mode and its own classifier-free guidance.

``VisualCodec`` holds both: ``encode(images) -> (B, N, visual_dim)``,
``decode(embeddings, generators) -> images``, ``loss(images)`` for joint training (the
encoder learns through the decoder's denoising loss; the VAE stays frozen). Saved as

    config.json      VisualConfig, "_class_name": "VisualCodec"
    encoder/         transformers ViTModel
    model.safetensors  anygen's own parts: the encoder's and the grid's projections
    unet/, vae/      diffusers models
    scheduler/       the training noise schedule (DDPM)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from anygen.errors import CheckpointError, UserInputError, load_errors
from anygen.hub import (
    atomic_directory,
    forget_source_paths,
    load_config,
    load_state_dict,
    load_weights,
    resolve,
    save_pretrained,
    saved_class_name,
)
from anygen.tokenizers.vq import foreground_regions

log = logging.getLogger(__name__)


@dataclass
class VisualConfig:
    image_size: int = 64
    patch_size: int = 8
    encoder_hidden: int = 128
    encoder_layers: int = 4
    encoder_heads: int = 4
    grid: int = 4  # embeddings per side: N = grid ** 2
    visual_dim: int = 64
    # the diffusion decoder, over the VAE's latents
    latent_channels: int = 4
    vae_factor: int = 4
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_groups: int = 16
    attention_head_dim: int = 32
    num_train_timesteps: int = 1000
    spatial_channels: int = 8  # the embedding grid laid over the latents (0: cross-attention only)
    condition_dropout: float = 0.1  # training: embeddings dropped to zeros (unconditional)
    decode_steps: int = 20
    decode_guidance: float = 1.0  # the decoder's own classifier-free guidance

    def __post_init__(self) -> None:
        self.unet_channels = tuple(self.unet_channels)
        patches = self.image_size // self.patch_size
        if self.image_size % self.patch_size or patches % self.grid:
            raise UserInputError(
                f"image_size {self.image_size} / patch_size {self.patch_size} must be a whole "
                f"number of patches that grid {self.grid} divides"
            )
        if self.image_size % self.vae_factor:
            raise UserInputError(
                f"image_size {self.image_size} is not a multiple of the VAE factor "
                f"{self.vae_factor}"
            )

    @property
    def num_embeddings(self) -> int:
        return self.grid**2

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_factor


VISUAL_PRESETS: dict[str, VisualConfig] = {
    "tiny": VisualConfig(
        image_size=32,
        patch_size=8,
        encoder_hidden=32,
        encoder_layers=1,
        encoder_heads=2,
        grid=2,
        visual_dim=8,
        vae_factor=2,
        unet_channels=(16, 32),
        unet_groups=4,
        attention_head_dim=8,
        decode_steps=4,
    ),
    # 16 embeddings of a 16 px square each: an object (at most 18 px) overlaps at most
    # 2 x 2 of them, and 16 positions an image keep regression at a quarter of the 64 codes
    # of the discrete path.
    "shapes": VisualConfig(unet_channels=(32, 64, 64), unet_groups=8, attention_head_dim=16),
}


class VisualEncoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> embeddings (B, grid**2, visual_dim)."""

    def __init__(self, c: VisualConfig, vit: nn.Module | None = None) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        self.config = c
        self.vit = vit or ViTModel(
            ViTConfig(
                image_size=c.image_size,
                patch_size=c.patch_size,
                num_channels=3,
                hidden_size=c.encoder_hidden,
                num_hidden_layers=c.encoder_layers,
                num_attention_heads=c.encoder_heads,
                intermediate_size=4 * c.encoder_hidden,
            ),
            add_pooling_layer=False,
        )
        self.proj = nn.Linear(c.encoder_hidden, c.visual_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = self.vit(pixel_values=images).last_hidden_state[:, 1:]  # (B, P, hidden), no CLS
        side = c.image_size // c.patch_size
        h = rearrange(h, "b (y x) d -> b d y x", y=side)
        h = F.adaptive_avg_pool2d(h, c.grid)  # (B, hidden, grid, grid)
        h = self.proj(rearrange(h, "b d y x -> b (y x) d"))  # (B, N, visual_dim)
        return F.layer_norm(h, (c.visual_dim,))


def build_unet(c: VisualConfig):
    from diffusers import UNet2DConditionModel

    n = len(c.unet_channels)
    return UNet2DConditionModel(
        sample_size=c.latent_size,
        in_channels=c.latent_channels + c.spatial_channels,
        out_channels=c.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=c.unet_channels,
        layers_per_block=c.unet_layers_per_block,
        cross_attention_dim=c.visual_dim,
        attention_head_dim=c.attention_head_dim,
        norm_num_groups=c.unet_groups,
    )


def build_vae(c: VisualConfig):
    """A small AutoencoderKL of the right factor (the recipes start from a trained one)."""
    from diffusers import AutoencoderKL

    levels = c.vae_factor.bit_length()  # factor 2 ** (levels - 1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(16 * 2 ** min(i, 2) for i in range(levels)),
        layers_per_block=1,
        latent_channels=c.latent_channels,
        norm_num_groups=4,
        sample_size=c.image_size,
    )


def build_scheduler(c: VisualConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=c.num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        timestep_spacing="trailing",
    )


class VisualCodec(nn.Module):
    """Visual encoder + diffusion decoder (UNet over a frozen VAE's latents)."""

    def __init__(
        self,
        config: VisualConfig,
        encoder: VisualEncoder | None = None,
        unet: nn.Module | None = None,
        vae: nn.Module | None = None,
        scheduler=None,
    ) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = encoder or VisualEncoder(c)
        self.unet = unet or build_unet(c)
        # the embedding grid, projected per position to the channels laid over the latents
        self.spatial = (
            nn.Conv2d(c.visual_dim, c.spatial_channels, 1) if c.spatial_channels else None
        )
        self.vae = (vae or build_vae(c)).requires_grad_(False).eval()
        self.scheduler = scheduler or build_scheduler(c)
        _check_parts(self)

    # the image-representation interface the fusion pipeline uses
    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_embeddings(self) -> int:
        return self.config.num_embeddings

    @property
    def visual_dim(self) -> int:
        return self.config.visual_dim

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def train(self, mode: bool = True) -> VisualCodec:
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise UserInputError(
                f"the visual encoder takes (B, 3, {s}, {s}) images, got {tuple(images.shape)}"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, N, visual_dim)."""
        self._check_images(images)
        return self.encoder(images.to(self.unet.dtype))

    def _unet(self, latents: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        """The noise prediction (B, C, h, w) for latents given embeddings (B, N, visual_dim):
        cross-attention to them, and (``spatial_channels``) their grid over the latents."""
        x = latents
        if self.spatial is not None:
            g = self.config.grid
            grid = rearrange(cond, "b (y x) d -> b d y x", y=g)  # (B, D, g, g)
            grid = F.interpolate(grid, size=latents.shape[-2:], mode="nearest")  # (B, D, h, w)
            x = torch.cat([latents, self.spatial(grid.to(latents.dtype))], dim=1)
        return self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    def with_vae(self, vae: nn.Module) -> VisualCodec:
        """This codec's encoder and decoder (shared, not copied) over another frozen VAE,
        moved to their device and dtype: for a VAE fine-tuned with its latents kept close to
        the one the decoder learnt on. A VAE of another shape is refused (CheckpointError)."""
        codec = VisualCodec(
            self.config, encoder=self.encoder, unet=self.unet, vae=vae, scheduler=self.scheduler
        )
        codec.spatial = self.spatial
        weight = next(self.unet.parameters())
        codec.vae.to(device=weight.device, dtype=weight.dtype)
        return codec.train(self.training)

    @torch.no_grad()
    def latents_of(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode() * self.latent_scale

    def loss(
        self,
        images: torch.Tensor,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        cond: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
        foreground_weight: float = 0.0,
        foreground_margin: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Denoising loss of the decoder given the encoder's embeddings of ``images``; both
        learn. ``latents``: the images' scaled VAE latents, when already computed.
        ``embeddings``: the encoder's (B, N, visual_dim) embeddings of ``images``, when
        already computed (the encoder learns through them). ``cond``: embeddings to render
        ``images`` from in place of the encoder's (a transformer's regressions of them); the
        encoder then does not learn.

        ``foreground_weight`` w > 0 weighs the latent positions over an object, or within
        ``foreground_margin`` pixels of one, 1 + w times the rest (each image's weights
        normalised to mean 1), as ``anygen.tokenizers.vq.reconstruction_errors`` does in
        pixels: on a mostly empty canvas the plain mean is mostly background."""
        if foreground_margin < 0:  # refused at any weight, as reconstruction_errors does
            raise ValueError(f"foreground_margin must be >= 0, got {foreground_margin}")
        self._check_images(images)
        c = self.config
        if latents is None:
            latents = self.latents_of(images)
        b = images.shape[0]
        if cond is not None and embeddings is not None:
            raise ValueError("give cond (rendered, not learnt through) or embeddings, not both")
        for name, given in (("cond", cond), ("embeddings", embeddings)):
            if given is not None and tuple(given.shape) != (b, c.num_embeddings, c.visual_dim):
                raise ValueError(
                    f"{name} must be ({b}, {c.num_embeddings}, {c.visual_dim}) embeddings, "
                    f"got {tuple(given.shape)}"
                )
        if cond is not None:
            cond = cond.detach().to(self.unet.dtype)
        elif embeddings is not None:
            cond = embeddings
        else:
            cond = self.encoder(images)  # (B, N, visual_dim)
        keep = torch.rand(b, 1, 1, generator=generator, device=images.device)
        cond = cond * (keep >= c.condition_dropout).to(cond.dtype)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        t = torch.randint(0, c.num_train_timesteps, (b,), generator=generator, device=images.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        pred = self._unet(noisy, t, cond)
        sq = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=1, keepdim=True)
        plain = sq.mean(dim=(1, 2, 3))  # (B,)
        per = plain
        if foreground_weight:
            mask = foreground_regions(images, foreground_margin)  # (B, 1, H, W)
            mask = F.adaptive_max_pool2d(mask.float(), sq.shape[-2:])  # latent positions
            w = 1.0 + foreground_weight * mask
            per = (w / w.mean(dim=(1, 2, 3), keepdim=True) * sq).mean(dim=(1, 2, 3))
        alphas = self.scheduler.alphas_cumprod.to(latents.device)[t]
        snr = alphas / (1 - alphas)
        weight = snr.clamp(max=5.0) / snr  # Min-SNR-5 (Hang et al. 2023)
        return {"loss": (weight * per).mean(), "mse": plain.mean().detach()}

    @torch.no_grad()
    def decode(
        self,
        embeddings: torch.Tensor,
        generators: Sequence[torch.Generator] | torch.Generator | None = None,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Embeddings (B, N, visual_dim) -> images (B, 3, H, W) in [-1, 1], by DPM-Solver++
        over the latents; row i draws its noise from ``generators[i]``."""
        from diffusers import DPMSolverMultistepScheduler
        from diffusers.utils.torch_utils import randn_tensor

        c = self.config
        if embeddings.ndim != 3 or tuple(embeddings.shape[1:]) != (
            c.num_embeddings,
            c.visual_dim,
        ):
            raise UserInputError(
                f"the visual decoder takes (B, {c.num_embeddings}, {c.visual_dim}) embeddings, "
                f"got {tuple(embeddings.shape)}"
            )
        steps = steps or c.decode_steps
        scale = c.decode_guidance if guidance_scale is None else guidance_scale
        if steps < 1:
            raise UserInputError(f"decode steps must be >= 1, got {steps}")
        dtype, device = self.unet.dtype, self.unet.device
        b = embeddings.shape[0]
        cond = embeddings.to(device=device, dtype=dtype)
        sampler = DPMSolverMultistepScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(steps, device=device)
        shape = (b, c.latent_channels, c.latent_size, c.latent_size)
        if isinstance(generators, Sequence) and len(generators) == 1 and b > 1:
            generators = generators[0]
        latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        latents = latents * sampler.init_noise_sigma
        guided = scale != 1.0
        context = torch.cat([cond, torch.zeros_like(cond)]) if guided else cond
        for t in tqdm(sampler.timesteps, desc="visual decoder", disable=not progress, leave=False):
            x = torch.cat([latents] * 2) if guided else latents
            x = sampler.scale_model_input(x, t)
            eps = self._unet(x, t, context)
            if guided:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + scale * (eps_c - eps_u)
            latents = sampler.step(eps, t, latents, return_dict=False)[0]
        images = self.vae.decode(latents.to(self.vae.dtype) / self.latent_scale).sample
        return images.float().clamp(-1, 1)

    # ------------------------------------------------------------------ save / load

    def _own_parts(self) -> nn.Module:
        """What is anygen's own (not a transformers or diffusers model): the encoder's
        projection and the spatial projection, saved together in ``model.safetensors``."""
        parts = nn.Module()
        parts.proj = self.encoder.proj
        if self.spatial is not None:
            parts.spatial = self.spatial
        return parts

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        card: str | None = None,
    ) -> Path:
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            config = {"_class_name": type(self).__name__, **dataclasses.asdict(self.config)}
            save_pretrained(self._own_parts(), tmp, config, dtype=dtype, card=card)
            for name in ("unet", "vae"):
                module = getattr(self, name)
                if dtype is not None:
                    import copy

                    module = copy.deepcopy(module).to(dtype=dtype)
                module.save_pretrained(tmp / name)
            vit = self.encoder.vit
            if dtype is not None:
                import copy

                vit = copy.deepcopy(vit).to(dtype=dtype)
            vit.save_pretrained(tmp / "encoder")
            self.scheduler.save_pretrained(tmp / "scheduler")
            forget_source_paths(tmp)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> VisualCodec:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import ViTModel

        path = resolve(name_or_path)
        config = load_config(path, VisualConfig, class_name=cls.__name__)
        for sub in ("encoder", "unet", "vae", "scheduler"):
            if not (path / sub).is_dir():
                raise CheckpointError(f"{path} has no {sub}/ folder: not a saved VisualCodec")
        dtype = dtype or torch.float32
        try:
            vit = ViTModel.from_pretrained(
                path / "encoder", dtype=dtype, add_pooling_layer=False, use_safetensors=True
            )
            unet = UNet2DConditionModel.from_pretrained(
                path / "unet", dtype=dtype, use_safetensors=True
            )
            vae = AutoencoderKL.from_pretrained(path / "vae", dtype=dtype, use_safetensors=True)
            scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        except load_errors() as e:
            raise CheckpointError(f"cannot load the visual codec in {path}: {e}") from None
        encoder = VisualEncoder(config, vit=vit)
        codec = cls(config, encoder=encoder, unet=unet, vae=vae, scheduler=scheduler)
        load_weights(codec._own_parts(), load_state_dict(path), source=path)
        return codec.to(device=device, dtype=dtype).eval()


def _check_parts(codec: VisualCodec) -> None:
    c = codec.config
    problems = []
    if codec.unet.config.cross_attention_dim != c.visual_dim:
        problems.append(
            f"the UNet attends to {codec.unet.config.cross_attention_dim}-wide context, "
            f"the encoder makes {c.visual_dim}"
        )
    want = codec.vae.config.latent_channels + c.spatial_channels
    if codec.unet.config.in_channels != want:
        problems.append(
            f"the UNet takes {codec.unet.config.in_channels} channels, the VAE's latents and "
            f"the embedding grid make {want}"
        )
    factor = 2 ** (len(codec.vae.config.block_out_channels) - 1)
    if factor != c.vae_factor:
        problems.append(f"the VAE downsamples by {factor}, the config says {c.vae_factor}")
    if problems:
        raise CheckpointError("inconsistent visual codec: " + "; ".join(problems))


def load_visual_codec(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> VisualCodec:
    """A ``VisualCodec`` from a bundled name, a directory or a hub id."""
    path = resolve(name_or_path)
    class_name = saved_class_name(path, "a visual codec")
    if class_name != "VisualCodec":
        raise CheckpointError(f"{path} holds a {class_name}, not a VisualCodec")
    return VisualCodec.from_pretrained(path, device=device, dtype=dtype)
