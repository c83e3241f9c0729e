"""End to end (issue 4): a tiny random full checkpoint in the official layout → `gguf-dit convert` →
`gguf-dit run` → PNG, against diffusers 0.42.1's Ideogram4Pipeline with the same weights, prompt, seed
and schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers import make_checkpoint, make_text_encoder_checkpoint, make_tiny_vae

CAPTION = {
    "high_level_description": "A red fox standing in the snow.",
    "compositional_deconstruction": {"background": "Snowy field at dawn.", "elements": [{"type": "obj", "bbox": [100, 200, 900, 800], "desc": "A red fox."}]},
}
PREPARED = json.dumps(
    {"high_level_description": "A red fox standing in the snow.", "compositional_deconstruction": {"background": "Snowy field at dawn.", "elements": [{"type": "obj", "desc": "A red fox."}]}},
    separators=(",", ":"), ensure_ascii=False,
)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    from typer.testing import CliRunner

    from gguf_dit.cli import app

    root = tmp_path_factory.mktemp("full_ckpt")
    dits = make_checkpoint(root, dtype="f32")
    _, _, te_model, tokenizer = make_text_encoder_checkpoint(root)
    vae = make_tiny_vae(root / "vae")
    out = tmp_path_factory.mktemp("full_gguf")
    r = CliRunner().invoke(app, ["convert", str(root), "-o", str(out), "--recipe", "f32", "-q"])
    assert r.exit_code == 0, r.stderr
    return {"root": root, "out": out, "dits": dits, "te": te_model, "tok": tokenizer, "vae": vae}


def test_convert_writes_all_four_files(full):
    names = sorted(p.name for p in full["out"].iterdir())
    assert names == ["text_encoder.gguf", "transformer.gguf", "unconditional_transformer.gguf", "vae.gguf"]


def _diffusers_image(full, height, width, steps, guidance, mu, std, seed):
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline

    pipe = Ideogram4Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=full["vae"], text_encoder=full["te"].model, tokenizer=full["tok"],
        transformer=full["dits"]["transformer"], unconditional_transformer=full["dits"]["unconditional_transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    text = full["tok"].apply_chat_template([{"role": "user", "content": [{"type": "text", "text": PREPARED}]}], add_generation_prompt=True, tokenize=False)
    n_tokens = len(full["tok"](text, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        img = pipe(
            prompt=PREPARED, height=height, width=width, num_inference_steps=steps, guidance_schedule=list(guidance), mu=mu, std=std,
            max_sequence_length=n_tokens, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        ).images[0]
    return np.round(np.clip(img, 0, 1) * 255).astype(np.int16)


def test_run_matches_diffusers_pipeline_and_writes_metadata(full, tmp_path, cli):
    from gguf_dit.runtime.schedule import resolve_settings

    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps(CAPTION, indent=2))
    png = tmp_path / "fox.png"
    code, _, err = cli("run", prompt, "--model", full["out"], "-W", 64, "-H", 48, "--preset", "turbo-12", "--seed", 3,
                       "-o", png, "--reference", "diffusers", "--threads", 1, "-q")
    assert code == 0, err
    ours = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    assert ours.shape == (48, 64, 3)
    s = resolve_settings("turbo-12")
    ref = _diffusers_image(full, 48, 64, s.steps, s.guidance, s.mu, s.std, seed=3)
    assert ref.std() > 20 and (np.isin(ref, (0, 255))).mean() < 0.5  # a real image, not a saturated one
    diff = np.abs(ours - ref).max()
    print(f"max pixel difference vs diffusers: {diff}/255")
    assert diff <= 2
    info = Image.open(png).info
    params = info["parameters"]
    assert params.startswith(PREPARED + "\n")
    for part in ("Steps: 12", "Seed: 3", "Size: 64x48", "CFG scale: 7,", "CFG schedule: 7x11+3x1", f"Model: {full['out'].name},", "Recipe: f32", "Preset: turbo-12"):
        assert part in params, part
    full_meta = json.loads(info["gguf-dit"])
    assert full_meta["seed"] == 3 and full_meta["guidance"] == [7.0] * 11 + [3.0] and full_meta["reference"] == "diffusers"
    assert set(full_meta["models"]) >= {"transformer", "unconditional_transformer", "text_encoder", "vae"}


def test_same_seed_same_png_bytes_and_seeds_increment(full, tmp_path, cli):
    prompt = tmp_path / "p.txt"
    prompt.write_text("a red fox\n")
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        code, _, err = cli("run", prompt, "--model", full["out"], "-W", 32, "-H", 32, "--steps", 3, "--seed", 10, "-n", 2, "-o", d, "--threads", 1, "-q")
        assert code == 0, err
    names = sorted(p.name for p in a.iterdir())
    assert names == ["00000-10.png", "00001-11.png"]
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes()
    meta = json.loads(Image.open(a / names[1]).info["gguf-dit"])
    assert meta["seed"] == 11 and meta["prompt_source"] == "text"
    # The second image of a batch is exactly the image a lone run with the next seed draws.
    single = tmp_path / "single.png"
    code, _, err = cli("run", prompt, "--model", full["out"], "-W", 32, "-H", 32, "--steps", 3, "--seed", 11, "-o", single, "--threads", 1, "-q")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(a / names[1])))
    assert not np.array_equal(np.asarray(Image.open(a / names[0])), np.asarray(Image.open(a / names[1])))
    code, out, err = cli("run", prompt, "--model", full["out"], "-W", 32, "-H", 32, "--steps", 3, "--seed", 10, "-o", a, "--threads", 1, "-q")
    assert code == 0 and out.split() == [str(a / "00002-10.png")], err  # numbered on, nothing overwritten
    assert (a / "00002-10.png").read_bytes() == (a / names[0]).read_bytes()


@pytest.mark.parametrize(
    "setup,args,needle",
    [
        (lambda d: None, ["missing.txt"], "missing.txt"),
        (lambda d: (d / "p.txt").write_text("\n\n"), ["p.txt"], "no prompt"),
        (lambda d: (d / "p.txt").write_text('{"high_level_description": "x",\n "compositional'), ["p.txt"], "invalid JSON"),
        (lambda d: (d / "p.txt").write_text(json.dumps({"compositional_deconstruction": {"elements": "x", "background": ""}})), ["p.txt"], "expected an array"),
        (lambda d: (d / "p.txt").write_text("fox " * 3000), ["p.txt"], "2048"),
        (lambda d: (d / "p.txt").write_text("fox"), ["p.txt", "-W", 40], "multiple of 16"),
    ],
)
def test_bad_run_input_is_one_line_exit_2_no_png(full, tmp_path, cli, setup, args, needle):
    setup(tmp_path)
    args = [tmp_path / args[0]] + args[1:]
    out = tmp_path / "out"
    code, _, err = cli("run", *args, "--model", full["out"], "-o", out, "--steps", 2, "-W", 32, "-H", 32, "-q", "--threads", 1) if "-W" not in args else cli(
        "run", *args, "--model", full["out"], "-o", out, "--steps", 2, "-H", 32, "-q", "--threads", 1)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not out.exists() or not list(out.glob("*.png"))


def test_missing_model_files_and_wrong_encoder_are_refused(full, tmp_path, cli):
    import shutil

    prompt = tmp_path / "p.txt"
    prompt.write_text("fox")
    partial = tmp_path / "partial"
    shutil.copytree(full["out"], partial)
    (partial / "vae.gguf").unlink()
    code, _, err = cli("run", prompt, "--model", partial, "-o", tmp_path / "o", "-q")
    assert code == 2 and "vae" in err and "partial" in err
    # An encoder GGUF of the wrong architecture: a DiT file given as --text-encoder.
    code, _, err = cli("run", prompt, "--model", full["out"], "--text-encoder", full["out"] / "transformer.gguf", "-o", tmp_path / "o", "-q", "-W", 32, "-H", 32)
    assert code == 2 and "transformer.gguf" in err, err


def test_size_hints_from_convert_set_run_defaults_and_range(full, tmp_path, cli):
    out = tmp_path / "sized"
    code, _, err = cli("convert", full["root"], "-o", out, "--recipe", "f32", "--parts", "dit", "-q", "--size-range", "32..64", "--default-size", "48")
    assert code == 0, err
    for n in ("text_encoder.gguf", "vae.gguf"):
        (out / n).symlink_to(full["out"] / n)
    prompt = tmp_path / "p.txt"
    prompt.write_text("a fox")
    code, _, err = cli("run", prompt, "--model", out, "--steps", 2, "-o", tmp_path / "d.png", "-q", "--threads", 1)
    assert code == 0, err
    assert Image.open(tmp_path / "d.png").size == (48, 48)
    code, _, err = cli("run", prompt, "--model", out, "--steps", 2, "-W", 128, "-H", 64, "-o", tmp_path / "e.png", "-q")
    assert code == 2 and "outside the model's range 32..64" in err
    code, _, err = cli("convert", full["root"], "-o", tmp_path / "bad", "--parts", "dit", "-q", "--size-range", "40..20")
    assert code == 2 and "size range" in err
