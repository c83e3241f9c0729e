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

from gguf_dit.arch.dit import MAX_TEXT_TOKENS
from gguf_dit.errors import InputError, OptionError

from . import demo
from .caption import Prompt, prompt_from_string, read_prompt_file
from .dit import RuntimeOptions
from .backbone_file import BackboneFile
from .infotext import png_metadata
from .memory_plan import OFFLOAD, Plan, check_budget, text_tokens_bound
from .memory_plan import plan as memory_plan
from .model_files import ModelFiles
from .pipeline import NO_UNCOND, Generated, Pipeline
from .png import Outputs
from .sampler import needs_uncond, token_grid
from .schedule import SamplerSettings, diffusers_timesteps, resolve_settings
from .vae_tiling import check_tile

MAX_ASPECT = 6.0

#: ``reference`` → how t is rounded before the timestep embedding (diffusers keeps float32 t).
REFERENCES = {"official": "bf16", "diffusers": "none"}

#: A string is one prompt, a path a prompt file (``Path("-")``: read from stdin), a `Prompt` one used as is (e.g.
#: `infotext.from_png`'s), or an iterable of them.
Prompts = Union[str, os.PathLike, Prompt, Iterable[Union[str, os.PathLike, Prompt]]]

RANDOM_SEED = -1  # sd.cpp's and A1111's "draw a random seed"

#: ``progress(stage, done, total)``: stage "encode", "load" (the backbones, when not loaded yet; again after a plan
#: freed them for a decode), then "sample J/N" and "decode J/N" per image; done = 0 starts a stage.
ProgressCallback = Callable[[str, int, int], None]


