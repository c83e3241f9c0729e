"""The ``gguf-dit`` command line. Library errors (GgufDitError) become one line on stderr and exit code 2."""

from __future__ import annotations

import atexit
import functools
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
import typer.core

from gguf_dit.arch import MODEL_FILES

# typer's rich help prints a value type after every option, "<bool>" even for flags, which take no value: flags get none.
# display_type_rich is typer's internal hook (0.29 has it; the typer of the H200 image did not, and the CLI failed to
# import there): where it is missing the help keeps typer's own look rather than the command failing.
_value_type = getattr(typer.core.TyperOption, "display_type_rich", None)
if _value_type is not None:
    typer.core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _value_type(self, ctx)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="GGUF converter and ggml runtime for the Ideogram 4.0 text-to-image model.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        from gguf_dit.sysinfo import version_line

        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", "-V", help="Print gguf-dit, llama-cpp-python and ggml versions and exit.", callback=_show_version, is_eager=True),
) -> None:
    """GGUF converter and ggml runtime for the Ideogram 4.0 text-to-image model."""


def _errors_to_exit(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from gguf_dit.errors import GgufDitError

        try:
            return fn(*args, **kwargs)
        except GgufDitError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("error: interrupted; no partial file was kept", err=True)
            # The interpreter's final garbage collection took 2.2-3.4 s after an interrupted sampling run (0.65-1.0 s
            # with it skipped); at exit it frees nothing the OS would not, so skip it and return to the shell.
            atexit.register(gc.freeze)
            raise typer.Exit(130)
        except OSError as e:
            if e.filename is None:  # not about a file the user gave: a bug, keep the traceback
                raise
            typer.echo(f"error: {e.filename}: {e.strerror or e}", err=True)
            raise typer.Exit(2)

    return wrapper


def _bars(*columns, **kwargs):
    """A started rich progress display: each task's description and bar, then ``columns``."""
    from rich.progress import BarColumn, Progress, TextColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), *columns, **kwargs)
    p.start()
    return p


