"""The official flow-matching sampler: Euler steps with asymmetric dual-backbone CFG.

Each step runs the conditional backbone on [text tokens, image tokens] and the unconditional
backbone on the image tokens alone (no text, no negative prompt), then
``z ← z + (g·v_cond + (1 − g)·v_uncond)·(s − t)`` (ideogram4-model.md §10, §14).
A step with g = 1 skips the unconditional backbone, as sd.cpp and ComfyUI do: its weight is 0.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from gguf_dit.arch.latent import PIXELS_PER_TOKEN
from gguf_dit.errors import InputError, ModelError

from .dit import Ideogram4DiT, check_pair
from .interrupt import native_call
from .schedule import SamplerSettings, euler_step, initial_noise, resolve_settings, timesteps


@dataclasses.dataclass(frozen=True)
class StepInfo:
    index: int  # run order, 0 = first (noisiest) step
    steps: int
    t: float
    s: float
    guidance: float
    seconds: float
    uncond_ran: bool = True  # False on a guidance-1 step, which skips the unconditional backbone
    #: (z before the step (1, N, C), v_cond (N, C), v_uncond (N, C), v_uncond being v_cond on a guidance-1 step): for
    #: callers that measure the trajectory (`gguf-dit eval`). The loop's own arrays, never written after the step.
    arrays: tuple | None = dataclasses.field(default=None, repr=False, compare=False)


def token_grid(height: int, width: int) -> tuple[int, int]:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < PIXELS_PER_TOKEN or v % PIXELS_PER_TOKEN:
            raise InputError(f"{name} must be a positive multiple of {PIXELS_PER_TOKEN} pixels, got {v!r}")
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


def needs_uncond(guidance) -> bool:
    """Whether any step runs the unconditional backbone: a step with guidance exactly 1 skips it."""
    return any(float(g) != 1.0 for g in guidance)


def sample(cond: Ideogram4DiT, uncond: Ideogram4DiT | None, text_features: np.ndarray, height: int, width: int, *,
           settings: SamplerSettings | None = None, seed: int = 0, noise: np.ndarray | None = None, ts: np.ndarray | None = None,
           callback: Callable[[StepInfo, np.ndarray], None] | None = None, **choice) -> np.ndarray:
    """Sample final latent tokens (1, N, 128) float32 for one prompt's text features.

    ``settings``, or else :func:`resolve_settings`'s keywords (preset, steps, guidance, mu, std; by default
    the default-20 preset), chooses steps, per-step guidance (run order), mu and std.
    ``noise`` replaces the seeded initial noise; ``ts`` replaces the official timestep grid
    (run order, steps + 1 values), e.g. to reproduce another pipeline's schedule. ``uncond`` may be None where
    every step's guidance is 1.
    """
    grid = token_grid(height, width)
    n_tokens = grid[0] * grid[1]
    channels = cond.config.in_channels
    if settings is None:
        settings = resolve_settings(**choice)
    elif choice:
        raise InputError(f"give either settings or {', '.join(choice)}, not both")
    if uncond is not None:
        check_pair(cond, uncond)
    elif needs_uncond(settings.guidance):
        raise InputError("no unconditional backbone, but not every step's guidance is 1")
    if ts is None:
        ts = timesteps(settings.steps, height, width, settings.mu, settings.std)
    ts = np.asarray(ts, dtype=np.float32)
    if ts.shape != (settings.steps + 1,):
        raise InputError(f"timestep grid has {ts.shape[0]} values, expected {settings.steps + 1}")
    if noise is None:
        z = initial_noise(seed, n_tokens, channels)
    else:
        z = np.array(noise, dtype=np.float32, copy=True)
        if z.shape != (1, n_tokens, channels):
            raise InputError(f"noise has shape {z.shape}, expected (1, {n_tokens}, {channels}) for {height}x{width}")
    feats = np.array(text_features, dtype=np.float32, copy=True)
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    feats.setflags(write=False)  # ours for the whole loop: uploaded once, not every step
    for i in range(settings.steps):
        t0 = time.perf_counter()
        t, s = float(ts[i]), float(ts[i + 1])
        g = float(settings.guidance[i])
        with native_call(*(m.backend for m in (cond, uncond) if m is not None)):  # Ctrl-C aborts a graph compute between nodes
            v_c = cond.velocity(z[0], t, feats, grid=grid)
            # g = 1: 1·v_c + 0·v_c is v_c bit for bit; 1·v_c + 0·v_u (finite v_u) differs at most in a zero's sign.
            v_u = v_c if g == 1.0 else uncond.velocity(z[0], t, None, grid=grid)
        where = f"at step {i + 1} of {settings.steps} (t={t:.4f})"
        for m, v in ((cond, v_c), (uncond, v_u)):
            if not np.isfinite(v).all():
                raise ModelError(f"velocity contains NaN/Inf {where}", path=m.path)
        z_in, z = z, euler_step(z, v_c[None], v_u[None], g, ts[i], ts[i + 1])
        if not np.isfinite(z).all():
            raise ModelError(f"latents overflow to Inf {where}: the velocities of this file{f' and {uncond.path}' if uncond else ''} are too large", path=cond.path)
        if callback is not None:
            callback(StepInfo(i, settings.steps, t, s, g, time.perf_counter() - t0, v_u is not v_c, (z_in, v_c, v_u)), z)
    return z
