"""Bad input to `gguf-dit convert`: one line naming the file and tensor, exit code 2, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct

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
    real = conv.encode_rows

    def interrupt_midway(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "encode_rows", interrupt_midway)
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
    _fails(cli, ["convert", d, "-o", tmp_path / "out"], str(d / WEIGHTS), "not an Ideogram 4 backbone")


# -- hostile inputs (issue 10 §3): one line naming the file and key or tensor, exit 2, nothing left behind -----


@pytest.fixture
def full(tiny_copy):
    """A private copy of the full tiny checkpoint (BF16 DiTs, text encoder + tokenizer, VAE)."""
    return tiny_copy("full", fp8=False)


@pytest.fixture
def watchdog():
    """A FIFO that gets opened blocks forever: fail the test instead of hanging the suite."""

    def hung(*_):
        raise AssertionError("convert blocked on its input")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _refused(cli, src, tmp_path, *must):
    """convert SRC: exit 2, one line holding every string of ``must``, no output folder, no temporary anywhere."""
    out = tmp_path / "out"
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    line = _fails(cli, ["convert", src, "-o", out, "-q"], *must)
    assert not out.exists(), line
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    return line


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


PARTS = {
    "dit": "transformer/config.json",
    "te": "text_encoder/config.json",
    "vae": "vae/config.json",
    "tok": "tokenizer/tokenizer.json",
    "tokconf": "tokenizer/tokenizer_config.json",
}


@pytest.mark.parametrize("part", list(PARTS))
@pytest.mark.parametrize(
    "text, says",
    [("{not json", "unreadable"), ("[1, 2]", "JSON array, expected an object"), ('"x"', "JSON string, expected an object"), ("[" * 50000, "nested too deeply"), (b"\xff\xfe{}", "unreadable")],
    ids=["not-json", "array", "string", "deep", "not-utf8"],
)
def test_json_inputs_that_are_not_json_objects(cli, full, tmp_path, part, text, says):
    f = full / PARTS[part]
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    _refused(cli, full, tmp_path, str(f), says)


@pytest.mark.parametrize(
    "key, value",
    [("num_layers", "2"), ("num_layers", [2]), ("num_layers", None), ("num_layers", {"n": 2}), ("num_layers", True), ("intermediate_size", 7.5),
     ("attention_head_dim", "256"), ("num_attention_heads", -2), ("mrope_section", "abc"), ("mrope_section", [24, 20]), ("rope_theta", "x"),
     ("rope_theta", None), ("norm_eps", -1e-5)],
)
def test_dit_config_json_with_wrongly_typed_values(cli, full, tmp_path, key, value):
    f = full / "transformer" / "config.json"
    _edit_json(f, lambda d: d.__setitem__(key, value))
    _refused(cli, full, tmp_path, str(f), f"key {key} is", "expected")


def test_config_from_json_checks_types_itself():
    from gguf_dit.arch.dit import config_from_json
    from gguf_dit.errors import SourceError

    assert config_from_json({"num_layers": 34, "rope_theta": 5000000, "mrope_section": [24, 20, 20], "attention_head_dim": 256, "num_attention_heads": 18}, None, error=SourceError) == {
        "num_layers": 34, "rope_theta": 5e6, "mrope_section": (24, 20, 20), "num_heads": 18, "emb_dim": 4608}
    for bad in ({"num_layers": "34"}, {"hidden_size": 4608.0}, {"mrope_section": [24, 20, "20"]}, {"rope_theta": float("inf")}, {"adaln_dim": 0}):
        with pytest.raises(SourceError, match=f"cfg.json: config.json key {next(iter(bad))} is"):
            config_from_json(bad, "cfg.json", error=SourceError)
    with pytest.raises(SourceError, match="expected a JSON object"):
        config_from_json([1, 2], "cfg.json", error=SourceError)


TOKENIZER_EDITS = {
    "model-not-object": (lambda t: t.__setitem__("model", [1]), "tokenizer model is"),
    "vocab-not-object": (lambda t: t["model"].__setitem__("vocab", [1, 2]), "model.vocab is"),
    "vocab-id-string": (lambda t: t["model"]["vocab"].__setitem__("a", "97"), "model.vocab['a'] is a JSON string"),
    "vocab-id-negative": (lambda t: t["model"]["vocab"].__setitem__("a", -1), "model.vocab['a'] is -1"),
    "added-not-list": (lambda t: t.__setitem__("added_tokens", 5), "added_tokens is"),
    "added-item-string": (lambda t: t["added_tokens"].append("x"), "added_tokens[3] is"),
    "added-id-null": (lambda t: t["added_tokens"][0].__setitem__("id", None), "added_tokens[0].id is a JSON null"),
    "added-content-int": (lambda t: t["added_tokens"][1].__setitem__("content", 7), "added_tokens[1].content is"),
    "merges-not-list": (lambda t: t["model"].__setitem__("merges", "Ġ a"), "model.merges is"),
    "merge-item-int": (lambda t: t["model"]["merges"].append(3), "model.merges[16] is"),
    "pretokenizers-int": (lambda t: t["pre_tokenizer"].__setitem__("pretokenizers", 5), "pre_tokenizer.pretokenizers is"),
    "lone-surrogate": (lambda t: t["added_tokens"][2].__setitem__("content", "\ud800"), "added_tokens[2].content is not valid Unicode"),
    "duplicate-token": (lambda t: t["added_tokens"][2].__setitem__("content", "a"), "token 'a' appears twice"),
}


TE_CONFIG_EDITS = {
    "hidden-string": (lambda c: c["text_config"].__setitem__("hidden_size", "32"), "text_config.hidden_size is a JSON string"),
    "layers-list": (lambda c: c["text_config"].__setitem__("num_hidden_layers", [36]), "text_config.num_hidden_layers is a JSON array"),
    "eps-negative": (lambda c: c["text_config"].__setitem__("rms_norm_eps", -1e-6), "text_config.rms_norm_eps is -1e-06"),
    "theta-list": (lambda c: c["text_config"].__setitem__("rope_theta", [1]), "rope_theta is a JSON array"),
    "mrope-string": (lambda c: c["text_config"]["rope_scaling"].__setitem__("mrope_section", "abc"), "mrope_section is"),
    "context-over-uint32": (lambda c: c["text_config"].__setitem__("max_position_embeddings", 1 << 40), "max_position_embeddings is 1099511627776"),
    "deepstack-int": (lambda c: c.__setitem__("vision_config", {"deepstack_visual_indexes": 5}), "deepstack_visual_indexes is"),
}


JSON_EDITS = [("tokenizer/tokenizer.json", k, *v) for k, v in TOKENIZER_EDITS.items()] + \
    [("text_encoder/config.json", k, *v) for k, v in TE_CONFIG_EDITS.items()]


@pytest.mark.parametrize("rel, edit, fn, says", JSON_EDITS, ids=[f"{r.split('/')[0]}-{e}" for r, e, _, _ in JSON_EDITS])
def test_encoder_json_inputs_with_wrongly_typed_values(cli, full, tmp_path, rel, edit, fn, says):
    f = full / rel
    _edit_json(f, fn)
    _refused(cli, full, tmp_path, str(f), says)


@pytest.mark.parametrize(
    "key, value, says",
    [("layers_per_block", 10**9, "out of range"), ("norm_num_groups", 0, "out of range"), ("up_block_types", 5, "bad config value"),
     ("batch_norm_eps", "x", "bad config value"), ("patch_size", None, "bad config value")],
)
def test_vae_config_json_with_hostile_values(cli, full, tmp_path, key, value, says):
    f = full / "vae" / "config.json"
    _edit_json(f, lambda c: c.__setitem__(key, value))
    _refused(cli, full, tmp_path, str(f), says)


def _rewrite_header(path, fn):
    """Apply ``fn(header_dict, data) -> (header_bytes, data, declared_length or None)`` to a safetensors file."""
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    hb, data, declared = fn(json.loads(b[8 : 8 + n]), b[8 + n :])
    path.write_bytes(struct.pack("<Q", len(hb) if declared is None else declared) + hb + data)


def _first(h, dtype=None):
    return next(k for k, v in h.items() if k != "__metadata__" and (dtype is None or v["dtype"] == dtype))


def _grow_offset(h, d):
    h[_first(h)]["data_offsets"][1] += 1 << 30
    return json.dumps(h).encode(), d, None


def _unknown_dtype(h, d):
    h[_first(h)]["dtype"] = "Q9"
    return json.dumps(h).encode(), d, None


def _double_rows(h, d):
    k = _first(h)
    h[k]["shape"][0] *= 2
    return json.dumps(h).encode(), d, None


def _int_dtype(h, d):
    k = _first(h, "F32") if any(v.get("dtype") == "F32" for v in h.values() if isinstance(v, dict)) else _first(h)
    h[k]["dtype"] = {"F32": "I32", "BF16": "I16", "F16": "I16"}[h[k]["dtype"]]
    return json.dumps(h).encode(), d, None


HEADER_CORRUPTIONS = {
    "huge-header-length": (lambda h, d: (json.dumps(h).encode(), d, 1 << 60), "cannot read safetensors"),
    "bad-json": (lambda h, d: (b"{not json" + b" " * 64, d, None), "cannot read safetensors"),
    "offset-beyond-file": (_grow_offset, "cannot read safetensors"),
    "unknown-dtype": (_unknown_dtype, "cannot read safetensors"),
    "shape-offset-mismatch": (_double_rows, "cannot read safetensors"),
    "integer-dtype": (_int_dtype, "dtype"),
}
WEIGHT_FILES = {"dit": "unconditional_transformer/diffusion_pytorch_model.safetensors", "te": "text_encoder/model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors"}


@pytest.mark.parametrize("part", list(WEIGHT_FILES))
@pytest.mark.parametrize("corruption", list(HEADER_CORRUPTIONS))
def test_safetensors_with_corrupt_headers(cli, full, tmp_path, part, corruption):
    fn, says = HEADER_CORRUPTIONS[corruption]
    f = full / WEIGHT_FILES[part]
    _rewrite_header(f, fn)
    _refused(cli, full, tmp_path, str(f), says)


def test_block_index_far_beyond_the_block_count(cli, full, tmp_path):
    """layers.99999999999.* must be one line at once, not a range of 1e11 indices."""
    name = "layers.99999999999.ffn_norm2.weight"
    _edit(full / "transformer" / WEIGHTS, lambda sd: sd.__setitem__(name, sd.pop("layers.1.ffn_norm2.weight")))
    _refused(cli, full, tmp_path, str(full / "transformer" / WEIGHTS), "up to 99999999999", "not contiguous")


def test_text_encoder_layer_index_far_beyond_the_layer_count(cli, full, tmp_path):
    name = "model.language_model.layers.99999999999.input_layernorm.weight"
    _edit(full / "text_encoder" / "model.safetensors", lambda sd: sd.__setitem__(name, sd.pop("model.language_model.layers.35.input_layernorm.weight")))
    _refused(cli, full, tmp_path, str(full / "text_encoder" / "model.safetensors"), name, "not numbered 0..N-1")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("target", ["transformer/config.json", "transformer/" + WEIGHTS, "tokenizer/tokenizer.json", "vae/" + WEIGHTS])
def test_inputs_that_are_not_regular_files_are_refused_without_reading(cli, full, tmp_path, watchdog, kind, target):
    f = full / target
    f.unlink()
    if kind == "fifo":
        os.mkfifo(f)
    else:
        f.symlink_to("/dev/zero")
    _refused(cli, full, tmp_path, str(f), "not a regular file")


def test_non_finite_value_in_a_split_attention_part_names_that_stored_tensor(cli, checkpoints, tmp_path):
    root, _, _ = checkpoints("f32", "diffusers")
    src = tmp_path / "ck"
    shutil.copytree(root, src)

    def poison(sd):
        sd["layers.1.attention.to_k.weight"][5, 9] = float("inf")

    _edit(src / "unconditional_transformer" / WEIGHTS, poison)
    _refused(cli, src, tmp_path, str(src / "unconditional_transformer" / WEIGHTS), "tensor layers.1.attention.to_k.weight", "non-finite")


@pytest.mark.parametrize("recipe, refused", [("q8_0", True), ("f16", True), ("q4_k", True), ("bf16", False)])
def test_weight_beyond_the_f16_range_is_refused_for_types_that_would_store_inf(cli, ck, tmp_path, recipe, refused):
    """1e30 is finite in the source, but F16 (and the F16 block scales of the quantized types) would hold Inf."""

    def huge(sd):
        sd["layers.0.feed_forward.w1.weight"][2, 3] = 1e30

    _edit(ck / "transformer" / WEIGHTS, huge)
    out = tmp_path / "out"
    if refused:
        line = _fails(cli, ["convert", ck, "-o", out, "-q", "--role", "cond", "--recipe", recipe], str(ck / "transformer" / WEIGHTS), "layers.0.feed_forward.w1.weight", "1e+30")
        assert "F16's range" in line and not out.exists()
    else:
        code, _, err = cli("convert", ck, "-o", out, "-q", "--role", "cond", "--recipe", recipe)
        assert code == 0, err


@pytest.mark.parametrize(
    "text, says", [('{"rules": 5}', "rules must be a list"), ("[1]", "JSON array, expected an object"), ("{", "unreadable recipe JSON"), (None, "not a regular file")]
)
def test_hostile_recipe_files(cli, ck, tmp_path, watchdog, text, says):
    r = tmp_path / "r.json"
    if text is None:
        os.mkfifo(r)
    else:
        r.write_text(text)
    out = tmp_path / "out"
    _fails(cli, ["convert", ck, "-o", out, "--recipe", r], str(r), says)
    assert not out.exists()
