"""A float checkpoint root (official names, F32 safetensors, diffusers config.json) from a folder's two backbone GGUFs.

Quantized tensors are dequantized with gguf-py; the config comes from the GGUF metadata. Used to measure on the
embedded demo model while no float demo checkpoint exists (docs/quantization.md#activation-smoothing): its weights
stay on the grid they were quantized to.

    python scripts/gguf_to_checkpoint.py runtime/demo_model ck
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from gguf_dit import keys

CONFIG = {"in_channels": "in_channels", "num_layers": "num_layers", "attention_head_dim": "head_dim", "num_attention_heads": "num_heads",
          "intermediate_size": "intermediate_size", "adaln_dim": "adaln_dim", "llm_features_dim": "llm_features_dim",
          "rope_theta": "rope_theta", "mrope_section": "mrope_section", "norm_eps": "norm_eps"}


def main(src: Path, dst: Path) -> None:
    for name in ("transformer", "unconditional_transformer"):
        r = gguf.GGUFReader(src / f"{name}.gguf")
        cfg = {"_class_name": "Ideogram4Transformer2DModel"}
        for k, ours in CONFIG.items():
            v = r.fields[keys.dit(ours)].contents()
            cfg[k] = [int(x) for x in v] if isinstance(v, list) else v
        sd = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(x) for x in reversed(t.shape)]).copy())
              for t in r.tensors}
        (dst / name).mkdir(parents=True)
        (dst / name / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        save_file(sd, str(dst / name / "diffusion_pytorch_model.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
