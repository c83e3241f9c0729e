"""Read an Ideogram 4 checkpoint (Hugging Face layout) tensor by tensor, in official names.

Sources are memory-mapped safetensors; a tensor is read in row chunks so that converting the
245 M-parameter ``llm_cond_proj`` never needs it whole in float32. Supported forms:

* official fused names (``attention.qkv``, ``attention.o``) or the diffusers split layout
  (``attention.to_q/to_k/to_v``, ``attention.to_out.0``), which is fused back here;
* float32, bfloat16, float16, and the official FP8 (``float8_e4m3fn`` weight with a per-output-row
  float32 ``<name>.weight_scale``: value = fp8 × scale[row], computed in float32).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gguf_dit.arch.dit import BACKBONE_DIRS, Ideogram4Config, check_tensors, config_from_json, detect_config, tensor_inventory
from gguf_dit.errors import SourceError

from .inputs import read_json, regular_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")
_SPLIT = re.compile(r"^(layers\.\d+\.attention\.)(to_q|to_k|to_v|to_out\.0)\.weight$")
_FLOAT_DTYPES = {"F32", "BF16", "F16", "F8_E4M3"}
#: What ``detect_config`` unpacks: checked first, so a hostile header is an error naming the tensor.
_DETECT_NDIM = {"input_proj.weight": 2, "llm_cond_proj.weight": 2, "adaln_proj.weight": 2, "layers.0.feed_forward.w1.weight": 2, "layers.0.attention.norm_q.weight": 1}


@dataclasses.dataclass
class _Part:
    """One stored tensor (possibly with its FP8 scale) inside a shard."""

    file: Path
    key: str
    scale_key: str | None
    scale_file: Path | None
    dtype: str
    shape: tuple[int, ...]


@dataclasses.dataclass
class SourceTensor:
    """An official-name tensor backed by one or more stored parts concatenated along rows."""

    name: str
    parts: list[_Part]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0].shape
        if len(first) == 1:
            return first
        return (sum(p.shape[0] for p in self.parts),) + tuple(first[1:])

    @property
    def dtype(self) -> str:
        return "+".join(sorted({p.dtype + ("*scale" if p.scale_key else "") for p in self.parts}))


class SafetensorsFiles:
    """Shared by the checkpoint readers: one lazily opened, memory-mapped handle per file, the header scan,
    and row-chunked reading on top of the subclass's ``rows``."""

    files: list[Path]

    def _open(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = open_safetensors(f)
        return h

    def _headers(self) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
        """key -> (file, safetensors dtype, shape) over all files, without reading tensor data."""
        raw: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        for f in self.files:
            h = self._open(f)
            for key in h.keys():
                sl = h.get_slice(key)
                raw[key] = (f, sl.get_dtype(), tuple(int(x) for x in sl.get_shape()))
        return raw

    def chunks(self, name: str, max_bytes: int, *args) -> Iterator[np.ndarray]:
        """Float32 row blocks of at most ``max_bytes`` (1-D tensors whole); ``args`` go to ``rows``."""
        shape = self.tensors[name].shape
        per_row = 4 * (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
        step = shape[0] if len(shape) == 1 else max(1, max_bytes // per_row)
        for r0 in range(0, shape[0], step):
            yield self.rows(name, r0, min(shape[0], r0 + step), *args)

    def release(self) -> None:
        """Drop the memory-mapped file handles: pages a finished tensor touched leave the RSS with them,
        so peak memory is one tensor's source pages, not the whole checkpoint's."""
        self._handles.clear()

    close = release


class Backbone(SafetensorsFiles):
    """One DiT backbone of a checkpoint: its role, files, config and official-name tensors."""

    def __init__(self, role: str, directory: Path, files: list[Path], config_json: dict | None) -> None:
        self.role = role
        self.directory = directory
        self.files = files
        # What a whole-backbone error names: the weights file itself when there is only one.
        self.where = str(files[0] if len(files) == 1 else directory)
        self.config_json = config_json
        self.tensors: dict[str, SourceTensor] = {}
        self.layout = "official"
        self._handles: dict[Path, object] = {}
        self._scan()
        self.config = self._config()
        check_tensors({n: t.shape for n, t in self.tensors.items()}, self.config, self.where, error=SourceError)

    # -- discovery ---------------------------------------------------------------------
    def _scan(self) -> None:
        raw = self._headers()
        if not raw:
            raise SourceError("no tensors found", path=self.where)
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in raw)), "")
        names = {k[len(prefix):]: v for k, v in raw.items()}

        scales = {k for k in names if k.endswith(".weight_scale")}
        split: dict[str, dict[str, _Part]] = {}
        for key, (f, dtype, shape) in names.items():
            if key in scales:
                if key[: -len("_scale")] not in names:
                    raise SourceError("weight_scale without its weight", path=f, tensor=prefix + key)
                continue
            if dtype not in _FLOAT_DTYPES:
                raise SourceError(f"unsupported dtype {dtype} (expected F32, BF16, F16 or F8_E4M3 with weight_scale)", path=f, tensor=prefix + key)
            if not 1 <= len(shape) <= 4 or min(shape) < 1:
                raise SourceError(f"shape {list(shape)} is not a weight's (1 to 4 dimensions, none empty)", path=f, tensor=prefix + key)
            scale_key = key + "_scale" if key + "_scale" in scales else None
            if dtype == "F8_E4M3" and scale_key is None:
                raise SourceError("float8 weight without a .weight_scale tensor", path=f, tensor=prefix + key)
            if scale_key:
                sf, sdt, sshape = names[scale_key]
                if len(shape) != 2:
                    raise SourceError(f"a weight with a weight_scale must be 2-D, this one has shape {list(shape)}", path=f, tensor=prefix + key)
                if sdt not in ("F32", "BF16", "F16") or sshape not in ((shape[0],), (shape[0], 1), (), (1,)):
                    raise SourceError(f"weight_scale has dtype {sdt} shape {list(sshape)}, expected float ({shape[0]},)", path=sf, tensor=prefix + scale_key)
            part = _Part(f, prefix + key, prefix + scale_key if scale_key else None, names[scale_key][0] if scale_key else None, dtype, shape)
            m = _SPLIT.match(key)
            if m:
                split.setdefault(m.group(1), {})[m.group(2)] = part
                self.layout = "diffusers"
            else:
                self.tensors[key] = SourceTensor(key, [part])
        for base, parts in split.items():
            have = set(parts)
            if have - {"to_out.0"}:
                missing = {"to_q", "to_k", "to_v"} - have
                if missing:
                    raise SourceError("diffusers split attention is missing " + ", ".join(sorted(missing)), path=self.directory, tensor=base + sorted(missing)[0] + ".weight")
                qkv = [parts["to_q"], parts["to_k"], parts["to_v"]]
                for p in qkv:
                    if len(p.shape) != 2 or p.shape[1:] != qkv[0].shape[1:]:
                        raise SourceError(f"diffusers split attention parts have shapes {[list(q.shape) for q in qkv]}, expected 2-D with equal columns", path=p.file, tensor=p.key)
                self.tensors[base + "qkv.weight"] = SourceTensor(base + "qkv.weight", qkv)
            if "to_out.0" in parts:
                self.tensors[base + "o.weight"] = SourceTensor(base + "o.weight", [parts["to_out.0"]])

    def _config(self) -> Ideogram4Config:
        where = self.where
        shapes = {n: t.shape for n, t in self.tensors.items()}
        if "embed_image_indicator.weight" not in shapes:
            raise SourceError("not an Ideogram 4 backbone (no embed_image_indicator.weight)", path=where)
        for name, ndim in _DETECT_NDIM.items():
            if name in shapes and len(shapes[name]) != ndim:
                raise SourceError(f"shape {list(shapes[name])} is not {ndim}-D", path=where, tensor=name)
        # Block indices must be 0..N-1; bounding them here keeps a name like layers.99999999999.x from
        # making config detection enumerate every index up to it.
        layers = {int(m.group(1)): n for n in shapes if (m := _LAYER_RE.match(n))}
        if layers and max(layers) >= len(layers):
            top = max(layers)
            raise SourceError(f"transformer blocks are not numbered 0..N-1: block {top} with {len(layers)} blocks in all", path=where, tensor=layers[top])
        detected = detect_config(shapes, where, error=SourceError)
        if self.config_json is not None:
            cfg_path = self.directory / "config.json"
            declared = config_from_json(self.config_json, str(cfg_path), error=SourceError)
            # Values no tensor shape can show come from the config; the rest must agree with the shapes.
            merged = dataclasses.replace(detected, **{k: v for k, v in declared.items() if k in ("rope_theta", "mrope_section", "norm_eps")})
            for k, v in declared.items():
                if getattr(merged, k) != v:
                    raise SourceError(f"config.json says {k}={v} but the tensors say {getattr(merged, k)}", path=self.directory / "config.json")
            detected = merged
        detected.validate(where, error=SourceError)
        return detected

    # -- reading -----------------------------------------------------------------------
    def rows(self, name: str, r0: int, r1: int, hasher: "hashlib._Hash | None" = None) -> np.ndarray:
        """Rows [r0, r1) of an official tensor as float32 (1-D tensors: elements)."""
        import torch

        st = self.tensors[name]
        out = []
        base = 0
        for p in st.parts:
            n = p.shape[0]
            lo, hi = max(r0 - base, 0), min(r1 - base, n)
            base += n
            if lo >= hi:
                continue
            h = self._open(p.file)
            try:
                t = h.get_slice(p.key)[lo:hi]
                scale = self._open(p.scale_file).get_slice(p.scale_key)[:] if p.scale_key else None
            except Exception as e:
                raise SourceError(f"cannot read tensor data ({_short(e)}); the file may be truncated or corrupt", path=p.file, tensor=p.key) from None
            if hasher is not None:
                hasher.update(f"{p.key}:{p.dtype}:{lo}:{hi};".encode())
                hasher.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            x = t.to(torch.float32)
            if scale is not None:
                s = scale.to(torch.float32).reshape(-1)
                x.mul_((s[lo:hi] if s.numel() > 1 else s).reshape(-1, *([1] * (x.dim() - 1))))
            a = x.numpy()
            if not np.isfinite(a).all():
                bad = int(np.flatnonzero(~np.isfinite(a.reshape(-1)))[0])
                per_row = int(np.prod(a.shape[1:])) if a.ndim > 1 else 1
                raise SourceError(f"non-finite value (NaN or Inf) at flat index {bad + lo * per_row}", path=p.file, tensor=p.key)
            out.append(a)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def source_names(self) -> list[str]:
        return [f.name for f in self.files]


