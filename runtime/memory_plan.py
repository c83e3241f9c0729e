"""Memory modes: which DiT backbone keeps its weights resident and which streams them block by block, chosen from a
memory budget before anything is loaded (docs/runtime.md "Memory modes").

Modes (``--offload``; the names follow stable-diffusion.cpp's ``--offload-to-cpu``, which keeps weights in host
memory and moves them to the device when needed):

* ``none``: both backbones resident (fastest; the default when they fit);
* ``uncond``: the conditional backbone resident, the unconditional one streamed;
* ``all``: both streamed;
* ``auto``: the first of those that fits the budget.

Each mode's expected peak is summed from its parts: weights from the GGUF headers (``Ideogram4DiT.measure``), compute
buffers as ggml's allocator sizes the graphs, the graph inputs, and on the CPU (where every stage shares the RAM
budget) the text encoder, the current prompt's text features and the VAE decode. The budget is ``--max-vram`` on a
GPU backend, ``--max-ram`` on the CPU, else the device's free memory.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from gguf_dit.errors import OptionError

from .backbone_file import BackboneFile
from .dit import Ideogram4DiT, RuntimeOptions

OFFLOAD = ("auto", "none", "uncond", "all")
#: (conditional, unconditional) placement of each mode, fastest first
MODES = {"none": ("resident", "resident"), "uncond": ("resident", "stream"), "all": ("stream", "stream")}
GIB = 2**30

#: Bytes per second a streamed block is copied at, for the expected cost line. CPU: plain reads from the page cache
#: into the slot, 0.59-0.69 GB/s measured by benchmarks/memory_modes.py on this project's 2-core VM under a load of 15
#: (docs/benchmarks.md; an idle machine reads faster, a file that does not stay in the page cache comes from disk). CUDA: ggml_backend_tensor_set from pageable host
#: memory, assumed (no GPU was lent to measure it).
COPY_RATE = {"cpu": 0.6e9, "cuda": 10e9}
#: The process itself on the CPU: Python, torch (imported for the timestep sinusoid and the decoder) and the ggml
#: libraries, 233 MiB resident measured on this project's machine.
PROCESS_BYTES = 240 * 2**20
#: The FLUX.2 decoder in torch float32 on the CPU (docs/benchmarks.md, VAE decode: peaks of 1435 MiB at 512² and
#: 4338 MiB at 1024², each including the process and ≈ 200 MiB of weights): 3.9 and 3.8 KiB per output pixel.
VAE_WEIGHTS, VAE_PER_PIXEL = 200 * 2**20, 4.0 * 1024


@dataclasses.dataclass(frozen=True)
class Plan:
    offload: str  # the mode chosen: none, uncond or all
    placements: dict[str, str]  # "cond"/"uncond" -> "resident"/"stream"
    device: str  # "VRAM" or "RAM": what the budget bounds
    budget: int | None  # bytes
    budget_source: str  # "--max-vram", "--max-ram" or "free memory"
    peak: int  # expected bytes at the fullest phase
    phases: dict[str, int]  # phase -> expected bytes
    streamed_per_step: int  # bytes copied into slots per sampling step
    copy_rate: float
    unload_before_decode: bool  # free both backbones before each decode (reloaded for the next image)
    fits: bool
    #: Budget options given for the other kind of device (--max-vram on a CPU run, --max-ram on a GPU run): not applied.
    ignored: tuple[str, ...] = ()

    @property
    def extra_s_per_step(self) -> float:
        return self.streamed_per_step / self.copy_rate

    def line(self) -> str:
        """The line `run` prints at start: the choice and its expected cost."""
        who = {"none": "both backbones resident", "uncond": "conditional backbone resident, unconditional streamed block by block",
               "all": "both backbones streamed block by block"}[self.offload]
        budget = (f" of {_gib(self.budget)} free" if self.budget_source == "free memory" else f" of the {_gib(self.budget)} {self.budget_source} budget")
        budget += "" if self.fits else " (does not fit: no smaller mode exists; expect swapping or an out-of-memory failure)"
        cost = (f"; streaming copies {_gib(self.streamed_per_step)} per step, about +{self.extra_s_per_step:.2f} s/step at "
                f"~{self.copy_rate / 1e9:.2g} GB/s" if self.streamed_per_step else "")
        unload = "; backbones freed before each decode" if self.unload_before_decode else ""
        ignored = "".join(f"; {f} ignored: this run's weights are in {self.device}" for f in self.ignored)
        return f"memory: {who} (--offload {self.offload}): expected peak {_gib(self.peak)} {self.device}{budget}{cost}{unload}{ignored}"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def text_tokens_bound(caption: str, template: str, limit: int) -> int:
    """At most as many tokens as the templated caption has UTF-8 bytes (byte-level BPE never makes more tokens
    than bytes), capped at the model's limit: a bound known before the encoder is loaded."""
    import unicodedata

    return min(limit, len(unicodedata.normalize("NFC", template.replace("{caption}", caption)).encode("utf-8")))


