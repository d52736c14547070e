"""Shapes world generation: scenes, captions, paraphrases, stories, edits, subjects, VQA.

Everything follows ``shared/specs/shapes-world.md``; the constants and types live in
``world.py``. All randomness comes from an explicit ``random.Random`` passed in;
nothing here touches global random state, so a seed fixes every output.

Splits: ``"train"`` never contains a held-out (colour, shape) pair (``HELD_OUT_PAIRS``)
in any role -- object, event, instruction, question, subject pattern -- nor a held-out
subject (``HELD_OUT_SUBJECTS``); ``"test"`` draws from the whole world.

Text kinds produced here:
- canonical captions (spec grammar; ``Caption.text()``, ``canonical_captions``),
- paraphrases (training only; ``paraphrase``): never read by a scorer, always stored
  beside their canonical form,
- story texts and edit instructions (``Event.story_text()`` / ``Event.instruction()``),
- subject prompts: the caption grammar with ``the sks <shape>`` in place of one object,
- VQA questions and short answers (templates in ``VQA_TEMPLATES``).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from anygen.data.world import (
    CELLS_BY_POSITION,
    COLOURS,
    COUNTS,
    EVENT_KINDS,
    HELD_OUT_PAIRS,
    JITTER,
    PATTERNS,
    PLURALS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SUBJECT_TOKEN,
    Event,
    Obj,
    Scene,
    Subject,
)
from anygen.errors import UserInputError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "test")
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)  # ("small", "large")
ALL_CELLS: tuple[tuple[int, int], ...] = tuple(POSITIONS)  # (col, row), row-major
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)

# Subject identities whose (pattern, primary colour) never appear in training: the test
# split's held-out subjects. Any shape and secondary colour; chosen so that every pattern
# and three different primary colours are represented.
HELD_OUT_SUBJECTS: frozenset[tuple[str, str]] = frozenset(
    {("striped", "green"), ("dotted", "yellow"), ("ringed", "red")}
)

CAPTION_FORMS: tuple[str, ...] = ("object", "position", "relation", "conjunction", "count")
SUBJECT_PROMPT_FORMS: tuple[str, ...] = ("object", "position", "relation", "conjunction")

# VQA question templates (answers in brackets); a question is only asked when its
# answer is unambiguous for the scene:
#   colour   "what colour is the {shape}"          [colour]    exactly one object of that shape
#   shape    "what shape is the {colour} object"   [shape]     exactly one object of that colour
#   count    "how many objects are there"          [one | two | three]
#   position "where is the {colour} {shape}"       [position]  colour+shape unique
#   exists   "is there a {colour} {shape}"         [yes | no]
#   size     "what size is the {colour} {shape}"   [small | large]  colour+shape unique
VQA_TEMPLATES: dict[str, str] = {
    "colour": "what colour is the {shape}",
    "shape": "what shape is the {colour} object",
    "count": "how many objects are there",
    "position": "where is the {colour} {shape}",
    "exists": "is there a {colour} {shape}",
    "size": "what size is the {colour} {shape}",
}
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; expected one of {SPLITS}")


def allowed_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs a split may contain."""
    check_split(split)
    return TRAIN_PAIRS if split == "train" else ALL_PAIRS


def sample_rng(seed: int, task: str, index: int, split: str = "train") -> random.Random:
    """The generator for sample ``index`` of ``task`` under ``seed`` in ``split``: a function
    of these only.

    Each split draws from its own stream: the splits differ only in the held-out pairs, so
    one stream would give the test split, at the training seed, the training samples
    wherever no draw met a held-out pair. Seeding ``random.Random`` with a str hashes it
    with SHA-512, so this is stable across processes and Python runs (unlike ``hash()``).
    """
    if split == "train":  # the training stream as it always was: bundled models' recipes
        return random.Random(f"anygen.shapes/{task}/{seed}/{index}")
    return random.Random(f"anygen.shapes/{task}/{split}/{seed}/{index}")


# ------------------------------------------------------------------------------------------ scenes


def _jitter(rng: random.Random | None) -> tuple[int, int]:
    if rng is None:
        return (0, 0)
    return (rng.choice(JITTER), rng.choice(JITTER))


def _rejitter(
    rng: random.Random | None, objs: Sequence[Obj], movable: Sequence[int], tries: int = 50
) -> Scene | None:
    """Scene of ``objs`` with new jitter on the indices in ``movable`` until the spacing rule
    holds (spec: resample the jitter); None when ``tries`` draws all fail."""
    objs = list(objs)
    for _ in range(tries if rng is not None else 1):
        for i in movable:
            dx, dy = _jitter(rng)
            objs[i] = objs[i].with_(dx=dx, dy=dy)
        scene = Scene(tuple(objs))
        if scene.is_valid():
            return scene
    return None


def _place(
    rng: random.Random,
    specs: Sequence[tuple[str, str, str, Subject | None]],
    cells: Sequence[tuple[int, int]],
) -> Scene | None:
    """Objects (colour, shape, size, subject) in the given cells, jittered until valid."""
    objs = [
        Obj(s, c, size, col, row, subject=subj)
        for (c, s, size, subj), (col, row) in zip(specs, cells, strict=True)
    ]
    return _rejitter(rng, objs, range(len(objs)))


def _sample_pairs(
    rng: random.Random, n: int, split: str, distinct: bool, require_held_out: bool
) -> list[tuple[str, str]]:
    pool = allowed_pairs(split)
    if require_held_out:
        held = rng.choice(sorted(HELD_OUT_PAIRS))
        rest = [p for p in pool if p != held]
        others = rng.sample(rest, n - 1) if distinct else [rng.choice(pool) for _ in range(n - 1)]
        pairs = [held, *others]
        rng.shuffle(pairs)
        return pairs
    if distinct:
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


