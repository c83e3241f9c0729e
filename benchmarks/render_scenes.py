"""Time of the 128×128 demo's scene renderer (``gguf_dit.demo.scene.render``), which draws every training picture
of the demo recipe (scripts/train_demo128.py: the VAE's 8000, the latents' 36,000, the decoder's 8000, the
canonical 12,000, and the matched pictures of every guided, finish and agreement round, 2048 each), against the way
it drew them until 5 December 2026 (the baseline, below: the shape's box sampled through a full meshgrid, then
every pixel of the picture blended). Both must give the same bytes, and the benchmark checks that on every picture
it times (the recipe's bytes depend on it).

Pictures: ``--scenes`` training captions' scenes, each at a jittered layout drawn as the recipe draws it.

    python benchmarks/render_scenes.py [--scenes 3000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gguf_dit.demo import captions as C, scene as S
from gguf_dit.sysinfo import cpu_line


def render_until_5_december(scene: S.Scene, lay: list) -> np.ndarray:
    """The baseline: coverage from a full meshgrid of the box's samples, then the whole picture blended."""
    img = np.broadcast_to(np.array(S.BACKGROUNDS[scene.background], np.float32), (S.SIZE, S.SIZE, 3)).copy()
    for o, cx, cy, r in lay:
        m = np.zeros((S.SIZE, S.SIZE))
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, S.SIZE)
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, S.SIZE)
        x, y = np.meshgrid((np.arange(x0 * 4, x1 * 4) + 0.5) / 4, (np.arange(y0 * 4, y1 * 4) + 0.5) / 4)
        if o.shape == "circle":
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        elif o.shape == "square":
            inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
        else:
            fy = (y - (cy - r)) / (2 * r)
            inside = (fy >= 0) & (fy <= 1) & (np.abs(x - cx) <= r * fy)
        m[y0:y1, x0:x1] = inside.reshape(y1 - y0, 4, x1 - x0, 4).mean(axis=(1, 3))
        img = (1 - m[..., None]) * img + m[..., None] * np.array(S.COLOURS[o.colour], np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=3, help="timed passes over the scenes per renderer; the best is kept")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(3)
    cases = [(sc, S.layout(sc, rng)) for _, sc in C.pairs("train", a.scenes, 0)]
    times, pics = {}, {}
    for name, fn in (("until 5 December (baseline)", render_until_5_december), ("render", lambda sc, lay: S.render(sc, lay=lay))):
        best = float("inf")
        for _ in range(a.reps):
            t0 = time.perf_counter()
            pics[name] = np.stack([fn(sc, lay) for sc, lay in cases])
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    base, fast = pics.values()
    assert np.array_equal(base, fast), "render drew other bytes than the baseline"
    print(cpu_line())
    print(f"{len(cases)} scenes, {sum(len(lay) for _, lay in cases)} objects; the same bytes: True")
    t_base = times["until 5 December (baseline)"]
    for name, t in times.items():
        print(f"{name:<30}{1000 * t / len(cases):7.3f} ms/picture  {t_base / t:5.2f}×")
    # the pictures one run of the recipe renders (its defaults): VAE, latents, decoder, canon, and 5 matched rounds
    n = 8000 + 36000 + 8000 + 12000 + 5 * 2048
    print(f"over the recipe's {n} pictures: {n * t_base / len(cases):.0f} s against {n * times['render'] / len(cases):.0f} s")


if __name__ == "__main__":
    main()
