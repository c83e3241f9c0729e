"""`gguf-dit calibrate`: measure a float model on its own sampling trajectories (docs/quantization.md#calibrate).

1. **Activation statistics.** Every linear's input is reduced inside the same ggml graph that samples
   (``_StatsModules``: the input transposed, then its per-column sum of squares and per-column max |x| as extra graph
   outputs), accumulated over every step of every prompt and seed: llama.cpp's importance matrix (sum of squares and
   token count per input column) and SmoothQuant's per-column maxima.
2. **Fragility.** How far a backbone's velocity moves when one linear alone is quantized to the target type (ggml's
   quantizer, with the importances just measured where the type uses them, as ``convert --imatrix`` will), every
   other tensor float. Teacher-forced: the float trajectories' states (x_t, t, text) are recorded once, and each
   variant is evaluated at ``states`` of them per trajectory against the float velocity there, so no variant samples
   a trajectory of its own. Screened: each block's linears are quantized together first, then the linears of the
   ``refine`` worst blocks one by one; the linears outside the blocks are always measured one by one.
3. **Recipe.** The measured linears that cost the guided velocity most per extra byte are kept at a higher type
   (Q5_K, Q6_K, Q8_0, F16) within a byte budget. Estimated errors at the higher types assume the velocity error
   scales with the linear's importance-weighted weight error (measured for each type on the weights themselves) and
   that independent linears' errors add in quadrature.

The backbones are loaded through ``Ideogram4DiT``'s two hooks (``modules_class`` and ``replace``); the sampler,
schedule and text encoder are `run`'s own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import time
from typing import Callable

import numpy as np

from gguf_dit import hashes
from gguf_dit.errors import InputError, ModelError, OptionError
from gguf_dit.ggml_ops import Backend, GGMLType, dequantize, fits, fitting_type, quantize
from gguf_dit.imatrix import ImatrixEntry, ggml_weights, quant_weights

from .backbone_file import BackboneFile
from .caption import Prompt
from .dit import Ideogram4DiT, RuntimeOptions, check_pair
from .model_files import ModelFiles
from .pipeline import Pipeline
from .sampler import sample, token_grid
from .schedule import SamplerSettings, resolve_settings

log = logging.getLogger("gguf_dit.runtime")

FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
#: Types a protected linear may be raised to, cheapest first; only those with more bytes than the target type count.
UPGRADES = (GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.F16)
ROLES = {"cond": "transformer", "uncond": "unconditional_transformer"}
#: Extra graph nodes per linear: transpose, cont, sqr, sum_rows, abs, pool (and room).
_NODES_PER_LINEAR = 8
_BLOCK = re.compile(r"^layers\.(\d+)\.")
#: Rows a weight-error ratio (the recipe's estimate at a higher type) is measured on: the ratio of two relative errors
#: of one weight varies little between rows; every row of the real model's larger linears would cost minutes.
ROW_SAMPLE = 1024


# -- 1. statistics in the graph ------------------------------------------------------------------
@dataclasses.dataclass
class LinearStats:
    """One linear's input over a calibration: per input column the sum of squares (float64 on the host) and the max
    |x|, and the number of token rows summed."""

    sums: np.ndarray
    absmax: np.ndarray
    count: int = 0


class _StatsModules(Ideogram4DiT.modules_class):  # the hook dit.py offers for extra graph outputs
    """The forward with each linear's input statistics as extra outputs ``sumsq:NAME`` and ``absmax:NAME``."""

    def __init__(self, dit: "StatsDiT", b) -> None:
        super().__init__(dit, b)
        self.dit, self.stats = dit, {}

    def linear(self, name: str, x, *, per_sample: bool = False):
        b = self.b
        xt = b.cont(b.transpose(x))  # [tokens, K]: ggml reduces along dim 0 only
        self.stats[name] = (b.sum_rows(b.sqr(xt)), b.max_rows(b.abs(xt)))
        self.dit._building[name] = xt.ne[0]
        return super().linear(name, x, per_sample=per_sample)

    def transformer(self, inp, n_text):
        out = super().transformer(inp, n_text)
        for n, (ss, mx) in self.stats.items():
            out[f"sumsq:{n}"], out[f"absmax:{n}"] = ss, mx
        return out


