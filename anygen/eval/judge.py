"""Judge generated images and texts against shapes-world texts, per the spec
(``shared/specs/shapes-world.md``): captions, stories, edits, subjects, captions written by a
model, and VQA answers.

Everything is judged on *observations*: anything with ``colour``, ``shape``, ``size``,
``col`` and ``row`` (a ``Detection`` from ``detect_objects``, or a ground-truth ``Obj``), plus
optionally a pattern (``Detection.pattern``/``secondary`` or ``Obj.subject``). Functions that
take an image also take a ``Scene`` or a list of observations, so a judge can be checked on
ground truth without the detector.

Rules (the spec's):
- An image satisfies a caption when its objects are exactly those named (no more, no
  fewer), each with the named colour and shape, and the named size and position where
  named, and every relation holds: "to the left of" is a strictly smaller column, "above"
  a strictly smaller row. Plain objects are judged without regard to any pattern.
- Stories: scene 1's caption gives the first state; each event updates it (move sets the
  cell; recolour the colour; grow/shrink the size; appear adds an object in its cell;
  disappear removes it); a relation of the first caption is dropped once either object it
  relates has moved or gone. Each image must satisfy the state reached so far. What no
  text fixed (a size or cell never named) is free in every scene: the texts' constraints
  are checked, not the images' consistency with each other.
- Edits: the edited object changed as instructed and every other object kept its colour,
  shape, size and cell (as seen in the source), with no other object added or lost.
- Subjects: subject fidelity (the object in the subject's place has the subject's shape,
  both colours and pattern; the two colours of ``striped`` are unordered since which band
  is "first" is not visible) and prompt fidelity (the rest of the prompt) separately.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from anygen.data.world import (
    CELLS_BY_POSITION,
    COLOURS,
    COUNTS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    Event,
    Obj,
    Scene,
)
from anygen.errors import UserInputError
from anygen.eval.detect import Detection, detect_objects
from anygen.eval.parse import (
    CaptionSpec,
    ObjectSpec,
    Relation,
    parse_caption,
    parse_event,
    parse_instruction,
    parse_subject_prompt,
)

logger = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray
Observed = Detection | Obj  # anything with colour, shape, size, col, row
Observable = ImageLike | Scene | Sequence[Observed]


@dataclass(frozen=True)
class Verdict:
    """Pass or fail, with the reasons for a failure (empty when it passes)."""

    ok: bool
    reasons: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.ok


# --------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class _Seen:
    colour: str
    shape: str | None
    size: str
    cell: tuple[int, int]
    pattern: str | None
    secondary: str | None

    def describe(self) -> str:
        pattern = f" {self.pattern} with {self.secondary}" if self.pattern else ""
        shape = self.shape or "unknown shape"
        return f"a {self.size} {self.colour}{pattern} {shape} in the {POSITIONS[self.cell]}"


def _seen(o: Any) -> _Seen:
    subject = getattr(o, "subject", None)
    if subject is not None and not isinstance(subject, bool):
        pattern, secondary = subject.pattern, subject.secondary
    else:
        pattern, secondary = getattr(o, "pattern", None), getattr(o, "secondary", None)
    return _Seen(o.colour, o.shape, o.size, (o.col, o.row), pattern, secondary)


def observe(x: Observable) -> list[Observed]:
    """The objects of an image (detected), a Scene (its objects) or a list (as given)."""
    if isinstance(x, Scene):
        return list(x.objects)
    if isinstance(x, (Image.Image, np.ndarray)):
        return detect_objects(x)
    if isinstance(x, (list, tuple)):
        return list(x)
    raise UserInputError(f"expected an image, a Scene or a list of objects, got {type(x).__name__}")


# -------------------------------------------------------------------------------- matching


def _object_failures(want: ObjectSpec, got: _Seen) -> list[str]:
    """The attributes of ``got`` that do not meet ``want`` (empty when it matches)."""
    bad = []
    if want.shape != got.shape:
        bad.append("shape")
    if want.pattern == "striped" and want.colour is not None:
        if {want.colour, want.secondary} != {got.colour, got.secondary}:
            bad.append("colours")
    else:
        if want.colour is not None and want.colour != got.colour:
            bad.append("colour")
        if want.secondary is not None and want.secondary != got.secondary:
            bad.append("secondary colour")
    if want.pattern is not None and want.pattern != got.pattern:
        bad.append("pattern")
    if want.size is not None and want.size != got.size:
        bad.append("size")
    if want.cell is not None and want.cell != got.cell:
        bad.append("position")
    return bad


def relation_holds(relation: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Spec: strictly left/right by column, strictly above/below by row; cells are (col, row)."""
    if relation == "to the left of":
        return a[0] < b[0]
    if relation == "to the right of":
        return a[0] > b[0]
    if relation == "above":
        return a[1] < b[1]
    if relation == "below":
        return a[1] > b[1]
    raise ValueError(f"unknown relation {relation!r}")


