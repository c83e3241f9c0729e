"""`gguf-dit inspect` as a library: a report on any GGUF `convert` writes (either backbone, the text encoder, the VAE).

The kind comes from ``general.architecture`` (a backbone without it, as stable-diffusion.cpp writes them, is
recognised by its tensor names). A report separates ``problems``, what makes `run` refuse the file (the same checks
`run` makes before any work, plus the encoder's tensor inventory, which llama.cpp checks at load), from ``warnings``,
which `run` accepts. A file whose header cannot be read (truncated, not GGUF) raises a ModelError instead.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from gguf import Keys

from gguf_dit import keys
from gguf_dit.arch.dit import ARCH as DIT_ARCH
from gguf_dit.arch.text_encoder import ACCEPTED_ARCHES, default_taps, gguf_tensor_names
from gguf_dit.arch.vae import ARCH as VAE_ARCH
from gguf_dit.errors import GgufDitError, ModelError
from gguf_dit.gguf_header import INTEGER_TYPES, GGUFHeader

from .gguf_file import GGUFFile

KINDS = {"backbone": DIT_ARCH, "text_encoder": " or ".join(ACCEPTED_ARCHES), "vae": VAE_ARCH}


def _why(e: GgufDitError) -> str:
    """An error's message without the file name (the report names the file once)."""
    return str(e).removeprefix(f"{e.path}: ") if e.path else str(e)


def _plain(v):
    """A metadata value as JSON can hold it: arrays as lists, strings in string arrays decoded, floats with the
    digits a float32 holds."""
    v = v.tolist() if hasattr(v, "tolist") else v
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return float(f"{v:.7g}") if isinstance(v, float) else v


def _get(h: GGUFHeader, key: str, kind: str = "str"):
    """A metadata value for the report when its type is the expected one, else None: the report shows what the file
    holds, and `run`'s own checks (run below) name a wrong type as a problem."""
    kv = h.kv.get(key)
    if kv is None:
        return None
    if kind == "str":
        return kv.value if kv.type.name == "STRING" else None
    if kind == "ints":  # one integer, or an array of them (per-layer counts, tap layers)
        if kv.type.name in INTEGER_TYPES:
            return int(kv.value)
        return [int(x) for x in kv.value] if kv.item_type is not None and kv.item_type.name in INTEGER_TYPES else None
    if kind == "float":
        return float(kv.value) if kv.type.name in ("FLOAT32", "FLOAT64") else None
    return len(kv.value) if kv.type.name == "ARRAY" else None  # "len": an array's length


def _common(f: GGUFFile, kind: str) -> dict:
    return {
        "file": str(f.path),
        "kind": kind,
        "architecture": _get(f.header, keys.ARCHITECTURE),
        "tensor_count": len(f.tensors),
        "bytes": sum(t.nbytes for t in f.tensors.values()),
        "types": f.type_counts(),
        "converter_version": _get(f.header, keys.CONVERTER_VERSION),
    }


def _backbone(f: GGUFFile) -> tuple[GGUFFile, dict, list[str], list[str]]:
    from .backbone_file import BackboneFile

    f = BackboneFile(f.path, strict=False)
    report = {
        **_common(f, "backbone"),
        "architecture": DIT_ARCH,
        "metadata": f.has_metadata,
        "role": f.role,
        "config": {k: _plain(list(v) if isinstance(v, tuple) else v) for k, v in f.config.to_metadata().items()},
        "recipe": f.recipe,
        "source_sha256": _get(f.header, keys.SOURCE_SHA256),
        # quantized with an importance matrix (convert --imatrix): which file, its hash
        "imatrix": {"file": _get(f.header, keys.IMATRIX_FILE), "sha256": _get(f.header, keys.IMATRIX_SHA256),
                    "entries": _get(f.header, keys.IMATRIX_N_ENTRIES, "ints"), "chunks": _get(f.header, keys.IMATRIX_N_CHUNKS, "ints")}
        if keys.IMATRIX_FILE in f.header.kv or keys.IMATRIX_SHA256 in f.header.kv else None,
        # activation smoothing folded into the weights (convert --smooth): method, alpha, calibration file and hash
        "smoothing": {"method": _get(f.header, keys.SMOOTH_METHOD), "alpha": _get(f.header, keys.SMOOTH_ALPHA, "float"),
                      "file": _get(f.header, keys.SMOOTH_CALIBRATION), "sha256": _get(f.header, keys.SMOOTH_CALIBRATION_SHA256)}
        if keys.SMOOTH_METHOD in f.header.kv else None,
    }
    return f, report, list(f.warnings), list(f.problems)


