"""A GGUF file as the runtime reads it: the validated header (``gguf_dit.gguf_header``: typed metadata through
``header.value``, the tensor table) and each tensor's stored bytes at the offsets that header validated.

gguf-py's reader is not used: it trusts the counts and lengths it reads. The data is memory-mapped from the very
descriptor the header was read from; the bulk readers (``read_bytes``, ``f32_chunks``, ``nonfinite``) use plain
reads instead, so memory grows by what is read, not by every page of the map that was touched."""

from __future__ import annotations

import dataclasses
import math
import mmap
from pathlib import Path
from typing import Iterator

import numpy as np

from gguf_dit.errors import ModelError
from gguf_dit.files import open_regular
from gguf_dit.ggml_ops import STORAGE_TYPES, GGMLType, dequantize
from gguf_dit.gguf_header import GGUFHeader, parse_header


@dataclasses.dataclass
class FileTensor:
    name: str
    type: GGMLType | None  # None: a GGUF type ggml_ops does not know (I32, F64, ...), named by type_name
    shape: tuple[int, ...]  # PyTorch order
    data: np.ndarray  # the stored elements (F32, F16) or bytes (other types), memory-mapped, flat
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    type_name: str

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


_ELEMENTS = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}


class GGUFFile:
    """``header`` (typed metadata, ``header.value``) and ``tensors`` (name -> FileTensor, in file order)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        f, size = open_regular(self.path, ModelError)
        with f:
            self.header: GGUFHeader = parse_header(f, size, self.path)
            raw = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        self.tensors: dict[str, FileTensor] = {}
        for t in self.header.tensors.values():
            try:
                gt = GGMLType(int(t.type))
            except ValueError:  # a GGUF type with no place in these models (I32, F64, ...): refused by its reader
                gt = None
            data = raw[t.offset : t.offset + t.nbytes]
            self.tensors[t.name] = FileTensor(t.name, gt, t.shape, data.view(_ELEMENTS[gt]) if gt in _ELEMENTS else data, t.offset, t.nbytes, t.type.name)

    def open(self):
        """A plain-read handle on the file, for ``read_bytes``."""
        return open_regular(self.path, ModelError)[0]

    def read_bytes(self, name: str, f, start: int = 0, count: int | None = None) -> np.ndarray:
        """Stored bytes [start, start + count) of a tensor read with plain file I/O (no mmap residency:
        RSS grows by what is read, not by the file's pages)."""
        t = self.tensors[name]
        count = t.nbytes - start if count is None else count
        buf = np.empty(count, dtype=np.uint8)
        f.seek(t.offset + start)
        if f.readinto(memoryview(buf)) != count:
            raise ModelError("file ends inside the tensor data (truncated?)", path=self.path, tensor=name)
        return buf

    def row_chunks(self, name: str, f, max_bytes: int) -> Iterator[np.ndarray]:
        """A tensor's stored bytes, whole rows at a time, at most ``max_bytes`` (but one row) per read."""
        t = self.tensors[name]
        if not t.nbytes:
            return
        row = t.nbytes // math.prod(t.shape[:-1])
        step = max(1, max_bytes // row) * row
        for o in range(0, t.nbytes, step):
            yield self.read_bytes(name, f, o, min(step, t.nbytes - o))

    def f32_chunks(self, name: str, f, max_bytes: int = 4 << 20) -> Iterator[np.ndarray]:
        """A tensor decoded to float32 a few MiB of stored rows at a time, shape (rows, n)."""
        t = self.tensors[name]
        if t.type not in STORAGE_TYPES:
            raise ModelError(f"cannot decode type {t.type_name}", path=self.path, tensor=name)
        for raw in self.row_chunks(name, f, max_bytes):
            yield raw.view(np.float32).reshape(-1, t.shape[-1]) if t.type is GGMLType.F32 else dequantize(raw, t.type, t.shape[-1])

    def read_f32(self, name: str, f) -> np.ndarray:
        """A whole tensor as float32 in PyTorch shape (ggml's own type traits decode it)."""
        return np.concatenate(list(self.f32_chunks(name, f))).reshape(self.tensors[name].shape)

    def type_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors.values():
            d = out.setdefault(t.type_name, {"count": 0, "bytes": 0})
            d["count"] += 1
            d["bytes"] += t.nbytes
        return out

    def dequantized(self, name: str) -> np.ndarray:
        with self.open() as f:
            return self.read_f32(name, f)

    def nonfinite(self, max_bytes: int = 4 << 20) -> list[str]:
        """Tensors holding NaN or Inf, scanned a few MiB at a time with plain reads, so memory stays small
        whatever the file's size. Types that are not weights are skipped (their owner refuses them)."""
        with self.open() as f:
            return [n for n, t in self.tensors.items()
                    if t.type in STORAGE_TYPES and not all(all_finite(t.type, raw) for raw in self.row_chunks(n, f, max_bytes))]


_T = GGMLType
#: Where each block-quantized storage type keeps its f16 scales (ggml-common.h): bytes per block and
#: offsets. A block decodes to finite values exactly when its scales are finite (an Inf scale times a
#: zero quant is NaN), so scanning them finds NaN/Inf without decoding the weights.
_SCALES = {_T.Q4_0: (18, (0,)), _T.Q4_1: (20, (0, 2)), _T.Q5_0: (22, (0,)), _T.Q5_1: (24, (0, 2)), _T.Q8_0: (34, (0,)),
           _T.Q2_K: (84, (80, 82)), _T.Q3_K: (110, (108,)), _T.Q4_K: (144, (0, 2)), _T.Q5_K: (176, (0, 2)),
           _T.Q6_K: (210, (208,)), _T.IQ4_NL: (18, (0,))}
_EXPONENT = {_T.F32: (np.uint32, 0x7F800000), _T.F16: (np.uint16, 0x7C00), _T.BF16: (np.uint16, 0x7F80)}


def all_finite(type_: GGMLType, raw: np.ndarray) -> bool:
    """Whether stored bytes (whole rows) of a storage type hold only finite values."""
    if type_ in _EXPONENT:
        dt, mask = _EXPONENT[type_]
        return not ((raw.view(dt) & mask) == mask).any()
    size, offsets = _SCALES[type_]
    blocks = raw.reshape(-1, size)
    return not any(((blocks[:, o : o + 2].view(np.uint16) & 0x7C00) == 0x7C00).any() for o in offsets)
