"""Safetensors sources read tensor by tensor: one reader for the DiT backbones, the text encoder and the VAE.

Files are memory-mapped and read in row chunks, so a tensor never needs to be whole in float32. A source is one
``.safetensors`` file or a folder holding ``<name>.safetensors``, the shards its ``<name>.safetensors.index.json``
lists, or other ``*.safetensors`` files. Weights may be float32, bfloat16, float16, or FP8 (``float8_e4m3fn``)
with a per-row or scalar ``.weight_scale`` (value = fp8 × scale[row]) or a block-wise ``.weight_scale_inv``
(value = fp8 × scale_inv[row // B, col // B]), all computed in float32. Every value read is checked finite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from gguf_dit.errors import SourceError

from .inputs import _one_line, read_json, regular_file

FLOAT_DTYPES = ("F32", "BF16", "F16", "F8_E4M3")
CHUNK_BYTES = 64 << 20
SCALE_KINDS = ("weight_scale", "weight_scale_inv")


def weight_files(src: Path, weights_name: str, what: str) -> list[Path]:
    """The files of one model: ``src`` itself if it is a .safetensors file (``what`` names the folder it may be
    instead), else the index's shards, ``weights_name``, or every ``*.safetensors`` in the folder."""
    if src.is_file():
        if src.suffix != ".safetensors":
            raise SourceError(f"expected a .safetensors file or {what}", path=src)
        return [src]
    index = src / (weights_name + ".index.json")
    if not index.exists():
        found = [src / weights_name] if (src / weights_name).exists() else sorted(src.glob("*.safetensors"))
        if not found:
            raise SourceError(f"missing (nor is there a {index.name} or any other .safetensors file)", path=src / weights_name)
        return found
    # The shards the index lists: plain file names next to it.
    wm = read_json(index, what="index").get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise SourceError("index has no weight_map object", path=index)
    for v in wm.values():
        if not isinstance(v, str) or not v or Path(v).name != v:
            raise SourceError(f"weight_map entry {str(v)[:60]!r} is not a shard file name", path=index)
    files = sorted({index.parent / v for v in wm.values()})
    for f in files:
        if not f.exists():
            raise SourceError("shard listed in the index is missing", path=f)
    return files


@dataclasses.dataclass
class Scale:
    key: str
    file: Path
    kind: str  # one of SCALE_KINDS
    shape: tuple[int, ...]