def _assignment_failures(spec: CaptionSpec, seen: Sequence[_Seen]) -> list[str]:
    """Reasons why ``seen[i]`` cannot be ``spec.objects[i]`` for all i (empty when it can)."""
    reasons = []
    for want, got in zip(spec.objects, seen, strict=True):
        bad = _object_failures(want, got)
        if bad:
            reasons.append(f"wanted {want.describe()}, got {got.describe()} ({', '.join(bad)})")
    for rel in spec.relations:
        a, b = seen[rel.first], seen[rel.second]
        if not relation_holds(rel.relation, a.cell, b.cell):
            reasons.append(
                f"{spec.objects[rel.first].phrase()} is not {rel.relation} "
                f"{spec.objects[rel.second].phrase()} (found in the {POSITIONS[a.cell]} and "
                f"the {POSITIONS[b.cell]})"
            )
    return reasons


def _best_assignment(spec: CaptionSpec, seen: Sequence[_Seen]) -> tuple[tuple[int, ...], list[str]]:
    """The permutation of ``seen`` matching ``spec.objects`` with the fewest failures."""
    best: tuple[tuple[int, ...], list[str]] | None = None
    for perm in itertools.permutations(range(len(seen))):
        reasons = _assignment_failures(spec, [seen[i] for i in perm])
        if best is None or len(reasons) < len(best[1]):
            best = (perm, reasons)
            if not reasons:
                break
    assert best is not None
    return best


def satisfies(observed: Observable, spec: CaptionSpec | str) -> Verdict:
    """Does the image (or scene, or list of detections) satisfy the caption or state?

    ``spec``: a ``CaptionSpec`` or a canonical caption (parsed; subject prompts need
    ``score_subject``).
    """
    if isinstance(spec, str):
        spec = parse_caption(spec)
    if not isinstance(spec, CaptionSpec):
        raise UserInputError(
            f"spec must be a caption string or a CaptionSpec, got {type(spec).__name__}"
        )
    seen = [_seen(o) for o in observe(observed)]
    want = len(spec.objects)
    if len(seen) != want:
        found = "; ".join(s.describe() for s in seen) or "nothing"
        wanted = f"{want} object{'s' * (want != 1)} ({spec.describe()})"
        return Verdict(False, (f"expected {wanted}, found {len(seen)}: {found}",))
    if want == 0:
        return Verdict(True)
    _, reasons = _best_assignment(spec, seen)
    return Verdict(not reasons, tuple(reasons))


# ----------------------------------------------------------------------------------- stories


def _find(spec: CaptionSpec, colour: str, shape: str, text: str) -> int:
    found = [i for i, o in enumerate(spec.objects) if o.colour == colour and o.shape == shape]
    if len(found) != 1:
        raise UserInputError(
            f"event {text!r} names the {colour} {shape}, but the state holds {len(found)} "
            f"(needs exactly 1): {spec.describe()}"
        )
    return found[0]


