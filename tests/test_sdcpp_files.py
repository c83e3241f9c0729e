"""Backbones as stable-diffusion.cpp's ``sd-cli -M convert`` writes them, against diffusers 0.42.1 (issue 10 §2).

The files are built here the way sd.cpp builds them (../shared/docs/gguf-and-ggml.md §2.1): ``gguf_init_empty``
(no KV pair at all, not even ``general.architecture``), official unprefixed names, every tensor at its source
precision (BF16 or F16) unless a ``--tensor-type-rules`` rule converts it and ``tensor_should_be_converted``
allows it — which it never does for ``.bias``, ``.scale``, names containing ``embedding`` or ``final_layer.``,
or rows that are not a multiple of the target's block size. So norm weights, biases, the image-indicator
embedding, ``t_embedding.*`` and ``final_layer.*`` stay BF16/F16, and the runtime must widen the non-linear
ones to F32 and run the linear ones in their stored type.

The reference is diffusers' Ideogram4Transformer2DModel on the weights exactly as stored (decoded by gguf-py,
not by our code). Where a linear is not F32, ggml's CPU kernel rounds its input to the weight type's
``vec_dot_type`` (BF16, F16, Q8_0, Q8_K); a second reference rounds its Linear inputs the same way with ggml's own
``from_float`` (tests/_actquant.py) to measure how much error that rounding explains. Float-order differences
(CPU-kernel dependent) flip individual roundings, so the two agree in magnitude, not bit for bit.
"""

from __future__ import annotations

import json
import logging
import re
import struct

import gguf
import numpy as np
import pytest
import torch

from _actquant import roundtrip
from _helpers import make_model, official_to_diffusers, reference_velocity, rel_err
from gguf_dit.errors import ModelError
from gguf_dit.ggml_ops import GGMLType, quantize
from gguf_dit.runtime.dit import Ideogram4DiT, RuntimeOptions
from gguf_dit.runtime.backbone_file import BackboneFile

Q = gguf.GGMLQuantizationType
EXACT = RuntimeOptions(t_rounding="none")

#: sd.cpp's documented Ideogram recipe quantizes the block linears by rule; the three input projections are
#: added here so that they are converted too where the row length allows (first match wins).
RULES = (r"^layers.*adaln_modulation.*weight", r"layers.*attention.o.*weight", r"layers.*attention.qkv.*weight",
         r"layers.*feed_forward.*weight", r"^(input_proj|llm_cond_proj|adaln_proj)\.weight$")


def _sdcpp_converts(name: str, n_per_row: int, target: Q) -> bool:
    """``--tensor-type-rules`` then ``ModelLoader::tensor_should_be_converted`` (stable-diffusion.cpp)."""
    if not any(re.search(r, name) for r in RULES):
        return False
    block = gguf.GGML_QUANT_SIZES[target][0]
    if n_per_row % block:
        return False
    return not (name.endswith((".bias", ".scale")) or "embedding" in name or "final_layer." in name)


def _encode(x: np.ndarray, t: Q) -> np.ndarray:
    if t == Q.F32:
        return x.astype(np.float32)
    if t == Q.Q4_K:  # gguf-py has no K-quant quantizer; sd.cpp passes an all-ones importance vector
        return quantize(x.reshape(-1, x.shape[-1]), GGMLType.Q4_K, importance=np.ones(x.shape[-1], np.float32)).reshape(*x.shape[:-1], -1)
    return gguf.quants.quantize(x, t)


def write_sdcpp_file(path, sd: dict[str, torch.Tensor], source: Q, linear: Q, overrides: dict[str, Q] | None = None) -> None:
    """A backbone GGUF with no KV at all: ``source`` precision everywhere, ``linear`` where sd.cpp converts."""
    w = gguf.GGUFWriter(str(path), "ideogram4")
    w.kv_data[0].clear()  # gguf_init_empty: not even general.architecture
    for name, t in sd.items():
        x = gguf.quants.dequantize(_encode(t.numpy(), source), source).reshape(t.shape)  # the source file's values
        typ = overrides[name] if name in (overrides or {}) else linear if _sdcpp_converts(name, t.shape[-1], linear) else source
        data = _encode(x, typ) if typ != Q.I32 else x.astype(np.int32)
        w.add_tensor(name, data, raw_dtype=None if typ in (Q.F32, Q.I32) else typ)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def diffusers_model():
    """One diffusers model, reloaded with each file's stored weights (building one costs a second)."""
    return make_model(0)


