"""FLUX.2 VAE decoder for Ideogram 4: reads ``vae.gguf`` (written by ``gguf-dit convert``), decodes latents.

The decoder runs in PyTorch, not ggml: see ``docs/vae.md`` ("Why torch"). Weights stored as F16 are widened to
float32 on load; all arithmetic is float32 unless ``compute`` opts into a faster, not bit-identical layout or the
lossy bfloat16 path (``COMPUTE_MODES``; measured in ``docs/benchmarks.md``).

Decoding a DiT output (``decode_tokens``) follows the official pipeline's ``_decode`` step by step:

1. de-normalise each 128-dim token: ``z * LATENT_SCALE + LATENT_SHIFT`` (official constants by default);
2. unpatchify: token ``(y, x)`` dim ``k = (ph*2 + pw)*32 + c`` -> latent pixel ``(2y + ph, 2x + pw)``, channel ``c``;
3. ``post_quant_conv`` (1x1), then the decoder (conv_in, mid ResNet / attention / ResNet, up blocks, GroupNorm,
   SiLU, conv_out -> 3 channels);
4. clamp to [-1, 1], ``uint8 = round((x + 1) * 127.5)`` (round half to even, as ``torch.round``).

Tiled decoding (``tile=`` in latent pixels): ``post_quant_conv``, ``conv_in`` and the mid block (ResNet, global
self-attention, ResNet) run once on the whole latent, which is small; the up path, where nearly all memory and time
go, runs on overlapping windows of that result, blended linearly (``tiled_apply``). GroupNorm statistics in the up
path are then per window, so tiled output is close to, not equal to, untiled output; see ``docs/vae.md``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from gguf_dit import keys
from gguf_dit.arch.latent import LATENT_SCALE, LATENT_SHIFT
from gguf_dit.arch.vae import ARCH as VAE_ARCH, NORM_EPS, VAEConfig, decoder_inventory
from gguf_dit.errors import InputError, ModelError, OptionError
from gguf_dit.gguf_header import GGUFHeader, INTEGER_TYPES

from .gguf_file import GGUFFile
from .vae_modules import VAEDecoderModule
from .vae_tiling import tiled_apply


# compute mode -> (dtype, memory format). "exact" is the layout diffusers runs, so float32 output matches it bit for
# bit; channels-last picks other oneDNN kernels (different summation order: <= 1 uint8 level on 0.1 % of values at
# 512²; 0.8x the time on Zen 4, not consistently); bf16 rounds every conv/matmul input (lossy; docs/benchmarks.md).
COMPUTE_MODES = {
    "exact": (torch.float32, torch.contiguous_format),
    "channels_last": (torch.float32, torch.channels_last),
    "bf16": (torch.bfloat16, torch.channels_last),
}


def inventory_problems(file: GGUFFile, cfg: VAEConfig) -> list[tuple[str, str]]:
    """(tensor, problem) for every decoder tensor that is missing or has the wrong type or shape (`inspect` lists them all)."""
    out = []
    for name, shape in decoder_inventory(cfg).items():
        t = file.tensors.get(name)
        if t is None:
            out.append((name, "tensor missing"))
        elif t.type_name not in ("F32", "F16"):
            out.append((name, f"tensor type {t.type_name} unsupported (F32 or F16 only)"))
        elif t.shape != shape:
            out.append((name, f"shape {list(t.shape)}, expected {list(shape)}"))
    return out


def check_inventory(file: GGUFFile, cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every decoder tensor's type and shape from the validated header, before any data is touched."""
    for name, problem in inventory_problems(file, cfg)[:1]:
        raise ModelError(problem, path=file.path, tensor=name)
    return decoder_inventory(cfg)


def check_file(path) -> VAEConfig:
    """Header, config and tensor inventory of a VAE GGUF, without reading its weights (milliseconds)."""
    file = GGUFFile(path)
    cfg = read_config(file.header)
    check_inventory(file, cfg)
    return cfg


