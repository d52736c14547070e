"""shapes-eval suites: GenEval-style prompt sets and their runs, for every task.

Every suite is a deterministic function of ``(n, seed)`` (samples come from
``anygen.data.shapes.sample_rng``) and takes a plain callable, so any model plugs in:

- ``run_t2i(generate_fn(prompts, seeds) -> images, n, seed, batch_size)``
- ``run_caption(caption_fn(images) -> captions, vqa_fn(images, questions) -> answers,
  n, seed)`` (either callable may be None)
- ``run_story(story_fn(prompt, n_scenes, seed) -> segments, n, seed)``
- ``run_edit(edit_fn(image, instruction, seed) -> image, n, seed)``
- ``run_subject(subject_fn(reference_images, prompt, seed) -> image, n, seed)``
- ``run_reconstruction(roundtrip_fn(images) -> images, n, seed)``: image tokenizers and
  visual decoders (``decode(encode(x))``)

Text-to-image categories (``n`` prompts each; all but ``held_out`` avoid every held-out
pair, so ``held_out`` alone measures generalisation to unseen compositions):

- ``single_object``: one object, ``a [size] colour shape``.
- ``two_objects``: ``<object> and <object>``, two objects of different shapes.
- ``colour_attribution``: ``<object> and <object> [and <object>]`` (2 or 3 objects) in which
  one shape appears at least twice in different colours, so each colour must bind to the
  right object (``a red circle and a blue circle and a green square``).
- ``position``: one object with its cell, ``a [size] colour shape in the <position>``.
- ``relation``: ``<object> <relation> <object>`` (left of, right of, above, below).
- ``counting``: ``<two|three> colour <plural>``.
- ``held_out``: any caption form naming at least one held-out (colour, shape) pair.

Sizes are named or omitted at random within each category. Every image is judged by
``anygen.eval.judge`` on what ``anygen.eval.detect`` finds in it.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from anygen.data import shapes
from anygen.data.render import render_image
from anygen.data.world import HELD_OUT_PAIRS, JITTER, POSITIONS, SHAPES, Obj, Scene
from anygen.errors import AnygenError, UserInputError
from anygen.eval.judge import (
    Verdict,
    satisfies,
    score_answer,
    score_caption,
    score_edit,
    score_story,
    score_subject,
    shows_subject,
    split_story,
)
from anygen.eval.parse import CaptionSpec, ObjectSpec, in_grammar, parse_caption

logger = logging.getLogger(__name__)

T2I_CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_objects",
    "colour_attribution",
    "position",
    "relation",
    "counting",
    "held_out",
)

GenerateFn = Callable[[list[str], list[int]], list[Image.Image]]
CaptionFn = Callable[[list[Image.Image]], list[str]]
VQAFn = Callable[[list[Image.Image], list[str]], list[str]]
StoryFn = Callable[[str, int, int], list[Any]]
EditFn = Callable[[Image.Image, str, int], Image.Image]
SubjectFn = Callable[[list[Image.Image], str, int], Image.Image]
RoundtripFn = Callable[[list[Image.Image]], list[Image.Image]]


# ------------------------------------------------------------------------------------ report


@dataclass
class Record:
    """One judged sample."""

    category: str
    prompt: str
    seed: int
    ok: bool
    reasons: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """Scores of one suite run: per category, overall (mean over all samples), extra named
    metrics, and every judged sample with its reasons."""

    task: str
    records: list[Record] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # what was scored: model, n, seed, ...

    @property
    def categories(self) -> dict[str, tuple[int, float]]:
        """category -> (n, score), in first-seen order."""
        out: dict[str, list[bool]] = {}
        for r in self.records:
            out.setdefault(r.category, []).append(r.ok)
        return {k: (len(v), float(np.mean(v))) for k, v in out.items()}

    @property
    def overall(self) -> float:
        return float(np.mean([r.ok for r in self.records])) if self.records else 0.0

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            **({"meta": self.meta} if self.meta else {}),
            "overall": self.overall,
            "n": len(self.records),
            "categories": {k: {"n": n, "score": s} for k, (n, s) in self.categories.items()},
            "metrics": dict(self.metrics),
            "records": [asdict(r) for r in self.records],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """GenEval-style table: category, n, score; then overall and extra metrics."""
        rows = [(k, str(n), f"{s:.3f}") for k, (n, s) in self.categories.items()]
        rows.append(("overall", str(len(self.records)), f"{self.overall:.3f}"))
        rows += [(k, "", f"{v:.3f}") for k, v in self.metrics.items()]
        width = max([len("category")] + [len(r[0]) for r in rows])
        lines = [f"{'category':<{width}}  {'n':>5}  {'score':>6}", "-" * (width + 15)]
        lines += [f"{a:<{width}}  {b:>5}  {c:>6}" for a, b, c in rows]
        return "\n".join(lines)


def _record(category: str, prompt: str, seed: int, verdict: Verdict, **extra: Any) -> Record:
    return Record(category, prompt, seed, verdict.ok, list(verdict.reasons), extra)


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise UserInputError(f"number of samples must be a positive integer, got {n!r}")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UserInputError(f"batch size must be a positive integer, got {batch_size!r}")


def _check_image(out: Any, fn: str) -> Any:
    if not isinstance(out, (Image.Image, np.ndarray)):
        raise UserInputError(f"{fn} must return an image, got {type(out).__name__}")
    return out


def _check_images(out: Any, want: int, fn: str) -> list[Any]:
    if not isinstance(out, (list, tuple)) or len(out) != want:
        got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
        raise UserInputError(f"{fn} must return a list of {want} images, got {got}")
    return list(out)


# ------------------------------------------------------------------------------ t2i prompts


@dataclass(frozen=True)
class T2IPrompt:
    """A prompt of a text-to-image suite and a scene that satisfies it (for reference)."""

    category: str
    prompt: str
    scene: Scene


def categorise(spec: CaptionSpec) -> str:
    """The text-to-image category of a caption (see the module docstring); conjunctions of 3
    different shapes, or naming one object twice (``a red circle and a red circle``), which
    no suite asks for, are ``multiple_objects``."""
    if any((o.colour, o.shape) in HELD_OUT_PAIRS for o in spec.objects):
        return "held_out"
    if spec.form == "object":
        return "single_object"
    if spec.form == "position":
        return "position"
    if spec.form == "relation":
        return "relation"
    if spec.form == "count":
        return "counting"
    colours_of: dict[str, set[str]] = {}
    for o in spec.objects:
        colours_of.setdefault(o.shape, set()).add(o.colour)
    if any(len(colours) > 1 for colours in colours_of.values()):  # one shape, several colours
        return "colour_attribution"
    if len(spec.objects) == 2 and len(colours_of) == 2:  # two different shapes
        return "two_objects"
    return "multiple_objects"


def _scene_of(rng: random.Random, objs: Sequence[tuple[str, str, str]]) -> Scene:
    """(colour, shape, size) objects in random distinct cells, jittered until valid."""
    while True:
        cells = rng.sample(list(POSITIONS), len(objs))
        scene = Scene(
            tuple(
                Obj(s, c, size, col, row, rng.choice(JITTER), rng.choice(JITTER))
                for (c, s, size), (col, row) in zip(objs, cells, strict=True)
            )
        )
        if scene.is_valid():
            return scene


def _conjunction(rng: random.Random, scene: Scene) -> str:
    objs = [
        ObjectSpec(o.colour, o.shape, o.size if rng.random() < 0.5 else None) for o in scene.objects
    ]
    return CaptionSpec("conjunction", tuple(objs)).to_text()


def _t2i_prompt(category: str, rng: random.Random) -> T2IPrompt:
    sizes = shapes.SIZE_NAMES
    train = shapes.TRAIN_PAIRS  # every pair but the held-out ones
    if category == "held_out":
        caption, scene = shapes.sample_captioned_scene(rng, "test", require_held_out=True)
        return T2IPrompt(category, caption.text(), scene)
    if category in ("single_object", "position", "relation", "counting"):
        form = {"single_object": "object", "counting": "count"}.get(category, category)
        caption, scene = shapes.sample_captioned_scene(rng, "train", form)
        return T2IPrompt(category, caption.text(), scene)
    if category == "two_objects":
        (c1, s1), (c2, s2) = rng.sample(train, 2)
        while s2 == s1:
            c2, s2 = rng.choice(train)
        scene = _scene_of(rng, [(c1, s1, rng.choice(sizes)), (c2, s2, rng.choice(sizes))])
        return T2IPrompt(category, _conjunction(rng, scene), scene)
    if category == "colour_attribution":
        shape = rng.choice(SHAPES)
        colours = [c for c, s in train if s == shape]
        c1, c2 = rng.sample(colours, 2)
        objs = [(c1, shape, rng.choice(sizes)), (c2, shape, rng.choice(sizes))]
        if rng.random() < 0.5:
            c3, s3 = rng.choice([p for p in train if p not in ((c1, shape), (c2, shape))])
            objs.append((c3, s3, rng.choice(sizes)))
        rng.shuffle(objs)
        scene = _scene_of(rng, objs)
        return T2IPrompt(category, _conjunction(rng, scene), scene)
    raise UserInputError(f"unknown t2i category {category!r}; expected one of {T2I_CATEGORIES}")


def t2i_prompts(
    n: int, seed: int = 0, categories: Sequence[str] = T2I_CATEGORIES
) -> list[T2IPrompt]:
    """``n`` prompts in all, the categories taking turns (so each gets n / len(categories),
    give or take one); a deterministic function of (n, seed)."""
    _check_n(n)
    if isinstance(categories, str) or not categories:
        raise UserInputError(
            f"categories must be a non-empty sequence of t2i categories, got {categories!r}"
        )
    if len(set(categories)) != len(categories):
        raise UserInputError(f"categories are named more than once: {list(categories)}")
    out = []
    for i in range(n):
        category = categories[i % len(categories)]
        index = i // len(categories)
        p = _t2i_prompt(category, shapes.sample_rng(seed, f"eval-t2i-{category}", index))
        if categorise(parse_caption(p.prompt)) != category:  # a bug here, never the user's
            raise AssertionError(f"prompt {p.prompt!r} is not a {category} prompt")
        out.append(p)
    return out


def run_t2i(
    generate_fn: GenerateFn,
    n: int = 10,
    seed: int = 0,
    batch_size: int = 16,
    *,
    categories: Sequence[str] = T2I_CATEGORIES,
    progress: bool = True,
) -> Report:
    """Generate one image per prompt (``generate_fn(prompts, seeds)``, in batches) and judge it.

    The seed of prompt i is ``seed + i``.
    """
    _check_batch_size(batch_size)
    prompts = t2i_prompts(n, seed, categories)
    report = Report("t2i")
    bar = tqdm(total=len(prompts), desc="shapes-eval t2i", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        seeds = [seed + start + j for j in range(len(batch))]
        images = _check_images(
            generate_fn([p.prompt for p in batch], seeds), len(batch), "generate_fn"
        )
        for p, s, image in zip(batch, seeds, images, strict=True):
            report.records.append(_record(p.category, p.prompt, s, satisfies(image, p.prompt)))
        bar.update(len(batch))
    bar.close()
    return report


# Guidance x image-code temperature, the grid from which the parti and fusion recipes choose
# their defaults. It reaches down to 0.35: the small shapes-world models draw better with low
# temperatures (shapes-fusion, 500 validation prompts at guidance 2.0: 0.322 at 0.85, 0.388 at
# 0.7, 0.432 at 0.5, 0.448 at 0.35), and stops above 0, where every seed draws the same image.
CODE_SAMPLING_GRID: tuple[dict, ...] = tuple(
    {"guidance_scale": g, "temperature": t}
    for g in (1.0, 1.5, 2.0, 3.0)
    for t in (1.0, 0.7, 0.5, 0.35)
)

# Around the best of CODE_SAMPLING_GRID for a well-trained code model: lower temperatures and
# nucleus sampling. On 600 validation prompts it beat the coarse grid's best by 15 for
# shapes-parti (guidance 1.5, temperature 0.25, top_p 0.9) and by 13 for shapes-fusion (1.75,
# 0.25, 0.9).
CODE_SAMPLING_GRID_FINE: tuple[dict, ...] = tuple(
    {"guidance_scale": g, "temperature": t, "top_p": p}
    for g in (1.25, 1.5, 1.75, 2.0)
    for t in (0.5, 0.35, 0.25)
    for p in (1.0, 0.9)
)


# Validation prompts on which every shapes recipe chooses its sampling defaults. 70 proved too
# few: one prompt moves the score by 0.014, about the gap between settings (shapes-ldm at
# 6,600 steps: 0.243 at guidance 1.5, 0.229 at 5.0).
SELECT_N = 300


def select_t2i_settings(
    generate: Callable[[list[str], list[int], dict], list[Image.Image]],
    grid: Sequence[dict],
    n: int,
    seed: int = 1000,
    batch_size: int = 50,
) -> dict:
    """Model selection on validation data: score each setting of ``grid`` (e.g.
    ``{"guidance_scale": 3.0, "temperature": 0.7}``) on ``n`` t2i prompts of ``seed``
    (1000; reported evaluations use seed 0: other prompt sets, drawn independently, and
    other image seeds; but the shapes world has few distinct prompts in some categories,
    so about a fifth of the 300 test prompts also occur among 600 validation ones) with
    ``generate(prompts, seeds, setting)``, and keep the best. Returns the grid's scores and
    the chosen setting."""
    return _select_settings(
        lambda setting: run_t2i(
            lambda prompts, seeds: generate(prompts, seeds, setting),
            n=n,
            seed=seed,
            batch_size=batch_size,
            progress=False,
        ),
        grid,
        n,
        seed,
    )


def _select_settings(score: Callable[[dict], Report], grid: Sequence[dict], n: int, seed: int):
    """Score each setting of ``grid`` by ``score(setting)`` (a validation report) and keep
    the best (the first of equals)."""
    scores = []
    for setting in tqdm(grid, desc=f"validation ({n} samples per setting)"):
        report = score(setting)
        scores.append({**setting, "validation_overall": round(report.overall, 4)})
        logger.info("validation %s: %.3f", setting, report.overall)
    best = max(scores, key=lambda r: r["validation_overall"])
    chosen = {k: v for k, v in best.items() if k != "validation_overall"}
    return {"n": n, "seed": seed, "grid": scores, "chosen": chosen}


def choose_setting(
    generate: Callable[[list[str], list[int], dict], list[Image.Image]],
    grid: Sequence[dict],
    defaults: dict,
    *,
    n: int = SELECT_N,
    seeds: Sequence[int] = (1000, 2000),
    margin: int = 6,
    extend_temperatures: Sequence[float] = (),
    batch_size: int = 16,
    desc: str = "validation",
) -> dict:
    """Choose a sampling setting on validation prompts by a rule fixed before scoring.

    Each setting of ``grid`` and the plain one (``defaults``' values of the grid's keys)
    draws one image per prompt with ``generate(prompts, seeds, setting)`` for ``n`` t2i
    prompts of each validation seed in ``seeds`` (reported evaluations use seed 0) and
    scores the prompts it gets right; ``choose_by_rule`` chooses. The training recipes' own
    choice (``select_t2i_settings``: one validation set, the best wins) is the simpler rule
    this refines.
    """

    def right(setting: dict, seed: int) -> int:
        report = run_t2i(
            lambda prompts, s: generate(prompts, s, setting),
            n=n,
            seed=seed,
            batch_size=batch_size,
            progress=False,
        )
        return sum(r.ok for r in report.records)

    rule = {"margin": margin, "extend_temperatures": extend_temperatures, "desc": desc}
    return {"n": n * len(seeds), **choose_by_rule(right, grid, defaults, seeds=seeds, **rule)}


def choose_edit_setting(
    edit: Callable[[Image.Image, str, int, dict], Image.Image],
    grid: Sequence[dict],
    defaults: dict,
    *,
    n: int = 100,
    seeds: Sequence[int] = (1000, 2000),
    margin: int = 6,
    size: int = 64,
    desc: str = "validation",
) -> dict:
    """``choose_setting`` for editors: each setting of ``grid`` (e.g. ``{"guidance_scale":
    4.0, "image_guidance_scale": 3.5}``) and the plain one edit ``n`` validation edits of
    each seed with ``edit(image, instruction, seed, setting)``, and ``choose_by_rule``
    chooses by the edits right. The training recipe's choice (``select_edit_settings``:
    one validation set, the best wins) is the simpler rule this refines."""

    def right(setting: dict, seed: int) -> int:
        report = run_edit(
            lambda image, instruction, s: edit(image, instruction, s, setting),
            n=n,
            seed=seed,
            size=size,
            progress=False,
        )
        return sum(r.ok for r in report.records)

    choice = choose_by_rule(right, grid, defaults, seeds=seeds, margin=margin, desc=desc)
    return {"n": n * len(seeds), **choice}


def choose_by_rule(
    right: Callable[[dict, int], int],
    grid: Sequence[dict],
    defaults: dict,
    *,
    seeds: Sequence[int] = (1000, 2000),
    margin: int = 6,
    extend_temperatures: Sequence[float] = (),
    desc: str = "validation",
) -> dict:
    """The rule by which sampling settings are chosen: ``right(setting, seed)`` counts what
    ``setting`` gets right on validation set ``seed``, for each setting of ``grid`` and the
    plain one (``defaults``' values of the grid's keys), summed over ``seeds``. The best
    replaces the plain setting only if it gets more right, and at least ``margin`` more (a
    grid gives some lead by chance); equals go to the setting nearest the plain one (the sum
    of absolute differences). If the chosen temperature is the grid's highest,
    ``extend_temperatures`` are tried at the chosen setting's other values, and the best of
    them replaces it only if more right, by at least ``margin``. Returns the scores,
    ``plain`` and ``chosen`` (None: the plain setting stays).
    """
    if not grid:
        raise UserInputError("the grid of settings to choose from is empty")
    keys = sorted({k for setting in grid for k in setting})
    missing = [k for k in keys if defaults.get(k) is None]
    if missing:
        raise UserInputError(
            f"the model has no default {', '.join(missing)} to compare the grid's settings with"
        )
    plain = {k: defaults[k] for k in keys}
    if any(set(setting) != set(keys) for setting in grid):
        raise UserInputError(f"every setting of the grid must give {', '.join(keys)}")
    bar = tqdm(total=(len(grid) + 1) * len(seeds), desc=desc)
    done: dict[tuple, dict] = {}

    def score(setting: dict) -> dict:
        key = tuple(setting[k] for k in keys)
        if key not in done:
            counts = []
            for seed in seeds:
                counts.append(int(right(setting, seed)))
                bar.update()
            logger.info("%s: %s right %d", desc, setting, sum(counts))
            done[key] = {**setting, "validation_right": sum(counts), "by_seed": counts}
        return done[key]

    def distance(row: dict) -> float:
        return sum(abs(row[k] - plain[k]) for k in keys if not isinstance(plain[k], str))

    def best_of(rows: list[dict]) -> dict:
        top = max(r["validation_right"] for r in rows)
        return min((r for r in rows if r["validation_right"] == top), key=distance)

    rows = [score(dict(setting)) for setting in grid]
    plain_row = score(plain)
    best = best_of([*rows, plain_row])
    chosen = None
    lead = best["validation_right"] - plain_row["validation_right"]
    if best is not plain_row and lead >= margin:
        chosen = best
        top_t = max(s.get("temperature", 0.0) for s in grid)
        if extend_temperatures and best.get("temperature") == top_t:
            bar.total += len(extend_temperatures) * len(seeds)
            extended = [
                score({**{k: best[k] for k in keys}, "temperature": t}) for t in extend_temperatures
            ]
            rows.extend(extended)
            longer = best_of(extended)
            gain = longer["validation_right"] - best["validation_right"]
            if gain > 0 and gain >= margin:
                chosen = longer
    bar.close()
    return {
        "seeds": list(seeds),
        "margin": margin,
        "extend_temperatures": list(extend_temperatures),
        "plain": plain_row,
        "grid": rows,
        "chosen": None if chosen is None else {k: chosen[k] for k in keys},
    }


# ------------------------------------------------------------------------------ caption, VQA


def _vqa_kind(question: str) -> str:
    for prefix, kind in (
        ("what colour", "colour"),
        ("what shape", "shape"),
        ("how many", "count"),
        ("where is", "position"),
        ("is there", "exists"),
        ("what size", "size"),
    ):
        if question.startswith(prefix):
            return kind
    return "other"


def run_caption(
    caption_fn: CaptionFn | None,
    vqa_fn: VQAFn | None = None,
    n: int = 50,
    seed: int = 0,
    *,
    size: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> Report:
    """Image -> text on ``n`` test-split scenes (held-out pairs included).

    Captions (categories ``caption_1``..``caption_3`` by object count) are right when in the
    grammar and true of the scene, naming exactly its objects (``score_caption``); metric
    ``caption_in_grammar``. VQA on ``n`` other scenes (categories ``vqa_<kind>``):
    normalised exact match.
    """
    _check_n(n)
    _check_batch_size(batch_size)
    if caption_fn is None and vqa_fn is None:
        raise UserInputError("run_caption needs a caption_fn, a vqa_fn or both")
    report = Report("caption")
    if caption_fn is not None:
        scenes = [
            shapes.sample_scene(shapes.sample_rng(seed, "eval-caption", i), None, "test")
            for i in range(n)
        ]
        grammar = []
        for start in tqdm(
            range(0, n, batch_size), desc="shapes-eval caption", disable=not progress
        ):
            batch = scenes[start : start + batch_size]
            images = [render_image(s, size) for s in batch]
            captions = _check_images(caption_fn(images), len(batch), "caption_fn")
            for j, (scene, caption) in enumerate(zip(batch, captions, strict=True)):
                if not isinstance(caption, str):
                    raise UserInputError(
                        f"caption_fn must return strings, got {type(caption).__name__}"
                    )
                verdict = score_caption(scene, caption)
                grammar.append(in_grammar(caption))
                report.records.append(
                    _record(
                        f"caption_{len(scene.objects)}",
                        caption,
                        start + j,
                        verdict,
                        scene=scene.to_dict(),
                    )
                )
        report.metrics["caption_in_grammar"] = float(np.mean(grammar))
    if vqa_fn is not None:
        items = []
        for i in range(n):
            rng = shapes.sample_rng(seed, "eval-vqa", i)
            scene = shapes.sample_scene(rng, None, "test")
            items.append((scene, *shapes.sample_vqa(rng, scene, "test")))
        for start in tqdm(range(0, n, batch_size), desc="shapes-eval vqa", disable=not progress):
            batch = items[start : start + batch_size]
            images = [render_image(s, size) for s, _, _ in batch]
            answers = _check_images(vqa_fn(images, [q for _, q, _ in batch]), len(batch), "vqa_fn")
            for j, ((_, question, truth), answer) in enumerate(zip(batch, answers, strict=True)):
                ok = score_answer(answer, truth)
                reasons = [] if ok else [f"answered {answer!r}, expected {truth!r}"]
                report.records.append(
                    Record(
                        f"vqa_{_vqa_kind(question)}",
                        question,
                        start + j,
                        ok,
                        reasons,
                        {"answer": answer, "truth": truth},
                    )
                )
    return report


# ------------------------------------------------------------------------------------ stories


def run_story(story_fn: StoryFn, n: int = 20, seed: int = 0, *, progress: bool = True) -> Report:
    """Stories from test-split first captions: ``story_fn(prompt, n_scenes, seed)`` returns the
    interleaved story (texts and images; see ``judge.split_story``). A story is right when
    every scene satisfies the state its own events reach (``judge.score_story``); metrics:
    ``scene_match`` (mean fraction of right scenes) and ``event_grammar_rate``."""
    _check_n(n)
    report = Report("story")
    scene_match, grammar = [], []
    for i in tqdm(range(n), desc="shapes-eval story", disable=not progress):
        story = shapes.sample_story(shapes.sample_rng(seed, "eval-story", i), None, "test")
        prompt, n_scenes = story.texts[0], len(story.scenes)
        segments = story_fn(prompt, n_scenes, seed + i)
        if not isinstance(segments, (list, tuple)):
            raise UserInputError(
                f"story_fn must return a list of segments, got {type(segments).__name__}"
            )
        images, texts = split_story(prompt, segments)
        images, texts = images[:n_scenes], texts[:n_scenes]
        score = score_story(images, texts)
        scene_ok = score.scene_ok + [False] * (n_scenes - len(images))
        reasons = [f"scene {k + 1}: {r}" for k, rs in enumerate(score.reasons) for r in rs]
        if len(images) < n_scenes:
            reasons.append(f"{len(images)} images for {n_scenes} scenes")
        match = float(np.mean(scene_ok))
        scene_match.append(match)
        # an event the story never reached (a scene without its picture) is not in the grammar
        events = score.text_in_grammar[1:] + [False] * (n_scenes - max(len(texts), 1))
        event_rate = float(np.mean(events)) if events else 1.0
        grammar.append(event_rate)
        report.records.append(
            Record(
                f"story_{n_scenes}",
                prompt,
                seed + i,
                all(scene_ok),
                reasons,
                {
                    "scene_match": match,
                    "texts": texts,
                    "event_grammar_rate": event_rate,
                },
            )
        )
    report.metrics["scene_match"] = float(np.mean(scene_match))
    report.metrics["event_grammar_rate"] = float(np.mean(grammar))
    return report


# -------------------------------------------------------------------------------------- edits


def run_edit(
    edit_fn: EditFn, n: int = 30, seed: int = 0, *, size: int = 64, progress: bool = True
) -> Report:
    """Instruction edits of test-split scenes (categories ``edit_<kind>``): right when the
    edited object changed as instructed and all others kept colour, shape, size and cell."""
    _check_n(n)
    report = Report("edit")
    for i in tqdm(range(n), desc="shapes-eval edit", disable=not progress):
        edit = shapes.sample_edit(shapes.sample_rng(seed, "eval-edit", i), "test")
        output = _check_image(
            edit_fn(render_image(edit.source, size), edit.instruction, seed + i), "edit_fn"
        )
        verdict = score_edit(edit.source, edit.instruction, output)
        report.records.append(
            _record(
                f"edit_{edit.event.kind}",
                edit.instruction,
                seed + i,
                verdict,
                source=edit.source.to_dict(),
            )
        )
    return report


def select_edit_settings(
    edit: Callable[[Image.Image, str, int, dict], Image.Image],
    grid: Sequence[dict],
    n: int,
    seed: int = 1000,
    *,
    size: int = 64,
) -> dict:
    """``select_t2i_settings`` for editors: score each setting of ``grid`` (e.g.
    ``{"guidance_scale": 4.0, "image_guidance_scale": 1.5}``) on the ``n`` validation edits
    of ``seed`` (1000; reported evaluations use 0) with ``edit(image, instruction, seed,
    setting)``, and keep the best."""
    return _select_settings(
        lambda setting: run_edit(
            lambda image, instruction, s: edit(image, instruction, s, setting),
            n=n,
            seed=seed,
            size=size,
            progress=False,
        ),
        grid,
        n,
        seed,
    )


# ----------------------------------------------------------------------------------- subjects


def run_subject(
    subject_fn: SubjectFn, n: int = 20, seed: int = 0, *, size: int = 64, progress: bool = True
) -> Report:
    """Subject-driven generation from 3 to 5 reference images (test split; categories
    ``subject`` and ``subject_held_out``): right when both subject and prompt fidelity hold;
    metrics ``subject_fidelity`` and ``prompt_fidelity`` (means of each alone)."""
    _check_n(n)
    report = Report("subject")
    fidelity, prompt_ok = [], []
    for i in tqdm(range(n), desc="shapes-eval subject", disable=not progress):
        sample = shapes.subject_sample(shapes.sample_rng(seed, "eval-subject", i), "test")
        refs = [render_image(s, size) for s in sample.references]
        output = _check_image(subject_fn(refs, sample.prompt, seed + i), "subject_fn")
        verdict = score_subject(output, sample.prompt, sample.subject)
        fidelity.append(verdict.subject_ok)
        prompt_ok.append(verdict.prompt_ok)
        category = "subject_held_out" if sample.subject.held_out else "subject"
        report.records.append(
            Record(
                category,
                sample.prompt,
                seed + i,
                verdict.ok,
                list(verdict.reasons),
                {
                    "subject": sample.subject.to_dict(),
                    "subject_ok": verdict.subject_ok,
                    "prompt_ok": verdict.prompt_ok,
                },
            )
        )
    report.metrics["subject_fidelity"] = float(np.mean(fidelity))
    report.metrics["prompt_fidelity"] = float(np.mean(prompt_ok))
    return report


# ----------------------------------------------------------------------------- reconstruction


def run_reconstruction(
    roundtrip_fn: RoundtripFn,
    n: int = 1000,
    seed: int = 0,
    batch_size: int = 100,
    *,
    subjects: int | None = None,
    size: int = 64,
    progress: bool = True,
) -> Report:
    """Pass ``n`` held-out (test split) scenes through ``roundtrip_fn`` (e.g. a tokenizer's
    ``decode(encode(x))``) and judge each result against the scene's caption.

    Records are categorised by object count; ``metrics`` adds ``psnr_db`` (mean over images,
    peak-to-peak 255), ``exact_state``: the fraction whose result also keeps every
    attribute of every object (size and cell even where the caption leaves them out), and
    ``held_out``: the caption rate over the scenes holding a held-out (colour, shape) pair,
    which a tokenizer trained on the train split has never seen.

    Then ``subjects`` pictures of patterned subjects (default ``n // 4``; 0 skips them), the
    reference pictures of the subject suite's samples in order, pass through it too:
    ``subject_kept`` is the fraction that still show their subject (shape, both colours,
    pattern: ``judge.shows_subject``), and ``subject_kept_<pattern>`` the same per pattern.
    No model that draws through this codec can draw a subject it does not keep, so this
    bounds the subject suite's fidelity. They are metrics, not records: ``overall`` stays
    the scenes' caption rate.
    """
    _check_n(n)
    _check_batch_size(batch_size)
    subjects = n // 4 if subjects is None else subjects
    if not isinstance(subjects, int) or isinstance(subjects, bool) or subjects < 0:
        raise UserInputError(f"subjects must be a non-negative integer, got {subjects!r}")
    report = Report("reconstruction")
    psnrs, exact, held_out = [], [], []
    bar = tqdm(total=n, desc="shapes-eval reconstruction", disable=not progress)
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        samples = [shapes.task_sample("t2i", seed, i, "test") for i in idx]
        originals = [render_image(s.scene, size) for s in samples]
        results = _check_images(roundtrip_fn(originals), len(samples), "roundtrip_fn")
        for i, s, a, b in zip(idx, samples, originals, results, strict=True):
            b = b.convert("RGB")
            if b.size != a.size:
                raise UserInputError(f"roundtrip_fn returned a {b.size} image for a {a.size} one")
            mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
            psnrs.append(10 * np.log10(255.0**2 / max(mse, 1e-10)))
            exact.append(satisfies(b, _pinned(s.scene)).ok)
            n_obj = len(s.scene.objects)
            verdict = satisfies(b, s.canonical)
            if s.scene.pairs() & set(HELD_OUT_PAIRS):
                held_out.append(verdict.ok)
            report.records.append(
                _record(f"{n_obj}_object{'s' * (n_obj > 1)}", s.canonical, i, verdict)
            )
        bar.update(len(samples))
    bar.close()
    report.metrics = {"psnr_db": float(np.mean(psnrs)), "exact_state": float(np.mean(exact))}
    if held_out:
        report.metrics["held_out"] = float(np.mean(held_out))
        report.metrics["held_out_n"] = float(len(held_out))
    if subjects:
        report.metrics.update(
            _subjects_kept(roundtrip_fn, subjects, seed, batch_size, size, progress)
        )
    return report


def _subjects_kept(
    roundtrip_fn: RoundtripFn, count: int, seed: int, batch_size: int, size: int, progress: bool
) -> dict[str, float]:
    """run_reconstruction's subject metrics over the first ``count`` reference pictures of
    the subject suite's samples (test split, seed ``seed``)."""
    pictures: list[tuple[Scene, Any]] = []
    i = 0
    while len(pictures) < count:
        sample = shapes.subject_sample(shapes.sample_rng(seed, "eval-subject", i), "test")
        pictures += [(scene, sample.subject) for scene in sample.references]
        i += 1
    pictures = pictures[:count]
    kept: dict[str, list[bool]] = {}
    for start in tqdm(
        range(0, count, batch_size), desc="shapes-eval subject pictures", disable=not progress
    ):
        chunk = pictures[start : start + batch_size]
        results = _check_images(
            roundtrip_fn([render_image(scene, size) for scene, _ in chunk]),
            len(chunk),
            "roundtrip_fn",
        )
        for (_, subject), image in zip(chunk, results, strict=True):
            kept.setdefault(subject.pattern, []).append(
                shows_subject(image.convert("RGB"), subject)
            )
    every = [ok for oks in kept.values() for ok in oks]
    out = {"subject_kept": float(np.mean(every)), "subject_kept_n": float(len(every))}
    out.update({f"subject_kept_{p}": float(np.mean(kept[p])) for p in sorted(kept)})
    return out


# ------------------------------------------------------------------------------------- folder


def _pinned(scene: Scene) -> CaptionSpec:
    """Constraints that only ``scene`` itself meets: every attribute of every object."""
    objs = []
    for o in scene.objects:
        pattern = o.subject.pattern if o.subject is not None else None
        secondary = o.subject.secondary if o.subject is not None else None
        objs.append(
            ObjectSpec(o.colour, o.shape, o.size, o.cell, pattern=pattern, secondary=secondary)
        )
    return CaptionSpec("state", tuple(objs))


def _open(folder: Path, name: str) -> Image.Image:
    path = folder / name
    if not path.is_file():
        raise UserInputError(f"{path} is listed but missing")
    with Image.open(path) as im:
        return im.convert("RGB")


def _score_export_record(folder: Path, rec: dict) -> list[Record]:
    task, files, index = rec["task"], rec["files"], rec["index"]
    out: list[Record] = []
    if task == "t2i":
        v = satisfies(_open(folder, files[0]), rec["caption"])
        category = categorise(parse_caption(rec["caption"]))
        out.append(_record(category, rec["caption"], index, v, file=files[0]))
    elif task == "vqa":
        v = satisfies(_open(folder, files[0]), _pinned(Scene.from_dict(rec["scene"])))
        out.append(_record("vqa_scene", rec["question"], index, v, file=files[0]))
    elif task == "story":
        images = [_open(folder, f) for f in files]
        score = score_story(images, rec["texts"])
        reasons = [r for rs in score.reasons for r in rs]
        out.append(
            Record(
                f"story_{len(files)}",
                rec["texts"][0],
                index,
                score.ok,
                reasons,
                {"files": files, "scene_match": score.scene_match},
            )
        )
    elif task == "edit":
        source, target = _open(folder, files[0]), _open(folder, files[1])
        v = score_edit(source, rec["instruction"], target)
        out.append(
            _record(f"edit_{rec['event']['kind']}", rec["instruction"], index, v, files=files)
        )
    elif task == "subject":
        target = _open(folder, files[-1])
        v = score_subject(target, rec["prompt"], rec["subject"])
        out.append(
            Record(
                "subject",
                rec["prompt"],
                index,
                v.ok,
                list(v.reasons),
                {"file": files[-1], "subject_ok": v.subject_ok, "prompt_ok": v.prompt_ok},
            )
        )
        for f, scene in zip(files[:-1], rec["references"], strict=True):
            pinned = satisfies(_open(folder, f), _pinned(Scene.from_dict(scene)))
            out.append(_record("subject_reference", rec["prompt"], index, pinned, file=f))
    else:
        raise UserInputError(f"unknown task {task!r} in {folder / 'metadata.jsonl'}")
    return out


def score_folder(folder: str | os.PathLike, *, progress: bool = True) -> Report:
    """Judge a folder of images.

    - Written by ``anygen data shapes`` (``metadata.jsonl``): t2i images against their
      canonical captions (categories as ``categorise``), stories and edits by their texts,
      subject targets by their prompts and subjects, VQA images and subject references
      against their exact scenes.
    - Written by ``anygen generate --prompts`` (``index.jsonl`` lines with ``prompt``,
      ``seed`` and ``file``): each image against its prompt.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{folder} is not a directory")
    meta, index = folder / "metadata.jsonl", folder / "index.jsonl"
    if meta.is_file():
        lines, kind = meta.read_text(encoding="utf-8").splitlines(), "export"
    elif index.is_file():
        lines, kind = index.read_text(encoding="utf-8").splitlines(), "generated"
    else:
        raise UserInputError(f"{folder} holds neither metadata.jsonl nor index.jsonl")
    name = (meta if kind == "export" else index).name
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"line {n} of {name} in {folder} is not JSON: {e}") from None
            if not isinstance(rec, dict):
                raise UserInputError(
                    f"line {n} of {name} in {folder} is not a JSON object: {line.strip()[:80]}"
                )
            records.append((n, rec))
    report = Report(kind)
    for n, rec in tqdm(records, desc="shapes-eval folder", disable=not progress):
        if kind == "export":
            try:
                report.records.extend(_score_export_record(folder, rec))
            except AnygenError:
                raise
            except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
                detail = f"lacks {e}" if isinstance(e, KeyError) else f"is malformed ({e})"
                raise UserInputError(f"line {n} of {name} in {folder} {detail}") from None
            continue
        missing = [k for k in ("prompt", "file") if k not in rec]
        if missing:
            raise UserInputError(f"line {n} of {name} in {folder} lacks {', '.join(missing)}")
        try:
            spec = parse_caption(rec["prompt"])
        except UserInputError as e:
            report.records.append(
                Record("out_of_grammar", rec["prompt"], rec.get("seed", -1), False, [str(e)])
            )
            continue
        v = satisfies(_open(folder, rec["file"]), spec)
        report.records.append(
            _record(categorise(spec), rec["prompt"], rec.get("seed", -1), v, file=rec["file"])
        )
    return report


__all__ = [
    "T2I_CATEGORIES",
    "Record",
    "Report",
    "T2IPrompt",
    "categorise",
    "run_caption",
    "run_edit",
    "run_story",
    "run_subject",
    "run_t2i",
    "score_folder",
    "t2i_prompts",
]
