"""A GGUF header validator in pure Python: the runtime's one GGUF parser, run before llama.cpp sees a file.

gguf-py allocates from the counts and lengths it reads (a mutated array length is a MemoryError) and
turns a truncated file into a NumPy reshape error; ggml and llama.cpp abort the process on some bad
files. ``read_header`` parses the whole header with bounded reads: every count and length is checked
against the bytes the file still has before anything is read or allocated, and every field (types,
dims, offsets, alignment, names, duplicates) is validated. Tensor data is never read. Errors are one
line ModelErrors naming the file and the key or tensor.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from gguf_dit import keys
from gguf_dit.errors import ModelError
from gguf_dit.files import open_regular

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_NAME = 63  # GGML_MAX_NAME is 64 bytes including the NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY = 65535  # the GGUF spec caps keys at 2^16 - 1 bytes
MAX_STRING = 1 << 30  # gguf.cpp's GGUF_MAX_STRING_LENGTH
MAX_NESTING = 8  # arrays of arrays; deeper is refused rather than recursed into
INT64_MAX = (1 << 63) - 1
INTEGER_TYPES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")
NUMBER_TYPES = INTEGER_TYPES + ("FLOAT32", "FLOAT64")
_WANT = {INTEGER_TYPES: "an integer", NUMBER_TYPES: "a number"}  # how a type check names a group of types

# struct format of each scalar value type (little-endian); NumPy reads arrays with the same codes
_FORMAT = {GGUFValueType[n]: c for n, c in (("UINT8", "B"), ("INT8", "b"), ("UINT16", "H"), ("INT16", "h"), ("UINT32", "I"), ("INT32", "i"),
                                              ("FLOAT32", "f"), ("BOOL", "B"), ("UINT64", "Q"), ("INT64", "q"), ("FLOAT64", "d"))}
_SCALAR = {t: struct.Struct("<" + c) for t, c in _FORMAT.items()}
_NUMPY = {t: np.dtype("<" + c) for t, c in _FORMAT.items()}
# Fewest bytes one value of a type takes: a string is at least its u64 length, an array its item type and count.
_MIN_SIZE = {**{t: d.itemsize for t, d in _NUMPY.items()}, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
_MIN_KV = 8 + 1 + 4 + 1  # key length, a one-byte key, value type, a one-byte value
_MIN_TENSOR = 8 + 1 + 4 + 8 + 4 + 8  # name length, a one-byte name, n_dims, one ne, type, offset


@dataclasses.dataclass(frozen=True)
class KV:
    """One metadata value. ``value``: int/float/bool/str for scalars; a NumPy array for numeric arrays, a list
    of bytes for string arrays (compared as llama.cpp compares them; a vocabulary is not decoded), a list of
    values for nested arrays.
    ``item_type`` is the element type of an array."""

    type: GGUFValueType
    value: object
    item_type: GGUFValueType | None = None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order, fastest dimension first
    type: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch/NumPy order."""
        return tuple(reversed(self.ne))


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    kv: dict[str, KV]
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int
    data_offset: int  # where the data section starts
    file_size: int

    def get(self, key: str, default=None):
        kv = self.kv.get(key)
        return default if kv is None else kv.value

    def value(self, key: str, types: tuple[str, ...], *, item: tuple[str, ...] = (), required: bool = False):
        """The value of ``key`` if its type is one of ``types`` (GGUFValueType names; ``"ARRAY"`` with an element
        type in ``item``), None if absent and not required; otherwise a ModelError naming the key."""
        kv = self.kv.get(key)
        if kv is None:
            if required:
                raise ModelError(f"metadata key {key} is missing", path=self.path)
            return None
        if kv.type.name not in types or (kv.item_type is not None and kv.item_type.name not in item):
            got = kv.type.name + (f" of {kv.item_type.name}" if kv.item_type is not None else "")
            want = _WANT.get(types) or " or ".join(t if t != "ARRAY" else f"ARRAY of {'/'.join(item)}" for t in types)
            if item == INTEGER_TYPES:
                want = want.replace("/".join(item), "integers")
            raise ModelError(f"metadata key {key} is {got}, expected {want}", path=self.path)
        return kv.value

    def number(self, key: str, types: tuple[str, ...] = NUMBER_TYPES, *, lo: float = 0.0, hi: float = math.inf, lo_open: bool = True,
               required: bool = False) -> float | None:
        """``value`` for a number that must be finite and in (lo, hi), or [lo, hi) without ``lo_open``."""
        v = self.value(key, types, required=required)
        if v is not None and not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and v < hi):
            want = "a positive finite number" if (lo, hi, lo_open) == (0.0, math.inf, True) else f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g})"
            raise ModelError(f"metadata key {key} is {v:.7g}, must be {want}", path=self.path)
        return v


