"""PNG outputs: where a batch's images go, their metadata, and writing them so that a failure leaves nothing.

Outputs are checked before any work (`check_output`) and written atomically (`write_png`), so a failed or
interrupted run leaves neither a partial PNG nor a folder it created.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from gguf_dit import __version__
from gguf_dit.errors import OutputError
from gguf_dit.files import free_bytes, make_folders, remove_folders

from .schedule import SamplerSettings, guidance_text


def output_paths(out: str | Path, seeds: list[int]) -> list[Path]:
    """A folder gets ``NNNNN-SEED.png`` per image; a ``.png`` path is the one image (``stem-NNN.png`` for several)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        return [out / f"{i:05d}-{s}.png" for i, s in enumerate(seeds)]
    return [out] if len(seeds) == 1 else [out.with_name(f"{out.stem}-{i:03d}.png") for i in range(len(seeds))]


def png_metadata(prompt_text: str, settings: SamplerSettings, seed: int, height: int, width: int, models: dict, extra: dict | None = None) -> dict[str, str]:
    """A1111-style ``parameters`` text plus the full settings as JSON."""
    g = guidance_text(settings.guidance)
    cfg = f"{settings.guidance[0]:g}" if len(set(settings.guidance)) == 1 else g
    params = (
        f"{prompt_text}\n"
        f"Steps: {settings.steps}, Sampler: Euler flow-matching (logit-normal mu {settings.mu:g} std {settings.std:g}), "
        f"CFG scale: {cfg}, Seed: {seed}, Size: {width}x{height}, "
        f"Model: {models['transformer']['file']}, Model hash: {models['transformer']['hash']}, "
        f"Recipe: {models['transformer'].get('recipe')}, Preset: {settings.name}, Version: gguf-dit {__version__}"
    )
    full = {"prompt": prompt_text, "seed": seed, "height": height, "width": width, "preset": settings.name, "steps": settings.steps,
            "guidance": list(settings.guidance), "mu": settings.mu, "std": settings.std, "models": models, "version": __version__, **(extra or {})}
    return {"parameters": params, "gguf-dit": json.dumps(full, ensure_ascii=False, separators=(",", ":"))}


def _refuse_existing(path: Path, force: bool) -> None:
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputError("already exists (use --force to overwrite)", path=path)


def _existing_folder(folder: Path) -> Path:
    """The deepest existing folder on the way to ``folder``; refuse a path with a file in its chain."""
    for p in (folder, *folder.parents):
        if p.is_symlink() and not p.exists():
            raise OutputError("is a broken symbolic link, cannot create the output folder", path=p)
        if p.exists():
            if not p.is_dir():
                raise OutputError("is a file, not a folder" if p == folder else f"is a file, so {folder} cannot be created", path=p)
            return p
    raise OutputError("no existing folder on this path", path=folder)  # pragma: no cover - "/" or "." exists


def check_output(paths: list[Path], height: int, width: int, *, force: bool) -> None:
    """Refuse an output location before any work: an existing PNG without ``force``, a folder where a
    PNG would go, a file in the folder chain, a folder that cannot be written, too little free space
    (asked per image: the uncompressed RGB size plus room for the metadata, above what any PNG of it
    takes). Creates nothing (``write_png`` creates the folder with the first image)."""
    for p in paths:
        if p.is_dir():
            raise OutputError("is a folder, expected a PNG path", path=p)
        _refuse_existing(p, force)
    for folder in sorted({p.parent for p in paths}):
        existing = _existing_folder(folder)
        try:
            fd, probe = tempfile.mkstemp(prefix=".gguf-dit-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OutputError(f"cannot write here: {e.strerror or e}", path=existing) from None
        free = free_bytes(existing)
        need = (3 * height * width + (1 << 16)) * sum(1 for p in paths if p.parent == folder)
        if free < need:
            raise OutputError(f"{free / 1e6:.1f} MB free, the images need up to {need / 1e6:.1f} MB", path=existing)


def write_png(path: Path, image: np.ndarray, text: dict[str, str], *, force: bool = False) -> None:
    """Write a PNG atomically (temp file, then rename): an interrupted or failed write leaves no
    partial file, and no folder this call created."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    _refuse_existing(path, force)
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_itxt(k, v)
    created: list[Path] = []
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        make_folders(path.parent, created)
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        remove_folders(created)
        if isinstance(e, OSError):
            full = " (disk full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise OutputError(f"cannot write the PNG: {e.strerror or e}{full}", path=path) from None
        raise
