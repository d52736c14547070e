"""Latent diffusion (the ``ldm`` path) from diffusers and transformers parts.

Nothing here rewrites a model or a scheduler: the VAE is diffusers' ``AutoencoderKL``,
the denoiser diffusers' ``UNet2DConditionModel`` (or ``PixArtTransformer2DModel`` for
the DiT option), the text encoder transformers' ``CLIPTextModel`` built from a config,
the noise process diffusers' schedulers. This file holds the config with its size
presets, the builders, and the two training losses (VAE, then denoiser).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PixArtTransformer2DModel,
    PNDMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel

from anygen.errors import UserInputError

# Samplers a user may pick with --scheduler; all share the training noise schedule.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
    "ddpm": DDPMScheduler,
}
DEFAULT_SCHEDULER = "dpm++"
# settings a sampler made from our DDPM config needs (SD's PNDM configs skip PRK steps)
SAMPLER_SETTINGS = {"pndm": {"skip_prk_steps": True}}


@dataclass
class LdmConfig:
    image_size: int = 64
    latent_channels: int = 4
    # VAE: one entry per level; each level after the first halves the resolution.
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_layers_per_block: int = 1
    vae_groups: int = 16
    # denoiser over the latents
    denoiser: str = "unet"  # "unet" | "dit"
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_groups: int = 16
    attention_head_dim: int = 32
    dit_layers: int = 6
    dit_heads: int = 4
    dit_patch_size: int = 2
    # text encoder
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 24
    # noise process
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    # Rescale the betas so that the last timestep is pure noise (Lin et al. 2023). SD's
    # schedule keeps an SNR of 0.005 there, and at 16 x 16 latents that still shows where
    # the objects are (half the time, for shapes-ldm), so training never needs the caption
    # to place them.
    zero_terminal_snr: bool = False

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_factor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LdmConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise UserInputError(f"unknown ldm config fields: {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


LDM_PRESETS: dict[str, LdmConfig] = {
    # for tests: a few hundred thousand parameters, 32 px
    "tiny": LdmConfig(
        image_size=32,
        vae_channels=(8, 16),
        vae_groups=4,
        unet_channels=(16, 32),
        unet_groups=4,
        attention_head_dim=8,
        dit_layers=2,
        dit_heads=2,
        text_hidden=32,
        text_layers=1,
        text_heads=2,
        text_max_length=24,
    ),
    # the bundled shapes-ldm: 64 px images, 16 x 16 x 4 latents
    "shapes": LdmConfig(),
    "shapes-dit": LdmConfig(denoiser="dit"),
}


@dataclass
class LdmComponents:
    """The parts of a latent diffusion model, named as diffusers names them."""

    vae: AutoencoderKL
    denoiser: torch.nn.Module  # UNet2DConditionModel | PixArtTransformer2DModel
    text_encoder: CLIPTextModel
    tokenizer: object  # a transformers tokenizer
    scheduler: object  # the training scheduler (DDPM); samplers are made from its config
    extras: dict = field(default_factory=dict)


def build_vae(cfg: LdmConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_groups,
        sample_size=cfg.image_size,
    )


def build_unet(cfg: LdmConfig) -> UNet2DConditionModel:
    n = len(cfg.unet_channels)
    # as in SD: cross-attention blocks at every resolution but the lowest, which has
    # plain down/up blocks (the mid block keeps its own cross-attention).
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.unet_groups,
    )


def build_dit(cfg: LdmConfig) -> PixArtTransformer2DModel:
    inner = cfg.dit_heads * cfg.attention_head_dim
    return PixArtTransformer2DModel(
        num_attention_heads=cfg.dit_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        num_layers=cfg.dit_layers,
        cross_attention_dim=inner,
        caption_channels=cfg.text_hidden,
        sample_size=cfg.latent_size,
        patch_size=cfg.dit_patch_size,
        norm_num_groups=1,
        use_additional_conditions=False,
    )


def build_text_encoder(cfg: LdmConfig, tokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.text_max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def build_scheduler(cfg: LdmConfig) -> DDPMScheduler:
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise UserInputError(
            f"unknown prediction type {cfg.prediction_type!r}; expected 'epsilon' or 'v_prediction'"
        )
    if cfg.zero_terminal_snr and cfg.prediction_type == "epsilon":
        raise UserInputError(
            "zero terminal SNR needs v_prediction: at the last timestep the noisy latent is the"
            " noise itself, so predicting the noise says nothing about the image"
        )
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        clip_sample=False,
        steps_offset=1,  # as SD's schedulers; DDIM warns without it
        # Explicit, not defaulted: diffusers passes only explicit values on to the
        # samplers made from this config, and a saved config makes every value explicit.
        # "trailing" starts sampling at the last training timestep (Lin et al. 2023).
        timestep_spacing="trailing",
        variance_type="fixed_small",
    )


def build_components(cfg: LdmConfig, tokenizer) -> LdmComponents:
    """Fresh, randomly initialised components for ``cfg`` around ``tokenizer``."""
    if cfg.denoiser not in ("unet", "dit"):
        raise UserInputError(f"unknown denoiser {cfg.denoiser!r}; expected 'unet' or 'dit'")
    tokenizer.model_max_length = cfg.text_max_length
    denoiser = build_unet(cfg) if cfg.denoiser == "unet" else build_dit(cfg)
    return LdmComponents(
        vae=build_vae(cfg),
        denoiser=denoiser,
        text_encoder=build_text_encoder(cfg, tokenizer),
        tokenizer=tokenizer,
        scheduler=build_scheduler(cfg),
    )


def widen_denoiser_inputs(denoiser: torch.nn.Module, extra_channels: int) -> torch.nn.Module:
    """Give ``denoiser`` (a UNet or a PixArt DiT) ``extra_channels`` more input channels, in
    place, with zero weights.

    InstructPix2Pix (Brooks et al. 2023) starts its editing UNet from a text-to-image one
    this way: the source image's latents enter as extra channels whose weights are zero, so
    the widened denoiser computes exactly what the original did until training teaches it
    to look at them. The bias is kept too (diffusers' training script draws a new one). A
    UNet's first convolution is widened; a DiT's is its patch embedding's projection, and
    its output keeps the latent channels it had.
    """
    if extra_channels < 1:
        raise UserInputError(f"extra_channels must be >= 1, got {extra_channels}")
    if isinstance(denoiser, PixArtTransformer2DModel):
        owner, attr = denoiser.pos_embed, "proj"
    elif isinstance(getattr(denoiser, "conv_in", None), torch.nn.Conv2d):
        owner, attr = denoiser, "conv_in"
    else:
        raise UserInputError(
            f"cannot widen the inputs of a {type(denoiser).__name__}: a UNet2DConditionModel "
            "or a PixArtTransformer2DModel is needed"
        )
    old = getattr(owner, attr)
    new = torch.nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)  # (out, in + extra, k, k)
        new.bias.copy_(old.bias)
    setattr(owner, attr, new)
    if isinstance(denoiser, PixArtTransformer2DModel):  # out_channels None would follow in_
        denoiser.register_to_config(out_channels=denoiser.out_channels)
    denoiser.register_to_config(in_channels=new.in_channels)
    return denoiser


def reads_source_image(denoiser: torch.nn.Module, latent_channels: int) -> bool:
    """Whether ``denoiser`` is an InstructPix2Pix one: it takes the latents it denoises and
    as many again, the source image's (``widen_denoiser_inputs``). An inpainting UNet's 9
    channels (latents, mask, masked image) are not that."""
    return int(denoiser.config.in_channels) == 2 * latent_channels


def make_sampler(name: str, training_scheduler) -> object:
    """A sampling scheduler by name, sharing the training scheduler's noise schedule."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise UserInputError(
            f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}"
        ) from None
    zero_snr = training_scheduler.config.get("rescale_betas_zero_snr", False)
    if zero_snr and not _rescales(cls):
        able = [n for n, c in SCHEDULERS.items() if _rescales(c)]
        raise UserInputError(
            f"scheduler {name!r} cannot sample a model trained with zero terminal SNR;"
            f" choose one of {', '.join(able)}"
        )
    return cls.from_config(training_scheduler.config, **SAMPLER_SETTINGS.get(name, {}))


