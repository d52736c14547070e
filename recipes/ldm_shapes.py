"""Train shapes-ldm: a latent diffusion model of the shapes world at 64 px.

Stage 1 trains the VAE (64 px -> 16 x 16 x 4 latents) on reconstruction; stage 2
freezes it and trains the UNet and the CLIP text encoder with the DDPM loss, dropping
10% of captions (the empty caption) so that classifier-free guidance works; stage 3
fine-tunes the VAE's decoder alone (encoder frozen, so the latents the denoiser learnt
are unchanged), as SD's ft-MSE decoder was made, to sharpen small details such as the
points of a small star. Every stage runs through anygen's training loop, so it
checkpoints, resumes and scales with ``accelerate launch``. The result is a diffusers
pipeline directory in OUT/model.

    anygen train recipes/ldm_shapes.py --output-dir runs/shapes-ldm
    anygen train recipes/ldm_shapes.py --output-dir runs/shapes-ldm --resume   # continue
    anygen train recipes/ldm_shapes.py ... --bundle   # also write anygen/assets/models/shapes-ldm
    anygen train recipes/ldm_shapes.py --output-dir runs/shapes-dit --preset shapes-dit \\
        --vae-from shapes-ldm --decoder-steps 0 --name shapes-dit   # a DiT over shapes-ldm's VAE
    anygen train recipes/ldm_shapes.py ... --text-encoder-from shapes-ldm --freeze-text-encoder
        # ... and over its text encoder, kept fixed (PixArt over a frozen pretrained encoder)
    anygen train recipes/ldm_shapes.py --output-dir runs/ldm-v --init-from shapes-ldm \\
        --prediction-type v_prediction --zero-terminal-snr --snr-floor 1 \\
        --timestep-shift 3   # another schedule; training timesteps shifted to high noise

SD's noise schedule ends at an SNR of 0.005, and on 16 x 16 latents that last, noisiest
step still shows where the objects are, so training never needs the caption to place
them; the first shapes-ldm placed its objects where its starting noise put them, whatever
the caption said (``python benchmarks/layout_probe.py`` measures it). ``--zero-terminal-snr``
(with ``--prediction-type v_prediction``, which it needs) makes the last step pure noise,
``--snr-floor`` keeps the loss of the noisiest steps from vanishing
(``denoiser_loss``), and ``--timestep-shift`` trains more of the noisiest steps. Neither a
2,000-step fine-tune of shapes-ldm onto the first two nor a 1,000-step one onto all three
made the caption place objects (docs/results.md, "Where objects land"). ``--terminal-fraction``
trains part of each batch at the last timestep; from scratch, on position captions alone,
half a batch there made a fresh UNet place objects as asked (on all caption forms,
5,000 steps of batch 32 were not enough: docs/results.md, "Where objects land"). ``--caption-forms``
weighs the caption forms: ``position=3`` draws 3 position captions for 1 of each other form,
and with it the shipped shapes-ldm learnt position words (its card gives the commands).
A model continued with ``--init-from`` keeps the schedule it was trained on unless told.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from anygen.data.datasets import ShapesT2IDataset, collate
from anygen.errors import UserInputError
from anygen.eval.suites import SELECT_N, run_t2i, select_t2i_settings
from anygen.hub import keep_history, resolve
from anygen.models.ldm import (
    LDM_PRESETS,
    LdmComponents,
    build_components,
    build_scheduler,
    check_loss_weighting,
    denoiser_loss,
    tokenize,
    vae_loss,
)
from anygen.pipelines import Options
from anygen.pipelines.text_to_image import LatentDiffusion
from anygen.tokenizers.text import load_text_tokenizer
from anygen.tokenizers.vq import reconstruction_errors
from anygen.training import (
    TrainConfig,
    caption_forms_arg,
    known_words,
    lineage_text,
    starting_lineage,
    train,
    training_device,
    training_seconds,
    warn_if_same_seed,
    warn_if_unscored_bundle,
)

log = logging.getLogger("recipes.ldm_shapes")

BUNDLED_MODELS = Path(__file__).resolve().parents[1] / "anygen" / "assets" / "models"


class CaptionDropout(Dataset):
    """Replaces the caption of a fixed, seeded 10% of samples by the empty caption."""

    def __init__(self, dataset: Dataset, p: float, seed: int) -> None:
        self.dataset, self.p, self.seed = dataset, p, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        if random.Random(self.seed * 1_000_003 + index).random() < self.p:
            item["text"] = ""
        return item


class VaeTrainer(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> dict:
        return vae_loss(self.vae, images)


class DecoderTrainer(nn.Module):
    """Reconstruction through a frozen encoder: only the decoder learns. With
    ``foreground_weight`` w, object pixels weigh 1 + w times the background's (the
    shapes-vq recipe's weighting: small shapes stay sharp)."""

    def __init__(self, vae: nn.Module, foreground_weight: float = 0.0) -> None:
        super().__init__()
        self.vae = vae
        self.foreground_weight = foreground_weight

    def forward(self, images: torch.Tensor) -> dict:
        with torch.no_grad():
            z = self.vae.encode(images).latent_dist.sample()  # (B, 4, 16, 16)
        recon = self.vae.decode(z).sample
        l1, l2 = reconstruction_errors(recon, images, self.foreground_weight)
        return {"loss": l1 + l2, "l1": l1, "l2": l2}


