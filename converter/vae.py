"""Ideogram 4 / FLUX.2 VAE in, ``vae.gguf`` out: a diffusers ``AutoencoderKLFlux2`` folder, or one ``.safetensors``
file as users download it (Black Forest Labs' ``ae.safetensors`` / ``flux2-vae.safetensors`` naming, or diffusers
naming), whose config is read from a ``config.json`` beside a diffusers-named file or else inferred from its shapes.

Only what decoding needs is written: ``post_quant_conv.*`` and ``decoder.*`` (diffusers names, PyTorch shapes; the
GGUF writer stores ggml's reversed ``ne`` order), so both namings give the same file. Encoder, ``quant_conv`` and
``bn`` tensors are not written; the ``bn`` running statistics go into metadata next to the official
de-normalisation constants. Format: ``docs/vae.md``.
"""

from __future__ import annotations

import dataclasses
import json
import re
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
from .reader import Header, SafetensorsFiles, weight_files
from .source import WEIGHTS_NAME  # the diffusers weights name, as for the backbones

CONFIG_NAME = "config.json"
# Not written, in either naming: BFL keeps quant_conv under encoder., diffusers at the top; bn.num_batches_tracked
# (an int64 counter BatchNorm saves) is skipped with the rest of bn.
_SKIPPED_PREFIXES = ("encoder.", "quant_conv.", "bn.")
_BN = ("bn.running_mean", "bn.running_var")
#: What shapes cannot tell about a file without config.json: FLUX.2's values (BFL's autoencoder.py hard-codes them).
FLUX2_ASSUMED = {"norm_num_groups": 32, "act_fn": "silu", "patch_size": [2, 2], "batch_norm_eps": 1e-4}


def _find_dir(vae_dir: Path) -> Path:
    if not vae_dir.exists():
        raise SourceError("does not exist", path=vae_dir)
    if not vae_dir.is_dir():
        raise SourceError("expected a VAE folder (config.json + diffusion_pytorch_model.safetensors) or a .safetensors VAE file", path=vae_dir)
    if not (vae_dir / CONFIG_NAME).exists() and (vae_dir / "vae" / CONFIG_NAME).exists():
        return vae_dir / "vae"  # a checkpoint root was given
    return vae_dir


def read_vae_config(vae_dir: Path) -> tuple[VAEConfig, dict]:
    p = vae_dir / CONFIG_NAME
    if not p.exists():
        raise SourceError("missing (a diffusers AutoencoderKLFlux2 config is required)", path=p)
    return vae_config(read_json(p, what="config.json"), p)


def vae_config(raw: dict, p: Path, hint: str = "") -> tuple[VAEConfig, dict]:
    """A diffusers-style VAE config checked for what gguf-dit can rebuild; errors name ``p`` and end with ``hint``."""
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
        raise SourceError("unsupported VAE config: " + "; ".join(bad) + hint, path=p)
    return cfg, raw


