"""Ideogram 4 / FLUX.2 VAE (diffusers ``AutoencoderKLFlux2`` folder) in, ``vae.gguf`` out.

Only what decoding needs is written: ``post_quant_conv.*`` and ``decoder.*`` (diffusers names, PyTorch shapes; the
GGUF writer stores ggml's reversed ``ne`` order). Encoder, ``quant_conv`` and ``bn`` tensors are not written; the
``bn`` running statistics go into metadata next to the official de-normalisation constants. Format: ``docs/vae.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from gguf_dit import __version__
from gguf_dit import keys
from gguf_dit.errors import OptionError, SourceError
from gguf_dit.arch.latent import LATENT_SCALE, LATENT_SHIFT
from gguf_dit.arch.vae import ARCH as VAE_ARCH, NORM_EPS, VAEConfig, decoder_inventory
from gguf_dit.ggml_ops import GGMLType

from .encode import check_range, encode_rows
from .gguf_out import OutTensor, add_config, write_gguf
from .inputs import _one_line, read_json
from .output import HEADER_ALLOWANCE, write_one
from .reader import SafetensorsFiles, weight_files
from .source import WEIGHTS_NAME  # the diffusers weights name, as for the backbones

CONFIG_NAME = "config.json"
_SKIPPED_PREFIXES = ("encoder.", "quant_conv.", "bn.")
_BN = ("bn.running_mean", "bn.running_var")


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
        raise SourceError(f"bad config value ({_one_line(e)})", path=p) from None
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


def _open(vae_dir: Path, cfg: VAEConfig) -> tuple[SafetensorsFiles, list[tuple[str, tuple[int, ...]]], int]:
    """The weights, (name, shape) of every decoder tensor and the count of skipped ones; checks presence, shapes
    and strays."""
    files = weight_files(vae_dir, WEIGHTS_NAME, "a VAE folder")
    src = SafetensorsFiles(files, files[0] if len(files) == 1 else vae_dir)
    try:
        raw = src.headers()
        inv = decoder_inventory(cfg)
        strays = sorted(k for k in raw if k not in inv and not k.startswith(_SKIPPED_PREFIXES))
        if strays:
            raise SourceError(f"unexpected tensor (not part of the decoder config.json describes; {len(strays)} in all)", path=src.where, tensor=strays[0])
        for name, shape in inv.items():
            if name not in raw:
                raise SourceError("tensor missing", path=src.where, tensor=name)
            got = raw[name][2]
            # Older checkpoints store the mid attention projections as 1x1 convs (C, C, 1, 1).
            if not (got == shape or (len(shape) == 2 and got == shape + (1, 1) and ".attentions." in name)):
                raise SourceError(f"shape {list(got)}, expected {list(shape)} from config.json", path=src.where, tensor=name)
        src.tensors = src.weights({k: v for k, v in raw.items() if k in inv or k in _BN})
    except BaseException:
        src.close()
        raise
    return src, list(inv.items()), sum(k.startswith(_SKIPPED_PREFIXES) for k in raw)


def _chunks(src: SafetensorsFiles, name: str, shape: tuple[int, ...]):
    return (c.reshape(-1, *shape[1:]) for c in src.chunks(name))


def _type(src: SafetensorsFiles, name: str, shape: tuple[int, ...], dtype: str) -> GGMLType:
    """F16 for 2-D and 4-D weights under ``dtype`` f16, unless a value lies beyond F16's range; else F32."""
    if dtype == "f32" or len(shape) == 1:
        return GGMLType.F32
    big = any(check_range(c, GGMLType.F16) is not None for c in _chunks(src, name, shape))
    src.release()
    return GGMLType.F32 if big else GGMLType.F16


#: Far above FLUX.2's 4 levels of 2 resnets: bounds the tensor inventory a hostile config.json can ask for.
MAX_LEVELS, MAX_LAYERS_PER_BLOCK = 16, 64


@dataclasses.dataclass
class VAEPlan:
    """A VAE folder opened and checked, ready to write."""

    vae_dir: Path
    cfg: VAEConfig
    raw_cfg: dict
    src: SafetensorsFiles
    plan: list[tuple[str, tuple[int, ...], GGMLType]]
    bn: dict[str, np.ndarray]
    dtype: str
    skipped: int  # encoder, quant_conv and bn tensors, not written
    nbytes: int  # upper bound of the output size (every tensor F32), for the free-space check

    def close(self) -> None:
        self.src.close()


