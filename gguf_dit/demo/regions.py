"""Read a 128×128 demo picture back into a ``scene.Scene``'s terms and score it against what was asked (issue 13).

``analyse(img)``: the background is the ``BACKGROUNDS`` colour nearest to the median of the image border; object
pixels are those whose colour, projected onto (nearest object colour − background), covers more than half of the
way (anti-aliased edges count fractionally); connected components (``skimage.measure.label``) of at least
``MIN_AREA`` pixels are the objects. Per object (``skimage.measure.regionprops``):
* colour: the ``COLOURS`` entry nearest to the mean of its interior pixels (eroded, away from blended edges);
* position: the ``POSITIONS`` entry nearest to its bounding-box centre (a triangle's centroid sits r/3 below the
  centre its place is defined by; its box centre does not);
* size: half the mean bounding-box side is r for all three shapes (a triangle's base and height are both 2r):
  small below ``SIZE_THRESHOLD``;
* shape: ``extent`` (area / bounding box: square 1, circle π/4, triangle ½) measured on the coverage, with the
  vertex count of ``approximate_polygon`` on the region's contour deciding the close square/circle cases (solidity is
  reported, not used).

``match(scene, found)`` pairs the asked objects with the as many largest found regions (``linear_sum_assignment`` on
the number of agreeing attributes, then distance); an asked object with no partner scores every attribute wrong.
"""

from __future__ import annotations

import numpy as np

from .data import COLOURS
from .scene import BACKGROUNDS, POSITIONS, SIZE, SIZE_THRESHOLD, Obj, Scene

MIN_AREA = 40  # pixels at 128×128: a small circle (r >= 10) covers >= 300, stray specks of a generated picture fewer
ATTRIBUTES = ("colour", "position", "shape", "size")


def _features(alpha: np.ndarray, region) -> dict:
    from skimage.measure import approximate_polygon, find_contours

    y0, x0, y1, x1 = region.bbox
    box = (y1 - y0) * (x1 - x0)
    # Coverage-weighted area over the box of the half-covered pixels: the anti-aliased edge pixels count by how much
    # they are covered, so extent does not depend on where the threshold cut the edge.
    cover = float(alpha[y0:y1, x0:x1][region.image].sum() + _edge(alpha, region))
    contour = max(find_contours(np.pad(region.image, 1).astype(float), 0.5), key=len)
    vertices = len(approximate_polygon(contour, tolerance=max(1.0, 0.06 * np.sqrt(region.area)))) - 1
    return {"extent": cover / box, "solidity": float(region.solidity), "vertices": vertices,
            "r": ((y1 - y0) + (x1 - x0)) / 4, "centre": ((x0 + x1) / 2, (y0 + y1) / 2)}


def _edge(alpha: np.ndarray, region) -> float:
    """Coverage of the partly covered pixels just outside the region (the outer half of the anti-aliased edge)."""
    from scipy.ndimage import binary_dilation

    full = np.zeros(alpha.shape, bool)
    y0, x0, y1, x1 = region.bbox
    full[y0:y1, x0:x1] = region.image
    ring = binary_dilation(full) & ~full
    return float(alpha[ring].sum())


def _shape(f: dict) -> str:
    e = f["extent"]
    if e < 0.64:
        return "triangle"
    if e > 0.9 or (e > 0.84 and f["vertices"] == 4):
        return "square"
    return "circle"


def analyse(img: np.ndarray) -> dict:
    """{"background": name, "objects": [{"colour", "position", "shape", "size", "area", ...}]} of a uint8 H×W×3
    picture (any size; places and sizes are read in 128×128 units)."""
    from scipy.ndimage import binary_erosion
    from skimage.measure import label, regionprops

    a = img.astype(np.float32)
    h, w = a.shape[:2]
    scale = SIZE / w
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda b: np.linalg.norm(bg_rgb - BACKGROUNDS[b]))
    diff = a - bg_rgb
    # Each pixel's coverage by the object colour it is nearest to, measured along (colour - background).
    # An object colour as close to the background as the background's own colour (yellow on yellow) is never drawn.
    dirs = np.array([np.subtract(COLOURS[c], bg_rgb) for c in COLOURS], np.float32)
    norm2 = (dirs * dirs).sum(1)
    cov = np.where(norm2 > 60 ** 2, np.clip(np.einsum("hwc,kc->hwk", diff, dirs) / np.maximum(norm2, 1), 0, 1), 0)
    resid = np.linalg.norm(diff[..., None, :] - cov[..., None] * dirs, axis=-1)
    alpha = np.take_along_axis(cov, resid.argmin(-1)[..., None], -1)[..., 0]
    objects = []
    for region in regionprops(label(alpha > 0.5, connectivity=2)):
        if region.area * scale * scale < MIN_AREA:
            continue
        y0, x0, y1, x1 = region.bbox
        inner = binary_erosion(np.pad(region.image, 1), iterations=2)[1:-1, 1:-1]
        pix = a[y0:y1, x0:x1][inner if inner.sum() >= 4 else region.image]
        f = _features(alpha, region)
        cx, cy = f["centre"][0] * scale, f["centre"][1] * scale
        r = f["r"] * scale
        objects.append({
            "colour": min(COLOURS, key=lambda c: np.linalg.norm(pix.mean(0) - COLOURS[c])),
            "position": min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2),
            "shape": _shape(f), "size": "small" if r < SIZE_THRESHOLD else "large",
            "area": int(region.area), "centre": (cx, cy), "r": r, "extent": f["extent"], "solidity": f["solidity"], "vertices": f["vertices"],
        })
    objects.sort(key=lambda o: -o["area"])
    return {"background": background, "objects": objects}


