"""Prompt following of a demo model: read colour, position and shape back from a generated picture and score them.

``evaluate`` draws one 64×64 image per (combination, seed) through the real pipeline; the numbers in docs/demo.md
come from it (``scripts/evaluate_demo.py``, ``tests/test_demo.py``).
"""

from __future__ import annotations

import numpy as np

from .data import BACKGROUND, COLOURS, FILL, HELD_OUT, POSITIONS, SIZE, plain_caption


def analyse(img: np.ndarray) -> dict:
    """Colour, position and shape class of the object in a generated image (uint8 H×W×3)."""
    a = img.astype(np.float32)
    h, w = a.shape[:2]
    bg = np.array(BACKGROUND, np.float32)
    dist = np.linalg.norm(a - bg, axis=-1)
    obj = dist > 60
    out = {"pixels": int(obj.sum())}
    if obj.sum() < 12:
        return {**out, "colour": None, "position": None, "shape": None}
    mean = a[obj].mean(axis=0)
    out["colour"] = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c])))
    ys, xs = np.nonzero(obj)
    cx, cy = xs.mean() * SIZE / w, ys.mean() * SIZE / h
    out["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    # Shape: coverage-weighted area over the bounding box of the half-covered pixels. Coverage is each pixel's
    # projection onto (class colour - background), so anti-aliased edges count fractionally.
    d = np.array(COLOURS[out["colour"]], np.float32) - bg
    alpha = np.clip(((a - bg) @ d) / (d @ d), 0, 1)
    core = alpha > 0.5
    if core.sum() < 4:
        return {**out, "shape": None}
    ys, xs = np.nonzero(core)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = float(alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1].sum() / box)
    out["fill"] = fill
    out["shape"] = min(FILL, key=lambda s: abs(FILL[s] - fill))
    return out


def score(results: list[tuple[tuple[str, str, str], dict]]) -> dict:
    """Attribute accuracy over (expected combo, analyse() result) pairs."""
    n = len(results)
    acc = {
        "colour": sum(r["colour"] == k[1] for k, r in results) / n,
        "position": sum(r["position"] == k[2] for k, r in results) / n,
        "shape": sum(r["shape"] == k[0] for k, r in results) / n,
    }
    acc["all_attributes"] = (acc["colour"] + acc["position"] + acc["shape"]) / 3
    return acc


def evaluate(model_dir, combos=None, seeds=(0, 1), guidance=None, preset="default-20", save=None) -> dict:
    """Generate one 64×64 image per (combo, seed) from its plain-text prompt through the real pipeline and
    score it. ``guidance`` overrides the preset's guidance (e.g. 1.0 = no CFG)."""
    from gguf_dit.runtime.caption import prepare_caption, wrap_plain_text
    from gguf_dit.runtime.model_files import ModelFiles
    from gguf_dit.runtime.pipeline import Pipeline
    from gguf_dit.runtime.schedule import resolve_settings

    combos = list(combos or HELD_OUT)
    pipe = Pipeline(ModelFiles.find(model_dir))
    try:
        feats = pipe.encode([prepare_caption(wrap_plain_text(plain_caption(*k))) for k in combos])
        settings = resolve_settings(preset, guidance=guidance)
        results, images = [], []
        for k, f in zip(combos, feats):
            for sd in seeds:
                img = pipe.generate(f, SIZE, SIZE, settings, sd).image
                results.append((k, analyse(img)))
                images.append(img)
    finally:
        pipe.close()
    if save:
        from PIL import Image

        rows = [np.concatenate(images[i:i + len(seeds)], axis=1) for i in range(0, len(images), len(seeds))]
        Image.fromarray(np.concatenate(rows, axis=0)).save(save)
    return {"n": len(results), **score(results), "results": results}
