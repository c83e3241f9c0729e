"""Broken and hostile backbone GGUFs (issue 10 §3): metadata of the wrong type, length or range, corrupt JSON,
absurd block indices, truncated data. Each is one ModelError naming the file and the key or tensor, and one
line with exit code 2 from the CLI; `inspect --check` decodes chunk by chunk."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest

from gguf_dit.arch.dit import detect_config
from gguf_dit.errors import ModelError
from gguf_dit.runtime.demo import DEMO_DIR
from gguf_dit.runtime.dit import Ideogram4DiT
from gguf_dit.ggml_ops import STORAGE_TYPES
from gguf_dit.runtime.backbone_file import BackboneFile, all_finite

V = gguf.GGUFValueType


def rewrite(src, dst, kv: dict | None = None, drop=(), extra_tensors: dict | None = None, patch: dict | None = None) -> None:
    """Copy a backbone GGUF, setting ``kv`` ({key: (value, type[, sub_type])}), dropping keys in ``drop``,
    changing tensor bytes in place with ``patch`` ({name: fn(uint8 array)})."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "ideogram4")
    w.kv_data[0].clear()
    kv = dict(kv or {})
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in drop or key in kv:
            continue
        if f.types[0] == V.ARRAY:
            w.add_key_value(key, f.contents(), V.ARRAY, f.types[-1])
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    for key, spec in kv.items():
        w.add_key_value(key, spec[0], spec[1], *spec[2:])
    for t in r.tensors:
        data = np.array(t.data)
        if t.name in (patch or {}):
            patch[t.name](data.reshape(-1).view(np.uint8))
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The demo's conditional backbone (F32, F16, Q8_0, Q4_K tensors) without its size hints."""
    p = tmp_path_factory.mktemp("good") / "transformer.gguf"
    rewrite(DEMO_DIR / "transformer.gguf", p, drop=("gguf_dit.size_range", "gguf_dit.default_size"))
    return p


def refused(path, cli, *needles, tensor=None):
    with pytest.raises(ModelError) as e:
        BackboneFile(path)
    assert e.value.path == str(path) and e.value.tensor == tensor
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    code, out, err = cli("inspect", path)
    assert code == 2 and out == "" and err == f"error: {e.value}\n"
    return e.value


BAD_METADATA = [
    ("ideogram4.mrope_section", ([24, 20], V.ARRAY, V.UINT32), "must be an array of 3 integers, got 2"),
    ("ideogram4.mrope_section", ([24.0, 20.0, 20.0], V.ARRAY, V.FLOAT32), "is ARRAY of FLOAT32, expected ARRAY of integers"),
    ("ideogram4.mrope_section", ("24,20,20", V.STRING), "is STRING, expected ARRAY of integers"),
    ("ideogram4.mrope_section", ([24, -20, 20], V.ARRAY, V.INT32), "must not be negative"),
    ("ideogram4.emb_dim", ("512", V.STRING), "is STRING, expected an integer"),
    ("ideogram4.num_layers", (2.0, V.FLOAT32), "is FLOAT32, expected an integer"),
    ("ideogram4.num_heads", ([2], V.ARRAY, V.UINT32), "is ARRAY of UINT32, expected an integer"),
    ("ideogram4.rope_theta", ("5e6", V.STRING), "is STRING, expected a number"),
    ("ideogram4.norm_eps", (-1e-5, V.FLOAT32), "must be a positive finite number"),
    ("ideogram4.final_norm_eps", (math.nan, V.FLOAT32), "must be a positive finite number"),
    ("ideogram4.llm_cond_norm_eps", (True, V.BOOL), "is BOOL, expected a number"),
    ("ideogram4.role", ("both", V.STRING), "must be one of cond, uncond, got 'both'"),
    ("ideogram4.role", (1, V.UINT32), "is UINT32, expected STRING"),
    ("general.architecture", (4, V.UINT32), "is UINT32, expected STRING"),
    ("gguf_dit.recipe.name", (["f32"], V.ARRAY, V.STRING), "is ARRAY of STRING, expected STRING"),
    ("gguf_dit.recipe.tensors", ('{"input_proj.weight": ["F32", "recipe"', V.STRING), "is not valid JSON (JSONDecodeError"),
    ("gguf_dit.recipe.tensors", ("[" * 100000, V.STRING), "is not valid JSON (RecursionError"),
    ("gguf_dit.recipe.tensors", ('[["F32", "recipe"]]', V.STRING), "must be a JSON object of tensor name -> [type, reason]"),
    ("gguf_dit.size_range", ([256], V.ARRAY, V.UINT32), "must be an array of 2 integers, got 1"),
    ("gguf_dit.size_range", ([256, 1024, 2048], V.ARRAY, V.UINT32), "must be an array of 2 integers, got 3"),
    ("gguf_dit.size_range", ("256..2048", V.STRING), "is STRING, expected ARRAY of integers"),
    ("gguf_dit.size_range", ([0, 2048], V.ARRAY, V.INT32), "0..2048 must be multiples of 16 with 16 <= low <= high"),
    ("gguf_dit.size_range", ([-256, 2048], V.ARRAY, V.INT32), "-256..2048 must be multiples of 16"),
    ("gguf_dit.size_range", ([250, 2048], V.ARRAY, V.UINT32), "250..2048 must be multiples of 16"),
    ("gguf_dit.size_range", ([2048, 256], V.ARRAY, V.UINT32), "2048..256 must be multiples of 16 with 16 <= low <= high"),
    ("gguf_dit.default_size", (4096, V.UINT32), "gguf_dit.default_size 4096 must be a multiple of 16 within the size range 16..2048"),
    ("gguf_dit.default_size", (1000, V.UINT32), "1000 must be a multiple of 16"),
    ("gguf_dit.default_size", ("1024", V.STRING), "is STRING, expected an integer"),
]


