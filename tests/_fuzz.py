"""Seeded fuzzing of every file gguf-dit reads (issue 10 §3).

Families: the four GGUF roles of a model folder (``transformer``, ``unconditional_transformer``,
``text_encoder``, ``vae``: the embedded demo model, mutated one file at a time, then ``gguf-dit inspect --check``
and ``gguf-dit run``), ``convert`` (the tiny checkpoint's safetensors,
config.json, tokenizer.json / tokenizer_config.json and a one-shard ``*.safetensors.index.json``; one case in four
converts the whole checkpoint, so a part failing after others were written is covered) and ``prompt`` (plain text,
JSON captions, JSON Lines, and FIFOs, folders or /dev/zero in place of a file).

A case is (family, seed, index) -> one deterministic mutation (numpy Generator seeded with all three), written into
a fresh case folder, and one or more CLI invocations. Invocations run inside a long-lived worker process that imports
gguf_dit once, because a fresh interpreter per case costs seconds of torch import. The worker announces each
invocation before it starts, so when native code kills it the harness knows which case did, records it and starts
a new worker for the rest.

Each invocation is classified:

* ok: exit 0, and nothing on stderr but our own ``warning:`` lines;
* clean error: exit 2, stderr is ``warning:`` lines (optional) and then exactly one line ``error: ...`` that names
  the mutated file (``parent/name``), nothing left in the case folder or in TMPDIR, inputs unchanged;
* anything else is a FAILURE: a signal, a traceback, a hang (per-invocation timeout), other exit codes, more
  lines (native llama.cpp/ggml log lines included), an error naming no file, leftovers, a changed input, or a
  mutation that must be refused (a duplicate name, a negative eps, a template without ``{caption}``, ...) that ran.

Reproduce one case: ``python tests/_fuzz.py --family vae --seed 0 --case 17 --keep /tmp/fz`` (writes the case
folder, prints and runs its commands). Longer runs: ``python tests/_fuzz.py --cases 500 --seed 7`` (per family);
the pytest entry (tests/test_fuzz.py) reads GGUF_DIT_FUZZ_CASES and GGUF_DIT_FUZZ_SEED.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "runtime" / "demo_model"
GGUF_ROLES = ("transformer", "unconditional_transformer", "text_encoder", "vae")
FAMILIES = GGUF_ROLES + ("convert", "prompt")
DEFAULT_CASES = {"transformer": 36, "unconditional_transformer": 28, "text_encoder": 48, "vae": 36, "convert": 72, "prompt": 40}
TIMEOUT_S = 30.0  # per invocation; a normal one takes 0.2-3 s, so only a hang (or a quadratic prompt) reaches it
MEMORY_LIMIT = 6 << 30  # address space of the worker: a huge allocation becomes MemoryError, not the OOM killer
SIZE_ARGS = ["-W", "64", "-H", "64"]
# one thread: on a loaded machine ggml's spinning worker threads make a run several times slower
RUN_ARGS = ["--steps", "2", "--seed", "0", "--threads", "1", "-q"]
PROMPT = "A red circle in the center.\n"

# ------------------------------------------------------------------------------------------------------------------
# GGUF layout: where every header field lives, so that a mutation can target one of them


VT_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGML_TYPES = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 34, 35, 39, 40, 41, 42]
BAD_GGML_TYPES = [4, 5, 31, 32, 33, 43, 100, 2**31, 2**32 - 1]
BLOCK = {0: (1, 4), 1: (1, 2), 8: (32, 34), 12: (256, 144), 30: (1, 2)}  # (weights, bytes) of the demo model's types


@dataclasses.dataclass
class Kv:
    key: str
    key_len_pos: int
    start: int  # first byte of the key length
    type_pos: int
    type: int
    end: int
    value: Any = None  # scalar, bytes (string), or list (array)
    arr_type_pos: int | None = None
    arr_type: int | None = None
    count_pos: int | None = None
    str_len_pos: list[int] = dataclasses.field(default_factory=list)  # every string length in the value


@dataclasses.dataclass
class TInfo:
    name: bytes
    name_len_pos: int
    start: int
    ndims_pos: int
    ne_pos: list[int]
    ne: list[int]
    type_pos: int
    type: int
    offset_pos: int
    offset: int
    end: int


@dataclasses.dataclass
class Gguf:
    version: int
    kvs: list[Kv]
    tensors: list[TInfo]
    info_end: int
    alignment: int
    data_start: int


def parse_gguf(b: bytes) -> Gguf:
    pos = 24

    def u(fmt: str) -> int:
        nonlocal pos
        v = struct.unpack_from(fmt, b, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string() -> bytes:
        nonlocal pos
        n = u("<Q")
        pos += n
        return b[pos - n:pos]

    version, n_t, n_kv = struct.unpack_from("<IQQ", b, 4)
    kvs = []
    for _ in range(n_kv):
        start = pos
        key = string().decode()
        kv = Kv(key, start, start, pos, 0, 0)
        kv.type = u("<I")
        if kv.type == 8:
            kv.str_len_pos.append(pos)
            kv.value = string()
        elif kv.type == 9:
            kv.arr_type_pos, kv.arr_type = pos, u("<I")
            kv.count_pos = pos
            n = u("<Q")
            kv.value = []
            for _ in range(n):
                if kv.arr_type == 8:
                    kv.str_len_pos.append(pos)
                    kv.value.append(string())
                else:
                    kv.value.append(u(VT_FMT[kv.arr_type]))
        else:
            kv.value = u(VT_FMT[kv.type])
        kv.end = pos
        kvs.append(kv)
    tensors = []
    for _ in range(n_t):
        start = pos
        name = string()
        ndims_pos = pos
        nd = u("<I")
        ne_pos = [pos + 8 * i for i in range(nd)]
        ne = [u("<Q") for _ in range(nd)]
        type_pos = pos
        tt = u("<I")
        offset_pos = pos
        off = u("<Q")
        tensors.append(TInfo(name, start, start, ndims_pos, ne_pos, ne, type_pos, tt, offset_pos, off, pos))
    align = next((kv.value for kv in kvs if kv.key == "general.alignment"), 32)
    return Gguf(version, kvs, tensors, pos, align, -(-pos // align) * align)


def gguf_bytes(g: Gguf, raw: bytes, kvs: list[bytes], tensors: list[bytes]) -> bytes:
    """A file with the given serialized KV pairs and tensor infos, and ``raw``'s data section (same offsets)."""
    head = b"GGUF" + struct.pack("<IQQ", g.version, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % g.alignment)
    return head + raw[g.data_start:]


