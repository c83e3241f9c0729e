"""`gguf-dit eval` (runtime/evaluate.py): a model against itself costs nothing, a perturbed copy costs an error that
grows with the perturbation, measured teacher-forced per backbone; mismatched models are refused; the --json schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from _gguf_edit import GGUFFile, write_sdcpp_style

DEMO = Path(__file__).resolve().parents[1] / "runtime" / "demo_model"
FAST = ["--steps", "2", "--size", "32x32", "-q"]


@pytest.fixture(scope="module")
def models(tiny_checkpoints, tmp_path_factory):
    """An F32 conversion of a tiny checkpoint (all parts), its Q8_0 backbones, and another checkpoint's F32 backbones."""
    from typer.testing import CliRunner

    from gguf_dit.cli import app
    from gguf_dit.converter.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval")
    other = write_tiny_checkpoint(root / "other_ck", seed=1, full=False)
    out = {}
    for name, src, args in (("f32", tiny_checkpoints(), ["--recipe", "f32"]), ("q8", tiny_checkpoints(), ["--recipe", "q8_0", "--parts", "dit"]),
                            ("other", other, ["--recipe", "f32", "--parts", "dit"])):
        r = CliRunner().invoke(app, ["convert", str(src), "-o", str(root / name), "-q", *args])
        assert r.exit_code == 0, r.stderr
        out[name] = root / name
    return out


def _perturbed(src: Path, dst: Path, name: str, eps: float) -> Path:
    """``src`` with one F32 weight plus eps × its RMS × standard normal noise (fixed seed): same source hash."""
    f = GGUFFile.from_file(src)
    t = f.tensor(name)
    w = np.frombuffer(t.data, "<f4")
    noise = np.random.default_rng(0).standard_normal(w.size).astype(np.float32)
    t.data = (w + np.float32(eps * np.sqrt(np.mean(w.astype(np.float64) ** 2))) * noise).astype("<f4").tobytes()
    return f.write(dst)


