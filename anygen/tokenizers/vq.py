"""Image tokenizers: images <-> grids of discrete codes.

``VitVQGAN`` is the tokenizer of Parti (Yu et al. 2022, "Vector-quantized Image Modeling
with Improved VQGAN"): a ViT encoder over non-overlapping patches, a factorized quantizer
(project each patch vector to a low-dimensional space, l2-normalise it and the codebook,
look up the nearest code; the code goes back up to the model width) and a ViT decoder that
maps the grid of codes back to patches. The codebook learns by the codebook + commitment
losses or by EMA updates, and codes that fall out of use are restarted from encoder outputs.

``DiffusersVQ`` puts diffusers' ``VQModel`` (the CNN VQGAN) behind the same interface:

    codes = tokenizer.encode(images)   # (B, 3, H, W) in [-1, 1] -> (B, h, w) int64
    images = tokenizer.decode(codes)   # (B, h, w) -> (B, 3, H, W) in [-1, 1]

``load_image_tokenizer`` loads either from a bundled name (``shapes-vq``), a directory or a
hub id, by the ``_class_name`` its ``config.json`` records.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from anygen.attention import attention
from anygen.errors import CheckpointError, UserInputError, load_errors
from anygen.hub import PretrainedMixin, resolve, saved_class_name

log = logging.getLogger(__name__)


@runtime_checkable
class ImageTokenizer(Protocol):
    """What the autoregressive paths need of an image tokenizer."""

    codebook_size: int
    image_size: int
    grid_size: int  # codes per side: an image is grid_size ** 2 codes

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...


# -----------------------------------------------------------------------------
# blocks


class Block(nn.Module):
    """Pre-norm transformer block, bidirectional attention through ``anygen.attention``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        qkv = self.qkv(self.norm1(x))
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        y = rearrange(attention(q, k, v), "b h t d -> b t (h d)")  # (B, T, D)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class FactorizedQuantizer(nn.Module):
    """Nearest-code lookup in a low-dimensional, l2-normalised space (ViT-VQGAN, §3.2).

    With l2-normalised vectors the Euclidean nearest code is the one of largest cosine, so
    codes are used evenly and training is stable. ``ema_decay`` None trains the codebook
    by the codebook loss; a float updates it as an EMA of the vectors assigned to each code
    (VQ-VAE-2). In training, codes whose assignment rate (an EMA, per call) falls below
    ``dead_code_threshold`` (and that no vector of the batch chose) are restarted from
    random vectors of the current batch.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        code_dim: int,
        commitment_weight: float = 0.25,
        ema_decay: float | None = None,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.99,
    ) -> None:
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.commitment_weight = commitment_weight
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.usage_decay = usage_decay
        self.down = nn.Linear(dim, code_dim)
        self.up = nn.Linear(code_dim, dim)
        codebook = F.normalize(torch.randn(codebook_size, code_dim), dim=-1)
        self.codebook = nn.Parameter(codebook, requires_grad=ema_decay is None)
        # assignments per call, EMA; starts at the mean so that no code is dead at once
        self.register_buffer("usage", torch.ones(codebook_size), persistent=False)
        if ema_decay is not None:
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", codebook.clone())

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)  # (K, c)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.down(h), dim=-1)  # (..., c)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes of normalised vectors ``z`` (..., c) -> (...)."""
        return (z @ self.normalized_codebook().t()).argmax(dim=-1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (...) -> model-width vectors (..., D)."""
        if indices.min() < 0 or indices.max() >= self.codebook_size:
            raise UserInputError(
                f"image codes must be in [0, {self.codebook_size}), "
                f"got values from {int(indices.min())} to {int(indices.max())}"
            )
        return self.up(F.embedding(indices, self.normalized_codebook()))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> quantized (B, N, D) with straight-through gradients, indices (B, N),
        and the codebook + commitment loss."""
        z = self.project(h)  # (B, N, c)
        indices = self.lookup(z)  # (B, N)
        if self.training:
            self._update(z.detach(), indices)
        zq = F.embedding(indices, self.normalized_codebook())  # (B, N, c)
        loss = self.commitment_weight * F.mse_loss(z, zq.detach())
        if self.ema_decay is None:
            loss = loss + F.mse_loss(zq, z.detach())
        zq = z + (zq - z).detach()
        return self.up(zq), indices, loss

    @torch.no_grad()
    def _update(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        flat = z.reshape(-1, self.code_dim)  # (M, c)
        onehot = F.one_hot(indices.reshape(-1), self.codebook_size).type_as(flat)  # (M, K)
        counts, sums = onehot.sum(0), onehot.t() @ flat  # (K,), (K, c)
        counts, sums = _all_reduce_sum(counts), _all_reduce_sum(sums)
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        if self.ema_decay is not None:
            d = self.ema_decay
            self.ema_count.mul_(d).add_(counts, alpha=1 - d)
            self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
            self.codebook.copy_(
                F.normalize(self.ema_sum / self.ema_count.clamp_min(1e-5)[:, None], dim=-1)
            )
        if self.dead_code_threshold > 0:
            self._restart(flat, counts)

    def _restart(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        # a code this batch was assigned to is alive: restarting it now would hand those
        # vectors another code than the indices say
        dead = ((self.usage < self.dead_code_threshold) & (counts == 0)).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # every process restarts the same codes to the same vectors: rank 0's choice
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        fresh = _broadcast(flat[pick] + 1e-3 * torch.randn_like(flat[pick]))
        self.codebook[dead] = F.normalize(fresh, dim=-1)
        self.usage[dead] = self.usage.mean()
        if self.ema_decay is not None:
            self.ema_sum[dead] = self.codebook[dead]
            self.ema_count[dead] = 1.0
        log.debug("restarted %d dead codes", dead.numel())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(x)
    return x


def _broadcast(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.broadcast(x, src=0)
    return x


# -----------------------------------------------------------------------------
# ViT-VQGAN


@dataclass
class VitVQConfig:
    image_size: int = 64
    patch_size: int = 8  # 64 px -> 8 x 8 codes
    channels: int = 3
    hidden_size: int = 128
    encoder_layers: int = 4
    decoder_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    codebook_size: int = 512
    code_dim: int = 16
    commitment_weight: float = 0.25
    codebook_ema_decay: float | None = None  # None: codebook loss; else EMA updates
    dead_code_threshold: float = 0.05  # restart codes assigned fewer times per call (EMA)
    # width of the MLP that turns each decoded token into its patch's pixels (0: one linear
    # layer, as in ViT-VQGAN); sharp, small shapes need the non-linearity
    patch_head_hidden: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise UserInputError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise UserInputError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


VQ_PRESETS: dict[str, VitVQConfig] = {
    "tiny": VitVQConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        encoder_layers=1,
        decoder_layers=1,
        num_heads=2,
        codebook_size=32,
        code_dim=4,
    ),
    "shapes": VitVQConfig(),
}


class VitVQGAN(nn.Module, PretrainedMixin):
    """ViT encoder -> factorized quantizer -> ViT decoder, over ``patch_size`` patches."""

    config_class = VitVQConfig

    def __init__(self, config: VitVQConfig) -> None:
        super().__init__()
        self.config = c = config
        n = c.grid_size**2
        patch_dim = c.channels * c.patch_size**2
        self.patch_in = nn.Linear(patch_dim, c.hidden_size)
        self.enc_pos = nn.Parameter(torch.randn(1, n, c.hidden_size) * 0.02)
        self.encoder = nn.ModuleList(
            Block(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.encoder_layers)
        )
        self.enc_norm = nn.LayerNorm(c.hidden_size)
        self.quantizer = FactorizedQuantizer(
            c.hidden_size,
            c.codebook_size,
            c.code_dim,
            c.commitment_weight,
            c.codebook_ema_decay,
            c.dead_code_threshold,
        )
        self.dec_pos = nn.Parameter(torch.randn(1, n, c.hidden_size) * 0.02)
        self.decoder = nn.ModuleList(
            Block(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.decoder_layers)
        )
        self.dec_norm = nn.LayerNorm(c.hidden_size)
        if c.patch_head_hidden:
            self.patch_out = nn.Sequential(
                nn.Linear(c.hidden_size, c.patch_head_hidden),
                nn.GELU(),
                nn.Linear(c.patch_head_hidden, patch_dim),
            )
        else:
            self.patch_out = nn.Linear(c.hidden_size, patch_dim)

    # ImageTokenizer
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def code_parameters(self) -> list[nn.Parameter]:
        """The parameters that decide an image's codes: the encoder, the down-projection
        and the codebook. Frozen, they keep every code's meaning while the decoder learns on
        (models trained over these codes stay valid)."""
        q = self.quantizer
        modules = (self.patch_in, self.encoder, self.enc_norm, q.down)
        return [self.enc_pos, q.codebook, *(p for m in modules for p in m.parameters())]

    def with_decoder_layers(self, layers: int) -> VitVQGAN:
        """A copy with a deeper decoder (Parti fine-tunes a larger decoder over a frozen
        encoder and codebook): the first blocks are this one's, the added ones start as the
        identity (zero output projections), so the copy decodes exactly as this one does."""
        have = self.config.decoder_layers
        if layers < have:
            raise UserInputError(f"cannot shrink the decoder from {have} to {layers} layers")
        grown = VitVQGAN(dataclasses.replace(self.config, decoder_layers=layers))
        missing, unexpected = grown.load_state_dict(self.state_dict(), strict=False)
        new_blocks = tuple(f"decoder.{i}." for i in range(have, layers))
        assert not unexpected and all(k.startswith(new_blocks) for k in missing), missing
        for block in grown.decoder[have:]:
            for layer in (block.proj, block.mlp[-1]):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        return grown.to(self.patch_in.weight)

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        want = (c.channels, c.image_size, c.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise UserInputError(
                f"this tokenizer takes images of shape (B, {', '.join(map(str, want))}), "
                f"got {tuple(images.shape)}"
            )

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> pre-quantization vectors (B, N, D)."""
        self._check_images(images)
        p = self.config.patch_size
        x = rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)  # (B, N, p*p*C)
        x = self.patch_in(x) + self.enc_pos
        for block in self.encoder:
            x = block(x)
        return self.enc_norm(x)

    def decode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized vectors (B, N, D) -> images (B, C, H, W), unclamped."""
        x = x + self.dec_pos
        for block in self.decoder:
            x = block(x)
        patches = self.patch_out(self.dec_norm(x))  # (B, N, p*p*C)
        g, p = self.config.grid_size, self.config.patch_size
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=g, p=p, q=p)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, h, w)."""
        images = images.to(self.patch_in.weight.dtype)
        z = self.quantizer.project(self.encode_features(images))
        g = self.config.grid_size
        return self.quantizer.lookup(z).reshape(-1, g, g)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) or (B, h*w) -> images (B, C, H, W) in [-1, 1]."""
        g = self.config.grid_size
        if codes.ndim not in (2, 3) or codes[0].numel() != g * g:
            raise UserInputError(
                f"this tokenizer decodes (B, {g}, {g}) or (B, {g * g}) codes, "
                f"got {tuple(codes.shape)}"
            )
        x = self.quantizer.embed(codes.reshape(codes.shape[0], g * g).long())
        return self.decode_features(x).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: reconstruction (B, C, H, W), codes (B, N), quantizer loss."""
        quantized, indices, vq_loss = self.quantizer(self.encode_features(images))
        return self.decode_features(quantized), indices, vq_loss


# -----------------------------------------------------------------------------
# losses


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (pix2pix/taming): one real-vs-fake logit per receptive field."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers):
            c_next = width * min(2**i, 8)
            blocks += [
                nn.Conv2d(c, c_next, 4, 2, 1, bias=False),
                nn.GroupNorm(min(32, c_next // 4), c_next),
                nn.LeakyReLU(0.2),
            ]
            c = c_next
        blocks.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 1, h, w)


def vq_loss(
    tokenizer: VitVQGAN,
    images: torch.Tensor,
    *,
    l1_weight: float = 1.0,
    l2_weight: float = 1.0,
    foreground_weight: float = 0.0,
    foreground_margin: int = 0,
    discriminator: nn.Module | None = None,
    gan_weight: float = 0.1,
    perceptual: nn.Module | None = None,
    perceptual_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The ViT-VQGAN objective: l1 + l2 reconstruction, codebook + commitment losses, and
    optionally a hinge patch-GAN and a perceptual loss.

    ``foreground_weight`` w > 0 weighs the reconstruction of pixels that differ from their
    image's background (``foreground_mask``) 1 + w times as much as the rest (weights
    normalised to mean 1 per batch). On sparse scenes, where a few small objects lie on a
    flat canvas, the plain mean is dominated by the easy background and small shapes blur;
    on the shapes world w = 10 reaches 2.5 x the held-out exact reconstructions of w = 0
    after the same 1,000 steps. ``foreground_margin`` widens the weighted region by that
    many pixels around each object (``reconstruction_errors``).

    ``discriminator`` and the tokenizer learn from this one loss under one optimizer: the
    generator term sees the discriminator's weights detached (``functional_call``), and the
    discriminator term sees the reconstruction detached, so neither helps the other.
    ``perceptual(recon, images) -> loss`` is the user's (e.g. LPIPS with weights they have);
    anygen ships none, since it can download none.
    """
    recon, indices, quant_loss = tokenizer(images)
    l1, l2 = reconstruction_errors(recon, images, foreground_weight, foreground_margin)
    loss = l1_weight * l1 + l2_weight * l2 + quant_loss
    terms = {"l1": l1.detach(), "l2": l2.detach(), "vq": quant_loss.detach()}
    if discriminator is not None:
        frozen = {k: v.detach() for k, v in discriminator.named_parameters()}
        g_loss = -torch.func.functional_call(discriminator, frozen, (recon,)).mean()
        d_loss = 0.5 * (
            F.relu(1 - discriminator(images)).mean()
            + F.relu(1 + discriminator(recon.detach())).mean()
        )
        loss = loss + gan_weight * g_loss + d_loss
        terms.update(g=g_loss.detach(), d=d_loss.detach())
    if perceptual is not None:
        p_loss = perceptual(recon, images).mean()
        loss = loss + perceptual_weight * p_loss
        terms["perceptual"] = p_loss.detach()
    with torch.no_grad():
        used = torch.unique(indices).numel()
    terms["codes_used"] = torch.tensor(float(used))
    return {"loss": loss, **terms}


def reconstruction_errors(
    recon: torch.Tensor,
    images: torch.Tensor,
    foreground_weight: float = 0.0,
    foreground_margin: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean l1 and l2 errors of ``recon`` against ``images`` (B, C, H, W). With
    ``foreground_weight`` w > 0, pixels that differ from their image's background
    (``foreground_mask``), and those within ``foreground_margin`` pixels of them (a square
    dilation), weigh 1 + w times the rest, weights normalised to mean 1.

    The margin matters for thin shapes: weighting the object's pixels alone makes colour
    bled into the background around it (a small cross's notches) w + 1 times cheaper than
    colour missing from it, so a decoder learns blobs."""
    if foreground_margin < 0:
        raise ValueError(f"foreground_margin must be >= 0, got {foreground_margin}")
    if not foreground_weight:
        return F.l1_loss(recon, images), F.mse_loss(recon, images)
    weight = 1.0 + foreground_weight * foreground_regions(images, foreground_margin)
    weight = weight / weight.mean()
    return (weight * (recon - images).abs()).mean(), (weight * (recon - images) ** 2).mean()


def foreground_mask(images: torch.Tensor, tolerance: float = 2 / 127.5) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) float: 1 where a pixel differs from its image's
    background, taken as the per-channel median (what a mostly empty canvas is made of)."""
    background = images.flatten(2).median(dim=-1).values[..., None, None]  # (B, C, 1, 1)
    return ((images - background).abs().amax(dim=1, keepdim=True) > tolerance).float()


def foreground_regions(images: torch.Tensor, margin: int = 0) -> torch.Tensor:
    """``foreground_mask`` dilated by ``margin`` pixels (a square dilation): (B, 1, H, W)."""
    if margin < 0:
        raise ValueError(f"foreground_margin must be >= 0, got {margin}")
    mask = foreground_mask(images)
    if margin:
        mask = F.max_pool2d(mask, 2 * margin + 1, stride=1, padding=margin)
    return mask


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2): (B,)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


# -----------------------------------------------------------------------------
# diffusers' VQModel behind the same interface


class DiffusersVQ(nn.Module):
    """diffusers' ``VQModel`` (a CNN VQGAN) as an ``ImageTokenizer``."""

    def __init__(self, vq: nn.Module, image_size: int | None = None) -> None:
        super().__init__()
        self.vq = vq
        factor = 2 ** (len(vq.config.block_out_channels) - 1)
        self.factor = factor
        self.image_size = int(image_size or vq.config.sample_size)
        if self.image_size % factor:
            raise UserInputError(
                f"image size {self.image_size} is not a multiple of the VQModel's factor {factor}"
            )
        self.grid_size = self.image_size // factor
        self.codebook_size = int(vq.config.num_vq_embeddings)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if (
            images.ndim != 4
            or images.shape[-1] != self.image_size
            or images.shape[-2] != self.image_size
        ):
            raise UserInputError(
                f"this tokenizer takes (B, 3, {self.image_size}, {self.image_size}) images, "
                f"got {tuple(images.shape)}"
            )
        h = self.vq.encode(images.to(self.vq.dtype)).latents  # (B, C, h, w)
        _, _, (_, _, indices) = self.vq.quantize(h)
        return indices.reshape(images.shape[0], self.grid_size, self.grid_size)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.grid_size
        if codes.ndim not in (2, 3) or codes[0].numel() != g * g:
            raise UserInputError(
                f"this tokenizer decodes (B, {g}, {g}) codes, got {tuple(codes.shape)}"
            )
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise UserInputError(f"image codes must be in [0, {self.codebook_size})")
        b = codes.shape[0]
        dim = self.vq.quantize.vq_embed_dim
        z = self.vq.quantize.get_codebook_entry(codes.reshape(-1).long(), (b, g, g, dim))
        return self.vq.decode(z, force_not_quantize=True).sample.clamp(-1, 1)

    def save_pretrained(
        self, directory: str | os.PathLike, *, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> None:
        vq = self.vq if dtype is None else copy.deepcopy(self.vq).to(dtype=dtype)
        vq.save_pretrained(directory, **kwargs)


# -----------------------------------------------------------------------------
# loading


def load_image_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> VitVQGAN | DiffusersVQ:
    """An image tokenizer from a bundled name, a directory or a hub id: anygen's
    ``VitVQGAN`` or a diffusers ``VQModel``, told apart by ``config.json``."""
    path = resolve(name_or_path)
    class_name = saved_class_name(path, "an image tokenizer")
    if class_name == "VitVQGAN":
        tok = VitVQGAN.from_pretrained(path, device=device, dtype=dtype)
    elif class_name == "VQModel":
        from diffusers import VQModel

        try:
            vq = VQModel.from_pretrained(path, dtype=dtype, use_safetensors=True)
        except load_errors() as e:
            raise CheckpointError(f"cannot load the VQModel in {path}: {e}") from None
        tok = DiffusersVQ(vq).to(device).eval()
    else:
        raise CheckpointError(
            f"{path} holds a {class_name or 'model without _class_name'}; an image tokenizer "
            "is a VitVQGAN (anygen) or a VQModel (diffusers)"
        )
    return tok


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> float:
    """The fraction of the codebook that occurs in ``codes``."""
    return torch.unique(codes).numel() / codebook_size


def bits_per_image(tokenizer: ImageTokenizer) -> float:
    return tokenizer.grid_size**2 * math.log2(tokenizer.codebook_size)
