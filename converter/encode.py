"""Float rows to GGUF storage bytes: one place for every converter (DiTs, text encoder, VAE)."""

from __future__ import annotations

import numpy as np

from gguf_dit.ggml_ops import GGMLType, quantize
from gguf_dit.imatrix import ggml_weights

#: Uniform importance selects ggml's importance-weighted K-quant search (stable-diffusion.cpp's bytes);
#: no importance selects the reference search (llama-quantize's bytes without an imatrix).
WEIGHTED, REFERENCE = "weighted", "reference"
F16_MAX = 65504.0


def encode_rows(x: np.ndarray, t: GGMLType, *, threads: int | None = None, k_quant_path: str = WEIGHTED,
                importance: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 (last axis = row) as ``t``, by its ``TypeTraits.encoder``: F32/F16 via NumPy, BF16 via torch
    (round to nearest even), quantized types via ggml's own ``ggml_quantize_chunk``; ``importance`` (one value per
    column, from an imatrix) is ggml's ``quant_weights`` for the types that take one, else ``k_quant_path`` decides."""
    traits = t.traits
    if traits.encoder == "numpy":
        return x.astype(np.float16) if t is GGMLType.F16 else np.ascontiguousarray(x, dtype=np.float32)
    if traits.encoder == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    x2 = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    return quantize(x2, t, importance=ggml_weights(t, importance, x2.shape[1], weighted=k_quant_path == WEIGHTED), threads=threads)


def check_range(x: np.ndarray, t: GGMLType) -> float | None:
    """The largest magnitude in ``x`` when ``t`` keeps values (or block scales) in F16 and it exceeds F16's range,
    else None.

    F16 would store it as Inf; no real weight comes near, so a value out there is a corrupt or hostile source,
    refused rather than written as Inf (the VAE keeps such a weight F32 instead)."""
    if not t.traits.f16_scales or x.size == 0:
        return None
    m = max(float(x.max()), -float(x.min()))
    return m if m > F16_MAX else None


def stored_nbytes(shape: tuple[int, ...], t: GGMLType) -> int:
    """Bytes of a tensor of PyTorch ``shape`` stored as ``t`` (rows along the last axis)."""
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * t.row_bytes(shape[-1])
