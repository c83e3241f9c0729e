"""The ``gguf-dit`` command line. Library errors (GgufDitError) become one line on stderr and exit code 2."""

from __future__ import annotations

import atexit
import functools
import gc
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

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


def _progress_factory(quiet: bool):
    if quiet:
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    class Bar:
        def __init__(self, label: str, total_bytes: int, n_tensors: int) -> None:
            self.p = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
            self.label, self.n, self.total, self.last = label, 0, n_tensors, None
            self.p.start()
            self.task = self.p.add_task(self._desc(), total=total_bytes)

        def _desc(self) -> str:
            return f"{self.label} [{self.n}/{self.total} tensors]"

        def __call__(self, name: str, nbytes: int) -> None:
            if name != self.last:
                self.n, self.last = self.n + 1, name
            self.p.update(self.task, advance=nbytes, description=self._desc())

        def close(self) -> None:
            self.p.stop()

    return Bar


@app.command()
@_errors_to_exit
def convert(
    src: Path = typer.Argument(..., help="Checkpoint root (with transformer/ and unconditional_transformer/), one backbone folder, or one .safetensors file."),
    out_dir: Path = typer.Option(..., "-o", "--out-dir", help="Output folder; writes transformer.gguf and/or unconditional_transformer.gguf."),
    recipe: str = typer.Option("q8_0", "--recipe", help="f32, f16, bf16, q8_0, q4_k, q4_k-protect, or a recipe .json path."),
    type_: Optional[str] = typer.Option(None, "--type", help="Storage type for every linear (e.g. q8_0, q4_k, f16); overrides the recipe's linear type."),
    rule: List[str] = typer.Option([], "--rule", help="REGEX=TYPE for matching tensor names; repeatable; first match wins; checked before the recipe."),
    role: Optional[str] = typer.Option(None, "--role", help="cond or uncond: convert only that backbone (or name the role of a single backbone)."),
    q4k_path: str = typer.Option("weighted", "--q4k-path", help="K-quant search: 'weighted' (uniform importance, as stable-diffusion.cpp) or 'reference' (as llama-quantize without imatrix)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantization threads (default: all cores)."),
    parts: Optional[str] = typer.Option(None, "--parts", help="Comma-separated subset of dit,text_encoder,vae (default: every part the checkpoint holds)."),
    te_type: Optional[str] = typer.Option(None, "--te-type", help="Text encoder linear type (default q8_0; f32/f16/bf16 under those recipes)."),
    te_down_proj_type: Optional[str] = typer.Option(None, "--te-down-proj-type", help="Type for the encoder's mlp.down_proj (massive activations), e.g. f16."),
    vae_type: Optional[str] = typer.Option(None, "--vae-type", help="VAE decoder weights: f16 (default) or f32 (default under the f32 recipe)."),
    size_range: Optional[str] = typer.Option(None, "--size-range", help="LOW..HIGH image sides the model supports, stored in the backbones for `run` (default: 256..2048 for the real model)."),
    default_size: Optional[int] = typer.Option(None, "--default-size", help="Image side `run` uses when -W/-H are not given (default 1024 for the real model)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Convert an Ideogram 4 checkpoint into GGUF files: both DiT backbones, the text encoder, the VAE decoder."""
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
        sizes=conv.SizeHints.parse(size_range, default_size),
    )
    for res in results:
        typer.echo(f"{res.path}: {res.summary}")


@app.command()
@_errors_to_exit
def inspect(
    file: Path = typer.Argument(..., help="A backbone GGUF (ours or a stable-diffusion.cpp-style file without metadata)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report."),
    check: bool = typer.Option(False, "--check", help="Also scan every tensor for NaN/Inf values (float bits and quantized block scales, a few MiB at a time)."),
) -> None:
    """Describe a backbone GGUF: architecture, role, config, types, bytes, recipe and warnings."""
    from gguf_dit import keys
    from gguf_dit.runtime.model_file import BackboneFile

    f = BackboneFile(file, strict=False)
    warnings = list(f.warnings)
    if check:
        warnings += [f"non-finite values in tensor {n}" for n in f.nonfinite()]
    report = {
        "file": str(f.path),
        "architecture": "ideogram4",
        "metadata": f.has_metadata,
        "role": f.role,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in f.config.to_metadata().items()},
        "tensor_count": len(f.tensors),
        "bytes": sum(t.nbytes for t in f.tensors.values()),
        "types": f.type_counts(),
        "recipe": f.recipe,
        "source_sha256": f.metadata.get(keys.SOURCE_SHA256),
        "converter_version": f.metadata.get(keys.CONVERTER_VERSION),
        "warnings": warnings,
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{report['file']}")
    typer.echo(f"  architecture  ideogram4 ({'gguf-dit metadata' if f.has_metadata else 'detected from tensor names'})")
    typer.echo(f"  role          {f.role or 'unknown'}")
    typer.echo("  config        " + ", ".join(f"{k}={v}" for k, v in report["config"].items()))
    typer.echo(f"  tensors       {report['tensor_count']}, {report['bytes'] / 1e6:.2f} MB")
    for t, d in sorted(report["types"].items()):
        typer.echo(f"    {t:<6} {d['count']:>4} tensors  {d['bytes'] / 1e6:10.2f} MB")
    typer.echo(f"  recipe        {f.recipe or 'unknown'}")
    if report["source_sha256"]:
        typer.echo(f"  source        {report['source_sha256']}")
    for w in warnings:
        typer.echo(f"  warning: {w}")


@app.command()
@_errors_to_exit
def info(as_json: bool = typer.Option(False, "--json", help="Print a JSON report.")) -> None:
    """System report for bug reports: versions, ggml backends and devices, CPU features, defaults."""
    from gguf_dit import sysinfo

    data = sysinfo.collect()
    typer.echo(json.dumps(data, indent=2) if as_json else sysinfo.render(data))


def _output_paths(out: Path, count: int, seeds: list[int], index0: int = 0) -> list[Path]:
    if out.suffix.lower() == ".png":
        if count == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{i:03d}.png") for i in range(count)]
    return [out / f"{index0 + i:05d}-{s}.png" for i, s in enumerate(seeds)]


@app.command()
@_errors_to_exit
def run(
    prompt_file: Path = typer.Argument(..., help="A JSON caption, JSON Lines (one caption per line), or plain text (one prompt per line)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Folder with transformer.gguf, unconditional_transformer.gguf, text_encoder.gguf, vae.gguf (from gguf-dit convert). Default: the embedded demo model."),
    text_encoder: Optional[Path] = typer.Option(None, "--text-encoder", help="A text encoder GGUF to use instead of MODEL/text_encoder.gguf (e.g. a community Qwen3-VL-8B-Instruct GGUF)."),
    preset: str = typer.Option("default-20", "--preset", help="quality-48, default-20 or turbo-12."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Number of steps (overrides the preset; the preset's final low-guidance steps are kept)."),
    guidance: Optional[str] = typer.Option(None, "--guidance", help="Constant guidance (7) or a run-order schedule (7x18+3x2)."),
    mu: Optional[float] = typer.Option(None, "--mu", help="Logit-normal schedule mean (before the resolution shift)."),
    std: Optional[float] = typer.Option(None, "--std", help="Logit-normal schedule standard deviation."),
    width: Optional[int] = typer.Option(None, "--width", "-W", help="Image width in pixels, a multiple of 16 (default: the model's default size)."),
    height: Optional[int] = typer.Option(None, "--height", "-H", help="Image height in pixels, a multiple of 16."),
    seed: int = typer.Option(0, "--seed", "-s", help="Seed of the first image; each further image adds 1."),
    count: int = typer.Option(1, "-n", "--count", help="Images per prompt."),
    out: Path = typer.Option(Path("outputs"), "-o", "--out", help="Output folder, or a .png path for a single image."),
    backend: str = typer.Option("auto", "--backend", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
    raw: bool = typer.Option(False, "--raw", help="Pass plain-text prompts to the encoder unchanged instead of wrapping them in a minimal JSON caption."),
    keep_bboxes: bool = typer.Option(False, "--keep-bboxes", help="Keep element bboxes in JSON captions (the official pipeline strips them)."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Decode in tiles of this many latent pixels (saves memory on large images)."),
    reference: str = typer.Option("official", "--reference", help="official (the official loop: bf16-rounded t, ends at t_max) or diffusers (reproduces diffusers' Ideogram4Pipeline: float32 t, its sigma grid ending at t = 1)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing PNGs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print debug logs, llama.cpp's and ggml's included (hidden otherwise)."),
) -> None:
    """Generate PNGs from a prompt file: encode, sample both CFG backbones, decode."""
    options = dict(locals())
    del options["verbose"]
    from gguf_dit.runtime import native_log

    with native_log.verbose(sys.stderr) if verbose else native_log.hidden():
        _run(**options)


def _run(*, prompt_file, model, text_encoder, preset, steps, guidance, mu, std, width, height, seed, count, out, backend, threads, raw,
         keep_bboxes, tile, reference, force, quiet) -> None:
    from gguf_dit.errors import InputError
    from gguf_dit.runtime.caption import caption_summary, prompts_from_file
    from gguf_dit.runtime.pipeline import ModelFiles, Pipeline, check_output, png_bytes_bound, png_metadata, write_png
    from gguf_dit.runtime.schedule import resolve_settings

    if count < 1:
        raise InputError(f"-n must be at least 1, got {count}")
    prompts = prompts_from_file(prompt_file, raw=raw, keep_bboxes=keep_bboxes)
    for p in prompts:
        for w in p.warnings:
            typer.echo(f"warning: {prompt_file}{f':{p.line}' if p.line else ''}: {w}", err=True)
    settings = resolve_settings(preset, steps=steps, guidance=guidance, mu=mu, std=std)
    model_dir = model
    if model_dir is None:
        from gguf_dit.runtime import demo

        model_dir = demo.model_dir()
        if not quiet:
            typer.echo(demo.NOTICE, err=True)
    if reference not in ("official", "diffusers"):
        raise InputError(f"--reference must be official or diffusers, got {reference!r}")
    from gguf_dit.runtime.dit import RuntimeOptions

    files = ModelFiles.find(model_dir, text_encoder)
    pipe = Pipeline(files, backend=backend, threads=threads, options=RuntimeOptions(t_rounding="bf16" if reference == "official" else "none"))
    jobs = [(pi, k) for pi in range(len(prompts)) for k in range(count)]
    seeds = [seed + j for j in range(len(jobs))]
    paths = _output_paths(out, len(jobs), seeds)
    from gguf_dit.runtime.pipeline import check_size, default_size, size_range

    pipe.check_files()
    header = pipe.header()
    h, w = height or default_size(header), width or default_size(header)
    check_size(h, w, size_range(header), files.transformer)
    check_output(paths, force=force, image_bytes=png_bytes_bound(h, w))  # before the work; creates nothing
    progress = _RunProgress(quiet)
    try:
        feats = pipe.encode([p.text for p in prompts], progress.encoded(len(prompts)), origins=[(prompt_file, p.line) for p in prompts])
        models = pipe.describe()
        ts = None
        if reference == "diffusers":
            from gguf_dit.runtime.schedule import diffusers_timesteps

            ts = diffusers_timesteps(settings.steps, h, w, settings.mu, settings.std)
        for j, (pi, _) in enumerate(jobs):
            gen = pipe.generate(feats[pi], h, w, settings, seeds[j], step_callback=progress.stepper(j, len(jobs), settings.steps), tile=tile, ts=ts,
                               decode_started=progress.decoding(j, len(jobs)))
            meta = png_metadata(prompts[pi].text, settings, seeds[j], h, w, models, {"prompt_source": prompts[pi].source, "reference": reference})
            write_png(paths[j], gen.image, meta, force=force)
            progress.done(paths[j], caption_summary(prompts[pi].text))
    finally:
        progress.close()


class _RunProgress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.p = None
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                              TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self.p.start()

    def encoded(self, n: int):
        if self.p is None:
            return None
        task = self.p.add_task("encode", total=n, rate="")
        import time

        t0 = time.perf_counter()

        def cb(i: int) -> None:
            self.p.update(task, completed=i, rate=f"{i / max(time.perf_counter() - t0, 1e-9):.2f} prompt/s")

        return cb

    def stepper(self, j: int, n: int, steps: int):
        if self.p is None:
            return None
        task = self.p.add_task(f"sample {j + 1}/{n}", total=steps, rate="")

        def cb(info, z) -> None:
            self.p.update(task, completed=info.index + 1, rate=f"{1.0 / max(info.seconds, 1e-9):.2f} step/s")

        return cb

    def decoding(self, j: int, n: int):
        if self.p is None:
            return None

        def cb() -> None:
            import time

            self._decode_task = self.p.add_task(f"decode {j + 1}/{n}", total=1, rate="")
            self._decode_t0 = time.perf_counter()

        return cb

    def done(self, path, summary: str) -> None:
        if self.p is not None and getattr(self, "_decode_task", None) is not None:
            import time

            dt = time.perf_counter() - self._decode_t0
            self.p.update(self._decode_task, completed=1, rate=f"{1.0 / max(dt, 1e-9):.2f} img/s")
            self._decode_task = None
        if self.p is not None:
            self.p.console.print(f"wrote {path}  ({summary})", soft_wrap=True)  # a path the user can copy, unbroken
        else:
            typer.echo(str(path))

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


@app.command("tiny-checkpoint")
@_errors_to_exit
def tiny_checkpoint(
    out: Path = typer.Argument(..., help="Folder to create (transformer/ and unconditional_transformer/ inside)."),
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
