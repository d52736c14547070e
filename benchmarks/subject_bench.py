"""DreamBench-style table of the subject recipes on held-out shapes-world subjects.

For K subjects of shapes-eval's subject suite (the samples ``run_subject`` scores, held-out
identities only by default: a pattern and primary colour never seen together in
training), this script

1. writes the subject's 3-5 reference images to OUT/subjects/NN/refs,
2. fine-tunes the base model on them twice, with ``recipes/dreambooth_lora.py`` and with
   ``recipes/textual_inversion.py`` (identifier ``sks``, class word the subject's shape;
   ``--finetune`` picks which),
3. draws P prompts of the subject grammar (the suite's own prompt first) with the base
   model as it is (the reference row: it has never seen the subject), with the LoRA, with
   the embedding, and with each ``--in-context`` model (default: the bundled shapes-emu),
   which takes the reference images in its sequence and fine-tunes nothing (Emu2-Gen
   style), same seeds throughout,
4. judges each image with ``score_subject`` (subject fidelity: the subject's shape, both
   colours and its pattern; prompt fidelity: the rest of the prompt) and, given
   ``--clip``/``--dino`` checkpoints, CLIP-I, CLIP-T and DINO (``anygen.eval.similarity``),

and prints one row per recipe: the fidelities, the embedding similarities, fine-tuning
seconds per subject on this machine and the size of what a subject costs to keep (LoRA
or embedding file, KB; 0 for the in-context rows, which keep only the references).
Everything lands in OUT/results.json; the fine-tuned files stay in
OUT/subjects/NN/{dreambooth,textual-inversion}.

    python benchmarks/subject_bench.py --output-dir runs/subject-bench            # K=3
    python benchmarks/subject_bench.py --output-dir runs/subject-bench --k 5 \\
        --clip openai/clip-vit-base-patch32 --dino facebook/dino-vits16
    python benchmarks/subject_bench.py --output-dir runs/subject-bench \\
        --in-context shapes-emu shapes-fusion                  # both fusion models in context
    python benchmarks/subject_bench.py --output-dir runs/sb-in-context --finetune  # no fine-tuning
    python benchmarks/subject_bench.py --output-dir /tmp/sb --model TINY_DIR --k 1 \\
        --steps 2 --prompts 1 --num-class-images 2 --in-context                   # smoke

shapes-ldm is a weak base (its shapes-eval t2i figure is on its card), so absolute figures
are low; the table is for comparing recipes on the same base, not for absolute quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from anygen.data import shapes
from anygen.data.render import render_image
from anygen.errors import UserInputError
from anygen.eval.judge import score_subject
from anygen.eval.similarity import without_identifier
from anygen.pipelines import Options, load_generator
from anygen.training import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOKEN = "sks"
ROWS = ("base (no fine-tuning)", "DreamBooth-LoRA", "textual inversion")
IN_CONTEXT = "in context: "  # then the model's name: one row per --in-context model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--model", default="shapes-ldm", help="base ldm model")
    p.add_argument("--k", type=int, default=3, help="subjects")
    p.add_argument("--prompts", type=int, default=4, help="prompts per subject")
    p.add_argument("--seed", type=int, default=0, help="the subject suite's seed")
    p.add_argument(
        "--any-subject",
        action="store_true",
        help="take the suite's first K subjects, held out or not",
    )
    # the recipes' own defaults unless set here
    p.add_argument("--steps", type=int, help="fine-tuning steps of both recipes")
    p.add_argument("--db-steps", type=int, help="DreamBooth-LoRA's steps (over --steps)")
    p.add_argument("--ti-steps", type=int, help="textual inversion's steps (over --steps)")
    p.add_argument("--db-lr", type=float, help="DreamBooth-LoRA's learning rate")
    p.add_argument("--ti-lr", type=float, help="textual inversion's learning rate")
    p.add_argument("--rank", type=int, help="DreamBooth-LoRA's rank")
    p.add_argument("--num-class-images", type=int)
    p.add_argument("--prior-weight", type=float)
    p.add_argument("--clip", help="CLIP checkpoint (directory or cached hub id) for CLIP-I/T")
    p.add_argument("--dino", help="DINO checkpoint (Dinov2Model or ViTModel) for DINO")
    p.add_argument(
        "--finetune",
        nargs="*",
        choices=("dreambooth", "inversion"),
        default=["dreambooth", "inversion"],
        help="the fine-tuning recipes to run (default: both; none when given no names: the "
        "base and in-context rows only)",
    )
    p.add_argument(
        "--in-context",
        nargs="*",
        default=["shapes-emu"],
        metavar="MODEL",
        help="models that take the references in context, one row each (default: shapes-emu; "
        "none when given no names)",
    )
    args = p.parse_args(argv)
    steps = (args.steps, args.db_steps, args.ti_steps)
    if args.k < 1 or args.prompts < 1 or any(n is not None and n < 1 for n in steps):
        p.error("--k, --prompts and the steps must be >= 1")
    return args


def given(**flags) -> list[str]:
    """``--flag value`` for each flag set (not None): the others keep the recipe's default."""
    out = []
    for name, value in flags.items():
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def pick_subjects(k: int, seed: int, held_out_only: bool) -> list[tuple[int, object]]:
    """(suite index, SubjectSample) of the subject suite's samples, in order."""
    picked, i = [], 0
    while len(picked) < k:
        sample = shapes.subject_sample(shapes.sample_rng(seed, "eval-subject", i), "test")
        if sample.subject.held_out or not held_out_only:
            picked.append((i, sample))
        i += 1
        if i > 10_000:
            raise RuntimeError("no held-out subjects found in 10,000 samples")
    return picked


