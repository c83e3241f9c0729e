"""The Ideogram 4 DiT (both CFG backbones): config, official tensor names and shapes, detection.

Everything here is derived from ``../shared/docs/ideogram4-model.md`` §2–§4: the config fields,
the official (fused, unprefixed) tensor names, their PyTorch shapes and which of them are linears.
Nothing in this module reads files or builds graphs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping

from ..errors import GgufDitError
from .latent import PIXELS_PER_TOKEN

ARCH = "ideogram4"
ROLES = ("cond", "uncond")
#: Backbone directory names in the Hugging Face layout, and the role each one plays in CFG.
BACKBONE_DIRS = {"transformer": "cond", "unconditional_transformer": "uncond"}

# head_dim is fixed by the architecture: RoPE slot map and attention scale 1/16 assume 256.
HEAD_DIM = 256
IMAGE_POSITION_OFFSET = 65536
#: Image sides the real model was trained for; a file without size hints is assumed to be it, default 1024.
REAL_SIZE_RANGE = (256, 2048)
REAL_DEFAULT_SIZE = 1024
#: Text tokens per caption, chat template included: the official pipeline refuses longer ones (§11.2).
MAX_TEXT_TOKENS = 2048
#: eps of the per-head q/k RMSNorm inside attention; unlike norm_eps it is not a config field (diffusers hard-codes it).
QK_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Ideogram4Config:
    emb_dim: int = 4608
    num_layers: int = 34
    num_heads: int = 18
    intermediate_size: int = 12288
    adaln_dim: int = 512
    in_channels: int = 128
    llm_features_dim: int = 53248
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    norm_eps: float = 1e-5
    llm_cond_norm_eps: float = 1e-6
    final_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.num_heads

    def validate(self, where: str, *, error: type[GgufDitError]) -> None:
        """Raise ``error`` (the caller's kind: SourceError, ModelError) naming ``where`` on an impossible config."""
        if self.num_heads <= 0 or self.emb_dim % self.num_heads:
            raise error(f"emb_dim {self.emb_dim} is not divisible by num_heads {self.num_heads}", path=where)
        if self.head_dim != HEAD_DIM:
            raise error(
                f"head_dim {self.head_dim} (emb_dim {self.emb_dim} / heads {self.num_heads}) is not {HEAD_DIM}, "
                "which the Ideogram 4 RoPE slot map and attention scale require",
                path=where,
            )
        if sum(self.mrope_section) * 2 > self.head_dim:
            raise error(f"mrope_section {self.mrope_section} does not fit head_dim {self.head_dim}", path=where)

    def to_metadata(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# diffusers' Ideogram4Transformer2DModel config keys -> ours.
_DIFFUSERS_KEYS = {
    "hidden_size": "emb_dim",
    "emb_dim": "emb_dim",
    "num_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "norm_eps": "norm_eps",
    "num_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "adaln_dim": "adaln_dim",
    "adanln_dim": "adaln_dim",
    "in_channels": "in_channels",
    "llm_features_dim": "llm_features_dim",
    "text_in_channels": "llm_features_dim",
    "rope_theta": "rope_theta",
    "mrope_section": "mrope_section",
    "rope_axes_dim": "mrope_section",
}


def config_from_json(d: Mapping[str, object], where: str | None, *, error: type[GgufDitError]) -> dict[str, object]:
    """Pick the fields we know from a diffusers/official ``config.json`` (unknown keys ignored).

    Values are type-checked (a string, list, null or bool where a number belongs is an error naming ``where`` and
    the key); ``attention_head_dim`` x ``num_attention_heads`` gives ``emb_dim``."""

    def bad(key: str, v: object, want: str) -> GgufDitError:
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        return error(f"config.json key {key} is {shown}, expected {want}", path=where)

    def positive_int(key: str, v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise bad(key, v, "a positive integer")
        return v

    if not isinstance(d, Mapping):
        raise error(f"config.json is a {type(d).__name__}, expected a JSON object", path=where)
    out: dict[str, object] = {}
    for k, v in d.items():
        ours = _DIFFUSERS_KEYS.get(k)
        if ours is None:
            continue
        if ours == "mrope_section":
            if not isinstance(v, (list, tuple)) or len(v) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
                raise bad(k, v, "a list of 3 non-negative integers")
            v = tuple(v)
        elif ours in ("rope_theta", "norm_eps"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < float(v) < float("inf"):
                raise bad(k, v, "a finite positive number")
            v = float(v)
        else:
            v = positive_int(k, v)
        out[ours] = v
    if "attention_head_dim" in d and "num_attention_heads" in d:
        out["emb_dim"] = positive_int("attention_head_dim", d["attention_head_dim"]) * positive_int("num_attention_heads", d["num_attention_heads"])
    return out


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # PyTorch order (out, in)
    kind: str  # "linear" | "bias" | "norm" | "embedding"

    @property
    def in_features(self) -> int:
        return self.shape[-1]


def size_range_problem(lo: int, hi: int) -> str | None:
    """Why ``lo..hi`` cannot be a model's range of image sides (None if it can)."""
    if lo < PIXELS_PER_TOKEN or hi < lo or lo % PIXELS_PER_TOKEN or hi % PIXELS_PER_TOKEN:
        return f"must be multiples of {PIXELS_PER_TOKEN} with {PIXELS_PER_TOKEN} <= low <= high"
    return None


def default_size_problem(d: int, lo: int, hi: int) -> str | None:
    """Why ``d`` cannot be the default image side of a model with range ``lo..hi`` (None if it can)."""
    return f"must be a multiple of {PIXELS_PER_TOKEN} within the size range {lo}..{hi}" if d % PIXELS_PER_TOKEN or not lo <= d <= hi else None


def tensor_inventory(cfg: Ideogram4Config) -> list[TensorSpec]:
    """Every tensor of one backbone, official names, in a stable order (non-block first, then blocks)."""
    D, A, C, F, I = cfg.emb_dim, cfg.adaln_dim, cfg.in_channels, cfg.llm_features_dim, cfg.intermediate_size
    specs = [
        TensorSpec("input_proj.weight", (D, C), "linear"),
        TensorSpec("input_proj.bias", (D,), "bias"),
        TensorSpec("llm_cond_norm.weight", (F,), "norm"),
        TensorSpec("llm_cond_proj.weight", (D, F), "linear"),
        TensorSpec("llm_cond_proj.bias", (D,), "bias"),
        TensorSpec("t_embedding.mlp_in.weight", (D, D), "linear"),
        TensorSpec("t_embedding.mlp_in.bias", (D,), "bias"),
        TensorSpec("t_embedding.mlp_out.weight", (D, D), "linear"),
        TensorSpec("t_embedding.mlp_out.bias", (D,), "bias"),
        TensorSpec("adaln_proj.weight", (A, D), "linear"),
        TensorSpec("adaln_proj.bias", (A,), "bias"),
        TensorSpec("embed_image_indicator.weight", (2, D), "embedding"),
        TensorSpec("final_layer.linear.weight", (C, D), "linear"),
        TensorSpec("final_layer.linear.bias", (C,), "bias"),
        TensorSpec("final_layer.adaln_modulation.weight", (D, A), "linear"),
        TensorSpec("final_layer.adaln_modulation.bias", (D,), "bias"),
    ]
    hd = cfg.head_dim
    for n in range(cfg.num_layers):
        p = f"layers.{n}."
        specs += [
            TensorSpec(p + "attention.qkv.weight", (3 * D, D), "linear"),
            TensorSpec(p + "attention.norm_q.weight", (hd,), "norm"),
            TensorSpec(p + "attention.norm_k.weight", (hd,), "norm"),
            TensorSpec(p + "attention.o.weight", (D, D), "linear"),
            TensorSpec(p + "feed_forward.w1.weight", (I, D), "linear"),
            TensorSpec(p + "feed_forward.w2.weight", (D, I), "linear"),
            TensorSpec(p + "feed_forward.w3.weight", (I, D), "linear"),
            TensorSpec(p + "attention_norm1.weight", (D,), "norm"),
            TensorSpec(p + "attention_norm2.weight", (D,), "norm"),
            TensorSpec(p + "ffn_norm1.weight", (D,), "norm"),
            TensorSpec(p + "ffn_norm2.weight", (D,), "norm"),
            TensorSpec(p + "adaln_modulation.weight", (4 * D, A), "linear"),
            TensorSpec(p + "adaln_modulation.bias", (4 * D,), "bias"),
        ]
    return specs


_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


def is_ideogram4(names: Iterable[str]) -> bool:
    """The detection rule stable-diffusion.cpp and ComfyUI-GGUF use: the image-indicator embedding."""
    names = set(names)
    return "embed_image_indicator.weight" in names and "input_proj.weight" in names


def detect_config(shapes: Mapping[str, tuple[int, ...]], where: str, *, error: type[GgufDitError]) -> Ideogram4Config:
    """Infer the config from tensor names and PyTorch-order shapes (for files without metadata)."""

    def need(name: str, ndim: int) -> tuple[int, ...]:
        if name not in shapes:
            raise error("missing tensor, cannot infer the Ideogram 4 config", path=where, tensor=name)
        shape = tuple(int(x) for x in shapes[name])
        if len(shape) != ndim:
            raise error(f"has {len(shape)} dimensions {list(shape)}, expected {ndim}", path=where, tensor=name)
        return shape

    D, C = need("input_proj.weight", 2)
    _, F = need("llm_cond_proj.weight", 2)
    A, _ = need("adaln_proj.weight", 2)
    layers = sorted({int(m.group(1)) for k in shapes if (m := _LAYER_RE.match(k))})
    if not layers:
        raise error("no transformer blocks (layers.N.*) found", path=where)
    # Only indices below the block count can be contiguous: never build a range from a file's index
    # (a tensor named layers.99999999999.* would make it 1e11 long).
    first_gap = next(i for i, n in enumerate(layers + [None]) if n != i)
    if first_gap != len(layers):
        raise error(
            f"transformer blocks are not contiguous: {len(layers)} block indices up to {layers[-1]}, layer {first_gap} missing",
            path=where,
        )
    I, _ = need("layers.0.feed_forward.w1.weight", 2)
    (hd,) = need("layers.0.attention.norm_q.weight", 1)
    if hd <= 0 or D % hd:
        raise error(f"head dim {hd} does not divide hidden size {D}", path=where, tensor="layers.0.attention.norm_q.weight")
    cfg = Ideogram4Config(emb_dim=D, num_layers=len(layers), num_heads=D // hd, intermediate_size=I, adaln_dim=A, in_channels=C, llm_features_dim=F)
    return cfg


def tensor_problems(shapes: Mapping[str, tuple[int, ...]], cfg: Ideogram4Config) -> list[tuple[str, str]]:
    """(tensor, problem) for every missing, wrongly shaped or unexpected tensor, in inventory order."""
    specs = tensor_inventory(cfg)
    out = []
    for s in specs:
        got = shapes.get(s.name)
        if got is None:
            out.append((s.name, "missing tensor"))
        elif tuple(got) != s.shape:
            out.append((s.name, f"shape {list(got)} does not match the architecture's {list(s.shape)}"))
    expected = {s.name for s in specs}
    out += [(name, "unexpected tensor for an Ideogram 4 backbone") for name in shapes if name not in expected]
    return out


def check_tensors(shapes: Mapping[str, tuple[int, ...]], cfg: Ideogram4Config, where: str, *, error: type[GgufDitError]) -> None:
    """Raise ``error`` on the first of ``tensor_problems``, naming ``where`` and the tensor."""
    for name, problem in tensor_problems(shapes, cfg)[:1]:
        raise error(problem, path=where, tensor=name)
