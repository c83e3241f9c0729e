"""Plain functions the tests share (pytest fixtures are in conftest.py): tiny random checkpoints of the three
models built by the oracle libraries, and the oracle's own forward.

Each model is built by the library the tests compare against, with every parameter overwritten from a seeded
generator (norm weights around 1, not 1; non-zero biases), so that dropped norms, wrong chunk orders, RoPE or tap
mistakes change the output visibly; the values a test compares with come from that in-memory oracle model. The
folders are written through ``gguf_dit.converter.tiny``'s writers (the one place checkpoints are written) where the
oracle cannot write the official layout itself, and by the oracle (``save_pretrained``) where it can.

* DiT: ``diffusers.Ideogram4Transformer2DModel``, written as ``ROOT/transformer`` (seed) and
  ``ROOT/unconditional_transformer`` (seed + 1) in the "official" (fused ``attention.qkv`` / ``attention.o``) or the
  "diffusers" layout (split ``to_q/to_k/to_v`` / ``to_out.0``), f32, bf16, f16 or fp8 (float8_e4m3fn weight +
  float32 per-row ``weight_scale``, everything else bf16, as the official ``ideogram-4-fp8`` repo), in one file or
  ``shards`` files with an index (docs/ideogram4-model.md §3, §4 and the appendix on tiny checkpoints).
* Text encoder: transformers' ``Qwen3VLForConditionalGeneration`` with every size tiny except the layer count (36, so
  the official 13 taps exist) and the rope theta (5e6, interleaved MRoPE), and a byte-level BPE tokenizer in the Qwen2
  format. The embedding has more rows than the tokenizer has tokens, as Qwen's does (151,936 vs 151,669).
* VAE: diffusers' ``AutoencoderKLFlux2``, saved by diffusers.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pathlib
import re

import numpy as np
import torch

from gguf_dit.converter.tiny import SPECIALS, latent_bn, official_fp8, official_names, save_folder, train_bpe

# -- DiT ---------------------------------------------------------------------------------------

# diffusers kwargs. head_dim and mrope_section are the real ones; everything else is tiny.
# Input dims: 128 (input_proj, Q8_0 only), 416 = 13*32 (llm_cond_proj, Q8_0 only),
# 512 (hidden, K-quant ok), 256 (adaLN, K-quant ok), 512 (intermediate -> w2, K-quant ok).
TINY_CONFIG: dict = {
    "in_channels": 128,
    "num_layers": 2,
    "attention_head_dim": 256,
    "num_attention_heads": 2,
    "intermediate_size": 512,
    "adaln_dim": 256,
    "llm_features_dim": 13 * 32,
    "rope_theta": 5_000_000,
    "mrope_section": (24, 20, 20),
    "norm_eps": 1e-5,
}

BACKBONES = ("transformer", "unconditional_transformer")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

_FUSED_RE = re.compile(r"^(layers\.\d+\.attention)\.(qkv|o)\.weight$")


def _model_cls():
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel


def _full_config(config: dict | None) -> dict:
    """Diffusers init kwargs: class defaults < TINY_CONFIG < config (keys starting with '_' dropped)."""
    sig = inspect.signature(_model_cls().__init__)
    cfg = {k: p.default for k, p in sig.parameters.items() if k != "self"}
    cfg.update(TINY_CONFIG)
    if config:
        cfg.update({k: v for k, v in dict(config).items() if not k.startswith("_")})
    cfg["mrope_section"] = tuple(cfg["mrope_section"])
    return cfg


@torch.no_grad()
def randomize_(model, seed: int) -> None:
    """Overwrite every parameter of ``model`` from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        shape = p.shape
        rnd = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith(("norm_q.weight", "norm_k.weight")):
            val = 1.3 + 0.2 * rnd  # sharper QK-norm: RoPE / position errors show up
        elif p.ndim == 1 and "norm" in name:
            val = 1.0 + 0.2 * rnd  # RMSNorm weights != 1
        elif name == "embed_image_indicator.weight":
            val = 0.5 * rnd
        elif p.ndim == 2:
            val = rnd / math.sqrt(shape[1])  # std 1/sqrt(fan_in)
        elif name.endswith(".bias"):
            val = 0.1 * rnd
        else:  # pragma: no cover - no such parameter in diffusers 0.42.1
            raise AssertionError(f"unhandled parameter {name} {tuple(shape)}")
        p.copy_(val.to(p.dtype))


