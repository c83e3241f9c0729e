"""The sampler must reproduce the official loop exactly (docs/ideogram4-model.md §14), so every number is checked
against table 14.4, a torch restatement of the official formula, and diffusers' own schedule and noise functions."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from gguf_dit.errors import GgufDitError
from gguf_dit.runtime.schedule import (
    PRESETS,
    T_MAX,
    T_MIN,
    SamplerSettings,
    euler_step,
    initial_noise,
    parse_guidance,
    resolution_mean,
    resolve_settings,
    step_grid,
    timesteps,
)

# Table 14.4: (steps, size, mu, std, first run-order values, last run-order values).
TABLE_14_4 = {
    "DEFAULT_20@1024": (20, 1024, 0.0, 1.75, [0.000123, 0.027341, 0.050409, 0.075375, 0.102847],
                        [0.754102, 0.824851, 0.898926, 0.999447]),
    "QUALITY_48@1024": (48, 1024, 0.0, 1.5, [0.000123, 0.023013, 0.035894, 0.047683, 0.059098],
                        [0.833138, 0.870383, 0.913891, 0.999447]),
    "TURBO_12@1024": (12, 1024, 0.5, 1.75, [0.000123, 0.026253, 0.052843, 0.085216, 0.124890],
                      [0.496803, 0.622422, 0.773309, 0.999447]),
    "QUALITY_48@2048": (48, 2048, 0.0, 1.5, [0.000123, 0.011641, 0.018275, 0.024424],
                        [0.770512, 0.841437, 0.999447]),
}

CASES = [
    (n, h, w, mu, std)
    for n in (1, 2, 3, 7, 12, 20, 48, 100, 128)
    for (h, w) in ((1024, 1024), (2048, 2048), (1600, 400), (1536, 1024))
    for (mu, std) in ((0.0, 1.5), (0.5, 1.75), (0.5, 1.0))
]


def official_timesteps(n, h, w, mu, std):
    """The official loop's (t, s) pairs, restated in torch from docs §14.1–14.2, flattened to run order."""
    mean = mu + 0.5 * math.log(h * w / 512**2)
    u = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float32)

    def sched(x):
        y = mean + std * torch.special.ndtri(x.to(torch.float64))
        t = (1 - torch.special.expit(y)).clamp(1 / (1 + math.exp(0.5 * 18)), 1 / (1 + math.exp(0.5 * -15)))
        return t.to(torch.float32).item()

    pairs = [(sched(u[i + 1 : i + 2]), sched(u[i : i + 1])) for i in range(n - 1, -1, -1)]
    return np.array([t for t, _ in pairs] + [pairs[-1][1]], dtype=np.float32), pairs


# --- timesteps -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(TABLE_14_4))
def test_timesteps_match_table_14_4(case):
    n, size, mu, std, first, last = TABLE_14_4[case]
    ts = timesteps(n, size, size, mu, std)
    np.testing.assert_allclose(ts[: len(first)], first, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ts[-len(last) :], last, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 12, 20, 48, 128])
@pytest.mark.parametrize("size", [(256, 256), (1024, 1024), (2048, 768)])
def test_first_timestep_is_t_min_and_last_is_t_max(n, size):
    ts = timesteps(n, *size, 0.0, 1.5)
    assert ts[0] == np.float32(T_MIN)
    assert ts[-1] == np.float32(T_MAX)
    assert T_MIN == pytest.approx(1.2339458e-4, rel=1e-6)
    assert T_MAX == pytest.approx(0.99944722, rel=1e-8)


@pytest.mark.parametrize("n,h,w,mu,std", CASES)
def test_timesteps_are_float32_run_order_and_strictly_increasing(n, h, w, mu, std):
    ts = timesteps(n, h, w, mu, std)
    assert ts.dtype == np.float32 and ts.shape == (n + 1,)
    assert np.all(np.diff(ts) > 0)


