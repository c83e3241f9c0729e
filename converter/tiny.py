"""Write a tiny random Ideogram 4 checkpoint in the official Hugging Face layout.

Real weights cannot be downloaded everywhere; this gives the converter and the runtime (and a
first-time user) something genuine to chew on: both DiT backbones in the official FP8 format with
official names, real head_dim and RoPE sections; a 36-layer Qwen3-VL-layout text encoder (hidden 32,
so 13 taps give the DiT's 416 features) with a byte-level BPE tokenizer in the Qwen2 format; and a
FLUX.2-layout VAE with 32 latent channels and ×8 down-sampling. Every other size is shrunk and every
weight is random: the whole pipeline runs, and draws noise.

The writers below are the only ones in the project: the demo training script (``scripts/train_demo.py``), the
benchmarks and the tests' oracle checkpoints (``tests/_helpers.py``) write their folders through them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gguf_dit.arch.dit import BACKBONE_DIRS, Ideogram4Config, tensor_inventory
from gguf_dit.errors import OutputError

from .source import _SPLIT, WEIGHTS_NAME
from .text_encoder import WEIGHTS_NAME as TE_WEIGHTS_NAME
from .tokenizer import QWEN2_SPLIT

TINY = Ideogram4Config(emb_dim=512, num_layers=2, num_heads=2, intermediate_size=768, adaln_dim=256, in_channels=128, llm_features_dim=13 * 32)
DIT_CLASS, VAE_CLASS = "Ideogram4Transformer2DModel", "AutoencoderKLFlux2"
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
_EMBEDDINGS = {s.name for s in tensor_inventory(TINY) if s.kind == "embedding"}  # 2-D, but not a linear


TE_HIDDEN, TE_LAYERS, TE_HEADS, TE_KV_HEADS, TE_HEAD_DIM, TE_FFN, TE_ROWS = 32, 36, 2, 1, 16, 64, 320
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_BIGRAMS = ("Ġa", "Ġt", "Ġs", "th", "he", "in", "er", "an", "re", "on", "Ġthe", "ed", "nd", "es", "or", "ou")
VAE_CHANNELS = (16, 32, 32, 32)
#: Room for a full tiny checkpoint (it takes about 15 MB), for the free-space check.
NBYTES = 32 << 20


def save_folder(d: Path, tensors: dict | None, config: dict | None, weights: str = WEIGHTS_NAME) -> Path:
    """One Hugging Face component folder: ``config.json`` as given and/or one safetensors file of ``tensors``."""
    from safetensors.torch import save_file

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / weights), metadata={"format": "pt"})
    return d


def dit_config(cfg: Ideogram4Config) -> dict:
    """A backbone's ``config.json`` as diffusers and the official repo write it."""
    return {
        "_class_name": DIT_CLASS, "in_channels": cfg.in_channels, "num_layers": cfg.num_layers, "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size, "adaln_dim": cfg.adaln_dim,
        "llm_features_dim": cfg.llm_features_dim, "rope_theta": int(cfg.rope_theta), "mrope_section": list(cfg.mrope_section),
        "norm_eps": cfg.norm_eps,
    }


def official_names(sd: dict) -> dict:
    """A backbone's state dict from diffusers' split attention names to the official ones: ``to_q``/``to_k``/``to_v``
    stacked by rows into ``qkv``, ``to_out.0`` renamed ``o``; every other tensor kept, in order."""
    import torch

    out = {}
    for k, v in sd.items():
        m = _SPLIT.match(k)
        if m is None:
            out[k] = v
        elif m.group(2) == "to_q":
            out[m.group(1) + "qkv.weight"] = torch.cat([sd[f"{m.group(1)}{x}.weight"] for x in ("to_q", "to_k", "to_v")])
        elif m.group(2) == "to_out.0":
            out[m.group(1) + "o.weight"] = v
    return out


def official_fp8(sd: dict) -> dict:
    """A backbone's state dict (either attention layout) in the official FP8 format: every linear weight as
    float8_e4m3fn rows with a float32 per-row ``weight_scale`` (rowmax|W| / 448; 1 for an all-zero row), every
    other tensor bfloat16."""
    import torch

    out = {}
    for k, v in sd.items():
        if v.ndim != 2 or k in _EMBEDDINGS:
            out[k] = v.to(torch.bfloat16)
            continue
        w = v.float()
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        out[k] = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out[k + "_scale"] = scale
    return out


def latent_bn(eps: float = 1e-4) -> dict:
    """The VAE's BatchNorm buffers that make diffusers' de-normalisation (z·sqrt(var + eps) + mean) the official
    latent constants."""
    import torch

    from gguf_dit.arch.latent import LATENT_SCALE, LATENT_SHIFT

    return {"bn.running_mean": torch.from_numpy(LATENT_SHIFT.copy()),
            "bn.running_var": torch.from_numpy((LATENT_SCALE.astype(np.float64) ** 2 - eps).astype(np.float32))}


