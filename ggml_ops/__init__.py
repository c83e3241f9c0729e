"""gguf-dit's door into ggml: ctypes over the libraries llama-cpp-python installs.

Knows nothing about Ideogram. Importing this package loads ``libggml-base``, ``libggml``,
``libggml-cpu`` (and ``libggml-cuda`` when present), checks the ggml version and struct layout,
and routes ggml's log into the ``gguf_dit.ggml`` logger.
"""

from ._lib import EXPECTED_GGML_VERSION, Native, lib
from .backend import Backend, available, devices
from .graph import Builder, Context, Graph, SharedBuffer, SharedCompute, Tensor, TensorStore, download, placed_bytes, read_into, upload
from .quant import dequantize, quantize
from .threads import default_threads
from .types import STORAGE_TYPES, TRAITS, GGMLType, TypeTraits, check_row, fits, fitting_type
from .system import check_cpu

__all__ = [
    "EXPECTED_GGML_VERSION", "Native", "lib", "Backend", "available", "devices", "Builder", "Context", "Graph",
    "Tensor", "TensorStore", "SharedBuffer", "SharedCompute", "download", "placed_bytes", "read_into", "upload", "default_threads", "dequantize", "quantize",
    "STORAGE_TYPES", "TRAITS", "GGMLType", "TypeTraits", "check_row", "fits", "fitting_type", "check_cpu",
]


def version() -> str:
    return lib.ggml_version().decode()
