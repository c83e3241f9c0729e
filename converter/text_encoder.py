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
embedding when ``output.weight`` is absent. Weights may be float32, bfloat16, float16, or FP8
(``float8_e4m3fn``) with a per-row, per-tensor ``.weight_scale`` (value = fp8 × scale[row]) or a
block-wise ``.weight_scale_inv`` (value = fp8 × scale_inv[row // B, col // B]), all in float32.

The tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) goes into the GGUF as llama.cpp's
``gpt2`` BPE with pre-tokenizer ``qwen2``. The file is written under a temporary name and renamed
only when complete.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from gguf_dit import __version__
from gguf_dit.errors import GgufDitError, OutputError, RecipeError, SourceError
from gguf_dit.ggml_ops import GGMLType, fits
from gguf_dit.ggml_ops.types import STORAGE_TYPES
from gguf_dit import keys
from gguf_dit.arch.text_encoder import (
    DEFAULT_CONTEXT,
    DEFAULT_RMS_EPS,
    DEFAULT_ROPE_THETA,
    LAYER_MAP,
    LAYER_RE,
    LLAMA_ARCH,
    LM_PREFIXES,
    TEMPLATE,
    default_taps,
)

from .encode import check_range, encode_rows, stored_nbytes
from .gguf_out import atomic_gguf, stream_tensor
from .inputs import json_float, json_int, json_int_list, read_json
from .output import HEADER_ALLOWANCE, OutputSet, check_location
from .source import SafetensorsFiles, _short, index_files

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CHUNK_BYTES = 64 << 20
GGML_QNT_VERSION = 2
UINT32_MAX = (1 << 32) - 1
#: Checked in order: the stock Instruct layout's prefix also starts with ``model.``.
_FLOAT_DTYPES = {"F32", "BF16", "F16", "F8_E4M3"}
_SCALED = ("weight_scale", "weight_scale_inv")
#: Qwen2's pre-tokenizer regex, which llama.cpp implements as pre-tokenizer ``qwen2``.
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
#: Qwen3-VL-8B values used when the checkpoint has no config.json (shapes give everything else).

# gguf TokenType values
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


class _Tensor:
    """One language-model tensor in a shard, with its optional FP8 scale."""

    def __init__(self, hf_name: str, key: str, file: Path, dtype: str, shape: tuple[int, ...]) -> None:
        self.hf_name = hf_name  # without the prefix
        self.key = key  # as stored
        self.file = file
        self.dtype = dtype
        self.shape = shape
        self.scale: tuple[str, Path, str, tuple[int, ...]] | None = None  # (key, file, kind, shape)


class TextEncoderSource(SafetensorsFiles):
    """A Qwen3(-VL) language model inside a Hugging Face checkpoint, read tensor by tensor."""

    def __init__(self, te_dir: str | Path) -> None:
        te_dir = Path(te_dir)
        if not te_dir.exists():
            raise SourceError("does not exist", path=te_dir)
        self.directory = te_dir if te_dir.is_dir() else te_dir.parent
        self.files = _weight_files(te_dir)
        self.config_path = self.directory / "config.json"
        # What a whole-model error names: the weights file itself when there is only one.
        self.where = self.files[0] if len(self.files) == 1 else self.directory
        self._handles: dict[Path, object] = {}
        self.tensors: dict[str, _Tensor] = {}
        self.prefix = ""
        self._scan()
        self.config = self._config()

    # -- discovery ---------------------------------------------------------------------
    def _scan(self) -> None:
        raw = self._headers()
        prefix = next((p for p in LM_PREFIXES if p + "embed_tokens.weight" in raw), None)
        if prefix is None:
            if "embed_tokens.weight" in raw:
                prefix = ""
            else:
                raise SourceError(
                    "no language model found (expected model.language_model.embed_tokens.weight, "
                    "language_model.embed_tokens.weight or model.embed_tokens.weight)",
                    path=self.where,
                )
        self.prefix = prefix
        lm = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        if prefix == "model.":
            # A Qwen3-VL checkpoint never reaches here (its embedding is under model.language_model.),
            # but skip a stray vision tower stored as model.visual.* all the same.
            lm = {k: v for k, v in lm.items() if not k.startswith(("visual.", "language_model."))}
        scales = {k for k in lm if k.endswith(tuple("." + s for s in _SCALED))}
        for name, (f, dtype, shape) in lm.items():
            if name in scales:
                continue
            if name not in ("embed_tokens.weight", "norm.weight"):
                m = LAYER_RE.match(name)
                if not m or m.group(2) not in LAYER_MAP:
                    if name.startswith(("rotary_emb.",)):
                        continue
                    raise SourceError(
                        "unexpected language-model tensor (not a Qwen3 decoder weight; attention biases are not supported)",
                        path=f,
                        tensor=prefix + name,
                    )
            if dtype not in _FLOAT_DTYPES:
                raise SourceError(f"unsupported dtype {dtype} (expected F32, BF16, F16 or F8_E4M3 with a weight scale)", path=f, tensor=prefix + name)
            if len(shape) not in (1, 2) or min(shape) < 1:
                raise SourceError(f"shape {list(shape)} is not a decoder weight's (1-D or 2-D, none empty)", path=f, tensor=prefix + name)
            t = _Tensor(name, prefix + name, f, dtype, shape)
            base = name[: -len("weight")]
            for kind in _SCALED:
                if base + kind in lm:
                    sf, sdt, sshape = lm[base + kind]
                    if sdt not in ("F32", "BF16", "F16"):
                        raise SourceError(f"{kind} has dtype {sdt}, expected a float type", path=sf, tensor=prefix + base + kind)
                    t.scale = (prefix + base + kind, sf, kind, sshape)
            if dtype == "F8_E4M3" and t.scale is None:
                raise SourceError("float8 weight without a .weight_scale or .weight_scale_inv tensor", path=f, tensor=t.key)
            if t.scale is not None:
                _check_scale(t)
            self.tensors[name] = t
        for s in scales:
            w = s.rsplit(".", 1)[0] + ".weight"
            if w not in self.tensors:
                raise SourceError("weight scale without its weight", path=lm[s][0], tensor=prefix + s)

    def _config(self) -> dict:
        shapes = {n: t.shape for n, t in self.tensors.items()}
        emb = shapes["embed_tokens.weight"]
        if len(emb) != 2:
            raise SourceError(f"embedding has shape {list(emb)}, expected [vocab, hidden]", path=self.tensors["embed_tokens.weight"].file, tensor=self.tensors["embed_tokens.weight"].key)
        vocab, hidden = emb
        layer_of = {int(m.group(1)): n for n in shapes if (m := LAYER_RE.match(n))}
        layers = sorted(layer_of)
        n_layers = len(layers)
        if n_layers == 0:
            raise SourceError("no decoder layers (layers.N.*) found", path=self.where)
        if layers[-1] != n_layers - 1:
            gap = next(i for i in range(n_layers) if i not in layer_of)
            raise SourceError(f"decoder layers are not numbered 0..N-1: layer {gap} is missing, {layers[-1]} is the highest", path=self.where, tensor=self.prefix + layer_of[layers[-1]])

        def need(name: str) -> tuple[int, ...]:
            if name not in shapes:
                raise SourceError("missing tensor", path=self.where, tensor=self.prefix + name)
            return shapes[name]

        head_dim = need("layers.0.self_attn.q_norm.weight")[0]
        q_rows = need("layers.0.self_attn.q_proj.weight")[0]
        kv_rows = need("layers.0.self_attn.k_proj.weight")[0]
        ffn = need("layers.0.mlp.gate_proj.weight")[0]
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
            if name not in self.tensors:
                raise SourceError("missing tensor", path=self.where, tensor=self.prefix + name)
            got = self.tensors[name].shape
            if tuple(got) != shape:
                raise SourceError(f"shape {list(got)}, expected {list(shape)}", path=self.tensors[name].file, tensor=self.tensors[name].key)
        return cfg

    # -- reading -----------------------------------------------------------------------
    def rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of a language-model tensor as float32 (1-D tensors: elements)."""
        import torch

        t = self.tensors[name]
        try:
            x = self._open(t.file).get_slice(t.key)[r0:r1].to(torch.float32)
            if t.scale is not None:
                skey, sfile, kind, sshape = t.scale
                s = self._open(sfile).get_slice(skey)[:].to(torch.float32)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"cannot read tensor data ({_short(e)}); the file may be truncated or corrupt", path=t.file, tensor=t.key) from None
        if t.scale is not None:
            if kind == "weight_scale":
                s = s.reshape(-1)
                x.mul_((s[r0:r1] if s.numel() > 1 else s).reshape(-1, *([1] * (x.dim() - 1))))
            else:
                rows, cols = t.shape
                b_r, b_c = math.ceil(rows / sshape[0]), math.ceil(cols / sshape[1])
                s = s.repeat_interleave(b_r, 0)[r0:r1].repeat_interleave(b_c, 1)[:, :cols]
                x.mul_(s)
        arr = x.numpy()
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr.reshape(-1)))[0])
            per_row = int(np.prod(arr.shape[1:])) if arr.ndim > 1 else 1
            raise SourceError(f"non-finite value (NaN or Inf) at flat index {bad + r0 * per_row}", path=t.file, tensor=t.key)
        return arr



def source_size(te_dir: str | Path) -> tuple[int, int]:
    """(float32 bytes, tensor count) of the language model at ``te_dir``: the totals that
    ``convert_text_encoder``'s ``progress(name, nbytes)`` calls add up to."""
    src = TextEncoderSource(te_dir)
    try:
        return sum(4 * int(np.prod(t.shape)) for t in src.tensors.values()), len(src.tensors)
    finally:
        src.close()


def _check_scale(t: _Tensor) -> None:
    skey, sfile, kind, sshape = t.scale  # type: ignore[misc]
    rows = t.shape[0]
    if kind == "weight_scale":
        ok = sshape in ((rows,), (rows, 1), (), (1,))
        want = f"({rows},), ({rows}, 1) or a scalar"
    else:  # block scales: [ceil(rows / B_r), ceil(cols / B_c)]
        ok = len(t.shape) == 2 and len(sshape) == 2 and min(sshape) > 0
        if ok:
            b_r, b_c = math.ceil(rows / sshape[0]), math.ceil(t.shape[1] / sshape[1])
            ok = math.ceil(rows / b_r) == sshape[0] and math.ceil(t.shape[1] / b_c) == sshape[1]
        want = "[ceil(rows/B), ceil(cols/B)] block scales"
    if not ok:
        raise SourceError(f"{kind} has shape {list(sshape)}, expected {want} for weight shape {list(t.shape)}", path=sfile, tensor=skey)


def _weight_files(te_dir: Path) -> list[Path]:
    if te_dir.is_file():
        if te_dir.suffix != ".safetensors":
            raise SourceError("expected a .safetensors file or a text encoder directory", path=te_dir)
        return [te_dir]
    index = te_dir / INDEX_NAME
    if index.exists():
        return index_files(index)
    if (te_dir / WEIGHTS_NAME).exists():
        return [te_dir / WEIGHTS_NAME]
    found = sorted(te_dir.glob("*.safetensors"))
    if found:
        return found
    raise SourceError(f"no {WEIGHTS_NAME} or {INDEX_NAME} found", path=te_dir)


def _merge_config(cfg: dict, js: dict, where: Path) -> None:
    """Fill ``cfg`` from config.json (Qwen3-VL: ``text_config``; plain Qwen3: top level) and check it
    against the shapes already in ``cfg``. Every value used is type-checked, naming its key."""
    nested = isinstance(js.get("text_config"), dict)
    tc = js["text_config"] if nested else js
    pre = "text_config." if nested else ""
    declared = {
        "hidden": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "ffn": "intermediate_size",
        "vocab": "vocab_size",
    }
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


# -- tokenizer ---------------------------------------------------------------------------


def read_tokenizer(tok_dir: str | Path, n_rows: int) -> dict:
    """The GGUF tokenizer fields from ``tokenizer.json`` (+ ``tokenizer_config.json``), padded to ``n_rows``.
    Every field used is type-checked, naming the file and key."""
    tok_dir = Path(tok_dir)
    path = tok_dir / "tokenizer.json" if tok_dir.is_dir() else tok_dir
    if not path.exists():
        raise SourceError("tokenizer.json not found", path=path)
    tj = read_json(path, what="tokenizer.json")
    model = tj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else model
        raise SourceError(f"tokenizer model is {str(kind)[:40]!r}, expected a byte-level BPE (Qwen2)", path=path)
    _check_pretokenizer(tj.get("pre_tokenizer"), path)
    conf_path = path.parent / "tokenizer_config.json"
    conf: dict = read_json(conf_path, what="tokenizer_config.json") if conf_path.exists() else {}

    vocab = _typed(model.get("vocab", {}), dict, "model.vocab", path)
    tokens: dict[int, str] = {json_int(i, f"model.vocab[{_utf8(t, 'model.vocab key', path)!r}]", path): t for t, i in vocab.items()}
    types: dict[int, int] = {i: TOKEN_NORMAL for i in tokens}
    for n, at in enumerate(_typed(tj.get("added_tokens", []), list, "added_tokens", path)):
        at = _typed(at, dict, f"added_tokens[{n}]", path)
        i = json_int(at.get("id"), f"added_tokens[{n}].id", path)
        content = _utf8(at.get("content"), f"added_tokens[{n}].content", path)
        tokens[i] = content
        special = bool(at.get("special")) or (content.startswith("<|") and content.endswith("|>"))
        types[i] = TOKEN_CONTROL if special else TOKEN_USER_DEFINED
    if not tokens:
        raise SourceError("tokenizer has an empty vocabulary", path=path)
    n_tok = max(tokens) + 1
    if n_tok > n_rows:
        raise SourceError(f"tokenizer has ids up to {n_tok - 1} but the embedding has only {n_rows} rows", path=path)
    token_list, type_list = [], []
    for i in range(n_rows):
        if i in tokens:
            token_list.append(tokens[i])
            type_list.append(types[i])
        else:
            token_list.append(f"[PAD{i}]")
            type_list.append(TOKEN_UNUSED)
    # llama.cpp aborts the process on a vocabulary with a repeated token.
    seen: dict[str, int] = {}
    for i, t in enumerate(token_list):
        if t in seen:
            raise SourceError(f"token {t[:40]!r} appears twice (ids {seen[t]} and {i})", path=path)
        seen[t] = i
    merges = []
    for n, m in enumerate(_typed(model.get("merges", []), list, "model.merges", path)):
        if isinstance(m, list) and len(m) == 2:
            m = " ".join(_utf8(x, f"model.merges[{n}]", path) for x in m)
        merges.append(_utf8(m, f"model.merges[{n}]", path))
    by_content = {t: i for i, t in tokens.items()}

    def special_id(name: str, fallback: str | None) -> int | None:
        v = conf.get(name)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str) and v in by_content:
            return by_content[v]
        return by_content.get(fallback) if fallback else None

    eos = special_id("eos_token", "<|im_end|>")
    if eos is None:
        eos = by_content.get("<|endoftext|>")
    template = conf.get("chat_template")
    out = {
        "tokens": token_list,
        "types": type_list,
        "merges": merges,
        "n_tokenizer": n_tok,
        "eos": eos,
        "bos": special_id("bos_token", "<|endoftext|>"),
        "pad": special_id("pad_token", "<|endoftext|>"),
        "chat_template": _utf8(template, "chat_template", conf_path) if isinstance(template, str) else None,
        "files": [p.name for p in (path, conf_path) if p.exists()],
    }
    return out


