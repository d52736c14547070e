"""Teach an ldm model's VAE to keep patterned subjects, without moving its latents.

No shapes-world VAE saw a patterned object in training (striped, dotted or ringed
subjects), so a subject picture passed through shapes-ldm's VAE mostly comes back as a
plain or wrongly coloured object (``anygen eval --suite reconstruction`` reports it as
``subject_kept``), and DreamBooth or textual inversion can draw a subject no better than
the VAE renders it. This recipe fine-tunes the whole VAE, encoder and decoder, on pictures
of which ``--subjects`` are patterned subjects (the subject task's reference and prompt
scenes, train split) and the rest text-to-image scenes, while an anchor holds the
encoder's mean latents of the plain scenes to the starting VAE's (``--anchor`` times their
mean squared drift): the denoiser, trained on those latents, still draws what it drew,
and the decoder renders it at least as well.

    anygen train recipes/ldm_vae_subjects.py --model shapes-ldm --output-dir runs/ldm-vae-subjects
    anygen train recipes/ldm_vae_subjects.py ... --resume       # continue from the checkpoints
    anygen train recipes/ldm_vae_subjects.py ... --bundle       # also rewrite the bundled model

OUT/model is a copy of the model with the new VAE (in the starting VAE's dtype), with
``vae_subjects.json`` (the facts) and a card section between ``<!-- anygen:vae_subjects -->``
markers: the reconstruction suite (held-out scenes and subject pictures, seed 0) before
and after and, with ``--eval-n`` > 0, the model's t2i table as it is now.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import textwrap
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from anygen.data import shapes
from anygen.data.datasets import collate, image_tensor
from anygen.data.render import check_size
from anygen.data.world import PATTERNS
from anygen.errors import UserInputError
from anygen.eval.suites import Report
from anygen.hub import (
    atomic_directory,
    bundled_models,
    forget_source_paths,
    resolve,
    set_front_matter,
    write_card_section,
)
from anygen.tokenizers.vq import reconstruction_errors
from anygen.training import device_description, training_seconds
from anygen.training.loop import TrainConfig, read_metrics, train

log = logging.getLogger("recipes.ldm_vae_subjects")

KL_WEIGHT = 1e-4  # anygen.models.ldm.vae_loss's: latents near unit scale
SECTION = "vae_subjects"


class SubjectsAndScenes(Dataset):
    """``length`` pictures of ``size`` px: item i is a patterned subject picture with chance
    ``subjects`` (a reference or the prompt scene of a subject sample), else a t2i scene;
    {"image" (3, S, S), "plain" (no patterned object: the anchor applies)}."""

    def __init__(self, length: int, seed: int, subjects: float, size: int = 64) -> None:
        check_size(size)
        self.length, self.seed, self.subjects, self.size = length, seed, subjects, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} pictures")
        rng = shapes.sample_rng(self.seed, "vae-subjects", index)
        if rng.random() < self.subjects:
            sample = shapes.subject_sample(rng, "train")
            scene = rng.choice([*sample.references, sample.scene])
        else:
            scene = shapes.task_sample("t2i", self.seed, index, "train").scene
        plain = all(o.subject is None for o in scene.objects)
        return {"image": image_tensor(scene, self.size), "plain": torch.tensor(plain)}


class AnchoredVae(nn.Module):
    """Reconstruction (l1 + l2, object pixels weighted 1 + ``foreground_weight``) plus the
    KL term of ``vae_loss``, plus ``anchor`` times the mean squared drift of the plain
    pictures' mean latents from the frozen starting VAE's."""

    def __init__(self, vae: nn.Module, anchor: float, foreground_weight: float) -> None:
        super().__init__()
        self.vae = vae
        self.reference = copy.deepcopy(vae).requires_grad_(False).eval()
        self.anchor, self.foreground_weight = anchor, foreground_weight

    def forward(self, images: torch.Tensor, plain: torch.Tensor) -> dict:
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample()
        recon = self.vae.decode(z).sample
        l1, l2 = reconstruction_errors(recon, images, self.foreground_weight)
        kl = posterior.kl().mean() / z[0].numel()
        if plain.any():
            with torch.no_grad():
                target = self.reference.encode(images[plain]).latent_dist.mean
            drift = (posterior.mean[plain] - target).pow(2).mean()
        else:
            drift = z.new_zeros(())
        loss = l1 + l2 + KL_WEIGHT * kl + self.anchor * drift
        return {"loss": loss, "l1": l1.detach(), "l2": l2.detach(), "drift": drift.detach()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="anygen train recipes/ldm_vae_subjects.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="shapes-ldm", help="the ldm model whose VAE learns")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4, help="constant, no warmup")
    p.add_argument("--subjects", type=float, default=0.5, help="share of subject pictures")
    p.add_argument("--anchor", type=float, default=10.0, help="weight of the latent drift")
    p.add_argument("--foreground-weight", type=float, default=4.0)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--eval-n",
        type=int,
        default=300,
        help="t2i prompts to score the result on (seed 0; 0: skip)",
    )
    p.add_argument(
        "--recon-n",
        type=int,
        default=1000,
        help="held-out scenes of the reconstruction suite before and after (seed 0; a "
        "quarter as many subject pictures)",
    )
    p.add_argument("--bundle", action="store_true", help="also rewrite the bundled model")
    args = p.parse_args(argv)
    if not 0.0 <= args.subjects <= 1.0:
        p.error(f"--subjects must be in [0, 1], got {args.subjects}")
    if args.anchor < 0 or args.foreground_weight < 0:
        p.error("--anchor and --foreground-weight must be >= 0")
    if args.eval_n < 0:
        p.error(f"--eval-n must be >= 0, got {args.eval_n}")
    if args.recon_n < 4:
        p.error(f"--recon-n must be >= 4 (a subject picture per 4 scenes), got {args.recon_n}")
    return args


def section(facts: dict, before: Report, after: Report, t2i: Report | None) -> str:
    def row(name: str, r: Report) -> str:
        m = r.metrics
        return (
            f"| {name} | {r.overall:.3f} | {m['psnr_db']:.1f} | {m['subject_kept']:.3f} | "
            + " | ".join(
                f"{m[key]:.3f}" if (key := f"subject_kept_{p}") in m else "-" for p in PATTERNS
            )
            + " |"
        )

    argv = " ".join(facts["argv"])
    text = textwrap.fill(
        f"The VAE was then fine-tuned, encoder and decoder, to keep patterned subjects "
        f"(`anygen train recipes/ldm_vae_subjects.py {argv}`: {facts['steps']} steps of "
        f"batch {facts['batch_size']}, {facts['subjects']:.0%} subject pictures, anchor "
        f"{facts['anchor']}, seed {facts['seed']}, {facts['train_time_s']:.0f} s on "
        f"{facts['device']}). The anchor holds the plain scenes' latents to the old "
        f"encoder's (mean squared drift {facts['final_drift']:.1e} at the end, against a "
        f"latent variance near {facts['latent_variance']:g}), so the denoiser is unchanged. "
        f"Reconstruction suite, "
        f"seed 0 (`anygen eval --model {facts['model']} --suite reconstruction --n "
        f"{len(after.records)}`: {len(after.records):,} held-out scenes, "
        f"{after.metrics['subject_kept_n']:,.0f} subject pictures):",
        90,
    )
    table = "\n".join(
        [
            "| VAE | scenes' captions kept | PSNR dB | subjects kept | "
            + " | ".join(PATTERNS)
            + " |",
            "|---|---|---|---|---|---|---|",
            row("before", before),
            row("after", after),
        ]
    )
    out = f"{text}\n\n{table}\n"
    if t2i is not None:
        out += (
            f"\nshapes-eval t2i with the new VAE, {len(t2i.records)} prompts, seed 0 "
            f"(`anygen eval --model {facts['model']} --suite t2i --n {len(t2i.records)}`):"
            f"\n\n```\n{t2i.table()}\n```\n"
        )
    return out


def write_model(
    source: Path, target: Path, vae: nn.Module, dtype: torch.dtype, files: dict
) -> None:
    """A copy of the model folder ``source`` at ``target`` with ``vae`` (saved in ``dtype``)
    in place of its own, and ``files`` (name -> text) written over the copy's."""
    with atomic_directory(target, marker="model_index.json") as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        shutil.rmtree(tmp / "vae")
        copy.deepcopy(vae).to(dtype).save_pretrained(tmp / "vae", safe_serialization=True)
        forget_source_paths(tmp)  # diffusers writes back the folder the VAE was loaded from
        for name, text in files.items():
            (tmp / name).write_text(text)


