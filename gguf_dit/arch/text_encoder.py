"""Qwen3-VL's language model as Ideogram 4's text encoder: architecture facts both sides use.

The caption goes through the chat template and the decoder; the raw residual stream of 13 tap layers
(0, 3, ..., 33, 35 of 36) is stacked into the DiT's text features (``../shared/docs/ideogram4-model.md`` §11).
Our GGUFs carry llama.cpp's ``qwen3`` architecture (text-only MRoPE equals 1-D RoPE); community Qwen3-VL
GGUFs carry ``qwen3vl``.
"""

from __future__ import annotations

import re

from .dit import MAX_TEXT_TOKENS

#: llama.cpp architecture our converter writes, and the ones the runtime accepts.
LLAMA_ARCH = "qwen3"
ACCEPTED_ARCHES = ("qwen3", "qwen3vl")
#: One user message with a generation prompt; no system prompt, no <think> block.
TEMPLATE = "<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n"
OFFICIAL_TAPS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)
N_TAPS = len(OFFICIAL_TAPS)
#: The official pipeline refuses captions longer than this many tokens, chat template included (§11.2).
MAX_TOKENS = MAX_TEXT_TOKENS

#: Defaults of Qwen3-VL's text config where a checkpoint's config.json leaves them out.
DEFAULT_ROPE_THETA = 5_000_000.0
DEFAULT_RMS_EPS = 1e-6
DEFAULT_CONTEXT = 262_144
#: Prefixes the language model's tensors carry in the HF checkpoints (Qwen3-VL, then plain Qwen3).
LM_PREFIXES = ("model.language_model.", "language_model.", "model.")

#: HF language-model tensor name (after the prefix and "layers.N.") -> llama.cpp name (after "blk.N.").
LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a language-model tensor (HF name without the prefix)."""
    if hf_name == "embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "norm.weight":
        return "output_norm.weight"
    m = LAYER_RE.match(hf_name)
    assert m is not None
    return f"blk.{m.group(1)}.{LAYER_MAP[m.group(2)]}"


def gguf_tensor_names(n_layers: int) -> list[str]:
    """Every tensor llama.cpp's qwen3 graph loads from an ``n_layers`` encoder (an lm head ``output.weight`` is optional)."""
    hf = ["embed_tokens.weight", *(f"layers.{i}.{k}" for i in range(n_layers) for k in LAYER_MAP), "norm.weight"]
    return [gguf_name(n) for n in hf]


def default_taps(n_layers: int) -> list[int]:
    """Tap layers for an ``n_layers`` decoder: the official rule generalised.

    Every third layer from 0 below the last, plus the last: for 36 layers exactly the official
    (0, 3, …, 33, 35); for 35 or 37 also 13 taps. Other depths with at least 13 layers get 13
    evenly spaced layers from 0 to N-1 (rounded half up), so the feature width stays hidden × 13;
    fewer than 13 layers keep the every-third rule (fewer taps; the DiT check then refuses).
    """
    if n_layers <= 0:
        return []
    taps = list(range(0, n_layers - 1, 3)) + [n_layers - 1]
    if len(taps) == N_TAPS or n_layers < N_TAPS:
        return taps
    return [int(j * (n_layers - 1) / (N_TAPS - 1) + 0.5) for j in range(N_TAPS)]