def _check_held_out(split: str, require_held_out: bool) -> None:
    check_split(split)
    if require_held_out and split == "train":
        raise UserInputError(
            "require_held_out=True needs split='test': training never holds a held-out pair"
        )


def sample_scene(
    rng: random.Random,
    n_objects: int | None = None,
    split: str = "train",
    *,
    distinct: bool = True,
    require_held_out: bool = False,
    max_tries: int = 100,
) -> Scene:
    """A random scene of ``n_objects`` (1 to 3; random when None) obeying the spacing rule.

    ``distinct``: no two objects share colour and shape (so every object is nameable).
    ``require_held_out``: at least one object is a held-out pair (``split="test"`` only).
    """
    _check_held_out(split, require_held_out)
    n = rng.randint(1, 3) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise UserInputError(f"a scene holds 1 to 3 objects, got n_objects={n}")
    for _ in range(max_tries):
        pairs = _sample_pairs(rng, n, split, distinct, require_held_out)
        cells = rng.sample(ALL_CELLS, n)
        specs = [(c, s, rng.choice(SIZE_NAMES), None) for c, s in pairs]
        scene = _place(rng, specs, cells)
        if scene is not None:
            return scene
    # unreachable at the spec's sizes, where any jitter keeps neighbouring boxes 1 px apart
    raise RuntimeError(f"no valid scene of {n} objects in {max_tries} tries")


# ---------------------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class Phrase:
    """One object of a caption: ``a [size] colour shape``, or ``the sks shape`` (a subject)."""

    colour: str | None
    shape: str
    size: str | None = None
    sks: bool = False

    def text(self) -> str:
        if self.sks:
            return f"the {SUBJECT_TOKEN} {self.shape}"
        words = (
            ["a", self.size, self.colour, self.shape]
            if self.size
            else ["a", self.colour, self.shape]
        )
        return " ".join(words)

    def matches(self, o: Obj, subject: SubjectIdentity | None = None) -> bool:
        """Does object ``o`` satisfy this phrase? An sks phrase needs ``subject``'s identity."""
        if self.sks:
            if subject is None:
                raise ValueError(f"{self.text()!r} names a subject; pass its SubjectIdentity")
            return subject.matches(o) and o.shape == self.shape
        ok = o.colour == self.colour and o.shape == self.shape
        return ok and (self.size is None or o.size == self.size)


def relation_holds(relation: str, a: Obj, b: Obj) -> bool:
    """Spec: the first object's column strictly left of (right of) the second's, or its row
    strictly above (below)."""
    if relation == "to the left of":
        return a.col < b.col
    if relation == "to the right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


@dataclass(frozen=True)
class Caption:
    """A caption in the canonical grammar, as structure. ``text()`` is its canonical string.

    form: "object" (1 phrase), "position" (1 phrase + position), "relation" (2 phrases +
    relation), "conjunction" (2 or 3 phrases), "count" (1 phrase without size + count).
    """

    form: str
    phrases: tuple[Phrase, ...]
    position: str | None = None
    relation: str | None = None
    count: int | None = None

    def text(self) -> str:
        p = [ph.text() for ph in self.phrases]
        if self.form == "object":
            return p[0]
        if self.form == "position":
            return f"{p[0]} in the {self.position}"
        if self.form == "relation":
            return f"{p[0]} {self.relation} {p[1]}"
        if self.form == "conjunction":
            return " and ".join(p)
        if self.form == "count":
            ph = self.phrases[0]
            return f"{COUNTS[self.count]} {ph.colour} {PLURALS[ph.shape]}"
        raise ValueError(f"unknown caption form {self.form!r}; expected one of {CAPTION_FORMS}")

    def satisfied_by(self, scene: Scene, subject: SubjectIdentity | None = None) -> bool:
        """Spec: the scene's objects are exactly those named, each with the named attributes,
        and every named position, relation and count holds."""
        phrases = list(self.phrases) * (self.count if self.form == "count" else 1)
        objs = scene.objects
        if len(objs) != len(phrases):
            return False
        for perm in itertools.permutations(objs):
            if not all(ph.matches(o, subject) for ph, o in zip(phrases, perm, strict=True)):
                continue
            if self.form == "position" and perm[0].position != self.position:
                continue
            if self.form == "relation" and not relation_holds(self.relation, perm[0], perm[1]):
                continue
            return True
        return False


def _phrase(rng: random.Random | None, o: Obj, with_size: bool | None = None) -> Phrase:
    if with_size is None:
        with_size = rng.random() < 0.5
    return Phrase(o.colour, o.shape, o.size if with_size else None)


def caption_forms_for(scene: Scene) -> list[str]:
    """The caption forms that can describe the whole of ``scene``."""
    n = len(scene.objects)
    if n == 1:
        return ["object", "position"]
    forms = ["conjunction"]
    if n == 2:
        forms.insert(0, "relation")
    if len(scene.pairs()) == 1:
        forms.append("count")
    return forms


def caption_scene(rng: random.Random, scene: Scene, form: str | None = None) -> Caption:
    """A random true caption of ``scene`` in ``form`` (random among those that fit when None);
    each object's size is named or omitted at random."""
    forms = caption_forms_for(scene)
    if form is None:
        form = rng.choice(forms)
    elif form not in forms:
        raise UserInputError(
            f"caption form {form!r} cannot describe a scene of {len(scene.objects)} objects "
            f"{sorted(scene.pairs())}"
        )
    objs = list(scene.objects)
    if form == "object":
        return Caption(form, (_phrase(rng, objs[0]),))
    if form == "position":
        return Caption(form, (_phrase(rng, objs[0]),), position=objs[0].position)
    if form == "relation":
        rng.shuffle(objs)
        a, b = objs
        holding = [r for r in RELATIONS if relation_holds(r, a, b)]
        return Caption(form, (_phrase(rng, a), _phrase(rng, b)), relation=rng.choice(holding))
    if form == "conjunction":
        rng.shuffle(objs)
        return Caption(form, tuple(_phrase(rng, o) for o in objs))
    o = objs[0]
    return Caption("count", (Phrase(o.colour, o.shape),), count=len(objs))


