"""VAE: converter (diffusers AutoencoderKLFlux2 folder -> vae.gguf) and runtime decoder, against diffusers 0.42.1.

The tiny VAE is ``make_tiny_vae(path, seed)`` in ``tests/_helpers.py`` (it also builds the ``vae/`` folder of the
tiny end-to-end checkpoint).

Measured on the tiny model below (float32, AMD EPYC Zen 4, torch 2.13): decode_latents vs diffusers ``vae.decode``:
F32 file max |diff| 0 (the runtime runs the same torch ops), F16 file 3.9e-3 (output std 0.76, |max| 3.9);
decode_tokens vs diffusers' Ideogram4Pipeline decode path: F32 file 0 uint8 levels, F16 file max 1 level on 3.8% of
values; tiled (tile 12, overlap 4) vs untiled on a 16x16 latent: mean |diff| 0.048, max 0.39 (per-window GroupNorm
statistics in the up path; random weights exaggerate this). A GroupNorm eps of 1e-5 instead of 1e-6 moves the F32
decode by 5.3e-5, one of 1e-7 by 6.4e-6: the F32 tolerance sits below both.

Mutation proof: ``tests/mutations.py`` changes the latent constants and modes, the de-normalisation formula, the
unpatchify order and the GroupNorm eps in turn and names the test here that fails for each (its docstring holds the
table).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import make_tiny_vae
from gguf_dit.errors import InputError, ModelError, OptionError, OutputError, SourceError
from gguf_dit.arch.latent import LATENT_SCALE, LATENT_SHIFT, token_dim

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gguf_dit.converter.vae import convert_vae
    from gguf_dit.runtime.vae import VAEDecoder

    root = tmp_path_factory.mktemp("vae")
    model = make_tiny_vae(root / "ckpt" / "vae", seed=0)
    out = {"root": root, "src": root / "ckpt" / "vae", "model": model}
    for dt in ("f32", "f16"):
        out[f"summary_{dt}"] = convert_vae(root / "ckpt" / "vae", root / f"vae_{dt}.gguf", dtype=dt)
        out[dt] = VAEDecoder.load(root / f"vae_{dt}.gguf")
    return out


def _z(h=12, w=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 32, h, w, generator=g) * 1.6


def _pipeline_latents(tokens: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Ideogram4Pipeline.__call__'s de-normalisation (z * scale + shift per token dim) and unpatch, restated."""
    z = tokens * scale.view(1, 1, -1) + shift.view(1, 1, -1)
    c = z.shape[-1] // 4
    return z.view(1, gh, gw, 2, 2, c).permute(0, 5, 1, 3, 2, 4).contiguous().view(1, c, gh * 2, gw * 2)


def _pipeline_decode(vae, tokens: torch.Tensor, gh: int, gw: int) -> np.ndarray:
    """diffusers 0.42.1 Ideogram4Pipeline.__call__'s decode section, restated (bn de-normalisation, unpatch,
    vae.decode, VaeImageProcessor.postprocess to PIL)."""
    from diffusers.image_processor import VaeImageProcessor

    bn_std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
    z = _pipeline_latents(tokens, vae.bn.running_mean, bn_std, gh, gw)
    with torch.no_grad():
        decoded = vae.decode(z, return_dict=False)[0]
    proc = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1) * 2)
    return np.asarray(proc.postprocess(decoded.float(), output_type="pil")[0])


# ------------------------------------------------------------------------------------------- (a), (b)


# F32: observed 0 (both sides are torch's own CPU kernels on the same shapes); 5e-6 leaves room for a CPU where torch
# picks another kernel for one of them. F16: observed 3.9e-3, the F16 rounding of the weights (not CPU dependent).
@pytest.mark.parametrize("dt,tol", [("f32", 5e-6), ("f16", 1.5e-2)])
def test_decode_latents_matches_diffusers(tiny, dt, tol):
    z = _z()
    with torch.no_grad():
        ref = tiny["model"].decode(z).sample
    ours = tiny[dt].decode_latents(z, clamp=False)
    assert ours.shape == ref.shape == (1, 3, 96, 80)
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"{dt}: max |ours - diffusers| = {err:.3g} > {tol}"
    assert ref.abs().max() > 1.0  # the comparison is unclamped, and the model's output does leave [-1, 1]
    clamped = tiny[dt].decode_latents(z)
    assert clamped.min() >= -1.0 and clamped.max() <= 1.0


