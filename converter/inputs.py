"""Reading the converter's small input files (JSON configs, tokenizer, index) without trusting them.

Only regular files are opened: a FIFO would block forever and ``/dev/zero`` never ends. JSON is capped in size,
must have the expected top-level type, and typed fields are checked here so that a string where a number belongs
is one error line naming the file and key rather than a TypeError deep inside the converter.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from gguf_dit.errors import SourceError
from gguf_dit.files import json_type, open_regular, regular_file as _regular_file, show

#: Far above any real config or tokenizer (Qwen3-VL's tokenizer.json is about 11 MB).
MAX_JSON_BYTES = 128 << 20

regular_file = functools.partial(_regular_file, error=SourceError)


def read_json(path: Path, kind: type = dict, what: str = "JSON", error=SourceError):
    """Parse a JSON file whose top level must be ``kind`` (dict or list)."""
    f, _ = open_regular(path, error)
    try:
        with f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise error(f"{what} is larger than {MAX_JSON_BYTES >> 20} MiB", path=path)
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise error(f"unreadable {what} (nested too deeply)", path=path) from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise error(f"unreadable {what} ({_one_line(e)})", path=path) from None
    if not isinstance(value, kind):
        raise error(f"{what} is a JSON {json_type(value)}, expected an {'object' if kind is dict else 'array'}", path=path)
    return value


def json_int(value, key: str, path: Path, *, minimum: int = 0, maximum: int | None = None) -> int:
    """An integer field (a bool or an integral float is not accepted: configs write plain integers)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SourceError(f"{key} is a JSON {json_type(value)} ({show(value)}), expected an integer", path=path)
    if value < minimum or (maximum is not None and value > maximum):
        raise SourceError(f"{key} is {value}, expected {minimum}..{maximum}" if maximum is not None else f"{key} is {value}, expected at least {minimum}", path=path)
    return value


def json_float(value, key: str, path: Path, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SourceError(f"{key} is a JSON {json_type(value)} ({show(value)}), expected a number", path=path)
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        raise SourceError(f"{key} is {show(value)}, expected a finite{' positive' if positive else ''} number", path=path)
    return v


def json_int_list(value, key: str, path: Path, *, length: int | None = None, minimum: int = 0) -> list[int]:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        want = f"a list of {length} integers" if length is not None else "a list of integers"
        raise SourceError(f"{key} is {show(value)}, expected {want}", path=path)
    return [json_int(x, f"{key}[{i}]", path, minimum=minimum) for i, x in enumerate(value)]


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]
