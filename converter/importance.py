"""Importance vectors from an imatrix, matched to one backbone's conversion plan (``convert --imatrix``).

ggml's quantizers for every K-quant and the 4/5-bit block types weight each column's rounding error by
``quant_weights`` (``TypeTraits.imatrix``); an imatrix gives them the calibration's mean squared input per column,
so the columns the model's activations actually use are kept most exactly. Tensors of other types (F32/F16/BF16,
Q8_0) ignore it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from gguf_dit import keys
from gguf_dit.errors import ImatrixError
from gguf_dit.imatrix import Imatrix, quant_weights

_LISTED = 8  # names a warning spells out before "and N more"


@dataclasses.dataclass
class Importance:
    """What an imatrix gives one backbone: ``vectors`` (tensor name -> ggml's quant_weights) for every tensor whose
    type takes one and that has an entry, and the file's provenance for the metadata."""

    imatrix: Imatrix
    vectors: dict[str, np.ndarray]
    sha256: str

    def metadata(self, writer) -> None:
        writer.add_string(keys.IMATRIX_SHA256, f"sha256:{self.sha256}")
        writer.add_string(keys.IMATRIX_FILE, self.imatrix.path.name if self.imatrix.path else "")
        writer.add_string(keys.IMATRIX_DATASET, self.imatrix.dataset)
        writer.add_int32(keys.IMATRIX_N_ENTRIES, len(self.imatrix.entries))
        writer.add_int32(keys.IMATRIX_N_CHUNKS, self.imatrix.chunks)

    def smoothed(self, col: dict[str, np.ndarray]) -> "Importance":
        """For weights whose columns were multiplied by ``col[name]`` (activation smoothing): their inputs are
        divided by it, so the mean square the imatrix measured on the float model shrinks by its square."""
        return dataclasses.replace(self, vectors={n: v / np.square(col[n]) if n in col else v for n, v in self.vectors.items()})

    def mark(self, plans: list) -> list:
        """Plans whose reasons (``gguf_dit.recipe.tensors``) say which tensors were quantized with imatrix importance."""
        return [dataclasses.replace(p, why=f"{p.why}; imatrix importance") if p.name in self.vectors else p for p in plans]


def importance_for(role: str, where: str, plans: list, im: Imatrix, warn: Callable[[str], None]) -> Importance | None:
    """Match ``im``'s entries to ``plans`` (``convert.Plan``) of the ``role`` backbone read from ``where``: an entry
    whose length is not the tensor's input dimension is an error naming the file and tensor; tensors without an
    entry keep uniform importance and entries naming no linear of the backbone are ignored, both with a warning.
    None (and a warning) when no tensor's type takes importance (Q8_0, floats) or no such tensor has an entry:
    nothing records an unused imatrix."""
    shapes = {p.name: p.shape for p in plans}
    for name, e in im.entries.items():
        shape = shapes.get(name)
        if shape is not None and len(shape) == 2 and e.sums.size != shape[1]:
            raise ImatrixError(f"has {e.sums.size} importance values, but the {role} backbone's tensor has input dimension {shape[1]} "
                               f"({where}): an imatrix of another model?", path=im.path, tensor=name)
    stray = sorted(n for n in im.entries if len(shapes.get(n, ())) != 2) + list(im.unknown)
    if stray:
        warn(f"{im.path}: {len(stray)} entr{'y' if len(stray) == 1 else 'ies'} name{'s' if len(stray) == 1 else ''} no linear of the {role} backbone, ignored: {_names(stray)}")
    if not any(p.type.traits.imatrix for p in plans):
        warn(f"{im.path}: unused: none of the {role} backbone's tensor types takes importance (only K-quants and Q4_0/Q4_1/Q5_0/Q5_1/IQ4_NL do)")
        return None
    vectors, missing = {}, []
    for p in plans:
        if not p.type.traits.imatrix:
            continue
        if p.name not in im.entries:
            missing.append(p.name)
            continue
        vectors[p.name] = quant_weights(im.importance(p.name))
    if missing:
        warn(f"{im.path}: no entry for {len(missing)} of the {role} backbone's {len(missing) + len(vectors)} tensors "
             f"quantized to a type that uses one; they get uniform importance: {_names(missing)}")
    return Importance(im, vectors, im.sha256()) if vectors else None  # an imatrix that changed nothing is not recorded


def _names(names: list[str]) -> str:
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f" and {more} more" if more > 0 else "")
