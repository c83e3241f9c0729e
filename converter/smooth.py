"""Activation smoothing (SmoothQuant, Xiao et al. 2022) folded into the weights at conversion time.

ggml's quantized matmuls round the activations too, per block of the input dimension (Q8_0 blocks of 32 for Q8_0,
Q8_K blocks of 256 for K-quants), so a few large input columns cost every other column in their block its
precision. A per-input-column scale s moves that range into the weights: the linear's columns are multiplied by
s and the static weight that makes its input is divided by s, so the product is unchanged in exact arithmetic and
the output stays a standard GGUF with the standard tensor names. s_j = max|x_j|^α / max_i|W_ij|^(1-α), with
max|x_j| from calibration (``gguf-dit calibrate``'s ``<backbone>.act_absmax.safetensors``).

Only folds that are exact in the model (diffusers' ``transformer_ideogram4.py``: no biases in qkv/o/w1/w2/w3, the
block RMSNorms multiply by their weight, not 1 + weight):

* ``attention.qkv``'s input is RMSNorm(h)·attention_norm1.weight·(1 + scale_msa): s into attention_norm1.weight
  (the adaLN factor is per sample and elementwise, so it commutes);
* ``feed_forward.w1``/``w3`` share RMSNorm(h)·ffn_norm1.weight·(1 + scale_mlp): one s for both, into ffn_norm1;
* ``feed_forward.w2``'s input is silu(w1·x) ⊙ (w3·x), linear in each row of w3: s into w3's rows;
* ``attention.o``'s input is softmax(qkᵀ)·v per head, channel h·256 + d of o's input being row 2D + h·256 + d of qkv
  (q, k, v thirds; heads unflattened as (heads, head_dim)): s into qkv's v rows.

o and w2 are smoothed first: their folds change qkv's and w3's rows, whose column maxima the qkv and w1/w3 scales
then see.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np

from gguf_dit import keys
from gguf_dit.arch.dit import BACKBONE_DIRS, Ideogram4Config
from gguf_dit.errors import OptionError, SourceError

from .encode import check_range
from .inputs import _one_line

METHOD = "smoothquant"
#: calibrate writes one per backbone into CALIB_DIR: ``transformer.act_absmax.safetensors``, ...
ABSMAX_SUFFIX = ".act_absmax.safetensors"


@dataclasses.dataclass(frozen=True)
class Fold:
    linears: tuple[str, ...]  # weights sharing one input, each scaled by s along its columns
    prev: str  # the static weight making that input, divided by s
    rows: tuple[int, int] | None  # prev's rows feeding the input (2-D prev); None: a 1-D norm weight


def folds(cfg: Ideogram4Config) -> list[Fold]:
    """Every exact fold of one backbone, in the order the scales must be computed (see the module docstring)."""
    D, out = cfg.emb_dim, []
    for n in range(cfg.num_layers):
        a, f = f"layers.{n}.attention.", f"layers.{n}.feed_forward."
        out += [
            Fold((a + "o.weight",), a + "qkv.weight", (2 * D, 3 * D)),
            Fold((f + "w2.weight",), f + "w3.weight", (0, cfg.intermediate_size)),
            Fold((a + "qkv.weight",), f"layers.{n}.attention_norm1.weight", None),
            Fold((f + "w1.weight", f + "w3.weight"), f"layers.{n}.ffn_norm1.weight", None),
        ]
    return out


def absmax_file(src: Path, role: str) -> Path:
    """The calibration file for ``role``: ``src`` itself, or ``src/<backbone folder>.act_absmax.safetensors``."""
    return src / (next(d for d, r in BACKBONE_DIRS.items() if r == role) + ABSMAX_SUFFIX) if src.is_dir() else src


@dataclasses.dataclass
class Smoothing:
    """One backbone's calibrated activation maxima (checked against its config) and α."""

    path: Path
    alpha: float
    absmax: dict[str, np.ndarray]  # linear weight name -> float64 (in_features,)
    sha256: str

    @classmethod
    def load(cls, src: str | Path, role: str, cfg: Ideogram4Config, alpha: float) -> "Smoothing":
        from safetensors.numpy import load_file

        from gguf_dit.hashes import sha256_file

        if not 0.0 <= alpha <= 1.0:
            raise OptionError(f"--smooth-alpha must be within 0..1, got {alpha}")
        path = absmax_file(Path(src), role)
        if not path.is_file():
            raise SourceError("activation maxima file not found (written by `gguf-dit calibrate`)", path=path)
        try:
            found = load_file(str(path))
        except Exception as e:
            raise SourceError(f"cannot read activation maxima ({_one_line(e)})", path=path) from None
        absmax = {}
        for f in folds(cfg):
            for name in f.linears:
                k = cfg.intermediate_size if name.endswith("w2.weight") else cfg.emb_dim
                a = found.get(name)
                if a is None:
                    raise SourceError("no activation maxima for this linear (calibrated on another model?)", path=path, tensor=name)
                if a.shape != (k,) or a.dtype.kind != "f":
                    raise SourceError(f"activation maxima are {a.dtype} {list(a.shape)}, expected float32 [{k}] (the linear's input width)", path=path, tensor=name)
                if not (np.isfinite(a).all() and (a >= 0).all()):
                    raise SourceError("activation maxima must be finite and non-negative", path=path, tensor=name)
                absmax[name] = a.astype(np.float64)
        return cls(path, float(alpha), absmax, sha256_file(path))

    def metadata(self, writer) -> None:
        writer.add_string(keys.SMOOTH_METHOD, METHOD)
        writer.add_float32(keys.SMOOTH_ALPHA, self.alpha)
        writer.add_string(keys.SMOOTH_CALIBRATION, self.path.name)
        writer.add_string(keys.SMOOTH_CALIBRATION_SHA256, f"sha256:{self.sha256}")

    def scales(self, bb, types: dict | None = None) -> "Smoothed":
        """The per-column scales for ``bb`` (a ``source.Backbone``); reads every smoothed linear once for its
        column maxima. ``types`` (name -> GGMLType): a folded tensor whose type keeps values or block scales in F16
        must still fit F16's range, else an error naming it (nothing is clamped: the numbers stay SmoothQuant's)."""
        sm = Smoothed(bb)
        colmax: dict[str, np.ndarray] = {}
        for f in folds(bb.config):
            act = np.maximum.reduce([self.absmax[n] for n in f.linears])
            for n in f.linears:
                if n not in colmax:  # after any row fold of n, which the order guarantees came first
                    colmax[n] = np.maximum.reduce([np.abs(c).max(axis=0) for c in sm.chunks(n)]).astype(np.float64)
                    bb.release()
            w = np.maximum.reduce([colmax[n] for n in f.linears])
            with np.errstate(divide="ignore", invalid="ignore"):
                s = act**self.alpha / w ** (1.0 - self.alpha)
            # A column no token reached (or a zero weight column) has nothing to balance: leave it alone.
            s = np.where((act > 0) & (w > 0) & np.isfinite(s) & (s > 0), s, 1.0)
            for n in f.linears:
                sm.col[n] = s.astype(np.float32)
            if f.rows is None:
                sm.col[f.prev] = (1.0 / s).astype(np.float32)
            else:
                r = sm.row.setdefault(f.prev, np.ones(bb.tensors[f.prev].shape[0], np.float32))
                r[f.rows[0] : f.rows[1]] = 1.0 / s
        for name, t in (types or {}).items():
            if name in sm.col:  # the writer's own range check (check_range), made before anything is written
                big = check_range(colmax[name] * sm.col[name] if name in colmax else next(sm.chunks(name)), t)
                if big is not None:
                    raise OptionError(f"smoothing (alpha {self.alpha}) makes |w| reach {big:.4g}, beyond F16's range (65504), which {t.name} "
                                      "cannot store; lower --smooth-alpha, or keep this tensor F32 or BF16 (--rule)", path=self.path, tensor=name)
        return sm


class Smoothed:
    """A backbone read with the scales folded in: rows times ``row[name]``, columns (1-D: elements) times
    ``col[name]``. Same interface as the backbone's ``chunks``."""

    def __init__(self, bb) -> None:
        self.bb = bb
        self.row: dict[str, np.ndarray] = {}
        self.col: dict[str, np.ndarray] = {}

    def chunks(self, name: str, *args) -> Iterator[np.ndarray]:
        r0 = 0
        for c in self.bb.chunks(name, *args):
            if name in self.row:
                c = c * self.row[name][r0 : r0 + len(c), None]
            if name in self.col:
                c = c * self.col[name]
            r0 += len(c)
            yield c
