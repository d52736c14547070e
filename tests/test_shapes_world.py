"""The shapes world (shared/specs/shapes-world.md): pixels, generation, splits, datasets, export."""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from anygen.data.datasets import (
    DATASETS,
    ShapesStoryDataset,
    ShapesT2IDataset,
    collate,
    tensor_to_uint8,
)
from anygen.data.export import read_metadata, write_shapes
from anygen.data.render import SUPERSAMPLE, render_image, render_scene
from anygen.data.shapes import (
    CAPTION_FORMS,
    HELD_OUT_SUBJECTS,
    TASKS,
    Edit,
    Story,
    SubjectSample,
    T2ISample,
    VQASample,
    apply_event,
    canonical_captions,
    paraphrase,
    parse_caption,
    sample_caption,
    sample_captioned_scene,
    sample_edit,
    sample_scene,
    sample_story,
    sample_subject,
    sample_subject_prompt,
    sample_vqa,
    subject_references,
    task_sample,
    text_corpus,
)
from anygen.data.world import (
    BACKGROUND,
    CELLS_BY_POSITION,
    COLOURS,
    HELD_OUT_PAIRS,
    PLURALS,
    POSITIONS,
    SHAPES,
    Event,
    Obj,
    Scene,
    Subject,
    scale,
)
from anygen.errors import UserInputError

BG = np.array(BACKGROUND, dtype=np.float64)


def one(shape="circle", colour="red", size="large", col=1, row=1, **kw) -> Scene:
    return Scene((Obj(shape, colour, size, col, row, **kw),))


def coverage_from_pixels(img: np.ndarray, colour: str) -> np.ndarray:
    """Per-pixel alpha recovered from a single-object render: (pixel - bg) / (colour - bg)."""
    c = np.array(COLOURS[colour], dtype=np.float64)
    ch = int(np.argmax(np.abs(c - BG)))
    return (img[..., ch].astype(np.float64) - BG[ch]) / (c[ch] - BG[ch])


def analytic_area(shape: str, r: float) -> float:
    return {
        "circle": math.pi * r * r,
        "square": 4 * r * r,
        "triangle": 2 * r * r,
        "diamond": 2 * r * r,
        "star": 5 * r * (0.45 * r) * math.sin(math.pi / 5),
        "cross": 2 * (2 * r) * (0.7 * r) - (0.7 * r) ** 2,
    }[shape]


# ----------------------------------------------------------------------------- pixels


def test_background_and_canvas():
    img = render_scene(one(col=0, row=0, size="small"))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert (img[40:, 40:] == BACKGROUND).all()
    assert render_image(one(), 32).size == (32, 32)
    with pytest.raises(UserInputError, match="canvas size"):
        render_scene(one(), 8)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_large_red_circle_centre_pixel_exact(size):
    scene = one("circle", "red", "large", 1, 1)
    img = render_scene(scene, size)
    cx, cy = scene.objects[0].centre(size)
    assert tuple(img[cy, cx]) == COLOURS["red"]
    assert tuple(img[cy - 1, cx - 1]) == COLOURS["red"]
    assert tuple(img[0, 0]) == BACKGROUND


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_shape_area_matches_analytic(shape, size):
    scene = one(shape, "blue", "large", 1, 1)
    alpha = coverage_from_pixels(render_scene(scene, size), "blue")
    r = scale(9, size)
    # 4x sampling quantises edges to 1/4 px: the cross's bars (0.7 r wide) err most, ~2.5%
    assert alpha.sum() == pytest.approx(analytic_area(shape, r), rel=0.03)
    # nothing outside the object's box
    x0, y0, x1, y1 = scene.objects[0].bbox(size)
    outside = alpha.copy()
    outside[y0:y1, x0:x1] = 0
    assert np.abs(outside).max() < 1e-6


