"""Ideogram 4 / FLUX.2 VAE (diffusers ``AutoencoderKLFlux2`` folder) in, ``vae.gguf`` out.

Only what decoding needs is written: ``post_quant_conv.*`` and ``decoder.*`` (diffusers names, PyTorch shapes; the
GGUF writer stores ggml's reversed ``ne`` order). Encoder, ``quant_conv`` and ``bn`` tensors are not written; the
``bn`` running statistics go into metadata next to the official de-normalisation constants. Format: ``docs/vae.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from gguf_dit import __version__
from gguf_dit import keys
from gguf_dit.errors import GgufDitError, SourceError
from gguf_dit.arch.latent import LATENT_SCALE, LATENT_SHIFT
from gguf_dit.arch.vae import ARCH as VAE_ARCH, NORM_EPS, VAEConfig, decoder_inventory

from .gguf_out import atomic_gguf
from .inputs import read_json
from .output import HEADER_ALLOWANCE, OutputSet, check_location
from .source import open_safetensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
F16_MAX = 65504.0
_SKIPPED_PREFIXES = ("encoder.", "quant_conv.", "bn.")


def _short(e: BaseException) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s[:160]


def _find_dir(vae_dir: Path) -> Path:
    if not vae_dir.exists():
        raise SourceError("does not exist", path=vae_dir)
    if not vae_dir.is_dir():
        raise SourceError("expected a VAE folder (config.json + diffusion_pytorch_model.safetensors)", path=vae_dir)
    if not (vae_dir / CONFIG_NAME).exists() and (vae_dir / "vae" / CONFIG_NAME).exists():
        return vae_dir / "vae"  # a checkpoint root was given
    return vae_dir


def read_vae_config(vae_dir: Path) -> tuple[VAEConfig, dict]:
    p = vae_dir / CONFIG_NAME
    if not p.exists():
        raise SourceError("missing (a diffusers AutoencoderKLFlux2 config is required)", path=p)
    raw = read_json(p, what="config.json")
    cls = raw.get("_class_name")
    if cls is not None and cls != "AutoencoderKLFlux2":
        raise SourceError(f"_class_name is {str(cls)[:60]!r}, expected 'AutoencoderKLFlux2'", path=p)
    try:
        enc_ch = raw.get("block_out_channels", [128, 256, 512, 512])
        dec_ch = raw.get("decoder_block_out_channels") or enc_ch
        up_types = raw.get("up_block_types", ["UpDecoderBlock2D"] * len(dec_ch))
        patch = raw.get("patch_size", [2, 2])
        if isinstance(patch, int):
            patch = [patch, patch]
        if len(patch) != 2 or patch[0] != patch[1]:
            raise SourceError(f"patch_size {str(patch)[:60]} is not square", path=p)
        if len(dec_ch) > MAX_LEVELS or not 0 < int(raw.get("norm_num_groups", 32)) or not 0 < int(raw.get("layers_per_block", 2)) <= MAX_LAYERS_PER_BLOCK:
            raise SourceError(f"block_out_channels, norm_num_groups or layers_per_block out of range (at most {MAX_LEVELS} levels of "
                              f"{MAX_LAYERS_PER_BLOCK} layers, at least 1 group)", path=p)
        cfg = VAEConfig(
            block_out_channels=tuple(int(c) for c in dec_ch),
            layers_per_block=int(raw.get("layers_per_block", 2)),
            latent_channels=int(raw.get("latent_channels", 32)),
            out_channels=int(raw.get("out_channels", 3)),
            norm_num_groups=int(raw.get("norm_num_groups", 32)),
            mid_block_add_attention=bool(raw.get("mid_block_add_attention", True)),
            use_post_quant_conv=bool(raw.get("use_post_quant_conv", True)),
            patch_size=int(patch[0]),
            batch_norm_eps=float(raw.get("batch_norm_eps", 1e-4)),
        )
        bad = cfg.problems()
        up_types = list(up_types)
    except (TypeError, ValueError) as e:
        raise SourceError(f"bad config value ({_short(e)})", path=p) from None
    act = raw.get("act_fn", "silu")
    if act not in ("silu", "swish"):
        bad.append(f"act_fn {str(act)[:60]!r} is not silu")
    if up_types != ["UpDecoderBlock2D"] * len(cfg.block_out_channels):
        bad.append(f"up_block_types {str(up_types)[:120]} are not all UpDecoderBlock2D (one per decoder level)")
    if not 0 <= cfg.batch_norm_eps < float("inf"):
        bad.append(f"batch_norm_eps {cfg.batch_norm_eps} is not a finite non-negative number")
    if cfg.token_dim != LATENT_SHIFT.shape[0]:
        bad.append(f"latent_channels {cfg.latent_channels} x patch {cfg.patch_size}^2 != 128 (Ideogram 4 needs 32 latent channels)")
    if bad:
        raise SourceError("unsupported VAE config: " + "; ".join(bad), path=p)
    return cfg, raw


class _Weights:
    """Memory-mapped safetensors reader returning float32 numpy arrays (F32/F16/BF16 sources)."""

    def __init__(self, path: Path):
        self.path = path
        if not path.exists():
            raise SourceError("missing (the VAE weights file)", path=path)
        self.f = open_safetensors(path)
        self.keys = set(self.f.keys())

    def close(self) -> None:
        self.f = None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.f.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        import torch

        try:
            t = self.f.get_tensor(key)
        except Exception as e:
            raise SourceError(f"cannot read tensor data ({_short(e)}); the file may be truncated or corrupt", path=self.path, tensor=key) from None
        if not t.is_floating_point():
            raise SourceError(f"dtype {t.dtype} is not a float type", path=self.path, tensor=key)
        a = t.to(torch.float32).numpy()
        if not np.isfinite(a).all():
            bad = int(np.flatnonzero(~np.isfinite(a.reshape(-1)))[0])
            raise SourceError(f"non-finite value (NaN or Inf) at flat index {bad}", path=self.path, tensor=key)
        return a


def _plan(cfg: VAEConfig, w: _Weights) -> list[tuple[str, str, tuple[int, ...]]]:
    """(gguf name, source key, target shape) for every decoder tensor; checks presence, shapes, strays."""
    inv = decoder_inventory(cfg)
    plan = []
    for name, shape in inv.items():
        if name not in w.keys:
            raise SourceError("tensor missing", path=w.path, tensor=name)
        got = w.shape(name)
        # Older checkpoints store the mid attention projections as 1x1 convs (C, C, 1, 1).
        ok = got == shape or (len(shape) == 2 and got == shape + (1, 1) and ".attentions." in name)
        if not ok:
            raise SourceError(f"shape {list(got)}, expected {list(shape)} from config.json", path=w.path, tensor=name)
        plan.append((name, name, shape))
    strays = sorted(k for k in w.keys if k not in inv and not k.startswith(_SKIPPED_PREFIXES))
    if strays:
        raise SourceError(f"unexpected tensor (not part of the decoder config.json describes; {len(strays)} in all)", path=w.path, tensor=strays[0])
    return plan


#: Far above FLUX.2's 4 levels of 2 resnets: bounds the tensor inventory a hostile config.json can ask for.
MAX_LEVELS, MAX_LAYERS_PER_BLOCK = 16, 64


@dataclasses.dataclass
class VAEPlan:
    """A VAE folder opened and checked, ready to write."""

    vae_dir: Path
    cfg: VAEConfig
    raw_cfg: dict
    weights: "_Weights"
    plan: list[tuple[str, str, tuple[int, ...]]]
    bn: dict[str, np.ndarray]
    dtype: str
    nbytes: int  # upper bound of the output size (every tensor F32), for the free-space check

    def close(self) -> None:
        self.weights.close()


def prepare_vae(vae_dir: str | Path, *, dtype: str = "f16") -> VAEPlan:
    """Open and check the VAE at ``vae_dir`` (config, tensor names and shapes, the bn statistics); writes nothing."""
    if dtype not in ("f16", "f32"):
        raise GgufDitError(f"unknown VAE dtype {dtype!r}; use f16 or f32")
    vae_dir = _find_dir(Path(vae_dir))
    cfg, raw_cfg = read_vae_config(vae_dir)
    w = _Weights(vae_dir / WEIGHTS_NAME)
    try:
        plan = _plan(cfg, w)
        bn = {}
        for k in ("bn.running_mean", "bn.running_var"):
            if k in w.keys:
                shp = w.shape(k)
                if shp != (cfg.token_dim,):
                    raise SourceError(f"shape {list(shp)}, expected [{cfg.token_dim}]", path=w.path, tensor=k)
                bn[k] = w.get(k).astype(np.float32)
        if "bn.running_var" in bn and (bn["bn.running_var"] + cfg.batch_norm_eps <= 0).any():
            raise SourceError("running_var + batch_norm_eps is not positive", path=w.path, tensor="bn.running_var")
    except BaseException:
        w.close()
        raise
    nbytes = sum(4 * int(np.prod(shape)) + 512 for _, _, shape in plan) + len(json.dumps(raw_cfg)) + HEADER_ALLOWANCE
    return VAEPlan(vae_dir, cfg, raw_cfg, w, plan, bn, dtype, nbytes)


def convert_vae(vae_dir: str | Path, out_path: str | Path, *, dtype: str = "f16", force: bool = False) -> dict:
    """Write the VAE decoder at ``vae_dir`` (diffusers folder, or a checkpoint root holding ``vae/``) to ``out_path``.

    ``dtype``: ``"f16"`` stores 2-D and 4-D weights as F16 (1-D norms and biases stay F32; a weight whose magnitude
    exceeds the F16 range stays F32 too), ``"f32"`` stores everything F32. Returns a summary dict. Written like
    ``gguf-dit convert``'s outputs (``output.OutputSet``): nothing is left behind on an error or Ctrl-C.
    """
    out_path = Path(out_path)
    check_location(out_path.parent, [out_path.name], force=force)
    vae = prepare_vae(vae_dir, dtype=dtype)
    try:
        with OutputSet(out_path.parent, [out_path.name], force=force, need_bytes=vae.nbytes) as outs:
            result = write_vae(vae, outs.path(out_path.name))
    finally:
        vae.close()
    result["path"] = str(out_path)
    return result


def write_vae(vae: VAEPlan, out_path: Path) -> dict:
    """Write a prepared VAE to ``out_path`` (itself written under a temporary name and renamed)."""
    t0 = time.perf_counter()
    cfg, raw_cfg, w, plan, bn, dtype = vae.cfg, vae.raw_cfg, vae.weights, vae.plan, vae.bn, vae.dtype
    # Every tensor is read and encoded before the header is written: a tensor's type depends on its values.
    tensors: list[tuple[str, np.ndarray]] = []
    types: dict[str, int] = {}
    kept_f32: list[str] = []
    bytes_in = 0
    for name, key, shape in plan:
        a = w.get(key).reshape(shape)
        bytes_in += a.nbytes
        if dtype == "f16" and a.ndim > 1:
            if np.abs(a).max(initial=0.0) > F16_MAX:
                kept_f32.append(name)
                enc = np.ascontiguousarray(a, dtype=np.float32)
            else:
                enc = a.astype(np.float16)
        else:
            enc = np.ascontiguousarray(a, dtype=np.float32)
        tname = "F16" if enc.dtype == np.float16 else "F32"
        types[tname] = types.get(tname, 0) + 1
        tensors.append((name, enc))
    skipped = sorted(k for k in w.keys if k.startswith(_SKIPPED_PREFIXES))

    with atomic_gguf(out_path, VAE_ARCH) as (writer, tmp):
        writer.add_name("Ideogram 4 VAE decoder (FLUX.2 KL)")
        a = VAE_ARCH
        writer.add_array(f"{a}.block_out_channels", [int(c) for c in cfg.block_out_channels])
        writer.add_uint32(f"{a}.layers_per_block", cfg.layers_per_block)
        writer.add_uint32(f"{a}.latent_channels", cfg.latent_channels)
        writer.add_uint32(f"{a}.out_channels", cfg.out_channels)
        writer.add_uint32(f"{a}.norm_num_groups", cfg.norm_num_groups)
        writer.add_float32(keys.VAE_NORM_EPS, NORM_EPS)
        writer.add_bool(f"{a}.mid_block_add_attention", cfg.mid_block_add_attention)
        writer.add_bool(f"{a}.use_post_quant_conv", cfg.use_post_quant_conv)
        writer.add_uint32(f"{a}.patch_size", cfg.patch_size)
        writer.add_uint32(keys.VAE_SCALE_FACTOR, cfg.scale_factor)
        writer.add_float32(f"{a}.batch_norm_eps", cfg.batch_norm_eps)
        writer.add_string(f"{a}.latent_norm_source", "official")
        writer.add_array(keys.VAE_LATENT_SHIFT, [float(x) for x in LATENT_SHIFT])
        writer.add_array(keys.VAE_LATENT_SCALE, [float(x) for x in LATENT_SCALE])
        if "bn.running_mean" in bn and "bn.running_var" in bn:
            writer.add_array(keys.VAE_BN_MEAN, [float(x) for x in bn["bn.running_mean"]])
            writer.add_array(keys.VAE_BN_VAR, [float(x) for x in bn["bn.running_var"]])
        writer.add_string(keys.CONVERTER_VERSION, __version__)
        writer.add_string(keys.VAE_DTYPE, dtype)
        writer.add_string(keys.SOURCE_FILES, WEIGHTS_NAME)
        writer.add_string(keys.SOURCE_CONFIG, json.dumps(raw_cfg, separators=(",", ":"), sort_keys=True))
        for name, arr in tensors:
            writer.add_tensor(name, arr)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()

    bn_diff = None
    if len(bn) == 2:
        scale = np.sqrt(bn["bn.running_var"].astype(np.float64) + cfg.batch_norm_eps)
        bn_diff = {
            "shift_max_abs": float(np.abs(bn["bn.running_mean"] - LATENT_SHIFT).max()),
            "scale_max_abs": float(np.abs(scale - LATENT_SCALE).max()),
        }
    return {
        "path": str(out_path),
        "source": str(vae.vae_dir),
        "dtype": dtype,
        "tensors": len(tensors),
        "types": types,
        "kept_f32_for_range": kept_f32,
        "skipped_tensors": len(skipped),
        "bytes_in": bytes_in,
        "bytes_out": out_path.stat().st_size,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "latent_norm_source": "official",
        "checkpoint_bn": bool(bn_diff is not None),
        "checkpoint_bn_vs_official": bn_diff,
        "seconds": time.perf_counter() - t0,
    }
