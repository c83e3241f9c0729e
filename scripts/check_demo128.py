"""Release gate for a 128×128 demo model folder (issue 13): measure everything the issue asks of the shipped files
and say, bar by bar, whether the folder meets it. Run it on a candidate before copying it into runtime/demo_model;
its numbers are the ones tests/test_demo.py pins once the folder ships.

    python scripts/train_demo128.py --root /tmp/demo128_ckpt --work /tmp/demo128_work --convert-to /tmp/demo128
    python scripts/check_demo128.py /tmp/demo128

Bars: the four GGUFs, ≤ 20 MB in total, in the shipped recipes (conditional backbone q4_k-protect: Q4_K, Q8_0 and
F16; image-only backbone and text encoder Q8_0); both backbones store sizes 64..256 and default 128; with the
default preset, ≥ 90 % of attributes right on 60 held-out captions × seeds 0 and 1, every value of every attribute
drawn right at least once; guidance 1 scores lower (CFG matters); guidance 0 (the image-only backbone alone, which
never reads a caption) scores well below guidance 1; ``gguf-dit run --model DIR`` draws the example prompt (two
objects) with every attribute right at the default size. Exit 0 when every bar holds, 1 when one fails, 2 when the
folder is not a 128×128 demo model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from gguf_dit.demo import captions as C, regions as R, scene as S

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["text_encoder.gguf", "transformer.gguf", "unconditional_transformer.gguf", "vae.gguf"]


def main(argv=None) -> None:
    import gguf

    from gguf_dit.runtime.backbone_file import BackboneFile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--n", type=int, default=60, help="held-out captions (issue 13: at least 60 images)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--example", type=Path, default=ROOT / "examples" / "demo.txt", help="the prompt file README line 1 draws")
    a = ap.parse_args(argv)
    missing = [n for n in NAMES if not (a.model / n).is_file()]
    if missing:
        print(f"{a.model}: not a model folder (missing {', '.join(missing)})", file=sys.stderr)
        sys.exit(2)
    backbones = {n: BackboneFile(a.model / n) for n in NAMES[1:3]}
    sizes = {n: (f.size_range, f.default_size) for n, f in backbones.items()}
    if sizes["transformer.gguf"][1] != 128:
        print(f"{a.model / 'transformer.gguf'}: default size {sizes['transformer.gguf'][1]}, not a 128×128 demo model", file=sys.stderr)
        sys.exit(2)
    bars: list[tuple[str, bool, str]] = []

    def bar(name: str, ok: bool, measured: str) -> None:
        bars.append((name, bool(ok), measured))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {measured}", flush=True)

    total = sum((a.model / n).stat().st_size for n in NAMES)
    bar("files <= 20 MB in total", total <= 20 * 10**6, f"{total / 1e6:.2f} MB")

    def types(name):
        return {t.tensor_type.name for t in gguf.GGUFReader(str(a.model / name)).tensors}

    recipes = {n: sorted(types(n)) for n in NAMES}
    bar("quantization recipes", {"Q4_K", "Q8_0", "F16"} <= set(recipes["transformer.gguf"])
        and "Q8_0" in recipes["unconditional_transformer.gguf"] and "Q8_0" in recipes["text_encoder.gguf"], str(recipes))
    bar("sizes 64..256, default 128", all(v == ((64, 256), 128) for v in sizes.values()), str(sizes))

    seeds = tuple(a.seeds)
    preset = R.evaluate(a.model, n=a.n, seeds=seeds)
    g1 = R.evaluate(a.model, n=a.n, seeds=seeds, guidance=1.0)
    g0 = R.evaluate(a.model, n=20, seeds=(0,), guidance=0.0)

    def row(r):
        return ", ".join(f"{k} {r[k]:.1%}" for k in ("background", *R.ATTRIBUTES, "count") if r[k] is not None)

    images = len(preset["results"])
    bar("preset >= 90 % of attributes, >= 60 held-out images", images >= 60 and preset["all_attributes"] >= 0.90,
        f"{preset['all_attributes']:.1%} over {images} images ({row(preset)})")
    right = R.values_drawn_right(preset["results"])
    want = {"shape": set(S.SHAPES), "colour": set(S.COLOURS), "position": set(S.POSITIONS), "size": set(S.SIZES),
            "background": set(S.BACKGROUNDS)}
    bar("every value of every attribute drawn right at least once (preset)", right == want,
        "; ".join(f"{k}: missing {sorted(want[k] - right.get(k, set()))}" for k in want if want[k] - right.get(k, set())) or "all")
    two = [res for res in preset["results"] if len(res["scene"].objects) == 2]
    whole = np.mean([all(all(v) for k, v in res["graded"].items() if k != "count") for res in two]) if two else 0.0
    print(f"      two-object images with every attribute right (preset): {whole:.1%} of {len(two)}")
    bar("guidance 1 scores lower than the preset (CFG matters)", g1["all_attributes"] < preset["all_attributes"],
        f"{g1['all_attributes']:.1%} ({row(g1)}); preset - guidance 1 = {100 * (preset['all_attributes'] - g1['all_attributes']):.1f} points")
    bar("guidance 0 (image-only backbone) well below guidance 1", g0["all_attributes"] < g1["all_attributes"] - 0.1,
        f"{g0['all_attributes']:.1%} on 20 captions, seed 0 ({row(g0)})")

    text = a.example.read_text().strip()
    scene = C.read(text)
    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / "example.png"
        r = subprocess.run([sys.executable, "-m", "gguf_dit.cli", "run", str(a.example), "--model", str(a.model), "-o", str(png), "-q"],
                           capture_output=True, text=True)
        if r.returncode == 0 and scene is not None:
            from PIL import Image

            img = np.asarray(Image.open(png).convert("RGB"))
            graded = R.grade(scene, R.analyse(img))
            ok = len(scene.objects) == 2 and img.shape == (128, 128, 3) and all(all(v) for v in graded.values())
            bar(f"{a.example.name} ({text!r}) drawn right", ok, f"{img.shape[1]}x{img.shape[0]}, {graded}")
        else:
            bar(f"{a.example.name} ({text!r}) drawn right", False, f"caption read: {scene is not None}; run: {r.stderr.strip()[-200:]}")
    failed = [name for name, ok, _ in bars if not ok]
    print(f"{len(bars) - len(failed)} of {len(bars)} bars hold" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
