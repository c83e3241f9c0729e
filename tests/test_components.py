"""`gguf-dit run` with the files users already have (issue 15): sd.cpp's component options (--diffusion-model,
--uncond-diffusion-model, --llm, --vae) with or without --model, a component file given to --model, the
unconditional backbone not needed when every step's guidance is 1, and the roles of the two backbones (metadata that
contradicts the option, one file or identical content for both, stable-diffusion.cpp files that record no role).
Runs on the embedded demo model's files; `write_sdcpp_style` rewrites a backbone as sd.cpp's `-M convert` writes it
(no KV metadata at all)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from _gguf_edit import write_sdcpp_style
from gguf_dit.cli import app
from gguf_dit.errors import ModelError, OptionError
from gguf_dit.runtime import demo
from gguf_dit.runtime.dit import Ideogram4DiT
from gguf_dit.runtime.generate import Generator
from gguf_dit.runtime.model_files import same_content

D = demo.DEMO_DIR
COND, UNCOND, TE, VAE = (D / n for n in ("transformer.gguf", "unconditional_transformer.gguf", "text_encoder.gguf", "vae.gguf"))
FAST = ("--steps", "2", "-W", "64", "-H", "64")


def _run(*args):
    r = CliRunner().invoke(app, ["run", "-p", "A red circle.", *map(str, args)])
    return r.exit_code, r.stdout, r.stderr


def _error(args, tmp_path) -> str:
    """The one error line of a run refused before any work (exit 2, nothing written)."""
    code, _, err = _run(*args, "-o", tmp_path / "out", "-q")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    return lines[0]


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning: ")]


@pytest.fixture(scope="module")
def sdcpp(tmp_path_factory):
    """The demo backbones without any metadata, named as sd.cpp's documentation names its files."""
    d = tmp_path_factory.mktemp("sdcpp")
    return (write_sdcpp_style(COND, d / "ideogram4-Q4_K.gguf"), write_sdcpp_style(UNCOND, d / "ideogram4_uncond-Q8_0.gguf"))


# -- a component file given to --model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, option", [("transformer.gguf", "--diffusion-model FILE"), ("unconditional_transformer.gguf", "--uncond-diffusion-model FILE"),
                                          ("text_encoder.gguf", "--llm FILE"), ("vae.gguf", "--vae FILE")])
def test_gguf_given_to_model_names_its_option(tmp_path, name, option):
    line = _error(["--model", D / name], tmp_path)
    assert line.startswith(f"error: {D / name}: --model takes a folder") and line.endswith(f"give it as {option}"), line


def test_metadata_less_backbone_given_to_model_names_both_backbone_options(tmp_path, sdcpp):
    line = _error(["--model", sdcpp[0]], tmp_path)
    assert "no role recorded" in line and line.endswith("give it as --diffusion-model FILE or --uncond-diffusion-model FILE"), line


def test_safetensors_given_to_model_points_to_convert_and_vae(tmp_path):
    f = tmp_path / "ae.safetensors"
    f.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    line = _error(["--model", f], tmp_path)
    assert "does not exist" not in line and "gguf-dit convert" in line and "--vae FILE" in line, line


# -- components with and without --model -------------------------------------------------------------------------------
def test_components_alone_draw_what_the_folder_draws(tmp_path):
    code, _, err = _run("--model", D, *FAST, "-o", tmp_path / "folder.png", "-q")
    assert code == 0, err
    code, _, err = _run("--diffusion-model", COND, "--uncond-diffusion-model", UNCOND, "--llm", TE, "--vae", VAE, *FAST, "-o", tmp_path / "parts.png", "-q")
    assert code == 0, err
    assert "demo model" not in err and not _warnings(err)
    assert (tmp_path / "folder.png").read_bytes() == (tmp_path / "parts.png").read_bytes()


def test_text_encoder_is_an_alias_of_llm(tmp_path):
    code, _, err = _run("--diffusion-model", COND, "--uncond-diffusion-model", UNCOND, "--text-encoder", TE, "--vae", VAE, *FAST, "-o", tmp_path / "a.png", "-q")
    assert code == 0, err


def test_a_component_replaces_the_folders_file(tmp_path):
    folder = shutil.copytree(D, tmp_path / "model")
    (folder / "vae.gguf").unlink()
    assert "missing vae file" in _error(["--model", folder], tmp_path)
    code, _, err = _run("--model", folder, "--vae", VAE, *FAST, "-o", tmp_path / "a.png", "-q")
    assert code == 0, err


