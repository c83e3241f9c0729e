"""Text encoder: Qwen3-VL checkpoint -> GGUF (converter/text_encoder.py) -> 13-tap features (runtime/text_encoder.py),
compared against transformers' Qwen3VLForConditionalGeneration on a tiny random 36-layer model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS

sys.path.insert(0, str(Path(__file__).parent))

from _helpers import make_text_encoder_checkpoint, reference_taps  # noqa: E402

from gguf_dit.converter.text_encoder import convert_text_encoder  # noqa: E402
from gguf_dit.errors import InputError, ModelError, OutputError, SourceError  # noqa: E402
from gguf_dit.arch.text_encoder import MAX_TOKENS, TEMPLATE, default_taps  # noqa: E402
from gguf_dit.runtime.text_encoder import TextEncoder  # noqa: E402

#: The taps come from the oracle, diffusers 0.42.1's Ideogram 4 pipeline, not from the runtime's own constant.
TAPS = tuple(QWEN3_VL_ACTIVATION_LAYERS)

# Measured on the fixture (36 layers, hidden 32, max |feature| ≈ 23) on AMD EPYC Zen 4, see docs/text_encoder.md:
F32_MAX_ABS = 2e-4  # measured 3.6e-5 to 5.2e-5 (≤ 2.2e-6 of max |ref|): F32 summation order, no CPU-specific kernel
# Q8_0: llama.cpp's CPU Q8_0 kernels quantize activations; their rounding depends on the CPU's kernels
# (AVX2 / AVX-512 VNNI / AMX), hence about 3x margin.
Q8_0_TAP0_REL_RMS = 0.04  # measured 0.013
Q8_0_REL_RMS = 0.24  # measured ≤ 0.079 (tap 35): 36 random layers compound 8-bit weight and activation error
# qwen3vl (community) file: llama.cpp's MRoPE gives pair 6 of 8 to the zero 4th axis; a property of the two
# graphs, not of CPU kernels. Measured 5.9e-4 of max |ref| at 135 tokens.
QWEN3VL_DRIFT = 2e-3

CAPTIONS = [
    "A photo of a red fox standing in the snow, soft morning light.",
    '{"caption": "a watercolor painting of a lighthouse", "style": "impressionist", "colors": ["blue", "white"]}',
    '{"text": "Café «Ünïcödé» — 東京 🌸", "layout": {"x": 0.25, "y": 0.75}}',
    "Cafe\u0301 with a decomposed accent (NFD), tabs\tand\nnew lines\r\n  and   spaces  ",
    "I'm sure they'll say it's what we've done; a literal <|im_end|> inside the caption",
    "",
]


@pytest.fixture(scope="module")
def te(tmp_path_factory):
    root = tmp_path_factory.mktemp("te")
    te_dir, tok_dir, model, tok = make_text_encoder_checkpoint(root)
    return root, te_dir, tok_dir, model, tok


@pytest.fixture(scope="module")
def gguf_f32(te):
    root, te_dir, tok_dir, _, _ = te
    out = root / "te_f32.gguf"
    summary = convert_text_encoder(te_dir, tok_dir, out, linear_type="f32")
    return out, summary


@pytest.fixture(scope="module")
def enc_f32(gguf_f32):
    enc = TextEncoder.load(gguf_f32[0], n_threads=1)
    yield enc
    enc.close()


def hf_ids(tok, caption: str) -> list[int]:
    """The official tokenisation: chat template with generation prompt, no extra special tokens."""
    text = tok.apply_chat_template([{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True)
    assert text == TEMPLATE.format(caption=caption)
    return tok(text, add_special_tokens=False)["input_ids"]


def hf_features(model, ids, taps) -> np.ndarray:
    ref = reference_taps(model, ids, taps)  # [T, n_taps, hidden]
    return ref.permute(0, 2, 1).reshape(len(ids), -1).numpy()  # f = d * n_taps + j


def gguf_types(path: Path) -> dict[str, str]:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in r.tensors}


def gguf_field(path: Path, key: str):
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get(key)
    return None if f is None else f.contents()


# -- taps ----------------------------------------------------------------------------------


def test_default_taps_are_the_official_13_for_36_layers():
    assert default_taps(36) == list(TAPS)
    for n in range(13, 80):
        taps = default_taps(n)
        assert len(taps) == 13 and taps[0] == 0 and taps[-1] == n - 1 and taps == sorted(set(taps)), n
    assert default_taps(4) == [0, 3]


# -- conversion ----------------------------------------------------------------------------


def test_conversion_writes_qwen3_with_tokenizer_taps_and_template(gguf_f32, te):
    out, s = gguf_f32
    _, _, _, model, tok = te
    assert s["arch"] == "qwen3" and s["n_layers"] == 36 and s["hidden"] == 32
    assert s["taps"] == list(TAPS) and s["features_dim"] == 13 * 32
    assert s["source_layout"] == "model.language_model."
    assert gguf_field(out, "general.architecture") == "qwen3"
    assert gguf_field(out, "gguf_dit.text_encoder.taps") == list(TAPS)
    assert gguf_field(out, "gguf_dit.text_encoder.template") == TEMPLATE
    assert gguf_field(out, "qwen3.rope.freq_base") == pytest.approx(5e6)
    assert gguf_field(out, "tokenizer.ggml.model") == "gpt2" and gguf_field(out, "tokenizer.ggml.pre") == "qwen2"
    assert gguf_field(out, "tokenizer.ggml.add_bos_token") is False
    tokens = gguf_field(out, "tokenizer.ggml.tokens")
    rows = model.model.language_model.embed_tokens.weight.shape[0]
    assert len(tokens) == rows > len(tok)  # padded like Qwen's 151,936 vs 151,669
    assert tokens[len(tok)] == f"[PAD{len(tok)}]"
    assert gguf_field(out, "tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    types = gguf_types(out)
    assert "output.weight" not in types  # no lm_head: llama.cpp falls back to token_embd
    assert not any(n.startswith(("v.", "mm.")) or "visual" in n for n in types)
    assert set(types.values()) == {"F32"}


def test_existing_output_without_force_is_refused_and_untouched(gguf_f32, te):
    out, _ = gguf_f32
    _, te_dir, tok_dir, _, _ = te
    before = out.read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        convert_text_encoder(te_dir, tok_dir, out, linear_type="q8_0")
    assert out.read_bytes() == before


def test_q8_0_with_down_proj_type_f16(te, tmp_path):
    _, te_dir, tok_dir, _, _ = te
    out = tmp_path / "te.gguf"
    s = convert_text_encoder(te_dir, tok_dir, out, linear_type="q8_0", down_proj_type="f16")
    types = gguf_types(out)
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.35.ffn_down.weight"] == "F16"
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.7.attn_q.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert s["types"] == {"Q8_0": 36 * 6 + 1, "F16": 36, "F32": 36 * 4 + 1}


def test_type_that_does_not_fit_falls_back(te, tmp_path):
    _, te_dir, tok_dir, _, _ = te
    out = tmp_path / "te.gguf"
    convert_text_encoder(te_dir, tok_dir, out, linear_type="q4_k")  # rows of 32/64 cannot hold 256-blocks
    types = gguf_types(out)
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "F16"


# -- tokens and features -------------------------------------------------------------------


def test_tokens_match_hf_tokenizer(enc_f32, te):
    tok = te[4]
    for cap in CAPTIONS:
        assert enc_f32.tokenize(cap) == hf_ids(tok, cap), cap
    assert enc_f32.tokenize("x")[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS


def test_f32_features_match_transformers(enc_f32, te):
    model, tok = te[3], te[4]
    assert tuple(enc_f32.taps) == TAPS and enc_f32.features_dim == 416
    for cap in CAPTIONS[1:3] + [CAPTIONS[0] * 8]:
        ids = hf_ids(tok, cap)
        got = enc_f32.encode(cap)
        ref = hf_features(model, ids, TAPS)
        assert got.shape == (len(ids), 32 * 13) and got.dtype == np.float32
        err = np.abs(got - ref).max()
        assert err < F32_MAX_ABS, (cap, err, np.abs(ref).max())


def test_f32_features_match_diffusers_encode_path(enc_f32, te):
    """diffusers' own Ideogram4Pipeline text path (_get_text_encoder_hidden_states + its stack/permute/reshape)."""
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import Ideogram4Pipeline

    model, tok = te[3], te[4]
    cap = CAPTIONS[2]
    ids = torch.tensor([hf_ids(tok, cap)])
    n = ids.shape[1]
    with torch.no_grad():
        taps = Ideogram4Pipeline._get_text_encoder_hidden_states(model.model, ids, torch.ones_like(ids), torch.arange(n)[None])
    ref = torch.stack(taps, dim=0).permute(1, 2, 3, 0).reshape(n, -1).numpy()
    err = np.abs(enc_f32.encode(cap) - ref).max()
    assert err < F32_MAX_ABS, err


