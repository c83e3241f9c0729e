"""One training step of the demo's text encoder (scripts/train_demo128.py, stages language and place), eager
against ``torch.compile``: the encoder is 36 layers of hidden 32, so a step is thousands of tiny kernels and the
Python and autograd overhead between them, not arithmetic. Prints seconds per step and the ratio to eager, measured
in the same run, with the CPU's flags.

    python benchmarks/train_encoder_step.py --checkpoint checkpoints/demo --steps 20

A step here is the stage's: forward of 2 × batch token sequences (a caption and its minimal-pair twin) of
``--tokens`` tokens, the 13 tapped layer outputs concatenated, a loss on them, backward, AdamW. The loss is a
stand-in (the mean square of the features): the readers' heads are a few small matmuls on top and do not change
the encoder's cost.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def timed(step, n: int) -> float:
    step()  # first call: compilation, allocation
    step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main(argv=None) -> None:
    import sys

    from gguf_dit.sysinfo import cpu_line

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints/demo"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="captions per step (the stage's default; each with its twin)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_demo128 import te_features, te_model

    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    rows = []
    for name in ("eager", "torch.compile"):
        torch.manual_seed(0)
        model = te_model(a.checkpoint).train()
        fwd = (lambda ids: te_features(model, ids)) if name == "eager" else torch.compile(lambda ids: te_features(model, ids))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, model.config.vocab_size, (2 * a.batch, a.tokens), generator=torch.Generator().manual_seed(0))  # both variants: the same tokens

        def step():
            loss = fwd(ids).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        t_first = time.perf_counter()
        s = timed(step, a.steps)
        rows.append((name, s, time.perf_counter() - t_first - s * a.steps))
    print(f"{cpu_line()}, {a.threads} threads, torch {torch.__version__}")
    print(f"{'variant':<16}{'s/step':>9}{'ratio':>8}{'warm-up s':>11}")
    for name, s, warm in rows:
        print(f"{name:<16}{s:>9.3f}{rows[0][1] / s:>7.2f}×{warm:>11.1f}")
    print(f"{a.steps} timed steps after 2 untimed, batch {a.batch} captions + twins × {a.tokens} tokens")


if __name__ == "__main__":
    main()