def sample_caption(rng: random.Random, scene: Scene) -> str:
    """A random canonical caption of the whole scene (one of ``canonical_captions(scene)``)."""
    return caption_scene(rng, scene).text()


def canonical_captions(scene: Scene) -> list[str]:
    """Every canonical caption true of ``scene``: all forms that fit, every object order,
    each size named and omitted, every relation that holds. Sorted, no duplicates."""
    objs = scene.objects
    n = len(objs)

    def variants(o: Obj) -> list[Phrase]:
        return [_phrase(None, o, False), _phrase(None, o, True)]

    out: set[str] = set()
    if n == 1:
        for p in variants(objs[0]):
            out.add(Caption("object", (p,)).text())
            out.add(Caption("position", (p,), position=objs[0].position).text())
    if n == 2:
        for a, b in itertools.permutations(objs):
            for rel in RELATIONS:
                if relation_holds(rel, a, b):
                    for pa, pb in itertools.product(variants(a), variants(b)):
                        out.add(Caption("relation", (pa, pb), relation=rel).text())
    if n >= 2:
        for perm in itertools.permutations(objs):
            for combo in itertools.product(*(variants(o) for o in perm)):
                out.add(Caption("conjunction", combo).text())
        if len(scene.pairs()) == 1:
            out.add(Caption("count", (Phrase(objs[0].colour, objs[0].shape),), count=n).text())
    return sorted(out)


def caption_form_weights(form_weights: Mapping[str, float]) -> list[float]:
    """The weight of each of ``CAPTION_FORMS`` under ``form_weights`` (1 where not named);
    unknown forms, negative weights and an all-zero mix are refused."""
    unknown = sorted(set(form_weights) - set(CAPTION_FORMS))
    if unknown:
        raise UserInputError(
            f"unknown caption form(s) {unknown} in form weights; expected some of {CAPTION_FORMS}"
        )
    weights = [float(form_weights.get(f, 1.0)) for f in CAPTION_FORMS]
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise UserInputError(
            f"caption form weights must be finite and >= 0, got {dict(form_weights)}"
        )
    if not sum(weights):
        raise UserInputError("caption form weights are all 0: no caption form would be drawn")
    return weights


def sample_captioned_scene(
    rng: random.Random,
    split: str = "train",
    form: str | None = None,
    *,
    require_held_out: bool = False,
    form_weights: Mapping[str, float] | None = None,
) -> tuple[Caption, Scene]:
    """Caption first: pick a form (uniform over ``CAPTION_FORMS`` when None, or by
    ``form_weights``: relative weights, 1 for a form not named), then a scene that the caption
    describes exactly. The count form builds 2-3 objects of one colour+shape."""
    _check_held_out(split, require_held_out)
    if form is None:
        if form_weights is None:
            form = rng.choice(CAPTION_FORMS)
        else:
            weights = caption_form_weights(form_weights)
            form = rng.choices(CAPTION_FORMS, weights=weights)[0]
    if form in ("object", "position"):
        scene = sample_scene(rng, 1, split, require_held_out=require_held_out)
    elif form == "relation":
        scene = sample_scene(rng, 2, split, require_held_out=require_held_out)
    elif form == "conjunction":
        scene = sample_scene(rng, rng.randint(2, 3), split, require_held_out=require_held_out)
    elif form == "count":
        pool = sorted(HELD_OUT_PAIRS) if require_held_out else allowed_pairs(split)
        colour, shape = rng.choice(pool)
        n = rng.randint(2, 3)
        scene = None
        while scene is None:
            specs = [(colour, shape, rng.choice(SIZE_NAMES), None) for _ in range(n)]
            scene = _place(rng, specs, rng.sample(ALL_CELLS, n))
    else:
        raise UserInputError(f"unknown caption form {form!r}; expected one of {CAPTION_FORMS}")
    return caption_scene(rng, scene, form), scene


def parse_caption(text: str) -> Caption:
    """Parse a canonical caption (or subject prompt) back into its structure.

    Raises UserInputError naming the caption when it is not in the canonical grammar.
    """
    words = text.split()

    def fail(why: str) -> UserInputError:
        return UserInputError(f"not a canonical shapes-world caption: {text!r} ({why})")

    plural_to_shape = {p: s for s, p in PLURALS.items()}
    count_by_word = {w: k for k, w in COUNTS.items()}
    if words and words[0] in count_by_word:
        if len(words) != 3 or words[1] not in COLOURS or words[2] not in plural_to_shape:
            raise fail("expected '<two|three> <colour> <plural>'")
        return Caption(
            "count", (Phrase(words[1], plural_to_shape[words[2]]),), count=count_by_word[words[0]]
        )

    def phrase_at(i: int) -> tuple[Phrase, int]:
        if words[i : i + 2] == ["the", SUBJECT_TOKEN]:
            if i + 2 >= len(words) or words[i + 2] not in SHAPES:
                raise fail(f"expected a shape after 'the {SUBJECT_TOKEN}'")
            return Phrase(None, words[i + 2], sks=True), i + 3
        if i >= len(words) or words[i] != "a":
            raise fail(f"expected 'a' at word {i + 1}")
        i += 1
        size = None
        if i < len(words) and words[i] in SIZES:
            size, i = words[i], i + 1
        if i + 1 >= len(words) or words[i] not in COLOURS or words[i + 1] not in SHAPES:
            raise fail(f"expected '<colour> <shape>' at word {i + 1}")
        return Phrase(words[i], words[i + 1], size), i + 2

    first, i = phrase_at(0)
    if i == len(words):
        return Caption("object", (first,))
    rest = " ".join(words[i:])
    if rest.startswith("in the "):
        position = rest[len("in the ") :]
        if position not in CELLS_BY_POSITION:
            raise fail(f"unknown position {position!r}")
        return Caption("position", (first,), position=position)
    for rel in RELATIONS:
        if rest.startswith(rel + " "):
            second, j = phrase_at(i + len(rel.split()))
            if j != len(words):
                raise fail("trailing words after the relation's second object")
            return Caption("relation", (first, second), relation=rel)
    phrases = [first]
    while i < len(words):
        if words[i] != "and":
            raise fail(f"unexpected word {words[i]!r}")
        ph, i = phrase_at(i + 1)
        phrases.append(ph)
    if len(phrases) > 3:
        raise fail("at most 3 objects")
    return Caption("conjunction", tuple(phrases))


