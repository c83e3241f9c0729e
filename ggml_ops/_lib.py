"""Load the ggml shared libraries that llama-cpp-python installs, and declare the C signatures we use.

We do not import ``llama_cpp``: its Python API has no ggml bindings, and importing it costs time and
pulls in llama.cpp. We only locate its package directory and load ``lib/libggml*.so`` with ctypes.
Struct layouts and the ggml version are checked at import, because they move between releases and
a mismatch would corrupt memory rather than fail cleanly.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_void_p
from pathlib import Path

from gguf_dit.errors import GGMLError

# A failing GGML_ASSERT would otherwise spawn gdb to print a backtrace before aborting.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

EXPECTED_GGML_VERSION = "0.25.3"
EXPECTED_TENSOR_SIZE = 336
GGML_MAX_NAME = 64

log = logging.getLogger("gguf_dit.ggml")


class ggml_init_params(ctypes.Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


class ggml_tensor_struct(ctypes.Structure):
    # Only type/ne/nb/data/name are read; the rest is declared to pin the size and offsets.
    _fields_ = [
        ("type", c_int),
        ("buffer", c_void_p),
        ("ne", c_int64 * 4),
        ("nb", c_size_t * 4),
        ("op", c_int),
        ("op_params", c_int32 * 16),
        ("flags", c_int32),
        ("src", c_void_p * 10),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


TO_FLOAT = ctypes.CFUNCTYPE(None, c_void_p, POINTER(c_float), c_int64)


class ggml_type_traits(ctypes.Structure):
    _fields_ = [
        ("type_name", c_char_p),
        ("blck_size", c_int64),
        ("blck_size_interleave", c_int64),
        ("type_size", c_size_t),
        ("is_quantized", c_bool),
        ("to_float", c_void_p),
        ("from_float_ref", c_void_p),
    ]


class ggml_backend_dev_caps(ctypes.Structure):
    _fields_ = [("async_", c_bool), ("host_buffer", c_bool), ("buffer_from_host_ptr", c_bool), ("events", c_bool), ("mmap_support", c_bool)]


class ggml_backend_dev_props(ctypes.Structure):
    _fields_ = [
        ("name", c_char_p),
        ("description", c_char_p),
        ("memory_free", c_size_t),
        ("memory_total", c_size_t),
        ("type", c_int),
        ("device_id", c_char_p),
        ("caps", ggml_backend_dev_caps),
    ]


LOG_CALLBACK = ctypes.CFUNCTYPE(None, c_int, c_char_p, c_void_p)

P = c_void_p  # opaque handles: context, tensor, backend, buffer, graph, allocator
T = c_void_p


def _lib_dir() -> Path:
    override = os.environ.get("GGUF_DIT_GGML_LIB")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GGMLError(
            "llama-cpp-python is not installed; install it with `pip install llama-cpp-python==0.3.36` "
            '(GPU: CMAKE_ARGS="-DGGML_CUDA=on")'
        )
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _load(path: Path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise GGMLError(f"cannot load {path}: {e}") from e


def _find(libdir: Path, stem: str) -> Path | None:
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        if (libdir / name).exists():
            return libdir / name
    return None


class _Libs:
    def __init__(self) -> None:
        self.dir = _lib_dir()
        found = {s: _find(self.dir, s) for s in ("ggml-base", "ggml", "ggml-cpu", "ggml-cuda")}
        for required in ("ggml-base", "ggml", "ggml-cpu"):
            if found[required] is None:
                raise GGMLError(f"{self.dir}: lib{required}.so not found (is llama-cpp-python==0.3.36 installed?)")
        # Order matters. base defines the symbols the others link against; cpu must be loaded before
        # ggml, whose DT_NEEDED "libggml-cpu.so.0" then matches the already-loaded SONAME instead of
        # mapping a second copy of the CPU backend (the wheel ships real copies, not symlinks).
        self.base = _load(found["ggml-base"])  # type: ignore[arg-type]
        self.cpu = _load(found["ggml-cpu"])  # type: ignore[arg-type]
        self.ggml = _load(found["ggml"])  # type: ignore[arg-type]
        self.cuda = _load(found["ggml-cuda"]) if found["ggml-cuda"] else None
        self._declare()

    def _fn(self, lib: ctypes.CDLL, name: str, restype, *argtypes):
        f = getattr(lib, name)
        f.restype = restype
        f.argtypes = list(argtypes)
        setattr(self, name, f)

    def _declare(self) -> None:
        # One line per C prototype, in ggml.h's argument order, so each can be checked against the header:
        # the lines look alike because prototypes do, and a table would only move them.
        b, g = self.base, self.ggml
        fn = self._fn
        fn(b, "ggml_version", c_char_p)
        fn(b, "ggml_commit", c_char_p)
        fn(b, "ggml_tensor_overhead", c_size_t)
        fn(b, "ggml_graph_overhead_custom", c_size_t, c_size_t, c_bool)
        fn(b, "ggml_init", P, ggml_init_params)
        fn(b, "ggml_free", None, P)
        fn(b, "ggml_log_set", None, LOG_CALLBACK, c_void_p)
        fn(b, "ggml_get_type_traits", POINTER(ggml_type_traits), c_int)
        fn(b, "ggml_blck_size", c_int64, c_int)
        fn(b, "ggml_type_size", c_size_t, c_int)
        fn(b, "ggml_row_size", c_size_t, c_int, c_int64)
        fn(b, "ggml_nbytes", c_size_t, T)
        fn(b, "ggml_quantize_init", None, c_int)
        fn(b, "ggml_quantize_requires_imatrix", c_bool, c_int)
        fn(b, "ggml_quantize_chunk", c_size_t, c_int, POINTER(c_float), c_void_p, c_int64, c_int64, c_int64, POINTER(c_float))
        # tensors
        fn(b, "ggml_new_tensor", T, P, c_int, c_int, POINTER(c_int64))
        fn(b, "ggml_set_name", T, T, c_char_p)
        fn(b, "ggml_set_output", None, T)
        # ops
        for name in ("ggml_add", "ggml_mul", "ggml_mul_mat", "ggml_cpy"):
            fn(b, name, T, P, T, T)
        for name in ("ggml_silu", "ggml_tanh", "ggml_cont", "ggml_neg", "ggml_sqr", "ggml_abs", "ggml_sum_rows", "ggml_transpose"):
            fn(b, name, T, P, T)
        fn(b, "ggml_pool_2d", T, P, T, c_int, c_int, c_int, c_int, c_int, c_float, c_float)
        fn(b, "ggml_rms_norm", T, P, T, c_float)
        fn(b, "ggml_norm", T, P, T, c_float)
        fn(b, "ggml_scale", T, P, T, c_float)
        fn(b, "ggml_scale_bias", T, P, T, c_float, c_float)
        fn(b, "ggml_concat", T, P, T, T, c_int)
        fn(b, "ggml_cast", T, P, T, c_int)
        fn(b, "ggml_swiglu_split", T, P, T, T)
        fn(b, "ggml_reshape_2d", T, P, T, c_int64, c_int64)
        fn(b, "ggml_reshape_3d", T, P, T, c_int64, c_int64, c_int64)
        fn(b, "ggml_reshape_4d", T, P, T, c_int64, c_int64, c_int64, c_int64)
        fn(b, "ggml_view_1d", T, P, T, c_int64, c_size_t)
        fn(b, "ggml_view_2d", T, P, T, c_int64, c_int64, c_size_t, c_size_t)
        fn(b, "ggml_view_3d", T, P, T, c_int64, c_int64, c_int64, c_size_t, c_size_t, c_size_t)
        fn(b, "ggml_view_4d", T, P, T, c_int64, c_int64, c_int64, c_int64, c_size_t, c_size_t, c_size_t, c_size_t)
        fn(b, "ggml_permute", T, P, T, c_int, c_int, c_int, c_int)
        fn(b, "ggml_soft_max_ext", T, P, T, T, c_float, c_float)
        fn(b, "ggml_flash_attn_ext", T, P, T, T, T, T, c_float, c_float, c_float)
        fn(b, "ggml_prec_set_acc", c_bool, T, c_int)
        # graphs and allocation
        fn(b, "ggml_new_graph_custom", P, P, c_size_t, c_bool)
        fn(b, "ggml_build_forward_expand", None, P, T)
        fn(b, "ggml_graph_n_nodes", c_int, P)
        fn(b, "ggml_gallocr_new", P, P)
        fn(b, "ggml_gallocr_free", None, P)
        fn(b, "ggml_gallocr_reserve", c_bool, P, P)
        fn(b, "ggml_gallocr_alloc_graph", c_bool, P, P)
        fn(b, "ggml_gallocr_get_buffer_size", c_size_t, P, c_int)
        fn(b, "ggml_gallocr_reserve_n_size", None, P, P, POINTER(c_int), POINTER(c_int), POINTER(c_size_t))
        fn(b, "ggml_backend_buft_alloc_buffer", P, P, c_size_t)
        fn(b, "ggml_backend_buft_get_alignment", c_size_t, P)
        fn(b, "ggml_backend_buft_get_alloc_size", c_size_t, P, T)
        fn(b, "ggml_backend_buffer_init_tensor", c_int, P, T)
        fn(b, "ggml_backend_buffer_get_base", c_void_p, P)
        fn(b, "ggml_backend_buffer_is_host", c_bool, P)
        # backend
        fn(b, "ggml_backend_alloc_ctx_tensors", P, P, P)
        fn(b, "ggml_backend_tensor_alloc", c_int, P, T, c_void_p)
        fn(b, "ggml_backend_buffer_free", None, P)
        fn(b, "ggml_backend_buffer_get_size", c_size_t, P)
        fn(b, "ggml_backend_buffer_set_usage", None, P, c_int)
        fn(b, "ggml_backend_tensor_set", None, T, c_void_p, c_size_t, c_size_t)
        fn(b, "ggml_backend_tensor_get", None, T, c_void_p, c_size_t, c_size_t)
        fn(b, "ggml_backend_graph_compute", c_int, P, P)
        fn(b, "ggml_backend_supports_op", c_bool, P, T)
        fn(b, "ggml_backend_free", None, P)
        fn(b, "ggml_backend_get_default_buffer_type", P, P)
        fn(b, "ggml_backend_dev_name", c_char_p, P)
        fn(b, "ggml_backend_dev_description", c_char_p, P)
        fn(b, "ggml_backend_dev_type", c_int, P)
        fn(b, "ggml_backend_dev_memory", None, P, POINTER(c_size_t), POINTER(c_size_t))
        fn(b, "ggml_backend_dev_get_props", None, P, POINTER(ggml_backend_dev_props))
        fn(b, "ggml_backend_dev_buffer_from_host_ptr", P, P, c_void_p, c_size_t, c_size_t)
        fn(b, "ggml_backend_dev_backend_reg", P, P)
        fn(b, "ggml_backend_dev_init", P, P, c_char_p)
        fn(b, "ggml_backend_reg_name", c_char_p, P)
        fn(b, "ggml_backend_reg_get_proc_address", c_void_p, P, c_char_p)
        fn(b, "ggml_backend_reg_dev_count", c_size_t, P)
        fn(b, "ggml_backend_reg_dev_get", P, P, c_size_t)
        fn(b, "ggml_backend_buft_name", c_char_p, P)
        fn(b, "ggml_backend_buffer_get_type", P, P)
        # the registry lives in libggml
        fn(g, "ggml_backend_reg_count", c_size_t)
        fn(g, "ggml_backend_reg_get", P, c_size_t)
        fn(g, "ggml_backend_dev_count", c_size_t)
        fn(g, "ggml_backend_dev_get", P, c_size_t)
        fn(g, "ggml_backend_dev_by_type", P, c_int)
        fn(g, "ggml_backend_dev_by_name", P, c_char_p)
        fn(g, "ggml_backend_load_all_from_path", None, c_char_p)


class LineLogger:
    """A ggml-style log callback body: (level, text, user_data) pieces, continued with level CONT (5),
    gathered into lines and sent to a Python logger. llama.cpp's log callback has the same shape."""

    LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}

    def __init__(self, logger: logging.Logger, default: int = logging.INFO) -> None:
        self.logger = logger
        self.level = default
        self.pending: list[str] = []

    def __call__(self, level: int, text: bytes, _user: int) -> None:  # pragma: no cover - exercised via ggml
        if level != 5:
            self.level = self.LEVELS.get(level, self.level)
        self.pending.append(text.decode("utf-8", "replace") if text else "")
        joined = "".join(self.pending)
        if joined.endswith("\n"):
            self.pending.clear()
            for line in joined.rstrip("\n").splitlines():
                self.logger.log(self.level, line)