def load_stored(model, path):
    """diffusers on the weights exactly as stored, decoded by gguf-py."""
    r = gguf.GGUFReader(str(path))
    sd = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))))) for t in r.tensors}
    model.load_state_dict(official_to_diffusers(sd), strict=True)
    return model


def round_inputs_like_ggml(model, path, opts: RuntimeOptions) -> list:
    """Round each Linear's input as ggml's CPU kernel does for that weight's stored type; returns hook handles."""
    types = {t.name[: -len(".weight")]: GGMLType(int(t.tensor_type)) for t in gguf.GGUFReader(str(path)).tensors if t.name.endswith(".weight")}
    per_sample = ("adaln_modulation", "t_embedding.", "adaln_proj", "final_layer.adaln_modulation")
    handles = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        official = re.sub(r"attention\.to_(q|k|v)$", "attention.qkv", name).replace("attention.to_out.0", "attention.o")
        wt = types[official]
        if opts.exact_conditioning and wt.is_quantized and any(official.startswith(c) or f".{c}" in official for c in per_sample):
            continue  # the runtime casts these weights to F32: exact activations
        handles.append(mod.register_forward_pre_hook(lambda mod, args, wt=wt: (torch.from_numpy(roundtrip(args[0].numpy(), wt)),)))
    return handles


def _inputs(grid, n_text, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((grid[0] * grid[1], 128)).astype(np.float32)
    feats = None if n_text == 0 else (rng.standard_normal((n_text, 416)) * 2).astype(np.float32)
    return x, feats


CASES = (((4, 4), 7, 0.6), ((3, 5), 0, 0.23))


@pytest.fixture(scope="module")
def official(checkpoints):
    _, sds, _ = checkpoints("f32")
    return sds["transformer"]


def test_file_has_no_metadata_and_keeps_source_precision(official, tmp_path):
    p = tmp_path / "sdcpp.gguf"
    write_sdcpp_file(p, official, Q.BF16, Q.Q8_0)
    magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", p.read_bytes()[:24])
    assert (magic, version, n_tensors, n_kv) == (b"GGUF", 3, len(official), 0)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(p)).tensors}
    for name in ("input_proj.bias", "layers.1.attention.norm_k.weight", "embed_image_indicator.weight", "llm_cond_norm.weight",
                 "t_embedding.mlp_in.weight", "final_layer.linear.weight", "final_layer.adaln_modulation.bias"):
        assert types[name] == Q.BF16, name
    assert types["layers.0.feed_forward.w2.weight"] == types["input_proj.weight"] == Q.Q8_0


@pytest.mark.parametrize("source", [Q.BF16, Q.F16], ids=lambda t: t.name)
def test_widened_tensors_are_exact(official, diffusers_model, tmp_path, source):
    """Every linear F32, every other tensor in ``source``: the only change from an F32 file is the widening,
    which must reproduce the stored values exactly. Observed max rel. error 5.4e-7 on AMD EPYC (F32 files: up to
    1.4e-6 on other CPUs); multiplying the block RMSNorm eps by 10 gives 5.7e-5."""
    p = tmp_path / "w.gguf"
    write_sdcpp_file(p, official, source, Q.F32, overrides={n: Q.F32 for n in official if n.startswith(("t_embedding", "final_layer")) and n.endswith("weight")})
    dit = Ideogram4DiT.load(p, "cpu", options=EXACT)
    assert BackboneFile(p).tensors["layers.0.ffn_norm1.weight"].type.name == source.name
    assert dit.weights["layers.0.ffn_norm1.weight"].type is GGMLType.F32
    ref = load_stored(diffusers_model, p)
    for grid, n_text, t in CASES:
        x, feats = _inputs(grid, n_text)
        assert rel_err(dit.velocity(x, t, feats, grid=grid), reference_velocity(ref, x, t, feats, grid)) <= 3e-6


