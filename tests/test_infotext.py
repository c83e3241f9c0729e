"""Issue 15, "PNG metadata that A1111-compatible readers parse": the ``parameters`` text read by two independent
parsers (A1111's own grammar, re-implemented below from its published source, and the sd-parsers package), model
hashes checked against hashlib, the hash cache, `gguf-dit show`, and `run --from-png` drawing the same pixels.
Runs on a copy of the embedded demo model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from gguf_dit import hashes
from gguf_dit.cli import app
from gguf_dit.runtime import demo

from _demo_files import SIZE

# A1111's infotext grammar (stable-diffusion-webui modules/infotext_utils.py: re_param_code, re_imagesize and
# parse_generation_parameters): the last line holds the "Key: value" fields (at least 3, else it is prompt); a value
# is a JSON string literal or runs to the next comma; a WxH value becomes Key-1 / Key-2.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")

CAPTION = {"high_level_description": "A red circle, top: left.",
           "compositional_deconstruction": {"background": "White.", "elements": [{"type": "obj", "bbox": [0, 0, 500, 500], "desc": "A red circle."}]}}
GUIDANCE = "7x2+3.5"  # constant runs of 7, 7, 3.5: the CFG scale is 7, the schedule its own field
TE_NAME = "qwen3-vl 8b, q8: v1"  # a comma and a colon: A1111 quotes such a value


def a1111_parse(text: str) -> dict:
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAM.findall(last)) < 3:
        lines, last = lines + [last], ""
    res = {"Prompt": "\n".join(line.strip() for line in lines)}  # ours has no "Negative prompt:" line
    for k, v in A1111_PARAM.findall(last):
        if v[:1] == '"' == v[-1:]:
            v = json.loads(v)
        m = A1111_SIZE.match(v)
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.groups()
        else:
            res[k] = v
    return res


def _expand(schedule: str) -> list[float]:
    return [float(v) for term in schedule.split("+") for v, n in [term.split("x")] for _ in range(int(n))]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """One image from a model folder (a copy of the demo model) with the text encoder given as a file of its own."""
    root = tmp_path_factory.mktemp("infotext")
    model = Path(shutil.copytree(demo.model_dir(), root / "ideogram4-demo"))
    te = Path(shutil.copy(model / "text_encoder.gguf", root / f"{TE_NAME}.gguf"))
    prompt = root / "caption.json"
    prompt.write_text(json.dumps(CAPTION))
    png = root / "a.png"
    code, _, err = _cli("run", prompt, "--keep-bboxes", "--model", model, "--text-encoder", te, "--steps", 3, "--guidance", GUIDANCE,
                        "--seed", 5, "-o", png, "-q", "--threads", 1)
    assert code == 0, err
    return {"png": png, "model": model, "te": te, "run": ("--model", model, "--text-encoder", te, "-q", "--threads", 1)}


def test_a1111_grammar_reads_numeric_cfg_schedule_seed_size_steps_and_whole_file_hashes(drawn):
    im = Image.open(drawn["png"])
    p = a1111_parse(im.text["parameters"])
    assert p["Prompt"] == json.loads(im.text["gguf-dit"])["prompt"] and '"bbox":[0,0,500,500]' in p["Prompt"]
    assert float(p["CFG scale"]) == 7.0 and _expand(p["CFG schedule"]) == [7.0, 7.0, 3.5]
    assert (p["Steps"], p["Seed"], p["Size-1"], p["Size-2"]) == ("3", "5", str(im.width), str(im.height))
    assert p["Sampler"] == "Euler"
    m = drawn["model"]
    assert (p["Model"], p["Model hash"]) == ("ideogram4-demo", _sha(m / "transformer.gguf")[:10])
    assert (p["Uncond model"], p["Uncond model hash"]) == ("ideogram4-demo", _sha(m / "unconditional_transformer.gguf")[:10])
    assert (p["VAE"], p["VAE hash"]) == ("ideogram4-demo", _sha(m / "vae.gguf")[:10])
    assert (p["Text encoder"], p["Text encoder hash"]) == (TE_NAME, _sha(drawn["te"])[:10])
    assert f'Text encoder: {json.dumps(TE_NAME)},' in im.text["parameters"]  # quoted as A1111's quote() does


def test_sd_parsers_reads_it_as_an_a1111_image(drawn):
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators

    info = ParserManager().parse(drawn["png"])
    assert info.generator is Generators.AUTOMATIC1111
    (s,) = info.samplers
    assert s.name == "Euler" and float(s.parameters["cfg_scale"]) == 7.0
    assert (s.parameters["seed"], s.parameters["steps"]) == ("5", "3")
    assert (s.model.name, s.model.hash) == ("ideogram4-demo", _sha(drawn["model"] / "transformer.gguf")[:10])
    assert _expand(info.metadata["CFG schedule"]) == [7.0, 7.0, 3.5] and info.metadata["Size"] == f"{SIZE}x{SIZE}"
    assert str(s.prompts[0]) == json.loads(Image.open(drawn["png"]).text["gguf-dit"])["prompt"]


def test_from_png_draws_the_same_pixels(drawn, tmp_path):
    b = tmp_path / "b.png"
    code, _, err = _cli("run", "--from-png", drawn["png"], "-o", b, *drawn["run"])  # no --keep-bboxes: the stored text is used as is
    assert code == 0, err
    a_img, b_img = Image.open(drawn["png"]), Image.open(b)
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert json.loads(b_img.text["gguf-dit"]) == json.loads(a_img.text["gguf-dit"])
    assert b_img.text["parameters"] == a_img.text["parameters"]


@pytest.mark.parametrize("ext", ["jpg", "webp"])
def test_from_png_reads_our_jpeg_and_webp_too(drawn, tmp_path, ext):
    """A JPEG/WebP carries the JSON in EXIF ImageDescription next to A1111's UserComment: redrawn from it, the file is
    the same bytes (same pixels before the lossy encoding, same EXIF)."""
    a, b = tmp_path / f"a.{ext}", tmp_path / f"b.{ext}"
    assert _cli("run", "--from-png", drawn["png"], "-o", a, *drawn["run"])[0] == 0
    code, _, err = _cli("run", "--from-png", a, "-o", b, *drawn["run"])
    assert code == 0, err
    assert a.read_bytes() == b.read_bytes()
    exif = Image.open(a).getexif()
    assert json.loads(exif[0x010E]) == json.loads(Image.open(drawn["png"]).text["gguf-dit"])


def test_from_png_options_given_override_it(drawn, tmp_path):
    c = tmp_path / "c.png"
    code, _, err = _cli("run", "--from-png", drawn["png"], "-o", c, "--seed", 6, "--preset", "turbo-12", "--mu", 0.25, *drawn["run"])
    assert code == 0, err
    a, got = json.loads(Image.open(drawn["png"]).text["gguf-dit"]), json.loads(Image.open(c).text["gguf-dit"])
    assert (got["seed"], got["steps"], got["guidance"], got["mu"], got["std"]) == (6, 12, [7.0] * 11 + [3.0], 0.25, 1.75)
    assert (got["prompt"], got["width"], got["height"], got["reference"]) == (a["prompt"], a["width"], a["height"], a["reference"])


def test_from_png_warns_when_the_model_differs(drawn, tmp_path):
    im = Image.open(drawn["png"])
    meta = json.loads(im.text["gguf-dit"])
    meta["models"]["transformer"]["hash"] = "0123456789"
    info = PngImagePlugin.PngInfo()
    info.add_itxt("gguf-dit", json.dumps(meta))
    other = tmp_path / "other.png"
    im.save(other, pnginfo=info)
    code, _, err = _cli("run", "--from-png", other, "-o", tmp_path / "d.png", *drawn["run"])
    assert code == 0, err
    assert "drawn with model hash 0123456789" in err and hashes.autov2(drawn["model"] / "transformer.gguf") in err


def test_show_prints_the_a1111_text_and_json(drawn):
    im = Image.open(drawn["png"])
    code, out, err = _cli("show", drawn["png"])
    assert code == 0, err
    assert out == im.text["parameters"] + "\n"
    code, out, err = _cli("show", drawn["png"], "--json")
    assert code == 0, err
    assert json.loads(out) == json.loads(im.text["gguf-dit"])


def test_show_reads_a1111_text_from_jpeg_exif(tmp_path):
    """A1111 (through piexif) stores JPEG/WebP parameters in EXIF UserComment: "UNICODE\\0" then UTF-16, big-endian."""
    text = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123456789, Model: v1-5"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    for ext in ("jpg", "webp"):
        path = tmp_path / f"x.{ext}"
        Image.new("RGB", (16, 16)).save(path, exif=exif)
        code, out, err = _cli("show", path)
        assert code == 0, err
        assert out == text + "\n"


def test_another_tools_exif_description_is_not_taken_for_our_json(tmp_path):
    exif = Image.Exif()
    exif[0x010E] = '{"title": "Sunset"}'
    Image.new("RGB", (16, 16)).save(tmp_path / "x.jpg", exif=exif)
    code, _, err = _cli("show", tmp_path / "x.jpg", "--json")
    assert code == 2 and "has no gguf-dit metadata" in _one_error_line(err)


def test_images_without_our_metadata_are_one_line_errors(tmp_path):
    plain, a1111, text = tmp_path / "plain.png", tmp_path / "a1111.png", tmp_path / "notes.png"
    Image.new("RGB", (16, 16)).save(plain)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")
    Image.new("RGB", (16, 16)).save(a1111, pnginfo=info)
    text.write_text("not an image")
    out = tmp_path / "out"
    for png in (plain, a1111):
        code, _, err = _cli("run", "--from-png", png, "-o", out)
        assert code == 2 and str(png) in _one_error_line(err) and "gguf-dit metadata" in err
    assert not out.exists()
    code, _, err = _cli("show", plain)
    assert code == 2 and str(plain) in _one_error_line(err)
    code, out_text, err = _cli("show", a1111)  # another tool's image: its text is shown
    assert code == 0 and out_text.startswith("a cat\nSteps: 20")
    code, _, err = _cli("show", a1111, "--json")
    assert code == 2 and str(a1111) in _one_error_line(err)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # would block Pillow forever
    for bad in (text, tmp_path / "missing.png", fifo, tmp_path):
        code, _, err = _cli("show", bad)
        assert code == 2 and str(bad) in _one_error_line(err)


def test_broken_gguf_dit_metadata_is_a_one_line_error(tmp_path):
    png = tmp_path / "broken.png"
    info = PngImagePlugin.PngInfo()
    info.add_itxt("gguf-dit", json.dumps({"prompt": "x", "seed": 1}))
    Image.new("RGB", (16, 16)).save(png, pnginfo=info)
    code, _, err = _cli("run", "--from-png", png, "-o", tmp_path / "o.png")
    assert code == 2 and str(png) in _one_error_line(err) and "prompt_source" in err


# --- the hash cache ---------------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "gguf-dit" / "hashes.json"


def test_autov2_is_the_whole_files_sha256_cached_until_the_file_changes(tmp_path, cache, forbid, monkeypatch):
    f = tmp_path / "model.gguf"
    data = np.random.default_rng(0).integers(0, 256, (hashes.CHUNK * 2 + 12345,), dtype=np.uint8).tobytes()
    f.write_bytes(data)
    assert hashes.autov2(f) == hashlib.sha256(data).hexdigest()[:10]
    assert cache.is_file()
    real = hashes.sha256_file
    forbid(hashes, "sha256_file", "the cached hash must be used")
    assert hashes.autov2(f) == hashlib.sha256(data).hexdigest()[:10]
    changed = data[:-1] + bytes([data[-1] ^ 1])  # same size; a new mtime
    f.write_bytes(changed)
    monkeypatch.setattr(hashes, "sha256_file", real)
    assert hashes.autov2(f) == hashlib.sha256(changed).hexdigest()[:10]


def test_a_broken_or_unwritable_cache_only_means_hashing_again(tmp_path, cache, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    assert hashes.autov2(f) == hashlib.sha256(b"abc").hexdigest()[:10]
    assert json.loads(cache.read_text())[str(f.resolve())]["sha256"] == hashlib.sha256(b"abc").hexdigest()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache folder cannot be created
    assert hashes.autov2(f) == hashlib.sha256(b"abc").hexdigest()[:10]


def test_convert_outputs_are_hashed_when_written(tmp_path, cache, forbid):
    """`convert` writes through OutputSet, which caches each file's hash, so a run after convert hashes nothing."""
    from gguf_dit.converter.output import OutputSet

    with OutputSet(tmp_path / "out", ["transformer.gguf", "vae.gguf"], force=False) as outs:
        outs.path("transformer.gguf").write_bytes(b"backbone")
        outs.path("vae.gguf").write_bytes(b"decoder")
    forbid(hashes, "sha256_file", "convert should have cached the hash")
    assert hashes.autov2(tmp_path / "out" / "transformer.gguf") == hashlib.sha256(b"backbone").hexdigest()[:10]
    assert hashes.autov2(tmp_path / "out" / "vae.gguf") == hashlib.sha256(b"decoder").hexdigest()[:10]


def test_infotext_without_an_unconditional_backbone_omits_it():
    from gguf_dit.runtime.infotext import infotext
    from gguf_dit.runtime.schedule import resolve_settings

    models = {k: {"name": "m", "hash": "0123456789"} for k in ("transformer", "text_encoder", "vae")}
    p = a1111_parse(infotext("a cat", resolve_settings(None, guidance=1), 3, 64, 48, models, "official"))
    assert "Uncond model" not in p and "CFG schedule" not in p and p["CFG scale"] == "1" and p["VAE"] == "m"
    assert (p["Size-1"], p["Size-2"]) == ("48", "64")
