"""A model folder: the four GGUF files `gguf-dit convert` writes, found and identified."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from gguf_dit.arch import MODEL_FILES
from gguf_dit.errors import ModelError


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    transformer: Path
    unconditional_transformer: Path
    text_encoder: Path
    vae: Path

    @classmethod
    def find(cls, model_dir: str | Path, text_encoder: str | Path | None = None) -> "ModelFiles":
        d = Path(model_dir)
        if not d.is_dir():
            raise ModelError("model folder does not exist", path=d)
        paths = {k: d / v for k, v in MODEL_FILES.items()}
        if text_encoder is not None:
            paths["text_encoder"] = Path(text_encoder)
        for k, p in paths.items():
            if not p.exists():
                hint = ", or pass --text-encoder FILE" if k == "text_encoder" else ""
                raise ModelError(f"missing {k} file (convert a checkpoint with `gguf-dit convert`{hint})", path=p)
            if not p.is_file():  # a FIFO would block the first open forever, a device never end
                raise ModelError("is not a regular file (a folder, FIFO or device); expected a GGUF file", path=p)
        return cls(**paths)


def file_hash(path: Path) -> str:
    """sha256 of the first and last MiB plus the size: identifies a model file cheaply (A1111 "Model hash")."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:10]
