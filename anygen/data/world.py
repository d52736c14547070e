"""The shapes world, version 1: constants and scene types, exactly as
``shared/specs/shapes-world.md`` defines them.

Everything here is given for a 64-pixel canvas and scaled linearly (rounded to the
nearest pixel) for other sizes. Rendering lives in ``render.py``, generation of
scenes and texts in ``shapes.py``; the scorer in ``anygen.eval`` reads only this
module and the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

REFERENCE_SIZE = 64
BACKGROUND: tuple[int, int, int] = (24, 24, 24)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "orange": (245, 145, 35),
    "yellow": (240, 220, 50),
    "green": (50, 185, 75),
    "cyan": (50, 200, 215),
    "blue": (55, 95, 230),
    "purple": (155, 75, 210),
    "white": (235, 235, 235),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "star": "stars",
    "cross": "crosses",
}

# half-extent r at 64 px
SIZES: dict[str, int] = {"small": 6, "large": 9}

# 3 x 3 grid: column centres (left, centre, right) and row centres (top, middle, bottom)
CELL_CENTRES: tuple[int, int, int] = (11, 32, 53)
JITTER: tuple[int, int, int] = (-1, 0, 1)

# (col, row) -> position name
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (1, 0): "top",
    (2, 0): "top right",
    (0, 1): "left",
    (1, 1): "center",
    (2, 1): "right",
    (0, 2): "bottom left",
    (1, 2): "bottom",
    (2, 2): "bottom right",
}
CELLS_BY_POSITION: dict[str, tuple[int, int]] = {name: cell for cell, name in POSITIONS.items()}

RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
COUNTS: dict[int, str] = {2: "two", 3: "three"}

PATTERNS: tuple[str, ...] = ("striped", "dotted", "ringed")

# (colour, shape) pairs that never appear in training data, in any role.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("cyan", "star"), ("white", "diamond")}
)

# Star inner radius as a fraction of the outer one; cross bar width as a fraction of r.
STAR_INNER = 0.45
CROSS_WIDTH = 0.7
SUBJECT_TOKEN = "sks"


def scale(value: float, size: int) -> int:
    """A 64-px length or coordinate at canvas ``size``, rounded to the nearest pixel."""
    return int(round(value * size / REFERENCE_SIZE))


@dataclass(frozen=True)
class Subject:
    """A two-colour pattern that turns an object into a subject (spec: Subjects)."""

    pattern: str  # one of PATTERNS
    secondary: str  # colour name of the pattern

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {PATTERNS}")
        if self.secondary not in COLOURS:
            raise ValueError(f"unknown colour {self.secondary!r}; expected one of {tuple(COLOURS)}")


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, size and cell, plus its jitter and optional pattern."""

    shape: str
    colour: str
    size: str  # "small" | "large"
    col: int  # 0..2, left to right
    row: int  # 0..2, top to bottom
    dx: int = 0  # jitter in JITTER, at 64 px
    dy: int = 0
    subject: Subject | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected 'small' or 'large'")
        if not (0 <= self.col <= 2 and 0 <= self.row <= 2):
            raise ValueError(f"cell ({self.col}, {self.row}) is outside the 3 x 3 grid")
        if self.dx not in JITTER or self.dy not in JITTER:
            raise ValueError(f"jitter ({self.dx}, {self.dy}) is outside {JITTER}")

    @property
    def cell(self) -> tuple[int, int]:
        return (self.col, self.row)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def radius(self) -> int:
        """Half-extent at 64 px."""
        return SIZES[self.size]

    def centre(self, size: int = REFERENCE_SIZE) -> tuple[int, int]:
        """Pixel centre (cx, cy) on a canvas of side ``size``."""
        return (
            scale(CELL_CENTRES[self.col] + self.dx, size),
            scale(CELL_CENTRES[self.row] + self.dy, size),
        )

    def bbox(self, size: int = REFERENCE_SIZE) -> tuple[int, int, int, int]:
        """Inclusive-exclusive box (x0, y0, x1, y1) on a canvas of side ``size``."""
        cx, cy = self.centre(size)
        r = scale(self.radius, size)
        return (cx - r, cy - r, cx + r, cy + r)

    def with_(self, **changes) -> Obj:
        return replace(self, **changes)