@dataclasses.dataclass
class Stored:
    """One stored weight (as named in its file) with its optional FP8 scale."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    scale: Scale | None = None


Header = dict[str, tuple[Path, str, tuple[int, ...]]]


class SafetensorsFiles:
    """The files of one model: lazily opened memory-mapped handles, the header scan, checked weights, and reading
    in float32 row chunks. ``tensors`` maps a model's names to what ``rows`` reads (by default one ``Stored``)."""

    def __init__(self, files: list[Path], where: Path | str) -> None:
        self.files = files
        # What a whole-model error names: the weights file itself when there is only one.
        self.where = where
        self.tensors: dict = {}
        self._handles: dict[Path, object] = {}

    def _open(self, f: Path):
        """A memory-mapped ``safe_open`` handle (torch tensors, so float8 works), or a SourceError naming the file.
        Only regular files: safetensors would block on a FIFO and map a device."""
        from safetensors import safe_open

        if f not in self._handles:
            regular_file(f)
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # several exception types for a bad header, and pyo3's PanicException is a BaseException
                raise SourceError(f"cannot read safetensors file ({_one_line(e)})", path=f) from None
        return self._handles[f]

    def headers(self) -> Header:
        """key -> (file, safetensors dtype, shape) over all files, without reading tensor data."""
        raw: Header = {}
        for f in self.files:
            h = self._open(f)
            for key in h.keys():
                sl = h.get_slice(key)
                raw[key] = (f, sl.get_dtype(), tuple(int(x) for x in sl.get_shape()))
        return raw

    @staticmethod
    def weights(found: Header, prefix: str = "", max_ndim: int = 4) -> dict[str, Stored]:
        """The weights in ``found`` (names without ``prefix``), each with its FP8 scale; dtypes and shapes checked."""
        scales = {n for n in found if n.rsplit(".", 1)[-1] in SCALE_KINDS}
        out: dict[str, Stored] = {}
        for name, (f, dtype, shape) in found.items():
            if name in scales:
                continue
            key = prefix + name
            if dtype not in FLOAT_DTYPES:
                raise SourceError(f"unsupported dtype {dtype} (expected F32, BF16, F16, or F8_E4M3 with a weight scale)", path=f, tensor=key)
            if not 1 <= len(shape) <= max_ndim or min(shape) < 1:
                raise SourceError(f"shape {list(shape)} is not a weight's (1 to {max_ndim} dimensions, none empty)", path=f, tensor=key)
            s = out[name] = Stored(f, key, dtype, shape)
            for kind in SCALE_KINDS:
                sname = name[: -len("weight")] + kind
                if name.endswith(".weight") and sname in found:
                    s.scale = Scale(prefix + sname, found[sname][0], kind, found[sname][2])
                    _check_scale(s, found[sname][1])
            if dtype == "F8_E4M3" and s.scale is None:
                raise SourceError("float8 weight without a .weight_scale or .weight_scale_inv tensor", path=f, tensor=key)
        for n in scales:
            if n.rsplit(".", 1)[0] + ".weight" not in out:
                raise SourceError("weight scale without its weight", path=found[n][0], tensor=prefix + n)
        return out

    def read(self, s: Stored, lo: int, hi: int, hasher: "hashlib._Hash | None" = None) -> np.ndarray:
        """Rows [lo, hi) of a stored weight as float32 (1-D: elements), scaled, checked finite; ``hasher`` is fed
        the stored bytes."""
        import torch

        h = self._open(s.file)
        hs = self._open(s.scale.file) if s.scale else None
        try:
            t = h.get_slice(s.key)[lo:hi]
            scale = hs.get_slice(s.scale.key)[:].to(torch.float32) if s.scale else None
        except Exception as e:
            raise SourceError(f"cannot read tensor data ({_one_line(e)}); the file may be truncated or corrupt", path=s.file, tensor=s.key) from None
        if hasher is not None:
            hasher.update(f"{s.key}:{s.dtype}:{lo}:{hi};".encode())
            hasher.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        x = t.to(torch.float32)
        if scale is not None and s.scale.kind == "weight_scale":
            scale = scale.reshape(-1)
            x.mul_((scale[lo:hi] if scale.numel() > 1 else scale).reshape(-1, *([1] * (x.dim() - 1))))
        elif scale is not None:
            rows, cols = s.shape
            b_r, b_c = math.ceil(rows / s.scale.shape[0]), math.ceil(cols / s.scale.shape[1])
            x.mul_(scale.repeat_interleave(b_r, 0)[lo:hi].repeat_interleave(b_c, 1)[:, :cols])
        a = x.numpy()
        if not np.isfinite(a).all():
            bad = int(np.flatnonzero(~np.isfinite(a.reshape(-1)))[0])
            per_row = int(np.prod(a.shape[1:])) if a.ndim > 1 else 1
            raise SourceError(f"non-finite value (NaN or Inf) at flat index {bad + lo * per_row}", path=s.file, tensor=s.key)
        return a

    def rows(self, name: str, r0: int, r1: int, hasher: "hashlib._Hash | None" = None) -> np.ndarray:
        return self.read(self.tensors[name], r0, r1, hasher)

    def chunks(self, name: str, max_bytes: int = CHUNK_BYTES, *args) -> Iterator[np.ndarray]:
        """Float32 row blocks of at most ``max_bytes`` (1-D tensors whole); ``args`` go to ``rows``."""
        shape = self.tensors[name].shape
        per_row = 4 * (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
        step = shape[0] if len(shape) == 1 else max(1, max_bytes // per_row)
        for r0 in range(0, shape[0], step):
            yield self.rows(name, r0, min(shape[0], r0 + step), *args)

    def release(self) -> None:
        """Drop the memory-mapped file handles: pages a finished tensor touched leave the RSS with them,
        so peak memory is one tensor's source pages, not the whole model's."""
        self._handles.clear()

    close = release


def _check_scale(s: Stored, dtype: str) -> None:
    sc, rows = s.scale, s.shape[0]
    if sc.kind == "weight_scale":
        ok = sc.shape in ((rows,), (rows, 1), (), (1,))
        want = f"({rows},), ({rows}, 1) or a scalar"
    else:  # block scales: [ceil(rows / B_r), ceil(cols / B_c)]
        ok = len(s.shape) == 2 and len(sc.shape) == 2 and min(sc.shape) > 0
        if ok:
            b_r, b_c = math.ceil(rows / sc.shape[0]), math.ceil(s.shape[1] / sc.shape[1])
            ok = math.ceil(rows / b_r) == sc.shape[0] and math.ceil(s.shape[1] / b_c) == sc.shape[1]
        want = "[ceil(rows/B), ceil(cols/B)] block scales"
    if dtype not in FLOAT_DTYPES[:3] or not ok:
        raise SourceError(f"{sc.kind} has dtype {dtype} shape {list(sc.shape)}, expected float {want} for weight shape {list(s.shape)}", path=sc.file, tensor=sc.key)