def make_model(seed: int = 0, config: dict | None = None):
    """float32, eval(), every parameter randomized from ``seed``."""
    model = _model_cls()(**_full_config(config))  # float32 by default
    randomize_(model, seed)
    return model.eval()


def diffusers_state_dict(model) -> dict[str, torch.Tensor]:
    """model.state_dict() with diffusers (split) names, contiguous clones."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def official_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``official_names`` (float tensors only: qkv is split in thirds along rows)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _FUSED_RE.match(k)
        if m is None:
            out[k] = v
            continue
        prefix, which = m.groups()
        if which == "qkv":
            q, kk, vv = v.chunk(3, dim=0)
            out[f"{prefix}.to_q.weight"] = q.contiguous()
            out[f"{prefix}.to_k.weight"] = kk.contiguous()
            out[f"{prefix}.to_v.weight"] = vv.contiguous()
        else:
            out[f"{prefix}.to_out.0.weight"] = v
    return out


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """Fused official names, float32, contiguous clones."""
    sd = {k: v.float() for k, v in diffusers_state_dict(model).items()}
    return official_names(sd)


def dequantized_official(sd_fp8: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp8.float() * scale[:, None] in float32 for every ``X.weight`` with ``X.weight_scale``;
    other tensors upcast to float32; ``.weight_scale`` keys dropped. (Any layout.)"""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd_fp8.items():
        if k.endswith(".weight_scale"):
            continue
        s = sd_fp8.get(k + "_scale")
        if s is not None:
            s = s.float()
            out[k] = v.float() * (s[:, None] if s.ndim == 1 else s)
        else:
            out[k] = v.float()
    return out


def _config(config: dict | None) -> dict:
    import diffusers

    cfg = _full_config(config)
    cfg["mrope_section"] = list(cfg["mrope_section"])
    return {"_class_name": _model_cls().__name__, "_diffusers_version": diffusers.__version__, **dict(sorted(cfg.items()))}


def _split_shards(sd: dict[str, torch.Tensor], shards: int) -> list[list[str]]:
    """Contiguous key groups of roughly equal byte size, every group non-empty."""
    keys = list(sd)
    if not 1 <= shards <= len(keys):
        raise ValueError(f"shards must be in [1, {len(keys)}], got {shards}")
    sizes = [sd[k].numel() * sd[k].element_size() for k in keys]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for i, (k, n) in enumerate(zip(keys, sizes)):
        gi = min(shards - 1, int(acc * shards / total)) if total else 0
        # leave at least one key for each remaining group
        gi = max(gi, shards - (len(keys) - i))
        # never skip a group
        while gi > 0 and not groups[gi - 1]:
            gi -= 1
        groups[gi].append(k)
        acc += n
    assert all(groups), "empty shard"
    return groups


