"""Text-encoder GGUFs that would crash llama.cpp are refused in Python, with one line naming the file and the key
or tensor; so are files that load but give wrong features (a template without ``{caption}``, NaN-making rope
settings) and metadata of the wrong type.

Every case edits the demo encoder (runtime/demo_model/text_encoder.gguf, a real Qwen3-layout GGUF) in one field
(tests/_gguf_edit.py). The cases in CRASHERS were each run through llama-cpp-python 0.3.36 without our checks
(load, context, one decode) and killed the process: SIGABRT from a GGML_ASSERT (duplicate tokens, RMS eps < 0 or
NaN, non-F32 norm weights, block_count 0 or > 512, unknown rope scaling type, rope.dimension_count != head size,
expert/next-n keys on a dense model, a zero KV-head count, an I32/F64 token embedding, Qwen3-VL rope sections that
are all zero or exceed the head size, tensors not 32-byte aligned in the file), SIGSEGV (I8/I32/I64/F64 matmul weights) or SIGFPE (rope sections summing to
zero). ``test_llama_cpp_still_aborts_without_the_check`` keeps one of them honest. The refusals are
checked in-process (fast), and the load of every crasher runs once more in a child process, so a regressed
refusal fails the test instead of killing pytest.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _demo_files import VOCAB
from _gguf_edit import GGUFFile, T, V

from gguf_dit.errors import ModelError
from gguf_dit.runtime.text_encoder import _read_meta

DEMO = Path(__file__).resolve().parents[1] / "runtime" / "demo_model" / "text_encoder.gguf"
A = "qwen3"


@pytest.fixture(scope="module")
def base() -> GGUFFile:
    return GGUFFile.from_file(DEMO)


def _retype(name: str, t: T):
    """Store tensor ``name`` as type ``t`` (same element count, bytes of that type)."""

    def f(g: GGUFFile) -> None:
        x = g.tensor(name)
        n = int(np.prod(x.ne))
        x.data = bytes(n // 32 * 34) if t == T.Q8_0 else np.ones(n, dtype={T.I8: "<i1", T.I16: "<i2", T.I32: "<i4", T.I64: "<i8", T.F16: "<f2", T.BF16: "<u2", T.F64: "<f8"}[t]).tobytes()
        x.type = int(t)

    return f


def _token(i: int, value):
    return lambda g: g.kv("tokenizer.ggml.tokens").value.__setitem__(i, value)


def _dup(i: int, j: int):
    """Token i becomes a copy of token j."""
    return lambda g: _token(i, g.kv("tokenizer.ggml.tokens").value[j])(g)


def _set(key: str, t: V, value, item: V | None = None):
    return lambda g: g.set(key, t, value, item)


def _embd_rows(delta: int):
    def f(g: GGUFFile) -> None:
        x = g.tensor("token_embd.weight")
        row = len(x.data) // x.ne[1]
        rows = x.ne[1] + delta
        x.data, x.ne = (x.data * 2)[: row * rows], (x.ne[0], rows)

    return f


def _qwen3vl(sections):
    """The demo encoder as a community Qwen3-VL file (arch qwen3vl) with these M-RoPE sections."""

    def f(g: GGUFFile) -> None:
        for kv in g.kvs:
            if kv.key.startswith(f"{A}."):
                kv.key = "qwen3vl." + kv.key[len(A) + 1 :]
        g.set("general.architecture", V.STRING, "qwen3vl")
        g.set("qwen3vl.rope.dimension_sections", V.ARRAY, sections, V.INT32)

    return f


def _alignment(n: int):
    def f(g: GGUFFile) -> None:
        g.set("general.alignment", V.UINT32, n)
        g.alignment = n

    return f


# name -> (edit, what the one-line error must contain)
CRASHERS = {
    "duplicate token": (_dup(301, 300), ["tokenizer.ggml.tokens: token 301", "duplicates token 300"]),
    "duplicate of a special token": (_dup(VOCAB - 1, VOCAB - 2), [f"tokenizer.ggml.tokens: token {VOCAB - 1}", f"duplicates token {VOCAB - 2}"]),
    "empty token named like another": (lambda g: (_token(300, "")(g), _token(301, "[EMPTY_300]")(g)), ["token 301 '[EMPTY_300]' duplicates token 300"]),
    "token with a NUL byte equal to another": (lambda g: _token(301, g.kv("tokenizer.ggml.tokens").value[300] + "\0x")(g), ["token 301", "duplicates token 300"]),
    "qwen3vl sections beyond the head size": (_qwen3vl([2**30, 5, 5, 0]), ["qwen3vl.rope.dimension_sections is [1073741824, 5, 5, 0]"]),
    "qwen3vl all-zero sections": (_qwen3vl([0, 0, 0, 0]), ["qwen3vl.rope.dimension_sections is [0, 0, 0, 0]"]),
    "qwen3vl sections summing to zero": (_qwen3vl([-3, 3, 0, 0]), ["qwen3vl.rope.dimension_sections is [-3, 3, 0, 0]"]),
    "general.alignment 1 (unaligned mapped tensors)": (_alignment(1), ["is not 32-byte aligned (general.alignment 1)"]),
    "negative rms eps": (_set(f"{A}.attention.layer_norm_rms_epsilon", V.FLOAT32, -1e-6), [f"{A}.attention.layer_norm_rms_epsilon is -1e-06"]),
    "NaN rms eps": (_set(f"{A}.attention.layer_norm_rms_epsilon", V.FLOAT32, float("nan")), [f"{A}.attention.layer_norm_rms_epsilon is nan"]),
    "int32 norm weight": (_retype("blk.0.attn_norm.weight", T.I32), ["tensor blk.0.attn_norm.weight: stored as I32; norm weights and biases must be F32"]),
    "f16 norm weight": (_retype("blk.7.ffn_norm.weight", T.F16), ["tensor blk.7.ffn_norm.weight: stored as F16"]),
    "bf16 q norm": (_retype("blk.0.attn_q_norm.weight", T.BF16), ["tensor blk.0.attn_q_norm.weight: stored as BF16"]),
    "q8_0 norm weight": (_retype("blk.0.attn_norm.weight", T.Q8_0), ["tensor blk.0.attn_norm.weight: stored as Q8_0"]),
    "int16 norm weight": (_retype("blk.3.ffn_norm.weight", T.I16), ["tensor blk.3.ffn_norm.weight: stored as I16"]),
    "int32 matmul weight": (_retype("blk.0.attn_q.weight", T.I32), ["tensor blk.0.attn_q.weight: stored as I32, a type ggml's CPU backend cannot multiply"]),
    "int8 matmul weight": (_retype("blk.0.attn_q.weight", T.I8), ["tensor blk.0.attn_q.weight: stored as I8"]),
    "f64 matmul weight": (_retype("blk.0.attn_q.weight", T.F64), ["tensor blk.0.attn_q.weight: stored as F64"]),
    "int64 ffn_down": (_retype("blk.0.ffn_down.weight", T.I64), ["tensor blk.0.ffn_down.weight: stored as I64"]),
    "int32 token embedding": (_retype("token_embd.weight", T.I32), ["tensor token_embd.weight: stored as I32"]),
    "f64 token embedding": (_retype("token_embd.weight", T.F64), ["tensor token_embd.weight: stored as F64"]),
    "block_count 0": (_set(f"{A}.block_count", V.UINT32, 0), [f"{A}.block_count is 0, must be 1..512"]),
    "block_count 2^31": (_set(f"{A}.block_count", V.UINT32, 2**31), [f"{A}.block_count is 2147483648"]),
    "unknown rope scaling type": (_set(f"{A}.rope.scaling.type", V.STRING, "bogus"), [f"{A}.rope.scaling.type is 'bogus'"]),
    "rope dimension_count 0": (_set(f"{A}.rope.dimension_count", V.UINT32, 0), [f"{A}.rope.dimension_count=0"]),
    "rope dimension_count 7": (_set(f"{A}.rope.dimension_count", V.UINT32, 7), [f"{A}.rope.dimension_count=7", f"{A}.attention.key_length=16"]),
    "rope dimension_count 1000": (_set(f"{A}.rope.dimension_count", V.UINT32, 1000), [f"{A}.rope.dimension_count=1000"]),
    "expert_count on a dense model": (_set(f"{A}.expert_count", V.UINT32, 4), [f"{A}.expert_count is set"]),
    "expert_used_count alone": (_set(f"{A}.expert_used_count", V.UINT32, 2), [f"{A}.expert_used_count is set"]),
    "expert_group_count": (_set(f"{A}.expert_group_count", V.UINT32, 2), [f"{A}.expert_group_count is set"]),
    "nextn layers beyond block_count": (_set(f"{A}.nextn_predict_layers", V.UINT32, 50), [f"{A}.nextn_predict_layers is set"]),
    "a layer with zero KV heads": (_set(f"{A}.attention.head_count_kv", V.ARRAY, [1] * 35 + [0], V.UINT32), [f"{A}.attention.head_count_kv is 0 for a layer"]),
    "SentencePiece tokenizer on a BPE vocabulary": (_set("tokenizer.ggml.model", V.STRING, "llama"), ["tokenizer.ggml.model is 'llama'"]),
}

# Files llama.cpp loads (or refuses cleanly) that we refuse because they would give wrong features or because the
# value has the wrong type or range; each names its key or tensor.
REFUSED = {
    "template without {caption}": (_set("gguf_dit.text_encoder.template", V.STRING, "<|im_start|>user\nx<|im_end|>\n"), ["gguf_dit.text_encoder.template has no {caption} placeholder"]),
    "empty template": (_set("gguf_dit.text_encoder.template", V.STRING, ""), ["gguf_dit.text_encoder.template has no {caption}"]),
    "template of the wrong type": (_set("gguf_dit.text_encoder.template", V.INT32, 3), ["gguf_dit.text_encoder.template is INT32, expected STRING"]),
    "taps as a string": (_set("gguf_dit.text_encoder.taps", V.STRING, "0,3,6"), ["gguf_dit.text_encoder.taps is STRING, expected ARRAY of"]),
    "taps of floats": (_set("gguf_dit.text_encoder.taps", V.ARRAY, [0.0, 3.0], V.FLOAT32), ["gguf_dit.text_encoder.taps is ARRAY of FLOAT32"]),
    "tap beyond the last layer": (_set("gguf_dit.text_encoder.taps", V.ARRAY, [0, 3, 36], V.INT32), ["gguf_dit.text_encoder.taps is [0, 3, 36]: tap layers must increase within 0..35"]),
    "negative tap": (_set("gguf_dit.text_encoder.taps", V.ARRAY, [-1, 3], V.INT32), ["gguf_dit.text_encoder.taps is [-1, 3]"]),
    "taps not increasing": (_set("gguf_dit.text_encoder.taps", V.ARRAY, [3, 3, 6], V.INT32), ["gguf_dit.text_encoder.taps is [3, 3, 6]"]),
    "no taps": (_set("gguf_dit.text_encoder.taps", V.ARRAY, [], V.INT32), ["gguf_dit.text_encoder.taps is []"]),
    "token_type shorter than tokens": (_set("tokenizer.ggml.token_type", V.ARRAY, [1] * (VOCAB - 1), V.INT32), [f"tokenizer.ggml.token_type has {VOCAB - 1} entries for {VOCAB} tokens"]),
    "token_type longer than tokens": (_set("tokenizer.ggml.token_type", V.ARRAY, [1] * (VOCAB + 5), V.INT32), [f"tokenizer.ggml.token_type has {VOCAB + 5} entries for {VOCAB} tokens"]),
    "token_type of the wrong type": (_set("tokenizer.ggml.token_type", V.ARRAY, [1] * VOCAB, V.UINT32), ["tokenizer.ggml.token_type is ARRAY of UINT32, expected ARRAY of INT32"]),
    "scores shorter than tokens": (_set("tokenizer.ggml.scores", V.ARRAY, [0.0] * (VOCAB - 48), V.FLOAT32), [f"tokenizer.ggml.scores has {VOCAB - 48} entries for {VOCAB} tokens"]),
    "merge without a separator": (lambda g: g.kv("tokenizer.ggml.merges").value.__setitem__(5, "abc"), ["tokenizer.ggml.merges: merge 5 b'abc' is not 'left right'"]),
    "merge with a leading space": (lambda g: g.kv("tokenizer.ggml.merges").value.__setitem__(0, " ab"), ["tokenizer.ggml.merges: merge 0"]),
    "merges missing": (lambda g: g.drop("tokenizer.ggml.merges"), ["metadata key tokenizer.ggml.merges is missing"]),
    "tokens missing": (lambda g: g.drop("tokenizer.ggml.tokens"), ["metadata key tokenizer.ggml.tokens is missing"]),
    "tokens of ints": (_set("tokenizer.ggml.tokens", V.ARRAY, list(range(VOCAB)), V.INT32), ["tokenizer.ggml.tokens is ARRAY of INT32"]),
    "eos id outside the vocabulary": (_set("tokenizer.ggml.eos_token_id", V.UINT32, VOCAB), [f"tokenizer.ggml.eos_token_id is {VOCAB}, outside the {VOCAB}-token vocabulary"]),
    "pad id outside the vocabulary": (_set("tokenizer.ggml.padding_token_id", V.UINT32, 2**32 - 1), ["tokenizer.ggml.padding_token_id is 4294967295"]),
    "bos id as int32": (_set("tokenizer.ggml.bos_token_id", V.INT32, -1), ["tokenizer.ggml.bos_token_id is INT32, expected UINT32"]),
    "fewer embedding rows than tokens": (_embd_rows(-8), [f"tensor token_embd.weight: {VOCAB - 8} rows, but the vocabulary (tokenizer.ggml.tokens) has {VOCAB} tokens"]),
    "more embedding rows than tokens": (_embd_rows(8), [f"tensor token_embd.weight: {VOCAB + 8} rows"]),
    "embedding of the wrong width": (lambda g: setattr(g.tensor("token_embd.weight"), "ne", (64, 224)), ["tensor token_embd.weight: shape [224, 64], expected [n_vocab, 32]"]),
    "embedding missing": (lambda g: g.drop_tensor("token_embd.weight"), ["tensor token_embd.weight: tensor missing"]),
    "zero rms eps": (_set(f"{A}.attention.layer_norm_rms_epsilon", V.FLOAT32, 0.0), [f"{A}.attention.layer_norm_rms_epsilon is 0, must be a finite number in (0, 1)"]),
    "infinite rms eps": (_set(f"{A}.attention.layer_norm_rms_epsilon", V.FLOAT32, float("inf")), ["layer_norm_rms_epsilon is inf"]),
    "huge rms eps": (_set(f"{A}.attention.layer_norm_rms_epsilon", V.FLOAT32, 1e30), ["layer_norm_rms_epsilon is 1e+30"]),
    "rms eps as an int": (_set(f"{A}.attention.layer_norm_rms_epsilon", V.UINT32, 1), ["layer_norm_rms_epsilon is UINT32, expected FLOAT32"]),
    "rms eps missing": (lambda g: g.drop(f"{A}.attention.layer_norm_rms_epsilon"), [f"metadata key {A}.attention.layer_norm_rms_epsilon is missing"]),
    "rope base 0 (NaN features)": (_set(f"{A}.rope.freq_base", V.FLOAT32, 0.0), [f"{A}.rope.freq_base is 0"]),
    "negative rope base (NaN features)": (_set(f"{A}.rope.freq_base", V.FLOAT32, -1e4), [f"{A}.rope.freq_base is -10000"]),
    "NaN rope base": (_set(f"{A}.rope.freq_base", V.FLOAT32, float("nan")), [f"{A}.rope.freq_base is nan"]),
    "negative rope scaling factor": (_set(f"{A}.rope.scaling.factor", V.FLOAT32, -4.0), [f"{A}.rope.scaling.factor is -4, must be a finite number in [0, inf)"]),
    "NaN rope attn_factor (NaN features)": (_set(f"{A}.rope.scaling.attn_factor", V.FLOAT32, float("nan")), [f"{A}.rope.scaling.attn_factor is nan"]),
    "qwen3vl sections missing": (lambda g: (_qwen3vl([2, 3, 3, 0])(g), g.drop("qwen3vl.rope.dimension_sections")), ["metadata key qwen3vl.rope.dimension_sections is missing"]),
    "qwen3vl three sections": (_qwen3vl([2, 3, 3]), ["qwen3vl.rope.dimension_sections is [2, 3, 3]"]),
    "block_count as a string": (_set(f"{A}.block_count", V.STRING, "36"), [f"{A}.block_count is STRING, expected UINT32"]),
    "head_count 0": (_set(f"{A}.attention.head_count", V.UINT32, 0), [f"{A}.attention.head_count is 0 for a layer"]),
    "head_count per layer, too few": (_set(f"{A}.attention.head_count", V.ARRAY, [2] * 3, V.UINT32), [f"{A}.attention.head_count has 3 entries for 36 layers"]),
    "KV heads that do not divide heads": (_set(f"{A}.attention.head_count_kv", V.UINT32, 3), [f"{A}.attention.head_count_kv: 3 KV heads do not divide 2 heads"]),
    "key_length != value_length": (_set(f"{A}.attention.value_length", V.UINT32, 8), [f"{A}.attention.key_length=16, {A}.attention.value_length=8"]),
    "wrong architecture": (_set("general.architecture", V.STRING, "llama"), ["general.architecture is 'llama'"]),
    "architecture as an int": (_set("general.architecture", V.INT32, 3), ["general.architecture is INT32, expected STRING"]),
}


def _write(base: GGUFFile, edit, path: Path) -> Path:
    g = copy.deepcopy(base)
    edit(g)
    return g.write(path)


def _check_refused(path: Path, needles: list[str]) -> None:
    with pytest.raises(ModelError) as ei:
        _read_meta(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    for n in needles:
        assert n in msg, msg


@pytest.mark.parametrize("case", list(CRASHERS) + list(REFUSED))
def test_refused_in_python_with_one_line_naming_file_and_key(base, tmp_path, case):
    edit, needles = {**CRASHERS, **REFUSED}[case]
    _check_refused(_write(base, edit, tmp_path / "text_encoder.gguf"), needles)


# Edits llama.cpp 0.3.36 loads and encodes to finite features: not ours to refuse (checked in the child below).
HARMLESS = {
    "no template": lambda g: g.drop("gguf_dit.text_encoder.template"),
    "no taps": lambda g: g.drop("gguf_dit.text_encoder.taps"),
    "no token types": lambda g: g.drop("tokenizer.ggml.token_type"),
    "taps as uint32": _set("gguf_dit.text_encoder.taps", V.ARRAY, [0, 35], V.UINT32),
    "matching head sizes stated": _set(f"{A}.rope.dimension_count", V.UINT32, 16),
    "per-layer head counts": _set(f"{A}.attention.head_count", V.ARRAY, [2] * 36, V.UINT32),
    "yarn scaling": _set(f"{A}.rope.scaling.type", V.STRING, "yarn"),
    "expert_count 0": _set(f"{A}.expert_count", V.UINT32, 0),
    "F32 matmul weight": lambda g: (setattr(g.tensor("blk.0.attn_q.weight"), "data", np.ones(32 * 32, "<f4").tobytes()), setattr(g.tensor("blk.0.attn_q.weight"), "type", int(T.F32))),
    "an empty token": _token(300, ""),
    "qwen3vl": _qwen3vl([2, 3, 3, 0]),
    "general.alignment 64": _alignment(64),
}


def test_the_demo_encoder_passes():
    meta = _read_meta(DEMO)
    assert meta["taps"] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35] and meta["hidden"] == 32 and meta["n_layers"] == 36
    assert meta["template"] == "<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n"


_CHILD = """
import sys
import numpy as np
from gguf_dit.errors import ModelError
from gguf_dit.runtime.text_encoder import TextEncoder
for p in sys.argv[1:]:
    try:
        with TextEncoder.load(p, n_threads=1) as enc:
            f = enc.encode("a red circle")
        print("LOADED", p, "finite" if np.isfinite(f).all() else "NON-FINITE", flush=True)
    except ModelError as e:
        print(str(e).replace(chr(10), " "), flush=True)
