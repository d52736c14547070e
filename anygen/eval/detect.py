"""Find the shapes-world objects in an image: colour, shape, size, cell and pattern.

Written from ``shared/specs/shapes-world.md`` and ``anygen.data.world`` alone, so that it
judges anygen's renderer and models independently. It works on any square or oblong canvas
and on imperfect (blurred, noisy) generated images:

1. Every pixel is explained as background blended with one palette colour:
   ``pixel = bg + alpha * (colour - bg)``. The colour with the smallest residual wins and
   ``alpha`` is its coverage, so anti-aliased edges keep their colour and count as the
   fraction of the pixel they cover.
2. Objects are the connected components (4-neighbour) of the confident pixels
   (``alpha >= CORE_ALPHA``); fainter pixels (edges, blur) join the component they touch.
   Seeding on confident pixels keeps two objects 1 px apart separate even after blur.
   Components whose coverage sums to less than a small fraction of the smallest object
   are specks and are ignored (the reason is kept in ``Analysis.ignored``).
3. The shape is the template (the spec's exact geometry, rendered with 4 x 4 supersampling)
   that best reproduces the component's coverage, each template placed by the component's
   centroid and scaled so its area equals the component's summed coverage. Area and
   centroid are unchanged by blur, so this is robust where edge-based features are not.
4. Size compares the fitted half-extent ``r`` with the midpoint of the small and large
   half-extents; the cell is the nearest column and row centre to the fitted centre.
5. Subjects: every pixel of an object is explained as the background plus coverages of its
   main colour and one other palette colour; the other colour that explains the object best
   is the candidate secondary. Its coverage is compared, like the shape, with the spec's
   pattern geometry clipped to the fitted shape (``striped``, ``dotted``, ``ringed``; the
   phases the spec leaves open are searched) and with no pattern at all.

Coordinates are continuous pixel coordinates: pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from anygen.data.world import (
    BACKGROUND,
    CELL_CENTRES,
    COLOURS,
    CROSS_WIDTH,
    POSITIONS,
    SHAPES,
    SIZES,
    STAR_INNER,
    scale,
)
from anygen.errors import UserInputError

logger = logging.getLogger(__name__)

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (8, 3)
_BG = np.array(BACKGROUND, dtype=np.float32)  # (3,)
_DIRS = _PALETTE - _BG  # (8, 3) background -> colour
_DIRS_SQ = (_DIRS**2).sum(1)  # (8,)
_MIN_DIR = float(np.sqrt(_DIRS_SQ.min()))  # the palette colour nearest the background

CORE_ALPHA = 0.6  # coverage that seeds a component
SUPPORT_ALPHA = 0.12  # fainter pixels join a neighbouring component
SPECK_FRACTION = 0.3  # of the smallest object's area (a small star); below it: a speck
MAX_SHAPE_ERROR = 0.6  # template error above which no shape is named
PATTERN_MIN_SHARE = 0.06  # share of the object a second colour needs to be a pattern
OFF_LINE = 30.0  # RGB distance from the main colour's line beyond noise: another colour
PATTERN_MAX_ERROR = 0.6  # of the no-pattern error: a pattern must explain this much better
SUPERSAMPLE = 4
# Templates are also compared blurred: generated images are rarely sharp (pixels).
BLUR_SIGMAS: tuple[float, ...] = (0.7, 1.2, 1.8)
SHARP_ERROR = 0.1  # a sharp template fitting better than this needs no blurred ones
SPLIT_ERROR = 0.25  # a component fitted worse than this may be two touching objects

# Area of each shape at r = 1 and its centroid's offset below the geometric centre (in r).
_STAR_AREA = 5 * STAR_INNER * math.sin(math.radians(36))
_CROSS_AREA = 2 * 2 * CROSS_WIDTH - CROSS_WIDTH**2
UNIT_AREA: dict[str, float] = {
    "circle": math.pi,
    "square": 4.0,
    "triangle": 2.0,
    "diamond": 2.0,
    "star": _STAR_AREA,
    "cross": _CROSS_AREA,
}
CENTROID_OFFSET: dict[str, float] = {s: 0.0 for s in SHAPES} | {"triangle": 1.0 / 3.0}


@dataclass(frozen=True)
class Detection:
    """One object found in an image.

    ``colour`` is the main colour; ``pattern``/``secondary`` are set for two-colour subjects
    (for ``striped`` the two colours are interchangeable: which band is "primary" is not
    visible). ``shape`` is None when no template fits (``shape_error`` above the limit).
    """

    colour: str
    shape: str | None
    size: str  # "small" | "large"
    col: int
    row: int
    centre: tuple[float, float]  # (x, y) fitted geometric centre
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) of pixels with coverage >= 0.5
    area: float  # summed coverage, in pixels
    radius: float  # fitted half-extent r, in pixels
    shape_error: float  # template error of the chosen shape (0 = perfect)
    shape_errors: dict[str, float] = field(default_factory=dict, compare=False, repr=False)
    pattern: str | None = None
    secondary: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def cell(self) -> tuple[int, int]:
        return (self.col, self.row)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def describe(self) -> str:
        shape = self.shape or "unknown shape"
        pattern = f" {self.pattern} with {self.secondary}" if self.pattern else ""
        return f"{self.size} {self.colour}{pattern} {shape} at {self.position}"


@dataclass
class Analysis:
    """Detections plus what was ignored and why (for debugging a verdict)."""

    detections: list[Detection]
    ignored: list[str]
    size: tuple[int, int]  # (W, H)


# ------------------------------------------------------------------------------ helpers


@dataclass
class _Context:
    img: np.ndarray  # (H, W, 3)
    alpha: np.ndarray  # (H, W)
    best: np.ndarray  # (H, W) palette index
    w: int
    h: int
    unit: float  # canvas / 64
    min_area: float
    col_centres: list[float]
    row_centres: list[float]


@dataclass
class _Fit:
    shape: str
    cx: float
    cy: float
    r: float
    error: float
    errors: dict[str, float]


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in 0..255, or a UserInputError that names what was wrong."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if not isinstance(image, np.ndarray):
        raise UserInputError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise UserInputError(f"expected an (H, W, 3) image array, got shape {image.shape}")
    arr = image[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise UserInputError("the image array holds NaN or infinite values")
        # float images in [0, 1], allowing a decoder's overshoot (a pixel at 1.01 must not
        # turn the whole image into a near-black 0..255 one)
        if arr.size and float(arr.max()) <= 1.5:
            return np.clip(arr, 0.0, 1.0) * 255.0
        return np.clip(arr, 0.0, 255.0)
    raise UserInputError(f"expected a uint8 or float image array, got dtype {arr.dtype}")


# The side from which the spec's small and large objects always differ (radii 6 and 9 at
# 64 px, rounded: both 2 px at 16 and 17).
MIN_SCORABLE = 1 + max(
    n for n in range(1, 64) if scale(SIZES["small"], n) == scale(SIZES["large"], n)
)


def _scaled(value: float, n: int) -> float:
    return value * n / 64.0


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean (H, W) mask: labels 1..n (0 = off), and n.

    Minimum-label propagation with pointer jumping; a few dozen vectorised passes at most.
    """
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big, dtype=np.int64).reshape(h, w), big)  # (H, W)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new[~mask] = big
        flat = new.ravel()
        on = flat < big
        flat[on] = np.minimum(flat[on], flat[flat[on]])  # pointer jumping
        if np.array_equal(new, lab):
            break
        lab = new
    roots, dense = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), dtype=np.int32)
    out[mask] = dense + 1
    return out, len(roots)