@pytest.mark.parametrize("n,h,w,mu,std", CASES)
def test_timesteps_equal_official_loop_bit_for_bit(n, h, w, mu, std):
    expected, pairs = official_timesteps(n, h, w, mu, std)
    ts = timesteps(n, h, w, mu, std)
    np.testing.assert_array_equal(ts, expected)
    # step k of the run goes from ts[k] to ts[k + 1], exactly the official (t, s) of loop index n-1-k
    assert [(float(ts[k]), float(ts[k + 1])) for k in range(n)] == pairs


@pytest.mark.parametrize("n", list(range(1, 130)) + [256, 1000])
def test_step_grid_equals_torch_linspace_float32(n):
    np.testing.assert_array_equal(step_grid(n), torch.linspace(0, 1, n + 1, dtype=torch.float32).numpy())


def test_resolution_mean_adds_half_log_pixels_over_512_squared():
    assert resolution_mean(0.0, 512, 512) == 0.0
    assert resolution_mean(0.0, 1024, 1024) == pytest.approx(math.log(2))
    assert resolution_mean(0.5, 2048, 2048) == pytest.approx(0.5 + math.log(4))
    assert resolution_mean(0.0, 1600, 400) == pytest.approx(0.5 * math.log(1600 * 400 / 512**2))


# --- presets and settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,steps,n_main,n_polish,mu,std",
    [("quality-48", 48, 45, 3, 0.0, 1.5), ("default-20", 20, 18, 2, 0.0, 1.75), ("turbo-12", 12, 11, 1, 0.5, 1.75)],
)
def test_presets_have_official_values_with_guidance_in_run_order(name, steps, n_main, n_polish, mu, std):
    p = PRESETS[name]
    assert (p.steps, p.mu, p.std, p.name) == (steps, mu, std, name)
    assert p.guidance[:n_main] == (7.0,) * n_main
    assert p.guidance[n_main:] == (3.0,) * n_polish
    # the official tuple is stored loop-index order (index 0 = last step): ours is its reverse
    official = (3.0,) * n_polish + (7.0,) * n_main
    assert p.guidance == official[::-1]
    assert resolve_settings(name) == p


def test_resolve_settings_defaults_to_default_20():
    assert resolve_settings() == PRESETS["default-20"]


def test_preset_names_accept_official_spelling():
    assert resolve_settings("V4_TURBO_12") == PRESETS["turbo-12"]
    assert resolve_settings("Quality_48") == PRESETS["quality-48"]


def test_no_preset_starts_from_custom_defaults():
    s = resolve_settings(None)
    assert s == SamplerSettings(steps=20, guidance=(7.0,) * 20, mu=0.0, std=1.75, name="custom")


def test_explicit_args_override_preset():
    s = resolve_settings("quality-48", mu=0.25, std=2.0)
    assert (s.steps, s.guidance, s.mu, s.std, s.name) == (48, PRESETS["quality-48"].guidance, 0.25, 2.0, "custom")
    assert resolve_settings("turbo-12", guidance=5.0).guidance == (5.0,) * 12
    assert resolve_settings("default-20", steps=3, guidance=[1, 2, 3]).guidance == (1.0, 2.0, 3.0)
    assert resolve_settings("default-20", steps=48, guidance="7x45+3x3") == SamplerSettings(
        48, PRESETS["quality-48"].guidance, 0.0, 1.75
    )
    assert resolve_settings("default-20", guidance="4.5").guidance == (4.5,) * 20


@pytest.mark.parametrize(
    "preset,steps,expected",
    [
        ("default-20", 10, (7.0,) * 8 + (3.0,) * 2),
        ("default-20", 30, (7.0,) * 28 + (3.0,) * 2),
        ("quality-48", 20, (7.0,) * 17 + (3.0,) * 3),
        ("turbo-12", 4, (7.0,) * 3 + (3.0,)),
        ("default-20", 2, (7.0, 3.0)),
        ("quality-48", 1, (7.0,)),
        (None, 5, (7.0,) * 5),
    ],
)
def test_steps_override_keeps_preset_polish_steps(preset, steps, expected):
    s = resolve_settings(preset, steps=steps)
    assert s.steps == steps and s.guidance == expected


