"""Converter benchmark: one full-size Ideogram 4 block, real shapes, random weights.

Writes a checkpoint with the real Ideogram 4 sizes (emb 4608, 18 heads, intermediate 12288, adaLN
512, 128 latent channels, 53248 LLM features) but ``num_layers=1``, in the official FP8 format
(float8_e4m3fn weights with float32 per-row ``weight_scale``, everything else bf16), then converts
its conditional backbone once per recipe, each conversion in its own child process, and reports:

* wall time of the child (process start to exit, imports included);
* throughput in MB/s of float32-equivalent input (sum of numel x 4 over the backbone's tensors,
  the converter's own MB/s definition), and the FP8 source file size;
* peak RSS of the child: ``VmHWM`` of ``/proc/self/status`` read by the child itself at exit (the
  kernel's exact high-water mark of its resident memory, anonymous + file-backed pages). Not
  ``ru_maxrss``: Linux carries the parent's RSS into a spawned child's ``ru_maxrss`` (the old mm's
  high-water mark is kept across fork/vfork + exec), so it reports the parent whenever the parent was
  bigger; the checkpoint is also written in a child so this process stays small. Also shown: the
  peaks of ``RssAnon`` and ``RssFile`` from ``/proc/<pid>/status``, sampled by this process every
  few milliseconds (sampled, so a short spike can be missed; anonymous memory is what must fit in
  RAM, file-backed pages of the memory-mapped source are clean page cache the kernel can drop);
* a baseline child that only imports torch, safetensors and gguf_dit's converter and opens the
  checkpoint (headers scanned, no tensor read), so the converter's own working memory is visible;
* an extrapolation (labelled as such) of the full 34-block backbone: per-tensor times are recorded
  in the child by wrapping ``Backbone.chunks`` (start of the first chunk to exhaustion of the
  generator, so reading, converting, hashing and writing are all inside), and
  full = wall - layers x block + 34 x block (``--layers``, default 1).

The conversion itself is the ``gguf-dit convert`` command (``gguf_dit.cli.app``) with
``--role cond -q --force``, run inside the child wrapper.

Usage::

    python benchmarks/convert_block.py --recipes f16,q8_0,q4_k,q4_k-protect --repeat 2
    python benchmarks/convert_block.py --recipes q4_k --layers 4   # how peak RSS scales with the source

Not a test: nothing here is asserted, it only measures and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RECIPES = ("f16", "q8_0", "q4_k", "q4_k-protect")
FULL_LAYERS = 34
MIB = 1 << 20


# --------------------------------------------------------------------------- child side
def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """RSS fields of /proc/<pid>/status in KiB (empty dict once the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _child_report(path: str, extra: dict) -> None:
    import resource

    rep = {"ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "status_at_exit": _proc_status()}
    rep.update(extra)
    Path(path).write_text(json.dumps(rep))


def child_convert(report: str, cli_args: list[str]) -> int:
    """Run ``gguf-dit <cli_args>`` in this process, timing each tensor, then report peak RSS."""
    from gguf_dit.converter import source

    timings: dict[str, list[float]] = {}
    orig = source.Backbone.chunks

    def timed_chunks(self, name, max_bytes, hasher=None):
        t0 = time.perf_counter()
        yield from orig(self, name, max_bytes, hasher)
        timings[name] = [t0, time.perf_counter()]

    source.Backbone.chunks = timed_chunks
    from gguf_dit.cli import app

    sys.argv = ["gguf-dit", *cli_args]
    rc = 0
    try:
        app()
    except SystemExit as e:
        rc = int(e.code or 0) if not isinstance(e.code, str) else 1
    _child_report(report, {"rc": rc, "tensor_seconds": {k: v[1] - v[0] for k, v in timings.items()}})
    return rc


def child_write(report: str, root: str, layers: int) -> int:
    """Write the checkpoint in a child, so that this process never grows (and its children inherit nothing)."""
    from gguf_dit.arch.dit import Ideogram4Config
    from gguf_dit.converter.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(root, cfg=Ideogram4Config(num_layers=layers), fp8=True, force=True, full=False)
    _child_report(report, {"rc": 0})
    return 0


def child_baseline(report: str, root: str) -> int:
    """Imports and an opened checkpoint, nothing converted: the floor under every conversion."""
    import importlib

    from gguf_dit.converter.source import open_checkpoint

    for m in ("safetensors", "torch", "gguf_dit.cli", "gguf_dit.converter.convert"):
        importlib.import_module(m)

    bbs = open_checkpoint(root, "cond")
    _child_report(report, {"rc": 0, "tensors": len(bbs[0].tensors)})
    return 0


# --------------------------------------------------------------------------- parent side
def run_child(args: list[str], sample_s: float) -> dict:
    """Run this script in child mode; sample its /proc status while it runs."""
    fd, report = tempfile.mkstemp(prefix="convert_block.", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", report, *args]
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)

    def sample() -> None:
        while proc.poll() is None:
            st = _proc_status(proc.pid)
            for k in peaks:
                peaks[k] = max(peaks[k], st.get(k, 0))
            time.sleep(sample_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    th.join()
    try:
        rep = json.loads(Path(report).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        rep = {"rc": rc}
    finally:
        Path(report).unlink(missing_ok=True)
    if rc != 0 or rep.get("rc", rc) != 0:
        raise SystemExit(f"child failed (rc {rc}): {' '.join(cmd)}")
    rep["wall_s"] = wall
    rep["peak_kib"] = rep["status_at_exit"]["VmHWM"]
    rep["sampled_peak_kib"] = peaks
    return rep


def machine_info() -> list[str]:
    lines = [f"python {platform.python_version()}, {platform.platform()}"]
    from importlib import metadata

    lines.append(", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "numpy", "safetensors", "gguf")))
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache")
        lines += [ln.strip() for ln in cpu.splitlines() if ln.startswith(keep)]
    except FileNotFoundError:
        pass
    lines.append(f"nproc (affinity) {len(os.sched_getaffinity(0))}")
    with open("/proc/meminfo") as f:
        mem = {ln.split(":")[0]: ln.split(":")[1].strip() for ln in f}
    lines.append(f"MemTotal {mem.get('MemTotal')}, MemAvailable {mem.get('MemAvailable')}")
    return lines


def inventory_bytes(cfg) -> tuple[int, int, int, dict]:
    """(fp32-equivalent bytes of the backbone, of its non-block tensors, of one block, largest tensor)."""
    from gguf_dit.arch.dit import tensor_inventory

    total = nonblock = block0 = 0
    largest = {"name": "", "bytes": 0}
    for spec in tensor_inventory(cfg):
        n = 4
        for d in spec.shape:
            n *= d
        total += n
        if spec.name.startswith("layers."):
            if spec.name.startswith("layers.0."):
                block0 += n
        else:
            nonblock += n
        if n > largest["bytes"]:
            largest = {"name": spec.name, "bytes": n, "shape": list(spec.shape)}
    return total, nonblock, block0, largest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all recipes; the table shows min wall time and max peak RSS")
    ap.add_argument("--threads", type=int, default=None, help="passed to gguf-dit convert --threads (default: its own, all cores)")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoint and outputs, kept afterwards (default: a new temp dir under /tmp, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (checkpoint and GGUFs) at the end")
    ap.add_argument("--sample-ms", type=float, default=5.0, help="/proc sampling period for RssAnon/RssFile peaks")
    ap.add_argument("--layers", type=int, default=1, help="blocks in the benchmark checkpoint (default 1; more shows how memory scales)")
    ap.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child:
        report, mode, *rest = a.child
        if mode == "write":
            return child_write(report, rest[0], int(rest[1]))
        if mode == "baseline":
            return child_baseline(report, rest[0])
        return child_convert(report, [mode, *rest])

    from gguf_dit.arch.dit import Ideogram4Config
    recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="gguf-dit-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "ckpt"
    cfg = Ideogram4Config(num_layers=a.layers)
    full = Ideogram4Config()
    in_bytes, nonblock_bytes, block_bytes, largest = inventory_bytes(cfg)
    full_bytes = inventory_bytes(full)[0]

    print("machine:")
    for ln in machine_info():
        print("  " + ln)
    try:
        src = root / "transformer" / "diffusion_pytorch_model.safetensors"
        cfg_json = root / "transformer" / "config.json"
        if not src.exists() or json.loads(cfg_json.read_text()).get("num_layers") != a.layers:
            t0 = time.perf_counter()
            print(f"writing FP8 checkpoint (real shapes, num_layers={a.layers}) to {root} ...", flush=True)
            run_child(["write", str(root), str(a.layers)], 0.05)
            print(f"  written in {time.perf_counter() - t0:.1f} s", flush=True)
        src_bytes = src.stat().st_size
        print(f"input: {in_bytes / 1e6:.1f} MB fp32-equivalent ({in_bytes // 4 / 1e6:.1f} M params), "
              f"FP8 source file {src_bytes / 1e6:.1f} MB; largest tensor {largest['name']} {largest['shape']} "
              f"= {largest['bytes'] / 1e6:.1f} MB fp32 ({largest['bytes'] / MIB:.0f} MiB)")

        results: dict[str, list[dict]] = {r: [] for r in recipes}
        baselines = []
        for rnd in range(a.repeat):
            b = run_child(["baseline", str(root)], a.sample_ms / 1000)
            baselines.append(b)
            print(f"[round {rnd + 1}] baseline: peak RSS {b['peak_kib'] / 1024:.0f} MiB", flush=True)
            for r in recipes:
                out = work / f"out-{r}"
                cli = ["convert", str(root), "-o", str(out), "--recipe", r, "--role", "cond", "-q", "--force"]
                if a.threads:
                    cli += ["--threads", str(a.threads)]
                rep = run_child(cli, a.sample_ms / 1000)
                rep["out_bytes"] = (out / "transformer.gguf").stat().st_size
                results[r].append(rep)
                sp = rep["sampled_peak_kib"]
                print(f"[round {rnd + 1}] {r}: {rep['wall_s']:.1f} s, peak RSS (VmHWM) {rep['peak_kib'] / 1024:.0f} MiB "
                      f"(sampled RssAnon {sp['RssAnon'] / 1024:.0f} MiB, RssFile {sp['RssFile'] / 1024:.0f} MiB)", flush=True)
                shutil.rmtree(out, ignore_errors=True)

        base_kib = max(b["peak_kib"] for b in baselines)
        base_anon = max(b["status_at_exit"].get("RssAnon", 0) for b in baselines)
        base_file = max(b["status_at_exit"].get("RssFile", 0) for b in baselines)
        print()
        print(f"baseline (imports + opened checkpoint): peak RSS {base_kib / 1024:.0f} MiB "
              f"(RssAnon {base_anon / 1024:.0f} MiB, RssFile {base_file / 1024:.0f} MiB)")
        print(f"{a.layers} block(s) + non-block tensors: {in_bytes / 1e6:.0f} MB fp32-equivalent in, FP8 source {src_bytes / 1e6:.0f} MB; "
              f"min of {a.repeat} run(s) for wall time, max for memory")
        hdr = ("recipe", "wall s", "MB/s", "peak RSS MiB", "/baseline", "+over base MiB", "RssAnon MiB", "RssFile MiB", "out MB")
        print("| " + " | ".join(hdr) + " |")
        print("|" + "|".join("---" for _ in hdr) + "|")
        rows = []
        for r in recipes:
            reps = results[r]
            wall = min(x["wall_s"] for x in reps)
            peak = max(x["peak_kib"] for x in reps)
            anon = max(x["sampled_peak_kib"]["RssAnon"] for x in reps)
            filep = max(x["sampled_peak_kib"]["RssFile"] for x in reps)
            out_b = reps[0]["out_bytes"]
            row = {"recipe": r, "wall_s": wall, "mb_s": in_bytes / 1e6 / wall, "peak_rss_mib": peak / 1024, "ratio": peak / base_kib,
                   "over_base_mib": (peak - base_kib) / 1024, "anon_mib": anon / 1024, "file_mib": filep / 1024, "out_mb": out_b / 1e6}
            rows.append(row)
            print(f"| {r} | {wall:.1f} | {row['mb_s']:.0f} | {row['peak_rss_mib']:.0f} | {row['ratio']:.2f} | {row['over_base_mib']:.0f} | "
                  f"{row['anon_mib']:.0f} | {row['file_mib']:.0f} | {row['out_mb']:.1f} |")

        print()
        print(f"EXTRAPOLATION (not measured): full {FULL_LAYERS}-block backbone, {full_bytes / 1e9:.1f} GB fp32-equivalent; "
              f"full = wall - {a.layers} x block + {FULL_LAYERS} x block, block = mean time of one block's tensors in the fastest run")
        print("| recipe | non-block s | block s | other s | full backbone est. s | est. min | est. MB/s |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            best = min(results[row["recipe"]], key=lambda x: x["wall_s"])
            ts = best["tensor_seconds"]
            blocks = sum(v for k, v in ts.items() if k.startswith("layers."))
            blk = blocks / a.layers
            nb = sum(v for k, v in ts.items() if not k.startswith("layers."))
            other = best["wall_s"] - blocks - nb
            est = best["wall_s"] - blocks + FULL_LAYERS * blk
            row.update({"nonblock_s": nb, "block_s": blk, "other_s": other, "full_est_s": est})
            print(f"| {row['recipe']} | {nb:.1f} | {blk:.1f} | {other:.1f} | {est:.0f} | {est / 60:.1f} | {full_bytes / 1e6 / est:.0f} |")

        if a.json:
            Path(a.json).write_text(json.dumps({
                "machine": machine_info(), "in_bytes_fp32": in_bytes, "src_bytes": src_bytes, "nonblock_bytes_fp32": nonblock_bytes,
                "block_bytes_fp32": block_bytes, "full_bytes_fp32": full_bytes, "largest": largest, "baselines": baselines,
                "runs": results, "table": rows,
            }, indent=1))
    finally:
        if a.keep or a.workdir:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
