"""Backbone load time and memory: weights copied vs computed from the GGUF's memory map, and the graph cache.

Writes (once) a conditional backbone at the real Ideogram 4 shapes with random weights (emb 4608, 18 heads,
intermediate 12288, adaLN 512, 53248 LLM features) but ``--layers`` blocks (default 2), the way
benchmarks/convert_block.py does: ``gguf_dit.converter.tiny.write_tiny_checkpoint`` (official FP8) then
``gguf-dit convert --recipe RECIPE --role cond``. Then, each case in fresh child processes:

* ``load``: ``Ideogram4DiT.load`` with ``RuntimeOptions(mmap=False)`` (copy: plain reads into a backend buffer, the
  loader before issue 14) and ``mmap=True``, each **cold** (the file's pages dropped from the page cache with
  ``posix_fadvise(DONTNEED)`` first) and **warm** (the file read once before); then one velocity at 256² (16×16
  tokens, 64 text tokens). Reported: load seconds, step seconds, and from the child's ``/proc/self/status`` after
  load and after the step: ``VmHWM`` (peak resident, anonymous + file-backed), ``RssAnon`` (private memory) and
  ``RssFile`` (pages of the map, shared with the page cache).
* ``shared``: two processes load the same file and hold it; the parent reads each one's ``/proc/PID/smaps_rollup``
  (``Rss`` and ``Pss``: proportional share, a page mapped by both counts half to each) and the drop in the system's
  ``MemAvailable``.
* ``graphs``: N prompts of different text lengths through one backbone at 256² with ``max_graphs=1`` (the default)
  and with an unbounded cache; ``VmRSS`` after each, and the time of a graph rebuild.

    .venv/bin/python benchmarks/memory.py                      # all three, q8_0, 2 blocks
    .venv/bin/python benchmarks/memory.py --parts load --reps 3

Not a test: it asserts nothing, it measures and prints (JSON lines, then a summary).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
GRID = (16, 16)  # 256x256 pixels
N_TEXT = 64


def status(pid: int | str = "self", fields=("VmHWM", "VmRSS", "RssAnon", "RssFile")) -> dict[str, float]:
    """Fields of /proc/<pid>/status in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in fields:
                out[k] = int(v.split()[0]) / 1024
    return out


def rollup(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous"):
                out[k] = int(v.split()[0]) / 1024
    return out


def mem_available() -> float:
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("MemAvailable"))


