"""shapes-eval (anygen.eval): detector, parser, judges and suites, on anygen.data's renders.

The judge is written from the spec alone; these tests hold it to anygen.data's ground truth:
>= 1000 random test-split scenes per canvas size, every true canonical caption accepted and
captions with exactly one thing altered rejected, at the rates asserted below.
"""

from __future__ import annotations

import ast
import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

import anygen.eval as eval_package
from anygen.data.export import write_shapes
from anygen.data.render import render_image, render_scene
from anygen.data.shapes import (
    canonical_captions,
    sample_edit,
    sample_rng,
    sample_scene,
    sample_story,
    sample_vqa,
    subject_sample,
)
from anygen.data.world import (
    CELLS_BY_POSITION,
    COLOURS,
    PATTERNS,
    SHAPES,
    Obj,
    Scene,
    Subject,
)
from anygen.errors import UserInputError
from anygen.eval import (
    CaptionSpec,
    ObjectSpec,
    Relation,
    detect_objects,
    parse_caption,
    parse_event,
    parse_instruction,
    parse_subject_prompt,
    run_caption,
    run_edit,
    run_reconstruction,
    run_story,
    run_subject,
    run_t2i,
    satisfies,
    score_answer,
    score_caption,
    score_edit,
    score_folder,
    score_story,
    score_subject,
    shows_subject,
    t2i_prompts,
)
from anygen.eval.detect import analyse_image
from anygen.eval.judge import split_story
from anygen.eval.suites import T2I_CATEGORIES, categorise, select_edit_settings

logger = logging.getLogger(__name__)

N_SCENES = {64: 1000, 49: 1000, 128: 1000}
MIN_ACCEPT = 0.99
MIN_REJECT = 0.99


# --------------------------------------------------------------------------- helpers


def _scenes(n: int, seed: int) -> list[Scene]:
    """Random test-split scenes (1-3 objects, held-out pairs included, repeats allowed)."""
    rng = random.Random(f"shapes-eval-test/{seed}")
    return [sample_scene(rng, None, "test", distinct=rng.random() < 0.7) for _ in range(n)]


def _key(o) -> tuple:
    return (o.col, o.row, o.colour, o.shape, o.size)


def _flip(relation: str) -> str:
    return {
        "to the left of": "to the right of",
        "to the right of": "to the left of",
        "above": "below",
        "below": "above",
    }[relation]


def _wrong_captions(spec: CaptionSpec, scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, text): the caption with exactly one thing altered, one per applicable kind."""
    out: list[tuple[str, CaptionSpec]] = []
    objs = list(spec.objects)
    other_colour = lambda c: rng.choice([x for x in COLOURS if x != c])  # noqa: E731
    other_shape = lambda s: rng.choice([x for x in SHAPES if x != s])  # noqa: E731
    if spec.form == "count":
        o = objs[0]
        n = len(objs)
        out.append(("colour", spec.with_objects((replace(o, colour=other_colour(o.colour)),) * n)))
        out.append(("shape", spec.with_objects((replace(o, shape=other_shape(o.shape)),) * n)))
        out.append(("count", spec.with_objects((o,) * (5 - n))))  # two <-> three
    else:
        i = rng.randrange(len(objs))
        truth = next(
            t for t in scene.objects if (t.colour, t.shape) == (objs[i].colour, objs[i].shape)
        )
        for kind, change in (
            ("colour", {"colour": other_colour(objs[i].colour)}),
            ("shape", {"shape": other_shape(objs[i].shape)}),
            ("size", {"size": "small" if truth.size == "large" else "large"}),
        ):
            out.append(
                (
                    kind,
                    spec.with_objects(
                        tuple(replace(o, **change) if k == i else o for k, o in enumerate(objs))
                    ),
                )
            )
        if spec.form == "position":
            cell = rng.choice([c for c in CELLS_BY_POSITION.values() if c != objs[0].cell])
            out.append(("position", spec.with_objects((replace(objs[0], cell=cell),))))
        if spec.form == "relation":
            r = spec.relations[0]
            out.append(
                (
                    "relation",
                    replace(spec, relations=(Relation(r.first, _flip(r.relation), r.second),)),
                )
            )
        if len(objs) < 3:
            extra = ObjectSpec(rng.choice(list(COLOURS)), rng.choice(SHAPES))
            base = [replace(o, cell=None) for o in objs] if spec.form == "position" else objs
            out.append(("added", CaptionSpec("conjunction", (*base, extra))))
        if len(objs) >= 2:
            kept = objs[:i] + objs[i + 1 :]
            form = "object" if len(kept) == 1 else "conjunction"
            out.append(("dropped", CaptionSpec(form, tuple(kept))))
    return [(kind, s.to_text()) for kind, s in out]


def _rates(size: int, n: int, seed: int, transform=None) -> dict:
    """Detect every scene's image; accept/reject rates of true and one-off-wrong captions."""
    rng = random.Random(f"captions/{seed}")
    scenes = _scenes(n, seed)
    images = [render_scene(s, size) for s in scenes]
    if transform is not None:
        images = [transform(im, k) for k, im in enumerate(images)]
    t0 = time.perf_counter()
    detections = [detect_objects(im) for im in images]
    seconds = time.perf_counter() - t0
    exact = sum(
        sorted(map(_key, d)) == sorted(map(_key, s.objects))
        for d, s in zip(detections, scenes, strict=True)
    )
    accepted = true_total = rejected = wrong_total = 0
    missed: dict[str, int] = {}
    for scene, dets in zip(scenes, detections, strict=True):
        captions = canonical_captions(scene)
        for text in rng.sample(captions, min(4, len(captions))):
            true_total += 1
            accepted += satisfies(dets, text).ok
            for kind, wrong in _wrong_captions(parse_caption(text), scene, rng):
                if satisfies(scene, wrong).ok:  # still true (two identical objects): skip
                    continue
                wrong_total += 1
                ok = satisfies(dets, wrong).ok
                rejected += not ok
                if ok:
                    missed[kind] = missed.get(kind, 0) + 1
    return {
        "exact": exact / n,
        "accept": accepted / true_total,
        "reject": rejected / wrong_total,
        "n_true": true_total,
        "n_wrong": wrong_total,
        "missed": missed,
        "images_per_s": n / seconds,
    }