def _progress_factory(quiet: bool):
    if quiet:
        return None
    from rich.progress import DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

    class Bar:
        def __init__(self, label: str, total_bytes: int, n_tensors: int) -> None:
            self.p = _bars(DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
            self.label, self.n, self.total, self.last = label, 0, n_tensors, None
            self.task = self.p.add_task(f"{label} [0/{n_tensors} tensors]", total=total_bytes)

        def __call__(self, name: str, nbytes: int) -> None:
            if name != self.last:  # a tensor arrives in several pieces
                self.n, self.last = self.n + 1, name
            self.p.update(self.task, advance=nbytes, description=f"{self.label} [{self.n}/{self.total} tensors]")

        def close(self) -> None:
            self.p.stop()

    return Bar


# Every command declares its options as `name: T = typer.Option(default, flags, help)`: the option lists of convert
# and run share that shape line after line (what `duplicates` pairs), not logic. What run does lives in
# runtime/generate.py; the command maps its options onto it.
@app.command()
@_errors_to_exit
def convert(
    src: Path = typer.Argument(..., metavar="SRC", help="Checkpoint root (with transformer/ and unconditional_transformer/), one backbone folder, one backbone .safetensors file, or a VAE by itself (ae.safetensors, flux2-vae.safetensors, a diffusers vae/ folder: writes vae.gguf)."),
    out_dir: Path = typer.Option(..., "-o", "--out-dir", help=f"Output folder; writes {', '.join(MODEL_FILES.values())} (those of the parts converted)."),
    recipe: str = typer.Option("q8_0", "--recipe", help="f32, f16, bf16, q8_0, q6_k, q5_k, q4_k, q4_k-protect, q4_k-m, or a recipe .json path."),
    type_: Optional[str] = typer.Option(None, "--type", help="Storage type for every linear (e.g. q8_0, q4_k, f16); overrides the recipe's linear type."),
    rule: List[str] = typer.Option([], "--rule", help="REGEX=TYPE for matching tensor names; repeatable; first match wins; checked before the recipe."),
    role: Optional[str] = typer.Option(None, "--role", help="cond or uncond: convert only that backbone (or name the role of a single backbone)."),
    q4k_path: str = typer.Option("weighted", "--q4k-path", help="K-quant search: 'weighted' (uniform importance, as stable-diffusion.cpp) or 'reference' (as llama-quantize without imatrix)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantization threads (default: physical cores less those other processes keep busy, at least 1)."),
    parts: Optional[str] = typer.Option(None, "--parts", help="Comma-separated subset of dit,text_encoder,vae (default: every part the checkpoint holds)."),
    te_type: Optional[str] = typer.Option(None, "--te-type", help="Text encoder linear type (default q8_0; f32/f16/bf16 under those recipes)."),
    te_down_proj_type: Optional[str] = typer.Option(None, "--te-down-proj-type", help="Type for the encoder's mlp.down_proj (massive activations), e.g. f16."),
    vae_type: Optional[str] = typer.Option(None, "--vae-type", help="VAE decoder weights: f16 (default) or f32 (default under the f32 recipe)."),
    size_range: Optional[str] = typer.Option(None, "--size-range", help="LOW..HIGH image sides the model supports, stored in the backbones for `run` (default: 256..2048 for the real model)."),
    default_size: Optional[int] = typer.Option(None, "--default-size", help="Image side `run` uses when -W/-H are not given (default 1024 for the real model)."),
    smooth: Optional[Path] = typer.Option(None, "--smooth", metavar="CALIB", help="Fold activation smoothing (SmoothQuant) into the weights, from `calibrate`'s folder (its *.act_absmax.safetensors) or one such file (with --role)."),
    smooth_alpha: float = typer.Option(0.5, "--smooth-alpha", help="SmoothQuant's alpha in 0..1: how much of the activations' range moves into the weights."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", metavar="CALIB", help="Importance-weighted quantization from `calibrate`'s folder (transformer.imatrix, unconditional_transformer.imatrix) or one imatrix file (llama.cpp/stable-diffusion.cpp layout, e.g. sd-cli --imat-out)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Convert an Ideogram 4 checkpoint into GGUF files: both DiT backbones (transformer.gguf, unconditional_transformer.gguf),
    the text encoder (text_encoder.gguf), the VAE decoder (vae.gguf)."""
    from gguf_dit.converter import convert as conv
    from gguf_dit.converter.recipe import resolve
    from gguf_dit.errors import GgufDitError

    if role is not None and role not in ("cond", "uncond"):
        raise GgufDitError(f"--role must be cond or uncond, got {role!r}")
    r = resolve(recipe, type_, rule)
    chosen = [p.strip() for p in parts.split(",") if p.strip()] if parts else None
    results = conv.convert_checkpoint(
        src, out_dir, r, parts=chosen, force=force, role=role, q4k_path=q4k_path, threads=threads,
        te_type=te_type, te_down_proj_type=te_down_proj_type, vae_type=vae_type, progress_factory=_progress_factory(quiet),
        sizes=conv.SizeHints.parse(size_range, default_size), smooth=smooth, smooth_alpha=smooth_alpha,
        imatrix=imatrix, warn=lambda w: typer.echo(f"warning: {w}", err=True),
    )
    for res in results:
        typer.echo(f"{res.path}: {res.summary}")


@app.command()
@_errors_to_exit
def inspect(
    file: Path = typer.Argument(..., metavar="FILE", help="Any GGUF convert writes: a backbone (ours or a stable-diffusion.cpp-style file without metadata), text_encoder.gguf or vae.gguf."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report."),
    check: bool = typer.Option(False, "--check", help="Also scan every tensor for NaN/Inf values (float bits and quantized block scales, a few MiB at a time)."),
) -> None:
    """Describe a GGUF: kind, config, types, bytes, provenance, warnings; exit 2 when it has problems `run` refuses."""
    from gguf_dit.errors import ModelError
    from gguf_dit.runtime.inspection import describe, render

    report = describe(file, check=check)
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))
    if report["problems"]:
        n = len(report["problems"])
        raise ModelError(f"{n} problem{'s' * (n > 1)} that `run` refuses, first: {report['problems'][0]}", path=file)


@app.command()
@_errors_to_exit
def info(as_json: bool = typer.Option(False, "--json", help="Print a JSON report.")) -> None:
    """System report for bug reports: versions, ggml backends and devices, CPU features, defaults."""
    from gguf_dit import sysinfo

    data = sysinfo.collect()
    typer.echo(json.dumps(data, indent=2) if as_json else sysinfo.render(data))


@app.command()
@_errors_to_exit
def run(
    ctx: typer.Context,
    prompt_file: Optional[str] = typer.Argument(None, metavar="PROMPT_FILE", help="A JSON caption, JSON Lines (one caption per line), or plain text (one prompt per line); - reads it from stdin. Optional with -p."),
    prompt: List[str] = typer.Option([], "-p", "--prompt", help="A prompt (plain text or one JSON caption); repeatable; adds to PROMPT_FILE's prompts."),
    from_png: Optional[Path] = typer.Option(None, "--from-png", metavar="IMAGE", help="Draw IMAGE again from its gguf-dit metadata: its prompt, seed, size, steps, guidance schedule, mu, std, reference and preset; options given explicitly override them."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Folder with transformer.gguf, unconditional_transformer.gguf, text_encoder.gguf, vae.gguf (from gguf-dit convert); the component options override its files. Default (no --model, no component): the embedded demo model."),
    diffusion_model: Optional[Path] = typer.Option(None, "--diffusion-model", help="Conditional backbone GGUF (ours or stable-diffusion.cpp's -M convert output), instead of MODEL/transformer.gguf."),
    uncond_diffusion_model: Optional[Path] = typer.Option(None, "--uncond-diffusion-model", help="Unconditional backbone GGUF, instead of MODEL/unconditional_transformer.gguf; not needed when every step's guidance is 1."),
    text_encoder: Optional[Path] = typer.Option(None, "--llm", "--text-encoder", help="Text encoder GGUF, instead of MODEL/text_encoder.gguf (e.g. a community Qwen3-VL-8B-Instruct GGUF)."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="VAE: a vae.gguf, a FLUX.2 autoencoder .safetensors (ae.safetensors, flux2-vae.safetensors) or a diffusers vae/ folder (converted once, cached), instead of MODEL/vae.gguf."),
    preset: str = typer.Option("default-20", "--preset", help="quality-48, default-20 or turbo-12."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Number of steps (overrides the preset; the preset's final low-guidance steps are kept)."),
    guidance: Optional[str] = typer.Option(None, "--guidance", help="Constant guidance (7) or a run-order schedule (7x18+3x2)."),
    mu: Optional[float] = typer.Option(None, "--mu", help="Logit-normal schedule mean (before the resolution shift)."),
    std: Optional[float] = typer.Option(None, "--std", help="Logit-normal schedule standard deviation."),
    width: Optional[int] = typer.Option(None, "--width", "-W", help="Image width in pixels, a multiple of 16 (default: the model's default size)."),
    height: Optional[int] = typer.Option(None, "--height", "-H", help="Image height in pixels, a multiple of 16."),
    seed: int = typer.Option(0, "--seed", "-s", help="Seed of the first image; each further image adds 1; -1 draws a random one (printed)."),
    count: str = typer.Option("1", "-b", "--batch-count", "-n", "--count", metavar="N", help="Images per prompt. Not sd.cpp's -n NEGATIVE: Ideogram 4 has no negative prompt (its unconditional backbone sees no text)."),
    out: Path = typer.Option(Path("outputs"), "-o", "--out", help="A folder (NNNNN-SEED.png, numbered on after the images already there), an image path (.png, .jpg, .jpeg, .webp), or a pattern with a printf index (img_%03d.png)."),
    backend: str = typer.Option("auto", "--backend", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: physical cores less those other processes keep busy, at least 1)."),
    offload: str = typer.Option("auto", "--offload", help="Backbone weights streamed block by block from host memory instead of resident: none, uncond (the unconditional backbone), all, or auto (the fastest mode that fits the budget)."),
    max_vram: Optional[float] = typer.Option(None, "--max-vram", metavar="GIB", help="Memory budget on a GPU backend, GiB (default: the GPU's free memory); a budget nothing fits is an error before any work."),
    max_ram: Optional[float] = typer.Option(None, "--max-ram", metavar="GIB", help="Memory budget on the CPU backend, GiB: weights, compute buffers, encoder and decoder (default: MemAvailable)."),
    raw: bool = typer.Option(False, "--raw", help="Pass plain-text prompts to the encoder unchanged instead of wrapping them in a minimal JSON caption."),
    keep_bboxes: bool = typer.Option(False, "--keep-bboxes", help="Keep element bboxes in JSON captions (the official pipeline strips them)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse JSON captions with keys the published caption spec lacks (default: warn and keep them)."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Decode in tiles of this many latent pixels (saves memory on large images)."),
    reference: str = typer.Option("official", "--reference", help="official (the official loop: bf16-rounded t, ends at t_max) or diffusers (reproduces diffusers' Ideogram4Pipeline: float32 t, its sigma grid ending at t = 1)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing -o image path (numbered names never overwrite)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print debug logs, llama.cpp's and ggml's included (hidden otherwise)."),
) -> None:
    """Generate PNGs from -p prompts and/or a prompt file: encode, sample both CFG backbones, decode."""
    from gguf_dit import hashes
    from gguf_dit.errors import OptionError
    from gguf_dit.runtime import demo, native_log
    from gguf_dit.runtime.caption import bbox_notice, caption_summary
    from gguf_dit.runtime.generate import RANDOM_SEED, Generator
    from gguf_dit.runtime.schedule import resolve_settings
    from gguf_dit.vae_files import vae_gguf

    if not count.strip().lstrip("+-").isdigit():
        raise OptionError(f"-n/--batch-count is the image count, got {count!r}; Ideogram 4 has no negative prompt "
                          "(its unconditional backbone sees no text), so sd.cpp's -n NEGATIVE has no counterpart")
    if prompt_file is None and not prompt and from_png is None:
        raise OptionError('no prompt: give -p "TEXT" (repeatable) and/or a PROMPT_FILE (- for stdin)')
    if prompt_file not in (None, "-") and not Path(prompt_file).exists():
        raise OptionError(f'prompt file not found; did you mean -p "{prompt_file}"?', path=prompt_file)
    prompts = ([] if prompt_file is None else [Path(prompt_file)]) + list(prompt)
    png = None
    if from_png is not None:  # the image's settings stand in for every option not given explicitly
        from gguf_dit.runtime.infotext import from_png as read_png

        png = read_png(from_png)
        given = {n for n in ("preset", "seed", "reference") if ctx.get_parameter_source(n).name != "DEFAULT"}
        prompts, width, height = prompts or [png.prompt], width or png.width, height or png.height
        seed = seed if "seed" in given else png.seed
        reference = reference if "reference" in given else png.reference
        preset = preset if "preset" in given else png.settings

    with native_log.verbose(sys.stderr) if verbose else native_log.hidden():
        settings = resolve_settings(preset, steps=steps, guidance=guidance, mu=mu, std=std)
        gen = Generator(model, diffusion_model=diffusion_model, uncond_diffusion_model=uncond_diffusion_model, text_encoder=text_encoder,
                        vae=None if vae is None else vae_gguf(vae), backend=backend, threads=threads, reference=reference,
                        offload=offload, max_vram=max_vram, max_ram=max_ram)
        if gen.demo and not quiet:
            typer.echo(demo.NOTICE, err=True)
        if png is not None and png.model_hash not in (None, used := hashes.autov2(gen.files.transformer)):
            typer.echo(f"warning: {from_png} was drawn with model hash {png.model_hash}, this run uses {used} ({gen.files.transformer}): "
                       "the image will differ", err=True)
        for w in gen.warnings:
            typer.echo(f"warning: {w}", err=True)
        batch = gen.generate(prompts, seed=seed, count=int(count), width=width, height=height, settings=settings, tile=tile,
                             out=out, force=force, raw=raw, keep_bboxes=keep_bboxes, strict=strict)
        for p, (src, line) in zip(batch.prompts, batch.origins):
            for w in p.warnings:
                typer.echo(f"warning: {src}{f':{line}' if line else ''}: {w}", err=True)
        if (note := bbox_notice(batch.prompts)) and not quiet:
            typer.echo(note, err=True)
        if seed == RANDOM_SEED:
            typer.echo(f"seed {batch.seeds[0]} (random)", err=True)
        if not quiet:
            typer.echo(batch.plan.line(), err=True)
        if quiet:
            for image in batch:
                typer.echo(str(image.path))
            return
        with (_RunBars() if sys.stderr.isatty() else _RunLines()) as bars:
            for image in batch.run(bars):
                bars.say(f"wrote {image.path}  ({caption_summary(image.prompt.text)})")


class _RunLines:
    """`run`'s progress on a stderr that is not a terminal (logs, nohup, CI): one plain line per step and per image,
    with the stage's rate and elapsed time, as tqdm and sd.cpp print there."""

    UNITS = {"encode": "prompt", "load": "backbone", "sample": "step", "decode": "image"}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def say(self, line: str) -> None:
        typer.echo(line, err=True)

    def rate(self, stage: str, done: int) -> str:
        """Units per second, or seconds per unit when one takes more than a second."""
        unit, spent = self.UNITS[stage.split()[0]], time.perf_counter() - self.t0
        return f"{spent / done:.1f} s/{unit}" if spent > done else f"{done / max(spent, 1e-9):.2f} {unit}/s"

    def __call__(self, stage: str, done: int, total: int) -> None:
        if done == 0:
            self.t0 = time.perf_counter()
            return
        spent = time.perf_counter() - self.t0
        if total == 1:
            self.say(f"{stage}: done in {spent:.1f} s")
        else:
            self.say(f"{stage}: {self.UNITS[stage.split()[0]]} {done}/{total}, {self.rate(stage, done)}, {spent:.1f} s elapsed")


class _RunBars(_RunLines):
    """`run`'s progress on a terminal: a bar per stage the library reports (encode, sample J/N, decode J/N) with its rate."""

    def __enter__(self) -> "_RunBars":
        from rich.console import Console
        from rich.progress import MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.p = _bars(MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        return self

    def __exit__(self, *exc) -> None:
        self.p.stop()

    def say(self, line: str) -> None:
        self.p.console.print(line, soft_wrap=True)  # a path to copy, unbroken

    def __call__(self, stage: str, done: int, total: int) -> None:
        kind, _, which = stage.partition(" ")
        if kind == "sample" and done == 0 and which.startswith("1/"):  # one overall bar for the batch's images
            self.batch = self.p.add_task("images", total=int(which[2:]), rate="")
        if done == 0:
            self.task, self.t0 = self.p.add_task(stage, total=total, rate=""), time.perf_counter()
        else:
            self.p.update(self.task, completed=done, rate=self.rate(stage, done))
        if kind == "decode" and done == total:
            self.p.advance(self.batch)


@app.command()
@_errors_to_exit
def show(
    image: Path = typer.Argument(..., metavar="IMAGE", help="An image gguf-dit run wrote (or any with A1111 parameters: PNG text, JPEG/WebP EXIF)."),
    as_json: bool = typer.Option(False, "--json", help="Print every gguf-dit setting as JSON (what run --from-png reads) instead of the A1111 text."),
) -> None:
    """Print the settings an image was drawn with: its A1111 parameters text, as A1111's PNG Info shows it."""
    from gguf_dit.errors import InputError
    from gguf_dit.runtime.infotext import TEXT_KEY, read_settings, read_text

    if as_json:
        typer.echo(json.dumps(read_settings(image), indent=2, ensure_ascii=False))
        return
    text = read_text(image).get(TEXT_KEY)
    if text is None:
        raise InputError(f"has no generation settings (no {TEXT_KEY!r} text, no gguf-dit metadata)", path=image)
    typer.echo(text)


@app.command()
@_errors_to_exit
def calibrate(
    model: Path = typer.Argument(..., metavar="MODEL", help="A float conversion (convert --recipe f32, f16 or bf16): folder with both backbones and text_encoder.gguf."),
    prompts: Path = typer.Option(..., "--prompts", help="Calibration prompts: a prompt file as `run` reads it (plain text lines, JSON captions)."),
    out_dir: Path = typer.Option(..., "-o", "--out-dir", metavar="CALIB_DIR", help="Output folder: both backbones' .imatrix and .act_absmax.safetensors, recipe.json, calibration.json."),
    type_: str = typer.Option("q4_k", "--type", help="Type whose fragility is measured and that the recipe uses for the other linears."),
    budget: str = typer.Option("0.05", "--budget", help="Extra bytes the recipe may spend on fragile linears: MB (1 and above, or 12MB) or a fraction of the --type model (0.05 or 5%)."),
    preset: str = typer.Option("default-20", "--preset", help="Sampling preset of the trajectories: quality-48, default-20 or turbo-12."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (overrides the preset's)."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT of the calibration images (default: the model's default size)."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per prompt (0, 1, ...)."),
    states: int = typer.Option(5, "--states", help="States per trajectory (evenly spaced steps) at which every fragility variant is evaluated."),
    refine: int = typer.Option(4, "--refine", help="Worst blocks (by their linears quantized together) measured linear by linear."),
    backend: str = typer.Option("auto", "--backend", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: physical cores less those other processes keep busy, at least 1)."),
    force: bool = typer.Option(False, "--force", help="Replace existing files in CALIB_DIR."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Measure a float model on its own sampling trajectories: importance matrices and activation maxima of every linear,
    each linear's fragility at --type, and a recipe protecting the most fragile ones within --budget."""
    from gguf_dit import calib_dir
    from gguf_dit.converter.recipe import parse_type
    from gguf_dit.runtime import native_log
    from gguf_dit.runtime.calibrate import calibrate as run_calibration, parse_budget, parse_size
    from gguf_dit.runtime.caption import read_prompt_file
    from gguf_dit.runtime.model_files import ModelFiles

    qtype, bud, wh = parse_type(type_, "--type"), parse_budget(budget), parse_size(size)
    files = ModelFiles.find(model)
    ps = read_prompt_file(prompts)
    origins = [(prompts, p.line) for p in ps]
    outs = calib_dir.output_set(out_dir, force=force)

    def progress(stage: str, done: int, total: int) -> None:
        if not quiet and done == total:
            typer.echo(f"{stage}: {total} done", err=True)

    with native_log.hidden():
        cal = run_calibration(files, ps, qtype=qtype, budget=bud, preset=preset, steps=steps, size=wh, seeds=seeds, states=states, refine=refine,
                              backend=backend, threads=threads, origins=origins, dataset=prompts.name, progress=progress)
    with outs:
        calib_dir.write(outs, cal, dataset=prompts.name)
    b = cal.report["budget"]
    typer.echo(f"{out_dir}: {len(cal.recipe['rules'])} linears protected, {b['used_bytes'] / 1e6:.3f} of {b['allowed_bytes'] / 1e6:.3f} MB; "
               f"{cal.report['forwards']['trajectories'] + cal.report['forwards']['fragility']} forwards in "
               f"{sum(v for k, v in cal.report['timings'].items() if k.endswith('_s') and k != 'fragility_forward_s'):.1f} s")


@app.command("eval")
@_errors_to_exit
def eval_(
    reference: Path = typer.Argument(..., metavar="REFERENCE", help="Model folder (e.g. an f32 conversion) or a backbone GGUF; its text encoder and VAE serve both sides."),
    candidate: Path = typer.Argument(..., metavar="CANDIDATE", help="Model folder (only its backbones are used) or a backbone GGUF, converted from the same checkpoint."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompt file (as for run: JSON caption, JSON Lines or plain text lines)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Folder whose other components complete a backbone-file side (default: REFERENCE if a folder, else the embedded demo model)."),
    preset: str = typer.Option("default-20", "--preset", help="quality-48, default-20 or turbo-12."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Number of steps (overrides the preset's)."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT in pixels (default: the model's default size)."),
    seeds: int = typer.Option(1, "--seeds", help="Images per prompt; image J of the whole batch draws seed SEED + J, as in run."),
    seed: int = typer.Option(0, "--seed", "-s", help="First seed."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full report (per step, per image, per side) to this JSON file."),
    backend: str = typer.Option("auto", "--backend", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads, the same for both sides (default: physical cores less those other processes keep busy)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --json file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Measure what a conversion costs: CANDIDATE against REFERENCE on the same prompts, noise and schedule (velocity error per
    step of both backbones, final-latent error, image PSNR and SSIM, weight bytes, time; docs/quantization.md)."""
    from rich.console import Console

    from gguf_dit.errors import OptionError, OutputError
    from gguf_dit.runtime import evaluate, native_log
    from gguf_dit.runtime.calibrate import parse_size
    from gguf_dit.runtime.schedule import resolve_settings

    wh = parse_size(size)
    if seeds < 1:
        raise OptionError(f"--seeds must be at least 1, got {seeds}")
    if json_out is not None and (json_out.is_dir() or (json_out.exists() and not force) or not json_out.parent.is_dir()):
        why = "is a folder" if json_out.is_dir() else "already exists (use --force to overwrite)" if json_out.exists() else "folder does not exist"
        raise OutputError(why, path=json_out)
    if not prompts.is_file():
        raise OptionError("prompt file not found", path=prompts)
    with native_log.hidden():
        report = evaluate.evaluate(reference, candidate, prompts, model=model, settings=resolve_settings(preset, steps=steps), size=wh,
                                   seeds=seeds, seed=seed, backend=backend, threads=threads,
                                   progress=None if quiet else lambda line: typer.echo(line, err=True))
    evaluate.render(report, Console())
    if json_out is not None:
        evaluate.write_json(report, json_out, force=force)
        typer.echo(f"wrote {json_out}")


@app.command("tiny-checkpoint")
@_errors_to_exit
def tiny_checkpoint(
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to create (transformer/ and unconditional_transformer/ inside)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the uncond backbone uses seed + 1)."),
    bf16: bool = typer.Option(False, "--bf16", help="Write BF16 DiT linears instead of the official FP8 + weight_scale."),
    dit_only: bool = typer.Option(False, "--dit-only", help="Only the two DiT backbones (no text encoder, tokenizer or VAE)."),
    force: bool = typer.Option(False, "--force", help="Replace the checkpoint's folders where they exist."),
) -> None:
    """Write a tiny random Ideogram 4 checkpoint in the official layout: both DiTs, a Qwen3-VL-layout encoder with
    tokenizer, a FLUX.2-layout VAE. For trying convert and run end to end: random weights draw noise."""
    from gguf_dit.converter.output import OutputSet
    from gguf_dit.converter.tiny import NBYTES, write_tiny_checkpoint

    names = ["transformer", "unconditional_transformer"] + ([] if dit_only else ["tokenizer", "text_encoder", "vae"])
    with OutputSet(out, names, force=force, need_bytes=NBYTES, folders=True) as outs:
        write_tiny_checkpoint(outs.staging, seed=seed, fp8=not bf16, full=not dit_only)
    parts = "DiTs" if dit_only else "DiTs, text encoder + tokenizer, VAE"
    typer.echo(f"{out}: tiny random Ideogram 4 checkpoint ({parts}; {'BF16' if bf16 else 'FP8 + weight_scale'} DiT linears, official layout)")


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
