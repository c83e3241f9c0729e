"""`calibrate`'s time and peak memory on real-shaped random weights: full-width blocks (hidden 4608, 18 heads,
intermediate 12288, text features 53248, adaLN 512), a BF16 conversion of both backbones, random text features in
place of the encoder (a real-width encoder is the 8B Qwen3-VL). The measurement runs in a child process, which
reports its own VmHWM; the CPU, its flags and the load average are printed with the result.

    python benchmarks/calibrate_real.py --workdir /tmp/calib-real --layers 1 --size 256 --steps 2 --states 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child(a) -> None:
    import numpy as np

    from gguf_dit.runtime.calibrate import calibrate
    from gguf_dit.runtime.caption import prompt_from_string
    from gguf_dit.runtime.model_files import ModelFiles

    gguf = a.workdir / "gguf"
    files = ModelFiles(gguf / "transformer.gguf", gguf / "unconditional_transformer.gguf", gguf / "text_encoder.gguf", gguf / "vae.gguf")
    feats = [np.random.default_rng(0).standard_normal((a.text_tokens, 53248)).astype(np.float32)]
    t0 = time.perf_counter()
    cal = calibrate(files, [prompt_from_string("random features")], steps=a.steps, size=(a.size, a.size), states=a.states, refine=a.refine,
                    threads=a.threads, features=feats)
    wall = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"wall_s": wall, "vmhwm_mib": hwm, "timings": cal.report["timings"], "forwards": cal.report["forwards"],
                      "fragility": cal.report["fragility"], "groups": cal.report["groups"]}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--states", type=int, default=2)
    p.add_argument("--refine", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", action="store_true")
    a = p.parse_args()
    if a.child:
        return child(a)
    ckpt, gguf = a.workdir / "ckpt", a.workdir / "gguf"
    if not (gguf / "unconditional_transformer.gguf").exists():
        import torch
        from diffusers import Ideogram4Transformer2DModel

        from gguf_dit.arch.dit import BACKBONE_DIRS, Ideogram4Config
        from gguf_dit.converter.tiny import dit_config, save_folder

        config = dit_config(Ideogram4Config(emb_dim=4608, num_layers=a.layers, num_heads=18, intermediate_size=12288, adaln_dim=512, llm_features_dim=53248))
        for i, sub in enumerate(BACKBONE_DIRS):
            torch.manual_seed(i)
            m = Ideogram4Transformer2DModel.from_config(config)
            with torch.no_grad():
                for n, prm in m.named_parameters():
                    prm.copy_(torch.randn_like(prm) * (prm.shape[-1] ** -0.5 if prm.ndim == 2 else 0.1) + (1.0 if "norm" in n else 0.0))
            save_folder(ckpt / sub, {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}, config)
            del m
        subprocess.run([sys.executable, "-c", "from gguf_dit.cli import app; app()", "convert", str(ckpt), "-o", str(gguf), "--recipe", "bf16",
                        "--parts", "dit", "-q", "--force"], check=True)
    from gguf_dit.ggml_ops import system

    load = os.getloadavg()
    out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res.update(cpu=system.cpu_model(), cpus=os.cpu_count(), load_before=load, load_after=os.getloadavg(),
               config={k: getattr(a, k) for k in ("layers", "size", "steps", "states", "refine", "text_tokens", "threads")})
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
