"""A text-encoder GGUF checked before llama.cpp sees it.

llama.cpp's loader is native: on some files it aborts the process (GGML_ASSERT) or segfaults instead of
failing the load, and some values load but make every feature NaN. Everything below was reproduced on
llama-cpp-python 0.3.36 with the demo encoder (tests/test_text_encoder_files.py lists each case); what
llama.cpp refuses cleanly by itself (missing tensors, wrong shapes) is left to it, with its reason.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf import TENSOR_NAMES, GGMLQuantizationType, Keys, MODEL_TENSOR

from gguf_dit import keys
from gguf_dit.arch.text_encoder import ACCEPTED_ARCHES
from gguf_dit.errors import ModelError
from gguf_dit.gguf_header import INTEGER_TYPES, read_header

from .llama import log

TOKEN_EMBD = TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"
ROPE_FREQS = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"

LLAMA_MAX_LAYERS = 512  # llama-hparams.h
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama.cpp's LLAMA_ROPE_SCALING_TYPES
GGML_TYPE_COUNT = 43  # of the ggml that ggml_ops pins (0.25.3); its type-trait tables are not bounds-checked
TENSOR_ALIGNMENT = 32  # ggml asserts it for the memory-mapped tensors llama.cpp computes on
_DENSE_ONLY = ("EXPERT_COUNT", "EXPERT_USED_COUNT", "EXPERT_GROUP_COUNT", "EXPERT_GROUP_USED_COUNT", "NEXTN_PREDICT_LAYERS")


def _per_layer(h, key: str, n_layers: int, *, required: bool = False) -> list[int] | None:
    """A per-layer count stored as one UINT32 or an array with one entry per layer (llama.cpp's get_key_or_arr)."""
    v = h.value(key, ("UINT32", "ARRAY"), item=("UINT32", "INT32"), required=required)
    if v is None:
        return None
    vals = [int(x) for x in v] if isinstance(v, np.ndarray) else [int(v)] * n_layers
    if len(vals) != n_layers:
        raise ModelError(f"metadata key {key} has {len(vals)} entries for {n_layers} layers", path=h.path)
    if min(vals) < 1:
        raise ModelError(f"metadata key {key} is {min(vals)} for a layer, must be at least 1", path=h.path)
    return vals


@functools.lru_cache(maxsize=1)
def _cpu_weight_types() -> frozenset[int]:
    """ggml types the CPU backend can multiply and look rows up in: those with a vec_dot kernel in ggml's
    CPU type traits. Others (I8…I64, F64, Q8_K, Q8_1) make llama.cpp abort or segfault at the first decode."""
    from gguf_dit.ggml_ops._lib import lib

    class Traits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
        _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]

    get = lib.cpu.ggml_get_type_traits_cpu
    get.restype, get.argtypes = ctypes.POINTER(Traits), [ctypes.c_int]
    return frozenset(int(t) for t in GGMLQuantizationType if int(t) < GGML_TYPE_COUNT and get(int(t)).contents.vec_dot)