# --------------------------------------------------------------------------- detector


def test_judge_is_independent_of_the_generator():
    """detect, parse and judge read only the spec's constants (anygen.data.world)."""
    allowed = {"anygen.data.world", "anygen.errors", "anygen.eval.detect", "anygen.eval.parse"}
    folder = Path(eval_package.__file__).parent
    for name in ("detect", "parse", "judge"):
        tree = ast.parse(open(f"{folder}/{name}.py", encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, (name, "relative import", node.module)
                if node.module.startswith("anygen"):
                    assert node.module in allowed, (name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("anygen") for a in node.names), name


@pytest.mark.parametrize("size", [64, 49, 128])
def test_detector_and_judge_on_ground_truth(size):
    r = _rates(size, N_SCENES[size], seed=size)
    logger.warning("shapes-eval at %d px: %s", size, r)
    # every object's colour, shape, size and cell recovered in every scene
    assert r["exact"] == 1.0, r
    assert r["accept"] >= MIN_ACCEPT, r
    assert r["reject"] >= MIN_REJECT, r
    assert r["n_true"] >= 1000 and r["n_wrong"] >= 3000
    if size == 64:
        # >= 200 images/s on a free core; the bound is loose for the shared CI machine
        assert r["images_per_s"] >= 60, r


def _blur_noise(radius: float, sigma: float, seed: int = 0):
    def f(img: np.ndarray, k: int) -> np.ndarray:
        out = np.asarray(
            Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32
        )
        noise = np.random.default_rng(seed * 100_003 + k).normal(0.0, sigma, out.shape)
        return np.clip(np.rint(out + noise), 0, 255).astype(np.uint8)

    return f


@pytest.mark.parametrize("radius,sigma", [(0.8, 0.0), (0.0, 12.0), (1.0, 8.0)])
def test_robust_to_mild_blur_and_noise(radius, sigma):
    r = _rates(64, 250, seed=7, transform=_blur_noise(radius, sigma))
    logger.warning("shapes-eval 64 px blur %.1f noise %.0f: %s", radius, sigma, r)
    assert r["exact"] >= 0.99, r
    assert r["accept"] >= 0.98, r
    assert r["reject"] >= 0.98, r


def test_detection_fields_and_specks():
    scene = Scene(
        (Obj("triangle", "purple", "large", 0, 2, 1, -1), Obj("star", "white", "small", 2, 0))
    )
    img = render_scene(scene, 64)
    img[30:32, 30:32] = (220, 50, 50)  # a 4-px red speck: ignored, with a reason
    analysis = analyse_image(Image.fromarray(img))
    assert [(d.colour, d.shape, d.size, d.cell, d.position) for d in analysis.detections] == [
        ("white", "star", "small", (2, 0), "top right"),
        ("purple", "triangle", "large", (0, 2), "bottom left"),
    ]
    tri = analysis.detections[1]
    # Obj.bbox (3, 43, 21, 61), from pixels at least half covered: the tip row is not
    assert all(abs(a - b) <= 1 for a, b in zip(tri.bbox, scene.objects[0].bbox(64), strict=True))
    assert abs(tri.centre[0] - 12) < 0.3 and abs(tri.centre[1] - 52) < 0.3
    assert abs(tri.radius - 9) < 0.3 and tri.shape_error < 0.05 and tri.pattern is None
    assert len(analysis.ignored) == 1 and "speck" in analysis.ignored[0]
    assert detect_objects(np.full((64, 64, 3), 24, np.uint8)) == []


def test_detector_rejects_bad_input():
    with pytest.raises(UserInputError, match="shape"):
        detect_objects(np.zeros((64, 64), np.uint8))
    with pytest.raises(UserInputError, match="too small"):
        detect_objects(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserInputError, match="PIL image or a numpy array"):
        detect_objects("image.png")


def _subject_right(d, obj: Obj) -> bool:
    """Shape, size, cell, pattern and both colours (unordered for stripes) as rendered."""
    if d is None:
        return False
    subject = obj.subject
    if subject.pattern == "striped":
        colours_ok = {d.colour, d.secondary} == {obj.colour, subject.secondary}
    else:
        colours_ok = (d.colour, d.secondary) == (obj.colour, subject.secondary)
    same = (d.shape, d.size, d.cell, d.pattern) == (obj.shape, obj.size, obj.cell, subject.pattern)
    return same and colours_ok


@pytest.mark.parametrize(
    "size,blur,minimum", [(64, 0.0, 0.98), (128, 0.0, 0.98), (64, 0.8, 0.95), (49, 0.0, 0.9)]
)
def test_subject_patterns_detected(size, blur, minimum):
    """Subjects beside a plain object; measured: 100 % at 64 and 128 px sharp and at 64 px
    blurred (radius 0.8), ~97 % at 48 px where a dot is under a pixel (measured before 48
    px was refused; 49 is its neighbour)."""
    rng = random.Random(f"patterns/{size}/{blur}")
    total = right = 0
    for _ in range(150):
        colour, secondary = rng.sample(list(COLOURS), 2)
        pattern = Subject(rng.choice(PATTERNS), secondary)
        size_name, col, row = rng.choice(["small", "large"]), rng.randrange(3), rng.randrange(3)
        obj = Obj(rng.choice(SHAPES), colour, size_name, col, row, subject=pattern)
        others = [o for o in sample_scene(rng, 2, "test").objects if o.cell != obj.cell][:1]
        scene = Scene((obj, *others))
        if not scene.is_valid():
            continue
        image = render_scene(scene, size)
        if blur:
            image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)))
        dets = {d.cell: d for d in detect_objects(image)}
        total += 1
        right += _subject_right(dets.get(obj.cell), obj)
        if size >= 64:
            for o in others:  # plain neighbours stay plain
                assert dets[o.cell].pattern is None and dets[o.cell].colour == o.colour
    logger.warning("subject patterns at %d px, blur %.1f: %d / %d", size, blur, right, total)
    assert right / total >= minimum