@pytest.mark.parametrize("size", [32, 64, 128])
def test_square_fills_its_box_exactly(size):
    scene = one("square", "green", "small", 2, 0, dx=1, dy=-1)
    img = render_scene(scene, size)
    x0, y0, x1, y1 = scene.objects[0].bbox(size)
    assert (img[y0:y1, x0:x1] == COLOURS["green"]).all()
    ys, xs = np.nonzero((img != BACKGROUND).any(-1))
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
    assert x1 - x0 == 2 * scale(6, size)


def test_triangle_points_up_and_star_point_up():
    scene = one("triangle", "yellow", "large", 1, 1)
    alpha = coverage_from_pixels(render_scene(scene), "yellow")
    x0, y0, x1, y1 = scene.objects[0].bbox()
    rows = alpha[y0:y1, x0:x1].sum(axis=1)
    assert np.all(np.diff(rows) > 0)  # wider towards the bottom
    assert alpha[y1 - 1, x0:x1].min() > 0.4  # the base spans the box
    assert rows[0] < 1.0  # a point at the top
    star = one("star", "yellow", "large", 1, 1)
    a = coverage_from_pixels(render_scene(star), "yellow")
    cx, cy = star.objects[0].centre()
    assert a[cy - 8, cx - 1 : cx + 1].sum() > 0.3  # the upper point reaches the top
    assert a[cy + 8, cx - 1 : cx + 1].sum() < 0.05  # no point straight down


def test_cross_and_diamond_geometry():
    cross = one("cross", "white", "large", 1, 1)
    a = coverage_from_pixels(render_scene(cross), "white")
    cx, cy = cross.objects[0].centre()
    assert a[cy, cx - 9 : cx + 9].min() > 0.99  # horizontal bar 2r long through the centre
    assert a[cy - 8, cx - 8] == 0  # corners empty
    diamond = one("diamond", "white", "large", 1, 1)
    d = coverage_from_pixels(render_scene(diamond), "white")
    assert d[cy, cx - 8 : cx + 8].min() > 0.99 and d[cy, cx - 9] > 0.3 and d[cy - 8, cx - 8] == 0