def evaluate(model: Path, suite: str, n: int) -> Report:
    """``anygen eval --model MODEL --suite SUITE --n N`` (seed 0), as a user runs it."""
    from anygen.eval.run import evaluate_model

    return evaluate_model(str(model), suite, n=n, seed=0, batch_size=32, progress=False)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    source = resolve(args.model)
    if not (source / "model_index.json").is_file() or not (source / "vae").is_dir():
        raise UserInputError(f"model {args.model!r} is not an ldm pipeline with a VAE ({source})")
    bundle = None
    if args.bundle:
        bundle = bundled_models("model").get(args.model)
        if bundle is None or bundle.resolve() != source.resolve():
            raise UserInputError(f"--bundle rewrites a bundled model; {args.model!r} is not one")
    config = TrainConfig(
        output_dir=args.output_dir / "vae",
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        checkpoint_every=args.checkpoint_every,
        keep_last_checkpoints=2,
        seed=args.seed,
        resume="latest" if args.resume else None,
    )
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    weights = next((source / "vae").glob("*.safetensors"))
    with safe_open(weights, "pt") as f:  # the dtype the model ships its VAE in
        stored = f.get_slice(next(iter(f.keys()))).get_dtype()
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(stored, torch.float32)
    vae = AutoencoderKL.from_pretrained(source / "vae", torch_dtype=torch.float32)
    trainer = AnchoredVae(vae, args.anchor, args.foreground_weight)
    size = int(vae.config.sample_size)
    data = SubjectsAndScenes(args.steps * args.batch_size, args.seed, args.subjects, size)
    started = time.time()
    result = train(
        trainer,
        lambda model, batch: model(batch["image"], batch["plain"]),
        data,
        config,
        collate_fn=collate,
        trainable_parameters=list(trainer.vae.parameters()),
    )
    if not result.is_main_process:
        return
    rows = read_metrics(args.output_dir / "vae" / "metrics.jsonl")
    facts = {
        "recipe": "recipes/ldm_vae_subjects.py",
        "argv": list(argv),
        "model": args.model,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "subjects": args.subjects,
        "anchor": args.anchor,
        "foreground_weight": args.foreground_weight,
        "train_time_s": round(training_seconds(args.output_dir / "vae" / "metrics.jsonl"), 1)
        if rows
        else round(time.time() - started, 1),
        "device": device_description(),
        "torch": torch.__version__,
        "final_drift": float(rows[-1].get("drift", float("nan"))) if rows else float("nan"),
        # what the drift compares with: the latents' variance, 1 / scaling_factor ** 2
        "latent_variance": round(1.0 / float(vae.config.scaling_factor) ** 2, 2),
    }
    out = args.output_dir / "model"
    card = (source / "README.md").read_text() if (source / "README.md").is_file() else ""
    files = {"vae_subjects.json": json.dumps(facts, indent=2) + "\n"}
    write_model(source, out, result.model.vae, dtype, files)
    before = evaluate(source, "reconstruction", args.recon_n)
    after = evaluate(out, "reconstruction", args.recon_n)
    log.info("reconstruction before:\n%s\nafter:\n%s", before.table(), after.table())
    t2i = evaluate(out, "t2i", args.eval_n) if args.eval_n else None
    facts["reconstruction"] = {
        "before": {"overall": before.overall, **before.metrics},
        "after": {"overall": after.overall, **after.metrics},
    }
    if t2i is not None:
        log.info("shapes-eval t2i:\n%s", t2i.table())
        facts["shapes_eval_t2i_overall"] = round(t2i.overall, 3)
        files["eval.json"] = t2i.to_json() + "\n"
    files["vae_subjects.json"] = json.dumps(facts, indent=2) + "\n"
    files["README.md"] = write_card_section(
        card,
        SECTION,
        {k: facts[k] for k in facts if k != "reconstruction"},
        section(facts, before, after, t2i),
    )
    if t2i is not None:  # the card's headline figure is the model as it now is
        files["README.md"] = set_front_matter(
            files["README.md"], "shapes_eval_t2i_overall", f"{t2i.overall:.3f}"
        )
    write_model(source, out, result.model.vae, dtype, files)
    log.info("saved %s", out)
    if bundle is not None:
        write_model(out, bundle, result.model.vae, dtype, {})
        log.info("rewrote the bundled %s", bundle)
