"""What `convert --imatrix` costs: ggml's quantizer on one real-width matrix, with and without importance.

One Ideogram 4 ``feed_forward.w2`` (4608 x 12288, Gaussian weights, 226 MB of float32) is quantized to each type
through ``ggml_ops.quantize`` (the converter's call) three ways: no importance (``--q4k-path reference``),
uniform importance (the default ``weighted`` path) and an imatrix-like importance (log-normal, a few hot columns),
timed in the same process, alternating, best of ``--repeat``. Not a test: it only measures and prints, with the
CPU, its flags and the load average, which the shared machine makes part of the number.

    .venv/bin/python benchmarks/imatrix_quantize.py [--types q4_k,q6_k] [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from gguf_dit.ggml_ops import GGMLType, quantize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="q4_k,q6_k")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rows", type=int, default=4608)
    ap.add_argument("--cols", type=int, default=12288)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((a.rows, a.cols), dtype=np.float32) / np.sqrt(a.cols)).astype(np.float32)
    imat = rng.lognormal(0.0, 1.0, a.cols).astype(np.float32)
    imat[rng.choice(a.cols, a.cols // 100, replace=False)] *= 100.0
    ways = {"none (reference)": None, "uniform (weighted)": np.ones(a.cols, np.float32), "imatrix": imat}
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    print(f"CPU {cpu}, {os.cpu_count()} logical, avx512f={'avx512f' in flags}, amx={'amx_tile' in flags}; "
          f"load before {os.getloadavg()[0]:.1f}; matrix {a.rows}x{a.cols}")
    for tname in a.types.split(","):
        t = GGMLType.parse(tname)
        best = {k: float("inf") for k in ways}
        for _ in range(a.repeat):
            for k, imp in ways.items():
                t0 = time.perf_counter()
                quantize(w, t, importance=imp, threads=a.threads)
                best[k] = min(best[k], time.perf_counter() - t0)
        base = best["uniform (weighted)"]
        print(t.name + ": " + ", ".join(f"{k} {v:.2f} s ({v / base:.2f}x)" for k, v in best.items()))
    print(f"load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