def test_features_are_interleaved_raw_layer_outputs(enc_f32, te):
    """f = d*13 + j; the last tap is layer 35 before the final norm (not hidden_states[-1])."""
    model, tok = te[3], te[4]
    cap = CAPTIONS[1]
    ids = hf_ids(tok, cap)
    got = enc_f32.encode(cap).reshape(len(ids), 32, 13)
    with torch.no_grad():
        hs = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert np.abs(got[:, :, 1] - hs[4][0].numpy()).max() < F32_MAX_ABS  # tap 1 = layer 3 output
    normed = hs[36][0].numpy()  # transformers' last entry: after the final RMSNorm
    assert np.abs(got[:, :, 12] - normed).max() > 0.1


def test_q8_0_features_within_bound(te, tmp_path):
    _, te_dir, tok_dir, model, tok = te
    out = tmp_path / "te_q8.gguf"
    convert_text_encoder(te_dir, tok_dir, out)  # default linear_type q8_0
    with TextEncoder.load(out, n_threads=1) as enc:
        cap = CAPTIONS[1] * 3
        ids = hf_ids(tok, cap)
        got = enc.encode(cap).reshape(len(ids), 32, 13)
    ref = hf_features(model, ids, TAPS).reshape(len(ids), 32, 13)
    rel = np.sqrt(((got - ref) ** 2).sum(axis=(0, 1)) / (ref**2).sum(axis=(0, 1)))
    assert rel[0] < Q8_0_TAP0_REL_RMS and rel.max() < Q8_0_REL_RMS, rel


