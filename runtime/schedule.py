"""Sampler schedule for Ideogram 4: timesteps, guidance presets, the Euler update and the initial noise.

Why this module exists separately from the graph code: every number here must match the official
`ideogram4` package bit for bit (docs/ideogram4-model.md §14), and that is only testable if the schedule is
plain host arithmetic with no ggml and no model in sight. numpy/scipy only; torch is imported lazily
and only to draw the same initial noise the reference pipelines draw.

Conventions that differ between implementations and are pinned here:

* Time runs from noise (t ≈ 1.23e-4) up to data (t = T_MAX ≈ 0.99945), as in the official code, not the
  σ = 1 − t of diffusers/ComfyUI/sd.cpp, and the last step lands on T_MAX rather than 1.
* Everything is exposed in RUN ORDER (index 0 = first, noisiest step). The official presets store guidance
  in loop-index order (index 0 = last step); they are reversed once, here, in PRESETS.
* The u grid reproduces ``torch.linspace(0, 1, n + 1, dtype=float32)`` (what the official code uses)
  rather than ``np.linspace``, which differs from it by one float32 ulp at many entries for most n.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.special import expit, ndtri

from gguf_dit.arch.latent import TOKEN_DIM
from gguf_dit.errors import InputError

LOGSNR_MIN = -15.0
LOGSNR_MAX = 18.0
#: Clamp bounds of t; the first timestep is float32(T_MIN), the last float32(T_MAX).
T_MIN: float = 1.0 / (1.0 + math.exp(0.5 * LOGSNR_MAX))
T_MAX: float = 1.0 / (1.0 + math.exp(0.5 * LOGSNR_MIN))
#: The resolution shift is relative to this many pixels (512²).
BASE_PIXELS = 512 * 512


class ScheduleError(InputError, ValueError):
    """Bad sampler settings. A ValueError for library callers, a one-line GgufDitError for the CLI."""


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ScheduleError(f"steps must be an integer, got {steps!r}")
    if steps < 1:
        raise ScheduleError(f"steps must be at least 1, got {steps}")
    return int(steps)


def _check_guidance_values(values: Sequence[float]) -> None:
    for g in values:
        if not math.isfinite(g):
            raise ScheduleError(f"guidance values must be finite numbers, got {g!r}")


def _check_mu_std(mu: float, std: float) -> None:
    if not math.isfinite(mu):
        raise ScheduleError(f"mu must be a finite number, got {mu!r}")
    if not (math.isfinite(std) and std > 0):
        raise ScheduleError(f"std must be a finite number > 0, got {std!r}")


@dataclass(frozen=True)
class SamplerSettings:
    steps: int
    guidance: tuple[float, ...]  # run order: guidance[0] is the first (noisiest) step; len == steps
    mu: float
    std: float
    name: str = "custom"

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if len(self.guidance) != self.steps:
            raise ScheduleError(f"guidance schedule has {len(self.guidance)} entries but steps is {self.steps}")
        _check_guidance_values(self.guidance)
        _check_mu_std(self.mu, self.std)


def _preset(name: str, steps: int, main: float, polish: float, n_polish: int, mu: float, std: float) -> SamplerSettings:
    guidance = (main,) * (steps - n_polish) + (polish,) * n_polish
    return SamplerSettings(steps=steps, guidance=guidance, mu=mu, std=std, name=name)


#: Official presets (ideogram4 sampler_configs.py, docs §14.3), guidance reversed into run order.
PRESETS: dict[str, SamplerSettings] = {p.name: p for p in (
    _preset("quality-48", 48, 7.0, 3.0, 3, mu=0.0, std=1.5),
    _preset("default-20", 20, 7.0, 3.0, 2, mu=0.0, std=1.75),
    _preset("turbo-12", 12, 7.0, 3.0, 1, mu=0.5, std=1.75),
)}
# Without a preset: the official ComfyUI node's "custom" values (20 steps, constant 7.0, mu 0, std 1.75).
_CUSTOM_DEFAULTS = SamplerSettings(steps=20, guidance=(7.0,) * 20, mu=0.0, std=1.75, name="custom")


_TERM = re.compile(r"^(?P<value>[^x×*]+?)\s*(?:[x×*]\s*(?P<count>\d+))?$")


def guidance_text(g: tuple[float, ...]) -> str:
    """Run-length form of a per-step guidance schedule, e.g. 7x18+3x2 (what ``parse_guidance`` reads)."""
    return "+".join(f"{v:g}x{len(list(run))}" for v, run in itertools.groupby(g))


def parse_guidance(spec: str) -> tuple[float, ...]:
    """Parse a guidance schedule string, run order: "7x45+3x3", "7.0", "7,7,3" (also "7*45", "7×45").

    Terms are separated by "+" or ","; each is a value, optionally times a repeat count. This is also
    sd.cpp's ``guidance_schedule=`` syntax, which is in run order too.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ScheduleError(f"empty guidance schedule {spec!r}")
    out: list[float] = []
    for raw in re.split(r"[+,]", spec):
        term = raw.strip().lower()
        m = _TERM.match(term)
        if m is None:
            raise ScheduleError(f"cannot parse guidance schedule {spec!r}: bad term {raw.strip()!r}")
        try:
            value = float(m["value"])
        except ValueError:
            raise ScheduleError(f"cannot parse guidance schedule {spec!r}: bad value {m['value']!r}") from None
        count = int(m["count"]) if m["count"] is not None else 1
        if count < 1:
            raise ScheduleError(f"cannot parse guidance schedule {spec!r}: repeat count must be >= 1")
        out.extend([value] * count)
    _check_guidance_values(out)
    return tuple(out)


