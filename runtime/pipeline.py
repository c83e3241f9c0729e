"""The stages from caption to pixels: text encoder (llama.cpp) → both DiT backbones (ggml) → FLUX.2 decoder.

The stages run in an order that keeps peak memory low: every prompt is encoded first, the encoder is
freed, then the two backbones sample each image, and the decoder turns latents into pixels. What a
batch means (seeds, sizes, file names, metadata) is `generate.py`'s policy.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import logging
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from gguf_dit import hashes
from gguf_dit.errors import InputError, ModelError, OptionError

from .caption import Prompt
from .dit import Ideogram4DiT, RuntimeOptions, check_pair
from .infotext import model_name
from .model_files import OPTIONS, ModelFiles
from .png import write_image
from .sampler import StepInfo, needs_uncond, sample, token_grid
from .schedule import SamplerSettings

log = logging.getLogger("gguf_dit.runtime")

NO_UNCOND = (f"no unconditional backbone (give {OPTIONS['unconditional_transformer']} FILE, or --model DIR with "
             "unconditional_transformer.gguf): only a run whose every step has guidance 1 (e.g. --guidance 1) needs none")


@dataclasses.dataclass
class Generated:
    """One image: its pixels and latents, the seed and prompt that drew them, the PNG text chunks `run` writes
    ("parameters", A1111 style; "gguf-dit", every setting as JSON) and where it was saved."""

    image: np.ndarray  # (H, W, 3) uint8
    latents: np.ndarray  # (1, N, 128) final latent tokens
    seed: int
    prompt: Prompt | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    path: Path | None = None

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the image (PNG, or JPEG/WebP by the suffix) with its metadata atomically; an existing file is an
        ``OutputError`` unless ``force``."""
        self.path = write_image(path, self.image, self.metadata, force=force)
        return self.path


