"""Qwen3-VL text encoder checkpoint in, llama.cpp-loadable GGUF out (the language model only).

Ideogram 4 conditions on hidden states of Qwen3-VL-8B-Instruct run on text alone. For text-only
input the three MRoPE position axes are equal, so the interleaved MRoPE reduces to ordinary 1-D
NEOX RoPE with the same theta, and the language model is computationally a plain Qwen3 decoder.
We therefore write llama.cpp's ``qwen3`` architecture (``rope.freq_base`` = theta, no
``rope.dimension_sections``, no deepstack keys, no Q/K permutation) rather than ``qwen3vl``: any
llama.cpp build that knows Qwen3 loads it, and there is no vision-only key to get wrong. The
runtime accepts community ``qwen3vl`` GGUFs too (docs/text_encoder.md).

Sources (Hugging Face layout): ``config.json`` (Qwen3-VL nests the language-model config under
``text_config``) and ``model.safetensors`` or a sharded ``model.safetensors.index.json``. Keys may
be prefixed ``model.language_model.`` (stock ``Qwen3VLForConditionalGeneration``),
``language_model.`` (``Qwen3VLModel``) or ``model.`` (plain Qwen3). ``visual.*`` and ``lm_head`` are
ignored: an encoder needs no output head, and llama.cpp's qwen3 loader falls back to the token
embedding when ``output.weight`` is absent. Dtypes and FP8 scales: ``reader.SafetensorsFiles``;
the tokenizer: ``tokenizer.read_tokenizer``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from gguf_dit import __version__
from gguf_dit.errors import RecipeError, SourceError
from gguf_dit.ggml_ops import GGMLType, fits
from gguf_dit import keys
from gguf_dit.arch.text_encoder import (
    ACCEPTED_ARCHES,
    DEFAULT_CONTEXT,
    DEFAULT_RMS_EPS,
    DEFAULT_ROPE_THETA,
    LAYER_MAP,
    LAYER_RE,
    LLAMA_ARCH,
    LM_PREFIXES,
    TEMPLATE,
    default_taps,
    gguf_name,
)

from .encode import encode_rows, stored_nbytes
from .gguf_out import OutTensor, write_gguf
from .inputs import json_float, json_int, json_int_list, read_json
from .output import HEADER_ALLOWANCE, write_one
from .reader import SCALE_KINDS, SafetensorsFiles, Stored, weight_files
from .recipe import fallback, parse_type
from .tokenizer import read_tokenizer

WEIGHTS_NAME = "model.safetensors"
UINT32_MAX = (1 << 32) - 1


class TextEncoderSource(SafetensorsFiles):
    """A Qwen3(-VL) language model inside a Hugging Face checkpoint, read tensor by tensor."""

    def __init__(self, te_dir: str | Path) -> None:
        te_dir = Path(te_dir)
        if not te_dir.exists():
            raise SourceError("does not exist", path=te_dir)
        files = weight_files(te_dir, WEIGHTS_NAME, "a text encoder directory")
        self.directory = te_dir if te_dir.is_dir() else te_dir.parent
        super().__init__(files, files[0] if len(files) == 1 else self.directory)
        self.config_path = self.directory / "config.json"
        self._scan()
        self.config = self._config()

    # -- discovery ---------------------------------------------------------------------
    def _scan(self) -> None:
        raw = self.headers()
        prefix = next((p for p in (*LM_PREFIXES, "") if p + "embed_tokens.weight" in raw), None)
        if prefix is None:
            raise SourceError("no language model found (expected model.language_model.embed_tokens.weight, "
                              "language_model.embed_tokens.weight or model.embed_tokens.weight)", path=self.where)
        self.prefix: str = prefix
        lm = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        if prefix == "model.":
            # A Qwen3-VL checkpoint never reaches here (its embedding is under model.language_model.),
            # but skip a stray vision tower stored as model.visual.* all the same.
            lm = {k: v for k, v in lm.items() if not k.startswith(("visual.", "language_model."))}
        lm = {k: v for k, v in lm.items() if not k.startswith("rotary_emb.")}
        for name, (f, _, _) in lm.items():
            m = LAYER_RE.match(name)
            if name.rsplit(".", 1)[-1] not in SCALE_KINDS and name not in ("embed_tokens.weight", "norm.weight") and not (m and m.group(2) in LAYER_MAP):
                raise SourceError("unexpected language-model tensor (not a Qwen3 decoder weight; attention biases are not supported)",
                                  path=f, tensor=prefix + name)
        self.tensors: dict[str, Stored] = self.weights(lm, prefix, max_ndim=2)

    def _need(self, name: str) -> Stored:
        if name not in self.tensors:
            raise SourceError("missing tensor", path=self.where, tensor=self.prefix + name)
        return self.tensors[name]

    def _config(self) -> dict:
        emb = self.tensors["embed_tokens.weight"]
        if len(emb.shape) != 2:
            raise SourceError(f"embedding has shape {list(emb.shape)}, expected [vocab, hidden]", path=emb.file, tensor=emb.key)
        vocab, hidden = emb.shape
        layer_of = {int(m.group(1)): n for n in self.tensors if (m := LAYER_RE.match(n))}
        layers = sorted(layer_of)
        n_layers = len(layers)
        if n_layers == 0:
            raise SourceError("no decoder layers (layers.N.*) found", path=self.where)
        if layers[-1] != n_layers - 1:
            gap = next(i for i in range(n_layers) if i not in layer_of)
            raise SourceError(f"decoder layers are not numbered 0..N-1: layer {gap} is missing, {layers[-1]} is the highest", path=self.where, tensor=self.prefix + layer_of[layers[-1]])
        head_dim, q_rows, kv_rows, ffn = (self._need(f"layers.0.{k}.weight").shape[0]
                                          for k in ("self_attn.q_norm", "self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"))
        if head_dim <= 0 or q_rows % head_dim or kv_rows % head_dim:
            raise SourceError(f"q/k projections ({q_rows}, {kv_rows} rows) are not multiples of head_dim {head_dim}", path=self.where)
        cfg = {
            "hidden": hidden,
            "vocab": vocab,
            "n_layers": n_layers,
            "head_dim": head_dim,
            "n_heads": q_rows // head_dim,
            "n_kv_heads": kv_rows // head_dim,
            "ffn": ffn,
            "rope_theta": DEFAULT_ROPE_THETA,
            "rms_eps": DEFAULT_RMS_EPS,
            "context_length": DEFAULT_CONTEXT,
            "mrope_section": None,
            "n_deepstack": 0,
            "config_source": "inferred from tensor shapes (Qwen3-VL-8B rope theta and eps assumed)",
        }
        if self.config_path.exists():
            _merge_config(cfg, read_json(self.config_path, what="config.json"), self.config_path)
        # Every expected tensor present, with the shape the config implies.
        h, hd, nh, nkv, f = cfg["hidden"], cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"], cfg["ffn"]
        want = {"embed_tokens.weight": (vocab, h), "norm.weight": (h,)}
        per = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (nh * hd, h),
            "self_attn.k_proj.weight": (nkv * hd, h),
            "self_attn.v_proj.weight": (nkv * hd, h),
            "self_attn.o_proj.weight": (h, nh * hd),
            "self_attn.q_norm.weight": (hd,),
            "self_attn.k_norm.weight": (hd,),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (f, h),
            "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f),
        }
        for i in range(cfg["n_layers"]):
            for k, s in per.items():
                want[f"layers.{i}.{k}"] = s
        for name, shape in want.items():
            got = self._need(name)
            if tuple(got.shape) != shape:
                raise SourceError(f"shape {list(got.shape)}, expected {list(shape)}", path=got.file, tensor=got.key)
        return cfg


def source_size(te_dir: str | Path) -> tuple[int, int]:
    """(float32 bytes, tensor count) of the language model at ``te_dir``: the totals that
    ``convert_text_encoder``'s ``progress(name, nbytes)`` calls add up to."""
    src = TextEncoderSource(te_dir)
    try:
        return sum(4 * int(np.prod(t.shape)) for t in src.tensors.values()), len(src.tensors)
    finally:
        src.close()


