"""A model file's sha256 and its AutoV2 short form (A1111's "Model hash": the first 10 hex digits), cached.

The hash cannot be stored inside the GGUF it hashes, and hashing a multi-GB file on every run would cost seconds,
so digests are cached in ``$XDG_CACHE_HOME/gguf-dit/hashes.json`` (``~/.cache/...`` without it), keyed by the
resolved path and valid while the file's size and mtime_ns are unchanged. `convert` fills the cache for the files
it writes; any other file is hashed once, on first use. Both sides use this module.

The cache is a convenience: a missing, corrupt or unwritable cache only means hashing again. Two processes updating
it at once may lose one entry (each replaces the file whole, atomically), which costs one more hash later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

from .files import write_json_atomic

log = logging.getLogger("gguf_dit.hashes")

#: Bytes read per call while hashing: large enough that the per-call overhead vanishes next to sha256 itself.
CHUNK = 16 << 20
#: Length of the AutoV2 short hash.
AUTOV2_LEN = 10


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gguf-dit" / "hashes.json"


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of the whole file, read in chunks."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _key(path: Path) -> tuple[str, dict]:
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load() -> dict:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(entries: dict[str, dict]) -> None:
    """Merge ``entries`` into the cache file, replacing it atomically; failures are logged, not raised."""
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(target, {**_load(), **entries}, indent=0, sort_keys=True)
    except OSError as e:
        log.debug("hash cache %s not updated: %s", target, e)


#: This process's hashes, so that an unwritable cache file means hashing once per process, not once per batch.
_seen: dict[str, dict] = {}


def sha256(path: str | os.PathLike) -> str:
    """The file's full sha256, from the cache while its size and mtime are unchanged, else computed and cached."""
    path = Path(path)
    key, stamp = _key(path)
    hit = _seen.get(key) or _load().get(key)
    if isinstance(hit, dict) and all(hit.get(k) == v for k, v in stamp.items()) and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    log.info("hashing %s (%.1f MB) once for the image metadata", path, stamp["size"] / 1e6)
    digest = sha256_file(path)
    _seen[key] = {**stamp, "sha256": digest}
    _store({key: _seen[key]})
    return digest


def autov2(path: str | os.PathLike) -> str:
    """A1111's AutoV2 model hash: the first 10 hex digits of the whole file's sha256."""
    return sha256(path)[:AUTOV2_LEN]


def remember(paths: Iterable[str | os.PathLike]) -> None:
    """Hash files just written (e.g. by `convert`, while they are in the page cache) and cache them in one update."""
    entries = {}
    for p in map(Path, paths):
        try:
            key, stamp = _key(p)
            entries[key] = {**stamp, "sha256": sha256_file(p)}
        except OSError as e:  # the file is written; its hash will be computed on first use instead
            log.debug("not hashed: %s: %s", p, e)
    if entries:
        _store(entries)
