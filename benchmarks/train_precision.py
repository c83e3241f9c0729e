"""Time of one training step of the 128×128 demo's DiT under bfloat16 autocast against float32 (the baseline), on
this CPU: what ``scripts/train_demo128.py --precision auto`` decides from ``/proc/cpuinfo`` (``native_bf16``).

One forward + backward + AdamW step of ``train_demo128.DIT_CONFIG`` at the script's batch (32 samples of 52 text
and 64 image tokens, random values: the cost does not depend on them), best of ``--reps`` after one warm-up step.

    python benchmarks/train_precision.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gguf_dit.sysinfo import cpu_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_demo128 as T  # noqa: E402
from train_demo import dit_forward  # noqa: E402


def train_step(model, opt, x, t, feats, bf16: bool) -> None:
    """One forward + backward + AdamW step at the script's shapes, a stand-in loss (benchmarks/train_roofline.py too)."""
    with T.low_precision(bf16):
        out = dit_forward(model, x, t, feats, (8, 8))
    loss = out.float().pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def step_seconds(model, opt, x, t, feats, bf16: bool, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        train_step(model, opt, x, t, feats, bf16)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from diffusers import Ideogram4Transformer2DModel

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Ideogram4Transformer2DModel(**T.DIT_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    rng = np.random.default_rng(0)
    x, t = torch.randn(a.batch, 64, 128), torch.rand(a.batch)
    feats = [rng.standard_normal((52, 416)).astype(np.float32) for _ in range(a.batch)]
    print(f"{cpu_line()}, torch {torch.__version__}, {a.threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bfloat16: {T.native_bf16()}")
    fp32 = step_seconds(model, opt, x, t, feats, False, a.reps)
    bf16 = step_seconds(model, opt, x, t, feats, True, a.reps)
    print(f"{'precision':<24}{'s/step':>10}{'vs fp32':>10}")
    print(f"{'float32 (baseline)':<24}{fp32:>10.2f}{1.0:>10.2f}")
    print(f"{'bfloat16 autocast':<24}{bf16:>10.2f}{fp32 / bf16:>10.2f}")
    print(f"--precision auto picks {'bf16' if T.native_bf16() else 'fp32'} here")


if __name__ == "__main__":
    main()