@contextlib.contextmanager
def _logged(into: list[str]):
    """Warnings the runtime logs while checking a file, kept for the report instead of printed."""
    logger = logging.getLogger("gguf_dit")  # gguf_dit.runtime, gguf_dit.llama, ...
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: into.append(r.getMessage().split(": ", 1)[-1])
    logger.addHandler(handler)
    old, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old


def _text_encoder(f: GGUFFile) -> tuple[GGUFFile, dict, list[str], list[str]]:
    from .text_encoder_file import LLAMA_MAX_LAYERS, TOKEN_EMBD, read_meta

    h = f.header
    L = lambda k: k.format(arch=h.get(keys.ARCHITECTURE))  # noqa: E731
    n_layers = _get(h, L(Keys.LLM.BLOCK_COUNT), "ints")
    layers_ok = isinstance(n_layers, int) and 0 < n_layers <= LLAMA_MAX_LAYERS
    taps, template = _get(h, keys.TE_TAPS, "ints"), _get(h, keys.TE_TEMPLATE)
    emb = f.tensors.get(TOKEN_EMBD)
    report = {
        **_common(f, "text_encoder"),
        "layers": n_layers,
        "hidden": _get(h, L(Keys.LLM.EMBEDDING_LENGTH), "ints"),
        "heads": _get(h, L(Keys.Attention.HEAD_COUNT), "ints"),
        "kv_heads": _get(h, L(Keys.Attention.HEAD_COUNT_KV), "ints"),
        "context_length": _get(h, L(Keys.LLM.CONTEXT_LENGTH), "ints"),
        "vocab": _get(h, Keys.Tokenizer.LIST, "len"),
        "embedding_rows": emb.shape[0] if emb is not None else None,
        "tokenizer": {"model": _get(h, Keys.Tokenizer.MODEL), "pre": _get(h, Keys.Tokenizer.PRE)},
        "taps": taps,
        "taps_used": taps if taps is not None else (default_taps(n_layers) if layers_ok else None),
        "template": template,
        "linear_type": _get(h, keys.TE_LINEAR_TYPE),
        "down_proj_type": _get(h, keys.TE_DOWN_PROJ_TYPE),
    }
    warnings: list[str] = []
    problems: list[str] = []
    if keys.TE_TAPS not in h.kv:
        warnings.append(f"no {keys.TE_TAPS}: the official rule's taps for {n_layers} layers are used")
    if keys.TE_TEMPLATE not in h.kv:
        warnings.append(f"no {keys.TE_TEMPLATE}: the official chat template is used")
    try:
        with _logged(warnings):
            read_meta(f.path)
    except ModelError as e:
        problems.append(_why(e))
    if layers_ok:
        problems += [f"tensor {n}: missing tensor" for n in gguf_tensor_names(n_layers) if n not in f.tensors]
    return f, report, warnings, problems


def _vae(f: GGUFFile) -> tuple[GGUFFile, dict, list[str], list[str]]:
    from gguf_dit.arch.latent import LATENT_SHIFT

    from .vae import inventory_problems, read_config

    h = f.header
    arrays = (keys.VAE_LATENT_SHIFT, keys.VAE_LATENT_SCALE, keys.VAE_BN_MEAN, keys.VAE_BN_VAR)
    shift, scale = _get(h, keys.VAE_LATENT_SHIFT, "len"), _get(h, keys.VAE_LATENT_SCALE, "len")
    report = {
        **_common(f, "vae"),
        "config": {k[len(VAE_ARCH) + 1 :]: _plain(v.value) for k, v in h.kv.items()
                   if k.startswith(VAE_ARCH + ".") and k not in arrays and k != keys.VAE_LATENT_NORM_SOURCE},
        "dtype": _get(h, keys.VAE_DTYPE),
        "latent_shift": shift,
        "latent_scale": scale,
        "latent_norm_source": _get(h, keys.VAE_LATENT_NORM_SOURCE),
        "checkpoint_batch_norm": keys.VAE_BN_MEAN in h.kv and keys.VAE_BN_VAR in h.kv,
    }
    warnings: list[str] = []
    problems: list[str] = []
    try:
        cfg = read_config(h)
    except ModelError as e:
        problems.append(_why(e))
    else:
        problems += [f"tensor {n}: {p}" for n, p in inventory_problems(f, cfg)]
        if shift is None or scale is None:
            if cfg.token_dim == LATENT_SHIFT.shape[0]:
                warnings.append(f"no {keys.VAE_LATENT_SHIFT}/latent_scale: the official constants are used")
            else:
                problems.append(f"no {keys.VAE_LATENT_SHIFT}/latent_scale, and the official constants are for 128-dim tokens, not {cfg.token_dim}")
    return f, report, warnings, problems