# ------------------------------------------------------------------------------------- paraphrases

# Training-only surface variety. Scorers never read these; datasets store the canonical form
# beside every paraphrase.
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}
RELATION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "to the left of": ("to the left of", "left of", "on the left of"),
    "to the right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
INVERSE_RELATION: dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
PARAPHRASE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "there is {a}",
        "a picture of {a}",
        "an image of {a}",
        "a drawing of {a}",
        "{a} on a dark background",
        "this is {a}",
        "just {a}",
    ),
    "position": (
        "there is {a} at the {pos}",
        "{a} at the {pos}",
        "{a} placed in the {pos}",
        "in the {pos} there is {a}",
        "a picture of {a} in the {pos}",
        "{a} in the {pos} of the image",
    ),
    "relation": (
        "{a} is {rel} {b}",
        "there is {a} {rel} {b}",
        "a picture of {a} {rel} {b}",
        "{b} is {inv} {a}",
        "{b} with {a} {rel} it",
    ),
    "conjunction": (
        "{list}",
        "there are {list}",
        "a picture of {list}",
        "an image showing {list}",
        "{list} on a dark background",
    ),
    "count": (
        "there are {count} {colour} {plural}",
        "a picture of {count} {colour} {plural}",
        "{count} {colour} {plural} on a dark background",
        "{count} {plural}, all {colour}",
        "a group of {count} {colour} {plural}",
    ),
}


def _paraphrase_phrase(rng: random.Random, p: Phrase) -> str:
    if p.sks:
        return p.text()
    words = [rng.choice(SIZE_SYNONYMS[p.size])] if p.size else []
    words += [p.colour, p.shape]
    if rng.random() < 0.2:
        det = "one"
    else:
        det = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([det, *words])


def _join_list(rng: random.Random, parts: Sequence[str]) -> str:
    if len(parts) == 3 and rng.random() < 0.5:
        return f"{parts[0]}, {parts[1]} and {parts[2]}"
    return " and ".join(parts)


def paraphrase(rng: random.Random, caption: Caption | str) -> str:
    """A training-only paraphrase of a canonical caption (string or ``Caption``), e.g.
    ``there is a red circle at the top left``, ``a picture of two blue squares``.

    The result may by chance equal the canonical text; callers keep both and compare.
    """
    if isinstance(caption, str):
        caption = parse_caption(caption)
    form = caption.form
    template = rng.choice(PARAPHRASE_TEMPLATES[form])
    if form == "count":
        p = caption.phrases[0]
        return template.format(
            count=COUNTS[caption.count], colour=p.colour, plural=PLURALS[p.shape]
        )
    parts = [_paraphrase_phrase(rng, p) for p in caption.phrases]
    if form == "object":
        return template.format(a=parts[0])
    if form == "position":
        return template.format(a=parts[0], pos=caption.position)
    if form == "relation":
        rel = rng.choice(RELATION_SYNONYMS[caption.relation])
        inv = rng.choice(RELATION_SYNONYMS[INVERSE_RELATION[caption.relation]])
        return template.format(a=parts[0], b=parts[1], rel=rel, inv=inv)
    return template.format(list=_join_list(rng, parts))


# -------------------------------------------------------------------------- events, stories, edits


def _unique_objects(scene: Scene) -> list[Obj]:
    return [o for o in scene.objects if len(scene.find(o.colour, o.shape)) == 1]


def _empty_cells(scene: Scene) -> list[tuple[int, int]]:
    occupied = {o.cell for o in scene.objects}
    return [c for c in ALL_CELLS if c not in occupied]


def event_candidates(scene: Scene, split: str = "train") -> dict[str, list[Event]]:
    """Every event the spec allows on ``scene``, by kind (kinds with none are omitted)."""
    pool = set(allowed_pairs(split))
    present = scene.pairs()
    unique = _unique_objects(scene)
    empty = [POSITIONS[c] for c in _empty_cells(scene)]
    out: dict[str, list[Event]] = {
        "move": [Event("move", o.colour, o.shape, position=p) for o in unique for p in empty],
        "recolour": [
            Event("recolour", o.colour, o.shape, new_colour=c)
            for o in unique
            for c in COLOURS
            if c != o.colour and (c, o.shape) not in present and (c, o.shape) in pool
        ],
        "grow": [Event("grow", o.colour, o.shape) for o in unique if o.size == "small"],
        "shrink": [Event("shrink", o.colour, o.shape) for o in unique if o.size == "large"],
        "appear": [
            Event("appear", c, s, position=p)
            for c, s in allowed_pairs(split)
            if (c, s) not in present
            for p in empty
        ]
        if len(scene.objects) < 3
        else [],
        "disappear": [Event("disappear", o.colour, o.shape) for o in unique]
        if len(scene.objects) >= 2
        else [],
    }
    return {k: v for k, v in out.items() if v}