@pytest.mark.parametrize("given, message", [
    (("--diffusion-model", COND, "--llm", TE), "error: no VAE: give --vae FILE or --model DIR"),
    (("--vae", VAE,), "error: no conditional backbone and no text encoder: give --diffusion-model FILE and --llm FILE, or --model DIR"),
])
def test_missing_components_name_their_options(tmp_path, given, message):
    assert _error(given, tmp_path) == message


@pytest.mark.parametrize("option, file, hint", [("--diffusion-model", VAE, "give it as --vae FILE"),
                                                ("--vae", COND, "give it as --diffusion-model FILE"),
                                                ("--uncond-diffusion-model", TE, "give it as --llm FILE")])
def test_a_file_given_to_the_wrong_component_option_names_the_right_one(tmp_path, option, file, hint):
    parts = {"--diffusion-model": COND, "--uncond-diffusion-model": UNCOND, "--llm": TE, "--vae": VAE, option: file}
    line = _error([x for kv in parts.items() for x in kv], tmp_path)
    assert line.startswith(f"error: {file}: given as {option}") and line.endswith(hint), line


def test_python_api_takes_the_components(tmp_path):
    gen = Generator(diffusion_model=COND, uncond_diffusion_model=UNCOND, text_encoder=TE, vae=VAE)
    assert not gen.demo and gen.warnings == []
    [image] = gen.generate("A red circle.", settings="turbo-12", height=64, width=64)
    assert image.image.shape == (64, 64, 3)
    with pytest.raises(OptionError, match="no text encoder: give --llm FILE or --model DIR"):
        Generator(diffusion_model=COND, vae=VAE)
    with pytest.raises(OptionError, match="give it as --vae FILE"):
        Generator(VAE)


# -- guidance 1 everywhere: no unconditional backbone ------------------------------------------------------------------
def test_guidance_one_needs_no_unconditional_file_and_draws_the_same_png(tmp_path):
    parts = ("--diffusion-model", COND, "--llm", TE, "--vae", VAE, *FAST, "--guidance", "1", "-q")
    code, _, err = _run(*parts, "-o", tmp_path / "without.png")
    assert code == 0, err
    code, _, err = _run(*parts, "--uncond-diffusion-model", UNCOND, "-o", tmp_path / "with.png")
    assert code == 0, err
    assert (tmp_path / "without.png").read_bytes() == (tmp_path / "with.png").read_bytes()


def test_a_step_with_other_guidance_needs_the_unconditional_file(tmp_path):
    line = _error(["--diffusion-model", COND, "--llm", TE, "--vae", VAE, *FAST, "--guidance", "1x1+3x1"], tmp_path)
    assert line.startswith("error: no unconditional backbone (give --uncond-diffusion-model FILE"), line


def test_guidance_one_runs_from_a_folder_without_the_unconditional_file(tmp_path):
    folder = shutil.copytree(D, tmp_path / "model")
    (folder / "unconditional_transformer.gguf").unlink()
    code, _, err = _run("--model", folder, *FAST, "--guidance", "1", "-o", tmp_path / "a.png", "-q")
    assert code == 0, err


@pytest.mark.parametrize("guidance, loaded", [("1", [COND]), ("7", [COND, UNCOND])])
def test_the_unconditional_backbone_is_loaded_only_when_a_step_uses_it(monkeypatch, guidance, loaded):
    load, paths = Ideogram4DiT.load.__func__, []

    def counting(cls, path, *a, **k):
        paths.append(path)
        return load(cls, path, *a, **k)

    monkeypatch.setattr(Ideogram4DiT, "load", classmethod(counting))
    from gguf_dit.runtime.schedule import resolve_settings

    gen = Generator(D)
    list(gen.generate("A red circle.", settings=resolve_settings("default-20", steps=2, guidance=guidance)))
    assert paths == loaded


# -- roles of the two backbones ----------------------------------------------------------------------------------------
def test_one_file_for_both_backbones_is_refused(tmp_path, sdcpp):
    for f in (COND, sdcpp[0]):
        line = _error(["--diffusion-model", f, "--uncond-diffusion-model", f, "--llm", TE, "--vae", VAE], tmp_path)
        assert line.startswith(f"error: {f}: given as both backbones"), line


def test_identical_content_for_both_backbones_is_refused(tmp_path, sdcpp):
    copy = shutil.copy(sdcpp[1], tmp_path / "other.gguf")
    line = _error(["--diffusion-model", copy, "--uncond-diffusion-model", sdcpp[1], "--llm", TE, "--vae", VAE], tmp_path)
    assert line.startswith(f"error: {sdcpp[1]}: holds the same bytes as {copy}"), line


