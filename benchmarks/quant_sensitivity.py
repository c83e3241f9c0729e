"""Which linears of a backbone are sensitive to Q4_K: the measurement behind the shipped ``q4_k-m`` recipe.

For every linear of BACKBONE.gguf (a float conversion, or Q8_0 as a near-float proxy: its weights are dequantized
and run as F32), quantize that linear alone to each --types entry with ggml's quantizer (uniform importance, as
``convert`` does without an imatrix), everything else float, and report the relative velocity error against the
all-float backbone (max |Δv| / max |v| over --steps timesteps and --seeds noise draws; text features N(0, 1) for a
conditional backbone), plus the weight's own relative RMS quantization error. Grouped by linear kind at the end.

    .venv/bin/python benchmarks/quant_sensitivity.py BACKBONE.gguf [--grid 8x8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict

import numpy as np

from gguf_dit.ggml_ops import Backend, GGMLType, dequantize, fits, quantize
from gguf_dit.imatrix import ggml_weights
from gguf_dit.runtime.backbone_file import BackboneFile
from gguf_dit.runtime.dit import Ideogram4DiT


def kind(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "", name).replace(".weight", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("backbone")
    ap.add_argument("--types", default="q4_k,q6_k")
    ap.add_argument("--grid", default="8x8")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n-text", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    f = BackboneFile(a.backbone)
    be = Backend("cpu")
    grid = tuple(int(v) for v in a.grid.split("x"))
    types = [GGMLType.parse(t) for t in a.types.split(",")]
    linears = [n for n, k in f.kinds.items() if k == "linear"]
    w = {n: np.asarray(f.dequantized(n), dtype=np.float32).reshape(-1, f.tensors[n].ne[0]) for n in linears}
    floats = {n: (GGMLType.F32, w[n]) for n in linears}
    rng = np.random.default_rng(0)
    C, F = f.config.in_channels, f.config.llm_features_dim
    cases = []
    for s in range(a.seeds):
        for t in np.linspace(0.1, 0.95, a.steps):
            x = rng.standard_normal((grid[0] * grid[1], C)).astype(np.float32)
            feats = rng.standard_normal((a.n_text, F)).astype(np.float32) if f.role == "cond" else None
            cases.append((x, float(t), feats))

    def run(replace):
        dit = Ideogram4DiT(f, be, replace=replace)
        return [dit.velocity(x, t, feats, grid=grid) for x, t, feats in cases]

    ref = run(floats)
    rows = []
    for n in linears:
        for ty in types:
            if not fits(ty, w[n].shape[1]):
                continue
            q = quantize(w[n], ty, importance=ggml_weights(ty, None, w[n].shape[1]))  # convert's bytes without an imatrix
            werr = float(np.sqrt(np.mean((dequantize(q, ty, w[n].shape[1]) - w[n]) ** 2) / np.mean(w[n] ** 2)))
            out = run({**floats, n: (ty, q)})
            verr = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(out, ref))
            rows.append({"tensor": n, "kind": kind(n), "type": ty.name, "weight_rel_rms": werr, "velocity_rel_err": verr,
                         "params": int(w[n].size)})
    by = defaultdict(list)
    for r in rows:
        by[(r["kind"], r["type"])].append(r["velocity_rel_err"])
    print(f"{a.backbone}: role {f.role}, {len(linears)} linears, grid {grid}, {len(cases)} cases, {time.perf_counter() - t0:.1f} s")
    print(f"{'kind':36s} {'type':5s} {'mean vel err':>12s} {'max':>10s}")
    for (k, ty), v in sorted(by.items(), key=lambda kv: -np.mean(kv[1])):
        print(f"{k:36s} {ty:5s} {np.mean(v):12.3e} {np.max(v):10.3e}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