_log_cb = LOG_CALLBACK(LineLogger(log))


def _check(libs: _Libs) -> None:
    version = libs.ggml_version().decode()
    if version != EXPECTED_GGML_VERSION:
        raise GGMLError(
            f"{libs.dir}: ggml version {version}, expected {EXPECTED_GGML_VERSION} "
            "(gguf-dit needs llama-cpp-python==0.3.36 exactly; struct layouts differ between versions)"
        )
    if ctypes.sizeof(ggml_tensor_struct) != EXPECTED_TENSOR_SIZE:
        raise GGMLError(f"internal: ggml_tensor mirror is {ctypes.sizeof(ggml_tensor_struct)} bytes, expected 336")
    # Probe the real layout: two consecutive tensors in a no_alloc context are one overhead apart,
    # and ne/name must read back where our mirror expects them.
    ctx = libs.ggml_init(ggml_init_params(4 * libs.ggml_tensor_overhead(), None, True))
    try:
        ne = (c_int64 * 4)(3, 5, 7, 11)
        t1 = libs.ggml_new_tensor(ctx, 0, 4, ne)
        t2 = libs.ggml_new_tensor(ctx, 0, 1, ne)
        libs.ggml_set_name(t1, b"gguf_dit_probe")
        s = ctypes.cast(t1, POINTER(ggml_tensor_struct)).contents
        ok = (
            list(s.ne) == [3, 5, 7, 11]
            and list(s.nb) == [4, 12, 60, 420]
            and s.name == b"gguf_dit_probe"
            and t2 - t1 == libs.ggml_tensor_overhead()
            and libs.ggml_tensor_overhead() == EXPECTED_TENSOR_SIZE + 32
        )
    finally:
        libs.ggml_free(ctx)
    if not ok:
        raise GGMLError(f"{libs.dir}: ggml_tensor layout does not match ggml {EXPECTED_GGML_VERSION}; reinstall llama-cpp-python==0.3.36")


lib = _Libs()
lib.ggml_log_set(_log_cb, None)
_check(lib)


def tensor_struct(t: int) -> ggml_tensor_struct:
    return ctypes.cast(t, POINTER(ggml_tensor_struct)).contents


class Native:
    """Owns native memory: ``close()`` frees it (idempotent), and garbage collection calls ``close()`` too."""

    def _free(self, attr: str, free) -> None:
        handle = getattr(self, attr, None)
        if handle:
            free(handle)
            setattr(self, attr, None)

    def __del__(self) -> None:  # pragma: no cover - interpreter teardown order varies
        try:
            self.close()
        except Exception:
            pass


__all__ = ["lib", "tensor_struct", "ggml_init_params", "ggml_backend_dev_props", "TO_FLOAT", "LOG_CALLBACK", "LineLogger", "Native"]
