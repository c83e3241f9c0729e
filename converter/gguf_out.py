"""Writing a GGUF: one loop for every part (DiTs, text encoder, VAE), never leaving a partial or overwritten file.

gguf-py writes the header, the metadata and the tensor infos, from shapes and types alone; the file is then ours:
each tensor's data is appended chunk by chunk at the next multiple of GGUF's default alignment (no file of ours
sets ``general.alignment``), so peak memory is a few chunks, not the model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np

from gguf_dit.errors import OutputError, SourceError
from gguf_dit.ggml_ops import GGMLType

from .encode import check_range, stored_nbytes


@dataclasses.dataclass
class OutTensor:
    name: str  # in the GGUF
    shape: tuple[int, ...]  # PyTorch order
    type: GGMLType
    chunks: Callable[[], Iterable[np.ndarray]]  # its float32 row blocks, read when the tensor is written
    path: Path | str  # what a bad value names: the source file and tensor
    source: str
    importance: np.ndarray | None = None  # per-column quant_weights from an imatrix, passed on to encode


def write_gguf(
    out_path: Path,
    arch: str,
    metadata: Callable[[object], None],
    tensors: list[OutTensor],
    *,
    encode: Callable[[np.ndarray, GGMLType], np.ndarray],
    range_hint: str = "",
    release: Callable[[], None] | None = None,
    progress: Callable[[str, int], None] | None = None,
    before_rename: Callable[[Path], None] | None = None,
) -> int:
    """Write ``tensors`` (after ``metadata(writer)`` adds the KV pairs) to ``out_path``; returns the float32 bytes read.

    ``encode(rows, type)`` makes the stored bytes; a value beyond F16's range for a type that cannot hold it is a
    SourceError ending in ``range_hint``. ``release()`` runs after each tensor (to drop its source pages),
    ``progress(name, nbytes)`` after each chunk, ``before_rename(tmp)`` once the data is synced (to patch a header
    value known only now). The file is written under a temporary name and renamed onto ``out_path`` when complete;
    on any exception, Ctrl-C included, the temporary file is removed and ``out_path`` is untouched.
    """
    import gguf

    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    bytes_in = 0
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            metadata(writer)
            for t in tensors:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), stored_nbytes(t.shape, t.type), raw_dtype=gguf.GGMLQuantizationType(int(t.type)))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        with open(tmp, "r+b") as f:
            f.seek(0, os.SEEK_END)
            for t in tensors:
                written, n_in = stream_tensor(f, t, encode, range_hint, progress)
                bytes_in += n_in
                if release is not None:
                    release()
                if written != stored_nbytes(t.shape, t.type):
                    raise OutputError(f"internal: wrote {written} bytes, expected {stored_nbytes(t.shape, t.type)}", path=out_path, tensor=t.name)
            _pad(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return bytes_in


def add_config(writer, config, key: Callable[[str], str]) -> None:
    """Every field of a config dataclass as metadata ``key(field)``: tuples as arrays of integers, booleans,
    floats as float32, integers as uint32."""
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, tuple):
            writer.add_array(key(f.name), [int(x) for x in v])
        elif isinstance(v, bool):
            writer.add_bool(key(f.name), v)
        elif isinstance(v, float):
            writer.add_float32(key(f.name), v)
        else:
            writer.add_uint32(key(f.name), int(v))


def stream_tensor(f: BinaryIO, t: OutTensor, encode, range_hint: str, progress) -> tuple[int, int]:
    """Append one tensor's data at the next aligned offset, chunk by chunk; returns (bytes written, bytes read)."""
    _pad(f)
    written = read = 0
    for chunk in t.chunks():
        big = check_range(chunk, t.type)
        if big is not None:
            raise SourceError(f"value of magnitude {big:.4g} is beyond F16's range (65504), which {t.type.name} cannot store; {range_hint}", path=t.path, tensor=t.source)
        enc = encode(chunk, t.type) if t.importance is None else encode(chunk, t.type, importance=t.importance)
        f.write(enc.tobytes())
        written += enc.nbytes
        read += chunk.nbytes
        if progress is not None:
            progress(t.name, chunk.nbytes)
    return written, read


def _pad(f: BinaryIO) -> None:
    import gguf

    f.write(b"\0" * ((-f.tell()) % gguf.GGUF_DEFAULT_ALIGNMENT))
