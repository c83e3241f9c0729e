"""Caption -> Ideogram 4 text features, with Qwen3-VL's language model run by llama.cpp.

The caption is wrapped in the chat template (one user message, generation prompt, no system
prompt, no ``<think>`` block), tokenized by llama.cpp without BOS and with special tokens parsed,
and run through the decoder once. The outputs of 13 decoder layers (0, 3, …, 33, 35 of 36; raw
residual stream, no final norm) are stacked on a new last axis and flattened, so feature
``f = d·13 + j`` holds hidden channel ``d`` of tap ``j`` (docs/ideogram4-model.md §11).

llama.cpp exposes only the final (normed) hidden state, so the taps are read while the graph runs:
``llama_context_params.cb_eval`` is a ggml scheduler callback that is asked about every graph node
(``ask = true``) and, for the nodes it claims, called again once the node is computed
(``ask = false``). We claim the nodes named ``l_out-<il>`` for the tap layers and copy them out
with ``ggml_backend_tensor_get``. After the last tap we return false, which ends the graph split:
the final norm and the lm_head are never computed. The KV cache is F32 and flash attention off
(F16 KV costs ~1e-3 absolute error; docs/gguf-and-ggml.md §10); every token is an output.

Accepts our GGUFs (arch ``qwen3``, written by ``converter/text_encoder.py``) and community
Qwen3-VL GGUFs (arch ``qwen3vl``; with text-only input MRoPE equals 1-D RoPE).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import unicodedata
from pathlib import Path

import numpy as np

from gguf_dit.errors import InputError, ModelError

from . import interrupt, native_log
from gguf_dit.arch.text_encoder import ACCEPTED_ARCHES, MAX_TOKENS, TEMPLATE, default_taps
from gguf_dit import keys

from .caption import MAX_CAPTION_CHARS

GGML_TYPE_F32 = 0
_CTX_STEP = 256  # contexts are sized in steps of this many tokens (llama.cpp pads n_ctx to 256)

log = logging.getLogger("gguf_dit.llama")


# -- llama_cpp plumbing --------------------------------------------------------------------

_setup_lock = threading.Lock()
_llama = None


def _llama_cpp():
    """Import llama_cpp once, route llama.cpp's log into Python logging, and check that it shares
    ggml with gguf_dit.ggml_ops (one libggml-base mapped, so a tensor pointer means the same to both)."""
    global _llama, _llama_log_cb, _LOAD_PROGRESS
    from gguf_dit.ggml_ops.system import check_cpu

    check_cpu()  # llama.cpp runs the same -march=native CPU backend
    with _setup_lock:
        if _llama is not None:
            return _llama
        from gguf_dit.ggml_ops import _lib as glib

        try:
            import llama_cpp
        except Exception as e:  # pragma: no cover - llama-cpp-python is a hard dependency
            raise ModelError(f"llama-cpp-python is not importable ({e}); install llama-cpp-python==0.3.36") from None
        _llama_log_cb = _llama_log_cb or _llama_logger()  # kept referenced: llama.cpp holds the pointer
        _LOAD_PROGRESS = llama_cpp.llama_progress_callback(_load_progress)
        llama_cpp.llama_log_set(_llama_log_cb, None)
        # llama_log_set also replaces ggml's log callback; give ggml's back to gguf_dit.ggml_ops.
        glib.lib.ggml_log_set(glib._log_cb, None)
        _check_shared_ggml(glib)
        llama_cpp.llama_backend_init()
        _llama = llama_cpp
        return _llama


def llama_system_info() -> str:
    """llama.cpp's own one-line system info (the features its CPU backend was built with)."""
    return _llama_cpp().llama_print_system_info().decode(errors="replace").strip()


def _load_progress(_progress, _data) -> bool:
    return not interrupt.requested()


_LOAD_PROGRESS = None


def _llama_logger():
    from gguf_dit.ggml_ops._lib import LOG_CALLBACK, LineLogger

    return LOG_CALLBACK(LineLogger(log, logging.DEBUG))


_llama_log_cb = None