def _merge_config(cfg: dict, js: dict, where: Path) -> None:
    """Fill ``cfg`` from config.json (Qwen3-VL: ``text_config``; plain Qwen3: top level) and check it
    against the shapes already in ``cfg``. Every value used is type-checked, naming its key."""
    nested = isinstance(js.get("text_config"), dict)
    tc = js["text_config"] if nested else js
    pre = "text_config." if nested else ""
    declared = {"hidden": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
                "head_dim": "head_dim", "ffn": "intermediate_size", "vocab": "vocab_size"}
    for k, key in declared.items():
        if tc.get(key) is not None and json_int(tc[key], pre + key, where) != cfg[k]:
            raise SourceError(f"config.json says {pre + key}={tc[key]} but the tensors say {cfg[k]}", path=where)
    if tc.get("attention_bias"):
        raise SourceError("attention_bias=true is not supported (Qwen3 has no attention biases)", path=where)
    if tc.get("hidden_act", "silu") != "silu":
        raise SourceError(f"hidden_act {str(tc.get('hidden_act'))[:40]!r} is not supported (Qwen3 uses silu)", path=where)
    rope: dict = {}
    for src in (js, tc):  # older configs: rope_theta + rope_scaling; transformers 5: rope_parameters
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(src.get(key), dict):
                rope.update(src[key])
        if src.get("rope_theta") is not None:
            rope.setdefault("rope_theta", src["rope_theta"])
    if tc.get("rope_theta") is not None:
        rope["rope_theta"] = tc["rope_theta"]
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope", None):
        raise SourceError(f"rope type {str(kind)[:40]!r} is not supported (Qwen3-VL uses default/mrope)", path=where)
    if rope.get("rope_theta") is None:
        raise SourceError("no rope_theta in config.json (looked in text_config, rope_parameters and rope_scaling)", path=where)
    cfg["rope_theta"] = json_float(rope["rope_theta"], "rope_theta", where)
    cfg["mrope_section"] = json_int_list(rope["mrope_section"], "mrope_section", where) if rope.get("mrope_section") else None
    if cfg["mrope_section"] and sum(cfg["mrope_section"]) * 2 != cfg["head_dim"]:
        raise SourceError(f"mrope_section {cfg['mrope_section']} does not cover head_dim {cfg['head_dim']}", path=where)
    if tc.get("rms_norm_eps") is not None:
        cfg["rms_eps"] = json_float(tc["rms_norm_eps"], pre + "rms_norm_eps", where)
    if tc.get("max_position_embeddings"):
        cfg["context_length"] = json_int(tc["max_position_embeddings"], pre + "max_position_embeddings", where, minimum=1, maximum=UINT32_MAX)
    vc = js.get("vision_config") if isinstance(js.get("vision_config"), dict) else {}
    deepstack = vc.get("deepstack_visual_indexes") or []
    if not isinstance(deepstack, list):
        raise SourceError(f"vision_config.deepstack_visual_indexes is {str(deepstack)[:40]!r}, expected a list", path=where)
    cfg["n_deepstack"] = len(deepstack)
    cfg["config_source"] = str(where.name)


