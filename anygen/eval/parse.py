"""Parse shapes-world texts into structures: captions, subject prompts, story events and
edit instructions, exactly in the canonical grammar of ``shared/specs/shapes-world.md``.

The parser is strict: lower case, single spaces, no final full stop (surrounding
whitespace is ignored). Text outside the grammar raises ``UserInputError`` naming the
text and the first thing that does not fit, so a scorer can count it as out of grammar.

Caption forms (``CaptionSpec.form``)::

    object       a [size] colour shape
    position     a [size] colour shape in the <position>
    relation     <object> <relation> <object>
    conjunction  <object> and <object> [and <object>]
    count        <two|three> colour <plural>

Subject prompts use the same forms (not ``count``) with ``the sks <shape>`` in place of
exactly one object.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from anygen.data.world import (
    CELLS_BY_POSITION,
    COLOURS,
    COUNTS,
    PLURALS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SUBJECT_TOKEN,
    Event,
)
from anygen.errors import UserInputError

CAPTION_FORMS: tuple[str, ...] = ("object", "position", "relation", "conjunction", "count")

_SHAPE_BY_PLURAL = {p: s for s, p in PLURALS.items()}
_COUNT_BY_WORD = {w: n for n, w in COUNTS.items()}
_RELATION_WORDS = {rel: rel.split() for rel in RELATIONS}
_POSITION_WORDS = {name: name.split() for name in CELLS_BY_POSITION}
_VOCABULARY = (
    set(COLOURS)
    | set(SHAPES)
    | set(PLURALS.values())
    | set(SIZES)
    | set(_COUNT_BY_WORD)
    | {w for rel in RELATIONS for w in rel.split()}
    | {w for name in CELLS_BY_POSITION for w in name.split()}
    | {"a", "the", "in", "and", SUBJECT_TOKEN}
    | {"moves", "turns", "grows", "shrinks", "appears", "disappears"}
    | {"move", "make", "add", "remove"}
)


@dataclass(frozen=True)
class ObjectSpec:
    """What a text asks of one object; None means "any".

    ``subject``: the object is ``the sks <shape>`` (its colours and pattern come from the
    subject, not the text). ``pattern``/``secondary`` are set only by judges that know the
    subject's identity.
    """

    colour: str | None
    shape: str
    size: str | None = None
    cell: tuple[int, int] | None = None
    subject: bool = False
    pattern: str | None = None
    secondary: str | None = None

    def phrase(self) -> str:
        """The object's canonical phrase: ``a [size] colour shape`` or ``the sks shape``."""
        if self.subject:
            return f"the {SUBJECT_TOKEN} {self.shape}"
        size = f"{self.size} " if self.size else ""
        return f"a {size}{self.colour} {self.shape}"

    def describe(self) -> str:
        """The phrase plus every other constraint, for reasons."""
        text = self.phrase()
        if self.subject and self.colour:
            pattern = f" {self.pattern} with {self.secondary}" if self.pattern else ""
            text = f"{text} ({self.colour}{pattern})"
        if self.subject and self.size:
            text = f"{text} ({self.size})"
        if self.cell is not None:
            text = f"{text} in the {POSITIONS[self.cell]}"
        return text


@dataclass(frozen=True)
class Relation:
    """``objects[first] <relation> objects[second]``."""

    first: int
    relation: str
    second: int


@dataclass(frozen=True)
class CaptionSpec:
    """A caption (or a story state) as constraints on the objects of one image.

    ``form`` is one of ``CAPTION_FORMS``, or ``"state"`` for a story state reached by events
    (which has no single canonical text). Objects are in the caption's order; a count
    caption lists its identical objects ``count`` times.
    """

    form: str
    objects: tuple[ObjectSpec, ...]
    relations: tuple[Relation, ...] = ()

    @property
    def count(self) -> int:
        return len(self.objects)

    def to_text(self) -> str:
        """The canonical caption text (the inverse of ``parse_caption``)."""
        p = [o.phrase() for o in self.objects]
        if self.form == "object":
            return p[0]
        if self.form == "position":
            return f"{p[0]} in the {POSITIONS[self.objects[0].cell]}"
        if self.form == "relation":
            rel = self.relations[0]
            return f"{p[rel.first]} {rel.relation} {p[rel.second]}"
        if self.form == "conjunction":
            return " and ".join(p)
        if self.form == "count":
            o = self.objects[0]
            return f"{COUNTS[len(self.objects)]} {o.colour} {PLURALS[o.shape]}"
        raise ValueError(f"a {self.form!r} spec has no canonical caption; use describe()")

    def describe(self) -> str:
        """Every constraint in words (any form, states included)."""
        if self.form in CAPTION_FORMS:
            return self.to_text()
        parts = [o.describe() for o in self.objects]
        rels = [
            f"{self.objects[r.first].phrase()} {r.relation} {self.objects[r.second].phrase()}"
            for r in self.relations
        ]
        return "; ".join(parts + rels) if parts else "(no objects)"

    def with_objects(self, objects: tuple[ObjectSpec, ...]) -> CaptionSpec:
        return replace(self, objects=objects)