def sample_event(
    rng: random.Random, scene: Scene, split: str = "train", kinds: Sequence[str] = EVENT_KINDS
) -> Event:
    """A random valid event on ``scene``: a kind uniformly among ``kinds`` that have a
    candidate, then a candidate uniformly."""
    candidates = event_candidates(scene, split)
    usable = [k for k in kinds if k in candidates]
    if not usable:
        raise UserInputError(f"no event of kinds {tuple(kinds)} applies to scene {scene.to_dict()}")
    return rng.choice(candidates[rng.choice(usable)])


def apply_event(scene: Scene, event: Event, rng: random.Random | None = None) -> Scene:
    """The scene after ``event``. Objects placed anew (move, appear) get jitter from ``rng``
    (0 when None); an appearing object's size is random from ``rng`` ("small" when None).
    Other objects keep their attributes and order. Raises UserInputError when the event does
    not apply (its object is missing or not unique, its cell is taken, ...)."""
    objs = list(scene.objects)
    text = event.story_text()
    if event.kind == "appear":
        cell = CELLS_BY_POSITION[event.position]
        if len(objs) >= 3:
            raise UserInputError(f"{text!r}: the scene already holds 3 objects")
        if cell not in _empty_cells(scene):
            raise UserInputError(f"{text!r}: the {event.position} cell is not empty")
        if scene.find(event.colour, event.shape):
            raise UserInputError(f"{text!r}: a {event.colour} {event.shape} is already present")
        size = rng.choice(SIZE_NAMES) if rng is not None else "small"
        objs.append(Obj(event.shape, event.colour, size, *cell))
        moved = len(objs) - 1
    else:
        found = [
            i for i, o in enumerate(objs) if o.colour == event.colour and o.shape == event.shape
        ]
        if len(found) != 1:
            raise UserInputError(
                f"{text!r}: the scene holds {len(found)} {event.colour} {PLURALS[event.shape]}, "
                "expected exactly 1"
            )
        i = moved = found[0]
        o = objs[i]
        if event.kind == "move":
            cell = CELLS_BY_POSITION[event.position]
            if cell not in _empty_cells(scene):
                raise UserInputError(f"{text!r}: the {event.position} cell is not empty")
            objs[i] = o.with_(col=cell[0], row=cell[1])
        elif event.kind == "recolour":
            if event.new_colour == o.colour:
                raise UserInputError(f"{text!r}: the new colour is the same as the old one")
            if scene.find(event.new_colour, o.shape):
                raise UserInputError(
                    f"{text!r}: would duplicate the {event.new_colour} {o.shape} already present"
                )
            objs[i] = o.with_(colour=event.new_colour)
        elif event.kind in ("grow", "shrink"):
            want, new = ("small", "large") if event.kind == "grow" else ("large", "small")
            if o.size != want:
                raise UserInputError(
                    f"{text!r}: only a {want} object can {event.kind}, this one is {o.size}"
                )
            objs[i] = o.with_(size=new)
        elif event.kind == "disappear":
            if len(objs) < 2:
                raise UserInputError(f"{text!r}: the last object cannot disappear")
            return Scene(tuple(objs[:i] + objs[i + 1 :]))
    if event.kind in ("move", "appear"):
        out = _rejitter(rng, objs, [moved])
    else:
        out = Scene(tuple(objs))
        out = out if out.is_valid() else _rejitter(rng, objs, [moved])
    if out is None:
        raise UserInputError(f"{text!r}: no jitter keeps the objects 1 px apart")
    return out


@dataclass
class Story:
    """2 to 4 scenes; ``texts[0]`` captions scene 1, ``texts[k]`` is ``events[k-1]``'s text."""

    scenes: list[Scene]
    texts: list[str]
    events: list[Event]

    def to_dict(self) -> dict:
        return {
            "scenes": [s.to_dict() for s in self.scenes],
            "texts": list(self.texts),
            "events": [e.to_dict() for e in self.events],
        }


def sample_story(
    rng: random.Random,
    n_scenes: int | None = None,
    split: str = "train",
    *,
    require_held_out: bool = False,
) -> Story:
    """A story of ``n_scenes`` (2 to 4; random when None): a captioned first scene with
    distinct objects, then one random valid event per later scene."""
    _check_held_out(split, require_held_out)
    n = rng.randint(2, 4) if n_scenes is None else n_scenes
    if not 2 <= n <= 4:
        raise UserInputError(f"a story has 2 to 4 scenes, got n_scenes={n}")
    scene = sample_scene(rng, None, split, require_held_out=require_held_out)
    story = Story([scene], [sample_caption(rng, scene)], [])
    for _ in range(n - 1):
        event = sample_event(rng, scene, split)
        scene = apply_event(scene, event, rng)
        story.scenes.append(scene)
        story.texts.append(event.story_text())
        story.events.append(event)
    return story


@dataclass(frozen=True)
class Edit:
    """(source image, instruction, target image), as scenes, with the event behind it."""

    source: Scene
    instruction: str
    target: Scene
    event: Event

    def to_dict(self) -> dict:
        return {
            "source": self.source.to_dict(),
            "instruction": self.instruction,
            "target": self.target.to_dict(),
            "event": self.event.to_dict(),
        }


