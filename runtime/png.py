"""Image outputs (PNG, JPEG, WebP): where a batch's images go, and writing them so that a failure leaves nothing.

``-o`` is a folder (``NNNNN-SEED.png``), an image path, or a file name with a printf index (sd.cpp's
``out_%03d.png``). Numbered names continue after the highest index already in the folder, as A1111's counter does,
so earlier images are never overwritten; only an explicit file path is overwritten, and only with ``force``.

Outputs are checked before any work (`Outputs.check`) and written atomically: the image is encoded into a temp file
in the target folder, then given its name with a hard link, which fails instead of replacing a name that another
run claimed meanwhile (the next number is taken then). A failed or interrupted run leaves neither a partial image
nor a folder it created.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from gguf_dit.errors import OutputError
from gguf_dit.files import free_bytes, make_folders, remove_folders

from .infotext import exif_of

#: Suffix → Pillow format. JPEG and WebP carry the metadata in EXIF (`infotext.exif_of`), PNG in text chunks.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 90  # sd.cpp's JPEG/WebP quality

_SPEC = re.compile(r"%%|%(\d{0,3})d")  # sd.cpp's index specifier (%d, %03d); %% is a literal %


def _has_index(text: str) -> bool:
    return any(m.group(0) != "%%" for m in _SPEC.finditer(text))


def _fill(pattern: str, index: int) -> str:
    return _SPEC.sub(lambda m: "%" if m.group(0) == "%%" else f"%{m.group(1)}d" % index, pattern)


def _pattern_regex(pattern: str) -> re.Pattern:
    """The names ``pattern`` produces, each specifier's number captured."""
    parts, end = [], 0
    for m in _SPEC.finditer(pattern):
        parts += [re.escape(pattern[end:m.start()]), re.escape("%") if m.group(0) == "%%" else r" *(\d+)"]
        end = m.end()
    return re.compile("".join(parts) + re.escape(pattern[end:]))


def _a1111_index(name: str) -> int | None:
    """A1111's counter reads the digits before the first ``-`` of a file's stem (``00012-123.png`` → 12)."""
    head = os.path.splitext(name)[0].split("-")[0]
    return int(head) if head.isascii() and head.isdigit() else None


def _format(path: Path, alternative: str = "") -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        what = f"unknown image suffix {path.suffix!r}" if path.suffix else "no image suffix"
        raise OutputError(f"{what}: use .png, .jpg, .jpeg or .webp{alternative}", path=path)
    return fmt