"""


def _run_child(code: str, paths: list[Path]) -> subprocess.CompletedProcess:
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    return subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def child(base, tmp_path_factory):
    """TextEncoder.load and an encode on every crasher, then every harmless edit, in one child process: a
    regressed refusal shows as a signal or a LOADED line here, not as a dead pytest. Path -> output line."""
    d = tmp_path_factory.mktemp("te_files")
    cases = {**{("crash", k): v[0] for k, v in CRASHERS.items()}, **{("ok", k): v for k, v in HARMLESS.items()}}
    paths = {key: _write(base, edit, d / f"{i}.gguf") for i, (key, edit) in enumerate(cases.items())}
    r = _run_child(_CHILD, list(paths.values()))
    assert r.returncode == 0, f"child died with {r.returncode} after: {r.stdout[-1500:]} {r.stderr[-1500:]}"
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(paths), r.stdout
    return {key: (p, line) for (key, p), line in zip(paths.items(), lines)}


@pytest.mark.parametrize("case", CRASHERS)
def test_crasher_never_reaches_llama_cpp(child, case):
    p, line = child[("crash", case)]
    assert line.startswith(f"{p}: ") and all(n in line for n in CRASHERS[case][1]), line


@pytest.mark.parametrize("case", HARMLESS)
def test_harmless_edit_loads_and_encodes_finite_features(child, case):
    p, line = child[("ok", case)]
    assert line == f"LOADED {p} finite", line


def test_llama_cpp_still_aborts_without_the_check(base, tmp_path):
    """The premise: llama-cpp-python 0.3.36 aborts the process on a duplicate token. If an upgrade makes it fail
    cleanly, this fails and the crasher list above should be re-measured."""
    p = _write(base, CRASHERS["duplicate token"][0], tmp_path / "dup.gguf")
    code = _CHILD.replace("from gguf_dit.runtime.text_encoder import TextEncoder", "from gguf_dit.runtime import text_encoder as te\nte._read_meta = lambda path: {'arch': 'qwen3', 'n_layers': 36, 'hidden': 32, 'taps': None, 'template': None}\nTextEncoder = te.TextEncoder")
    r = _run_child(code, [p])
    assert r.returncode == -signal.SIGABRT, (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    assert "GGML_ASSERT(id_to_token.size() == token_to_id.size())" in r.stderr