@pytest.mark.parametrize("source", [Q.BF16, Q.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("linear", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_sdcpp_file_matches_diffusers(official, diffusers_model, tmp_path, source, linear):
    """Our error against diffusers on the stored weights must be what the activation rounding of the
    non-F32 linears explains. Observed on AMD EPYC (Zen 4): ours/explained 0.87-1.16 (explained 2e-4 to 9e-3);
    the rounded reference is not reproduced bit for bit (ours vs rounded 2e-6 to 0.74 x explained) because
    float-order differences upstream flip different roundings downstream, which depends on the CPU's kernels."""
    p = tmp_path / "sdcpp.gguf"
    write_sdcpp_file(p, official, source, linear)
    opts = RuntimeOptions(t_rounding="none")
    dit = Ideogram4DiT.load(p, "cpu", options=opts)
    model = load_stored(diffusers_model, p)
    (grid, n_text, t) = CASES[0]
    x, feats = _inputs(grid, n_text)
    ours = dit.velocity(x, t, feats, grid=grid)
    plain = reference_velocity(model, x, t, feats, grid)
    handles = round_inputs_like_ggml(model, p, opts)
    try:
        rounded = reference_velocity(model, x, t, feats, grid)
    finally:
        for h in handles:
            h.remove()
    explained = rel_err(rounded, plain)
    assert 1e-4 < explained < 2e-2  # BF16 t_embedding/final_layer alone: 2e-3; F16 source: 2e-4; Q4_K: 9e-3
    assert rel_err(ours, plain) <= 2 * explained, (rel_err(ours, plain), explained)


# --- types that do not belong --------------------------------------------------------------------


def test_quantized_norms_biases_and_embedding_are_dequantized_at_load(official, diffusers_model, tmp_path):
    """sd.cpp's `-M convert --type q8_0` without rules quantizes every 1-D norm weight whose length fits the
    block; its loader dequantizes them, and so do we. Linears F32 here, so the only change from diffusers on the
    stored weights is the widening (observed 5e-7, as for F16/BF16 sources)."""
    quantized = {"llm_cond_norm.weight": Q.Q8_0, "layers.1.attention.norm_k.weight": Q.Q4_K, "layers.0.attention_norm1.weight": Q.Q8_0,
                 "input_proj.bias": Q.Q4_K, "embed_image_indicator.weight": Q.Q8_0}
    p = tmp_path / "qnorm.gguf"
    write_sdcpp_file(p, official, Q.F32, Q.F32, overrides=quantized)
    dit = Ideogram4DiT.load(p, "cpu", options=EXACT)
    for name, typ in quantized.items():
        assert BackboneFile(p).tensors[name].type.name == typ.name
        assert dit.weights[name].type is GGMLType.F32
    ref = load_stored(diffusers_model, p)
    for grid, n_text, t in CASES:
        x, feats = _inputs(grid, n_text)
        assert rel_err(dit.velocity(x, t, feats, grid=grid), reference_velocity(ref, x, t, feats, grid)) <= 3e-6


@pytest.mark.parametrize("name,typ,role", [
    ("layers.0.attention_norm1.weight", Q.I32, "a norm weight"),
    ("input_proj.bias", Q.I32, "a bias"),
    ("embed_image_indicator.weight", Q.I32, "the image-indicator embedding"),
    ("layers.1.feed_forward.w2.weight", Q.I32, "a linear weight"),
], ids=lambda v: getattr(v, "name", None) or v.replace(" ", "_"))
def test_type_that_does_not_belong_is_refused_before_any_graph(official, tmp_path, monkeypatch, cli, name, typ, role):
    import gguf_dit.runtime.dit as dit_module

    p = tmp_path / "bad.gguf"
    write_sdcpp_file(p, official, Q.BF16, Q.Q8_0, overrides={name: typ})
    monkeypatch.setattr(dit_module, "TensorStore", lambda *a, **k: pytest.fail("weights allocated before the type check"))
    with pytest.raises(ModelError) as e:
        Ideogram4DiT.load(p, "cpu")
    assert e.value.path == str(p) and e.value.tensor == name
    assert f"stored as {typ.name}, which the graph cannot use for {role}" in str(e.value)
    code, out, err = cli("inspect", p, "--json", "--check")  # inspect describes it, as a problem: exit 2
    assert code == 2, err
    assert any(w.startswith(f"tensor {name}: stored as {typ.name}") for w in json.loads(out)["problems"])


def test_backend_without_a_matmul_for_a_stored_type_is_refused(official, tmp_path, monkeypatch):
    """CUDA has no matmul for some types the CPU has: the backend is asked before weights are allocated."""
    from gguf_dit.ggml_ops import Backend

    p = tmp_path / "q8.gguf"
    write_sdcpp_file(p, official, Q.BF16, Q.Q8_0)
    be = Backend("cpu")
    monkeypatch.setattr(be, "supports", lambda node: dit_node_type(node) is not GGMLType.Q8_0)
    with pytest.raises(ModelError, match="stored as Q8_0, which backend cpu has no matmul for") as e:
        Ideogram4DiT(BackboneFile(p), be)
    assert e.value.tensor == "input_proj.weight" and e.value.path == str(p)


def dit_node_type(node) -> GGMLType:
    from gguf_dit.ggml_ops._lib import tensor_struct

    return GGMLType(tensor_struct(tensor_struct(int(node)).src[0]).type)


# --- metadata-less files -------------------------------------------------------------------------


def test_metadata_less_backbone_logs_what_inspect_warns(official, f32_gguf, tmp_path, caplog, cli):
    p = tmp_path / "sdcpp.gguf"
    write_sdcpp_file(p, official, Q.BF16, Q.Q8_0)
    _, out, _ = cli("inspect", p, "--json")
    inspect_warnings = json.loads(out)["warnings"]
    assert inspect_warnings == ["no gguf-dit metadata: architecture and config detected from tensor names and shapes"]
    with caplog.at_level(logging.WARNING, logger="gguf_dit"):
        Ideogram4DiT.load(p, "cpu")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [("gguf_dit.runtime", logging.WARNING, f"{p}: {inspect_warnings[0]}")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gguf_dit"):
        Ideogram4DiT.load(f32_gguf[0] / "transformer.gguf", "cpu")
    assert caplog.records == []


# --- end to end ----------------------------------------------------------------------------------


def test_run_with_sdcpp_style_backbones(cli, tmp_path, caplog):
    """`gguf-dit run` on the demo model with both backbones rewritten as sd.cpp keeps them (no KV; norms, biases,
    embedding in BF16; linears as stored): exit 0, each file's missing metadata logged once, and nearly the
    image the original files give (observed on AMD EPYC: mean |difference| 0.001 of full scale, max 22/255 at an edge, from the BF16
    rounding of the F32 norms and biases). No size hints either: -W/-H are given."""
    import shutil
    from pathlib import Path

    from PIL import Image

    from gguf_dit.runtime.demo import DEMO_DIR

    model = tmp_path / "sdcpp"
    shutil.copytree(DEMO_DIR, model)
    for name in ("transformer.gguf", "unconditional_transformer.gguf"):
        r = gguf.GGUFReader(str(DEMO_DIR / name))
        w = gguf.GGUFWriter(str(model / name), "ideogram4")
        w.kv_data[0].clear()
        for t in r.tensors:
            if t.tensor_type == Q.F32 and len(t.shape) == 1:  # a BF16 source keeps its 1-D tensors in BF16
                w.add_tensor(t.name, gguf.quants.quantize(np.asarray(t.data), Q.BF16), raw_dtype=Q.BF16)
            else:
                w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert BackboneFile(model / name).tensors["input_proj.bias"].type is GGMLType.BF16
    prompt = Path(__file__).resolve().parents[1] / "examples" / "demo.txt"
    images = {}
    for label, m in (("ours", DEMO_DIR), ("sdcpp", model)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gguf_dit"):
            code, _, err = cli("run", prompt, "-m", m, "-o", tmp_path / f"{label}.png", "-q", "--steps", "6", "-W", "64", "-H", "64")
        assert code == 0, err
        images[label] = np.asarray(Image.open(tmp_path / f"{label}.png").convert("RGB")).astype(np.int16)
        warned = sorted(r.getMessage() for r in caplog.records if "metadata" in r.getMessage())
        want = [f"{m / n}: no gguf-dit metadata: architecture and config detected from tensor names and shapes" for n in ("transformer.gguf", "unconditional_transformer.gguf")]
        assert warned == (want if label == "sdcpp" else []), warned
    diff = np.abs(images["ours"] - images["sdcpp"])
    assert diff.mean() / 255 <= 0.004 and diff.max() <= 64, (diff.mean() / 255, diff.max())
