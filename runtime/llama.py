"""llama.cpp through llama-cpp-python, set up once per process: its log routed into Python logging, model loads
cancelled by Ctrl-C, and one libggml-base shared with ``gguf_dit.ggml_ops`` (so a tensor pointer means the same to
both)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from gguf_dit.errors import ModelError

from . import interrupt

log = logging.getLogger("gguf_dit.llama")

_setup_lock = threading.Lock()
_llama = None
_llama_log_cb = None  # kept referenced: llama.cpp holds the pointer
LOAD_PROGRESS = None  # llama_model_params.progress_callback: returning false on Ctrl-C cancels a load


def llama_cpp():
    """Import llama_cpp once, route llama.cpp's log into Python logging, and check that it shares
    ggml with gguf_dit.ggml_ops (one libggml-base mapped, so a tensor pointer means the same to both)."""
    global _llama, _llama_log_cb, LOAD_PROGRESS
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
        _llama_log_cb = _llama_log_cb or glib.LOG_CALLBACK(glib.LineLogger(log, logging.DEBUG))
        LOAD_PROGRESS = llama_cpp.llama_progress_callback(lambda _progress, _data: not interrupt.requested())
        llama_cpp.llama_log_set(_llama_log_cb, None)
        # llama_log_set also replaces ggml's log callback; give ggml's back to gguf_dit.ggml_ops.
        glib.lib.ggml_log_set(glib._log_cb, None)
        _check_shared_ggml(glib)
        llama_cpp.llama_backend_init()
        _llama = llama_cpp
        return _llama


def llama_system_info() -> str:
    """llama.cpp's own one-line system info (the features its CPU backend was built with)."""
    return llama_cpp().llama_print_system_info().decode(errors="replace").strip()


def _check_shared_ggml(glib) -> None:
    """Both sides must use one libggml-base: ggml_ops reads tensors llama.cpp created."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # pragma: no cover - not Linux
        return
    paths = {line.split()[-1] for line in maps.splitlines() if "libggml-base" in line and "/" in line}
    if len(paths) > 1:
        raise ModelError(f"two copies of libggml-base are loaded ({', '.join(sorted(paths))}); llama.cpp and gguf_dit.ggml_ops must share one")