def _rescales(cls) -> bool:
    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters


# --------------------------------------------------------------------------- text


def tokenize(tokenizer, texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, L) token ids padded to the tokenizer's max length, as SD pipelines do."""
    ids = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


def denoise(denoiser: torch.nn.Module, latents, t, text_states) -> torch.Tensor:
    """One denoiser call with either family: (B, C, h, w) -> its prediction (B, C, h, w), the
    noise or v as the scheduler's ``prediction_type`` says."""
    if isinstance(denoiser, PixArtTransformer2DModel):
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.as_tensor(t, device=latents.device).expand(latents.shape[0])
        added = {"resolution": None, "aspect_ratio": None}
        return denoiser(
            latents,
            encoder_hidden_states=text_states,
            timestep=t,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
    return denoiser(latents, t, encoder_hidden_states=text_states, return_dict=False)[0]


# --------------------------------------------------------------------------- losses


def vae_loss(
    vae: AutoencoderKL,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    kl_weight: float = 1e-4,
) -> dict:
    """Reconstruction (l1 + l2, per pixel) plus a small KL term per latent element.

    The KL keeps the latents near unit scale so that one scaling factor serves the
    denoiser; SD trains its VAE the same way (plus perceptual and GAN terms that the
    flat-coloured shapes world does not need). images: (B, 3, H, W) in [-1, 1].
    """
    posterior = vae.encode(images).latent_dist
    z = posterior.sample(generator)  # (B, C, h, w)
    recon = vae.decode(z).sample  # (B, 3, H, W)
    l1 = F.l1_loss(recon, images)
    l2 = F.mse_loss(recon, images)
    kl = posterior.kl().mean() / z[0].numel()
    return {"loss": l1 + l2 + kl_weight * kl, "l1": l1, "l2": l2, "kl": kl}


def sample_timesteps(
    n: int,
    num_train_timesteps: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    terminal_fraction: float = 0.0,
) -> torch.Tensor:
    """Draw ``n`` training timesteps in [0, num_train_timesteps), long (n,).

    ``shift`` 1 draws them uniformly (exactly ``torch.randint``'s draws). A shift s > 1 moves
    them towards high noise as SD3 does (Esser et al. 2024): u ~ U(0, 1) becomes
    s u / (1 + (s - 1) u), so a fraction s / (1 + s) of the draws lies in the noisier half.
    ``terminal_fraction`` p then sets the first round(p n) of them to the last timestep,
    where sampling starts and, on a zero-terminal-SNR schedule, the caption is all there is.
    """
    if shift <= 0:
        raise UserInputError(f"timestep shift must be positive, got {shift}")
    if not 0.0 <= terminal_fraction <= 1.0:
        raise UserInputError(f"terminal fraction must be in [0, 1], got {terminal_fraction}")
    if shift == 1.0:
        t = torch.randint(0, num_train_timesteps, (n,), generator=generator, device=device)
    else:
        u = torch.rand((n,), generator=generator, device=device)
        shifted = shift * u / (1 + (shift - 1) * u)
        t = (shifted * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
    t[: round(terminal_fraction * n)] = num_train_timesteps - 1
    return t


def denoiser_loss(
    denoiser: torch.nn.Module,
    text_encoder: CLIPTextModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = 5.0,
    image_latents: torch.Tensor | None = None,
    snr_floor: float | None = None,
    timestep_shift: float = 1.0,
    terminal_fraction: float = 0.0,
    region_weight: torch.Tensor | None = None,
) -> dict:
    """DDPM noise-prediction loss on scaled latents (B, C, h, w) given caption ids (B, L).

    ``snr_gamma`` weights each timestep by min(SNR, gamma) / SNR (Min-SNR, Hang et al.
    2023), which converges several times faster than the plain loss; None disables it.
    In terms of the clean latents, that weight is min(SNR, gamma): at the last timesteps of
    SD's schedule (SNR 0.005 at t = 999), where the layout is decided, errors of the layout
    cost almost nothing. ``snr_floor`` f raises that weight to at least f (the weight
    becomes clamp(SNR, f, gamma) / SNR; f = 1 matches the v-prediction loss at high noise).
    ``timestep_shift`` and ``terminal_fraction`` draw more of the timesteps from high noise
    (``sample_timesteps``).
    Captions dropped for classifier-free guidance are the empty caption, tokenised like
    any other: the recipe decides which rows are dropped. ``image_latents`` (B, C', h, w),
    for an InstructPix2Pix denoiser (``widen_denoiser_inputs``), are concatenated to the noisy
    latents along channels, as diffusers' ``StableDiffusionInstructPix2PixPipeline`` does.
    ``region_weight`` (B, 1, h, w), positive, weighs each latent position's squared error
    in its sample's mean (a weighted mean, so the loss keeps its scale): an editor's recipe
    weighs the positions its edit changes above those it copies.
    """
    # fp32 noising: under bf16 autocast the latents arrive in bf16, and diffusers' add_noise
    # casts the schedule to their dtype (1 - alpha_bar at t = 0 rounds to 0 in bf16)
    latents = latents.float()
    if image_latents is not None:
        image_latents = image_latents.float()
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    t = sample_timesteps(
        b,
        scheduler.config.num_train_timesteps,
        timestep_shift,
        generator,
        latents.device,
        terminal_fraction,
    )
    noisy = scheduler.add_noise(latents, noise, t)
    if image_latents is not None:
        noisy = torch.cat([noisy, image_latents], dim=1)  # (B, C + C', h, w)
    text_states = text_encoder(input_ids)[0]  # (B, L, D)
    pred = denoise(denoiser, noisy, t, text_states)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    squared = F.mse_loss(pred.float(), target.float(), reduction="none")
    mse = squared.mean(dim=(1, 2, 3))  # (B,)
    per_sample = mse
    if region_weight is not None:
        w = region_weight.float().expand_as(squared)
        per_sample = (w * squared).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))
    if snr_gamma is None and snr_floor is None:
        return {"loss": per_sample.mean()}
    alphas = scheduler.alphas_cumprod.to(latents.device)[t]  # (B,)
    snr = alphas / (1 - alphas)
    clamped = snr.clamp(min=snr_floor, max=snr_gamma)  # a None bound is no bound
    weight = clamped / snr
    if scheduler.config.prediction_type == "v_prediction":
        weight = clamped / (snr + 1)
    return {"loss": (weight * per_sample).mean(), "mse": mse.mean().detach()}