# --------------------------------------------------------------------------- parser


def test_every_caption_form_parses_and_round_trips():
    cases = {
        "a red circle": ("object", 1),
        "a large white diamond": ("object", 1),
        "a small blue star in the top left": ("position", 1),
        "a green cross in the center": ("position", 1),
        "a red circle to the left of a small blue square": ("relation", 2),
        "a large cyan triangle to the right of a yellow star": ("relation", 2),
        "a purple square above a orange circle": ("relation", 2),
        "a red circle below a red square": ("relation", 2),
        "a red circle and a blue circle": ("conjunction", 2),
        "a small red circle and a large blue cross and a white star": ("conjunction", 3),
        "two red circles": ("count", 2),
        "three white crosses": ("count", 3),
    }
    for text, (form, n) in cases.items():
        spec = parse_caption(text)
        assert (spec.form, spec.count) == (form, n), text
        assert spec.to_text() == text
    spec = parse_caption("a small blue star in the bottom right")
    assert spec.objects[0] == ObjectSpec("blue", "star", "small", (2, 2))
    spec = parse_caption("a red circle above a small blue square")
    assert spec.relations == (Relation(0, "above", 1),)
    assert spec.objects[1] == ObjectSpec("blue", "square", "small")
    # every canonical caption of random scenes round-trips
    for scene in _scenes(200, seed=3):
        for text in canonical_captions(scene):
            assert parse_caption(text).to_text() == text


@pytest.mark.parametrize(
    "text,why",
    [
        ("a pink circle", "unknown word 'pink'"),
        ("A red circle", "lower case"),
        ("a red circle.", "full stop"),
        ("a red  circle", "single spaces"),
        ("a red", "expected a shape"),
        ("red circle", "expected 'a'"),
        ("a red circle in the middle", "unknown word 'middle'"),
        ("a red circle near a blue square", "unknown word 'near'"),
        ("a red circle and a blue square and a green star and a white cross", "at most 3"),
        ("four red circles", "unknown word 'four'"),
        ("two red circle", "plural"),
        ("a red circle to the left a blue square", "relation"),
        ("", "empty"),
        ("the sks circle", "expected 'a'"),
    ],
)
def test_out_of_grammar_caption_raises_naming_the_text(text, why):
    with pytest.raises(UserInputError) as e:
        parse_caption(text)
    assert repr(text) in str(e.value) and why in str(e.value)


def test_events_and_instructions_parse_and_round_trip():
    rng = random.Random(5)
    kinds = set()
    for _ in range(300):
        edit = sample_edit(rng, "test")
        event = edit.event
        kinds.add(event.kind)
        assert parse_event(event.story_text()) == event
        assert parse_instruction(event.instruction()) == event
        assert parse_instruction(edit.instruction) == event
    assert kinds == {"move", "recolour", "grow", "shrink", "appear", "disappear"}
    assert parse_event("the red circle moves to the top left").position == "top left"
    assert parse_instruction("make the red circle large").kind == "grow"
    assert parse_instruction("make the red circle blue").new_colour == "blue"
    for bad, parser in [
        ("the red circle jumps", parse_event),
        ("the red circle moves to the middle", parse_event),
        ("a red circle appears", parse_event),
        ("make the red circle huge", parse_instruction),
        ("paint the red circle blue", parse_instruction),
        ("move the red circle to the top left", parse_event),
    ]:
        with pytest.raises(UserInputError, match="outside the shapes-world grammar") as e:
            parser(bad)
        assert repr(bad) in str(e.value)