class _Stream:
    """Sequential reads through a window buffer. Callers check a length against ``left`` before asking for
    it, so no read or allocation is ever larger than what the file holds."""

    CHUNK = 1 << 20

    def __init__(self, f, size: int, path: Path) -> None:
        self.f, self.size, self.path = f, size, path
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def _fill(self, n: int) -> None:
        """Make the n bytes at ``pos`` (n <= left, checked by the caller) available in ``buf``."""
        keep = self.buf[self.pos - self.base :]
        start = self.pos + len(keep)
        want = min(max(n - len(keep), self.CHUNK), self.size - start)
        if want > 0:
            self.f.seek(start)
            keep += self.f.read(want)
        self.buf, self.base = keep, self.pos
        if len(self.buf) < n:
            raise ModelError(f"file ended while reading the header at byte {self.pos} (changed while being read?)", path=self.path)

    def take(self, n: int) -> bytes:
        if self.pos + n > self.base + len(self.buf):
            self._fill(n)
        i = self.pos - self.base
        self.pos += n
        return self.buf[i : i + n]

    def unpack(self, fmt: struct.Struct, what: str):
        if fmt.size > self.left:
            raise ModelError(f"truncated header: file ends inside {what} (byte {self.pos} of {self.size})", path=self.path)
        return fmt.unpack(self.take(fmt.size))


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEAD = struct.Struct("<4sIQQ")
_TYPE_COUNT = struct.Struct("<IQ")  # an array's item type and count; a tensor's type and offset


def _string(s: _Stream, what: str, limit: int, path: Path) -> bytes:
    (n,) = s.unpack(_U64, f"the length of {what}")
    if n > min(limit, s.left):
        why = f"the {s.left} bytes left in the file (truncated?)" if n > s.left else f"the limit of {limit} bytes"
        raise ModelError(f"{what} has length {n}, more than {why}", path=path)
    return s.take(n)


def _value_type(raw: int, what: str, path: Path) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ModelError(f"{what} has unknown GGUF value type id {raw}", path=path) from None


def _name(s: _Stream, what: str, limit: int, path: Path) -> str:
    """A metadata key or tensor name: a non-empty UTF-8 string within ``limit`` bytes."""
    raw = _string(s, what, limit, path)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{what} is not valid UTF-8 ({raw[:40]!r})", path=path) from None
    if not name:
        raise ModelError(f"{what} is empty", path=path)
    return name


def _string_array(s: _Stream, n: int, what: str, path: Path) -> list[bytes]:
    # The one per-element loop (each length says where the next string starts), kept tight: locals, one
    # unpack and one bounds check per string. The buffer is refilled only when a string crosses its end.
    out = []
    append, unpack = out.append, _U64.unpack_from
    buf, i, end = s.buf, s.pos - s.base, len(s.buf)
    for k in range(n):
        if i + 8 > end:
            s.pos = s.base + i
            if 8 > s.left:
                raise ModelError(f"truncated header: file ends inside {what}[{k}]", path=path)
            s._fill(8)
            buf, i, end = s.buf, 0, len(s.buf)
        j = i + 8 + unpack(buf, i)[0]
        if j > end:
            s.pos = s.base + i
            m = j - i - 8
            if m > min(MAX_STRING, s.left - 8):
                limit = f"the {s.left - 8} bytes left in the file (truncated?)" if s.left - 8 < MAX_STRING else f"ggml's string limit of {MAX_STRING} bytes"
                raise ModelError(f"{what}[{k}] has length {m}, more than {limit}", path=path)
            s._fill(8 + m)
            buf, i, end = s.buf, 0, len(s.buf)
            j = 8 + m
        append(buf[i + 8 : j])
        i = j
    s.pos = s.base + i
    return out