def read_config(h: GGUFHeader) -> VAEConfig:
    """The config from the header's typed metadata; bad types or values name the key."""
    path = h.path
    arch = h.value(keys.ARCHITECTURE, ("STRING",), required=True)
    if arch != VAE_ARCH:
        raise ModelError(f"{keys.ARCHITECTURE} is {arch!r}, not {VAE_ARCH!r} (not a gguf-dit VAE file)", path=path)
    vals = {}
    for f in dataclasses.fields(VAEConfig):
        key = keys.vae(f.name)
        if f.name == "block_out_channels":
            v = tuple(int(x) for x in h.value(key, ("ARRAY",), item=INTEGER_TYPES, required=True))
        elif f.name in ("mid_block_add_attention", "use_post_quant_conv"):
            v = bool(h.value(key, ("BOOL",), required=True))
        elif f.name == "batch_norm_eps":
            v = float(h.number(key, ("FLOAT32", "FLOAT64"), required=True))
        else:
            v = int(h.value(key, INTEGER_TYPES, required=True))
        vals[f.name] = v
    cfg = VAEConfig(**vals)
    bad = cfg.problems()
    # Informational keys the decoder does not read must still agree with what it computes.
    eps = h.value(keys.VAE_NORM_EPS, ("FLOAT32", "FLOAT64"))
    if eps is not None and not math.isclose(eps, NORM_EPS, rel_tol=1e-6):
        bad.append(f"{keys.VAE_NORM_EPS} is {eps:.7g}, but the decoder's GroupNorm eps is {NORM_EPS:g}")
    scale = h.value(keys.VAE_SCALE_FACTOR, INTEGER_TYPES)
    if scale is not None and scale != cfg.scale_factor:
        bad.append(f"{keys.VAE_SCALE_FACTOR} is {scale}, but {len(cfg.block_out_channels)} levels scale by {cfg.scale_factor}")
    # Each up-block ResNet is several tensors: a config needing more ResNets than the file has tensors is refused
    # before the tensor inventory is built from it (layers_per_block = 1e9 would loop a billion times).
    if (cfg.layers_per_block + 1) * len(cfg.block_out_channels) > len(h.tensors):
        bad.append(f"{len(cfg.block_out_channels)} up blocks of {cfg.layers_per_block + 1} ResNets need more tensors than the file's {len(h.tensors)}")
    if bad:
        raise ModelError("bad VAE config: " + "; ".join(bad), path=path)
    return cfg


def _norm_array(h: GGUFHeader, key: str, n: int) -> np.ndarray | None:
    v = h.value(key, ("ARRAY",), item=("FLOAT32", "FLOAT64"))
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float32)
    if a.shape != (n,) or not np.isfinite(a).all():
        raise ModelError(f"metadata key {key} must be {n} finite floats, got {a.shape[0]} ({int(np.isfinite(a).sum())} finite)", path=h.path)
    return a