def test_subject_prompts_parse():
    spec = parse_subject_prompt("the sks circle to the left of a blue square")
    assert spec.objects[0] == ObjectSpec(None, "circle", subject=True)
    assert spec.to_text() == "the sks circle to the left of a blue square"
    assert parse_subject_prompt("a red star and the sks cross").objects[1].subject
    assert parse_subject_prompt("the sks star in the top right").objects[0].cell == (2, 0)
    with pytest.raises(UserInputError, match="names no subject"):
        parse_subject_prompt("a red circle")
    with pytest.raises(UserInputError, match="at most one"):
        parse_subject_prompt("the sks circle and the sks square")
    with pytest.raises(UserInputError, match="outside"):
        parse_subject_prompt("two sks circles")


# --------------------------------------------------------------------------- judges


def test_satisfies_reasons_name_the_failure():
    scene = Scene((Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 2, 2)))
    img = render_image(scene)
    assert satisfies(img, "a red circle above a blue square")
    v = satisfies(img, "a red circle below a blue square")
    assert not v and "is not below" in v.reasons[0]
    v = satisfies(img, "a small red circle and a blue square")
    assert not v and "(size)" in v.reasons[0]
    v = satisfies(img, "a red circle")
    assert not v and "expected 1 object" in v.reasons[0] and "found 2" in v.reasons[0]
    assert not satisfies(img, "two red circles")


def _pairs_with_ground_truth(n: int, seed: int):
    rng = random.Random(seed)
    return [sample_story(rng, None, "test") for _ in range(n)]


def test_story_scorer_truth_and_perturbations():
    stories = _pairs_with_ground_truth(60, 11)
    for story in stories:
        images = [render_image(s) for s in story.scenes]
        score = score_story(images, story.texts)
        assert score.ok and score.scene_match == 1.0 and score.event_grammar_rate == 1.0, (
            story.texts,
            score,
        )
        # the last scene left as it was before the last event: that scene fails
        stale = score_story(images[:-1] + [images[-2]], story.texts)
        assert stale.scene_ok == [True] * (len(images) - 1) + [False]
        # an event text outside the grammar: counted, and its scene and later ones fail
        broken = score_story(images, [story.texts[0], "the red circle jumps", *story.texts[2:]])
        assert broken.text_in_grammar[1] is False and broken.event_grammar_rate < 1.0
        assert broken.scene_ok[0] and not any(broken.scene_ok[1:])
    # a relation of the first caption is dropped once its object moved
    a = Obj("circle", "red", "small", 0, 1)
    b = Obj("square", "blue", "small", 2, 1)
    moved = Scene((a.with_(col=2, row=0), b))
    texts = ["a red circle to the left of a blue square", "the red circle moves to the top right"]
    assert score_story([Scene((a, b)), moved], texts).ok
    # an event naming no object of the state fails from that scene on
    bad = score_story([Scene((a, b)), moved], [texts[0], "the green star grows"])
    assert bad.scene_ok == [True, False] and "holds 0" in bad.reasons[1][0]


def test_split_story_pairs_texts_with_images():
    i1, i2, i3 = (render_image(Scene((Obj("circle", "red", "small", k, 0),))) for k in range(3))
    images, texts = split_story("a red circle", [i1, "the red circle grows", i2, i3])
    assert images == [i1, i2, i3] and texts == ["a red circle", "the red circle grows", ""]
    images, texts = split_story("a red circle", ["a red circle", i1, "the red circle shrinks", i2])
    assert texts == ["a red circle", "the red circle shrinks"]


def test_edit_scorer_truth_and_perturbations():
    rng = random.Random(12)
    for _ in range(80):
        edit = sample_edit(rng, "test")
        source, target = render_image(edit.source), render_image(edit.target)
        assert score_edit(source, edit.instruction, target), edit
        assert score_edit(edit.source, edit.instruction, target)  # source given as a Scene
        assert not score_edit(source, edit.instruction, source)  # nothing done
        # the instructed change plus one other object changed
        e = edit.event
        edited = {(e.colour, e.shape), (e.new_colour, e.shape)}
        others = [k for k, o in enumerate(edit.target.objects) if (o.colour, o.shape) not in edited]
        if others:
            k = others[0]
            o = edit.target.objects[k]
            size = "small" if o.size == "large" else "large"
            objs = list(edit.target.objects)
            objs[k] = o.with_(size=size, dx=0, dy=0)
            changed = Scene(tuple(objs))
            if changed.is_valid():
                v = score_edit(source, edit.instruction, render_image(changed))
                assert not v and "(size)" in " ".join(v.reasons), (edit, v)
    v = score_edit(
        Scene((Obj("circle", "red", "small", 0, 0),)),
        "remove the blue star",
        Scene((Obj("circle", "red", "small", 0, 0),)),
    )
    assert not v and "does not apply" in v.reasons[0]
    with pytest.raises(UserInputError, match="instruction"):
        score_edit(Scene((Obj("circle", "red", "small", 0, 0),)), "paint it blue", [])


