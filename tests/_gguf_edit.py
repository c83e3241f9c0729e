"""GGUF files written byte by byte, for tests: valid ones (read back by gguf-py's reader, the oracle) and ones
with a single field broken, which gguf-py's writer refuses to produce.

``GGUFFile.from_file`` loads an existing file through gguf-py's ``GGUFReader`` (so a real file such as the demo
text encoder can be edited), ``to_bytes``/``write`` serialise it per the GGUF spec (little-endian, v3)."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

V = GGUFValueType
T = GGMLQuantizationType
_NP = {
    V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
    V.FLOAT32: "<f4", V.BOOL: "<u1", V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT64: "<f8",
}


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value_bytes(t: V, v, item: V | None = None) -> bytes:
    """A value as stored; for arrays of arrays ``v`` is a list of (item_type, values) pairs."""
    if t == V.STRING:
        return _str(v)
    if t != V.ARRAY:
        return np.array(v, dtype=_NP[t]).tobytes()
    head = struct.pack("<IQ", item, len(v))
    if item == V.STRING:
        return head + b"".join(_str(x) for x in v)
    if item == V.ARRAY:
        return head + b"".join(value_bytes(V.ARRAY, sub, sub_t) for sub_t, sub in v)
    return head + np.asarray(v, dtype=_NP[item]).tobytes()


@dataclasses.dataclass
class KV:
    key: str | bytes
    type: V
    value: object
    item: V | None = None

    def to_bytes(self) -> bytes:
        return _str(self.key) + struct.pack("<I", self.type) + value_bytes(self.type, self.value, self.item)


@dataclasses.dataclass
class Tensor:
    name: str | bytes
    ne: tuple[int, ...]  # ggml order
    type: int
    data: bytes
    offset: int | None = None  # relative to the data section; None: packed after the previous tensor


def tensor(name: str, shape: tuple[int, ...], type: T = T.F32, seed: int = 0) -> Tensor:
    """A tensor of random bytes of the right size for ``shape`` (NumPy order) and ``type``."""
    block, size = GGML_QUANT_SIZES[type]
    n = int(np.prod(shape)) // block * size
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    if type == T.F32:
        data = np.random.default_rng(seed).standard_normal(int(np.prod(shape))).astype("<f4").tobytes()
    return Tensor(name, tuple(reversed(shape)), int(type), data)


@dataclasses.dataclass
class GGUFFile:
    kvs: list[KV]
    tensors: list[Tensor]
    version: int = 3
    magic: bytes = b"GGUF"
    n_kv: int | None = None  # None: the real counts
    n_tensors: int | None = None
    alignment: int = 32  # used for padding; write general.alignment yourself to change it in the file

    @classmethod
    def from_file(cls, path: str | Path) -> "GGUFFile":
        r = GGUFReader(str(path))
        kvs = []
        for k, f in r.fields.items():
            if k.startswith("GGUF."):
                continue
            t = V(f.types[0])
            kvs.append(KV(k, t, f.contents(), V(f.types[1]) if t == V.ARRAY else None))
        ts = [Tensor(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), np.asarray(t.data).tobytes()) for t in r.tensors]
        return cls(kvs, ts, alignment=int(r.alignment))

    # editing helpers
    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)

    def set(self, key: str, t: V, value, item: V | None = None) -> "GGUFFile":
        for k in self.kvs:
            if k.key == key:
                k.type, k.value, k.item = t, value, item
                return self
        self.kvs.append(KV(key, t, value, item))
        return self

    def drop(self, key: str) -> "GGUFFile":
        self.kvs = [k for k in self.kvs if k.key != key]
        return self

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    def drop_tensor(self, name: str) -> "GGUFFile":
        self.tensors = [t for t in self.tensors if t.name != name]
        return self

    def layout(self) -> tuple[int, list[int]]:
        """(data section start, offset of each tensor relative to it)."""
        pos = 4 + 4 + 8 + 8 + sum(len(k.to_bytes()) for k in self.kvs)
        offsets, cur = [], 0
        for t in self.tensors:
            pos += 8 + len(t.name if isinstance(t.name, bytes) else t.name.encode()) + 4 + 8 * len(t.ne) + 4 + 8
            off = cur if t.offset is None else t.offset
            offsets.append(off)
            cur = -(-(off + len(t.data)) // self.alignment) * self.alignment
        return -(-pos // self.alignment) * self.alignment, offsets

    def to_bytes(self) -> bytes:
        start, offsets = self.layout()
        out = bytearray(self.magic + struct.pack("<IQQ", self.version, len(self.tensors) if self.n_tensors is None else self.n_tensors, len(self.kvs) if self.n_kv is None else self.n_kv))
        for k in self.kvs:
            out += k.to_bytes()
        for t, off in zip(self.tensors, offsets):
            out += _str(t.name) + struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}Q", *t.ne) + struct.pack("<IQ", t.type, off)
        out += bytes(start - len(out))
        for t, off in zip(self.tensors, offsets):
            end = start + off + len(t.data)
            if len(out) < end:
                out += bytes(end - len(out))
            out[start + off : end] = t.data
        out += bytes(-len(out) % self.alignment if self.tensors else 0)  # writers pad the last tensor too
        return bytes(out)

    def write(self, path: str | Path) -> Path:
        Path(path).write_bytes(self.to_bytes())
        return Path(path)

    # byte positions, for patching one field of ``to_bytes()``
    def kv_offset(self, key: str) -> int:
        """Where the KV pair ``key`` starts (its key length)."""
        pos = 24
        for k in self.kvs:
            if k.key == key:
                return pos
            pos += len(k.to_bytes())
        raise KeyError(key)

    def value_offset(self, key: str) -> int:
        """Where the value of ``key`` starts (after its type id)."""
        k = self.kv(key)
        return self.kv_offset(key) + 8 + len(k.key if isinstance(k.key, bytes) else k.key.encode()) + 4

    def tensor_info_offset(self, name: str) -> int:
        """Where the tensor info of ``name`` starts (its name length)."""
        pos = 24 + sum(len(k.to_bytes()) for k in self.kvs)
        for t in self.tensors:
            if t.name == name:
                return pos
            pos += 8 + len(t.name if isinstance(t.name, bytes) else t.name.encode()) + 4 + 8 * len(t.ne) + 4 + 8
        raise KeyError(name)


def write_sdcpp_style(src: str | Path, dst: str | Path, drop: str | None = None, extra: str | None = None) -> Path:
    """``src``'s tensors in a file with no KV metadata at all, as stable-diffusion.cpp writes; ``drop`` leaves one
    tensor out, ``extra`` adds a 4-float one."""
    f = GGUFFile.from_file(src)
    f.kvs = []
    if drop:
        f.drop_tensor(drop)
    if extra:
        f.tensors.append(Tensor(extra, (4,), int(T.F32), bytes(16)))
    return f.write(dst)


def patch(data: bytes, offset: int, fmt: str, *values) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, *values)
    return bytes(b)