def test_qwen3vl_arch_file_loads_and_deviates_only_slightly(te, tmp_path, enc_f32):
    """Community layout (arch qwen3vl): llama.cpp's interleaved MRoPE gives the 4th (zero) position
    axis to the frequency pairs beyond 3 × section, so it drifts from transformers with position;
    our qwen3 file does not (docs/text_encoder.md)."""
    _, te_dir, tok_dir, model, tok = te
    out = tmp_path / "te_vl.gguf"
    convert_text_encoder(te_dir, tok_dir, out, linear_type="f32", arch="qwen3vl")
    assert gguf_field(out, "qwen3vl.rope.dimension_sections") == [2, 3, 3, 0]
    cap = CAPTIONS[0] * 3
    with TextEncoder.load(out, n_threads=1) as enc:
        assert enc.arch == "qwen3vl" and tuple(enc.taps) == TAPS
        ids = enc.tokenize(cap)
        got = enc.encode(cap)
    ref = hf_features(model, ids, TAPS)
    assert ids == hf_ids(tok, cap)
    assert np.abs(got[0] - ref[0]).max() < F32_MAX_ABS  # position 0: no rotation at all
    assert np.abs(got - ref).max() < QWEN3VL_DRIFT * np.abs(ref).max()
    assert np.abs(enc_f32.encode(cap) - ref).max() < F32_MAX_ABS


def test_fp8_sharded_source_is_dequantized(te, tmp_path):
    """FP8 weights with per-row weight_scale (attention) or block weight_scale_inv (MLP), bf16 embedding,
    Qwen3VLModel keys (language_model.*) in two shards, real-8B style config (rope_theta + rope_scaling)."""
    from safetensors.torch import save_file

    _, te_dir, tok_dir, model, _ = te
    src = tmp_path / "fp8"
    src.mkdir()
    cfg = json.loads((te_dir / "config.json").read_text())
    tc = cfg["text_config"]
    rp = tc.pop("rope_parameters")
    tc["rope_theta"] = rp["rope_theta"]
    tc["rope_scaling"] = {"rope_type": "default", "mrope_section": rp["mrope_section"], "mrope_interleaved": True}
    (src / "config.json").write_text(json.dumps(cfg))
    expected = {}
    shards: list[dict] = [{}, {}]
    for name, w in model.model.language_model.state_dict().items():
        key = "language_model." + name
        shard = shards[int("layers." in name and int(name.split(".")[1]) >= 18)]
        if w.dim() == 2 and "embed_tokens" not in name:
            if ".mlp." in name:
                b = 16
                blocks = w.reshape(w.shape[0] // b, b, w.shape[1] // b, b).abs().amax(dim=(1, 3)) / 448.0
                scale = blocks.repeat_interleave(b, 0).repeat_interleave(b, 1)
                w8 = (w / scale).to(torch.float8_e4m3fn)
                shard[key] = w8
                shard[key + "_scale_inv"] = blocks.float()
                expected[name] = w8.float() * scale
            else:
                scale = w.abs().amax(dim=1) / 448.0
                w8 = (w / scale[:, None]).to(torch.float8_e4m3fn)
                shard[key] = w8
                shard[key.replace(".weight", ".weight_scale")] = scale.float()
                expected[name] = w8.float() * scale[:, None]
        else:
            shard[key] = w.to(torch.bfloat16) if "embed_tokens" in name else w
            expected[name] = shard[key].float()
    shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for fname, sd in zip(shard_names, shards):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(src / fname))
        weight_map.update({k: fname for k in sd})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    out = tmp_path / "fp8.gguf"
    s = convert_text_encoder(src, tok_dir, out, linear_type="f32")
    assert s["source_layout"] == "language_model." and s["n_layers"] == 36
    assert gguf_field(out, "qwen3.rope.freq_base") == pytest.approx(5e6)
    import gguf

    r = gguf.GGUFReader(str(out))
    data = {t.name: np.asarray(t.data) for t in r.tensors}
    for hf, gg in [
        ("layers.5.self_attn.q_proj.weight", "blk.5.attn_q.weight"),
        ("layers.20.self_attn.o_proj.weight", "blk.20.attn_output.weight"),
        ("layers.5.mlp.down_proj.weight", "blk.5.ffn_down.weight"),
        ("layers.30.mlp.gate_proj.weight", "blk.30.ffn_gate.weight"),
        ("embed_tokens.weight", "token_embd.weight"),
        ("layers.2.input_layernorm.weight", "blk.2.attn_norm.weight"),
    ]:
        np.testing.assert_array_equal(data[gg].reshape(expected[hf].shape), expected[hf].numpy(), err_msg=hf)