# -- types -------------------------------------------------------------------------------


def plan_types(src: TextEncoderSource, linear_type: GGMLType, down_proj_type: GGMLType | None) -> dict[str, tuple[GGMLType, str]]:
    """GGUF tensor type and reason for every language-model tensor (HF names)."""
    plans: dict[str, tuple[GGMLType, str]] = {}
    for name, t in src.tensors.items():
        if len(t.shape) == 1:
            plans[name] = (GGMLType.F32, "norm kept F32")
            continue
        k = t.shape[1]
        if name == "embed_tokens.weight":
            plans[name] = (linear_type, "token embedding at the linear type") if fits(linear_type, k) else (
                GGMLType.F16, f"token embedding: {linear_type.name} needs rows divisible by {linear_type.block_size} (row = {k}), F16")
        elif down_proj_type is not None and name.endswith("mlp.down_proj.weight"):
            if not fits(down_proj_type, k):
                raise RecipeError(f"down_proj_type {down_proj_type.name} needs the input dimension divisible by {down_proj_type.block_size}, "
                                  f"this tensor has {k}", path=t.file, tensor=t.key)
            plans[name] = (down_proj_type, "down_proj_type (massive activations)")
        else:
            plans[name] = fallback(linear_type, k, "linear", t.key)
    return plans