def vae_bytes(height: int, width: int, tile: int | None) -> int:
    """Expected peak of the decode: a tiled decode holds one window (tile + 2·8 latent pixels of 8 image pixels)."""
    pixels = height * width if tile is None else min(height * width, ((tile + 16) * 8) ** 2)
    return int(VAE_WEIGHTS + VAE_PER_PIXEL * pixels)


def free_memory(backend: str) -> int:
    """The device's free memory: a GPU's as ggml reports it, the CPU's MemAvailable."""
    if backend != "cpu":
        from gguf_dit.ggml_ops import devices

        return next(d.memory_free for d in devices() if d.kind == "gpu")
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable"))


def plan(cond: BackboneFile, uncond: BackboneFile | None, *, backend: str, height: int, width: int, n_text: int,
         offload: str = "auto", budget: int | None = None, budget_source: str | None = None, options: RuntimeOptions | None = None,
         tile: int | None = None, encoder: Path | None = None, cfg_steps: float = 1.0) -> Plan:
    """The fastest mode that fits (or the one asked for) for one image of this size and a prompt of at most ``n_text``
    tokens. ``backend``: "cpu" or a GPU backend's name. ``budget`` None: the device's free memory (then a mode that
    does not fit is still chosen, the smallest, and only reported). ``cfg_steps``: the share of steps that run the
    unconditional backbone. An explicit budget that no allowed mode fits is an ``OptionError`` with the numbers."""
    from .sampler import token_grid

    if offload not in OFFLOAD:
        raise OptionError(f"--offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
    options = options or RuntimeOptions()
    on_cpu = backend == "cpu"
    if not on_cpu and options.kv_scale is None:  # the graph a GPU backend builds (sized on the CPU)
        options = dataclasses.replace(options, kv_scale=1 / 128)
    grid = token_grid(height, width)
    given = budget is not None
    source = budget_source or "free memory"
    if budget is None:
        budget = free_memory(backend)
    sizes: dict[tuple[str, str], dict[str, int]] = {}

    def measure(role: str, placement: str) -> dict[str, int]:
        if (role, placement) not in sizes:
            f, n = (cond, n_text) if role == "cond" else (uncond, 0)
            sizes[role, placement] = Ideogram4DiT.measure(f, dataclasses.replace(options, placement=placement), n_text=n, grid=grid)
        return sizes[role, placement]

    roles = ["cond"] + (["uncond"] if uncond is not None else [])
    text = 2 * n_text * cond.config.llm_features_dim * 4  # the caller's features and the sampler's read-only copy
    candidates = list(MODES) if offload == "auto" else [offload]
    tried = []
    for mode in candidates:
        place = dict(zip(("cond", "uncond"), MODES[mode]))
        m = {r: measure(r, place[r]) for r in roles}
        weights = sum(m[r]["weights"] for r in roles)
        work = sum(m[r]["compute"] + m[r]["inputs"] for r in roles)
        streamed = sum(m[r]["streamed"] * (cfg_steps if r == "uncond" else 1.0) for r in roles if place[r] == "stream")
        if on_cpu:
            host = sum(m[r]["host"] for r in roles)
            enc = encoder.stat().st_size if encoder is not None else 0
            decode_kept = weights + host + work + vae_bytes(height, width, tile)
            phases = {"encode": enc + text // 2, "sample": weights + host + work + text, "decode": decode_kept}
            phases = {k: v + PROCESS_BYTES for k, v in phases.items()}
            alone = vae_bytes(height, width, tile) + PROCESS_BYTES
            unload = phases["decode"] > budget and max(phases["sample"], alone) <= budget
            if unload:
                phases["decode"] = alone
        else:  # the encoder and the decoder run in host memory, not on the device
            phases, unload = {"sample": weights + work}, False
        peak = max(phases.values())
        p = Plan(mode, {r: place[r] for r in roles}, "RAM" if on_cpu else "VRAM", budget, source, peak, phases, int(streamed),
                 COPY_RATE["cpu" if on_cpu else "cuda"], unload, peak <= budget)
        tried.append(p)
        if p.fits:
            return p
    if given:
        each = ", ".join(f"{p.offload} {_gib(p.peak)}" for p in tried)
        raise OptionError(f"the model does not fit the {_gib(budget)} {source} budget at {width}x{height}: expected peak "
                          f"{each} {tried[0].device} (--offload {' / '.join(p.offload for p in tried)}); raise the budget or draw smaller images")
    return tried[-1]


def check_budget(value: float | None, flag: str) -> int | None:
    if value is None:
        return None
    if not (value > 0 and math.isfinite(value)):
        raise OptionError(f"{flag} must be a positive number of GiB, got {value}")
    return int(value * GIB)
