"""Draw the prompts in docs/demo/prompts.txt with `gguf-dit run` (the embedded demo model, default preset, seeds 0, 1, …)
and compose docs/demo/gallery.png: each 64×64 result enlarged 4× (nearest neighbour) above its prompt.

    python scripts/demo_gallery.py                      # docs/demo/gallery.png (the preset's guidance)
    python scripts/demo_gallery.py --guidance 1         # docs/demo/gallery-guidance-1.png
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "demo"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guidance", default=None, help="override the preset's guidance (as `gguf-dit run --guidance`)")
    a = ap.parse_args(argv)
    extra = ["--guidance", a.guidance] if a.guidance else []
    name = f"gallery-guidance-{a.guidance}.png" if a.guidance else "gallery.png"
    prompts = [p for p in (DOCS / "prompts.txt").read_text().splitlines() if p.strip()]
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "gguf_dit.cli", "run", str(DOCS / "prompts.txt"), "-o", d, "-q", *extra], check=True, stdout=subprocess.DEVNULL)
        images = [Image.open(p).convert("RGB") for p in sorted(Path(d).glob("*.png"))]
    assert len(images) == len(prompts)
    scale, cols, label = 4, 4, 28
    w = 64 * scale
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * (w + 8) + 8, rows * (w + label + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, text) in enumerate(zip(images, prompts)):
        x, y = 8 + (i % cols) * (w + 8), 8 + (i // cols) * (w + label + 8)
        sheet.paste(img.resize((w, w), Image.NEAREST), (x, y))
        draw.text((x, y + w + 6), f"{text} (seed {i})", fill=(0, 0, 0))
    sheet.save(DOCS / name, optimize=True)
    print(DOCS / name)


if __name__ == "__main__":
    main()
