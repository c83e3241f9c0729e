"""`gguf-dit calibrate` (issue 12 item 2): activation statistics against diffusers' own forward, the files it writes, the
fragility ranking on a constructed case, the recipe's budget (measured by `convert` itself), and bad input."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from gguf_dit.ggml_ops import Backend, GGMLType, Graph
from gguf_dit.runtime.backbone_file import BackboneFile
from gguf_dit.runtime.calibrate import StatsDiT
from gguf_dit.runtime.dit import RuntimeOptions
from gguf_dit.runtime.schedule import resolve_settings

#: ours vs diffusers float32, per linear: max |difference| / max |reference| of the column sums of squares. Observed
#: up to 1.5e-6 on AMD EPYC Zen 4 (float32 summation order, as for the velocities in test_dit.py): ~7x margin.
SUMS_TOL = 1e-5
STEPS, SIZE = 3, 64  # the calibration run below: 3 steps at 64x64 = a 4x4 token grid
N_IMG = (SIZE // 16) ** 2
FRAGILE = "layers.1.attention.qkv.weight"


def test_reductions_match_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 33)) * rng.uniform(0.1, 9, 33)).astype(np.float32)  # 7 tokens of 33 columns

    def build(b, i):
        xt = b.cont(b.transpose(i["x"]))
        return {"ss": b.sum_rows(b.sqr(xt)), "mx": b.max_rows(b.abs(xt)), "t": xt}

    g = Graph(Backend("cpu", threads=1), [("x", GGMLType.F32, (33, 7))], build, graph_size=64)
    try:
        g.set("x", x)
        g.compute()
        np.testing.assert_array_equal(g.get("t"), x.T)
        np.testing.assert_allclose(g.get("ss").ravel(), (x.astype(np.float64) ** 2).sum(0), rtol=1e-6)
        np.testing.assert_array_equal(g.get("mx").ravel(), np.abs(x).max(0))
    finally:
        g.close()


def _oracle_stats(model, calls):
    """Each diffusers Linear's input over ``calls`` forwards, from forward pre-hooks: {official weight name: (sums,
    absmax, rows with any non-zero value)}. diffusers runs input_proj and llm_cond_proj over the whole padded
    sequence; the rows the other modality leaves at zero are not tokens of that linear."""
    from _helpers import reference_velocity

    out: dict[str, list] = {}

    def hook(name):
        def f(mod, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy()
            acc = out.setdefault(name, [0.0, 0.0, 0])
            acc[0] = acc[0] + (x**2).sum(0)
            acc[1] = np.maximum(acc[1], np.abs(x).max(0))
            acc[2] += int((x != 0).any(1).sum())
        return f

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith(("to_k", "to_v")):  # q, k, v share one input: qkv's
            official = name.replace("attention.to_q", "attention.qkv").replace("attention.to_out.0", "attention.o")
            mod.register_forward_pre_hook(hook(official + ".weight"))
    for x, t, feats, grid in calls:
        reference_velocity(model, x, t, feats, grid)
    return out


@pytest.mark.parametrize("role", ["transformer", "unconditional_transformer"])
def test_statistics_match_diffusers_linear_inputs(f32_gguf, role):
    out, models = f32_gguf
    rng = np.random.default_rng(1)
    grid, n_text = (3, 4), (0 if role == "unconditional_transformer" else 5)
    calls = [(rng.standard_normal((12, 128)).astype(np.float32), t,
              None if not n_text else (rng.standard_normal((n_text, 416)) * 2).astype(np.float32), grid) for t in (0.2, 0.7)]
    dit = StatsDiT(BackboneFile(out / f"{role}.gguf"), Backend("cpu"), RuntimeOptions(t_rounding="none"))
    try:
        for x, t, feats, g in calls:
            dit.velocity(x, t, feats, grid=g)
    finally:
        dit.close()
    ref = _oracle_stats(models[role], calls)
    ours = dit.stats
    assert set(ours) == {n for n, (_, _, rows) in ref.items() if rows}  # uncond: llm_cond_proj never runs
    assert len(ours) == 7 + 6 * 2 - (role == "unconditional_transformer")
    for name, s in ours.items():
        sums, absmax, rows = ref[name]
        assert s.count == rows, name
        assert np.abs(s.sums - sums).max() / sums.max() <= SUMS_TOL, name
        assert np.abs(s.absmax - absmax).max() / absmax.max() <= SUMS_TOL, name
    assert ours["layers.0.adaln_modulation.weight"].count == len(calls)  # a per-sample GEMV: one row per forward


# -- the command on a float tiny model, one linear made fragile -----------------------------------------------------
def _make_fragile(path):
    """Outlier columns in FRAGILE whose inputs the norm before it zeroes: they carry nothing, but set the Q4_K scales
    of their blocks, so every other weight there is rounded to a few levels."""
    f = BackboneFile(path)
    for name, edit in ((FRAGILE, lambda w: w[:, ::32].__imul__(100)), ("layers.1.attention_norm1.weight", lambda w: w[::32].fill(0))):
        t = f.tensors[name]
        w = np.memmap(path, dtype=np.float32, mode="r+", offset=t.offset, shape=t.shape)
        edit(w)
        w.flush()
        del w


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoints, tmp_path_factory):
    from typer.testing import CliRunner

    from gguf_dit.cli import app

    base = tmp_path_factory.mktemp("calibrate")
    r = CliRunner().invoke(app, ["convert", str(tiny_checkpoints(False)), "-o", str(base / "f32"), "--recipe", "f32", "-q"])
    assert r.exit_code == 0, r.stderr
    for name in ("transformer.gguf", "unconditional_transformer.gguf"):
        _make_fragile(base / "f32" / name)
    (base / "prompts.txt").write_text("A red circle on the left.\n")
    args = ["calibrate", str(base / "f32"), "--prompts", str(base / "prompts.txt"), "-o", str(base / "calib"), "--steps", str(STEPS),
            "--size", f"{SIZE}x{SIZE}", "--states", "2", "--refine", "1", "--budget", "0.1", "-q"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stderr
    return base, args, tiny_checkpoints(False)


def test_calib_dir_holds_imatrices_absmax_recipe_and_report(calibrated):
    from safetensors.numpy import load_file

    from gguf_dit.imatrix import Imatrix

    base, _, _ = calibrated
    d = base / "calib"
    assert sorted(p.name for p in d.iterdir()) == sorted(["transformer.imatrix", "unconditional_transformer.imatrix", "recipe.json", "calibration.json",
                                                          "transformer.act_absmax.safetensors", "unconditional_transformer.act_absmax.safetensors"])
    uncond_steps = sum(g != 1.0 for g in resolve_settings("default-20", steps=STEPS).guidance)
    assert uncond_steps == STEPS  # no preset step has guidance 1 (which would skip the unconditional backbone)
    for role, calls in (("transformer", STEPS), ("unconditional_transformer", uncond_steps)):
        im = Imatrix.read(d / f"{role}.imatrix")
        absmax = load_file(str(d / f"{role}.act_absmax.safetensors"))
        assert set(absmax) == set(im.entries) and im.chunks == calls
        n = {k: e.count for k, e in im.entries.items()}
        n_text = n.get("llm_cond_proj.weight", 0) // STEPS
        assert (n_text > 0) == (role == "transformer")
        assert n["input_proj.weight"] == calls * N_IMG
        for k in ("adaln_proj.weight", "t_embedding.mlp_in.weight", "layers.1.adaln_modulation.weight", "final_layer.adaln_modulation.weight"):
            assert n[k] == calls, k  # exact-conditioning GEMVs: one row per forward
        for k in ("layers.0.attention.qkv.weight", "layers.1.attention.o.weight", "layers.0.feed_forward.w2.weight", "final_layer.linear.weight"):
            assert n[k] == calls * (n_text + N_IMG), k
        qkv = im.entries[FRAGILE]
        assert (qkv.sums[::32] == 0).all() and (qkv.sums > 0).sum() == qkv.sums.size - qkv.sums.size // 32  # the zeroed norm columns
        assert absmax[FRAGILE].dtype == np.float32 and (absmax[FRAGILE][::32] == 0).all()
        assert np.all(absmax[FRAGILE] ** 2 * qkv.count >= qkv.sums * (1 - 1e-6))  # max² · rows bounds the sum of squares
    report = json.loads((d / "calibration.json").read_text())
    assert report["reference_mismatch"] == {"transformer": 0.0, "unconditional_transformer": 0.0}
    assert report["prompts"]["texts"] and report["sampling"]["steps"] == STEPS


def test_the_constructed_fragile_linear_ranks_first_and_is_protected(calibrated):
    base, _, _ = calibrated
    report = json.loads((base / "calib" / "calibration.json").read_text())
    for role in ("cond", "uncond"):
        groups = report["groups"][role]
        assert max(groups, key=lambda b: groups[b]["velocity"]) == "layers.1"
        frag = {n: f["velocity"] for n, f in report["fragility"][role].items() if "velocity" in f}
        ranked = sorted(frag, key=frag.get, reverse=True)
        # with convert --imatrix's bytes (floored importance) FRAGILE led final_layer.linear by 1.21x (cond) and 1.86x
        # (uncond) on Zen 4; the block-group screening below it separates them by 3x
        assert ranked[0] == FRAGILE and frag[FRAGILE] > 1.1 * frag[ranked[1]], frag
    assert report["fragility"]["uncond"]["llm_cond_proj.weight"] == {"unused": True}
    recipe = json.loads((base / "calib" / "recipe.json").read_text())
    assert re.fullmatch(recipe["rules"][0]["pattern"], FRAGILE) and "calibrate" in recipe["rules"][0]["reason"]


def test_recipe_converts_within_the_budget(calibrated, cli):
    """The byte budget, checked on the files `convert` writes with the recipe against the uniform --type ones."""
    base, _, ck = calibrated
    report = json.loads((base / "calib" / "calibration.json").read_text())
    sizes = {}
    for recipe in ("q4_k", str(base / "calib" / "recipe.json")):
        out = base / f"conv-{len(sizes)}"
        code, _, err = cli("convert", ck, "-o", out, "--recipe", recipe, "--parts", "dit", "-q", "--force")
        assert code == 0, err
        sizes[recipe] = sum(sum(t.nbytes for t in BackboneFile(out / f).tensors.values()) for f in ("transformer.gguf", "unconditional_transformer.gguf"))
    extra = sizes[str(base / "calib" / "recipe.json")] - sizes["q4_k"]
    assert report["budget"]["model_bytes"] == sizes["q4_k"]
    assert 0 < extra == report["budget"]["used_bytes"] <= report["budget"]["allowed_bytes"] == int(0.1 * sizes["q4_k"])
    tensors = BackboneFile(out / "transformer.gguf").tensors
    assert tensors[FRAGILE].type is not GGMLType.Q4_K


def test_existing_calib_dir_is_not_replaced_without_force(calibrated, cli, forbid):
    from gguf_dit.runtime import calibrate as cal

    base, args, _ = calibrated
    before = {p.name: p.stat().st_mtime_ns for p in (base / "calib").iterdir()}
    forbid(cal, "calibrate", "no measurement may start before the output folder is checked")
    code, _, err = cli(*args[:-1])  # -q dropped: still refused at once
    assert code == 2 and "already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in (base / "calib").iterdir()} == before


def test_a_failure_during_calibration_leaves_nothing(calibrated, cli, monkeypatch, tmp_path):
    from gguf_dit.errors import ModelError
    from gguf_dit.runtime import pipeline

    base, args, _ = calibrated

    def fail(*a, **k):
        raise ModelError("text features contain NaN/Inf", path="text_encoder.gguf")

    monkeypatch.setattr(pipeline.Pipeline, "encode", fail)
    out = tmp_path / "new" / "calib"
    code, _, err = cli(*[str(out) if a == str(base / "calib") else a for a in args])
    assert code == 2 and "NaN" in err
    assert not (tmp_path / "new").exists()


def test_quantized_model_is_refused(calibrated, cli, tmp_path):
    base, args, ck = calibrated
    model = tmp_path / "q8"
    shutil.copytree(base / "f32", model)
    code, _, err = cli("convert", ck, "-o", tmp_path / "tmpq", "--recipe", "q8_0", "--role", "cond", "-q")
    assert code == 0, err
    shutil.copy(tmp_path / "tmpq" / "transformer.gguf", model / "transformer.gguf")
    out = tmp_path / "calib"
    code, _, err = cli(*[str(model) if a == str(base / "f32") else str(out) if a == str(base / "calib") else a for a in args])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "transformer.gguf" in err and "Q8_0" in err and "float conversion" in err
    assert not out.exists()


@pytest.mark.parametrize("option,value,message", [("--budget", "lots", "--budget"), ("--size", "64by64", "--size"), ("--seeds", "0", "--seeds"),
                                                  ("--type", "f16", "quantized type"), ("--type", "q9", "unknown tensor type")])
def test_bad_options_are_one_line_errors(calibrated, cli, tmp_path, option, value, message):
    base, args, _ = calibrated
    out = tmp_path / "calib"
    args = [str(out) if a == str(base / "calib") else a for a in args]
    args = args[: args.index(option)] + args[args.index(option) + 2:] if option in args else args
    code, _, err = cli(*args, option, value)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()



def test_variants_quantize_as_convert_imatrix_does(calibrated, cli):
    """A fragility variant holds the bytes `convert --imatrix` writes for that linear (importance floored the same way,
    uniform where none applies): otherwise the error measured is not the recipe's. FRAGILE's zero columns make the
    floor matter."""
    from gguf_dit.imatrix import Imatrix
    from gguf_dit.runtime.calibrate import _Probe

    base, _, ck = calibrated
    for recipe, extra in (("f32", []), ("q4_k", ["--imatrix", base / "calib"])):
        code, _, err = cli("convert", ck, "-o", base / f"cond-{recipe}", "--recipe", recipe, "--role", "cond", "--parts", "dit", "-q", "--force", *extra)
        assert code == 0, err
    im = Imatrix.read(base / "calib" / "transformer.imatrix")
    probe = object.__new__(_Probe)  # only its quantizer: no velocities needed
    probe.file, probe.qtype = BackboneFile(base / "cond-f32" / "transformer.gguf"), GGMLType.Q4_K
    probe.importance = {n: im.importance(n) for n in im.entries}
    q = BackboneFile(base / "cond-q4_k" / "transformer.gguf")
    for n in (FRAGILE, "layers.0.feed_forward.w2.weight", "final_layer.linear.weight"):
        type_, data = probe.quantized(n)
        assert type_ is q.tensors[n].type, n
        assert np.array_equal(np.ascontiguousarray(data).view(np.uint8).ravel(), q.tensors[n].data.view(np.uint8).ravel()), n