def test_subject_scorer_truth_and_perturbations():
    rng = random.Random(13)
    for _ in range(60):
        sample = subject_sample(rng, "test")
        image = render_image(sample.scene)
        v = score_subject(image, sample.prompt, sample.subject)
        assert v.ok and v.subject_ok and v.prompt_ok, (sample.prompt, sample.subject, v)
        # another pattern: subject fidelity fails, prompt fidelity holds
        s = sample.subject
        wrong = type(s)(s.shape, s.colour, next(p for p in PATTERNS if p != s.pattern), s.secondary)
        v = score_subject(image, sample.prompt, wrong)
        assert not v.subject_ok and v.prompt_ok and not v.ok
        # another secondary colour
        sec = next(c for c in COLOURS if c not in (s.colour, s.secondary))
        v = score_subject(image, sample.prompt, type(s)(s.shape, s.colour, s.pattern, sec))
        assert not v.subject_ok and not v.ok
        # the subject dropped from the image: both fail (when something else remains)
        if len(sample.scene.objects) > 1:
            rest = Scene(sample.scene.objects[1:])
            v = score_subject(render_image(rest), sample.prompt, sample.subject)
            assert not v.subject_ok and not v.prompt_ok
    with pytest.raises(UserInputError, match="subject is a"):
        score_subject(
            Scene((Obj("circle", "red", "small", 0, 0),)),
            "the sks star",
            {"shape": "circle", "colour": "red", "pattern": "ringed", "secondary": "blue"},
        )


def test_caption_scorer_and_vqa():
    for scene in _scenes(150, seed=17):
        for text in canonical_captions(scene)[:3]:
            assert score_caption(scene, text)
            assert score_caption(render_image(scene), text)
        o = scene.objects[0]
        wrong_colour = next(c for c in COLOURS if not scene.find(c, o.shape))
        spec = CaptionSpec(
            "conjunction" if len(scene.objects) > 1 else "object",
            tuple(
                ObjectSpec(wrong_colour if k == 0 else x.colour, x.shape)
                for k, x in enumerate(scene.objects)
            ),
        )
        assert not score_caption(scene, spec.to_text())
    scene = Scene((Obj("circle", "red", "small", 0, 0), Obj("square", "blue", "small", 1, 0)))
    assert not score_caption(scene, "a red circle")  # names too few objects
    v = score_caption(scene, "A red circle.")
    assert not v and "grammar" in v.reasons[0]
    rng = random.Random(19)
    for scene in _scenes(100, seed=19):
        question, answer = sample_vqa(rng, scene, "test")
        assert score_answer(answer, answer) and score_answer(f" The {answer.upper()}. ", answer)
        assert not score_answer("purple" if answer != "purple" else "red", answer)
    assert (
        score_answer("2", "two") and score_answer("centre", "center") and not score_answer("", "no")
    )


# --------------------------------------------------------------------------- suites


def test_t2i_suite_scores_truth_high_and_wrong_prompts_low():
    prompts = t2i_prompts(42, seed=0)  # n in all: 6 per category
    assert len(prompts) == 42 and len(t2i_prompts(10, seed=0)) == 10
    assert [p.prompt for p in prompts] == [
        p.prompt for p in t2i_prompts(42, seed=0)
    ]  # deterministic
    assert [p.prompt for p in prompts] != [p.prompt for p in t2i_prompts(42, seed=1)]
    assert {p.category for p in prompts} == set(T2I_CATEGORIES)
    for p in prompts:
        spec = parse_caption(p.prompt)
        assert categorise(spec) == p.category
        held = any(
            pair
            in {
                ("purple", "triangle"),
                ("orange", "circle"),
                ("cyan", "star"),
                ("white", "diamond"),
            }
            for pair in ((o.colour, o.shape) for o in spec.objects)
        )
        assert held == (p.category == "held_out")
        if p.category == "colour_attribution":
            # a shape named twice, in two different colours
            by_shape = {}
            for o in spec.objects:
                by_shape.setdefault(o.shape, []).append(o.colour)
            repeated = [cs for cs in by_shape.values() if len(cs) > 1]
            assert repeated and all(len(set(cs)) == len(cs) for cs in repeated)
    lookup = {p.prompt: p.scene for p in prompts}
    texts = list(lookup)
    calls = []

    def truth(batch, seeds):
        calls.append(len(batch))
        return [render_image(lookup[t]) for t in batch]

    report = run_t2i(truth, n=42, seed=0, batch_size=5, progress=False)
    assert report.overall == 1.0 and max(calls) == 5 and sum(calls) == len(prompts)
    assert {k: n for k, (n, _) in report.categories.items()} == dict.fromkeys(T2I_CATEGORIES, 6)
    assert "overall" in report.table() and "colour_attribution" in report.table()
    data = json.loads(report.to_json())
    assert data["overall"] == 1.0 and len(data["records"]) == len(prompts)

    def other(batch, seeds):  # the ground truth of a different prompt
        return [render_image(lookup[texts[(texts.index(t) + 7) % len(texts)]]) for t in batch]

    report = run_t2i(other, n=42, seed=0, progress=False)
    assert report.overall <= 0.1, report.table()
    assert all(r.reasons for r in report.records if not r.ok)
    with pytest.raises(UserInputError, match="list of 1 images"):
        run_t2i(lambda b, s: [], n=1, seed=0, batch_size=1, progress=False)


