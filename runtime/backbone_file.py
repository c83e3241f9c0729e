"""Read an Ideogram 4 backbone GGUF: ours (self-describing) or a stable-diffusion.cpp-style file with
no metadata, where the architecture and config are detected from tensor names and shapes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from gguf_dit import keys
from gguf_dit.arch.dit import (
    ARCH,
    REAL_DEFAULT_SIZE,
    REAL_SIZE_RANGE,
    ROLES,
    Ideogram4Config,
    check_tensors,
    default_size_problem,
    detect_config,
    is_ideogram4,
    size_range_problem,
    tensor_inventory,
    tensor_problems,
)
from gguf_dit.arch.latent import PIXELS_PER_TOKEN
from gguf_dit.errors import ModelError
from gguf_dit.ggml_ops import STORAGE_TYPES
from gguf_dit.gguf_header import INTEGER_TYPES

from .gguf_file import GGUFFile, all_finite

__all__ = ["BackboneFile", "all_finite"]  # all_finite: where the DiT loader imports it from

#: What the DiT graph can use, whatever the tensor's role: linears go to ggml_mul_mat in their stored type
#: (every storage type has a CPU matmul kernel; Q8_K is activation-only). Norm weights, biases and the
#: image-indicator embedding are F32 operands of elementwise ops: the runtime widens them to F32 at load,
#: as stable-diffusion.cpp does. Float files keep them in F32, F16 or BF16; sd.cpp's `-M convert --type q8_0`
#: without rules also quantizes every 1-D norm weight whose length fits the block (its own loader dequantizes
#: them), so quantized ones are decoded too. Integer types are not weights and are refused.
_ALLOWED = ", ".join(t.name for t in sorted(STORAGE_TYPES)[:-1]) + " or " + sorted(STORAGE_TYPES)[-1].name
_KIND_NAMES = {"linear": "a linear weight", "bias": "a bias", "norm": "a norm weight", "embedding": "the image-indicator embedding"}


class BackboneFile(GGUFFile):
    """A parsed backbone GGUF. ``warnings`` lists deviations that do not stop loading.

    ``strict`` (the runtime): every tensor the architecture needs, in its shape, in a type the graph
    can use for its role; ``strict=False`` (``inspect``): the same findings are listed in ``problems``."""

    def __init__(self, path: str | Path, *, strict: bool = True) -> None:
        super().__init__(path)
        h = self.header
        self.warnings: list[str] = []
        self.problems: list[str] = []  # what strict loading refuses, listed instead (strict=False)
        self.arch = h.value(keys.ARCHITECTURE, ("STRING",))
        self.has_metadata = self.arch is not None and keys.EMB_DIM in h.kv
        if self.arch is not None and self.arch != ARCH:
            raise ModelError(f"{keys.ARCHITECTURE} is {self.arch!r}, not {ARCH!r}", path=self.path)
        if not is_ideogram4(self.tensors):
            raise ModelError("not an Ideogram 4 backbone (no embed_image_indicator.weight / input_proj.weight tensors)", path=self.path)
        shapes = {n: t.shape for n, t in self.tensors.items()}
        detected = detect_config(shapes, str(self.path), error=ModelError)
        if self.has_metadata:
            cfg = dataclasses.replace(detected, **self._config_metadata())
            for k in ("emb_dim", "num_layers", "num_heads", "intermediate_size", "adaln_dim", "in_channels", "llm_features_dim"):
                if getattr(cfg, k) != getattr(detected, k):
                    raise ModelError(f"metadata key {keys.dit(k)}={getattr(cfg, k)} contradicts the tensor shapes ({getattr(detected, k)})", path=self.path)
        else:
            cfg = detected
            self.warnings.append("no gguf-dit metadata: architecture and config detected from tensor names and shapes")
        cfg.validate(str(self.path), error=ModelError)
        self.config = cfg
        self.role = h.value(keys.ROLE, ("STRING",))
        if self.role is not None and self.role not in ROLES:
            raise ModelError(f"metadata key {keys.ROLE} must be one of {', '.join(ROLES)}, got {self.role!r}", path=self.path)
        self.recipe = h.value(keys.RECIPE_NAME, ("STRING",))
        self.recipe_tensors = self._recipe_tensors(h.value(keys.RECIPE_TENSORS, ("STRING",)))
        self.size_range, self.default_size = self._size_hints()
        self.metadata = {k: kv.value for k, kv in h.kv.items() if k != keys.RECIPE_TENSORS}
        self._check_tensors(shapes, strict)

    # -- validation --------------------------------------------------------------------
    def _config_metadata(self) -> dict:
        out: dict = {}
        for f in dataclasses.fields(Ideogram4Config):
            key = keys.dit(f.name)
            if f.name == "mrope_section":
                v = self._ints(key, len(f.default))
                if v is not None and min(v) < 0:
                    raise ModelError(f"metadata key {key} must not be negative, got {list(v)}", path=self.path)
            elif isinstance(f.default, float):
                v = self.header.number(key)
                if v is not None:  # a float32 keeps the decimal the writer meant (5e6, not 5000000.5)
                    v = float(f"{v:.7g}") if self.header.kv[key].type.name == "FLOAT32" else float(v)
            else:
                v = self.header.value(key, INTEGER_TYPES)
            if v is not None:
                out[f.name] = v
        return out

    def _ints(self, key: str, length: int) -> tuple[int, ...] | None:
        v = self.header.value(key, ("ARRAY",), item=INTEGER_TYPES)
        if v is not None and len(v) != length:
            raise ModelError(f"metadata key {key} must be an array of {length} integers, got {len(v)}: {v.tolist()[:8]}", path=self.path)
        return None if v is None else tuple(int(x) for x in v)

    def _recipe_tensors(self, text: str | None) -> dict[str, list[str]] | None:
        if text is None:
            return None
        key = keys.RECIPE_TENSORS
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ModelError(f"metadata key {key} is not valid JSON ({e.__class__.__name__}: {str(e)[:80]})", path=self.path) from None
        if not isinstance(d, dict) or not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in d.values()):
            raise ModelError(f"metadata key {key} must be a JSON object of tensor name -> [type, reason]", path=self.path)
        return d

    def _size_hints(self) -> tuple[tuple[int, int], int]:
        """Validated image-side hints for `run`, with the defaults when the file has none."""
        key = keys.SIZE_RANGE
        rng = self._ints(key, 2)
        if rng is not None:
            lo, hi = rng
            if problem := size_range_problem(lo, hi):
                raise ModelError(f"metadata key {key} {lo}..{hi} {problem}", path=self.path)
        else:
            # The real model's width gets its training range; smaller (test) models anything up to its top.
            rng = REAL_SIZE_RANGE if self.config.emb_dim == Ideogram4Config().emb_dim else (PIXELS_PER_TOKEN, REAL_SIZE_RANGE[1])
        lo, hi = rng
        key = keys.DEFAULT_SIZE
        d = self.header.value(key, INTEGER_TYPES)
        if d is None:
            d = REAL_DEFAULT_SIZE if lo <= REAL_DEFAULT_SIZE <= hi else lo
        elif problem := default_size_problem(d, lo, hi):
            raise ModelError(f"metadata key {key} {d} {problem}", path=self.path)
        return (lo, hi), d

    def _check_tensors(self, shapes: dict[str, tuple[int, ...]], strict: bool) -> None:
        """Names and shapes against the architecture, then each stored type against its role."""
        specs = tensor_inventory(self.config)
        if strict:
            check_tensors(shapes, self.config, str(self.path), error=ModelError)
        else:
            self.problems += [f"tensor {n}: {problem}" for n, problem in tensor_problems(shapes, self.config)]
        self.kinds = {s.name: s.kind for s in specs if s.name in self.tensors}
        for name, kind in self.kinds.items():
            t = self.tensors[name]
            if t.type in STORAGE_TYPES:
                continue
            msg = f"stored as {t.type_name}, which the graph cannot use for {_KIND_NAMES[kind]} (allowed: {_ALLOWED})"
            if strict:
                raise ModelError(msg, path=self.path, tensor=name)
            self.problems.append(f"tensor {name}: {msg}")
