"""Emulate what ggml's CPU matmul does to activations, to explain quantized-model error exactly.

For a quantized weight the CPU backend first converts the F32 activations to the weight type's
``vec_dot_type`` (Q8_0 for Q8_0, Q8_K for K-quants, F16 for F16) and then runs integer/half dot
products (gguf-and-ggml.md §7). Rounding activations with ggml's own ``from_float`` and multiplying
by the dequantized weight in float reproduces ggml's result up to float summation order; so a
runtime whose output matches this emulation has no error beyond activation quantization.
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np

from gguf_dit.ggml_ops import GGMLType
from gguf_dit.ggml_ops._lib import lib


class _TraitsCPU(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


_get = lib.cpu.ggml_get_type_traits_cpu
_get.restype = ctypes.POINTER(_TraitsCPU)
_get.argtypes = [ctypes.c_int]
_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def vec_dot_type(weight_type: GGMLType) -> GGMLType:
    return GGMLType(_get(int(weight_type)).contents.vec_dot_type)


def _decode_q8_k(raw: np.ndarray, n: int) -> np.ndarray:
    # block_q8_K: float d; int8 qs[256]; int16 bsums[16]  -> 292 bytes
    blocks = raw.reshape(-1, 292)
    d = blocks[:, :4].copy().view(np.float32)
    q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(-1, n)


def roundtrip(x: np.ndarray, weight_type: GGMLType) -> np.ndarray:
    """Activations (rows, K) as ggml's CPU kernel sees them for a weight of ``weight_type``."""
    vdt = vec_dot_type(weight_type)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if vdt is GGMLType.F32:
        return x
    if vdt is GGMLType.F16:
        return x.astype(np.float16).astype(np.float32)
    rows, n = x.reshape(-1, x.shape[-1]).shape
    out = np.zeros(rows * int(lib.ggml_row_size(int(vdt), n)), dtype=np.uint8)
    _FROM_FLOAT(_get(int(vdt)).contents.from_float)(x.ctypes.data, out.ctypes.data, rows * n)
    if vdt is GGMLType.BF16:  # the top 16 bits of a float32
        return (out.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(x.shape)
    if vdt is GGMLType.Q8_K:
        return _decode_q8_k(out, n).reshape(x.shape)
    return gguf.quants.dequantize(out.reshape(rows, -1), gguf.GGMLQuantizationType(int(vdt))).reshape(x.shape)