def describe(path: str | Path, *, check: bool = False) -> dict:
    """The report on one GGUF; ``check`` also scans every weight for NaN/Inf. ModelError when the header cannot
    be read or the file is no kind gguf-dit reads."""
    f = GGUFFile(path)
    arch = _get(f.header, keys.ARCHITECTURE)  # not a string: the backbone reader names the wrong type
    if arch is None or arch == DIT_ARCH:
        f, report, warnings, problems = _backbone(f)
    elif arch in ACCEPTED_ARCHES:
        f, report, warnings, problems = _text_encoder(f)
    elif arch == VAE_ARCH:
        f, report, warnings, problems = _vae(f)
    else:
        want = ", ".join(f"{v} ({k.replace('_', ' ')})" for k, v in KINDS.items())
        raise ModelError(f"{keys.ARCHITECTURE} is {arch!r}; gguf-dit reads {want}", path=f.path)
    if check:
        problems += [f"tensor {n}: non-finite values (NaN/Inf)" for n in f.nonfinite()]
    return {**report, "warnings": warnings, "problems": problems}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def render(r: dict) -> str:
    """The report as `inspect` prints it (``--json`` prints ``r`` itself)."""
    from gguf_dit.arch.text_encoder import TEMPLATE

    lines = [r["file"]]
    add = lambda label, text: lines.append(f"  {label:<13} {text}")  # noqa: E731
    if r["kind"] == "backbone":
        add("kind", f"backbone, ideogram4 ({'gguf-dit metadata' if r['metadata'] else 'detected from tensor names'})")
        add("role", r["role"] or "unknown")
        add("config", ", ".join(f"{k}={v}" for k, v in r["config"].items()))
    elif r["kind"] == "text_encoder":
        add("kind", f"text encoder, llama.cpp architecture {r['architecture']}")
        kv = f" (kv {r['kv_heads']})" if r["kv_heads"] is not None else ""
        add("layers", f"{r['layers']}, hidden {r['hidden']}, heads {r['heads']}{kv}, context {r['context_length']}")
        tok = r["tokenizer"]
        add("vocabulary", f"{r['vocab']} tokens ({tok['model']} tokenizer, pre {tok['pre']}); token_embd {r['embedding_rows']} rows")
        taps = r["taps_used"]
        where = "stored" if r["taps"] is not None else "none stored: the official rule's"
        add("taps", f"{where} {len(taps)}: {', '.join(map(str, taps))}" if taps is not None else "unknown (no valid layer count)")
        t = r["template"]
        add("template", "none stored: the official chat template" if t is None else "the official chat template" if t == TEMPLATE else f"custom {t!r}")
        if r["linear_type"]:
            add("written as", f"linears {r['linear_type']}" + (f", mlp.down_proj {r['down_proj_type']}" if r["down_proj_type"] else ""))
    else:
        add("kind", f"VAE decoder, {r['architecture']}")
        add("config", ", ".join(f"{k}={v}" for k, v in r["config"].items()))
        if r["dtype"]:
            add("written as", r["dtype"])
        norm = (f"shift/scale {r['latent_shift']}/{r['latent_scale']} values" + (f" ({r['latent_norm_source']})" if r["latent_norm_source"] else "")
                if r["latent_shift"] is not None and r["latent_scale"] is not None else "none stored: the official constants")
        add("latent norm", norm + (", checkpoint BatchNorm statistics too" if r["checkpoint_batch_norm"] else ""))
    add("tensors", f"{r['tensor_count']}, {_mb(r['bytes'])}")
    for t, d in sorted(r["types"].items()):
        lines.append(f"    {t:<6} {d['count']:>4} tensors  {d['bytes'] / 1e6:10.2f} MB")
    if r["kind"] == "backbone":
        add("recipe", r["recipe"] or "unknown")
        if r["source_sha256"]:
            add("source", r["source_sha256"])
        if r.get("imatrix"):
            add("imatrix", f"{r['imatrix']['file']} ({r['imatrix']['entries']} entries), {r['imatrix']['sha256']}")
        if r.get("smoothing"):
            sm = r["smoothing"]
            add("smoothing", f"{sm['method']} alpha {sm['alpha']:.3g}, {sm['file']}, {sm['sha256']}" if sm["alpha"] is not None else str(sm["method"]))
    if r["converter_version"]:
        add("converter", f"gguf-dit {r['converter_version']}")
    lines += [f"  warning: {w}" for w in r["warnings"]]
    lines += [f"  problem: {p}" for p in r["problems"]]
    return "\n".join(lines)
