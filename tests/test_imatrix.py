"""Importance matrices (issue 12): the file layout llama.cpp and stable-diffusion.cpp share, `convert --imatrix`,
the Q5_K/Q6_K types and the q4_k-m recipe.

Oracles: the file layout is spelled here with ``struct`` from llama.cpp's legacy writer and stable-diffusion.cpp's
``src/runtime/imatrix.cpp`` (not with our writer); llama.cpp's newer GGUF imatrix is written with gguf-py;
quantized bytes are decoded with gguf-py's own ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import hashlib
import json
import struct

import gguf
import numpy as np
import pytest

from _helpers import rel_err
from gguf_dit.errors import ImatrixError
from gguf_dit.imatrix import Imatrix, ImatrixEntry, for_backbones
from gguf_dit.runtime.dit import Ideogram4DiT

SD = "model.diffusion_model."  # sd.cpp's runner prefix of the conditional backbone
SD_UNCOND = "model.diffusion_model.uncond."  # ... and of the one loaded with --uncond-diffusion-model


def legacy_bytes(entries: list[tuple[str, int, np.ndarray]], last_chunk: int, dataset: str | None) -> bytes:
    """llama.cpp's legacy imatrix: n_entries; per entry len, name, ncall, nval, values; last chunk; [len, dataset]."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values)) + struct.pack(f"<{len(values)}f", *values)
    out += struct.pack("<i", last_chunk)
    if dataset is not None:
        out += struct.pack("<i", len(dataset.encode())) + dataset.encode()
    return out


def _read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def _field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


# --- the file ---------------------------------------------------------------------------------------------


def test_round_trip_keeps_sums_counts_chunks_and_dataset(tmp_path):
    rng = np.random.default_rng(0)
    entries = {"layers.0.attention.qkv.weight": ImatrixEntry(rng.random(512).astype(np.float32) * 50, 4096),
               "final_layer.linear.weight": ImatrixEntry(rng.random(256).astype(np.float32), 17)}
    for role, name in (("cond", "transformer.imatrix"), ("uncond", "unconditional_transformer.imatrix")):
        Imatrix(entries, chunks=12, dataset="prompts.txt").write(tmp_path / name, role)
        back = Imatrix.read(tmp_path / name)  # the role follows from the file name
        assert back.chunks == 12 and back.dataset == "prompts.txt" and back.unknown == () and back.other == {}
        assert set(back.entries) == set(entries)
        for n, e in entries.items():
            np.testing.assert_array_equal(back.entries[n].sums, e.sums)
            assert back.entries[n].count == e.count
            np.testing.assert_allclose(back.importance(n), e.sums / e.count, rtol=1e-7)


def test_written_bytes_follow_llama_cpp_layout_with_sdcpp_names(tmp_path):
    """What llama-quantize and sd.cpp read: values / ncall is the mean square of each input column."""
    sums = np.array([1.0, 4.0, 9.0, 0.5], np.float32)
    im = Imatrix({"layers.3.feed_forward.w2.weight": ImatrixEntry(sums, 8)}, chunks=2, dataset="p")
    im.write(tmp_path / "transformer.imatrix", "cond")
    im.write(tmp_path / "unconditional_transformer.imatrix", "uncond")
    # ncall = the row count, values = mean square x ncall = the sums themselves
    assert (tmp_path / "transformer.imatrix").read_bytes() == legacy_bytes([(SD + "layers.3.feed_forward.w2.weight", 8, sums)], 2, "p")
    assert (tmp_path / "unconditional_transformer.imatrix").read_bytes() == legacy_bytes(
        [(SD_UNCOND + "layers.3.feed_forward.w2.weight", 8, sums)], 2, "p")