def prepare_vae(vae_dir: str | Path, *, dtype: str = "f16") -> VAEPlan:
    """Open and check the VAE at ``vae_dir`` (config, tensor names and shapes, the bn statistics); writes nothing."""
    if dtype not in ("f16", "f32"):
        raise OptionError(f"unknown VAE dtype {dtype!r}; use f16 or f32")
    vae_dir = _find_dir(Path(vae_dir))
    cfg, raw_cfg = read_vae_config(vae_dir)
    src, inv, skipped = _open(vae_dir, cfg)
    try:
        bn = {}
        for k in _BN:
            if k in src.tensors:
                if src.tensors[k].shape != (cfg.token_dim,):
                    raise SourceError(f"shape {list(src.tensors[k].shape)}, expected [{cfg.token_dim}]", path=src.where, tensor=k)
                bn[k] = src.rows(k, 0, cfg.token_dim)
        if "bn.running_var" in bn and (bn["bn.running_var"] + cfg.batch_norm_eps <= 0).any():
            raise SourceError("running_var + batch_norm_eps is not positive", path=src.where, tensor="bn.running_var")
        # A tensor's type depends on its values, and the header (types included) precedes the data.
        plan = [(name, shape, _type(src, name, shape, dtype)) for name, shape in inv]
    except BaseException:
        src.close()
        raise
    nbytes = sum(4 * int(np.prod(shape)) + 512 for _, shape, _ in plan) + len(json.dumps(raw_cfg)) + HEADER_ALLOWANCE
    return VAEPlan(vae_dir, cfg, raw_cfg, src, plan, bn, dtype, skipped, nbytes)


def convert_vae(vae_dir: str | Path, out_path: str | Path, *, dtype: str = "f16", force: bool = False) -> dict:
    """Write the VAE decoder at ``vae_dir`` (diffusers folder, or a checkpoint root holding ``vae/``) to ``out_path``.

    ``dtype``: ``"f16"`` stores 2-D and 4-D weights as F16 (1-D norms and biases stay F32; a weight whose magnitude
    exceeds the F16 range stays F32 too), ``"f32"`` stores everything F32. Returns a summary dict. Written like
    ``gguf-dit convert``'s outputs (``output.OutputSet``): nothing is left behind on an error or Ctrl-C.
    """
    result = write_one(Path(out_path), force, lambda: prepare_vae(vae_dir, dtype=dtype), write_vae)
    result["path"] = str(out_path)
    return result


def write_vae(vae: VAEPlan, out_path: Path) -> dict:
    """Write a prepared VAE to ``out_path`` (itself written under a temporary name and renamed)."""
    t0 = time.perf_counter()
    cfg, src, bn = vae.cfg, vae.src, vae.bn

    def metadata(writer) -> None:
        writer.add_name("Ideogram 4 VAE decoder (FLUX.2 KL)")
        add_config(writer, cfg, keys.vae)
        writer.add_float32(keys.VAE_NORM_EPS, NORM_EPS)
        writer.add_uint32(keys.VAE_SCALE_FACTOR, cfg.scale_factor)
        writer.add_string(keys.VAE_LATENT_NORM_SOURCE, "official")
        writer.add_array(keys.VAE_LATENT_SHIFT, [float(x) for x in LATENT_SHIFT])
        writer.add_array(keys.VAE_LATENT_SCALE, [float(x) for x in LATENT_SCALE])
        if len(bn) == 2:
            writer.add_array(keys.VAE_BN_MEAN, [float(x) for x in bn["bn.running_mean"]])
            writer.add_array(keys.VAE_BN_VAR, [float(x) for x in bn["bn.running_var"]])
        writer.add_string(keys.CONVERTER_VERSION, __version__)
        writer.add_string(keys.VAE_DTYPE, vae.dtype)
        writer.add_string(keys.SOURCE_FILES, ",".join(f.name for f in src.files))
        writer.add_string(keys.SOURCE_CONFIG, json.dumps(vae.raw_cfg, separators=(",", ":"), sort_keys=True))

    tensors = [OutTensor(name, shape, t, lambda name=name, shape=shape: _chunks(src, name, shape), src.where, name) for name, shape, t in vae.plan]
    bytes_in = write_gguf(out_path, VAE_ARCH, metadata, tensors, encode=encode_rows, release=src.release)
    kept_f32 = [name for name, shape, t in vae.plan if vae.dtype == "f16" and len(shape) > 1 and t is GGMLType.F32]
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
        "dtype": vae.dtype,
        "tensors": len(tensors),
        "types": dict(Counter(t.name for _, _, t in vae.plan)),
        "kept_f32_for_range": kept_f32,
        "skipped_tensors": vae.skipped,
        "bytes_in": bytes_in,
        "bytes_out": out_path.stat().st_size,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "latent_norm_source": "official",
        "checkpoint_bn": bool(bn_diff is not None),
        "checkpoint_bn_vs_official": bn_diff,
        "seconds": time.perf_counter() - t0,
    }
