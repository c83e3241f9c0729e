"""The embedded demo model (a small model of the exact Ideogram 4 architecture shipped in the package)."""

from __future__ import annotations

from pathlib import Path

from gguf_dit.errors import ModelError

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
NOTICE = "using the embedded demo model (a tiny Ideogram 4 trained on coloured shapes); pass --model DIR for a converted real checkpoint"


def model_dir() -> Path:
    if not (DEMO_DIR / "transformer.gguf").exists():
        raise ModelError(
            "no --model given and no embedded demo model is installed in this build; "
            "convert a checkpoint with `gguf-dit convert CKPT -o DIR` and pass --model DIR",
            path=DEMO_DIR,
        )
    return DEMO_DIR
