"""Mutation proof: each deliberate change to a numeric constant of the runtime must fail at least one test.

    .venv/bin/python tests/mutations.py                 # every mutation, then the table
    .venv/bin/python tests/mutations.py -m qk_norm_eps  # one (repeatable); --list names them

Each mutation runs in a fresh interpreter that compiles the module's source with one text replacement in memory
and installs it in ``sys.modules`` before pytest imports anything, then runs that mutation's tests. Nothing on disk
is changed: the tree stays as it is even if a run is killed. A mutation whose text is not found exactly as often as
expected is an error (the source moved on; update the mutation). A first run without any mutation checks that the
selected tests pass as they are. Not collected by pytest (no ``test_`` prefix); took 19 to 25 minutes on 2 busy cores.

Result on AMD EPYC Zen 4 (AVX-512, no AMX), 2026-12-02: baseline 15 tests pass unmutated; all 18 mutations caught
(the four eps rows re-run after the eps probe moved to norm_eps 4e-5: still caught, errors updated).
"caught by" names the failing tests (test_ prefix and suffixes dropped; (n/m): failing of m parametrizations);
"error" is the first failing assertion's value. DiT errors are max |ours - diffusers| / max |diffusers| of the
velocity (tolerance 3e-6; unmutated 3.7e-7 to 6.4e-7).

| mutation | change | caught by | error seen |
|---|---|---|---|
| final_norm_eps | final LayerNorm eps 1e-6 -> 1e-5 | f32_velocity (5/5), eps_probe | 3.5e-6 (tol 3e-6) on the random model |
| block_norm_eps | block RMSNorm eps (cfg.norm_eps, 4 norms) 1e-5 -> 1e-4 | f32_velocity (5/5), eps_probe, t_is_rounded | 4.1e-5 |
| qk_norm_eps | q/k RMSNorm eps 1e-5 -> 1e-6 | eps_probe | 2.6e-2 (the random model moves < 3e-6) |
| llm_cond_norm_eps | llm_cond_norm eps 1e-6 -> 1e-5 | eps_probe | 3.2e-2 (the random model moves < 3e-6) |
| drop_attention_norm2_weight | attention_norm2 weight not multiplied | f32_velocity (5/5), eps_probe, t_is_rounded | 6.8e-2 |
| rope_axes_swapped | RoPE H and W axes swapped in rope_tables | f32_velocity (5/5), eps_probe, t_is_rounded | 8.2e-2 |
| t_not_rounded | official bf16 rounding of t skipped | t_is_rounded | 2.2e-1 |
| t_always_rounded | t rounded to bf16 even with t_rounding='none' | f32_velocity (5/5), eps_probe | 5.2e-4 |
| image_position_offset | IMAGE_POSITION_OFFSET 65536 -> 65535 (gguf_dit/arch/dit.py) | f32_velocity (5/5), eps_probe, t_is_rounded | 4.2e-2 |
| timestep_scale | timestep sinusoid u = 1e4*t -> 1e3*t | f32_velocity (5/5), eps_probe, t_is_rounded | 1.3e-1 |
| timestep_freq_base | sinusoid frequency step ln(1e4)/(half-1) -> ln(1e4)/half | f32_velocity (5/5), eps_probe, t_is_rounded | 4.8e-4 |
| latent_shift_value | one LATENT_SHIFT constant (p2, channel 26) 0.07062869 -> 0.07062969 | official_constants | checksum off by 1e-6 (tol 1e-12 relative) |
| latent_scale_value | one LATENT_SCALE constant (p1, channel 7) 1.61934825 -> 1.61934925 | official_constants | checksum off by 1e-6 |
| latent_norm_modes_swapped | latent_norm 'official' and 'checkpoint' swapped | latent_norm_modes | 5.5 (tol 1e-6) |
| checkpoint_bn_eps_dropped | checkpoint mode: scale = sqrt(var) without batch_norm_eps | latent_norm_modes | 2.4e-2 (tol 1e-6) |
| denorm_formula | de-normalisation z*scale + shift -> (z + shift)*scale | decode_tokens (3/3), token_layout, latent_norm_modes | 20 uint8 levels (tol 1) |
| token_layout | unpatchify with ph and pw swapped | decode_tokens (3/3), token_layout, latent_norm_modes | 255 uint8 levels (tol 1) |
| vae_groupnorm_eps | VAE decoder GroupNorm eps 1e-6 -> 1e-5 | decode_latents (F32 case) | 5.3e-5 (tol 5e-6) |
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The tests every DiT mutation runs: F32 files against diffusers on the shipped-style random model and on the
#: eps probe (activations near each norm's eps), and the official bf16 rounding of t.
DIT_TESTS = [
    "tests/test_dit.py::test_f32_velocity_matches_diffusers",
    "tests/test_dit.py::test_eps_probe_matches_diffusers_and_every_eps_matters",
    "tests/test_dit.py::test_t_is_rounded_to_bf16_like_the_official_pipeline",
]
VAE_TESTS = [
    "tests/test_vae.py::test_decode_latents_matches_diffusers",
    "tests/test_vae.py::test_decode_tokens_matches_pipeline",
    "tests/test_vae.py::test_token_layout",
    "tests/test_vae.py::test_official_constants",
    "tests/test_vae.py::test_latent_norm_modes_follow_their_own_sources",
]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    module: str  # dotted module name
    edits: tuple[tuple[str, str, int], ...]  # (old text, new text, exact number of occurrences)
    tests: tuple[str, ...]
    what: str


def _m(name, module, what, tests, *edits):
    return Mutation(name, module, tuple(edits), tuple(tests), what)


MUTATIONS = [
    _m("final_norm_eps", "gguf_dit.runtime.dit", "final LayerNorm eps 1e-6 -> 1e-5", DIT_TESTS,
       ("b.norm(h, cfg.final_norm_eps)", "b.norm(h, cfg.final_norm_eps * 10)", 1)),
    _m("block_norm_eps", "gguf_dit.runtime.dit", "block RMSNorm eps (cfg.norm_eps, 4 norms) 1e-5 -> 1e-4", DIT_TESTS,
       (", cfg.norm_eps)", ", cfg.norm_eps * 10)", 4)),
    _m("qk_norm_eps", "gguf_dit.arch.dit", "q/k RMSNorm eps 1e-5 -> 1e-6", DIT_TESTS,
       ("QK_NORM_EPS = 1e-5", "QK_NORM_EPS = 1e-6", 1)),
    _m("llm_cond_norm_eps", "gguf_dit.runtime.dit", "llm_cond_norm eps 1e-6 -> 1e-5", DIT_TESTS,
       ("cfg.llm_cond_norm_eps)", "cfg.llm_cond_norm_eps * 10)", 1)),
    _m("drop_attention_norm2_weight", "gguf_dit.runtime.dit", "attention_norm2 weight not multiplied", DIT_TESTS,
       ('self.rms_norm(f"{p}.attention_norm2", attn, cfg.norm_eps)', "self.b.rms_norm(attn, cfg.norm_eps)", 1)),
    _m("rope_axes_swapped", "gguf_dit.runtime.dit", "RoPE H and W axes swapped in rope_tables", DIT_TESTS,
       ("for axis, offset in ((1, 1), (2, 2)):", "for axis, offset in ((2, 1), (1, 2)):", 1)),
    _m("t_not_rounded", "gguf_dit.runtime.dit", "official bf16 rounding of t skipped", DIT_TESTS,
       ("tt = tt.to(torch.bfloat16)", "tt = tt", 1)),
    _m("t_always_rounded", "gguf_dit.runtime.dit", "t rounded to bf16 even with t_rounding='none'", DIT_TESTS,
       ('if rounding == "bf16":', "if True:", 1)),
    _m("image_position_offset", "gguf_dit.arch.dit", "IMAGE_POSITION_OFFSET 65536 -> 65535", DIT_TESTS,
       ("IMAGE_POSITION_OFFSET = 65536", "IMAGE_POSITION_OFFSET = 65535", 1)),
    _m("timestep_scale", "gguf_dit.runtime.dit", "timestep sinusoid u = 1e4*t -> 1e3*t", DIT_TESTS,
       ("scaled = 1e4 * (x - 0.0)", "scaled = 1e3 * (x - 0.0)", 1)),
    _m("timestep_freq_base", "gguf_dit.runtime.dit", "sinusoid frequency step ln(1e4)/(half-1) -> /half", DIT_TESTS,
       ("freq = math.log(1e4) / (half - 1)", "freq = math.log(1e4) / half", 1)),
    _m("latent_shift_value", "gguf_dit.arch.latent", "one LATENT_SHIFT constant (p2, channel 26) 0.07062869 -> 0.07062969", VAE_TESTS,
       ("0.07062869", "0.07062969", 1)),
    _m("latent_scale_value", "gguf_dit.arch.latent", "one LATENT_SCALE constant (p1, channel 7) 1.61934825 -> 1.61934925", VAE_TESTS,
       ("1.61934825", "1.61934925", 1)),
    _m("latent_norm_modes_swapped", "gguf_dit.runtime.vae", "latent_norm 'official' and 'checkpoint' swapped", VAE_TESTS,
       ('if latent_norm == "official":\n            shift = _norm_array', 'if latent_norm != "official":\n            shift = _norm_array', 1)),
    _m("checkpoint_bn_eps_dropped", "gguf_dit.runtime.vae", "checkpoint mode: scale = sqrt(var) without batch_norm_eps", VAE_TESTS,
       ("np.sqrt(var.astype(np.float64) + cfg.batch_norm_eps)", "np.sqrt(var.astype(np.float64))", 1)),
    _m("denorm_formula", "gguf_dit.runtime.vae", "de-normalisation z*scale + shift -> (z + shift)*scale", VAE_TESTS,
       ("t = t * self.scale + self.shift", "t = (t + self.shift) * self.scale", 1)),
    _m("token_layout", "gguf_dit.runtime.vae", "unpatchify with ph and pw swapped (token dim (pw*2 + ph)*32 + c)", VAE_TESTS,
       ("permute(4, 0, 2, 1, 3)", "permute(4, 0, 3, 1, 2)", 1)),
    _m("vae_groupnorm_eps", "gguf_dit.arch.vae", "VAE decoder GroupNorm eps 1e-6 -> 1e-5", VAE_TESTS,
       ("NORM_EPS = 1e-6", "NORM_EPS = 1e-5", 1)),
]


# ----------------------------------------------------------------------------------------------- child


def _install(mutation: Mutation) -> None:
    """Compile the module's source with the edits applied and put it in sys.modules before anyone imports it."""
    import importlib
    import importlib.util

    spec = importlib.util.find_spec(mutation.module)
    src = Path(spec.origin).read_text()
    for old, new, count in mutation.edits:
        found = src.count(old)
        if found != count:
            raise SystemExit(f"{mutation.name}: {old!r} occurs {found} times in {spec.origin}, expected {count}")
        src = src.replace(old, new)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mutation.module] = module
    exec(compile(src, spec.origin, "exec"), module.__dict__)
    parent, _, leaf = mutation.module.rpartition(".")
    setattr(importlib.import_module(parent), leaf, module)