class Outputs:
    """Where a batch's images go. ``paths`` are the names planned when the request is checked; a name claimed by
    another run by the time an image is written moves that image (and the ones after it) to the next free number."""

    def __init__(self, out: str | Path, seeds: list[int], *, force: bool = False) -> None:
        out = Path(out)
        self.force, self.fixed, self.count = force, None, len(seeds)
        if _has_index(str(out.parent)):
            raise OutputError("the %d index goes in the file name, not in a folder name", path=out)
        if _has_index(out.name) and not out.suffix:
            out = out.with_name(out.name + ".png")  # sd.cpp's default format
        if not (out.suffix.lower() in FORMATS or _has_index(out.name) or (out.suffix and not out.is_dir())):
            self.folder, self.format, self.index = out, "PNG", _a1111_index
            self.name: Callable[[int, int], str] = lambda i, seed: f"{i:05d}-{seed}.png"
        else:
            self.folder, self.format = out.parent, _format(out, ", or an existing folder")
            if _has_index(out.name) or len(seeds) > 1:
                pattern = out.name if _has_index(out.name) else out.stem.replace("%", "%%") + "-%03d" + out.suffix
                regex = _pattern_regex(pattern)
                self.name = lambda i, seed: _fill(pattern, i)
                self.index = lambda name: max(map(int, m.groups())) if (m := regex.fullmatch(name)) else None
            else:
                self.fixed = out
        self.next = None if self.fixed else self._first_free()
        self.paths = [self.fixed] if self.fixed else [self.folder / self.name(self.next + j, s) for j, s in enumerate(seeds)]
        self._seeds = iter(seeds)

    def _first_free(self) -> int:
        try:
            names = os.listdir(self.folder)
        except OSError:  # not there yet (or not a folder: `check` says so)
            names = []
        return 1 + max((i for i in map(self.index, names) if i is not None), default=-1)

    def check(self, height: int, width: int) -> None:
        """Refuse the location before any work: an existing file at a fixed path without ``force``, a folder where an
        image would go, a file in the folder chain, a folder that cannot be written, too little free space (asked per
        image: the uncompressed RGB size plus room for the metadata, above what any PNG of it takes). Creates nothing
        (the folder is created with the first image)."""
        if self.fixed is not None:
            _refuse_existing(self.fixed, self.force)
        existing = _existing_folder(self.folder)
        try:
            fd, probe = tempfile.mkstemp(prefix=".gguf-dit-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OutputError(f"cannot write here: {e.strerror or e}", path=existing) from None
        free, need = free_bytes(existing), (3 * height * width + (1 << 16)) * self.count
        if free < need:
            raise OutputError(f"{free / 1e6:.1f} MB free, the images need up to {need / 1e6:.1f} MB", path=existing)

    def write(self, image: np.ndarray, text: dict[str, str]) -> Path:
        """Write the next image of the batch; returns where it went."""
        seed = next(self._seeds)
        if self.fixed is not None:
            return write_image(self.fixed, image, text, force=self.force)

        def claim(tmp: Path) -> Path:
            while True:
                # Rescanned per image: folder names carry the seed, so another run's image with this number has
                # another name; then the link below still refuses to overwrite a name taken since the scan.
                self.next = max(self.next, self._first_free())
                path = self.folder / self.name(self.next, seed)
                self.next += 1
                try:
                    _link(tmp, path)
                    return path
                except FileExistsError:
                    continue

        return _write(self.folder / self.name(self.next, seed), self.format, image, text, claim)


def write_image(path: str | Path, image: np.ndarray, text: dict[str, str], *, force: bool = False) -> Path:
    """Write one image (format from the suffix) atomically; an existing file is an ``OutputError`` unless ``force``."""
    path = Path(path)
    fmt = _format(path)
    _refuse_existing(path, force)

    def claim(tmp: Path) -> Path:
        if force:
            os.replace(tmp, path)
            return path
        try:
            _link(tmp, path)
        except FileExistsError:
            raise OutputError("already exists (use --force to overwrite)", path=path) from None
        return path

    return _write(path, fmt, image, text, claim)


def _refuse_existing(path: Path, force: bool) -> None:
    if path.is_dir():
        raise OutputError("is a folder, expected an image path", path=path)
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


def _link(tmp: Path, path: Path) -> None:
    """Give the finished temp file the name ``path`` unless that name exists (``FileExistsError``), atomically, so
    that two runs claiming one name cannot overwrite each other."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, exFAT, some network shares): reserve the name, then move onto it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(path)
            raise
        return
    os.unlink(tmp)


def _write(shown: Path, fmt: str, image: np.ndarray, text: dict[str, str], claim: Callable[[Path], Path]) -> Path:
    """Encode into a temp file beside the target, then ``claim`` a name for it; on any failure remove the temp file
    and the folders this call created. ``shown`` is the path an error names."""
    from PIL import Image, PngImagePlugin

    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_itxt(k, v)
        options = {"pnginfo": info}
    else:
        options = {"exif": exif_of(text), "quality": QUALITY}
    created: list[Path] = []
    tmp = shown.parent / f".gguf-dit-{os.getpid()}-{os.urandom(4).hex()}.tmp"  # not mkstemp: its 0600 would stay
    try:
        make_folders(shown.parent, created)
        with open(tmp, "xb") as f:
            pil.save(f, format=fmt, **options)
        return claim(tmp)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        remove_folders(created)
        if isinstance(e, OSError):
            full = " (disk full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise OutputError(f"cannot write the {fmt}: {e.strerror or e}{full}", path=shown) from None
        if isinstance(e, ValueError):  # Pillow refuses metadata its format cannot hold (JPEG: EXIF over 64 KiB)
            raise OutputError(f"cannot write the {fmt}: {e}", path=shown) from None
        raise