def test_other_suites_on_ground_truth():
    def captioner(images):
        # an oracle captioner: read the scene back from the detector
        out = []
        for im in images:
            dets = detect_objects(im)
            spec = CaptionSpec(
                "conjunction" if len(dets) > 1 else "object",
                tuple(ObjectSpec(d.colour, d.shape, d.size) for d in dets),
            )
            out.append(spec.to_text())
        return out

    report = run_caption(captioner, None, n=12, seed=0, progress=False)
    assert report.overall == 1.0 and report.metrics["caption_in_grammar"] == 1.0
    report = run_caption(lambda ims: ["a red blob"] * len(ims), None, n=4, seed=0, progress=False)
    assert report.overall == 0.0 and report.metrics["caption_in_grammar"] == 0.0

    truth = {}
    for i in range(8):
        rng = sample_rng(0, "eval-vqa", i)
        scene = sample_scene(rng, None, "test")
        truth[i] = sample_vqa(rng, scene, "test")
    answers = iter([truth[i][1] for i in range(8)])
    report = run_caption(
        None, lambda ims, qs: [next(answers) for _ in qs], n=8, seed=0, progress=False
    )
    assert report.overall == 1.0 and all(r.category.startswith("vqa_") for r in report.records)

    stories = {}
    for i in range(5):
        story = sample_story(sample_rng(0, "eval-story", i), None, "test")
        stories[story.texts[0]] = story

    def teller(prompt, n_scenes, seed):
        story = stories[prompt]
        segs = [render_image(story.scenes[0])]
        for text, scene in zip(story.texts[1:], story.scenes[1:], strict=True):
            segs += [text, render_image(scene)]
        return segs

    report = run_story(teller, n=5, seed=0, progress=False)
    assert report.overall == 1.0 and report.metrics["scene_match"] == 1.0
    assert report.metrics["event_grammar_rate"] == 1.0
    report = run_story(
        lambda p, n, s: [render_image(stories[p].scenes[0])], n=5, seed=0, progress=False
    )
    assert report.overall == 0.0 and report.metrics["scene_match"] < 0.6
    assert report.metrics["event_grammar_rate"] == 0.0  # events never written are not in it

    def two_scenes(prompt, n_scenes, seed):  # stops after its first event
        return teller(prompt, n_scenes, seed)[:3]

    report = run_story(two_scenes, n=5, seed=0, progress=False)
    for record in report.records:
        n_events = int(record.category.removeprefix("story_")) - 1
        assert record.extra["event_grammar_rate"] == pytest.approx(1 / n_events)

    edits = {}
    for i in range(6):
        edit = sample_edit(sample_rng(0, "eval-edit", i), "test")
        edits[edit.instruction] = edit
    report = run_edit(
        lambda im, ins, s: render_image(edits[ins].target), n=6, seed=0, progress=False
    )
    assert report.overall == 1.0
    report = run_edit(lambda im, ins, s: im, n=6, seed=0, progress=False)  # returns the source
    assert report.overall == 0.0

    subjects = {}
    for i in range(6):
        sample = subject_sample(sample_rng(0, "eval-subject", i), "test")
        subjects[sample.prompt] = sample
    report = run_subject(
        lambda refs, p, s: render_image(subjects[p].scene), n=6, seed=0, progress=False
    )
    assert report.overall == 1.0 and report.metrics["subject_fidelity"] == 1.0


def test_select_edit_settings_keeps_the_setting_that_edits_best_on_validation_edits():
    """An oracle editor that edits only under image guidance 2.0 (else returns the source):
    selection keeps 2.0, scores every setting on seed 1000's edits, never seed 0's."""
    seen = []

    def edit(image, instruction, seed, setting):
        seen.append(seed)
        if setting["image_guidance_scale"] != 2.0:
            return image
        for i in range(4):
            candidate = sample_edit(sample_rng(1000, "eval-edit", i), "test")
            if candidate.instruction == instruction:
                return render_image(candidate.target)
        raise AssertionError(f"{instruction!r} is not a seed-1000 validation edit")

    grid = [{"guidance_scale": 4.0, "image_guidance_scale": g} for g in (1.5, 2.0, 3.0)]
    selection = select_edit_settings(edit, grid, n=4)
    assert selection["chosen"] == {"guidance_scale": 4.0, "image_guidance_scale": 2.0}
    assert [row["validation_overall"] for row in selection["grid"]] == [0.0, 1.0, 0.0]
    assert selection["n"] == 4 and selection["seed"] == 1000
    assert seen == [1000, 1001, 1002, 1003] * 3


