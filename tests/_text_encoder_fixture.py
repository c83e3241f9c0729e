"""A tiny random Qwen3-VL text encoder checkpoint and tokenizer, in the Hugging Face layout.

``make_text_encoder_checkpoint(root)`` writes::

    ROOT/text_encoder/config.json           Qwen3VLForConditionalGeneration config (text + vision)
    ROOT/text_encoder/model.safetensors     keys model.language_model.*, model.visual.*, lm_head.weight
    ROOT/tokenizer/tokenizer.json           byte-level BPE (Qwen2 split regex + NFC + ByteLevel)
    ROOT/tokenizer/tokenizer_config.json    Qwen2Tokenizer, chat template without a system prompt

The model is the stock Instruct class with every size tiny except the layer count (36, so the
official 13 taps exist) and the rope theta (5e6, interleaved MRoPE). Every parameter is overwritten
from a seeded generator, norm weights included, so a dropped or extra RMSNorm, a wrong tap or a
wrong q/k norm changes the output visibly. The embedding has more rows than the tokenizer has
tokens, as Qwen's does (151,936 vs 151,669). See docs/ideogram4-model.md §11 and its appendix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BPE_VOCAB = 300  # learned vocabulary (256 bytes + merges); the three specials follow
EMBED_ROWS = 320  # embedding rows > tokenizer size, like Qwen

_CORPUS = [
    'A photo of a red fox standing in the snow, soft morning light, shallow depth of field.',
    '{"caption": "a watercolor painting of a lighthouse", "style": "impressionist", "colors": ["blue", "white"]}',
    '{"text": "Café «Ünïcödé» — 東京 🌸", "layout": {"x": 0.25, "y": 0.75}}',
    "The quick brown fox jumps over the lazy dog. 0123456789 !@#$%^&*() <tag> [list] {obj}",
    "Poster with the words \"GRAND OPENING\" in bold serif letters, confetti, 1970s style.",
    "naïve résumé façade coöperate — ça va? Привет мир. مرحبا بالعالم. こんにちは世界",
    "  leading spaces\tand tabs\nnew lines\r\n and   multiple   spaces  ",
    "I'm sure they'll say it's what we've done, you'd think I'd know.",
]


def make_tokenizer(tok_dir: Path):
    """Train a byte-level BPE with the Qwen2 pre-tokenizer and save it as a Qwen2Tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 262144,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def text_config(n_layers: int = 36, hidden: int = 32) -> dict:
    return {
        "vocab_size": EMBED_ROWS,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        "tie_word_embeddings": False,
    }


def _vision_config(hidden: int) -> dict:
    return {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 1,
        "out_hidden_size": hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "deepstack_visual_indexes": [0],
        "num_position_embeddings": 16,
    }


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if "norm" in name and name.endswith("weight"):
                    base = 1.3 if ("q_norm" in name or "k_norm" in name) else 1.0
                    p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def make_text_encoder_checkpoint(root, seed: int = 0, n_layers: int = 36, hidden: int = 32):
    """Write ROOT/text_encoder and ROOT/tokenizer; return (te_dir, tok_dir, hf_model, hf_tokenizer).

    ``hf_model`` is the float32 ``Qwen3VLForConditionalGeneration`` in eval mode; its language model
    is ``hf_model.model.language_model``.
    """
    from safetensors.torch import save_file
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    root = Path(root)
    te_dir, tok_dir = root / "text_encoder", root / "tokenizer"
    tokenizer = make_tokenizer(tok_dir)
    cfg = Qwen3VLConfig(
        text_config=text_config(n_layers, hidden),
        vision_config=_vision_config(hidden),
        tie_word_embeddings=False,
        image_token_id=EMBED_ROWS - 3,
        video_token_id=EMBED_ROWS - 2,
        vision_start_token_id=EMBED_ROWS - 1,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg).float().eval()
    _randomize(model, seed)
    te_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(te_dir))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(te_dir / "model.safetensors"), metadata={"format": "pt"})
    return te_dir, tok_dir, model, tokenizer


@torch.no_grad()
def reference_taps(model, input_ids: list[int], taps) -> torch.Tensor:
    """transformers' raw outputs of decoder layers ``taps`` (no final norm), shape [T, len(taps), hidden].

    ``hidden_states[i + 1]`` is layer i's output for i < N - 1; the last layer's raw output is taken
    with a forward hook, because transformers' last ``hidden_states`` entry is the final-normed one.
    """
    lm = model.model.language_model if hasattr(model, "model") else model.language_model
    captured = {}
    handle = lm.layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    try:
        ids = torch.tensor([input_ids])
        out = model.model(input_ids=ids, output_hidden_states=True) if hasattr(model, "lm_head") else model(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    hs = out.hidden_states
    n = len(lm.layers)
    cols = [captured["last"][0] if i == n - 1 else hs[i + 1][0] for i in taps]
    return torch.stack(cols, dim=1)