def _typed(value, kind: type, key: str, path: Path):
    if not isinstance(value, kind):
        raise SourceError(f"{key} is {str(value)[:40]!r}, expected a JSON {'object' if kind is dict else 'array'}", path=path)
    return value


def _utf8(value, key: str, path: Path) -> str:
    """A string the GGUF writer can store (JSON may hold lone surrogates, which UTF-8 cannot)."""
    if not isinstance(value, str):
        raise SourceError(f"{key} is {str(value)[:40]!r}, expected a string", path=path)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(f"{key} is not valid Unicode (a lone surrogate)", path=path) from None
    return value


def _check_pretokenizer(pt, path: Path) -> None:
    """llama.cpp's ``qwen2`` pre-tokenizer hard-codes Qwen2's split regex; refuse anything else."""
    nodes, todo = [], [pt] if pt else []
    while todo:  # iterative: a deeply nested hostile file must not exhaust the Python stack
        node = todo.pop()
        if isinstance(node, dict):
            nodes.append(node)
            children = node.get("pretokenizers") or []
            todo.extend(reversed(_typed(children, list, "pre_tokenizer.pretokenizers", path)))
    kinds = [n.get("type") for n in nodes]
    if "ByteLevel" not in kinds:
        raise SourceError(f"pre-tokenizer {str(kinds or None)[:80]} is not byte-level; expected Qwen2's Split + ByteLevel", path=path)
    for n in nodes:
        if n.get("type") == "Split":
            pat = n.get("pattern", {})
            regex = pat.get("Regex") if isinstance(pat, dict) else None
            if regex != QWEN2_SPLIT:
                raise SourceError("pre-tokenizer split pattern is not Qwen2's (llama.cpp pre-tokenizer qwen2 would tokenize differently)", path=path)