def sample_edit(
    rng: random.Random, split: str = "train", *, require_held_out: bool = False
) -> Edit:
    """A random scene, a random valid event on it, and the scene after it."""
    _check_held_out(split, require_held_out)
    source = sample_scene(rng, None, split, require_held_out=require_held_out)
    event = sample_event(rng, source, split)
    return Edit(source, event.instruction(), apply_event(source, event, rng), event)


# ---------------------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class SubjectIdentity:
    """A subject: (shape, primary colour, pattern, secondary colour)."""

    shape: str
    colour: str
    pattern: str
    secondary: str

    def __post_init__(self) -> None:
        Subject(self.pattern, self.secondary)  # validates pattern and secondary colour
        if self.shape not in SHAPES or self.colour not in COLOURS:
            raise ValueError(f"bad subject shape/colour {self.shape!r}/{self.colour!r}")
        if self.secondary == self.colour:
            raise ValueError(f"a subject's two colours must differ, got {self.colour!r} twice")

    @property
    def held_out(self) -> bool:
        """True when this identity may not appear in training (held-out subject or pair)."""
        return (
            (self.pattern, self.colour) in HELD_OUT_SUBJECTS
            or (self.colour, self.shape) in HELD_OUT_PAIRS
            or (self.secondary, self.shape) in HELD_OUT_PAIRS
        )

    def obj(self, size: str, col: int, row: int, dx: int = 0, dy: int = 0) -> Obj:
        return Obj(
            self.shape, self.colour, size, col, row, dx, dy, Subject(self.pattern, self.secondary)
        )

    def matches(self, o: Obj) -> bool:
        return (
            o.shape == self.shape
            and o.colour == self.colour
            and o.subject == Subject(self.pattern, self.secondary)
        )

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "pattern": self.pattern,
            "secondary": self.secondary,
        }


ALL_SUBJECTS: tuple[SubjectIdentity, ...] = tuple(
    SubjectIdentity(s, c, p, c2)
    for s in SHAPES
    for c in COLOURS
    for p in PATTERNS
    for c2 in COLOURS
    if c2 != c
)


def sample_subject(
    rng: random.Random, split: str = "train", *, require_held_out: bool = False
) -> SubjectIdentity:
    """A random subject. Train: never a held-out subject (``HELD_OUT_SUBJECTS``) and neither
    colour forms a held-out pair with the shape. ``require_held_out`` (test only): its
    (pattern, primary colour) is one of ``HELD_OUT_SUBJECTS``."""
    _check_held_out(split, require_held_out)
    if require_held_out:
        pool = [s for s in ALL_SUBJECTS if (s.pattern, s.colour) in HELD_OUT_SUBJECTS]
    elif split == "train":
        pool = [s for s in ALL_SUBJECTS if not s.held_out]
    else:
        pool = list(ALL_SUBJECTS)
    return rng.choice(pool)


def _other_specs(
    rng: random.Random, subject: SubjectIdentity, n: int, split: str
) -> list[tuple[str, str, str, None]]:
    pool = [p for p in allowed_pairs(split) if p != (subject.colour, subject.shape)]
    return [(c, s, rng.choice(SIZE_NAMES), None) for c, s in rng.sample(pool, n)]


def _subject_scene(
    rng: random.Random,
    subject: SubjectIdentity,
    size: str,
    cells: Sequence[tuple[int, int]],
    split: str,
) -> Scene:
    """The subject in ``cells[0]`` and plain distinct objects in the other cells."""
    spec = (subject.colour, subject.shape, size, Subject(subject.pattern, subject.secondary))
    while True:
        scene = _place(rng, [spec, *_other_specs(rng, subject, len(cells) - 1, split)], cells)
        if scene is not None:
            return scene


def subject_references(
    rng: random.Random, subject: SubjectIdentity, n: int | None = None, split: str = "train"
) -> list[Scene]:
    """``n`` (3 to 5 when None) reference scenes of ``subject``: each in a different cell, both
    sizes represented, each with 0 to 2 other (plain) objects. The subject is ``objects[0]``."""
    n = rng.randint(3, 5) if n is None else n
    if not 1 <= n <= len(ALL_CELLS):
        raise UserInputError(f"subject references: n must be 1 to 9, got {n}")
    check_split(split)
    cells = rng.sample(ALL_CELLS, n)
    sizes = [rng.choice(SIZE_NAMES) for _ in range(n)]
    if n >= 2 and len(set(sizes)) == 1:
        k = rng.randrange(n)
        sizes[k] = "large" if sizes[k] == "small" else "small"
    refs = []
    for cell, size in zip(cells, sizes, strict=True):
        others = rng.sample([c for c in ALL_CELLS if c != cell], rng.randint(0, 2))
        refs.append(_subject_scene(rng, subject, size, [cell, *others], split))
    return refs


def sample_subject_prompt(
    rng: random.Random, subject: SubjectIdentity, split: str = "train", form: str | None = None
) -> tuple[str, Scene]:
    """A subject-driven prompt (caption grammar with ``the sks <shape>`` in place of one object)
    and a scene satisfying it, e.g. ``the sks circle to the left of a blue square``."""
    check_split(split)
    if form is None:
        form = rng.choice(SUBJECT_PROMPT_FORMS)
    if form not in SUBJECT_PROMPT_FORMS:
        raise UserInputError(
            f"unknown subject prompt form {form!r}; expected one of {SUBJECT_PROMPT_FORMS}"
        )
    n = {"object": 1, "position": 1, "relation": 2}.get(form) or rng.randint(2, 3)
    scene = _subject_scene(rng, subject, rng.choice(SIZE_NAMES), rng.sample(ALL_CELLS, n), split)
    sks = Phrase(None, subject.shape, sks=True)
    phrases = [sks, *(_phrase(rng, o) for o in scene.objects[1:])]
    objs = list(scene.objects)
    if form == "object":
        caption = Caption(form, (sks,))
    elif form == "position":
        caption = Caption(form, (sks,), position=objs[0].position)
    else:
        order = list(range(n))
        rng.shuffle(order)
        if form == "relation":
            a, b = (objs[k] for k in order)
            rel = rng.choice([r for r in RELATIONS if relation_holds(r, a, b)])
            caption = Caption(form, tuple(phrases[k] for k in order), relation=rel)
        else:
            caption = Caption(form, tuple(phrases[k] for k in order))
    return caption.text(), scene


