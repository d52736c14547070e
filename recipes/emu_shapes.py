"""Train shapes-emu: an Emu2-style fusion model of the shapes world (continuous images).

Stage 1 trains the visual codec: a ViT visual encoder (64 px -> 4 x 4 = 16 embeddings of
64, layer-normalised) together with its diffusion decoder (a UNet2DConditionModel over the
latents of shapes-ldm's VAE, cross-attending to the 16 embeddings), by the decoder's
denoising loss: the encoder learns what the decoder needs to rebuild the image, as Emu2's
decoder learns to rebuild images from its encoder's embeddings. The VAE stays frozen.
The codec is scored on held-out scenes: does decode(encode(x)) satisfy x's caption.

``--regressions-of MODEL`` continues a codec's decoder (the encoder frozen) on what a trained
transformer writes rather than on the encoder's embeddings: for a share of its pictures the
decoder renders the transformer's own regressed embeddings of the picture that ends a
document (text to image, a story scene, an edit, a subject), given all that precedes it, so
that it learns to draw from what it will be given at generation time.

``--codec-foreground-weight W --codec-foreground-margin PX`` weighs the latent positions over
objects in the decoder's denoising loss, as ``recipes/vq_shapes.py --foreground-margin`` does
for shapes-vq's decoder. On shapes-emu's codec it has not been shown to help. From the bundled
codec, the decoder alone, 1,500 steps at lr 2e-4 (seed 1), the runs rebuilt these fractions of
100 validation scenes (seed 1000):
- W 10, PX 3: 0.28;
- the same run unweighted: 0.26;
- the bundled codec: 0.21.
The weighted and unweighted runs differ by two scenes.

``--codec-readout-weight W`` gives the encoder an objective of its own: a small readout
(training only, dropped after) rebuilds the picture's VAE latents from the 4 x 4 grid of
embeddings, and W times its squared error joins the denoising loss. Taught by the denoising
loss alone, the bundled codec's encoder kept colour and place but not shape (a linear probe
on its embeddings reads shape at 0.67 of 6): the loss reaches the encoder only through what
the noise hides, and a decoder that draws the likeliest shape loses little by it.

``--codec-init-from DIR --vae MODEL`` continues a codec over MODEL's VAE in place of its own
(``VisualCodec.with_vae``). The bundled codec's VAE is shapes-ldm's from before its subject
fine-tune, which rebuilds only 0.900 of validation scenes by itself; shapes-ldm's current
VAE rebuilds 1.000, and its latents were anchored to the old one's, so a decoder trained
over the old latents continues over the new ones.

``--codec-decode-guidance G`` saves the codec with classifier-free guidance G of its own
(the embeddings against zeros, learnt by condition dropout). It rebuilds more scenes from the
encoder's embeddings but draws worse from a transformer's regressions, so the default stays 1:
over shapes-ldm's current VAE, codec r1 rebuilt 250, 290, 318, 335, 340 and 328 of 600
validation scenes (seeds 1000 and 2000) at 1, 1.5, 2, 3, 4 and 6, while shapes-emu's run L
(bundled then) drew 54 of 600 validation prompts right at 4 against 61 at 1.

Stage 2 freezes the codec and trains the fusion transformer on the shapes-world document
mix, regressing the 16 embeddings of every image (l2) beside cross-entropy on text: it is
``recipes/fusion_shapes.py --image-mode continuous`` run on this codec.

    anygen train recipes/emu_shapes.py --output-dir runs/shapes-emu
    anygen train recipes/emu_shapes.py --output-dir runs/shapes-emu --bundle  # -> assets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.data import Dataset

from anygen.data.datasets import (
    ShapesT2IDataset,
    collate,
    image_tensor,
)
from anygen.data.documents import check_mix, mixed_document
from anygen.data.render import render_image
from anygen.data.world import Scene
from anygen.errors import CheckpointError, UserInputError
from anygen.eval.run import codec_roundtrip
from anygen.eval.suites import Report, run_reconstruction
from anygen.hub import resolve
from anygen.tokenizers.visual import (
    VISUAL_PRESETS,
    VisualCodec,
    VisualConfig,
    load_visual_codec,
)
from anygen.training import (
    TrainConfig,
    load_recipe,
    train,
    training_device,
    training_seconds,
)

log = logging.getLogger("recipes.emu_shapes")

HERE = Path(__file__).resolve().parent
# stage 2's document mix: an image is 16 positions here, so in-context subject documents
# (3 to 5 reference images, a prompt, the picture) fit in a row
EMU_MIX = "t2i=0.3,caption=0.15,vqa=0.15,story=0.15,edit=0.1,subject=0.15"


# the kinds of document that end in a picture the transformer draws
DRAWN_KINDS = ("t2i", "story", "edit", "subject")


class LatentReadout(nn.Module):
    """Training only: rebuilds a picture's scaled VAE latents (C, h, w) from the encoder's grid
    of embeddings (N = g * g, visual_dim) by a few convolutions and nearest upsamplings. Its
    mean squared error reaches the encoder directly, where the decoder's denoising loss
    reaches it only through what the noise leaves unknown; it is dropped after training."""

    def __init__(self, c: VisualConfig, width: int = 128) -> None:
        super().__init__()
        ratio = c.latent_size // c.grid
        if c.latent_size % c.grid or ratio & (ratio - 1):
            raise ValueError(
                f"latents of {c.latent_size} px are not a power-of-two multiple of the "
                f"{c.grid} x {c.grid} grid"
            )
        self.grid = c.grid
        layers: list[nn.Module] = [nn.Conv2d(c.visual_dim, width, 3, padding=1), nn.SiLU()]
        for _ in range(ratio.bit_length() - 1):  # x2 per step up to the latents' size
            layers += [nn.Upsample(scale_factor=2.0), nn.Conv2d(width, width, 3, padding=1)]
            layers += [nn.SiLU()]
        layers.append(nn.Conv2d(width, c.latent_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        grid = rearrange(embeddings, "b (y x) d -> b d y x", y=self.grid)
        return self.net(grid)


class CodecTrainer(nn.Module):
    """The codec's training loss: the decoder's denoising loss, plus with ``readout_weight``
    w > 0 w times a ``LatentReadout``'s error in rebuilding the latents from the encoder's
    embeddings (the encoder learns from both)."""

    def __init__(
        self,
        codec: VisualCodec,
        foreground_weight: float = 0.0,
        foreground_margin: int = 0,
        readout_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.codec = codec
        self.foreground_weight = foreground_weight
        self.foreground_margin = foreground_margin
        self.readout_weight = readout_weight
        self.readout = LatentReadout(codec.config) if readout_weight else None

    def forward(self, images: torch.Tensor, cond: torch.Tensor | None = None) -> dict:
        reads = self.readout is not None and cond is None
        latents = self.codec.latents_of(images)
        embeddings = self.codec.encoder(images) if reads else None  # one pass serves both
        out = self.codec.loss(
            images,
            latents,
            cond=cond,
            embeddings=embeddings,
            foreground_weight=self.foreground_weight,
            foreground_margin=self.foreground_margin,
        )
        if reads:
            readout = F.mse_loss(self.readout(embeddings).float(), latents.float())
            out["loss"] = out["loss"] + self.readout_weight * readout
            out["readout_mse"] = readout.detach()
        return out


class DrawnPictures(Dataset):
    """Pictures a transformer draws in the shapes world: item i is a picture of document i of
    the ``mix`` (its kinds that end in a picture; in a story, one scene at random) as
    {"image" (3, S, S), "prefix": the segments before it, scenes as PIL images, "regress":
    whether the decoder learns it from the transformer's regression (with probability
    ``fraction``) or from the encoder's embeddings, "seed"}."""

    def __init__(self, length: int, seed: int, mix: dict, fraction: float, size: int) -> None:
        drawn = {k: w for k, w in check_mix(mix).items() if k in DRAWN_KINDS}
        if not drawn:
            raise ValueError(f"the mix {mix} has no kind that ends in a picture ({DRAWN_KINDS})")
        self.length, self.seed, self.mix = length, seed, drawn
        self.fraction, self.size = fraction, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        segments = mixed_document(self.seed, i, self.mix).segments
        rng = random.Random(f"anygen-drawn-pictures:{self.seed}:{i}")
        k = rng.choice([j for j, s in enumerate(segments) if isinstance(s, Scene) and j > 0])
        prefix = [s if isinstance(s, str) else render_image(s, self.size) for s in segments[:k]]
        return {
            "image": image_tensor(segments[k], self.size),
            "prefix": prefix,
            "regress": rng.random() < self.fraction,
            "seed": rng.randrange(2**31),
        }


