"""Opening what a user names as an input file: only regular files (a FIFO blocks the first read forever,
``/dev/zero`` never ends), refused with an error that names the path. Both sides use it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import GgufDitError


def regular_file(path: Path, error: type[GgufDitError] = GgufDitError) -> int:
    """The size of ``path`` if it is a regular file (symlinks followed), else ``error`` naming it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error("does not exist", path=path) from None
    except OSError as e:
        raise error(f"cannot be read ({e.strerror or e})", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or special file"
        raise error(f"is {kind}, not a regular file", path=path)
    return st.st_size
