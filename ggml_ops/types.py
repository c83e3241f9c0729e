"""ggml tensor types: ids, block sizes, and the row-size rules ggml itself does not check."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Sequence

from gguf_dit.errors import GGMLError

from ._lib import lib


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ4_NL = 20
    BF16 = 30

    @classmethod
    def parse(cls, name: str) -> "GGMLType":
        key = name.strip().upper().replace("-", "_")
        try:
            return cls[key]
        except KeyError:
            valid = ", ".join(t.name.lower() for t in STORAGE_TYPES)
            raise GGMLError(f"unknown tensor type {name!r}; valid types: {valid}") from None

    @property
    def block_size(self) -> int:
        return int(lib.ggml_blck_size(int(self)))

    @property
    def type_size(self) -> int:
        return int(lib.ggml_type_size(int(self)))

    @property
    def traits(self) -> "TypeTraits":
        return TRAITS[self]

    @property
    def is_quantized(self) -> bool:
        return self.traits.quantized

    def row_bytes(self, n_per_row: int) -> int:
        check_row(self, n_per_row)
        return int(lib.ggml_row_size(int(self), n_per_row))

    def nbytes(self, ne: Sequence[int]) -> int:
        """Bytes of a contiguous tensor of this type, ``ne`` in ggml order (row length first)."""
        return self.row_bytes(ne[0]) * math.prod(ne[1:])


@dataclasses.dataclass(frozen=True)
class TypeTraits:
    """What gguf-dit does differently per type, in one table (as gguf-py's ``quants.py`` keys its codecs by type).

    ``encoder``: how float rows become stored bytes: ``"numpy"`` (F32, F16), ``"torch"`` (BF16, round to nearest
    even) or ``"ggml"`` (``ggml_quantize_chunk``). ``k_quant``: a K-quant, whose ggml search is importance-weighted
    when given an importance vector (stable-diffusion.cpp's bytes) and the reference search without one.
    ``f16_scales``: values beyond F16's range cannot be stored (F16 itself, and every quantized type, whose block
    scales are F16). ``f32_acc``: matmuls against it ask ggml for F32 accumulation (F16/BF16 weights).
    ``fallback``: the type tried next when a row length is not a multiple of the block size (quantized types fall
    back to Q8_0, then F16; Q8_0 to F16). ``storage``: may hold a weight (Q8_K is an activation-only type:
    quantizing to it aborts ggml). ``imatrix``: ggml's quantizer takes an importance vector (``quant_weights``) and
    its bytes depend on it (every K-quant and the 4/5-bit block types; Q8_0 ignores it).
    """

    quantized: bool
    encoder: str
    k_quant: bool = False
    f16_scales: bool = True
    f32_acc: bool = False
    fallback: "GGMLType | None" = None
    storage: bool = True
    imatrix: bool = False


def _q(fallback: GGMLType | None = GGMLType.Q8_0, **kw) -> TypeTraits:
    return TypeTraits(quantized=True, encoder="ggml", fallback=fallback, **kw)


T = GGMLType
TRAITS: dict[GGMLType, TypeTraits] = {
    T.F32: TypeTraits(quantized=False, encoder="numpy", f16_scales=False),
    T.F16: TypeTraits(quantized=False, encoder="numpy", f32_acc=True),
    T.BF16: TypeTraits(quantized=False, encoder="torch", f16_scales=False, f32_acc=True),
    T.Q8_0: _q(fallback=T.F16),
    T.Q4_0: _q(imatrix=True), T.Q4_1: _q(imatrix=True), T.Q5_0: _q(imatrix=True), T.Q5_1: _q(imatrix=True), T.IQ4_NL: _q(imatrix=True),
    **{t: _q(k_quant=True, imatrix=True) for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)},
    T.Q8_K: _q(fallback=None, storage=False),
}
del T
assert set(TRAITS) == set(GGMLType)

#: Types a weight may be stored in.
STORAGE_TYPES = tuple(t for t in GGMLType if t.traits.storage)


def fitting_type(t: GGMLType, n_per_row: int) -> GGMLType | None:
    """``t`` if a row of ``n_per_row`` fits its blocks, else the first of its fallbacks that fits (None: none does)."""
    while t is not None and not fits(t, n_per_row):
        t = t.traits.fallback
    return t


def check_row(t: GGMLType, n_per_row: int, *, what: str = "") -> None:
    """ggml silently writes truncated blocks for a bad row length; refuse it here instead."""
    if not t.traits.storage:
        raise GGMLError(f"{what}Q8_K is an activation-only type and cannot store weights")
    bs = t.block_size
    if n_per_row <= 0 or n_per_row % bs:
        raise GGMLError(f"{what}{t.name} needs a row length divisible by {bs}, got {n_per_row}")


def fits(t: GGMLType, n_per_row: int) -> bool:
    return t.traits.storage and n_per_row > 0 and n_per_row % t.block_size == 0
