"""Tiny random Ideogram 4 DiT checkpoints for tests.

Builds ``diffusers.Ideogram4Transformer2DModel`` instances with every parameter
overwritten from a seeded generator (so dropped norms, wrong modulation chunk
orders, RoPE mistakes, ... are visible in the output) and writes them to disk in
the Hugging Face repo layout::

    ROOT/transformer/config.json
    ROOT/transformer/diffusion_pytorch_model.safetensors            (shards == 1)
    ROOT/transformer/diffusion_pytorch_model-0000i-of-0000N.safetensors
    ROOT/transformer/diffusion_pytorch_model.safetensors.index.json (shards > 1)
    ROOT/unconditional_transformer/...                              (seed + 1)

Layouts: "official" (fused ``attention.qkv`` / ``attention.o``) or "diffusers"
(split ``attention.to_q/to_k/to_v`` / ``attention.to_out.0``).
Dtypes: f32, bf16, f16, fp8 (float8_e4m3fn weight + float32 per-row
``weight_scale`` for every 2-D linear weight; everything else bf16, as in the
official ``ideogram-4-fp8`` repo).

See docs/ideogram4-model.md §3, §4 and the appendix on tiny checkpoints.
"""

from __future__ import annotations

import inspect
import json
import math
import pathlib
import re

import torch
from safetensors.torch import save_file

# diffusers kwargs. head_dim and mrope_section are the real ones; everything else is tiny.
# Input dims: 128 (input_proj, Q8_0 only), 416 = 13*32 (llm_cond_proj, Q8_0 only),
# 512 (hidden, K-quant ok), 256 (adaLN, K-quant ok), 512 (intermediate -> w2, K-quant ok).
TINY_CONFIG: dict = {
    "in_channels": 128,
    "num_layers": 2,
    "attention_head_dim": 256,
    "num_attention_heads": 2,
    "intermediate_size": 512,
    "adaln_dim": 256,
    "llm_features_dim": 13 * 32,
    "rope_theta": 5_000_000,
    "mrope_section": (24, 20, 20),
    "norm_eps": 1e-5,
}

FP8_MAX = 448.0
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
BACKBONES = ("transformer", "unconditional_transformer")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