def boxes_apart(a: Obj, b: Obj, gap: int = 1) -> bool:
    """True when the bounding boxes of a and b (at 64 px) are at least ``gap`` pixels apart."""
    ax0, ay0, ax1, ay1 = a.bbox()
    bx0, by0, bx1, by1 = b.bbox()
    dx = max(bx0 - ax1, ax0 - bx1)
    dy = max(by0 - ay1, ay0 - by1)
    return max(dx, dy) >= gap


@dataclass(frozen=True)
class Scene:
    """1 to 3 objects, each in its own cell."""

    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene holds 1 to 3 objects, got {len(self.objects)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")

    def is_valid(self) -> bool:
        """All pairs of bounding boxes at least 1 px apart (the spec's spacing rule)."""
        objs = self.objects
        return all(
            boxes_apart(objs[i], objs[j]) for i in range(len(objs)) for j in range(i + 1, len(objs))
        )

    def find(self, colour: str, shape: str) -> list[Obj]:
        return [o for o in self.objects if o.colour == colour and o.shape == shape]

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}

    def to_dict(self) -> dict:
        return {"objects": [obj_to_dict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(obj_from_dict(o) for o in d["objects"]))


def obj_to_dict(o: Obj) -> dict:
    d = {
        "shape": o.shape,
        "colour": o.colour,
        "size": o.size,
        "col": o.col,
        "row": o.row,
        "position": o.position,
        "dx": o.dx,
        "dy": o.dy,
    }
    if o.subject is not None:
        d["pattern"] = o.subject.pattern
        d["secondary"] = o.subject.secondary
    return d


def obj_from_dict(d: dict) -> Obj:
    subject = Subject(d["pattern"], d["secondary"]) if d.get("pattern") else None
    return Obj(
        d["shape"],
        d["colour"],
        d["size"],
        d["col"],
        d["row"],
        d.get("dx", 0),
        d.get("dy", 0),
        subject,
    )


EVENT_KINDS: tuple[str, ...] = ("move", "recolour", "grow", "shrink", "appear", "disappear")


@dataclass(frozen=True)
class Event:
    """One story event / edit (spec: Stories, Edits) on the object named by colour and shape.

    ``position`` is the target cell name for ``move`` and ``appear``; ``new_colour`` the
    colour for ``recolour``. Text forms: ``story_text()`` (narrative) and
    ``instruction()`` (imperative edit).
    """

    kind: str
    colour: str
    shape: str
    position: str | None = None
    new_colour: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}; expected one of {EVENT_KINDS}")
        if self.kind in ("move", "appear") and self.position not in CELLS_BY_POSITION:
            raise ValueError(f"event {self.kind!r} needs a position, got {self.position!r}")
        if self.kind == "recolour" and self.new_colour not in COLOURS:
            raise ValueError(f"event 'recolour' needs a colour, got {self.new_colour!r}")

    def story_text(self) -> str:
        c, s = self.colour, self.shape
        return {
            "move": f"the {c} {s} moves to the {self.position}",
            "recolour": f"the {c} {s} turns {self.new_colour}",
            "grow": f"the {c} {s} grows",
            "shrink": f"the {c} {s} shrinks",
            "appear": f"a {c} {s} appears in the {self.position}",
            "disappear": f"the {c} {s} disappears",
        }[self.kind]

    def instruction(self) -> str:
        c, s = self.colour, self.shape
        return {
            "move": f"move the {c} {s} to the {self.position}",
            "recolour": f"make the {c} {s} {self.new_colour}",
            "grow": f"make the {c} {s} large",
            "shrink": f"make the {c} {s} small",
            "appear": f"add a {c} {s} in the {self.position}",
            "disappear": f"remove the {c} {s}",
        }[self.kind]

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}