# -- types -------------------------------------------------------------------------------


def _parse_type(name: str | GGMLType, what: str) -> GGMLType:
    if isinstance(name, GGMLType):
        t = name
    else:
        try:
            t = GGMLType.parse(str(name))
        except GgufDitError as e:
            raise RecipeError(f"text encoder {what}: {e}") from None
    if t not in STORAGE_TYPES:
        raise RecipeError(f"text encoder {what}: {t.name} cannot store weights")
    return t


def plan_types(src: TextEncoderSource, linear_type: GGMLType, down_proj_type: GGMLType | None) -> dict[str, tuple[GGMLType, str]]:
    """GGUF tensor type and reason for every language-model tensor (HF names)."""
    plans: dict[str, tuple[GGMLType, str]] = {}
    for name, t in src.tensors.items():
        if len(t.shape) == 1:
            plans[name] = (GGMLType.F32, "norm kept F32")
            continue
        k = t.shape[1]
        if name == "embed_tokens.weight":
            if fits(linear_type, k):
                plans[name] = (linear_type, "token embedding at the linear type")
            else:
                plans[name] = (GGMLType.F16, f"token embedding: {linear_type.name} needs rows divisible by {linear_type.block_size} (row = {k}), F16")
            continue
        if down_proj_type is not None and name.endswith("mlp.down_proj.weight"):
            if not fits(down_proj_type, k):
                raise RecipeError(
                    f"down_proj_type {down_proj_type.name} needs the input dimension divisible by {down_proj_type.block_size}, this tensor has {k}",
                    tensor=src.prefix + name,
                )
            plans[name] = (down_proj_type, "down_proj_type (massive activations)")
            continue
        if fits(linear_type, k):
            plans[name] = (linear_type, "linear")
            continue
        for alt in (GGMLType.Q8_0, GGMLType.F16):
            if fits(alt, k):
                plans[name] = (alt, f"linear; {linear_type.name} needs in % {linear_type.block_size} == 0 (in = {k}), fell back to {alt.name}")
                break
    return plans