class StatsDiT(Ideogram4DiT):
    """A backbone that accumulates every linear's input statistics over its ``velocity`` calls (``stats``, keyed by
    weight name) and, while ``trace`` is a list, records each call's (latents, t, velocity)."""

    modules_class = _StatsModules

    def __init__(self, file: BackboneFile, backend: Backend, options: RuntimeOptions | None = None) -> None:
        if options is not None and options.placement != "resident":  # a streamed forward is several graphs
            raise OptionError("activation statistics need the resident placement (one graph per forward)")
        super().__init__(file, backend, options)
        self.stats: dict[str, LinearStats] = {}
        self.calls = 0
        self.trace: list[tuple[np.ndarray, float, np.ndarray]] | None = None
        self._tokens: dict[tuple[int, int, int], dict[str, int]] = {}
        self._building: dict[str, int] = {}

    def graph_size(self) -> int:
        return super().graph_size() + _NODES_PER_LINEAR * sum(k == "linear" for k in self.file.kinds.values())

    def velocity(self, latent_tokens, t, text_features=None, *, grid):
        self._building = {}
        v = super().velocity(latent_tokens, t, text_features, grid=grid)
        n_text = 0 if text_features is None else int(np.shape(text_features)[-2])
        key = (n_text, int(grid[0]), int(grid[1]))
        if self._building:  # the graph was (re)built in this call: its token count per linear
            self._tokens[key] = self._building
        g = self.last_graph
        for name, tokens in self._tokens[key].items():
            ss, mx = g.get(f"sumsq:{name}").reshape(-1), g.get(f"absmax:{name}").reshape(-1)
            s = self.stats.get(name + ".weight")
            if s is None:
                self.stats[name + ".weight"] = LinearStats(ss.astype(np.float64), mx.copy(), tokens)
            else:
                s.sums += ss
                np.maximum(s.absmax, mx, out=s.absmax)
                s.count += tokens
        self.calls += 1
        if self.trace is not None:
            self.trace.append((np.array(latent_tokens, dtype=np.float32).reshape(v.shape), float(t), v))
        return v


# -- inputs ----------------------------------------------------------------------------------------
def check_float(file: BackboneFile) -> None:
    """calibrate measures against the float model: a quantized linear is refused, naming it."""
    for n, kind in file.kinds.items():
        t = file.tensors[n].type
        if kind == "linear" and t not in FLOAT_TYPES:
            raise ModelError(f"stored as {t.name}: calibrate needs a float conversion (convert --recipe f32, f16 or bf16)",
                             path=file.path, tensor=n)


