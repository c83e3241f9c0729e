"""Writing a GGUF without ever leaving a partial or overwritten file: one mechanism for every part."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_gguf(out_path: Path, arch: str, *, before_rename: Callable[[Path], None] | None = None) -> Iterator[tuple["object", Path]]:
    """Yield ``(writer, tmp)``: a ``gguf.GGUFWriter`` for a temporary file next to ``out_path``.

    The caller writes through it (``write_header_to_file(tmp)``, …). On success the data is padded to
    the alignment, fsynced, ``before_rename(tmp)`` runs (e.g. to patch a header value known only now),
    and the file is renamed onto ``out_path``. On any exception, Ctrl-C included, the temporary file is
    removed and ``out_path`` is untouched.
    """
    import gguf

    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(None, arch)
    try:
        yield writer, tmp
        fout = writer.fout[0]
        fout.write(b"\0" * ((-fout.tell()) % writer.data_alignment))
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def stream_tensor(writer, chunks: Iterable[np.ndarray], encode: Callable[[np.ndarray], np.ndarray], on_chunk: Callable[[int], None] | None = None) -> int:
    """Append one tensor's data chunk by chunk at the next aligned offset; returns the bytes written.

    Used after ``write_ti_data_to_file``: the tensor infos were written from shapes and types alone,
    so data can be produced and written one row chunk at a time.
    """
    fout = writer.fout[0]
    fout.write(b"\0" * ((-fout.tell()) % writer.data_alignment))
    written = 0
    for chunk in chunks:
        enc = encode(chunk)
        fout.write(enc.tobytes())
        written += enc.nbytes
        if on_chunk is not None:
            on_chunk(chunk.nbytes)
    return written
