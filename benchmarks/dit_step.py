"""Per-step DiT time and peak memory: gguf-dit's ggml runtime vs diffusers float32, same weights and shapes.

One "step" = the conditional backbone on (text + image) tokens plus the unconditional backbone on the
image tokens, as the sampler runs them. Each variant runs in its own subprocess and reports its own peak
RSS: ``VmHWM`` from its ``/proc/self/status`` (the high-water mark of its own address space, which exec
starts afresh), not ``ru_maxrss``, which Linux carries over from the parent across fork and exec (see
benchmarks/convert_block.py). Ratios are against diffusers float32 measured in the same run.

    python benchmarks/dit_step.py                      # mid-size config of issue 3
    python benchmarks/dit_step.py --layers 2 --image-tokens 256 --reps 2   # quick look
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


def _rss_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise SystemExit("no VmHWM in /proc/self/status (Linux only)")


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

    models = [Ideogram4Transformer2DModel.from_pretrained(a.ckpt, subfolder=s, torch_dtype=torch.float32).eval() for s in ("transformer", "unconditional_transformer")]
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
        return m(hidden_states=hs, timestep=torch.tensor([0.5]), encoder_hidden_states=enc,
                 position_ids=torch.from_numpy(positions(nt, *grid))[None], segment_ids=torch.ones(1, L, dtype=torch.long), indicator=ind).sample

    times = []
    with torch.no_grad():
        for r in range(a.reps + 1):
            t0 = time.perf_counter()
            call(models[0], True)
            call(models[1], False)
            if r:
                times.append(time.perf_counter() - t0)
    return {"step_s": min(times), "weight_bytes": weight_bytes, "peak_rss_mib": _rss_mib()}


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
    return {"step_s": min(times), "weight_bytes": weight_bytes, "compute_buffer_bytes": compute, "peak_rss_mib": _rss_mib(), "device": cond.backend.description}


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
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=9, help="hidden = heads x 256")
    p.add_argument("--intermediate", type=int, default=6144)
    p.add_argument("--text-dim", type=int, default=53248)
    p.add_argument("--image-tokens", type=int, default=1024)
    p.add_argument("--grid-h", type=int, default=32)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--recipes", default="f16,q8_0,q4_k")
    p.add_argument("--workdir", type=Path, default=None)
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
            subprocess.run([sys.executable, "-c", "from gguf_dit.cli import app; app()", "convert", str(a.ckpt), "-o", str(out), "--recipe", r, "-q", "--force"], check=True)
        ggufs[r] = out

    print(f"config: hidden {a.heads * 256} ({a.heads} heads x 256), {a.layers} blocks, intermediate {a.intermediate}, "
          f"text dim {a.text_dim}; {a.image_tokens} image + {a.text_tokens} text tokens; threads {a.threads}; reps {a.reps} (min)")
    base = _spawn(a, "diffusers")
    rows = [("diffusers fp32", base)]
    for r, d in ggufs.items():
        rows.append((f"gguf-dit {r}", _spawn(a, "ours", gguf=d)))
        if r == "q8_0":
            rows.append(("gguf-dit q8_0 direct kernel", _spawn(a, "ours", gguf=d, q8_0_matmul="direct")))
            rows.append(("gguf-dit q8_0 dequant in graph", _spawn(a, "ours", gguf=d, q8_0_matmul="dequant")))
    print(f"{'variant':<32} {'step s':>8} {'speed-up':>9} {'weights MiB':>12} {'w ratio':>8} {'peak RSS MiB':>13} {'RSS ratio':>10}")
    for name, res in rows:
        print(f"{name:<32} {res['step_s']:>8.3f} {base['step_s'] / res['step_s']:>8.2f}x {res['weight_bytes'] / 2**20:>12.1f} "
              f"{res['weight_bytes'] / base['weight_bytes']:>8.3f} {res['peak_rss_mib']:>13.1f} {res['peak_rss_mib'] / base['peak_rss_mib']:>10.3f}")
    print(json.dumps({"rows": rows}, default=str))


if __name__ == "__main__":
    main()
