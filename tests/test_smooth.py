"""`convert --smooth`: SmoothQuant (Xiao et al. 2022) scales folded into the weights.

Oracles: diffusers' Ideogram4Transformer2DModel (the activation maxima are recomputed with forward hooks on it, and
the outlier model is built by rescaling its parameters), the paper's formula s = max|x|^α / max|W|^(1-α), and
the F32 conversion without smoothing.
"""

from __future__ import annotations

import hashlib
import re

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from _helpers import BACKBONES, make_model, official_state_dict, reference_velocity, rel_err, save_backbone, TINY_CONFIG
from gguf_dit import keys
from gguf_dit.runtime.dit import Ideogram4DiT, RuntimeOptions

D, I, F = 512, TINY_CONFIG["intermediate_size"], TINY_CONFIG["llm_features_dim"]
EXACT = RuntimeOptions(t_rounding="none")
#: F32 with vs without smoothing (random scales, lognormal σ 1): observed 2.0e-7 to 2.4e-7 on AMD EPYC Zen 4.
FOLD_TOL = 1e-6
_OURS = {"attention.to_q": "attention.qkv", "attention.to_out.0": "attention.o", "feed_forward.w1": "feed_forward.w1",
         "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3"}
_HOOKED = re.compile(r"^(layers\.\d+)\.(attention\.to_q|attention\.to_out\.0|feed_forward\.w[123])$")


def linears(n_layers: int = 2) -> dict[str, int]:
    """Smoothed linear weight name -> input width."""
    return {f"layers.{n}.{m}.weight": (I if m.endswith("w2") else D) for n in range(n_layers) for m in _OURS.values()}


def runs(cond: bool, seeds=(0, 1), ts=(0.3, 0.8), grid=(3, 4), n_text=6):
    for seed in seeds:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((grid[0] * grid[1], 128)).astype(np.float32)
        feats = (rng.standard_normal((n_text, F)) * 2).astype(np.float32) if cond else None
        for t in ts:
            yield x, t, feats, grid


def absmax_by_hooks(model, cond: bool) -> dict[str, np.ndarray]:
    """Per-input-column max |x| of every smoothed linear, from forward hooks on the diffusers model."""
    acc: dict[str, np.ndarray] = {}

    def hook(name):
        def f(mod, inp, out):
            a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0).numpy()
            acc[name] = np.maximum(acc.get(name, 0), a).astype(np.float32)
        return f

    handles = [mod.register_forward_hook(hook(f"{m[1]}.{_OURS[m[2]]}.weight")) for name, mod in model.named_modules() if (m := _HOOKED.match(name))]
    try:
        for x, t, feats, grid in runs(cond):
            reference_velocity(model, x, t, feats, grid)
    finally:
        for h in handles:
            h.remove()
    return acc


def random_absmax(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.lognormal(0.0, 1.0, k).astype(np.float32) for n, k in linears().items()}


def write_calib(d, per_backbone: dict[str, dict[str, np.ndarray]]):
    d.mkdir(parents=True, exist_ok=True)
    for b, t in per_backbone.items():
        save_file(t, str(d / f"{b}.act_absmax.safetensors"))
    return d


def convert(cli, src, out, recipe, *extra):
    code, _, err = cli("convert", src, "-o", out, "--recipe", recipe, "-q", "--force", *extra)
    assert code == 0, err
    return out


def velocities(path, options=EXACT, cond=True):
    dit = Ideogram4DiT.load(path, "cpu", options=options)
    try:
        return [dit.velocity(x, t, feats, grid=grid) for x, t, feats, grid in runs(cond, seeds=(5,))]
    finally:
        dit.close()


def tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data, dtype=np.float64) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def random_calib(tmp_path_factory):
    return write_calib(tmp_path_factory.mktemp("calib"), {b: random_absmax(i) for i, b in enumerate(BACKBONES)})