def save_backbone(dirpath, sd: dict[str, torch.Tensor], config: dict | None = None, shards: int = 1) -> pathlib.Path:
    """Write config.json + safetensors (single file, or ``shards`` files + index.json; names as diffusers') into ``dirpath``."""
    from diffusers.utils.constants import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    dirpath = save_folder(dirpath, None, _config(config))
    if shards == 1:
        return save_folder(dirpath, sd, None, SAFETENSORS_WEIGHTS_NAME)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(_split_shards(sd, shards), start=1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-{shards:05d}.safetensors"
        save_folder(dirpath, {k: sd[k] for k in group}, None, fname)
        weight_map.update({k: fname for k in group})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dirpath / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return dirpath


def make_checkpoint(
    root,
    *,
    dtype: str = "f32",
    layout: str = "official",
    shards: int = 1,
    seed: int = 0,
    config: dict | None = None,
) -> dict:
    """Write ROOT/transformer (seed) and ROOT/unconditional_transformer (seed + 1).

    Returns {"transformer": model_cond, "unconditional_transformer": model_uncond}: float32 diffusers
    models holding exactly the values that were saved, upcast (bf16/f16: rounded weights; fp8:
    fp8.float() * scale[row], other tensors bf16-rounded)."""
    if dtype not in (*DTYPES, "fp8"):
        raise ValueError(f"dtype must be one of f32, bf16, f16, fp8; got {dtype!r}")
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers'; got {layout!r}")
    root = pathlib.Path(root)
    models = {}
    for i, name in enumerate(BACKBONES):
        model = make_model(seed + i, config)
        sd = diffusers_state_dict(model)
        if layout == "official":
            sd = official_names(sd)
        if dtype == "fp8":
            stored = official_fp8(sd)
            values = dequantized_official(stored)
        else:
            stored = {k: v.to(DTYPES[dtype]).contiguous() for k, v in sd.items()}
            values = {k: v.float() for k, v in stored.items()}
        save_backbone(root / name, stored, config=config, shards=shards)
        if layout == "official":
            values = official_to_diffusers(values)
        model.load_state_dict(values, strict=True)
        models[name] = model.eval()
    return models


def load_backbone(dirpath) -> dict[str, torch.Tensor]:
    """Read every tensor of a backbone dir (single file or sharded via index.json)."""
    from diffusers.utils.constants import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    dirpath = pathlib.Path(dirpath)
    index = dirpath / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [SAFETENSORS_WEIGHTS_NAME]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(dirpath / f)))
    return out


def example_inputs(config: dict | None = None, *, n_text: int = 5, grid: tuple[int, int] = (2, 3), t: float = 0.7,
                   seed: int = 123) -> dict[str, torch.Tensor]:
    """Batch-1 conditional-style packed inputs (text tokens then image tokens) for the diffusers forward."""
    cfg = _full_config(config)
    gh, gw = grid
    n_img = gh * gw
    L = n_text + n_img
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, L, cfg["in_channels"], generator=g)
    feats = torch.randn(1, L, cfg["llm_features_dim"], generator=g)
    pos = torch.zeros(1, L, 3, dtype=torch.long)
    pos[0, :n_text, :] = torch.arange(n_text)[:, None]
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos[0, n_text:, 0] = 65536
    pos[0, n_text:, 1] = 65536 + yy.flatten()
    pos[0, n_text:, 2] = 65536 + xx.flatten()
    indicator = torch.full((1, L), 2, dtype=torch.long)
    indicator[0, :n_text] = 3
    hidden[0, :n_text] = 0.0  # "text_z_padding"
    feats[0, n_text:] = 0.0
    return {
        "hidden_states": hidden,
        "timestep": torch.tensor([t]),
        "encoder_hidden_states": feats,
        "position_ids": pos,
        "segment_ids": torch.ones(1, L, dtype=torch.long),
        "indicator": indicator,
    }


def reference_velocity(model, x: np.ndarray, t: float, feats: np.ndarray | None, grid) -> np.ndarray:
    """diffusers forward on the packed sequence diffusers' own pipeline builds (``Ideogram4Pipeline._prepare_ids``:
    text tokens first, then the image grid at its IMAGE_POSITION_OFFSET), so positions come from the oracle."""
    from diffusers import Ideogram4Pipeline

    gh, gw = grid
    n_img = gh * gw
    n_text = 0 if feats is None else feats.shape[0]
    L = n_text + n_img
    pos, seg, ind = Ideogram4Pipeline._prepare_ids([n_text], gh, gw, n_text, torch.device("cpu"))
    hs = torch.zeros(1, L, 128)
    hs[0, n_text:] = torch.from_numpy(x)
    enc = torch.zeros(1, L, model.config.llm_features_dim)
    if n_text:
        enc[0, :n_text] = torch.from_numpy(feats)
    with torch.no_grad():
        out = model(
            hidden_states=hs,
            timestep=torch.tensor([t], dtype=torch.float32),
            encoder_hidden_states=enc,
            position_ids=pos,
            segment_ids=seg,
            indicator=ind,
        ).sample
    return out[0, n_text:].numpy()


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