def _velocity_err(a: Path, b: Path, seed: int, t: float, side: int) -> float:
    """An independent look at the first step: both unconditional backbones on the seeded noise, no text."""
    from gguf_dit.runtime.dit import Ideogram4DiT
    from gguf_dit.runtime.schedule import initial_noise

    x = initial_noise(seed, (side // 16) ** 2)[0]
    va, vb = (Ideogram4DiT.load(p, "cpu", threads=1).velocity(x, t, None, grid=(side // 16, side // 16)).astype(np.float64) for p in (a, b))
    return float(np.linalg.norm(vb - va) / np.linalg.norm(va))


def test_a_model_against_itself_costs_nothing_and_the_json_has_its_schema(cli, tmp_path):
    """The embedded demo model against itself: every error exactly 0, PSNR infinite (printed "inf", JSON null), SSIM 1,
    the demo scorer's result identical on both sides; the JSON names every documented field."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red circle on the left and a blue square on the right.\nSomething the demo never saw.\n")
    out = tmp_path / "r.json"
    code, stdout, err = cli("eval", DEMO, DEMO, "--prompts", prompts, "--steps", "3", "--seeds", "2", "--json", out, "-q")
    assert code == 0, err
    assert "inf" in stdout and "total" in stdout
    r = json.loads(out.read_text())
    assert r["schema"] == "gguf-dit-eval/1"
    default = int(GGUFReader(DEMO / "transformer.gguf").fields["gguf_dit.default_size"].contents())  # the demo's default size
    s = r["settings"]
    assert (s["steps"], s["width"], s["height"], s["seeds"]) == (3, default, default, [0, 1, 2, 3]) and len(s["guidance"]) == len(s["t"]) == 3
    assert len(r["images"]) == 4
    for im in r["images"]:
        assert set(im) >= {"prompt", "line", "seed", "velocity_error", "latent_error", "final_latent_error", "psnr_db", "ssim"}
        assert im["velocity_error"]["cond"] == im["velocity_error"]["uncond"] == im["latent_error"] == [0.0] * 3
        assert im["final_latent_error"] == 0.0 and im["psnr_db"] is None and im["ssim"] == 1.0
    t = r["total"]
    assert t["velocity_error"]["cond"] == t["velocity_error"]["uncond"] == t["final_latent_error"] == 0.0 and t["psnr_db"] is None
    assert t["velocity_error"]["per_step"]["cond"] == [0.0] * 3 and t["latent_error_per_step"] == [0.0] * 3
    # weight bytes as gguf-py's reader counts them, over both backbones
    expected = sum(int(x.n_bytes) for n in ("transformer", "unconditional_transformer") for x in GGUFReader(DEMO / f"{n}.gguf").tensors)
    for side in ("reference", "candidate"):
        d = r[side]
        assert d["weight_bytes"] == expected and set(d["backbones"]) == {"transformer", "unconditional_transformer"}
        assert d["sample_seconds_per_image"] > 0 and d["load_seconds"] >= 0
        assert d["demo_score"]["n"] == 2 and d["demo_score"]["world"] == "128"  # only the demo's own caption is scored (two seeds)
        assert {"background", "colour", "position", "shape", "size", "all_attributes", "count"} <= set(d["demo_score"])
    assert r["reference"]["demo_score"] == r["candidate"]["demo_score"]
    assert [im["demo"]["reference"] == im["demo"]["candidate"] for im in r["images"][:2]] == [True, True]
    assert r["images"][0]["demo"]["scene"] == {"objects": [{"shape": "circle", "colour": "red", "position": "left", "size": None},
                                                           {"shape": "square", "colour": "blue", "position": "right", "size": None}],
                                               "background": "grey"}
    assert set(r["images"][0]["demo"]["reference"]["graded"]) == {"background", "colour", "position", "shape", "count"}
    assert "demo" not in r["images"][2]
    code, _, err = cli("eval", DEMO, DEMO, "--prompts", prompts, "--steps", "1", "--json", out, "-q")
    assert code == 2 and "already exists" in err and str(out) in err


def test_demo_targets_pick_the_world_by_prompt_and_size():
    """Which demo scorer reads which prompt: a 64×64 demo caption at 64×64 is a (shape, colour, position) combination;
    any caption demo.captions.read understands (plain or JSON) is a 128×128-demo scene at any size; others nothing."""
    from gguf_dit.demo.scene import Obj, Scene
    from gguf_dit.runtime.caption import prompt_from_string
    from gguf_dit.runtime.evaluate import _demo_targets

    old = prompt_from_string("A red circle on the left.")
    two = prompt_from_string("a small crimson disc on the left-hand side and a big box in cobalt on the right, against white")
    js = prompt_from_string(json.dumps({"high_level_description": "A green triangle at the bottom on a purple background.",
                                        "compositional_deconstruction": {"background": "Purple.", "elements": [{"type": "obj", "desc": "A green triangle."}]}}))
    junk = prompt_from_string("Something the demo never saw.")
    scene2 = Scene((Obj("circle", "red", "left", "small"), Obj("square", "blue", "right", "large")), "white")
    assert _demo_targets([old, two, js, junk], 64, 64) == [("combo", ("circle", "red", "left")), ("scene", scene2),
                                                           ("scene", Scene((Obj("triangle", "green", "bottom"),), "purple")), None]
    assert _demo_targets([old, junk], 128, 128) == [("scene", Scene((Obj("circle", "red", "left"),))), None]
    assert _demo_targets([junk], 128, 128) is None


def test_error_grows_with_the_perturbation_and_is_measured_per_backbone(models, tmp_path):
    """One linear of the unconditional backbone perturbed (a backbone file replacing the reference folder's): the
    conditional error is exactly 0 (teacher-forced on the reference's states, the same file), the unconditional one
    positive, ~10x for a 10x perturbation (a linear's output error is linear in its weight error), and its first
    step matches the two backbones evaluated directly on the seeded noise."""
    from gguf_dit.runtime.evaluate import evaluate
    from gguf_dit.runtime.schedule import resolve_settings

    ref = models["f32"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red circle.\n")
    reports = {}
    for eps in (1e-3, 1e-2):
        cand = _perturbed(ref / "unconditional_transformer.gguf", tmp_path / f"uncond_{eps}.gguf", "layers.1.feed_forward.w2.weight", eps)
        reports[eps] = r = evaluate(ref, cand, prompts, settings=resolve_settings(steps=3), size=(32, 32), threads=1)
        [im] = r["images"]
        assert im["velocity_error"]["cond"] == [0.0] * 3
        assert all(e > 0 for e in im["velocity_error"]["uncond"]) and im["final_latent_error"] > 0
        assert r["candidate"]["backbones"]["unconditional_transformer"]["path"] == str(cand)
        assert r["candidate"]["backbones"]["transformer"]["path"] == str(ref / "transformer.gguf")
        direct = _velocity_err(ref / "unconditional_transformer.gguf", cand, 0, r["settings"]["t"][0], 32)
        assert im["velocity_error"]["uncond"][0] == pytest.approx(direct, rel=1e-6)
    small, big = (reports[e]["total"] for e in (1e-3, 1e-2))
    assert 7 < big["velocity_error"]["uncond"] / small["velocity_error"]["uncond"] < 13
    assert big["final_latent_error"] > 3 * small["final_latent_error"]
    assert big["psnr_db"] is None or small["psnr_db"] is None or big["psnr_db"] < small["psnr_db"]


def test_q8_0_against_f32(models, cli, tmp_path):
    """A Q8_0 conversion against the F32 one of the same checkpoint: a candidate folder with only its backbones (the
    reference's encoder and VAE serve both), a small positive error on both backbones, a quarter of the bytes."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red circle.\n")
    out = tmp_path / "q8.json"
    code, stdout, err = cli("eval", models["f32"], models["q8"], "--prompts", prompts, *FAST, "--json", out)
    assert code == 0, err
    r = json.loads(out.read_text())
    v = r["total"]["velocity_error"]
    # observed on Zen 4: 1.21e-2 / 1.34e-2 velocity, 1.49e-2 final latents
    assert 3e-3 < v["cond"] < 0.05 and 3e-3 < v["uncond"] < 0.05 and 3e-3 < r["total"]["final_latent_error"] < 0.05
    assert math.isfinite(r["total"]["psnr_db"]) and r["total"]["ssim"] < 1
    assert 0.2 < r["candidate"]["weight_bytes"] / r["reference"]["weight_bytes"] < 0.35
    assert [b["recipe"] for b in r["candidate"]["backbones"].values()] == ["q8_0", "q8_0"]


def test_mismatched_models_exit_2_with_one_line_naming_the_file(models, cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red circle.\n")
    out = tmp_path / "r.json"
    # another checkpoint: the converter's source hash differs
    code, stdout, err = cli("eval", models["f32"], models["other"], "--prompts", prompts, *FAST, "--json", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    assert err.startswith(f"error: {models['other'] / 'transformer.gguf'}: converted from another checkpoint")
    # another config, files without the hash (stable-diffusion.cpp style: no metadata at all)
    sd = tmp_path / "sd"
    sd.mkdir()
    for n in ("transformer", "unconditional_transformer"):
        write_sdcpp_style(DEMO / f"{n}.gguf", sd / f"{n}.gguf")
    code, _, err = cli("eval", models["f32"], sd, "--prompts", prompts, *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {sd / 'transformer.gguf'}: emb_dim is 256, but {models['f32'] / 'transformer.gguf'} has 512")
    # not a backbone
    code, _, err = cli("eval", models["f32"], models["f32"] / "vae.gguf", "--prompts", prompts, *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "vae.gguf" in err and "backbone" in err
    code, _, err = cli("eval", models["f32"], models["f32"], "--prompts", prompts, "--size", "32by32")
    assert code == 2 and "--size" in err
    only = tmp_path / "only_cond"
    only.mkdir()
    (only / "transformer.gguf").write_bytes((models["q8"] / "transformer.gguf").read_bytes())
    code, _, err = cli("eval", models["f32"], only, "--prompts", prompts, *FAST)
    assert code == 2 and err.startswith(f"error: {only}: has no unconditional_transformer.gguf")


def test_psnr_is_scikit_images():
    from skimage.metrics import peak_signal_noise_ratio

    from gguf_dit.runtime.evaluate import psnr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    mse = float(np.mean((a.astype(float) - b) ** 2))
    assert psnr(mse) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12) and psnr(0.0) == math.inf
