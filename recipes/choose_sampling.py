"""Choose a trained model's sampling settings on validation prompts, and write them into it.

Sampling settings are chosen after training, on validation prompts (shapes-eval t2i, seeds
1000 and 2000; reported evaluations use seed 0), by a rule fixed before scoring
(``anygen.eval.suites.choose_setting``): score every setting of a grid and the model's
plain defaults; the best replaces the plain defaults only if it gets at least ``--margin``
more prompts right, equals going to the setting nearest the plain defaults.

``--target rerank`` (the default) chooses the ``rerank`` block of the model's
``anygen.json``: the settings best-of-K candidates are drawn with (``--rerank K``), each
setting scored by the best of ``--candidates`` kept by ``--reranker``. If the chosen
temperature is the grid's highest, ``--extend-temperature`` is tried at its guidance and
kept only if ``--margin`` above. This reproduces the bundled models' blocks:

    anygen train recipes/choose_sampling.py --model shapes-parti --reranker shapes-fusion \\
        --output-dir runs/parti-rerank --bundle
    anygen train recipes/choose_sampling.py --model shapes-fusion \\
        --output-dir runs/fusion-rerank --bundle

``--target defaults`` chooses the model's own defaults (one image per prompt) over
``CODE_SAMPLING_GRID_FINE`` unless a grid is given, as shapes-fusion's were re-chosen;
``--plain`` compares the grid with other settings than the model's own (those the training
recipe chose, when re-choosing defaults already re-chosen), which stay if nothing wins:

    anygen train recipes/choose_sampling.py --model shapes-fusion --target defaults \\
        --plain guidance_scale=1.5,temperature=0.35,top_p=1.0 --output-dir runs/fusion-defaults

A setting the model has no default for is left out of the grid unless given, so for a
diffusion model (shapes-ldm) the grid is its guidance scales (``--guidance 1.5,2.5,3``).

``--target edit`` chooses an editor's text and image guidance (``--guidance``,
``--image-guidance``; default the training recipe's grid with image guidance 5 added) on
validation edits (shapes-eval edit, ``--select-n`` edits per seed, default 100), as
shapes-edit's pair (the recipe grid's lowest corner) was re-checked around it:

    anygen train recipes/choose_sampling.py --model shapes-edit --target edit \\
        --guidance 1.5,2,3 --image-guidance 1,1.5,2 --output-dir runs/edit-guidance --bundle

``--target story`` chooses a fusion model's ``story_temperature`` (the temperature its
story events are written at) on validation stories (shapes-eval story, ``--select-n``
stories per seed, default 100), counting the scenes whose picture matches the state
reached, over ``--story-temperature`` (default 0, 0.5, 1):

    anygen train recipes/choose_sampling.py --model shapes-fusion --target story \\
        --output-dir runs/fusion-story --bundle

The result is OUT/choice.json and OUT/model, a copy of the model with the settings written
into its ``anygen.json`` and its card (front matter ``rerank_selection``,
``sampling_reselection``, ``edit_reselection`` or ``story_selection``, and a table between
``<!-- anygen:KEY -->`` markers, appended when the card has none); ``--bundle`` also
replaces the bundled model of that name. A block
is removed when no setting beats the plain defaults by the margin.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import textwrap
from pathlib import Path

from anygen.errors import UserInputError
from anygen.eval.suites import (
    CODE_SAMPLING_GRID_FINE,
    SELECT_N,
    choose_by_rule,
    choose_edit_setting,
    choose_setting,
    run_story,
)
from anygen.hub import atomic_directory, bundled_models, resolve, write_card_section
from anygen.pipelines import Options, load_generator
from anygen.pipelines.rerank import select_block

log = logging.getLogger("recipes.choose_sampling")

# the rule by which the bundled rerank blocks were chosen (shapes-parti, shapes-fusion)
RERANK_GRID = {"guidance_scale": (1.5, 1.75, 2.0), "temperature": (0.5, 0.35), "top_p": (1.0,)}
FRONT_MATTER = {
    "rerank": "rerank_selection",
    "defaults": "sampling_reselection",
    "story": "story_selection",
    "edit": "edit_reselection",
}
HEADERS = {
    "guidance_scale": "guidance",
    "temperature": "temperature",
    "top_p": "top_p",
    "image_guidance_scale": "image guidance",
}
STORY_HEADERS = {"story_temperature": "story temperature"}
STORY_TEMPERATURES = (0.0, 0.5, 1.0)
STORY_N = 100  # validation stories per seed
EDIT_N = 100  # validation edits per seed
# the instruction-edit recipe's grid (EDIT_GUIDANCE_GRID) with image guidance 5 added
EDIT_GRID = {"guidance_scale": (2.0, 4.0, 7.5), "image_guidance_scale": (1.5, 2.5, 3.5, 5.0)}


def floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


def setting(text: str) -> dict:
    """``guidance_scale=1.5,temperature=0.35`` as a dict of numbers."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected KEY=NUMBER pairs separated by commas, got {item!r}"
            ) from None
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="anygen train recipes/choose_sampling.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a bundled name, a model directory or hub id")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--target", choices=("rerank", "defaults", "story", "edit"), default="rerank")
    p.add_argument("--reranker", help="the model scoring candidates (default: the model)")
    p.add_argument("--candidates", type=int, default=8, help="K of best of K (--target rerank)")
    p.add_argument("--by", default="caption", help="the reranker's score (caption or pmi)")
    p.add_argument("--guidance", type=floats, help="guidance scales of the grid")
    p.add_argument("--temperature", type=floats, help="temperatures of the grid")
    p.add_argument("--top-p", type=floats, help="top-p values of the grid")
    p.add_argument(
        "--image-guidance", type=floats, help="image guidance scales of the grid (--target edit)"
    )
    p.add_argument(
        "--story-temperature",
        type=floats,
        help="story event temperatures of the grid (--target story; default 0, 0.5, 1)",
    )
    p.add_argument(
        "--extend-temperature",
        type=floats,
        help="tried when the chosen temperature is the grid's highest "
        "(default 0.7 for --target rerank, none for defaults)",
    )
    p.add_argument(
        "--plain",
        type=setting,
        help="the settings the grid is compared with, e.g. guidance_scale=1.5,temperature=0.35 "
        "(default: the model's own defaults)",
    )
    p.add_argument(
        "--select-n",
        type=int,
        help=f"prompts (stories, edits) per validation seed (default {SELECT_N}; {STORY_N} "
        f"stories; {EDIT_N} edits)",
    )
    p.add_argument("--seeds", type=ints, default=(1000, 2000), help="validation prompt sets")
    p.add_argument("--margin", type=int, default=6, help="prompts a setting must win by")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device")
    p.add_argument("--bundle", action="store_true", help="also rewrite the bundled model")
    args = p.parse_args(argv)
    if any(s == 0 for s in args.seeds):
        p.error("--seeds must not include 0, the reported evaluation's prompt set")
    if args.plain is not None and args.target not in ("defaults", "edit"):
        p.error(
            "--plain applies to --target defaults and edit (a rerank block is compared with "
            "the model's own defaults)"
        )
    unknown = sorted(set(args.plain or {}) - set(HEADERS))
    if unknown:
        p.error(f"--plain sets {', '.join(unknown)}; it may set {', '.join(HEADERS)}")
    code_flags = {"--guidance": args.guidance, "--temperature": args.temperature}
    code_flags["--top-p"] = args.top_p
    code_flags["--extend-temperature"] = args.extend_temperature
    given = [flag for flag, value in code_flags.items() if value is not None]
    if args.target == "story" and given:
        p.error(f"{', '.join(given)} apply to the rerank and defaults targets, not to story")
    if args.target == "edit":
        wrong = [f for f in given if f != "--guidance"]
        if wrong:
            p.error(f"{', '.join(wrong)}: not for --target edit (an editor samples no tokens)")
    elif args.image_guidance is not None:
        p.error("--image-guidance applies to --target edit")
    if args.target != "story" and args.story_temperature is not None:
        p.error("--story-temperature applies to --target story")
    if any(t < 0 for t in args.story_temperature or ()):
        p.error("--story-temperature values must be at least 0")
    if args.select_n is None:
        args.select_n = {"story": STORY_N, "edit": EDIT_N}.get(args.target, SELECT_N)
    if args.select_n < 1 or args.candidates < 1 or args.margin < 0:
        p.error("--select-n and --candidates must be at least 1, --margin at least 0")
    return args