def drop_cache(path: Path) -> None:
    """Evict the file's clean pages (no process may have it mapped), so the next load reads the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


# --------------------------------------------------------------------------- children
def _inputs(cfg, n_text: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((GRID[0] * GRID[1], cfg.in_channels)).astype(np.float32)
    feats = rng.standard_normal((n_text, cfg.llm_features_dim)).astype(np.float32)
    return x, feats


def child_load(a) -> None:
    from gguf_dit.runtime.dit import Ideogram4DiT, RuntimeOptions

    t0 = time.perf_counter()
    dit = Ideogram4DiT.load(a.path, "cpu", threads=a.threads, options=RuntimeOptions(mmap=bool(a.mmap)))
    load_s = time.perf_counter() - t0
    after_load = status()
    rep = {"load_s": load_s, "after_load": after_load, "mapped_mib": dit.weights.mapped_bytes / 2**20, "weight_mib": dit.weights.nbytes / 2**20}
    if a.steps:
        x, feats = _inputs(dit.config, N_TEXT)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            dit.velocity(x, 0.5, feats, grid=GRID)
            times.append(time.perf_counter() - t0)
        rep["step_s"] = times
        rep["compute_mib"] = sum(g.compute_bytes for g in dit._graphs.values()) / 2**20
        rep["after_step"] = status()
    print(json.dumps(rep), flush=True)


def child_hold(a) -> None:
    from gguf_dit.runtime.dit import Ideogram4DiT, RuntimeOptions

    dit = Ideogram4DiT.load(a.path, "cpu", threads=a.threads, options=RuntimeOptions(mmap=bool(a.mmap)))
    print(json.dumps({"ready": True, **status()}), flush=True)
    sys.stdin.readline()
    dit.close()


def child_graphs(a) -> None:
    from gguf_dit.runtime.dit import Ideogram4DiT, RuntimeOptions

    lengths = [8 + 13 * i for i in range(a.prompts)]
    dit = Ideogram4DiT.load(a.path, "cpu", threads=a.threads, options=RuntimeOptions(max_graphs=a.max_graphs))
    rows = []
    for i, n in enumerate(lengths):
        x, feats = _inputs(dit.config, n, seed=i)
        t0 = time.perf_counter()
        dit._graph(n, *GRID)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dit.velocity(x, 0.5, feats, grid=GRID)
        rows.append({"n_text": n, "build_s": build_s, "step_s": time.perf_counter() - t0, "graphs": len(dit._graphs),
                     "compute_mib": sum(g.compute_bytes for g in dit._graphs.values()) / 2**20, **status()})
    print(json.dumps({"rows": rows}), flush=True)


def child_build(a) -> None:
    """The Python side of a graph rebuild (the part that grows with the number of blocks) at the full 34 blocks,
    on unallocated weight tensors: the cost an evicted graph adds when its shape comes back."""
    import types

    from gguf_dit.arch.dit import Ideogram4Config, tensor_inventory
    from gguf_dit.ggml_ops import Backend, Builder, Context, GGMLType, lib
    from gguf_dit.runtime.dit import RuntimeOptions, _Modules

    cfg = Ideogram4Config()
    inv = tensor_inventory(cfg)
    wctx = Context(len(inv))
    weights = {s.name: wctx.new_tensor(GGMLType.Q8_0 if s.kind == "linear" else GGMLType.F32, tuple(reversed(s.shape)), s.name) for s in inv}
    dit = types.SimpleNamespace(config=cfg, options=RuntimeOptions(), backend=Backend("cpu", threads=a.threads), weights=weights)
    n_img, times = GRID[0] * GRID[1], []
    for _ in range(3):
        t0 = time.perf_counter()
        size = 512 + 160 * cfg.num_layers
        ctx = Context(n_tensors=8, graph_size=size)
        b = Builder(ctx)
        L = N_TEXT + n_img
        inp = {"x": ctx.new_tensor(GGMLType.F32, (cfg.in_channels, n_img)), "temb": ctx.new_tensor(GGMLType.F32, (cfg.emb_dim, 1)),
               "cos": ctx.new_tensor(GGMLType.F32, (cfg.head_dim, 1, L)), "sin": ctx.new_tensor(GGMLType.F32, (cfg.head_dim, 1, L)),
               "text": ctx.new_tensor(GGMLType.F32, (cfg.llm_features_dim, N_TEXT))}
        out = _Modules(dit, b).transformer(inp, N_TEXT)["v"]
        graph = lib.ggml_new_graph_custom(ctx.ptr, size, False)
        lib.ggml_build_forward_expand(graph, out.ptr)
        times.append(time.perf_counter() - t0)
        nodes = lib.ggml_graph_n_nodes(graph)
        ctx.close()
    print(json.dumps({"layers": cfg.num_layers, "nodes": nodes, "build_s": times}), flush=True)


# --------------------------------------------------------------------------- parent
def spawn(a, worker: str, **kw) -> subprocess.Popen:
    args = [sys.executable, str(HERE), "--worker", worker, "--path", str(a.path), "--threads", str(a.threads)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(a, worker: str, **kw) -> dict:
    p = spawn(a, worker, **kw)
    out, err = p.communicate()
    if p.returncode:
        raise SystemExit(f"{worker} {kw} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def make_file(a) -> None:
    if a.path.exists():
        return
    root = a.path.parent / "ckpt"
    code = ("from gguf_dit.arch.dit import Ideogram4Config; from gguf_dit.converter.tiny import write_tiny_checkpoint; "
            f"write_tiny_checkpoint({str(root)!r}, cfg=Ideogram4Config(num_layers={a.layers}), fp8=True, force=True, full=False)")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = a.path.parent / "gguf"
    subprocess.run([str(Path(sys.executable).with_name("gguf-dit")), "convert", str(root), "-o", str(out), "--recipe", a.recipe,
                    "--role", "cond", "-q", "--force"], check=True)
    (out / "transformer.gguf").rename(a.path)


def part_load(a) -> list[dict]:
    rows = []
    for rep in range(a.reps):
        for mmap in (0, 1):
            for cache in ("cold", "warm"):
                (drop_cache if cache == "cold" else warm_cache)(a.path)
                r = run(a, "load", mmap=mmap, steps=a.steps)
                r.update(case="mmap" if mmap else "copy", cache=cache, rep=rep)
                print(json.dumps(r), flush=True)
                rows.append(r)
    return rows


def part_shared(a) -> list[dict]:
    rows = []
    for mmap in (0, 1):
        warm_cache(a.path)
        before = mem_available()
        procs = [spawn(a, "hold", mmap=mmap) for _ in range(2)]
        ready = [json.loads(p.stdout.readline()) for p in procs]
        r = {"case": "mmap" if mmap else "copy", "status": ready, "rollup": [rollup(p.pid) for p in procs],
             "mem_available_drop_mib": before - mem_available()}
        for p in procs:
            p.communicate("\n")
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def part_graphs(a) -> list[dict]:
    build = run(a, "build")
    print(json.dumps(build), flush=True)
    rows = []
    for bound in (1, a.prompts):
        r = run(a, "graphs", max_graphs=bound, prompts=a.prompts)
        r["max_graphs"] = bound
        print(json.dumps(r), flush=True)
        rows.append(r)
    return [build, *rows]


def summary(load, shared, graphs) -> None:
    import statistics

    if load:
        print("\n| case | cache | load s (median) | step s | VmHWM after load MiB | RssAnon | RssFile | VmHWM after step |")
        print("|---|---|---|---|---|---|---|---|")
        for case in ("copy", "mmap"):
            for cache in ("cold", "warm"):
                rs = [r for r in load if r["case"] == case and r["cache"] == cache]
                med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
                step = f"{med(lambda r: min(r['step_s'])):.2f}" if "step_s" in rs[0] else "-"
                hwm2 = f"{med(lambda r: r['after_step']['VmHWM']):.0f}" if "after_step" in rs[0] else "-"
                each = ", ".join("%.2f" % r["load_s"] for r in rs)
                print(f"| {case} | {cache} | {med(lambda r: r['load_s']):.2f} ({each}) | {step} | "
                      f"{med(lambda r: r['after_load']['VmHWM']):.0f} | {med(lambda r: r['after_load']['RssAnon']):.0f} | "
                      f"{med(lambda r: r['after_load']['RssFile']):.0f} | {hwm2} |")
    for r in shared:
        print(f"\ntwo processes, {r['case']}: Rss {[round(x['Rss']) for x in r['rollup']]} MiB, Pss {[round(x['Pss']) for x in r['rollup']]} MiB, "
              f"anonymous {[round(x['Anonymous']) for x in r['rollup']]} MiB; MemAvailable dropped {r['mem_available_drop_mib']:.0f} MiB")
    for r in graphs:
        if "rows" not in r:
            print(f"\nPython graph build at {r['layers']} blocks ({r['nodes']} nodes): {min(r['build_s']):.2f} s (best of 3)")
            continue
        rows = r["rows"]
        print(f"\nmax_graphs={r['max_graphs']}: VmRSS after each prompt {[round(x['VmRSS']) for x in rows]} MiB; "
              f"compute buffers {rows[-1]['compute_mib']:.0f} MiB in {rows[-1]['graphs']} graphs; "
              f"graph build {statistics.median(x['build_s'] for x in rows):.3f} s (median), step {statistics.median(x['step_s'] for x in rows):.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["load", "hold", "graphs", "build"], help=argparse.SUPPRESS)
    p.add_argument("--mmap", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--max-graphs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, default=Path("/tmp/gguf-dit-memory-bench/transformer.gguf"))
    p.add_argument("--recipe", default="q8_0")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="repetitions of each load case")
    p.add_argument("--steps", type=int, default=2, help="velocities after each load (0: load only)")
    p.add_argument("--prompts", type=int, default=20, help="different text lengths in the graph-cache part")
    p.add_argument("--parts", default="load,shared,graphs")
    a = p.parse_args()
    if a.worker:
        {"load": child_load, "hold": child_hold, "graphs": child_graphs, "build": child_build}[a.worker](a)
        return
    a.path.parent.mkdir(parents=True, exist_ok=True)
    make_file(a)
    print(f"{a.path}: {a.path.stat().st_size / 2**20:.0f} MiB, {a.recipe}, {a.layers} blocks; threads {a.threads}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    parts = a.parts.split(",")
    load = part_load(a) if "load" in parts else []
    shared = part_shared(a) if "shared" in parts else []
    graphs = part_graphs(a) if "graphs" in parts else []
    summary(load, shared, graphs)


if __name__ == "__main__":
    main()
