"""Copy a float checkpoint root, giving every block activation outliers without changing what it computes.

In each block, a few input channels of qkv, w1/w3, w2 and o (seeded choice) are made FACTOR times larger where
they are made (attention_norm1 / ffn_norm1 weights, w3 rows, the v rows of qkv) and the consuming linear's columns
are divided by FACTOR: the same function in exact arithmetic, with the few large activation columns SmoothQuant is
about (docs/quantization.md#activation-smoothing). Backbones are written as F32 with official names; the other parts
(text_encoder/, tokenizer/, vae/) are linked. Needs the official fused names, unquantized (e.g. `gguf-dit
tiny-checkpoint --bf16`).

    python scripts/outlier_checkpoint.py SRC DST [--factor 40] [--channels 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


def outliers(sd: dict[str, torch.Tensor], cfg: dict, factor: float, channels: int, g: torch.Generator) -> dict:
    sd = {k: v.float().clone() for k, v in sd.items()}
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n = 0
    while f"layers.{n}.attention.qkv.weight" in sd:
        p = f"layers.{n}."
        pick = lambda k: torch.randperm(k, generator=g)[:channels]  # noqa: E731
        for norm, lins in (("attention_norm1", ["attention.qkv"]), ("ffn_norm1", ["feed_forward.w1", "feed_forward.w3"])):
            idx = pick(D)
            sd[p + norm + ".weight"][idx] *= factor
            for lin in lins:
                sd[p + lin + ".weight"][:, idx] /= factor
        idx = pick(sd[p + "feed_forward.w2.weight"].shape[1])
        sd[p + "feed_forward.w3.weight"][idx] *= factor
        sd[p + "feed_forward.w2.weight"][:, idx] /= factor
        idx = pick(D)
        sd[p + "attention.qkv.weight"][2 * D + idx] *= factor
        sd[p + "attention.o.weight"][:, idx] /= factor
        n += 1
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--factor", type=float, default=40.0)
    ap.add_argument("--channels", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.dst.exists():
        raise SystemExit(f"{a.dst}: exists")
    a.dst.mkdir(parents=True)
    g = torch.Generator().manual_seed(a.seed)
    for d in sorted(a.src.iterdir()):
        if d.name in ("transformer", "unconditional_transformer"):
            (a.dst / d.name).mkdir()
            cfg = json.loads((d / "config.json").read_text())
            shutil.copy(d / "config.json", a.dst / d.name / "config.json")
            save_file(outliers(load_file(str(d / WEIGHTS)), cfg, a.factor, a.channels, g), str(a.dst / d.name / WEIGHTS))
        else:
            (a.dst / d.name).symlink_to(d.resolve())


if __name__ == "__main__":
    main()
