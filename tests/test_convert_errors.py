"""Bad input to `gguf-dit convert`: one line naming the file and tensor, exit code 2, nothing lost."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def ck(checkpoints, tmp_path):
    """A private copy of the f32 checkpoint that a test may damage."""
    root, _, _ = checkpoints("f32")
    dst = tmp_path / "ck"
    shutil.copytree(root, dst)
    return dst


def _edit(path, fn):
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def _fails(cli, args, *must_contain, out=None):
    code, stdout, stderr = cli(*args)
    assert code == 2, (code, stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for s in must_contain:
        assert s in lines[0], lines[0]
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    return lines[0]


def test_missing_backbone_folder(cli, ck, tmp_path):
    shutil.rmtree(ck / "unconditional_transformer")
    out = tmp_path / "out"
    _fails(cli, ["convert", ck, "-o", out], str(ck), "unconditional_transformer", out=out)


def test_missing_source_path(cli, tmp_path):
    _fails(cli, ["convert", tmp_path / "nope", "-o", tmp_path / "out"], "nope", "does not exist")


def test_folder_without_weights(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(cli, ["convert", tmp_path / "empty", "-o", tmp_path / "out"], "empty", "diffusion_pytorch_model.safetensors")


def test_missing_tensor(cli, ck, tmp_path):
    _edit(ck / "transformer" / WEIGHTS, lambda sd: sd.pop("layers.1.ffn_norm2.weight"))
    out = tmp_path / "out"
    _fails(cli, ["convert", ck, "-o", out], "transformer", "layers.1.ffn_norm2.weight", "missing", out=out)


def test_unexpected_tensor(cli, ck, tmp_path):
    _edit(ck / "unconditional_transformer" / WEIGHTS, lambda sd: sd.__setitem__("lora_A.weight", torch.zeros(4, 4)))
    out = tmp_path / "out"
    _fails(cli, ["convert", ck, "-o", out], "unconditional_transformer", "lora_A.weight", "unexpected", out=out)


def test_wrong_shape_for_the_architecture(cli, ck, tmp_path):
    _edit(ck / "transformer" / WEIGHTS, lambda sd: sd.__setitem__("layers.0.attention.o.weight", torch.zeros(512, 256)))
    out = tmp_path / "out"
    _fails(cli, ["convert", ck, "-o", out], "layers.0.attention.o.weight", "[512, 256]", "[512, 512]", out=out)


def test_config_json_contradicting_tensors(cli, ck, tmp_path):
    cfg = ck / "transformer" / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_layers": 2', '"num_layers": 3'))
    _fails(cli, ["convert", ck, "-o", tmp_path / "out"], "config.json", "num_layers")


def test_truncated_safetensors(cli, ck, tmp_path):
    f = ck / "transformer" / WEIGHTS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _fails(cli, ["convert", ck, "-o", out], str(f), out=out)


def test_corrupt_safetensors_header(cli, ck, tmp_path):
    f = ck / "unconditional_transformer" / WEIGHTS
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    out = tmp_path / "out"
    _fails(cli, ["convert", ck, "-o", out], str(f), "cannot read safetensors", out=out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_source_tensor_is_refused_without_leftovers(cli, ck, tmp_path, bad):
    def poison(sd):
        sd["layers.1.feed_forward.w2.weight"][3, 7] = bad

    _edit(ck / "transformer" / WEIGHTS, poison)
    out = tmp_path / "out"
    line = _fails(cli, ["convert", ck, "-o", out, "--recipe", "q8_0"], "layers.1.feed_forward.w2.weight", "non-finite")
    assert "transformer" in line
    # Nothing half-written: no transformer.gguf, no temporary file.
    assert not (out / "transformer.gguf").exists()
    assert not list(out.glob(".*tmp"))


def test_unknown_recipe(cli, ck, tmp_path):
    _fails(cli, ["convert", ck, "-o", tmp_path / "out", "--recipe", "q3_magic"], "q3_magic", "q4_k-protect")


def test_unknown_type(cli, ck, tmp_path):
    _fails(cli, ["convert", ck, "-o", tmp_path / "out", "--type", "q9_9"], "q9_9", "valid types")


def test_rule_asking_an_impossible_type_names_the_tensor(cli, ck, tmp_path):
    out = tmp_path / "out"
    _fails(cli, ["convert", ck, "-o", out, "--rule", "input_proj=q4_k"], "input_proj.weight", "divisible by 256", out=out)


def test_rule_asking_a_quantized_type_on_a_norm_is_refused(cli, ck, tmp_path):
    _fails(cli, ["convert", ck, "-o", tmp_path / "out", "--rule", "norm_q=q8_0"], "layers.0.attention.norm_q.weight", "1-D")


def test_bad_rule_syntax(cli, ck, tmp_path):
    _fails(cli, ["convert", ck, "-o", tmp_path / "out", "--rule", "no-equals-sign"], "REGEX=TYPE")


def test_existing_output_is_kept_without_force(cli, ck, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "unconditional_transformer.gguf").write_bytes(b"precious")
    _fails(cli, ["convert", ck, "-o", out, "-q"], "unconditional_transformer.gguf", "--force")
    assert (out / "unconditional_transformer.gguf").read_bytes() == b"precious"
    assert not (out / "transformer.gguf").exists()  # checked before anything was written
    code, _, err = cli("convert", ck, "-o", out, "-q", "--force", "--recipe", "f16")
    assert code == 0, err
    assert (out / "unconditional_transformer.gguf").read_bytes()[:4] == b"GGUF"


def test_interrupted_write_leaves_no_partial_or_overwritten_file(cli, ck, tmp_path, monkeypatch):
    from gguf_dit.converter import convert as conv

    out = tmp_path / "out"
    code, _, err = cli("convert", ck, "-o", out, "-q", "--recipe", "f32")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = conv._encode

    def interrupt_midway(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "_encode", interrupt_midway)
    code, _, err = cli("convert", ck, "-o", out, "-q", "--recipe", "q8_0", "--force")
    assert code == 130 and "interrupted" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old files intact, no temp file


def test_float8_weight_without_scale(cli, ck, tmp_path):
    def drop_scale(sd):
        sd["adaln_proj.weight"] = sd["adaln_proj.weight"].to(torch.float8_e4m3fn)

    _edit(ck / "transformer" / WEIGHTS, drop_scale)
    _fails(cli, ["convert", ck, "-o", tmp_path / "out"], "adaln_proj.weight", "weight_scale")


def test_not_an_ideogram_checkpoint(cli, tmp_path):
    d = tmp_path / "other"
    d.mkdir()
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(d / WEIGHTS))
    _fails(cli, ["convert", d, "-o", tmp_path / "out"], str(d), "not an Ideogram 4 backbone")