def _check_tokenizer(h, n_vocab_rows: int) -> None:
    K, path = Keys.Tokenizer, h.path
    model = h.value(K.MODEL, ("STRING",), required=True)
    if model != "gpt2":
        raise ModelError(f"{K.MODEL} is {model!r}, expected the gpt2 (byte-level BPE) tokenizer of Qwen", path=path)
    tokens = h.value(K.LIST, ("ARRAY",), item=("STRING",), required=True)
    n = len(tokens)
    if n == 0:
        raise ModelError(f"metadata key {K.LIST} is empty", path=path)
    # llama.cpp reads each token as a C string (up to a NUL), renames empty ones "[EMPTY_<id>]", then
    # asserts that no two are equal.
    named = [t.split(b"\0", 1)[0] or f"[EMPTY_{i}]".encode() for i, t in enumerate(tokens)]
    if len(set(named)) != n:
        first: dict[bytes, int] = {}
        for i, t in enumerate(named):
            if t in first:
                raise ModelError(f"metadata key {K.LIST}: token {i} {t.decode('utf-8', 'replace')!r} duplicates token {first[t]}", path=path)
            first[t] = i
    for key, item in ((K.TOKEN_TYPE, ("INT32",)), (K.SCORES, ("FLOAT32", "INT32"))):
        v = h.value(key, ("ARRAY",), item=item)
        if v is not None and len(v) != n:
            raise ModelError(f"metadata key {key} has {len(v)} entries for {n} tokens", path=path)
    merges = h.value(K.MERGES, ("ARRAY",), item=("STRING",), required=True)
    bad = next((i for i, m in enumerate(merges) if m.find(b" ", 1) < 1), None)
    if bad is not None:
        raise ModelError(f"metadata key {K.MERGES}: merge {bad} {merges[bad][:40]!r} is not 'left right'", path=path)
    for name, key in vars(K).items():
        if name.endswith("_ID"):
            v = h.value(key, ("UINT32",))
            if v is not None and v >= n:
                raise ModelError(f"metadata key {key} is {v}, outside the {n}-token vocabulary", path=path)
    if n_vocab_rows != n:
        raise ModelError(f"{n_vocab_rows} rows, but the vocabulary ({K.LIST}) has {n} tokens", path=path, tensor=TOKEN_EMBD)


def _check_tensors(h, hidden: int) -> int:
    """Alignment and types llama.cpp cannot compute with, which it loads anyway and then dies on; the
    embedding's width. Returns the embedding's row count."""
    ok = _cpu_weight_types()
    for t in h.tensors.values():
        if t.offset % TENSOR_ALIGNMENT:
            raise ModelError(f"data at byte {t.offset} is not {TENSOR_ALIGNMENT}-byte aligned ({keys.ALIGNMENT} {h.alignment}); llama.cpp maps the file and ggml needs aligned tensors", path=h.path, tensor=t.name)
        if t.name.endswith((".bias", "_norm.weight")) or t.name == ROPE_FREQS:
            if t.type.name != "F32":
                raise ModelError(f"stored as {t.type.name}; norm weights and biases must be F32", path=h.path, tensor=t.name)
        elif int(t.type) not in ok:
            raise ModelError(f"stored as {t.type.name}, a type ggml's CPU backend cannot multiply", path=h.path, tensor=t.name)
    emb = h.tensors.get(TOKEN_EMBD)
    if emb is None:
        raise ModelError("tensor missing", path=h.path, tensor=TOKEN_EMBD)
    if len(emb.ne) != 2 or emb.ne[0] != hidden:
        raise ModelError(f"shape {list(emb.shape)}, expected [n_vocab, {hidden}]", path=h.path, tensor=TOKEN_EMBD)
    return emb.ne[1]