def test_choose_edit_setting_replaces_the_plain_pair_only_by_the_margin():
    """An oracle editor that edits only under image guidance 2.0 (else returns the source),
    on two validation seeds: every setting is scored on both seeds' edits, the plain pair
    gets none right, and 2.0 replaces it by the rule's margin, but not by a larger one."""
    from anygen.eval.suites import choose_edit_setting

    def edit(image, instruction, seed, setting):
        if setting["image_guidance_scale"] != 2.0:
            return image
        for base in (1000, 2000):
            for i in range(3):
                candidate = sample_edit(sample_rng(base, "eval-edit", i), "test")
                if candidate.instruction == instruction:
                    return render_image(candidate.target)
        raise AssertionError(f"{instruction!r} is not a validation edit")

    plain = {"guidance_scale": 4.0, "image_guidance_scale": 1.5}
    grid = [{"guidance_scale": 4.0, "image_guidance_scale": g} for g in (1.5, 2.0)]
    won = choose_edit_setting(edit, grid, plain, n=3, seeds=(1000, 2000), margin=6)
    assert won["chosen"] == {"guidance_scale": 4.0, "image_guidance_scale": 2.0}
    assert [row["validation_right"] for row in won["grid"]] == [0, 6]
    assert won["plain"]["validation_right"] == 0 and won["n"] == 6
    kept = choose_edit_setting(edit, grid, plain, n=3, seeds=(1000, 2000), margin=7)
    assert kept["chosen"] is None


def test_score_folder_export_and_generated(tmp_path):
    for task in ("t2i", "story", "edit", "subject", "vqa"):
        out = write_shapes(task, 6, seed=3, output_dir=tmp_path / task, size=64, split="test")
        report = score_folder(out, progress=False)
        assert report.overall == 1.0, (
            task,
            report.table(),
            [r.reasons for r in report.records if not r.ok],
        )
    # a folder as `anygen generate --prompts` writes it: one right, one wrong, one out of grammar
    gen = tmp_path / "generated"
    gen.mkdir()
    right = Scene((Obj("circle", "red", "large", 0, 0), Obj("star", "blue", "small", 2, 2)))
    render_image(right).save(gen / "0.png")
    render_image(right).save(gen / "1.png")
    lines = [
        {"prompt": "a red circle above a blue star", "seed": 0, "file": "0.png"},
        {"prompt": "a red circle below a blue star", "seed": 1, "file": "1.png"},
        {"prompt": "a red blob", "seed": 2, "file": "1.png"},
    ]
    (gen / "index.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = score_folder(gen, progress=False)
    assert [r.ok for r in report.records] == [True, False, False]
    assert [r.category for r in report.records] == ["relation", "relation", "out_of_grammar"]
    with pytest.raises(UserInputError, match="neither metadata.jsonl nor index.jsonl"):
        score_folder(tmp_path / "t2i" / "..", progress=False)


def test_the_caption_suite_seeds_image_i_with_seed_plus_i(monkeypatch):
    import anygen.eval.run as run

    seen = {"caption": [], "vqa": []}

    class Captioner:  # records the seeds it is given; captions are not judged here
        def caption(self, images, options):
            seen["caption"].append((options.seed, len(images)))
            return ["a red circle"] * len(images)

        def answer(self, images, questions, options):
            seen["vqa"].append((options.seed, len(images)))
            return ["yes"] * len(images)

    monkeypatch.setattr(run, "load_generator", lambda *a, **k: Captioner())
    run.evaluate_model("fake", "caption", n=10, seed=123, batch_size=4, progress=False)
    assert seen["caption"] == [(123, 4), (127, 4), (131, 2)]
    assert seen["vqa"] == [(123, 4), (127, 4), (131, 2)]


@pytest.mark.parametrize(
    "caption, category",
    [
        ("a red circle and a blue circle", "colour_attribution"),
        ("a red circle and a blue circle and a green square", "colour_attribution"),
        ("a red circle and a red circle", "multiple_objects"),  # one object named twice
        ("a red circle and a blue square", "two_objects"),
        ("a red circle and a blue square and a green star", "multiple_objects"),
    ],
)
def test_categorise_conjunctions(caption, category):
    assert categorise(parse_caption(caption)) == category


def test_suites_refuse_bad_batch_sizes_categories_and_returns():
    with pytest.raises(UserInputError, match="batch size must be a positive integer, got 0"):
        run_t2i(lambda p, s: [], n=3, batch_size=0, progress=False)
    with pytest.raises(UserInputError, match="batch size must be a positive integer, got -1"):
        run_reconstruction(lambda ims: ims, n=3, batch_size=-1, progress=False)
    with pytest.raises(UserInputError, match="non-empty sequence"):
        t2i_prompts(5, 0, "held_out")
    with pytest.raises(UserInputError, match="non-empty sequence"):
        t2i_prompts(5, 0, ())
    with pytest.raises(UserInputError, match="named more than once"):
        t2i_prompts(5, 0, ("held_out", "held_out"))
    with pytest.raises(UserInputError, match="edit_fn must return an image, got list"):
        run_edit(lambda im, ins, s: [im], n=1, progress=False)
    with pytest.raises(UserInputError, match="subject_fn must return an image, got list"):
        run_subject(lambda refs, p, s: [refs[0]], n=1, progress=False)


def test_a_story_keeps_what_its_first_picture_drew():
    # the caption leaves size and cell open; the first picture fixes them for later scenes
    big = Obj("circle", "red", "large", 0, 0)
    assert score_story([Scene((big,))] * 2, ["a red circle", "the red circle grows"]).scene_ok == [
        True,
        False,  # "grows" needs a small circle: the state is lost from here
    ]
    small = big.with_(size="small")
    grown = score_story([Scene((small,)), Scene((big,))], ["a red circle", "the red circle grows"])
    assert grown.scene_ok == [True, True]
    # an object no event touches keeps its cell
    square = Obj("square", "blue", "small", 2, 0)
    texts = ["a red circle to the left of a blue square", "the red circle grows"]
    moved = [Scene((small, square)), Scene((big.with_(row=2), square.with_(row=2)))]
    assert score_story(moved, texts).scene_ok == [True, False]
    kept = [Scene((small, square)), Scene((big, square))]
    assert score_story(kept, texts).scene_ok == [True, True]


def test_judge_reads_float_images_with_overshoot_and_refuses_bad_input():
    scene = Scene((Obj("circle", "red", "large", 1, 1),))
    image = render_scene(scene) / 255.0
    image[0, 0, 0] = 1.01  # a decoder's overshoot
    assert [d.describe() for d in detect_objects(image)] == ["large red circle at center"]
    image[0, 0, 0] = np.nan
    with pytest.raises(UserInputError, match="NaN or infinite"):
        detect_objects(image)
    with pytest.raises(UserInputError, match="at least 18 x 18: below, small and large"):
        detect_objects(np.zeros((17, 17, 3), np.uint8))
    with pytest.raises(UserInputError, match="spec must be a caption string or a CaptionSpec"):
        satisfies(scene, None)
    with pytest.raises(UserInputError, match="lacks pattern, secondary"):
        score_subject(scene, "the sks circle", {"shape": "circle", "colour": "red"})
    with pytest.raises(UserInputError, match="unknown pattern 'ring'"):
        score_subject(
            scene,
            "the sks circle",
            {"shape": "circle", "colour": "red", "pattern": "ring", "secondary": "blue"},
        )


def test_score_folder_names_a_malformed_metadata_line(tmp_path):
    out = tmp_path / "export"
    write_shapes("t2i", 2, 0, out)
    meta = out / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    meta.write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(UserInputError, match="line 2 of metadata.jsonl .* is not a JSON object"):
        score_folder(out, progress=False)
    meta.write_text(lines[0] + "\n" + '{"files": ["x.png"], "index": 1}' + "\n")
    with pytest.raises(UserInputError, match="line 2 of metadata.jsonl .* lacks 'task'"):
        score_folder(out, progress=False)


def test_evaluate_model_checks_its_arguments_before_loading(monkeypatch):
    import anygen.eval.run as run

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run, "load_generator", never)
    with pytest.raises(UserInputError, match="number of samples must be a positive integer"):
        run.evaluate_model("shapes-fusion", "t2i", n=0)
    with pytest.raises(UserInputError, match="batch size must be a positive integer"):
        run.evaluate_model("shapes-fusion", "t2i", n=3, batch_size=0)


