"""VAE decode speed on CPU: today's float32 path against channels-last and bfloat16 variants (issue 14, item 4).

The decoder is ``gguf_dit.runtime.vae_modules.VAEDecoderModule`` at the real FLUX.2 shapes (``VAEConfig()``
defaults: channels 128/256/512/512, 3 ResNets per up block, mid attention, post_quant_conv), random weights (torch's
default init, seeded), with ``conv_out`` rescaled so the float32 output has std ~0.6 and the uint8 image uses the
whole range (otherwise every path would round to mid-grey and look exact). The input is a seeded N(0, 1.6²) latent.

Paths (``--paths``):

* ``fp32``: today's path, ``VAEDecoder.decode_latents`` (float32, contiguous NCHW, ``torch.inference_mode``);
* ``fp32_cl``: the same module and input in ``torch.channels_last``;
* ``bf16_autocast`` / ``bf16_autocast_cl``: float32 weights under ``torch.autocast("cpu", torch.bfloat16)``
  (convs and linears in bf16, GroupNorm in float32), NCHW / channels-last;
* ``bf16`` / ``bf16_cl``: weights and activations in bfloat16 throughout, NCHW / channels-last;
* ``fp32_no_grad``: today's module under ``torch.no_grad`` instead of ``inference_mode``.

Each measurement is one fresh child process doing one decode (model build and import not timed); repetitions are
interleaved across paths (rep 1 of every path, then rep 2 ...) so machine load drifts hit every path alike. Reported
per path: median seconds, ratio to the median of ``fp32`` measured in the same run, the child's peak resident memory
(``VmHWM``, includes the float32 weights built first), and the uint8 image's error against ``fp32``'s image (after
the runtime's ``to_uint8``): max and mean |difference| in 1/255 pixel levels and the share of values that differ.

    .venv/bin/python benchmarks/vae_decode.py                          # 512², 3 reps, all paths
    .venv/bin/python benchmarks/vae_decode.py --sizes 1024 --reps 1

Not a test: it asserts nothing, it measures and prints (JSON lines, then a table).
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

HERE = Path(__file__).resolve()
PATHS = ("fp32", "fp32_cl", "bf16_autocast", "bf16_autocast_cl", "bf16", "bf16_cl", "fp32_no_grad")


def _build(seed: int = 0):
    import torch

    from gguf_dit.arch.vae import VAEConfig
    from gguf_dit.runtime.vae_modules import VAEDecoderModule

    torch.manual_seed(seed)
    cfg = VAEConfig()
    m = VAEDecoderModule(cfg).eval()
    with torch.inference_mode():
        g = torch.Generator().manual_seed(seed + 1)
        y = m(torch.randn(1, cfg.latent_channels, 8, 8, generator=g) * 1.6)
        k = 0.6 / float(y.std())
        m.decoder.conv_out.weight.mul_(k)
        m.decoder.conv_out.bias.mul_(k)
    return m, cfg


def child(path: str, size: int, out_npy: str) -> None:
    import numpy as np
    import torch

    from gguf_dit.runtime.vae import VAEDecoder, to_uint8

    module, cfg = _build()
    g = torch.Generator().manual_seed(7)
    n = size // cfg.scale_factor
    z = torch.randn(1, cfg.latent_channels, n, n, generator=g) * 1.6
    cl = path.endswith("_cl")
    if path.startswith("bf16") and "autocast" not in path:
        module = module.to(torch.bfloat16)
        z = z.to(torch.bfloat16)
    if cl:
        module = module.to(memory_format=torch.channels_last)
        z = z.contiguous(memory_format=torch.channels_last)

    if path == "fp32":
        dec = VAEDecoder(module, cfg, np.zeros(cfg.token_dim), np.ones(cfg.token_dim))
        run = lambda: dec.decode_latents(z)  # noqa: E731
    else:
        ctx = torch.no_grad if path == "fp32_no_grad" else torch.inference_mode

        def run():
            with ctx():
                if "autocast" in path:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        x = module(z)
                else:
                    x = module(z)
                return x.float().clamp(-1.0, 1.0)

    t0 = time.perf_counter()
    x = run()
    dt = time.perf_counter() - t0
    np.save(out_npy, to_uint8(x))
    hwm = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    print(json.dumps({"path": path, "size": size, "seconds": dt, "vmhwm_mib": hwm, "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--child", nargs=3, metavar=("PATH", "SIZE", "NPY"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), a.child[2])
        return

    import numpy as np

    paths = ["fp32"] + [p for p in a.paths if p != "fp32"]
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = " ".join(x for x in line.split() if x.startswith(("avx512", "amx")))
                break
    print(json.dumps({"cpu_flags": flags, "cores": os.cpu_count(), "loadavg": os.getloadavg()}))
    summary = []
    with tempfile.TemporaryDirectory() as td:
        for size in a.sizes:
            res: dict[str, list[dict]] = {p: [] for p in paths}
            for rep in range(a.reps):
                for p in paths:
                    npy = os.path.join(td, f"{p}_{size}_{rep}.npy")
                    r = subprocess.run([sys.executable, str(HERE), "--child", p, str(size), npy], capture_output=True, text=True)
                    if r.returncode:
                        print(json.dumps({"path": p, "size": size, "error": r.stderr.strip().splitlines()[-1:]}))
                        continue
                    rec = json.loads(r.stdout.strip().splitlines()[-1])
                    ref = np.load(os.path.join(td, f"fp32_{size}_0.npy")).astype(np.int16)
                    d = np.abs(np.load(npy).astype(np.int16) - ref)
                    rec.update(rep=rep, max_err_levels=int(d.max()), mean_err_levels=float(d.mean()), frac_differ=float((d > 0).mean()),
                               loadavg=os.getloadavg()[0])
                    print(json.dumps(rec), flush=True)
                    res[p].append(rec)
            base = statistics.median(r["seconds"] for r in res["fp32"])
            for p in paths:
                if not res[p]:
                    continue
                med = statistics.median(r["seconds"] for r in res[p])
                summary.append((size, p, len(res[p]), med, med / base, max(r["vmhwm_mib"] for r in res[p]),
                                max(r["max_err_levels"] for r in res[p]), statistics.median(r["mean_err_levels"] for r in res[p]),
                                statistics.median(r["frac_differ"] for r in res[p])))
    print("\n| size | path | reps | median s | × today (fp32) | peak RSS MiB | max err /255 | mean err /255 | values differing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, p, n, med, ratio, hwm, mx, mean, frac in summary:
        print(f"| {s}² | {p} | {n} | {med:.2f} | {ratio:.2f} | {hwm:.0f} | {mx} | {mean:.3f} | {100 * frac:.1f}% |")


if __name__ == "__main__":
    main()
