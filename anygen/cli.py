"""The ``anygen`` command line.

Each subcommand imports what it needs when it runs, so ``anygen --help`` and a bad
argument answer at once. Errors meant for the user (``AnygenError``) are one line on
stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from anygen import __version__
from anygen.errors import AnygenError, UserInputError

log = logging.getLogger("anygen")

TASKS = ("t2i", "story", "edit", "subject", "vqa")
SUITES = ("t2i", "caption", "story", "edit", "subject", "reconstruction")


# ---------------------------------------------------------------------------- commands


def cmd_data(args: argparse.Namespace) -> int:
    from anygen.data.export import write_shapes

    out = write_shapes(
        args.task,
        n=args.n,
        seed=args.seed,
        output_dir=args.output_dir,
        size=args.size,
        split=args.split,
        overwrite=args.overwrite,
        require_held_out=args.held_out,
    )
    print(f"wrote {args.n} {args.task} samples to {out} (metadata in {out / 'metadata.jsonl'})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from anygen.eval.suites import score_folder
    from anygen.output import check_writable, write_text_atomic

    given = [f"--{f.replace('_', '-')}" for f in SAMPLING_FLAGS if getattr(args, f) is not None]
    # the story and caption suites rank by the model itself (no --reranker, no --rerank-by)
    ranking = args.rerank is not None and args.images is None
    self_rerank = ranking and args.suite in SELF_RANKED
    if args.rerank is not None and not self_rerank and not (ranking and args.suite == "t2i"):
        what = "--images" if args.images is not None else f"the {args.suite} suite"
        raise UserInputError(
            f"--rerank applies to the t2i, story and caption suites, not to {what}"
        )
    if self_rerank:
        _self_rerank_only(args, SELF_RANKED[args.suite])
    editing = [f"--{f.replace('_', '-')}" for f in EDIT_FLAGS if getattr(args, f) is not None]
    if editing and (args.images is not None or args.suite != "edit"):
        what = "--images" if args.images is not None else f"the {args.suite} suite"
        raise UserInputError(f"{', '.join(editing)} applies to the edit suite, not to {what}")
    if given and (args.images is not None or args.suite == "reconstruction"):
        what = "--images" if args.images is not None else "the reconstruction suite"
        raise UserInputError(f"{', '.join(given)} cannot apply to {what}: nothing is sampled")
    if args.output is not None:  # fail now, not after the whole evaluation
        check_writable(args.output, overwrite=args.overwrite)
    if args.images is not None:
        report = score_folder(args.images)
    else:
        from anygen.eval.run import evaluate_model
        from anygen.pipelines import Options

        options = Options(
            **_sampling_options(args),
            strength=args.strength,
            image_guidance_scale=args.image_guidance,
        ).validate()
        report = evaluate_model(
            args.model,
            args.suite,
            n=args.n,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            options=options,
            wrap=None if self_rerank else (lambda generator: _reranked(generator, args)),
            candidates=args.rerank if self_rerank else 1,
        )
    print(report.table())
    if args.output is not None:
        write_text_atomic(args.output, report.to_json() + "\n")
        print(f"wrote {args.output}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from anygen.catalog import REAL_MODELS
    from anygen.hub import bundled_models, card_metadata
    from anygen.userconfig import COMMANDS, default_model

    rows = []
    for kind in ("model", "tokenizer"):
        for name, path in sorted(bundled_models(kind).items()):
            meta = card_metadata(path)
            rows.append(
                {"name": name, "kind": kind, "source": "bundled", "path": str(path), **meta}
            )
    for name, entry in REAL_MODELS.items():
        rows.append({"name": name, "kind": "model", "source": "hub", **entry.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    tasks = COMMANDS
    default_for: dict[str, list[str]] = {}
    for task in tasks:
        default_for.setdefault(default_model(task), []).append(task)

    def mark(name: str) -> str:
        used = default_for.get(name)
        if not used:
            return ""
        return " (default)" if len(used) == len(tasks) else f" (default: {', '.join(used)})"

    width = max(len(r["name"]) for r in rows)
    print("bundled (offline):")
    for r in rows:
        if r["source"] != "bundled":
            continue
        summary = r.get("summary") or r.get("pipeline_tag") or ""
        print(f"  {r['name']:<{width}}  {r['kind']:<9}  {summary}{mark(r['name'])}".rstrip())
    print("hub (downloaded on first use; check each licence):")
    for r in rows:
        if r["source"] != "hub":
            continue
        gated = ", gated" if r["gated"] else ""
        print(
            f"  {r['name']:<{width}}  {r['hub_id']}  [{r['family']}: {', '.join(r['tasks'])}]  "
            f"{r['licence']}{gated}  ~{r['memory_gb']:g} GB{mark(r['name'])}"
        )
        if r.get("note"):
            print(f"  {'':<{width}}  {r['note']}")
    listed = {r["name"] for r in rows}
    others = [name for name in default_for if name not in listed]
    if others:
        print("your defaults (paths or hub ids):")
        for name in others:
            print(f"  {name}{mark(name)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from anygen.training import run_recipe

    run_recipe(args.recipe, list(args.recipe_args))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from anygen.output import check_writable, save_png, write_text_atomic
    from anygen.pipelines import Options

    if args.prompts is None and args.prompt is None:
        raise UserInputError("give a PROMPT, or --prompts FILE with one prompt a line")
    if args.prompts is not None and args.prompt is not None:
        raise UserInputError("give either a PROMPT or --prompts FILE, not both")
    if args.prompts is not None:
        if args.output_dir is None:
            raise UserInputError("--prompts needs --output-dir DIR")
        jobs = _read_prompts(args.prompts)
    else:
        if not args.prompt.strip():
            raise UserInputError("the prompt is empty")
        jobs = [(0, args.prompt)]
    seed = args.seed if args.seed is not None else _fresh_seed()
    options = Options(
        seed=seed,
        num_images=args.n,
        negative_prompt=args.negative,
        width=args.width,
        height=args.height,
        progress=not args.json,
        **_sampling_options(args),
    ).validate()

    # Plan every file first, so that a bad path fails before minutes of generation.
    plan = []  # (file, prompt, seed)
    for line, prompt in jobs:
        for i in range(args.n):
            image_seed = seed + line * args.n + i
            if args.prompts is not None:
                suffix = f"-{i}" if args.n > 1 else ""
                file = args.output_dir / f"{line + 1:04d}{suffix}.png"
            else:
                file = _single_output(args.output, prompt, image_seed, i, args.n)
            plan.append((file, prompt, image_seed))
    if args.prompts is not None:
        check_writable(args.output_dir / "index.jsonl", overwrite=args.overwrite, make_parent=True)
    for file, _, _ in plan:
        check_writable(file, overwrite=args.overwrite, make_parent=args.prompts is not None)

    references = _open_images(args.subject) if args.subject else None
    if references and args.rerank is not None:
        raise UserInputError("--rerank draws from a text prompt; it cannot take --subject")
    generator = _reranked(_load(args), args)
    print(f"anygen: model {generator.name}", file=sys.stderr)
    if references:
        _require(generator, "generate_subject", "take subject reference images (--subject)")
    unknown = generator.unknown_words(" ".join(p for _, p in jobs))
    if unknown:
        log.warning(
            "the model %s has never seen: %s. It knows: %s",
            generator.name,
            ", ".join(unknown),
            " ".join(sorted(generator.known_words or ())),
        )

    records = []
    batch = max(1, args.batch_size)
    for start in range(0, len(plan), batch):
        chunk = plan[start : start + batch]
        if references:  # in-context subject: one image per call
            outs = [
                generator.generate_subject(references, p, dataclasses.replace(options, seed=s))
                for _, p, s in chunk
            ]
            out = dataclasses.replace(outs[0], segments=[o.images[0] for o in outs])
        else:
            out = generator.generate_batch(
                [p for _, p, _ in chunk], [s for _, _, s in chunk], options
            )
        per_image = ("seeds", "rerank", "rerank_scores")
        settings = {k: v for k, v in out.settings.items() if k not in per_image}
        for i, ((file, prompt, image_seed), image) in enumerate(
            zip(chunk, out.images, strict=True)
        ):
            record = {
                "file": str(file),
                "prompt": prompt,
                "seed": image_seed,
                "model": generator.name,
                **{k: v for k, v in settings.items() if v is not None},
            }
            if "rerank" in out.settings:  # the candidate kept: its own seed and score
                record["rerank"] = {
                    **out.settings["rerank"],
                    "seed": out.settings["seeds"][i],
                    "score": out.settings["rerank_scores"][i],
                }
            save_png(image, file, metadata=record, overwrite=args.overwrite)
            records.append(record)
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                print(f"wrote {file} (seed {image_seed})")
    if args.prompts is not None:
        index = "".join(
            json.dumps({"prompt": r["prompt"], "seed": r["seed"], "file": Path(r["file"]).name})
            + "\n"
            for r in records
        )
        write_text_atomic(args.output_dir / "index.jsonl", index)
    return 0


def _fresh_seed() -> int:
    from anygen.pipelines.base import resolve_seed

    return resolve_seed(None)


def _read_prompts(path: Path) -> list[tuple[int, str]]:
    """(line number from 0, prompt) for each non-blank line."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UserInputError(f"cannot read prompts file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserInputError(f"prompts file {path} is not UTF-8 text") from None
    jobs = [(i, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not jobs:
        raise UserInputError(f"prompts file {path} has no prompts")
    return jobs


def _single_output(output: Path | None, prompt: str, seed: int, index: int, n: int) -> Path:
    if output is None:
        slug = "".join(c for c in "-".join(prompt.lower().split())[:48] if c.isalnum() or c == "-")
        slug = "-".join(part for part in slug.split("-") if part) or "image"
        return Path(f"{slug}-{seed}.png")
    if output.suffix.lower() != ".png":
        raise UserInputError(f"output {output} must be a .png file")
    return output if n == 1 else output.with_name(f"{output.stem}-{index}{output.suffix}")


def _load(args: argparse.Namespace, task: str = "generate"):
    """The generator a command asked for (``--model``, else the user's default model, else
    the bundled model for ``task``), with the runtime flags it has."""
    from anygen.pipelines import load_generator
    from anygen.userconfig import default_model

    return load_generator(
        args.model or default_model(task),
        device=args.device,
        dtype=args.dtype,
        loras=getattr(args, "lora", None) or (),
        embeddings=getattr(args, "embedding", None) or (),
        offload=getattr(args, "offload", False),
        vae_tiling=getattr(args, "vae_tiling", False),
        vae_slicing=getattr(args, "vae_slicing", False),
        attention=getattr(args, "attention", None),
    )


def _require(generator, method: str, what: str) -> None:
    if not callable(getattr(generator, method, None)):
        raise UserInputError(
            f"model {generator.name!r} cannot {what}; see `anygen models` for models that can"
        )


def _open_images(paths: Sequence[str]) -> list:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except FileNotFoundError:
            raise UserInputError(f"no such image: {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise UserInputError(f"cannot read image {path}: {e}") from None
    return images


def cmd_caption(args: argparse.Namespace) -> int:
    from anygen.pipelines import Options

    images = _open_images(args.images)
    generator = _load(args, task="caption")
    print(f"anygen: model {generator.name}", file=sys.stderr)
    _require(generator, "caption", "caption images")
    seed = args.seed if args.seed is not None else _fresh_seed()  # recorded: sampling uses it
    options = Options(
        seed=seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        progress=False,
    ).validate()
    if args.rerank is None:
        ranked = [(caption, None, None) for caption in generator.caption(images, options)]
    else:
        _require(generator, "best_captions", "rank its captions (--rerank)")
        ranked = generator.best_captions(images, args.rerank, options)
    for path, (caption, kept, score) in zip(args.images, ranked, strict=True):
        if args.json:
            record = {"image": path, "caption": caption, "model": generator.name, "seed": seed}
            if args.rerank is not None:
                record["rerank"] = {"candidates": args.rerank, "kept": kept, "score": score}
            print(json.dumps(record))
        else:
            print(f"{path}\t{caption}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from anygen.pipelines import Options

    images = _open_images([args.image])
    generator = _load(args, task="ask")
    print(f"anygen: model {generator.name}", file=sys.stderr)
    _require(generator, "answer", "answer questions about images")
    seed = args.seed if args.seed is not None else _fresh_seed()  # recorded: sampling uses it
    options = Options(
        seed=seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        progress=False,
    ).validate()
    (answer,) = generator.answer(images, [args.question], options)
    if args.json:
        record = {"image": args.image, "question": args.question, "answer": answer}
        print(json.dumps({**record, "model": generator.name, "seed": seed}))
    else:
        print(answer)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from anygen.output import check_writable, save_png
    from anygen.pipelines import Options

    if args.output.suffix.lower() != ".png":
        raise UserInputError(f"output {args.output} must be a .png file")
    check_writable(args.output, overwrite=args.overwrite)
    (image,) = _open_images([args.image])
    seed = args.seed if args.seed is not None else _fresh_seed()
    options = Options(
        seed=seed,
        guidance_scale=args.guidance,
        image_guidance_scale=args.image_guidance,
        negative_prompt=args.negative,
        steps=args.steps,
        strength=args.strength,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        progress=not args.json,
    ).validate()
    generator = _load(args, task="edit")
    print(f"anygen: model {generator.name}", file=sys.stderr)
    _require(generator, "edit", "edit images")
    out = generator.edit(image, args.instruction, options)
    settings = {k: v for k, v in out.settings.items() if k != "seeds" and v is not None}
    record = {
        "file": str(args.output),
        "source": str(args.image),
        "prompt": args.instruction,
        "seed": out.seed,
        "model": generator.name,
        **settings,
    }
    save_png(out.images[0], args.output, metadata=record, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"wrote {args.output} (seed {out.seed})")
    return 0


def cmd_story(args: argparse.Namespace) -> int:
    from anygen.output import check_story_dir, picture_name, save_png, save_story
    from anygen.pipelines import Options, load_generator
    from anygen.pipelines.story import MAX_SCENES, Story, story_settings, stream_story
    from anygen.userconfig import default_model

    if not args.prompt.strip():
        raise UserInputError("the prompt is empty")
    if not 1 <= args.scenes <= MAX_SCENES:  # before minutes of loading
        raise UserInputError(
            f"scenes must be a whole number from 1 to {MAX_SCENES}, got {args.scenes}"
        )
    folder = check_story_dir(args.output_dir, overwrite=args.overwrite)
    seed = args.seed if args.seed is not None else _fresh_seed()
    options = Options(
        seed=seed,
        guidance_scale=args.guidance,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        progress=False,
    ).validate()
    settings = story_settings(options)
    generator = load_generator(args.model or default_model("story"), device=args.device)
    print(f"anygen: model {generator.name}, seed {seed}", file=sys.stderr)
    segments: list = [args.prompt]
    files: list[str] = []
    seeds: list[int] = []
    times: list[float] = []
    print(args.prompt, flush=True)
    opening: dict = {}
    for segment in stream_story(
        generator,
        args.prompt,
        args.scenes,
        options,
        seed=seed,
        candidates=args.rerank or 1,
        seeds_out=seeds,
        times_out=times,
        opening_out=opening,
    ):
        segments.append(segment)
        if isinstance(segment, str):
            print(segment, flush=True)
            continue
        file = picture_name(len(files) + 1)
        record = {  # the story's seed: story.json gives each scene's own
            "prompt": args.prompt,
            "seed": seed,
            "scene": len(files) + 1,
            "model": generator.name,
            **settings,
        }
        save_png(segment, folder / file, metadata=record, overwrite=args.overwrite)
        files.append(file)
        print(f"  [picture {len(files)}: {folder / file}]", flush=True)
    story = Story(segments, 1, seeds, generator.name, seed, times, opening or None, settings)
    save_story(story, folder, files=files, overwrite=args.overwrite)
    print(f"wrote {folder / 'story.html'}, story.md and story.json", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _model_help(builtin: str) -> str:
    return (
        "bundled name, catalogue name (anygen models), directory or hub id (default: "
        f"$ANYGEN_MODEL, else the command's [models] entry or model in "
        f"$XDG_CONFIG_HOME/anygen/config.toml (~/.config), else {builtin})"
    )


MODEL_HELP = _model_help("shapes-ldm")
READER_HELP = _model_help("shapes-fusion")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """How images are sampled (default: the model's own settings)."""
    p.add_argument(
        "--steps", type=int, help="denoising steps (diffusion models; shapes-emu's diffusion head)"
    )
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument(
        "--scheduler",
        help="diffusion sampler (ldm): dpm++, ddim, euler, euler-a, heun, unipc, pndm, ddpm "
        "(heun and pndm cannot sample zero-terminal-SNR models such as shapes-ldm)",
    )
    tokens = "token models: parti, fusion, Janus, Emu3"
    p.add_argument(
        "--temperature", type=float, help=f"token sampling temperature ({tokens}; 0: greedy)"
    )
    p.add_argument(
        "--top-k", type=int, help=f"sample among the k likeliest tokens ({tokens}; 0: off)"
    )
    p.add_argument("--top-p", type=float, help=f"nucleus sampling mass ({tokens}; 1: off)")


SAMPLING_FLAGS = ("steps", "guidance", "scheduler", "temperature", "top_k", "top_p")
EDIT_FLAGS = ("image_guidance", "strength")  # anygen eval: the edit suite's settings


def _add_rerank_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rerank",
        type=_positive_int,
        metavar="K",
        help="draw K candidates per image and keep the one the reranker scores best",
    )
    p.add_argument(
        "--reranker",
        metavar="MODEL",
        help="the fusion model that scores candidates (default: the model itself, if it can)",
    )
    p.add_argument(
        "--rerank-by",
        choices=("caption", "pmi"),
        help="caption (default): log p(prompt | image); pmi: log p(image | prompt) - log p(image)",
    )


# what --rerank ranks outside text to image, and by what: the model itself, no other scorer
SELF_RANKED = {
    "story": "a story's opening picture is ranked by the story model itself, by its "
    "caption likelihood",
    "caption": "captions are ranked by the captioning model itself, by the likelihood of "
    "the image's codes after each",
}


def _self_rerank_only(args: argparse.Namespace, how: str) -> None:
    """--reranker and --rerank-by choose a text-to-image scorer; elsewhere they are refused."""
    for flag, value in (("--reranker", args.reranker), ("--rerank-by", args.rerank_by)):
        if value is not None:
            raise UserInputError(f"{flag} applies to text-to-image reranking; {how}")


def _reranked(generator, args: argparse.Namespace):
    """The generator, reranked when --rerank asks; --reranker or --rerank-by alone refused."""
    if args.rerank is None:
        if args.reranker is not None or args.rerank_by is not None:
            given = "--reranker" if args.reranker is not None else "--rerank-by"
            raise UserInputError(f"{given} needs --rerank K, the candidates per image")
        return generator
    from anygen.pipelines.rerank import rerank

    return rerank(
        generator, args.rerank, args.reranker, by=args.rerank_by or "caption", device=args.device
    )


def _sampling_options(args: argparse.Namespace) -> dict:
    """The ``Options`` fields that ``_add_sampling_flags`` fills."""
    return {
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }


DEVICE_HELP = (
    "cpu, cuda, cuda:1, ... (default: $ANYGEN_DEVICE, else the config file's device, else cuda "
    "if available)"
)


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument(
        "--dtype",
        help="fp32, fp16 or bf16 (default: $ANYGEN_DTYPE, else the config file's dtype, else "
        "fp32 on CPU, fp16 on CUDA)",
    )


def _add_attention_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--attention",
        choices=("auto", "sdpa", "xformers", "math"),
        help="attention backend (default auto: xformers on CUDA where installed and working, "
        "else sdpa; xformers needs CUDA and the gpu extra)",
    )


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="a diffusers LoRA (.safetensors file, folder, hub id, or org/name/FILE.safetensors) "
        "with its scale (default 1); repeat to combine",
    )
    p.add_argument(
        "--embedding",
        action="append",
        metavar="PATH",
        help="textual-inversion embeddings (learned_embeds.safetensors, or its folder) in "
        "diffusers' format; repeat for several",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="keep weights on the CPU, each model on the accelerator only while it runs",
    )
    p.add_argument("--vae-tiling", action="store_true", help="decode large images in tiles")
    p.add_argument("--vae-slicing", action="store_true", help="decode a batch image by image")
    _add_attention_flag(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anygen",
        description="Generate between text and images, and interleave them.",
    )
    parser.add_argument("--version", action="version", version=f"anygen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "generate",
        help="text to image",
        description="Generate images from a text prompt (or one prompt a line from a file).",
    )
    p.add_argument(
        "prompt", nargs="?", help="what to draw, e.g. 'a red circle above a blue square'"
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--seed", type=int, help="random seed (default: a fresh one, recorded)")
    _add_sampling_flags(p)
    _add_rerank_flags(p)
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("-n", type=_positive_int, default=1, help="images per prompt")
    _add_device_flags(p)
    _add_runtime_flags(p)
    p.add_argument("-o", "--output", type=Path, help="output .png (default: from the prompt)")
    p.add_argument("--prompts", type=Path, help="a file with one prompt a line")
    p.add_argument("--output-dir", type=Path, help="folder for --prompts outputs")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument(
        "--subject",
        action="append",
        metavar="REF.png",
        help="a reference picture of the subject the prompt names (repeat for several; "
        "in-context subject-driven models such as shapes-emu)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "caption",
        help="image to text",
        description="Describe images with a model that reads them (Janus, Chameleon, any "
        "image-text-to-text model such as smolvlm).",
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", help=READER_HELP)
    p.add_argument("--seed", type=int, help="seed for sampling (with --temperature > 0)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="text budget per caption")
    p.add_argument("--temperature", type=float, help="0 (default): greedy; > 0: sample")
    p.add_argument(
        "--rerank",
        type=_positive_int,
        metavar="K",
        help="the plain caption and K-1 sampled ones (at --temperature, or the model's "
        "candidate temperature); keep the one after which the image is likeliest",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    _add_device_flags(p)
    _add_attention_flag(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser(
        "ask",
        help="answer a question about an image",
        description="Answer a question about an image with a model that reads images.",
    )
    p.add_argument("image", help="image file")
    p.add_argument("question", help="e.g. 'how many circles are there?'")
    p.add_argument("--model", help=READER_HELP)
    p.add_argument("--seed", type=int, help="seed for sampling (with --temperature > 0)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="text budget for the answer")
    p.add_argument("--temperature", type=float, help="0 (default): greedy; > 0: sample")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _add_device_flags(p)
    _add_attention_flag(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser(
        "story",
        help="an interleaved story of text and pictures",
        description="Tell a story in scenes, each a text and its picture, starting from PROMPT "
        "(scene 1's text). Writes story.json, story.md and story.html (self-contained) and "
        "the pictures into --output-dir, and prints each text as it arrives.",
    )
    p.add_argument("prompt", help="the first scene, e.g. 'a small red circle in the center'")
    p.add_argument("--scenes", type=_positive_int, default=3, help="scenes to write (default 3)")
    p.add_argument("--model", help="a fusion model; " + READER_HELP)
    p.add_argument("--seed", type=int, help="random seed (default: a fresh one, recorded)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance of the pictures")
    p.add_argument("--temperature", type=float, help="sampling temperature (text and codes)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="longest text of a scene")
    p.add_argument(
        "--rerank",
        type=_positive_int,
        metavar="K",
        help="draw K candidates for the opening picture and keep the one the model's caption "
        "scores best (later pictures follow events and are drawn once)",
    )
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--output-dir", type=Path, required=True, help="folder for the story")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=cmd_story)

    p = sub.add_parser(
        "edit",
        help="edit an image by an instruction",
        description="Edit an image: an InstructPix2Pix model (the default, shapes-edit) or "
        "a fusion model follows the instruction ('make the red circle blue'); a "
        "text-to-image diffusion model redraws the image towards it as a prompt (img2img, "
        "--strength).",
    )
    p.add_argument("image", help="image file to edit")
    p.add_argument("instruction", help="the instruction, or the prompt for img2img")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .png")
    p.add_argument("--model", help=_model_help("shapes-edit"))
    p.add_argument("--seed", type=int, help="random seed (default: a fresh one, recorded)")
    p.add_argument("--guidance", type=float, help="text guidance scale")
    p.add_argument(
        "--image-guidance", type=float, help="pull towards the input image (InstructPix2Pix)"
    )
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--strength", type=float, help="share of the image redrawn, (0, 1] (img2img)")
    p.add_argument("--width", type=int, help="resize the input to this width first")
    p.add_argument("--height", type=int, help="resize the input to this height first")
    p.add_argument("--scheduler", help="diffusion sampler (see anygen generate --help)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _add_device_flags(p)
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser(
        "train",
        help="run a training recipe",
        description="Run a training recipe file; arguments after RECIPE go to the recipe "
        "(try `anygen train RECIPE.py --help`).",
    )
    p.add_argument("recipe", help="path to a recipe .py file (see recipes/)")
    p.add_argument("recipe_args", nargs=argparse.REMAINDER, help="arguments for the recipe")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="score a model or a folder of images with shapes-eval",
        description="Score a model on a shapes-eval suite, or score a folder of images "
        "written by `anygen data shapes` or `anygen generate --prompts`.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model name, directory or hub id")
    what.add_argument("--images", type=Path, help="folder with metadata.jsonl or index.jsonl")
    p.add_argument("--suite", choices=SUITES, default="t2i")
    p.add_argument("--n", type=_positive_int, default=100, help="number of prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    _add_sampling_flags(p)
    p.add_argument(
        "--image-guidance",
        type=float,
        help="pull towards the source image (edit suite, InstructPix2Pix models)",
    )
    p.add_argument(
        "--strength",
        type=float,
        help="share of the image redrawn, (0, 1] (edit suite, img2img by a text-to-image model)",
    )
    _add_rerank_flags(p)
    p.add_argument("-o", "--output", type=Path, help="write the report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="write shapes-world samples to a folder")
    data_sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    s = data_sub.add_parser("shapes", help="the shapes world (PNGs + metadata.jsonl)")
    s.add_argument("--task", choices=TASKS, default="t2i")
    s.add_argument("--n", type=_positive_int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=_positive_int, default=64, help="canvas side in pixels")
    s.add_argument("--split", choices=("train", "test"), default="test")
    s.add_argument("--output-dir", type=Path, required=True)
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    s.add_argument(
        "--held-out", action="store_true", help="every sample names a held-out pair (test split)"
    )
    s.set_defaults(func=cmd_data)

    p = sub.add_parser("models", help="list the models anygen can load by name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)
    return parser


def _quiet_libraries() -> None:
    """diffusers and transformers log loading details and draw loading bars; the CLI
    shows its own progress, so it keeps only their errors (unless --verbose). Downloads
    still show a bar (``ANYGEN_DOWNLOAD_BARS``)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:  # loading bars off, downloads on
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["ANYGEN_DOWNLOAD_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # libraries imported before main() ran (by a host program, or tests) read those
    # variables already: tell them directly
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        _quiet_libraries()
    try:
        return args.func(args)
    except AnygenError as e:
        print(f"anygen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
