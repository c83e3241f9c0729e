"""Tiled decoding: apply a latent -> image function window by window and cross-fade the overlaps (docs/vae.md)."""

from __future__ import annotations

import math

import torch

from gguf_dit.errors import InputError

#: Smallest tile (latent pixels) `run` accepts. The tiled up path sees a radius of 8.5 latent pixels around each
#: pixel in the demo decoder (two ResNets of two 3x3 convs per up block, plus the upsample convs, weighted by
#: 1/scale) and 12.25 in FLUX.2's (three per block), and every window normalises its GroupNorms on its own
#: statistics: a window not much wider than that radius has no pixel free of its own zero-padded border, and its
#: statistics are not the picture's. Measured on the 128×128 demo's VAE (docs/vae.md; 2 GroupNorm groups, so a
#: window's statistics follow its content closely): on 256x256 pictures tile 4 changes 27-30 % of the pixels by more
#: than 16 levels, 16 still 9-11 %, 24 only 2-3 % (the 64×64 demo's VAE: 3 % at 16, 0.8 % at 24).
MIN_TILE = 24


def check_tile(tile: int | None) -> None:
    """Refuse a tile size that wrecks the picture (``MIN_TILE``); None is no tiling."""
    if tile is not None and int(tile) < MIN_TILE:
        raise InputError(f"tile {tile} is below the minimum of {MIN_TILE} latent pixels ({MIN_TILE * 8} image pixels): smaller "
                         "windows wreck the picture (the decoder's receptive field and per-window normalisation); "
                         f"use {MIN_TILE} or more, or no tiling")


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of size ``tile`` covering [0, n): as few as keep every overlap >= ``overlap``,
    spread evenly (so the last window ends exactly at n)."""
    if n <= tile:
        return [0]
    count = math.ceil((n - overlap) / (tile - overlap))
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, ramp: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D blending weight of one window: rises linearly over ``ramp`` pixels on sides that border another window,
    flat 1 on sides at the image border. Never zero, so weights can always be normalised."""
    w = torch.ones(length, dtype=torch.float32)
    if ramp > 0:
        r = (torch.arange(length, dtype=torch.float32) + 0.5) / ramp
        if not at_start:
            w = torch.minimum(w, r)
        if not at_end:
            w = torch.minimum(w, r.flip(0))
    return w


def tiled_apply(fn, z: torch.Tensor, tile: int, overlap: int, scale: int, out_channels: int) -> torch.Tensor:
    """Apply ``fn`` (latent (1, C, h, w) -> image (1, out_channels, h*scale, w*scale)) window by window.

    Windows are ``tile`` x ``tile`` latent pixels (clipped to the latent), neighbours overlap by at least
    ``overlap`` latent pixels. Outputs are blended as ``sum(w_i * x_i) / sum(w_i)`` with separable linear ramps
    ``w_i`` of ``overlap * scale`` output pixels on inner edges, so overlaps cross-fade and a pointwise ``fn``
    reproduces its untiled result exactly.
    """
    _, _, h, w = z.shape
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    out = torch.zeros(1, out_channels, h * scale, w * scale, dtype=torch.float32, device=z.device)
    acc = torch.zeros(1, 1, h * scale, w * scale, dtype=torch.float32, device=z.device)
    rp = overlap * scale
    for y0 in ys:
        th = min(tile, h)
        wy = _ramp(th * scale, rp, y0 == 0, y0 + th == h).to(z.device)
        for x0 in xs:
            tw = min(tile, w)
            wx = _ramp(tw * scale, rp, x0 == 0, x0 + tw == w).to(z.device)
            piece = fn(z[:, :, y0 : y0 + th, x0 : x0 + tw]).float()
            wgt = (wy[:, None] * wx[None, :])[None, None]
            sl = (slice(None), slice(None), slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale))
            out[sl] += piece * wgt
            acc[sl] += wgt
    return out / acc