@pytest.mark.parametrize("key,value,message", BAD_METADATA, ids=[f"{k}={v[0]!r:.12}" for k, v, _ in BAD_METADATA])
def test_bad_metadata_value_is_one_error_naming_file_and_key(good, tmp_path, cli, key, value, message):
    p = tmp_path / "bad.gguf"
    rewrite(good, p, {key: value})
    refused(p, cli, f"metadata key {key} ", message)


def test_default_size_is_checked_against_the_files_own_range(good, tmp_path, cli):
    p = tmp_path / "bad.gguf"
    rewrite(good, p, {"gguf_dit.size_range": ([256, 1024], V.ARRAY, V.UINT32), "gguf_dit.default_size": (2048, V.UINT32)})
    refused(p, cli, "gguf_dit.default_size 2048 must be a multiple of 16 within the size range 256..1024")


def test_size_hints_are_exposed_validated(good, tmp_path):
    p = tmp_path / "hints.gguf"
    rewrite(good, p, {"gguf_dit.size_range": ([256, 1024], V.ARRAY, V.UINT16), "gguf_dit.default_size": (512, V.INT32)})
    f = BackboneFile(p)
    assert (f.size_range, f.default_size) == ((256, 1024), 512)
    bare = BackboneFile(good)  # no hints; not the real model's width: any multiple of 16 up to 2048, 1024 by default
    assert (bare.size_range, bare.default_size) == ((16, 2048), 1024)
    p2 = tmp_path / "range.gguf"
    rewrite(good, p2, {"gguf_dit.size_range": ([1280, 2048], V.ARRAY, V.UINT32)})
    assert BackboneFile(p2).default_size == 1280  # 1024 is outside the range: its low end


def test_huge_block_index_is_refused_without_building_a_range(good, tmp_path, cli):
    shapes = {"input_proj.weight": (512, 128), "llm_cond_proj.weight": (512, 416), "adaln_proj.weight": (256, 512),
              "layers.0.ffn_norm1.weight": (512,), "layers.99999999999.ffn_norm1.weight": (512,)}
    with pytest.raises(ModelError, match=r"not contiguous: 2 block indices up to 99999999999, layer 1 missing"):
        detect_config(shapes, "x.safetensors", error=ModelError)
    p = tmp_path / "huge.gguf"
    rewrite(good, p, extra_tensors={"layers.99999999999.ffn_norm1.weight": np.ones(512, np.float32)})
    refused(p, cli, "transformer blocks are not contiguous: 4 block indices up to 99999999999, layer 3 missing")


def test_config_tensor_of_the_wrong_rank_is_named(good, tmp_path, cli):
    shapes = {"input_proj.weight": (512, 128, 1), "llm_cond_proj.weight": (512, 416), "adaln_proj.weight": (256, 512)}
    with pytest.raises(ModelError, match=r"tensor input_proj.weight: has 3 dimensions \[512, 128, 1\], expected 2"):
        detect_config(shapes, "x.safetensors", error=ModelError)