# --------------------------------------------------------------------------------------------- VQA


def vqa_candidates(scene: Scene, split: str = "train") -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) from ``VQA_TEMPLATES`` that is unambiguous for ``scene``."""
    objs = scene.objects
    present = scene.pairs()
    unique = _unique_objects(scene)
    t = VQA_TEMPLATES
    out: dict[str, list[tuple[str, str]]] = {
        "colour": [
            (t["colour"].format(shape=o.shape), o.colour)
            for o in objs
            if sum(p.shape == o.shape for p in objs) == 1
        ],
        "shape": [
            (t["shape"].format(colour=o.colour), o.shape)
            for o in objs
            if sum(p.colour == o.colour for p in objs) == 1
        ],
        "count": [(t["count"], COUNT_WORDS[len(objs)])],
        "position": [
            (t["position"].format(colour=o.colour, shape=o.shape), o.position) for o in unique
        ],
        "size": [(t["size"].format(colour=o.colour, shape=o.shape), o.size) for o in unique],
        "exists_yes": [(t["exists"].format(colour=c, shape=s), "yes") for c, s in sorted(present)],
        "exists_no": [
            (t["exists"].format(colour=c, shape=s), "no")
            for c, s in allowed_pairs(split)
            if (c, s) not in present
        ],
    }
    return {k: v for k, v in out.items() if v}


def sample_vqa(rng: random.Random, scene: Scene, split: str = "train") -> tuple[str, str]:
    """A (question, short answer) pair about ``scene``: a template uniformly among those with an
    unambiguous answer ("is there" split evenly between yes and no), then a question."""
    candidates = vqa_candidates(scene, split)
    kinds = [k for k in VQA_TEMPLATES if k in candidates or k == "exists"]
    kind = rng.choice(kinds)
    if kind == "exists":
        kind = rng.choice([k for k in ("exists_yes", "exists_no") if k in candidates])
    return rng.choice(candidates[kind])


# -------------------------------------------------------------------------------- per-task samples


@dataclass(frozen=True)
class T2ISample:
    """A scene and the text fed with it; ``canonical`` is always its canonical caption."""

    scene: Scene
    text: str
    canonical: str
    form: str

    @property
    def paraphrased(self) -> bool:
        return self.text != self.canonical

    def to_dict(self) -> dict:
        return {
            "scene": self.scene.to_dict(),
            "caption": self.canonical,
            "text": self.text,
            "paraphrased": self.paraphrased,
            "form": self.form,
        }


@dataclass(frozen=True)
class SubjectSample:
    """A subject, its reference scenes, and a subject-driven prompt with a scene satisfying it."""

    subject: SubjectIdentity
    references: tuple[Scene, ...]
    prompt: str
    scene: Scene

    def to_dict(self) -> dict:
        return {
            "subject": self.subject.to_dict(),
            "references": [s.to_dict() for s in self.references],
            "prompt": self.prompt,
            "scene": self.scene.to_dict(),
        }


@dataclass(frozen=True)
class VQASample:
    scene: Scene
    question: str
    answer: str

    def to_dict(self) -> dict:
        return {"scene": self.scene.to_dict(), "question": self.question, "answer": self.answer}


def t2i_sample(
    rng: random.Random,
    split: str = "train",
    *,
    paraphrase_prob: float = 0.0,
    form: str | None = None,
    require_held_out: bool = False,
    form_weights: Mapping[str, float] | None = None,
) -> T2ISample:
    """Caption-first text-to-image sample; with probability ``paraphrase_prob`` (train only)
    the fed text is a paraphrase of the canonical caption. ``form_weights`` weighs the caption
    forms (see ``sample_captioned_scene``)."""
    if paraphrase_prob and split != "train":
        raise UserInputError(
            "paraphrases are for training only; use paraphrase_prob=0 with split='test'"
        )
    if not 0.0 <= paraphrase_prob <= 1.0:
        raise UserInputError(f"paraphrase_prob must be in [0, 1], got {paraphrase_prob}")
    caption, scene = sample_captioned_scene(
        rng, split, form, require_held_out=require_held_out, form_weights=form_weights
    )
    canonical = caption.text()
    text = paraphrase(rng, caption) if rng.random() < paraphrase_prob else canonical
    return T2ISample(scene, text, canonical, caption.form)


def subject_sample(
    rng: random.Random, split: str = "train", *, require_held_out: bool = False
) -> SubjectSample:
    subject = sample_subject(rng, split, require_held_out=require_held_out)
    refs = subject_references(rng, subject, split=split)
    prompt, scene = sample_subject_prompt(rng, subject, split)
    return SubjectSample(subject, tuple(refs), prompt, scene)


def vqa_sample(
    rng: random.Random, split: str = "train", *, require_held_out: bool = False
) -> VQASample:
    scene = sample_scene(rng, None, split, require_held_out=require_held_out)
    question, answer = sample_vqa(rng, scene, split)
    return VQASample(scene, question, answer)


def story_sample(
    rng: random.Random, split: str = "train", *, require_held_out: bool = False
) -> Story:
    return sample_story(rng, None, split, require_held_out=require_held_out)


def edit_sample(
    rng: random.Random, split: str = "train", *, require_held_out: bool = False
) -> Edit:
    return sample_edit(rng, split, require_held_out=require_held_out)


# task name -> sampler(rng, split, *, require_held_out=...) (t2i also takes paraphrase_prob, form,
# form_weights)
TASKS: dict[str, Callable[..., T2ISample | Story | Edit | SubjectSample | VQASample]] = {
    "t2i": t2i_sample,
    "story": story_sample,
    "edit": edit_sample,
    "subject": subject_sample,
    "vqa": vqa_sample,
}


def task_sample(
    task: str, seed: int, index: int, split: str = "train", **options
) -> T2ISample | Story | Edit | SubjectSample | VQASample:
    """Sample ``index`` of ``task`` under ``seed``: a function of (task, seed, index, split,
    options) only, so datasets and exports can address samples at random."""
    if task not in TASKS:
        raise UserInputError(f"unknown shapes task {task!r}; expected one of {tuple(TASKS)}")
    check_split(split)
    return TASKS[task](sample_rng(seed, task, index, split), split, **options)


# ------------------------------------------------------------------------------------- text corpus


def _coverage_lines(split: str) -> Iterator[str]:
    """A fixed set of lines that uses every word the world's texts can contain."""
    pairs = allowed_pairs(split)
    for c, s in pairs:
        for size in SIZE_NAMES:
            yield f"a {size} {c} {s}"
    for pos, (c, s) in zip(itertools.cycle(CELLS_BY_POSITION), pairs):
        yield f"a {c} {s} in the {pos}"
    for k, rel in enumerate(RELATIONS):
        (c1, s1), (c2, s2) = pairs[k], pairs[-k - 1]
        yield f"a {c1} {s1} {rel} a {c2} {s2}"
    yield "a red square and a small green star and a large blue cross"
    for s in SHAPES:
        c = next(c for c, s2 in pairs if s2 == s)
        for word in COUNTS.values():
            yield f"{word} {c} {PLURALS[s]}"
    for pos in CELLS_BY_POSITION:
        for kind in ("move", "appear"):
            e = Event(kind, "red", "square", position=pos)
            yield e.story_text()
            yield e.instruction()
    for kind in ("recolour", "grow", "shrink", "disappear"):
        e = Event(kind, "red", "square", new_colour="blue" if kind == "recolour" else None)
        yield e.story_text()
        yield e.instruction()
    for s in SHAPES:
        yield f"the {SUBJECT_TOKEN} {s} to the left of a blue square"
        yield VQA_TEMPLATES["colour"].format(shape=s)
    for c in COLOURS:
        yield VQA_TEMPLATES["shape"].format(colour=c)
    yield VQA_TEMPLATES["count"]
    for key in ("position", "exists", "size"):
        yield VQA_TEMPLATES[key].format(colour="red", shape="square")
    yield " ".join([*COUNT_WORDS.values(), "yes", "no", *SIZE_NAMES])
    # paraphrase vocabulary: every template, synonym and determiner
    a, b = "a green circle", "an orange square"
    for templates in PARAPHRASE_TEMPLATES.values():
        for t in templates:
            yield t.format(
                a=a,
                b=b,
                pos="top left",
                rel="above",
                inv="below",
                list=f"{a}, {b} and one blue star",
                count="two",
                colour="red",
                plural="triangles",
            )
    for syns in (*SIZE_SYNONYMS.values(), *RELATION_SYNONYMS.values()):
        yield "a green circle " + " ".join(syns) + " a red star"


