"""Write a tiny random Ideogram 4 checkpoint in the official Hugging Face layout.

Real weights cannot be downloaded everywhere; this gives the converter (and a first-time user)
something genuine to chew on: the official FP8 format, official names, real head_dim and RoPE
sections, with every other size shrunk. Not a model that draws anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gguf_dit.arch import BACKBONE_DIRS, Ideogram4Config, tensor_inventory
from gguf_dit.errors import OutputError

TINY = Ideogram4Config(emb_dim=512, num_layers=2, num_heads=2, intermediate_size=768, adaln_dim=256, in_channels=128, llm_features_dim=13 * 32)


def write_tiny_checkpoint(root: str | Path, *, cfg: Ideogram4Config = TINY, seed: int = 0, fp8: bool = True, force: bool = False) -> Path:
    import torch
    from safetensors.torch import save_file

    root = Path(root)
    if root.exists() and any(root.iterdir()) and not force:
        raise OutputError("already exists and is not empty (use --force)", path=root)
    for i, sub in enumerate(BACKBONE_DIRS):
        g = torch.Generator().manual_seed(seed + i)
        sd = {}
        for spec in tensor_inventory(cfg):
            if spec.kind == "linear":
                w = torch.randn(spec.shape, generator=g) / np.sqrt(spec.in_features)
                if fp8:
                    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 448.0
                    sd[spec.name] = (w / scale[:, None]).to(torch.float8_e4m3fn)
                    sd[spec.name + "_scale"] = scale.float()
                else:
                    sd[spec.name] = w.to(torch.bfloat16)
            elif spec.kind == "norm":
                sd[spec.name] = (1 + 0.2 * torch.randn(spec.shape, generator=g)).to(torch.bfloat16)
            else:
                sd[spec.name] = (0.1 * torch.randn(spec.shape, generator=g)).to(torch.bfloat16)
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(d / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        config = {
            "_class_name": "Ideogram4Transformer2DModel",
            "in_channels": cfg.in_channels,
            "num_layers": cfg.num_layers,
            "attention_head_dim": cfg.head_dim,
            "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size,
            "adaln_dim": cfg.adaln_dim,
            "llm_features_dim": cfg.llm_features_dim,
            "rope_theta": int(cfg.rope_theta),
            "mrope_section": list(cfg.mrope_section),
            "norm_eps": cfg.norm_eps,
        }
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return root
