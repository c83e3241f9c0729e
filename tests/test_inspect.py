"""`gguf-dit inspect` on every kind of file `convert` writes, its exit code (2 exactly when `run` would refuse the
file), and truncated GGUFs (one `error:` line naming the file, from `inspect` and from `run`, wherever the cut is).

Oracles: gguf-py's GGUFReader (what the files hold) and the GGUF layout written by tests/_gguf_edit.py per the spec.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _demo_files import VOCAB
from _gguf_edit import GGUFFile
from gguf import GGUFReader

from gguf_dit.runtime import demo

DEMO = demo.model_dir()
FILES = ("transformer.gguf", "unconditional_transformer.gguf", "text_encoder.gguf", "vae.gguf")
KIND = {"transformer.gguf": "backbone", "unconditional_transformer.gguf": "backbone", "text_encoder.gguf": "text_encoder", "vae.gguf": "vae"}


def _field(r: GGUFReader, key: str):
    return r.fields[key].contents()


def _one_error(err: str, path: Path) -> str:
    """The message of the one `error: PATH: ...` line on stderr (after the path)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), err
    return lines[0].removeprefix(f"error: {path}: ")


@pytest.mark.parametrize("name", FILES)
def test_inspect_describes_every_file_convert_writes(cli, name):
    path = DEMO / name
    code, out, err = cli("inspect", path, "--json", "--check")
    assert code == 0, err
    rep = json.loads(out)
    r = GGUFReader(str(path))
    assert rep["kind"] == KIND[name] and rep["architecture"] == _field(r, "general.architecture")
    assert rep["tensor_count"] == len(r.tensors) and rep["bytes"] == sum(int(t.n_bytes) for t in r.tensors)
    counts: dict = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    assert {k: v["count"] for k, v in rep["types"].items()} == counts
    assert rep["converter_version"] == _field(r, "gguf_dit.converter_version")
    assert rep["warnings"] == [] and rep["problems"] == []
    if name == "text_encoder.gguf":
        arch = rep["architecture"]
        assert rep["layers"] == _field(r, f"{arch}.block_count") and rep["hidden"] == _field(r, f"{arch}.embedding_length")
        assert rep["vocab"] == len(r.fields["tokenizer.ggml.tokens"].data)
        assert rep["taps"] == rep["taps_used"] == list(_field(r, "gguf_dit.text_encoder.taps"))
        assert rep["template"] == _field(r, "gguf_dit.text_encoder.template")
        assert rep["tokenizer"] == {"model": _field(r, "tokenizer.ggml.model"), "pre": _field(r, "tokenizer.ggml.pre")}
    if name == "vae.gguf":
        assert rep["config"]["block_out_channels"] == list(_field(r, "flux2_vae.block_out_channels"))
        assert rep["config"]["layers_per_block"] == _field(r, "flux2_vae.layers_per_block")
        assert rep["latent_shift"] == len(_field(r, "flux2_vae.latent_shift")) == 128
    code, text, err = cli("inspect", path)
    assert code == 0 and err == ""
    assert text.startswith(f"{path}\n") and "problem:" not in text and "warning:" not in text
    for t in counts:
        assert f"    {t} " in text


def test_text_report_names_what_each_kind_is(cli):
    _, te, _ = cli("inspect", DEMO / "text_encoder.gguf")
    assert "text encoder, llama.cpp architecture qwen3" in te and "taps          stored 13: 0, 3, 6," in te
    assert "template      the official chat template" in te and f"{VOCAB} tokens (gpt2 tokenizer, pre qwen2)" in te
    _, vae, _ = cli("inspect", DEMO / "vae.gguf")
    assert "VAE decoder, flux2_vae" in vae and "block_out_channels=[8, 16, 32, 32]" in vae and "shift/scale 128/128 values" in vae


# -- problems (exit 2, report still printed) and warnings (exit 0) -----------------------------------------------

