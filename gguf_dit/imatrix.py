"""Importance matrices: per input column of every linear, the sum of squared activations and how many were summed.

One file per backbone, in llama.cpp's legacy binary layout (``llama-imatrix --output-format dat``), which is what
stable-diffusion.cpp's ``--imat-out`` writes and ``--imat-in`` reads. All fields little-endian::

    int32 n_entries
    n_entries x { int32 len; char name[len]; int32 ncall; int32 nval; float32 values[nval] }
    int32 last_chunk                      chunks the matrix was computed with (sd.cpp writes it, reads nothing after
                                          the entries)
    int32 len; char dataset[len]          llama.cpp only, optional

Readers take ``values / ncall`` as the mean square (llama-quantize divides; sd.cpp's ``-M convert`` passes
``values`` undivided, a per-tensor factor ggml's weighted search all but ignores: measured, ≥ 99.5 % of the bytes
identical for every K-quant, the rest float rounding; llama-imatrix and sd.cpp add
``values`` and ``ncall`` when merging files). We store ``values = sums`` and ``ncall = count`` (the number of
activation rows summed), which is the same mean square and loses nothing on the way back; the readers' merges then
weight files by rows rather than by calls.

Names are stable-diffusion.cpp's, its weight names inside the ggml graph: ``model.diffusion_model.`` + our GGUF name
for the conditional backbone and ``model.diffusion_model.uncond.`` + it for the unconditional one (sd.cpp loads
``--uncond-diffusion-model`` under that prefix, so one ``--imat-out`` file of a run holds both). Reading also takes
bare names (our own GGUF names) and llama.cpp's newer GGUF imatrix files (``<name>.in_sum2`` / ``<name>.counts``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from gguf_dit.arch.dit import BACKBONE_DIRS
from gguf_dit.errors import ImatrixError

#: stable-diffusion.cpp's prefix of each backbone's weight names (its ``model.diffusion_model`` runner prefix, and
#: ``.uncond`` for the model given by ``--uncond-diffusion-model``).
SDCPP_PREFIX = {"cond": "model.diffusion_model.", "uncond": "model.diffusion_model.uncond."}
#: A calibration folder's file per backbone role.
FILE_NAMES = {role: f"{d}.imatrix" for d, role in BACKBONE_DIRS.items()}
#: Names of other models' weights that sd.cpp collects in the same run (text encoders, VAE): not ours, not an error.
_FOREIGN = ("text_encoders.", "cond_stage_model.", "first_stage_model.", "vae.", "model.", "blk.", "token_embd.", "output.")
_I32_MAX = 2**31 - 1
#: Importance below this fraction of a tensor's mean counts as this much: a block whose columns all had zero
#: importance (never active in calibration) would otherwise be quantized to zeros by ggml's weighted search.
FLOOR = 1e-6
_MAX_NAME = 1 << 16


def quant_weights(importance: np.ndarray) -> np.ndarray:
    """The ``quant_weights`` ``convert --imatrix`` hands ggml for an importance vector: floored at :data:`FLOOR` of
    its mean (all ones when it is all zero). Whoever quantizes "as convert does" calls this, for the same bytes."""
    v = np.asarray(importance, dtype=np.float32)
    mean = float(v.mean())
    return np.maximum(v, np.float32(FLOOR * mean)) if mean > 0 else np.ones_like(v)


def ggml_weights(type_, weights: np.ndarray | None, k: int, *, weighted: bool = True) -> np.ndarray | None:
    """What ``convert`` passes ``ggml_quantize_chunk`` for rows of ``k`` columns of ``type_``: ``weights`` (from
    :func:`quant_weights`) where the type takes them, else uniform ones for K-quants on the weighted path
    (stable-diffusion.cpp's bytes) or none (llama-quantize's reference search). One rule for convert and calibrate."""
    if weights is not None and type_.traits.imatrix:
        return weights
    return np.ones(k, dtype=np.float32) if type_.traits.k_quant and weighted else None


@dataclasses.dataclass
class ImatrixEntry:
    """Σx² per input column (float32, shape (K,)) over ``count`` activation rows."""

    sums: np.ndarray
    count: int

    def __post_init__(self) -> None:
        self.sums = np.ascontiguousarray(self.sums, dtype=np.float32).reshape(-1)
        self.count = int(self.count)

    def importance(self) -> np.ndarray:
        # llama-quantize's reading: no division when ncall is 0
        return self.sums / np.float32(self.count) if self.count > 0 else self.sums.copy()


@dataclasses.dataclass
class Imatrix:
    """One backbone's importance matrix, keyed by our GGUF tensor names.

    ``unknown``: names read from a file that belong to no backbone (text encoder, VAE, an LLM's ``blk.*``); the
    caller warns about them. ``other``: entries of the other backbone found in the same file (an sd.cpp run's file
    holds both), kept so one file can serve both.
    """

    entries: dict[str, ImatrixEntry]
    chunks: int = 0
    dataset: str = ""
    unknown: tuple[str, ...] = ()
    other: dict[str, ImatrixEntry] = dataclasses.field(default_factory=dict)
    path: Path | None = None
    digest: str = ""  # sha256 of the bytes read (what was used, even if the file changes later)

    def importance(self, name: str) -> np.ndarray:
        """``sums / count`` for ``name`` (what ``ggml_quantize_chunk`` takes as ``quant_weights``)."""
        try:
            return self.entries[name].importance()
        except KeyError:
            raise ImatrixError("has no entry", path=self.path, tensor=name) from None

    # -- writing

    def write(self, path: str | Path, role: str | None = None) -> None:
        """Write the legacy layout with sd.cpp's names for ``role`` (``cond``/``uncond``; default: ``uncond`` when
        the file name starts with ``unconditional``), atomically (a temporary file renamed into place)."""
        path = Path(path)
        prefix = SDCPP_PREFIX[_role(path, role)]
        if not self.entries:  # llama.cpp's readers (and ours) refuse an entry count below 1
            raise ImatrixError("has no entries: an empty imatrix file would be unreadable", path=path)
        parts = [struct.pack("<i", len(self.entries))]
        for name, e in self.entries.items():
            if not np.isfinite(e.sums).all() or (e.sums < 0).any() or e.count < 0:
                raise ImatrixError("sums must be finite and non-negative, count non-negative", path=path, tensor=name)
            sums, count = e.sums, e.count
            if count > _I32_MAX:  # int32 ncall: keep the mean square, give up on the exact row count
                sums, count = sums * np.float32(_I32_MAX / count), _I32_MAX
            raw = (prefix + name).encode()
            parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", count, sums.size), sums.astype("<f4").tobytes()]
        ds = self.dataset.encode()
        parts += [struct.pack("<ii", min(self.chunks, _I32_MAX), len(ds)), ds]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(b"".join(parts))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ImatrixError(f"cannot write ({e.strerror or e})", path=path) from None

    # -- reading

    @classmethod
    def read(cls, path: str | Path, role: str | None = None) -> "Imatrix":
        """Read a legacy imatrix (ours, llama.cpp's, sd.cpp's) or llama.cpp's GGUF imatrix, for backbone ``role``
        (default as in :meth:`write`). A truncated or garbled file is an :class:`ImatrixError` naming it."""
        path = Path(path)
        role = _role(path, role)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImatrixError("imatrix file not found", path=path) from None
        except OSError as e:
            raise ImatrixError(f"cannot read ({e.strerror or e})", path=path) from None
        if data[:4] == b"GGUF":
            raw, chunks, dataset = _read_gguf(path)
        else:
            raw, chunks, dataset = _read_legacy(path, data)
        mine, other, unknown = {}, {}, []
        for name, e in raw.items():
            owner, bare = _split(name)
            if owner is None:
                unknown.append(name)
            else:
                (mine if owner in (role, "") else other)[bare] = e
        return cls(mine, chunks, dataset, tuple(unknown), other, path, hashlib.sha256(data).hexdigest())

    def sha256(self) -> str:
        """Hash of the file this was read from (what a conversion records)."""
        if not self.digest:
            raise ImatrixError("was not read from a file; no hash")
        return self.digest


def _role(path: Path, role: str | None) -> str:
    if role is None:
        return "uncond" if path.name.startswith("unconditional") else "cond"
    if role not in SDCPP_PREFIX:
        raise ImatrixError(f"unknown backbone role {role!r}; use cond or uncond", path=path)
    return role


def _split(name: str) -> tuple[str | None, str]:
    """(role, our name) of a name in a file; role "" for a bare name (either backbone), None for a foreign one."""
    for role in ("uncond", "cond"):  # the longer prefix first
        if name.startswith(SDCPP_PREFIX[role]):
            return role, name[len(SDCPP_PREFIX[role]):]
    if name.startswith(_FOREIGN) or not name.endswith(".weight"):
        return None, name
    return "", name


def _read_legacy(path: Path, data: bytes) -> tuple[dict[str, ImatrixEntry], int, str]:
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise ImatrixError(f"truncated or not an imatrix file: {what} needs {n} bytes at offset {pos}, "
                               f"the file has {len(data)}", path=path)
        pos += n
        return data[pos - n:pos]

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n = i32("the entry count")
    if n < 1 or n > len(data) // 13:  # an entry takes at least 13 bytes
        raise ImatrixError(f"not an imatrix file (entry count {n})", path=path)
    out: dict[str, ImatrixEntry] = {}
    for i in range(n):
        length = i32(f"entry {i}'s name length")
        if not 0 < length <= _MAX_NAME:
            raise ImatrixError(f"garbled: entry {i} has a name length of {length}", path=path)
        try:
            name = take(length, f"entry {i}'s name").decode()
        except UnicodeDecodeError:
            raise ImatrixError(f"garbled: entry {i}'s name is not UTF-8", path=path) from None
        ncall, nval = i32(f"{name}'s ncall"), i32(f"{name}'s nval")
        if ncall < 0 or nval < 1:
            raise ImatrixError(f"garbled: ncall {ncall}, nval {nval}", path=path, tensor=name)
        values = np.frombuffer(take(4 * nval, f"{name}'s {nval} values"), dtype="<f4").astype(np.float32)
        if not np.isfinite(values).all() or (values < 0).any():
            raise ImatrixError("garbled: values must be finite and non-negative", path=path, tensor=name)
        if name in out:  # the readers add repeated entries up
            if out[name].sums.size != nval:
                raise ImatrixError(f"repeated with {nval} values, first with {out[name].sums.size}", path=path, tensor=name)
            values, ncall = values + out[name].sums, ncall + out[name].count
        out[name] = ImatrixEntry(values, ncall)
    chunks, dataset = 0, ""
    if pos < len(data):
        chunks = i32("the chunk count")
    if pos < len(data):
        dataset = take(i32("the dataset name length"), "the dataset name").decode(errors="replace")
    if pos != len(data):
        raise ImatrixError(f"garbled: {len(data) - pos} unexpected bytes after the data", path=path)
    return out, chunks, dataset


def _read_gguf(path: Path) -> tuple[dict[str, ImatrixEntry], int, str]:
    import gguf

    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/struct.error/IndexError on garbage
        raise ImatrixError(f"unreadable GGUF imatrix ({e})", path=path) from None
    tensors = {t.name: t for t in r.tensors}
    out = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise ImatrixError("GGUF imatrix has in_sum2 without counts", path=path, tensor=base)
        sums = np.asarray(t.data, dtype=np.float32)
        if sums.ndim > 1 and sums.shape[0] > 1:
            raise ImatrixError("per-expert (3-D) entries are not supported", path=path, tensor=base)
        n = np.asarray(counts.data).reshape(-1)
        if n.size != 1 or not np.isfinite(sums).all() or (sums < 0).any() or not (np.isfinite(n[0]) and n[0] >= 0):
            raise ImatrixError("garbled: needs one finite count and finite non-negative sums", path=path, tensor=base)
        out[base] = ImatrixEntry(sums.reshape(-1), int(n[0]))
    if not out:
        raise ImatrixError("GGUF file holds no imatrix entries (<name>.in_sum2)", path=path)

    def field(key: str):
        f = r.get_field(key)
        return f.contents() if f is not None else None

    datasets = field(gguf.Keys.IMatrix.DATASETS) or []
    return out, int(field(gguf.Keys.IMatrix.CHUNK_COUNT) or 0), ",".join(datasets) if isinstance(datasets, list) else str(datasets)


def for_backbones(src: str | Path) -> dict[str, Imatrix]:
    """A CALIB_DIR (one file per backbone, :data:`FILE_NAMES`) or one file (an sd.cpp run's, holding both
    backbones' entries; a bare-named file serves the conditional one) as {role: Imatrix}. A role without a file
    in the folder, or without an entry in the one file, is left out."""
    src = Path(src)
    if src.is_dir():
        found = {role: Imatrix.read(src / name, role) for role, name in FILE_NAMES.items() if (src / name).is_file()}
        if not found:
            raise ImatrixError(f"holds neither {' nor '.join(FILE_NAMES.values())}", path=src)
        return found
    cond = Imatrix.read(src, "cond")
    uncond = dataclasses.replace(cond, entries=cond.other, other={})
    cond = dataclasses.replace(cond, other={})
    # a role without entries is left out (it would otherwise record an imatrix it never used); an empty file
    # still goes to cond, whose matching then warns about its stray names
    found = {role: im for role, im in (("cond", cond), ("uncond", uncond)) if im.entries}
    return found or {"cond": cond}