def subject_prompts(sample, n: int, seed: int, index: int) -> list[str]:
    """The suite's prompt and n - 1 more of the subject grammar for the same subject."""
    prompts = [sample.prompt]
    j = 0
    while len(prompts) < n:
        rng = shapes.sample_rng(seed, f"subject-bench/{index}", j)
        prompt, _ = shapes.sample_subject_prompt(rng, sample.subject, "test")
        if prompt not in prompts:
            prompts.append(prompt)
        j += 1
    return prompts


def load_in_context(names: list[str]) -> dict:
    """{row name: generator} for the models that take subject references in context."""
    generators = {}
    for name in names:
        gen = load_generator(name, dtype="fp32")
        if not hasattr(gen, "generate_subject"):
            raise UserInputError(
                f"--in-context {name}: this model cannot take subject reference images in its "
                "sequence (no generate_subject); fusion models such as shapes-emu can"
            )
        generators[IN_CONTEXT + name] = gen
    return generators


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    in_context = load_in_context(args.in_context)  # refused before any fine-tuning
    out = args.output_dir
    dreambooth = load_recipe(RECIPES / "dreambooth_lora.py")
    inversion = load_recipe(RECIPES / "textual_inversion.py")
    clip = dino = None
    if args.clip:
        from anygen.eval.similarity import ClipSimilarity

        clip = ClipSimilarity(args.clip)
    if args.dino:
        from anygen.eval.similarity import DinoSimilarity

        dino = DinoSimilarity(args.dino)
    size = load_generator(args.model, dtype="fp32").default_size

    db_steps = args.db_steps if args.db_steps is not None else args.steps
    ti_steps = args.ti_steps if args.ti_steps is not None else args.steps
    records, finetunes = [], []
    for n, (index, sample) in enumerate(pick_subjects(args.k, args.seed, not args.any_subject)):
        folder = out / "subjects" / f"{n:02d}"
        refs_dir = folder / "refs"
        refs_dir.mkdir(parents=True, exist_ok=True)
        references = [render_image(s, size) for s in sample.references]
        for j, image in enumerate(references):
            image.save(refs_dir / f"{j}.png")
        cls = sample.subject.shape
        common = ["--subject-dir", str(refs_dir), "--token", TOKEN, "--class-word", cls]
        common += ["--model", args.model, "--seed", str(args.seed)]
        print(f"subject {n}: {sample.subject.to_dict()} ({len(references)} references)", flush=True)
        generators = {ROWS[0]: load_generator(args.model, dtype="fp32")}
        costs = {ROWS[0]: (0.0, 0.0)}
        facts = {"subject": n}
        if "dreambooth" in args.finetune:
            db_dir = folder / "dreambooth"
            db_facts = dreambooth.finetune(
                dreambooth.parse_args(
                    [
                        *common,
                        "--output-dir", str(db_dir),
                        "--class-dir", str(out / "class-images" / cls),
                        *given(steps=db_steps, lr=args.db_lr, rank=args.rank,
                               prior_weight=args.prior_weight, num_class_images=args.num_class_images),
                    ]
                )
            )  # fmt: skip
            facts["dreambooth"] = db_facts
            generators[ROWS[1]] = load_generator(args.model, dtype="fp32", loras=[str(db_dir)])
            costs[ROWS[1]] = (db_facts["train_s"], db_facts["lora_kb"])
        if "inversion" in args.finetune:
            ti_dir = folder / "textual-inversion"
            ti_facts = inversion.finetune(
                inversion.parse_args(
                    [*common, "--output-dir", str(ti_dir), *given(steps=ti_steps, lr=args.ti_lr)]
                )
            )
            facts["textual_inversion"] = ti_facts
            generators[ROWS[2]] = load_generator(args.model, dtype="fp32", embeddings=[str(ti_dir)])
            costs[ROWS[2]] = (ti_facts["train_s"], ti_facts["embedding_kb"])
        finetunes.append(facts)
        for row, gen in in_context.items():
            generators[row] = gen
            costs[row] = (0.0, 0.0)
        prompts = subject_prompts(sample, args.prompts, args.seed, index)
        for recipe, gen in generators.items():
            images = []
            shown = references
            if recipe in in_context and gen.default_size != size:
                shown = [render_image(s, gen.default_size) for s in sample.references]
            for j, prompt in enumerate(prompts):
                options = Options(seed=args.seed + j, progress=False)
                if recipe in in_context:
                    image = gen.generate_subject(shown, prompt, options).images[0]
                else:
                    image = gen.generate(prompt, options).images[0]
                image.save(folder / f"{file_stem(recipe)}-{j}.png")
                images.append(image)
                verdict = score_subject(image, prompt, sample.subject)
                row = {
                    "recipe": recipe,
                    "subject": n,
                    "suite_index": index,
                    "identity": sample.subject.to_dict(),
                    "prompt": prompt,
                    "seed": args.seed + j,
                    "subject_ok": verdict.subject_ok,
                    "prompt_ok": verdict.prompt_ok,
                    "ok": verdict.ok,
                    "finetune_s": costs[recipe][0],
                    "file_kb": costs[recipe][1],
                }
                if clip is not None:
                    row["clip_i"] = clip.image_similarity([image], shown)
                    row["clip_t"] = clip.text_similarity(
                        [image], [without_identifier(prompt, TOKEN)]
                    )
                if dino is not None:
                    row["dino"] = dino.image_similarity([image], shown)
                records.append(row)
        del generators

    table = summarize(records)
    print()
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "records": records,
                    "finetune": finetunes, "table": table, "time": time.time()}, indent=2) + "\n"
    )  # fmt: skip
    print(f"\nwrote {out / 'results.json'}")
    return 0


