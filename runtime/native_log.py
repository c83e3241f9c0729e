"""Native (llama.cpp, ggml) log lines: kept out of the user's way on request, remembered to explain
a native failure in the one-line error.

Both libraries log through ``ggml_ops._lib.LineLogger`` into the ``gguf_dit.llama`` and
``gguf_dit.ggml`` loggers. A filter on those loggers records every native warning or error line
(numbered, so a caller can ask for the lines since a mark) and, while ``hidden()`` is active,
drops them; records our own Python code sends to the same loggers always pass.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging

LOGGERS = ("gguf_dit.llama", "gguf_dit.ggml")


class _NativeFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.show = True
        self.count = itertools.count(1)
        self.seq = 0
        self.recent: collections.deque[tuple[int, int, str]] = collections.deque(maxlen=64)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.module != "_lib" or record.funcName != "__call__":  # not LineLogger.__call__ (the ctypes log callback)
            return True
        if record.levelno >= logging.WARNING:
            self.seq = next(self.count)
            self.recent.append((self.seq, record.levelno, record.getMessage().strip()))
        return self.show


_filter = _NativeFilter()
for _name in LOGGERS:
    _l = logging.getLogger(_name)
    if _filter not in _l.filters:
        _l.addFilter(_filter)


def mark() -> int:
    """A position in the native log: ``explain(mark())`` later sees only the lines after it."""
    return _filter.seq


def explain(since: int, *, generic: tuple[str, ...] = ()) -> str | None:
    """The last native error line after ``since`` that says more than a line containing one of
    ``generic`` (e.g. llama.cpp's closing "failed to load model"), else the last warning."""
    lines = [(lvl, msg) for seq, lvl, msg in _filter.recent if seq > since and msg]
    for want in (logging.ERROR, logging.WARNING):
        for lvl, msg in reversed(lines):
            if lvl >= want and not any(g in msg for g in generic):
                return msg
    return None


@contextlib.contextmanager
def hidden():
    """Drop native log lines (still remembered for ``explain``) inside the block."""
    prev, _filter.show = _filter.show, False
    try:
        yield
    finally:
        _filter.show = prev


@contextlib.contextmanager
def verbose(stream):
    """Print every gguf_dit log record, native lines included, at DEBUG to ``stream``."""
    root = logging.getLogger("gguf_dit")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    saved = [(lg, lg.level) for lg in (root, *(logging.getLogger(n) for n in LOGGERS))]
    prev_prop = root.propagate
    root.addHandler(handler)
    root.propagate = False  # printed once here, not again by the application's root handler
    for lg, _ in saved:
        lg.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.propagate = prev_prop
        for lg, lvl in saved:
            lg.setLevel(lvl)