def _classify_pixels(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: palette index of the best background blend and its coverage alpha."""
    h, w, _ = img.shape
    diff = (img - _BG).reshape(-1, 3)  # (N, 3)
    dots = diff @ _DIRS.T  # (N, 8)
    a = np.clip(dots / _DIRS_SQ, 0.0, 1.0)  # (N, 8)
    resid = (diff**2).sum(1, keepdims=True) - 2 * a * dots + a * a * _DIRS_SQ  # (N, 8)
    best = resid.argmin(1)  # (N,)
    alpha = a[np.arange(len(best)), best]
    # A blend of two palette colours (blurred patterns inside a subject) is no background
    # blend: the best line leaves a large residual and under-reads its coverage. Such pixels
    # are read by their distance from the background against the nearest palette colour's.
    norm = np.sqrt((diff**2).sum(1))
    resid_best = np.sqrt(np.maximum(resid[np.arange(len(best)), best], 0.0))
    off_line = resid_best > 0.25 * norm
    alpha = np.where(off_line, np.maximum(alpha, np.minimum(1.0, norm / _MIN_DIR)), alpha)
    return best.reshape(h, w), alpha.reshape(h, w).astype(np.float32)


def _fill_seams(alpha: np.ndarray) -> np.ndarray:
    """Raise one-pixel seams between two confident pixels (above and below, or left and
    right) to their mean coverage.

    A pixel that blends two pattern colours can read as a faint grey (purple + green), and
    at small canvases a striped subject's bands are such blends: without this the bands
    fall apart into separate objects. Two objects joined this way by a blurred gap are
    separated again by ``_split_by_cell``.
    """
    solid = alpha >= CORE_ALPHA
    out = alpha.copy()
    vert = np.zeros_like(solid)
    vert[1:-1] = solid[:-2] & solid[2:]
    horiz = np.zeros_like(solid)
    horiz[:, 1:-1] = solid[:, :-2] & solid[:, 2:]
    seam = (alpha >= SUPPORT_ALPHA) & ~solid & (vert | horiz)
    if seam.any():
        up, down = np.zeros_like(alpha), np.zeros_like(alpha)
        up[1:], down[:-1] = alpha[:-1], alpha[1:]
        left, right = np.zeros_like(alpha), np.zeros_like(alpha)
        left[:, 1:], right[:, :-1] = alpha[:, :-1], alpha[:, 1:]
        fill = np.where(vert, (up + down) / 2, (left + right) / 2)
        out[seam] = np.maximum(alpha[seam], fill[seam])
    return out


def _grow(labels: np.ndarray, support: np.ndarray, steps: int) -> np.ndarray:
    """Let unlabelled support pixels join a 4-neighbour's label, ``steps`` times."""
    lab = labels.copy()
    for _ in range(steps):
        free = support & (lab == 0)
        if not free.any():
            break
        nb = np.zeros_like(lab)
        np.maximum(nb[1:], lab[:-1], out=nb[1:])
        np.maximum(nb[:-1], lab[1:], out=nb[:-1])
        np.maximum(nb[:, 1:], lab[:, :-1], out=nb[:, 1:])
        np.maximum(nb[:, :-1], lab[:, 1:], out=nb[:, :-1])
        take = free & (nb > 0)
        if not take.any():
            break
        lab[take] = nb[take]
    return lab


def shape_inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean: is the point (dx, dy) from the centre inside ``shape`` of half-extent r.

    Geometry exactly as the spec: y points down, triangles and stars point up.
    """
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        return (dy <= r) & (2 * np.abs(dx) <= dy + r)
    if shape == "cross":
        hw = CROSS_WIDTH * r / 2
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= r) & (ay <= hw)) | ((ax <= hw) & (ay <= r))
    if shape == "star":
        rho = np.sqrt(dx * dx + dy * dy)
        theta = np.degrees(np.arctan2(dx, -dy)) % 72.0  # 0 at the top point
        phi = np.radians(np.minimum(theta, 72.0 - theta))  # folded into [0, 36] degrees
        ux, uy = rho * np.sin(phi), rho * np.cos(phi)  # folded into one half-point
        # edge from the outer vertex (0, r) to the inner vertex at 36 degrees
        qx, qy = (
            STAR_INNER * r * math.sin(math.radians(36)),
            STAR_INNER * r * math.cos(math.radians(36)),
        )
        ex, ey = qx, qy - r
        return ex * (uy - r) - ey * ux <= 0  # on the centre's side of that edge
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _template(
    shape: str, cx: float, cy: float, r: float, x0: int, y0: int, w: int, h: int
) -> np.ndarray:
    """Coverage (h, w) of ``shape`` centred at (cx, cy) over the patch at (x0, y0)."""
    k = SUPERSAMPLE
    xs = x0 + (np.arange(w * k, dtype=np.float32) + 0.5) / k - cx  # (w*k,)
    ys = y0 + (np.arange(h * k, dtype=np.float32) + 0.5) / k - cy  # (h*k,)
    inside = shape_inside(shape, xs[None, :], ys[:, None], r)  # (h*k, w*k)
    return inside.reshape(h, k, w, k).mean(axis=(1, 3), dtype=np.float32)


@functools.lru_cache(maxsize=512)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix that applies a 1-D Gaussian blur of ``sigma`` pixels."""
    i = np.arange(n, dtype=np.float32)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)  # (n, n)
    return (k / k.sum(1, keepdims=True)).astype(np.float32)