_SPLIT_RE = re.compile(r"^(layers\.\d+\.attention)\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_FUSED_RE = re.compile(r"^(layers\.\d+\.attention)\.(qkv|o)\.weight$")


def _model_cls():
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel


def _full_config(config: dict | None) -> dict:
    """Diffusers init kwargs: class defaults < TINY_CONFIG < config (keys starting with '_' dropped)."""
    sig = inspect.signature(_model_cls().__init__)
    cfg = {k: p.default for k, p in sig.parameters.items() if k != "self"}
    cfg.update(TINY_CONFIG)
    if config:
        cfg.update({k: v for k, v in dict(config).items() if not k.startswith("_")})
    cfg["mrope_section"] = tuple(cfg["mrope_section"])
    return cfg


# ---------------------------------------------------------------------------------------------
# model


@torch.no_grad()
def randomize_(model, seed: int) -> None:
    """Overwrite every parameter of ``model`` from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        shape = p.shape
        rnd = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith(("norm_q.weight", "norm_k.weight")):
            val = 1.3 + 0.2 * rnd  # sharper QK-norm: RoPE / position errors show up
        elif p.ndim == 1 and "norm" in name:
            val = 1.0 + 0.2 * rnd  # RMSNorm weights != 1
        elif name == "embed_image_indicator.weight":
            val = 0.5 * rnd
        elif p.ndim == 2:
            val = rnd / math.sqrt(shape[1])  # std 1/sqrt(fan_in)
        elif name.endswith(".bias"):
            val = 0.1 * rnd
        else:  # pragma: no cover - no such parameter in diffusers 0.42.1
            raise AssertionError(f"unhandled parameter {name} {tuple(shape)}")
        p.copy_(val.to(p.dtype))


def make_model(seed: int = 0, config: dict | None = None):
    """float32, eval(), every parameter randomized from ``seed``."""
    model = _model_cls()(**_full_config(config))  # float32 by default
    randomize_(model, seed)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# state dicts


def diffusers_state_dict(model) -> dict[str, torch.Tensor]:
    """model.state_dict() with diffusers (split) names, contiguous clones."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def diffusers_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fuse to_q/to_k/to_v -> qkv (rows), to_out.0 -> o; everything else unchanged. Order kept."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _SPLIT_RE.match(k)
        if m is None:
            out[k] = v
            continue
        prefix, which = m.groups()
        if which == "to_q":
            parts = [sd[f"{prefix}.{x}.weight"] for x in ("to_q", "to_k", "to_v")]
            out[f"{prefix}.qkv.weight"] = torch.cat(parts, dim=0).contiguous()
        elif which == "to_out.0":
            out[f"{prefix}.o.weight"] = v
        # to_k / to_v consumed with to_q
    return out


def official_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of diffusers_to_official (float tensors only: qkv is split in thirds along rows)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _FUSED_RE.match(k)
        if m is None:
            out[k] = v
            continue
        prefix, which = m.groups()
        if which == "qkv":
            q, kk, vv = v.chunk(3, dim=0)
            out[f"{prefix}.to_q.weight"] = q.contiguous()
            out[f"{prefix}.to_k.weight"] = kk.contiguous()
            out[f"{prefix}.to_v.weight"] = vv.contiguous()
        else:
            out[f"{prefix}.to_out.0.weight"] = v
    return out


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """Fused official names, float32, contiguous clones."""
    sd = {k: v.float() for k, v in diffusers_state_dict(model).items()}
    return diffusers_to_official(sd)


def _is_fp8_linear(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.ndim == 2 and name != "embed_image_indicator.weight"


def to_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FP8 variant: 2-D linear weights -> float8_e4m3fn (out, in) + ``.weight_scale`` float32 (out,)
    with scale = rowmax|W| / 448 (zero rows: scale 1); every other tensor -> bf16.
    Works on either layout (per-row scales make fused and split quantisation identical)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if _is_fp8_linear(k, v):
            w = v.float()
            amax = w.abs().amax(dim=1)
            scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            out[k] = q.contiguous()
            out[k + "_scale"] = scale.to(torch.float32).contiguous()
        else:
            out[k] = v.to(torch.bfloat16).contiguous()
    return out


def dequantized_official(sd_fp8: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp8.float() * scale[:, None] in float32 for every ``X.weight`` with ``X.weight_scale``;
    other tensors upcast to float32; ``.weight_scale`` keys dropped. (Any layout.)"""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd_fp8.items():
        if k.endswith(".weight_scale"):
            continue
        s = sd_fp8.get(k + "_scale")
        if s is not None:
            s = s.float()
            out[k] = v.float() * (s[:, None] if s.ndim == 1 else s)
        else:
            out[k] = v.float()
    return out


# ---------------------------------------------------------------------------------------------
# files


def _config_json(config: dict | None) -> str:
    import diffusers

    cfg = _full_config(config)
    cfg["mrope_section"] = list(cfg["mrope_section"])
    d = {"_class_name": _model_cls().__name__, "_diffusers_version": diffusers.__version__, **cfg}
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def _split_shards(sd: dict[str, torch.Tensor], shards: int) -> list[list[str]]:
    """Contiguous key groups of roughly equal byte size, every group non-empty."""
    keys = list(sd)
    if not 1 <= shards <= len(keys):
        raise ValueError(f"shards must be in [1, {len(keys)}], got {shards}")
    sizes = [sd[k].numel() * sd[k].element_size() for k in keys]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for i, (k, n) in enumerate(zip(keys, sizes)):
        gi = min(shards - 1, int(acc * shards / total)) if total else 0
        # leave at least one key for each remaining group
        gi = max(gi, shards - (len(keys) - i))
        # never skip a group
        while gi > 0 and not groups[gi - 1]:
            gi -= 1
        groups[gi].append(k)
        acc += n
    assert all(groups), "empty shard"
    return groups


def save_backbone(dirpath, sd: dict[str, torch.Tensor], config: dict | None = None, shards: int = 1) -> pathlib.Path:
    """Write config.json + safetensors (single file, or ``shards`` files + index.json) into ``dirpath``."""
    dirpath = pathlib.Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "config.json").write_text(_config_json(config))
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    meta = {"format": "pt"}
    if shards == 1:
        save_file(sd, str(dirpath / DIFFUSERS_WEIGHTS), metadata=meta)
        return dirpath
    weight_map: dict[str, str] = {}
    for i, group in enumerate(_split_shards(sd, shards), start=1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in group}, str(dirpath / fname), metadata=meta)
        weight_map.update({k: fname for k in group})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dirpath / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return dirpath


def make_checkpoint(
    root,
    *,
    dtype: str = "f32",
    layout: str = "official",
    shards: int = 1,
    seed: int = 0,
    config: dict | None = None,
) -> dict:
    """Write ROOT/transformer (seed) and ROOT/unconditional_transformer (seed + 1).

    Returns {"transformer": model_cond, "unconditional_transformer": model_uncond}: float32 diffusers
    models holding exactly the values that were saved, upcast (bf16/f16: rounded weights; fp8:
    fp8.float() * scale[row], other tensors bf16-rounded)."""
    if dtype not in (*DTYPES, "fp8"):
        raise ValueError(f"dtype must be one of f32, bf16, f16, fp8; got {dtype!r}")
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers'; got {layout!r}")
    root = pathlib.Path(root)
    models = {}
    for i, name in enumerate(BACKBONES):
        model = make_model(seed + i, config)
        sd = diffusers_state_dict(model)
        if layout == "official":
            sd = diffusers_to_official(sd)
        if dtype == "fp8":
            stored = to_fp8(sd)
            values = dequantized_official(stored)
        else:
            stored = {k: v.to(DTYPES[dtype]).contiguous() for k, v in sd.items()}
            values = {k: v.float() for k, v in stored.items()}
        save_backbone(root / name, stored, config=config, shards=shards)
        if layout == "official":
            values = official_to_diffusers(values)
        model.load_state_dict(values, strict=True)
        models[name] = model.eval()
    return models


# ---------------------------------------------------------------------------------------------
# helpers for tests


def load_backbone(dirpath) -> dict[str, torch.Tensor]:
    """Read every tensor of a backbone dir (single file or sharded via index.json)."""
    from safetensors.torch import load_file

    dirpath = pathlib.Path(dirpath)
    index = dirpath / DIFFUSERS_INDEX
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [DIFFUSERS_WEIGHTS]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(dirpath / f)))
    return out


def example_inputs(config: dict | None = None, *, n_text: int = 5, grid: tuple[int, int] = (2, 3), t: float = 0.7,
                   seed: int = 123) -> dict[str, torch.Tensor]:
    """Batch-1 conditional-style packed inputs (text tokens then image tokens) for the diffusers forward."""
    cfg = _full_config(config)
    gh, gw = grid
    n_img = gh * gw
    L = n_text + n_img
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, L, cfg["in_channels"], generator=g)
    feats = torch.randn(1, L, cfg["llm_features_dim"], generator=g)
    pos = torch.zeros(1, L, 3, dtype=torch.long)
    pos[0, :n_text, :] = torch.arange(n_text)[:, None]
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos[0, n_text:, 0] = 65536
    pos[0, n_text:, 1] = 65536 + yy.flatten()
    pos[0, n_text:, 2] = 65536 + xx.flatten()
    indicator = torch.full((1, L), 2, dtype=torch.long)
    indicator[0, :n_text] = 3
    hidden[0, :n_text] = 0.0  # "text_z_padding"
    feats[0, n_text:] = 0.0
    return {
        "hidden_states": hidden,
        "timestep": torch.tensor([t]),
        "encoder_hidden_states": feats,
        "position_ids": pos,
        "segment_ids": torch.ones(1, L, dtype=torch.long),
        "indicator": indicator,
    }