def check_loss_weighting(
    snr_floor: float | None,
    timestep_shift: float,
    terminal_fraction: float,
    zero_terminal_snr: bool,
) -> None:
    """Refuse ``denoiser_loss`` settings that are out of range, or that would train nothing.

    Recipes call this before anything trains. Under a zero-terminal-SNR schedule the last
    timestep sits at SNR 0, where the Min-SNR v weight min(SNR, 5) / (SNR + 1) is 0, so
    ``terminal_fraction`` rows teach nothing without a ``snr_floor``.
    """
    if snr_floor is not None and snr_floor <= 0:
        raise UserInputError(f"--snr-floor must be positive, got {snr_floor}")
    if timestep_shift <= 0:
        raise UserInputError(f"--timestep-shift must be positive, got {timestep_shift}")
    if not 0.0 <= terminal_fraction <= 1.0:
        raise UserInputError(f"--terminal-fraction must be in [0, 1], got {terminal_fraction}")
    if zero_terminal_snr and terminal_fraction > 0 and snr_floor is None:
        raise UserInputError(
            "--terminal-fraction rows sit at SNR 0 on a zero-terminal-SNR schedule, where the "
            "Min-SNR weight is 0 and they would teach nothing: pass --snr-floor (1 weights them "
            "as the plain v-prediction loss does)"
        )