class _Collector:
    def __init__(self) -> None:
        self.failed: dict[str, str] = {}
        self.passed: list[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            msg = report.longreprtext.strip().splitlines()
            errs = [line[1:].strip() for line in msg if line.startswith("E ")]
            self.failed[report.nodeid] = ("; ".join(errs[:2]) if errs else msg[-1]).replace("|", "/")[:160]
        elif report.when == "call" and report.passed:
            self.passed.append(report.nodeid)


def child(name: str | None, tests: list[str]) -> None:
    import pytest

    if name:
        _install(next(m for m in MUTATIONS if m.name == name))
    col = _Collector()
    pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", *tests], plugins=[col])
    print("MUTATION-RESULT " + json.dumps({"failed": col.failed, "passed": col.passed}))


# ----------------------------------------------------------------------------------------------- parent


def run_one(name: str | None, tests: tuple[str, ...] | list[str]) -> dict:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    args = [sys.executable, __file__, "--child", name or "", *tests]
    t0 = time.perf_counter()
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("MUTATION-RESULT ")]
    if not lines:
        raise SystemExit(f"{name or 'baseline'}: no result (exit {out.returncode})\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    res = json.loads(lines[-1].split(" ", 1)[1])
    res["seconds"] = time.perf_counter() - t0
    return res


def _caught(res: dict) -> str:
    """Failing test functions, with failing / run parametrizations."""
    funcs: dict[str, list[int]] = {}
    for nodeid, failed in [(n, 1) for n in res["failed"]] + [(n, 0) for n in res["passed"]]:
        f = funcs.setdefault(nodeid.split("::", 1)[1].split("[", 1)[0], [0, 0])
        f[0] += failed
        f[1] += 1
    return "<br>".join(f"{name} ({n}/{total})" for name, (n, total) in funcs.items() if n) or "**NOTHING**"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--mutation", action="append", help="run only this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run without mutation")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("tests", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        child(a.child or None, a.tests)
        return 0
    if a.list:
        for m in MUTATIONS:
            print(f"{m.name:<30} {m.what}")
        return 0
    chosen = [m for m in MUTATIONS if not a.mutation or m.name in a.mutation]
    unknown = set(a.mutation or ()) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutation(s): {', '.join(sorted(unknown))} (see --list)")
    if not a.no_baseline:
        tests = sorted({t for m in chosen for t in m.tests})
        base = run_one(None, tests)
        if base["failed"]:
            print(f"baseline: tests fail without any mutation: {base['failed']}")
            return 1
        print(f"baseline: {len(base['passed'])} tests pass unmutated ({base['seconds']:.0f} s)")
    survivors = []
    print("| mutation | change | caught by | error seen (tolerance) |\n|---|---|---|---|")
    for m in chosen:
        res = run_one(m.name, m.tests)
        if not res["failed"]:
            survivors.append(m.name)
        print(f"| {m.name} | {m.what} | {_caught(res)} | {next(iter(res['failed'].values()), '')} |", flush=True)
    if survivors:
        print(f"NOT CAUGHT: {', '.join(survivors)}")
        return 1
    print(f"all {len(chosen)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
