"""DiT step time with 1 thread and with every core, on an idle machine and under 1 and 2 busy background processes.

Question (issue 15): on a loaded machine "all cores" was observed 2-6x slower than ``--threads 1``. Is ggml's
busy-waiting the cause? This llama-cpp-python build uses OpenMP (``gguf-dit info``: features ... OPENMP), so
ggml's per-op barrier is ``#pragma omp barrier`` and its waiting is libgomp's: spin ``GOMP_SPINCOUNT`` times (300,000
by default; 0 with ``OMP_WAIT_POLICY=passive``), then sleep on a futex. Each variant runs in a fresh process:

* ``t1``: 1 thread (no barrier at all);
* ``tN``: every usable core, libgomp's default wait policy (spin, then sleep);
* ``tN-passive``: every usable core, ``OMP_WAIT_POLICY=passive`` (sleep at once: no busy-waiting);
* ``tN-spin10k``: every usable core, ``GOMP_SPINCOUNT=10000`` (spin about 0.1 ms, then sleep);
* ``auto``: what ``default_threads()`` picks when started under that load (the policy gguf-dit uses).

Each is timed under 0, 1 and 2 background processes that spin (``while True: pass``), started by this script and
stopped after each measurement. The script prints, per workload and load, the median step time over rounds, the CPU
seconds the worker burnt per step (spinning shows as CPU time without progress) and ratios against ``t1``.
Workloads: ``demo`` (both demo backbones, one CFG step, at --sizes) and ``wide`` (a 2-block backbone of width
1024, Q8_0, built once in --workdir: a real model's matmuls are wider still).

    python benchmarks/threads_under_load.py                  # default: demo at 64 and 256 px, wide at 256 px, 3 rounds
    python benchmarks/threads_under_load.py --rounds 5 --workloads demo --sizes 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(a) -> dict:
    import numpy as np

    from gguf_dit.ggml_ops import default_threads
    from gguf_dit.runtime.dit import Ideogram4DiT

    threads = a.threads or default_threads()
    d = Path(a.model)
    cond = Ideogram4DiT.load(d / "transformer.gguf", "cpu", threads=threads)
    uncond = Ideogram4DiT.load(d / "unconditional_transformer.gguf", "cpu", threads=threads)
    side = a.size // 16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((side * side, cond.config.in_channels)).astype(np.float32)
    feats = rng.standard_normal((32, cond.config.llm_features_dim)).astype(np.float32)
    step = lambda: (cond.velocity(x, 0.5, feats, grid=(side, side)), uncond.velocity(x, 0.5, None, grid=(side, side)))  # noqa: E731
    step()  # graphs built and allocated
    walls, cpus = [], []
    deadline = time.perf_counter() + a.seconds
    while len(walls) < 3 or time.perf_counter() < deadline:
        c0, t0 = _cpu_s(), time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
    return {"threads": threads, "step_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "steps": len(walls)}


def _wide_model(work: Path) -> Path:
    """A 2-block backbone pair of width 1024 (4 heads of 256), Q8_0, converted once."""
    out = work / "wide-q8_0"
    if (out / "unconditional_transformer.gguf").exists():
        return out
    import torch
    from diffusers import Ideogram4Transformer2DModel

    from gguf_dit.arch.dit import BACKBONE_DIRS, HEAD_DIM, Ideogram4Config
    from gguf_dit.converter.tiny import dit_config, save_folder

    config = dit_config(Ideogram4Config(emb_dim=4 * HEAD_DIM, num_layers=2, num_heads=4, intermediate_size=4096, adaln_dim=512, llm_features_dim=13 * 64))
    for i, sub in enumerate(BACKBONE_DIRS):
        torch.manual_seed(i)
        m = Ideogram4Transformer2DModel.from_config(config)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.1) + (1.0 if "norm" in n else 0.0))
        save_folder(work / "wide-ckpt" / sub, m.state_dict(), config)
    subprocess.run([sys.executable, "-m", "gguf_dit.cli", "convert", str(work / "wide-ckpt"), "-o", str(out), "--recipe", "q8_0", "-q", "--force"], check=True)
    return out


def _measure(model: Path, size: int, threads: int | None, env: dict, seconds: float) -> dict:
    args = [sys.executable, __file__, "--worker", "--model", str(model), "--size", str(size), "--seconds", str(seconds)]
    if threads:
        args += ["--threads", str(threads)]
    out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode:
        raise SystemExit(f"worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _hogs(n: int) -> list[subprocess.Popen]:
    # each spins until stopped, or until this script dies (its parent changes)
    return [subprocess.Popen([sys.executable, "-c", "import os\np = os.getppid()\nwhile os.getppid() == p: pass"]) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=2.0, help="time each variant runs steps for (at least 3 steps)")
    p.add_argument("--workloads", default="demo,wide")
    p.add_argument("--sizes", default="64,256", help="image sides for the demo workload (the wide one uses 256)")
    p.add_argument("--loads", default="0,1,2", help="numbers of busy background processes")
    p.add_argument("--rounds", type=int, default=3, help="repeat the whole matrix; medians are reported")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gguf-dit-threads-bench")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return

    from gguf_dit.ggml_ops import default_threads
    from gguf_dit.runtime.demo import model_dir

    cores = len(os.sched_getaffinity(0))
    jobs = []
    for w in a.workloads.split(","):
        if w == "demo":
            jobs += [(f"demo {s}px", model_dir(), s) for s in map(int, a.sizes.split(","))]
        elif w == "wide":
            a.workdir.mkdir(parents=True, exist_ok=True)
            jobs.append(("wide 256px", _wide_model(a.workdir), 256))
    variants = {"t1": (1, {}), f"t{cores}": (cores, {}), f"t{cores}-passive": (cores, {"OMP_WAIT_POLICY": "passive"}),
                f"t{cores}-spin10k": (cores, {"GOMP_SPINCOUNT": "10000"}), "auto": (None, {})}
    loads = [int(x) for x in a.loads.split(",")]
    results: dict = {}
    print(f"{cores} usable cores; load average before: {os.getloadavg()}; default_threads() now: {default_threads()}", flush=True)
    for r in range(a.rounds):
        for name, model, size in jobs:
            for load in loads:
                hogs = _hogs(load)
                try:
                    time.sleep(0.5)  # let the scheduler see the hogs
                    for v, (threads, env) in variants.items():
                        res = _measure(model, size, threads, env, a.seconds)
                        results.setdefault((name, load, v), []).append(res)
                        print(f"round {r + 1} {name} load {load} {v}: {res['step_s'] * 1e3:.1f} ms/step, cpu {res['cpu_s'] * 1e3:.1f} ms, "
                              f"threads {res['threads']}", flush=True)
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
    print(f"\nmedians over {a.rounds} rounds (ms per CFG step; cpu = CPU ms the worker used per step; ratio = time / t1 time)")
    print(f"{'workload':<12} {'load':>4} " + " ".join(f"{v:>22}" for v in variants))
    summary = []
    for name, _, _ in jobs:
        for load in loads:
            med = {v: {k: statistics.median(x[k] for x in results[(name, load, v)]) for k in ("step_s", "cpu_s", "threads")} for v in variants}
            base = med["t1"]["step_s"]
            cells = [f"{m['step_s'] * 1e3:7.1f} ({m['step_s'] / base:4.2f}x) c{m['cpu_s'] * 1e3:5.0f}" for m in med.values()]
            print(f"{name:<12} {load:>4} " + " ".join(f"{c:>22}" for c in cells) + f"  auto={med['auto']['threads']:.0f}")
            summary.append({"workload": name, "load": load, **{v: m for v, m in med.items()}})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