def open_safetensors(f: Path):
    """A memory-mapped ``safe_open`` handle (torch tensors, so float8 works), or a SourceError naming the file.
    Only regular files: safetensors would block on a FIFO and map a device."""
    from safetensors import safe_open

    regular_file(f)
    try:
        return safe_open(str(f), framework="pt")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # several exception types for a bad header, and pyo3's PanicException is a BaseException
        raise SourceError(f"cannot read safetensors file ({_short(e)})", path=f) from None


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s[:200]


def index_files(index: Path) -> list[Path]:
    """The shards a ``*.safetensors.index.json`` lists (plain file names next to it)."""
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


def _backbone_files(d: Path) -> list[Path]:
    index = d / INDEX_NAME
    if index.exists():
        return index_files(index)
    single = d / WEIGHTS_NAME
    if single.exists():
        return [single]
    found = sorted(d.glob("*.safetensors"))
    if found:
        return found
    raise SourceError(f"no {WEIGHTS_NAME} or {INDEX_NAME} found", path=d)


def _load_config(d: Path) -> dict | None:
    cfg = d / "config.json"
    if not cfg.exists():
        return None
    return read_json(cfg, what="config.json")


def open_checkpoint(src: str | Path, role: str | None = None) -> list[Backbone]:
    """Resolve SRC to its backbones: a checkpoint root (both backbones), a backbone directory, or a file."""
    src = Path(src)
    if not src.exists():
        raise SourceError("does not exist", path=src)
    if src.is_file():
        if src.suffix != ".safetensors":
            raise SourceError("expected a .safetensors file or a checkpoint directory", path=src)
        return [Backbone(role or "cond", src.parent, [src], _load_config(src.parent))]
    subdirs = [n for n in BACKBONE_DIRS if (src / n).exists()]
    if subdirs:
        missing = [n for n in BACKBONE_DIRS if n not in subdirs]
        if missing and role is None:
            raise SourceError(
                f"missing backbone folder {missing[0]}/ (a checkpoint root needs both; pass a single backbone folder to convert one)",
                path=src,
            )
        chosen = [n for n in BACKBONE_DIRS if n in subdirs and (role is None or BACKBONE_DIRS[n] == role)]
        if not chosen:
            raise SourceError(f"no backbone folder for role {role}", path=src)
        out = []
        for n in chosen:
            d = src / n
            if not d.is_dir():
                raise SourceError("is not a directory", path=d)
            out.append(Backbone(BACKBONE_DIRS[n], d, _backbone_files(d), _load_config(d)))
        return out
    r = role or BACKBONE_DIRS.get(src.name, "cond")
    return [Backbone(r, src, _backbone_files(src), _load_config(src))]


def expected_names(cfg: Ideogram4Config) -> list[str]:
    return [s.name for s in tensor_inventory(cfg)]


ChunkReader = Callable[[str, int], Iterator[np.ndarray]]
