"""Read an Ideogram 4 backbone (Hugging Face layout) tensor by tensor, in official names.

Official fused names (``attention.qkv``, ``attention.o``) or the diffusers split layout (``attention.to_q/to_k/to_v``,
``attention.to_out.0``), which is fused back here. Files, dtypes and FP8 scales: ``reader.SafetensorsFiles``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np

from gguf_dit.arch.dit import BACKBONE_DIRS, Ideogram4Config, check_tensors, config_from_json, detect_config
from gguf_dit.errors import SourceError

from .inputs import read_json
from .reader import SafetensorsFiles, Stored, weight_files

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_SPLIT = re.compile(r"^(layers\.\d+\.attention\.)(to_q|to_k|to_v|to_out\.0)\.weight$")


@dataclasses.dataclass
class SourceTensor:
    """An official-name tensor backed by one or more stored parts concatenated along rows."""

    name: str
    parts: list[Stored]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0].shape
        return first if len(first) == 1 else (sum(p.shape[0] for p in self.parts),) + tuple(first[1:])

    @property
    def dtype(self) -> str:
        return "+".join(sorted({p.dtype + ("*scale" if p.scale else "") for p in self.parts}))


class Backbone(SafetensorsFiles):
    """One DiT backbone of a checkpoint: its role, files, config and official-name tensors."""

    def __init__(self, role: str, directory: Path, weights: Path) -> None:
        """``weights``: the backbone's folder or its one .safetensors file; ``directory`` may hold its config.json."""
        files = weight_files(weights, WEIGHTS_NAME, "a checkpoint directory")
        super().__init__(files, str(files[0] if len(files) == 1 else directory))
        self.role = role
        self.directory = directory
        cfg = directory / "config.json"
        self.config_json = read_json(cfg, what="config.json") if cfg.exists() else None
        self.tensors: dict[str, SourceTensor] = {}
        self.layout = "official"
        self._scan()
        self.config = self._config()
        check_tensors({n: t.shape for n, t in self.tensors.items()}, self.config, self.where, error=SourceError)

    # -- discovery ---------------------------------------------------------------------
    def _scan(self) -> None:
        raw = self.headers()
        if not raw:
            raise SourceError("no tensors found", path=self.where)
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in raw)), "")
        split: dict[str, dict[str, Stored]] = {}
        for key, part in self.weights({k[len(prefix):]: v for k, v in raw.items()}, prefix).items():
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
        detected = detect_config(shapes, where, error=SourceError)
        if self.config_json is not None:
            declared = config_from_json(self.config_json, str(self.directory / "config.json"), error=SourceError)
            # Values no tensor shape can show come from the config; the rest must agree with the shapes.
            merged = dataclasses.replace(detected, **{k: v for k, v in declared.items() if k in ("rope_theta", "mrope_section", "norm_eps")})
            for k, v in declared.items():
                if getattr(merged, k) != v:
                    raise SourceError(f"config.json says {k}={v} but the tensors say {getattr(merged, k)}", path=self.directory / "config.json")
            detected = merged
        detected.validate(where, error=SourceError)
        return detected

    def rows(self, name: str, r0: int, r1: int, hasher: "hashlib._Hash | None" = None) -> np.ndarray:
        """Rows [r0, r1) of an official tensor as float32 (1-D tensors: elements), across its stored parts."""
        out = []
        base = 0
        for p in self.tensors[name].parts:
            lo, hi = max(r0 - base, 0), min(r1 - base, p.shape[0])
            base += p.shape[0]
            if lo < hi:
                out.append(self.read(p, lo, hi, hasher))
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)


def open_checkpoint(src: str | Path, role: str | None = None) -> list[Backbone]:
    """Resolve SRC to its backbones: a checkpoint root (both backbones), a backbone directory, or a file."""
    src = Path(src)
    if not src.exists():
        raise SourceError("does not exist", path=src)
    if src.is_file():
        return [Backbone(role or "cond", src.parent, src)]
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
            out.append(Backbone(BACKBONE_DIRS[n], d, d))
        return out
    return [Backbone(role or BACKBONE_DIRS.get(src.name, "cond"), src, src)]