def test_patterns():
    sq = one("square", "red", "large", 1, 1, subject=Subject("striped", "white"))
    img = render_scene(sq)
    x0, y0, x1, y1 = sq.objects[0].bbox()
    for k in range(y1 - y0):
        want = COLOURS["white"] if (k // 2) % 2 else COLOURS["red"]
        assert (img[y0 + k, x0:x1] == want).all(), k
    img128 = render_scene(sq, 128)
    x0, y0, x1, y1 = sq.objects[0].bbox(128)
    assert [tuple(img128[y0 + k, x0]) for k in (0, 3, 4, 7, 8)] == [
        COLOURS["red"],
        COLOURS["red"],
        COLOURS["white"],
        COLOURS["white"],
        COLOURS["red"],
    ]
    dotted = one("square", "blue", "large", 1, 1, subject=Subject("dotted", "yellow"))
    img = render_scene(dotted).astype(np.float64)
    cx, cy = dotted.objects[0].centre()
    # a quarter of a radius-1 dot (centred on the centre corner) sampled 4 x 4: 13 of 16 inside
    t = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    frac = ((t[:, None] ** 2 + t[None, :] ** 2) <= 1).mean()
    want = np.array(COLOURS["blue"]) + (np.array(COLOURS["yellow"]) - COLOURS["blue"]) * frac
    assert np.abs(img[cy, cx] - want).max() <= 0.5
    assert tuple(img[cy, cx + 2]) == COLOURS["blue"]  # between dots of the 4-px grid
    assert np.abs(img[cy + 4, cx + 4] - want).max() <= 1
    ringed = one("circle", "green", "large", 1, 1, subject=Subject("ringed", "purple"))
    img = render_scene(ringed)
    assert tuple(img[cy, cx]) == COLOURS["purple"] and tuple(img[cy + 3, cx]) == COLOURS["purple"]
    assert tuple(img[cy + 6, cx]) == COLOURS["green"]  # outside 0.5 r = 4.5, inside r = 9
    # clipped to the shape: nothing outside the circle changes
    plain = render_scene(one("circle", "green", "large", 1, 1))
    for pattern in ("striped", "dotted", "ringed"):
        pat = render_scene(
            one("circle", "green", "large", 1, 1, subject=Subject(pattern, "purple"))
        )
        assert ((pat != plain).any(-1) <= (plain != BACKGROUND).any(-1)).all()


# ----------------------------------------------------------------------------- scenes, splits


@pytest.mark.parametrize("size", [32, 64, 97])
def test_neighbours_jittered_together_keep_a_background_pixel_between(size):
    red = Obj("square", "red", "large", 0, 1, dx=1)
    blue = Obj("square", "blue", "large", 1, 1, dx=-1)
    image = render_scene(Scene((red, blue)), size)
    gap = range(red.bbox(size)[2], blue.bbox(size)[0])
    assert len(gap) >= 1
    assert all((image[red.centre(size)[1], x] == BACKGROUND).all() for x in gap)


@pytest.mark.parametrize("size", [40, 48, 96])
def test_sizes_where_rounding_breaks_the_spacing_rule_are_refused(size):
    # at 40 px these two large squares would overlap, at 48 and 96 touch
    with pytest.raises(
        UserInputError, match=f"canvas size {size} px breaks the shapes world's spacing"
    ):
        render_scene(Scene((Obj("square", "red", "large", 1, 1),)), size)


def test_sample_scene_deterministic_and_spaced():
    a = [sample_scene(random.Random(7)) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(500)]
    assert len({s for s in scenes}) > 400
    for size in (32, 64, 97, 128):  # the spacing rule on the canvas, not just on the 64-px boxes
        for scene in scenes[:100]:
            boxes = [o.bbox(size) for o in scene.objects]
            gaps = [
                max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                for i, a in enumerate(boxes)
                for b in boxes[i + 1 :]
            ]
            assert min(gaps, default=1) >= 1, (size, scene)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert all(len(s.pairs()) == len(s.objects) for s in scenes)  # distinct by default
    with pytest.raises(UserInputError, match="1 to 3"):
        sample_scene(rng, 4)
    with pytest.raises(UserInputError, match="unknown split"):
        sample_scene(rng, 1, "val")


def test_task_samples_deterministic_from_seed_and_index():
    for task in TASKS:
        assert task_sample(task, 3, 11, "train") == task_sample(task, 3, 11, "train")
        assert task_sample(task, 3, 11, "train") != task_sample(task, 4, 11, "train")


def _texts_and_pairs(sample) -> tuple[list[str], set[tuple[str, str]]]:
    texts: list[str] = []
    scenes: list[Scene] = []
    if isinstance(sample, T2ISample):
        texts, scenes = [sample.text, sample.canonical], [sample.scene]
    elif isinstance(sample, Story):
        texts, scenes = list(sample.texts), list(sample.scenes)
    elif isinstance(sample, Edit):
        texts, scenes = [sample.instruction], [sample.source, sample.target]
    elif isinstance(sample, SubjectSample):
        texts, scenes = [sample.prompt], [*sample.references, sample.scene]
    elif isinstance(sample, VQASample):
        texts, scenes = [sample.question, sample.answer], [sample.scene]
    pairs = set()
    for s in scenes:
        for o in s.objects:
            pairs.add((o.colour, o.shape))
            if o.subject is not None:
                pairs.add((o.subject.secondary, o.shape))
    return texts, pairs


def test_train_split_free_of_held_out_pairs_all_tasks():
    held_words = [f"{c} {s}" for c, s in HELD_OUT_PAIRS] + [
        f"{c} {PLURALS[s]}" for c, s in HELD_OUT_PAIRS
    ]
    for task in TASKS:
        opts = {"paraphrase_prob": 0.5} if task == "t2i" else {}
        for i in range(250):
            sample = task_sample(task, 0, i, "train", **opts)
            texts, pairs = _texts_and_pairs(sample)
            assert not pairs & HELD_OUT_PAIRS, (task, i, pairs & HELD_OUT_PAIRS)
            for t in texts:
                assert not any(w in t for w in held_words), (task, i, t)
            if isinstance(sample, SubjectSample):
                assert (sample.subject.pattern, sample.subject.colour) not in HELD_OUT_SUBJECTS
    corpus = " ".join(text_corpus(3000, 1))
    assert not any(w in corpus for w in held_words)


def test_test_split_draws_held_out_and_can_force_them():
    rng = random.Random(1)
    seen = set()
    for _ in range(400):
        seen |= sample_scene(rng, None, "test").pairs() & HELD_OUT_PAIRS
    assert seen == HELD_OUT_PAIRS
    for task in TASKS:
        for i in range(20):
            _, pairs = _texts_and_pairs(task_sample(task, 0, i, "test", require_held_out=True))
            s = task_sample(task, 0, i, "test", require_held_out=True)
            if isinstance(s, SubjectSample):
                assert (s.subject.pattern, s.subject.colour) in HELD_OUT_SUBJECTS
            else:
                assert pairs & HELD_OUT_PAIRS, (task, i)
    with pytest.raises(UserInputError, match="split='test'"):
        sample_scene(rng, 1, "train", require_held_out=True)


# ----------------------------------------------------------------------------- captions


def test_canonical_captions_of_known_scenes():
    s1 = one("circle", "red", "large", 0, 0)
    assert canonical_captions(s1) == [
        "a large red circle",
        "a large red circle in the top left",
        "a red circle",
        "a red circle in the top left",
    ]
    s2 = Scene((Obj("circle", "red", "small", 0, 0), Obj("square", "blue", "large", 2, 2)))
    caps = canonical_captions(s2)
    for c in (
        "a red circle to the left of a blue square",
        "a small red circle above a large blue square",
        "a blue square below a red circle",
        "a large blue square to the right of a small red circle",
        "a blue square and a red circle",
    ):
        assert c in caps
    for c in (
        "a blue square to the left of a red circle",
        "a red circle",
        "a red circle below a blue square",
    ):
        assert c not in caps
    s3 = Scene(
        tuple(
            Obj("star", "green", sz, c, 1) for sz, c in zip(("small", "large"), (0, 2), strict=True)
        )
    )
    assert "two green stars" in canonical_captions(s3)
    assert "three green stars" not in canonical_captions(s3)


def test_caption_form_weights_set_the_mix_and_leave_the_default_unchanged():
    def forms(n, **kw):
        data = ShapesT2IDataset(n, seed=3, **kw)
        return [data.sample(i).form for i in range(n)]

    # None draws the form as it always has (uniform, rng.choice), so existing data is unchanged
    for seed in range(20):
        form = sample_captioned_scene(random.Random(seed), "train")[0].form
        assert form == random.Random(seed).choice(CAPTION_FORMS)
    mix = Counter(forms(3500, form_weights={"position": 3, "count": 0}))
    assert "count" not in mix and set(mix) == set(CAPTION_FORMS) - {"count"}
    assert 0.45 < mix["position"] / 3500 < 0.55  # 3 of 6
    assert all(0.12 < mix[f] / 3500 < 0.21 for f in ("object", "relation", "conjunction"))
    for weights, message in [
        ({"place": 2}, r"unknown caption form\(s\) \['place'\]"),
        ({"position": -1}, "finite and >= 0"),
        ({"position": float("nan")}, "finite and >= 0"),
        (dict.fromkeys(CAPTION_FORMS, 0), "all 0"),
    ]:
        with pytest.raises(UserInputError, match=message):
            forms(1, form_weights=weights)


def test_every_caption_form_sampled_true_and_parseable():
    rng = random.Random(5)
    forms, sized, unsized = set(), False, False
    for _ in range(400):
        caption, scene = sample_captioned_scene(rng, "train")
        text = caption.text()
        assert caption.satisfied_by(scene), text
        assert text in canonical_captions(scene), text
        assert parse_caption(text) == caption
        forms.add(caption.form)
        sized |= bool(re.search(r"\b(small|large)\b", text))
        unsized |= caption.form != "count" and not re.search(r"\b(small|large)\b", text)
        # sampling from the scene (not caption first) is true as well
        again = sample_caption(rng, scene)
        assert again in canonical_captions(scene)
    assert forms == set(CAPTION_FORMS)
    assert sized and unsized
    with pytest.raises(UserInputError, match="not a canonical"):
        parse_caption("a red circle near a blue square")
    with pytest.raises(UserInputError, match="cannot describe"):
        from anygen.data.shapes import caption_scene

        caption_scene(rng, one(), "relation")


def test_caption_satisfaction_rejects_wrong_scenes():
    cap = parse_caption("a red circle to the left of a large blue square")
    good = Scene((Obj("circle", "red", "small", 0, 1), Obj("square", "blue", "large", 1, 0)))
    assert cap.satisfied_by(good)
    assert not cap.satisfied_by(Scene((good.objects[0], good.objects[1].with_(col=0, row=0))))
    assert not cap.satisfied_by(Scene((good.objects[0], good.objects[1].with_(size="small"))))
    assert not cap.satisfied_by(Scene((*good.objects, Obj("star", "red", "small", 2, 2))))
    assert not parse_caption("three red circles").satisfied_by(
        Scene(tuple(Obj("circle", "red", "small", c, 0) for c in range(2)))
    )


def test_paraphrases():
    rng = random.Random(2)
    outs = {paraphrase(rng, "two blue squares") for _ in range(60)}
    assert "a picture of two blue squares" in outs
    assert all("blue" in o and "squares" in o for o in outs)
    outs = {paraphrase(rng, "a red circle in the top left") for _ in range(80)}
    assert "there is a red circle at the top left" in outs
    assert all("top left" in o for o in outs)
    c = parse_caption("a small red circle above a large blue square")
    outs = [paraphrase(rng, c) for _ in range(40)]
    assert sum(o != c.text() for o in outs) > 30
    ds = ShapesT2IDataset(40, seed=0, paraphrase_prob=0.5)
    flags = [ds.sample(i) for i in range(40)]
    assert any(s.paraphrased for s in flags) and any(not s.paraphrased for s in flags)
    for s in flags:
        assert s.canonical in canonical_captions(s.scene)
    with pytest.raises(UserInputError, match="training only"):
        ShapesT2IDataset(4, split="test", paraphrase_prob=0.5)


# ------------------------------------------------------------------- events, stories, edits


def test_apply_event_each_kind():
    red = Obj("circle", "red", "small", 0, 0)
    blue = Obj("square", "blue", "large", 2, 2)
    s = Scene((red, blue))
    moved = apply_event(s, Event("move", "red", "circle", position="center"))
    assert moved.objects[0].cell == CELLS_BY_POSITION["center"] and moved.objects[0].dx == 0
    assert (
        apply_event(s, Event("recolour", "red", "circle", new_colour="green")).objects[0].colour
        == "green"
    )
    assert apply_event(s, Event("grow", "red", "circle")).objects[0].size == "large"
    assert apply_event(s, Event("shrink", "blue", "square")).objects[1].size == "small"
    added = apply_event(s, Event("appear", "green", "star", position="top"))
    assert added.objects[2] == Obj("star", "green", "small", 1, 0)
    assert apply_event(s, Event("disappear", "red", "circle")) == Scene((blue,))
    moved_r = apply_event(s, Event("move", "red", "circle", position="bottom"), random.Random(0))
    assert moved_r.objects[0].cell == (1, 2) and moved_r.is_valid()

    with pytest.raises(UserInputError, match="not empty"):
        apply_event(s, Event("move", "red", "circle", position="bottom right"))
    with pytest.raises(UserInputError, match="only a small"):
        apply_event(s, Event("grow", "blue", "square"))
    with pytest.raises(UserInputError, match="last object"):
        apply_event(Scene((red,)), Event("disappear", "red", "circle"))
    with pytest.raises(UserInputError, match="holds 0"):
        apply_event(s, Event("grow", "green", "circle"))
    dup = Scene((red, red.with_(col=1)))
    with pytest.raises(UserInputError, match="holds 2"):
        apply_event(dup, Event("grow", "red", "circle"))
    with pytest.raises(UserInputError, match="duplicate"):
        apply_event(
            Scene((red, Obj("circle", "blue", "small", 1, 1))),
            Event("recolour", "red", "circle", new_colour="blue"),
        )
    with pytest.raises(UserInputError, match="already present"):
        apply_event(s, Event("appear", "red", "circle", position="top"))


def _check_event(before: Scene, event: Event, after: Scene):
    if event.kind != "appear":
        assert len(before.find(event.colour, event.shape)) == 1, event
    if event.kind == "appear":
        assert len(before.objects) < 3 and not before.find(event.colour, event.shape)
    if event.kind == "disappear":
        assert len(before.objects) >= 2
    if event.kind == "grow":
        assert before.find(event.colour, event.shape)[0].size == "small"
    if event.kind == "shrink":
        assert before.find(event.colour, event.shape)[0].size == "large"
    if event.kind in ("move", "appear"):
        assert CELLS_BY_POSITION[event.position] not in {o.cell for o in before.objects}
    assert len(after.pairs()) == len(after.objects)  # still all unique by colour+shape
    assert after.is_valid()
    # the next scene is the event applied, up to the jitter of a placed object and the size of
    # an appearing one (both random)
    expected = apply_event(before, event)

    def strip(scene: Scene) -> list[tuple]:
        keep_size = event.kind != "appear"
        return sorted(
            (o.colour, o.shape, o.cell, o.size if keep_size else None) for o in scene.objects
        )

    assert strip(after) == strip(expected)
    if event.kind not in ("move", "appear"):
        assert after == expected


def test_stories_keep_uniqueness_and_follow_events():
    rng = random.Random(3)
    kinds, lengths = set(), set()
    for _ in range(200):
        story = sample_story(rng, None, "train")
        lengths.add(len(story.scenes))
        assert len(story.texts) == len(story.scenes) == len(story.events) + 1
        assert story.texts[0] in canonical_captions(story.scenes[0])
        for k, event in enumerate(story.events):
            kinds.add(event.kind)
            assert story.texts[k + 1] == event.story_text()
            _check_event(story.scenes[k], event, story.scenes[k + 1])
    assert lengths == {2, 3, 4}
    assert kinds == {"move", "recolour", "grow", "shrink", "appear", "disappear"}
    assert len(sample_story(rng, 4).scenes) == 4
    with pytest.raises(UserInputError, match="2 to 4"):
        sample_story(rng, 5)


def test_edits():
    rng = random.Random(4)
    for _ in range(100):
        e = sample_edit(rng, "train")
        assert e.instruction == e.event.instruction()
        assert e.source != e.target
        _check_event(e.source, e.event, e.target)
    e = Edit(one(), "remove the red circle", one(), Event("disappear", "red", "circle"))
    assert e.to_dict()["event"] == {"kind": "disappear", "colour": "red", "shape": "circle"}


# ----------------------------------------------------------------------------- subjects, VQA


def test_subject_references_and_prompts():
    rng = random.Random(6)
    forms, n_objects = set(), set()
    for _ in range(60):
        subject = sample_subject(rng, "train")
        assert not subject.held_out
        refs = subject_references(rng, subject)
        assert 3 <= len(refs) <= 5
        assert len({r.objects[0].cell for r in refs}) == len(refs)
        assert {r.objects[0].size for r in refs} == {"small", "large"}
        for r in refs:
            n_objects.add(len(r.objects))
            assert r.is_valid() and subject.matches(r.objects[0])
            assert all(o.subject is None for o in r.objects[1:])
        prompt, scene = sample_subject_prompt(rng, subject)
        assert f"the sks {subject.shape}" in prompt
        caption = parse_caption(prompt)
        forms.add(caption.form)
        assert caption.satisfied_by(scene, subject), prompt
        assert sum(o.subject is not None for o in scene.objects) == 1
    assert forms == {"object", "position", "relation", "conjunction"}
    assert n_objects == {1, 2, 3}  # with and without other objects
    prompt = parse_caption("the sks circle to the left of a blue square")
    assert prompt.text() == "the sks circle to the left of a blue square"


def _answer(question: str, scene: Scene) -> str:
    """An independent reading of the VQA templates."""
    objs = scene.objects
    if question == "how many objects are there":
        return ["one", "two", "three"][len(objs) - 1]
    if m := re.fullmatch(r"what colour is the (\w+)", question):
        (o,) = [o for o in objs if o.shape == m[1]]
        return o.colour
    if m := re.fullmatch(r"what shape is the (\w+) object", question):
        (o,) = [o for o in objs if o.colour == m[1]]
        return o.shape
    if m := re.fullmatch(r"is there a (\w+) (\w+)", question):
        return "yes" if scene.find(m[1], m[2]) else "no"
    if m := re.fullmatch(r"where is the (\w+) (\w+)", question):
        (o,) = scene.find(m[1], m[2])
        return POSITIONS[o.cell]
    if m := re.fullmatch(r"what size is the (\w+) (\w+)", question):
        (o,) = scene.find(m[1], m[2])
        return o.size
    raise AssertionError(f"unknown question {question!r}")


def test_vqa_answers_are_correct():
    rng = random.Random(8)
    kinds = set()
    for _ in range(400):
        scene = sample_scene(rng, None, "train", distinct=rng.random() < 0.7)
        q, a = sample_vqa(rng, scene)
        assert _answer(q, scene) == a, (q, a, scene)
        kinds.add(q.split()[0] + ("-" + a if a in ("yes", "no") else ""))
    assert kinds >= {"what", "how", "where", "is-yes", "is-no"}


# ----------------------------------------------------------------------------- corpus


def test_text_corpus_covers_every_word():
    lines = list(text_corpus(1500, 0))
    assert len(lines) == 1500 and lines == list(text_corpus(1500, 0))
    words = set(" ".join(lines).replace(",", " ").split())
    needed = (
        set(COLOURS)
        | set(SHAPES)
        | set(PLURALS.values())
        | {"small", "large", "sks", "two", "three"}
    )
    needed |= {w for p in POSITIONS.values() for w in p.split()}
    needed |= {"to", "the", "left", "of", "right", "above", "below", "and", "in", "a"}
    needed |= {"moves", "turns", "grows", "shrinks", "appears", "disappears"}
    needed |= {"move", "make", "add", "remove", "what", "colour", "shape", "object", "how", "many"}
    needed |= {"objects", "are", "there", "where", "is", "size", "yes", "no", "one"}
    assert needed <= words, needed - words
    assert len(list(text_corpus(5, 0))) == 5


# ----------------------------------------------------------------------------- datasets, export


@pytest.mark.parametrize("task", list(DATASETS))
def test_datasets_items(task):
    ds = DATASETS[task](6, seed=1, split="train", size=32)
    assert len(ds) == 6
    items = [ds[i] for i in range(len(ds))]
    tensors = [v for it in items for v in it.values() if isinstance(v, torch.Tensor)]
    assert tensors
    for t in tensors:
        assert t.dtype == torch.float32 and t.shape[-3:] == (3, 32, 32)
        pixels = (t + 1) * 127.5  # rendered uint8 pixels scaled to [-1, 1], nothing resampled
        assert torch.allclose(pixels, pixels.round(), atol=1e-3) and (t != t.flatten()[0]).any()
    again = DATASETS[task](6, seed=1, split="train", size=32)[3]
    for k, v in items[3].items():
        assert torch.equal(v, again[k]) if isinstance(v, torch.Tensor) else v == again[k]
    batch = collate(items)
    assert list(batch) == list(items[0])
    for k, v in batch.items():
        values = [it[k] for it in items]
        tensors = all(isinstance(x, torch.Tensor) for x in values)
        if tensors and len({x.shape for x in values}) == 1:  # stacked in item order
            assert torch.equal(v, torch.stack(values))
        else:  # kept as the items' list: story pictures vary in number, texts are strings
            assert len(v) == 6 and all(
                torch.equal(a, b) if tensors else a == b for a, b in zip(v, values, strict=True)
            )
    with pytest.raises(IndexError):
        ds[6]


def test_dataset_image_round_trip_and_background():
    ds = ShapesT2IDataset(3, seed=2)
    item = ds[0]
    assert item["image"][:, 0, 0].tolist() == pytest.approx([c / 127.5 - 1 for c in BACKGROUND])
    assert (tensor_to_uint8(item["image"]) == render_scene(item["scene"])).all()
    story = ShapesStoryDataset(2, seed=0)[1]
    assert story["images"].shape[0] == len(story["texts"]) == len(story["scenes"])


def test_export_writes_files_and_metadata(tmp_path):
    for task in TASKS:
        out = write_shapes(task, 3, 5, tmp_path / task, size=32, split="test")
        records = read_metadata(out)
        assert [r["index"] for r in records] == [0, 1, 2]
        names = {p.name for p in out.iterdir()}
        assert not [n for n in names if n.startswith(".tmp-")]
        assert names == {"metadata.jsonl"} | {f for r in records for f in r["files"]}
        for r in records:
            assert r["task"] == task and r["split"] == "test" and r["size"] == 32
            sample = task_sample(task, 5, r["index"], "test")
            assert r == {**r, **sample.to_dict()}
        r = records[0]
        first_scene = {
            "t2i": r.get("scene"),
            "vqa": r.get("scene"),
            "story": r.get("scenes", [None])[0],
            "edit": r.get("source"),
            "subject": r.get("references", [None])[0],
        }[task]
        png = np.asarray(Image.open(out / r["files"][0]))
        assert (png == render_scene(Scene.from_dict(first_scene), 32)).all()
    first = read_metadata(tmp_path / "t2i")[0]
    assert first["caption"] in canonical_captions(Scene.from_dict(first["scene"]))


def test_export_refuses_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UserInputError, match=re.escape(str(tmp_path))):
        write_shapes("t2i", 2, 0, tmp_path)
    write_shapes("t2i", 2, 0, tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").exists() and len(read_metadata(tmp_path)) == 2
    with pytest.raises(UserInputError, match="unknown shapes task"):
        write_shapes("video", 2, 0, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserInputError, match="canvas size must be an integer from"):
        write_shapes("t2i", 2, 0, tmp_path / "big", size=100_000)
    with pytest.raises(UserInputError, match="cannot create"):
        write_shapes("t2i", 2, 0, tmp_path / "keep.txt" / "sub")


def test_an_interrupted_overwrite_never_passes_for_a_finished_export(tmp_path, monkeypatch):
    import anygen.data.export as export

    write_shapes("t2i", 3, 1, tmp_path)
    calls = []

    def render_then_fail(scene, size):
        calls.append(scene)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(scene, size)

    real = export.render_image
    monkeypatch.setattr(export, "render_image", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_shapes("t2i", 3, 2, tmp_path, overwrite=True)
    assert not (tmp_path / "metadata.jsonl").exists()  # the old one does not vouch for new images
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ANYGEN_SLOW"), reason="slow: set ANYGEN_SLOW=1")
def test_render_speed_at_least_1000_scenes_per_second():
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(2000)]
    for s in scenes[:100]:
        render_scene(s)
    t = time.perf_counter()
    for s in scenes:
        render_scene(s)
    assert len(scenes) / (time.perf_counter() - t) >= 1000
