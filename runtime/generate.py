"""`gguf-dit run` as a library: load a model once, generate many images, get arrays or PNGs (docs/runtime.md).

Every decision `run` makes is here (demo model, reference, prompts, seeds, sizes, output names and checks, PNG
metadata), so that a script, a server or a batch runner draws what the command line draws.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

from gguf_dit.errors import InputError

from . import demo
from .caption import Prompt, prompt_from_string, read_prompt_file
from .dit import RuntimeOptions
from .model_files import ModelFiles
from .pipeline import Generated, Pipeline
from .png import check_output, output_paths, png_metadata
from .sampler import token_grid
from .schedule import SamplerSettings, diffusers_timesteps, resolve_settings

MAX_ASPECT = 6.0

#: ``reference`` → how t is rounded before the timestep embedding (diffusers keeps float32 t).
REFERENCES = {"official": "bf16", "diffusers": "none"}

#: A string is one prompt, a path a prompt file (``Path("-")``: read from stdin), or an iterable of both.
Prompts = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]

RANDOM_SEED = -1  # sd.cpp's and A1111's "draw a random seed"

#: ``progress(stage, done, total)``: stage "encode", then "sample J/N" and "decode J/N" per image; done = 0 starts a stage.
ProgressCallback = Callable[[str, int, int], None]


@dataclasses.dataclass
class Batch:
    """A checked request, nothing computed yet. Iterating it (or ``run(progress)``) encodes every prompt, then
    samples and decodes image by image, yielding each `Generated` (saved first when ``paths`` is set)."""

    generator: "Generator"
    prompts: list[Prompt]
    origins: list[tuple]  # (prompt file or None, line or None) of each prompt, for errors and warnings
    count: int  # images per prompt: image j draws prompt j // count with seed seeds[j]
    seeds: list[int]
    settings: SamplerSettings
    height: int
    width: int
    tile: int | None
    paths: list[Path] | None  # output PNG of each image; None keeps them in memory only
    force: bool

    def __iter__(self) -> Iterator[Generated]:
        return self.run()

    def run(self, progress: ProgressCallback | None = None) -> Iterator[Generated]:
        progress = progress or (lambda stage, done, total: None)
        gen, pipe, s, n = self.generator, self.generator.pipeline, self.settings, len(self.seeds)
        progress("encode", 0, len(self.prompts))
        feats = pipe.encode([p.text for p in self.prompts], lambda i: progress("encode", i, len(self.prompts)), origins=self.origins)
        models = pipe.describe()
        ts = diffusers_timesteps(s.steps, self.height, self.width, s.mu, s.std) if gen.reference == "diffusers" else None
        for j, seed in enumerate(self.seeds):
            prompt, which = self.prompts[j // self.count], f"{j + 1}/{n}"
            progress(f"sample {which}", 0, s.steps)
            image = pipe.generate(feats[j // self.count], self.height, self.width, s, seed, tile=self.tile, ts=ts,
                                  step_callback=lambda info, z: progress(f"sample {which}", info.index + 1, s.steps),
                                  decode_started=lambda: progress(f"decode {which}", 0, 1))
            image.prompt = prompt
            image.metadata = png_metadata(prompt.text, s, seed, self.height, self.width, models,
                                          {"prompt_source": prompt.source, "reference": gen.reference})
            if self.paths is not None:
                image.save(self.paths[j], force=self.force)
            progress(f"decode {which}", 1, 1)
            yield image


def _read_prompts(prompts: Prompts, *, raw: bool, keep_bboxes: bool) -> tuple[list[Prompt], list[tuple]]:
    read: list[tuple[Prompt, tuple]] = []
    for it in [prompts] if isinstance(prompts, (str, os.PathLike)) else prompts:
        if isinstance(it, os.PathLike):
            stdin = os.fspath(it) == "-"
            src = "<stdin>" if stdin else it
            read += [(p, (src, p.line)) for p in read_prompt_file(src, raw=raw, keep_bboxes=keep_bboxes, text=sys.stdin.read() if stdin else None)]
        else:
            read.append((prompt_from_string(it, raw=raw, keep_bboxes=keep_bboxes), (None, None)))
    if not read:
        raise InputError("no prompt given")
    return [p for p, _ in read], [o for _, o in read]


class Generator:
    """One model (a folder from `gguf-dit convert`, or None: the embedded demo model), checked when created and
    loaded on first use, for any number of batches. Parameters: docs/runtime.md "Python API"."""

    def __init__(self, model: str | Path | None = None, *, text_encoder: str | Path | None = None, backend: str = "auto",
                 threads: int | None = None, reference: str = "official") -> None:
        if reference not in REFERENCES:
            raise InputError(f"reference must be official or diffusers, got {reference!r}")
        self.demo, self.reference = model is None, reference
        self.files = ModelFiles.find(demo.model_dir() if model is None else model, text_encoder)
        self.pipeline = Pipeline(self.files, backend=backend, threads=threads, options=RuntimeOptions(t_rounding=REFERENCES[reference]))
        self.pipeline.check_files()

    def generate(self, prompts: Prompts, *, seed: int | None = 0, count: int = 1, width: int | None = None, height: int | None = None,
                 settings: SamplerSettings | str = "default-20", tile: int | None = None, out: str | Path | None = None,
                 force: bool = False, raw: bool = False, keep_bboxes: bool = False) -> Batch:
        """Check a request (prompts: a string is one prompt, a path a prompt file; size; output location) and return it
        as a `Batch`; nothing is computed yet. ``seed`` None or -1 draws a random one (``Batch.seeds[0]``).
        Parameters: docs/runtime.md "Python API"."""
        if count < 1:
            raise InputError(f"image count must be at least 1, got {count}")
        ps, origins = _read_prompts(prompts, raw=raw, keep_bboxes=keep_bboxes)
        settings = resolve_settings(settings) if isinstance(settings, str) else settings
        header = self.pipeline.header  # the model's size hints; sizes outside its range are refused naming it
        h, w = height or header.default_size, width or header.default_size
        token_grid(h, w)
        for name, v in (("height", h), ("width", w)):
            if not header.size_range[0] <= v <= header.size_range[1]:
                raise InputError(f"{name} {v} is outside the model's range {'..'.join(map(str, header.size_range))} pixels", path=header.path)
        if max(h, w) / min(h, w) > MAX_ASPECT:
            raise InputError(f"aspect ratio {w}:{h} exceeds {MAX_ASPECT:.0f}:1")
        if seed is None or seed == RANDOM_SEED:
            seed = secrets.randbelow(2**32)
        seeds = [seed + j for j in range(len(ps) * count)]
        paths = None if out is None else output_paths(out, seeds)
        if paths is not None:
            check_output(paths, h, w, force=force)
        return Batch(self, ps, origins, count, seeds, settings, h, w, tile, paths, force)

    def close(self) -> None:
        """Free the backbones and the decoder now rather than when the generator is garbage collected."""
        self.pipeline.close()
