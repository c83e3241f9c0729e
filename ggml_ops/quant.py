"""Quantize and dequantize through ggml itself, so the bytes are llama.cpp's by construction."""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gguf_dit.errors import GGMLError

from ._lib import TO_FLOAT, lib
from .system import check_cpu
from .threads import default_threads
from .types import GGMLType, check_row

_inited: set[int] = set()


def quantize(x: np.ndarray, qtype: GGMLType, *, importance: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """Quantize a 2-D float32 array (rows of ``n_per_row``) to ``qtype``; returns uint8 [rows, row_bytes].

    ``importance`` (one weight per column) selects ggml's importance-weighted path for K-quants; ``None``
    selects the reference path. Rows are split across threads: ctypes releases the GIL during the call,
    and each row's bytes depend only on that row, so the output equals a single-threaded call.
    """
    check_cpu()
    qtype = GGMLType(qtype)
    if x.ndim != 2:
        raise GGMLError(f"quantize expects a 2-D array, got shape {x.shape}")
    rows, n = x.shape
    check_row(qtype, n)
    if not qtype.traits.quantized:
        raise GGMLError(f"{qtype.name} is not a quantized type; convert floats directly")
    if lib.ggml_quantize_requires_imatrix(int(qtype)) and importance is None:
        raise GGMLError(f"{qtype.name} requires an importance matrix")
    src = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(src).all():
        raise GGMLError("refusing to quantize non-finite values")
    imat_p = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (n,):
            raise GGMLError(f"importance vector must have shape ({n},), got {importance.shape}")
        imat_p = importance.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if int(qtype) not in _inited:
        lib.ggml_quantize_init(int(qtype))
        _inited.add(int(qtype))
    row_bytes = qtype.row_bytes(n)
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    src_p = src.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    dst_p = out.ctypes.data

    threads = max(1, min(threads or default_threads(), rows))
    bounds = np.linspace(0, rows, threads + 1).astype(np.int64)

    def run(i: int) -> int:
        r0, r1 = int(bounds[i]), int(bounds[i + 1])
        if r1 <= r0:
            return 0
        # start is an element index; ggml derives the destination row offset from it.
        return int(lib.ggml_quantize_chunk(int(qtype), src_p, dst_p, r0 * n, r1 - r0, n, imat_p))

    if threads == 1:
        written = run(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            written = sum(pool.map(run, range(threads)))
    if written != out.nbytes:
        raise GGMLError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def dequantize(data: np.ndarray, qtype: GGMLType, n_per_row: int) -> np.ndarray:
    """Decode rows of ``qtype`` bytes with ggml's own ``to_float`` (type traits); returns float32 [rows, n]."""
    check_cpu()
    qtype = GGMLType(qtype)
    check_row(qtype, n_per_row)
    raw = np.ascontiguousarray(data).view(np.uint8)
    row_bytes = qtype.row_bytes(n_per_row)
    if raw.size % row_bytes:
        raise GGMLError(f"{raw.size} bytes is not a whole number of {qtype.name} rows of {n_per_row}")
    rows = raw.size // row_bytes
    out = np.empty((rows, n_per_row), dtype=np.float32)
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    if not traits.to_float:
        raise GGMLError(f"ggml has no to_float for {qtype.name}")
    to_float = TO_FLOAT(traits.to_float)
    to_float(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * n_per_row)
    return out