def test_recorded_role_contradicting_the_option_is_refused(tmp_path, sdcpp):
    line = _error(["--diffusion-model", UNCOND, "--uncond-diffusion-model", sdcpp[0], "--llm", TE, "--vae", VAE], tmp_path)
    assert line == f"error: {UNCOND}: used as the conditional backbone (--diffusion-model), but its metadata records role=uncond"
    line = _error(["--diffusion-model", sdcpp[1], "--uncond-diffusion-model", COND, "--llm", TE, "--vae", VAE], tmp_path)
    assert line == f"error: {COND}: used as the unconditional backbone (--uncond-diffusion-model), but its metadata records role=cond"
    line = _error(["--diffusion-model", UNCOND, "--uncond-diffusion-model", COND, "--llm", TE, "--vae", VAE], tmp_path)
    assert line.startswith("error: the backbones are swapped") and line.endswith("exchange --diffusion-model and --uncond-diffusion-model")


def test_sdcpp_backbones_run_through_the_components_and_say_which_is_which(tmp_path, sdcpp):
    """No metadata: same pixels as the demo folder (same weights), and one line naming each file's role."""
    code, _, err = _run("--model", D, *FAST, "-o", tmp_path / "ours.png", "-q")
    assert code == 0, err
    code, _, err = _run("--diffusion-model", sdcpp[0], "--uncond-diffusion-model", sdcpp[1], "--llm", TE, "--vae", VAE, *FAST, "-o", tmp_path / "sdcpp.png", "-q")
    assert code == 0, err
    assert Image.open(tmp_path / "ours.png").tobytes() == Image.open(tmp_path / "sdcpp.png").tobytes()
    [w] = _warnings(err)
    assert f"{sdcpp[0]} is the conditional backbone, {sdcpp[1]} the unconditional one; if the images are noise, they are swapped" in w, w


def test_sdcpp_recipe_backbones_run_through_the_components(tmp_path):
    """sd.cpp's documented recipe (BF16 source, block linears Q8_0; norms, biases, t_embedding.*, final_layer.* stay
    BF16), written from the demo weights as gguf-py decodes them: runs through the component options."""
    import gguf
    import torch
    from test_sdcpp_files import write_sdcpp_file

    files = []
    for src, name in ((COND, "ideogram4-Q8_0.gguf"), (UNCOND, "ideogram4_uncond-Q8_0.gguf")):
        r = gguf.GGUFReader(str(src))
        sd = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(tuple(reversed(t.shape.tolist()))))
              for t in r.tensors}
        write_sdcpp_file(tmp_path / name, sd, gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q8_0)
        files.append(tmp_path / name)
    code, _, err = _run("--diffusion-model", files[0], "--uncond-diffusion-model", files[1], "--llm", TE, "--vae", VAE, *FAST, "-o", tmp_path / "a.png", "-q")
    assert code == 0, err
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    [w] = _warnings(err)
    assert f"{files[0]} is the conditional backbone" in w


def test_sdcpp_backbones_named_the_other_way_round_are_flagged(tmp_path, sdcpp):
    code, _, err = _run("--diffusion-model", sdcpp[1], "--uncond-diffusion-model", sdcpp[0], "--llm", TE, "--vae", VAE, *FAST, "-o", tmp_path / "a.png", "-q")
    assert code == 0, err
    [w] = _warnings(err)
    assert f"{sdcpp[1]} is the conditional backbone" in w and "their names suggest they are swapped" in w, w


def test_one_recorded_role_still_says_which_is_which(tmp_path, sdcpp):
    gen = Generator(diffusion_model=COND, uncond_diffusion_model=sdcpp[1], text_encoder=TE, vae=VAE)
    [w] = gen.warnings
    assert f"{COND} is the conditional backbone, {sdcpp[1]} the unconditional one" in w


def test_same_content_compares_bytes_across_the_file(tmp_path):
    size = 12 << 20
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    data = bytearray(size)
    a.write_bytes(data)
    b.write_bytes(data)
    data[-1] = 1
    c.write_bytes(data)
    assert same_content(a, b) and not same_content(a, c)
    data[-1], data[5 << 20] = 0, 1  # inside the fourth of the 8 sampled blocks (offsets 11 MiB · i/7)
    c.write_bytes(data)
    assert not same_content(a, c)
    c.write_bytes(bytes(size + 1))
    assert not same_content(a, c)


def test_a_missing_component_file_is_named(tmp_path):
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path / 'nope.gguf'}: does not exist")):
        Generator(diffusion_model=tmp_path / "nope.gguf", uncond_diffusion_model=UNCOND, text_encoder=TE, vae=VAE)
