"""Instruction editing, InstructPix2Pix-style (Brooks et al. 2023), on the ldm path.

The editor is the base model (default: the bundled shapes-ldm; ``--model shapes-dit`` for a
DiT) with its denoiser widened from 4 to 8 input channels (a UNet's first convolution, a
DiT's patch embedding: ``widen_denoiser_inputs``): the noisy latents of the edited image,
then the latents of the source image (the VAE posterior's mode, unscaled, exactly as diffusers'
``StableDiffusionInstructPix2PixPipeline`` feeds them). The new channels' weights start
at zero, so training starts from the text-to-image model unchanged. It trains on
shapes-world edit triples (source, instruction, target; ``ShapesEditDataset``, train
split) with the DDPM loss on the target's latents. As InstructPix2Pix does, 5% of
samples drop the instruction, 5% the source image and 5% both, so that sampling can
guide by text and by image separately (--guidance, --image-guidance). The text encoder
trains too by default: shapes-ldm's never read an instruction ("make", "move",
"remove" are words of its tokenizer that its captions never used);
--freeze-text-encoder keeps it as it is, as InstructPix2Pix keeps CLIP. The loss is the
base recipe's Min-SNR loss; --snr-floor and --terminal-fraction train the high-noise
timesteps, where a zero-terminal-SNR base such as shapes-dit decides its layout (what an
edit moves or removes), as recipes/ldm_shapes.py does, and --change-weight weighs the
latent positions an edit changes above the many it copies. The bundled shapes-edit was
trained with ``--snr-floor 1 --terminal-fraction 0.5`` for 10,000 steps; in 5,000 steps,
the editor trained without them drew 89 of 200 validation edits right, one with them 150
(178 after 10,000) and one with ``--change-weight 4`` added 128 (docs/results.md). After
training, the default (text, image) guidance pair is chosen from EDIT_GUIDANCE_GRID on
--select-n validation edits (seed 1000; the reported score uses seed 0). A run records
the base it started from (OUT/train/base.json: a fingerprint of the VAE and vocabulary,
which stay frozen and out of its checkpoints), and --resume refuses another base.

The result, OUT/model, is a diffusers ``StableDiffusionInstructPix2PixPipeline``
directory (plus anygen.json with its default settings and README.md with the recipe,
seed, steps, time, device and its shapes-eval edit score), which ``anygen edit`` and
``anygen eval --suite edit`` load as they load any InstructPix2Pix checkpoint. diffusers
has no InstructPix2Pix pipeline for a DiT, so a DiT editor is saved as a
``PixArtAlphaPipeline`` directory (its transformer takes 8 channels) that anygen's
``LatentDiffusion.instruct_edit`` samples, step for step as diffusers' pipeline does a UNet.

    anygen train recipes/instruct_edit.py --output-dir runs/shapes-edit
    anygen train recipes/instruct_edit.py --output-dir runs/shapes-edit --resume  # continue
    anygen edit scene.png "make the red circle blue" --model runs/shapes-edit/model --seed 0 -o out.png
    anygen eval --model runs/shapes-edit/model --suite edit --n 100
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from torch import nn
from torch.utils.data import Dataset

from anygen.data.datasets import ShapesEditDataset, collate
from anygen.errors import UserInputError
from anygen.hub import (
    atomic_directory,
    forget_source_paths,
    history_of,
    read_json_object,
    with_history,
)
from anygen.models.ldm import (
    check_loss_weighting,
    denoiser_loss,
    make_sampler,
    tokenize,
    widen_denoiser_inputs,
)
from anygen.output import write_text_atomic
from anygen.pipelines import Options, load_generator
from anygen.pipelines.text_to_image import ANYGEN_FILE
from anygen.training import (
    TrainConfig,
    seconds_per_step,
    train,
    training_device,
    training_seconds,
)
from anygen.training.checkpoint import latest_checkpoint
from anygen.training.subjects import load_base_model

log = logging.getLogger("recipes.instruct_edit")
BUNDLED_MODELS = Path(__file__).resolve().parents[1] / "anygen" / "assets" / "models"
BASE_FILE = "base.json"  # in OUT/train: the base a run started from

# Text guidance x image guidance, the grid from which the editor's defaults are chosen on
# validation edits. Edits are drawn one at a time, so validation takes fewer samples than
# the text-to-image recipes' SELECT_N. Image guidance 3.5 joined when an editor chose the
# grid's edge (2.5): on 100 validation edits its (4, 3.5) scored 0.35 against (4, 2.5)'s
# 0.29, while 5.0 gave 0.30 (at text 4) and 0.02 (at text 2).
EDIT_GUIDANCE_GRID: tuple[dict, ...] = tuple(
    {"guidance_scale": g, "image_guidance_scale": ig}
    for g in (2.0, 4.0, 7.5)
    for ig in (1.5, 2.5, 3.5)
)
EDIT_SELECT_N = 100
CHANGED = 0.02  # a pixel an edit changed differs by more than this (images in [-1, 1])


class ConditioningDropout(Dataset):
    """InstructPix2Pix's conditioning dropout, fixed per sample by the seed: with r uniform,
    r < p drops the instruction, p <= r < 2p both, 2p <= r < 3p the source image."""

    def __init__(self, dataset: Dataset, p: float, seed: int) -> None:
        self.dataset, self.p, self.seed = dataset, p, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        r = random.Random(self.seed * 1_000_003 + index).random()
        if r < 2 * self.p:
            item["instruction"] = ""
        item["keep_image"] = torch.tensor(0.0 if self.p <= r < 3 * self.p else 1.0)
        return item


class EditTrainer(nn.Module):
    """Denoiser (UNet or DiT, 8 input channels) + text encoder over latents of a frozen VAE."""

    def __init__(
        self,
        denoiser: nn.Module,
        text_encoder: nn.Module,
        vae: nn.Module,
        scheduler,
        snr_floor: float | None = None,
        terminal_fraction: float = 0.0,
        change_weight: float = 1.0,
    ):
        super().__init__()
        self.denoiser, self.text_encoder = denoiser, text_encoder
        self.vae = vae.requires_grad_(False).eval()
        self.scheduler = scheduler
        self.snr_floor, self.terminal_fraction = snr_floor, terminal_fraction
        self.change_weight = change_weight

    def forward(self, batch: dict) -> dict:
        with torch.no_grad():
            target = self.vae.encode(batch["target"]).latent_dist.sample()  # (B, 4, h, w)
            target = target * self.vae.config.scaling_factor
            # the pipeline conditions on the unscaled mode of the source's posterior
            source = self.vae.encode(batch["source"]).latent_dist.mode()  # (B, 4, h, w)
            source = source * batch["keep_image"].to(source.dtype)[:, None, None, None]
            region = None
            if self.change_weight != 1.0:
                region = change_weights(
                    batch["source"], batch["target"], target.shape[-2:], self.change_weight
                )
        return denoiser_loss(
            self.denoiser,
            self.text_encoder,
            self.scheduler,
            target,
            batch["input_ids"],
            image_latents=source,
            snr_floor=self.snr_floor,
            terminal_fraction=self.terminal_fraction,
            region_weight=region,
        )


def change_weights(
    source: torch.Tensor, target: torch.Tensor, latent_size: tuple[int, int], weight: float
) -> torch.Tensor:
    """Loss weights (B, 1, h, w) at ``latent_size`` (h, w) for edit pairs (B, 3, S, S) in
    [-1, 1]: ``weight`` on the latent positions whose pixels the edit changes, and on their
    neighbours (a decoder draws a position from the latents around it too), 1 elsewhere.
    Most of an edit's target copies its source, so the plain loss is mostly about copying;
    moving or removing an object changes a few positions, which this weighs up."""
    changed = (target - source).abs().amax(dim=1, keepdim=True) > CHANGED
    cells = F.adaptive_max_pool2d(changed.float(), latent_size)  # any changed pixel in it
    cells = F.max_pool2d(cells, 3, stride=1, padding=1)
    return 1.0 + (weight - 1.0) * cells


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="anygen train recipes/instruct_edit.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--model", default="shapes-ldm", help="base ldm model (name or directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999, help="0: no EMA")
    p.add_argument("--conditioning-dropout", type=float, default=0.05)
    p.add_argument("--freeze-text-encoder", action="store_true")
    p.add_argument(
        "--snr-floor",
        type=float,
        default=None,
        help="raise the loss weight of high-noise timesteps, where the layout (what moves,"
        " what goes) is decided, to at least this (anygen.models.ldm.denoiser_loss)",
    )
    p.add_argument(
        "--terminal-fraction",
        type=float,
        default=0.0,
        help="train this fraction of each batch at the last timestep, where sampling starts"
        " (on a zero-terminal-SNR base such as shapes-dit: pure noise; needs --snr-floor)",
    )
    p.add_argument(
        "--change-weight",
        type=float,
        default=1.0,
        help="weigh the loss at the latent positions the edit changes (and their neighbours)"
        " this many times those it copies (1: the plain loss; change_weights)",
    )
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="default text guidance (4.0); with --select-n 0 only, as selection chooses it",
    )
    p.add_argument(
        "--image-guidance",
        type=float,
        default=None,
        help="default image guidance (1.5); with --select-n 0 only, as selection chooses it",
    )
    p.add_argument(
        "--select-n",
        type=int,
        default=EDIT_SELECT_N,
        help="validation edits (seed 1000) on which to choose the default guidance pair from "
        "EDIT_GUIDANCE_GRID (0: keep --guidance and --image-guidance)",
    )
    p.add_argument("--sample-steps", type=int, default=20, help="default sampling steps")
    p.add_argument("--eval-n", type=int, default=50, help="shapes-eval edit samples (0: skip)")
    p.add_argument(
        "--bundle",
        action="store_true",
        help=f"also write fp16 weights to {BUNDLED_MODELS}/NAME (and score those)",
    )
    p.add_argument("--name", default="shapes-edit", help="the bundled name (with --bundle)")
    args = p.parse_args(argv)
    if args.select_n < 0 or args.eval_n < 0:  # checked now, not after the training
        p.error("--select-n and --eval-n must be >= 0")
    given = [g for g in (args.guidance, args.image_guidance) if g is not None]
    if any(g < 0 for g in given):
        p.error("--guidance and --image-guidance must be >= 0")
    if given and args.select_n:
        p.error(
            "--guidance and --image-guidance set the defaults only with --select-n 0 "
            "(selection chooses the pair on validation edits)"
        )
    args.guidance = 4.0 if args.guidance is None else args.guidance
    args.image_guidance = 1.5 if args.image_guidance is None else args.image_guidance
    for name in ("steps", "batch_size", "sample_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.change_weight > 0:  # also refuses nan
        p.error(f"--change-weight must be > 0, got {args.change_weight}")
    if not 0 <= args.conditioning_dropout <= 1 / 3:
        p.error("--conditioning-dropout must be in [0, 1/3] (three disjoint shares of it)")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.bundle:
        check_bundle_target(BUNDLED_MODELS / args.name)
    base = load_base_model(args.model)
    c = base.components
    size = base.default_size
    fingerprint = base_fingerprint(c.vae, c.tokenizer)
    zero_terminal_snr = bool(c.scheduler.config.get("rescale_betas_zero_snr", False))
    check_loss_weighting(args.snr_floor, 1.0, args.terminal_fraction, zero_terminal_snr)
    check_base(args.output_dir / "train", args.model, fingerprint, resume=args.resume)
    torch.manual_seed(args.seed)
    widen_denoiser_inputs(c.denoiser, c.vae.config.latent_channels)
    c.text_encoder.requires_grad_(not args.freeze_text_encoder)
    c.denoiser.requires_grad_(True)
    trainer = EditTrainer(
        c.denoiser,
        c.text_encoder,
        c.vae,
        c.scheduler,
        args.snr_floor,
        args.terminal_fraction,
        args.change_weight,
    )
    params = list(c.denoiser.parameters())
    if not args.freeze_text_encoder:
        params += list(c.text_encoder.parameters())

    data = ConditioningDropout(
        ShapesEditDataset(args.steps * args.batch_size, seed=args.seed, split="train", size=size),
        args.conditioning_dropout,
        args.seed,
    )

    def collate_edit(items: list[dict]) -> dict:
        batch = collate(items)
        batch["input_ids"] = tokenize(c.tokenizer, batch["instruction"])
        return batch

    config = TrainConfig(
        output_dir=args.output_dir / "train",
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_schedule="cosine",
        warmup_steps=min(args.warmup, args.steps // 10),
        ema_decay=args.ema_decay or None,
        checkpoint_every=args.checkpoint_every,
        keep_last_checkpoints=2,
        log_every=max(1, min(10, args.steps)),
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        resume="latest" if args.resume else None,
    )
    started = time.perf_counter()
    result = train(
        trainer,
        lambda model, batch: model(batch),
        data,
        config,
        collate_fn=collate_edit,
        trainable_parameters=params,
    )
    train_s = time.perf_counter() - started
    if not result.is_main_process:
        return
    steps_run = result.step - result.start_step
    # the run's training time over every invocation (a resume adds to it); a run too short to
    # log two rows falls back to this invocation's clock
    metrics = args.output_dir / "train" / "metrics.jsonl"
    train_s = training_seconds(metrics) or train_s
    s_per_step = seconds_per_step(metrics) or train_s / max(1, steps_run)
    facts = {
        "recipe": "recipes/instruct_edit.py",
        "argv": argv,
        "base_model": args.model,
        "base_fingerprint": fingerprint,
        "denoiser": "DiT" if isinstance(c.denoiser, PixArtTransformer2DModel) else "UNet",
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "ema_decay": args.ema_decay or None,
        "conditioning_dropout": args.conditioning_dropout,
        "text_encoder_trained": not args.freeze_text_encoder,
        "snr_floor": args.snr_floor,
        "terminal_fraction": args.terminal_fraction,
        "change_weight": args.change_weight,
        "final_loss": result.loss,
        "train_s": round(train_s, 1),
        "s_per_step": round(s_per_step, 3),
        "device": training_device(metrics),
        "torch": torch.__version__,
    }
    defaults = {
        "steps": args.sample_steps,
        "guidance_scale": args.guidance,
        "image_guidance_scale": args.image_guidance,
        "scheduler": "dpm++",
        "known_words": base.defaults.get("known_words") or [],
    }
    model_dir = args.output_dir / "model"
    sampler = make_sampler("dpm++", c.scheduler)
    save_editor(result.model, c.tokenizer, sampler, model_dir, defaults)
    if args.select_n:
        selection = select_guidance(load_generator(str(model_dir), dtype="fp32"), args, size)
        facts["sampling_selection"] = selection
        defaults.update(selection["chosen"])
        save_editor(result.model, c.tokenizer, sampler, model_dir, defaults)
    # the bundled weights are fp16: score the editor as it will be shipped
    shipped, history = model_dir, None
    if args.bundle:
        shipped = BUNDLED_MODELS / args.name
        history = history_of(shipped)
        save_editor(result.model, c.tokenizer, sampler, shipped, defaults, torch.float16)
        facts["bundled_as"] = args.name
    report = None
    if args.eval_n:
        from anygen.eval.suites import run_edit

        editor = load_generator(str(shipped), dtype="fp32")
        report = run_edit(
            lambda image, instruction, s: editor.edit(
                image, instruction, Options(seed=s, progress=False)
            ).images[0],
            n=args.eval_n,
            seed=0,
            size=size,
        )
        name = args.name if args.bundle else str(model_dir)
        report.meta = {"model": name, "suite": "edit", "n": args.eval_n, "seed": 0}
        log.info("shapes-eval edit:\n%s", report.table())
        facts["shapes_eval_edit_overall"] = round(report.overall, 4)
    for folder in dict.fromkeys((model_dir, shipped)):
        if report is not None:
            write_text_atomic(folder / "eval.json", report.to_json() + "\n")
        write_text_atomic(folder / "training.json", json.dumps(facts, indent=2) + "\n")
        text = card(facts, report)
        write_text_atomic(
            folder / "README.md", with_history(text, history) if folder == shipped else text
        )
    log.info("saved %s (%.0f s of training, %.2f s/step)", model_dir, train_s, facts["s_per_step"])
    if args.bundle:
        log.info("bundled fp16 weights in %s", shipped)


def select_guidance(editor, args: argparse.Namespace, size: int) -> dict:
    """The default (text, image) guidance pair: the best of ``EDIT_GUIDANCE_GRID`` on
    ``args.select_n`` validation edits (seed 1000, never the reported evaluation's 0)."""
    from anygen.eval.suites import select_edit_settings

    return select_edit_settings(
        lambda image, instruction, seed, setting: editor.edit(
            image,
            instruction,
            Options(seed=seed, steps=args.sample_steps, progress=False, **setting),
        ).images[0],
        EDIT_GUIDANCE_GRID,
        args.select_n,
        size=size,
    )


def base_fingerprint(vae: nn.Module, tokenizer) -> str:
    """sha256 of what an editor run takes from its base and never checkpoints: the frozen
    VAE's weights and the tokenizer's vocabulary."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()


def check_base(train_dir: Path, model: str, fingerprint: str, *, resume: bool) -> None:
    """Record the base of a fresh run in TRAIN_DIR/base.json; refuse a resume whose base
    differs from it (its checkpoints would be paired with another VAE or vocabulary)."""
    path = train_dir / BASE_FILE
    if resume:
        if not path.is_file():
            log.warning("%s has no %s: cannot check that --model is its base", train_dir, BASE_FILE)
            return
        try:
            recorded = json.loads(path.read_text())
            model_was, fingerprint_was = recorded["model"], recorded["fingerprint"]
        except (ValueError, TypeError, KeyError) as e:
            raise UserInputError(
                f"{path} is not a base record (JSON with 'model' and 'fingerprint'): {e!r}"
            ) from None
        if fingerprint_was != fingerprint:
            raise UserInputError(
                f"{train_dir.parent} was started from {model_was!r}, whose VAE or "
                f"tokenizer differs from --model {model!r}: resume with the run's own base"
            )
        return
    if latest_checkpoint(train_dir) is None:  # else train() refuses to start afresh over it
        train_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"model": model, "fingerprint": fingerprint}) + "\n")


def save_editor(
    trainer: EditTrainer,
    tokenizer,
    sampler,
    directory: Path,
    defaults: dict,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the editor atomically, with anygen.json (its defaults): a UNet editor as a
    diffusers ``StableDiffusionInstructPix2PixPipeline`` directory; a DiT editor (diffusers
    has no InstructPix2Pix pipeline for PixArt) as a ``PixArtAlphaPipeline`` directory with
    an 8-channel transformer, which anygen's ``LatentDiffusion`` edits with
    (``instruct_edit``). ``dtype`` (fp16 for a bundle) converts a copy."""
    if isinstance(trainer.denoiser, PixArtTransformer2DModel):
        from anygen.models.ldm import LdmComponents
        from anygen.pipelines.text_to_image import LatentDiffusion

        parts = LdmComponents(
            vae=trainer.vae,
            denoiser=trainer.denoiser,
            text_encoder=trainer.text_encoder,
            tokenizer=tokenizer,
            scheduler=sampler,
        )
        editor = LatentDiffusion(parts, name=directory.name, defaults=defaults)
        return editor.save_pretrained(directory, dtype=dtype)
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=trainer.vae,
        text_encoder=trainer.text_encoder,
        tokenizer=tokenizer,
        unet=trainer.denoiser,
        scheduler=sampler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype is not None:
        pipe = copy.deepcopy(pipe).to(dtype=dtype)
    with atomic_directory(directory, marker="model_index.json") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        forget_source_paths(tmp)
        (tmp / ANYGEN_FILE).write_text(editor_settings(defaults))
    return directory


def check_bundle_target(folder: Path) -> None:
    """Refuse to bundle over a bundled model that is not an instruction editor."""
    settings = folder / ANYGEN_FILE
    if folder.exists() and not (
        (folder / "model_index.json").is_file()
        and settings.is_file()
        and "image_guidance_scale" in read_json_object(settings)
    ):
        raise UserInputError(
            f"--bundle would replace {folder}, which is not an instruction editor: choose "
            "another --name"
        )


def editor_settings(defaults: dict) -> str:
    """A UNet editor's anygen.json: what load_generator reads as its defaults."""
    return json.dumps({"family": "diffusers", "task": "edit", **defaults}, indent=2) + "\n"


def weighting(facts: dict) -> str:
    """The loss weighting, as the card names it (nothing for the plain Min-SNR loss)."""
    parts = []
    if facts.get("snr_floor") is not None:
        parts.append(f"SNR floor {facts['snr_floor']}")
    if facts.get("terminal_fraction"):
        parts.append(f"{facts['terminal_fraction']:g} of each batch at the last timestep")
    if facts.get("change_weight", 1.0) != 1.0:
        parts.append(f"changed positions weighed {facts['change_weight']:g}x")
    return "".join(f", {p}" for p in parts)


def card(facts: dict, report=None) -> str:
    summary = f"instruction editor (InstructPix2Pix) from {facts['base_model']}, shapes world"
    front = "\n".join(
        [
            *([f"name: {facts['bundled_as']}"] if "bundled_as" in facts else []),
            f"summary: {json.dumps(summary)}",
            *(f"{k}: {json.dumps(v)}" for k, v in facts.items()),
        ]
    )
    this = facts.get("bundled_as", "THIS_FOLDER")
    if report is not None:
        scores = (
            f"shapes-eval, edit suite, {len(report.records)} test-split edits, seed 0 "
            f"(`anygen eval --model {this} --suite edit --n {len(report.records)}`), "
            f"default settings:\n\n```\n{report.table()}\n```\n"
        )
    else:
        scores = f"Not scored yet: `anygen eval --model {this} --suite edit --n 100`.\n"
    if "sampling_selection" in facts:
        sel = facts["sampling_selection"]
        rows = "\n".join(
            f"| {r['guidance_scale']} | {r['image_guidance_scale']} | "
            f"{r['validation_overall']:.3f} |"
            for r in sel["grid"]
        )
        scores += (
            f"\nThe default guidance pair was chosen on {sel['n']} validation edits "
            f"(shapes-eval edit, seed {sel['seed']}; the scores above use seed 0):\n\n"
            f"| guidance | image guidance | validation overall |\n|---|---|---|\n{rows}\n"
        )
    denoiser = facts.get("denoiser", "UNet")
    what = (
        "A diffusers `StableDiffusionInstructPix2PixPipeline`"
        if denoiser == "UNet"
        else "A diffusers `PixArtAlphaPipeline` directory that anygen edits with (diffusers"
        " has no InstructPix2Pix pipeline for a DiT)"
    )
    return f"""---
{front}
---
# Instruction editor (InstructPix2Pix-style) from {facts["base_model"]}

{what}: the {denoiser} of `{facts["base_model"]}`
widened to 8 input channels (zero-initialised), trained by `{facts["recipe"]}` on
shapes-world edit triples (train split) for {facts["steps"]} steps (batch
{facts["batch_size"]}, lr {facts["learning_rate"]}, seed {facts["seed"]}, text encoder
{"trained" if facts["text_encoder_trained"] else "frozen"}{weighting(facts)}) in {facts["train_s"]} s
({facts["s_per_step"]} s/step) on {facts["device"]}.

    anygen edit scene.png "make the red circle blue" --model {this} --seed 0 -o out.png

{scores}"""
