"""What this ggml build and this machine are: registries, devices, the features each backend reports,
the extra buffer types a device offers, and whether the CPU backend was compiled for this CPU.

The CPU features ggml reports are compile-time facts of the llama-cpp-python build (``-march=native`` by
default), not probes of the running CPU: a wheel built on one machine and installed from pip's cache on
another can carry instructions this CPU lacks (AVX512_BF16 built on an AMD EPYC, run on an Intel
Ice Lake), which kills the process with SIGILL at the first kernel that uses them. ``cpu_mismatch``
compares the two so we can refuse with a message instead.
"""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

from ._lib import lib

_FEATURE = type("ggml_backend_feature", (ctypes.Structure,), {"_fields_": [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]})
_GET_FEATURES = ctypes.CFUNCTYPE(ctypes.POINTER(_FEATURE), ctypes.c_void_p)
_GET_EXTRA_BUFTS = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)

#: ggml's x86 feature names -> the flag /proc/cpuinfo shows when the CPU has it.
X86_FLAGS = {"SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
             "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
             "AMX_INT8": "amx_int8"}


@dataclasses.dataclass(frozen=True)
class Registry:
    name: str
    devices: tuple[str, ...]
    features: dict[str, str]


_registry_loaded = False


def ensure_registry() -> None:
    global _registry_loaded
    if not _registry_loaded:
        # A GGML_BACKEND_DL build keeps its backends as plugins next to the libraries; a static
        # build has them registered already and this is a no-op.
        lib.ggml_backend_load_all_from_path(str(lib.dir).encode())
        _registry_loaded = True


def _proc(reg, name: str):
    return lib.ggml_backend_reg_get_proc_address(reg, name.encode())


def device_proc(device, name: str):
    """A function the device's backend registry exports by name (NULL where it has none)."""
    return _proc(lib.ggml_backend_dev_backend_reg(device), name)


def _until_null(p, present=bool):
    """The entries of a C array ended by a NULL entry (``p`` itself may be NULL)."""
    k = 0
    while p and present(p[k]):
        yield p[k]
        k += 1


def registries() -> list[Registry]:
    """Every ggml backend registry with its devices and the features it reports."""
    ensure_registry()
    out = []
    for i in range(lib.ggml_backend_reg_count()):
        reg = lib.ggml_backend_reg_get(i)
        devs = tuple(lib.ggml_backend_dev_name(lib.ggml_backend_reg_dev_get(reg, j)).decode() for j in range(lib.ggml_backend_reg_dev_count(reg)))
        addr = _proc(reg, "ggml_backend_get_features")
        feats = {f.name.decode(): (f.value or b"").decode() for f in _until_null(addr and _GET_FEATURES(addr)(reg), lambda f: f.name)}
        out.append(Registry(lib.ggml_backend_reg_name(reg).decode(), devs, feats))
    return out


def extra_buffer_types(device) -> list[str]:
    """Names of the extra buffer types a device offers (CPU_REPACK, AMX, …). gguf-dit never places
    weights in them: our tensors go to the backend's default buffer type (or, memory-mapped, ggml's
    CPU_Mapped buffer over host memory), and the text encoder is
    loaded with ``use_extra_bufts = False`` (docs/portability.md)."""
    addr = device_proc(device, "ggml_backend_dev_get_extra_bufts")
    return [lib.ggml_backend_buft_name(b).decode() for b in _until_null(addr and _GET_EXTRA_BUFTS(addr)(device))]


def buffer_type_name(buffer) -> str:
    if not buffer:  # ggml asserts on a NULL buffer
        from gguf_dit.errors import GGMLError

        raise GGMLError("no buffer (an unallocated tensor, or a store whose tensors all alias host memory)")
    return lib.ggml_backend_buft_name(lib.ggml_backend_buffer_get_type(buffer)).decode()


def _cpuinfo(field: str) -> str | None:
    """The value on /proc/cpuinfo's first ``field`` line (None without one, or without /proc/cpuinfo)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1] for line in lines if line.startswith(field)), None)


def cpu_flags() -> set[str]:
    """The running CPU's flags as the kernel reports them (empty where /proc/cpuinfo is absent)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    import platform

    model = _cpuinfo("model name")
    return model.strip() if model is not None else platform.processor() or platform.machine()


def cpu_mismatch(features: dict[str, str], flags: set[str]) -> list[str]:
    """Features the CPU backend was compiled with that this CPU does not have (x86 only; an empty
    flag set — no /proc/cpuinfo — is treated as unknown, not as a CPU without features)."""
    if not flags:
        return []
    return [f for f, flag in X86_FLAGS.items() if features.get(f) == "1" and flag not in flags]


def cpu_registry() -> Registry | None:
    return next((r for r in registries() if r.name == "CPU"), None)


_cpu_ok = False


def check_cpu() -> None:
    """Refuse a CPU backend compiled for instructions this CPU lacks, before a kernel dies of SIGILL. Called
    before ggml computes anything (backend init, quantize, the text encoder), not at import, so that
    `gguf-dit info` can still report the mismatch."""
    global _cpu_ok
    if _cpu_ok:
        return
    from gguf_dit.errors import GGMLError

    reg = cpu_registry()
    missing = cpu_mismatch(reg.features if reg else {}, cpu_flags())
    if missing:
        raise GGMLError(
            f"{lib.dir}: this llama-cpp-python build uses {', '.join(missing)}, which this CPU ({cpu_model()}) does not have "
            "(a wheel compiled with -march=native on another machine, e.g. from pip's cache); rebuild it here with "
            "`pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36`"
        )
    _cpu_ok = True


__all__ = ["Registry", "registries", "extra_buffer_types", "buffer_type_name", "cpu_flags", "cpu_model", "cpu_mismatch", "cpu_registry", "check_cpu", "X86_FLAGS"]