# ----------------------------------------------------------------------------------- helpers


class _Fail(Exception):
    """Internal: where and why a parse stopped."""


def _words(text: str, kind: str) -> list[str]:
    if not isinstance(text, str):
        raise UserInputError(f"{kind} must be a string, got {type(text).__name__}")
    body = text.strip()
    if not body:
        raise UserInputError(f"{kind} {text!r} is empty")
    words = body.split(" ")
    why = None
    if body != body.lower():
        why = "the grammar is lower case"
    elif body.endswith("."):
        why = "the grammar has no final full stop"
    elif any(w == "" for w in words) or any(c in body for c in "\t\n\r"):
        why = "words must be separated by single spaces"
    else:
        unknown = [w for w in words if w not in _VOCABULARY]
        if unknown:
            why = f"unknown word {unknown[0]!r}"
    if why:
        raise UserInputError(f"{kind} {text!r} is outside the shapes-world grammar: {why}")
    return words


def _expect(words: list[str], i: int, want: list[str]) -> int:
    if words[i : i + len(want)] != want:
        got = " ".join(words[i : i + len(want)]) or "the end"
        raise _Fail(f"expected {' '.join(want)!r} at word {i + 1}, got {got!r}")
    return i + len(want)


def _one_of(words: list[str], i: int, options: dict[str, list[str]], what: str) -> tuple[str, int]:
    """The longest option whose words start at ``i``."""
    for name, ws in sorted(options.items(), key=lambda kv: -len(kv[1])):
        if words[i : i + len(ws)] == ws:
            return name, i + len(ws)
    got = words[i] if i < len(words) else "the end"
    raise _Fail(f"expected {what} at word {i + 1}, got {got!r}")


def _word(words: list[str], i: int, options, what: str) -> tuple[str, int]:
    if i < len(words) and words[i] in options:
        return words[i], i + 1
    got = words[i] if i < len(words) else "the end"
    raise _Fail(f"expected {what} at word {i + 1}, got {got!r}")


def _colour_shape(words: list[str], i: int) -> tuple[str, str, int]:
    colour, i = _word(words, i, COLOURS, "a colour")
    shape, i = _word(words, i, SHAPES, "a shape")
    return colour, shape, i


def _object(words: list[str], i: int, allow_subject: bool) -> tuple[ObjectSpec, int]:
    """``a [size] colour shape`` or, when allowed, ``the sks shape``."""
    if allow_subject and words[i : i + 2] == ["the", SUBJECT_TOKEN]:
        shape, i = _word(words, i + 2, SHAPES, "a shape")
        return ObjectSpec(None, shape, subject=True), i
    i = _expect(words, i, ["a"])
    size = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    colour, shape, i = _colour_shape(words, i)
    return ObjectSpec(colour, shape, size), i


def _end(words: list[str], i: int) -> None:
    if i != len(words):
        raise _Fail(f"unexpected {' '.join(words[i:])!r} after word {i}")


def _parse_caption_words(words: list[str], allow_subject: bool) -> CaptionSpec:
    if words[0] in _COUNT_BY_WORD:
        n = _COUNT_BY_WORD[words[0]]
        colour, i = _word(words, 1, COLOURS, "a colour")
        plural, i = _word(words, i, _SHAPE_BY_PLURAL, "a plural shape (circles, squares, ...)")
        _end(words, i)
        return CaptionSpec("count", (ObjectSpec(colour, _SHAPE_BY_PLURAL[plural]),) * n)
    first, i = _object(words, 0, allow_subject)
    if i == len(words):
        return CaptionSpec("object", (first,))
    if words[i] == "in":
        i = _expect(words, i, ["in", "the"])
        position, i = _one_of(words, i, _POSITION_WORDS, "a position")
        _end(words, i)
        return CaptionSpec("position", (replace(first, cell=CELLS_BY_POSITION[position]),))
    if words[i] == "and":
        objects = [first]
        while i < len(words):
            if len(objects) == 3:
                raise _Fail("a conjunction names at most 3 objects")
            i = _expect(words, i, ["and"])
            obj, i = _object(words, i, allow_subject)
            objects.append(obj)
        return CaptionSpec("conjunction", tuple(objects))
    relation, i = _one_of(words, i, _RELATION_WORDS, "'in the', 'and' or a relation")
    second, i = _object(words, i, allow_subject)
    _end(words, i)
    return CaptionSpec("relation", (first, second), (Relation(0, relation, 1),))