@pytest.mark.parametrize("dt,latent_norm,min_equal", [("f32", "official", 0.999), ("f32", "checkpoint", 0.999), ("f16", "official", 0.9)])
def test_decode_tokens_matches_pipeline(tiny, dt, latent_norm, min_equal):
    from gguf_dit.runtime.vae import VAEDecoder

    gh, gw = 5, 6
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(1, gh * gw, 128, generator=g)
    ref = _pipeline_decode(tiny["model"], tokens, gh, gw)
    dec = VAEDecoder.load(tiny["root"] / f"vae_{dt}.gguf", latent_norm=latent_norm)
    img = dec.decode_tokens(tokens, gh, gw)
    assert img.dtype == np.uint8 and img.shape == ref.shape == (gh * 16, gw * 16, 3)
    diff = np.abs(img.astype(int) - ref.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    assert (diff == 0).mean() >= min_equal
    # (N, 128) input, numpy input: same image
    assert np.array_equal(dec.decode_tokens(tokens[0].numpy(), gh, gw), img)


def test_uint8_rounding_matches_official_formula(tiny):
    from gguf_dit.runtime.vae import to_uint8

    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 1 / 255, 0.5, 1.0, 3.0]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    got = to_uint8(x)[0, :, 0]
    want = ((x[0, 0, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(got, want) and got[0] == 0 and got[-1] == 255 and got[3] == 128  # 127.5 rounds to even


# ------------------------------------------------------------------------------------------- (c) layout


def test_token_layout(tiny):
    from gguf_dit.runtime.vae import VAEDecoder

    d = tiny["f32"]
    plain = VAEDecoder(d.module, d.config, np.zeros(128, np.float32), np.ones(128, np.float32))
    gh, gw = 2, 3
    tokens = np.arange(gh * gw)[:, None] * 1000.0 + np.arange(128)[None, :]  # value encodes (token, dim)
    lat = plain.tokens_to_latents(tokens.astype(np.float32), gh, gw).numpy()
    assert lat.shape == (1, 32, 4, 6)
    for y in range(gh):
        for x in range(gw):
            for ph in range(2):
                for pw in range(2):
                    for c in (0, 5, 31):
                        k = token_dim(ph, pw, c)
                        assert k == (ph * 2 + pw) * 32 + c
                        assert lat[0, c, 2 * y + ph, 2 * x + pw] == (y * gw + x) * 1000 + k
    # One known value through the official de-normalisation lands at exactly one place.
    t = np.zeros((gh * gw, 128), np.float32)
    y, x, ph, pw, c = 1, 2, 1, 0, 7
    t[y * gw + x, token_dim(ph, pw, c)] = 3.0
    lat = d.tokens_to_latents(t, gh, gw).numpy()[0]
    base = d.tokens_to_latents(np.zeros_like(t), gh, gw).numpy()[0]
    changed = np.argwhere(lat != base)
    assert changed.tolist() == [[c, 2 * y + ph, 2 * x + pw]]
    k = token_dim(ph, pw, c)
    assert np.isclose(lat[c, 2 * y + ph, 2 * x + pw], 3.0 * LATENT_SCALE[k] + LATENT_SHIFT[k], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- (d) constants, file


def test_official_constants():
    assert LATENT_SHIFT.shape == (128,) and LATENT_SCALE.shape == (128,)
    assert LATENT_SHIFT.dtype == np.float32 and LATENT_SCALE.dtype == np.float32
    spot = [
        (LATENT_SHIFT, 0, 0.01984364), (LATENT_SHIFT, 31, -0.03571246), (LATENT_SHIFT, 32, 0.02583857),
        (LATENT_SHIFT, 64 + 14, 0.37781868), (LATENT_SHIFT, 127, -0.01760592),
        (LATENT_SCALE, 0, 1.63933691), (LATENT_SCALE, 3, 1.90004803), (LATENT_SCALE, 96 + 3, 1.94067348),
        (LATENT_SCALE, 96 + 25, 1.53075757), (LATENT_SCALE, 127, 1.68533454),
    ]
    for arr, i, v in spot:
        assert arr[i] == np.float32(v), (i, arr[i], v)
    assert 1.53 < LATENT_SCALE.min() and LATENT_SCALE.max() < 1.95 and np.abs(LATENT_SHIFT).max() < 0.39
    # Every value: sum, index-weighted sum (k = 1..128) and sum of squares, in float64 over the float32 values,
    # computed from the official latent_norm.py values as restated in ideogram4-model.md §13 (not from our arrays).
    for arr, sums in ((LATENT_SHIFT, (-0.9297049473971128, -96.30016596242785, 4.488222301503358)),
                      (LATENT_SCALE, (213.54464638233185, 13755.824171066284, 357.21006905848475))):
        a = arr.astype(np.float64)
        got = (a.sum(), (np.arange(1, 129) * a).sum(), (a * a).sum())
        assert got == pytest.approx(sums, rel=1e-12, abs=1e-12)


def test_latent_norm_modes_follow_their_own_sources(tiny, tmp_path):
    """On a VAE whose BatchNorm statistics are not the official constants (a few variances near batch_norm_eps),
    'checkpoint' gives diffusers' pipeline de-normalisation (vae.bn), 'official' the official constants, and the two
    differ: swapped modes, a dropped eps or a wrong formula fail here."""
    from diffusers import AutoencoderKLFlux2

    from gguf_dit.converter.vae import convert_vae
    from gguf_dit.runtime.vae import VAEDecoder

    g = torch.Generator().manual_seed(7)

    def other_bn(sd):
        sd["bn.running_mean"] = torch.randn(128, generator=g) * 0.5
        sd["bn.running_var"] = torch.rand(128, generator=g) ** 4 * 2.0  # down to ~1e-8, below batch_norm_eps (1e-4)

    src = _copy_src(tiny, tmp_path / "vae", edit=other_bn)
    convert_vae(src, tmp_path / "vae.gguf", dtype="f32")
    vae = AutoencoderKLFlux2.from_pretrained(str(src)).eval()
    gh, gw = 3, 4
    tokens = torch.randn(1, gh * gw, 128, generator=g)
    bn_std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
    want = {
        "checkpoint": _pipeline_latents(tokens, vae.bn.running_mean, bn_std, gh, gw),
        "official": _pipeline_latents(tokens, torch.from_numpy(LATENT_SHIFT.copy()), torch.from_numpy(LATENT_SCALE.copy()), gh, gw),
    }
    dec = {mode: VAEDecoder.load(tmp_path / "vae.gguf", latent_norm=mode) for mode in want}
    for mode, ref in want.items():
        err = (dec[mode].tokens_to_latents(tokens, gh, gw) - ref).abs().max().item()
        # observed 0 (official) and 2.4e-7 (checkpoint: we take the square root in float64, diffusers in float32)
        assert err <= 1e-6, f"{mode}: max |ours - diffusers| = {err:.2e}"
    assert (want["checkpoint"] - want["official"]).abs().max() > 0.5
    # The image too: diffusers' pipeline decodes with vae.bn, so 'checkpoint' matches it and 'official' does not.
    ref_img = _pipeline_decode(vae, tokens, gh, gw).astype(int)
    assert np.abs(dec["checkpoint"].decode_tokens(tokens, gh, gw).astype(int) - ref_img).max() <= 1
    assert np.abs(dec["official"].decode_tokens(tokens, gh, gw).astype(int) - ref_img).max() > 20


def test_vae_gguf_contents(tiny):
    import gguf

    for dt in ("f32", "f16"):
        r = gguf.GGUFReader(str(tiny["root"] / f"vae_{dt}.gguf"))
        f = lambda k: r.fields[k].contents()  # noqa: E731
        assert f("general.architecture") == "flux2_vae"
        assert f("flux2_vae.block_out_channels") == [16, 32, 32, 48]
        assert f("flux2_vae.layers_per_block") == 1 and f("flux2_vae.norm_num_groups") == 8
        assert f("flux2_vae.latent_channels") == 32 and f("flux2_vae.mid_block_add_attention") is True
        assert f("flux2_vae.latent_norm_source") == "official"
        assert np.array_equal(np.array(f("flux2_vae.latent_shift"), np.float32), LATENT_SHIFT)
        assert np.array_equal(np.array(f("flux2_vae.latent_scale"), np.float32), LATENT_SCALE)
        bn = tiny["model"].bn
        assert np.array_equal(np.array(f("flux2_vae.checkpoint_bn_mean"), np.float32), bn.running_mean.numpy())
        assert np.array_equal(np.array(f("flux2_vae.checkpoint_bn_var"), np.float32), bn.running_var.numpy())
        names = {t.name: t for t in r.tensors}
        assert not any(n.startswith(("encoder.", "quant_conv.", "bn.")) for n in names)
        assert "post_quant_conv.weight" in names and "decoder.mid_block.attentions.0.to_q.weight" in names
        w = names["decoder.conv_in.weight"]
        assert tuple(w.data.shape) == (48, 32, 3, 3)  # PyTorch order as read back
        want = gguf.GGMLQuantizationType.F16 if dt == "f16" else gguf.GGMLQuantizationType.F32
        for t in r.tensors:
            assert t.tensor_type == (want if len(t.data.shape) > 1 else gguf.GGMLQuantizationType.F32), t.name
    s = tiny["summary_f16"]
    assert s["checkpoint_bn"] and s["checkpoint_bn_vs_official"]["shift_max_abs"] == 0.0
    # every tensor of diffusers' model outside the decoder (encoder, quant_conv, bn) is left out
    outside = [k for k in tiny["model"].state_dict() if not k.startswith(("decoder.", "post_quant_conv."))]
    assert s["checkpoint_bn_vs_official"]["scale_max_abs"] < 1e-6 and s["skipped_tensors"] == len(outside)


# ------------------------------------------------------------------------------------------- (e) tiling


@pytest.mark.parametrize("h,w,tile,overlap", [(16, 16, 8, 2), (13, 21, 6, 3), (10, 7, 4, 1), (9, 9, 5, 0)])
def test_tile_blending_is_exact_for_a_pointwise_map(h, w, tile, overlap):
    from gguf_dit.runtime.vae import tiled_apply

    z = _z(h, w)

    def fn(t):  # pointwise in latent space, then x8 nearest: every window agrees on every pixel
        return torch.nn.functional.interpolate(torch.tanh(t[:, :3] * 0.7), scale_factor=8, mode="nearest")

    full = fn(z)
    tiled = tiled_apply(fn, z, tile, overlap, 8, 3)
    assert (tiled - full).abs().max().item() < 1e-6


def test_tiled_decode_close_to_untiled(tiny):
    d = tiny["f32"]
    z = _z(16, 16, seed=3)
    full = d.decode_latents(z, clamp=False)
    assert torch.equal(d.decode_latents(z, tile=16, clamp=False), full)  # one window = untiled
    tiled = d.decode_latents(z, tile=12, overlap=4, clamp=False)
    err = (tiled - full).abs()
    # Per-window GroupNorm statistics in the up path make tiling approximate (measured 0.048 mean, 0.39 max).
    assert err.mean().item() < 0.08 and err.max().item() < 0.6, (err.mean().item(), err.max().item())
    img = d.decode_tokens(torch.zeros(1, 64, 128), 8, 8, tile=12, overlap=4)
    assert img.shape == (128, 128, 3)


# ------------------------------------------------------------------------------------------- (f) bad inputs


def test_runtime_bad_inputs(tiny, tmp_path):
    from gguf_dit.runtime.vae import VAEDecoder

    d = tiny["f32"]
    ok = torch.zeros(1, 12, 128)
    with pytest.raises(InputError, match="do not fill"):
        d.decode_tokens(ok, 3, 5)
    with pytest.raises(InputError, match="128"):
        d.decode_tokens(torch.zeros(1, 12, 64), 3, 4)
    with pytest.raises(InputError, match="batch size 1"):
        d.decode_tokens(torch.zeros(2, 12, 128), 3, 4)
    with pytest.raises(InputError, match="NaN"):
        d.decode_tokens(torch.full((12, 128), float("nan")), 3, 4)
    with pytest.raises(InputError, match="floating"):
        d.decode_tokens(torch.zeros(12, 128, dtype=torch.int64), 3, 4)
    with pytest.raises(InputError, match="positive"):
        d.decode_tokens(torch.zeros(0, 128), 0, 4)
    with pytest.raises(InputError, match=r"\(1, 32, h, w\)"):
        d.decode_latents(torch.zeros(1, 16, 4, 4))
    with pytest.raises(InputError, match="overlap"):
        d.decode_latents(torch.zeros(1, 32, 4, 4), tile=4, overlap=4)
    with pytest.raises(InputError, match="tile"):
        d.decode_latents(torch.zeros(1, 32, 4, 4), tile=1)
    with pytest.raises(ModelError, match="does not exist"):
        VAEDecoder.load(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelError, match="junk.gguf"):
        VAEDecoder.load(junk)
    with pytest.raises(ModelError, match="checkpoint"):
        VAEDecoder.load(tiny["root"] / "vae_f32.gguf", latent_norm="nonsense")


def _copy_src(tiny, dst: Path, edit=None, cfg_edit=None) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    cfg = json.loads((tiny["src"] / "config.json").read_text())
    if cfg_edit:
        cfg_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(tiny["src"] / "diffusion_pytorch_model.safetensors"))
    if edit:
        edit(sd)
    save_file(sd, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def test_converter_bad_inputs(tiny, tmp_path):
    from gguf_dit.converter.vae import convert_vae

    out = tmp_path / "o.gguf"
    with pytest.raises(SourceError, match="does not exist"):
        convert_vae(tmp_path / "missing", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=r"config\.json: missing"):
        convert_vae(empty, out)
    no_w = tmp_path / "no_w"
    no_w.mkdir()
    shutil.copy(tiny["src"] / "config.json", no_w / "config.json")
    with pytest.raises(SourceError, match="diffusion_pytorch_model.safetensors: missing"):
        convert_vae(no_w, out)

    name = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    src = _copy_src(tiny, tmp_path / "drop", edit=lambda sd: sd.pop(name))
    with pytest.raises(SourceError, match=f"tensor {name}: tensor missing"):
        convert_vae(src, out)

    def nan(sd):
        sd["decoder.conv_out.weight"][0, 0, 1, 1] = float("nan")

    src = _copy_src(tiny, tmp_path / "nan", edit=nan)
    with pytest.raises(SourceError, match="tensor decoder.conv_out.weight: non-finite") as e:
        convert_vae(src, out)
    assert "\n" not in str(e.value) and "diffusion_pytorch_model.safetensors" in str(e.value)

    src = _copy_src(tiny, tmp_path / "shape", cfg_edit=lambda c: c.update(block_out_channels=[16, 32, 32, 64]))
    with pytest.raises(SourceError, match="expected"):
        convert_vae(src, out)
    src = _copy_src(tiny, tmp_path / "lat", cfg_edit=lambda c: c.update(latent_channels=16))
    with pytest.raises(SourceError, match="32 latent channels"):
        convert_vae(src, out)

    def stray(sd):
        sd["decoder.extra.weight"] = torch.zeros(3)

    src = _copy_src(tiny, tmp_path / "stray", edit=stray)
    with pytest.raises(SourceError, match="decoder.extra.weight"):
        convert_vae(src, out)

    assert not out.exists() and not list(tmp_path.glob(".o.gguf*"))  # nothing half-written
    existing = tiny["root"] / "vae_f32.gguf"
    with pytest.raises(OutputError, match="already exists"):
        convert_vae(tiny["src"], existing)
    # A checkpoint root (holding vae/) is accepted too, and force overwrites.
    s = convert_vae(tiny["src"].parent, tmp_path / "root.gguf", dtype="f32")
    assert s["tensors"] == tiny["summary_f32"]["tensors"]
    convert_vae(tiny["src"], tmp_path / "root.gguf", dtype="f32", force=True)


def test_load_rejects_other_gguf(tmp_path):
    import gguf

    from gguf_dit.runtime.vae import VAEDecoder

    p = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(p), "ideogram4")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="not 'flux2_vae'"):
        VAEDecoder.load(p)


# ------------------------------------------------------------------------------------------- (g) compute modes


# Measured on the tiny model (vs diffusers float32, output std 0.76): channels_last max 6.7e-6, mean 7.1e-7 (float32
# summation order of other oneDNN kernels; 0 uint8 levels); bf16 max 0.057, mean 0.0073 (uint8: max 6 levels, 46 % of
# values differ). The real-shape numbers are in docs/benchmarks.md ("VAE decode").
@pytest.mark.parametrize("compute,dtype,max_tol,mean_tol,min_err", [
    ("channels_last", torch.float32, 3e-5, 3e-6, None),
    ("bf16", torch.bfloat16, 0.2, 0.025, 1e-3),
])
def test_compute_modes_against_diffusers(tiny, compute, dtype, max_tol, mean_tol, min_err):
    from gguf_dit.runtime.vae import VAEDecoder

    dec = VAEDecoder.load(tiny["root"] / "vae_f32.gguf", compute=compute)
    w = dec.module.decoder.conv_in.weight
    assert w.dtype == dtype and w.is_contiguous(memory_format=torch.channels_last)
    z = _z()
    with torch.no_grad():
        ref = tiny["model"].decode(z).sample
    ours = dec.decode_latents(z, clamp=False)
    assert ours.dtype == torch.float32 and ours.is_contiguous() and ours.shape == ref.shape
    err = (ours - ref).abs()
    assert err.max().item() <= max_tol and err.mean().item() <= mean_tol, (err.max().item(), err.mean().item())
    if min_err is not None:
        assert err.max().item() >= min_err  # bf16 really computed in bf16 (not silently float32)
    tiled = dec.decode_latents(z, tile=8, overlap=2, clamp=False)
    exact_tiled = VAEDecoder.load(tiny["root"] / "vae_f32.gguf").decode_latents(z, tile=8, overlap=2, clamp=False)
    assert tiled.dtype == torch.float32 and tiled.shape == ref.shape
    terr = (tiled - exact_tiled).abs()  # the same windows, so only the mode's own error remains
    assert terr.max().item() <= max_tol and terr.mean().item() <= mean_tol, (terr.max().item(), terr.mean().item())
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(1, 30, 128, generator=g)
    img = dec.decode_tokens(tokens, 5, 6)
    assert img.dtype == np.uint8 and img.shape == (80, 96, 3)


def test_compute_mode_default_is_exact_and_unknown_is_refused(tiny):
    from gguf_dit.runtime.vae import VAEDecoder

    assert tiny["f32"].compute == "exact"
    w = tiny["f32"].module.decoder.conv_in.weight
    assert w.dtype == torch.float32 and w.is_contiguous()
    with pytest.raises(OptionError, match="unknown VAE compute mode 'fp8'"):
        VAEDecoder.load(tiny["root"] / "vae_f32.gguf", compute="fp8")
