"""Train shapes-fusion: a Chameleon-style early-fusion model of the shapes world.

One Llama-family decoder reads and writes a single stream of shapes-world documents
(``anygen.data.documents``): caption then image, image then caption, image + question then
answer, and stories (text, image, event, image, ...). Images are the 8 x 8 codes of the
frozen ``shapes-vq`` tokenizer, added to the vocabulary (``--image-mode discrete``); or,
with ``--image-mode continuous --visual DIR``, the 16 embeddings of a frozen visual
encoder that the model regresses (l2, times ``--regression-weight``) beside cross-entropy
on text (``recipes/emu_shapes.py`` trains that encoder and its diffusion decoder, then calls
this recipe). The encoder's embeddings are layer-normalised, so most of each one is a
pattern shared by every image: what tells images apart is a small share of its variance,
and the weight sets how much of the loss that share gets.

Documents are packed whole into rows of ``--row-len`` tokens, as language models
pretrain, so a batch is not mostly padding. Captions and answers are always canonical; 20%
of text-to-image prompts are paraphrases. Image-first documents (captions, questions) teach
the unconditional image distribution that classifier-free guidance pushes away from.

After training: the default guidance scale and image temperature are chosen on
validation prompts (seed 1000); the model is scored as shipped (fp16 weights) on
shapes-eval t2i and caption (seed 0) and the card records it all.

    anygen train recipes/fusion_shapes.py --output-dir runs/shapes-fusion
    anygen train recipes/fusion_shapes.py --output-dir runs/shapes-fusion --bundle
    anygen train recipes/fusion_shapes.py --output-dir runs/fusion-vqa3 --init-from \\
        runs/shapes-fusion/model --seed 3 --steps 4000 --lr 3e-4 --select-n 0 \\
        --mix t2i=0.35,caption=0.15,vqa=0.25,story=0.2,edit=0.05
    anygen train recipes/fusion_shapes.py --output-dir runs/fusion-c5 --init-from \\
        runs/fusion-vqa3/model --seed 5 --steps 4000 --lr 3e-4 --select-n 0 \\
        --mix t2i=0.35,caption=0.15,vqa=0.25,story=0.2,edit=0.05
    anygen train recipes/fusion_shapes.py --output-dir runs/fusion-s6 --init-from \\
        runs/fusion-c5/model --seed 6 --steps 4000 --lr 3e-4 --select-n 0 \\
        --mix t2i=0.3,caption=0.15,vqa=0.2,story=0.3,edit=0.05
    anygen train recipes/fusion_shapes.py --output-dir runs/fusion-c7 --init-from \\
        runs/fusion-s6/model --seed 7 --steps 4000 --lr 3e-4 --select-n 0 \\
        --mix t2i=0.35,caption=0.15,vqa=0.25,story=0.2,edit=0.05

``--init-from`` starts from a saved fusion model's weights (in fp32) with a fresh optimizer
and learning-rate schedule (warmup, then cosine decay to 0 over ``--steps``); ``--preset``
does not apply, and the model must read the recipe's tokens and images. Give it a
``--seed`` that no run before it used, or it draws the same training documents again. The
continuation keeps that model's sampling defaults (``--select-n`` re-chooses them) and
records how it was trained (``started_from`` in training.json and the card). The last four
commands above, from the first run at ``--steps 33500``, made the shipped shapes-fusion
(which started seeds 3, 5 and 6 from the bundled fp16 weights of the run before).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from anygen.data.datasets import images_to_tensor
from anygen.data.documents import DEFAULT_MIX, Document, check_mix, mixed_document
from anygen.data.render import render_image
from anygen.data.world import Scene
from anygen.errors import UserInputError
from anygen.eval.suites import (
    CODE_SAMPLING_GRID,
    SELECT_N,
    Report,
    run_caption,
    run_edit,
    run_story,
    run_subject,
    run_t2i,
    select_t2i_settings,
)
from anygen.hub import keep_history, resolve
from anygen.models.fusion import (
    FUSION_PRESETS,
    VISUAL_HEADS,
    FusionTransformer,
    ImageSlot,
    TextSlot,
    document_length,
    fusion_loss,
    pack_rows,
)
from anygen.pipelines import Options
from anygen.pipelines.base import read_model_meta
from anygen.pipelines.fusion import PART_KEYS, Fusion
from anygen.tokenizers.text import load_text_tokenizer
from anygen.tokenizers.visual import load_visual_codec
from anygen.tokenizers.vq import load_image_tokenizer
from anygen.training import (
    TrainConfig,
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

log = logging.getLogger("recipes.fusion_shapes")

ASSETS = Path(__file__).resolve().parents[1] / "anygen" / "assets" / "models"
STRIDE = 64  # documents a row may draw from (row i reads documents i*STRIDE, ...)


class DocumentRows(Dataset):
    """Row ``i``: documents of the mix, in order from ``i * STRIDE``, that fit together in
    ``row_len`` tokens (a document that does not fit is skipped). Random access and
    reproducible, like every shapes-world dataset."""

    def __init__(self, n_rows: int, seed: int, mix: dict, row_len: int, length_of) -> None:
        self.n_rows, self.seed, self.mix, self.row_len = n_rows, seed, mix, row_len
        self.length_of = length_of
        self.paraphrase_prob = 0.2

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, index: int) -> list[Document]:
        docs, used = [], 0
        for j in range(index * STRIDE, (index + 1) * STRIDE):
            doc = mixed_document(
                self.seed, j, self.mix, "train", paraphrase_prob=self.paraphrase_prob
            )
            n = self.length_of(doc)
            if used + n <= self.row_len:
                docs.append(doc)
                used += n
            if self.row_len - used < 16:
                break
        return docs


class Slots:
    """Shapes-world documents -> the model's slots: text ids, and images rendered and
    turned into codes (discrete) or embeddings (continuous) in one batch."""

    def __init__(self, tokenizer, images, config) -> None:
        self.tokenizer, self.images, self.config = tokenizer, images, config
        self._ids: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return self._ids[text]

    def length(self, doc: Document) -> int:
        fake = [
            ImageSlot(torch.empty(0)) if isinstance(s, Scene) else TextSlot(self.ids(s))
            for s in doc.segments
        ]
        return document_length(fake, self.config)

    @torch.no_grad()
    def encode(self, scenes: list[Scene]) -> list[torch.Tensor]:
        if not scenes:
            return []
        x = images_to_tensor([render_image(s, self.images.image_size) for s in scenes])
        if self.config.continuous:
            return list(self.images.encode(x).float())
        return list(self.images.encode(x).reshape(len(scenes), -1))

    def __call__(self, rows: list[list[Document]]):
        scenes = [s for docs in rows for d in docs for s in d.scenes]
        encoded = iter(self.encode(scenes))
        out = []
        for docs in rows:
            row = []
            for d in docs:
                row.append(
                    [
                        ImageSlot(next(encoded)) if isinstance(s, Scene) else TextSlot(self.ids(s))
                        for s in d.segments
                    ]
                )
            out.append(row)
        return pack_rows(out, self.config)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="anygen train recipes/fusion_shapes.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--image-mode", choices=("discrete", "continuous"), default="discrete")
    p.add_argument("--preset", choices=sorted(FUSION_PRESETS), default=None)
    p.add_argument("--tokenizer", default="shapes-bpe")
    p.add_argument("--image-tokenizer", default="shapes-vq", help="discrete: the VQ tokenizer")
    p.add_argument("--visual", default=None, help="continuous: the visual codec directory")
    p.add_argument("--name", default=None, help="model name (default: shapes-fusion / shapes-emu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per step")
    p.add_argument("--row-len", type=int, default=384, help="tokens per packed row")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--regression-weight",
        type=float,
        default=None,
        help="continuous: weight of the l2 term on the regressed embeddings (default: the "
        "preset's, or the --init-from model's)",
    )
    p.add_argument(
        "--visual-head",
        choices=VISUAL_HEADS,
        default=None,
        help="continuous: regression (the regressed embedding is written) or diffusion (a "
        "diffusion head draws the residual the regression leaves; a model with a regression "
        "head gets a fresh one). Default: the preset's, or the --init-from model's",
    )
    p.add_argument(
        "--freeze-transformer",
        action="store_true",
        help="train the diffusion head alone, on the hidden states of the model it is given",
    )
    p.add_argument(
        "--mix",
        default=",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()),
        help="document kinds and weights, e.g. t2i=0.4,caption=0.2,vqa=0.2,story=0.2",
    )
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer (pays off on a GPU)"
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--init-from",
        metavar="MODEL",
        help="start from this saved fusion model's weights (bundled name, path or hub id) with"
        " a fresh optimizer and schedule; --preset does not apply",
    )
    p.add_argument(
        "--grow-layers",
        type=int,
        metavar="N",
        help="deepen the --init-from model to N decoder layers before training, each new "
        "layer starting as an identity, so that the grown model first computes exactly what "
        "the saved one does (FusionTransformer.deepened)",
    )
    p.add_argument(
        "--select-n",
        type=int,
        default=SELECT_N,
        help="validation prompts (seed 1000) on which to choose the default guidance and "
        "temperature from CODE_SAMPLING_GRID (0: skip)",
    )
    p.add_argument("--eval-n", type=int, default=300, help="shapes-eval prompts (0: skip)")
    p.add_argument(
        "--eval-suites",
        default=None,
        help="comma-separated shapes-eval suites (default: t2i,caption,story,edit, and "
        "subject when the mix has subject documents)",
    )
    p.add_argument(
        "--bundle", action="store_true", help=f"also write fp16 weights to {ASSETS}/NAME"
    )
    args = p.parse_args(argv)
    if args.grow_layers is not None and not args.init_from:
        p.error("--grow-layers deepens a saved model: give --init-from MODEL")
    if args.image_mode == "continuous" and args.visual is None:
        p.error("--image-mode continuous needs --visual DIR (a trained visual codec)")
    if args.regression_weight is not None:
        if args.image_mode != "continuous":
            p.error("--regression-weight applies to --image-mode continuous only")
        if args.regression_weight <= 0:
            p.error(f"--regression-weight must be > 0, got {args.regression_weight}")
    if args.visual_head is not None and args.image_mode != "continuous":
        p.error("--visual-head applies to --image-mode continuous only")
    if args.freeze_transformer and not (args.visual_head == "diffusion" and args.init_from):
        p.error(
            "--freeze-transformer trains a diffusion head alone: it needs --visual-head "
            "diffusion and --init-from MODEL"
        )
    try:
        args.mix = check_mix({k: float(v) for k, v in (x.split("=") for x in args.mix.split(","))})
    except ValueError:
        p.error(f"--mix must look like t2i=0.4,caption=0.2, got {args.mix!r}")
    suites = args.eval_suites or "t2i,caption,story,edit" + (
        ",subject" if "subject" in args.mix else ""
    )
    args.eval_suites = [x for x in suites.split(",") if x]
    unknown = set(args.eval_suites) - {"t2i", "caption", "story", "edit", "subject"}
    if unknown:
        p.error(f"unknown --eval-suites {sorted(unknown)}")
    args.name = args.name or ("shapes-emu" if args.image_mode == "continuous" else "shapes-fusion")
    args.preset = args.preset or (
        "shapes-continuous" if args.image_mode == "continuous" else "shapes"
    )
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    warn_if_unscored_bundle(args.bundle, args.eval_n, ASSETS / args.name)
    torch.manual_seed(args.seed)
    tokenizer = load_text_tokenizer(args.tokenizer)
    if args.image_mode == "continuous":
        images = load_visual_codec(args.visual).requires_grad_(False).eval()
        shape = {"image_tokens": images.num_embeddings, "visual_dim": images.visual_dim}
        images_ref = None  # the codec is copied into the model directory
        # read now: a --bundle may replace the folder it came from (the bundled model's own)
        codec_card = read_codec_card(args.visual)
    else:
        images = load_image_tokenizer(args.image_tokenizer).requires_grad_(False).eval()
        shape = {"image_tokens": images.grid_size**2, "image_vocab_size": images.codebook_size}
        images_ref = part_reference(args.image_tokenizer)
        codec_card = {}
    cfg = dataclasses.replace(
        FUSION_PRESETS[args.preset],
        text_vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        boi_id=tokenizer.convert_tokens_to_ids("<boi>"),
        eoi_id=tokenizer.convert_tokens_to_ids("<eoi>"),
        img_id=tokenizer.convert_tokens_to_ids("<img>"),
        **shape,
    )
    start_defaults = {}  # a continuation keeps its model's sampling defaults
    grown_from_layers = None
    started_from = None  # and records how that model was trained, read before --bundle
    if args.init_from:
        model = init_model(args.init_from, cfg)
        if args.grow_layers is not None:
            log.info("deepening %d layers to %d", model.config.num_layers, args.grow_layers)
            grown_from_layers = model.config.num_layers
            model = model.deepened(args.grow_layers)
        started_from = starting_lineage(
            resolve(args.init_from), args.output_dir / "model", args.resume
        )
        warn_if_same_seed(args.init_from, args.seed, started_from)
        start_defaults = sampling_defaults(resolve(args.init_from))
    else:
        if args.visual_head:
            cfg = dataclasses.replace(cfg, visual_head=args.visual_head)
        model = FusionTransformer(cfg)
    if args.regression_weight is not None:  # saved with the model: how it was trained
        model.config.regression_weight = args.regression_weight
    slots = Slots(tokenizer, images, cfg)
    data = DocumentRows(
        args.steps * args.batch_size, args.seed, args.mix, args.row_len, slots.length
    )
    if args.visual_head == "regression" and model.config.diffusion_head:
        raise UserInputError(
            f"{args.init_from} has a diffusion head; --visual-head regression would drop it"
        )
    new_head = args.visual_head == "diffusion" and not (
        args.init_from and model.config.diffusion_head
    )
    if new_head:
        scale = residual_scale(model, data, slots, args.batch_size)
        if model.config.diffusion_head:  # from scratch: the preset asked for one
            model.config.diffusion_scale = scale
        else:
            model.add_diffusion_head(scale)
        log.info("diffusion head over the regression's residual, times %.3f", scale)
    if args.freeze_transformer:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("diffusion."))
    result = train(
        model,
        fusion_loss,
        data,
        TrainConfig(
            output_dir=args.output_dir / "train",
            max_steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=0.05,
            adam_betas=(0.9, 0.95),
            lr_schedule="cosine",
            warmup_steps=min(200, args.steps // 10),
            ema_decay=args.ema_decay,
            checkpoint_every=args.checkpoint_every,
            keep_last_checkpoints=2,
            mixed_precision=args.mixed_precision,
            compile=args.compile,
            seed=args.seed,
            resume="latest" if args.resume else None,
        ),
        collate_fn=slots,
    )
    if not result.is_main_process:
        return
    words = known_words(args.tokenizer)
    pipe = Fusion(
        result.model,
        tokenizer,
        images,
        name=args.name,
        defaults={**start_defaults, **({"known_words": words} if words else {})},
    )
    facts = {
        "recipe": "recipes/fusion_shapes.py",
        "argv": argv,
        "seed": args.seed,
        "preset": None if args.init_from else args.preset,
        "init_from": args.init_from,
        "started_from": started_from,
        "image_mode": args.image_mode,
        "regression_weight": model.config.regression_weight if cfg.continuous else None,
        "visual_head": model.config.visual_head if cfg.continuous else None,
        "diffusion_scale": model.config.diffusion_scale if new_head else None,
        "freeze_transformer": args.freeze_transformer,
        "grown_from_layers": grown_from_layers,
        "num_layers": result.model.config.num_layers,
        "steps": args.steps,
        "batch": f"{args.batch_size} rows of {args.row_len} tokens",
        "mix": args.mix,
        "parameters_m": round(sum(p.numel() for p in result.model.parameters()) / 1e6, 2),
        "eval_n": args.eval_n,
        "images": args.image_tokenizer if args.image_mode == "discrete" else "visual/",
        # a resumed run continues the checkpoint's step under a schedule over --steps
        "resumed_from": result.resumed_from.name if result.resumed_from else None,
        "train_time_s": round(training_seconds(args.output_dir / "train" / "metrics.jsonl"), 1),
        "device": training_device(args.output_dir / "train" / "metrics.jsonl"),
        "torch": torch.__version__,
    }
    if args.select_n:
        selection = select_sampling(pipe, args.select_n)
        pipe.defaults.update(selection["chosen"])
        facts["sampling_selection"] = selection
    refs = {"tokenizer_ref": part_reference(args.tokenizer), "images_ref": images_ref}
    reports: dict[str, Report] = {}
    if args.eval_n:
        # score the model as shipped: fp16 weights loaded back in fp32
        pipe.save_pretrained(args.output_dir / "model-fp16", dtype=torch.float16, **refs)
        shipped = Fusion.from_pretrained(args.output_dir / "model-fp16", name=args.name)
        reports = evaluate(shipped, args.eval_n, args.eval_suites)
        for name, report in reports.items():
            log.info("shapes-eval %s:\n%s", name, report.table())
            facts[f"shapes_eval_{name}_overall"] = round(report.overall, 4)
    card = model_card(args.name, facts, pipe.defaults, reports)
    files = {"training.json": json.dumps(facts, indent=2) + "\n"}
    for name, report in reports.items():
        files[f"eval-{name}.json"] = report.to_json() + "\n"
    pipe.save_pretrained(args.output_dir / "model", card=card, extra_files=files, **refs)
    write_codec_card(codec_card, args.output_dir / "model")
    log.info("saved %s", args.output_dir / "model")
    if args.bundle:
        card = keep_history(card, ASSETS / args.name)
        pipe.save_pretrained(
            ASSETS / args.name, card=card, dtype=torch.float16, extra_files=files, **refs
        )
        write_codec_card(codec_card, ASSETS / args.name)
        log.info("bundled fp16 weights in %s", ASSETS / args.name)


# what a model must share with the recipe's tokenizers to continue on their documents
_FITS = (
    "text_vocab_size",
    "pad_id",
    "bos_id",
    "eos_id",
    "boi_id",
    "eoi_id",
    "img_id",
    "image_mode",
    "image_tokens",
    "image_vocab_size",
    "visual_dim",
)


def init_model(name: str, cfg) -> FusionTransformer:
    """The transformer of saved fusion model ``name``, in fp32, checked against the
    configuration the recipe's tokenizers give (``cfg``): a model trained over other tokens
    or images cannot continue on these."""
    model = FusionTransformer.from_pretrained(resolve(name)).float()
    have = model.config
    unused = "image_vocab_size" if cfg.continuous else "visual_dim"
    mismatches = [
        f"{k}: the model has {getattr(have, k)!r}, the recipe {getattr(cfg, k)!r}"
        for k in _FITS
        if k != unused and getattr(have, k) != getattr(cfg, k)
    ]
    return start_from(model, name, mismatches)


def residual_scale(model: FusionTransformer, data, slots, batch_size: int, batches=8) -> float:
    """1 / the root mean square of what the model's regression leaves of the embeddings over
    the first ``batches`` training batches: the scale that brings the residual a diffusion
    head draws to about unit size (as a VAE's scaling factor does for its latents)."""
    with torch.no_grad():
        mse = [
            fusion_loss(
                model, slots([data[i] for i in range(b * batch_size, (b + 1) * batch_size)])
            )["mse"]
            for b in range(batches)
        ]
    return float(torch.stack(mse).mean().rsqrt())


def sampling_defaults(model_dir: Path) -> dict:
    """The sampling defaults a saved fusion model records (guidance, temperatures, its
    ``rerank`` block...): what its continuation starts from, until ``--select-n`` re-chooses."""
    meta = read_model_meta(model_dir, "a saved fusion model")
    return {k: v for k, v in meta.items() if k not in (*PART_KEYS, "known_words")}


def read_codec_card(visual: str) -> dict[str, str]:
    """The visual codec's card and held-out scores (README.md, eval.json) where it has them,
    name -> text: they travel with a model that stores the codec."""
    return {
        name: (Path(visual) / name).read_text()
        for name in ("README.md", "eval.json")
        if (Path(visual) / name).is_file()
    }


def write_codec_card(files: dict[str, str], model_dir: Path) -> None:
    """Write ``read_codec_card``'s files into the codec folder of a saved model."""
    if not (model_dir / "visual").is_dir():
        return
    for name, text in files.items():
        (model_dir / "visual" / name).write_text(text)


def evaluate(pipe: Fusion, n: int, suites: list[str]) -> dict[str, Report]:
    """shapes-eval suites, seed 0, default settings: t2i and caption (captions + VQA) with
    ``n`` items, story, edit and subject with ``n // 3`` (each is several images)."""
    quiet = Options(progress=False)

    def seeded(s: int) -> Options:
        return Options(seed=s, progress=False)

    runs = {
        "t2i": lambda: run_t2i(
            lambda prompts, seeds: pipe.generate_batch(prompts, seeds, quiet).images,
            n=n,
            seed=0,
            batch_size=50,
            progress=False,
        ),
        "caption": lambda: run_caption(
            lambda images: pipe.caption(images, quiet),
            lambda images, questions: pipe.answer(images, questions, quiet),
            n=n,
            seed=0,
            batch_size=50,
            progress=False,
        ),
        "story": lambda: run_story(
            lambda prompt, scenes, s: pipe.story(prompt, scenes, s, quiet),
            n=max(1, n // 3),
            seed=0,
            progress=False,
        ),
        "edit": lambda: run_edit(
            lambda image, text, s: pipe.edit(image, text, seeded(s)).images[0],
            n=max(1, n // 3),
            seed=0,
            progress=False,
        ),
        "subject": lambda: run_subject(
            lambda refs, prompt, s: pipe.generate_subject(refs, prompt, seeded(s)).images[0],
            n=max(1, n // 3),
            seed=0,
            progress=False,
        ),
    }
    reports = {}
    for name in suites:
        report = runs[name]()
        used = n if name in ("t2i", "caption") else max(1, n // 3)
        report.meta = {"model": pipe.name, "suite": name, "n": used, "seed": 0}
        reports[name] = report
    return reports


def select_sampling(pipe: Fusion, n: int) -> dict:
    """The default guidance and image temperature: the best of ``CODE_SAMPLING_GRID`` on
    validation prompts (``select_t2i_settings``: seed 1000, never the reported evaluation's
    seed 0). Continuous models have no code temperature: only their guidance is chosen."""
    grid = list(CODE_SAMPLING_GRID)
    if pipe.config.continuous:
        grid = [{"guidance_scale": g["guidance_scale"]} for g in grid if g["temperature"] == 1.0]
    return select_t2i_settings(
        lambda prompts, seeds, s: (
            pipe.generate_batch(prompts, seeds, Options(progress=False, **s)).images
        ),
        grid,
        n,
    )


def model_card(name: str, facts: dict, defaults: dict, reports: dict[str, Report]) -> str:
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in facts.items())
    mode = facts["image_mode"]
    what = (
        "8 x 8 codes of the `shapes-vq` tokenizer in the vocabulary (one softmax), rendered by "
        "its VQ decoder"
        if mode == "discrete"
        else "16 embeddings of a visual encoder, regressed (l2) and rendered by a diffusion "
        "decoder (`visual/`)"
    )
    if facts.get("visual_head") == "diffusion":
        what += "; a diffusion head (MAR) draws the residual each regression leaves" + (
            ", trained alone on the frozen transformer's hidden states"
            if facts.get("freeze_transformer")
            else ""
        )
    tables = ""
    for suite, report in reports.items():
        tables += (
            f"\nshapes-eval {suite}, {len(report.records)} items, seed 0 "
            f"(`anygen eval --model {name} --suite {suite} --n {report.meta['n']}`), as "
            f"shipped (fp16 weights, default settings):\n\n```\n{report.table()}\n```\n"
        )
    selection = ""
    if "sampling_selection" in facts:
        sel = facts["sampling_selection"]
        rows = "\n".join(
            f"| {r['guidance_scale']} | {r.get('temperature', '-')} | {r['validation_overall']:.3f} |"
            for r in sel["grid"]
        )
        selection = (
            f"\nDefaults chosen on {sel['n']} validation prompts (shapes-eval t2i, seed "
            f"{sel['seed']}; the scores below use seed 0):\n\n"
            f"| guidance | temperature | validation overall |\n|---|---|---|\n{rows}\n"
        )
    grown = (
        f", deepened from {facts['grown_from_layers']} to {facts['num_layers']} layers (each "
        "new layer a copy of the one before it that starts as an identity)"
        if facts.get("grown_from_layers")
        else ""
    )
    origin = (
        f"Continued from {facts['init_from']} ({lineage_text(facts.get('started_from'))}; "
        f"its weights{grown}, a fresh optimizer and schedule)"
        if facts.get("init_from")
        else "Trained from scratch"
    )
    keys = ("guidance_scale", "temperature", "top_p", "text_temperature", "story_temperature")
    settings = ", ".join(f"{k} {defaults[k]}" for k in keys if k in defaults)
    if "rerank" in defaults:
        block = ", ".join(f"{k} {v}" for k, v in defaults["rerank"].items())
        settings += f"; best of K draws its candidates at {block}"
    if facts.get("init_from") and "sampling_selection" not in facts:
        settings += f" (kept from {facts['init_from']}: not re-chosen for these weights)"
    return f"""---
name: {name}
summary: "early-fusion transformer ({mode} images), shapes world: text to image, captions, answers, stories"
{front}
---
# {name}

An early-fusion transformer of the shapes world (Llama-family decoder, {facts["parameters_m"]} M
parameters) over one sequence of text and images: {what}. {origin} by
`{facts["recipe"]}` (seed {facts["seed"]}, {facts["steps"]} steps of {facts["batch"]},
{facts["train_time_s"]:.0f} s on {facts["device"]}) on the document mix {facts["mix"]}.
Sampling defaults: {settings}.

```python
from anygen.pipelines import load_generator
gen = load_generator("{name}")
gen.generate("a red circle above a blue square").images[0]
gen.caption([image]); gen.answer([image], ["what colour is the circle"])
```
{selection}{tables}"""
