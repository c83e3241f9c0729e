"""What ``run --vae FILE`` accepts: a ``vae.gguf``, or a VAE as users download it, converted once into a cache.

A ``.gguf`` passes through unchanged (``VAEDecoder.load`` checks it). A ``.safetensors`` file (the stock FLUX.2
autoencoder in Black Forest Labs' naming, ``ae.safetensors`` / ``flux2-vae.safetensors``, or diffusers naming) or a
diffusers ``vae/`` folder is converted by ``converter.vae`` into ``$XDG_CACHE_HOME/gguf-dit`` (default
``~/.cache/gguf-dit``), under a name keyed by the source's resolved path, size and modification time, and reused
while those stay the same. Lives here, not in ``runtime/``, because it needs the converter (and safetensors).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Callable

from gguf_dit import __version__
from gguf_dit.errors import ModelError

#: The decoder dtype a cached conversion uses: `convert`'s default, so `run --vae ae.safetensors` draws the same
#: pixels as `run` with the `vae.gguf` that `gguf-dit convert ae.safetensors` writes.
CACHE_DTYPE = "f16"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gguf-dit``, or ``~/.cache/gguf-dit`` when the variable is unset or empty (the XDG rule)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gguf-dit"


def _sources(src: Path) -> list[Path]:
    """The files whose change invalidates a conversion of ``src``: the file itself, or a folder's JSON and weights."""
    if src.is_file():
        return [src]
    folder = src / "vae" if not (src / "config.json").exists() and (src / "vae" / "config.json").exists() else src
    return sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file())


def cached_path(src: Path) -> Path:
    """Where the conversion of ``src`` is cached: a folder named after its resolved path and the size and mtime of
    its files, holding ``<name>.gguf`` after the source, so that a PNG's metadata calls the VAE what the user calls
    it (``ae``; a ``vae/`` folder by its checkpoint's name)."""
    given = Path(os.path.abspath(src))  # named as the user names it: a Hugging Face cache links to a blob named by hash
    src = src.resolve()
    h = hashlib.sha256(f"{__version__}\0{CACHE_DTYPE}\0{src}".encode())
    for f in _sources(src):
        st = f.stat()
        h.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    name = given.stem if src.is_file() else given.name
    if name == "vae" and given.parent.name:
        name = given.parent.name
    return cache_dir() / "vae" / h.hexdigest()[:16] / f"{name}.gguf"


def _notice(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def vae_gguf(path: Path, *, notice: Callable[[str], None] = _notice) -> Path:
    """The ``vae.gguf`` to load for ``path``: itself if it is a ``.gguf``, else its cached conversion, made now
    (one ``notice`` line) if there is none yet. Errors name the file (and tensor): ``ModelError`` for a path that
    is neither, ``SourceError`` from the conversion; nothing is left in the cache then."""
    path = Path(path)
    if not path.exists():
        raise ModelError("does not exist (--vae takes a vae.gguf, a .safetensors VAE or a diffusers vae/ folder)", path=path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not (path.is_dir() or (path.is_file() and path.suffix.lower() == ".safetensors")):
        raise ModelError("is not a .gguf, a .safetensors VAE or a diffusers vae/ folder", path=path)
    out = cached_path(path)
    if out.is_file():
        return out
    from gguf_dit.converter.output import write_one
    from gguf_dit.converter.vae import prepare_vae, write_vae

    def prepare():
        vae = prepare_vae(path, dtype=CACHE_DTYPE)  # every check passed: only then say that a conversion runs
        notice(f"converting VAE {path} once into {out} (reused while the source is unchanged)")
        return vae

    # force: another run that converted the same source meanwhile wrote the same bytes.
    write_one(out, True, prepare, write_vae)
    return out