MISSING = {"transformer.gguf": "layers.1.attention_norm1.weight", "text_encoder.gguf": "blk.7.ffn_up.weight", "vae.gguf": "decoder.conv_in.weight"}


@pytest.fixture
def model_copy(tmp_path) -> Path:
    return Path(shutil.copytree(DEMO, tmp_path / "model", ignore=shutil.ignore_patterns("*.md")))


@pytest.mark.parametrize("name", list(MISSING))
def test_a_missing_tensor_exits_2_with_the_report_and_run_refuses_it_too(cli, model_copy, name):
    path = model_copy / name
    GGUFFile.from_file(DEMO / name).drop_tensor(MISSING[name]).write(path)
    code, out, err = cli("inspect", path, "--json")
    assert code == 2
    rep = json.loads(out)  # the report is still printed, whole
    assert rep["kind"] == KIND[name] and rep["tensor_count"] == len(GGUFReader(str(DEMO / name)).tensors) - 1
    assert any(p.startswith(f"tensor {MISSING[name]}: ") and "missing" in p for p in rep["problems"]), rep["problems"]
    line = _one_error(err, path)
    assert "problem" in line and MISSING[name] in line
    code, text, err = cli("inspect", path)
    assert code == 2 and f"  problem: tensor {MISSING[name]}: " in text
    _one_error(err, path)
    # the claim behind exit 2: run refuses the same file
    code, out, err = cli("run", "-p", "A red circle.", "--model", model_copy, "-o", model_copy / "x.png", "--steps", "1", "-q")
    assert code == 2 and str(path) in err and not (model_copy / "x.png").exists(), err


