"""Prompt to PNG: text encoder (llama.cpp) → both DiT backbones (ggml) → FLUX.2 decoder → PNG.

The stages run in an order that keeps peak memory low: every prompt is encoded first, the encoder is
freed, then the two backbones sample each image, and the decoder turns latents into pixels.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from gguf_dit import __version__
from gguf_dit.errors import InputError, ModelError, OutputError

from .dit import Ideogram4DiT, RuntimeOptions, check_pair
from .sampler import StepInfo, sample, token_grid
from .schedule import SamplerSettings

FILES = {
    "transformer": "transformer.gguf",
    "unconditional_transformer": "unconditional_transformer.gguf",
    "text_encoder": "text_encoder.gguf",
    "vae": "vae.gguf",
}
MAX_ASPECT = 6.0

log = logging.getLogger("gguf_dit.runtime")


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
        paths = {k: d / v for k, v in FILES.items()}
        if text_encoder is not None:
            paths["text_encoder"] = Path(text_encoder)
        for k, p in paths.items():
            if not p.exists():
                hint = " (convert a checkpoint with `gguf-dit convert`, or pass --text-encoder FILE)" if k == "text_encoder" else " (convert a checkpoint with `gguf-dit convert`)"
                raise ModelError(f"missing {k} file{hint}", path=p)
            if not p.is_file():  # a FIFO would block the first open forever, a device never end
                raise ModelError("is not a regular file (a folder, FIFO or device); expected a GGUF file", path=p)
        return cls(**paths)


def _file_hash(path: Path) -> str:
    # sha256 of the first and last MiB plus the size: identifies a model file cheaply (A1111 "Model hash").
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:10]


def size_range(f) -> tuple[int, int]:
    """Allowed image sides for a backbone file (its validated ``gguf_dit.size_range`` or the default)."""
    return f.size_range


def default_size(f) -> int:
    return f.default_size


def check_size(height: int, width: int, rng: tuple[int, int], path: str | Path | None = None) -> None:
    """Refuse sizes outside ``rng``, the size range of the backbone file ``path`` (named in the error)."""
    token_grid(height, width)
    lo, hi = rng
    for name, v in (("height", height), ("width", width)):
        if not lo <= v <= hi:
            raise InputError(f"{name} {v} is outside the model's range {lo}..{hi} pixels", path=path)
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise InputError(f"aspect ratio {width}:{height} exceeds {MAX_ASPECT:.0f}:1")


@dataclasses.dataclass
class Generated:
    image: np.ndarray  # (H, W, 3) uint8
    latents: np.ndarray
    seed: int
    info: dict


class Pipeline:
    """The whole journey for one model folder. Stages are separate methods so each can be tested."""

    def __init__(self, files: ModelFiles, *, backend: str = "auto", threads: int | None = None, options: RuntimeOptions | None = None) -> None:
        self.files = files
        self.backend_name = backend
        self.threads = threads
        self.options = options or RuntimeOptions()
        self._cond = self._uncond = self._vae = None

    # -- stages ------------------------------------------------------------------------
    def header(self):
        """The conditional backbone's GGUF header (config, metadata) without loading its weights."""
        from .model_file import BackboneFile

        if getattr(self, "_header", None) is None:
            self._header = BackboneFile(self.files.transformer)
        return self._header

    def check_files(self) -> None:
        """Every file's header, metadata and tensor inventory, before any work: a broken vae.gguf must not
        be found only after sampling. Reads no weights (milliseconds; the encoder's vocabulary ~0.3 s)."""
        from .model_file import BackboneFile
        from .text_encoder import _read_meta
        from .vae import check_file

        cond, uncond = self.header(), BackboneFile(self.files.unconditional_transformer)
        a, b = cond.config.to_metadata(), uncond.config.to_metadata()
        diff = [k for k in a if a[k] != b[k]]
        if diff:
            k = diff[0]
            raise ModelError(f"{k} is {b[k]}, but {self.files.transformer} has {a[k]}: not the same model's backbones", path=self.files.unconditional_transformer)
        _read_meta(self.files.text_encoder)
        check_file(self.files.vae)

    def encode(
        self,
        captions: list[str],
        progress: Callable[[int], None] | None = None,
        origins: list[tuple[str | Path, int | None]] | None = None,
    ) -> list[np.ndarray]:
        """Encode every caption, then free the encoder: it never shares memory with the backbones.

        ``origins[i]`` = (prompt file, line) of caption i, named in errors about that caption."""
        from .text_encoder import TextEncoder

        enc = TextEncoder.load(self.files.text_encoder, n_threads=self.threads)
        try:
            enc.check_features_dim(self.header().config.llm_features_dim)
            feats = []
            for i, c in enumerate(captions):
                try:
                    f = enc.encode(c)
                except InputError as e:
                    if origins is None:
                        raise
                    src, line = origins[i]
                    raise InputError(f"line {line}: {e}" if line else str(e), path=src) from None
                if not np.isfinite(f).all():
                    where = f" for {origins[i][0]} line {origins[i][1]}" if origins and origins[i][1] else ""
                    raise ModelError(f"text features contain NaN/Inf{where}", path=self.files.text_encoder)
                feats.append(f)
                if progress:
                    progress(i + 1)
            return feats
        finally:
            enc.close()

    def load_backbones(self) -> tuple[Ideogram4DiT, Ideogram4DiT]:
        if self._cond is None:
            from gguf_dit.ggml_ops import Backend

            be = Backend(self.backend_name, threads=self.threads)
            self._cond = Ideogram4DiT.load(self.files.transformer, be, options=self.options)
            self._uncond = Ideogram4DiT.load(self.files.unconditional_transformer, be, options=self.options)
            check_pair(self._cond, self._uncond)
        return self._cond, self._uncond

    def vae(self):
        if self._vae is None:
            from .vae import VAEDecoder

            self._vae = VAEDecoder.load(self.files.vae)
        return self._vae

    def check_features(self, feats: np.ndarray) -> None:
        cond, _ = self.load_backbones()
        if feats.shape[-1] != cond.config.llm_features_dim:
            raise ModelError(
                f"text encoder gives {feats.shape[-1]} features per token, but the DiT expects {cond.config.llm_features_dim}",
                path=self.files.text_encoder,
            )

    def generate(
        self,
        feats: np.ndarray,
        height: int,
        width: int,
        settings: SamplerSettings,
        seed: int,
        *,
        step_callback: Callable[[StepInfo, np.ndarray], None] | None = None,
        tile: int | None = None,
        ts: np.ndarray | None = None,
        decode_started: Callable[[], None] | None = None,
    ) -> Generated:
        cond, uncond = self.load_backbones()
        check_size(height, width, size_range(cond.file), cond.path)
        self.check_features(feats)
        z = sample(cond, uncond, feats, height, width, settings=settings, seed=seed, callback=step_callback, ts=ts)
        if decode_started is not None:
            decode_started()
        return Generated(self.decode(z, height, width, tile=tile), z, seed, {})

    def decode(self, z: np.ndarray, height: int, width: int, *, tile: int | None = None) -> np.ndarray:
        from .vae import to_uint8

        gh, gw = token_grid(height, width)
        vae = self.vae()
        log.debug("decoding %dx%d latents", gh, gw)
        x = vae.decode_latents(vae.tokens_to_latents(z, gh, gw), tile=tile, clamp=False)
        if not bool(x.isfinite().all()):  # checked before the clamp, which would turn Inf into white
            raise ModelError("decoded image contains NaN/Inf", path=self.files.vae)
        return to_uint8(x.clamp(-1.0, 1.0))

    def describe(self) -> dict:
        cond, uncond = self.load_backbones()
        return {
            "transformer": {"file": self.files.transformer.name, "hash": _file_hash(self.files.transformer), "recipe": cond.file.recipe},
            "unconditional_transformer": {"file": self.files.unconditional_transformer.name, "hash": _file_hash(self.files.unconditional_transformer), "recipe": uncond.file.recipe},
            "text_encoder": {"file": self.files.text_encoder.name, "hash": _file_hash(self.files.text_encoder)},
            "vae": {"file": self.files.vae.name, "hash": _file_hash(self.files.vae)},
            "backend": cond.backend.name,
            "device": cond.backend.description,
        }

    def close(self) -> None:
        for m in (self._cond, self._uncond):
            if m is not None:
                m.close()
        self._cond = self._uncond = self._vae = None


