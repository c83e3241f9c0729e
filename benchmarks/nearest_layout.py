"""Time of ``nearest_layout`` (scripts/train_demo128.py), which pulls every sampler state of the demo recipe's
guided, finish and agreement rounds to the layout of its caption's scene nearest to where the state heads
(``matched_pictures``: 2048 states a round, 48 draws per object), against the way the recipe computed it until
5 December 2026 (``nearest_layout_by_rendering``, the baseline: every draw rendered, its distance summed in
floats). Both must choose the same layouts from the same generator; the benchmark checks that on every picture
it times (the recipe's bytes depend on it).

Pictures: ``--scenes`` training captions' scenes, each rendered at a jittered layout with uniform noise of ±60 on
every channel (a sampler state's decoded picture is near a layout, not on one).

    python benchmarks/nearest_layout.py [--scenes 600]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from gguf_dit.demo import captions as C, scene as S
from gguf_dit.sysinfo import cpu_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_demo128 as T  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=600)
    a = ap.parse_args(argv)
    gen = np.random.default_rng(0)
    cases = C.pairs("train", a.scenes, 5)
    pics = [np.clip(S.render(sc, gen).astype(np.int16) + gen.integers(-60, 61, (S.SIZE, S.SIZE, 3)), 0, 255).astype(np.uint8) for _, sc in cases]
    got = {}
    for name, fn in (("by rendering (baseline)", T.nearest_layout_by_rendering), ("nearest_layout", T.nearest_layout)):
        t0 = time.perf_counter()
        got[name] = [fn(sc, im, np.random.default_rng(i), 48) for i, ((_, sc), im) in enumerate(zip(cases, pics))]
        got[name] = (got[name], time.perf_counter() - t0)
    (base, t_base), (fast, t_fast) = got.values()
    assert base == fast, "nearest_layout chose another layout than the baseline"
    objects = sum(len(sc.objects) for _, sc in cases)
    print(cpu_line())
    print(f"{len(cases)} scenes, {objects} objects, 48 draws each; the same layouts chosen: True")
    for name, (_, t) in got.items():
        print(f"{name:<26}{t:8.2f} s  {1000 * t / len(cases):7.2f} ms/state  {t_base / t:5.1f}×")


if __name__ == "__main__":
    main()