def _unpatterned(scene: Scene) -> Scene:
    return Scene(tuple(replace(o, subject=None) for o in scene.objects))


def test_shows_subject_needs_the_pattern_and_both_colours():
    sample = subject_sample(sample_rng(0, "eval-subject", 0), "test")
    picture = render_image(sample.references[0], 64)
    assert shows_subject(picture, sample.subject)
    assert not shows_subject(render_image(_unpatterned(sample.references[0]), 64), sample.subject)
    other = "striped" if sample.subject.pattern != "striped" else "dotted"
    assert not shows_subject(picture, replace(sample.subject, pattern=other))


def test_reconstruction_counts_the_subjects_a_codec_keeps():
    """Subject pictures that come back plain are not kept; the scenes' overall is untouched."""
    pictures = []  # (reference scene, its subject's pattern), in the suite's order
    for i in range(3):
        sample = subject_sample(sample_rng(0, "eval-subject", i), "test")
        pictures += [(scene, sample.subject.pattern) for scene in sample.references]
    plain = {render_image(s, 64).tobytes(): render_image(_unpatterned(s), 64) for s, _ in pictures}

    def drop_patterns(images):
        return [plain.get(im.tobytes(), im) for im in images]

    kept = run_reconstruction(lambda ims: ims, n=4, subjects=9, batch_size=4, progress=False)
    lost = run_reconstruction(drop_patterns, n=4, subjects=9, batch_size=4, progress=False)
    assert kept.metrics["subject_kept"] == 1.0 and kept.metrics["subject_kept_n"] == 9
    assert lost.metrics["subject_kept"] == 0.0 and lost.overall == kept.overall == 1.0
    per_pattern = {k: v for k, v in lost.metrics.items() if k.startswith("subject_kept_")}
    del per_pattern["subject_kept_n"]
    assert per_pattern == {f"subject_kept_{p}": 0.0 for _, p in pictures[:9]}
    assert "subject_kept" not in run_reconstruction(lambda ims: ims, n=4, subjects=0).metrics
    assert run_reconstruction(lambda ims: ims, n=8, progress=False).metrics["subject_kept_n"] == 2
    with pytest.raises(UserInputError, match="subjects must be a non-negative integer, got -1"):
        run_reconstruction(lambda ims: ims, n=3, subjects=-1, progress=False)
