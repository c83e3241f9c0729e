"""Float rows to GGUF storage bytes: one place for every converter (DiT, text encoder)."""

from __future__ import annotations

import numpy as np

from gguf_dit.ggml_ops import GGMLType, quantize

K_QUANTS = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
#: Uniform importance selects ggml's importance-weighted K-quant search (stable-diffusion.cpp's bytes);
#: no importance selects the reference search (llama-quantize's bytes without an imatrix).
WEIGHTED, REFERENCE = "weighted", "reference"


def encode_rows(x: np.ndarray, t: GGMLType, *, threads: int | None = None, k_quant_path: str = WEIGHTED) -> np.ndarray:
    """Rows of float32 (last axis = row) as ``t``: F32/F16 via NumPy, BF16 via torch (round to nearest
    even), quantized types via ggml's own ``ggml_quantize_chunk``."""
    if t is GGMLType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if t is GGMLType.F16:
        return x.astype(np.float16)
    if t is GGMLType.BF16:
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    x2 = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    imp = np.ones(x2.shape[1], dtype=np.float32) if t in K_QUANTS and k_quant_path == WEIGHTED else None
    return quantize(x2, t, importance=imp, threads=threads)


F16_MAX = 65504.0


def check_range(x: np.ndarray, t: GGMLType) -> float | None:
    """The largest magnitude in ``x`` when ``t`` is F16 or a quantized type and it exceeds F16's range, else None.

    F16 would store it as Inf, and the quantized types keep their block scales in F16; no real weight comes near, so a
    value out there is a corrupt or hostile source, refused rather than written as Inf."""
    if t in (GGMLType.F32, GGMLType.BF16) or x.size == 0:
        return None
    m = max(float(x.max()), -float(x.min()))
    return m if m > F16_MAX else None


def stored_nbytes(shape: tuple[int, ...], t: GGMLType) -> int:
    """Bytes of a tensor of PyTorch ``shape`` stored as ``t`` (rows along the last axis)."""
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * t.row_bytes(shape[-1])