class DenoiserTrainer(nn.Module):
    """Denoiser + text encoder (trained) over latents of a frozen VAE."""

    def __init__(
        self,
        c: LdmComponents,
        snr_floor: float | None = None,
        timestep_shift: float = 1.0,
        terminal_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.denoiser, self.text_encoder = c.denoiser, c.text_encoder
        self.snr_floor, self.timestep_shift = snr_floor, timestep_shift
        self.terminal_fraction = terminal_fraction
        self.vae = c.vae.requires_grad_(False).eval()
        self.scheduler = c.scheduler

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> dict:
        with torch.no_grad():
            latents = self.vae.encode(images).latent_dist.sample()  # (B, 4, 16, 16)
            latents = latents * self.vae.config.scaling_factor
        return denoiser_loss(
            self.denoiser,
            self.text_encoder,
            self.scheduler,
            latents,
            input_ids,
            snr_floor=self.snr_floor,
            timestep_shift=self.timestep_shift,
            terminal_fraction=self.terminal_fraction,
        )


def donor_text_encoder(source: str, cfg, tokenizer) -> nn.Module:
    """The text encoder of a saved ldm model, checked to fit ``cfg`` and ``tokenizer``."""
    donor = LatentDiffusion.from_pretrained(resolve(source), dtype=torch.float32)
    encoder = donor.components.text_encoder
    config = encoder.config
    problems = []
    if config.hidden_size != cfg.text_hidden:
        problems.append(f"width {config.hidden_size}, the preset's is {cfg.text_hidden}")
    if config.vocab_size != len(tokenizer):
        problems.append(f"{config.vocab_size} tokens, the tokenizer has {len(tokenizer)}")
    if config.max_position_embeddings < cfg.text_max_length:
        problems.append(
            f"{config.max_position_embeddings} positions, the preset reads {cfg.text_max_length}"
        )
    if problems:
        raise UserInputError(f"the text encoder of {source} does not fit: " + "; ".join(problems))
    return encoder


@torch.no_grad()
def latent_scaling_factor(vae: nn.Module, dataset: Dataset, n: int = 512) -> float:
    """1 / std of the VAE's latents over ``n`` training images (as SD chose 0.18215)."""
    n = min(n, len(dataset))
    images = torch.stack([dataset[i]["image"] for i in range(n)])
    latents = torch.cat(
        [vae.encode(images[i : i + 64]).latent_dist.sample() for i in range(0, n, 64)]
    )
    return float(1.0 / latents.flatten().std())


def stage_config(
    args: argparse.Namespace,
    output_dir: Path,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    **extra,
) -> TrainConfig:
    """One stage's loop settings: cosine schedule, checkpoints, resume as asked."""
    return TrainConfig(
        output_dir=output_dir,
        max_steps=steps,
        batch_size=batch_size,
        learning_rate=lr,
        lr_schedule="cosine",
        warmup_steps=warmup,
        checkpoint_every=args.checkpoint_every,
        keep_last_checkpoints=args.keep_checkpoints or None,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        resume="latest" if args.resume else None,
        **extra,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="anygen train recipes/ldm_shapes.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(LDM_PRESETS), default="shapes")
    p.add_argument("--tokenizer", default="shapes-bpe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=20000, help="denoiser steps")
    p.add_argument("--decoder-steps", type=int, default=600, help="decoder fine-tuning steps")
    p.add_argument("--decoder-lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--paraphrase-prob", type=float, default=0.2)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument(
        "--caption-forms",
        type=caption_forms_arg,
        metavar="FORM=W,...",
        help="relative weights of the caption forms (a form not named weighs 1; default:"
        " uniform), e.g. position=3",
    )
    p.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        help="what the denoiser predicts (default: the preset's, or --init-from's)",
    )
    p.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rescale the noise schedule so its last timestep is pure noise (needs"
        " v_prediction; default: the preset's, or --init-from's)",
    )
    p.add_argument(
        "--snr-floor",
        type=float,
        default=None,
        help="raise the loss weight of high-noise timesteps, where the layout is decided, to"
        " at least this (in clean-latent terms; anygen.models.ldm.denoiser_loss)",
    )
    p.add_argument(
        "--timestep-shift",
        type=float,
        default=1.0,
        help="draw training timesteps towards high noise (SD3's shift s: a fraction s/(1+s)"
        " in the noisier half; 1 is uniform)",
    )
    p.add_argument(
        "--terminal-fraction",
        type=float,
        default=0.0,
        help="train this fraction of each batch at the last timestep, where sampling starts"
        " (with --zero-terminal-snr: pure noise, so the caption alone sets the layout)",
    )
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        metavar="N",
        help="keep each stage's last N checkpoints (0: keep every one, e.g. to probe a run's"
        " progress with benchmarks/layout_probe.py --checkpoint)",
    )
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoints")
    p.add_argument(
        "--init-from",
        default=None,
        help="start from a saved ldm model (a bundled name such as shapes-ldm, or a "
        "directory): its VAE, denoiser and text encoder; the VAE stage is skipped",
    )
    p.add_argument(
        "--vae-from",
        default=None,
        help="take only the VAE (and its latent scale) of a saved ldm model and train a new "
        "denoiser and text encoder of --preset over it; the VAE stage is skipped",
    )
    p.add_argument(
        "--text-encoder-from",
        default=None,
        help="start the text encoder from a saved ldm model's (it must read --tokenizer and "
        "have the preset's width), not from random weights; with --vae-from or from scratch",
    )
    p.add_argument(
        "--freeze-text-encoder",
        action="store_true",
        help="train the denoiser alone over a fixed text encoder (with --text-encoder-from: "
        "PixArt's frozen pretrained encoder)",
    )
    p.add_argument(
        "--decoder-foreground-weight",
        type=float,
        default=0.0,
        help="decoder stage: extra weight of object pixels (anygen.tokenizers.vq.foreground_mask)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="default guidance of the model (4.0); with --select-n 0 only, as selection chooses it",
    )
    p.add_argument("--sample-steps", type=int, default=20, help="default sampling steps")
    p.add_argument(
        "--select-n",
        type=int,
        default=SELECT_N,
        help="validation prompts (seed 1000, never the eval's seed 0) on which to choose the "
        "default guidance from GUIDANCE_GRID (0: keep --guidance)",
    )
    p.add_argument("--eval-n", type=int, default=300, help="shapes-eval t2i prompts (0: skip)")
    p.add_argument("--name", default="shapes-ldm", help="the model's name (and bundle folder)")
    p.add_argument(
        "--bundle",
        action="store_true",
        help=f"also write fp16 weights to {BUNDLED_MODELS}/NAME",
    )
    args = p.parse_args(argv)
    if args.select_n and args.guidance is not None:
        p.error("--guidance sets the default only with --select-n 0 (selection chooses it)")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    warn_if_unscored_bundle(args.bundle, args.eval_n, BUNDLED_MODELS / args.name)
    # before any stage trains (the schedule's zero terminal SNR is checked once it is known)
    check_loss_weighting(args.snr_floor, args.timestep_shift, args.terminal_fraction, False)
    if args.keep_checkpoints < 0:
        raise UserInputError(f"--keep-checkpoints must be >= 0, got {args.keep_checkpoints}")
    if args.decoder_steps < 0:
        raise UserInputError(f"--decoder-steps must be >= 0, got {args.decoder_steps}")
    # each stage's loop settings fail now, not after the stages before it have trained
    out = args.output_dir
    if not (args.init_from or args.vae_from):
        stage_config(args, out / "vae", args.vae_steps, args.vae_batch_size, args.vae_lr, 100)
    stage_config(
        args, out / "denoiser", args.steps, args.batch_size, args.lr, 200, ema_decay=args.ema_decay
    )
    if args.decoder_steps:
        stage_config(
            args, out / "decoder", args.decoder_steps, args.vae_batch_size, args.decoder_lr, 50
        )
    cfg = dataclasses.replace(LDM_PRESETS[args.preset])
    if args.init_from:  # continue with the schedule the model learnt, unless told otherwise
        path = resolve(args.init_from) / "scheduler" / "scheduler_config.json"
        schedule = json.loads(path.read_text()) if path.is_file() else {}  # else: load refuses
        cfg.prediction_type = schedule.get("prediction_type", cfg.prediction_type)
        cfg.zero_terminal_snr = schedule.get("rescale_betas_zero_snr", cfg.zero_terminal_snr)
    if args.prediction_type is not None:
        cfg.prediction_type = args.prediction_type
    if args.zero_terminal_snr is not None:
        cfg.zero_terminal_snr = args.zero_terminal_snr
    check_loss_weighting(
        args.snr_floor, args.timestep_shift, args.terminal_fraction, cfg.zero_terminal_snr
    )
    torch.manual_seed(args.seed)
    tokenizer = load_text_tokenizer(args.tokenizer)
    started = time.time()
    out = args.output_dir
    if args.init_from and args.vae_from:
        raise UserInputError("--init-from and --vae-from exclude each other")
    if args.init_from and args.text_encoder_from:
        raise UserInputError("--init-from and --text-encoder-from exclude each other")
    if args.freeze_text_encoder and not (args.text_encoder_from or args.init_from):
        raise UserInputError(
            "--freeze-text-encoder would keep a random text encoder: pass --text-encoder-from"
        )
    # loaded and checked now, not after the VAE stage has trained
    text_encoder = (
        donor_text_encoder(args.text_encoder_from, cfg, tokenizer)
        if args.text_encoder_from
        else None
    )
    started_from = None  # for --init-from: how that model was trained
    if args.vae_from:
        components = build_components(cfg, tokenizer)
        donor = LatentDiffusion.from_pretrained(resolve(args.vae_from), dtype=torch.float32)
        vae_config = donor.components.vae.config
        fits = (vae_config.sample_size, vae_config.latent_channels, donor.vae_factor) == (
            cfg.image_size,
            cfg.latent_channels,
            cfg.vae_factor,
        )
        if not fits:
            raise UserInputError(
                f"the VAE of {args.vae_from} does not fit preset {args.preset!r} ({cfg.image_size}"
                f" px to {cfg.latent_size} x {cfg.latent_size} x {cfg.latent_channels} latents)"
            )
        components.vae = donor.components.vae
        scaling = float(components.vae.config.scaling_factor)
        args.vae_steps = 0
        log.info("VAE of %s; latent scaling factor %.4f", args.vae_from, scaling)
    elif args.init_from:
        # continue a saved model: its components (fp32), its VAE and latent scale as they are
        init = LatentDiffusion.from_pretrained(resolve(args.init_from), dtype=torch.float32)
        components = init.components
        components.scheduler = build_scheduler(cfg)
        tokenizer.model_max_length = cfg.text_max_length  # as build_components sets it
        scaling = float(components.vae.config.scaling_factor)
        args.vae_steps = 0
        log.info("starting from %s; latent scaling factor %.4f", args.init_from, scaling)
        started_from = starting_lineage(  # read now, before --bundle
            resolve(args.init_from), out / "model", args.resume
        )
        warn_if_same_seed(args.init_from, args.seed, started_from)
    else:
        components = build_components(cfg, tokenizer)
        # Stage 1: the VAE.
        images = ShapesT2IDataset(
            args.vae_steps * args.vae_batch_size, seed=args.seed, size=cfg.image_size
        )
        vae_result = train(
            VaeTrainer(components.vae),
            lambda model, batch: model(batch["image"]),
            images,
            stage_config(args, out / "vae", args.vae_steps, args.vae_batch_size, args.vae_lr, 100),
            collate_fn=collate,
        )
        components.vae = vae_result.model.vae
        # computed once and kept: a resumed run must scale latents as the denoiser learnt them
        scaling_file = out / "vae" / "scaling_factor.json"
        if scaling_file.is_file():
            scaling = json.loads(scaling_file.read_text())["scaling_factor"]
        else:
            scaling = latent_scaling_factor(components.vae, images)
            if vae_result.is_main_process:
                scaling_file.write_text(json.dumps({"scaling_factor": scaling}) + "\n")
        components.vae.register_to_config(scaling_factor=scaling)
        log.info("VAE trained; latent scaling factor %.4f", scaling)

    if text_encoder is not None:
        components.text_encoder = text_encoder
        log.info("text encoder of %s", args.text_encoder_from)
    if args.freeze_text_encoder:
        components.text_encoder.requires_grad_(False)

    # Stage 2: the denoiser and the text encoder, with caption dropout for guidance.
    texts = CaptionDropout(
        ShapesT2IDataset(
            args.steps * args.batch_size,
            seed=args.seed + 1,
            size=cfg.image_size,
            paraphrase_prob=args.paraphrase_prob,
            form_weights=args.caption_forms,
        ),
        args.caption_dropout,
        args.seed,
    )

    def collate_text(items: list[dict]) -> dict:
        batch = collate(items)
        batch["input_ids"] = tokenize(tokenizer, batch["text"])
        return batch

    trainer = DenoiserTrainer(
        components,
        snr_floor=args.snr_floor,
        timestep_shift=args.timestep_shift,
        terminal_fraction=args.terminal_fraction,
    )
    result = train(
        trainer,
        lambda model, batch: model(batch["image"], batch["input_ids"]),
        texts,
        stage_config(
            args,
            out / "denoiser",
            args.steps,
            args.batch_size,
            args.lr,
            200,
            ema_decay=args.ema_decay,
        ),
        collate_fn=collate_text,
        trainable_parameters=list(trainer.denoiser.parameters())
        + ([] if args.freeze_text_encoder else list(trainer.text_encoder.parameters())),
    )
    components.denoiser = result.model.denoiser
    # a resumed run continues the checkpoint's step under a schedule over --steps
    resumed_from = result.resumed_from.name if result.resumed_from else None
    components.text_encoder = result.model.text_encoder

    # Stage 3: the decoder alone, on latents of the frozen encoder (--decoder-steps 0: skip).
    if args.decoder_steps:
        decoder = DecoderTrainer(
            components.vae.requires_grad_(False), foreground_weight=args.decoder_foreground_weight
        )
        decoder_params = list(components.vae.decoder.parameters()) + list(
            components.vae.post_quant_conv.parameters()
        )
        for param in decoder_params:
            param.requires_grad_(True)
        result = train(
            decoder,
            lambda model, batch: model(batch["image"]),
            ShapesT2IDataset(
                args.decoder_steps * args.vae_batch_size, seed=args.seed + 2, size=cfg.image_size
            ),
            stage_config(
                args, out / "decoder", args.decoder_steps, args.vae_batch_size, args.decoder_lr, 50
            ),
            collate_fn=collate,
            trainable_parameters=decoder_params,
        )
        components.vae = result.model.vae.requires_grad_(False)
    if not result.is_main_process:
        return
    wall = time.time() - started

    words = known_words(args.tokenizer)
    defaults = {
        "steps": args.sample_steps,
        "guidance_scale": 4.0 if args.guidance is None else args.guidance,
        "scheduler": "dpm++",
        **({"known_words": words} if words else {}),
    }
    model = LatentDiffusion(components, name=args.name, defaults=defaults)
    selection = None
    if args.select_n:
        selection = select_guidance(model, args.select_n)
        model.defaults.update(selection["chosen"])
    facts = {
        "name": args.name,
        "recipe": "recipes/ldm_shapes.py",
        "argv": argv,
        "seed": args.seed,
        "preset": args.preset,
        "init_from": args.init_from,
        "started_from": started_from,
        "vae_from": args.vae_from,
        "text_encoder_from": args.text_encoder_from,
        "freeze_text_encoder": args.freeze_text_encoder,
        "vae_steps": args.vae_steps,
        "denoiser_steps": args.steps,
        "prediction_type": cfg.prediction_type,
        "zero_terminal_snr": cfg.zero_terminal_snr,
        "snr_floor": args.snr_floor,
        "timestep_shift": args.timestep_shift,
        "terminal_fraction": args.terminal_fraction,
        "caption_forms": args.caption_forms,
        "decoder_steps": args.decoder_steps,
        "latent_scaling_factor": round(scaling, 5),
        "denoiser_resumed_from": resumed_from,
        "train_time_s": {
            stage: round(training_seconds(out / stage / "metrics.jsonl"), 1)
            for stage in ("vae", "denoiser", "decoder")
        },
        "device": training_device(
            *(out / stage / "metrics.jsonl" for stage in ("vae", "denoiser", "decoder"))
        ),
        "torch": torch.__version__,
    }
    if selection is not None:
        facts["sampling_selection"] = selection
    report = None
    if args.eval_n:
        # the bundled weights are fp16: score the model as it will be shipped
        shipped = model
        if args.bundle:
            model.save_pretrained(out / "model-fp16", dtype=torch.float16)
            shipped = LatentDiffusion.from_pretrained(out / "model-fp16", name=args.name)
        report = run_t2i(
            lambda prompts, seeds: (
                shipped.generate_batch(prompts, seeds, Options(progress=False)).images
            ),
            n=args.eval_n,
            seed=0,
            batch_size=32,
        )
        report.meta = {"model": args.name, "suite": "t2i", "n": args.eval_n, "seed": 0}
        log.info("shapes-eval t2i:\n%s", report.table())
    card = model_card(facts, report, "fp16 weights" if args.bundle else "fp32 weights")
    files = {"training.json": json.dumps(facts, indent=2) + "\n"}
    if report is not None:
        files["eval.json"] = report.to_json() + "\n"
    model.save_pretrained(out / "model", card=card, extra_files=files)
    log.info("saved %s (%.0f s)", out / "model", wall)
    if args.bundle:
        bundle = BUNDLED_MODELS / args.name
        card = keep_history(card, bundle)
        model.save_pretrained(bundle, card=card, dtype=torch.float16, extra_files=files)
        log.info("bundled fp16 weights in %s", bundle)


GUIDANCE_GRID = [{"guidance_scale": g} for g in (1.5, 2.0, 2.5, 3.0, 5.0, 8.0)]


def select_guidance(model: LatentDiffusion, n: int) -> dict:
    """The default guidance: the best of ``GUIDANCE_GRID`` on validation prompts
    (``select_t2i_settings``: seed 1000, never the reported evaluation's seed 0)."""
    return select_t2i_settings(
        lambda prompts, seeds, s: (
            model.generate_batch(prompts, seeds, Options(progress=False, **s)).images
        ),
        GUIDANCE_GRID,
        n,
    )


def model_card(facts: dict, report=None, weights: str = "fp32 weights") -> str:
    name = facts["name"]
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in facts.items() if k != "name")
    times = ", ".join(f"{stage} {s:.0f} s" for stage, s in facts["train_time_s"].items())
    if report is not None:
        front += f"\nshapes_eval_t2i_overall: {report.overall:.3f}"
        scores = (
            f"shapes-eval, t2i suite, {len(report.records)} prompts, seed 0 "
            f"(`anygen eval --model {name} --suite t2i --n {len(report.records)}`), "
            f"as shipped ({weights}, default settings):\n\n```\n{report.table()}\n```\n"
        )
    else:
        scores = f"Not scored yet: `anygen eval --model {name} --suite t2i --n 300`.\n"
    selection = ""
    if "sampling_selection" in facts:
        sel = facts["sampling_selection"]
        rows = "\n".join(
            f"| {r['guidance_scale']} | {r['validation_overall']:.3f} |" for r in sel["grid"]
        )
        selection = (
            f"\nThe default guidance was chosen on {sel['n']} validation prompts (shapes-eval "
            f"t2i, seed {sel['seed']}; the scores above use seed 0):\n\n"
            f"| guidance | validation overall |\n|---|---|\n{rows}\n"
        )
    dit = LDM_PRESETS[facts["preset"]].denoiser == "dit"
    kind = "DiT" if dit else "UNet"
    denoiser = "PixArtTransformer2DModel (DiT)" if dit else "UNet2DConditionModel"
    if facts.get("init_from"):
        origin = (
            f"Continued from {facts['init_from']} ({lineage_text(facts.get('started_from'))}; "
            "its VAE, denoiser and text encoder)"
        )
    elif facts.get("vae_from"):
        origin = f"The VAE is {facts['vae_from']}'s; " + (
            "the denoiser and text encoder were trained from scratch over it"
            if not facts.get("text_encoder_from")
            else f"the text encoder started from {facts['text_encoder_from']}'s"
            + (" and stayed frozen" if facts.get("freeze_text_encoder") else "")
            + ", and the denoiser was trained from scratch over them"
        )
    else:
        origin = "Trained from scratch"
    return f"""---
name: {name}
summary: "text to image, latent diffusion ({kind}), shapes world 64 px"
{front}
---
# {name}

A latent diffusion model of the shapes world: AutoencoderKL (64 px -> 16 x 16 x 4),
{denoiser}, CLIP text encoder over the `shapes-bpe` tokenizer, DDPM training,
DPM-Solver++ sampling. {origin} by `{facts["recipe"]}` (seed {facts["seed"]},
{facts["vae_steps"]} VAE steps, {facts["denoiser_steps"]} denoiser steps, {facts["decoder_steps"]}
decoder fine-tuning steps; training time {times} on {facts["device"]}).

{scores}{selection}"""