# ------------------------------------------------------------------------------------ public


def parse_caption(text: str, *, allow_subject: bool = False) -> CaptionSpec:
    """A canonical caption as constraints. ``allow_subject``: accept ``the sks <shape>`` in
    place of one object (subject prompts). Raises UserInputError naming the text otherwise."""
    words = _words(text, "caption")
    try:
        spec = _parse_caption_words(words, allow_subject)
    except _Fail as e:
        raise UserInputError(f"caption {text!r} is outside the shapes-world grammar: {e}") from None
    if len(spec.objects) > 3:
        raise UserInputError(f"caption {text!r} names {len(spec.objects)} objects; at most 3")
    n_subjects = sum(o.subject for o in spec.objects)
    if n_subjects > 1:
        raise UserInputError(f"prompt {text!r} names {n_subjects} subjects; at most one")
    return spec


def parse_subject_prompt(text: str) -> CaptionSpec:
    """A subject-driven prompt: the caption grammar with ``the sks <shape>`` in place of
    exactly one object (e.g. ``the sks circle to the left of a blue square``)."""
    spec = parse_caption(text, allow_subject=True)
    if not any(o.subject for o in spec.objects):
        raise UserInputError(
            f"prompt {text!r} names no subject: expected 'the {SUBJECT_TOKEN} <shape>' in place "
            "of one object"
        )
    return spec


def parse_event(text: str) -> Event:
    """A story event (narrative form), e.g. ``the red circle moves to the top left``."""
    words = _words(text, "event")
    try:
        if words[0] == "a":  # a colour shape appears in the position
            colour, shape, i = _colour_shape(words, 1)
            i = _expect(words, i, ["appears", "in", "the"])
            position, i = _one_of(words, i, _POSITION_WORDS, "a position")
            _end(words, i)
            return Event("appear", colour, shape, position=position)
        i = _expect(words, 0, ["the"])
        colour, shape, i = _colour_shape(words, i)
        verb, i = _word(
            words, i, ("moves", "turns", "grows", "shrinks", "disappears"), "an event verb"
        )
        if verb == "moves":
            i = _expect(words, i, ["to", "the"])
            position, i = _one_of(words, i, _POSITION_WORDS, "a position")
            _end(words, i)
            return Event("move", colour, shape, position=position)
        if verb == "turns":
            new_colour, i = _word(words, i, COLOURS, "a colour")
            _end(words, i)
            return Event("recolour", colour, shape, new_colour=new_colour)
        _end(words, i)
        kind = {"grows": "grow", "shrinks": "shrink", "disappears": "disappear"}[verb]
        return Event(kind, colour, shape)
    except _Fail as e:
        raise UserInputError(f"event {text!r} is outside the shapes-world grammar: {e}") from None


def parse_instruction(text: str) -> Event:
    """An edit instruction (imperative form), e.g. ``make the red circle blue``."""
    words = _words(text, "instruction")
    try:
        verb, i = _word(words, 0, ("move", "make", "add", "remove"), "move, make, add or remove")
        if verb == "add":
            i = _expect(words, i, ["a"])
            colour, shape, i = _colour_shape(words, i)
            i = _expect(words, i, ["in", "the"])
            position, i = _one_of(words, i, _POSITION_WORDS, "a position")
            _end(words, i)
            return Event("appear", colour, shape, position=position)
        i = _expect(words, i, ["the"])
        colour, shape, i = _colour_shape(words, i)
        if verb == "remove":
            _end(words, i)
            return Event("disappear", colour, shape)
        if verb == "move":
            i = _expect(words, i, ["to", "the"])
            position, i = _one_of(words, i, _POSITION_WORDS, "a position")
            _end(words, i)
            return Event("move", colour, shape, position=position)
        target, i = _word(words, i, (*COLOURS, *SIZES), "a colour, 'large' or 'small'")
        _end(words, i)
        if target == "large":
            return Event("grow", colour, shape)
        if target == "small":
            return Event("shrink", colour, shape)
        return Event("recolour", colour, shape, new_colour=target)
    except _Fail as e:
        raise UserInputError(
            f"instruction {text!r} is outside the shapes-world grammar: {e}"
        ) from None


def in_grammar(text: str, parser=parse_caption) -> bool:
    """True when ``parser`` (parse_caption, parse_event, ...) accepts ``text``."""
    try:
        parser(text)
    except UserInputError:
        return False
    return True


__all__ = [
    "CAPTION_FORMS",
    "CaptionSpec",
    "ObjectSpec",
    "Relation",
    "in_grammar",
    "parse_caption",
    "parse_event",
    "parse_instruction",
    "parse_subject_prompt",
]
