"""Backend selection through ggml's registry: one code path for CPU and CUDA.

Nothing here calls ``ggml_backend_cpu_*`` directly: those symbols do not exist in a dynamic-loading
build, and a CUDA run must not depend on them. Thread count goes through the registry's proc address.
"""

from __future__ import annotations

import ctypes
import dataclasses

from gguf_dit.errors import GGMLError

from ._lib import Native, ggml_backend_dev_props, lib
from .threads import default_threads
from .system import check_cpu, device_proc, ensure_registry

DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL = 0, 1, 2, 3
_SET_N_THREADS = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int)
_SET_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    name: str
    description: str
    kind: str  # "cpu" | "gpu" | "igpu" | "accel"
    memory_free: int
    memory_total: int


def devices() -> list[DeviceInfo]:
    ensure_registry()
    out = []
    kinds = {DEV_CPU: "cpu", DEV_GPU: "gpu", DEV_IGPU: "igpu", DEV_ACCEL: "accel"}
    for i in range(lib.ggml_backend_dev_count()):
        d = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(d, ctypes.byref(free), ctypes.byref(total))
        out.append(DeviceInfo(lib.ggml_backend_dev_name(d).decode(), (lib.ggml_backend_dev_description(d) or b"").decode(),
                              kinds.get(lib.ggml_backend_dev_type(d), "other"), free.value, total.value))
    return out


def available() -> list[str]:
    """Backend choices a user may name: always ``cpu``; ``cuda`` when a GPU device is registered."""
    return ["cpu"] + (["cuda"] if any(d.kind == "gpu" for d in devices()) else [])


def _maps_host_memory(dev) -> bool:
    """Whether the device computes from buffers that alias host memory (``buffer_from_host_ptr``: the CPU, not CUDA,
    whose device leaves that function NULL, so calling it would crash). The name and type read back must match the
    device's own getters: a struct that moved between ggml versions then reads as "cannot", never as a wild call."""
    # ggml memsets its own sizeof(props): spare room, so a struct grown in another ggml cannot overwrite the heap
    room = ctypes.create_string_buffer(ctypes.sizeof(ggml_backend_dev_props) + 256)
    props = ggml_backend_dev_props.from_buffer(room)
    lib.ggml_backend_dev_get_props(dev, ctypes.byref(props))
    same = props.name == lib.ggml_backend_dev_name(dev) and props.type == lib.ggml_backend_dev_type(dev)
    return bool(same and props.caps.buffer_from_host_ptr)


class Backend(Native):
    """An initialised ggml backend (``"cpu"``, ``"cuda"``, ``"auto"`` or a device name like ``"CUDA0"``)."""

    def __init__(self, name: str = "auto", threads: int | None = None) -> None:
        check_cpu()
        ensure_registry()
        want = name.lower()
        if want == "auto":
            dev = lib.ggml_backend_dev_by_type(DEV_GPU) or lib.ggml_backend_dev_by_type(DEV_CPU)
        elif want == "cpu":
            dev = lib.ggml_backend_dev_by_type(DEV_CPU)
        elif want in ("cuda", "gpu"):
            dev = lib.ggml_backend_dev_by_type(DEV_GPU)
            if not dev:
                raise GGMLError(
                    "backend 'cuda' requested but this llama-cpp-python build has no GPU backend; "
                    'reinstall with CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36'
                )
        else:
            dev = lib.ggml_backend_dev_by_name(name.encode())
            if not dev:
                raise GGMLError(f"unknown backend {name!r}; available: {', '.join(available())} or a device name")
        if not dev:
            raise GGMLError(f"no ggml device for backend {name!r}")
        handle = lib.ggml_backend_dev_init(dev, None)
        if not handle:
            raise GGMLError(f"ggml could not initialise device {lib.ggml_backend_dev_name(dev).decode()}")
        self.handle = handle
        self.device = dev
        self.device_name = lib.ggml_backend_dev_name(dev).decode()
        self.description = (lib.ggml_backend_dev_description(dev) or b"").decode()
        self.is_cpu = lib.ggml_backend_dev_type(dev) == DEV_CPU
        self.name = "cpu" if self.is_cpu else "cuda" if self.device_name.upper().startswith("CUDA") else self.device_name.lower()
        self.buffer_type = lib.ggml_backend_get_default_buffer_type(handle)
        self.maps_host_memory = _maps_host_memory(dev)
        self.threads = None
        self.set_threads(threads or default_threads())

    def set_threads(self, n: int) -> None:
        if n < 1:
            raise GGMLError(f"thread count must be >= 1, got {n}")
        addr = device_proc(self.device, "ggml_backend_set_n_threads")
        if addr:
            _SET_N_THREADS(addr)(self.handle, int(n))
            self.threads = int(n)

    def set_abort_callback(self, callback) -> bool:
        """Install a ggml_abort_callback (a ctypes function kept referenced here; None removes it),
        polled between graph nodes; returning true stops the compute with GGML_STATUS_ABORTED.
        False where the backend has none (CUDA)."""
        addr = device_proc(self.device, "ggml_backend_set_abort_callback")
        if not addr:
            return False
        _SET_ABORT_CALLBACK(addr)(self.handle, ctypes.cast(callback, ctypes.c_void_p), None)
        self._abort_callback = callback
        return True

    def supports(self, tensor) -> bool:
        return bool(lib.ggml_backend_supports_op(self.handle, int(tensor)))

    def close(self) -> None:
        self._free("handle", lib.ggml_backend_free)

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device_name!r}, threads={self.threads})"