def _value(s: _Stream, t: GGUFValueType, what: str, path: Path, depth: int = 0) -> KV:
    if t is GGUFValueType.STRING:
        raw = _string(s, what, MAX_STRING, path)
        try:
            return KV(t, raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ModelError(f"{what} is not valid UTF-8", path=path) from None
    if t is not GGUFValueType.ARRAY:
        (v,) = s.unpack(_SCALAR[t], what)
        if t is GGUFValueType.BOOL:
            if v not in (0, 1):
                raise ModelError(f"{what} is a bool stored as {v} (must be 0 or 1)", path=path)
            v = bool(v)
        return KV(t, v)
    raw_item, n = s.unpack(_TYPE_COUNT, f"the array header of {what}")
    item = _value_type(raw_item, f"the elements of {what}", path)
    if n * _MIN_SIZE[item] > s.left:
        raise ModelError(f"{what} claims {n} elements of type {item.name}, more than the {s.left} bytes left in the file can hold (truncated?)", path=path)
    if item is GGUFValueType.STRING:
        return KV(t, _string_array(s, n, what, path), item)
    if item is GGUFValueType.ARRAY:
        if depth >= MAX_NESTING:
            raise ModelError(f"{what} nests arrays more than {MAX_NESTING} deep", path=path)
        return KV(t, [_value(s, t, f"{what}[{i}]", path, depth + 1).value for i in range(n)], item)
    dt = _NUMPY[item]
    a = np.frombuffer(s.take(n * dt.itemsize), dtype=dt, count=n).copy() if n else np.empty(0, dt)
    if item is GGUFValueType.BOOL:
        if a.size and a.max() > 1:
            raise ModelError(f"{what} holds a bool stored as {int(a.max())} (must be 0 or 1)", path=path)
        a = a.astype(bool)
    return KV(t, a, item)


def read_header(path: str | Path) -> GGUFHeader:
    """Parse and validate a GGUF header; a ModelError naming the file (and key or tensor) when anything is off."""
    path = Path(path)
    f, size = open_regular(path, ModelError)
    with f:
        return parse_header(f, size, path)


def parse_header(f, size: int, path: Path) -> GGUFHeader:
    """``read_header`` on a file already open (``size`` bytes): a reader that keeps the descriptor maps the very file
    it validated."""
    s = _Stream(f, size, path)
    if size < _HEAD.size:
        raise ModelError(f"not a GGUF file ({size} bytes, shorter than a GGUF header; truncated?)", path=path)
    magic, version, n_tensors, n_kv = s.unpack(_HEAD, "the header")
    if magic != MAGIC:
        raise ModelError(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})", path=path)
    if version not in VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise ModelError(f"GGUF version {version} is not supported (only 2 and 3){hint}", path=path)
    if n_kv * _MIN_KV > s.left:
        raise ModelError(f"kv_count {n_kv} is more than the {s.left} bytes after the header can hold (truncated?)", path=path)
    if n_tensors * _MIN_TENSOR > s.left:
        raise ModelError(f"tensor_count {n_tensors} is more than the {s.left} bytes after the header can hold (truncated?)", path=path)

    kv: dict[str, KV] = {}
    for i in range(n_kv):
        key = _name(s, f"key #{i}", MAX_KEY, path)
        if key in kv:
            raise ModelError(f"duplicate metadata key {key!r}", path=path)
        (raw_t,) = s.unpack(_U32, f"the value type of key {key!r}")
        kv[key] = _value(s, _value_type(raw_t, f"metadata key {key!r}", path), f"metadata key {key!r}", path)

    alignment = DEFAULT_ALIGNMENT
    a = kv.get(keys.ALIGNMENT)
    if a is not None:
        if a.type is not GGUFValueType.UINT32:
            raise ModelError(f"metadata key '{keys.ALIGNMENT}' has type {a.type.name}, must be UINT32", path=path)
        alignment = int(a.value)
        if alignment <= 0 or alignment & (alignment - 1):
            raise ModelError(f"metadata key '{keys.ALIGNMENT}' is {alignment}, not a power of two", path=path)

    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = _name(s, f"tensor name #{i}", MAX_NAME, path)
        if name in names:
            raise ModelError("duplicate tensor name", path=path, tensor=name)
        names.add(name)
        (n_dims,) = s.unpack(_U32, f"the dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelError(f"n_dims is {n_dims}, must be 1..{MAX_DIMS}", path=path, tensor=name)
        ne = s.unpack(struct.Struct(f"<{n_dims}Q"), f"the shape of tensor {name!r}")
        n_el = 1
        for d in ne:
            if d == 0 or d > INT64_MAX:
                raise ModelError(f"dimension {d} in ne={list(ne)} (each must be 1..2^63-1)", path=path, tensor=name)
            n_el *= d
        if n_el > INT64_MAX:
            raise ModelError(f"ne={list(ne)} has more than 2^63-1 elements", path=path, tensor=name)
        raw_type, offset = s.unpack(_TYPE_COUNT, f"the type and offset of tensor {name!r}")
        try:
            gt = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[gt]
        except (ValueError, KeyError):
            raise ModelError(f"unknown ggml type id {raw_type}", path=path, tensor=name) from None
        if ne[0] % block:
            raise ModelError(f"type {gt.name} needs rows that are a multiple of {block}, but ne[0] is {ne[0]}", path=path, tensor=name)
        if offset % alignment:
            raise ModelError(f"data offset {offset} is not a multiple of the alignment {alignment}", path=path, tensor=name)
        infos.append((name, tuple(ne), gt, offset, n_el // block * type_size))

    data_offset = -(-s.pos // alignment) * alignment
    tensors = {n: TensorInfo(n, ne, gt, data_offset + off, nb) for n, ne, gt, off, nb in infos}
    _check_ranges(path, size, data_offset, alignment, tensors)
    return GGUFHeader(path, version, kv, tensors, alignment, data_offset, size)


def _check_ranges(path: Path, size: int, data_offset: int, alignment: int, tensors: dict[str, TensorInfo]) -> None:
    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for t in by_offset:
        if t.offset + t.nbytes > size:
            raise ModelError(f"file is truncated: the tensor's data ends at byte {t.offset + t.nbytes}, but the file has {size} bytes",
                             path=path, tensor=t.name)
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.nbytes > b.offset:
            raise ModelError(f"data overlaps tensor {b.name!r} (bytes {a.offset}..{a.offset + a.nbytes} vs {b.offset})", path=path, tensor=a.name)
    if by_offset:  # writers pad the last tensor too, and ggml's own reader reads the padded data section whole
        last = by_offset[-1]
        end = data_offset + -(-(last.offset + last.nbytes - data_offset) // alignment) * alignment
        if size < end:
            raise ModelError(f"file is truncated: it ends at byte {size}, inside the padding after the last tensor (to byte {end})", path=path, tensor=last.name)
