"""Score a demo model folder on prompt following (the numbers in docs/demo.md).

    python scripts/evaluate_demo.py runtime/demo_model                      # held out, default-20, guidance 1 vs preset
    python scripts/evaluate_demo.py /tmp/demo_f32 --combos train --save grid.png

Generates one 64×64 image per (combination, seed) from its plain-text prompt through the real pipeline and
reads colour, position and shape back with ``gguf_dit.demo.score.analyse``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gguf_dit.demo import data as D, score as S


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--combos", choices=("held-out", "train"), default="held-out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--guidance", nargs="+", default=["preset", "1"], help="'preset' (the preset's schedule) or a number, each scored")
    ap.add_argument("--preset", default="default-20")
    ap.add_argument("--save", type=Path, help="write a grid of the images (one row per combination) for the first guidance")
    a = ap.parse_args(argv)
    combos = D.HELD_OUT if a.combos == "held-out" else D.TRAIN
    print(f"{a.model}: {len(combos)} {a.combos} combinations x seeds {a.seeds}, preset {a.preset}")
    print("| guidance | colour | position | shape | all attributes | images | seconds |")
    print("|---|---|---|---|---|---|---|")
    for i, g in enumerate(a.guidance):
        t0 = time.time()
        r = S.evaluate(a.model, combos, seeds=tuple(a.seeds), guidance=None if g == "preset" else g, preset=a.preset,
                       save=a.save if i == 0 else None)
        print(f"| {g} | {r['colour']:.0%} | {r['position']:.0%} | {r['shape']:.0%} | {r['all_attributes']:.1%} | {r['n']} | {time.time() - t0:.0f} |")
        wrong = [(D.plain_caption(*k), {x: res.get(x) for x in ("colour", "position", "shape")}) for k, res in r["results"]
                 if (res["shape"], res["colour"], res["position"]) != k]
        for cap, got in wrong:
            print(f"    miss: {cap!r} -> {got}")


if __name__ == "__main__":
    main()