# -- Black Forest Labs' naming (src/flux2/autoencoder.py), as diffusers' scripts/convert_flux2_to_diffusers.py maps it --
_ORIGINAL_FIXED = {
    "post_quant_conv.": "decoder.post_quant_conv.",
    "quant_conv.": "encoder.quant_conv.",
    "decoder.conv_norm_out.": "decoder.norm_out.",
}
_ORIGINAL_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_name(name: str, levels: int) -> str:
    """The BFL name of the decoder tensor ``name`` (diffusers), for a decoder of ``levels`` up blocks: BFL numbers
    them from the highest resolution (``up.0`` next to ``conv_out``), diffusers from the lowest."""
    for new, old in _ORIGINAL_FIXED.items():
        if name.startswith(new):
            return old + name[len(new):]
    if m := re.fullmatch(r"decoder\.mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"decoder.mid.block_{int(m[1]) + 1}.{m[2]}"
    if m := re.fullmatch(r"decoder\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", name):
        return f"decoder.mid.attn_1.{_ORIGINAL_ATTN.get(m[1], m[1])}.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    return name


def _naming(raw: Header, path: Path) -> str:
    """``"original"`` (BFL) or ``"diffusers"``, from the names of a single VAE file."""
    if "decoder.conv_in.weight" not in raw:
        raise SourceError("tensor missing (not a VAE decoder in Black Forest Labs' or diffusers' naming)", path=path, tensor="decoder.conv_in.weight")
    if any(k.startswith(("decoder.up_blocks.", "decoder.mid_block.")) for k in raw):
        return "diffusers"
    return "original"


def _shape(raw: Header, path: Path, name: str, ndim: int) -> tuple[int, ...]:
    if name not in raw:
        raise SourceError("tensor missing", path=path, tensor=name)
    shape = raw[name][2]
    if len(shape) != ndim:
        raise SourceError(f"shape {list(shape)} is not {ndim}-D", path=path, tensor=name)
    return shape


def infer_config(raw: Header, path: Path, naming: str) -> dict:
    """A diffusers-style config for a VAE file without config.json: channels, depth, latent and output channels,
    the mid attention and ``post_quant_conv`` from the tensors; the rest (``FLUX2_ASSUMED``) is FLUX.2's."""
    pattern = r"decoder\.up\.(\d+)\." if naming == "original" else r"decoder\.up_blocks\.(\d+)\."
    found = {int(m[1]) for k in raw if (m := re.match(pattern, k))}
    levels = max(found) + 1 if found else 0
    if not 0 < levels <= MAX_LEVELS:
        raise SourceError(f"{levels} decoder up blocks; expected 1 to {MAX_LEVELS}", path=path)

    def name(n: str) -> str:
        return original_name(n, levels) if naming == "original" else n

    # up_blocks.0 (diffusers) is the lowest resolution; block_out_channels lists the highest first.
    chans = [_shape(raw, path, name(f"decoder.up_blocks.{i}.resnets.0.conv1.weight"), 4)[0] for i in range(levels)]
    resnets = 0
    while resnets <= MAX_LAYERS_PER_BLOCK and name(f"decoder.up_blocks.0.resnets.{resnets}.conv1.weight") in raw:
        resnets += 1
    return {
        "_class_name": "AutoencoderKLFlux2",
        "_inferred_from": f"tensor shapes ({'Black Forest Labs' if naming == 'original' else 'diffusers'} naming)",
        "block_out_channels": chans[::-1],
        "layers_per_block": resnets - 1,
        "latent_channels": _shape(raw, path, name("decoder.conv_in.weight"), 4)[1],
        "out_channels": _shape(raw, path, name("decoder.conv_out.weight"), 4)[0],
        # By prefix, so that one misnamed tensor is reported as such rather than turning the block off.
        "mid_block_add_attention": any(k.startswith("decoder.mid.attn_1." if naming == "original" else "decoder.mid_block.attentions.") for k in raw),
        "use_post_quant_conv": any(k.startswith(name("post_quant_conv.")) for k in raw),
        **FLUX2_ASSUMED,
    }


@dataclasses.dataclass
class _Source:
    """A VAE source located: its weight files, what errors name, its config, and each decoder tensor's name in it."""

    where: Path
    files: list[Path]
    cfg: VAEConfig
    raw_cfg: dict
    names: dict[str, str]  # diffusers name -> the name in the files
    origin: str  # where the config came from, for shape errors


def _locate(src: Path) -> _Source:
    if src.is_file() and src.suffix == ".safetensors":
        files = SafetensorsFiles([src], src)
        try:
            raw = files.headers()
        finally:
            files.close()
        naming = _naming(raw, src)
        beside = src.parent / CONFIG_NAME
        if naming == "diffusers" and beside.exists():  # vae/diffusion_pytorch_model.safetensors named directly
            cfg, raw_cfg = read_vae_config(src.parent)
            origin = f"from {beside}"
        else:
            hint = (f" (config inferred from the tensor shapes, with FLUX.2's {', '.join(f'{k} {v}' for k, v in FLUX2_ASSUMED.items())} "
                    "assumed: a file without config.json cannot tell them)")
            cfg, raw_cfg = vae_config(infer_config(raw, src, naming), src, hint)
            origin = "from the file's other shapes"
        levels = len(cfg.block_out_channels)
        inv = decoder_inventory(cfg)
        names = {n: original_name(n, levels) if naming == "original" else n for n in inv}
        return _Source(src, [src], cfg, raw_cfg, names, origin)
    vae_dir = _find_dir(src)
    cfg, raw_cfg = read_vae_config(vae_dir)
    files = weight_files(vae_dir, WEIGHTS_NAME, "a VAE folder")
    return _Source(files[0] if len(files) == 1 else vae_dir, files, cfg, raw_cfg, {n: n for n in decoder_inventory(cfg)}, "from config.json")


def is_vae_source(path: Path) -> bool:
    """Whether ``path`` is a VAE by itself, not a checkpoint or backbone: a ``.safetensors`` file holding a decoder
    (any naming) or a folder whose config.json names ``AutoencoderKLFlux2``."""
    if path.is_dir():
        try:
            return (path / CONFIG_NAME).is_file() and read_json(path / CONFIG_NAME, what="config.json").get("_class_name") == "AutoencoderKLFlux2"
        except SourceError:
            return False
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    files = SafetensorsFiles([path], path)
    try:
        return "decoder.conv_in.weight" in files.headers()
    except SourceError:
        return False  # the backbone reader then says what is wrong with it
    finally:
        files.close()


def _open(s: _Source) -> tuple[SafetensorsFiles, list[tuple[str, tuple[int, ...]]], int]:
    """The weights (keyed by diffusers names), (name, shape) of every decoder tensor and the count of skipped ones;
    checks presence, shapes and strays, naming each tensor as the file does."""
    src = SafetensorsFiles(s.files, s.where)
    try:
        raw = src.headers()
        inv = decoder_inventory(s.cfg)
        expected = set(s.names.values())
        strays = sorted(k for k in raw if k not in expected and not k.startswith(_SKIPPED_PREFIXES))
        if strays:
            raise SourceError(f"unexpected tensor (not part of the decoder the config describes, {s.origin}; {len(strays)} in all)",
                              path=src.where, tensor=strays[0])
        for name, shape in inv.items():
            stored = s.names[name]
            if stored not in raw:
                raise SourceError("tensor missing", path=src.where, tensor=stored)
            got = raw[stored][2]
            # BFL's checkpoints (and older diffusers ones) store the mid attention projections as 1x1 convs (C, C, 1, 1).
            if not (got == shape or (len(shape) == 2 and got == shape + (1, 1) and ".attentions." in name)):
                raise SourceError(f"shape {list(got)}, expected {list(shape)} {s.origin}", path=src.where, tensor=stored)
        weights = src.weights({k: v for k, v in raw.items() if k in expected or k in _BN})
        src.tensors = {name: weights[s.names[name]] for name in inv} | {k: weights[k] for k in _BN if k in weights}
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
    """A VAE source opened and checked, ready to write."""

    source: Path  # the weights file, or the folder of several
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


def prepare_vae(source: str | Path, *, dtype: str = "f16") -> VAEPlan:
    """Open and check the VAE at ``source`` (a folder or a .safetensors file, as ``convert_vae`` takes): config,
    tensor names and shapes, the bn statistics; writes nothing."""
    if dtype not in ("f16", "f32"):
        raise OptionError(f"unknown VAE dtype {dtype!r}; use f16 or f32")
    located = _locate(Path(source))
    cfg, raw_cfg = located.cfg, located.raw_cfg
    src, inv, skipped = _open(located)
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
    return VAEPlan(located.where, cfg, raw_cfg, src, plan, bn, dtype, skipped, nbytes)


def convert_vae(source: str | Path, out_path: str | Path, *, dtype: str = "f16", force: bool = False) -> dict:
    """Write the VAE decoder at ``source`` to ``out_path``: a diffusers folder, a checkpoint root holding ``vae/``,
    or one ``.safetensors`` file in Black Forest Labs' or diffusers' naming (``ae.safetensors``).

    ``dtype``: ``"f16"`` stores 2-D and 4-D weights as F16 (1-D norms and biases stay F32; a weight whose magnitude
    exceeds the F16 range stays F32 too), ``"f32"`` stores everything F32. Returns a summary dict. Written like
    ``gguf-dit convert``'s outputs (``output.OutputSet``): nothing is left behind on an error or Ctrl-C.
    """
    result = write_one(Path(out_path), force, lambda: prepare_vae(source, dtype=dtype), write_vae)
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
        "source": str(vae.source),
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
