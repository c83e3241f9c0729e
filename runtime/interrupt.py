"""Ctrl-C during native compute (llama.cpp's decode, ggml graph compute).

Python's SIGINT handler only sets a flag that the interpreter checks between bytecodes, so a long
native call cannot be stopped by it; worse, when that native code calls back into Python (the
text encoder's ``cb_eval``) the KeyboardInterrupt is raised inside the callback, where ctypes
prints and drops it and the graph silently ends early. Around native calls, ``native_call()``
installs a handler that only records the signal; ``abort_callback`` (a ``ggml_abort_callback``,
given to llama.cpp's context and, for the duration of the call, to ggml backends; polled between
graph nodes) reports it, and the KeyboardInterrupt is raised once the native call has returned.
The callback is only ever invoked inside ``native_call()``: outside it, a KeyboardInterrupt raised
in the callback would be dropped by ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading

ABORT_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)

_requested = threading.Event()


def requested() -> bool:
    return _requested.is_set()


abort_callback = ABORT_CALLBACK(lambda _data: _requested.is_set())


def _record(_signum, _frame) -> None:
    _requested.set()


@contextlib.contextmanager
def native_call(*backends):
    """Run a native call so that SIGINT aborts it at the next graph node and then raises
    KeyboardInterrupt (replacing whatever error the aborted call produced). ``backends``
    (gguf_dit.ggml_ops.Backend) get the abort callback for the duration of the block."""
    prev = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if prev is None or prev is _record or not callable(prev):  # other thread, nested, SIG_IGN/SIG_DFL: leave as is
        yield
        return
    _requested.clear()
    signal.signal(signal.SIGINT, _record)
    try:
        for b in backends:
            b.set_abort_callback(abort_callback)
        yield
    finally:
        for b in backends:
            b.set_abort_callback(None)
        signal.signal(signal.SIGINT, prev)
        if _requested.is_set():
            _requested.clear()
            if prev is signal.default_int_handler:
                raise KeyboardInterrupt
            prev(signal.SIGINT, None)
