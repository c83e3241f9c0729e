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
Qwen3-VL GGUFs (arch ``qwen3vl``; with text-only input MRoPE equals 1-D RoPE). What is checked before llama.cpp
sees a file is in ``text_encoder_file``; llama.cpp's set-up in ``llama``.
"""

from __future__ import annotations

import threading
import unicodedata
from pathlib import Path

import numpy as np

from gguf_dit.arch.text_encoder import MAX_TOKENS, TEMPLATE, default_taps
from gguf_dit.errors import InputError, ModelError
from gguf_dit.ggml_ops import GGMLType, Native, default_threads
from gguf_dit.ggml_ops._lib import lib, tensor_struct

from . import interrupt, llama, native_log
from .caption import check_encodable
from .llama import llama_cpp as _llama_cpp, llama_system_info, log
from .text_encoder_file import read_meta as _read_meta  # the name tests replace to reach llama.cpp unchecked

__all__ = ["TextEncoder", "llama_system_info"]

_CTX_STEP = 256  # contexts are sized in steps of this many tokens (llama.cpp pads n_ctx to 256)


class TextEncoder(Native):
    """A loaded Qwen3-VL language model that turns captions into Ideogram 4 text features."""

    _op_offload = False  # load() sets it: True only when layers live on the GPU

    def __init__(self, path: Path, meta: dict, model, n_threads: int) -> None:
        self.path = path
        self.arch: str = meta["arch"]
        self.n_layers: int = int(meta["n_layers"])
        self.hidden: int = int(meta["hidden"])
        taps = meta["taps"]  # checked by read_meta; default_taps is valid for any depth read_meta accepts
        self.taps: tuple[int, ...] = tuple(int(x) for x in (taps if taps is not None else default_taps(self.n_layers)))
        self.template: str = meta["template"] or TEMPLATE
        self.n_threads = n_threads
        self._lc = _llama_cpp()
        self._model = model
        self._vocab = self._lc.llama_model_get_vocab(model)
        self._ctx = None
        self._ctx_tokens = 0
        self._lock = threading.Lock()
        # capture state used by the eval callback
        self._want = {f"l_out-{il}".encode(): j for j, il in enumerate(self.taps)}
        self._stop_after = f"l_out-{self.taps[-1]}".encode()
        self._pieces: list[list[np.ndarray]] = []
        self._active = False
        self._error: str | None = None
        self._cb = self._lc.ggml_backend_sched_eval_callback(self._eval)

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
        meta = _read_meta(path)
        lc = _llama_cpp()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = int(n_gpu_layers)
        mp.use_extra_bufts = bool(use_extra_bufts)
        mp.progress_callback = llama.LOAD_PROGRESS  # returning false on Ctrl-C cancels the load
        since = native_log.mark()
        with interrupt.native_call():
            model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            why = native_log.explain(since, generic=("failed to load model",))
            raise ModelError(f"llama.cpp could not load this GGUF{f' ({why})' if why else ''}", path=path)
        try:
            enc = cls(path, meta, model, int(n_threads or default_threads()))
            enc._op_offload = int(n_gpu_layers) > 0
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
    def tokenize(self, caption: str) -> list[int]:
        """Token ids of the templated caption: no BOS, special tokens parsed, NFC-normalised first
        (Qwen's tokenizer normalises to NFC; llama.cpp does not)."""
        if not isinstance(caption, str):
            raise InputError(f"caption must be a string, got {type(caption).__name__}")
        check_encodable(caption)  # llama.cpp's special-token pass is quadratic in their count
        text = unicodedata.normalize("NFC", self.template.replace("{caption}", caption)).encode("utf-8")
        self._require_open()
        cap = len(text) + 16
        buf = (self._lc.llama_token * cap)()
        n = self._lc.llama_tokenize(self._vocab, text, len(text), buf, cap, False, True)
        if n < 0:  # pragma: no cover - more tokens than bytes cannot happen for byte-level BPE
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
        n_vocab = int(self._lc.llama_vocab_n_tokens(self._vocab))
        bad = [t for t in tokens if not 0 <= int(t) < n_vocab]
        if bad:
            raise InputError(f"token id {bad[0]} outside the vocabulary (0..{n_vocab - 1})")
        with self._lock:
            self._require_open()
            ctx = self._context(n)
            lc = self._lc
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
        lc = self._lc
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
        cp.type_k = int(GGMLType.F32)
        cp.type_v = int(GGMLType.F32)
        cp.cb_eval = self._cb
        cp.cb_eval_user_data = None
        cp.abort_callback = interrupt.abort_callback  # polled between graph nodes: Ctrl-C stops a decode
        cp.abort_callback_data = None
        cp.no_perf = True
        # A CUDA build of llama.cpp otherwise sends large products of CPU-resident weights to the GPU (op_offload)
        # even with n_gpu_layers=0: there they run in TF32/F16 and the features moved by up to 0.16 on the H200
        # (docs/benchmarks.md). Layers kept on the CPU are computed on the CPU.
        cp.op_offload = self._op_offload
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
        s = tensor_struct(t)
        name = s.name
        j = self._want.get(name)
        if ask:
            return j is not None
        if j is None:
            return True
        try:
            ne0, ne1 = int(s.ne[0]), int(s.ne[1])
            if s.type != GGMLType.F32 or ne0 != self.hidden or int(s.ne[2]) != 1 or int(s.ne[3]) != 1:
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
        self._free("_ctx", self._lc.llama_free)
        self._ctx_tokens = 0

    def close(self) -> None:
        with self._lock:
            self._free_context()
            self._free("_model", self._lc.llama_model_free)

    def __enter__(self) -> "TextEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