def test_folding_is_exact_in_f32(cli, f32_gguf, checkpoints, random_calib, tmp_path):
    root, _, _ = checkpoints("f32")
    plain, _ = f32_gguf
    out = convert(cli, root, tmp_path / "s", "f32", "--smooth", random_calib)
    for b, cond in zip(BACKBONES, (True, False)):
        a, s = tensors(plain / f"{b}.gguf"), tensors(out / f"{b}.gguf")
        changed = {n for n in a if not np.array_equal(a[n], s[n])}
        assert changed == set(linears()) | {f"layers.{n}.{m}.weight" for n in range(2) for m in ("attention_norm1", "ffn_norm1")}
        for va, vs in zip(velocities(plain / f"{b}.gguf", cond=cond), velocities(out / f"{b}.gguf", cond=cond)):
            assert rel_err(vs, va) <= FOLD_TOL
    md = gguf.GGUFReader(out / "transformer.gguf")
    field = lambda k: md.fields[k].contents()  # noqa: E731
    calib_file = random_calib / "transformer.act_absmax.safetensors"
    assert field(keys.SMOOTH_METHOD) == "smoothquant" and field(keys.SMOOTH_ALPHA) == pytest.approx(0.5)
    assert field(keys.SMOOTH_CALIBRATION_SHA256) == "sha256:" + hashlib.sha256(calib_file.read_bytes()).hexdigest()
    assert keys.SMOOTH_ALPHA not in gguf.GGUFReader(plain / "transformer.gguf").fields
    code, shown, _ = cli("inspect", out / "transformer.gguf")
    assert code == 0 and "smoothquant alpha 0.5, transformer.act_absmax.safetensors, sha256:" in shown


def test_scales_follow_the_smoothquant_formula(cli, f32_gguf, checkpoints, random_calib, tmp_path):
    """s = max|x|^α / max|W|^(1-α) per input column, α = 0.7 (0.5 would not tell α from 1-α); o and w2 first, so the
    qkv and w1/w3 scales see the v rows of qkv and the rows of w3 already divided by theirs."""
    root, _, _ = checkpoints("f32")
    plain, _ = f32_gguf
    out = convert(cli, root, tmp_path / "s", "f32", "--smooth", random_calib, "--smooth-alpha", "0.7")
    w, ws = tensors(plain / "transformer.gguf"), tensors(out / "transformer.gguf")
    amax = random_absmax(0)
    sq = lambda act, wmax: act.astype(np.float64) ** 0.7 / wmax ** 0.3  # noqa: E731
    for n in range(2):
        p = f"layers.{n}."
        s_o = sq(amax[p + "attention.o.weight"], np.abs(w[p + "attention.o.weight"]).max(0))
        s_w2 = sq(amax[p + "feed_forward.w2.weight"], np.abs(w[p + "feed_forward.w2.weight"]).max(0))
        np.testing.assert_allclose(ws[p + "attention.o.weight"], w[p + "attention.o.weight"] * s_o, rtol=1e-6)
        np.testing.assert_allclose(ws[p + "feed_forward.w2.weight"], w[p + "feed_forward.w2.weight"] * s_w2, rtol=1e-6)
        qkv = w[p + "attention.qkv.weight"].copy()
        qkv[2 * D :] /= s_o[:, None]
        s_qkv = sq(amax[p + "attention.qkv.weight"], np.abs(qkv).max(0))
        np.testing.assert_allclose(ws[p + "attention_norm1.weight"], w[p + "attention_norm1.weight"] / s_qkv, rtol=1e-6)
        np.testing.assert_allclose(ws[p + "attention.qkv.weight"], qkv * s_qkv, rtol=1e-5, atol=1e-7)
        w3 = w[p + "feed_forward.w3.weight"] / s_w2[:, None]
        act = np.maximum(amax[p + "feed_forward.w1.weight"], amax[p + "feed_forward.w3.weight"])
        s_ffn = sq(act, np.maximum(np.abs(w[p + "feed_forward.w1.weight"]).max(0), np.abs(w3).max(0)))
        np.testing.assert_allclose(ws[p + "ffn_norm1.weight"], w[p + "ffn_norm1.weight"] / s_ffn, rtol=1e-6)
        np.testing.assert_allclose(ws[p + "feed_forward.w3.weight"], w3 * s_ffn, rtol=1e-5, atol=1e-7)


@torch.no_grad()
def outlier_model(seed: int, factor: float = 40.0):
    """A diffusers model computing the same function as ``make_model(seed)`` but with a few input channels of every
    smoothed linear ``factor`` times larger (compensated in that linear's columns): the activation outliers
    SmoothQuant is for."""
    m = make_model(seed)
    rng = np.random.default_rng(seed)
    for blk in m.layers:
        at, ff = blk.attention, blk.feed_forward
        for norm, lins in ((blk.attention_norm1, (at.to_q, at.to_k, at.to_v)), (blk.ffn_norm1, (ff.w1, ff.w3))):
            idx = torch.from_numpy(rng.choice(D, 6, replace=False))
            norm.weight[idx] *= factor
            for lin in lins:
                lin.weight[:, idx] /= factor
        for prev, lin, k in ((ff.w3, ff.w2, I), (at.to_v, at.to_out[0], D)):
            idx = torch.from_numpy(rng.choice(k, 6, replace=False))
            prev.weight[idx] *= factor
            lin.weight[:, idx] /= factor
    return m


