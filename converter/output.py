"""Where a conversion writes: the location checked before any work, and every output written as one set.

All outputs of one command are written into a private folder inside the output folder
(``OUT/.gguf-dit-tmp-<pid>/``) and moved into place together only when every one is complete, under a lock file
(``OUT/.gguf-dit-convert.lock``) that a second conversion into the same folder finds held and refuses. A failure
or Ctrl-C before that leaves the old files as they were, removes the private folder, the lock, and any output
folder the command created. The moves are a handful of renames within one folder, run with Ctrl-C deferred, and
undone if one fails: the folder holds the whole old set or the whole new one. A manifest written before the first
rename (and a DONE mark after the last) lets the next conversion resolve a SIGKILL in between the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

from gguf_dit import hashes
from gguf_dit.errors import OutputError
from gguf_dit.files import free_bytes, make_folders, remove_folders

LOCK_NAME = ".gguf-dit-convert.lock"
TMP_PREFIX = ".gguf-dit-tmp-"
BUSY = "another gguf-dit convert is writing here"
#: Room for one GGUF's header (metadata, tensor infos, alignment) on top of its tensor data, in space estimates.
HEADER_ALLOWANCE = 1 << 20
#: In the private folder: the outputs' names, written before the first rename into place; DONE after the last.
MANIFEST, DONE = ".manifest", ".done"


def check_location(out_dir: Path, names: list[str], *, force: bool, need_bytes: int | None = None, folders: bool = False) -> None:
    """Refuse, creating nothing, an output folder that cannot take ``names`` (files, or ``folders``): a path that is
    a file, a parent that is a file or not writable, an existing output without ``force`` or of the other kind,
    or (``need_bytes``) too little free space."""
    out_dir = Path(out_dir)
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise OutputError("exists and is not a folder", path=out_dir)
    base = out_dir
    while not os.path.lexists(base):
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"cannot create the output folder: {base} is not a folder", path=out_dir)
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError("is not writable" if base == out_dir else f"cannot create the output folder: {base} is not writable", path=out_dir)
    for name in names:
        dst = out_dir / name
        if os.path.lexists(dst):
            if not force:
                raise OutputError("already exists (use --force to overwrite)", path=dst)
            if dst.is_dir() != folders:
                raise OutputError(f"is {'not ' if folders else ''}a folder; not replacing it", path=dst)
    if need_bytes:
        free = free_bytes(base)
        if need_bytes > free:
            raise OutputError(f"not enough free space: the output needs about {_mb(need_bytes)}, {_mb(free)} is free", path=out_dir)


class OutputSet:
    """Context manager for one command's outputs ``names`` (plain file names) in ``out_dir``.

    ``path(name)`` is where to write each one (inside the private folder). Leaving the block normally moves every
    one into place, replacing old ones only with ``force``; leaving it with an exception, Ctrl-C included, leaves
    ``out_dir`` as it was. ``folders``: the outputs are folders (replaced whole), not files.
    """

    def __init__(self, out_dir: str | Path, names: list[str], *, force: bool, need_bytes: int = 0, folders: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.names = list(names)
        self.force = force
        self.folders = folders
        check_location(self.out_dir, self.names, force=force, need_bytes=need_bytes, folders=folders)
        self.tmp: Path | None = None
        self._created: list[Path] = []
        self._lock_fd: int | None = None

    def path(self, name: str) -> Path:
        if name not in self.names:
            raise OutputError(f"internal: {name} is not one of this command's outputs", path=self.out_dir)
        return self.staging / name

    @property
    def staging(self) -> Path:
        """The private folder the outputs are written into."""
        if self.tmp is None:
            raise OutputError("internal: the output set is not open", path=self.out_dir)
        return self.tmp

    def __enter__(self) -> "OutputSet":
        with _sigint_deferred() as interrupted:
            try:
                self._setup()
            except OSError as e:
                self._cleanup(failed=True)
                raise OutputError(f"cannot write ({e.strerror or e})", path=e.filename or self.out_dir) from None
            except BaseException:
                self._cleanup(failed=True)
                raise
            if interrupted:
                self._cleanup(failed=True)
                raise KeyboardInterrupt
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with _sigint_deferred():
            failed = True
            try:
                if exc_type is None:
                    self._commit()
                    failed = False
            except OSError as e:
                raise OutputError(f"cannot move the finished outputs into place ({e.strerror or e})", path=self.out_dir) from None
            finally:
                self._cleanup(failed=failed)
        # An interrupt that arrived while the finished set was being moved into place is dropped: the set is complete.
        if exc_type is None and not self.folders:  # while in the page cache: `run` then finds the model hash cached
            hashes.remember(self.out_dir / name for name in self.names)

    # -- steps -------------------------------------------------------------------------
    def _setup(self) -> None:
        make_folders(self.out_dir, self._created)
        self._lock()
        # Under the lock: leftovers of a killed conversion are resolved to one whole set, and removed.
        for stale in self.out_dir.glob(TMP_PREFIX + "*"):
            _recover(stale, self.out_dir)
        check_location(self.out_dir, self.names, force=self.force, folders=self.folders)
        self.tmp = self.out_dir / f"{TMP_PREFIX}{os.getpid()}"
        os.mkdir(self.tmp)

    def _lock(self) -> None:
        lock = self.out_dir / LOCK_NAME
        for _ in range(3):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(BUSY, path=self.out_dir) from None
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)  # the previous holder removed the file as we opened it: lock the current one
        raise OutputError(BUSY, path=self.out_dir)

    def _commit(self) -> None:
        if self.tmp is None:
            raise OutputError("internal: nothing staged to move into place", path=self.out_dir)
        # Written before the first rename: a conversion killed during the renames is then rolled back by the next
        # one (_recover), and one killed after the last rename (DONE written) is rolled forward.
        _write_synced(self.tmp / MANIFEST, "\n".join(self.names))
        moved: list[tuple[str, Path | None]] = []
        try:
            for name in self.names:
                dst, old = self.out_dir / name, None
                if os.path.lexists(dst):
                    old = self.tmp / f".old-{name}"
                    os.replace(dst, old)
                moved.append((name, old))
                os.replace(self.tmp / name, dst)
            _write_synced(self.tmp / DONE, "")
        except BaseException:
            for name, old in reversed(moved):  # put the old set back
                with contextlib.suppress(OSError):
                    if not os.path.lexists(self.tmp / name):
                        os.replace(self.out_dir / name, self.tmp / name)
                    if old is not None:
                        os.replace(old, self.out_dir / name)
            raise

    def _cleanup(self, *, failed: bool) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.out_dir / LOCK_NAME)  # while still holding it, so no one else holds this file
            os.close(self._lock_fd)
            self._lock_fd = None
        if failed:
            remove_folders(self._created)


def write_one(out_path: Path, force: bool, prepare: Callable[[], object], write: Callable[[object, Path], dict]) -> dict:
    """One output written as a set of one: the location is checked, then ``prepare()`` opens and checks the source
    (its result has ``nbytes`` and ``close()``), then ``write(prepared, path)`` writes it; returns write's summary."""
    out_path = Path(out_path)
    check_location(out_path.parent, [out_path.name], force=force)
    prepared = prepare()
    try:
        with OutputSet(out_path.parent, [out_path.name], force=force, need_bytes=prepared.nbytes) as outs:  # type: ignore[attr-defined]
            return write(prepared, outs.path(out_path.name))
    finally:
        prepared.close()  # type: ignore[attr-defined]


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _recover(stale: Path, out_dir: Path) -> None:
    """Resolve the private folder of a killed conversion to one whole set: before its renames began (no manifest)
    nothing in ``out_dir`` changed; after they all finished (DONE) the new set is complete; in between, every new
    output moved into place goes back into ``stale`` and every old one moved aside returns. Then ``stale`` goes."""
    manifest = stale / MANIFEST
    if manifest.is_file() and not (stale / DONE).exists():
        for name in manifest.read_text().split("\n"):
            if not name:
                continue
            dst, old = out_dir / name, stale / f".old-{name}"
            if not os.path.lexists(stale / name) and os.path.lexists(dst):  # the new one was moved into place
                os.replace(dst, stale / name)
            if os.path.lexists(old):
                os.replace(old, dst)
    shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[list]:
    """Hold Ctrl-C over short bookkeeping (creating, moving, removing), so that it cannot land between two steps
    of one; yields a list that is non-empty when one arrived."""
    got: list = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    prev = signal.signal(signal.SIGINT, lambda *_: got.append(True))
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, prev if prev is not None else signal.default_int_handler)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
