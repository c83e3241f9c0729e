"""Time of making the sampler states that the 128×128 demo's later training stages learn from
(``scripts/train_demo128.py``: ``guided_states``, which ``trajectory_states`` calls), against the way the script
made them until 4 December 2026 (the baseline, kept below): every row of a batch of 64 stepped k_max times, with
both backbones at every step, whatever its own k and the step's guidance.

Two workloads, as the recipe runs them: the canon / finish / agreement rounds' whole trajectories (k up to 19, the
preset's guidance before t = 0.3 and 1 after: ``interval_guidance``), and the third guided round (k up to 8, the
preset's guidance throughout). Random-initialised backbones of ``train_demo128.DIT_CONFIG`` and random caption
features of 52 tokens (the cost does not depend on the values); the same generator seed for both ways, so both
make the same states up to float rounding (the largest difference is printed). Precision as ``--precision auto``
picks it on this CPU.

    python benchmarks/train_states.py [--states 128]
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


def full_batch_states(cond, unc, data, feats, pool, n: int, k_max: int, g, guidance):
    """The baseline: ``guided_states`` as it was, every row stepped k_max times with both backbones."""
    from gguf_dit.runtime.schedule import PRESETS, timesteps

    lat, cap_idx = data
    st = PRESETS["default-20"]
    ts = [float(x) for x in timesteps(st.steps, T.SIZE, T.SIZE, st.mu, st.std)]
    grid = (T.SIZE // 16, T.SIZE // 16)
    idx_all = pool[torch.randint(0, len(pool), (n,), generator=g)]
    k_all = torch.randint(1, k_max + 1, (n,), generator=g)
    states = torch.empty(n, *lat.shape[1:])
    with torch.no_grad(), T.low_precision():
        for s in range(0, n, 64):
            idx, ks = idx_all[s:s + 64], k_all[s:s + 64]
            z = torch.randn(len(idx), *lat.shape[1:], generator=g)
            fb = [feats[int(cap_idx[i])] for i in idx]
            for k in range(k_max):
                t = torch.full((len(idx),), ts[k]).to(torch.bfloat16).float()
                vc, vu = dit_forward(cond, z, t, fb, grid).float(), dit_forward(unc, z, t, None, grid).float()
                z = z + (vu + guidance[k] * (vc - vu)) * (ts[k + 1] - ts[k])
                states[s:s + 64][ks == k + 1] = z[ks == k + 1]
    return idx_all, states


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--states", type=int, default=128, help="states per workload (the recipe makes 2048 a round)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from diffusers import Ideogram4Transformer2DModel
    from gguf_dit.runtime.schedule import PRESETS

    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    T.BF16 = T.native_bf16()
    torch.manual_seed(0)
    cond, unc = (Ideogram4Transformer2DModel(**T.DIT_CONFIG).eval() for _ in range(2))
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((52, 416)).astype(np.float32) for _ in range(16)]
    data = (torch.zeros(16, 64, 128), torch.arange(16))
    pool = torch.arange(16)
    print(f"{cpu_line()}, torch {torch.__version__}, {a.threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{'bfloat16 autocast' if T.BF16 else 'float32'} (native bfloat16: {T.native_bf16()}), {a.states} states a workload")
    work = [("whole trajectories, k <= 19 (canon, finish, agreement)", 19, T.interval_guidance(0.3)),
            ("guided round 3, k <= 8", 8, list(PRESETS["default-20"].guidance))]
    print(f"{'workload':<58}{'baseline s':>12}{'now s':>10}{'speed-up':>10}{'max |diff|':>12}")
    for name, k_max, gs in work:
        t0 = time.perf_counter()
        idx0, s0 = full_batch_states(cond, unc, data, feats, pool, a.states, k_max, torch.Generator().manual_seed(1), gs)
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        idx1, s1, _ = T.guided_states(cond, unc, data, feats, pool, a.states, k_max, torch.Generator().manual_seed(1), guidance=gs)
        now = time.perf_counter() - t0
        assert torch.equal(idx0, idx1)
        print(f"{name:<58}{base:>12.1f}{now:>10.1f}{base / now:>10.2f}{(s0 - s1).abs().max().item():>12.2e}")


if __name__ == "__main__":
    main()