def test_truncated_file_says_truncated(good, tmp_path, cli):
    p = tmp_path / "cut.gguf"
    p.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ModelError, match="truncated") as e:
        Ideogram4DiT.load(p, "cpu")
    assert e.value.path == str(p)
    code, _, err = cli("inspect", p, "--check")
    assert code == 2 and err.count("\n") == 1 and "truncated" in err and str(p) in err


# --- inspect --check ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["transformer.gguf", "unconditional_transformer.gguf"])
def test_chunked_decoding_equals_gguf_py_and_finds_the_last_element(tmp_path, name):
    """`--check` decodes a few MiB of rows at a time; tiny chunks here so every tensor spans many."""
    path = DEMO_DIR / name
    f = BackboneFile(path)
    assert {t.type_name for t in f.tensors.values()} >= ({"F32", "F16", "Q8_0", "Q4_K"} if name == "transformer.gguf" else {"F32", "Q8_0"})
    with open(path, "rb") as fh:
        for t in gguf.GGUFReader(str(path)).tensors:
            rows = math.prod(f.tensors[t.name].shape[:-1])
            chunks = list(f.f32_chunks(t.name, fh, max_bytes=3 * (f.tensors[t.name].nbytes // rows)))
            assert len(chunks) == math.ceil(rows / 3)
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
            np.testing.assert_array_equal(np.concatenate(chunks).reshape(-1), want, err_msg=t.name)
    assert f.nonfinite(max_bytes=64) == []


def _set_f16(offset: int, value: float):
    return lambda b: b.__setitem__(slice(offset, offset + 2), np.array([value], np.float16).view(np.uint8))


@pytest.mark.parametrize("name,offset,value", [
    ("layers.1.ffn_norm2.weight", -4, np.nan),  # F32: the last element
    ("layers.2.feed_forward.w3.weight", 144 * 7 + 2, np.inf),  # Q4_K: dmin of block 7
    ("input_proj.weight", -34, -np.inf),  # Q8_0: d of the last block
    ("layers.1.feed_forward.w2.weight", 0, np.nan),  # F16: the first element
])
def test_non_finite_weights_are_refused_at_load_and_found_by_check(tmp_path, cli, name, offset, value):
    """A quantized block with an Inf scale decodes to Inf/NaN, but ggml's quantized dot products turn it into
    finite garbage: only a scan of the stored values can see it (issue 10 fuzz finding)."""
    src = DEMO_DIR / "transformer.gguf"
    t = BackboneFile(src).tensors[name]
    bad = tmp_path / "bad.gguf"
    if t.type_name == "F32":
        rewrite(src, bad, patch={name: lambda b: b[-4:].view(np.float32).__setitem__(0, value)})
    else:
        rewrite(src, bad, patch={name: _set_f16(offset % t.nbytes, value)})
    f = BackboneFile(bad)
    assert not np.isfinite(f.dequantized(name)).all()  # the oracle of what the bytes mean
    assert f.nonfinite(max_bytes=4 * 144) == [name]
    with pytest.raises(ModelError, match=r"non-finite values \(NaN/Inf\) in the weights") as e:
        Ideogram4DiT.load(bad, "cpu")
    assert (e.value.path, e.value.tensor) == (str(bad), name)
    code, out, err = cli("inspect", bad, "--check")
    assert code == 2 and f"problem: tensor {name}: non-finite values (NaN/Inf)" in out, err


@pytest.mark.parametrize("typ", [t for t in STORAGE_TYPES], ids=lambda t: t.name)
def test_finite_scan_agrees_with_decoding_on_random_bytes(typ):
    """all_finite reads only the exponent bits (floats) or the f16 block scales (quantized types); on random
    bytes, where about 1 in 32 f16 fields is Inf/NaN, it must flag exactly the rows whose decode is not finite."""
    rng = np.random.default_rng(int(typ))
    n = typ.block_size if typ.is_quantized else 8  # one block per row: most rows finite, some not
    row = typ.row_bytes(n)
    raw = rng.integers(0, 256, size=(400, row), dtype=np.uint8)
    decoded = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(typ))).reshape(400, n)
    want = np.isfinite(decoded).all(axis=1)
    got = np.array([all_finite(typ, r) for r in raw])
    assert 0 < want.sum() < 400 and (got == want).all(), np.flatnonzero(got != want)