@pytest.fixture(scope="module")
def outliers(tmp_path_factory):
    root = tmp_path_factory.mktemp("outliers")
    models = {b: outlier_model(10 + i) for i, b in enumerate(BACKBONES)}
    for b, m in models.items():
        save_backbone(root / "ck" / b, official_state_dict(m))
    calib = write_calib(root / "calib", {b: absmax_by_hooks(m, b == BACKBONES[0]) for b, m in models.items()})
    return root, calib


def test_smoothing_lowers_q8_0_error_on_outlier_activations(cli, outliers):
    root, calib = outliers
    ref = convert(cli, root / "ck", root / "f32", "f32")
    err = {}
    for name, extra in (("q8_0", ()), ("q8_0+smooth", ("--smooth", calib))):
        out = convert(cli, root / "ck", root / name, "q8_0", *extra)
        for b, cond in zip(BACKBONES, (True, False)):
            v_ref = velocities(ref / f"{b}.gguf", RuntimeOptions(), cond)
            v = velocities(out / f"{b}.gguf", RuntimeOptions(), cond)
            err[name, b] = max(rel_err(a, r) for a, r in zip(v, v_ref))
    for b in BACKBONES:
        # Observed (AMD EPYC Zen 4): 4.8e-2 / 5.1e-2 plain vs 1.7e-2 / 1.3e-2 smoothed (cond / uncond).
        assert err["q8_0+smooth", b] < 0.5 * err["q8_0", b], err


def _calib_without(tmp_path, name: str, bad=None):
    t = {b: random_absmax(i) for i, b in enumerate(BACKBONES)}
    if bad is None:
        del t["unconditional_transformer"][name]
    else:
        t["unconditional_transformer"][name] = bad
    return write_calib(tmp_path / "calib", t)


@pytest.mark.parametrize("bad,message", [
    (None, "no activation maxima for this linear"),
    (np.ones(D + 1, np.float32), "expected float32 [512]"),
    (np.full(D, np.nan, np.float32), "finite and non-negative"),
])
def test_bad_absmax_entry_is_one_line_exit_2_nothing_written(cli, checkpoints, tmp_path, bad, message):
    root, _, _ = checkpoints("f32")
    calib = _calib_without(tmp_path, "layers.1.attention.o.weight", bad)
    code, _, err = cli("convert", root, "-o", tmp_path / "out", "--recipe", "q8_0", "--smooth", calib, "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "unconditional_transformer.act_absmax.safetensors" in err and "tensor layers.1.attention.o.weight" in err and message in err
    assert not (tmp_path / "out").exists()


def test_bad_smooth_options(cli, checkpoints, random_calib, tmp_path):
    root, _, _ = checkpoints("f32")
    for extra, message in (
        (("--smooth", tmp_path / "nowhere"), "activation maxima file not found"),
        (("--smooth", random_calib, "--smooth-alpha", "1.5"), "--smooth-alpha must be within 0..1"),
        (("--smooth", random_calib / "transformer.act_absmax.safetensors"), "both backbones are converted"),
        (("--smooth", random_calib, "--parts", "vae"), "--smooth applies to the DiT backbones"),
    ):
        code, _, err = cli("convert", root, "-o", tmp_path / "out", *extra, "-q")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    # One backbone with one file is fine.
    convert(cli, root / "transformer", tmp_path / "one", "q8_0", "--role", "cond", "--smooth", random_calib / "transformer.act_absmax.safetensors")


def test_f16_range_after_folding_is_an_error_naming_the_tensor(cli, checkpoints, tmp_path):
    """An activation maximum of 1e12 at one column scales that weight column by ~1e6: beyond F16 under the f16
    recipe (refused, naming the tensor and the remedies), fine in F32."""
    root, _, _ = checkpoints("f32")
    t = {b: random_absmax(i) for i, b in enumerate(BACKBONES)}
    t["transformer"]["layers.0.feed_forward.w2.weight"][7] = 1e12
    calib = write_calib(tmp_path / "calib", t)
    code, _, err = cli("convert", root, "-o", tmp_path / "out", "--recipe", "f16", "--smooth", calib, "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "transformer.act_absmax.safetensors: tensor layers.0.feed_forward.w2.weight" in err and "beyond F16's range" in err and "--smooth-alpha" in err
    assert not (tmp_path / "out").exists()
    convert(cli, root, tmp_path / "f32", "f32", "--smooth", calib)
