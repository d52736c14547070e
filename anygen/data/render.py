"""Render shapes-world scenes to pixels, exactly per ``shared/specs/shapes-world.md``.

Geometry. Pixel ``(x, y)`` covers the unit square ``[x, x+1) x [y, y+1)``. An object with
pixel centre ``(cx, cy) = Obj.centre(S)`` and half-extent ``r = scale(radius, S)`` is
centred on the point ``(cx, cy)`` (a pixel corner), so its box ``Obj.bbox(S)`` covers the
pixels ``cx - r .. cx + r - 1`` exactly and a square fills them exactly.

Anti-aliasing: every object's coverage is sampled on a 4 x 4 grid per pixel (render at 4x)
and box-downsampled; the coverage is the alpha with which the object's colours are
composited over what lies below. Nothing else is blurred or drawn.

Patterns (subjects), at 64 px and scaled with S (lengths ``v * S / 64``, not rounded,
sampled at 4x like the shapes):
- striped: horizontal bands 2 px high from the object's top edge (``cy - r``), primary
  first, alternating primary and secondary;
- dotted: secondary disks of radius 1 centred on a 4-px grid through the object centre;
- ringed: a secondary disk of radius ``0.5 r`` at the centre.
Patterns are clipped to the shape.

Speed: since centres are whole pixels, an object's coverage depends only on (shape, r,
S, pattern); the two masks (shape, secondary) are cached per key and composited only
within the object's box.
"""

from __future__ import annotations

import itertools
import logging
import math
from functools import lru_cache

import numpy as np
from PIL import Image

from anygen.data.world import (
    BACKGROUND,
    COLOURS,
    CROSS_WIDTH,
    JITTER,
    REFERENCE_SIZE,
    SHAPES,
    SIZES,
    STAR_INNER,
    Obj,
    Scene,
    scale,
)
from anygen.errors import UserInputError

logger = logging.getLogger(__name__)

SUPERSAMPLE = 4  # samples per pixel along each axis
MIN_SIZE = 22  # below, small and large radii round alike (< 18) or neighbours touch (18-21)
MAX_SIZE = 4096  # a canvas is rendered in float32: 4096 px is 200 MB

_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)
_COLOURS = {name: np.array(rgb, dtype=np.float32) for name, rgb in COLOURS.items()}