def parse_budget(text: str | float) -> tuple[float, str]:
    """``--budget``: a fraction of the model (below 1, or N%) or extra megabytes (1 and above, optionally "MB")."""
    s = str(text).strip().lower()
    try:
        if s.endswith("%"):
            value, unit = float(s[:-1]) / 100, "fraction"
        else:
            value = float(s[:-2] if s.endswith("mb") else s)
            unit = "MB" if s.endswith("mb") or value >= 1 else "fraction"
    except ValueError:
        raise OptionError(f"--budget must be extra MB (e.g. 12 or 12MB) or a fraction of the model (0.05 or 5%), got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise OptionError(f"--budget must be a non-negative number, got {text!r}")
    return value, unit


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``--size WxH`` (or one number for a square) -> (width, height)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", text)
    w, h = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
    if min(w, h) < 1:  # 0 would read as "the default size" further on
        raise OptionError(f"--size must be WIDTHxHEIGHT in pixels (e.g. 512x512), got {text!r}")
    return w, h


# -- 2. fragility -----------------------------------------------------------------------------------
@dataclasses.dataclass
class _State:
    trajectory: int  # (prompt, seed) index
    step: int
    t: float
    g: float
    x: np.ndarray
    feats: np.ndarray
    v: dict[str, np.ndarray]  # role -> the velocity recorded while sampling


def _rows(file: BackboneFile, name: str) -> tuple[int, int]:
    shape = file.tensors[name].shape
    return math.prod(shape[:-1]), shape[-1]


def type_bytes(t: GGMLType, shape: tuple[int, ...]) -> int:
    return t.nbytes(shape[::-1])


class _Probe:
    """One backbone's variants, each evaluated at the chosen states against the float model's velocity there."""

    def __init__(self, file: BackboneFile, backend: Backend, options: RuntimeOptions, states: list[_State], grid,
                 importance: dict[str, np.ndarray], qtype: GGMLType) -> None:
        self.file, self.backend, self.options, self.states, self.grid = file, backend, options, states, grid
        self.importance, self.qtype, self.text = importance, qtype, file.role != "uncond"
        self.forwards, self.seconds = 0, 0.0
        self.ref = self._velocities({})
        self.ref_sq = np.array([float(np.sum(v.astype(np.float64) ** 2)) for v in self.ref])

    def base_type(self, name: str) -> GGMLType:
        return fitting_type(self.qtype, self.file.tensors[name].shape[-1])

    def quantized(self, name: str, type_: GGMLType | None = None) -> tuple[GGMLType, np.ndarray]:
        """``name``'s weight as ``type_`` (default: the target type, or its fallback where a row does not fit it)."""
        return self._quantized(name, type_ or self.base_type(name))

    @functools.lru_cache(maxsize=6)  # a block's six linears: quantized once for the group, reused one by one
    def _quantized(self, name: str, type_: GGMLType) -> tuple[GGMLType, np.ndarray]:
        with self.file.open() as f:
            w = self.file.read_f32(name, f).reshape(_rows(self.file, name))
        return type_, quantize(w, type_, importance=self._ggml_weights(name, type_))

    def _ggml_weights(self, name: str, type_: GGMLType) -> np.ndarray | None:
        imp = self.importance.get(name)
        return ggml_weights(type_, None if imp is None else quant_weights(imp), self.file.tensors[name].shape[-1])

    @functools.lru_cache(maxsize=None)
    def weight_error(self, name: str, type_: GGMLType) -> float:
        """Importance-weighted relative error of the weight stored as ``type_`` (what the linear's output error scales
        with for inputs whose column mean squares are the importances). Estimated on at most ``ROW_SAMPLE`` evenly
        spaced rows (each row's bytes depend on that row only), read a few MiB at a time."""
        k = self.file.tensors[name].shape[-1]
        imp = self.importance.get(name)
        imp = np.ones(k) if imp is None else imp.astype(np.float64)
        qw = self._ggml_weights(name, type_) if type_.is_quantized else None
        num = den = 0.0
        step = max(1, _rows(self.file, name)[0] // ROW_SAMPLE)
        with self.file.open() as f:
            for w in self.file.f32_chunks(name, f, max_bytes=16 << 20):
                w = np.ascontiguousarray(w[::step])
                if type_.is_quantized:
                    wq = dequantize(quantize(w, type_, importance=qw), type_, k)
                else:
                    wq = w.astype(np.float16).astype(np.float32) if type_ is GGMLType.F16 else w
                num += float(((w - wq).astype(np.float64) ** 2 @ imp).sum())
                den += float((w.astype(np.float64) ** 2 @ imp).sum())
        return math.sqrt(num / max(den, 1e-300))

    def _velocities(self, replace: dict) -> list[np.ndarray]:
        t0 = time.perf_counter()
        dit = Ideogram4DiT(self.file, self.backend, self.options, replace=replace)
        try:
            out = [dit.velocity(s.x, s.t, s.feats if self.text else None, grid=self.grid) for s in self.states]
        finally:
            dit.close()
        self.forwards += len(self.states)
        self.seconds += time.perf_counter() - t0
        return out

    def error_sq(self, names: list[str]) -> np.ndarray:
        """Per state, the squared norm of the velocity change with ``names`` quantized to the target type."""
        vs = self._velocities({n: self.quantized(n) for n in names})
        return np.array([float(np.sum((v.astype(np.float64) - r) ** 2)) for v, r in zip(vs, self.ref)])


# -- the whole run ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Calibration:
    """Everything `calibrate` measured; ``gguf_dit.calib_dir`` writes it into CALIB_DIR."""

    stats: dict[str, dict[str, LinearStats]]  # role -> weight name -> statistics
    calls: dict[str, int]  # role -> forwards the statistics cover
    recipe: dict
    report: dict


def _linears(file: BackboneFile) -> list[str]:
    return [n for n, k in file.kinds.items() if k == "linear"]


def calibrate(files: ModelFiles, prompts: list[Prompt], *, qtype: GGMLType = GGMLType.Q4_K, budget: tuple[float, str] = (0.05, "fraction"),
              preset: str = "default-20", steps: int | None = None, size: tuple[int, int] | None = None, seeds: int = 1, states: int = 5, refine: int = 4,
              backend: str = "auto", threads: int | None = None, options: RuntimeOptions | None = None,
              origins: list[tuple] | None = None, dataset: str = "", progress: Callable[[str, int, int], None] | None = None,
              features: list[np.ndarray] | None = None) -> Calibration:
    """Run the float model's sampling trajectories on ``prompts`` (``seeds`` seeds each) and measure (module doc).
    ``features``: the prompts' text features, already encoded (the text encoder is then not loaded)."""
    progress = progress or (lambda stage, done, total: None)
    options = options or RuntimeOptions()
    if files.unconditional_transformer is None:
        raise OptionError("calibrate measures both backbones: the model needs unconditional_transformer.gguf (or --uncond-diffusion-model)")
    for name, v in (("--seeds", seeds), ("--states", states)):
        if v < 1:
            raise OptionError(f"{name} must be at least 1, got {v}")
    if refine < 0:
        raise OptionError(f"--refine must be 0 or more, got {refine}")
    qtype = GGMLType(qtype)
    if not qtype.is_quantized:
        raise OptionError(f"--type must be a quantized type (what the fragility is measured for), got {qtype.name.lower()}")
    paths = {"cond": files.transformer, "uncond": files.unconditional_transformer}
    bfiles = {r: BackboneFile(p) for r, p in paths.items()}
    for f in bfiles.values():
        check_float(f)
    settings: SamplerSettings = resolve_settings(preset, steps=steps)
    header = bfiles["cond"]
    w, h = size or (header.default_size, header.default_size)
    grid = token_grid(h, w)
    for name, v in (("height", h), ("width", w)):
        if not header.size_range[0] <= v <= header.size_range[1]:
            raise InputError(f"{name} {v} is outside the model's range {'..'.join(map(str, header.size_range))} pixels", path=header.path)
    timings: dict[str, float] = {}

    # 1. the float trajectories, with statistics
    t0 = time.perf_counter()
    if features is None:
        pipe = Pipeline(files, backend=backend, threads=threads, options=options)
        pipe.check_files()
        progress("encode", 0, len(prompts))
        features = pipe.encode([p.text for p in prompts], lambda i: progress("encode", i, len(prompts)), origins=origins)
    elif len(features) != len(prompts):
        raise InputError(f"{len(features)} text features for {len(prompts)} prompts")
    feats = features
    timings["encode_s"] = time.perf_counter() - t0
    be = Backend(backend, threads=threads)
    t0 = time.perf_counter()
    dits = {r: StatsDiT(bfiles[r], be, options) for r in ROLES}
    trajectory_states: list[_State] = []
    n_traj = len(prompts) * seeds
    try:
        check_pair(dits["cond"], dits["uncond"])
        for j in range(n_traj):
            progress("sample", j, n_traj)
            f = np.ascontiguousarray(feats[j // seeds], dtype=np.float32)
            for d in dits.values():
                d.trace = []
            sample(dits["cond"], dits["uncond"], f, h, w, settings=settings, seed=j % seeds)
            f.setflags(write=False)
            uncond = iter(dits["uncond"].trace)  # called after the conditional one, on steps whose guidance is not 1
            for i, (x, t, v) in enumerate(dits["cond"].trace):
                g = float(settings.guidance[i])
                trajectory_states.append(_State(j, i, t, g, x, f, {"cond": v} if g == 1.0 else {"cond": v, "uncond": next(uncond)[2]}))
        progress("sample", n_traj, n_traj)
        stats = {r: d.stats for r, d in dits.items()}
        calls = {r: d.calls for r, d in dits.items()}
    finally:
        for d in dits.values():
            d.close()
    timings["trajectories_s"] = time.perf_counter() - t0

    # 2. fragility, teacher-forced at evenly spaced states of each trajectory
    t0 = time.perf_counter()
    pick = set(np.unique(np.linspace(0, settings.steps - 1, min(states, settings.steps)).round().astype(int)).tolist())
    chosen = [s for s in trajectory_states if s.step in pick]
    probes, measured, groups = {}, {}, {}
    for role in ROLES:
        file = bfiles[role]
        st = [s for s in chosen if role == "cond" or s.g != 1.0]
        if not st:  # every step has guidance 1: the unconditional backbone never runs
            continue
        # as calib_dir writes them and convert --imatrix reads them: float32 sums / count
        importance = {n: ImatrixEntry(s.sums, s.count).importance() for n, s in stats[role].items() if s.count}
        probe = probes[role] = _Probe(file, be, options, st, grid, importance, qtype)
        used = [n for n in _linears(file) if n in stats[role]]  # the unconditional sequence has no text: llm_cond_proj never runs
        blocks: dict[int, list[str]] = {}
        outside = []
        for n in used:
            m = _BLOCK.match(n)
            (blocks.setdefault(int(m.group(1)), []) if m else outside).append(n)
        work = len(blocks) + len(outside) + min(refine, len(blocks)) * max((len(v) for v in blocks.values()), default=0)
        done = 0
        progress(f"fragility {role}", 0, work)
        groups[role] = {}
        for b, names in blocks.items():
            groups[role][f"layers.{b}"] = probe.error_sq(names)
            done += 1
            progress(f"fragility {role}", done, work)
        worst = sorted(blocks, key=lambda b: -groups[role][f"layers.{b}"].sum())[:refine]
        measured[role] = {}
        for n in outside + [n for b in worst for n in blocks[b]]:
            measured[role][n] = probe.error_sq([n])
            done += 1
            progress(f"fragility {role}", done, work)
    timings["fragility_s"] = time.perf_counter() - t0

    # guided velocity g·v_c + (1 − g)·v_u at each chosen state: what the sampler integrates
    ref = {r: {(s.trajectory, s.step): v for s, v in zip(p.states, p.ref)} for r, p in probes.items()}
    guided_sq = 0.0
    for s in chosen:
        vc = ref["cond"][(s.trajectory, s.step)].astype(np.float64)
        vu = ref.get("uncond", {}).get((s.trajectory, s.step))
        vg = vc if vu is None else s.g * vc + (1 - s.g) * vu
        guided_sq += float(np.sum(vg**2))

    def summary(role: str, err_sq: np.ndarray) -> dict:
        p = probes[role]
        weight = np.array([s.g if role == "cond" else 1 - s.g for s in p.states])
        return {"velocity": math.sqrt(err_sq.sum() / p.ref_sq.sum()), "guided": math.sqrt(float((weight**2 * err_sq).sum()) / guided_sq)}

    fragility = {r: {n: summary(r, e) for n, e in m.items()} for r, m in measured.items()}
    group_frag = {r: {b: summary(r, e) for b, e in g.items()} for r, g in groups.items()}
    for r in ROLES:
        for n in _linears(bfiles[r]):
            if r in fragility and n not in stats[r]:
                fragility[r][n] = {"unused": True}

    # 3. the recipe
    t0 = time.perf_counter()
    recipe, choices, budget_report = _choose(bfiles, probes, fragility, qtype, budget)
    timings["recipe_s"] = time.perf_counter() - t0

    # The plain graph's float velocities against those recorded while sampling through the statistics graph: 0 unless
    # the extra outputs changed the forward (they only read the linears' inputs).
    floor = {r: math.sqrt(sum(float(np.sum((v - s.v[r]) ** 2)) for s, v in zip(p.states, p.ref)) / p.ref_sq.sum()) for r, p in probes.items()}
    report = {
        "version": 1,
        "model": {ROLES[r]: {"file": str(paths[r]), "sha256": hashes.sha256(paths[r]), "config": bfiles[r].config.to_metadata()} for r in ROLES},
        "text_encoder": {"file": str(files.text_encoder), "sha256": hashes.sha256(files.text_encoder)} if files.text_encoder.is_file() else None,
        "prompts": {"file": dataset, "texts": [p.text for p in prompts]},
        "sampling": {"preset": preset, "steps": settings.steps, "guidance": list(settings.guidance), "mu": settings.mu, "std": settings.std,
                     "width": w, "height": h, "seeds": list(range(seeds)), "t_rounding": options.t_rounding},
        "type": qtype.name,
        "method": {
            "statistics": "every linear's input over every step of every trajectory, reduced in the ggml graph",
            "fragility": "teacher-forced: each variant (target type on the named linears, everything else float) evaluated at the float "
                         "trajectories' recorded states; groups = one block's linears together; singles = linears outside the blocks and "
                         f"inside the {refine} worst blocks",
            "states_per_trajectory": sorted(pick), "refine": refine,
            "velocity": "sqrt(sum |v_variant - v_float|^2 / sum |v_float|^2) over the states, per backbone",
            "guided": "the same for g*v_cond + (1-g)*v_uncond, the velocity the sampler integrates",
            "importance": "the measured importances (sums / count), floored, for the types that take them: convert --imatrix's bytes",
        },
        "forwards": {"trajectories": sum(calls.values()), "fragility": sum(p.forwards for p in probes.values()),
                     "variants": sum(len(measured.get(r, {})) + len(groups.get(r, {})) + 1 for r in probes)},
        "timings": {**{k: round(v, 3) for k, v in timings.items()},
                    "fragility_forward_s": round(sum(p.seconds for p in probes.values()) / max(1, sum(p.forwards for p in probes.values())), 5)},
        "reference_mismatch": {ROLES[r]: e for r, e in floor.items()},
        "groups": group_frag,
        "fragility": fragility,
        "budget": budget_report,
        "choices": choices,
    }
    return Calibration(stats, calls, recipe, report)


def _choose(bfiles: dict[str, BackboneFile], probes: dict[str, _Probe], fragility: dict, qtype: GGMLType,
            budget: tuple[float, str]) -> tuple[dict, list[dict], dict]:
    """Greedy multiple-choice knapsack over tensor names (a recipe rule applies to both backbones): repeatedly the
    upgrade that removes the most estimated squared guided error per extra byte, while it fits the budget."""
    base = {r: {n: fitting_type(qtype, f.tensors[n].shape[-1]) if k == "linear" else GGMLType.F32 for n, k in f.kinds.items()}
            for r, f in bfiles.items()}
    model_bytes = sum(type_bytes(t, bfiles[r].tensors[n].shape) for r in base for n, t in base[r].items())
    value, unit = budget
    allowed = int(value * model_bytes) if unit == "fraction" else int(value * 1e6)
    names = sorted({n for r in fragility for n, f in fragility[r].items() if "guided" in f})
    impact = {n: {r: fragility[r][n]["guided"] for r in fragility if "guided" in fragility[r].get(n, {})} for n in names}
    ratio: dict[tuple[str, str, GGMLType], float] = {}

    def rem(n: str, t: GGMLType) -> float:
        """Estimated squared guided error left with ``n`` at ``t`` (both backbones)."""
        out = 0.0
        for r, e in impact[n].items():
            b = base[r][n]
            if t is not b and (n, r, t) not in ratio:
                p = probes[r]
                ratio[(n, r, t)] = p.weight_error(n, t) / max(p.weight_error(n, b), 1e-30)
            out += (e * (1.0 if t is b else ratio[(n, r, t)])) ** 2
        return out

    def nbytes(n: str, t: GGMLType) -> int:
        return sum(type_bytes(t, bfiles[r].tensors[n].shape) for r in bfiles)

    current = {n: base["cond"][n] for n in names}
    spent = 0
    while True:
        best = None
        for n in names:
            k = bfiles["cond"].tensors[n].shape[-1]
            for t in (t for t in UPGRADES if fits(t, k)):
                extra = nbytes(n, t) - nbytes(n, current[n])
                if extra <= 0 or spent + extra > allowed:
                    continue
                gain = rem(n, current[n]) - rem(n, t)
                if gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, n, t, extra)
        if best is None:
            break
        _, n, t, extra = best
        current[n], spent = t, spent + extra
    rank = {r: sorted((n for n in fragility[r] if "guided" in fragility[r][n]), key=lambda n: -fragility[r][n]["guided"]) for r in fragility}
    rules, choices = [], []
    for n in sorted((n for n in names if current[n] is not base["cond"][n]), key=lambda n: -rem(n, base["cond"][n])):
        t, b = current[n], base["cond"][n]
        parts = [f"{ROLES[r]} alone at {b.name}: velocity {fragility[r][n]['velocity']:.2e}, guided {e:.2e} "
                 f"(rank {rank[r].index(n) + 1}/{len(rank[r])}); at {t.name} est. {e * ratio[(n, r, t)]:.2e}" for r, e in impact[n].items()]
        reason = f"gguf-dit calibrate: {'; '.join(parts)}; +{(nbytes(n, t) - nbytes(n, b)) / 1e6:.3f} MB for both backbones"
        rules.append({"pattern": f"^{re.escape(n)}$", "type": t.name.lower(), "reason": reason})
        choices.append({"tensor": n, "type": t.name, "base": b.name, "extra_bytes": nbytes(n, t) - nbytes(n, b),
                        "guided_error": {ROLES[r]: e for r, e in impact[n].items()},
                        "estimated_at_type": {ROLES[r]: e * ratio[(n, r, t)] for r, e in impact[n].items()}})
    recipe = {"name": f"calibrated-{qtype.name.lower()}", "base": "f32", "linear_type": qtype.name.lower(),
              "description": f"{qtype.name} linears; {len(rules)} fragile linears kept higher, chosen by gguf-dit calibrate within "
                             f"{allowed / 1e6:.3f} MB ({allowed / model_bytes:.1%} of the {qtype.name} model)",
              "rules": rules}
    est = {"uniform": math.sqrt(sum(rem(n, base["cond"][n]) for n in names)), "recipe": math.sqrt(sum(rem(n, current[n]) for n in names))}
    report = {"requested": value, "unit": unit, "allowed_bytes": allowed, "used_bytes": spent, "model_bytes": model_bytes,
              "estimated_guided_error_of_measured_linears": est}
    return recipe, choices, report


__all__ = ["Calibration", "LinearStats", "StatsDiT", "calibrate", "check_float", "parse_budget", "parse_size"]
