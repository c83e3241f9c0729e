"""Procedural data set for the embedded demo model: one coloured shape on a dark background, with captions.

64×64 RGB images (a 4×4 grid of DiT tokens): a circle, square or triangle in one of five colours at one
of five positions, with a little jitter in size and place. Every (shape, colour, position) combination has a
plain-text caption ("A red circle on the left.") and an Ideogram-style JSON caption; the encoder sees both in
the serialised form the runtime builds (``prepare_caption`` / ``wrap_plain_text``). A fixed set of 15
combinations is held out of training for the prompt-following evaluation (``HELD_OUT``).

Reading a generated picture back and scoring it lives next door, in ``score.py``.
"""

from __future__ import annotations

import itertools

import numpy as np

SIZE = 64
BACKGROUND = (40, 40, 40)
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40), "white": (235, 235, 235)}
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "centre": (32, 32)}  # object centre (x, y), pixels
PLACE_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "centre": "in the centre"}
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
COMBOS = list(itertools.product(SHAPES, COLOURS, POSITIONS))
# Held out: one position per (shape, colour) pair, (s + 2c + p) % 5 == 0; every single attribute value and
# most pairs are still seen in training.
HELD_OUT = [(s, c, p) for (s, c, p) in COMBOS
            if (SHAPES.index(s) + 2 * list(COLOURS).index(c) + list(POSITIONS).index(p)) % 5 == 0]
TRAIN = [k for k in COMBOS if k not in HELD_OUT]


def plain_caption(shape: str, colour: str, pos: str) -> str:
    return f"A {colour} {shape} {PLACE_WORDS[pos]}."


def json_caption(shape: str, colour: str, pos: str) -> dict:
    return {
        "high_level_description": plain_caption(shape, colour, pos),
        "compositional_deconstruction": {
            "background": "Plain dark grey background.",
            "elements": [{"type": "obj", "desc": f"A {colour} {shape}."}],
        },
    }


def encoder_strings(shape: str, colour: str, pos: str) -> list[str]:
    """The two strings the text encoder sees for a combination: wrapped plain text, then the JSON caption."""
    from gguf_dit.runtime.caption import prepare_caption, wrap_plain_text

    return [prepare_caption(wrap_plain_text(plain_caption(shape, colour, pos))), prepare_caption(json_caption(shape, colour, pos))]


def _mask(shape: str, cx: float, cy: float, r: float, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage (SIZE, SIZE) in [0, 1]; r is half the side / the radius."""
    n = SIZE * ss
    g = (np.arange(n) + 0.5) / ss
    x, y = np.meshgrid(g, g)
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        m = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":  # apex up, base 2r, height 2r
        fy = (y - (cy - r)) / (2 * r)  # 0 at apex, 1 at base
        m = (fy >= 0) & (fy <= 1) & (np.abs(x - cx) <= r * fy)
    else:
        raise ValueError(shape)
    return m.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3))


def render(shape: str, colour: str, pos: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (SIZE, SIZE, 3)."""
    cx, cy = POSITIONS[pos]
    r = 11.0
    if rng is not None:
        cx += rng.uniform(-3, 3)
        cy += rng.uniform(-3, 3)
        r = rng.uniform(9.5, 12.5)
    m = _mask(shape, cx, cy, r)[..., None]
    img = (1 - m) * np.array(BACKGROUND, np.float32) + m * np.array(COLOURS[colour], np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_images(combos, per_combo: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(len(combos)*per_combo, SIZE, SIZE, 3) uint8 images and their combo indices into ``combos``."""
    rng = np.random.default_rng(seed)
    imgs = [render(*k, rng=rng) for k in combos for _ in range(per_combo)]
    return np.stack(imgs), np.repeat(np.arange(len(combos)), per_combo)
