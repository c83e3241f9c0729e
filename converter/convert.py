"""Checkpoint in, GGUF out: one file per backbone, streamed tensor by tensor.

The header (metadata and tensor infos) is written first from shapes and chosen types alone, then
each tensor is read in row chunks, converted, and appended. Peak memory is a few chunks, not the
model. All outputs of one command are written as a set (``output.OutputSet``): an error or an
interrupt never leaves a partial, mixed or overwritten output.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from gguf_dit import __version__
from gguf_dit.arch import MODEL_FILES
from gguf_dit.arch.dit import ARCH, BACKBONE_DIRS, default_size_problem, size_range_problem, tensor_inventory
from gguf_dit.arch.latent import PIXELS_PER_TOKEN
from gguf_dit import keys
from gguf_dit.errors import ImatrixError, OptionError, OutputError, SourceError
from gguf_dit.ggml_ops import GGMLType
from gguf_dit.imatrix import for_backbones

from .encode import REFERENCE, WEIGHTED, encode_rows, stored_nbytes
from .gguf_out import OutTensor, add_config, write_gguf
from .output import HEADER_ALLOWANCE, OutputSet, check_location
from .recipe import Recipe
from .smooth import Smoothing
from .importance import Importance, importance_for
from .reader import CHUNK_BYTES
from .source import Backbone, open_checkpoint

OUTPUT_NAMES = {role: MODEL_FILES[d] for d, role in BACKBONE_DIRS.items()}
_HASH_PLACEHOLDER = "sha256:" + "?" * 64


@dataclasses.dataclass
class Plan:
    name: str
    shape: tuple[int, ...]  # PyTorch order
    type: GGMLType
    why: str


def plan_backbone(bb: Backbone, recipe: Recipe) -> list[Plan]:
    return [Plan(spec.name, spec.shape, *recipe.choose(spec, bb.directory)) for spec in tensor_inventory(bb.config)]


@dataclasses.dataclass(frozen=True)
class SizeHints:
    """Image sizes a model was trained for, written into the backbones so ``gguf-dit run`` can
    refuse and default sensibly (the real model: 256..2048, default 1024, without hints)."""

    size_range: tuple[int, int] | None = None
    default_size: int | None = None

    def __post_init__(self) -> None:
        if self.size_range is not None and (problem := size_range_problem(*self.size_range)):
            raise OptionError(f"size range {self.size_range[0]}..{self.size_range[1]} {problem}")
        d = self.default_size
        if d is not None and (problem := default_size_problem(d, *(self.size_range or (PIXELS_PER_TOKEN, 1 << 30)))):
            raise OptionError(f"default size {d} {problem}")

    @classmethod
    def parse(cls, size_range: str | None, default_size: int | None) -> "SizeHints":
        if not size_range:
            return cls(None, default_size)
        try:
            lo, hi = (int(x) for x in size_range.replace(" ", "").split(".."))
        except ValueError:
            raise OptionError(f"--size-range {size_range!r} is not LOW..HIGH (e.g. 256..2048)") from None
        return cls((lo, hi), default_size)


def _metadata(writer, bb: Backbone, recipe: Recipe, plans: list[Plan], q4k_path: str, sizes: SizeHints | None = None,
              smoothing: Smoothing | None = None, imp: Importance | None = None) -> None:
    import gguf

    cfg = bb.config
    writer.add_name(f"Ideogram 4 {'conditional' if bb.role == 'cond' else 'unconditional'} DiT ({recipe.name})")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(keys.ROLE, bb.role)
    add_config(writer, cfg, keys.dit)
    writer.add_uint32(keys.HEAD_DIM, cfg.head_dim)
    writer.add_string(keys.CONVERTER_VERSION, __version__)
    writer.add_string(keys.RECIPE_NAME, recipe.name)
    writer.add_string(keys.RECIPE_JSON, json.dumps(recipe.to_json(), separators=(",", ":")))
    writer.add_string(keys.RECIPE_TENSORS, json.dumps({p.name: [p.type.name, p.why] for p in plans}, separators=(",", ":")))
    writer.add_string(keys.Q4K_PATH, q4k_path)
    writer.add_string(keys.SOURCE_LAYOUT, bb.layout)
    writer.add_string(keys.SOURCE_DTYPES, ",".join(sorted({t.dtype for t in bb.tensors.values()})))
    writer.add_array(keys.SOURCE_FILES, [f.name for f in bb.files])
    writer.add_string(keys.SOURCE_SHA256, _HASH_PLACEHOLDER)
    if sizes is not None and sizes.size_range is not None:
        writer.add_array(keys.SIZE_RANGE, [int(x) for x in sizes.size_range])
    if sizes is not None and sizes.default_size is not None:
        writer.add_uint32(keys.DEFAULT_SIZE, int(sizes.default_size))
    if smoothing is not None:
        smoothing.metadata(writer)
    if imp is not None:
        imp.metadata(writer)


def _patch_hash(path: Path, digest: str) -> None:
    # The content hash is only known after every tensor was read, but the KV section precedes the
    # data; the placeholder has the digest's exact length, so it is overwritten in place.
    needle = _HASH_PLACEHOLDER.encode()
    with open(path, "r+b") as f:
        head = f.read(4 << 20)
        pos = head.find(needle)
        if pos < 0:
            raise OutputError("internal: hash placeholder not found", path=path)
        f.seek(pos)
        f.write(f"sha256:{digest}".encode())


def write_backbone(
    bb: Backbone,
    recipe: Recipe,
    out_path: Path,
    *,
    q4k_path: str = WEIGHTED,
    threads: int | None = None,
    progress: Callable[[str, int], None] | None = None,
    sizes: SizeHints | None = None,
    smoothing: Smoothing | None = None,
    imp: Importance | None = None,
) -> dict:
    """Write one backbone to ``out_path``; returns a summary dict (role, path, tensors, types, bytes, seconds).
    ``smoothing``: activation scales folded into the weights (``smooth.py``); ``imp``: imatrix importance vectors
    (``importance.py``), measured on the float model, so rescaled here by the smoothing."""
    plans = plan_backbone(bb, recipe)
    src = bb if smoothing is None else smoothing.scales(bb, {p.name: p.type for p in plans})
    if imp is not None and smoothing is not None:
        imp = imp.smoothed(src.col)
    vectors = imp.vectors if imp is not None else {}
    t0 = time.perf_counter()
    hasher = hashlib.sha256()
    tensors = [OutTensor(p.name, p.shape, p.type, functools.partial(src.chunks, p.name, CHUNK_BYTES, hasher), bb.tensors[p.name].parts[0].file, p.name,
                         vectors.get(p.name)) for p in plans]
    bytes_in = write_gguf(
        out_path,
        ARCH,
        lambda writer: _metadata(writer, bb, recipe, imp.mark(plans) if imp else plans, q4k_path, sizes, smoothing, imp),
        tensors,
        encode=functools.partial(encode_rows, threads=threads, k_quant_path=q4k_path),
        range_hint="keep this tensor F32 or BF16 (--rule)",
        release=bb.release,
        progress=progress,
        before_rename=lambda tmp: _patch_hash(tmp, hasher.hexdigest()),
    )
    return {"role": bb.role, "path": out_path, "tensors": len(plans), "types": dict(Counter(p.type.name for p in plans)), "bytes_in": bytes_in,
            "bytes_out": out_path.stat().st_size, "seconds": time.perf_counter() - t0}


PARTS = ("dit", "text_encoder", "vae")


@dataclasses.dataclass
class PartResult:
    part: str
    path: Path
    summary: str


def _detect_parts(src: Path) -> list[str]:
    from .vae import is_vae_source

    if is_vae_source(src):  # ae.safetensors, flux2-vae.safetensors or a diffusers vae/ folder given as SRC
        return ["vae"]
    if not src.is_dir() or not any((src / d).is_dir() for d in (*BACKBONE_DIRS, "text_encoder", "vae")):
        return ["dit"]
    found = [p for p in ("text_encoder", "vae") if (src / p).is_dir()]
    return (["dit"] if any((src / d).exists() for d in BACKBONE_DIRS) else []) + found


def convert_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    recipe: Recipe,
    *,
    parts: list[str] | None = None,
    force: bool = False,
    role: str | None = None,
    q4k_path: str = WEIGHTED,
    threads: int | None = None,
    te_type: str | None = None,
    te_down_proj_type: str | None = None,
    vae_type: str | None = None,
    progress_factory=None,
    sizes: SizeHints | None = None,
    smooth: str | Path | None = None,
    smooth_alpha: float = 0.5,
    imatrix: str | Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[PartResult]:
    """The whole checkpoint: both DiT backbones, the text encoder (+ tokenizer) and the VAE decoder.

    ``parts`` None converts every part the checkpoint root holds; naming a part that is absent is an error.
    The encoder's linears default to Q8_0 (F32/F16/BF16 under the matching float recipe), the VAE to F16
    (F32 under the f32 recipe).

    ``imatrix``: a calibration folder (``transformer.imatrix``, ``unconditional_transformer.imatrix``) or one
    imatrix file (e.g. stable-diffusion.cpp's, holding both backbones' entries); its importances feed every tensor
    whose type takes them. ``warn(message)`` receives what is not an error (missing or stray entries).

    Every source is opened and checked and every tensor's type decided first; then the output folder is checked
    for room, and all outputs are written as one set (``output.OutputSet``): an error or Ctrl-C leaves the folder
    as it was, and existing outputs are replaced only with ``force``.
    """
    src = Path(src)
    out_dir = Path(out_dir)
    if q4k_path not in (WEIGHTED, REFERENCE):
        raise OptionError(f"unknown Q4_K path {q4k_path!r}; use weighted or reference")
    if not src.exists():
        raise SourceError("does not exist", path=src)
    chosen = parts or (["dit"] if role else _detect_parts(src))
    for p in chosen:
        if p not in PARTS:
            raise OptionError(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
    if smooth is not None and "dit" not in chosen:
        raise OptionError("--smooth applies to the DiT backbones, which this conversion does not write")
    imatrices = None
    if imatrix is not None:
        if "dit" not in chosen:
            raise OptionError("--imatrix applies to the DiT backbones, which this conversion does not write")
        if not Path(imatrix).exists():
            raise ImatrixError("does not exist (give a calibration folder or an imatrix file)", path=imatrix)
        imatrices = for_backbones(imatrix)
    te_type = te_type or (recipe.name if recipe.name in ("f32", "f16", "bf16") else "q8_0")
    vae_type = vae_type or ("f32" if recipe.name == "f32" else "f16")
    if "text_encoder" in chosen:
        for d in (src / "text_encoder", src / "tokenizer"):
            if not d.is_dir():
                raise SourceError(f"missing {d.name}/ folder (needed for the text encoder)", path=src)
    if "vae" in chosen:
        from .vae import is_vae_source

        vae_src = src if is_vae_source(src) else src / "vae"
        if not vae_src.exists():
            raise SourceError("missing vae/ folder (nor is this a VAE file or folder)", path=src)
    jobs: list[_Job] = []
    try:
        if "dit" in chosen:
            for bb in open_checkpoint(src, role):
                jobs.append(_dit_job(bb, recipe, q4k_path, threads, progress_factory, sizes, smooth, smooth_alpha, imatrix, imatrices, warn))
            if smooth is not None and Path(smooth).is_file() and len(jobs) > 1:
                raise OptionError("is one activation-maxima file, but both backbones are converted: give the calibration folder, or --role", path=smooth)
        # Output names are known now: refuse an unusable folder or an existing output before reading more.
        check_location(out_dir, [j.name for j in jobs] + [MODEL_FILES[p] for p in ("text_encoder", "vae") if p in chosen], force=force)
        if "text_encoder" in chosen:
            from .text_encoder import prepare_text_encoder, write_text_encoder

            te = prepare_text_encoder(src / "text_encoder", src / "tokenizer", linear_type=te_type, down_proj_type=te_down_proj_type)
            jobs.append(_Job("text_encoder", MODEL_FILES["text_encoder"], te.nbytes, lambda path, te=te: write_text_encoder(te, path, threads=threads), te.close))
        if "vae" in chosen:
            from .vae import prepare_vae, write_vae

            vae = prepare_vae(vae_src, dtype=vae_type)
            jobs.append(_Job("vae", MODEL_FILES["vae"], vae.nbytes, lambda path, vae=vae: write_vae(vae, path), vae.close))
        results: list[PartResult] = []
        with OutputSet(out_dir, [j.name for j in jobs], force=force, need_bytes=sum(j.nbytes for j in jobs)) as outs:
            for j in jobs:
                t0 = time.perf_counter()
                try:
                    summary = j.write(outs.path(j.name))
                except OSError as e:
                    raise OutputError(f"cannot write ({e.strerror or e})", path=out_dir / j.name) from None
                finally:
                    j.close()
                results.append(PartResult(j.part, out_dir / j.name, _summary(summary, outs.path(j.name), time.perf_counter() - t0)))
        return results
    finally:
        for j in jobs:
            j.close()


@dataclasses.dataclass
class _Job:
    """One output of a conversion: opened, checked and planned; ``write(path)`` produces it."""

    part: str
    name: str
    nbytes: int  # expected output size, for the free-space check
    write: Callable[[Path], dict]
    close: Callable[[], None]


def _dit_job(bb: Backbone, recipe: Recipe, q4k_path: str, threads: int | None, progress_factory, sizes: SizeHints | None,
             smooth: str | Path | None = None, smooth_alpha: float = 0.5, imatrix: str | Path | None = None,
             imatrices: dict | None = None, warn: Callable[[str], None] | None = None) -> _Job:
    imp = None
    try:
        plans = plan_backbone(bb, recipe)
        smoothing = None if smooth is None else Smoothing.load(smooth, bb.role, bb.config, smooth_alpha)
        if imatrices is not None and bb.role in imatrices:
            imp = importance_for(bb.role, str(bb.directory), plans, imatrices[bb.role], warn or (lambda m: None))
        elif imatrices is not None and warn is not None:
            warn(f"{imatrix}: no importance matrix for the {bb.role} backbone; it gets uniform importance")
    except BaseException:
        bb.close()
        raise
    name = OUTPUT_NAMES[bb.role]
    nbytes = sum(stored_nbytes(p.shape, p.type) + 512 for p in plans) + HEADER_ALLOWANCE

    def write(path: Path) -> dict:
        total = sum(int(np.prod(t.shape)) * 4 for t in bb.tensors.values())
        progress = progress_factory(f"{bb.role}: {name}", total, len(bb.tensors)) if progress_factory else None
        try:
            return write_backbone(bb, recipe, path, q4k_path=q4k_path, threads=threads, progress=progress, sizes=sizes, smoothing=smoothing, imp=imp)
        finally:
            if progress is not None and hasattr(progress, "close"):
                progress.close()

    return _Job(bb.role, name, nbytes, write, bb.close)


def _summary(s: dict, written: Path, seconds: float) -> str:
    size = written.stat().st_size
    types = ", ".join(f"{k} {v}" for k, v in sorted(s["types"].items()))
    if "role" in s:  # a backbone
        mbps = s["bytes_in"] / 1e6 / max(s["seconds"], 1e-9)
        return f"{s['tensors']} tensors ({types}), {size / 1e6:.1f} MB, {s['seconds']:.1f} s, {mbps:.0f} MB/s of f32 input"
    return f"{types + ', ' if types else ''}{size / 1e6:.1f} MB, {seconds:.1f} s"
