"""Read an Ideogram 4 backbone GGUF: ours (self-describing) or a stable-diffusion.cpp-style file with
no metadata, where the architecture and config are detected from tensor names and shapes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from gguf_dit.arch.dit import ARCH, ROLES, Ideogram4Config, check_tensors, detect_config, is_ideogram4, tensor_inventory
from gguf_dit import keys
from gguf_dit.errors import ModelError
from gguf_dit.ggml_ops import STORAGE_TYPES, GGMLType


@dataclasses.dataclass
class FileTensor:
    name: str
    type: GGMLType | None  # None: a GGUF type ggml_ops does not know (I32, F64, ...), named by type_name
    shape: tuple[int, ...]  # PyTorch order
    data: np.ndarray  # raw bytes/elements as stored (memory-mapped)
    offset: int = 0  # absolute byte offset of the data in the file
    type_name: str = ""

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def gguf_field(reader, key: str):
    """A metadata value as a Python value, or None when the key is absent."""
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # pragma: no cover - older gguf-py
        return None


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` (memory-mapped), or a ModelError naming the file.

    gguf-py trusts the counts and lengths it reads, so the header is validated first
    (``gguf_dit.gguf_header``); the validated header, with typed metadata, is ``reader.header``."""
    import gguf

    from gguf_dit.gguf_header import read_header

    header = read_header(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelError(f"not a readable GGUF file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})", path=path) from None
    reader.header = header
    return reader


_field = gguf_field

#: What the DiT graph can use for each tensor role. Linears go to ggml_mul_mat in their stored type
#: (every storage type has a CPU matmul kernel; Q8_K is activation-only). Norm weights, biases and
#: the image-indicator embedding are F32 operands of elementwise ops: the runtime widens them to F32
#: at load, as stable-diffusion.cpp does. Float files keep them in F32, F16 or BF16; sd.cpp's
#: `-M convert --type q8_0` without rules also quantizes every 1-D norm weight whose length fits the
#: block (its own loader dequantizes them), so quantized ones are decoded too. Integer types are not
#: weights and are refused.
LINEAR_TYPES = frozenset(STORAGE_TYPES)
WIDENED_TYPES = frozenset(STORAGE_TYPES)
_KIND_NAMES = {"linear": "a linear weight", "bias": "a bias", "norm": "a norm weight", "embedding": "the image-indicator embedding"}

#: Image sides `run` allows when a file carries no gguf_dit.size_range: the real model's (emb_dim
#: 4608) training range, and anything up to 2048 for smaller test models.
REAL_SIZE_RANGE = (256, 2048)
PIXELS_PER_TOKEN = 16


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


def _type_list(types) -> str:
    names = [t.name for t in sorted(types)]
    return ", ".join(names[:-1]) + " or " + names[-1]


class _Metadata:
    """Typed reads of GGUF metadata: a value of the wrong type or length is a ModelError naming the
    file and the key, never a ValueError/TypeError from deep inside a conversion."""

    def __init__(self, reader, path: Path) -> None:
        import gguf

        self.fields, self.path, self.V = reader.fields, path, gguf.GGUFValueType

    def _bad(self, key: str, what: str, f=None) -> ModelError:
        got = ""
        if f is not None:
            got = ", got " + (f"an array of {f.types[-1].name}" if f.types[0] == self.V.ARRAY and len(f.types) > 1 else f.types[0].name)
        return ModelError(f"metadata {key} must be {what}{got}", path=self.path)

    def _is_int(self, t) -> bool:
        return t not in (self.V.FLOAT32, self.V.FLOAT64, self.V.BOOL, self.V.STRING, self.V.ARRAY)

    def get_str(self, key: str) -> str | None:
        f = self.fields.get(key)
        if f is None:
            return None
        if f.types != [self.V.STRING]:
            raise self._bad(key, "a string", f)
        try:
            return bytes(f.parts[-1]).decode("utf-8")
        except UnicodeDecodeError:
            raise self._bad(key, "valid UTF-8") from None

    def get_int(self, key: str) -> int | None:
        f = self.fields.get(key)
        if f is None:
            return None
        if len(f.types) != 1 or not self._is_int(f.types[0]):
            raise self._bad(key, "an integer", f)
        return int(f.parts[-1][0])

    def get_float(self, key: str) -> float | None:
        f = self.fields.get(key)
        if f is None:
            return None
        if len(f.types) != 1 or f.types[0] in (self.V.BOOL, self.V.STRING, self.V.ARRAY):
            raise self._bad(key, "a number", f)
        v = float(f.parts[-1][0])
        # float32 values are stored as such; keep the decimal the writer meant (5e6, not 5000000.5).
        return float(f"{v:.7g}") if f.types[0] == self.V.FLOAT32 else v

    def get_ints(self, key: str, length: int) -> tuple[int, ...] | None:
        f = self.fields.get(key)
        if f is None:
            return None
        what = f"an array of {length} integers"
        if f.types[0] != self.V.ARRAY or len(f.types) > 2 or not all(self._is_int(t) for t in f.types[1:]):  # [ARRAY]: empty
            raise self._bad(key, what, f)
        vals = tuple(int(f.parts[i][0]) for i in f.data)
        if len(vals) != length:
            raise ModelError(f"metadata {key} must be {what}, got {len(vals)}: {list(vals)[:8]}", path=self.path)
        return vals


class BackboneFile:
    """A parsed backbone GGUF. ``warnings`` lists deviations that do not stop loading.

    ``strict`` (the runtime): every tensor the architecture needs, in its shape, in a type the graph
    can use for its role; ``strict=False`` (``inspect``): the same findings become warnings."""

    def __init__(self, path: str | Path, *, strict: bool = True) -> None:
        import gguf

        self.path = Path(path)
        if not self.path.exists():
            raise ModelError("does not exist", path=self.path)
        reader = self.reader = open_gguf(self.path)
        meta = _Metadata(reader, self.path)
        self.warnings: list[str] = []
        self.tensors: dict[str, FileTensor] = {}
        for t in reader.tensors:
            try:
                gt = GGMLType(int(t.tensor_type))
            except ValueError:  # a GGUF type with no place in a DiT (I32, F64, ...): refused by role below
                gt = None
            shape = tuple(int(x) for x in reversed([int(v) for v in t.shape]))
            self.tensors[t.name] = FileTensor(t.name, gt, shape, t.data, int(t.data_offset), gguf.GGMLQuantizationType(int(t.tensor_type)).name)
        self.arch = meta.get_str(keys.ARCHITECTURE)
        self.has_metadata = self.arch is not None and keys.EMB_DIM in reader.fields
        if self.arch is not None and self.arch != ARCH:
            raise ModelError(f"{keys.ARCHITECTURE} is {self.arch!r}, not {ARCH!r}", path=self.path)
        if not is_ideogram4(self.tensors):
            raise ModelError("not an Ideogram 4 backbone (no embed_image_indicator.weight / input_proj.weight tensors)", path=self.path)
        shapes = {n: t.shape for n, t in self.tensors.items()}
        detected = detect_config(shapes, str(self.path), error=ModelError)
        if self.has_metadata:
            cfg = dataclasses.replace(detected, **self._config_metadata(meta))
            for k in ("emb_dim", "num_layers", "num_heads", "intermediate_size", "adaln_dim", "in_channels", "llm_features_dim"):
                if getattr(cfg, k) != getattr(detected, k):
                    raise ModelError(f"metadata {keys.dit(k)}={getattr(cfg, k)} contradicts the tensor shapes ({getattr(detected, k)})", path=self.path)
        else:
            cfg = detected
            self.warnings.append("no gguf-dit metadata: architecture and config detected from tensor names and shapes")
        cfg.validate(str(self.path), error=ModelError)
        self.config = cfg
        self.role = meta.get_str(keys.ROLE)
        if self.role is not None and self.role not in ROLES:
            raise ModelError(f"metadata {keys.ROLE} must be one of {', '.join(ROLES)}, got {self.role!r}", path=self.path)
        self.recipe = meta.get_str(keys.RECIPE_NAME)
        self.recipe_tensors = self._recipe_tensors(meta.get_str(keys.RECIPE_TENSORS))
        self.size_range, self.default_size = self._size_hints(meta)
        self.metadata = {k: _field(reader, k) for k in reader.fields if not k.startswith("GGUF.") and k != keys.RECIPE_TENSORS}
        self._check_tensors(shapes, strict)

    # -- validation --------------------------------------------------------------------
    def _config_metadata(self, meta: _Metadata) -> dict:
        out: dict = {}
        for f in dataclasses.fields(Ideogram4Config):
            key = keys.dit(f.name)
            if f.name == "mrope_section":
                v = meta.get_ints(key, len(f.default))
                if v is not None and min(v) < 0:
                    raise ModelError(f"metadata {key} must not be negative, got {list(v)}", path=self.path)
            elif isinstance(f.default, float):
                v = meta.get_float(key)
                if v is not None and not (math.isfinite(v) and v > 0):
                    raise ModelError(f"metadata {key} must be a positive finite number, got {v}", path=self.path)
            else:
                v = meta.get_int(key)
            if v is not None:
                out[f.name] = v
        return out

    def _recipe_tensors(self, text: str | None) -> dict[str, list[str]] | None:
        if text is None:
            return None
        key = keys.RECIPE_TENSORS
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ModelError(f"metadata {key} is not valid JSON ({e.__class__.__name__}: {str(e)[:80]})", path=self.path) from None
        if not isinstance(d, dict) or not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in d.values()):
            raise ModelError(f"metadata {key} must be a JSON object of tensor name -> [type, reason]", path=self.path)
        return d

    def _size_hints(self, meta: _Metadata) -> tuple[tuple[int, int], int]:
        """Validated image-side hints for `run`, with the defaults when the file has none."""
        key = keys.SIZE_RANGE
        rng = meta.get_ints(key, 2)
        if rng is not None:
            lo, hi = rng
            if lo < PIXELS_PER_TOKEN or hi < lo or lo % PIXELS_PER_TOKEN or hi % PIXELS_PER_TOKEN:
                raise ModelError(f"metadata {key} {lo}..{hi} must be multiples of {PIXELS_PER_TOKEN} with {PIXELS_PER_TOKEN} <= low <= high", path=self.path)
        else:
            rng = REAL_SIZE_RANGE if self.config.emb_dim == 4608 else (PIXELS_PER_TOKEN, REAL_SIZE_RANGE[1])
        lo, hi = rng
        key = keys.DEFAULT_SIZE
        d = meta.get_int(key)
        if d is None:
            d = 1024 if lo <= 1024 <= hi else lo
        elif d % PIXELS_PER_TOKEN or not lo <= d <= hi:
            raise ModelError(f"metadata {key} {d} must be a multiple of {PIXELS_PER_TOKEN} within the size range {lo}..{hi}", path=self.path)
        return (lo, hi), d

    def _check_tensors(self, shapes: dict[str, tuple[int, ...]], strict: bool) -> None:
        """Names and shapes against the architecture, then each stored type against its role."""
        specs = tensor_inventory(self.config)
        if strict:
            check_tensors(shapes, self.config, str(self.path), error=ModelError)
        else:
            expected = {s.name: s.shape for s in specs}
            for n, s in expected.items():
                if n not in shapes:
                    self.warnings.append(f"missing tensor {n}")
                elif shapes[n] != s:
                    self.warnings.append(f"tensor {n} has shape {list(shapes[n])}, expected {list(s)}")
            for n in shapes:
                if n not in expected:
                    self.warnings.append(f"unexpected tensor {n}")
        self.kinds = {s.name: s.kind for s in specs if s.name in self.tensors}
        for name, kind in self.kinds.items():
            t = self.tensors[name]
            allowed = LINEAR_TYPES if kind == "linear" else WIDENED_TYPES
            if t.type in allowed:
                continue
            msg = f"stored as {t.type_name}, which the graph cannot use for {_KIND_NAMES[kind]} (allowed: {_type_list(allowed)})"
            if strict:
                raise ModelError(msg, path=self.path, tensor=name)
            self.warnings.append(f"tensor {name} {msg}")

    # -- reading -----------------------------------------------------------------------
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

    def f32_chunks(self, name: str, f, max_bytes: int = 4 << 20) -> Iterator[np.ndarray]:
        """A tensor decoded to float32 a few MiB of stored rows at a time, shape (rows, n)."""
        from gguf_dit.ggml_ops import dequantize

        t = self.tensors[name]
        if t.type not in STORAGE_TYPES:
            raise ModelError(f"cannot decode type {t.type_name}", path=self.path, tensor=name)
        if not t.nbytes:
            return
        n = t.shape[-1]
        rows = math.prod(t.shape[:-1])
        row_bytes = t.nbytes // rows
        step = max(1, max_bytes // row_bytes)
        for r0 in range(0, rows, step):
            raw = self.read_bytes(name, f, r0 * row_bytes, (min(rows, r0 + step) - r0) * row_bytes)
            yield raw.view(np.float32).reshape(-1, n) if t.type is GGMLType.F32 else dequantize(raw, t.type, n)

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
        with open(self.path, "rb") as f:
            return self.read_f32(name, f)

    def nonfinite(self, max_bytes: int = 4 << 20) -> list[str]:
        """Tensors holding NaN or Inf, scanned a few MiB at a time with plain reads, so memory stays small
        whatever the file's size (the memory map would keep every page read resident)."""
        bad = []
        with open(self.path, "rb") as f:
            for n, t in self.tensors.items():
                if t.type not in STORAGE_TYPES or not t.nbytes:  # other types were reported by _check_tensors
                    continue
                row = t.nbytes // math.prod(t.shape[:-1])
                step = max(1, max_bytes // row) * row
                if not all(all_finite(t.type, self.read_bytes(n, f, o, min(step, t.nbytes - o))) for o in range(0, t.nbytes, step)):
                    bad.append(n)
        return bad