def test_non_finite_weights_found_by_check_are_a_problem(cli, tmp_path):
    f = GGUFFile.from_file(DEMO / "vae.gguf")
    t = f.tensor("decoder.conv_out.bias")
    assert t.type == 0  # F32
    t.data = np.full(len(t.data) // 4, np.nan, "<f4").tobytes()
    path = f.write(tmp_path / "vae.gguf")
    code, out, _ = cli("inspect", path, "--json")
    assert code == 0 and json.loads(out)["problems"] == []  # without --check the weights are not read
    code, out, err = cli("inspect", path, "--json", "--check")
    assert code == 2 and json.loads(out)["problems"] == ["tensor decoder.conv_out.bias: non-finite values (NaN/Inf)"]
    _one_error(err, path)


def test_warnings_that_run_accepts_keep_exit_0(cli, model_copy, tmp_path):
    """An encoder without our taps/template keys (a community GGUF) is described with warnings; run uses it."""
    path = model_copy / "text_encoder.gguf"
    GGUFFile.from_file(DEMO / "text_encoder.gguf").drop("gguf_dit.text_encoder.taps").drop("gguf_dit.text_encoder.template").write(path)
    code, out, err = cli("inspect", path, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["problems"] == [] and len(rep["warnings"]) == 2
    assert rep["taps"] is None and rep["taps_used"] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35] and rep["template"] is None
    png = tmp_path / "ok.png"
    code, _, err = cli("run", "-p", "A red circle.", "--model", model_copy, "-o", png, "--steps", "1", "-q", "--threads", "1")
    assert code == 0 and png.exists(), err


def test_a_logged_runtime_warning_is_in_the_report_not_on_stderr(cli, tmp_path):
    """A tokenizer pre-tokenizer other than Qwen's: the encoder check logs a warning; inspect reports it, exit 0."""
    f = GGUFFile.from_file(DEMO / "text_encoder.gguf")
    path = f.set("tokenizer.ggml.pre", f.kv("tokenizer.ggml.pre").type, "llama-bpe").write(tmp_path / "te.gguf")
    code, out, err = cli("inspect", path)
    assert code == 0 and err == ""
    assert "  warning: tokenizer.ggml.pre is 'llama-bpe', not qwen2; token ids may differ from Qwen's tokenizer" in out


def test_a_backbone_without_metadata_is_a_warning(cli, tmp_path):
    from _gguf_edit import write_sdcpp_style

    path = write_sdcpp_style(DEMO / "transformer.gguf", tmp_path / "sdcpp.gguf")
    code, out, _ = cli("inspect", path, "--json")
    rep = json.loads(out)
    assert code == 0 and rep["problems"] == [] and rep["metadata"] is False and len(rep["warnings"]) == 1


def test_an_unknown_architecture_is_one_error_line(cli, tmp_path):
    path = GGUFFile.from_file(DEMO / "vae.gguf").set("general.architecture", GGUFFile.from_file(DEMO / "vae.gguf").kv("general.architecture").type, "llama").write(tmp_path / "x.gguf")
    code, out, err = cli("inspect", path)
    assert code == 2 and out == ""
    assert "general.architecture is 'llama'" in _one_error(err, path)


# -- truncated files -----------------------------------------------------------------------------------------------


def _cuts(name: str) -> list[tuple[str, int]]:
    """Cut points in every region of the file, located with the spec-layout writer (tests/_gguf_edit.py)."""
    f = GGUFFile.from_file(DEMO / name)
    size = (DEMO / name).stat().st_size
    assert len(f.to_bytes()) == size  # the writer lays the file out exactly as convert did
    data, offsets = f.layout()
    kv = [f.kv_offset(k.key) for k in f.kvs]
    infos = [f.tensor_info_offset(t.name) for t in f.tensors]
    big = max(f.kvs, key=lambda k: len(k.to_bytes()))  # the vocabulary, the recipe JSON: a long value to cut inside
    cuts = {
        "empty": 0, "magic": 2, "version": 6, "tensor_count": 12, "kv_count": 20, "header_end": 24,
        "first_key": kv[0] + 5, "second_kv": kv[1], "value_type": f.value_offset(f.kvs[2].key) - 2,
        "inside_long_value": f.value_offset(big.key) + len(big.to_bytes()) // 2, "last_kv": kv[-1] + 3,
        "first_tensor_info": infos[0], "tensor_info_name": infos[0] + 10, "tensor_info_dims": infos[1] + 8 + len(f.tensors[1].name) + 6,
        "last_tensor_info": infos[-1] + 9, "before_padding": infos[-1] + 8 + len(f.tensors[-1].name) + 4 + 8 * len(f.tensors[-1].ne) + 12,
        "data_start": data, "first_tensor": data + len(f.tensors[0].data) // 2, "middle": data + offsets[len(offsets) // 2],
        "last_tensor": data + offsets[-1] + 1, "one_byte_short": size - 1,
    }
    assert all(0 <= c < size for c in cuts.values())
    return [(f"{name}@{k}", c) for k, c in cuts.items()]


CUTS = [c for name in FILES for c in _cuts(name)]


def _cut(tmp_path: Path, case: str, at: int) -> Path:
    name = case.split("@")[0]
    model = Path(shutil.copytree(DEMO, tmp_path / "model", ignore=shutil.ignore_patterns("*.md")))
    (model / name).write_bytes((DEMO / name).read_bytes()[:at])
    return model / name


@pytest.mark.parametrize("case,at", CUTS, ids=[c for c, _ in CUTS])
def test_truncated_file_inspect_one_error_line(cli, tmp_path, case, at):
    path = _cut(tmp_path, case, at)
    for args in (["inspect", path], ["inspect", path, "--json", "--check"]):
        code, out, err = cli(*args)
        assert code == 2 and out == "", (args, out)
        line = _one_error(err, path)
        assert "truncated" in line, line


@pytest.mark.parametrize("case,at", CUTS, ids=[c for c, _ in CUTS])
def test_truncated_file_run_one_error_line(cli, tmp_path, case, at):
    path = _cut(tmp_path, case, at)
    png = tmp_path / "x.png"
    code, out, err = cli("run", "-p", "A red circle.", "--model", path.parent, "-o", png, "--steps", "1", "-q")
    assert code == 2 and out == "" and not png.exists()
    assert "truncated" in _one_error(err, path)