def text_corpus(n: int, seed: int = 0, split: str = "train") -> Iterator[str]:
    """``n`` lines of shapes-world text for training a tokenizer: first a fixed block that uses
    every word the world's texts contain (truncated when ``n`` is smaller), then random lines
    cycling through canonical captions, paraphrases, story texts, edit instructions, VQA
    questions, VQA answers and subject prompts. Deterministic from ``seed``."""
    check_split(split)
    rng = random.Random(seed)
    count = 0
    for line in _coverage_lines(split):
        if count >= n:
            return
        yield line
        count += 1
    kinds = ("caption", "paraphrase", "story", "instruction", "question", "answer", "subject")
    for k in itertools.count():
        if count >= n:
            return
        kind = kinds[k % len(kinds)]
        if kind in ("caption", "paraphrase"):
            caption, _ = sample_captioned_scene(rng, split)
            yield caption.text() if kind == "caption" else paraphrase(rng, caption)
        elif kind in ("story", "instruction"):
            scene = sample_scene(rng, None, split)
            event = sample_event(rng, scene, split)
            yield event.story_text() if kind == "story" else event.instruction()
        elif kind in ("question", "answer"):
            question, answer = sample_vqa(rng, sample_scene(rng, None, split), split)
            yield question if kind == "question" else answer
        else:
            yield sample_subject_prompt(rng, sample_subject(rng, split), split)[0]
        count += 1


__all__ = [
    "ALL_SUBJECTS",
    "CAPTION_FORMS",
    "HELD_OUT_SUBJECTS",
    "SPLITS",
    "TASKS",
    "VQA_TEMPLATES",
    "Caption",
    "Edit",
    "Phrase",
    "Story",
    "SubjectIdentity",
    "SubjectSample",
    "T2ISample",
    "VQASample",
    "allowed_pairs",
    "apply_event",
    "canonical_captions",
    "caption_scene",
    "event_candidates",
    "paraphrase",
    "parse_caption",
    "relation_holds",
    "sample_caption",
    "sample_captioned_scene",
    "sample_edit",
    "sample_event",
    "sample_rng",
    "sample_scene",
    "sample_story",
    "sample_subject",
    "sample_subject_prompt",
    "sample_vqa",
    "subject_references",
    "task_sample",
    "text_corpus",
    "vqa_candidates",
]
