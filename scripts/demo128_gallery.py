"""Draw held-out captions with the embedded demo model and compose docs/demo/gallery.png: each 128×128 result (the
default preset, seed 0, the real pipeline) above its caption and the scorer's grade, misses in red.

    python scripts/demo128_gallery.py                   # docs/demo/gallery.png (the preset's guidance)
    python scripts/demo128_gallery.py --guidance 1      # docs/demo/gallery-guidance-1.png
    python scripts/demo128_gallery.py --model DIR --out grid.png   # any 128×128 demo folder (train_demo128.py --convert-to)

The captions are the first ``--n`` of ``captions.pairs("test", n, 0)``, the held-out set ``scripts/evaluate_demo128.py``
scores (sentence patterns, synonyms and attribute combinations never trained on); a JSON caption shows its
``high_level_description``.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from gguf_dit.demo import regions as R
from gguf_dit.runtime.backbone_file import BackboneFile
from gguf_dit.runtime.demo import DEMO_DIR

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "demo"


def label(res) -> tuple[str, list[str]]:
    """The caption as a person reads it, and the attributes the scorer found wrong."""
    cap = res["caption"]
    if cap.lstrip().startswith("{"):
        cap = "JSON: " + json.loads(cap).get("high_level_description", cap)
    return cap, sorted(k for k, v in res["graded"].items() if not all(v))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guidance", type=float, default=None, help="override the preset's guidance (as `gguf-dit run --guidance`)")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--model", type=Path, default=DEMO_DIR)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    side = BackboneFile(a.model / "transformer.gguf").default_size
    if side != 128:
        print(f"{a.model / 'transformer.gguf'}: default size {side}, not a 128×128 demo model (the 64×64 one: scripts/demo_gallery.py)", file=sys.stderr)
        sys.exit(2)
    out = a.out or DOCS / (f"gallery-guidance-{a.guidance:g}.png" if a.guidance is not None else "gallery.png")
    r = R.evaluate(a.model, n=a.n, seeds=(0,), guidance=a.guidance)
    cols, side, text_h, pad = 6, 128, 64, 8
    rows = -(-len(r["results"]) // cols)
    sheet = Image.new("RGB", (cols * (side + 2 * pad + 40), rows * (side + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    cw = side + 2 * pad + 40
    for i, res in enumerate(r["results"]):
        x, y = pad + (i % cols) * cw, pad + (i // cols) * (side + text_h + pad)
        sheet.paste(Image.fromarray(res["image"]), (x + 20, y))
        cap, wrong = label(res)
        lines = textwrap.wrap(cap, 30)[:4]
        draw.multiline_text((x, y + side + 2), "\n".join(lines), fill=(0, 0, 0), spacing=1)
        verdict = "miss: " + ", ".join(wrong) if wrong else "all right"
        draw.text((x, y + side + 2 + 12 * len(lines)), verdict, fill=(200, 0, 0) if wrong else (0, 128, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    print(f"{out}: {r['all_attributes']:.1%} of attributes right over {r['n']} captions")


if __name__ == "__main__":
    main()
