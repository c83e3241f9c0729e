"""Time and peak memory of `gguf-dit eval`: on given models (e.g. the demo's conversions), or on real-width blocks.

``--real`` writes (once, into ``--work``) a checkpoint whose backbones have the real Ideogram 4 block width (emb 4608,
18 heads, intermediate 12288, adaLN 512) but ``--layers`` blocks, with the tiny text encoder and VAE of
``gguf-dit tiny-checkpoint`` (so the text-feature width is the tiny encoder's 416, not 53248: only ``llm_cond``'s
input width differs from the real model), and converts it twice: the reference (``--ref-recipe``, default bf16) and
the candidate's backbones (``--cand-recipe``, default q4_k). Each eval runs in a child process, which reports its own
``VmHWM`` (peak resident, /proc/self/status) at exit; the eval's own JSON gives the per-side times.

    .venv/bin/python benchmarks/eval_cost.py REF CAND --prompts FILE [--steps N] [--size WxH]
    .venv/bin/python benchmarks/eval_cost.py --real --layers 1 --size 256x256 --steps 2 --work /tmp/eval_real

Not a test: it measures and prints one JSON line per eval (with the CPU, its flags and the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# A gguf-dit CLI process that reports its own peak resident memory (VmHWM) on its last stderr line at exit.
CLI_WITH_HWM = """
import atexit, sys
def _hwm():
    with open('/proc/self/status') as f:
        print('VMHWM_KB', next(int(l.split()[1]) for l in f if l.startswith('VmHWM:')), file=sys.stderr)
atexit.register(_hwm)
from gguf_dit.cli import app
app(sys.argv[1:])
"""


def run_eval(ref: str, cand: str, prompts: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        load = os.getloadavg()
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CLI_WITH_HWM, "eval", ref, cand, "--prompts", prompts, "--json", str(out), "-q", *extra],
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode:
            raise SystemExit(f"eval failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        hwm = next(int(ln.split()[1]) for ln in p.stderr.splitlines() if ln.startswith("VMHWM_KB"))
        r = json.loads(out.read_text())
    sides = {k: {"weight_mb": r[k]["weight_bytes"] / 1e6, "load_s": r[k]["load_seconds"], "sample_s_per_image": r[k]["sample_seconds_per_image"]}
             for k in ("reference", "candidate")}
    sides["candidate"]["teacher_forced_s_per_image"] = r["candidate"]["teacher_forced_seconds_per_image"]
    return {"reference": ref, "candidate": cand, "images": len(r["images"]), "steps": r["settings"]["steps"],
            "size": f"{r['settings']['width']}x{r['settings']['height']}", "threads": r["settings"]["threads"],
            "wall_s": wall, "eval_wall_s": r["wall_seconds"], "peak_rss_mib": hwm / 1024, "sides": sides,
            "decode_s_per_image": r["decode_seconds_per_image"], "velocity_error": {k: r["total"]["velocity_error"][k] for k in ("cond", "uncond")},
            "final_latent_error": r["total"]["final_latent_error"], "psnr_db": r["total"]["psnr_db"], "ssim": r["total"]["ssim"],
            "loadavg_before": load, "loadavg_after": os.getloadavg()}


def real_models(work: Path, layers: int, ref_recipe: str, cand_recipe: str) -> tuple[Path, Path]:
    import dataclasses

    from gguf_dit.arch.dit import Ideogram4Config
    from gguf_dit.converter.tiny import TINY, write_tiny_checkpoint

    cfg = dataclasses.replace(Ideogram4Config(), num_layers=layers, llm_features_dim=TINY.llm_features_dim)
    ck, ref, cand = work / f"ck{layers}", work / f"ref{layers}_{ref_recipe}", work / f"cand{layers}_{cand_recipe}"
    if not (ck / "vae").exists():
        write_tiny_checkpoint(ck, cfg=cfg, force=True)
    for out, recipe, parts in ((ref, ref_recipe, []), (cand, cand_recipe, ["--parts", "dit"])):
        if not (out / "transformer.gguf").exists():
            subprocess.run([sys.executable, "-m", "gguf_dit.cli", "convert", str(ck), "-o", str(out), "--recipe", recipe,
                            "--size-range", "256..2048", "--default-size", "256", "-q", "--force", *parts], check=True)
    return ref, cand


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="REFERENCE CANDIDATE (without --real)")
    ap.add_argument("--prompts", help="prompt file (default with --real: one short prompt)")
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--ref-recipe", default="bf16")
    ap.add_argument("--cand-recipe", default="q4_k")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gguf_dit_eval_real")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--size")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from dit_step import machine_info

    extra = [*(["--steps", str(a.steps)] if a.steps else []), *(["--size", a.size] if a.size else []),
             *(["--threads", str(a.threads)] if a.threads else [])]
    if a.real:
        a.work.mkdir(parents=True, exist_ok=True)
        ref, cand = real_models(a.work, a.layers, a.ref_recipe, a.cand_recipe)
        prompts = a.prompts or str(a.work / "prompt.txt")
        if not a.prompts:
            Path(prompts).write_text("A red fox in the snow.\n")
        models = [str(ref), str(cand)]
    else:
        if len(a.models) != 2 or not a.prompts:
            ap.error("give REFERENCE CANDIDATE --prompts FILE, or --real")
        models, prompts = a.models, a.prompts
    print(json.dumps({"machine": machine_info(), **run_eval(*models, prompts, extra)}))


if __name__ == "__main__":
    main()