def test_parse_guidance_forms():
    assert parse_guidance("7x45+3x3") == (7.0,) * 45 + (3.0,) * 3
    assert parse_guidance("7.0") == (7.0,)
    assert parse_guidance("7,7,3") == (7.0, 7.0, 3.0)
    assert parse_guidance(" 6.5 * 2 + 3X1 ") == (6.5, 6.5, 3.0)
    assert parse_guidance("7×2,1") == (7.0, 7.0, 1.0)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: resolve_settings("fast-9"), "quality-48, default-20, turbo-12"),
        (lambda: resolve_settings(steps=0), "steps must be at least 1"),
        (lambda: resolve_settings(steps=2.5), "steps must be an integer"),
        (lambda: resolve_settings(guidance=[7.0] * 19), "19 entries but steps is 20"),
        (lambda: resolve_settings(guidance="7x45+3x3"), "48 entries but steps is 20"),
        (lambda: resolve_settings(guidance="seven"), "cannot parse guidance"),
        (lambda: resolve_settings(guidance="7x"), "cannot parse guidance"),
        (lambda: resolve_settings(guidance="7x0"), "repeat count"),
        (lambda: resolve_settings(guidance="7++3"), "cannot parse guidance"),
        (lambda: resolve_settings(guidance=""), "empty guidance"),
        (lambda: resolve_settings(guidance=float("nan")), "finite"),
        (lambda: resolve_settings(std=0.0), "std must be"),
        (lambda: resolve_settings(std=-1.0), "std must be"),
        (lambda: parse_guidance("7;3"), "cannot parse guidance"),
        (lambda: timesteps(0, 1024, 1024, 0.0, 1.5), "steps must be at least 1"),
        (lambda: timesteps(4, 1024, 1024, 0.0, 0.0), "std must be"),
        (lambda: timesteps(4, 0, 1024, 0.0, 1.5), "height and width"),
        (lambda: SamplerSettings(steps=3, guidance=(7.0,), mu=0.0, std=1.0), "1 entries but steps is 3"),
    ],
)
def test_bad_inputs_raise_value_error_with_one_line_message(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, GgufDitError)


# --- Euler update and noise ----------------------------------------------------------------------------------


def test_euler_step_equals_official_torch_update_bit_for_bit():
    rng = np.random.default_rng(0)
    z, vc, vu = (rng.standard_normal((1, 64, 128)).astype(np.float32) for _ in range(3))
    ts = timesteps(20, 1024, 1024, 0.0, 1.75)
    gw = torch.tensor(PRESETS["default-20"].guidance, dtype=torch.float32)
    for k in (0, 9, 19):
        t_val, s_val = float(ts[k]), float(ts[k + 1])
        gw_i = gw[k]
        v = gw_i * torch.from_numpy(vc) + (1.0 - gw_i) * torch.from_numpy(vu)
        expected = (torch.from_numpy(z) + v * (s_val - t_val)).numpy()
        got = euler_step(z, vc, vu, PRESETS["default-20"].guidance[k], ts[k], ts[k + 1])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


def test_euler_step_formula():
    z = np.array([1.0, 2.0], np.float32)
    out = euler_step(z, np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32), 3.0, 0.25, 0.75)
    np.testing.assert_allclose(out, [1.0 + 3.0 * 0.5, 2.0 - 2.0 * 0.5])