def _nearest(value: float, centres: list[float]) -> tuple[int, float]:
    """Index of the nearest centre, and the margin to the halfway line (pixels)."""
    d = [abs(value - c) for c in centres]
    i = int(np.argmin(d))
    others = sorted(d)
    return i, (others[1] - others[0]) / 2 if len(others) > 1 else math.inf


def _fit_shape(ctx: _Context, xs: np.ndarray, ys: np.ndarray, a: np.ndarray) -> _Fit:
    """Best template for the coverage ``a`` at pixels (xs, ys)."""
    m = float(a.sum())
    mx = float((a * (xs + 0.5)).sum() / m)
    my = float((a * (ys + 0.5)).sum() / m)
    # patch with one pixel of margin, holding this component's coverage only
    px0, py0 = max(int(xs.min()) - 1, 0), max(int(ys.min()) - 1, 0)
    px1, py1 = min(int(xs.max()) + 2, ctx.w), min(int(ys.max()) + 2, ctx.h)
    patch = np.zeros((py1 - py0, px1 - px0), dtype=np.float32)
    patch[ys - py0, xs - px0] = a
    ph, pw = patch.shape
    errors: dict[str, float] = {}
    fits: dict[str, tuple[float, float, float]] = {}
    templates: dict[str, np.ndarray] = {}
    for shape in SHAPES:
        r = math.sqrt(m / UNIT_AREA[shape])
        cx, cy = mx, my - CENTROID_OFFSET[shape] * r
        templates[shape] = _template(shape, cx, cy, r, px0, py0, pw, ph)  # (ph, pw)
        errors[shape] = float(np.abs(patch - templates[shape]).sum() / m)
        fits[shape] = (cx, cy, r)
    if min(errors.values()) > SHARP_ERROR:  # not a clean render: compare blurred templates too
        for sigma in BLUR_SIGMAS:
            ky, kx = _blur_matrix(ph, sigma), _blur_matrix(pw, sigma)
            for shape, tmpl in templates.items():
                err = float(np.abs(patch - ky @ tmpl @ kx.T).sum() / m)
                errors[shape] = min(errors[shape], err)
    shape = min(errors, key=errors.get)
    return _Fit(shape, *fits[shape], errors[shape], errors)