class Pipeline:
    """The whole journey for one model folder. Stages are separate methods so each can be tested."""

    def __init__(self, files: ModelFiles, *, backend: str = "auto", threads: int | None = None, options: RuntimeOptions | None = None) -> None:
        self.files, self.backend_name, self.threads, self.options = files, backend, threads, options or RuntimeOptions()
        self._cond = self._uncond = self._vae = None
        #: where each backbone's weights live, and whether they are freed before each decode (`apply`, memory_plan.py)
        self.placements = {"cond": self.options.placement, "uncond": self.options.placement}
        self.unload_before_decode = False

    def apply(self, plan) -> None:
        """Follow a `memory_plan.Plan`: a loaded backbone whose placement changes is freed, to be reloaded."""
        self.placements.update(plan.placements)
        self.unload_before_decode = plan.unload_before_decode
        for role, attr in (("cond", "_cond"), ("uncond", "_uncond")):
            m = getattr(self, attr)
            if m is not None and m.options.placement != self.placements[role]:
                self.unload()

    def unload(self) -> None:
        """Free both backbones (the next image loads them again; on the CPU from the page cache)."""
        for m in (self._cond, self._uncond):
            if m is not None:
                m.close()
        self._cond = self._uncond = None

    @functools.cached_property
    def header(self):
        """The conditional backbone's GGUF header (config, metadata, size hints) without its weights."""
        from .backbone_file import BackboneFile

        return BackboneFile(self.files.transformer)

    def check_files(self) -> list[str]:
        """Every file's header, metadata and tensor inventory, before any work: a broken vae.gguf must not
        be found only after sampling. Reads no weights (milliseconds; the encoder's vocabulary ~0.3 s).
        Returns warnings (backbone roles that no metadata records)."""
        from .backbone_file import BackboneFile
        from .text_encoder import _read_meta
        from .vae import check_file

        warnings = []
        if self.files.unconditional_transformer is not None:
            cond, uncond = self.header, BackboneFile(self.files.unconditional_transformer)
            warnings = self.files.check_roles(cond.role, uncond.role)
            a, b = cond.config.to_metadata(), uncond.config.to_metadata()
            k = next((k for k in a if a[k] != b[k]), None)
            if k is not None:
                raise ModelError(f"{k} is {b[k]}, but {self.files.transformer} has {a[k]}: not the same model's backbones", path=self.files.unconditional_transformer)
        _read_meta(self.files.text_encoder)
        check_file(self.files.vae)
        return warnings

    def encode(self, captions: list[str], progress: Callable[[int], None] | None = None,
               origins: list[tuple[str | Path | None, int | None]] | None = None) -> list[np.ndarray]:
        """Encode every caption, then free the encoder: it never shares memory with the backbones.

        ``origins[i]`` = (prompt file, line) of caption i, named in errors about that caption."""
        from .text_encoder import TextEncoder

        enc = TextEncoder.load(self.files.text_encoder, n_threads=self.threads)
        try:
            enc.check_features_dim(self.header.config.llm_features_dim)
            # Several prompts' features wait on disk, not in memory (208 KiB per token at the real width).
            feats: list | _FeatureFiles = _FeatureFiles() if len(captions) > 1 else []
            for i, c in enumerate(captions):
                try:
                    f = enc.encode(c)
                except InputError as e:
                    src, line = origins[i] if origins else (None, None)
                    if line is None:
                        raise
                    raise InputError(f"line {line}: {e}", path=src) from None
                if not np.isfinite(f).all():
                    where = f" for {origins[i][0]} line {origins[i][1]}" if origins and origins[i][1] else ""
                    raise ModelError(f"text features contain NaN/Inf{where}", path=self.files.text_encoder)
                feats.append(f)
                if progress:
                    progress(i + 1)
            return feats
        finally:
            enc.close()

    def load_backbones(self, uncond: bool = True, progress: Callable[[int, int], None] | None = None) -> tuple[Ideogram4DiT, Ideogram4DiT | None]:
        """The conditional backbone and, when ``uncond``, the unconditional one (else None: not loaded).
        ``progress(done, total)`` is called before and after each backbone actually loaded."""
        todo = [r for r, need in (("cond", self._cond is None), ("uncond", uncond and self._uncond is None)) if need]
        progress = progress or (lambda done, total: None)
        if todo:
            progress(0, len(todo))
        opts = lambda role: dataclasses.replace(self.options, placement=self.placements[role])  # noqa: E731
        if self._cond is None:
            from gguf_dit.ggml_ops import Backend

            be = Backend(self.backend_name, threads=self.threads)
            self._cond = Ideogram4DiT.load(self.files.transformer, be, options=opts("cond"))
            progress(1, len(todo))
        if uncond and self._uncond is None:
            if self.files.unconditional_transformer is None:
                raise OptionError(NO_UNCOND)
            self._uncond = Ideogram4DiT.load(self.files.unconditional_transformer, self._cond.backend, options=opts("uncond"))
            check_pair(self._cond, self._uncond)
            progress(len(todo), len(todo))
        return self._cond, self._uncond if uncond else None

    def vae(self):
        if self._vae is None:
            from .vae import VAEDecoder

            self._vae = VAEDecoder.load(self.files.vae)
        return self._vae

    def generate(self, feats: np.ndarray, height: int, width: int, settings: SamplerSettings, seed: int, *,
                 step_callback: Callable[[StepInfo, np.ndarray], None] | None = None, tile: int | None = None,
                 ts: np.ndarray | None = None, decode_started: Callable[[], None] | None = None) -> Generated:
        """Sample one image from one caption's features (``ts`` replaces the official timestep grid) and decode it.
        The unconditional backbone is loaded only if a step's guidance is not 1."""
        cond, uncond = self.load_backbones(needs_uncond(settings.guidance))
        z = sample(cond, uncond, feats, height, width, settings=settings, seed=seed, callback=step_callback, ts=ts)
        if decode_started is not None:
            decode_started()
        if self.unload_before_decode:  # the plan found no room for the decode next to the backbones
            self.unload()
        return Generated(self.decode(z, height, width, tile=tile), z, seed)

    def decode(self, z: np.ndarray, height: int, width: int, *, tile: int | None = None) -> np.ndarray:
        gh, gw = token_grid(height, width)
        log.debug("decoding %dx%d latents", gh, gw)
        return self.vae().decode_tokens(z, gh, gw, tile=tile)

    def describe(self, uncond: bool = True) -> dict:
        """Each file's name and hash (the backbones' recipes too), the backend and device: for the PNG metadata.
        Without ``uncond`` (every step's guidance is 1) the unconditional backbone is neither loaded nor named."""
        cond, unc = self.load_backbones(uncond)
        recipes = {"transformer": {"recipe": cond.file.recipe}, "unconditional_transformer": {"recipe": unc and unc.file.recipe}}
        files = {k: {"name": model_name(k, p), "file": p.name, "hash": hashes.autov2(p), **recipes.get(k, {})}
                 for k, p in vars(self.files).items() if p is not None and (uncond or k != "unconditional_transformer")}
        return {**files, "backend": cond.backend.name, "device": cond.backend.description}

    def close(self) -> None:
        self.unload()
        self._vae = None


class _FeatureFiles(collections.abc.Sequence):
    """Text features kept in a temporary folder (removed with this object), each read back when its image samples."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="gguf-dit-features-")
        self.n = 0

    def append(self, f: np.ndarray) -> None:
        np.save(Path(self.dir.name) / f"{self.n}.npy", f)
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return np.load(Path(self.dir.name) / f"{i % self.n}.npy")
