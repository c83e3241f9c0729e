"""`gguf-dit inspect --check` peak memory: the runtime's chunked scan against decoding from the memory map.

Writes (once) a random backbone the way stable-diffusion.cpp would store it (no KV; linears Q8_0, everything else
BF16): 4 blocks of emb_dim 2304 (9 heads), intermediate 6144, adaLN 512, 4096 LLM features, about 310 MiB. Then
runs each case in its own child process and reports the child's ``VmHWM`` (read by the child itself at exit;
``ru_maxrss`` would carry the parent's peak, see benchmarks/convert_block.py):

* ``open``: BackboneFile only (header, config, checks; no tensor data read);
* ``inspect``: the CLI in-process without ``--check``;
* ``memmap decode``: what ``--check`` did before issue 10: every tensor decoded to float32 from the
  ``np.memmap`` (every page touched stays resident, plus the largest tensor in float32);
* ``inspect --check``: the CLI as it is now (plain reads of 4 MiB, exponent bits / block scales scanned).

Usage::

    .venv/bin/python benchmarks/inspect_memory.py [FILE]   # default /tmp/gguf-dit-inspect-bench.gguf
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

D, LAYERS, I, A, C, F, HD = 2304, 4, 6144, 512, 128, 4096, 256


def inventory() -> list[tuple[str, tuple[int, ...]]]:
    t = [("input_proj.weight", (D, C)), ("input_proj.bias", (D,)), ("llm_cond_norm.weight", (F,)), ("llm_cond_proj.weight", (D, F)),
         ("llm_cond_proj.bias", (D,)), ("t_embedding.mlp_in.weight", (D, D)), ("t_embedding.mlp_in.bias", (D,)),
         ("t_embedding.mlp_out.weight", (D, D)), ("t_embedding.mlp_out.bias", (D,)), ("adaln_proj.weight", (A, D)), ("adaln_proj.bias", (A,)),
         ("embed_image_indicator.weight", (2, D)), ("final_layer.linear.weight", (C, D)), ("final_layer.linear.bias", (C,)),
         ("final_layer.adaln_modulation.weight", (D, A)), ("final_layer.adaln_modulation.bias", (D,))]
    for n in range(LAYERS):
        p = f"layers.{n}."
        t += [(p + "attention.qkv.weight", (3 * D, D)), (p + "attention.norm_q.weight", (HD,)), (p + "attention.norm_k.weight", (HD,)),
              (p + "attention.o.weight", (D, D)), (p + "feed_forward.w1.weight", (I, D)), (p + "feed_forward.w2.weight", (D, I)),
              (p + "feed_forward.w3.weight", (I, D)), (p + "attention_norm1.weight", (D,)), (p + "attention_norm2.weight", (D,)),
              (p + "ffn_norm1.weight", (D,)), (p + "ffn_norm2.weight", (D,)), (p + "adaln_modulation.weight", (4 * D, A)),
              (p + "adaln_modulation.bias", (4 * D,))]
    return t


def write(path: Path) -> None:
    """Streamed tensor by tensor, so this process never holds the file."""
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "ideogram4")
    w.kv_data[0].clear()  # gguf_init_empty, as stable-diffusion.cpp
    plan = [(n, s, Q.Q8_0 if len(s) == 2 and not n.startswith("embed") else Q.BF16) for n, s in inventory()]
    for name, shape, typ in plan:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, typ)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=typ)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, typ in plan:
        w.write_tensor_data(gguf.quants.quantize(rng.standard_normal(shape, dtype=np.float32) * 0.02, typ))
    w.close()


PEAK = "import re; print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
CASES = {
    "open": "from gguf_dit.runtime.backbone_file import BackboneFile; BackboneFile(P, strict=False)",
    "inspect": "from gguf_dit.cli import app; app(['inspect', P], standalone_mode=False)",
    "memmap decode (before)": (
        "import numpy as np; from gguf_dit.ggml_ops import GGMLType, dequantize; from gguf_dit.runtime.backbone_file import BackboneFile\n"
        "f = BackboneFile(P, strict=False)\n"
        "for t in f.tensors.values():\n"
        "    a = np.asarray(t.data, np.float32).reshape(t.shape) if t.type is GGMLType.F32 else dequantize(np.asarray(t.data), t.type, t.shape[-1])\n"
        "    assert np.isfinite(a).all()"
    ),
    "inspect --check (now)": "from gguf_dit.cli import app; app(['inspect', P, '--check'], standalone_mode=False)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", type=Path, default=Path("/tmp/gguf-dit-inspect-bench.gguf"), help="the backbone GGUF (written once if missing)")
    path = ap.parse_args().file
    if not path.exists():
        write(path)
    print(f"{path}: {path.stat().st_size / 2**20:.0f} MiB")
    peaks = {}
    for label, code in CASES.items():
        r = subprocess.run([sys.executable, "-c", f"P = {str(path)!r}\n{code}\n{PEAK}"], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{label} failed:\n{r.stderr[-2000:]}")
        peaks[label] = int(r.stdout.split()[-1]) / 1024
        print(f"{label:24s} VmHWM {peaks[label]:6.0f} MiB")
    print(f"inspect --check now / before: {peaks['inspect --check (now)'] / peaks['memmap decode (before)']:.2f}x the peak memory")


if __name__ == "__main__":
    main()
