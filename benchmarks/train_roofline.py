"""How close one training step of the 128×128 demo's DiT runs to this CPU's matrix-multiply rate: the step's
floating-point operations (``torch.utils.flop_counter.FlopCounterMode``, forward + backward) divided by its time,
against the rate of a plain ``torch.mm`` at the step's own GEMM shapes measured in the same run (the baseline: what
the CPU gives a matmul with nothing around it).

Why: issue 13's two-hour training bar. If a step already runs near the matmul rate, no rewrite of the training
code can make the recipe much faster on this CPU; only fewer steps or smaller ones can. The floor printed is the
recipe's DiT training steps (both backbones) at that rate, with nothing else (no sampler states, encoder, VAE or
conversion).

Precision as ``scripts/train_demo128.py --precision auto`` picks it here (bfloat16 autocast where the CPU has a
bfloat16 unit, float32 elsewhere); a conditional step is one batch of 32 samples of ``--text-tokens`` text and 64
image tokens, padded (no length groups, no ``torch.compile``), an image-only step the same without text tokens;
random values (the cost does not depend on them).

    python benchmarks/train_roofline.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from gguf_dit.sysinfo import cpu_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo128 as T  # noqa: E402
from train_precision import train_step  # noqa: E402


def best_of(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def step_inputs(batch: int, text_tokens: int, rng):
    """Random latents, times and caption features at the script's shapes (the cost does not depend on the values)."""
    x, t = torch.randn(batch, 64, T.DIT_CONFIG["in_channels"]), torch.rand(batch)
    feats = [rng.standard_normal((text_tokens, T.DIT_CONFIG["llm_features_dim"])).astype(np.float32) for _ in range(batch)]
    return x, t, feats


def measure(model, opt, batch: int, text_tokens: int, bf16: bool, reps: int, rng) -> tuple[float, float, dict]:
    """(FLOPs of one step, its best time, {GEMM shape: torch.mm FLOP/s}) at ``text_tokens`` caption tokens."""
    x, t, feats = step_inputs(batch, text_tokens, rng)

    def step():
        train_step(model, opt, x, t, feats, bf16)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step_s = best_of(step, reps)
    # the step's GEMMs: every token of the batch through the attention projections and the MLP
    tokens, width, inner = batch * (text_tokens + 64), T.DIT_CONFIG["attention_head_dim"], T.DIT_CONFIG["intermediate_size"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    rates = {}
    for m, k, n in [(tokens, width, width), (tokens, width, inner), (tokens, inner, width)]:
        p, q = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        rates[(m, k, n)] = 2 * m * k * n / best_of(lambda: p @ q, 10)
    return flops, step_s, rates


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=52, help="caption tokens per sample (training captions: mean 51.7)")
    ap.add_argument("--reps", type=int, default=5)
    # the recipe's defaults (scripts/train_demo128.py): first phase 6000 + second 300 + guided 3 x 300 + finish 600
    # + canon 4 x 600 conditional steps; image-only copy 600 + guided 3 x 300 + agreement 400 + canon 4 x 400
    ap.add_argument("--cond-steps", type=int, default=10200, help="conditional-backbone training steps of the recipe")
    ap.add_argument("--uncond-steps", type=int, default=3500, help="image-only-backbone training steps (no caption tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's table of three conditional steps (where the time outside the matmuls goes)")
    a = ap.parse_args(argv)
    from diffusers import Ideogram4Transformer2DModel

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bf16 = T.native_bf16()
    model = Ideogram4Transformer2DModel(**T.DIT_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    rng = np.random.default_rng(0)
    print(f"{cpu_line()}, torch {torch.__version__}, {a.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {'bfloat16 autocast' if bf16 else 'float32'}")
    print(f"{'step':<32}{'GFLOP':>7}{'s/step':>8}{'step GFLOP/s':>14}{'torch.mm GFLOP/s (base)':>25}{'ratio':>7}")
    at_step = at_mm = 0.0
    for label, text_tokens, steps in [(f"conditional, {a.text_tokens} text tokens", a.text_tokens, a.cond_steps),
                                      ("image-only, no text tokens", 0, a.uncond_steps)]:
        flops, step_s, rates = measure(model, opt, a.batch, text_tokens, bf16, a.reps, rng)
        mm_rate = float(np.mean(list(rates.values())))
        print(f"{label:<32}{flops / 1e9:>7.1f}{step_s:>8.3f}{flops / step_s / 1e9:>14.0f}{mm_rate / 1e9:>25.0f}"
              f"{flops / step_s / mm_rate:>7.2f}")
        print("    torch.mm " + ", ".join(f"{m}x{k}x{n} {r / 1e9:.0f}" for (m, k, n), r in rates.items()))
        at_step += steps * step_s
        at_mm += steps * flops / mm_rate
    print(f"{a.cond_steps} + {a.uncond_steps} steps: {at_step / 60:.0f} min at these steps' rates, "
          f"floor {at_mm / 60:.0f} min at the matmul rate (padded batches, no length groups or compile)")
    if a.profile:
        profile_step(model, opt, a.batch, a.text_tokens, bf16, rng)


def profile_step(model, opt, batch: int, text_tokens: int, bf16: bool, rng) -> None:
    from torch.profiler import ProfilerActivity, profile

    x, t, feats = step_inputs(batch, text_tokens, rng)
    train_step(model, opt, x, t, feats, bf16)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            train_step(model, opt, x, t, feats, bf16)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


if __name__ == "__main__":
    main()
