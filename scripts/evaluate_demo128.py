"""Score a 128×128 demo model folder on prompt following (issue 13; the numbers in docs/demo.md).

    python scripts/evaluate_demo128.py /tmp/demo128                            # 60 held-out captions, preset and guidance 1
    python scripts/evaluate_demo128.py /tmp/demo128 --part train --n 30 --save grid.png

One image per (caption, seed) through the real pipeline (``gguf_dit.demo.regions.evaluate``: the model's default
size, the default-20 preset unless told), read back with ``regions.analyse`` and graded per asked attribute.
``--part test`` (default) draws captions whose sentence patterns, synonyms and attribute combinations were held out
of training (``gguf_dit.demo.captions``); ``train`` draws training-style captions.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gguf_dit.demo import regions as R

COLUMNS = ("background", "colour", "position", "shape", "size")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--part", choices=("test", "train"), default="test")
    ap.add_argument("--n", type=int, default=60, help="captions (the first n of captions.pairs(part, n, caption seed))")
    ap.add_argument("--caption-seed", type=int, default=0, help="0: the reported test captions; another seed draws a validation set of the same kind (choose settings on it, not on the test set)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--guidance", nargs="+", default=["preset", "1"], help="'preset' (the preset's schedule) or a number, each scored")
    ap.add_argument("--preset", default="default-20")
    ap.add_argument("--size", type=int, default=None, help="square side (default: the model's default size)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save", type=Path, help="write a grid of the images (ten per row) for the first guidance")
    ap.add_argument("--misses", action="store_true", help="list every image with a wrong attribute")
    a = ap.parse_args(argv)
    print(f"{a.model}: {a.n} {a.part} captions (caption seed {a.caption_seed}) x seeds {a.seeds}, preset {a.preset}")
    print("| guidance | " + " | ".join(COLUMNS) + " | all attributes | object count | images | seconds |")
    print("|---" * (len(COLUMNS) + 5) + "|")
    for i, g in enumerate(a.guidance):
        t0 = time.time()
        r = R.evaluate(a.model, n=a.n, seeds=tuple(a.seeds), guidance=None if g == "preset" else float(g), preset=a.preset,
                       size=a.size, part=a.part, threads=a.threads, save=a.save if i == 0 else None, caption_seed=a.caption_seed)
        cells = " | ".join(f"{r[k]:.1%}" if r[k] is not None else "-" for k in COLUMNS)
        print(f"| {g} | {cells} | {r['all_attributes']:.1%} | {r['count']:.0%} | {r['n']} | {time.time() - t0:.0f} |")
        if a.misses:
            for res in r["results"]:
                wrong = sorted(k for k, v in res["graded"].items() if k != "count" and not all(v))
                if wrong:
                    print(f"    miss ({', '.join(wrong)}), seed {res['seed']}: {res['caption']!r}")


if __name__ == "__main__":
    main()