# -- writing -----------------------------------------------------------------------------


@dataclasses.dataclass
class TextEncoderPlan:
    """A text encoder opened, checked and planned (types, tokenizer, order), ready to write."""

    src: TextEncoderSource
    cfg: dict
    tok: dict
    plans: dict[str, tuple[GGMLType, str]]
    order: list[str]
    taps: list[int]
    lt: GGMLType
    dt: GGMLType | None
    arch: str
    nbytes: int  # expected output size, for the free-space check

    def close(self) -> None:
        self.src.close()


def prepare_text_encoder(
    te_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    linear_type: str | GGMLType = "q8_0",
    down_proj_type: str | GGMLType | None = None,
    arch: str = LLAMA_ARCH,
) -> TextEncoderPlan:
    """Open and check the language model and tokenizer and decide every tensor's type; writes nothing."""
    if arch not in ACCEPTED_ARCHES:
        raise RecipeError(f"text encoder arch {arch!r}: use qwen3 (default) or qwen3vl")
    lt = parse_type(linear_type, "text encoder linear_type")
    dt = parse_type(down_proj_type, "text encoder down_proj_type") if down_proj_type is not None else None
    src = TextEncoderSource(te_dir)
    try:
        cfg = src.config
        tok = read_tokenizer(tokenizer_dir, cfg["vocab"])
        plans = plan_types(src, lt, dt)
    except BaseException:
        src.close()
        raise
    order = ["embed_tokens.weight"] + [f"layers.{i}.{k}" for i in range(cfg["n_layers"]) for k in LAYER_MAP] + ["norm.weight"]
    strings = tok["tokens"] + tok["merges"] + [tok["chat_template"] or ""]
    nbytes = sum(stored_nbytes(src.tensors[n].shape, plans[n][0]) + 512 for n in order) + sum(len(x.encode()) + 12 for x in strings) + HEADER_ALLOWANCE
    return TextEncoderPlan(src, cfg, tok, plans, order, default_taps(cfg["n_layers"]), lt, dt, arch, nbytes)