def _gguf_name(hf_name: str) -> str:
    if hf_name == "embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "norm.weight":
        return "output_norm.weight"
    m = LAYER_RE.match(hf_name)
    assert m is not None
    return f"blk.{m.group(1)}.{LAYER_MAP[m.group(2)]}"


def _encode(x: np.ndarray, t: GGMLType, threads: int | None) -> np.ndarray:
    return encode_rows(x, t, threads=threads)


_nbytes = stored_nbytes


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
    if arch not in ("qwen3", "qwen3vl"):
        raise RecipeError(f"text encoder arch {arch!r}: use qwen3 (default) or qwen3vl")
    lt = _parse_type(linear_type, "linear_type")
    dt = _parse_type(down_proj_type, "down_proj_type") if down_proj_type is not None else None
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
    nbytes = sum(_nbytes(src.tensors[n].shape, plans[n][0]) + 512 for n in order) + sum(len(x.encode()) + 12 for x in strings) + HEADER_ALLOWANCE
    return TextEncoderPlan(src, cfg, tok, plans, order, default_taps(cfg["n_layers"]), lt, dt, arch, nbytes)


def write_text_encoder(te: TextEncoderPlan, out_path: Path, *, threads: int | None = None, progress: Callable[[str, int], None] | None = None) -> dict:
    """Write a prepared text encoder to ``out_path`` (itself written under a temporary name and renamed)."""
    t0 = time.perf_counter()
    cfg, tok, plans = te.cfg, te.tok, te.plans
    result = _write(te.src, cfg, tok, plans, te.order, te.taps, out_path, te.lt, te.dt, threads, progress, te.arch)
    types: dict[str, int] = {}
    for t, _ in plans.values():
        types[t.name] = types.get(t.name, 0) + 1
    result.update(
        {
            "path": out_path,
            "arch": te.arch,
            "n_layers": cfg["n_layers"],
            "hidden": cfg["hidden"],
            "features_dim": cfg["hidden"] * len(te.taps),
            "taps": te.taps,
            "vocab": cfg["vocab"],
            "tokenizer_tokens": tok["n_tokenizer"],
            "tensors": len(plans),
            "types": types,
            "source_layout": te.src.prefix or "(none)",
            "config_source": cfg["config_source"],
            "bytes_out": out_path.stat().st_size,
            "seconds": time.perf_counter() - t0,
        }
    )
    return result


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
    check_location(out_path.parent, [out_path.name], force=force)
    te = prepare_text_encoder(te_dir, tokenizer_dir, linear_type=linear_type, down_proj_type=down_proj_type, arch=arch)
    try:
        with OutputSet(out_path.parent, [out_path.name], force=force, need_bytes=te.nbytes) as outs:
            result = write_text_encoder(te, outs.path(out_path.name), threads=threads, progress=progress)
    finally:
        te.close()
    result["path"] = out_path
    return result