def apply_event(spec: CaptionSpec, event: Event, text: str | None = None) -> CaptionSpec:
    """The state after ``event``. Raises UserInputError when the event cannot apply: its
    object is missing or not unique, its target cell is known to be taken, it would make a
    4th object or a duplicate, or it grows a large (shrinks a small) object."""
    text = text or event.story_text()
    objects = list(spec.objects)
    relations = list(spec.relations)
    occupied = {o.cell for o in objects if o.cell is not None}

    if event.kind == "appear":
        cell = CELLS_BY_POSITION[event.position]
        if len(objects) >= 3:
            raise UserInputError(f"event {text!r}: the scene already holds 3 objects")
        if cell in occupied:
            raise UserInputError(f"event {text!r}: the {event.position} is already taken")
        if any(o.colour == event.colour and o.shape == event.shape for o in objects):
            raise UserInputError(f"event {text!r}: a {event.colour} {event.shape} is already there")
        objects.append(ObjectSpec(event.colour, event.shape, None, cell))
        return CaptionSpec("state", tuple(objects), tuple(relations))

    i = _find(spec, event.colour, event.shape, text)
    o = objects[i]
    if event.kind == "move":
        cell = CELLS_BY_POSITION[event.position]
        if cell in occupied and cell != o.cell:
            raise UserInputError(f"event {text!r}: the {event.position} is already taken")
        objects[i] = replace(o, cell=cell)
        relations = [r for r in relations if i not in (r.first, r.second)]
    elif event.kind == "recolour":
        if event.new_colour == o.colour:
            raise UserInputError(f"event {text!r}: the object is already {o.colour}")
        if any(p.colour == event.new_colour and p.shape == o.shape for p in objects):
            raise UserInputError(f"event {text!r}: a {event.new_colour} {o.shape} is already there")
        objects[i] = replace(o, colour=event.new_colour)
    elif event.kind in ("grow", "shrink"):
        before, after = ("small", "large") if event.kind == "grow" else ("large", "small")
        if o.size == after:
            raise UserInputError(f"event {text!r}: the {o.colour} {o.shape} is already {after}")
        objects[i] = replace(o, size=after)
    elif event.kind == "disappear":
        if len(objects) < 2:
            raise UserInputError(f"event {text!r}: the last object cannot disappear")
        del objects[i]
        relations = [
            Relation(r.first - (r.first > i), r.relation, r.second - (r.second > i))
            for r in relations
            if i not in (r.first, r.second)
        ]
    return CaptionSpec("state", tuple(objects), tuple(relations))


@dataclass
class StoryScore:
    """Per scene: whether its image satisfies the state so far, and why not. Per text:
    whether it is in the grammar (``texts[0]`` a caption, the rest events)."""

    scene_ok: list[bool]
    text_in_grammar: list[bool]
    reasons: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def scene_match(self) -> float:
        """Fraction of scenes whose image satisfies the state."""
        return float(np.mean(self.scene_ok)) if self.scene_ok else 0.0

    @property
    def ok(self) -> bool:
        """The whole story is right: every scene matches."""
        return bool(self.scene_ok) and all(self.scene_ok)

    @property
    def event_grammar_rate(self) -> float:
        """Fraction of event texts (``texts[1:]``) in the grammar (1.0 for a 1-scene story)."""
        events = self.text_in_grammar[1:]
        return float(np.mean(events)) if events else 1.0


def score_story(images: Sequence[Observable], texts: Sequence[str]) -> StoryScore:
    """Judge a story: ``texts[0]`` captions ``images[0]``; ``texts[k]`` is the event that leads
    to ``images[k]``. A text outside the grammar, or an event that cannot apply to the state,
    fails its scene and every later one (the state is unknown from there). What a right
    scene draws where the texts leave it open (a size, a cell) becomes part of the state, as
    the spec's state is the scene reached: later scenes must keep it."""
    if len(images) != len(texts):
        raise UserInputError(
            f"a story needs one text per image, got {len(images)} images and {len(texts)} texts"
        )
    scene_ok: list[bool] = []
    grammar: list[bool] = []
    reasons: list[tuple[str, ...]] = []
    state: CaptionSpec | None = None
    lost: str | None = None
    for k, (image, text) in enumerate(zip(images, texts, strict=True)):
        try:
            if k == 0:
                state = parse_caption(text)
            else:
                event = parse_event(text)
            grammar.append(True)
        except UserInputError as e:
            grammar.append(False)
            lost = lost or f"scene {k + 1}: {e}"
            scene_ok.append(False)
            reasons.append((lost,))
            continue
        if lost is None and k > 0:
            try:
                state = apply_event(state, event, text)
            except UserInputError as e:
                lost = f"scene {k + 1}: {e}"
        if lost is not None:
            scene_ok.append(False)
            reasons.append((lost,))
            continue
        observed = observe(image)  # detected once, judged and pinned
        verdict = satisfies(observed, state)
        scene_ok.append(verdict.ok)
        reasons.append(verdict.reasons)
        if verdict.ok:
            state = _pin_to(state, observed)
    return StoryScore(scene_ok, grammar, reasons)