@dataclasses.dataclass
class Batch:
    """A checked request, nothing computed yet. Iterating it (or ``run(progress)``) encodes every prompt, then
    samples and decodes image by image, yielding each `Generated` (saved first when ``outputs`` is set)."""

    generator: "Generator"
    prompts: list[Prompt]
    origins: list[tuple]  # (prompt file or None, line or None) of each prompt, for errors and warnings
    count: int  # images per prompt: image j draws prompt j // count with seed seeds[j]
    seeds: list[int]
    settings: SamplerSettings
    height: int
    width: int
    tile: int | None
    outputs: Outputs | None  # where the images are written; None keeps them in memory only
    plan: "Plan | None" = None  # the memory mode chosen for this batch (memory_plan.py); `plan.line()` says it

    @property
    def paths(self) -> list[Path] | None:
        """The output names planned when the batch was checked (`Generated.path` is where each image went)."""
        return None if self.outputs is None else self.outputs.paths

    def __iter__(self) -> Iterator[Generated]:
        return self.run()

    def run(self, progress: ProgressCallback | None = None) -> Iterator[Generated]:
        progress = progress or (lambda stage, done, total: None)
        gen, pipe, s, n = self.generator, self.generator.pipeline, self.settings, len(self.seeds)
        progress("encode", 0, len(self.prompts))
        feats = pipe.encode([p.text for p in self.prompts], lambda i: progress("encode", i, len(self.prompts)), origins=self.origins)
        if self.plan is not None:
            pipe.apply(self.plan)
        pipe.load_backbones(needs_uncond(s.guidance), lambda done, total: progress("load", done, total))
        models = pipe.describe(needs_uncond(s.guidance))
        ts = diffusers_timesteps(s.steps, self.height, self.width, s.mu, s.std) if gen.reference == "diffusers" else None
        for j, seed in enumerate(self.seeds):
            prompt, which = self.prompts[j // self.count], f"{j + 1}/{n}"
            progress(f"sample {which}", 0, s.steps)
            image = pipe.generate(feats[j // self.count], self.height, self.width, s, seed, tile=self.tile, ts=ts,
                                  step_callback=lambda info, z: progress(f"sample {which}", info.index + 1, s.steps),
                                  decode_started=lambda: progress(f"decode {which}", 0, 1))
            image.prompt = prompt
            image.metadata = png_metadata(prompt, s, seed, self.height, self.width, models, gen.reference)
            if self.outputs is not None:
                image.path = self.outputs.write(image.image, image.metadata)
            progress(f"decode {which}", 1, 1)
            yield image


def _read_prompts(prompts: Prompts, *, raw: bool, keep_bboxes: bool, strict: bool = False) -> tuple[list[Prompt], list[tuple]]:
    read: list[tuple[Prompt, tuple]] = []
    for it in [prompts] if isinstance(prompts, (str, os.PathLike, Prompt)) else prompts:
        if isinstance(it, Prompt):
            read.append((it, (None, None)))
        elif isinstance(it, os.PathLike):
            stdin = os.fspath(it) == "-"
            src = "<stdin>" if stdin else it
            read += [(p, (src, p.line)) for p in read_prompt_file(src, raw=raw, keep_bboxes=keep_bboxes, strict=strict, text=sys.stdin.read() if stdin else None)]
        else:
            read.append((prompt_from_string(it, raw=raw, keep_bboxes=keep_bboxes, strict=strict), (None, None)))
    if not read:
        raise InputError("no prompt given")
    return [p for p, _ in read], [o for _, o in read]


class Generator:
    """One model (a folder from `gguf-dit convert`, single component files, both, or nothing: the embedded demo model),
    checked when created and loaded on first use, for any number of batches. ``warnings``: lines to show the user
    (backbone roles no metadata records). Parameters: docs/runtime.md "Python API"."""

    def __init__(self, model: str | Path | None = None, *, diffusion_model: str | Path | None = None,
                 uncond_diffusion_model: str | Path | None = None, text_encoder: str | Path | None = None,
                 vae: str | Path | None = None, backend: str = "auto", threads: int | None = None, reference: str = "official",
                 offload: str = "auto", max_vram: float | None = None, max_ram: float | None = None) -> None:
        if reference not in REFERENCES:
            raise InputError(f"reference must be official or diffusers, got {reference!r}")
        components = {"transformer": diffusion_model, "unconditional_transformer": uncond_diffusion_model, "text_encoder": text_encoder, "vae": vae}
        self.demo, self.reference = model is None and all(v is None for v in components.values()), reference
        self.files = ModelFiles.find(demo.model_dir() if self.demo else model, **components)
        self.pipeline = Pipeline(self.files, backend=backend, threads=threads, options=RuntimeOptions(t_rounding=REFERENCES[reference]))
        self.warnings = self.pipeline.check_files()
        if offload not in OFFLOAD:
            raise OptionError(f"offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
        self.offload, self.budgets = offload, {"--max-vram": check_budget(max_vram, "--max-vram"), "--max-ram": check_budget(max_ram, "--max-ram")}

    def memory_plan(self, prompts: list[Prompt], height: int, width: int, settings: SamplerSettings, tile: int | None) -> Plan:
        """The memory mode for these images (before anything is loaded): the budget of the backend's device
        (``max_vram`` on a GPU, ``max_ram`` on the CPU, else its free memory) and the longest prompt's token bound."""
        from gguf_dit.arch.text_encoder import TEMPLATE
        from gguf_dit.ggml_ops import available

        from .text_encoder_file import read_meta

        name = self.pipeline.backend_name.lower()
        # no GPU: planned for the CPU; a GPU asked for anyway is refused by Backend when the backbones load
        backend = "cuda" if name != "cpu" and "cuda" in available() else "cpu"
        flag = "--max-ram" if backend == "cpu" else "--max-vram"
        template = read_meta(self.files.text_encoder)["template"] or TEMPLATE
        header = self.pipeline.header
        n_text = max(text_tokens_bound(p.text, template, MAX_TEXT_TOKENS) for p in prompts)
        uses = [float(g) != 1.0 for g in settings.guidance]
        uncond = BackboneFile(self.files.unconditional_transformer) if any(uses) else None
        plan = memory_plan(header, uncond, backend=backend, height=height, width=width, n_text=n_text, offload=self.offload,
                           budget=self.budgets[flag], budget_source=flag if self.budgets[flag] else None, options=self.pipeline.options, tile=tile,
                           encoder=self.files.text_encoder, cfg_steps=sum(uses) / len(uses))
        # a budget for the other device is said to be unused, not silently dropped (scripts pass both across machines)
        return dataclasses.replace(plan, ignored=tuple(f for f, v in self.budgets.items() if f != flag and v is not None))

    def generate(self, prompts: Prompts, *, seed: int | None = 0, count: int = 1, width: int | None = None, height: int | None = None,
                 settings: SamplerSettings | str = "default-20", tile: int | None = None, out: str | Path | None = None,
                 force: bool = False, raw: bool = False, keep_bboxes: bool = False, strict: bool = False) -> Batch:
        """Check a request (prompts: a string is one prompt, a path a prompt file; size; output location) and return it
        as a `Batch`; nothing is computed yet. ``seed`` None or -1 draws a random one (``Batch.seeds[0]``).
        Parameters: docs/runtime.md "Python API"."""
        if count < 1:
            raise InputError(f"image count must be at least 1, got {count}")
        ps, origins = _read_prompts(prompts, raw=raw, keep_bboxes=keep_bboxes, strict=strict)
        settings = resolve_settings(settings) if isinstance(settings, str) else settings
        if self.files.unconditional_transformer is None and needs_uncond(settings.guidance):
            raise OptionError(NO_UNCOND)
        header = self.pipeline.header  # the model's size hints; sizes outside its range are refused naming it
        h, w = height or header.default_size, width or header.default_size
        token_grid(h, w)
        for name, v in (("height", h), ("width", w)):
            if not header.size_range[0] <= v <= header.size_range[1]:
                raise InputError(f"{name} {v} is outside the model's range {'..'.join(map(str, header.size_range))} pixels", path=header.path)
        if max(h, w) / min(h, w) > MAX_ASPECT:
            raise InputError(f"aspect ratio {w}:{h} exceeds {MAX_ASPECT:.0f}:1")
        check_tile(tile)  # before any sampling: a tile below the minimum would only fail (or wreck the picture) at the end
        if seed is None or seed == RANDOM_SEED:
            seed = secrets.randbelow(2**32)
        seeds = [seed + j for j in range(len(ps) * count)]
        plan = self.memory_plan(ps, h, w, settings, tile)  # an explicit budget nothing fits stops here, before any output
        outputs = None if out is None else Outputs(out, seeds, force=force)
        if outputs is not None:
            outputs.check(h, w)
        return Batch(self, ps, origins, count, seeds, settings, h, w, tile, outputs, plan)

    def close(self) -> None:
        """Free the backbones and the decoder now rather than when the generator is garbage collected."""
        self.pipeline.close()
