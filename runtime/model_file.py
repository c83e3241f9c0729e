"""Read an Ideogram 4 backbone GGUF: ours (self-describing) or a stable-diffusion.cpp-style file with
no metadata, where the architecture and config are detected from tensor names and shapes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from gguf_dit.arch import ARCH, Ideogram4Config, check_tensors, detect_config, is_ideogram4, tensor_inventory
from gguf_dit.errors import GgufDitError, ModelError
from gguf_dit.ggml_ops import GGMLType


@dataclasses.dataclass
class FileTensor:
    name: str
    type: GGMLType
    shape: tuple[int, ...]  # PyTorch order
    data: np.ndarray  # raw bytes/elements as stored (memory-mapped)
    offset: int = 0  # absolute byte offset of the data in the file

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
    """A ``gguf.GGUFReader`` (memory-mapped), or a ModelError naming the file."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelError(f"not a readable GGUF file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})", path=path) from None


_field = gguf_field


class BackboneFile:
    """A parsed backbone GGUF. ``warnings`` lists deviations that do not stop loading."""

    def __init__(self, path: str | Path, *, strict: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ModelError("does not exist", path=self.path)
        reader = self.reader = open_gguf(self.path)
        self.warnings: list[str] = []
        self.tensors: dict[str, FileTensor] = {}
        for t in reader.tensors:
            try:
                gt = GGMLType(int(t.tensor_type))
            except ValueError:
                raise ModelError(f"unsupported tensor type id {int(t.tensor_type)}", path=self.path, tensor=t.name) from None
            shape = tuple(int(x) for x in reversed([int(v) for v in t.shape]))
            self.tensors[t.name] = FileTensor(t.name, gt, shape, t.data, int(t.data_offset))
        self.arch = _field(reader, "general.architecture")
        self.has_metadata = self.arch is not None and _field(reader, f"{ARCH}.emb_dim") is not None
        if self.arch is not None and self.arch != ARCH:
            raise ModelError(f"general.architecture is {self.arch!r}, not {ARCH!r}", path=self.path)
        if not is_ideogram4(self.tensors):
            raise ModelError("not an Ideogram 4 backbone (no embed_image_indicator.weight / input_proj.weight tensors)", path=self.path)
        shapes = {n: t.shape for n, t in self.tensors.items()}
        detected = detect_config(shapes, str(self.path))
        if self.has_metadata:
            meta = {}
            for f in dataclasses.fields(Ideogram4Config):
                v = _field(reader, f"{ARCH}.{f.name}")
                if v is None:
                    continue
                meta[f.name] = tuple(int(x) for x in v) if f.name == "mrope_section" else (float(f"{float(v):.7g}") if isinstance(f.default, float) else int(v))
            cfg = dataclasses.replace(detected, **meta)
            for k in ("emb_dim", "num_layers", "num_heads", "intermediate_size", "adaln_dim", "in_channels", "llm_features_dim"):
                if getattr(cfg, k) != getattr(detected, k):
                    raise ModelError(f"metadata {ARCH}.{k}={getattr(cfg, k)} contradicts the tensor shapes ({getattr(detected, k)})", path=self.path)
        else:
            cfg = detected
            self.warnings.append("no gguf-dit metadata: architecture and config detected from tensor names and shapes")
        try:
            cfg.validate(str(self.path))
        except GgufDitError as e:
            raise ModelError(str(e)) from None
        self.config = cfg
        role = _field(reader, f"{ARCH}.role")
        self.role = str(role) if role is not None else None
        self.recipe = _field(reader, "gguf_dit.recipe.name")
        rt = _field(reader, "gguf_dit.recipe.tensors")
        self.recipe_tensors = json.loads(rt) if rt else None
        self.metadata = {k: _field(reader, k) for k in reader.fields if not k.startswith("GGUF.") and k != "gguf_dit.recipe.tensors"}
        if strict:
            try:
                check_tensors(shapes, cfg, str(self.path))
            except GgufDitError as e:
                raise ModelError(str(e)) from None
        else:
            expected = {s.name: s.shape for s in tensor_inventory(cfg)}
            for n, s in expected.items():
                if n not in shapes:
                    self.warnings.append(f"missing tensor {n}")
                elif shapes[n] != s:
                    self.warnings.append(f"tensor {n} has shape {list(shapes[n])}, expected {list(s)}")
            for n in shapes:
                if n not in expected:
                    self.warnings.append(f"unexpected tensor {n}")

    def read_bytes(self, name: str, f) -> np.ndarray:
        """A tensor's stored bytes read with plain file I/O (no mmap residency: RSS grows by one tensor)."""
        t = self.tensors[name]
        buf = np.empty(t.nbytes, dtype=np.uint8)
        f.seek(t.offset)
        if f.readinto(memoryview(buf)) != t.nbytes:
            raise ModelError("file ends inside the tensor data (truncated?)", path=self.path, tensor=name)
        return buf

    def type_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors.values():
            d = out.setdefault(t.type.name, {"count": 0, "bytes": 0})
            d["count"] += 1
            d["bytes"] += t.nbytes
        return out

    def dequantized(self, name: str) -> np.ndarray:
        """A tensor as float32 in PyTorch shape, decoded by ggml's own type traits."""
        from gguf_dit.ggml_ops import dequantize

        t = self.tensors[name]
        if t.type is GGMLType.F32:
            return np.asarray(t.data, dtype=np.float32).reshape(t.shape)
        return dequantize(np.asarray(t.data), t.type, t.shape[-1]).reshape(t.shape)

    def nonfinite(self) -> list[str]:
        return [n for n in self.tensors if not np.isfinite(self.dequantized(n)).all()]