class VAEDecoder:
    """A loaded VAE decoder plus the latent de-normalisation it applies to DiT tokens.

    ``latent_norm``: ``"official"`` (default; the constants stored in the file, which the converter takes from the
    official ``latent_norm.py``) or ``"checkpoint"`` (the VAE checkpoint's own BatchNorm statistics, shift =
    running_mean, scale = sqrt(running_var + batch_norm_eps), as diffusers' pipeline uses; only if the file has them).

    ``compute``: ``"exact"`` (default; float32, matches diffusers), ``"channels_last"`` (float32, faster, within
    float32 rounding of exact) or ``"bf16"`` (bfloat16 weights and activations, channels-last; lossy, opt-in only).
    """

    def __init__(self, module: VAEDecoderModule, cfg: VAEConfig, shift: np.ndarray, scale: np.ndarray, *, device="cpu", latent_norm: str = "official", path: Path | None = None, compute: str = "exact"):
        if compute not in COMPUTE_MODES:
            raise OptionError(f"unknown VAE compute mode {compute!r}; use one of {', '.join(COMPUTE_MODES)}")
        self.compute = compute
        self._dtype, self._layout = COMPUTE_MODES[compute]
        self.module = module.eval().to(dtype=self._dtype, memory_format=self._layout)
        self.config = cfg
        self.device = torch.device(device)
        self.latent_norm = latent_norm
        self.path = path
        self.shift = torch.as_tensor(np.asarray(shift, dtype=np.float32), device=self.device)
        self.scale = torch.as_tensor(np.asarray(scale, dtype=np.float32), device=self.device)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", *, latent_norm: str = "official", compute: str = "exact") -> "VAEDecoder":
        path = Path(path)
        if compute not in COMPUTE_MODES:
            raise OptionError(f"unknown VAE compute mode {compute!r}; use one of {', '.join(COMPUTE_MODES)}", path=path)
        if latent_norm not in ("official", "checkpoint"):
            raise ModelError(f"unknown latent_norm {latent_norm!r}; use 'official' or 'checkpoint'", path=path)
        file = GGUFFile(path)
        h = file.header
        cfg = read_config(h)
        n = cfg.token_dim
        if latent_norm == "official":
            shift = _norm_array(h, keys.VAE_LATENT_SHIFT, n)
            scale = _norm_array(h, keys.VAE_LATENT_SCALE, n)
            if shift is None or scale is None:
                if n != LATENT_SHIFT.shape[0]:
                    raise ModelError(f"no {keys.VAE_LATENT_SHIFT}/latent_scale and token dim {n} != 128", path=path)
                shift, scale = LATENT_SHIFT.copy(), LATENT_SCALE.copy()
        else:
            mean = _norm_array(h, keys.VAE_BN_MEAN, n)
            var = _norm_array(h, keys.VAE_BN_VAR, n)
            if mean is None or var is None:
                raise ModelError("latent_norm='checkpoint' but the file has no checkpoint BatchNorm statistics", path=path)
            if var.min() < 0:
                raise ModelError(f"metadata key {keys.VAE_BN_VAR} holds a negative variance ({var.min():.7g})", path=path)
            shift, scale = mean, np.sqrt(var.astype(np.float64) + cfg.batch_norm_eps).astype(np.float32)

        inv = check_inventory(file, cfg)
        state = {}
        for name, shape in inv.items():
            arr = file.tensors[name].data.astype(np.float32).reshape(shape)
            if not np.isfinite(arr).all():
                raise ModelError(f"{int(arr.size - np.isfinite(arr).sum())} non-finite values (NaN/Inf)", path=path, tensor=name)
            state[name] = torch.from_numpy(arr)
        module = VAEDecoderModule(cfg)
        module.load_state_dict(state, strict=True)
        module.to(device=torch.device(device), dtype=torch.float32)
        return cls(module, cfg, shift, scale, device=device, latent_norm=latent_norm, path=path, compute=compute)

    # -- decoding

    def _check_tile(self, tile, overlap) -> tuple[int, int] | None:
        if tile is None:
            return None
        tile = int(tile)
        if tile < 2:
            raise InputError(f"tile must be >= 2 latent pixels, got {tile}")
        ov = tile // 4 if overlap is None else int(overlap)
        if not 0 <= ov < tile:
            raise InputError(f"overlap must be in [0, tile), got {ov} for tile {tile}")
        return tile, ov

    @torch.inference_mode()
    def decode_latents(self, z, *, tile: int | None = None, overlap: int | None = None, clamp: bool = True) -> torch.Tensor:
        """VAE latents (1, latent_channels, h, w) (or without the batch dim) -> image (1, 3, h*8, w*8), float32,
        clamped to [-1, 1] unless ``clamp=False``. ``tile``/``overlap`` in latent pixels (overlap default tile//4)."""
        z = torch.as_tensor(z)
        if z.ndim == 3:
            z = z.unsqueeze(0)
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[0] != 1 or z.shape[1] != c or z.shape[2] < 1 or z.shape[3] < 1:
            raise InputError(f"latents must have shape (1, {c}, h, w), got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise InputError(f"latents must be floating point, got {z.dtype}")
        z = z.to(device=self.device, dtype=torch.float32)
        if not torch.isfinite(z).all():
            raise InputError("latents contain NaN or Inf")
        tl = self._check_tile(tile, overlap)
        z = z.to(dtype=self._dtype, memory_format=self._layout)
        if tl is None or (tl[0] >= z.shape[2] and tl[0] >= z.shape[3]):
            x = self.module(z).to(torch.float32, memory_format=torch.contiguous_format)
        else:
            # The latent-resolution part (with the global mid attention) runs whole; only the up path is tiled.
            h = self.module.low(z)
            x = tiled_apply(self.module.high, h, tl[0], tl[1], self.config.scale_factor, self.config.out_channels)
        return x.clamp(-1.0, 1.0) if clamp else x

    def tokens_to_latents(self, tokens, grid_h: int, grid_w: int) -> torch.Tensor:
        """De-normalise DiT tokens (1, N, 128) or (N, 128) and unpatchify to VAE latents (1, 32, 2*grid_h, 2*grid_w)."""
        t = torch.as_tensor(tokens)
        d = self.config.token_dim
        if t.ndim == 3:
            if t.shape[0] != 1:
                raise InputError(f"latent tokens must have batch size 1, got shape {tuple(t.shape)}")
            t = t[0]
        if t.ndim != 2 or t.shape[1] != d:
            raise InputError(f"latent tokens must have shape (1, N, {d}) or (N, {d}), got {tuple(torch.as_tensor(tokens).shape)}")
        if not t.is_floating_point():
            raise InputError(f"latent tokens must be floating point, got {t.dtype}")
        if int(grid_h) != grid_h or int(grid_w) != grid_w or grid_h < 1 or grid_w < 1:
            raise InputError(f"grid must be positive integers, got {grid_h}x{grid_w}")
        gh, gw = int(grid_h), int(grid_w)
        if t.shape[0] != gh * gw:
            raise InputError(f"{t.shape[0]} latent tokens do not fill a {gh}x{gw} grid ({gh * gw} tokens)")
        t = t.to(device=self.device, dtype=torch.float32)
        if not torch.isfinite(t).all():
            raise InputError("latent tokens contain NaN or Inf")
        p, c = self.config.patch_size, self.config.latent_channels
        t = t * self.scale + self.shift
        # (gh, gw, ph, pw, c) -> (c, gh, ph, gw, pw): dim k = (ph*p + pw)*c_total + c
        return t.view(gh, gw, p, p, c).permute(4, 0, 2, 1, 3).reshape(1, c, gh * p, gw * p).contiguous()

    def decode_tokens(self, latent_tokens, grid_h: int, grid_w: int, *, tile: int | None = None, overlap: int | None = None) -> np.ndarray:
        """DiT output tokens -> uint8 image (grid_h*16, grid_w*16, 3), as the official pipeline's ``_decode``."""
        x = self.decode_latents(self.tokens_to_latents(latent_tokens, grid_h, grid_w), tile=tile, overlap=overlap, clamp=False)
        if not bool(x.isfinite().all()):  # checked before the clamp, which would turn Inf into white
            raise ModelError("decoded image contains NaN/Inf", path=self.path)
        return to_uint8(x)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) float in [-1, 1] -> (H, W, 3) uint8 = round((clamp(x) + 1) * 127.5)."""
    x = x.float().clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