def _pin_to(state: CaptionSpec, observed: Sequence[Observed]) -> CaptionSpec:
    """``state`` with the sizes and cells it leaves open set to those drawn
    (``observed``, which satisfies it): the story's state is what was drawn, so an object
    no event touches keeps its size and cell in later scenes, and "grows" needs a small one."""
    seen = [_seen(o) for o in observed]
    perm, _ = _best_assignment(state, seen)
    return state.with_objects(
        tuple(
            replace(
                o,
                size=seen[i].size if o.size is None else o.size,
                cell=seen[i].cell if o.cell is None else o.cell,
            )
            for o, i in zip(state.objects, perm, strict=True)
        )
    )


def split_story(prompt: str, segments: Sequence[str | ImageLike]) -> tuple[list[Any], list[str]]:
    """(images, texts) of an interleaved story whose first caption is ``prompt``.

    Scene 1 is judged against the prompt; any text before the first image (an echo of the
    prompt, say) is ignored. Each later image pairs with the text between it and the
    image before (several texts are joined by a space; none gives "", out of grammar).
    """
    images: list[Any] = []
    texts: list[str] = []
    pending: list[str] = []
    for seg in segments:
        if isinstance(seg, str):
            pending.append(seg.strip())
        elif isinstance(seg, (Image.Image, np.ndarray, Scene)):
            texts.append(prompt if not images else " ".join(p for p in pending if p))
            images.append(seg)
            pending = []
        else:
            raise UserInputError(
                f"a story segment must be text or an image, got {type(seg).__name__}"
            )
    return images, texts


# ------------------------------------------------------------------------------------- edits


def score_edit(source: Observable, instruction: str, output: Observable) -> Verdict:
    """Is ``output`` the ``source`` with ``instruction`` applied and nothing else changed?

    The expected scene is the source's objects, each pinned to the colour, shape, size and
    cell seen in the source, with the instructed change (an added object may be either
    size). Raises UserInputError for an instruction outside the grammar.
    """
    event = parse_instruction(instruction)
    before = [_seen(o) for o in observe(source)]
    if any(s.shape is None for s in before):
        return Verdict(False, ("the source holds an object of unknown shape",))
    pinned = CaptionSpec(
        "state", tuple(ObjectSpec(s.colour, s.shape, s.size, s.cell) for s in before)
    )
    try:
        expected = apply_event(pinned, event, instruction)
    except UserInputError as e:
        return Verdict(False, (f"the instruction does not apply to the source: {e}",))
    verdict = satisfies(output, expected)
    if verdict.ok:
        return verdict
    return Verdict(False, (f"expected {expected.describe()}", *verdict.reasons))


# ---------------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class SubjectVerdict:
    """``subject_ok``: some object has the subject's shape, both colours and pattern, and is in
    the subject's place when the rest of the prompt holds. ``prompt_ok``: the prompt holds
    with the subject judged by shape only. ``ok``: both, in one consistent assignment."""

    subject_ok: bool
    prompt_ok: bool
    ok: bool
    reasons: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.ok


def subject_identity(subject: Any) -> tuple[str, str, str, str]:
    """(shape, colour, pattern, secondary) of a subject given as an object with those
    attributes (``anygen.data.SubjectIdentity``), an ``Obj`` with ``.subject``, or a dict."""
    if isinstance(subject, dict):
        missing = [k for k in ("shape", "colour", "pattern", "secondary") if k not in subject]
        if missing:
            raise UserInputError(f"subject {subject!r} lacks {', '.join(missing)}")
        identity = subject["shape"], subject["colour"], subject["pattern"], subject["secondary"]
        for value, known, what in zip(
            identity,
            (SHAPES, COLOURS, PATTERNS, COLOURS),
            ("shape", "colour", "pattern", "colour"),
            strict=True,
        ):
            if value not in known:
                raise UserInputError(
                    f"subject {subject!r}: unknown {what} {value!r}; expected one of {tuple(known)}"
                )
        return identity
    if isinstance(subject, Obj):
        if subject.subject is None:
            raise UserInputError(f"object {subject} has no subject pattern")
        return subject.shape, subject.colour, subject.subject.pattern, subject.subject.secondary
    try:
        return subject.shape, subject.colour, subject.pattern, subject.secondary
    except AttributeError:
        raise UserInputError(
            f"expected a subject identity (shape, colour, pattern, secondary), got {subject!r}"
        ) from None