def test_reads_an_sdcpp_run_file_holding_both_backbones_and_the_text_encoder(tmp_path):
    """sd.cpp writes values = mean·ncall with ncall = matmul calls, no dataset field, and collects the text encoder too."""
    mean_c, mean_u = np.array([2.0, 0.25, 1.0], np.float32), np.array([3.0, 1.0, 0.5], np.float32)
    raw = legacy_bytes([(SD + "layers.0.attention.o.weight", 20, mean_c * 20),
                        (SD_UNCOND + "layers.0.attention.o.weight", 10, mean_u * 10),
                        ("text_encoders.llm.model.layers.0.mlp.down_proj.weight", 1, np.ones(3, np.float32))], 20, None)
    path = tmp_path / "sdcpp.dat"
    path.write_bytes(raw)
    both = for_backbones(path)
    np.testing.assert_allclose(both["cond"].importance("layers.0.attention.o.weight"), mean_c, rtol=1e-6)
    np.testing.assert_allclose(both["uncond"].importance("layers.0.attention.o.weight"), mean_u, rtol=1e-6)
    assert both["cond"].unknown == ("text_encoders.llm.model.layers.0.mlp.down_proj.weight",)
    assert both["cond"].chunks == 20 and both["cond"].dataset == ""
    with pytest.raises(ImatrixError, match="has no entry"):
        both["cond"].importance("layers.1.attention.o.weight")


def test_repeated_entries_are_merged_as_the_readers_merge_files(tmp_path):
    """llama-imatrix --in-file and sd.cpp's repeated --imat-in add values and ncall."""
    path = tmp_path / "t.imatrix"
    path.write_bytes(legacy_bytes([(SD + "a.weight", 2, np.array([2.0, 4.0], np.float32)),
                                   (SD + "a.weight", 6, np.array([6.0, 0.0], np.float32))], 1, None))
    im = Imatrix.read(path)
    np.testing.assert_allclose(im.importance("a.weight"), [1.0, 0.5])
    assert im.entries["a.weight"].count == 8