def grid_of(args: argparse.Namespace, defaults: dict) -> list[dict]:
    """The grid the flags give: a product of the values, with defaults per target. A
    setting the model has no default for (a diffusion model's temperature) is left out
    unless given."""
    if args.target == "story":
        return [{"story_temperature": t} for t in args.story_temperature or STORY_TEMPERATURES]
    if args.target == "edit":
        axes = {
            "guidance_scale": args.guidance or EDIT_GRID["guidance_scale"],
            "image_guidance_scale": args.image_guidance or EDIT_GRID["image_guidance_scale"],
        }
        return _product(axes)
    axes = dict(RERANK_GRID)
    if args.target == "defaults":
        axes = {k: tuple(dict.fromkeys(s[k] for s in CODE_SAMPLING_GRID_FINE)) for k in axes}
    axes = {k: v for k, v in axes.items() if defaults.get(k) is not None}
    given = {"guidance_scale": args.guidance, "temperature": args.temperature}
    given["top_p"] = args.top_p
    axes.update({k: v for k, v in given.items() if v is not None})
    if not axes:
        raise UserInputError("the model has none of the grid's settings; give --guidance")
    return _product(axes)


def _product(axes: dict[str, tuple]) -> list[dict]:
    """Every combination of the axes' values, each checked as Options."""
    grid = [{}]
    for key, values in axes.items():
        grid = [{**s, key: v} for s in grid for v in values]
    for setting in grid:
        Options(**setting).validate()  # a bad value is refused before hours of scoring
    return grid