def read_meta(path: Path) -> dict:
    """The encoder's metadata, after refusing in Python every file llama.cpp would crash on."""
    h = read_header(path)
    arch = h.value(keys.ARCHITECTURE, ("STRING",), required=True)
    if arch not in ACCEPTED_ARCHES:
        raise ModelError(
            f"{keys.ARCHITECTURE} is {arch!r}; a text encoder must be a Qwen3-VL language model (arch {' or '.join(ACCEPTED_ARCHES)})",
            path=path,
        )
    L, A, R = (lambda k, a=arch: k.format(arch=a)), Keys.Attention, Keys.Rope
    n_layers = h.value(L(Keys.LLM.BLOCK_COUNT), ("UINT32",), required=True)
    if not 1 <= n_layers <= LLAMA_MAX_LAYERS:
        raise ModelError(f"metadata key {L(Keys.LLM.BLOCK_COUNT)} is {n_layers}, must be 1..{LLAMA_MAX_LAYERS}", path=path)
    hidden = h.value(L(Keys.LLM.EMBEDDING_LENGTH), ("UINT32",), required=True)
    if hidden < 1:
        raise ModelError(f"metadata key {L(Keys.LLM.EMBEDDING_LENGTH)} is 0", path=path)
    for name in _DENSE_ONLY:  # llama.cpp asserts on expert/next-n settings that do not add up; Qwen3 has none
        key = L(getattr(Keys.LLM, name))
        v = h.value(key, ("UINT32", "ARRAY"), item=("UINT32", "INT32"))
        if v is not None and np.any(np.asarray(v) != 0):
            raise ModelError(f"metadata key {key} is set, but a Qwen3 text encoder is a dense model", path=path)
    _per_layer(h, L(Keys.LLM.FEED_FORWARD_LENGTH), n_layers)
    heads = _per_layer(h, L(A.HEAD_COUNT), n_layers, required=True)
    kv_heads = _per_layer(h, L(A.HEAD_COUNT_KV), n_layers) or heads
    for il, (nh, nkv) in enumerate(zip(heads, kv_heads)):
        if nh % nkv:
            raise ModelError(f"metadata key {L(A.HEAD_COUNT_KV)}: {nkv} KV heads do not divide {nh} heads (layer {il})", path=path)
    head_dim = {}
    for key in (L(A.KEY_LENGTH), L(A.VALUE_LENGTH), L(R.DIMENSION_COUNT)):
        v = h.value(key, ("UINT32",))
        head_dim[key] = hidden // heads[0] if v is None else v
    if len(set(head_dim.values())) != 1 or min(head_dim.values()) < 1:  # the qwen3 graph asserts k == v == n_rot
        raise ModelError("head sizes differ: " + ", ".join(f"{k}={v}" for k, v in head_dim.items()) + " (must be equal and positive)", path=path)
    h.number(L(A.LAYERNORM_RMS_EPS), ("FLOAT32",), hi=1.0, required=True)
    h.number(L(R.FREQ_BASE), ("FLOAT32",))
    h.number(L(R.SCALING_FACTOR), ("FLOAT32",), lo_open=False)
    h.number(L(R.SCALING_ATTN_FACTOR), ("FLOAT32",))
    if arch == "qwen3vl":  # ggml's interleaved M-RoPE asserts 0 < sum(sections) <= head size (and divides by it)
        key = L(R.DIMENSION_SECTIONS)
        sections = [int(x) for x in h.value(key, ("ARRAY",), item=("INT32", "UINT32"), required=True)]
        if len(sections) != 4 or min(sections) < 0 or not any(sections[:3]) or sum(sections) > head_dim[L(A.KEY_LENGTH)]:
            raise ModelError(f"metadata key {key} is {sections}: 4 non-negative sizes, not all zero, summing to at most the head size {head_dim[L(A.KEY_LENGTH)]}", path=path)
    scaling = h.value(L(R.SCALING_TYPE), ("STRING",))
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise ModelError(f"metadata key {L(R.SCALING_TYPE)} is {scaling!r}, not one of {', '.join(ROPE_SCALING_TYPES)}", path=path)
    _check_tokenizer(h, _check_tensors(h, hidden))
    pre = h.get(Keys.Tokenizer.PRE)
    if pre != "qwen2":
        log.warning("%s: %s is %r, not qwen2; token ids may differ from Qwen's tokenizer", path, Keys.Tokenizer.PRE, pre)

    taps = h.value(keys.TE_TAPS, ("ARRAY",), item=INTEGER_TYPES)
    if taps is not None:
        taps = [int(x) for x in taps]
        if not taps or taps[0] < 0 or taps[-1] >= n_layers or any(b <= a for a, b in zip(taps, taps[1:])):
            raise ModelError(f"metadata key {keys.TE_TAPS} is {taps}: tap layers must increase within 0..{n_layers - 1}", path=path)
    template = h.value(keys.TE_TEMPLATE, ("STRING",))
    if template is not None and "{caption}" not in template:
        raise ModelError(f"metadata key {keys.TE_TEMPLATE} has no {{caption}} placeholder: every prompt would encode the same", path=path)
    return {"arch": arch, "n_layers": n_layers, "hidden": hidden, "taps": taps, "template": template}