def write_text_encoder(te: TextEncoderPlan, out_path: Path, *, threads: int | None = None, progress: Callable[[str, int], None] | None = None) -> dict:
    """Write a prepared text encoder to ``out_path`` (itself written under a temporary name and renamed)."""
    import gguf

    t0 = time.perf_counter()
    src, cfg, tok, plans, arch = te.src, te.cfg, te.tok, te.plans, te.arch

    def metadata(writer) -> None:
        writer.add_name("Qwen3-VL text encoder (language model) for Ideogram 4")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(cfg["context_length"])
        writer.add_embedding_length(cfg["hidden"])
        writer.add_block_count(cfg["n_layers"])
        writer.add_feed_forward_length(cfg["ffn"])
        writer.add_head_count(cfg["n_heads"])
        writer.add_head_count_kv(cfg["n_kv_heads"])
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
        writer.add_rope_freq_base(cfg["rope_theta"])
        writer.add_layer_norm_rms_eps(cfg["rms_eps"])
        writer.add_pooling_type(gguf.PoolingType.NONE)  # an encoder: every token is an output
        if arch == "qwen3vl":
            sections = (cfg["mrope_section"] or [cfg["head_dim"] // 2, 0, 0]) + [0]
            writer.add_rope_dimension_sections([int(x) for x in sections[:4]])
            writer.add_num_deepstack_layers(cfg["n_deepstack"])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        for key, fn in (("eos", writer.add_eos_token_id), ("bos", writer.add_bos_token_id), ("pad", writer.add_pad_token_id)):
            if tok[key] is not None:
                fn(tok[key])
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        if tok["chat_template"]:
            writer.add_chat_template(tok["chat_template"])
        writer.add_array(keys.TE_TAPS, [int(x) for x in te.taps])
        writer.add_string(keys.TE_TEMPLATE, TEMPLATE)
        writer.add_string(keys.CONVERTER_VERSION, __version__)
        writer.add_string(keys.TE_LINEAR_TYPE, te.lt.name)
        if te.dt is not None:
            writer.add_string(keys.TE_DOWN_PROJ_TYPE, te.dt.name)
        writer.add_string(keys.TE_SOURCE_LAYOUT, src.prefix or "(none)")
        writer.add_string(keys.TE_SOURCE_DTYPES, ",".join(sorted({t.dtype + ("*" + t.scale.kind if t.scale else "") for t in src.tensors.values()})))
        writer.add_array(keys.TE_SOURCE_FILES, [f.name for f in src.files] + tok["files"])
        if cfg["mrope_section"]:
            writer.add_array(keys.TE_SOURCE_MROPE, cfg["mrope_section"])

    tensors = [
        OutTensor(gguf_name(n), src.tensors[n].shape, plans[n][0], functools.partial(src.chunks, n), src.tensors[n].file, src.tensors[n].key)
        for n in te.order
    ]
    bytes_in = write_gguf(
        out_path,
        arch,
        metadata,
        tensors,
        encode=functools.partial(encode_rows, threads=threads),
        range_hint="choose --te-type f32 or bf16",
        release=src.release,
        progress=progress,
    )
    return {
        "bytes_in": bytes_in,
        "plans": {gguf_name(n): [plans[n][0].name, plans[n][1]] for n in te.order},
        "path": out_path,
        "arch": arch,
        "n_layers": cfg["n_layers"],
        "hidden": cfg["hidden"],
        "features_dim": cfg["hidden"] * len(te.taps),
        "taps": te.taps,
        "vocab": cfg["vocab"],
        "tokenizer_tokens": tok["n_tokenizer"],
        "tensors": len(plans),
        "types": dict(Counter(t.name for t, _ in plans.values())),
        "source_layout": src.prefix or "(none)",
        "config_source": cfg["config_source"],
        "bytes_out": out_path.stat().st_size,
        "seconds": time.perf_counter() - t0,
    }


def convert_text_encoder(
    te_dir: str | Path,
    tokenizer_dir: str | Path,
    out_path: str | Path,
    *,
    linear_type: str | GGMLType = "q8_0",
    down_proj_type: str | GGMLType | None = None,
    force: bool = False,
    threads: int | None = None,
    progress: Callable[[str, int], None] | None = None,
    arch: str = LLAMA_ARCH,
) -> dict:
    """Convert a Qwen3-VL (or Qwen3) language model and its tokenizer into one GGUF of arch ``qwen3``.

    ``linear_type`` applies to every 2-D weight (token embedding included; a type the row length
    cannot hold falls back to Q8_0, then F16; the embedding falls back to F16); ``down_proj_type``,
    when given, applies to every ``mlp.down_proj`` and must fit. Norms stay F32. ``arch`` "qwen3vl"
    writes the layout of community Qwen3-VL GGUFs instead (MRoPE sections, deepstack count; same
    tensors, same features for text). Returns a summary dict (path, arch, n_layers, hidden, taps,
    features_dim, types, plans, bytes, seconds, ...). Written like ``gguf-dit convert``'s outputs
    (``output.OutputSet``): nothing is left behind on an error or Ctrl-C.
    """
    out_path = Path(out_path)
    result = write_one(
        out_path,
        force,
        lambda: prepare_text_encoder(te_dir, tokenizer_dir, linear_type=linear_type, down_proj_type=down_proj_type, arch=arch),
        lambda te, path: write_text_encoder(te, path, threads=threads, progress=progress),
    )
    result["path"] = out_path
    return result