def guidance_text(g: tuple[float, ...]) -> str:
    """Run-length form of a per-step guidance schedule, e.g. 7x18+3x2."""
    parts = []
    i = 0
    while i < len(g):
        j = i
        while j < len(g) and g[j] == g[i]:
            j += 1
        parts.append(f"{g[i]:g}x{j - i}")
        i = j
    return "+".join(parts)


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
    full = {
        "prompt": prompt_text,
        "seed": seed,
        "height": height,
        "width": width,
        "preset": settings.name,
        "steps": settings.steps,
        "guidance": list(settings.guidance),
        "mu": settings.mu,
        "std": settings.std,
        "models": models,
        "version": __version__,
        **(extra or {}),
    }
    return {"parameters": params, "gguf-dit": json.dumps(full, ensure_ascii=False, separators=(",", ":"))}


def png_bytes_bound(height: int, width: int) -> int:
    """Free space asked of an output folder per image: the uncompressed RGB size plus room for the
    metadata, above what any PNG of it takes."""
    return 3 * height * width + (1 << 16)


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


def check_output(paths: list[Path], *, force: bool, image_bytes: int) -> None:
    """Refuse an output location before any work: an existing PNG without ``force``, a folder where a
    PNG would go, a file in the folder chain, a folder that cannot be written, too little free space.
    Creates nothing (``write_png`` creates the folder with the first image)."""
    for p in paths:
        if p.is_dir():
            raise OutputError("is a folder, expected a PNG path", path=p)
        if (p.exists() or p.is_symlink()) and not force:
            raise OutputError("already exists (use --force to overwrite)", path=p)
    for folder in sorted({p.parent for p in paths}):
        existing = _existing_folder(folder)
        try:
            fd, probe = tempfile.mkstemp(prefix=".gguf-dit-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OutputError(f"cannot write here: {e.strerror or e}", path=existing) from None
        st = os.statvfs(existing)
        free = st.f_bavail * st.f_frsize
        need = image_bytes * sum(1 for p in paths if p.parent == folder)
        if free < need:
            raise OutputError(f"{free / 1e6:.1f} MB free, the images need up to {need / 1e6:.1f} MB", path=existing)


def _make_folders(folder: Path, created: list[Path]) -> None:
    """mkdir -p, appending each folder it creates to ``created`` (deepest last) as it goes."""
    for p in [p for p in (folder, *folder.parents) if not p.exists()][::-1]:
        try:
            p.mkdir()
        except FileExistsError:
            continue
        created.append(p)


def write_png(path: Path, image: np.ndarray, text: dict[str, str], *, force: bool = False) -> None:
    """Write a PNG atomically (temp file, then rename): an interrupted or failed write leaves no
    partial file, and no folder this call created."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    if path.exists() and not force:
        raise OutputError("already exists (use --force to overwrite)", path=path)
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_itxt(k, v)
    created: list[Path] = []
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _make_folders(path.parent, created)
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            full = " (disk full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise OutputError(f"cannot write the PNG: {e.strerror or e}{full}", path=path) from None
        raise