def _check_shared_ggml(glib) -> None:
    """Both sides must use one libggml-base: ggml_ops reads tensors llama.cpp created."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # pragma: no cover - not Linux
        return
    paths = {line.split()[-1] for line in maps.splitlines() if "libggml-base" in line and "/" in line}
    if len(paths) > 1:
        raise ModelError(f"two copies of libggml-base are loaded ({', '.join(sorted(paths))}); llama.cpp and gguf_dit.ggml_ops must share one")


# -- metadata and file checks ----------------------------------------------------------------
# llama.cpp's loader is native: on some files it aborts the process (GGML_ASSERT) or segfaults instead of
# failing the load, and some values load but make every feature NaN. Everything below was reproduced on
# llama-cpp-python 0.3.36 with the demo encoder (tests/test_text_encoder_files.py lists each case); what
# llama.cpp refuses cleanly by itself (missing tensors, wrong shapes) is left to it, with its reason.

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


def _float(h, key: str, lo: float, hi: float, *, required: bool = False, lo_open: bool = True) -> float | None:
    v = h.value(key, ("FLOAT32",), required=required)
    if v is not None and not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and v < hi):
        raise ModelError(f"metadata key {key} is {v:.7g}, must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g})", path=h.path)
    return v


@functools.lru_cache(maxsize=1)
def _cpu_weight_types() -> frozenset[int]:
    """ggml types the CPU backend can multiply and look rows up in: those with a vec_dot kernel in ggml's
    CPU type traits. Others (I8…I64, F64, Q8_K, Q8_1) make llama.cpp abort or segfault at the first decode."""
    import ctypes

    from gguf import GGMLQuantizationType

    from gguf_dit.ggml_ops._lib import lib

    class Traits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
        _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]

    get = lib.cpu.ggml_get_type_traits_cpu
    get.restype, get.argtypes = ctypes.POINTER(Traits), [ctypes.c_int]
    return frozenset(int(t) for t in GGMLQuantizationType if int(t) < GGML_TYPE_COUNT and get(int(t)).contents.vec_dot)


def _check_tokenizer(h, n_vocab_rows: int) -> None:
    from gguf import Keys

    K, path = Keys.Tokenizer, h.path
    model = h.value(K.MODEL, ("STRING",), required=True)
    if model != "gpt2":
        raise ModelError(f"tokenizer.ggml.model is {model!r}, expected the gpt2 (byte-level BPE) tokenizer of Qwen", path=path)
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
        raise ModelError(f"{n_vocab_rows} rows, but the vocabulary ({K.LIST}) has {n} tokens", path=path, tensor="token_embd.weight")


def _check_tensors(h, hidden: int) -> int:
    """Alignment and types llama.cpp cannot compute with, which it loads anyway and then dies on; the
    embedding's width. Returns the embedding's row count."""
    ok = _cpu_weight_types()
    for t in h.tensors.values():
        if t.offset % TENSOR_ALIGNMENT:
            raise ModelError(f"data at byte {t.offset} is not {TENSOR_ALIGNMENT}-byte aligned ({keys.ALIGNMENT} {h.alignment}); llama.cpp maps the file and ggml needs aligned tensors", path=h.path, tensor=t.name)
        if t.name.endswith((".bias", "_norm.weight")) or t.name == "rope_freqs.weight":
            if t.type.name != "F32":
                raise ModelError(f"stored as {t.type.name}; norm weights and biases must be F32", path=h.path, tensor=t.name)
        elif int(t.type) not in ok:
            raise ModelError(f"stored as {t.type.name}, a type ggml's CPU backend cannot multiply", path=h.path, tensor=t.name)
    emb = h.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelError("tensor missing", path=h.path, tensor="token_embd.weight")
    if len(emb.ne) != 2 or emb.ne[0] != hidden:
        raise ModelError(f"shape {list(emb.shape)}, expected [n_vocab, {hidden}]", path=h.path, tensor="token_embd.weight")
    return emb.ne[1]


def _read_meta(path: Path) -> dict:
    """The encoder's metadata, after refusing in Python every file llama.cpp would crash on."""
    from gguf import Keys

    from gguf_dit.gguf_header import INTEGER_TYPES, read_header

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
    _float(h, L(A.LAYERNORM_RMS_EPS), 0.0, 1.0, required=True)
    _float(h, L(R.FREQ_BASE), 0.0, math.inf)
    _float(h, L(R.SCALING_FACTOR), 0.0, math.inf, lo_open=False)
    _float(h, L(R.SCALING_ATTN_FACTOR), 0.0, math.inf)
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
        log.warning("%s: tokenizer.ggml.pre is %r, not qwen2; token ids may differ from Qwen's tokenizer", path, pre)

    taps = h.value(keys.TE_TAPS, ("ARRAY",), item=INTEGER_TYPES)
    if taps is not None:
        taps = [int(x) for x in taps]
        if not taps or taps[0] < 0 or taps[-1] >= n_layers or any(b <= a for a, b in zip(taps, taps[1:])):
            raise ModelError(f"metadata key {keys.TE_TAPS} is {taps}: tap layers must increase within 0..{n_layers - 1}", path=path)
    template = h.value(keys.TE_TEMPLATE, ("STRING",))
    if template is not None and "{caption}" not in template:
        raise ModelError(f"metadata key {keys.TE_TEMPLATE} has no {{caption}} placeholder: every prompt would encode the same", path=path)
    return {"arch": arch, "n_layers": n_layers, "hidden": hidden, "taps": taps, "template": template}


