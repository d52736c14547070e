"""Train shapes-vq: a ViT-VQGAN image tokenizer of the shapes world, 64 px -> 8 x 8 codes.

Why 8 x 8 codes of a 512-entry codebook: a shapes-world scene holds at most three objects,
each about 13 bits of content (colour, shape, size, cell, jitter), so 64 codes x 9 bits is
ample; an object (12 or 18 px wide) spans two or three 8 px patches per side, and the ViT
decoder sees every code, so shapes come back whole. 8 x 8 keeps the autoregressive models
over these codes to 64 steps an image: four times fewer than 16 x 16, which is what makes
them trainable and fast on a CPU.

The loss is l1 + l2 reconstruction plus the codebook and commitment losses of the
factorized, l2-normalised quantizer, with dead-code restarts; ``--gan-weight`` adds a
patch-GAN (off by default: flat colours need no texture). Afterwards the tokenizer is
scored, as shipped (fp16), on 1,000 held-out scenes: caption kept by
``decode(encode(x))``, PSNR, codebook usage, encode and decode images/s.

    anygen train recipes/vq_shapes.py --output-dir runs/shapes-vq
    anygen train recipes/vq_shapes.py --output-dir runs/shapes-vq --bundle   # -> tokenizers/shapes-vq

``--decoder-from MODEL`` fine-tunes only the decoder side of a saved tokenizer (the
encoder, down-projection and codebook stay frozen: ``VitVQGAN.code_parameters``), on the
codes that tokenizer gives; ``--decoder-layers`` also deepens the decoder (Parti trained a
larger decoder over its frozen encoder and codebook). Every image keeps its codes, so the
Parti and fusion models trained over them stay valid and draw with the better decoder. The
bundled shapes-vq is stage 1 above, then:

    anygen train recipes/vq_shapes.py --output-dir runs/shapes-vq-dec \\
        --decoder-from runs/shapes-vq/model --steps 3000 --lr 4e-4
    anygen train recipes/vq_shapes.py --output-dir runs/shapes-vq-dec8 \\
        --decoder-from runs/shapes-vq-dec/model --decoder-layers 8 --steps 4000 --lr 4e-4
    anygen train recipes/vq_shapes.py --output-dir runs/shapes-vq-dec8b \\
        --decoder-from runs/shapes-vq-dec8/model --steps 4000 --lr 3e-4
    anygen train recipes/vq_shapes.py --output-dir runs/s41/vq-m3 \\
        --decoder-from runs/shapes-vq-dec8b/model --steps 4000 --lr 3e-4 --foreground-margin 3
    anygen train recipes/vq_shapes.py --output-dir runs/s41/vq-m3b \\
        --decoder-from runs/s41/vq-m3/model --steps 4000 --lr 3e-4 --foreground-margin 3 --bundle

The last two weigh a 3 px margin around each object (``--foreground-margin``). Without it,
the foreground weight covered the object's own pixels only, so colour bled past a thin
shape's edge cost 11 times less than colour missing from it, and the decoder drew small
crosses as blobs: of the 648 one-object scenes of a small cross (every colour, cell and
jitter), 0.165 came back right, and 0.963 after the first margin stage. That was the main
failure of held-out reconstruction, which the two stages took from 0.847 to 0.975. (The
first of them started from the bundled tokenizer, `--decoder-from shapes-vq`, which was
stage 4.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from anygen.data.datasets import ShapesT2IDataset, collate, images_to_tensor, tensor_to_images
from anygen.errors import UserInputError
from anygen.eval.suites import Report, run_reconstruction
from anygen.hub import card_metadata, keep_history
from anygen.tokenizers.vq import (
    VQ_PRESETS,
    PatchDiscriminator,
    VitVQGAN,
    codebook_usage,
    load_image_tokenizer,
    reconstruction_errors,
    vq_loss,
)
from anygen.training import (
    TrainConfig,
    train,
    training_device,
    training_seconds,
    warn_if_unscored_bundle,
)

log = logging.getLogger("recipes.vq_shapes")

BUNDLE_DIR = Path(__file__).resolve().parents[1] / "tokenizers" / "shapes-vq"


class VQTrainer(nn.Module):
    def __init__(
        self,
        tokenizer: VitVQGAN,
        gan_weight: float,
        foreground_weight: float,
        foreground_margin: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.gan_weight = gan_weight
        self.foreground_weight = foreground_weight
        self.foreground_margin = foreground_margin
        self.discriminator = PatchDiscriminator() if gan_weight > 0 else None

    # The quantizer's usage statistics decide dead-code restarts but are not weights of the
    # tokenizer (a non-persistent buffer): the training checkpoint carries them, so that a
    # resumed run restarts the codes an unbroken one would.
    USAGE_KEY = "quantizer_usage"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        usage = self.tokenizer.quantizer.usage
        destination[prefix + self.USAGE_KEY] = usage if keep_vars else usage.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        usage = state_dict.pop(prefix + self.USAGE_KEY, None)
        if usage is not None:  # checkpoints written before it was saved lack it
            with torch.no_grad():
                self.tokenizer.quantizer.usage.copy_(usage)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, images: torch.Tensor) -> dict:
        return vq_loss(
            self.tokenizer,
            images,
            foreground_weight=self.foreground_weight,
            foreground_margin=self.foreground_margin,
            discriminator=self.discriminator,
            gan_weight=self.gan_weight,
        )


class DecoderTrainer(nn.Module):
    """Reconstruction from a trained tokenizer's own codes: the parameters that decide the
    codes are frozen, the decoder side (up-projection, decoder, patch head) learns."""

    def __init__(
        self, tokenizer: VitVQGAN, foreground_weight: float, foreground_margin: int = 0
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.foreground_weight = foreground_weight
        self.foreground_margin = foreground_margin
        for param in tokenizer.code_parameters():
            param.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> dict:
        tok = self.tokenizer
        codes = tok.encode(images).flatten(1)  # (B, N), no gradient
        recon = tok.decode_features(tok.quantizer.embed(codes))
        l1, l2 = reconstruction_errors(
            recon, images, self.foreground_weight, self.foreground_margin
        )
        return {"loss": l1 + l2, "l1": l1.detach(), "l2": l2.detach()}


def build_trainer(args: argparse.Namespace) -> nn.Module:
    if args.foreground_margin < 0:
        raise UserInputError(f"--foreground-margin must be >= 0, got {args.foreground_margin}")
    if args.decoder_from is None:
        if args.decoder_layers is not None:
            raise UserInputError("--decoder-layers needs --decoder-from")
        cfg = dataclasses.replace(VQ_PRESETS[args.preset])
        return VQTrainer(
            VitVQGAN(cfg), args.gan_weight, args.foreground_weight, args.foreground_margin
        )
    if args.gan_weight:
        raise UserInputError("--gan-weight is not supported with --decoder-from")
    if args.decoder_layers is not None and args.decoder_layers < 1:
        raise UserInputError(f"--decoder-layers must be at least 1, got {args.decoder_layers}")
    tokenizer = load_image_tokenizer(args.decoder_from, dtype=torch.float32)
    if not isinstance(tokenizer, VitVQGAN):
        raise UserInputError(
            f"--decoder-from {args.decoder_from}: a VitVQGAN is needed, "
            f"got a {type(tokenizer).__name__}"
        )
    if args.decoder_layers is not None:
        tokenizer = tokenizer.with_decoder_layers(args.decoder_layers)
    return DecoderTrainer(tokenizer.train(), args.foreground_weight, args.foreground_margin)


@torch.no_grad()
def measure(tokenizer: VitVQGAN, n: int, seed: int = 0) -> tuple[Report, dict]:
    """Held-out reconstruction report, codebook usage over those scenes, and speed."""
    tokenizer.eval()
    codes_seen = []

    def roundtrip(images):
        codes = tokenizer.encode(images_to_tensor(images))
        codes_seen.append(codes)
        return tensor_to_images(tokenizer.decode(codes))

    report = run_reconstruction(roundtrip, n=n, seed=seed, size=tokenizer.image_size)
    usage = codebook_usage(torch.cat(codes_seen), tokenizer.codebook_size)
    test = ShapesT2IDataset(256, seed=seed, split="test", size=tokenizer.image_size)
    batch = torch.stack([test[i]["image"] for i in range(len(test))])  # (256, 3, S, S)
    speed = {}
    for name, fn, arg in (
        ("encode", tokenizer.encode, batch),
        ("decode", tokenizer.decode, tokenizer.encode(batch)),
    ):
        fn(arg[:16])  # warm up
        start = time.perf_counter()
        for _ in range(3):
            fn(arg)
        speed[f"{name}_images_per_s"] = round(3 * len(arg) / (time.perf_counter() - start), 1)
    facts = {"codebook_usage": round(usage, 4), **speed, "threads": torch.get_num_threads()}
    return report, facts


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="anygen train recipes/vq_shapes.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(VQ_PRESETS), default="shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--gan-weight", type=float, default=0.0, help="patch-GAN weight (0: off)")
    p.add_argument(
        "--foreground-weight",
        type=float,
        default=10.0,
        help="extra weight of object pixels in the reconstruction loss (0: plain mean)",
    )
    p.add_argument(
        "--foreground-margin",
        type=int,
        default=0,
        metavar="PX",
        help="also weight the pixels within PX of an object (its outline's surroundings: "
        "without them, colour bled past a thin shape's edge is cheap, and small crosses come "
        "back as blobs)",
    )
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--decoder-from",
        metavar="MODEL",
        help="fine-tune only the decoder of this saved VitVQGAN (its codes stay the same)",
    )
    p.add_argument(
        "--decoder-layers",
        type=int,
        help="with --decoder-from: grow the decoder to this many blocks (new ones start as "
        "the identity)",
    )
    p.add_argument("--eval-n", type=int, default=1000, help="held-out scenes to score (0: skip)")
    p.add_argument("--bundle", action="store_true", help=f"also write fp16 weights to {BUNDLE_DIR}")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    warn_if_unscored_bundle(args.bundle, args.eval_n, BUNDLE_DIR)
    torch.manual_seed(args.seed)
    trainer = build_trainer(args)
    size = trainer.tokenizer.image_size
    out = args.output_dir
    images = ShapesT2IDataset(args.steps * args.batch_size, seed=args.seed, size=size)
    result = train(
        trainer,
        lambda model, batch: model(batch["image"]),
        images,
        TrainConfig(
            output_dir=out / "train",
            max_steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            adam_betas=(0.9, 0.99),
            lr_schedule="cosine",
            warmup_steps=min(200, args.steps // 10),
            checkpoint_every=args.checkpoint_every,
            keep_last_checkpoints=2,
            mixed_precision=args.mixed_precision,
            seed=args.seed,
            resume="latest" if args.resume else None,
        ),
        collate_fn=collate,
    )
    if not result.is_main_process:
        return
    tokenizer = result.model.tokenizer.eval()
    facts = {
        "recipe": "recipes/vq_shapes.py",
        "argv": argv,
        "seed": args.seed,
        "preset": args.preset if args.decoder_from is None else None,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_time_s": round(training_seconds(out / "train" / "metrics.jsonl"), 1),
        "device": training_device(out / "train" / "metrics.jsonl"),
        "torch": torch.__version__,
    }
    if args.decoder_from is not None:
        base = card_metadata(args.decoder_from)
        facts["decoder_from"] = str(args.decoder_from)
        keys = ("argv", "steps", "batch_size", "train_time_s", "device", "decoder_from", "base")
        facts["base"] = {k: base[k] for k in keys if k in base}
    tokenizer.save_pretrained(out / "model")
    report = None
    if args.eval_n:
        # score the tokenizer as it will be shipped: fp16 weights, loaded back in fp32
        tokenizer.save_pretrained(out / "model-fp16", dtype=torch.float16)
        shipped = VitVQGAN.from_pretrained(out / "model-fp16")
        report, measured = measure(shipped, args.eval_n)
        facts.update(measured)
        log.info("held-out reconstruction:\n%s\n%s", report.table(), measured)
    c = tokenizer.config
    facts["shape"] = (
        f"{c.image_size} px -> {c.grid_size} x {c.grid_size} codes of {c.codebook_size}"
    )
    card = model_card(facts, report)
    tokenizer.save_pretrained(out / "model", card=card)
    if report is not None:
        (out / "model" / "eval.json").write_text(report.to_json() + "\n")
    if args.bundle:
        tokenizer.save_pretrained(
            BUNDLE_DIR, dtype=torch.float16, card=keep_history(card, BUNDLE_DIR)
        )
        log.info("bundled fp16 weights in %s", BUNDLE_DIR)


def model_card(facts: dict, report: Report | None) -> str:
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in facts.items())
    if report is not None:
        front += f"\nshapes_eval_reconstruction: {report.overall:.4f}"
        scores = (
            f"Held-out reconstruction, {len(report.records)} test-split scenes, seed 0: "
            "does `decode(encode(x))` still satisfy x's caption (`exact_state`: and keep every "
            "attribute of every object); PSNR over the images; as shipped (fp16 weights):\n\n"
            f"```\n{report.table()}\n```\n\n"
            f"Codebook usage over those scenes: {facts['codebook_usage']:.1%}. Speed on "
            f"{facts['device']}: encode {facts['encode_images_per_s']:.0f} images/s, decode "
            f"{facts['decode_images_per_s']:.0f} images/s (batch 256, fp32).\n"
        )
    else:
        scores = "Not scored.\n"
    return f"""---