class Regressions:
    """The embeddings a fusion model regresses for the picture after each prefix, at its
    default sampling settings (those of ``anygen generate``)."""

    def __init__(self, pipe) -> None:
        from anygen.pipelines.base import Options

        if not pipe.config.continuous:
            raise UserInputError(
                f"{pipe.name} writes VQ codes, not embeddings: it has no regressions to learn"
            )
        self.pipe = pipe
        self.pipe.transformer.eval()
        self.sampling = pipe.sampling(Options(), "temperature")

    @classmethod
    def of(cls, model: str) -> Regressions:
        from anygen.pipelines.fusion import Fusion

        return cls(Fusion.from_pretrained(resolve(model), name=model, dtype=torch.float32))

    def __call__(self, prefixes: list[list], seeds: list[int]) -> torch.Tensor:
        from anygen.pipelines.base import make_generator

        boi = self.pipe.config.boi_id
        rows = [self.pipe.prompt(prefix, end=[boi]) for prefix in prefixes]
        gens = [make_generator(s) for s in seeds]
        return torch.stack(self.pipe.next_pieces(rows, self.sampling, gens)).float()


@torch.no_grad()
def score_codec(codec: VisualCodec, n: int, seed: int = 0) -> Report:
    """Held-out reconstruction through the embeddings: decode(encode(x)), seeded noise."""
    return run_reconstruction(
        codec_roundtrip(codec, seed),
        n=n,
        seed=seed,
        batch_size=50,
        size=codec.image_size,
        progress=False,
    )


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="anygen train recipes/emu_shapes.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(VISUAL_PRESETS), default="shapes")
    p.add_argument(
        "--vae",
        help="the ldm model whose VAE the decoder works over (default shapes-ldm; with "
        "--codec-init-from, default that codec's own VAE, and a model named here replaces it)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec-steps", type=int, default=3000)
    p.add_argument("--codec-batch-size", type=int, default=32)
    p.add_argument("--codec-lr", type=float, default=4e-4)
    p.add_argument("--codec-eval-n", type=int, default=300, help="held-out scenes (0: skip)")
    p.add_argument(
        "--codec-foreground-weight",
        type=float,
        default=0.0,
        help="extra weight of the latent positions over objects in the decoder's denoising "
        "loss (0: plain mean)",
    )
    p.add_argument(
        "--codec-foreground-margin",
        type=int,
        default=0,
        metavar="PX",
        help="with --codec-foreground-weight: also weight the positions within PX of an object",
    )
    p.add_argument(
        "--codec-readout-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="add W x the error of a small readout (training only) that rebuilds the VAE "
        "latents from the encoder's embeddings, so that the encoder learns to carry the whole "
        "picture (0: the denoising loss alone)",
    )
    p.add_argument(
        "--codec-decode-guidance",
        type=float,
        metavar="G",
        help="the trained codec decodes with its own classifier-free guidance G (default: "
        "the preset's, or the --codec-init-from codec's)",
    )
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--codec-only", action="store_true", help="stop after stage 1")
    p.add_argument(
        "--codec-init-from",
        metavar="DIR",
        help="stage 1 starts from this visual codec's weights (fp32) under a fresh schedule",
    )
    p.add_argument(
        "--freeze-encoder",
        action="store_true",
        help="stage 1 trains the diffusion decoder only: the embeddings stay the ones a "
        "transformer trained on the --codec-init-from codec regresses, so its pictures "
        "render through the better decoder without retraining it",
    )
    p.add_argument(
        "--regressions-of",
        metavar="MODEL",
        help="stage 1 teaches the decoder (with --freeze-encoder) to render MODEL's regressed "
        "embeddings of the pictures that end shapes-world documents, given what precedes them",
    )
    p.add_argument(
        "--regressed-fraction",
        type=float,
        default=0.8,
        help="with --regressions-of: the share of pictures rendered from MODEL's regressions "
        "(the rest from the encoder's embeddings)",
    )
    p.add_argument(
        "--transformer-preset",
        default="shapes-continuous",
        help="stage 2: the fusion transformer's preset (FUSION_PRESETS)",
    )
    p.add_argument("--bundle", action="store_true", help="bundle the model (stage 2)")
    # everything else goes to recipes/fusion_shapes.py (stage 2), whose default document
    # mix for this model adds in-context subject documents
    args, rest = p.parse_known_args(argv)
    if args.codec_only and rest:  # no stage 2 to take them: a typo must not pass unseen
        p.error(f"unrecognized arguments (--codec-only runs stage 1 alone): {' '.join(rest)}")
    if args.vae is None and not args.codec_init_from:
        args.vae = "shapes-ldm"  # a fresh codec's; a continued one keeps its own
    if args.freeze_encoder and not args.codec_init_from:
        p.error("--freeze-encoder needs --codec-init-from DIR (a trained encoder to keep)")
    if args.regressions_of and not args.freeze_encoder:
        p.error(
            "--regressions-of needs --freeze-encoder and --codec-init-from MODEL/visual: "
            "the transformer regresses the embeddings of the encoder it was trained on"
        )
    if args.codec_readout_weight < 0:
        p.error(f"--codec-readout-weight must be >= 0, got {args.codec_readout_weight}")
    if args.codec_readout_weight and args.freeze_encoder:
        p.error("--codec-readout-weight teaches the encoder: it cannot go with --freeze-encoder")
    if args.codec_decode_guidance is not None and args.codec_decode_guidance < 1:
        p.error(f"--codec-decode-guidance must be >= 1, got {args.codec_decode_guidance}")
    if args.codec_foreground_weight < 0 or args.codec_foreground_margin < 0:
        p.error("--codec-foreground-weight and --codec-foreground-margin must be >= 0")
    if not 0 <= args.regressed_fraction <= 1:
        p.error(f"--regressed-fraction must be between 0 and 1, got {args.regressed_fraction}")
    return args, rest