#: ggml's CUDA backend computes F32 matrix products in TF32 (its cuBLAS handles are put in
#: CUBLAS_TF32_TENSOR_OP_MATH, ggml-cuda/common.cuh, and no option takes them out: GGML_CUDA_CUBLAS_COMPUTE_TYPE=f32
#: still runs under that math mode) and flash attention with K and V in F16: 10-bit mantissas, unit roundoff
#: 2^-11 = 4.9e-4 against float32's 6.0e-8. Its tolerances are its own, set from what an H200 showed
#: (docs/benchmarks.md, "GPU").
TF32_UNIT_ROUNDOFF = 2.0**-11


def check_err(err: float, tol: float, what: str = "") -> None:
    """``assert err <= tol``; where GGUF_DIT_ERR_LOG names a file, the test, ``what``, the error and the tolerance are
    appended to it first. benchmarks/gpu_check.sh sets it: a device run brings back every error it saw, the passing
    ones too, which is what the CUDA tolerances are set from."""
    log = os.environ.get("GGUF_DIT_ERR_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a") as f:
            f.write(f"{test}\t{what}\t{err:.3e}\t{tol:.1e}\n")
    assert err <= tol, f"{what}: error {err:.2e} > {tol:.1e}"


# -- text encoder ------------------------------------------------------------------------------

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


def make_tokenizer(tok_dir: pathlib.Path):
    """Train a byte-level BPE with the Qwen2 pre-tokenizer (its regex as transformers spells it) and save it as a
    Qwen2Tokenizer."""
    from tokenizers import AddedToken, decoders
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = train_bpe(_CORPUS * 4, BPE_VOCAB, split=PRETOKENIZE_REGEX)
    tok.decoder = decoders.ByteLevel()
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
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.utils import SAFE_WEIGHTS_NAME

    root = pathlib.Path(root)
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
    cfg.save_pretrained(str(te_dir))
    save_folder(te_dir, {k: v.detach() for k, v in model.state_dict().items()}, None, SAFE_WEIGHTS_NAME)
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


# -- VAE ---------------------------------------------------------------------------------------

TINY_VAE_CONFIG = dict(
    block_out_channels=(16, 32, 32, 48),  # reversed in the decoder: 48 -> 32 -> 32 -> 16 (two conv_shortcuts)
    layers_per_block=1,  # decoder: 2 ResNets per up block
    norm_num_groups=8,  # not 32, so a hard-coded group count would show
    latent_channels=32,
)


def make_tiny_vae(path, seed: int = 0, **overrides):
    """Write a tiny random ``AutoencoderKLFlux2`` in diffusers layout (config.json +
    diffusion_pytorch_model.safetensors) to ``path`` (the ``vae/`` folder itself) and return the model (eval, f32).

    Every parameter is drawn from a seeded generator (norm weights around 1, not 1; biases non-zero; conv and
    linear weights ~ N(0, 1/fan_in)). ``bn.running_mean = LATENT_SHIFT`` and ``bn.running_var = LATENT_SCALE**2 -
    batch_norm_eps``, so diffusers' pipeline de-normalisation equals the official constants.
    """
    from diffusers import AutoencoderKLFlux2

    cfg = {**TINY_VAE_CONFIG, **overrides}
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("norm" in name and name.endswith(".weight")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / float(p[0].numel()) ** 0.5)
        for k, buf in latent_bn(model.config.batch_norm_eps).items():
            model.get_buffer(k).copy_(buf)
    model.eval()
    pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    return model


# -- backends ----------------------------------------------------------------------------------


def backend_names():
    """The ggml backends this machine has (for parametrizing)."""
    from gguf_dit import ggml_ops

    return ggml_ops.available()