name: shapes-vq
summary: "ViT-VQGAN image tokenizer, shapes world, {facts["shape"]}"
{front}
---
# shapes-vq

A ViT-VQGAN (Parti's image tokenizer) for the shapes world: {facts["shape"]} (RGB in
[-1, 1]; factorized lookup in an l2-normalised low-dimensional codebook), and back. {provenance(facts)}

```python
from anygen.tokenizers.vq import load_image_tokenizer
tok = load_image_tokenizer("shapes-vq")
codes = tok.encode(images)      # (B, 3, 64, 64) in [-1, 1] -> (B, 8, 8)
images = tok.decode(codes)
```

{scores}"""


def provenance(facts: dict) -> str:
    """How the tokenizer was made: one sentence, or the stages of a chain of
    ``--decoder-from`` fine-tunes, oldest first."""
    stages = [facts]
    while "base" in stages[-1]:
        stages.append(stages[-1]["base"])
    stages.reverse()

    def run(f: dict) -> str:
        where = f" on {f['device']}" if f.get("device") else ""
        return f"{f['steps']} steps of batch {f['batch_size']}, {f['train_time_s']:.0f} s{where}"

    if len(stages) == 1:
        return f"Trained from scratch by `{facts['recipe']}` (seed {facts['seed']}, {run(facts)})."
    lines = [f"Trained by `{facts['recipe']}` in {len(stages)} stages:"]
    for i, f in enumerate(stages, 1):
        what = (
            f"the decoder side fine-tuned on the codes of `{f['decoder_from']}`"
            if "decoder_from" in f
            else "from scratch"
        )
        lines.append(f"{i}. {what}: {run(f)} (arguments `{' '.join(f.get('argv', []))}`).")
    lines.append(
        "\nThe encoder, down-projection and codebook have not changed since stage 1, so every "
        "image keeps the codes it had and the models trained over them stay valid."
    )
    return "\n".join(lines)
