"""Scenes of the 128×128 demo (issue 13): one or two coloured shapes on a named background, and their renderer.

A ``Scene`` is what a caption says (``captions.py`` writes the captions); ``render`` draws it, resolving what the
caption leaves open (an unnamed size) and jittering size and place as training does. ``regions.py`` reads a
picture back into the same terms. The 64×64 model shipped today keeps its own world in ``data.py``.

Backgrounds: dark grey (the default when a caption names none), white, yellow and purple. White and yellow are
also object colours: an object is never drawn in its background's colour (``Scene`` refuses it), so every object
differs from its background by at least ``MIN_CONTRAST`` in RGB.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .data import COLOURS  # the five object colours, the same RGB as the 64×64 model

SIZE = 128
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"grey": (40, 40, 40), "white": (245, 245, 245), "yellow": (235, 215, 40), "purple": (110, 40, 140)}
DEFAULT_BACKGROUND = "grey"
_C = SIZE // 4  # a third of the way in from each edge, at 32 / 64 / 96 px
POSITIONS = {
    "left": (_C, 2 * _C), "right": (3 * _C, 2 * _C), "top": (2 * _C, _C), "bottom": (2 * _C, 3 * _C), "centre": (2 * _C, 2 * _C),
    "top left": (_C, _C), "top right": (3 * _C, _C), "bottom left": (_C, 3 * _C), "bottom right": (3 * _C, 3 * _C),
}  # object centre (x, y) in pixels
SIZES = {"small": (10.0, 13.0), "large": (19.0, 24.0)}  # jitter range of r: the radius, half a square's side, half a triangle's base and height
SIZE_THRESHOLD = 16.0  # between the two ranges: what regions.py reads as small / large
NOMINAL_R = {"small": 11.5, "large": 21.5}
JITTER = 5.0  # ± px of the centre
# Two objects only at places at least this far apart (left/right, top/bottom, opposite and neighbouring corners...):
# two large shapes then never touch (one axis apart by 64 px; r <= 24, jitter <= 5), and a caption can name each
# place without ambiguity. The centre pairs with nothing.
PAIR_DISTANCE = 64
PAIRS = [(a, b) for a, b in itertools.combinations(POSITIONS, 2) if np.hypot(*np.subtract(POSITIONS[a], POSITIONS[b])) >= PAIR_DISTANCE]
MIN_CONTRAST = min(np.linalg.norm(np.subtract(COLOURS[c], BACKGROUNDS[b])) for c in COLOURS for b in BACKGROUNDS if c != b)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    position: str
    size: str | None = None  # None: the caption does not say; render picks one

    def __post_init__(self):
        for v, allowed in ((self.shape, SHAPES), (self.colour, COLOURS), (self.position, POSITIONS), (self.size, (*SIZES, None))):
            if v not in allowed:
                raise ValueError(f"{v!r} is not one of {tuple(allowed)}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = DEFAULT_BACKGROUND

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r} is not one of {tuple(BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")
        if any(o.colour == self.background for o in self.objects):
            raise ValueError(f"a {self.background} object on a {self.background} background is invisible")
        if len(self.objects) == 2 and tuple(sorted(o.position for o in self.objects)) not in {tuple(sorted(p)) for p in PAIRS}:
            raise ValueError(f"two objects {self.objects[0].position!r} and {self.objects[1].position!r} are too close (see PAIRS)")


def coverage(shape: str, cx: float, cy: float, r: float, ss: int = 4) -> tuple[slice, slice, np.ndarray]:
    """The shape's box (rows, cols) and its anti-aliased coverage there, in [0, 1] (``ss``² samples per pixel);
    everywhere outside the box the coverage is 0. Triangles point up, base 2r, height 2r."""
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, SIZE)
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, SIZE)
    # one row and one column of sample coordinates, broadcast: the same float64 tests as a full meshgrid, with less
    # memory traffic (render 2.35x faster on an AMX Xeon with the box-only blend below; benchmarks/render_scenes.py)
    x = (np.arange(x0 * ss, x1 * ss) + 0.5) / ss
    y = ((np.arange(y0 * ss, y1 * ss) + 0.5) / ss)[:, None]
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        m = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":
        fy = (y - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        m = (fy >= 0) & (fy <= 1) & (np.abs(x - cx) <= r * fy)
    else:
        raise ValueError(shape)
    return slice(y0, y1), slice(x0, x1), m.reshape(y1 - y0, ss, x1 - x0, ss).sum(axis=(1, 3)) / (ss * ss)


def mask(shape: str, cx: float, cy: float, r: float, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage (SIZE, SIZE) in [0, 1] (``ss``² samples per pixel): ``coverage`` on the whole picture."""
    out = np.zeros((SIZE, SIZE))
    rows, cols, cov = coverage(shape, cx, cy, r, ss)
    out[rows, cols] = cov
    return out


def layout(scene: Scene, rng: np.random.Generator | None = None) -> list[tuple[Obj, float, float, float]]:
    """(object with its size resolved, cx, cy, r) per object. Without ``rng``: nominal places and sizes (an unnamed
    size is then large); with it, jittered like the training data, redrawn until two objects keep a 4 px gap."""
    for _ in range(100):
        out = []
        for o in scene.objects:
            size = o.size or ("large" if rng is None else ("small", "large")[int(rng.integers(2))])
            cx, cy = POSITIONS[o.position]
            r = NOMINAL_R[size]
            if rng is not None:
                cx, cy, r = cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER), rng.uniform(*SIZES[size])
            out.append((Obj(o.shape, o.colour, o.position, size), cx, cy, r))
        if len(out) < 2 or _apart(out[0][1:], out[1][1:]):
            return out
    raise AssertionError("no non-overlapping layout")  # PAIRS makes this unreachable


def _apart(a, b, gap: float = 4.0) -> bool:
    # Squares' bounding boxes, the loosest of the three shapes: boxes 4 px apart on either axis never touch.
    return abs(a[0] - b[0]) >= a[2] + b[2] + gap or abs(a[1] - b[1]) >= a[2] + b[2] + gap


def render(scene: Scene, rng: np.random.Generator | None = None, lay: list | None = None) -> np.ndarray:
    """uint8 (SIZE, SIZE, 3); ``lay``: draw this ``layout`` instead of drawing one."""
    img = np.empty((SIZE, SIZE, 3))  # float64: the blend of coverage and colours is exact, and so is rounding it
    img[:] = BACKGROUNDS[scene.background]
    for o, cx, cy, r in layout(scene, rng) if lay is None else lay:
        # outside its box an object's coverage is 0 and leaves the picture as it is, so only the box is blended
        rows, cols, cov = coverage(o.shape, cx, cy, r)
        m = cov[..., None]
        img[rows, cols] = (1 - m) * img[rows, cols] + m * np.array(COLOURS[o.colour], np.float64)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)
