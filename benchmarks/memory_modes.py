"""Memory modes at real shapes: peak memory and s/step of both backbones resident, the unconditional one streamed,
and both streamed (from plain reads or from the memory map), with the plan's prediction beside each.

File: both backbones at the real Ideogram 4 width (emb 4608, 18 heads, intermediate 12288, adaLN 512, 53248 LLM
features) with ``--layers`` blocks (default 2), random weights written by ``write_tiny_checkpoint`` (official FP8)
and converted by the real converter (``gguf-dit convert --recipe RECIPE --parts dit``), as benchmarks/memory.py does.
Each case runs in a fresh child process: load the pair, then ``--steps`` CFG steps (the conditional backbone on 64 text
+ the image tokens, the unconditional one on the image tokens), the first one warming up. Reported from the child's
``/proc/self/status``: ``VmHWM`` (peak resident: anonymous + file-backed), ``RssAnon``, ``RssFile``; the median step
after the first; the plan's expected peak for the same mode (``memory_plan.plan`` with an unlimited budget). Then the
extrapolation to 34 blocks (per-block time and bytes times 34, stated as such).

    .venv/bin/python benchmarks/memory_modes.py                         # q4_k, 2 blocks, 256²
    .venv/bin/python benchmarks/memory_modes.py --sizes 256 512 --steps 3

Not a test: it asserts nothing, it measures and prints (JSON lines, then a table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from memory import status  # noqa: E402

N_TEXT = 64
CASES = {  # name -> (offload mode, stream source)
    "none": ("none", "read"),
    "uncond": ("uncond", "read"),
    "all-read": ("all", "read"),
    "all-map": ("all", "map"),
}


def child(a) -> None:
    import dataclasses

    import numpy as np

    from gguf_dit.ggml_ops import Backend
    from gguf_dit.runtime.backbone_file import BackboneFile
    from gguf_dit.runtime.dit import Ideogram4DiT, RuntimeOptions
    from gguf_dit.runtime.memory_plan import MODES, plan

    mode, source = CASES[a.case]
    opts = RuntimeOptions(stream_source=source)
    gh = a.size // 16
    files = [BackboneFile(a.dir / "transformer.gguf"), BackboneFile(a.dir / "unconditional_transformer.gguf")]
    p = plan(files[0], files[1], backend="cpu", height=a.size, width=a.size, n_text=N_TEXT, offload=mode, budget=1 << 50,
             budget_source="--max-ram", options=opts)
    before = status()
    be = Backend("cpu", threads=a.threads)
    t0 = time.perf_counter()
    cond, uncond = (Ideogram4DiT(f, be, dataclasses.replace(opts, placement=pl)) for f, pl in zip(files, MODES[mode]))
    load_s = time.perf_counter() - t0
    after_load = status()
    copy = {"s": 0.0, "bytes": 0}
    for d in (cond, uncond):
        if d._stream is not None:  # time the slot fills (reads or copies), apart from the compute
            def timed(N, st=d._stream, load=d._stream.load):
                t0 = time.perf_counter()
                load(N)
                copy["s"] += time.perf_counter() - t0
                copy["bytes"] += sum(t.nbytes for t in st.slots[st.sig_of[N]].tensors.values())
            d._stream.load = timed
    rng = np.random.default_rng(0)
    x = rng.standard_normal((gh * gh, 128)).astype(np.float32)
    feats = rng.standard_normal((N_TEXT, cond.config.llm_features_dim)).astype(np.float32)
    feats.setflags(write=False)
    steps = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        cond.velocity(x, 0.5, feats, grid=(gh, gh))
        uncond.velocity(x, 0.5, None, grid=(gh, gh))
        steps.append(time.perf_counter() - t0)
    print(json.dumps({"case": a.case, "size": a.size, "load_s": load_s, "step_s": steps, "before": before, "after_load": after_load,
                      "after": status(), "plan_peak_mib": p.phases["sample"] / 2**20, "streamed_mib": p.streamed_per_step / 2**20,
                      "weights_mib": [d.summary()["weight_bytes"] / 2**20 for d in (cond, uncond)],
                      "compute_mib": [sum(g.compute_bytes for g in d._graphs.values()) / 2**20 for d in (cond, uncond)],
                      "copy_s": copy["s"], "copy_gb_s": copy["bytes"] / copy["s"] / 1e9 if copy["s"] else None,
                      "loadavg": os.getloadavg()[0]}), flush=True)


def make_files(a) -> None:
    if (a.dir / "unconditional_transformer.gguf").exists():
        return
    root = a.dir / "ckpt"
    code = ("from gguf_dit.arch.dit import Ideogram4Config; from gguf_dit.converter.tiny import write_tiny_checkpoint; "
            f"write_tiny_checkpoint({str(root)!r}, cfg=Ideogram4Config(num_layers={a.layers}), fp8=True, force=True, full=False)")
    subprocess.run([sys.executable, "-c", code], check=True)
    subprocess.run([str(Path(sys.executable).with_name("gguf-dit")), "convert", str(root), "-o", str(a.dir), "--recipe", a.recipe,
                    "--parts", "dit", "-q", "--force"], check=True)


def extrapolate(rows: list[dict], layers: int, a) -> None:
    """Per-block cost and bytes times 34: stated as an extrapolation, not a measurement."""
    from gguf_dit.runtime.backbone_file import BackboneFile

    f = BackboneFile(a.dir / "transformer.gguf")
    block = sum(t.nbytes for n, t in f.tensors.items() if n.startswith("layers.")) / layers
    rest = sum(t.nbytes for n, t in f.tensors.items() if not n.startswith("layers."))
    print(f"\nper block {block / 2**20:.0f} MiB, outside the blocks {rest / 2**20:.0f} MiB ({a.recipe});"
          f" 34-block backbone ≈ {(34 * block + rest) / 2**30:.2f} GiB (extrapolated)")
    for size in sorted({r["size"] for r in rows}):
        by = {r["case"]: r for r in rows if r["size"] == size}
        med = {c: statistics.median(r["step_s"][1:] or r["step_s"]) for c, r in by.items()}
        if "none" not in med:
            continue
        per_block = med["none"] / layers  # head and output are small next to a block at these widths
        for c, s in med.items():
            extra = (s - med["none"]) / layers  # streaming's added cost per block (both backbones' share)
            hwm = by[c]["after"]["VmHWM"]
            streamed = {"none": 0, "uncond": 1, "all-read": 2, "all-map": 2}[c]
            weights34 = (2 - streamed) * (34 * block + rest) + streamed * (rest + block)
            print(f"{size}²: {c}: {s:.2f} s/step measured ({s / med['none']:.2f}x resident); 34 blocks ≈ "
                  f"{34 * (per_block + extra):.1f} s/step, weights ≈ {weights34 / 2**30:.2f} GiB + compute (extrapolated); "
                  f"VmHWM {hwm:.0f} MiB measured")


def scaled(path: Path, layers: int, blocks: int = 34, protect: bool = False):
    """A header-only copy of a backbone with ``blocks`` blocks (the last block's tensors repeated): what the plan
    reads, so that it can size a full-depth model that was never written (no weight is read by the plan).
    ``protect``: every ``w2`` as F16, as the q4_k-protect recipe stores it."""
    import copy
    import dataclasses

    from gguf_dit.ggml_ops import GGMLType
    from gguf_dit.runtime.backbone_file import BackboneFile

    f = BackboneFile(path)
    g = copy.copy(f)
    g.config = dataclasses.replace(f.config, num_layers=blocks)
    g.tensors, g.kinds = {}, {}
    for n, t in f.tensors.items():
        if not n.startswith("layers."):
            g.tensors[n], g.kinds[n] = t, f.kinds[n]
        elif n.startswith(f"layers.{layers - 1}."):
            for i in range(blocks):
                m = f"layers.{i}." + n.split(".", 2)[2]
                g.tensors[m], g.kinds[m] = dataclasses.replace(t, name=m), f.kinds[n]
                if protect and m.endswith("feed_forward.w2.weight"):
                    g.tensors[m] = dataclasses.replace(g.tensors[m], type=GGMLType.F16, nbytes=2 * math.prod(t.shape), type_name="F16")
    return g


def full_depth_plans(a) -> None:
    """The plan for a 34-block pair of this recipe under a 12 GiB budget, on the CPU and on a GPU backend."""
    for protect in (False, True):
        print(f"\n{a.recipe}{' with every w2 in F16 (q4_k-protect)' if protect else ''}:")
        cond = scaled(a.dir / "transformer.gguf", a.layers, protect=protect)
        uncond = scaled(a.dir / "unconditional_transformer.gguf", a.layers, protect=protect)
        _plans(cond, uncond)


def _plans(cond, uncond) -> None:
    from gguf_dit.runtime.memory_plan import GIB, plan

    for backend in ("cuda", "cpu"):
        for size in (256, 1024):
            for offload in ("none", "uncond", "all"):
                p = plan(cond, uncond, backend=backend, height=size, width=size, n_text=N_TEXT, offload=offload, budget=1 << 50,
                         budget_source="--max-ram" if backend == "cpu" else "--max-vram")
                print(f"34 blocks, {backend}, {size}², --offload {offload}: expected peak {p.peak / GIB:.2f} GiB "
                      f"({', '.join(f'{k} {v / GIB:.2f}' for k, v in p.phases.items())}), streamed {p.streamed_per_step / GIB:.2f} GiB/step")
            try:
                p = plan(cond, uncond, backend=backend, height=size, width=size, n_text=N_TEXT, budget=12 * GIB,
                         budget_source="--max-ram" if backend == "cpu" else "--max-vram")
                print("  12 GiB:", p.line())
            except Exception as e:  # noqa: BLE001 - reported, not raised: a benchmark
                print("  12 GiB:", e)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, default=Path("/tmp/gguf-dit-modes-bench/q4_k"))
    p.add_argument("--recipe", default="q4_k")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="CFG steps per case (the first is a warm-up)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--reps", type=int, default=1, help="rounds over all cases (interleaved, for a loaded machine)")
    p.add_argument("--plans-only", action="store_true", help="only the 34-block plans (no measurement)")
    a = p.parse_args()
    if a.worker:
        child(a)
        return
    if a.plans_only:
        full_depth_plans(a)
        return
    a.dir.mkdir(parents=True, exist_ok=True)
    make_files(a)
    from gguf_dit.ggml_ops.system import cpu_model

    print(f"{a.dir}: {a.recipe}, {a.layers} blocks; {cpu_model()}; threads {a.threads}; load average {os.getloadavg()}", flush=True)
    rows = []
    for _ in range(a.reps):
        for size in a.sizes:
            for case in a.cases:
                args = [sys.executable, str(HERE), "--worker", "--case", case, "--size", str(size), "--dir", str(a.dir),
                        "--threads", str(a.threads), "--steps", str(a.steps)]
                r = subprocess.run(args, capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(f"{case} {size} failed:\n{r.stderr[-3000:]}")
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| size | case | s/step (median after the first) | × resident | VmHWM MiB | RssAnon | RssFile | plan: expected sample peak MiB | streamed MiB/step | slot fill GB/s | load s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in a.sizes:
        base = None
        for case in a.cases:
            rs = [r for r in rows if r["size"] == size and r["case"] == case]
            s = statistics.median(statistics.median(r["step_s"][1:] or r["step_s"]) for r in rs)
            base = base or s
            r = rs[-1]
            print(f"| {size}² | {case} | {s:.2f} ({', '.join('%.2f' % x for r in rs for x in r['step_s'])}) | {s / base:.2f} | "
                  f"{statistics.median(r['after']['VmHWM'] for r in rs):.0f} | {r['after']['RssAnon']:.0f} | {r['after']['RssFile']:.0f} | "
                  f"{r['plan_peak_mib']:.0f} | {r['streamed_mib']:.0f} | {r['copy_gb_s'] or 0:.2f} | {r['load_s']:.2f} | {r['loadavg']:.1f} |")
    extrapolate(rows, a.layers, a)
    full_depth_plans(a)


if __name__ == "__main__":
    main()