def gstr(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def tinfo_bytes(name: bytes, ne: list[int], tt: int, off: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", x) for x in ne) + struct.pack("<IQ", tt, off)


def kv_bytes(key: str, vtype: int, value: Any, arr_type: int | None = None) -> bytes:
    out = gstr(key.encode()) + struct.pack("<I", vtype)
    if vtype == 8:
        return out + gstr(value)
    if vtype == 9:
        out += struct.pack("<IQ", arr_type, len(value))
        return out + b"".join(gstr(v) if arr_type == 8 else struct.pack(VT_FMT[arr_type], v) for v in value)
    return out + struct.pack(VT_FMT[vtype], value)


# ------------------------------------------------------------------------------------------------------------------
# mutations. Each takes (rng, file bytes, context) and returns (new bytes, description, must_fail).


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _put(b: bytes, pos: int, fmt: str, v) -> bytes:
    return b[:pos] + struct.pack(fmt, v) + b[pos + struct.calcsize(fmt):]


def _bad_count(rng, cur: int, size: int) -> int:
    return int(_pick(rng, [0, max(cur - 1, 0), cur + 1, cur * 2 + 3, size, 2**31, 2**32 + cur, 2**40, 2**62, 2**63 - 1, 2**64 - 1]))


def _where(kv: Kv) -> str:
    return f"kv {kv.key!r}"


def _nbytes(t: TInfo) -> int:
    return int(np.prod(t.ne)) // BLOCK[t.type][0] * BLOCK[t.type][1]


def g_header_count(rng, b, g):
    pos, what = _pick(rng, [(8, "tensor_count"), (16, "kv_count")])
    cur = struct.unpack_from("<Q", b, pos)[0]
    v = _bad_count(rng, cur, len(b))
    return _put(b, pos, "<Q", v), f"header {what} {cur} -> {v}", v > cur


def g_length(rng, b, g):
    cands = []
    for kv in g.kvs:
        cands.append((kv.key_len_pos, f"{_where(kv)} key length"))
        for i, p in enumerate(kv.str_len_pos[:64]):
            cands.append((p, f"{_where(kv)} string length" + (f" (element {i})" if kv.type == 9 else "")))
        if kv.count_pos is not None:
            cands.append((kv.count_pos, f"{_where(kv)} array length"))
    for t in g.tensors:
        cands.append((t.name_len_pos, f"tensor {t.name.decode()!r} name length"))
    pos, what = _pick(rng, cands)
    cur = struct.unpack_from("<Q", b, pos)[0]
    v = int(_pick(rng, [0, max(cur - 1, 0), cur + 1, cur + 7, len(b), 2**32, 2**40, 2**63 - 1, 2**64 - 1]))
    return _put(b, pos, "<Q", v), f"{what} {cur} -> {v}", v > cur


def g_value_type(rng, b, g):
    kv = _pick(rng, g.kvs)
    v = int(_pick(rng, [t for t in range(13) if t != kv.type] + [13, 255, 2**31, 2**32 - 1]))
    return _put(b, kv.type_pos, "<I", v), f"{_where(kv)} value type {kv.type} -> {v}", False


def g_array_type(rng, b, g):
    arrays = [kv for kv in g.kvs if kv.type == 9]
    kv = _pick(rng, arrays)
    v = int(_pick(rng, [t for t in range(13) if t != kv.arr_type] + [13, 2**32 - 1]))
    return _put(b, kv.arr_type_pos, "<I", v), f"{_where(kv)} array element type {kv.arr_type} -> {v}", False


def g_ndims(rng, b, g):
    t = _pick(rng, g.tensors)
    v = int(_pick(rng, [0, 3, 4, 5, 64, 2**32 - 1, len(t.ne) + 1, max(len(t.ne) - 1, 0)]))
    return _put(b, t.ndims_pos, "<I", v), f"tensor {t.name.decode()!r} n_dims {len(t.ne)} -> {v}", v != len(t.ne)


def g_ne(rng, b, g):
    t = _pick(rng, g.tensors)
    i = int(rng.integers(len(t.ne)))
    cur = t.ne[i]
    v = int(_pick(rng, [0, 1, cur - 1, cur + 1, cur * 2, cur // 2, 2**31, 2**32, 2**62, 2**63, 2**64 - 1]))
    return _put(b, t.ne_pos[i], "<Q", v), f"tensor {t.name.decode()!r} ne[{i}] {cur} -> {v}", v != cur


def g_tensor_type(rng, b, g):
    t = _pick(rng, g.tensors)
    v = int(_pick(rng, [x for x in GGML_TYPES if x != t.type] + BAD_GGML_TYPES))
    # another valid type changes only how the bytes are read (a wrong but well-formed file)
    return _put(b, t.type_pos, "<I", v), f"tensor {t.name.decode()!r} type {t.type} -> {v}", v in BAD_GGML_TYPES


def g_offset(rng, b, g):
    t = _pick(rng, g.tensors)
    data = len(b) - g.data_start
    other = _pick(rng, g.tensors).offset
    v = int(_pick(rng, [t.offset + 1, t.offset + g.alignment, max(t.offset - g.alignment, 0), 0, other, data, max(data - g.alignment, 0), 2**40, 2**63, 2**64 - 1]))
    # an aligned tensor inside the data section, even on top of another one, is a valid (if wrong-weighted) file
    return _put(b, t.offset_pos, "<Q", v), f"tensor {t.name.decode()!r} offset {t.offset} -> {v}", v % g.alignment != 0 or v + _nbytes(t) > data


def g_truncate(rng, b, g):
    n = int(_pick(rng, [0, 3, 4, 8, 20, 24, int(rng.integers(24, g.info_end)), g.info_end, g.data_start,
                        int(rng.integers(g.data_start, len(b))), len(b) - 1]))
    # the file may end in alignment padding after the last tensor: cutting only padding is harmless
    data_end = g.data_start + max(t.offset + _nbytes(t) for t in g.tensors)
    return b[:n], f"truncated to {n} of {len(b)} bytes", n < data_end


def g_dup_name(rng, b, g):
    by_len: dict[int, list[TInfo]] = {}
    for t in g.tensors:
        by_len.setdefault(len(t.name), []).append(t)
    groups = [v for v in by_len.values() if len(v) > 1]
    grp = _pick(rng, groups)
    i, j = rng.choice(len(grp), 2, replace=False)
    a, src = grp[int(i)], grp[int(j)]
    p = a.name_len_pos + 8
    return b[:p] + src.name + b[p + len(a.name):], f"tensor {a.name.decode()!r} renamed to the duplicate {src.name.decode()!r}", True


def g_rename_tensor(rng, b, g):
    t = _pick(rng, g.tensors)
    name = t.name.decode()
    kind = int(rng.integers(4))
    if kind == 0:
        new = re.sub(r"\d+", "99999999999", name, count=1) if re.search(r"\d", name) else name + ".99999999999"
    elif kind == 1:
        new = name + ".x" * 40  # longer than ggml's 63-character name limit
    elif kind == 2:
        new = ""
    else:
        new = name[:-1] + "\udcff" if name else "x"
    nb = new.encode("utf-8", "surrogateescape")
    tensors = [tinfo_bytes(nb if x is t else x.name, x.ne, x.type, x.offset) for x in g.tensors]
    kvs = [b[kv.start:kv.end] for kv in g.kvs]
    return gguf_bytes(g, b, kvs, tensors), f"tensor {name!r} renamed to {nb!r}", True


def g_drop(rng, b, g):
    kvs = [b[kv.start:kv.end] for kv in g.kvs]
    tensors = [tinfo_bytes(x.name, x.ne, x.type, x.offset) for x in g.tensors]
    if rng.random() < 0.5:
        i = int(rng.integers(len(kvs)))
        return gguf_bytes(g, b, kvs[:i] + kvs[i + 1:], tensors), f"{_where(g.kvs[i])} removed", False
    i = int(rng.integers(len(tensors)))
    return gguf_bytes(g, b, kvs, tensors[:i] + tensors[i + 1:]), f"tensor {g.tensors[i].name.decode()!r} removed", True


def g_dup_kv(rng, b, g):
    kvs = [b[kv.start:kv.end] for kv in g.kvs]
    tensors = [tinfo_bytes(x.name, x.ne, x.type, x.offset) for x in g.tensors]
    i = int(rng.integers(len(kvs)))
    return gguf_bytes(g, b, kvs + [kvs[i]], tensors), f"{_where(g.kvs[i])} duplicated", True


def _replace_kv(g: Gguf, b: bytes, kv: Kv, new: bytes) -> bytes:
    kvs = [new if x is kv else b[x.start:x.end] for x in g.kvs]
    return gguf_bytes(g, b, kvs, [tinfo_bytes(x.name, x.ne, x.type, x.offset) for x in g.tensors])


def g_retype_kv(rng, b, g):
    """A metadata value replaced by one of another type or length (the key stays)."""
    kv = _pick(rng, g.kvs)
    choices = [
        (8, b"not a number"), (8, b"\xff\xfe junk"), (4, 7), (5, -3), (6, float("nan")), (7, True), (12, 1e300),
        (9, [], 4), (9, [1, 2, 3, 4, 5], 5), (9, [b"a", b"b"], 8),
    ]
    if kv.type == 9 and kv.value:
        v = kv.value
        choices += [(9, v[:-1], kv.arr_type), (9, v + v[:1], kv.arr_type), (9, v[:1], kv.arr_type)]
    c = choices[int(rng.integers(len(choices)))]
    new = kv_bytes(kv.key, c[0], c[1], c[2] if len(c) > 2 else None)
    shown = c[1] if not isinstance(c[1], list) else f"array of {len(c[1])}"
    return _replace_kv(g, b, kv, new), f"{_where(kv)} replaced by type {c[0]} value {shown!r}", False


def g_json_kv(rng, b, g):
    """A JSON document stored in a string field made corrupt or of the wrong shape."""
    cands = [kv for kv in g.kvs if kv.type == 8 and kv.value[:1] in (b"{", b"[")]
    kv = _pick(rng, cands)
    s = kv.value
    kind = int(rng.integers(5))
    if kind == 0:
        i = int(rng.integers(len(s)))
        new = s[:i] + bytes([_pick(rng, list(b'{}[],:"\\x0\xff'))]) + s[i + 1:]
    elif kind == 1:
        new = s[: int(rng.integers(1, len(s)))]
    elif kind == 2:
        new = _pick(rng, [b"[]", b"{}", b"null", b"1e999", b'"x"', b"[1, 2]", b'{"a": {"b": []}}'])
    elif kind == 3:
        new = b"[" * 100000 + b"]" * 100000
    else:
        obj = json.loads(s)
        if isinstance(obj, dict) and obj:
            k = _pick(rng, sorted(obj))
            obj[k] = _pick(rng, [None, 5, "x", [], {"k": 1}, -1, [None]])
        new = json.dumps(obj).encode()
    return _replace_kv(g, b, kv, kv_bytes(kv.key, 8, new)), f"{_where(kv)} JSON value corrupted ({new[:40]!r}...)", False


def g_string_kv(rng, b, g):
    cands = [kv for kv in g.kvs if kv.type == 8]
    kv = _pick(rng, cands)
    new = _pick(rng, [b"", b"\xff\xfe\x00", kv.value + b"\x00", kv.value[::-1], b"x" * 70000, kv.value.upper()])
    return _replace_kv(g, b, kv, kv_bytes(kv.key, 8, new)), f"{_where(kv)} string -> {new[:30]!r} ({len(new)} bytes)", False


def g_number_kv(rng, b, g):
    cands = [kv for kv in g.kvs if kv.type in VT_FMT]
    cands += [kv for kv in g.kvs if kv.type == 9 and kv.arr_type in VT_FMT and kv.arr_type != 7 and kv.value]
    kv = _pick(rng, cands)
    vt = kv.type if kv.type != 9 else kv.arr_type
    floats = vt in (6, 12)
    cur = kv.value if kv.type != 9 else kv.value[int(rng.integers(len(kv.value)))]
    if floats:
        v = float(_pick(rng, [-cur, float("nan"), float("inf"), float("-inf"), 0.0, 1e30, -1e-30, 3e38]))
    else:
        lo, hi = {0: (0, 255), 1: (-128, 127), 2: (0, 65535), 3: (-32768, 32767), 4: (0, 2**32 - 1), 5: (-2**31, 2**31 - 1),
                  7: (0, 1), 10: (0, 2**64 - 1), 11: (-2**63, 2**63 - 1)}[vt]
        v = int(min(max(int(_pick(rng, [0, -1, cur + 1, cur - 1, cur * 2, cur * 1000, 2**31 - 1, 2**63])), lo), hi))
    if kv.type == 9:
        vals = list(kv.value)
        vals[vals.index(cur)] = v
        new = kv_bytes(kv.key, 9, vals, kv.arr_type)
    else:
        new = kv_bytes(kv.key, kv.type, v)
    # a negative or non-finite eps / rope base cannot give a sound model: it must be refused, not run
    must = floats and ("eps" in kv.key or "theta" in kv.key or "freq_base" in kv.key) and not (v >= 0 and math.isfinite(v))
    return _replace_kv(g, b, kv, new), f"{_where(kv)} value {cur} -> {v}", must


def g_rename_key(rng, b, g):
    kv = _pick(rng, g.kvs)
    same = [x for x in g.kvs if x is not kv and len(x.key) == len(kv.key)]
    if same and rng.random() < 0.5:
        new = _pick(rng, same).key
        return _put(b, kv.key_len_pos + 8, f"{len(new)}s", new.encode()), f"{_where(kv)} key renamed to the duplicate {new!r}", True
    i = int(rng.integers(len(kv.key)))
    c = bytes([_pick(rng, list(b"_zX\xff"))])
    return b[: kv.key_len_pos + 8 + i] + c + b[kv.key_len_pos + 9 + i:], f"{_where(kv)} key byte {i} -> {c!r}", False


def g_version(rng, b, g):
    if rng.random() < 0.3:
        return b"GGUX" + b[4:], "magic GGUF -> GGUX", True
    v = int(_pick(rng, [0, 1, 2, 4, 2**32 - 1]))
    return _put(b, 4, "<I", v), f"version 3 -> {v}", v not in (2, 3)


def g_alignment(rng, b, g):
    v = int(_pick(rng, [0, 1, 3, 7, 16, 64, 2**31]))
    kvs = [b[kv.start:kv.end] for kv in g.kvs if kv.key != "general.alignment"] + [kv_bytes("general.alignment", 4, v)]
    return gguf_bytes(g, b, kvs, [tinfo_bytes(x.name, x.ne, x.type, x.offset) for x in g.tensors]), f"general.alignment = {v}", v in (0, 3, 7, 2**31)


def g_nan_data(rng, b, g):
    """Every stored value of one F32/F16 tensor, or every block scale of a Q8_0/Q4_K tensor, set to NaN or Inf."""
    cands = [t for t in g.tensors if t.type in (0, 1, 8, 12)]
    t = _pick(rng, cands)
    n = int(np.prod(t.ne))
    start = g.data_start + t.offset
    arr = bytearray(b)
    bad = _pick(rng, ["nan", "inf"])
    if t.type == 0:
        arr[start:start + 4 * n] = np.full(n, np.float32(bad)).tobytes()
    elif t.type == 1:
        arr[start:start + 2 * n] = np.full(n, np.float16(bad)).tobytes()
    else:  # Q8_0: 34-byte blocks of 32, Q4_K: 144-byte blocks of 256; both start with an f16 scale
        bs, nb = (34, n // 32) if t.type == 8 else (144, n // 256)
        for k in range(nb):
            arr[start + k * bs:start + k * bs + 2] = np.float16(bad).tobytes()
    return bytes(arr), f"tensor {t.name.decode()!r} data all {bad}", True


def g_dup_token(rng, b, g):
    kv = next(kv for kv in g.kvs if kv.key == "tokenizer.ggml.tokens")
    by_len: dict[int, list[int]] = {}
    for i, tok in enumerate(kv.value):
        by_len.setdefault(len(tok), []).append(i)
    grp = _pick(rng, [v for v in by_len.values() if len(v) > 1])
    i, j = (int(x) for x in rng.choice(grp, 2, replace=False))
    p = kv.str_len_pos[i] + 8
    return b[:p] + kv.value[j] + b[p + len(kv.value[i]):], f"tokenizer.ggml.tokens[{i}] {kv.value[i]!r} -> duplicate of [{j}] {kv.value[j]!r}", True


def g_template(rng, b, g):
    kv = next(kv for kv in g.kvs if kv.key == "gguf_dit.text_encoder.template")
    new = _pick(rng, [kv.value.replace(b"{caption}", b"{captio}"), kv.value.replace(b"{caption}", b""), kv.value + b"{caption}",
                      b"{caption}", kv.value.replace(b"{caption}", b"{0}")])
    must = b"{caption}" not in new
    return _replace_kv(g, b, kv, kv_bytes(kv.key, 8, new)), f"template -> {new!r}", must


def g_norm_type(rng, b, g):
    """A norm weight stored as an integer or quantized type (llama.cpp aborts on some of these)."""
    cands = [t for t in g.tensors if b"norm" in t.name and t.type == 0]
    t = _pick(rng, cands)
    v = int(_pick(rng, [26, 24, 25, 28, 1, 30, 8, 12]))  # I32, I8, I16, F64, F16, BF16, Q8_0, Q4_K
    tensors = [tinfo_bytes(x.name, x.ne, v if x is t else x.type, x.offset) for x in g.tensors]
    kvs = [b[kv.start:kv.end] for kv in g.kvs]
    # F16/BF16 norms are legitimate (sd.cpp keeps them); so are quantized ones in a backbone (sd.cpp's
    # `--type q8_0` without rules writes them; the runtime decodes them at load). Integer types never are.
    backbone = any(x.name == b"embed_image_indicator.weight" for x in g.tensors)
    legit = (1, 30, 8, 12) if backbone else (1, 30)
    return gguf_bytes(g, b, kvs, tensors), f"tensor {t.name.decode()!r} type 0 -> {v}", v not in legit


def generic_flip(rng, b, header_end: int):
    arr = bytearray(b)
    hi = header_end if rng.random() < 0.85 else len(b)
    k = int(rng.integers(1, 9))
    where = sorted(int(x) for x in rng.integers(0, hi, k))
    for p in where:
        arr[p] ^= int(rng.integers(1, 256))
    return bytes(arr), f"{k} byte(s) flipped at {where}", False


def generic_splice(rng, b, header_end: int):
    p = int(rng.integers(0, header_end))
    if rng.random() < 0.5:
        junk = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
        return b[:p] + junk + b[p:], f"{len(junk)} byte(s) inserted at {p}", False
    n = int(rng.integers(1, 17))
    return b[:p] + b[p + n:], f"{n} byte(s) deleted at {p}", True


def g_flip(rng, b, g):
    return generic_flip(rng, b, g.data_start)


def g_splice(rng, b, g):
    return generic_splice(rng, b, g.data_start)


def g_special(rng, b, g):
    """The file replaced by something that is not a regular file (reading a FIFO blocks, /dev/zero never ends)."""
    kind = _pick(rng, ["fifo", "dir", "devzero"])
    return b"", f"replaced by a {kind}", True, kind


# name: (mutator, weight); a default-sized run goes through every applicable one once, then the heavier ones again
GGUF_MUTATORS: dict[str, tuple[Callable, int]] = {
    "header_count": (g_header_count, 1), "length": (g_length, 3), "value_type": (g_value_type, 2), "array_type": (g_array_type, 1),
    "ndims": (g_ndims, 1), "ne": (g_ne, 2), "tensor_type": (g_tensor_type, 2), "offset": (g_offset, 2), "truncate": (g_truncate, 2),
    "dup_name": (g_dup_name, 1), "rename_tensor": (g_rename_tensor, 1), "drop": (g_drop, 1), "dup_kv": (g_dup_kv, 1),
    "retype_kv": (g_retype_kv, 2), "json_kv": (g_json_kv, 2), "string_kv": (g_string_kv, 1), "number_kv": (g_number_kv, 3),
    "rename_key": (g_rename_key, 1), "version": (g_version, 1), "alignment": (g_alignment, 1), "nan_data": (g_nan_data, 1),
    "dup_token": (g_dup_token, 2), "template": (g_template, 1), "norm_type": (g_norm_type, 2), "flip": (g_flip, 3), "splice": (g_splice, 1),
    "special_file": (g_special, 1),
}


def gguf_mutators(g: Gguf) -> dict[str, tuple[Callable, int]]:
    """The mutators that apply to this file (e.g. the tokenizer ones only to the text encoder)."""
    keys = {kv.key for kv in g.kvs}
    out = dict(GGUF_MUTATORS)
    if "tokenizer.ggml.tokens" not in keys:
        out.pop("dup_token")
    if "gguf_dit.text_encoder.template" not in keys:
        out.pop("template")
    if not any(kv.type == 8 and kv.value[:1] in (b"{", b"[") for kv in g.kvs):
        out.pop("json_kv")
    if not any(b"norm" in t.name and t.type == 0 for t in g.tensors):
        out.pop("norm_type")
    return out


# ------------------------------------------------------------------------------------------------------------------
# safetensors, config.json, tokenizer.json


def st_parse(b: bytes) -> tuple[dict, int]:
    n = struct.unpack_from("<Q", b, 0)[0]
    return json.loads(b[8:8 + n]), 8 + n


def st_bytes(header: dict | str, data: bytes) -> bytes:
    h = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def st_mutate(rng, b: bytes):
    header, ds = st_parse(b)
    data = b[ds:]
    names = sorted(k for k in header if k != "__metadata__")
    name = _pick(rng, names)
    ent = header[name]
    kind = _pick(rng, ["length", "json", "offsets", "offsets", "dtype", "dtype", "shape", "shape", "rename", "entry", "metadata", "truncate", "flip", "dupkey"])
    h = json.loads(json.dumps(header))
    if kind == "length":
        n = ds - 8
        v = int(_pick(rng, [0, n - 1, n + 1, n + 8, len(b), 2**32, 2**63 - 1, 2**64 - 1]))
        return _put(b, 0, "<Q", v), f"header length {n} -> {v}", True
    if kind == "json":
        i = int(rng.integers(8, ds))
        c = _pick(rng, list(b'{}[],:"\\0\xff'))
        return b[:i] + bytes([c]) + b[i + 1:], f"header byte {i} -> {bytes([c])!r}", False
    if kind == "offsets":
        s, e = ent["data_offsets"]
        other = h[_pick(rng, names)]["data_offsets"]
        v = _pick(rng, [[s, e + 1], [s, e - 1], [e, s], [s + 1, e + 1], [s, len(data) + 1], [2**40, 2**40 + e - s], [-8, e - s - 8],
                        other, [s], [s, e, e], ["0", e], [float(s), float(e)], None, [s, 2**64]])
        h[name]["data_offsets"] = v
        # safetensors requires the tensors to tile the data section exactly, so every one of these is invalid
        return st_bytes(h, data), f"{name!r} data_offsets {[s, e]} -> {v}", v != [s, e]
    if kind == "dtype":
        v = _pick(rng, ["F16", "BF16", "F32", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "XYZ", 5, None, ""])
        h[name]["dtype"] = v
        return st_bytes(h, data), f"{name!r} dtype {ent['dtype']} -> {v!r}", False
    if kind == "shape":
        sh = list(ent["shape"])
        v = _pick(rng, [[], [0], sh + [1], [1] + sh, sh[::-1], [-1] + sh[1:], [2**40] + sh[1:], [2**62, 4], [x * 2 for x in sh], "x", [1.5], None, [sh[0]] if len(sh) > 1 else [sh[0], 1]])
        h[name]["shape"] = v
        return st_bytes(h, data), f"{name!r} shape {sh} -> {v!r}", False
    if kind == "rename":
        new = _pick(rng, [re.sub(r"\d+", "99999999999", name, count=1) if re.search(r"\d", name) else "layers.99999999999.x.weight",
                          re.sub(r"\d+", "7", name, count=1), name + ".extra", "", "x" * 300])
        h[new] = h.pop(name)
        return st_bytes(h, data), f"{name!r} renamed to {new[:60]!r}", False
    if kind == "entry":
        v = _pick(rng, [5, "x", [1], None, {}, {"dtype": ent["dtype"]}, {"shape": ent["shape"], "data_offsets": ent["data_offsets"]}])
        h[name] = v
        return st_bytes(h, data), f"{name!r} entry -> {v!r}", False
    if kind == "metadata":
        v = _pick(rng, [[1], "x", {"format": 5}, {"format": {"a": 1}}, None])
        h["__metadata__"] = v
        return st_bytes(h, data), f"__metadata__ -> {v!r}", False
    if kind == "truncate":
        n = int(_pick(rng, [0, 4, 7, 8, int(rng.integers(8, ds)), ds, int(rng.integers(ds, len(b))), len(b) - 1]))
        return b[:n], f"truncated to {n} of {len(b)} bytes", True
    if kind == "flip":
        return generic_flip(rng, b, ds)
    # a key twice in the JSON object (json.loads keeps the last; a reader may not)
    raw = json.dumps(h, separators=(",", ":"))
    dup = json.dumps({name: h[_pick(rng, names)]}, separators=(",", ":"))[1:-1]
    return st_bytes(raw[:-1] + "," + dup + "}", data), f"{name!r} listed twice in the header", False


JSON_SWAPS: list[Any] = ["abc", [1, 2], None, 10**30, -7, 0, 1.5, True, {}, {"a": [None]}, float("nan"), float("inf"), "", [[]], 2**63, -2**63]


def json_paths(obj, rng, path=()):
    """A random path into a JSON document: descend into a random child, stopping at each level with some probability."""
    while True:
        if isinstance(obj, dict) and obj and rng.random() < 0.75:
            k = _pick(rng, list(obj))
            path, obj = path + (k,), obj[k]
        elif isinstance(obj, list) and obj and rng.random() < 0.6:
            i = int(rng.integers(len(obj)))
            path, obj = path + (i,), obj[i]
        else:
            return path


def json_mutate(rng, b: bytes, focus: list[tuple] | None = None):
    doc = json.loads(b)
    kind = _pick(rng, ["swap", "swap", "swap", "swap", "delete", "whole", "text"])
    if kind == "text":
        v = _pick(rng, [b"", b[: len(b) // 2], b"\xff\xfe" + b, b"[" * 100000, b"{" + b'"a":{' * 50000, b"\x00" * 10, b"NaN"])
        return v, f"file text -> {v[:24]!r}... ({len(v)} bytes)", False
    if kind == "whole":
        v = _pick(rng, [[], "x", 5, None, [doc]])
        return json.dumps(v).encode(), f"document -> {json.dumps(v)[:40]}", False
    if focus and rng.random() < 0.5:
        path = _pick(rng, [p for p in focus if _get(doc, p[:-1]) is not None and _has(_get(doc, p[:-1]), p[-1])])
    else:
        path = json_paths(doc, rng)
    if not path:
        path = (_pick(rng, list(doc)),) if isinstance(doc, dict) and doc else ()
    if not path:
        return b"[]", "document -> []", False
    parent = _get(doc, path[:-1])
    if kind == "delete":
        del parent[path[-1]]
        return json.dumps(doc).encode(), f"{'/'.join(map(str, path))} deleted", False
    v = _pick(rng, JSON_SWAPS)
    parent[path[-1]] = v
    return json.dumps(doc).encode(), f"{'/'.join(map(str, path))} -> {json.dumps(v)[:40]}", False


def _get(doc, path):
    for p in path:
        if not _has(doc, p):
            return None
        doc = doc[p]
    return doc


def _has(doc, p) -> bool:
    return (isinstance(doc, dict) and p in doc) or (isinstance(doc, list) and isinstance(p, int) and 0 <= p < len(doc))


TOKENIZER_FOCUS = [("model",), ("model", "vocab"), ("model", "merges"), ("model", "type"), ("added_tokens",), ("added_tokens", 0),
                   ("added_tokens", 0, "content"), ("added_tokens", 0, "id"), ("pre_tokenizer",), ("normalizer",), ("decoder",),
                   ("model", "merges", 0), ("pre_tokenizer", "pretokenizers"), ("added_tokens", 1, "special")]


def tokenizer_mutate(rng, b: bytes):
    doc = json.loads(b)
    if rng.random() < 0.3:
        vocab = doc["model"]["vocab"]
        toks = sorted(vocab)
        a, c = _pick(rng, toks), _pick(rng, toks)
        kind = int(rng.integers(3))
        if kind == 0:
            vocab[a] = vocab[c]
            what = f"vocab {a!r} id -> {vocab[c]} (the id of {c!r})"
        elif kind == 1:
            vocab[a] = _pick(rng, [-1, 10**9, "3", None, 1.5])
            what = f"vocab {a!r} id -> {vocab[a]!r}"
        else:
            doc["added_tokens"][0]["content"] = c
            what = f"added token 0 content -> {c!r} (already in the vocabulary)"
        return json.dumps(doc).encode(), what, False
    return json_mutate(rng, b, TOKENIZER_FOCUS)


def index_json(weights: Path) -> bytes:
    """A one-shard ``*.safetensors.index.json`` for ``weights``, as Hugging Face writes for sharded checkpoints."""
    header, _ = st_parse(weights.read_bytes()[:1 << 20])
    names = sorted(k for k in header if k != "__metadata__")
    return json.dumps({"metadata": {"total_size": weights.stat().st_size}, "weight_map": {n: weights.name for n in names}}, indent=2).encode()


def index_mutate(rng, b: bytes):
    doc = json.loads(b)
    if rng.random() < 0.4:
        return json_mutate(rng, b, [("weight_map",), ("metadata",), ("metadata", "total_size")])
    wm = doc["weight_map"]
    v = _pick(rng, ["missing.safetensors", "../vae/diffusion_pytorch_model.safetensors", "/dev/zero", ".", "", "config.json",
                    "x" * 300, 5, None, "/etc/passwd", "\u0000", ["a"]])
    keys = list(wm) if rng.random() < 0.3 else [_pick(rng, sorted(wm))]
    for k in keys:
        wm[k] = v
    return json.dumps(doc).encode(), f"weight_map {'every entry' if len(keys) > 1 else repr(keys[0])} -> {json.dumps(v)[:40]}", False


# ------------------------------------------------------------------------------------------------------------------
# prompts


CAPTION = {
    "high_level_description": "A red circle in the center.",
    "style_description": {"aesthetics": "flat", "lighting": "even", "photo": "none", "medium": "illustration", "color_palette": ["#FF0000"]},
    "compositional_deconstruction": {"background": "white", "elements": [{"type": "obj", "bbox": [300, 300, 700, 700], "desc": "a red circle"}]},
}


PROMPT_KINDS = ("nest", "huge", "junk", "utf8", "special", "empty", "nul", "field", "truncate", "surrogate", "longword", "bom", "mixed",
                "not_a_file")


def prompt_case(rng, index: int) -> tuple:
    """(file content, description, extra run options[, special file kind])."""
    base = _pick(rng, ["text", "json", "jsonl"])
    cap = json.loads(json.dumps(CAPTION))
    opts = ["--raw"] if rng.random() < 0.2 else []
    kind = PROMPT_KINDS[index % len(PROMPT_KINDS)]
    if kind == "not_a_file":
        special = _pick(rng, ["fifo", "dir", "devzero"])
        return b"", f"prompt file replaced by a {special}", opts, special
    if kind == "nest":
        n = int(_pick(rng, [50, 1000, 100000, 1000000]))
        body = _pick(rng, ["[" * n + "]" * n, '{"high_level_description":' * n, "[" * n])
        return body.encode(), f"JSON nested {n} deep", opts
    if kind == "huge":
        n = int(_pick(rng, [1 << 16, 1 << 20, 8 << 20]))
        text = ("a red circle " * (n // 13 + 1))[:n]
        if base != "text":
            cap["high_level_description"] = text
            text = json.dumps(cap)
        return text.encode() + b"\n", f"{base} prompt of {n} bytes", opts
    if kind == "junk":
        n = int(_pick(rng, [1, 16, 4096, 200000]))
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes(), f"{n} random bytes", opts
    if kind == "utf8":
        bad = _pick(rng, [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"])
        good = PROMPT.encode() if base == "text" else json.dumps(cap).encode()
        i = int(rng.integers(len(good)))
        return good[:i] + bad + good[i:], f"{base} with invalid UTF-8 {bad!r} at {i}", opts
    if kind == "special":
        tok = _pick(rng, ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "{caption}", "<|vision_start|>"])
        n = int(_pick(rng, [1, 100, 3000, 20000]))
        text = tok * n
        if base != "text":
            cap["high_level_description"] = text
            return json.dumps(cap).encode(), f"JSON caption of {n} x {tok!r}", opts
        return (text.replace("\n", " ") + "\n").encode(), f"text of {n} x {tok!r}", opts
    if kind == "empty":
        v = _pick(rng, [b"", b"\n\n", b"   \t\n", b"# only a comment\n", b"\xef\xbb\xbf", b"{}", b"[]", b"[{}]", b'""', b"null"])
        return v, f"prompt file {v!r}", opts
    if kind == "nul":
        return b"A red\x00circle\x00\n", "NUL bytes in the prompt", opts
    if kind == "field":
        path = json_paths(cap, rng) or ("high_level_description",)
        parent = _get(cap, path[:-1])
        v = _pick(rng, JSON_SWAPS + ["x" * 100000])
        parent[path[-1]] = v
        body = json.dumps(cap)
        if base == "jsonl":
            body = json.dumps(CAPTION) + "\n" + body
        return body.encode() + b"\n", f"caption {'/'.join(map(str, path))} -> {json.dumps(v)[:30]}", opts
    if kind == "truncate":
        body = json.dumps(cap, indent=1).encode()
        n = int(rng.integers(1, len(body)))
        return body[:n], f"JSON caption truncated to {n} bytes", opts
    if kind == "surrogate":
        return b'{"high_level_description": "a \\ud800 circle"}\n', "JSON with a lone surrogate escape", opts
    if kind == "longword":
        n = int(_pick(rng, [5000, 100000]))
        return (_pick(rng, ["x", "\u00e9", "\U0001F600", "ab"]) * n + "\n").encode(), f"one word of {n} characters", opts
    if kind == "bom":
        return b"\xef\xbb\xbf\xef\xbb\xbf" + PROMPT.encode(), "two byte-order marks", opts
    lines = [PROMPT.strip(), json.dumps(CAPTION), "", "# c", "\r", "\x0b\x0c", "\u2028", "\u00a0", "{not json"]
    picked = [_pick(rng, lines) for _ in range(int(rng.integers(1, 5)))]
    return ("\n".join(picked) + "\n").encode(), f"lines {picked!r}", opts


# ------------------------------------------------------------------------------------------------------------------
# cases


@dataclasses.dataclass
class Case:
    family: str
    seed: int
    index: int
    mutation: str
    description: str
    must_fail: bool
    target: str  # the mutated file, relative to the case folder
    content: bytes
    commands: list[list[str]]  # paths relative to the case folder
    special: str | None = None  # the target is a "fifo", a "dir" or a symlink to /dev/zero ("devzero") instead of content


CONVERT_TARGETS = [
    ("transformer/diffusion_pytorch_model.safetensors", "st", 4), ("transformer/config.json", "json", 2),
    ("transformer/diffusion_pytorch_model.safetensors.index.json", "index", 2), ("text_encoder/model.safetensors.index.json", "index", 1),
    ("unconditional_transformer/diffusion_pytorch_model.safetensors", "st", 1),
    ("text_encoder/model.safetensors", "st", 2), ("text_encoder/config.json", "json", 2), ("tokenizer/tokenizer.json", "tok", 3), ("tokenizer/tokenizer_config.json", "json", 1),
    ("vae/diffusion_pytorch_model.safetensors", "st", 2), ("vae/config.json", "json", 2),
]


def make_case(family: str, seed: int, index: int, inputs: "Inputs") -> Case:
    rng = np.random.default_rng([seed, FAMILIES.index(family), index])
    if family in GGUF_ROLES:
        b = inputs.gguf[family]
        table = gguf_mutators(inputs.layout[family])
        order = [n for k in range(3) for n in sorted(table) if table[n][1] > k]
        name = order[index % len(order)]  # the first cases of any seed go through every mutator
        fn = table[name][0]
        content, desc, must, *special = fn(rng, b, inputs.layout[family])
        target = f"model/{family}.gguf"
        # with the size hints mutated, let them choose the size
        size = [] if "gguf_dit.default_size" in desc or "gguf_dit.size_range" in desc else SIZE_ARGS
        run = ["run", "prompt.txt", "--model", "model", "-o", "out"] + size + RUN_ARGS
        cmds = [["inspect", target, "--check", "--json"], run]
        return Case(family, seed, index, name, desc, must, target, content, cmds, *special)
    if family == "convert":
        targets = [t for t in CONVERT_TARGETS if (inputs.checkpoint / t[0].removesuffix(".index.json")).exists()]
        target, kind = [t[:2] for t in targets for _ in range(t[2])][index % sum(t[2] for t in targets)]
        b = index_json(inputs.checkpoint / target.removesuffix(".index.json")) if kind == "index" else (inputs.checkpoint / target).read_bytes()
        fn = {"st": st_mutate, "json": json_mutate, "tok": tokenizer_mutate, "index": index_mutate}[kind]
        content, desc, must = fn(rng, b)
        part = target.split("/")[0]
        target = "ckpt/" + target
        if index % 4 == 3:  # the whole checkpoint: a part that fails after others were written must not leave them
            cmd = ["convert", "ckpt", "-o", "out", "-q"]
        elif part in ("transformer", "unconditional_transformer"):
            recipe = _pick(rng, ["q8_0", "f16", "q4_k-protect"])
            cmd = ["convert", f"ckpt/{part}", "-o", "out", "--recipe", recipe, "-q"]
        else:
            cmd = ["convert", "ckpt", "-o", "out", "--parts", "vae" if part == "vae" else "text_encoder", "-q"]
        return Case(family, seed, index, kind, desc, must, target, content, [cmd])
    content, desc, opts, *special = prompt_case(rng, index)
    return Case(family, seed, index, "prompt", desc, bool(special), "prompts/prompt.txt", content,
                [["run", "prompts/prompt.txt", "--model", "model", "-o", "out"] + SIZE_ARGS + RUN_ARGS + opts], *special)


@dataclasses.dataclass
class Inputs:
    root: Path
    gguf: dict[str, bytes]
    layout: dict[str, Gguf]
    checkpoint: Path


def prepare_inputs(root: Path, worker: "Worker") -> Inputs:
    """The demo model's GGUFs and a tiny checkpoint written by ``gguf-dit tiny-checkpoint`` (once per root)."""
    gguf = {r: (DEMO / f"{r}.gguf").read_bytes() for r in GGUF_ROLES}
    ck = root / "tiny-checkpoint"
    if not (ck / "vae" / "config.json").exists():
        shutil.rmtree(ck, ignore_errors=True)
        res = worker.invoke(["tiny-checkpoint", str(ck)], root)
        if res.get("code") != 0:
            raise RuntimeError(f"tiny-checkpoint failed: {res}")
    return Inputs(root, gguf, {r: parse_gguf(b) for r, b in gguf.items()}, ck)


def _folders(part: str) -> list[str]:
    """The checkpoint folders convert reads together with ``part``."""
    return ["text_encoder", "tokenizer"] if part in ("text_encoder", "tokenizer") else [part]


def lay_out_case(case: Case, inputs: Inputs, d: Path) -> None:
    d.mkdir(parents=True)
    if case.family == "convert":
        whole = case.commands[0][1] == "ckpt" and "--parts" not in case.commands[0]
        for p in sorted(os.listdir(inputs.checkpoint)) if whole else _folders(case.target.split("/")[1]):
            shutil.copytree(inputs.checkpoint / p, d / "ckpt" / p)
    else:
        (d / "model").mkdir()
        for r in GGUF_ROLES:
            (d / "model" / f"{r}.gguf").write_bytes(inputs.gguf[r])
        (d / "prompt.txt").write_text(PROMPT)
    t = d / case.target
    t.parent.mkdir(parents=True, exist_ok=True)
    t.unlink(missing_ok=True)
    if case.special == "fifo":
        os.mkfifo(t)
    elif case.special == "dir":
        t.mkdir()
    elif case.special == "devzero":
        t.symlink_to("/dev/zero")
    else:
        t.write_bytes(case.content)


def snapshot(d: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(d):
        rel = os.path.relpath(dirpath, d)
        out[rel + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):  # never open a FIFO or follow a link to a device
                out[os.path.normpath(os.path.join(rel, f))] = f"mode {st.st_mode:o}"
                continue
            out[os.path.normpath(os.path.join(rel, f))] = f"{st.st_size}:{hashlib.sha256(Path(p).read_bytes()).hexdigest()}"
    return out


# ------------------------------------------------------------------------------------------------------------------
# the worker: imports gguf_dit once, runs CLI invocations in-process with fds 1 and 2 captured


def worker_main(fd: int) -> None:
    import ctypes
    import gc
    import importlib
    import logging
    import traceback

    from gguf_dit.cli import app
    # imported here so that no case's timeout pays for it
    for m in ("converter.convert", "runtime.pipeline", "runtime.text_encoder", "runtime.vae"):
        importlib.import_module("gguf_dit." + m)

    libc = ctypes.CDLL(None)
    own: list[str] = []

    class Own(logging.Handler):
        """Prints like logging's last-resort handler (what the console script shows) and remembers the lines our
        own Python code logged, so that they can be told from native llama.cpp/ggml lines."""

        def emit(self, record: logging.LogRecord) -> None:
            msg = self.format(record)
            sys.stderr.write(msg + "\n")
            native = record.module == "_lib" and record.funcName == "__call__"  # ggml_ops._lib.LineLogger
            if record.name.startswith("gguf_dit") and not native:
                own.extend(msg.splitlines())

    logging.getLogger().addHandler(Own(logging.WARNING))
    chan = os.fdopen(fd, "w", buffering=1)
    cap = Path(os.environ["GGUF_DIT_FUZZ_CAPTURE"])
    for line in sys.stdin:
        job = json.loads(line)
        own.clear()
        chan.write(f"start {job['id']}\n")
        files = [open(cap / n, "w+b") for n in ("out", "err")]
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(files[0].fileno(), 1)
        os.dup2(files[1].fileno(), 2)
        os.chdir(job["cwd"])
        tb = None
        t0 = time.perf_counter()
        try:
            app(args=job["argv"], prog_name="gguf-dit")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001 - any escaping exception is what the fuzzer looks for
            code = None
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-12))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            libc.fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for s in saved:
                os.close(s)
            os.chdir("/")
        seconds = time.perf_counter() - t0
        texts = []
        for f in files:
            f.seek(0)
            texts.append(f.read(1 << 20).decode("utf-8", "replace"))
            f.close()
        gc.collect()
        chan.write("done " + json.dumps({"code": code, "stdout": texts[0], "stderr": texts[1], "traceback": tb, "seconds": seconds,
                                        "logged": own}) + "\n")


class Worker:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.n = 0

    def _start(self) -> None:
        r, w = os.pipe()
        self.capture = Path(tempfile.mkdtemp(prefix="capture-", dir=self.tmp.parent))
        env = dict(os.environ, TMPDIR=str(self.tmp), GGML_NO_BACKTRACE="1", GGUF_DIT_FUZZ_CAPTURE=str(self.capture),
                   PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))

        def limits():
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
            os.setsid()

        self.log = open(self.tmp.parent / "worker.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(w)], stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=self.log, pass_fds=(w,), env=env, preexec_fn=limits, cwd="/")
        os.close(w)
        self.chan = r
        self.buf = ""

    def _line(self, deadline: float) -> str | None:
        while "\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.chan], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.chan, 1 << 20).decode()
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split("\n", 1)
        return line

    def invoke(self, argv: list[str], cwd: Path, timeout: float = TIMEOUT_S, startup: float = 180.0) -> dict:
        """Run one CLI invocation; a dict with code (int, None for a Python exception), stdout, stderr, traceback,
        or signal / hang when the worker died or stopped answering."""
        if self.proc is None:
            self._start()
        self.n += 1
        self.proc.stdin.write((json.dumps({"id": self.n, "argv": argv, "cwd": str(cwd)}) + "\n").encode())
        self.proc.stdin.flush()
        line = self._line(time.monotonic() + startup)
        if line == f"start {self.n}":
            line = self._line(time.monotonic() + timeout)
        if line and line.startswith("done "):
            return json.loads(line[5:])
        if line is None:
            self.stop()
            return {"code": None, "hang": True, "stdout": "", "stderr": "", "traceback": None}
        rc = self.proc.wait()
        self._release()
        return {"code": None, "signal": -rc if rc < 0 else None, "exit": rc, "stdout": "", "stderr": "", "traceback": None}

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self._release()

    def _release(self) -> None:
        os.close(self.chan)
        self.proc.stdin.close()
        self.log.close()
        shutil.rmtree(self.capture, ignore_errors=True)
        self.proc = None


# ------------------------------------------------------------------------------------------------------------------
# classification


@dataclasses.dataclass
class Outcome:
    case: Case
    argv: list[str]
    status: str  # "ok", "error" (clean) or "FAIL"
    kind: str  # failure class key
    detail: str
    seconds: float = 0.0

    def reproducer(self) -> str:
        return f"python tests/_fuzz.py --family {self.case.family} --seed {self.case.seed} --case {self.case.index} --keep /tmp/fuzz-case"


_TB_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _tb_class(tb: str) -> str:
    last = tb.strip().splitlines()[-1]
    exc = last.split(":")[0]
    frames = [m for m in _TB_FRAME.finditer(tb) if "/gguf_dit/" in m.group(1) or f"{REPO}/" in m.group(1)]
    where = f" in {Path(frames[-1].group(1)).name}:{frames[-1].group(3)}" if frames else ""
    return f"traceback {exc}{where}"


def _norm(msg: str) -> str:
    msg = re.sub(r"/\S+", "PATH", msg)
    msg = re.sub(r"'[^']*'", "'…'", msg)
    return re.sub(r"\d+", "N", msg)[:90]


def classify(case: Case, argv: list[str], res: dict, before: dict, after: dict, tmp_left: list[str]) -> Outcome:
    cmd = argv[0]

    def out(status, kind, detail):
        return Outcome(case, argv, status, f"{case.family} {cmd}: {kind}" if kind else "", detail, res.get("seconds") or 0.0)

    if res.get("hang"):
        return out("FAIL", f"hang (> {TIMEOUT_S:.0f} s)", case.description)
    if res.get("signal"):
        return out("FAIL", f"killed by signal {res['signal']} ({signal.Signals(res['signal']).name})", case.description)
    if res.get("exit") is not None and res["code"] is None and res.get("traceback") is None:
        return out("FAIL", f"worker exited with {res['exit']}", case.description)
    if res["traceback"]:
        return out("FAIL", _tb_class(res["traceback"]), res["traceback"].strip().splitlines()[-1][:300])
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    if changed:
        return out("FAIL", "input changed or removed", ", ".join(changed))
    new = sorted(k for k in after if k not in before)
    lines = [ln for ln in res["stderr"].splitlines() if ln.strip()]
    logged = set(res.get("logged") or ())
    noise = [ln for ln in lines if not ln.startswith(("warning: ", "error: ")) and ln not in logged]
    code = res["code"]
    if code == 0:
        if noise:
            return out("FAIL", "exit 0 with foreign lines on stderr", noise[0][:200])
        if tmp_left:
            return out("FAIL", "temporary files left behind", ", ".join(tmp_left[:5]))
        # inspect describes broken files (exit 0 with warnings, or 2 with problems); only run must refuse them
        if case.must_fail and cmd == "run":
            return out("FAIL", f"bad input accepted ({case.mutation})", case.description)
        return out("ok", "", "")
    if code != 2:
        return out("FAIL", f"exit code {code}", (lines[-1] if lines else "")[:300])
    if tmp_left or new:
        return out("FAIL", "leftover after an error", ", ".join((new + tmp_left)[:5]))
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if noise:
        return out("FAIL", "error preceded by foreign stderr lines", noise[0][:200])
    if len(errors) != 1 or not lines[-1].startswith("error: "):
        return out("FAIL", "not exactly one error line", " | ".join(lines)[:300])
    target = Path(case.target)
    # convert reads a part's folder(s) as a unit (config.json against the weights, tokenizer against the embedding):
    # naming any file of that part, or its folder, points the user at the right place
    folder = case.family == "convert" and any(re.search(rf"ckpt/{f}\b", errors[0]) for f in _folders(target.parent.name))
    if f"{target.parent.name}/{target.name}" not in errors[0] and not folder:
        return out("FAIL", f"error names no {target.name}: {_norm(errors[0])}", errors[0][:300])
    return out("error", "", errors[0])


# ------------------------------------------------------------------------------------------------------------------
# driver


@dataclasses.dataclass
class Report:
    outcomes: list[Outcome]
    seconds: float

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "FAIL"]

    def summary(self) -> str:
        fails = self.failures()
        n_cases = len({(o.case.family, o.case.index) for o in self.outcomes})
        counts = {s: sum(o.status == s for o in self.outcomes) for s in ("ok", "error", "FAIL")}
        lines = [f"{n_cases} cases, {len(self.outcomes)} invocations in {self.seconds:.0f} s: {counts['ok']} ok, "
                 f"{counts['error']} clean errors, {counts['FAIL']} failures"]
        classes: dict[str, list[Outcome]] = {}
        for o in fails:
            classes.setdefault(o.kind, []).append(o)
        slow = sorted(self.outcomes, key=lambda o: -o.seconds)[:3]
        lines.append("  slowest: " + ", ".join(f"{o.case.family} case {o.case.index} {o.argv[0]} {o.seconds:.1f} s" for o in slow))
        for kind, os_ in sorted(classes.items(), key=lambda kv: -len(kv[1])):
            o = os_[0]
            lines.append(f"  [{len(os_)}x] {kind}\n      e.g. case {o.case.index} ({o.case.mutation}: {o.case.description[:160]}) -> {o.detail[:240]}\n"
                         f"      reproduce: {o.reproducer()}")
        return "\n".join(lines)


class Fuzzer:
    """One worker and the shared inputs, reused by every family run in one session."""

    def __init__(self, root: Path | None = None) -> None:
        self._own = root is None
        self.root = Path(tempfile.mkdtemp(prefix="gguf-dit-fuzz-")) if root is None else root
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.worker = Worker(self.tmp)
        self.inputs = prepare_inputs(self.root, self.worker)

    def run_case(self, case: Case, keep: Path | None = None, verbose: bool = False) -> list[Outcome]:
        d = keep or (self.root / "cases" / f"{case.family}-{case.index}")
        if d.exists():
            shutil.rmtree(d)
        lay_out_case(case, self.inputs, d)
        outcomes = []
        before = snapshot(d)
        for argv in case.commands:
            tmp_before = set(os.listdir(self.tmp))
            res = self.worker.invoke(argv, d)
            after = snapshot(d)
            tmp_left = sorted(set(os.listdir(self.tmp)) - tmp_before)
            o = classify(case, argv, res, before, after, tmp_left)
            if verbose:
                print(f"$ cd {d} && gguf-dit {' '.join(argv)}\n  -> code {res.get('code')} {res.get('signal') or ''}"
                      f"{' HANG' if res.get('hang') else ''} ({res.get('seconds', 0):.2f} s)\n  stdout: {res['stdout'][-1500:]!r}\n  stderr: {res['stderr'][-3000:]}"
                      f"{res['traceback'] or ''}\n  => {o.status} {o.kind} {o.detail[:500]}")
            outcomes.append(o)
            for p in tmp_left:
                shutil.rmtree(self.tmp / p, ignore_errors=True)
                (self.tmp / p).unlink(missing_ok=True)
            if o.status == "FAIL":
                break
            before = {k: v for k, v in after.items() if k in before}  # outputs of a successful command are not inputs
        if keep is None:
            shutil.rmtree(d, ignore_errors=True)
        return outcomes

    def run_family(self, family: str, n: int, seed: int, progress: Callable[[Outcome], None] | None = None) -> Report:
        t0 = time.perf_counter()
        outs = []
        for i in range(n):
            for o in self.run_case(make_case(family, seed, i, self.inputs)):
                outs.append(o)
                if progress:
                    progress(o)
        return Report(outs, time.perf_counter() - t0)

    def close(self) -> None:
        self.worker.stop()
        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--family", action="append", choices=FAMILIES, help="repeatable; default: all")
    ap.add_argument("--cases", type=int, help="cases per family (default: the test's numbers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", type=int, help="run only this case index, verbosely")
    ap.add_argument("--keep", type=Path, help="with --case: write the case folder here and keep it")
    ap.add_argument("--root", type=Path, help="work folder to reuse between runs (keeps the tiny checkpoint)")
    a = ap.parse_args(argv)
    if a.worker is not None:
        worker_main(a.worker)
        return 0
    fz = Fuzzer(a.root)
    try:
        fams = a.family or list(FAMILIES)
        if a.case is not None:
            for f in fams:
                case = make_case(f, a.seed, a.case, fz.inputs)
                print(f"{f} case {a.case}: {case.mutation}: {case.description} (must fail: {case.must_fail})")
                fz.run_case(case, keep=a.keep.resolve() if a.keep else None, verbose=True)
            return 0
        failed = 0
        for f in fams:
            rep = fz.run_family(f, a.cases or DEFAULT_CASES[f], a.seed)
            failed += len(rep.failures())
            print(f"== {f}: {rep.summary()}", flush=True)
        return 1 if failed else 0
    finally:
        fz.close()


if __name__ == "__main__":
    sys.exit(main())
