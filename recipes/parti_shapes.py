"""Train shapes-parti: a Parti-style text-to-image model of the shapes world.

The image tokenizer (``shapes-vq`` by default; ``recipes/vq_shapes.py`` trains it) stays
frozen and turns each 64 px training image into 8 x 8 codes as batches are made. A T5
text encoder and a GPT-2 decoder with cross-attention learn the next code by cross-entropy;
10% of captions are dropped to the empty caption so that classifier-free guidance has a
null condition to push away from. Runs through anygen's training loop (checkpoints,
resume, ``accelerate launch``). The result is a model directory in OUT/model.

    anygen train recipes/parti_shapes.py --output-dir runs/shapes-parti
    anygen train recipes/parti_shapes.py ... --bundle   # also write anygen/assets/models/shapes-parti
    anygen train recipes/parti_shapes.py --output-dir runs/parti-more --init-from shapes-parti \\
        --seed 1 --steps 6000 --lr 5e-4                # continue a saved model

``--init-from`` starts from a saved model's weights (its transformer, in fp32) with a fresh
optimizer and learning-rate schedule (warmup, then cosine decay to 0 over ``--steps``);
``--preset`` does not apply. Give it a ``--seed`` other than the first run's, or it draws
the same training samples again. ``--caption-forms`` weighs the caption forms of the
training captions (``relation=3,conjunction=4`` draws 3 relation and 4 conjunction captions
for 1 of each other form), as the ldm recipe does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
from pathlib import Path

import torch

from anygen.data.datasets import ShapesT2IDataset
from anygen.eval.suites import (
    CODE_SAMPLING_GRID,
    CODE_SAMPLING_GRID_FINE,
    SELECT_N,
    run_t2i,
    select_t2i_settings,
)
from anygen.hub import keep_history, resolve
from anygen.models.parti import PARTI_PRESETS, PartiTransformer, parti_loss, tokenize_prompts
from anygen.pipelines import Options
from anygen.pipelines.parti import Parti
from anygen.tokenizers.text import load_text_tokenizer
from anygen.tokenizers.vq import load_image_tokenizer
from anygen.training import (
    TrainConfig,
    caption_forms_arg,
    known_words,
    lineage_text,
    part_reference,
    start_from,
    starting_lineage,
    train,
    training_device,
    training_seconds,
    warn_if_same_seed,
    warn_if_unscored_bundle,
)

log = logging.getLogger("recipes.parti_shapes")

BUNDLE_DIR = Path(__file__).resolve().parents[1] / "anygen" / "assets" / "models" / "shapes-parti"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="anygen train recipes/parti_shapes.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(PARTI_PRESETS), default="shapes-m", help="model size")
    p.add_argument("--tokenizer", default="shapes-bpe")
    p.add_argument("--image-tokenizer", default="shapes-vq")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--paraphrase-prob", type=float, default=0.2)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument(
        "--caption-forms",
        type=caption_forms_arg,
        metavar="FORM=W,...",
        help="relative weights of the caption forms (a form not named weighs 1; default:"
        " uniform), e.g. relation=3,conjunction=4",
    )
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--init-from",
        metavar="MODEL",
        help="start from this saved parti model's weights (bundled name, path or hub id) with"
        " a fresh optimizer and schedule; --preset does not apply",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="default guidance of the model (3.0); with --select-n 0 only, as selection chooses it",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="default temperature (1.0); with --select-n 0 only, as selection chooses it",
    )
    p.add_argument("--top-k", type=int, default=0, help="default top-k (0: off)")
    p.add_argument(
        "--select-n",
        type=int,
        default=SELECT_N,
        help="validation prompts (seed 1000, never the eval's seed 0) on which to choose the "
        "default guidance, temperature and top-p from SAMPLING_GRID (0: keep the given defaults)",
    )
    p.add_argument("--eval-n", type=int, default=300, help="shapes-eval t2i prompts (0: skip)")
    p.add_argument("--bundle", action="store_true", help=f"also write fp16 weights to {BUNDLE_DIR}")
    args = p.parse_args(argv)
    if args.select_n and (args.guidance is not None or args.temperature is not None):
        p.error(
            "--guidance and --temperature set the defaults only with --select-n 0 "
            "(selection chooses both on validation prompts)"
        )
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    warn_if_unscored_bundle(args.bundle, args.eval_n, BUNDLE_DIR)
    torch.manual_seed(args.seed)
    tokenizer = load_text_tokenizer(args.tokenizer)
    image_tokenizer = load_image_tokenizer(args.image_tokenizer).requires_grad_(False)
    started_from = None  # how the model continued was trained, read before --bundle
    if args.init_from:
        model = init_model(args.init_from, tokenizer, image_tokenizer)
        started_from = starting_lineage(
            resolve(args.init_from), args.output_dir / "model", args.resume
        )
        warn_if_same_seed(args.init_from, args.seed, started_from)
        cfg = model.config
    else:
        cfg = dataclasses.replace(
            PARTI_PRESETS[args.preset],
            text_vocab_size=len(tokenizer),
            text_pad_id=tokenizer.pad_token_id,
            text_eos_id=tokenizer.eos_token_id,
            image_vocab_size=image_tokenizer.codebook_size,
            image_tokens=image_tokenizer.grid_size**2,
        )
        model = PartiTransformer(cfg)
    data = ShapesT2IDataset(
        args.steps * args.batch_size,
        seed=args.seed,
        size=image_tokenizer.image_size,
        paraphrase_prob=args.paraphrase_prob,
        form_weights=args.caption_forms,
    )

    def collate(items: list[dict]) -> dict:
        # caption dropout fixed by (seed, caption): the same batch after a resume
        texts = [
            ""
            if random.Random(f"{args.seed}:{item['text']}:{item['scene']}").random()
            < args.caption_dropout
            else item["text"]
            for item in items
        ]
        ids, mask = tokenize_prompts(tokenizer, texts, cfg, truncate=True)
        codes = image_tokenizer.encode(torch.stack([item["image"] for item in items]))
        return {"ids": ids, "mask": mask, "codes": codes.flatten(1)}

    result = train(
        model,
        lambda m, batch: parti_loss(m, batch["ids"], batch["mask"], batch["codes"]),
        data,
        TrainConfig(
            output_dir=args.output_dir / "train",
            max_steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=0.01,
            adam_betas=(0.9, 0.95),
            lr_schedule="cosine",
            warmup_steps=min(200, args.steps // 10),
            ema_decay=args.ema_decay,
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
    words = known_words(args.tokenizer)
    defaults = {
        "guidance_scale": 3.0 if args.guidance is None else args.guidance,
        "temperature": 1.0 if args.temperature is None else args.temperature,
        "top_k": args.top_k,
        "top_p": 1.0,
        **({"known_words": words} if words else {}),
    }
    pipe = Parti(result.model, tokenizer, image_tokenizer, name="shapes-parti", defaults=defaults)
    selection = None
    if args.select_n:
        selection = select_sampling(pipe, args.select_n)
        pipe.defaults.update(selection["chosen"])
        defaults.update(selection["chosen"])
    facts = {
        "recipe": "recipes/parti_shapes.py",
        "argv": argv,
        "seed": args.seed,
        "preset": None if args.init_from else args.preset,
        "init_from": args.init_from,
        "started_from": started_from,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "caption_forms": args.caption_forms,
        "parameters_m": round(sum(p.numel() for p in result.model.parameters()) / 1e6, 2),
        "image_tokenizer": args.image_tokenizer,
        "image": f"{image_tokenizer.grid_size} x {image_tokenizer.grid_size} codes, "
        f"{image_tokenizer.image_size} px",
        # a resumed run continues the checkpoint's step under a schedule over --steps
        "resumed_from": result.resumed_from.name if result.resumed_from else None,
        "train_time_s": round(training_seconds(args.output_dir / "train" / "metrics.jsonl"), 1),
        "device": training_device(args.output_dir / "train" / "metrics.jsonl"),
        "torch": torch.__version__,
    }
    if selection is not None:
        facts["sampling_selection"] = selection
    refs = {
        "tokenizer_ref": part_reference(args.tokenizer),
        "image_tokenizer_ref": part_reference(args.image_tokenizer),
    }
    report = None
    if args.eval_n:
        # score the model as shipped: fp16 weights loaded back in fp32
        pipe.save_pretrained(args.output_dir / "model-fp16", dtype=torch.float16, **refs)
        shipped = Parti.from_pretrained(args.output_dir / "model-fp16", name="shapes-parti")
        report = run_t2i(
            lambda prompts, seeds: (
                shipped.generate_batch(prompts, seeds, Options(progress=False)).images
            ),
            n=args.eval_n,
            seed=0,
            batch_size=50,
        )
        report.meta = {"model": "shapes-parti", "suite": "t2i", "n": args.eval_n, "seed": 0}
        log.info("shapes-eval t2i:\n%s", report.table())
    card = model_card(facts, defaults, report)
    files = {"training.json": json.dumps(facts, indent=2) + "\n"}
    if report is not None:
        files["eval.json"] = report.to_json() + "\n"
    pipe.save_pretrained(args.output_dir / "model", card=card, extra_files=files, **refs)
    log.info("saved %s", args.output_dir / "model")
    if args.bundle:
        card = keep_history(card, BUNDLE_DIR)
        pipe.save_pretrained(BUNDLE_DIR, card=card, dtype=torch.float16, extra_files=files, **refs)
        log.info("bundled fp16 weights in %s", BUNDLE_DIR)


def init_model(name: str, tokenizer, image_tokenizer) -> PartiTransformer:
    """The transformer of saved parti model ``name``, in fp32, checked against the recipe's
    tokenizers (a model trained over other tokens cannot continue on these)."""
    model = Parti.from_pretrained(resolve(name), dtype=torch.float32).transformer
    c = model.config
    mismatches = [
        f"{what}: the model has {have}, the recipe's tokenizers {want}"
        for what, have, want in (
            ("text vocabulary", c.text_vocab_size, len(tokenizer)),
            ("image codes", c.image_vocab_size, image_tokenizer.codebook_size),
            ("codes per image", c.image_tokens, image_tokenizer.grid_size**2),
        )
        if have != want
    ]
    return start_from(model, name, mismatches)


# The coarse grid (top_p 1), then the settings of the fine grid it lacks: 36 in all.
_COARSE = tuple({**s, "top_p": 1.0} for s in CODE_SAMPLING_GRID)
SAMPLING_GRID: tuple[dict, ...] = _COARSE + tuple(
    s for s in CODE_SAMPLING_GRID_FINE if s not in _COARSE
)


def select_sampling(pipe: Parti, n: int) -> dict:
    """The default guidance, temperature and top-p: the best of ``SAMPLING_GRID`` on validation
    prompts (``select_t2i_settings``: seed 1000, never the reported evaluation's seed 0)."""
    return select_t2i_settings(
        lambda prompts, seeds, s: (
            pipe.generate_batch(prompts, seeds, Options(progress=False, **s)).images
        ),
        SAMPLING_GRID,
        n,
    )


def model_card(facts: dict, defaults: dict, report=None) -> str:
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in facts.items())
    if report is not None:
        front += f"\nshapes_eval_t2i_overall: {report.overall:.3f}"
        scores = (
            f"shapes-eval, t2i suite, {len(report.records)} prompts, seed 0 "
            f"(`anygen eval --model shapes-parti --suite t2i --n {len(report.records)}`), as "
            f"shipped (fp16 weights, default sampling settings):\n\n```\n{report.table()}\n```\n"
        )
    else:
        scores = "Not scored yet: `anygen eval --model shapes-parti --suite t2i --n 300`.\n"
    selection = ""
    if "sampling_selection" in facts:
        sel = facts["sampling_selection"]
        rows = "\n".join(
            f"| {r['guidance_scale']} | {r['temperature']} | {r.get('top_p', 1.0)} "
            f"| {r['validation_overall']:.3f} |"
            for r in sel["grid"]
        )
        selection = (
            f"\nThe defaults were chosen on {sel['n']} validation prompts (shapes-eval t2i, "
            f"seed {sel['seed']}; the scores below use seed 0):\n\n"
            f"| guidance | temperature | top-p | validation overall |\n|---|---|---|---|\n{rows}\n"
        )
    settings = ", ".join(
        f"{k} {defaults[k]}" for k in ("guidance_scale", "temperature", "top_k", "top_p")
    )
    origin = (
        f"Continued from {facts['init_from']} ({lineage_text(facts.get('started_from'))}; "
        "its transformer, a fresh optimizer and schedule)"
        if facts.get("init_from")
        else "Trained from scratch"
    )
    if facts.get("caption_forms"):
        weights = ", ".join(f"{k} {v:g}" for k, v in facts["caption_forms"].items())
        origin += f" on caption forms weighted {weights} (1 for the others)"
    return f"""---
name: shapes-parti
summary: "text to image, Parti-style autoregressive transformer over shapes-vq codes, 64 px"
{front}
---
# shapes-parti

Parti for the shapes world: a T5 text encoder and a GPT-2 decoder with cross-attention
({facts["parameters_m"]} M parameters) write the image codes ({facts["image"]}) of the
`{facts["image_tokenizer"]}` image tokenizer, whose decoder renders them. {origin} by `{facts["recipe"]}` (seed
{facts["seed"]}, {facts["steps"]} steps of batch {facts["batch_size"]}, {facts["train_time_s"]:.0f} s on
{facts["device"]}). Sampling defaults: {settings}; `--steps` and `--scheduler` do not apply.
{selection}
{scores}"""
