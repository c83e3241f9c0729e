"""Opening what a user names as an input file, making output folders, and how errors show a JSON value. Both sides
use it.

Only regular files are read: a FIFO blocks the first read forever, ``/dev/zero`` never ends. The check is made on
the open descriptor, not on the path before opening, so a path swapped for a FIFO after a check cannot slip
through; the open itself uses O_NONBLOCK, so it returns at once even on a FIFO.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import GgufDitError

#: How a refusal reads; a caller with its own wording (the prompt file) passes its own.
REFUSALS = {"missing": "does not exist", "unreadable": "cannot be read ({why})", "folder": "is a folder, not a regular file",
            "special": "is {kind}, not a regular file"}


def open_regular(path: Path, error: type[GgufDitError] = GgufDitError, refusals: dict[str, str] = REFUSALS) -> tuple[BinaryIO, int]:
    """``path`` open for binary reading and its size, if it is a regular file (symlinks followed); else ``error``
    naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise error(refusals["missing"], path=path) from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket cannot be opened at all
            raise error(refusals["special"].format(kind="a socket"), path=path) from None
        raise error(refusals["unreadable"].format(why=e.strerror or e), path=path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(refusals["folder"], path=path)
        raise error(refusals["special"].format(kind="a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or special file"), path=path)
    return os.fdopen(fd, "rb"), st.st_size


def regular_file(path: Path, error: type[GgufDitError] = GgufDitError) -> int:
    """The size of ``path`` if it is a regular file, else ``error`` naming it (for readers that open it themselves)."""
    f, size = open_regular(path, error)
    f.close()
    return size


def json_type(v) -> str:
    """The JSON name of a parsed value's type."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null", int: "number", float: "number"}.get(type(v), type(v).__name__)


def show(v, limit: int | None = 40) -> str:
    """A JSON value as written (non-ASCII literal), cut to ``limit`` characters."""
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return s if limit is None or len(s) <= limit else s[: limit - 3] + "..."


def write_json_atomic(path: Path, data, **dump) -> None:
    """``data`` as JSON under a temporary name in the same folder, then renamed over ``path``: readers see the old
    file or the whole new one, never a partial one; on any failure the temporary file is removed."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, **dump)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_folders(folder: Path, created: list[Path]) -> None:
    """mkdir -p, appending each folder it creates to ``created`` as it goes (so a failure midway still knows them);
    one made by someone else meanwhile is not ours to remove and is not listed."""
    for p in [p for p in (folder, *folder.parents) if not os.path.lexists(p)][::-1]:
        try:
            os.mkdir(p)
        except FileExistsError:
            continue
        created.append(p)


def remove_folders(created: list[Path]) -> None:
    """Undo ``make_folders``: remove them deepest first, stopping at the first that is not empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break
    created.clear()


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