# ------------------------------------------------------------------------------ patterns


def _two_colour_fit(diff: np.ndarray, main: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Explain each pixel as background plus coverages of the main colour and one other:
    ``diff = a_main * (main - bg) + a_other * (other - bg)``, both coverages >= 0 and their
    sum <= 1 (least squares on that triangle, for all 8 other colours at once).

    Returns residuals, main coverages and other coverages, each (n, 8).
    """
    dm = _DIRS[main]  # (3,)
    n, k = len(diff), len(COLOUR_NAMES)
    best_res = np.full((n, k), np.inf, dtype=np.float32)
    best_main = np.zeros((n, k), dtype=np.float32)
    best_other = np.zeros((n, k), dtype=np.float32)

    def offer(am: np.ndarray, ao: np.ndarray, valid: np.ndarray | bool = True) -> None:
        fit = am[..., None] * dm + ao[..., None] * _DIRS[None]  # (n, 8, 3)
        res = ((diff[:, None, :] - fit) ** 2).sum(-1)  # (n, 8)
        better = (res < best_res) & valid
        best_res[better] = res[better]
        best_main[better] = np.broadcast_to(am, (n, k))[better]
        best_other[better] = ao[better]

    # inside the triangle: the unconstrained 2 x 2 least squares
    g_mm = dm @ dm
    g_mo = _DIRS @ dm  # (8,)
    det = g_mm * _DIRS_SQ - g_mo**2  # (8,); 0 for the main colour itself
    x_m = diff @ dm  # (n,)
    x_o = diff @ _DIRS.T  # (n, 8)
    with np.errstate(divide="ignore", invalid="ignore"):
        am = (_DIRS_SQ * x_m[:, None] - g_mo * x_o) / det
        ao = (g_mm * x_o - g_mo * x_m[:, None]) / det
    inside = np.isfinite(am) & (am >= 0) & (ao >= 0) & (am + ao <= 1)
    offer(np.where(inside, am, 0.0), np.where(inside, ao, 0.0), inside)
    # its edges: main alone over the background, the other alone, main/other blends
    offer(np.broadcast_to(np.clip(x_m / g_mm, 0, 1)[:, None], (n, k)), np.zeros((n, k)))
    offer(np.zeros((n, k)), np.clip(x_o / _DIRS_SQ, 0, 1))
    e = _DIRS - dm  # (8, 3) main -> other
    t = np.clip(((diff - dm) @ e.T) / np.maximum((e**2).sum(1), 1e-6), 0, 1)  # (n, 8)
    offer(1.0 - t, t)
    best_other[:, main] = 0.0
    return best_res, best_main, best_other


def _pattern_masks(
    u: np.ndarray, v: np.ndarray, r: float, unit: float
) -> list[tuple[str, bool, np.ndarray]]:
    """Candidate secondary-colour masks on supersample offsets (u, v) from the centre:
    (pattern, swapped, mask). Phases the spec leaves open are searched: the stripes' and
    the dot grid's offsets. ``swapped``: the main colour is the pattern's secondary."""
    out: list[tuple[str, bool, np.ndarray]] = []
    disk = u * u + v * v <= (0.5 * r) ** 2
    out.append(("ringed", False, disk))
    out.append(("ringed", True, disk))
    for phase in np.arange(0.0, 4.0, 0.5) * unit:  # bands 2 units high, period 4
        out.append(("striped", False, np.floor((v + r + phase) / (2 * unit)) % 2 == 1))
    grid = 4 * unit
    for oy in np.arange(4) * unit:
        dv = (v - oy) - np.round((v - oy) / grid) * grid
        for ox in np.arange(4) * unit:
            du = (u - ox) - np.round((u - ox) / grid) * grid
            out.append(("dotted", False, du * du + dv * dv <= unit * unit))
    return out


@dataclass
class _Pattern:
    primary: int  # palette index of the main colour
    pattern: str | None = None
    secondary: str | None = None
    note: str | None = None
    coverage: np.ndarray | None = None  # (n,) both colours' coverage, for a refit


def _pattern(
    ctx: _Context, xs: np.ndarray, ys: np.ndarray, alpha: np.ndarray, main: int, fit: _Fit
) -> _Pattern:
    """The pattern of one object (none for a plain one).

    The second colour is the palette colour that, blended with the main colour over the
    background pixel by pixel, explains the object best (choosing per pixel would credit a
    blurred blend of two colours to a third colour lying between them). Its coverage is
    compared with each pattern's geometry clipped to the fitted shape (sharp, then blurred)
    and with no pattern at all (whose error is the second colour's whole coverage).
    """
    m = float(alpha.sum())
    diff = ctx.img[ys, xs] - _BG  # (n, 3)
    # quick exit for plain objects: (almost) every pixel lies on the main colour's line
    dm = _DIRS[main]
    on_line = np.clip(diff @ dm / _DIRS_SQ[main], 0, 1)[:, None] * dm
    off = ((diff - on_line) ** 2).sum(1) > OFF_LINE**2
    if float(alpha[off].sum()) < 0.3 * PATTERN_MIN_SHARE * m:
        return _Pattern(main)
    resid, cov_main, cov_other = _two_colour_fit(diff, main)
    total = (resid * alpha[:, None]).sum(0)
    total[main] = np.inf
    sec = int(total.argmin())
    a_main, a_sec = cov_main[:, sec], cov_other[:, sec]  # (n,) each
    share = float(a_sec.sum()) / m
    if share < PATTERN_MIN_SHARE:
        return _Pattern(main)

    k = SUPERSAMPLE
    px0, py0 = int(xs.min()) - 1, int(ys.min()) - 1
    pw, ph = int(xs.max()) + 2 - px0, int(ys.max()) + 2 - py0
    obs = {False: np.zeros((ph, pw), np.float32), True: np.zeros((ph, pw), np.float32)}
    obs[False][ys - py0, xs - px0] = a_sec  # coverage in the second colour
    obs[True][ys - py0, xs - px0] = a_main  # ... and in the main colour (swapped roles)
    u = px0 + (np.arange(pw * k, dtype=np.float32) + 0.5) / k - fit.cx  # (pw*k,)
    v = py0 + (np.arange(ph * k, dtype=np.float32) + 0.5) / k - fit.cy  # (ph*k,)
    u = np.broadcast_to(u[None, :], (ph * k, pw * k))
    v = np.broadcast_to(v[:, None], (ph * k, pw * k))
    inside = shape_inside(fit.shape, u, v, fit.r)
    candidates = [
        (name, swapped, (inside & mask).reshape(ph, k, pw, k).mean(axis=(1, 3), dtype=np.float32))
        for name, swapped, mask in _pattern_masks(u, v, fit.r, ctx.unit)
    ]
    errors = np.array([np.abs(obs[sw] - t).sum() / m for _, sw, t in candidates])
    if errors.min() > SHARP_ERROR:
        for sigma in BLUR_SIGMAS:
            ky, kx = _blur_matrix(ph, sigma), _blur_matrix(pw, sigma)
            blurred = [np.abs(obs[sw] - ky @ t @ kx.T).sum() / m for _, sw, t in candidates]
            errors = np.minimum(errors, blurred)
    i = int(errors.argmin())
    name, swapped, _ = candidates[i]
    if errors[i] > PATTERN_MAX_ERROR * share:  # not clearly better than no pattern
        note = f"second colour {COLOUR_NAMES[sec]} ({share:.0%}) in no known pattern"
        return _Pattern(main, note=note)
    coverage = a_main + a_sec
    if swapped:
        return _Pattern(sec, name, COLOUR_NAMES[main], coverage=coverage)
    return _Pattern(main, name, COLOUR_NAMES[sec], coverage=coverage)


# ------------------------------------------------------------------------------ detector


def _split_by_cell(ctx: _Context, group: np.ndarray) -> list[np.ndarray] | None:
    """Split a component into its parts in each grid cell, or None when it lies in one."""
    ys, xs = np.divmod(group, ctx.w)
    col = np.abs((xs + 0.5)[:, None] - np.array(ctx.col_centres)[None]).argmin(1)
    row = np.abs((ys + 0.5)[:, None] - np.array(ctx.row_centres)[None]).argmin(1)
    cell = row * 3 + col
    parts = [group[cell == c] for c in np.unique(cell)]
    return parts if len(parts) > 1 else None


def _detect_component(
    ctx: _Context, group: np.ndarray, ignored: list[str], split: bool = True
) -> list[Detection]:
    """The object (or, when it is two touching objects, the objects) in one component."""
    ys, xs = np.divmod(group, ctx.w)
    a = ctx.alpha.ravel()[group]
    m = float(a.sum())
    if m < ctx.min_area:
        ignored.append(
            f"speck of {m:.1f} px at ({xs.mean():.0f}, {ys.mean():.0f}) < {ctx.min_area:.1f} px"
        )
        return []
    fit = _fit_shape(ctx, xs, ys, a)
    if split and fit.error > SPLIT_ERROR:
        parts = _split_by_cell(ctx, group)
        if parts:
            sub_ignored: list[str] = []
            found = [
                d for part in parts for d in _detect_component(ctx, part, sub_ignored, split=False)
            ]
            if found and all(d.shape_error <= SPLIT_ERROR for d in found):
                note = f"split from one component (whole fit {fit.shape} {fit.error:.2f})"
                ignored.extend(sub_ignored)
                return [replace(d, notes=(*d.notes, note)) for d in found]

    votes = np.bincount(ctx.best.ravel()[group], weights=a, minlength=len(COLOUR_NAMES))
    main = int(votes.argmax())
    pat = _pattern(ctx, xs, ys, a, main, fit)
    notes: list[str] = [pat.note] if pat.note else []
    if pat.coverage is not None:
        # two-colour pixels read as faint background blends: refit on their true coverage
        refit = _fit_shape(ctx, xs, ys, pat.coverage)
        if refit.error < fit.error:
            fit, m = refit, float(pat.coverage.sum())
    share = votes[main] / max(votes.sum(), 1e-6)
    if pat.pattern is None and share < 0.8:
        notes.append(f"colour {COLOUR_NAMES[main]} covers only {share:.0%} of the object")

    ranked = sorted(fit.errors, key=fit.errors.get)
    if fit.errors[ranked[1]] - fit.error < 0.05:
        runner_up = fit.errors[ranked[1]]
        notes.append(
            f"shape close call: {ranked[0]} {fit.error:.2f} vs {ranked[1]} {runner_up:.2f}"
        )
    shape_name: str | None = fit.shape
    if fit.error > MAX_SHAPE_ERROR:
        notes.append(f"no shape fits (best {fit.shape} error {fit.error:.2f})")
        shape_name = None

    unit = ctx.unit
    r_small, r_large = SIZES["small"] * unit, SIZES["large"] * unit
    size = "large" if fit.r >= (r_small + r_large) / 2 else "small"
    col, col_margin = _nearest(fit.cx, ctx.col_centres)
    row, row_margin = _nearest(fit.cy, ctx.row_centres)
    if min(col_margin, row_margin) < 2 * unit:
        notes.append(f"centre ({fit.cx:.1f}, {fit.cy:.1f}) is near a cell border")

    solid = a >= 0.5
    sx, sy = (xs[solid], ys[solid]) if solid.any() else (xs, ys)
    bbox = (int(sx.min()), int(sy.min()), int(sx.max()) + 1, int(sy.max()) + 1)
    return [
        Detection(
            colour=COLOUR_NAMES[pat.primary],
            shape=shape_name,
            size=size,
            col=col,
            row=row,
            centre=(fit.cx, fit.cy),
            bbox=bbox,
            area=m,
            radius=fit.r,
            shape_error=fit.error,
            shape_errors=fit.errors,
            pattern=pat.pattern,
            secondary=pat.secondary,
            notes=tuple(notes),
        )
    ]


def analyse_image(image: Image.Image | np.ndarray) -> Analysis:
    """Detections and ignored specks (with reasons) for one image."""
    img = _as_array(image)  # (H, W, 3)
    h, w, _ = img.shape
    if h < MIN_SCORABLE or w < MIN_SCORABLE:
        raise UserInputError(
            f"image of {w} x {h} pixels is too small to score (at least {MIN_SCORABLE} x "
            f"{MIN_SCORABLE}: below, small and large objects are drawn alike)"
        )
    unit = min(h, w) / 64.0
    best, alpha = _classify_pixels(img)  # (H, W), (H, W)
    alpha = _fill_seams(alpha)

    core, n = label_components(alpha >= CORE_ALPHA)
    r_small = SIZES["small"] * unit
    min_area = SPECK_FRACTION * UNIT_AREA["star"] * r_small**2
    labels = _grow(core, alpha >= SUPPORT_ALPHA, steps=max(2, round(3 * unit)))

    idx = np.flatnonzero(labels)
    order = np.argsort(labels.ravel()[idx], kind="stable")
    idx = idx[order]
    counts = np.bincount(labels.ravel()[idx], minlength=n + 1)[1:]
    groups = np.split(idx, np.cumsum(counts)[:-1]) if n else []

    # a shape centred on the spec's integer cx covers [cx - r, cx + r]: no half-pixel shift
    col_centres = [_scaled(c, w) for c in CELL_CENTRES]
    row_centres = [_scaled(c, h) for c in CELL_CENTRES]

    ctx = _Context(img, alpha, best, w, h, unit, min_area, col_centres, row_centres)
    detections: list[Detection] = []
    ignored: list[str] = []
    for group in groups:
        detections.extend(_detect_component(ctx, group, ignored))
    detections.sort(key=lambda d: (d.row, d.col, d.centre))
    if ignored:
        logger.debug("ignored %d specks: %s", len(ignored), "; ".join(ignored))
    return Analysis(detections=detections, ignored=ignored, size=(w, h))


def detect_objects(image: Image.Image | np.ndarray) -> list[Detection]:
    """Every object in ``image`` (PIL image or (H, W, 3) array), sorted by row then column."""
    return analyse_image(image).detections
