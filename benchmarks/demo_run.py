"""Cold-start time of `gguf-dit run` on the embedded demo model, against an F32 conversion of the same checkpoint.

Each repetition is a fresh `gguf-dit run examples/demo.txt` process (interpreter start, imports, loading the four
GGUFs, encoding, 20 sampling steps of both backbones, decoding, writing the PNG): what a user waits for. The
baseline is the same command on `gguf-dit convert --recipe f32` of the training checkpoint, measured in the same
run, so the ratio shows what the shipped Q4_K/Q8_0 recipes buy.

Peak memory per variant: the largest ``VmHWM`` among that variant's runs, each read by the child itself from
``/proc/self/status`` at exit (``eval_cost.CLI_WITH_HWM``: the CLI run as ``python -c``, which is what the
``gguf-dit`` console script does too).

    python scripts/train_demo128.py --root /tmp/demo128_ckpt --work /tmp/demo128_work    # once, for the checkpoint
    python benchmarks/demo_run.py --checkpoint /tmp/demo128_ckpt

The baseline's backbones get the shipped backbones' size range and default size (read in a child process, so that
this script stays light), so both variants draw at the same size.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_cost import CLI_WITH_HWM  # noqa: E402


def gguf_dit() -> list[str]:
    exe = shutil.which("gguf-dit", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "gguf_dit.cli"]


def timed_runs(model: Path | None, prompt: Path, reps: int, threads: int | None, tmp: Path) -> tuple[list[float], float]:
    """Wall times of ``reps`` fresh runs, and the largest peak RSS (VmHWM, MiB) among them."""
    times, peak = [], 0.0
    for i in range(reps):
        cmd = [sys.executable, "-c", CLI_WITH_HWM, "run", str(prompt), "-o", str(tmp / f"img{i}.png"), "--force", "-q"]
        if model is not None:
            cmd += ["--model", str(model)]
        if threads:
            cmd += ["--threads", str(threads)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        if p.returncode:
            raise SystemExit(f"run failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        peak = max(peak, next(int(ln.split()[1]) for ln in p.stderr.splitlines() if ln.startswith("VMHWM_KB")) / 1024.0)
    return times, peak


def shipped_size() -> tuple[int, int, int]:
    """The shipped conditional backbone's size range and default size, read by the runtime's own reader in a child."""
    code = ("from gguf_dit.runtime.backbone_file import BackboneFile; from gguf_dit.runtime.demo import DEMO_DIR; "
            "f = BackboneFile(DEMO_DIR / 'transformer.gguf'); print(*f.size_range, f.default_size)")
    lo, hi, side = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return int(lo), int(hi), int(side)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/demo128_ckpt"), help="the training checkpoint (scripts/train_demo128.py --root)")
    ap.add_argument("--prompt", type=Path, default=ROOT / "examples" / "demo.txt")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if not (a.checkpoint / "transformer").is_dir():
        sys.exit(f"{a.checkpoint}: no training checkpoint (run scripts/train_demo128.py --root {a.checkpoint} first); it is the baseline's source")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    lo, hi, side = shipped_size()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        f32 = tmp / "f32"
        subprocess.run(gguf_dit() + ["convert", str(a.checkpoint), "-o", str(f32), "--recipe", "f32", "--te-type", "f32", "--vae-type", "f32",
                                     "--size-range", f"{lo}..{hi}", "--default-size", str(side), "-q"], check=True)
        sizes = {
            "shipped": sum(p.stat().st_size for p in (ROOT / "runtime" / "demo_model").glob("*.gguf")),
            "f32": sum(p.stat().st_size for p in f32.glob("*.gguf")),
        }
        timed_runs(None, a.prompt, 1, a.threads, tmp)  # warm the page cache and pip's bytecode once, not counted
        base, base_rss = timed_runs(f32, a.prompt, a.reps, a.threads, tmp)
        ours, rss = timed_runs(None, a.prompt, a.reps, a.threads, tmp)
    mb, mo = statistics.median(base), statistics.median(ours)
    print(f"{'variant':<28}{'files MB':>10}{'median s':>10}{'min s':>8}{'ratio':>8}{'peak RSS MiB':>14}")
    print(f"{'f32 conversion (baseline)':<28}{sizes['f32'] / 1e6:>10.1f}{mb:>10.2f}{min(base):>8.2f}{1.0:>8.2f}{base_rss:>14.0f}")
    print(f"{'shipped demo (q4_k/q8_0)':<28}{sizes['shipped'] / 1e6:>10.1f}{mo:>10.2f}{min(ours):>8.2f}{mb / mo:>8.2f}{rss:>14.0f}")
    print(f"one image, default-20, {side}x{side}, cold process each time; peak RSS: the largest VmHWM of the variant's runs")


if __name__ == "__main__":
    main()