def shows_subject(image: Observable, subject: Any) -> bool:
    """Whether some object of ``image`` is the subject: its shape, both its colours and its
    pattern (size and place free). A reference picture passed through an image codec must
    still show it, or no model drawing through that codec can draw the subject."""
    shape, colour, pattern, secondary = subject_identity(subject)
    identity = ObjectSpec(colour, shape, pattern=pattern, secondary=secondary, subject=True)
    return _shows([_seen(o) for o in observe(image)], identity)


def _shows(seen: Sequence[_Seen], identity: ObjectSpec) -> bool:
    return any(not _object_failures(identity, s) for s in seen)


def score_subject(image: Observable, prompt: str, subject: Any) -> SubjectVerdict:
    """Judge a subject-driven generation: subject fidelity and prompt fidelity, separately."""
    shape, colour, pattern, secondary = subject_identity(subject)
    spec = parse_subject_prompt(prompt)
    k = next(i for i, o in enumerate(spec.objects) if o.subject)
    if spec.objects[k].shape != shape:
        raise UserInputError(
            f"prompt {prompt!r} names the sks {spec.objects[k].shape}, but the subject is a {shape}"
        )
    full = replace(spec.objects[k], colour=colour, pattern=pattern, secondary=secondary)
    full_spec = spec.with_objects(spec.objects[:k] + (full,) + spec.objects[k + 1 :])
    observed = observe(image)
    seen = [_seen(o) for o in observed]

    prompt_verdict = satisfies(observed, spec)
    both = satisfies(observed, full_spec)
    identity = ObjectSpec(colour, shape, pattern=pattern, secondary=secondary, subject=True)
    present = _shows(seen, identity)
    subject_ok = both.ok or (present and not prompt_verdict.ok)
    reasons: list[str] = []
    if not present:
        near = [s.describe() for s in seen if s.shape == shape] or ["none of its shape"]
        reasons.append(f"no object is {identity.describe()}; found {'; '.join(near)}")
    elif prompt_verdict.ok and not both.ok:
        subject_ok = False
        reasons.append("the subject is present but not in the subject's place in the prompt")
    if not prompt_verdict.ok:
        reasons.extend(prompt_verdict.reasons)
    return SubjectVerdict(subject_ok, prompt_verdict.ok, both.ok, tuple(reasons))


# ---------------------------------------------------------------------------------- captions


def score_caption(truth: Observable, caption: str) -> Verdict:
    """Is a model's ``caption`` of an image right? It must be in the grammar, name exactly the
    objects present, and every attribute, position, relation and count it names must hold for
    ``truth`` (the ground-truth ``Scene``; an image is detected)."""
    try:
        spec = parse_caption(caption)
    except UserInputError as e:
        return Verdict(False, (str(e),))
    return satisfies(truth, spec)


# --------------------------------------------------------------------------------------- VQA

_NUMBERS = {str(n): w for n, w in {**COUNTS, 0: "zero", 1: "one"}.items()} | {
    "4": "four",
    "5": "five",
}
_SPELLING = {"centre": "center", "grey": "gray"}


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces, no leading article, digits as words."""
    text = re.sub(r"[^\w\s]", " ", str(text).lower())
    words = text.split()
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(_SPELLING.get(_NUMBERS.get(w, w), _NUMBERS.get(w, w)) for w in words)


def score_answer(answer: str, truth: str) -> bool:
    """Normalised exact match of a VQA answer against the true short answer."""
    return normalise_answer(answer) == normalise_answer(truth)


__all__ = [
    "StoryScore",
    "SubjectVerdict",
    "Verdict",
    "apply_event",
    "normalise_answer",
    "observe",
    "relation_holds",
    "satisfies",
    "score_answer",
    "score_caption",
    "score_edit",
    "score_story",
    "score_subject",
    "split_story",
    "subject_identity",
]