def main(argv: list[str]) -> None:
    args, rest = parse_args(argv)
    out = args.output_dir
    codec_dir = out / "visual"
    fusion = load_recipe(HERE / "fusion_shapes.py")
    stage2 = [
        "--output-dir",
        str(out),
        "--image-mode",
        "continuous",
        "--visual",
        str(codec_dir),
        "--name",
        "shapes-emu",
        "--preset",
        args.transformer_preset,
        "--seed",
        str(args.seed),
        "--checkpoint-every",  # the flag is emu's too: pass it on to the transformer stage
        str(args.checkpoint_every),
        *(["--resume"] if args.resume else []),
        *(["--bundle"] if args.bundle else []),
        *([] if any(a == "--mix" or a.startswith("--mix=") for a in rest) else ["--mix", EMU_MIX]),
        *rest,
    ]
    if not args.codec_only:
        fusion.parse_args(stage2)  # stage 2's flags fail now, not after the codec's training
    cfg = dataclasses.replace(VISUAL_PRESETS[args.preset])
    torch.manual_seed(args.seed)
    if not (codec_dir / "config.json").is_file():
        codec = start_codec(args, cfg)
        cfg = codec.config
        n = args.codec_steps * args.codec_batch_size
        if args.regressions_of:
            mix = {k: float(w) for k, w in (x.split("=") for x in EMU_MIX.split(","))}
            images = DrawnPictures(n, args.seed, mix, args.regressed_fraction, cfg.image_size)
            step = regression_step(codec, Regressions.of(args.regressions_of))
        else:
            images = ShapesT2IDataset(n, seed=args.seed, size=cfg.image_size)
            step = lambda model, batch: model(batch["image"])  # noqa: E731
        result = train(
            CodecTrainer(
                codec,
                args.codec_foreground_weight,
                args.codec_foreground_margin,
                args.codec_readout_weight,
            ),
            step,
            images,
            TrainConfig(
                output_dir=out / "train-visual",
                max_steps=args.codec_steps,
                batch_size=args.codec_batch_size,
                learning_rate=args.codec_lr,
                adam_betas=(0.9, 0.99),
                weight_decay=0.01,
                lr_schedule="cosine",
                warmup_steps=min(200, args.codec_steps // 10),
                ema_decay=0.999,
                checkpoint_every=args.checkpoint_every,
                keep_last_checkpoints=2,
                seed=args.seed,
                resume="latest" if args.resume else None,
            ),
            collate_fn=collate,
        )
        if not result.is_main_process:
            return
        codec = result.model.codec.eval()
        if args.codec_decode_guidance is not None:
            codec.config.decode_guidance = args.codec_decode_guidance
        facts = {
            "recipe": "recipes/emu_shapes.py (stage 1)",
            "argv": argv,
            "seed": args.seed,
            "steps": args.codec_steps,
            "batch_size": args.codec_batch_size,
            "vae": args.vae,  # None: the VAE of the codec it continues
            "codec_init_from": args.codec_init_from,
            "freeze_encoder": args.freeze_encoder,
            # what the trained module weighed its loss by, not only what was asked
            "foreground_weight": result.model.foreground_weight,
            "foreground_margin": result.model.foreground_margin,
            "readout_weight": result.model.readout_weight,
            "regressions_of": args.regressions_of,
            "regressed_fraction": args.regressed_fraction if args.regressions_of else None,
            "embeddings": f"{cfg.num_embeddings} x {cfg.visual_dim}",
            "decode_guidance": codec.config.decode_guidance,
            "train_time_s": round(training_seconds(out / "train-visual" / "metrics.jsonl"), 1),
            "device": training_device(out / "train-visual" / "metrics.jsonl"),
            "torch": torch.__version__,
        }
        report = None
        if args.codec_eval_n:
            report = score_codec(codec, args.codec_eval_n)
            facts["held_out_reconstruction"] = round(report.overall, 4)
            log.info("visual codec, held-out reconstruction:\n%s", report.table())
        codec.save_pretrained(codec_dir, card=codec_card(facts, report))
        if report is not None:
            (codec_dir / "eval.json").write_text(report.to_json() + "\n")
    else:
        log.info("stage 1 done before: using the visual codec in %s", codec_dir)
        if args.codec_decode_guidance is not None:
            log.warning(
                "--codec-decode-guidance %g does nothing: the codec in %s is already saved",
                args.codec_decode_guidance,
                codec_dir,
            )
    if args.codec_only:
        return
    fusion.main(stage2)


def regression_step(codec: VisualCodec, regressions: Regressions):
    """The training step of ``--regressions-of``: rows marked "regress" render the
    transformer's regression of their picture, the others the encoder's embeddings of it."""

    def step(model, batch):
        images = batch["image"]
        rows = [i for i, r in enumerate(batch["regress"]) if r]
        own = [i for i, r in enumerate(batch["regress"]) if not r]
        c = codec.config
        cond = images.new_empty(len(images), c.num_embeddings, c.visual_dim)
        with torch.no_grad():
            if own:
                cond[own] = codec.encoder(images[own])
            if rows:
                prefixes = [batch["prefix"][i] for i in rows]
                seeds = [batch["seed"][i] for i in rows]
                cond[rows] = regressions(prefixes, seeds).to(cond.device, cond.dtype)
        return model(images, cond)

    return step


def start_codec(args: argparse.Namespace, cfg) -> VisualCodec:
    """Stage 1's codec: a fresh one over ``--vae``'s frozen VAE, or ``--codec-init-from``'s
    weights in fp32 (over its own VAE unless ``--vae`` names another), the encoder frozen
    with ``--freeze-encoder``."""
    from diffusers import AutoencoderKL

    vae = None
    if args.vae:
        vae = AutoencoderKL.from_pretrained(resolve(args.vae) / "vae", dtype=torch.float32)
    if args.codec_init_from:
        codec = load_visual_codec(args.codec_init_from, dtype=torch.float32)
        if vae is not None:
            try:
                codec = codec.with_vae(vae)
            except CheckpointError as e:
                raise UserInputError(
                    f"--vae {args.vae} cannot replace the VAE of {args.codec_init_from}: {e}"
                ) from None
        if args.freeze_encoder:
            codec.encoder.requires_grad_(False)
        return codec
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    cfg = dataclasses.replace(cfg, vae_factor=factor, latent_channels=vae.config.latent_channels)
    return VisualCodec(cfg, vae=vae)


def codec_card(facts: dict, report: Report | None) -> str:
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in facts.items())
    scores = (
        f"Held-out reconstruction through the embeddings, {len(report.records)} test-split "
        f"scenes (decode(encode(x)) satisfies x's caption):\n\n```\n{report.table()}\n```\n"
        if report is not None
        else "Not scored.\n"
    )
    vae = f"{facts['vae']}'s VAE" if facts.get("vae") else "the VAE of the codec it continues"
    how = "trained together by the decoder's denoising loss"
    if facts.get("codec_init_from"):
        trained = "the decoder alone, the encoder frozen" if facts.get("freeze_encoder") else "both"
        how = f"continued from {facts['codec_init_from']} ({trained}) by the denoising loss"
    if facts.get("readout_weight"):
        how += (
            f", plus {facts['readout_weight']:g} x the error of a latent readout (training only)"
            " that rebuilds the VAE latents from the embeddings"
        )
    if facts.get("regressions_of"):
        how += (
            f", rendering {facts['regressions_of']}'s regressed embeddings for "
            f"{facts['regressed_fraction']:.0%} of its pictures (the rest from the encoder's)"
        )
    guided = "It decodes without guidance."
    if facts.get("decode_guidance", 1.0) != 1.0:
        guided = (
            f"It decodes with classifier-free guidance {facts['decode_guidance']:g} of its own "
            "(the embeddings against zeros, learnt by condition dropout)."
        )
    return f"""---
{front}
---
# visual codec of shapes-emu

A ViT visual encoder (64 px -> {facts["embeddings"]} embeddings) and the diffusion decoder that
renders images from them (a UNet2DConditionModel over the latents of {vae},
cross-attending to the embeddings), {how}
({facts["steps"]} steps of batch {facts["batch_size"]}, {facts["train_time_s"]:.0f} s on
{facts["device"]}). {guided}

{scores}"""