def _write(src, cfg, tok, plans, order, taps, out_path, lt, dt, threads, progress, arch) -> dict:
    import gguf

    bytes_in = 0
    with atomic_gguf(out_path, arch) as (writer, tmp):
        a = arch
        writer.add_name("Qwen3-VL text encoder (language model) for Ideogram 4")
        writer.add_uint32("general.quantization_version", GGML_QNT_VERSION)
        writer.add_uint32(f"{a}.context_length", cfg["context_length"])
        writer.add_uint32(f"{a}.embedding_length", cfg["hidden"])
        writer.add_uint32(f"{a}.block_count", cfg["n_layers"])
        writer.add_uint32(f"{a}.feed_forward_length", cfg["ffn"])
        writer.add_uint32(f"{a}.attention.head_count", cfg["n_heads"])
        writer.add_uint32(f"{a}.attention.head_count_kv", cfg["n_kv_heads"])
        writer.add_uint32(f"{a}.attention.key_length", cfg["head_dim"])
        writer.add_uint32(f"{a}.attention.value_length", cfg["head_dim"])
        writer.add_float32(f"{a}.rope.freq_base", cfg["rope_theta"])
        writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg["rms_eps"])
        writer.add_uint32(f"{a}.pooling_type", 0)  # NONE: an encoder; every token is an output
        if arch == "qwen3vl":
            sections = (cfg["mrope_section"] or [cfg["head_dim"] // 2, 0, 0]) + [0]
            writer.add_array(f"{a}.rope.dimension_sections", [int(x) for x in sections[:4]])
            writer.add_uint32(f"{a}.n_deepstack_layers", cfg["n_deepstack"])
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
        writer.add_array(keys.TE_TAPS, [int(x) for x in taps])
        writer.add_string(keys.TE_TEMPLATE, TEMPLATE)
        writer.add_string(keys.CONVERTER_VERSION, __version__)
        writer.add_string(keys.TE_LINEAR_TYPE, lt.name)
        if dt is not None:
            writer.add_string(keys.TE_DOWN_PROJ_TYPE, dt.name)
        writer.add_string(keys.TE_SOURCE_LAYOUT, src.prefix or "(none)")
        writer.add_string(keys.TE_SOURCE_DTYPES, ",".join(sorted({t.dtype + ("*" + t.scale[2] if t.scale else "") for t in src.tensors.values()})))
        writer.add_array(keys.TE_SOURCE_FILES, [f.name for f in src.files] + tok["files"])
        if cfg["mrope_section"]:
            writer.add_array(keys.TE_SOURCE_MROPE, cfg["mrope_section"])
        for name in order:
            t, _ = plans[name]
            shape = src.tensors[name].shape
            writer.add_tensor_info(_gguf_name(name), shape, np.dtype(np.float32), _nbytes(shape, t), raw_dtype=gguf.GGMLQuantizationType(int(t)))
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in order:
            t, _ = plans[name]
            shape = src.tensors[name].shape

            def on_chunk(n: int, gname: str = _gguf_name(name)) -> None:
                nonlocal bytes_in
                bytes_in += n
                if progress:
                    progress(gname, n)

            def encode(c: np.ndarray, t: GGMLType = t, name: str = name) -> np.ndarray:
                big = check_range(c, t)
                if big is not None:
                    raise SourceError(f"value of magnitude {big:.4g} is beyond F16's range (65504), which {t.name} cannot store; "
                                      "choose --te-type f32 or bf16", path=src.tensors[name].file, tensor=src.tensors[name].key)
                return _encode(c, t, threads)

            written = stream_tensor(writer, src.chunks(name, CHUNK_BYTES), encode, on_chunk)
            if written != _nbytes(shape, t):
                raise OutputError(f"internal: wrote {written} bytes, expected {_nbytes(shape, t)}", path=out_path, tensor=_gguf_name(name))
    return {"bytes_in": bytes_in, "plans": {_gguf_name(n): [plans[n][0].name, plans[n][1]] for n in order}}