def test_reads_llama_cpp_gguf_imatrix(tmp_path):
    """llama-imatrix's default output: <name>.in_sum2 (raw Σx²) and <name>.counts (rows), GGUF."""
    path = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(str(path), arch="imatrix")  # general.architecture is unused by imatrix readers
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, 5)
    w.add_array(gguf.Keys.IMatrix.DATASETS, ["calib.txt"])
    w.add_tensor(SD + "layers.1.feed_forward.w1.weight.in_sum2", np.array([[8.0, 2.0, 4.0]], np.float32))
    w.add_tensor(SD + "layers.1.feed_forward.w1.weight.counts", np.array([[4.0]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = Imatrix.read(path)
    np.testing.assert_allclose(im.importance("layers.1.feed_forward.w1.weight"), [2.0, 0.5, 1.0])
    assert im.chunks == 5 and im.dataset == "calib.txt"


def _valid(tmp_path):
    path = tmp_path / "transformer.imatrix"
    Imatrix({"layers.0.attention.qkv.weight": ImatrixEntry(np.ones(512, np.float32), 3)}, 1, "d").write(path, "cond")
    return path


@pytest.mark.parametrize("cut", [0, 3, 4, 7, 20, 60, 2000])
def test_truncated_file_is_a_one_line_error_naming_it(tmp_path, cut):
    path = _valid(tmp_path)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ImatrixError) as e:
        Imatrix.read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("garble", ["count", "namelen", "nval", "nan", "trailing", "negative"])
def test_garbled_file_is_a_one_line_error_naming_it(tmp_path, garble):
    path = _valid(tmp_path)
    b = bytearray(path.read_bytes())
    name_len = struct.unpack_from("<i", b, 4)[0]
    vals = 8 + name_len + 8
    if garble == "count":
        b[0:4] = struct.pack("<i", 1 << 30)
    elif garble == "namelen":
        b[4:8] = struct.pack("<i", -5)
    elif garble == "nval":
        b[vals - 4:vals] = struct.pack("<i", 0)
    elif garble == "nan":
        b[vals:vals + 4] = struct.pack("<f", float("nan"))
    elif garble == "negative":
        b[vals:vals + 4] = struct.pack("<f", -1.0)
    else:
        b += b"junk"
    path.write_bytes(bytes(b))
    with pytest.raises(ImatrixError) as e:
        Imatrix.read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# --- convert --imatrix ------------------------------------------------------------------------------------

#: One conversion covers every K-quant: each linear kind gets its own type.
K_RULES = {r"attention\.qkv\.weight$": "q2_k", r"attention\.o\.weight$": "q3_k", r"feed_forward\.w1\.weight$": "q4_k",
           r"feed_forward\.w2\.weight$": "q5_k", r"feed_forward\.w3\.weight$": "q6_k"}


def _constructed_imatrix(sd, path, seed=0, hot=64.0):
    """Importance 1 on every column, ``hot`` on a random eighth of them: what a few outlier channels look like."""
    rng = np.random.default_rng(seed)
    entries, imp = {}, {}
    for name, t in sd.items():
        if t.ndim == 2 and t.shape[1] % 256 == 0 and name != "embed_image_indicator.weight":
            v = np.ones(t.shape[1], np.float32)
            v[rng.choice(t.shape[1], t.shape[1] // 8, replace=False)] = hot
            imp[name] = v
            entries[name] = ImatrixEntry(v * 5, 5)  # 5 rows summed
    Imatrix(entries, chunks=1, dataset="constructed").write(path, "cond")
    return imp


def _convert(cli, root, out, *args):
    code, _, err = cli("convert", root, "-o", out, "-q", "--role", "cond", *args)
    assert code == 0, err
    return err


def test_imatrix_changes_the_bytes_and_lowers_the_error_where_importance_is_high(cli, checkpoints, tmp_path):
    root, sds, _ = checkpoints("f32")
    sd = sds["transformer"]
    imat = tmp_path / "transformer.imatrix"
    imp = _constructed_imatrix(sd, imat)
    rules = [x for pattern, t in K_RULES.items() for x in ("--rule", f"{pattern}={t}")]
    _convert(cli, root, tmp_path / "uniform", "--recipe", "q4_k", *rules)
    err = _convert(cli, root, tmp_path / "imat", "--recipe", "q4_k", *rules, "--imatrix", imat)
    assert "no entry" not in err  # every quantized linear with in % 256 == 0 has one
    _, uni = _read(tmp_path / "uniform" / "transformer.gguf")
    _, wtd = _read(tmp_path / "imat" / "transformer.gguf")
    sums = {t: np.zeros(4) for t in K_RULES.values()}  # hot columns' squared error, weighted error: uniform, imatrix
    for name, v in imp.items():
        w, qtype = sd[name].numpy(), uni[name].tensor_type.name.lower()
        assert not np.array_equal(np.asarray(uni[name].data), np.asarray(wtd[name].data)), name
        du = gguf.quants.dequantize(np.asarray(uni[name].data), uni[name].tensor_type).reshape(w.shape) - w
        dw = gguf.quants.dequantize(np.asarray(wtd[name].data), wtd[name].tensor_type).reshape(w.shape) - w
        hot = v > 1
        if qtype in sums:
            sums[qtype] += [(du[:, hot] ** 2).sum(), (dw[:, hot] ** 2).sum(), (v * du**2).sum(), (v * dw**2).sum()]
    # Observed (tiny checkpoint, Zen 4): the hot columns' squared error falls to 0.25 (Q2_K) .. 0.50 (Q5_K) of
    # uniform importance's, the importance-weighted error to 0.38 (Q2_K) .. 0.59 (Q6_K).
    for qtype, (hot_u, hot_w, werr_u, werr_w) in sums.items():
        assert hot_u > 0 and hot_w < 0.7 * hot_u, (qtype, hot_w / hot_u)
        assert werr_w < 0.8 * werr_u, (qtype, werr_w / werr_u)


def test_imatrix_provenance_is_recorded(cli, checkpoints, tmp_path):
    root, sds, _ = checkpoints("f32")
    imat = tmp_path / "transformer.imatrix"
    imp = _constructed_imatrix(sds["transformer"], imat)
    _convert(cli, root, tmp_path / "a", "--recipe", "q4_k", "--imatrix", tmp_path)  # the folder form
    r, _ = _read(tmp_path / "a" / "transformer.gguf")
    assert _field(r, "gguf_dit.quantization.imatrix.sha256") == "sha256:" + hashlib.sha256(imat.read_bytes()).hexdigest()
    assert _field(r, "quantize.imatrix.file") == "transformer.imatrix"
    assert _field(r, "quantize.imatrix.dataset") == "constructed"
    assert _field(r, "quantize.imatrix.entries_count") == len(imp)
    assert _field(r, "quantize.imatrix.chunks_count") == 1
    why = json.loads(_field(r, "gguf_dit.recipe.tensors"))
    assert {n for n, (_, reason) in why.items() if "imatrix" in reason} == set(imp)
    code, out, _ = cli("inspect", tmp_path / "a" / "transformer.gguf", "--json")
    assert code == 0 and json.loads(out)["imatrix"] == {"file": "transformer.imatrix", "sha256": _field(r, "gguf_dit.quantization.imatrix.sha256"),
                                                         "entries": len(imp), "chunks": 1}
    _convert(cli, root, tmp_path / "b", "--recipe", "q4_k")
    r, _ = _read(tmp_path / "b" / "transformer.gguf")
    assert _field(r, "gguf_dit.quantization.imatrix.sha256") is None and _field(r, "quantize.imatrix.file") is None


def test_missing_and_stray_entries_warn_and_use_uniform_importance(cli, checkpoints, tmp_path):
    root, sds, _ = checkpoints("f32")
    w1 = "layers.0.feed_forward.w1.weight"
    Imatrix({w1: ImatrixEntry(np.ones(sds["transformer"][w1].shape[1], np.float32), 1),
             "no.such.weight": ImatrixEntry(np.ones(4, np.float32), 1)}).write(tmp_path / "transformer.imatrix", "cond")
    err = _convert(cli, root, tmp_path / "imat", "--recipe", "q4_k", "--imatrix", tmp_path / "transformer.imatrix")
    assert "no.such.weight" in err and "uniform importance" in err
    _convert(cli, root, tmp_path / "uniform", "--recipe", "q4_k")
    _, a = _read(tmp_path / "imat" / "transformer.gguf")
    _, b = _read(tmp_path / "uniform" / "transformer.gguf")
    for name in a:  # all-ones importance is what the uniform path passes: identical bytes everywhere
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)


def test_file_for_the_other_backbone_records_nothing(cli, checkpoints, tmp_path):
    """One file holding only the unconditional backbone's entries (sd.cpp names): the conditional backbone was
    quantized without importance, so its GGUF must not claim an imatrix."""
    root, sds, _ = checkpoints("f32")
    w1 = "layers.0.feed_forward.w1.weight"
    imat = tmp_path / "only_uncond.imatrix"
    Imatrix({w1: ImatrixEntry(np.arange(1, sds["unconditional_transformer"][w1].shape[1] + 1, dtype=np.float32), 1)}).write(imat, "uncond")
    code, _, err = cli("convert", root, "-o", tmp_path / "o", "-q", "--recipe", "q4_k", "--imatrix", imat)
    assert code == 0, err
    assert "no importance matrix for the cond backbone" in err
    assert _field(_read(tmp_path / "o" / "transformer.gguf")[0], "quantize.imatrix.file") is None
    assert _field(_read(tmp_path / "o" / "unconditional_transformer.gguf")[0], "quantize.imatrix.file") == imat.name


def test_imatrix_unused_by_q8_0_warns_and_records_nothing(cli, checkpoints, tmp_path):
    root, sds, _ = checkpoints("f32")
    _constructed_imatrix(sds["transformer"], tmp_path / "transformer.imatrix")
    err = _convert(cli, root, tmp_path / "o", "--recipe", "q8_0", "--imatrix", tmp_path / "transformer.imatrix")
    assert "unused" in err
    r, _ = _read(tmp_path / "o" / "transformer.gguf")
    assert _field(r, "quantize.imatrix.file") is None


def test_zero_importance_block_is_not_quantized_to_zeros(cli, checkpoints, tmp_path):
    """Columns no calibration token reached: ggml's weighted search would zero a whole block; the floor keeps it."""
    root, sds, _ = checkpoints("f32")
    name = "layers.0.attention.o.weight"
    v = np.ones(sds["transformer"][name].shape[1], np.float32)
    v[:256] = 0.0
    Imatrix({name: ImatrixEntry(v, 1)}).write(tmp_path / "transformer.imatrix", "cond")
    _convert(cli, root, tmp_path / "o", "--recipe", "q4_k", "--imatrix", tmp_path / "transformer.imatrix")
    _, t = _read(tmp_path / "o" / "transformer.gguf")
    w = sds["transformer"][name].numpy()
    d = gguf.quants.dequantize(np.asarray(t[name].data), t[name].tensor_type).reshape(w.shape)
    assert rel_err(d[:, :256], w[:, :256]) < 0.2  # Q4_K's ordinary error, not 1.0 (all zeros)


def test_wrong_width_entry_is_exit_2_naming_file_and_tensor_and_writes_nothing(cli, checkpoints, tmp_path):
    root, _, _ = checkpoints("f32")
    imat = tmp_path / "transformer.imatrix"
    Imatrix({"layers.1.attention.qkv.weight": ImatrixEntry(np.ones(384, np.float32), 1)}).write(imat, "cond")
    code, _, err = cli("convert", root, "-o", tmp_path / "out", "-q", "--recipe", "q4_k", "--imatrix", imat)
    assert code == 2 and str(imat) in err and "layers.1.attention.qkv.weight" in err and "384" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"\x01\x00\x00\x00\x05\x00\x00\x00ab", b"GGUF\x03\x00\x00\x00garbage"])
def test_bad_imatrix_file_is_exit_2(cli, checkpoints, tmp_path, content):
    root, _, _ = checkpoints("f32")
    imat = tmp_path / "bad.imatrix"
    imat.write_bytes(content)
    code, _, err = cli("convert", root, "-o", tmp_path / "out", "-q", "--recipe", "q4_k", "--imatrix", imat)
    assert code == 2 and str(imat) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_imatrix_and_empty_calib_dir_are_exit_2(cli, checkpoints, tmp_path):
    root, _, _ = checkpoints("f32")
    for arg in (tmp_path / "nope.imatrix", tmp_path):
        code, _, err = cli("convert", root, "-o", tmp_path / "out", "-q", "--recipe", "q4_k", "--imatrix", arg)
        assert code == 2 and str(arg) in err, err
    assert not (tmp_path / "out").exists()


def test_smoothing_rescales_importance_by_the_folded_column_scales():
    """A column multiplied by s sees inputs divided by s: its mean square falls by s²."""
    from gguf_dit.converter.importance import Importance

    imp = Importance(Imatrix({}), {"a.weight": np.array([4.0, 4.0], np.float32), "b.weight": np.ones(2, np.float32)}, "x")
    out = imp.smoothed({"a.weight": np.array([2.0, 0.5], np.float32)})
    np.testing.assert_allclose(out.vectors["a.weight"], [1.0, 16.0])
    np.testing.assert_array_equal(out.vectors["b.weight"], [1.0, 1.0])


# --- more types, q4_k-m -----------------------------------------------------------------------------------

#: Velocity error against the F32 conversion of the same tiny random checkpoint (max |Δv| / max |v|, 3 input
#: draws), observed on Zen 4: q6_k 2.5-3.8e-2, q5_k 5.0-6.9e-2, q4_k-m 6.8-8.6e-2, q4_k 1.0-1.3e-1 (q8_0: 1.3-1.6e-2;
#: random weights amplify rounding more than trained ones). Bounds ~2.5x the largest.
VELOCITY_TOL = {"q6_k": 0.1, "q5_k": 0.17, "q4_k-m": 0.22, "q4_k": 0.33}


def test_k_quant_recipes_stay_close_to_f32_in_the_order_of_their_bits(cli, checkpoints, tmp_path):
    root, _, _ = checkpoints("f32")
    grid, rng = (4, 4), np.random.default_rng(1)
    x = rng.standard_normal((16, 128)).astype(np.float32)
    feats = (rng.standard_normal((7, 416)) * 2).astype(np.float32)
    _convert(cli, root, tmp_path / "f32", "--recipe", "f32")
    ref = Ideogram4DiT.load(tmp_path / "f32" / "transformer.gguf", "cpu").velocity(x, 0.6, feats, grid=grid)
    errs = {}
    for recipe, tol in VELOCITY_TOL.items():
        _convert(cli, root, tmp_path / recipe, "--recipe", recipe)
        path = tmp_path / recipe / "transformer.gguf"
        _, tensors = _read(path)
        want = {"q6_k": "Q6_K", "q5_k": "Q5_K", "q4_k": "Q4_K", "q4_k-m": "Q4_K"}[recipe]
        assert tensors["layers.0.attention.qkv.weight"].tensor_type.name == want
        if recipe == "q4_k-m":
            for n in ("layers.0.feed_forward.w2.weight", "layers.1.feed_forward.w2.weight"):
                assert tensors[n].tensor_type.name == "Q6_K", n
            assert tensors["final_layer.linear.weight"].tensor_type.name == "Q8_0"
            for n in ("layers.0.feed_forward.w1.weight", "t_embedding.mlp_in.weight"):
                assert tensors[n].tensor_type.name == "Q4_K", n
        errs[recipe] = rel_err(Ideogram4DiT.load(path, "cpu").velocity(x, 0.6, feats, grid=grid), ref)
        assert 1e-3 < errs[recipe] < tol, (recipe, errs[recipe])
    assert errs["q6_k"] < errs["q5_k"] < errs["q4_k"] and errs["q4_k-m"] < errs["q4_k"], errs


@pytest.mark.parametrize("recipe", ["q6_k", "q5_k", "q4_k-m"])
def test_k_quant_velocity_error_is_what_activation_quantization_explains(cli, checkpoints, tmp_path, recipe):
    """As test_dit's check for Q8_0/Q4_K: diffusers on the dequantized weights ("plain") and the same with every
    Linear input rounded as ggml's CPU kernel for that weight type rounds it (Q8_K for K-quants); our error against
    plain must stay within test_dit.QUANT_EXCESS of what that rounding explains."""
    from _helpers import reference_velocity
    from gguf_dit.runtime.dit import RuntimeOptions
    from test_dit import QUANT_EXCESS, _dequantized_model, _emulate_activation_quantization, inputs

    opts = RuntimeOptions(t_rounding="none", q8_0_matmul="direct")
    root, _, _ = checkpoints("f32")
    _convert(cli, root, tmp_path, "--recipe", recipe)
    path = tmp_path / "transformer.gguf"
    plain = _dequantized_model(path)
    emulated = _emulate_activation_quantization(_dequantized_model(path), path, opts)
    dit = Ideogram4DiT.load(path, "cpu", options=opts)
    for grid, n_text in (((4, 4), 7), ((3, 5), 0)):
        x, feats = inputs(grid, n_text)
        ref_plain = reference_velocity(plain, x, 0.6, feats, grid)
        explained = rel_err(reference_velocity(emulated, x, 0.6, feats, grid), ref_plain)
        err = rel_err(dit.velocity(x, 0.6, feats, grid=grid), ref_plain)
        assert 1e-3 < explained < 3e-2
        assert err <= QUANT_EXCESS * explained, (err, explained)


def test_inspect_reports_q5_k_and_q6_k(cli, checkpoints, tmp_path):
    root, _, _ = checkpoints("f32")
    _convert(cli, root, tmp_path, "--recipe", "q4_k-m", "--rule", r"attention\.o\.weight$=q5_k")
    code, out, err = cli("inspect", tmp_path / "transformer.gguf", "--json")
    assert code == 0, err
    counts = json.dumps(json.loads(out))
    assert "Q5_K" in counts and "Q6_K" in counts


def test_recipe_rule_reason_is_recorded_and_must_be_a_string(cli, checkpoints, tmp_path):
    root, _, _ = checkpoints("f32")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"base": "q4_k", "rules": [{"pattern": r"layers\.1\.feed_forward\.w2\.weight$", "type": "q6_k",
                                                                "reason": "velocity error 3.1e-2 at Q4_K (calibrate)"}]}))
    _convert(cli, root, tmp_path / "o", "--recipe", recipe)
    r, t = _read(tmp_path / "o" / "transformer.gguf")
    why = json.loads(_field(r, "gguf_dit.recipe.tensors"))
    assert why["layers.1.feed_forward.w2.weight"] == ["Q6_K", "velocity error 3.1e-2 at Q4_K (calibrate)"]
    recipe.write_text(json.dumps({"base": "q4_k", "rules": [{"pattern": "w2", "type": "q6_k", "reason": 3}]}))
    code, _, err = cli("convert", root, "-o", tmp_path / "p", "-q", "--role", "cond", "--recipe", recipe)
    assert code == 2 and str(recipe) in err and "reason" in err


def test_empty_imatrix_is_refused_not_written_unreadable(tmp_path):
    """llama.cpp's readers (and ours) refuse an entry count below 1: such a file must not be written."""
    with pytest.raises(ImatrixError, match="no entries"):
        Imatrix({}).write(tmp_path / "transformer.imatrix")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("sums,counts", [(np.array([[1.0, np.nan]], np.float32), np.array([[2.0]], np.float32)),
                                         (np.array([[1.0, 2.0]], np.float32), np.zeros((0,), np.float32))])
def test_garbled_gguf_imatrix_is_a_one_line_error_naming_it(tmp_path, sums, counts):
    """As for the legacy layout: NaN importance must not reach ggml, and a missing count is no traceback."""
    path = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_tensor(SD + "a.weight.in_sum2", sums)
    w.add_tensor(SD + "a.weight.counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ImatrixError) as e:
        Imatrix.read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
