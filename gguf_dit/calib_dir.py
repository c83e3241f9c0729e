"""CALIB_DIR, what `gguf-dit calibrate` writes (docs/quantization.md#calibrate): per backbone an importance matrix
(``gguf_dit.imatrix``) and the per-column activation maxima (``*.act_absmax.safetensors``, read by ``convert
--smooth``), then ``recipe.json`` (``convert --recipe``) and ``calibration.json`` (the report). Written as one set
(converter/output.py's ``OutputSet``): nothing replaced without ``force``, nothing left behind by a failure. Lives
here, not in ``runtime/``, because it writes safetensors and uses the converter's output set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gguf_dit.arch.dit import BACKBONE_DIRS
from gguf_dit.converter.output import OutputSet
from gguf_dit.converter.smooth import ABSMAX_SUFFIX
from gguf_dit.imatrix import FILE_NAMES, Imatrix, ImatrixEntry

ABSMAX_NAMES = {role: d + ABSMAX_SUFFIX for d, role in BACKBONE_DIRS.items()}
RECIPE, REPORT = "recipe.json", "calibration.json"
NAMES = [*FILE_NAMES.values(), *ABSMAX_NAMES.values(), RECIPE, REPORT]


def output_set(out_dir: str | Path, *, force: bool) -> OutputSet:
    """The checked output location (refused before any measurement: exists without ``force``, not writable)."""
    return OutputSet(out_dir, NAMES, force=force)


def write(outs: OutputSet, cal, dataset: str = "") -> None:
    """Write a `runtime.calibrate.Calibration` into the open ``outs``."""
    from safetensors.numpy import save_file

    for role, stats in cal.stats.items():
        used = {n: s for n, s in stats.items() if s.count}
        Imatrix({n: ImatrixEntry(s.sums.astype(np.float32), s.count) for n, s in used.items()}, cal.calls[role], dataset).write(
            outs.path(FILE_NAMES[role]), role)
        save_file({n: np.ascontiguousarray(s.absmax, dtype=np.float32) for n, s in used.items()}, str(outs.path(ABSMAX_NAMES[role])),
                  metadata={"producer": "gguf-dit calibrate", "rows": json.dumps({n: s.count for n, s in used.items()})})
    outs.path(RECIPE).write_text(json.dumps(cal.recipe, indent=2) + "\n")
    outs.path(REPORT).write_text(json.dumps(cal.report, indent=2) + "\n")