def table(choice: dict, target: str) -> str:
    """The choice as a markdown table, best first, and a sentence saying what was chosen."""
    keys = [k for k in choice["plain"] if k not in ("validation_right", "by_seed")]
    at = f" at K = {choice['candidates']}" if target == "rerank" else ""
    names = {**HEADERS, **STORY_HEADERS}
    total = f"scenes right of {choice['scenes']}" if target == "story" else "right of"
    if target != "story":
        total += f" {choice['n']}{at}"
    head = [names.get(k, k) for k in keys] + [total]
    extended = set(choice.get("extend_temperatures", ()))
    rows = sorted(choice["grid"], key=lambda r: -r["validation_right"])
    plain = choice["plain"]
    plain_key = [plain[k] for k in keys]
    if all([r[k] for k in keys] != plain_key for r in rows):
        rows.append(plain)
        rows.sort(key=lambda r: -r["validation_right"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        note = ""
        if [r[k] for k in keys] == plain_key:
            note = " (plain defaults)"
        elif r.get("temperature") in extended:
            note = " (the extension)"
        cells = [str(r[k]) for k in keys] + [f"{r['validation_right']}{note}"]
        lines.append("| " + " | ".join(cells) + " |")
    what = {"rerank": "the `rerank` block", "defaults": "the defaults", "edit": "the defaults"}.get(
        target, "the default"
    )
    unit = {"story": "scenes", "edit": "edits"}.get(target, "prompts")
    if choice["chosen"] is None:
        verdict = (
            f"No setting beats the plain defaults ({plain['validation_right']}) by "
            f"{choice['margin']} {unit}, so {what} "
            + {
                "rerank": "is left out.",
                "defaults": "are the plain settings.",
                "edit": "are the plain settings.",
            }.get(target, "is the plain setting.")
        )
    else:
        setting = ", ".join(f"{names.get(k, k)} {v}" for k, v in choice["chosen"].items())
        verdict = f"Chosen, as {what}: {setting}."
    seeds = " and ".join(str(s) for s in choice["seeds"])
    where = {
        "story": f"validation stories (shapes-eval story, {choice['n']} stories: seeds {seeds})",
        "edit": f"validation edits (shapes-eval edit, seeds {seeds})",
    }.get(target, f"validation prompts (shapes-eval t2i, seeds {seeds})")
    rule = (
        f"Chosen by `recipes/choose_sampling.py --target {target}` on {where}, by its rule: "
        f"the best setting replaces the plain defaults only if it gets at least "
        f"{choice['margin']} more {unit} right; equals go to the setting nearest the plain "
        "defaults."
    )
    if extended:
        temps = ", ".join(f"{t:g}" for t in sorted(extended))
        rule += (
            f" If the chosen temperature is the grid's highest, {temps} is tried at its other "
            f"settings and kept only if {choice['margin']} above."
        )
    wrap = textwrap.fill
    return f"{wrap(rule, 90)}\n\n" + "\n".join(lines) + f"\n\n{wrap(verdict, 90)}"


def write_model(source: Path, target: Path, args: argparse.Namespace, choice: dict) -> None:
    """A copy of the model folder ``source`` at ``target`` with the choice written in."""
    config = json.loads((source / "anygen.json").read_text())
    if args.target == "rerank":
        if choice["chosen"] is None:
            config.pop("rerank", None)
        else:
            config["rerank"] = choice["chosen"]  # where a block was, else at the end
    else:  # the chosen setting, else the plain one (the model's own, or --plain's)
        names = {**HEADERS, **STORY_HEADERS}
        plain = {k: v for k, v in choice["plain"].items() if k in names}
        config.update(choice["chosen"] or plain)
    card_path = source / "README.md"
    card = card_path.read_text() if card_path.is_file() else ""
    key = FRONT_MATTER[args.target]
    card = write_card_section(card, key, choice, table(choice, args.target))
    with atomic_directory(target, marker="anygen.json") as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        (tmp / "anygen.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(card)


def choose_story_temperature(
    model,
    grid: list[dict],
    *,
    n: int,
    seeds,
    margin: int,
    batch_size: int,
    extend_temperatures=(),
) -> dict:
    """``choose_by_rule`` over story temperatures: each setting tells ``n`` validation
    stories per seed, counting the scenes whose picture matches the state reached."""
    if not callable(getattr(model, "story", None)):
        raise UserInputError(f"model {model.name!r} ({model.family}) does not tell stories")
    defaults = dict(model.defaults)
    scenes: dict[int, int] = {}

    def right(setting: dict, seed: int) -> int:
        model.defaults = {**defaults, **setting}
        try:
            report = run_story(
                lambda prompt, k, s: model.story(prompt, k, s, Options(progress=False)),
                n=n,
                seed=seed,
                progress=False,
            )
        finally:
            model.defaults = defaults
        counts = [int(r.category.split("_")[1]) for r in report.records]
        scenes[seed] = sum(counts)
        return sum(
            round(r.extra["scene_match"] * k) for r, k in zip(report.records, counts, strict=True)
        )

    choice = choose_by_rule(
        right, grid, defaults, seeds=seeds, margin=margin, desc=f"story of {model.name}"
    )
    return {"n": n * len(seeds), "scenes": sum(scenes.values()), **choice}


def choose_editor_guidance(model, grid: list[dict], args: argparse.Namespace, rule: dict) -> dict:
    """``choose_edit_setting`` over an editor's guidance pairs, against its own defaults
    (or ``--plain``'s), on ``args.select_n`` validation edits per seed."""
    if not callable(getattr(model, "edit", None)):
        raise UserInputError(f"model {model.name!r} ({model.family}) does not edit images")
    return choose_edit_setting(
        lambda image, instruction, seed, setting: model.edit(
            image, instruction, Options(seed=seed, progress=False, **setting)
        ).images[0],
        grid,
        {**model.defaults, **(args.plain or {})},
        n=rule["n"],
        seeds=rule["seeds"],
        margin=rule["margin"],
        size=getattr(model, "default_size", 64),
        desc=f"edit guidance of {model.name}",
    )


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    source = resolve(args.model)
    if not (source / "anygen.json").is_file():
        raise UserInputError(
            f"model {args.model!r} has no anygen.json ({source}); its sampling settings "
            "cannot be written into it"
        )
    bundle = None
    if args.bundle:
        bundle = bundled_models("model").get(args.model)
        if bundle is None or bundle.resolve() != source.resolve():
            raise UserInputError(f"--bundle rewrites a bundled model; {args.model!r} is not one")
    grid = grid_of(args, json.loads((source / "anygen.json").read_text()))
    model = load_generator(args.model, device=args.device)
    rule = {
        "n": args.select_n,
        "seeds": args.seeds,
        "margin": args.margin,
        "batch_size": args.batch_size,
    }
    extend = args.extend_temperature
    if extend is None:
        extend = (0.7,) if args.target == "rerank" else ()
    rule["extend_temperatures"] = extend
    if args.target == "story":
        choice = choose_story_temperature(model, grid, **rule)
    elif args.target == "edit":
        choice = choose_editor_guidance(model, grid, args, rule)
    elif args.target == "rerank":
        scorer = (
            model if args.reranker is None else load_generator(args.reranker, device=args.device)
        )
        choice = select_block(model, scorer, grid, candidates=args.candidates, by=args.by, **rule)
    else:
        choice = choose_setting(
            lambda prompts, seeds, setting: (
                model.generate_batch(prompts, seeds, Options(progress=False, **setting)).images
            ),
            grid,
            {**model.defaults, **(args.plain or {})},
            desc=f"defaults of {model.name}",
            **rule,
        )
    choice = {"model": args.model, "target": args.target, **choice}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / "choice.json"
    tmp = out.with_name(".tmp-choice.json")
    tmp.write_text(json.dumps(choice, indent=2) + "\n")
    tmp.replace(out)
    log.info("%s", table(choice, args.target))
    write_model(source, args.output_dir / "model", args, choice)
    log.info("saved %s", args.output_dir / "model")
    if bundle is not None:
        write_model(args.output_dir / "model", bundle, args, choice)
        log.info("rewrote the bundled %s", bundle)
