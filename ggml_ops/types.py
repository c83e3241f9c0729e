"""ggml tensor types: ids, block sizes, and the row-size rules ggml itself does not check."""

from __future__ import annotations

import enum

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
    def is_quantized(self) -> bool:
        return self not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16)

    def row_bytes(self, n_per_row: int) -> int:
        check_row(self, n_per_row)
        return int(lib.ggml_row_size(int(self), n_per_row))


#: Types a weight may be stored in (Q8_K is an activation-only type: quantizing to it aborts ggml).
STORAGE_TYPES = tuple(t for t in GGMLType if t is not GGMLType.Q8_K)


def check_row(t: GGMLType, n_per_row: int, *, what: str = "") -> None:
    """ggml silently writes truncated blocks for a bad row length; refuse it here instead."""
    if t is GGMLType.Q8_K:
        raise GGMLError(f"{what}Q8_K is an activation-only type and cannot store weights")
    bs = t.block_size
    if n_per_row <= 0 or n_per_row % bs:
        raise GGMLError(f"{what}{t.name} needs a row length divisible by {bs}, got {n_per_row}")


def fits(t: GGMLType, n_per_row: int) -> bool:
    return t is not GGMLType.Q8_K and n_per_row > 0 and n_per_row % t.block_size == 0