# -- the encoder ---------------------------------------------------------------------------


class TextEncoder:
    """A loaded Qwen3-VL language model that turns captions into Ideogram 4 text features."""

    def __init__(self, path: Path, meta: dict, model, n_threads: int) -> None:
        self.path = path
        self.arch: str = meta["arch"]
        self.n_layers: int = int(meta["n_layers"])
        self.hidden: int = int(meta["hidden"])
        taps = meta["taps"]
        self.taps: tuple[int, ...] = tuple(int(x) for x in (taps if taps is not None else default_taps(self.n_layers)))
        if not self.taps or any(b <= a for a, b in zip(self.taps, self.taps[1:])) or self.taps[0] < 0 or self.taps[-1] >= self.n_layers:
            raise ModelError(f"invalid tap layers {list(self.taps)} for {self.n_layers} layers", path=path)
        self.template: str = meta["template"] or TEMPLATE
        self.n_threads = n_threads
        self._model = model
        self._vocab = _llama.llama_model_get_vocab(model)
        self._ctx = None
        self._ctx_tokens = 0
        self._lock = threading.Lock()
        # capture state used by the eval callback
        self._want = {f"l_out-{il}".encode(): j for j, il in enumerate(self.taps)}
        self._stop_after = f"l_out-{self.taps[-1]}".encode()
        self._pieces: list[list[np.ndarray]] = []
        self._active = False
        self._error: str | None = None
        self._cb = _llama.ggml_backend_sched_eval_callback(self._eval)

    @property
    def features_dim(self) -> int:
        return self.hidden * len(self.taps)

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, n_threads: int | None = None, n_gpu_layers: int = 0, use_extra_bufts: bool = False) -> "TextEncoder":
        """Load a text-encoder GGUF (ours, arch qwen3, or a community Qwen3-VL GGUF, arch qwen3vl).

        ``use_extra_bufts`` stays False unless a caller measured otherwise: llama.cpp's default (True)
        repacks weights into the CPU's extra buffer types, and on Intel CPUs with AMX the AMX buffer's
        matmul kills the process (SIGSEGV in ggml_backend_amx_mul_mat, llama.cpp issue 20824); on
        AVX-512 the CPU_REPACK buffer was also slower for K-quants (docs/portability.md).
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError("does not exist" if not path.exists() else "is not a file", path=path)
        meta = _read_meta(path)
        lc = _llama_cpp()
        from gguf_dit.ggml_ops import default_threads

        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = int(n_gpu_layers)
        mp.use_extra_bufts = bool(use_extra_bufts)
        mp.progress_callback = _LOAD_PROGRESS  # returning false on Ctrl-C cancels the load
        since = native_log.mark()
        with interrupt.native_call():
            model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            why = native_log.explain(since, generic=("failed to load model",))
            raise ModelError(f"llama.cpp could not load this GGUF{f' ({why})' if why else ''}", path=path)
        try:
            enc = cls(path, meta, model, int(n_threads or default_threads()))
        except BaseException:
            lc.llama_model_free(model)
            raise
        n_embd, n_layer = int(lc.llama_model_n_embd(model)), int(lc.llama_model_n_layer(model))
        if n_embd != enc.hidden or n_layer != enc.n_layers:
            enc.close()
            raise ModelError(f"llama.cpp reports hidden {n_embd} and {n_layer} layers; the metadata says {enc.hidden} and {enc.n_layers}", path=path)
        return enc

    def check_features_dim(self, llm_features_dim: int) -> None:
        """Refuse an encoder whose stacked taps do not have the width the DiT's llm_cond_proj expects."""
        if self.features_dim != int(llm_features_dim):
            raise ModelError(
                f"encoder hidden {self.hidden} × {len(self.taps)} taps = {self.features_dim}, but the DiT expects {int(llm_features_dim)}",
                path=self.path,
            )

    # -- tokens ------------------------------------------------------------------------
    def prompt(self, caption: str) -> str:
        return self.template.replace("{caption}", caption)

    def tokenize(self, caption: str) -> list[int]:
        """Token ids of the templated caption: no BOS, special tokens parsed, NFC-normalised first
        (Qwen's tokenizer normalises to NFC; llama.cpp does not)."""
        if not isinstance(caption, str):
            raise InputError(f"caption must be a string, got {type(caption).__name__}")
        if len(caption) > MAX_CAPTION_CHARS:  # llama.cpp's special-token pass is quadratic in their count
            raise InputError(f"caption is {len(caption)} characters; at most {MAX_CAPTION_CHARS} are tokenized "
                             f"(the text encoder takes {MAX_TOKENS} tokens)")
        text = unicodedata.normalize("NFC", self.prompt(caption)).encode("utf-8")
        self._require_open()
        cap = len(text) + 16
        buf = (_llama.llama_token * cap)()
        n = _llama.llama_tokenize(self._vocab, text, len(text), buf, cap, False, True)
        if n < 0:  # pragma: no cover - more tokens than bytes cannot happen for byte-level BPE
            cap = -n
            buf = (_llama.llama_token * cap)()
            n = _llama.llama_tokenize(self._vocab, text, len(text), buf, cap, False, True)
        if n < 0:  # pragma: no cover
            raise InputError("llama.cpp failed to tokenize the caption")
        return list(buf[:n])

    # -- encoding ----------------------------------------------------------------------
    def encode(self, caption: str) -> np.ndarray:
        """Features [n_tokens, hidden × n_taps] float32 for every token of the templated caption."""
        return self.encode_tokens(self.tokenize(caption))

    def encode_tokens(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if n == 0:
            raise InputError("empty token sequence (the caption and this encoder's chat template give no tokens)", path=self.path)
        if n > MAX_TOKENS:
            raise InputError(f"caption is {n} tokens with the chat template; the text encoder takes at most {MAX_TOKENS} (shorten the caption)")
        n_vocab = int(_llama.llama_vocab_n_tokens(self._vocab))
        bad = [t for t in tokens if not 0 <= int(t) < n_vocab]
        if bad:
            raise InputError(f"token id {bad[0]} outside the vocabulary (0..{n_vocab - 1})")
        with self._lock:
            self._require_open()
            ctx = self._context(n)
            lc = _llama
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            batch = lc.llama_batch_init(n, 0, 1)
            try:
                batch.n_tokens = n
                for i, t in enumerate(tokens):
                    batch.token[i] = int(t)
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                self._pieces = [[] for _ in self.taps]
                self._error = None
                self._active = True
                log.debug("decoding %d tokens", n)
                since = native_log.mark()
                try:
                    with interrupt.native_call():
                        rc = lc.llama_decode(ctx, batch)
                finally:
                    self._active = False
            finally:
                lc.llama_batch_free(batch)
            if rc != 0:
                why = native_log.explain(since)
                raise ModelError(f"llama_decode failed with code {rc} for {n} tokens{f' ({why})' if why else ''}", path=self.path)
            if self._error:
                raise ModelError(self._error, path=self.path)
            taps = []
            for j, il in enumerate(self.taps):
                if not self._pieces[j]:
                    raise ModelError(f"layer output l_out-{il} was not seen during decoding", path=self.path)
                x = np.concatenate(self._pieces[j], axis=0)
                if x.shape != (n, self.hidden):
                    raise ModelError(f"layer output l_out-{il} has shape {list(x.shape)}, expected [{n}, {self.hidden}]", path=self.path)
                taps.append(x)
            self._pieces = []
        # f = d * n_taps + j: stack taps on a new last axis, then flatten (d, j).
        return np.ascontiguousarray(np.stack(taps, axis=-1).reshape(n, self.hidden * len(self.taps)), dtype=np.float32)

    def _context(self, n_tokens: int):
        size = min(MAX_TOKENS, -(-n_tokens // _CTX_STEP) * _CTX_STEP)
        if self._ctx is not None and self._ctx_tokens >= size:
            return self._ctx
        self._free_context()
        lc = _llama
        cp = lc.llama_context_default_params()
        cp.n_ctx = size
        cp.n_batch = size
        cp.n_ubatch = size  # one ubatch: each layer output arrives in one piece
        cp.n_seq_max = 1
        cp.n_threads = self.n_threads
        cp.n_threads_batch = self.n_threads
        cp.embeddings = True
        cp.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        cp.attention_type = lc.LLAMA_ATTENTION_TYPE_CAUSAL
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.type_k = GGML_TYPE_F32
        cp.type_v = GGML_TYPE_F32
        cp.cb_eval = self._cb
        cp.cb_eval_user_data = None
        cp.abort_callback = interrupt.abort_callback  # polled between graph nodes: Ctrl-C stops a decode
        cp.abort_callback_data = None
        cp.no_perf = True
        since = native_log.mark()
        ctx = lc.llama_init_from_model(self._model, cp)
        if not ctx:
            why = native_log.explain(since) or "out of memory?"
            raise ModelError(f"llama.cpp could not create a context for {size} tokens ({why})", path=self.path)
        self._ctx, self._ctx_tokens = ctx, size
        return ctx

    def _eval(self, t, ask, _user) -> bool:
        """ggml scheduler callback: claim the tap nodes, copy them out when computed."""
        if not self._active:
            return not ask  # not decoding for us: claim nothing, never stop a graph
        from gguf_dit.ggml_ops._lib import lib, tensor_struct

        s = tensor_struct(t)
        name = s.name
        j = self._want.get(name)
        if ask:
            return j is not None
        if j is None:
            return True
        try:
            ne0, ne1 = int(s.ne[0]), int(s.ne[1])
            if s.type != GGML_TYPE_F32 or ne0 != self.hidden or int(s.ne[2]) != 1 or int(s.ne[3]) != 1:
                self._error = f"{name.decode()} is {list(s.ne)} of type {s.type}, expected F32 [{self.hidden}, n_tokens]"
                return False
            out = np.empty((ne1, ne0), dtype=np.float32)
            if int(s.nb[1]) == 4 * ne0:
                lib.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
            else:  # a strided view: copy row by row
                for r in range(ne1):
                    lib.ggml_backend_tensor_get(t, out[r].ctypes.data, r * int(s.nb[1]), 4 * ne0)
            self._pieces[j].append(out)
        except Exception as e:  # never let a Python exception unwind through C
            self._error = f"reading {name.decode(errors='replace')} failed: {e}"
            return False
        # After the last tap nothing else is needed: returning false ends this graph split, so the
        # final norm and the lm_head are skipped (their outputs are never read).
        return name != self._stop_after

    # -- lifetime ----------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._model is None:
            raise ModelError("text encoder is closed", path=self.path)

    def _free_context(self) -> None:
        if self._ctx is not None:
            _llama.llama_free(self._ctx)
            self._ctx, self._ctx_tokens = None, 0

    def close(self) -> None:
        with self._lock:
            self._free_context()
            if self._model is not None:
                _llama.llama_model_free(self._model)
                self._model = None

    def __enter__(self) -> "TextEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if _llama is not None:
                self.close()
        except Exception:
            pass