def _agree(o: Obj, found: dict) -> int:
    return sum(getattr(o, k) == found[k] for k in ATTRIBUTES if getattr(o, k) is not None)


def match(scene: Scene, found: list[dict]) -> list[dict | None]:
    """For each asked object, the found object it is matched with (None: missing). Only the as many largest found
    regions as objects were asked for take part: a picture sprayed with shapes must not score by having one of each."""
    from scipy.optimize import linear_sum_assignment

    found = sorted(found, key=lambda f: -f["area"])[:len(scene.objects)]
    if not found:
        return [None] * len(scene.objects)
    cost = np.array([[-_agree(o, f) + 1e-3 * np.hypot(*np.subtract(POSITIONS[o.position], f["centre"])) for f in found] for o in scene.objects])
    rows, cols = linear_sum_assignment(cost)
    out: list[dict | None] = [None] * len(scene.objects)
    for i, j in zip(rows, cols):
        out[i] = found[j]
    return out


def grade(scene: Scene, analysis: dict) -> dict[str, list[bool]]:
    """Per attribute, one bool per asked value: "background" once, "colour"/"position"/"shape" per object, "size" per
    object whose size the caption named; "count" once (exactly as many objects found as asked; reported apart)."""
    out: dict[str, list[bool]] = {"background": [analysis["background"] == scene.background]}
    for o, f in zip(scene.objects, match(scene, analysis["objects"])):
        for k in ATTRIBUTES:
            if getattr(o, k) is not None:
                out.setdefault(k, []).append(f is not None and f[k] == getattr(o, k))
    out["count"] = [len(analysis["objects"]) == len(scene.objects)]
    return out


def values_drawn_right(results) -> dict[str, set]:
    """Per attribute, the values drawn right for at least one caption that asks for them (``evaluate``'s results):
    a model that ignores the prompt cannot cover them all."""
    right: dict[str, set] = {}
    for res in results:
        sc = res["scene"]
        for o, f in zip(sc.objects, match(sc, res["found"]["objects"])):
            for k in ATTRIBUTES:
                if getattr(o, k) is not None and f is not None and f[k] == getattr(o, k):
                    right.setdefault(k, set()).add(getattr(o, k))
        if res["found"]["background"] == sc.background:
            right.setdefault("background", set()).add(sc.background)
    return right


def score(graded: list[dict[str, list[bool]]]) -> dict:
    """Accuracy per attribute and over all attributes (every asked value counts once; "count" is not among them)."""
    acc, right, total = {}, 0, 0
    for k in ("background", *ATTRIBUTES, "count"):
        vals = [v for g in graded for v in g.get(k, [])]
        acc[k] = sum(vals) / len(vals) if vals else None
        if k != "count":
            right, total = right + sum(vals), total + len(vals)
    acc["all_attributes"] = right / total if total else None
    acc["n"] = len(graded)
    return acc


def evaluate(model_dir, n: int = 90, seeds=(0,), guidance=None, preset: str = "default-20", size: int | None = None, save=None,
             part: str = "test", threads: int | None = None, caption_seed: int = 0) -> dict:
    """Score a model folder on ``n`` (caption, scene) pairs (``captions.pairs(part, n, caption_seed)``: held out by
    default; caption seed 0 is the reported test set, another seed a validation set of the same kind to choose on), one image per
    (pair, seed) through the real pipeline at ``size`` (default: the model's default size); ``guidance`` overrides the
    preset's (1 = no CFG). Returns ``score`` plus the per-image results (caption, scene, seed, what ``analyse`` found, the
    grades, the image)."""
    from gguf_dit.runtime.model_files import ModelFiles
    from gguf_dit.runtime.pipeline import Pipeline
    from gguf_dit.runtime.schedule import resolve_settings

    from . import captions as C

    test = C.pairs(part, n, caption_seed)
    pipe = Pipeline(ModelFiles.find(model_dir), threads=threads)
    try:
        side = size or pipe.header.default_size
        feats = pipe.encode([C.encoder_string(c) for c, _ in test])
        settings = resolve_settings(preset, guidance=guidance)
        results, images = [], []
        for (cap, scene), f in zip(test, feats):
            for sd in seeds:
                img = pipe.generate(f, side, side, settings, sd).image
                found = analyse(img)
                results.append({"caption": C.caption_text(cap), "scene": scene, "seed": sd, "found": found, "graded": grade(scene, found),
                                "image": img})
                images.append(img)
    finally:
        pipe.close()
    if save:
        from PIL import Image

        cols = 10
        images += [np.zeros_like(images[0])] * (-len(images) % cols)
        Image.fromarray(np.concatenate([np.concatenate(images[i:i + cols], axis=1) for i in range(0, len(images), cols)], axis=0)).save(save)
    return {**score([r["graded"] for r in results]), "results": results}