def star_vertices(r: float) -> np.ndarray:
    """The star's 10 vertices (x, y) about its centre, y down, first point straight up."""
    k = np.arange(10)
    radius = np.where(k % 2 == 0, r, STAR_INNER * r)
    angle = -math.pi / 2 + k * math.pi / 5
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)  # (10, 2)


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over sample points ``(u, v)``."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x0, y0 = vertices[i]
        x1, y1 = vertices[(i + 1) % n]
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def shape_inside(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Which points ``(u, v)`` (offsets from the centre, y down, in pixels) lie in ``shape``
    of half-extent ``r``."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return (np.abs(u) <= r) & (np.abs(v) <= r)
    if shape == "triangle":  # vertices (0,-r) (-r,r) (r,r)
        return (v <= r) & (np.abs(u) <= (v + r) / 2)
    if shape == "diamond":
        # The 45-degree edges pass exactly through grid samples (offsets are multiples of
        # 1/8): count those ties on the upper and lower edges' halves nearer the vertical
        # axis only, which keeps both mirror symmetries and the analytic area (2 r^2).
        au, av = np.abs(u), np.abs(v)
        d = au + av
        return (d < r) | ((d == r) & (au < av))
    if shape == "star":
        return _inside_polygon(u, v, star_vertices(r))
    if shape == "cross":  # two bars 2r long and CROSS_WIDTH * r wide
        half = CROSS_WIDTH * r / 2
        au, av = np.abs(u), np.abs(v)
        return ((au <= r) & (av <= half)) | ((au <= half) & (av <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def pattern_inside(pattern: str, u: np.ndarray, v: np.ndarray, r: float, size: int) -> np.ndarray:
    """Which points carry the secondary colour of ``pattern`` (before clipping to the shape)."""
    unit = size / REFERENCE_SIZE  # one 64-px pixel at canvas ``size``
    if pattern == "striped":
        band = np.floor((v + r) / (2 * unit)).astype(np.int64)
        return band % 2 == 1
    if pattern == "dotted":
        grid = 4 * unit
        du = u - np.round(u / grid) * grid
        dv = v - np.round(v / grid) * grid
        return du * du + dv * dv <= unit * unit
    if pattern == "ringed":
        return u * u + v * v <= (0.5 * r) ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


@lru_cache(maxsize=1024)
def coverage(
    shape: str, r: int, size: int, pattern: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Coverage masks over the object's box, (2r, 2r) float32 in [0, 1]: the fraction of each
    pixel inside the shape and, for a pattern, inside both the shape and its secondary colour.

    Cached and read-only: the same arrays are returned on every call.
    """
    n = 2 * r * SUPERSAMPLE
    t = (np.arange(n, dtype=np.float64) + 0.5) / SUPERSAMPLE - r  # sample offsets from the centre
    v, u = np.meshgrid(t, t, indexing="ij")  # (n, n) each: row offset, column offset

    def downsample(mask: np.ndarray) -> np.ndarray:
        out = mask.reshape(2 * r, SUPERSAMPLE, 2 * r, SUPERSAMPLE).mean(
            axis=(1, 3), dtype=np.float64
        )
        out = out.astype(np.float32)  # (2r, 2r)
        out.setflags(write=False)
        return out

    inside = shape_inside(shape, u, v, r)
    secondary = None
    if pattern is not None:
        secondary = downsample(inside & pattern_inside(pattern, u, v, r, size))
    return downsample(inside), secondary


@lru_cache(maxsize=64)
def closest_neighbours(size: int) -> int:
    """The smallest gap in pixels between the boxes of objects in neighbouring cells at
    canvas ``size``: large objects jittered towards each other. 1 at 64 px, where the
    spacing rule is given; where rounding to ``size`` brings it under 1, objects touch or
    overlap."""
    gaps = []
    for cell in (0, 1):
        for near, far in itertools.product(SIZES, repeat=2):
            for jitter_near, jitter_far in itertools.product(JITTER, repeat=2):
                a = Obj("square", "red", near, cell, 1, jitter_near, 0).bbox(size)
                b = Obj("square", "red", far, cell + 1, 1, jitter_far, 0).bbox(size)
                gaps.append(b[0] - a[2])  # rows are placed as columns are: this covers both
    return min(gaps)


def check_size(size: int) -> None:
    """Raise UserInputError unless ``size`` is a usable canvas side: within range, and one
    at which the spacing rule holds (at 25 sizes under 105 px the spec's rounding lets
    objects in neighbouring cells touch or overlap)."""
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UserInputError(
            f"canvas size must be an integer from {MIN_SIZE} to {MAX_SIZE} pixels, got {size!r}"
        )
    if closest_neighbours(size) < 1:
        usable = [s for s in range(max(MIN_SIZE, size - 8), size + 9) if closest_neighbours(s) >= 1]
        nearest = sorted(usable, key=lambda s: (abs(s - size), s))[:2]
        raise UserInputError(
            f"canvas size {size} px breaks the shapes world's spacing rule: rounded to it, "
            "objects in neighbouring cells can touch or overlap; nearest usable sizes: "
            + " or ".join(str(s) for s in sorted(nearest))
        )


def draw_object(canvas: np.ndarray, obj: Obj) -> None:
    """Composite ``obj`` onto ``canvas`` ((S, S, 3) float32 RGB), in place, within its box."""
    size = canvas.shape[0]
    r = scale(obj.radius, size)
    cx, cy = obj.centre(size)
    pattern = obj.subject.pattern if obj.subject is not None else None
    alpha, secondary = coverage(obj.shape, r, size, pattern)  # (2r, 2r)
    # clip the box to the canvas (never needed at spec sizes; cheap to keep exact)
    x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    sl = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    a = alpha[sl][..., None]  # (h, w, 1)
    region = canvas[cy0:cy1, cx0:cx1]  # (h, w, 3) view
    paint = a * _COLOURS[obj.colour]
    if secondary is not None:
        b = secondary[sl][..., None]
        paint = paint + b * (_COLOURS[obj.subject.secondary] - _COLOURS[obj.colour])
    region *= 1.0 - a
    region += paint


def render_scene(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene's image, (size, size, 3) uint8 RGB."""
    check_size(size)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = _BACKGROUND
    for obj in scene.objects:
        draw_object(canvas, obj)
    return np.rint(canvas, out=canvas).astype(np.uint8)  # (S, S, 3)


def render_image(scene: Scene, size: int = 64) -> Image.Image:
    """The scene's image as an RGB PIL image."""
    return Image.fromarray(render_scene(scene, size))


__all__ = [
    "SUPERSAMPLE",
    "check_size",
    "coverage",
    "render_image",
    "render_scene",
    "shape_inside",
    "star_vertices",
]
