"""Quick checks of the tiny DiT checkpoints in tests/_helpers.py (and of converter/tiny.py's FP8 format they use)."""

import json

import pytest
import torch
from diffusers.utils.constants import SAFE_WEIGHTS_INDEX_NAME as DIFFUSERS_INDEX, SAFETENSORS_WEIGHTS_NAME as DIFFUSERS_WEIGHTS

from _helpers import (
    BACKBONES,
    TINY_CONFIG,
    dequantized_official,
    diffusers_state_dict,
    example_inputs,
    load_backbone,
    make_checkpoint,
    make_model,
    official_state_dict,
    official_to_diffusers,
)
from gguf_dit.converter.tiny import official_fp8 as to_fp8


@pytest.fixture(scope="module")
def model0():
    return make_model(0)


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_every_parameter_randomized_and_seeded(model0):
    again = make_model(0)
    other = make_model(1)
    for (name, p), p2, p3 in zip(model0.named_parameters(), again.parameters(), other.parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, p2), name  # deterministic
        assert not torch.equal(p, p3), name  # seed matters
        assert (p != 0).float().mean() > 0.99, name
        assert (p != 1).float().mean() > 0.99, name
        if p.ndim == 1 and "norm" in name:
            assert p.std() > 0.1, name
    qn = model0.layers[0].attention.norm_q.weight
    assert 1.2 < qn.mean() < 1.4


def test_forward_is_finite_and_reasonable(model0):
    inputs = example_inputs()
    out = _forward(model0, inputs)
    assert out.shape == (1, 11, TINY_CONFIG["in_channels"])
    assert torch.isfinite(out).all()
    assert 0.1 < out.std() < 10


def test_official_layout_roundtrip(model0):
    off = official_state_dict(model0)
    dif = diffusers_state_dict(model0)
    hidden = TINY_CONFIG["num_attention_heads"] * TINY_CONFIG["attention_head_dim"]
    assert not any("to_q" in k or "to_out" in k for k in off)
    assert off["layers.1.attention.qkv.weight"].shape == (3 * hidden, hidden)
    assert torch.equal(
        off["layers.1.attention.qkv.weight"],
        torch.cat([dif[f"layers.1.attention.to_{x}.weight"] for x in "qkv"]),
    )
    assert torch.equal(off["layers.0.attention.o.weight"], dif["layers.0.attention.to_out.0.weight"])
    assert len(dif) - len(off) == 2 * TINY_CONFIG["num_layers"]
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in off.values())

    fresh = make_model(7)
    fresh.load_state_dict(official_to_diffusers(off), strict=True)
    inputs = example_inputs()
    assert torch.equal(_forward(fresh, inputs), _forward(model0, inputs))


def test_fp8_dequant_within_fp8_error(model0):
    sd = official_state_dict(model0)
    q = to_fp8(sd)
    deq = dequantized_official(q)
    assert set(deq) == set(sd)
    n_lin = 0
    for k, w in sd.items():
        if k.endswith(".weight") and w.ndim == 2 and k != "embed_image_indicator.weight":
            n_lin += 1
            assert q[k].dtype == torch.float8_e4m3fn and q[k].shape == w.shape
            s = q[k + "_scale"]
            assert s.dtype == torch.float32 and s.shape == (w.shape[0],)
            torch.testing.assert_close(s, w.abs().amax(1) / 448.0)
            # e4m3: 3 mantissa bits -> rel. error <= 2^-4; subnormal step 2^-9 (x scale)
            err = (deq[k] - w).abs()
            bound = torch.maximum(w.abs() * 2.0**-4, (2.0**-10) * s[:, None]) * 1.0001
            assert (err <= bound).all(), k
            assert q[k].float().abs().amax() == 448.0
        else:
            assert q[k].dtype == torch.bfloat16 and k + "_scale" not in q
            assert torch.equal(deq[k], w.to(torch.bfloat16).float())
    assert n_lin == 7 + 6 * TINY_CONFIG["num_layers"]
    # per-row scales: quantising fused qkv == quantising to_q/to_k/to_v separately
    split = dequantized_official(to_fp8(diffusers_state_dict(model0)))
    fused = official_to_diffusers(deq)
    assert set(split) == set(fused)
    assert all(torch.equal(split[k], fused[k]) for k in split)


@pytest.mark.parametrize(
    "dtype,layout,shards",
    [("f32", "official", 1), ("bf16", "official", 3), ("f16", "diffusers", 2), ("fp8", "official", 2), ("fp8", "diffusers", 1)],
)
def test_make_checkpoint(tmp_path, dtype, layout, shards):
    models = make_checkpoint(tmp_path, dtype=dtype, layout=layout, shards=shards, seed=3)
    assert set(models) == set(BACKBONES)
    stored = {}
    for name in BACKBONES:
        d = tmp_path / name
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["_class_name"] == "Ideogram4Transformer2DModel"
        assert cfg["mrope_section"] == [24, 20, 20] and cfg["num_layers"] == TINY_CONFIG["num_layers"]
        if shards == 1:
            assert (d / DIFFUSERS_WEIGHTS).exists() and not (d / DIFFUSERS_INDEX).exists()
        else:
            index = json.loads((d / DIFFUSERS_INDEX).read_text())
            files = sorted(set(index["weight_map"].values()))
            assert files == [f"diffusion_pytorch_model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
            assert sorted(p.name for p in d.glob("*.safetensors")) == files
        sd = load_backbone(d)
        if shards > 1:
            assert set(index["weight_map"]) == set(sd)
            assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
        stored[name] = sd

        ref = make_model(3 + BACKBONES.index(name))
        expected = official_state_dict(ref) if layout == "official" else diffusers_state_dict(ref)
        names = set(expected) | ({k + "_scale" for k, v in expected.items()
                                  if v.ndim == 2 and k != "embed_image_indicator.weight"} if dtype == "fp8" else set())
        assert set(sd) == names

        # returned model holds exactly the stored (rounded / dequantized) values
        vals = dequantized_official(sd) if dtype == "fp8" else {k: v.float() for k, v in sd.items()}
        if layout == "official":
            vals = official_to_diffusers(vals)
        got = models[name].state_dict()
        assert set(vals) == set(got)
        for k, v in vals.items():
            assert torch.equal(got[k], v), k
        if dtype == "f32":
            for k, v in expected.items():
                assert torch.equal(sd[k], v), k
        if dtype == "fp8":
            lin = "layers.0.feed_forward.w1.weight"
            assert sd[lin].dtype == torch.float8_e4m3fn and sd[lin + "_scale"].dtype == torch.float32
            assert sd["layers.0.attention_norm1.weight"].dtype == torch.bfloat16
        elif dtype != "f32":
            assert all(v.dtype == {"bf16": torch.bfloat16, "f16": torch.float16}[dtype] for v in sd.values())

    a, b = (stored[n]["final_layer.linear.weight"] for n in BACKBONES)
    assert not torch.equal(a, b)  # cond / uncond differ


@pytest.mark.parametrize("shards", [1, 2])
def test_diffusers_layout_loads_with_from_pretrained(tmp_path, shards):
    from diffusers import Ideogram4Transformer2DModel

    models = make_checkpoint(tmp_path, dtype="f32", layout="diffusers", shards=shards)
    loaded = Ideogram4Transformer2DModel.from_pretrained(tmp_path, subfolder="unconditional_transformer")
    ref = models["unconditional_transformer"].state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
