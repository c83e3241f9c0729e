"""The GGUF header validator (gguf_dit/gguf_header.py): a crafted file with every value type, nested arrays and
several tensor types parses exactly as gguf-py's reader (the oracle) reads it; each broken field gives one line
naming the file and the key or tensor; the demo GGUFs pass; ``open_gguf`` and the VAE loader stop a mutated
header before gguf-py or torch trusts it. Files are written byte by byte (tests/_gguf_edit.py)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from _gguf_edit import KV, GGUFFile, T, V, patch, tensor

from gguf_dit.errors import ModelError
from gguf_dit.gguf_header import read_header

DEMO = Path(__file__).resolve().parents[1] / "runtime" / "demo_model"
DEMO_FILES = ("transformer.gguf", "unconditional_transformer.gguf", "text_encoder.gguf", "vae.gguf")


def crafted() -> GGUFFile:
    kvs = [
        KV("general.architecture", V.STRING, "test"),
        KV("test.u8", V.UINT8, 200),
        KV("test.i8", V.INT8, -3),
        KV("test.u16", V.UINT16, 65000),
        KV("test.i16", V.INT16, -300),
        KV("test.u32", V.UINT32, 4_000_000_000),
        KV("test.i32", V.INT32, -70000),
        KV("test.f32", V.FLOAT32, 1.5),
        KV("test.bool", V.BOOL, True),
        KV("test.u64", V.UINT64, 2**40),
        KV("test.i64", V.INT64, -(2**40)),
        KV("test.f64", V.FLOAT64, 2.25),
        KV("test.text", V.STRING, "naïve 東京"),
        KV("test.strings", V.ARRAY, ["a", "bé", ""], V.STRING),
        KV("test.ints", V.ARRAY, [1, -2, 3], V.INT32),
        KV("test.bools", V.ARRAY, [True, False], V.BOOL),
        KV("test.empty", V.ARRAY, [], V.UINT8),
        KV("test.nested", V.ARRAY, [(V.INT32, [1, 2]), (V.STRING, ["x", "yz"])], V.ARRAY),
    ]
    tensors = [
        tensor("w.f32", (4, 32), T.F32),
        tensor("w.f16", (8,), T.F16, 1),
        tensor("w.q8_0", (2, 64), T.Q8_0, 2),
        tensor("w.q4_k", (1, 256), T.Q4_K, 3),
        tensor("w.3d", (2, 3, 32), T.F32, 4),
        tensor("w.4d", (1, 2, 1, 32), T.BF16, 5),
    ]
    return GGUFFile(kvs, tensors)


def write(tmp_path, data: bytes, name: str = "x.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def refused(path: Path, *needles: str) -> str:
    with pytest.raises(ModelError) as ei:
        read_header(path)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(path)), msg
    assert ei.value.path == str(path)
    for n in needles:
        assert n in msg, msg
    return msg


# -- valid files ------------------------------------------------------------------------------


def _same_as_gguf_py(path: Path) -> None:
    h = read_header(path)
    r = gguf.GGUFReader(str(path))
    assert h.data_offset == r.data_offset
    assert h.alignment == r.alignment
    assert list(h.tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        mine = h.tensors[t.name]
        assert mine.ne == tuple(int(x) for x in t.shape)
        assert mine.type == t.tensor_type
        assert mine.offset == t.data_offset
        assert mine.nbytes == t.n_bytes
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(h.kv) == list(fields)
    for k, f in fields.items():
        kv = h.kv[k]
        assert kv.type == f.types[0]
        if kv.type == V.ARRAY and kv.item_type == V.ARRAY:
            continue  # gguf-py's contents() does not decode nested arrays; checked by value below
        ref = f.contents()
        mine = kv.value
        if kv.item_type == V.STRING:
            mine = [x.decode("utf-8") for x in mine]
        elif isinstance(mine, np.ndarray):
            mine = mine.tolist()
        assert mine == ref, k


def test_crafted_file_reads_as_gguf_py_reads_it(tmp_path):
    p = crafted().write(tmp_path / "ok.gguf")
    _same_as_gguf_py(p)
    h = read_header(p)
    nested = h.get("test.nested")
    assert nested[0].tolist() == [1, 2] and nested[1] == [b"x", b"yz"]
    assert h.kv["test.ints"].value.dtype == np.int32 and h.kv["test.bools"].value.dtype == bool
    assert h.get("test.text") == "naïve 東京" and h.get("test.u32") == 4_000_000_000
    assert h.tensors["w.4d"].shape == (1, 2, 1, 32) and h.tensors["w.q4_k"].nbytes == 144


def test_custom_alignment_is_honoured(tmp_path):
    g = crafted()
    g.kvs.append(KV("general.alignment", V.UINT32, 64))
    g.alignment = 64
    p = g.write(tmp_path / "a64.gguf")
    _same_as_gguf_py(p)
    h = read_header(p)
    assert h.alignment == 64 and h.data_offset % 64 == 0 and all(t.offset % 64 == 0 for t in h.tensors.values())


def test_arrays_and_strings_crossing_the_read_buffer(tmp_path):
    """A 150k-token vocabulary (the size of Qwen's) and a 3 MB string, beyond the 1 MB read window."""
    tokens = [f"t{i}" + "é" * (i % 7) for i in range(151_669)]
    g = GGUFFile(
        [KV("tokenizer.ggml.tokens", V.ARRAY, tokens, V.STRING), KV("big", V.STRING, "x" * 3_000_001), KV("types", V.ARRAY, np.arange(151_669) % 7, V.INT32)],
        [tensor("w", (2, 32))],
    )
    p = g.write(tmp_path / "vocab.gguf")
    h = read_header(p)
    assert h.get("tokenizer.ggml.tokens") == [t.encode() for t in tokens]
    assert len(h.get("big")) == 3_000_001
    np.testing.assert_array_equal(h.get("types"), np.arange(151_669) % 7)
    assert h.tensors["w"].offset == sum(g.layout()[0:1]) and h.tensors["w"].nbytes == 256


@pytest.mark.parametrize("name", DEMO_FILES)
def test_demo_files_pass_and_match_gguf_py(name):
    _same_as_gguf_py(DEMO / name)


def test_open_gguf_validates_first_and_keeps_the_header(tmp_path):
    from gguf_dit.runtime.gguf_file import GGUFFile as open_gguf

    r = open_gguf(DEMO / "vae.gguf")
    assert r.header.get("general.architecture") == "flux2_vae"
    g = GGUFFile.from_file(DEMO / "vae.gguf")
    data = patch(g.to_bytes(), g.value_offset("flux2_vae.latent_shift") + 4, "<Q", 2**61)
    p = write(tmp_path, data, "vae.gguf")
    with pytest.raises(ModelError, match="flux2_vae.latent_shift.*claims 2305843009213693952 elements"):
        open_gguf(p)


# -- broken files: one line naming the file and the key or tensor --------------------------


def _b(g: GGUFFile | None = None) -> GGUFFile:
    return copy.deepcopy(g or crafted())


def _kv_patch(key: str, delta: int, fmt: str, value):
    return lambda g: patch(g.to_bytes(), g.value_offset(key) + delta, fmt, value)


def _kv_key_patch(key: str, fmt: str, value):
    return lambda g: patch(g.to_bytes(), g.kv_offset(key), fmt, value)


def _ti_patch(name: str, field: str, fmt: str, value):
    def f(g):
        t = g.tensor(name)
        n = len(t.name)
        at = {"name_len": 0, "n_dims": 8 + n, "ne0": 12 + n, "type": 12 + n + 8 * len(t.ne), "offset": 16 + n + 8 * len(t.ne)}[field]
        return patch(g.to_bytes(), g.tensor_info_offset(name) + at, fmt, value)

    return f


def _edit(fn):
    def f(g):
        fn(g)
        return g.to_bytes()

    return f


def _set(attr, value):
    return _edit(lambda g: setattr(g, attr, value))


def _truncate_inside(name: str, keep: int):
    def f(g):
        start, offsets = g.layout()
        i = [t.name for t in g.tensors].index(name)
        return g.to_bytes()[: start + offsets[i] + keep]

    return f


BROKEN = {
    # header
    "magic": (_set("magic", b"GGML"), ["not a GGUF file", "b'GGML'"]),
    "version 1": (_set("version", 1), ["GGUF version 1 is not supported"]),
    "version 4": (_set("version", 4), ["GGUF version 4"]),
    "big-endian": (_set("version", 0x03000000), ["big-endian"]),
    "kv_count huge": (_set("n_kv", 2**62), ["kv_count 4611686018427387904"]),
    "tensor_count huge": (_set("n_tensors", 2**40), ["tensor_count 1099511627776"]),
    "kv_count one too many": (_set("n_kv", 19), ["tensor name #0 has length"]),
    # keys
    "key length huge": (_kv_key_patch("test.u8", "<Q", 2**63), ["key #1 has length 9223372036854775808"]),
    "key length past the key limit": (_kv_key_patch("test.u8", "<Q", 70_000), ["key #1 has length 70000"]),
    "key not utf-8": (_edit(lambda g: setattr(g.kv("test.u8"), "key", b"test.\xff\xfe")), ["key #1 is not valid UTF-8"]),
    "empty key": (_edit(lambda g: setattr(g.kv("test.u8"), "key", "")), ["key #1 is empty"]),
    "duplicate key": (_edit(lambda g: g.kvs.append(KV("test.i8", V.INT8, 1))), ["duplicate metadata key 'test.i8'"]),
    # values
    "value type id": (_kv_patch("test.u8", -4, "<I", 13), ["'test.u8' has unknown GGUF value type id 13"]),
    "value type id huge": (_kv_patch("test.u8", -4, "<I", 2**32 - 1), ["'test.u8' has unknown GGUF value type id 4294967295"]),
    "string length huge": (_kv_patch("test.text", 0, "<Q", 2**40), ["'test.text' has length 1099511627776"]),
    "string not utf-8": (_edit(lambda g: g.set("test.text", V.STRING, b"\xc3\x28")), ["'test.text' is not valid UTF-8"]),
    "bool not 0/1": (_kv_patch("test.bool", 0, "<B", 2), ["'test.bool' is a bool stored as 2"]),
    "bool array not 0/1": (_kv_patch("test.bools", 12, "<B", 7), ["'test.bools' holds a bool stored as 7"]),
    "array item type id": (_kv_patch("test.ints", 0, "<I", 99), ["elements of metadata key 'test.ints' has unknown GGUF value type id 99"]),
    "array length huge": (_kv_patch("test.ints", 4, "<Q", 2**61), ["'test.ints' claims 2305843009213693952 elements of type INT32"]),
    "array length past the end": (_kv_patch("test.ints", 4, "<Q", 10**6), ["'test.ints' claims 1000000 elements"]),
    "string array length huge": (_kv_patch("test.strings", 4, "<Q", 2**60), ["'test.strings' claims 1152921504606846976 elements of type STRING"]),
    "string array element length": (_kv_patch("test.strings", 12, "<Q", 2**50), ["'test.strings'[0] has length 1125899906842624"]),
    "nested array inner length": (_kv_patch("test.nested", 16, "<Q", 2**59), ["'test.nested'[0] claims 576460752303423488 elements"]),
    "nested array inner item type": (_kv_patch("test.nested", 12, "<I", 77), ["elements of metadata key 'test.nested'[0] has unknown GGUF value type id 77"]),
    "nested too deep": (
        _edit(lambda g: g.set("test.nested", V.ARRAY, [(V.ARRAY, [(V.ARRAY, [(V.ARRAY, [(V.ARRAY, [(V.ARRAY, [(V.ARRAY, [(V.ARRAY, [(V.ARRAY, [(V.INT8, [1])])])])])])])])])], V.ARRAY)),
        ["'test.nested'[0][0][0][0][0][0][0][0] nests arrays more than 8 deep"],
    ),
    # alignment
    "alignment type": (_edit(lambda g: g.kvs.append(KV("general.alignment", V.UINT64, 32))), ["'general.alignment' has type UINT64, must be UINT32"]),
    "alignment zero": (_edit(lambda g: g.kvs.append(KV("general.alignment", V.UINT32, 0))), ["'general.alignment' is 0, not a power of two"]),
    "alignment 48": (_edit(lambda g: g.kvs.append(KV("general.alignment", V.UINT32, 48))), ["'general.alignment' is 48, not a power of two"]),
    # tensor infos
    "name too long": (_edit(lambda g: setattr(g.tensor("w.f16"), "name", "n" * 64)), ["tensor name #1 has length 64, more than the limit of 63 bytes"]),
    "name not utf-8": (_edit(lambda g: setattr(g.tensor("w.f16"), "name", b"w.\xff")), ["tensor name #1 is not valid UTF-8"]),
    "empty name": (_edit(lambda g: setattr(g.tensor("w.f16"), "name", "")), ["tensor name #1 is empty"]),
    "duplicate tensor": (_edit(lambda g: setattr(g.tensor("w.f16"), "name", "w.f32")), ["tensor w.f32: duplicate tensor name"]),
    "name length huge": (_ti_patch("w.f16", "name_len", "<Q", 2**62), ["tensor name #1 has length 4611686018427387904"]),
    "n_dims 0": (_ti_patch("w.q8_0", "n_dims", "<I", 0), ["tensor w.q8_0: n_dims is 0, must be 1..4"]),
    "n_dims 5": (_ti_patch("w.q8_0", "n_dims", "<I", 5), ["tensor w.q8_0: n_dims is 5"]),
    "n_dims huge": (_ti_patch("w.q8_0", "n_dims", "<I", 2**31), ["tensor w.q8_0: n_dims is 2147483648"]),
    "ne zero": (_ti_patch("w.f32", "ne0", "<Q", 0), ["tensor w.f32: dimension 0 in ne=[0, 4]"]),
    "ne negative as int64": (_ti_patch("w.f32", "ne0", "<q", -32), ["tensor w.f32: dimension 18446744073709551584"]),
    "element count overflow": (_edit(lambda g: setattr(g.tensor("w.3d"), "ne", (2**31, 2**31, 4))), ["tensor w.3d: ne=[2147483648, 2147483648, 4] has more than 2^63-1 elements"]),
    "unknown ggml type": (_ti_patch("w.f32", "type", "<I", 1000), ["tensor w.f32: unknown ggml type id 1000"]),
    "removed ggml type": (_ti_patch("w.f32", "type", "<I", 4), ["tensor w.f32: unknown ggml type id 4"]),
    "row not a block multiple": (_edit(lambda g: setattr(g.tensor("w.q8_0"), "ne", (48, 2))), ["tensor w.q8_0: type Q8_0 needs rows that are a multiple of 32, but ne[0] is 48"]),
    "K-quant row": (_edit(lambda g: setattr(g.tensor("w.q4_k"), "ne", (128, 2))), ["tensor w.q4_k: type Q4_K needs rows that are a multiple of 256"]),
    "offset misaligned": (_ti_patch("w.f16", "offset", "<Q", 520), ["tensor w.f16: data offset 520 is not a multiple of the alignment 32"]),
    # data ranges
    "truncated in the last tensor": (_truncate_inside("w.4d", 10), ["tensor w.4d: file is truncated"]),
    "truncated in the middle": (_truncate_inside("w.q8_0", 3), ["tensor w.q8_0: file is truncated"]),
    "truncated before the counts allow": (lambda g: g.to_bytes()[: g.value_offset("test.u64") + 3], ["kv_count 18 is more than the 245 bytes after the header can hold"]),
    "truncated in an array header": (lambda g: g.to_bytes()[: g.value_offset("test.nested") + 3], ["truncated header: file ends inside the array header of metadata key 'test.nested'"]),
    "truncated in a string array": (lambda g: g.to_bytes()[: g.value_offset("test.strings") + 19], ["'test.strings' claims 3 elements of type STRING, more than the 7 bytes left"]),
    "truncated in the final padding": (lambda g: (g.tensors.append(tensor("w.tail", (3,))), g.to_bytes()[:-1])[1], ["tensor w.tail: file is truncated: it ends at byte", "inside the padding after the last tensor"]),
    "offset past the end": (_ti_patch("w.f16", "offset", "<Q", 2**40), ["tensor w.f16: file is truncated"]),
    "overlapping tensors": (_ti_patch("w.f16", "offset", "<Q", 0), ["tensor w.f32: data overlaps tensor 'w.f16'"]),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_field_is_one_line_naming_file_and_key_or_tensor(tmp_path, case):
    make, needles = BROKEN[case]
    p = write(tmp_path, make(_b()))
    refused(p, *needles)


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    refused(fifo, "is a FIFO, not a regular file")
    refused(tmp_path, "is a folder, not a regular file")
    refused(tmp_path / "missing.gguf", "does not exist")
    refused(write(tmp_path, b"GGUF\x03\x00"), "shorter than a GGUF header")


def test_each_truncation_point_of_a_real_file_is_a_model_error(tmp_path):
    """Every prefix of the demo VAE's header and a sample of its data: one line, never another exception."""
    data = (DEMO / "vae.gguf").read_bytes()
    h = read_header(DEMO / "vae.gguf")
    p = tmp_path / "cut.gguf"
    cuts = list(range(0, h.data_offset, 53)) + list(range(h.data_offset, len(data) - 20, 8191))
    for n in cuts:
        p.write_bytes(data[:n])
        with pytest.raises(ModelError) as ei:
            read_header(p)
        assert "\n" not in str(ei.value) and str(ei.value).startswith(str(p))


def test_vae_with_mutated_array_length_is_refused_in_a_subprocess(tmp_path):
    """The fuzzer's native crash: `run` reading a vae.gguf whose header array length was mutated (SIGSEGV).
    Loaded in a child process so a regression fails this test instead of killing pytest."""
    g = GGUFFile.from_file(DEMO / "vae.gguf")
    cases = {
        "latent_scale": patch(g.to_bytes(), g.value_offset("flux2_vae.latent_scale") + 4, "<Q", 129),
        "block_out_channels": patch(g.to_bytes(), g.value_offset("flux2_vae.block_out_channels") + 4, "<Q", 2**33),
        "latent_shift": patch(g.to_bytes(), g.value_offset("flux2_vae.latent_shift") + 4, "<Q", 127),
        "checkpoint_bn_var": patch(g.to_bytes(), g.value_offset("flux2_vae.checkpoint_bn_var") + 4, "<Q", 2**31),
    }
    paths = [write(tmp_path, data, f"{name}.gguf") for name, data in cases.items()]
    code = (
        "import sys\nfrom gguf_dit.errors import ModelError\nfrom gguf_dit.runtime.vae import VAEDecoder\n"
        "for p in sys.argv[1:]:\n    try:\n        VAEDecoder.load(p)\n        print('loaded', p)\n"
        "    except ModelError as e:\n        print(e, flush=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(paths)
    for p, line in zip(paths, lines):
        assert line.startswith(f"{p}: "), line


# -- the VAE loader: metadata and tensors checked against the config before torch sees them ---


def _vae_tensor(name: str, **changes):
    def f(g):
        t = g.tensor(name)
        for k, v in changes.items():
            setattr(t, k, v)

    return f


VAE_BROKEN = {
    "out_channels as an array": (lambda g: g.set("flux2_vae.out_channels", V.ARRAY, [3, 3], V.INT32), "metadata key flux2_vae.out_channels is ARRAY of INT32, expected an integer"),
    "block_out_channels as a string": (lambda g: g.set("flux2_vae.block_out_channels", V.STRING, "8,16"), "flux2_vae.block_out_channels is STRING, expected ARRAY of integers"),
    "block_out_channels of floats": (lambda g: g.set("flux2_vae.block_out_channels", V.ARRAY, [8.0, 16.0], V.FLOAT32), "flux2_vae.block_out_channels is ARRAY of FLOAT32"),
    "a billion layers per block": (lambda g: g.set("flux2_vae.layers_per_block", V.UINT32, 10**9), "need more tensors than the file's 108"),
    "attention flag as an int": (lambda g: g.set("flux2_vae.mid_block_add_attention", V.UINT32, 1), "flux2_vae.mid_block_add_attention is UINT32, expected BOOL"),
    "NaN batch-norm eps": (lambda g: g.set("flux2_vae.batch_norm_eps", V.FLOAT32, float("nan")), "flux2_vae.batch_norm_eps is nan"),
    "negative batch-norm eps": (lambda g: g.set("flux2_vae.batch_norm_eps", V.FLOAT32, -1.0), "flux2_vae.batch_norm_eps is -1"),
    "NaN norm_eps": (lambda g: g.set("flux2_vae.norm_eps", V.FLOAT32, float("nan")), "bad VAE config: flux2_vae.norm_eps is nan, but the decoder's GroupNorm eps is 1e-06"),
    "norm_eps 1e-5": (lambda g: g.set("flux2_vae.norm_eps", V.FLOAT32, 1e-5), "flux2_vae.norm_eps is 1e-05"),
    "scale_factor 16": (lambda g: g.set("flux2_vae.scale_factor", V.UINT32, 16), "flux2_vae.scale_factor is 16, but 4 levels scale by 8"),
    "latent_channels missing": (lambda g: g.drop("flux2_vae.latent_channels"), "metadata key flux2_vae.latent_channels is missing"),
    "latent_shift of strings": (lambda g: g.set("flux2_vae.latent_shift", V.ARRAY, ["0"] * 128, V.STRING), "flux2_vae.latent_shift is ARRAY of STRING"),
    "latent_scale too short": (lambda g: g.set("flux2_vae.latent_scale", V.ARRAY, [1.0] * 127, V.FLOAT32), "flux2_vae.latent_scale must be 128 finite floats, got 127"),
    "NaN latent_shift": (lambda g: g.set("flux2_vae.latent_shift", V.ARRAY, [float("nan")] + [0.0] * 127, V.FLOAT32), "flux2_vae.latent_shift must be 128 finite floats, got 128 (127 finite)"),
    "architecture as an int": (lambda g: g.set("general.architecture", V.UINT32, 1), "general.architecture is UINT32, expected STRING"),
    "Q8_0 bias": (_vae_tensor("decoder.conv_in.bias", type=int(T.Q8_0), data=bytes(34)), "tensor decoder.conv_in.bias: tensor type Q8_0 unsupported"),
    "transposed 1x1 conv": (_vae_tensor("post_quant_conv.weight", ne=(32, 32, 1, 1)), "tensor post_quant_conv.weight: shape [1, 1, 32, 32], expected [32, 32, 1, 1]"),
    "missing tensor": (lambda g: g.drop_tensor("decoder.conv_out.bias"), "tensor decoder.conv_out.bias: tensor missing"),
    "NaN weights": (_vae_tensor("decoder.conv_out.bias", data=np.full(3, np.nan, "<f4").tobytes()), "tensor decoder.conv_out.bias: 3 non-finite values"),
}


@pytest.mark.parametrize("case", VAE_BROKEN)
def test_vae_metadata_and_tensors_are_checked_before_use(tmp_path, case):
    from gguf_dit.runtime.vae import VAEDecoder

    edit, needle = VAE_BROKEN[case]
    g = GGUFFile.from_file(DEMO / "vae.gguf")
    edit(g)
    p = g.write(tmp_path / "vae.gguf")
    with pytest.raises(ModelError) as ei:
        VAEDecoder.load(p)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{p}: ") and needle in msg, msg


def test_vae_negative_checkpoint_variance_is_refused(tmp_path):
    from gguf_dit.runtime.vae import VAEDecoder

    g = GGUFFile.from_file(DEMO / "vae.gguf").set("flux2_vae.checkpoint_bn_var", V.ARRAY, [-1.0] + [1.0] * 127, V.FLOAT32)
    p = g.write(tmp_path / "vae.gguf")
    VAEDecoder.load(p)  # the official constants do not use it
    with pytest.raises(ModelError, match="flux2_vae.checkpoint_bn_var holds a negative variance"):
        VAEDecoder.load(p, latent_norm="checkpoint")