def train_bpe(corpus: list[str], vocab_size: int, split: str = QWEN2_SPLIT):
    """A byte-level BPE (HF ``tokenizers``, deterministic) learned on ``corpus`` behind Qwen2's normaliser and
    pre-tokenizer (``split``: its regex); every byte stays a symbol, so any text still tokenizes."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _byte_chars() -> list[str]:
    # GPT-2's reversible byte -> printable character map, which byte-level BPE vocabularies use.
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    moved = [b for b in range(256) if b not in keep]  # each to the next character from 256 on
    return [chr(b) if b in keep else chr(256 + moved.index(b)) for b in range(256)]


def _write_tokenizer(d: Path, corpus: list[str] | None = None) -> int:
    if corpus:  # ``train_bpe``'s merges, with the vocabulary renumbered bytes first (in GPT-2's byte order)
        pairs = [m if isinstance(m, list) else m.split(" ") for m in json.loads(train_bpe(corpus, 4096).to_str())["model"]["merges"]]
    else:
        pairs = [(m[:-1], m[-1]) if m != "Ġthe" else ("Ġt", "he") for m in _BIGRAMS]
    vocab = {c: i for i, c in enumerate(_byte_chars())}
    merges = []
    for left, right in pairs:
        merges.append(f"{left} {right}")
        vocab.setdefault(left + right, len(vocab))
    added = [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True} for i, t in enumerate(SPECIALS)]
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    conf = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False}
    (d / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))
    return len(vocab) + len(SPECIALS)


def _write_text_encoder(d: Path, g, rows: int = TE_ROWS) -> None:
    import torch

    H, F, hd = TE_HIDDEN, TE_FFN, TE_HEAD_DIM
    p = "model.language_model."
    sd = {p + "embed_tokens.weight": torch.randn(rows, H, generator=g), p + "norm.weight": 1 + 0.2 * torch.randn(H, generator=g)}
    shapes = {
        "self_attn.q_proj.weight": (TE_HEADS * hd, H), "self_attn.k_proj.weight": (TE_KV_HEADS * hd, H),
        "self_attn.v_proj.weight": (TE_KV_HEADS * hd, H), "self_attn.o_proj.weight": (H, TE_HEADS * hd),
        "mlp.gate_proj.weight": (F, H), "mlp.up_proj.weight": (F, H), "mlp.down_proj.weight": (H, F),
    }
    for n in range(TE_LAYERS):
        q = f"{p}layers.{n}."
        for k, shp in shapes.items():
            sd[q + k] = torch.randn(shp, generator=g) / np.sqrt(shp[1])
        for k, c in (("input_layernorm.weight", H), ("post_attention_layernorm.weight", H), ("self_attn.q_norm.weight", hd), ("self_attn.k_norm.weight", hd)):
            sd[q + k] = 1 + 0.2 * torch.randn(c, generator=g)
    config = {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": {
            "hidden_size": H, "intermediate_size": F, "num_hidden_layers": TE_LAYERS, "num_attention_heads": TE_HEADS,
            "num_key_value_heads": TE_KV_HEADS, "head_dim": hd, "vocab_size": rows, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096, "hidden_act": "silu", "attention_bias": False,
            "rope_theta": 5_000_000.0, "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        },
        "vision_config": {},
    }
    save_folder(d, {k: v.to(torch.bfloat16) for k, v in sd.items()}, config, TE_WEIGHTS_NAME)


def _write_vae(d: Path, g) -> None:
    import torch

    from gguf_dit.arch.vae import VAEConfig, decoder_inventory

    cfg = VAEConfig(block_out_channels=VAE_CHANNELS, layers_per_block=1, norm_num_groups=8)
    sd = {}
    for name, shape in decoder_inventory(cfg).items():
        if len(shape) == 1:
            base = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
            sd[name] = base + 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:]))
            sd[name] = torch.randn(shape, generator=g) / np.sqrt(fan_in)
    sd.update(latent_bn())
    config = {
        "_class_name": VAE_CLASS, "in_channels": 3, "out_channels": 3, "latent_channels": 32,
        "block_out_channels": list(VAE_CHANNELS), "layers_per_block": 1, "norm_num_groups": 8, "act_fn": "silu",
        "up_block_types": ["UpDecoderBlock2D"] * len(VAE_CHANNELS), "mid_block_add_attention": True,
        "use_post_quant_conv": True, "patch_size": [2, 2], "batch_norm_eps": 1e-4,
    }
    save_folder(d, {k: v.float() for k, v in sd.items()}, config)


def write_tiny_checkpoint(root: str | Path, *, cfg: Ideogram4Config = TINY, seed: int = 0, fp8: bool = True, force: bool = False, full: bool = True,
                          tokenizer_corpus: list[str] | None = None) -> Path:
    """Both DiT backbones; with ``full`` also ``text_encoder/``, ``tokenizer/`` and ``vae/``. With
    ``tokenizer_corpus`` the tokenizer's merges are learned on those strings (the demo model's captions), and the
    encoder's embedding gets one row per token (rounded up to 64)."""
    import torch

    root = Path(root)
    if root.exists() and any(root.iterdir()) and not force:
        raise OutputError("already exists and is not empty (use --force)", path=root)
    config = dit_config(cfg)
    for i, sub in enumerate(BACKBONE_DIRS):
        g = torch.Generator().manual_seed(seed + i)
        sd = {}
        for spec in tensor_inventory(cfg):
            if spec.kind == "linear":
                sd[spec.name] = torch.randn(spec.shape, generator=g) / np.sqrt(spec.in_features)
            elif spec.kind == "norm":
                sd[spec.name] = 1 + 0.2 * torch.randn(spec.shape, generator=g)
            else:
                sd[spec.name] = 0.1 * torch.randn(spec.shape, generator=g)
        save_folder(root / sub, official_fp8(sd) if fp8 else {k: v.to(torch.bfloat16) for k, v in sd.items()}, config)
    if full:
        if cfg.llm_features_dim != 13 * TE_HIDDEN:
            raise OutputError(f"a full tiny checkpoint needs llm_features_dim {13 * TE_HIDDEN} (13 taps x {TE_HIDDEN})", path=root)
        g = torch.Generator().manual_seed(seed + 100)
        n_tokens = _write_tokenizer(root / "tokenizer", tokenizer_corpus)
        rows = TE_ROWS if not tokenizer_corpus else -(-n_tokens // 64) * 64
        _write_text_encoder(root / "text_encoder", g, rows)
        _write_vae(root / "vae", g)
    return root