def file_stem(recipe: str) -> str:
    """``base``, ``dreambooth-lora``, ``textual``, ``in-context-shapes-emu``: image names."""
    if recipe.startswith(IN_CONTEXT):
        return "in-context-" + Path(recipe.removeprefix(IN_CONTEXT)).name
    return recipe.split()[0].lower()


def summarize(records: list[dict]) -> str:
    """One row per recipe, in the order drawn: means over every (subject, prompt) image;
    costs per subject."""
    columns = ["subject fid.", "prompt fid.", "both"]
    extra = [c for c in ("clip_i", "clip_t", "dino") if any(c in r for r in records)]
    names = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO"}
    width = max([24, *(len(r["recipe"]) + 2 for r in records)])
    header = f"{'recipe':<{width}}" + "".join(
        f"{c:>14}" for c in columns + [names[c] for c in extra]
    )
    header += f"{'finetune s':>12}{'file KB':>10}{'images':>8}"
    lines = [header, "-" * len(header)]
    for recipe in dict.fromkeys(r["recipe"] for r in records):
        rows = [r for r in records if r["recipe"] == recipe]
        values = [
            statistics.mean(float(r[k]) for r in rows) for k in ("subject_ok", "prompt_ok", "ok")
        ]
        values += [statistics.mean(r[c] for r in rows) for c in extra]
        per_subject = {r["subject"]: (r["finetune_s"], r["file_kb"]) for r in rows}
        seconds = statistics.mean(s for s, _ in per_subject.values())
        kb = statistics.mean(k for _, k in per_subject.values())
        lines.append(
            f"{recipe:<{width}}" + "".join(f"{v:>14.3f}" for v in values)
            + f"{seconds:>12.1f}{kb:>10.1f}{len(rows):>8d}"
        )  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