def test_initial_noise_is_torch_randn_on_cpu_generator():
    a = initial_noise(42, 256)
    expected = torch.randn((1, 256, 128), generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32)
    assert a.dtype == np.float32 and a.shape == (1, 256, 128)
    np.testing.assert_array_equal(a, expected.numpy())
    np.testing.assert_array_equal(initial_noise(42, 256), a)
    other = torch.randn((1, 256, 128), generator=torch.Generator("cpu").manual_seed(43), dtype=torch.float32)
    np.testing.assert_array_equal(initial_noise(43, 256), other.numpy())
    assert initial_noise(7, 10, channels=4).shape == (1, 10, 4)


def test_module_does_not_import_torch():
    code = "import sys, gguf_dit.runtime.schedule; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[1])


# --- diffusers 0.42.1 Ideogram4Pipeline (its own functions, no model run) --------------------------------------


@pytest.fixture(scope="module")
def diffusers_ideogram4():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ideogram4 import pipeline_ideogram4 as pipeline

    return pipeline, FlowMatchEulerDiscreteScheduler


def test_initial_noise_equals_diffusers_prepare_latents(diffusers_ideogram4):
    pipeline, _ = diffusers_ideogram4
    # prepare_latents does not touch self: (batch, num_image_tokens, latent_dim) via randn_tensor
    latents = pipeline.Ideogram4Pipeline.prepare_latents(
        None, batch_size=1, num_image_tokens=64, latent_dim=128, dtype=torch.float32,
        device=torch.device("cpu"), generator=torch.Generator("cpu").manual_seed(1234),
    )
    np.testing.assert_array_equal(initial_noise(1234, 64), latents.numpy())


@pytest.mark.parametrize("n,h,w,mu,std", [(48, 2048, 2048, 0.0, 1.5), (20, 1024, 1024, 0.0, 1.75),
                                          (12, 1024, 1024, 0.5, 1.75), (7, 1600, 400, 0.0, 1.0)])
def test_timesteps_match_diffusers_except_float32_roundtrip_and_final_t(diffusers_ideogram4, n, h, w, mu, std):
    """diffusers feeds t = 1 - float32(σ·1000)/1000 and ends on σ = 0; default scheduler config (shift 1) assumed."""
    pipeline, scheduler_cls = diffusers_ideogram4
    scheduler = scheduler_cls()
    sigmas = pipeline._logit_normal_sigmas(n, pipeline._resolution_aware_mu(h, w, mu), std=std)
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    t_model = (1.0 - scheduler.timesteps.float() / scheduler.config.num_train_timesteps).numpy()
    ts = timesteps(n, h, w, mu, std)
    assert t_model.shape == (n,)
    assert t_model[0] == np.float32(1.2338161e-4) and ts[0] == np.float32(1.2339458e-4)
    # observed ≤ 8.9e-8: diffusers' float32 round trip through σ·1000 (a few float32 ulps of t, no CPU kernel involved)
    np.testing.assert_allclose(t_model, ts[:-1], rtol=0, atol=2e-7)
    assert float(scheduler.sigmas[-1]) == 0.0 and ts[-1] == np.float32(T_MAX)


def test_diffusers_timesteps_reproduce_the_pipeline_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ideogram4 import pipeline_ideogram4 as p

    from gguf_dit.runtime.schedule import diffusers_timesteps

    for steps, h, w, mu, std in ((12, 1024, 1024, 0.5, 1.75), (20, 64, 96, 0.0, 1.75), (48, 2048, 768, 0.0, 1.5)):
        sched = FlowMatchEulerDiscreteScheduler()
        sigmas = p._logit_normal_sigmas(steps, p._resolution_aware_mu(height=h, width=w, base_mu=mu), std=std)
        sched.set_timesteps(sigmas=sigmas.tolist())
        want = (1.0 - sched.sigmas.to(torch.float32).numpy()).astype(np.float32)
        got = diffusers_timesteps(steps, h, w, mu, std)
        # observed 0; 1e-7 is about one float32 ulp below 1, for a libm (ndtri, expit) that rounds differently
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
        assert got[-1] == 1.0