def _scale_guidance(base: tuple[float, ...], steps: int) -> tuple[float, ...]:
    """Stretch a preset schedule to a new step count, keeping its final "polish" run as long as it was.

    The polish run is the trailing run of the last value (e.g. the two 3.0 steps of default-20); all
    earlier steps take the first value. At least one step keeps the main value, so default-20 at
    steps=10 gives 8×7 + 2×3, at steps=2 gives 1×7 + 1×3, and any preset at steps=1 gives (7.0,).
    """
    last = base[-1]
    n_polish = next((i for i, g in enumerate(reversed(base)) if g != last), len(base))
    if n_polish == len(base):  # constant schedule
        return (last,) * steps
    n_polish = min(n_polish, steps - 1)
    return (base[0],) * (steps - n_polish) + (last,) * n_polish


def resolve_settings(preset: str | SamplerSettings | None = "default-20", *, steps: int | None = None, guidance: float | str | Sequence[float] | None = None,
                     mu: float | None = None, std: float | None = None) -> SamplerSettings:
    """Preset values overridden by the explicit arguments.

    ``preset=None`` starts from 20 steps, constant guidance 7.0, mu 0.0, std 1.75 (the official ComfyUI
    node's custom defaults). ``guidance`` is a number (constant), a run-order sequence whose length must
    equal the step count, or a string for :func:`parse_guidance` (a string naming one value is a
    constant). If ``steps`` changes the preset's step count and ``guidance`` is not given, the preset
    schedule is stretched by :func:`_scale_guidance` (same number of final polish steps). The name is
    the preset's when nothing changed its values, else "custom".
    """
    if preset is None:
        base = _CUSTOM_DEFAULTS
    elif isinstance(preset, SamplerSettings):  # e.g. an image's settings (run --from-png), overridden like a preset
        base = preset
    else:
        if not isinstance(preset, str):
            raise ScheduleError(f"preset must be a name, got {preset!r}")
        key = preset.strip().lower().replace("_", "-")  # the official constant names too: V4_DEFAULT_20 -> default-20
        key = key[3:] if key.startswith("v4-") else key
        if key not in PRESETS:
            raise ScheduleError(f"unknown sampler preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        base = PRESETS[key]

    n = base.steps if steps is None else _check_steps(steps)

    if guidance is None:
        gw = base.guidance if n == base.steps else _scale_guidance(base.guidance, n)
    elif isinstance(guidance, str):
        gw = parse_guidance(guidance)
        if len(gw) == 1:
            gw = gw * n
    elif isinstance(guidance, (int, float, np.integer, np.floating)) and not isinstance(guidance, bool):
        gw = (float(guidance),) * n
    else:
        try:
            gw = tuple(float(g) for g in guidance)
        except (TypeError, ValueError):
            raise ScheduleError(f"guidance must be a number, a sequence of numbers or a string, got {guidance!r}") from None
    if len(gw) != n:
        raise ScheduleError(f"guidance schedule has {len(gw)} entries but steps is {n}; give steps={len(gw)} or a matching schedule")

    try:
        mu_v = base.mu if mu is None else float(mu)
        std_v = base.std if std is None else float(std)
    except (TypeError, ValueError):
        raise ScheduleError(f"mu and std must be numbers, got mu={mu!r}, std={std!r}") from None

    unchanged = n == base.steps and tuple(gw) == base.guidance and mu_v == base.mu and std_v == base.std
    return SamplerSettings(steps=n, guidance=tuple(gw), mu=mu_v, std=std_v, name=base.name if unchanged else "custom")


def resolution_mean(mu: float, height: int, width: int) -> float:
    """Schedule mean shifted by half the log of the pixel count relative to 512² (+0.693 at 1024²)."""
    if height <= 0 or width <= 0:
        raise ScheduleError(f"height and width must be positive, got {height}x{width}")
    return mu + 0.5 * math.log(height * width / BASE_PIXELS)


def step_grid(steps: int) -> np.ndarray:
    """u_i = i/n as float32, rounded the way ``torch.linspace(0, 1, n + 1, dtype=float32)`` rounds.

    torch forms step = float32(1/n), then each entry as a single rounding of step·i from the start for
    the first half and of 1 − step·(n − i) from the end for the second half. float64 holds those products
    exactly, so one cast to float32 gives the same bits.
    """
    n = _check_steps(steps)
    step = np.float64(np.float32(1.0) / np.float32(n))
    i = np.arange(n + 1, dtype=np.float64)
    half = (n + 1) // 2
    u = np.where(i < half, step * i, 1.0 - step * (n - i))
    return u.astype(np.float32)


def _t_of_u(u: np.ndarray, height: int, width: int, mu: float, std: float) -> np.ndarray:
    """The clamped logit-normal warp, float64 for precision at the tails (each caller rounds it its own way);
    ndtri(0) = -inf and ndtri(1) = +inf land on the clamps."""
    _check_mu_std(mu, std)
    mean = resolution_mean(mu, height, width)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        t = 1.0 - expit(mean + std * ndtri(np.asarray(u, dtype=np.float64)))
    return np.clip(t, T_MIN, T_MAX)


def timesteps(steps: int, height: int, width: int, mu: float, std: float) -> np.ndarray:
    """The steps + 1 times in run order: step k integrates from ts[k] to ts[k + 1].

    The official loop runs i = n−1 … 0 with t = sched(u[i+1]), s = sched(u[i]); sched decreases in u,
    so run step k = n−1−i goes sched(u[n−k]) → sched(u[n−k−1]), i.e. ts = sched(u)[::-1].
    """
    return np.ascontiguousarray(_t_of_u(step_grid(steps), height, width, mu, std).astype(np.float32)[::-1])


def euler_step(z: np.ndarray, v_cond: np.ndarray, v_uncond: np.ndarray, g: float, t: float, s: float) -> np.ndarray:
    """z + (g·v_cond + (1 − g)·v_uncond)·(s − t) with the official operation order and float32 rounding.

    The official loop holds g as a float32 tensor and s − t as a Python float (exact difference of two
    float32 values) that torch rounds to float32 when it multiplies the float32 velocity.
    """
    f32 = np.float32
    g32 = f32(g)
    v = g32 * np.asarray(v_cond, dtype=f32) + (f32(1.0) - g32) * np.asarray(v_uncond, dtype=f32)
    dt = f32(float(s) - float(t))
    return (np.asarray(z, dtype=f32) + v * dt).astype(f32, copy=False)


def initial_noise(seed: int, n_tokens: int, channels: int = TOKEN_DIM) -> np.ndarray:
    """Standard normal latent (1, n_tokens, channels) float32 from torch's CPU generator.

    Same draw as diffusers' Ideogram4Pipeline with ``generator=torch.Generator("cpu").manual_seed(seed)``
    (its prepare_latents calls randn_tensor, i.e. torch.randn on the generator's device, shape
    (batch, grid_h·grid_w, in_channels), float32) and as the official pipeline when it runs on CPU.
    The official pipeline on CUDA draws from a CUDA generator, whose stream differs.
    """
    if n_tokens < 1 or channels < 1:
        raise ScheduleError(f"noise shape must be positive, got n_tokens={n_tokens}, channels={channels}")
    import torch

    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, n_tokens, channels), generator=gen, dtype=torch.float32).numpy()


def diffusers_timesteps(steps: int, height: int, width: int, mu: float, std: float) -> np.ndarray:
    """The grid diffusers' Ideogram4Pipeline steps on, as model times in run order (steps + 1 values).

    It evaluates the same logit-normal formula on a float64 grid, converts to σ = 1 − t in float32,
    and its FlowMatchEulerDiscreteScheduler (default config: shift 1) appends a terminal σ = 0, so
    the last step lands on t = 1 instead of T_MAX. Used by ``gguf-dit run --reference diffusers`` to
    reproduce that pipeline; the official loop is :func:`timesteps`.
    """
    u = np.linspace(0.0, 1.0, _check_steps(steps) + 1, dtype=np.float64)
    sigmas = (1.0 - _t_of_u(u, height, width, mu, std))[::-1][:-1].astype(np.float32)
    sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
    return (np.float32(1.0) - sigmas).astype(np.float32)
