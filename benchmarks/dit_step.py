"""Per-step DiT time and peak memory: gguf-dit's ggml runtime vs diffusers float32 and bfloat16, same weights and shapes.

One "step" = the conditional backbone on (text + image) tokens plus the unconditional backbone on the
image tokens, as the sampler runs them. Each variant runs in its own subprocess and reports its own peak
RSS: ``VmHWM`` from its ``/proc/self/status`` (the high-water mark of its own address space, which exec
starts afresh), not ``ru_maxrss``, which Linux carries over from the parent across fork and exec (see
benchmarks/convert_block.py). Ratios are against diffusers float32 and bfloat16 (what a user of a bf16-capable
CPU or of a GPU runs) measured in the same run. Every result carries the machine it ran on: the CPU model and
its ISA flags, the features the ggml CPU backend was built with, torch's CPU capability, the GPU if any.

    python benchmarks/dit_step.py                      # mid-size config of issue 3
    python benchmarks/dit_step.py --layers 2 --image-tokens 256 --reps 2   # quick look
    python benchmarks/dit_step.py --backend cuda --heads 18 --intermediate 12288 --layers 2 --image-tokens 4096 \
        --grid-h 64 --baselines bf16 --out results.json    # full width on a GPU (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise SystemExit("no VmHWM in /proc/self/status (Linux only)")


def machine_info(backend: str = "cpu") -> dict:
    """What decides the speed of each side: CPU model and flags (as lscpu reads /proc/cpuinfo), the ggml CPU
    backend's build features, torch's CPU kernel level, and the GPU for a CUDA run."""
    import torch

    from gguf_dit.ggml_ops import system
    from gguf_dit.sysinfo import INTERESTING_FLAGS

    flags = system.cpu_flags()
    cpu_reg = next((r for r in system.registries() if r.name == "CPU"), None)
    info = {"cpu_model": system.cpu_model(), "cpus": os.cpu_count(),
            "cpu_flags": [f for f in INTERESTING_FLAGS if f in flags],
            "amx": any(f.startswith("amx") for f in flags),
            "ggml_cpu_features": {k: v for k, v in (cpu_reg.features if cpu_reg else {}).items()},
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if backend == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _inputs(a):
    import numpy as np

    rng = np.random.default_rng(0)
    grid = (a.grid_h, a.image_tokens // a.grid_h)
    x = rng.standard_normal((grid[0] * grid[1], 128)).astype(np.float32)
    feats = rng.standard_normal((a.text_tokens, a.text_dim)).astype(np.float32)
    return grid, x, feats


def worker_diffusers(a) -> dict:
    import torch
    from diffusers import Ideogram4Transformer2DModel

    torch.set_num_threads(a.threads)
    from gguf_dit.runtime.dit import positions

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    dev = torch.device("cuda" if a.backend == "cuda" else "cpu")
    models = [Ideogram4Transformer2DModel.from_pretrained(a.ckpt, subfolder=s, torch_dtype=dtype).to(dev).eval() for s in ("transformer", "unconditional_transformer")]
    weight_bytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    grid, x, feats = _inputs(a)
    n_img, n_text = x.shape[0], feats.shape[0]

    def call(m, with_text):
        nt = n_text if with_text else 0
        L = nt + n_img
        hs = torch.zeros(1, L, 128)
        hs[0, nt:] = torch.from_numpy(x)
        enc = torch.zeros(1, L, a.text_dim)
        if nt:
            enc[0, :nt] = torch.from_numpy(feats)
        ind = torch.full((1, L), 2, dtype=torch.long)
        ind[0, :nt] = 3
        # inputs in the model's dtype, as a bf16 user's pipeline feeds them
        return m(hidden_states=hs.to(dev, dtype), timestep=torch.tensor([0.5], device=dev, dtype=dtype), encoder_hidden_states=enc.to(dev, dtype),
                 position_ids=torch.from_numpy(positions(nt, *grid))[None].to(dev), segment_ids=torch.ones(1, L, dtype=torch.long, device=dev),
                 indicator=ind.to(dev)).sample.float().cpu()  # to host, as gguf-dit's velocity() returns numpy: both sides synchronised

    times = []
    with torch.no_grad():
        for r in range(a.reps + 1):
            t0 = time.perf_counter()
            call(models[0], True)
            call(models[1], False)
            if r:
                times.append(time.perf_counter() - t0)
    res = {"step_s": statistics.median(times), "step_s_min": min(times), "step_s_all": times, "weight_bytes": weight_bytes,
           "peak_rss_mib": _rss_mib(), "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"torch CPU ({torch.backends.cpu.get_cpu_capability()})"}
    if dev.type == "cuda":
        res["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def worker_ours(a) -> dict:
    from gguf_dit.runtime.dit import Ideogram4DiT, RuntimeOptions

    opts = RuntimeOptions(q8_0_matmul=a.q8_0_matmul)
    d = Path(a.gguf)
    cond = Ideogram4DiT.load(d / "transformer.gguf", a.backend, threads=a.threads, options=opts)
    uncond = Ideogram4DiT.load(d / "unconditional_transformer.gguf", a.backend, threads=a.threads, options=opts)
    weight_bytes = cond.weights.nbytes + uncond.weights.nbytes
    grid, x, feats = _inputs(a)
    times = []
    for r in range(a.reps + 1):
        t0 = time.perf_counter()
        cond.velocity(x, 0.5, feats, grid=grid)
        uncond.velocity(x, 0.5, None, grid=grid)
        if r:
            times.append(time.perf_counter() - t0)
    compute = sum(g.compute_bytes for m in (cond, uncond) for g in m._graphs.values())
    return {"step_s": statistics.median(times), "step_s_min": min(times), "step_s_all": times, "weight_bytes": weight_bytes, "compute_buffer_bytes": compute, "peak_rss_mib": _rss_mib(), "device": cond.backend.description}


def _spawn(a, kind: str, **extra) -> dict:
    args = [sys.executable, __file__, "--worker", kind, "--ckpt", str(a.ckpt)] + sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in extra.items()), [])
    for k in ("layers", "heads", "intermediate", "text_dim", "image_tokens", "grid_h", "text_tokens", "reps", "threads", "backend"):
        args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["diffusers", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--q8-0-matmul", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=9, help="hidden = heads x 256")
    p.add_argument("--intermediate", type=int, default=6144)
    p.add_argument("--text-dim", type=int, default=53248)
    p.add_argument("--image-tokens", type=int, default=1024)
    p.add_argument("--grid-h", type=int, default=32)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--backend", default="cpu", help="ggml backend for gguf-dit; 'cuda' also runs diffusers on the GPU")
    p.add_argument("--recipes", default="f16,q8_0,q4_k")
    p.add_argument("--baselines", default="fp32,bf16", help="diffusers dtypes to measure (comma-separated: fp32, bf16)")
    p.add_argument("--q8-variants", action=argparse.BooleanOptionalAction, default=None,
                   help="also time Q8_0 with the direct kernel and dequantized in graph (default: on CPU only)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write config, machine and rows as JSON here")
    a = p.parse_args()

    if a.worker:
        res = worker_diffusers(a) if a.worker == "diffusers" else worker_ours(a)
        print(json.dumps(res))
        return

    work = a.workdir or Path(tempfile.mkdtemp(prefix="gguf-dit-bench-"))
    a.ckpt = work / "ckpt"
    if not (a.ckpt / "transformer").exists():
        import torch
        from diffusers import Ideogram4Transformer2DModel

        from gguf_dit.arch.dit import BACKBONE_DIRS, HEAD_DIM, Ideogram4Config
        from gguf_dit.converter.tiny import dit_config, save_folder

        # diffusers layout in float32, which the diffusers worker loads as it is
        config = dit_config(Ideogram4Config(emb_dim=a.heads * HEAD_DIM, num_layers=a.layers, num_heads=a.heads, intermediate_size=a.intermediate,
                                            adaln_dim=512, llm_features_dim=a.text_dim))
        for i, sub in enumerate(BACKBONE_DIRS):
            torch.manual_seed(i)
            m = Ideogram4Transformer2DModel.from_config(config)
            with torch.no_grad():
                for n, prm in m.named_parameters():  # default init leaves many zeros; fill all
                    prm.copy_(torch.randn_like(prm) * (prm.shape[-1] ** -0.5 if prm.ndim == 2 else 0.1) + (1.0 if "norm" in n else 0.0))
            save_folder(a.ckpt / sub, m.state_dict(), config)
    ggufs = {}
    for r in a.recipes.split(","):
        out = work / f"gguf-{r}"
        if not (out / "transformer.gguf").exists():
            # torch before ggml: on the H200 image a fresh `gguf-dit convert` (ggml's CUDA build loaded first, torch
            # after it) aborted with "free(): invalid pointer", while conversions inside pytest, torch already
            # loaded, did not (docs/benchmarks.md, "GPU"). The converter imports torch either way.
            subprocess.run([sys.executable, "-c", "import torch; from gguf_dit.cli import app; app()", "convert", str(a.ckpt), "-o", str(out), "--recipe", r, "-q", "--force"], check=True)
        ggufs[r] = out

    config = {k: getattr(a, k) for k in ("layers", "heads", "intermediate", "text_dim", "image_tokens", "grid_h", "text_tokens", "reps", "threads", "backend")}
    config["hidden"] = a.heads * 256
    machine = machine_info(a.backend)
    print(f"config: hidden {a.heads * 256} ({a.heads} heads x 256), {a.layers} blocks, intermediate {a.intermediate}, "
          f"text dim {a.text_dim}; {a.image_tokens} image + {a.text_tokens} text tokens; threads {a.threads}; reps {a.reps} (median; min in JSON)")
    print(f"machine: {machine['cpu_model']}, {machine['cpus']} CPUs; flags {' '.join(machine['cpu_flags'])}; AMX {'yes' if machine['amx'] else 'no'}; "
          f"ggml CPU features {' '.join(f'{k}={v}' for k, v in machine['ggml_cpu_features'].items())}; torch {machine['torch']} ({machine['torch_cpu_capability']})"
          + (f"; GPU {machine['gpu']}" if "gpu" in machine else ""))
    baselines = [b for b in a.baselines.split(",") if b]
    q8_variants = a.backend == "cpu" if a.q8_variants is None else a.q8_variants
    rows: list = []
    result = {"config": config, "machine": machine, "rows": rows}

    def add(name: str, res: dict) -> None:
        """One measured variant: tagged with the machine, kept in the results file at once (a time-boxed run that is
        cut short, as benchmarks/gpu_check.sh's, still leaves the rows it finished)."""
        res["machine"] = machine
        rows.append((name, res))
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    for b in baselines:
        add(f"diffusers {b}", _spawn(a, "diffusers", dtype=b))
    for r, d in ggufs.items():
        add(f"gguf-dit {r}", _spawn(a, "ours", gguf=d))
        if r == "q8_0" and q8_variants:
            add("gguf-dit q8_0 direct kernel", _spawn(a, "ours", gguf=d, q8_0_matmul="direct"))
            add("gguf-dit q8_0 dequant in graph", _spawn(a, "ours", gguf=d, q8_0_matmul="dequant"))
    bases = dict(rows[:len(baselines)])
    print(f"{'variant':<32} {'step s':>8}" + "".join(f" {'vs ' + n.split()[1]:>9}" for n in bases) + f" {'weights MiB':>12} {'peak RSS MiB':>13}")
    for name, res in rows:
        res["speedup_vs"] = {n.split()[1]: b["step_s"] / res["step_s"] for n, b in bases.items()}
        print(f"{name:<32} {res['step_s']:>8.3f}" + "".join(f" {v:>8.2f}x" for v in res["speedup_vs"].values())
              + f" {res['weight_bytes'] / 2**20:>12.1f} {res['peak_rss_mib']:>13.1f}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {a.out}")
    print(json.dumps(result, default=str))

if __name__ == "__main__":
    main()