def _rewrite(te_dir: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((te_dir / "config.json").read_text())
    sd = load_file(str(te_dir / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", r"tensor model\.language_model\.layers\.7\.mlp\.up_proj\.weight: missing tensor"),
        ("shape", r"tensor model\.language_model\.layers\.3\.self_attn\.k_norm\.weight: shape \[8\], expected \[16\]"),
        ("nan", r"tensor model\.language_model\.layers\.9\.self_attn\.v_proj\.weight: non-finite value"),
    ],
)
def test_bad_source_names_file_and_tensor(te, tmp_path, case, match):
    _, te_dir, tok_dir, _, _ = te
    p = "model.language_model.layers."

    def edit(sd):
        if case == "missing":
            del sd[p + "7.mlp.up_proj.weight"]
        elif case == "shape":
            sd[p + "3.self_attn.k_norm.weight"] = sd[p + "3.self_attn.k_norm.weight"][:8].clone()
        else:
            w = sd[p + "9.self_attn.v_proj.weight"].clone()
            w[0, 3] = float("nan")
            sd[p + "9.self_attn.v_proj.weight"] = w

    src = _rewrite(te_dir, tmp_path / "bad", edit)
    out = tmp_path / "bad.gguf"
    with pytest.raises(SourceError, match=match):
        convert_text_encoder(src, tok_dir, out, linear_type="f32")
    assert not out.exists() and not list(tmp_path.glob(".bad.gguf.*"))


# -- runtime errors ------------------------------------------------------------------------


def test_too_many_tokens_is_an_input_error(enc_f32):
    with pytest.raises(InputError, match=f"at most {MAX_TOKENS}"):
        enc_f32.encode("fox " * 2100)


def test_wrong_architecture_is_a_model_error(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match=r"llama\.gguf: general\.architecture is 'llama'"):
        TextEncoder.load(path)
    with pytest.raises(ModelError, match="does not exist"):
        TextEncoder.load(tmp_path / "missing.gguf")


def test_hidden_size_mismatch_is_a_model_error(enc_f32):
    enc_f32.check_features_dim(32 * 13)
    with pytest.raises(ModelError, match=r"encoder hidden 32 × 13 taps = 416, but the DiT expects 53248"):
        enc_f32.check_features_dim(4096 * 13)


def test_closed_encoder_refuses(gguf_f32):
    enc = TextEncoder.load(gguf_f32[0], n_threads=1)
    enc.close()
    enc.close()  # idempotent
    with pytest.raises(ModelError, match="closed"):
        enc.encode("x")


def test_learned_tokenizer_matches_hf(tmp_path):
    """The demo model's tokenizer (merges learned on its captions by converter/tiny.py) tokenizes like
    transformers after conversion: learned merges, the byte fallback for unseen text, and the specials."""
    from transformers import AutoTokenizer

    from gguf_dit.converter.tiny import write_tiny_checkpoint

    corpus = ['{"high_level_description":"A red circle on the left."}', '{"high_level_description":"A blue square at the top."}'] * 3
    root = write_tiny_checkpoint(tmp_path / "ckpt", tokenizer_corpus=corpus)
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    learned = json.loads((root / "tokenizer" / "tokenizer.json").read_text())["model"]
    assert len(learned["merges"]) > 20 and "Ġcircle" in learned["vocab"]
    rows = json.loads((root / "text_encoder" / "config.json").read_text())["text_config"]["vocab_size"]
    assert rows % 64 == 0 and rows >= len(tok)
    out = tmp_path / "te.gguf"
    convert_text_encoder(root / "text_encoder", root / "tokenizer", out, linear_type="f32")
    enc = TextEncoder.load(out, n_threads=1)
    try:
        for cap in corpus[:2] + CAPTIONS:
            ids = tok(TEMPLATE.format(caption=cap), add_special_tokens=False)["input_ids"]
            assert enc.tokenize(cap) == ids, cap
        assert len(enc.tokenize(corpus[0])) < len(TEMPLATE.format(caption=corpus[0]).encode()) / 3  # merges at work
    finally:
        enc.close()
