"""Train the 128×128 demo model (issue 13) from a seed, on CPU, as an official HF checkpoint.

    python scripts/train_demo128.py --root /tmp/demo128_ckpt --work /tmp/demo128_work --convert-to /tmp/demo128

The defaults are the recipe of the shipped demo model (docs/demo.md); ``--root`` is its float checkpoint, written in
bfloat16 (the shipped one: checkpoints/demo/). Measured: 2 h 12 min on a 2-core AMD EPYC Zen 4 (AVX512_BF16, bfloat16
autocast, ``--compile``, four states per trajectory in the canon rounds; the stage table in docs/demo.md; 2 h 48 min
eager with one); about 3 h 16 min on a 2-core AVX2-only Zen 3, which trains in float32 (``--precision``; scaled by
stage from a tenth-size run, docs/demo.md). Needs the test extras (diffusers, transformers). Two faster options, off
by default (``--compile-encoder``, ``--finish-states-per-trajectory 4``): one uninterrupted run with both took 2 h 06
min 36 s on the same Zen 4 but scored 86.9 %, below issue 13's bar (docs/demo.md, run q); ``--no-length-groups`` runs
each conditional DiT batch as one, padded to its longest caption: the first phase about 1.1× faster on that Zen 4; the
one whole run with it, on a 2-core AMX Xeon, took 1 h 20 min but scored 82.5 % (docs/demo.md, run r2), so it is off by
default.

The world (``gguf_dit/demo/scene.py``) and its captions (``gguf_dit/demo/captions.py``): one or two coloured shapes,
nine places, two sizes, four backgrounds, and many ways to ask for them; a fixed split holds sentence patterns,
synonyms and attribute combinations out of everything the image model sees.

Stages, each cached under --work (delete a file to redo its stage):
1. skeleton: ``converter/tiny.py`` writes the full tiny checkpoint; the tokenizer's BPE merges are learned on
   the language corpus (below) and the training captions.
2. language: the 36-layer Qwen3-VL-layout text encoder learns words, as a real LLM knows words an image model
   never saw captioned. On the language corpus only (``language_pairs``: ``captions.py``'s "language" part, kept
   sentence patterns, *every* synonym, every combination, plain text; never an image), two losses on its 13 tapped layer outputs: a small reader predicts the scene
   (per object: shape, colour, place, size; the background) from them, and for a "minimal pair" (the same caption
   with one synonym swapped for another of the same value, e.g. "crimson" for "red") the features of every token
   after the swap, and the mean over the swapped span, must match. The reader is discarded. Then (2b, ``place``)
   more steps with a place reader instead (``PlaceReader``: one query per place, one head, the question an image
   token asks). Each of the two stops the run (exit code 2) if its reader reads under ``--min-encoder-right`` of
   its last training batches right (``converged``): an encoder that has not learned its training captions would
   waste the hour of DiT stages after it. Converted with the real CLI; every training caption is then encoded once with the runtime's ``TextEncoder``, so the DiT trains
   on exactly the features the runtime gives it.
3. vae: a FLUX.2-architecture autoencoder (diffusers ``AutoencoderKLFlux2``, channels 8/16/32/32, 32 latent
   channels, ×8 down) trained on whole scenes, three quarters of the steps at half size and the rest at 128×128 (not
   on crops: a crop-trained one failed on the full picture, reconstruction MSE 0.33 against 0.05 on crops); an exact per-channel affine is then folded into ``quant_conv`` / ``post_quant_conv`` so that the Ideogram 4
   latent normalisation (``latent_norm``) maps the data set's latents to zero mean / unit variance. The share of
   rendered small squares and triangles it gives back readable (``roundtrip_shapes``) is logged: it varies by seed
   and bounds the DiT's shape score, so ``--stop-after vae`` shows it before the hour of DiT stages.
4. dit: the conditional backbone on ``captions.pairs("train")`` (text tokens then image tokens, the official packed
   sequence), diffusers ``Ideogram4Transformer2DModel`` in float32, official flow matching: x_t = t·x1 + (1 − t)·ε
   (t = 0 is noise), target v = x1 − ε, t logit-normal, a tenth of the captions deliberately wrong (``--caption-noise``); a second
   phase on the sampler's own t. Then the unconditional backbone (image tokens only): a copy of the conditional
   one trained on image-only samples, so that the two make the same errors where the caption no longer matters.
   Saved weights are exponential moving averages. The matmuls run under bfloat16 autocast where the CPU has
   bfloat16 natively, in float32 elsewhere (``--precision``, ``native_bf16``). The
   tokens an object covers weigh 10× in the loss (``--object-weight``), and a probe on the first block's image tokens
   that must name each token's place (``--where-weight``) is trained with the first phase and dropped. Then three
   rounds of ``stage_guided``: both backbones learn the states the preset's own guidance puts them in; then
   ``stage_finish``: the conditional backbone learns the states of its whole trajectory; last, ``stage_agree``: the
   image-only backbone learns the conditional one's prediction where t >= 0.3, so the preset's guidance acts where
   the picture is made and no longer multiplies the two backbones' estimation errors after. A sampler state has no
   picture of its own: each is pulled to the layout of its caption's scene nearest to where it is heading
   (``matched_pictures``, ``--match``), not to a training picture drawn at random, whose mean is a blob.
   (``stage_own``, before the guided rounds, is off by default: ``--own-steps``.) Last, four rounds of
   ``stage_canon``: every state of the trajectory and every sample of a caption is pulled to one picture, the
   caption's scene at its nominal places and sizes, so that the mean the loss rewards at small t is a shape and
   not the blur of the jittered training pictures; each sampler trajectory gives four of a round's states, at
   distinct steps (``--canon-states-per-trajectory``). ``--dit-seed N`` draws these stages from another seed than
   the rest of the run (the encoder, captions, autoencoder, latents and decoder stay ``--seed``'s): a redraw of the
   hour of DiT stages on an encoder and autoencoder already known to be good. Its files go to ``--work``'s
   ``dit_seed<N>/`` (``dit_work``), so the stages before it stay cached and ``--seed``'s own DiT files are untouched.
5. decoder: the VAE decoder is fine-tuned on full 128×128 pictures of every attribute combination with the encoder
   frozen (same latent space; ``image_scenes``).
6. save: ``text_encoder/``, ``transformer/``, ``unconditional_transformer/`` and ``vae/`` in the official layout, bfloat16;
   with ``--convert-to``, the ``CONVERT`` commands below (the real ``gguf-dit convert``).

Deterministic: fixed seeds, ``torch.use_deterministic_algorithms``, single process, a fixed thread count.
``--compile`` (the default) runs the DiT's layers through ``torch.compile`` (``compiled``): the DiT stages 1.29×
faster on the Zen 4 (2 h 19 min for the whole recipe against 2 h 48 min; docs/demo.md, "The whole recipe compiled").
Compiled code rounds differently, so ``--no-compile`` trains a different model from the same seed (the eager one,
shipped until 5 December 2026, scored 91.7 %; compiled, 90.5 % with one state per canon trajectory and 91.9 % with
four, the shipped one); each is deterministic on one machine.

Carried over: a run goes on from the furthest DiT stage whose two backbones are in --work (``dit_plan``,
``continue_point``), skipping every DiT stage before it; with ``place.pt`` there the language stage is skipped too.
So ``place.pt``, ``vae.pt`` and the two backbones of a later stage, copied into an empty --work, continue a run on
another machine (caption features, latents and the checkpoint's encoder are recomputed from them) and give the
bytes the unbroken run would (a test; docs/demo.md, "A run carried over"; the shipped model was made that way).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gguf_dit.demo import captions as C, scene as S

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo  # noqa: E402  (the 64×64 recipe: its configs and shared pieces)
from train_demo import dit_forward as padded_forward, dit_step, ema_state, flow_sampling, fold_latent_norm, log, save, to_tensor, to_uint8  # noqa: E402

# One head of 256: the converter refuses other head widths (the official RoPE slot map and attention scale are for
# 256), so more heads would mean a wider model (2 x 256 = 512).
DIT_CONFIG = {**train_demo.DIT_CONFIG, "intermediate_size": 768}
# 2 norm groups: with 8 (one channel per group at the first level) the decoder's last GroupNorm removes each picture's
# mean colour, and with four backgrounds the objects came out grey (docs/demo.md)
VAE_CONFIG = {**train_demo.VAE_CONFIG, "norm_num_groups": 2}
TE_TYPE = train_demo.TE_TYPE


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 in hardware (the ``avx512_bf16`` or ``amx_bf16`` flag; ``bf16`` on Arm),
    read from ``/proc/cpuinfo`` (elsewhere: False). With it, bfloat16 autocast made one DiT training step (batch
    32) 3x faster than float32 (AMD EPYC Zen 5: 0.24 against 0.78 s); without it PyTorch emulates bfloat16 and
    the same step took 18.8 s against 0.66 s in float32 (AMD EPYC Zen 3, AVX2 only; docs/demo.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


# This process's DiT matmul precision (main() sets it from --precision): bfloat16 autocast only where the CPU
# has it natively. The two precisions train different (each deterministic) models.
BF16 = native_bf16()
#: stage_dit's resume_every default; --resume-every sets it.
RESUME_EVERY = 200
#: --compile: the DiT's layers through torch.compile (``compiled``).
COMPILE = False
#: --compile-encoder: the text encoder's training forward through torch.compile, whole, at one length (``train_encoder``).
COMPILE_TE = False
#: --length-groups: the DiT's conditional forwards split by caption length (``forward_groups``); off, one padded batch.
LENGTH_GROUPS = True


def compiled(model):
    """The DiT ``model`` with each of its ``layers``' forward compiled by ``torch.compile`` (inductor, dynamic shapes)
    when ``COMPILE``, else as it is. Layer by layer, so that the "where" probe's hook on the first block runs outside
    the compiled code: a hook appending to a list inside it makes dynamo guard on the list's length and recompile
    past its limit (docs/benchmarks.md). Compiled code rounds differently from eager code, so the two train
    different (each deterministic) models. The text encoder is not compiled here: layer by layer, its language step
    took 0.40 s as eager did (36 layers of hidden 32 at varying caption lengths; docs/benchmarks.md); whole, at one
    length, it gains (``COMPILE_TE``, ``train_encoder``)."""
    if COMPILE:
        # train and eval mode, with and without gradients, single-sample groups: more variants than dynamo's default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for layer in model.layers:
            if "forward" not in vars(layer):
                layer.forward = torch.compile(layer.forward, dynamic=True)
    return model


def low_precision(enabled: bool | None = None):
    """bfloat16 autocast when ``enabled`` (None: ``BF16``), float32 otherwise."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16 if enabled is None else enabled)


SIZE = S.SIZE
GROUP_COST = 128  # a forward's fixed cost, in padded tokens, for length_groups (benchmarks/train_step_groups.py)


def length_groups(n_text: list[int], n_img: int, cost: int = GROUP_COST) -> list[list[int]]:
    """Split a batch into runs of similar caption length, the split that minimises the tokens computed (each group is
    padded to its longest caption) plus ``cost`` per group. ``stage_dit`` draws a batch from one caption form, but
    JSON captions alone run 60–153 tokens (plain text 32–57): batches of 32 padded as one carried 79 text tokens per
    sample where 54 were real (benchmarks/train_step_groups.py), through every matmul and, squared, in attention."""
    order = sorted(range(len(n_text)), key=lambda i: (n_text[i], i))
    m = [n_text[i] + n_img for i in order]
    best, cut = [0] + [None] * len(m), [0] * (len(m) + 1)
    for j in range(1, len(m) + 1):  # best[j]: the cheapest split of the j shortest
        best[j], cut[j] = min((best[i] + (j - i) * m[j - 1] + cost, i) for i in range(j))
    groups, j = [], len(m)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def forward_groups(batch: int, feats, n_img: int, cost: int | None = None) -> list[list[int]]:
    """The groups ``dit_forward`` runs a batch in, in its order of forwards (one group: the batch as it is; always,
    without ``LENGTH_GROUPS``)."""
    if feats is None or batch < 2 or not LENGTH_GROUPS:
        return [list(range(batch))]
    return length_groups([f.shape[0] for f in feats], n_img, GROUP_COST if cost is None else cost)


def dit_forward(model, x, t, feats, grid, cost: int | None = None):
    """``train_demo.dit_forward`` on each of ``forward_groups``: the same outputs, in the batch's order (up to float
    rounding: each group is padded to its own length), for fewer tokens."""
    groups = forward_groups(len(x), feats, x.shape[1], cost)
    if len(groups) == 1:
        return padded_forward(model, x, t, feats, grid)
    outs = [padded_forward(model, x[gr], t[gr], [feats[i] for i in gr], grid) for gr in groups]
    order = torch.tensor([i for gr in groups for i in gr])
    return torch.cat(outs)[torch.argsort(order)]


# -- data ---------------------------------------------------------------------------------------
def train_pairs(n: int, seed: int) -> list[tuple[str | dict, S.Scene]]:
    return C.pairs("train", n, seed)


def image_scenes(n: int, seed: int) -> list[S.Scene]:
    """n scenes of every combination, for the decoder's fine-tune. The autoencoder never sees a caption, and like a
    real one (FLUX.2's has seen every colour on every colour) it must draw any picture: fine-tuned on the training
    captions' scenes only, it had never drawn a blue object on yellow or a white one on purple (the split's held-out
    colour/background pairs) and drew half of those objects' colours wrong after a round trip (docs/demo.md). The
    encoder, hence the latent space the DiT learns, stays on the training scenes, and the DiT, which reads the
    captions, never sees a held-out combination."""
    return [s for _, s in C.pairs("language", n, seed + 99)]


def render_all(scenes, per_scene: int, seed: int) -> np.ndarray:
    """(len(scenes)*per_scene, SIZE, SIZE, 3) uint8: each scene drawn per_scene times with training jitter."""
    rng = np.random.default_rng(seed)
    return np.stack([S.render(s, rng) for s in scenes for _ in range(per_scene)])


class _SwapWriter(C._Writer):
    """A caption writer that replaces its ``swap_at``-th word choice with another synonym of the same value,
    consuming the same random draws, so the caption is otherwise identical (a minimal pair). Except in one case: when
    the swapped phrase is the last place phrase and its ending decides whether "of a ... background" may follow it
    ("on the left side of a white background"), the background phrase can change too (measured: 5 of 2000 pairs;
    the invariance loss then compares the tokens after the last difference and the mean over everything between)."""

    def __init__(self, split, part, rng, swap_at: int = -1, alt: np.random.Generator | None = None):
        super().__init__(split, part, rng)
        self.n, self.swap_at, self.alt = 0, swap_at, alt

    def word(self, table: dict, key: str) -> str:
        w = super().word(table, key)
        if self.n == self.swap_at:
            others = [x for x in table[key] if x != w]
            w = others[int(self.alt.integers(len(others)))]
        self.n += 1
        return w


def language_pairs(n: int, seed: int, json_share: float = 0.0):
    """n (caption, its minimal-pair twin, scene) triples from the language corpus (``captions.py``). Plain text only
    by default: run wraps it as a JSON caption's ``high_level_description``, so its tokens are exactly the first part
    of a JSON caption (the encoder is causal), at a third of a JSON caption's length."""
    rng = np.random.default_rng([13, C.SPLIT.seed, seed, 7])
    alt = np.random.default_rng([13, seed, 8])
    out = []
    while len(out) < n:
        scene, bg_named = C._scene(C.SPLIT, "language", rng)
        as_json = rng.random() < json_share
        state = rng.bit_generator.state
        w = _SwapWriter(C.SPLIT, "language", rng)
        cap = w.json(scene, bg_named) if as_json else w.plain(scene, bg_named)
        rng.bit_generator.state = state
        w2 = _SwapWriter(C.SPLIT, "language", rng, swap_at=int(alt.integers(w.n)), alt=alt)
        twin = w2.json(scene, bg_named) if as_json else w2.plain(scene, bg_named)
        out.append((cap, twin, scene))
    return out


# -- 1. skeleton --------------------------------------------------------------------------------
def stage_skeleton(root: Path, work: Path, lang, train) -> None:
    from gguf_dit.converter.tiny import write_tiny_checkpoint

    if (work / "skeleton.done").exists():
        if not (root / "text_encoder" / "config.json").exists():
            # the cached stages write their weights into the skeleton's folders; they cannot make them (tokenizer, configs)
            print(f"error: {root}: no checkpoint skeleton (text_encoder/config.json), but {work / 'skeleton.done'} says one was "
                  f"written; use the --root that --work was made with, or a copy of it", file=sys.stderr)
            raise SystemExit(2)
        return
    corpus = [C.encoder_string(c) for c, *_ in lang] + [C.encoder_string(c) for c, _ in train] + ["user\n", "assistant\n"] * 2
    write_tiny_checkpoint(root, force=True, tokenizer_corpus=corpus)
    (work / "skeleton.done").write_text("")


def convert_te(root: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "gguf_dit.cli", "convert", str(root), "-o", str(out), "--parts", "text_encoder",
                    "--te-type", TE_TYPE, "-q", "--force"], check=True)
    return out / "text_encoder.gguf"


# -- 2. language --------------------------------------------------------------------------------
def te_model(root: Path):
    """The checkpoint's text encoder as transformers' ``Qwen3VLTextModel`` (float32)."""
    from safetensors.torch import load_file
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    from gguf_dit.converter.text_encoder import WEIGHTS_NAME

    cfg = json.loads((root / "text_encoder" / "config.json").read_text())["text_config"]
    model = Qwen3VLTextModel(Qwen3VLTextConfig(**cfg))
    p = "model.language_model."
    sd = load_file(str(root / "text_encoder" / WEIGHTS_NAME))
    model.load_state_dict({k[len(p):]: v.float() for k, v in sd.items() if k.startswith(p)})
    return model


def te_features(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids -> (B, T, hidden × 13): the runtime's tapped layer outputs (the last one before the final
    norm), as ``runtime/text_encoder.py`` reads them from llama.cpp. Right padding is harmless: causal attention."""
    from gguf_dit.arch.text_encoder import default_taps

    n = len(model.layers)
    cap = {}
    h = model.layers[-1].register_forward_hook(lambda m, i, o: cap.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    try:
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        h.remove()
    return torch.cat([cap["last"] if i == n - 1 else hs[i + 1] for i in default_taps(n)], dim=-1)


class Reader(torch.nn.Module):
    """Scene attributes from token features: three attention-pooling slots (first object, second object,
    background). Used to teach the encoder (stage 2) and to probe it; never shipped."""

    HEADS = {"shape": len(S.SHAPES), "colour": len(S.COLOURS), "position": len(S.POSITIONS), "size": len(S.SIZES) + 1, "present": 2}

    def __init__(self, dim: int = 416, width: int = 128):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.key = torch.nn.Linear(dim, 64)
        self.query = torch.nn.Parameter(0.1 * torch.randn(3, 2, 64))
        self.value = torch.nn.Linear(dim, width)
        self.obj = torch.nn.Sequential(torch.nn.Linear(2 * width, width), torch.nn.SiLU(), torch.nn.Linear(width, sum(self.HEADS.values())))
        self.bg = torch.nn.Sequential(torch.nn.Linear(2 * width, width), torch.nn.SiLU(), torch.nn.Linear(width, len(S.BACKGROUNDS)))

    def forward(self, feats: torch.Tensor, valid: torch.Tensor):
        x = self.norm(feats)
        att = torch.einsum("btk,shk->bsht", self.key(x), self.query).masked_fill(~valid[:, None, None], -1e9).softmax(-1)
        pooled = torch.einsum("bsht,btw->bshw", att, self.value(x)).flatten(2)  # (B, 3 slots, 2·width)
        return self.obj(pooled[:, :2]), self.bg(pooled[:, 2])


class PlaceReader(torch.nn.Module):
    """The question an image token asks, asked the DiT's way: one attention query per place (and one for the
    background), a single head over the normalised features, and from what it pools: is an object here, and its
    shape, colour and size. Teaches the encoder to put each object's attributes where a place can find them (the slot
    reader above reads objects in caption order, which an image token cannot know). Never shipped."""

    OUT = {"present": 2, "shape": len(S.SHAPES), "colour": len(S.COLOURS), "size": len(S.SIZES) + 1}

    def __init__(self, dim: int = 416, key: int = 64, width: int = 128, sink: bool = False):
        super().__init__()
        self.norm = torch.nn.RMSNorm(dim)
        self.key = torch.nn.Linear(dim, key)
        self.query = torch.nn.Parameter(0.1 * torch.randn(len(S.POSITIONS) + 1, key))
        self.value = torch.nn.Linear(dim, width)
        self.head = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, sum(self.OUT.values())))
        self.bg = torch.nn.Linear(width, len(S.BACKGROUNDS))
        # --place-sink: one learned key and value besides the caption's tokens, somewhere for a place's query to look
        # when no object is there, as an image token can look at the image. Without it "nothing here" must be read
        # from a blend of the caption's tokens; from one language-stage encoder (--language-lr 1e-3, seed 0) presence
        # stayed at its base rate for the whole stage while every attribute was learned (docs/demo.md).
        self.sink = torch.nn.Parameter(torch.zeros(2, max(key, width))) if sink else None

    def forward(self, feats: torch.Tensor, valid: torch.Tensor):
        x = self.norm(feats)
        k, v = self.key(x), self.value(x)
        if self.sink is not None:
            b = len(x)
            k = torch.cat([k, self.sink[0, :k.shape[-1]].expand(b, 1, -1)], 1)
            v = torch.cat([v, self.sink[1, :v.shape[-1]].expand(b, 1, -1)], 1)
            valid = torch.cat([valid, valid.new_ones(b, 1)], 1)
        att = (torch.einsum("btk,pk->bpt", k, self.query) / 8.0).masked_fill(~valid[:, None], -1e9).softmax(-1)
        pooled = torch.einsum("bpt,btw->bpw", att, v)
        return self.head(pooled[:, :-1]), self.bg(pooled[:, -1])


def place_labels(scenes) -> torch.Tensor:
    """(B, 9, 4): per place, present (0/1), shape, colour, size (2 = unnamed); attributes 0 where absent."""
    out = torch.zeros(len(scenes), len(S.POSITIONS), 4, dtype=torch.long)
    places = list(S.POSITIONS)
    for i, s in enumerate(scenes):
        for o in s.objects:
            out[i, places.index(o.position)] = torch.tensor([1, S.SHAPES.index(o.shape), list(S.COLOURS).index(o.colour),
                                                             list(S.SIZES).index(o.size) if o.size else len(S.SIZES)])
    return out


def place_loss(reader, feats, valid, labels, bg) -> tuple[torch.Tensor, float]:
    """Cross-entropy of every place's presence and, where an object is, its attributes; plus the background. Also
    the share of places read entirely right (presence and, where present, every attribute)."""
    lo, lb = reader(feats, valid)
    present = labels[..., 0] == 1
    losses, start, ok = [], 0, torch.ones_like(present)
    for k, (name, n) in enumerate(PlaceReader.OUT.items()):
        logits = lo[..., start:start + n]
        start += n
        mask = present if k else torch.ones_like(present)
        losses.append(F.cross_entropy(logits[mask], labels[..., k][mask]))
        ok &= (logits.argmax(-1) == labels[..., k]) | ~mask
    losses.append(F.cross_entropy(lb, bg))
    return sum(losses), ok.float().mean().item()


def scene_labels(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, 5) object labels (shape, colour, position, size (2 = unnamed), present) and (B,) background."""
    obj = torch.zeros(len(scenes), 2, 5, dtype=torch.long)
    for i, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            obj[i, j] = torch.tensor([S.SHAPES.index(o.shape), list(S.COLOURS).index(o.colour), list(S.POSITIONS).index(o.position),
                                      list(S.SIZES).index(o.size) if o.size else len(S.SIZES), 1])
    return obj, torch.tensor([list(S.BACKGROUNDS).index(s.background) for s in scenes])


def reader_loss(reader, feats, valid, obj, bg, *, per_head: bool = False):
    lo, lb = reader(feats, valid)
    present = obj[:, :, 4] == 1
    losses, right = [], {}
    start = 0
    for k, (name, n) in enumerate(Reader.HEADS.items()):
        logits = lo[..., start:start + n]
        start += n
        mask = present if name != "present" else torch.ones_like(present)
        losses.append(F.cross_entropy(logits[mask], obj[..., k][mask]))
        right[name] = (logits.argmax(-1) == obj[..., k])[mask].float().mean().item()
    losses.append(F.cross_entropy(lb, bg))
    right["background"] = (lb.argmax(-1) == bg).float().mean().item()
    return (sum(losses), right) if per_head else sum(losses)


def pad(seqs: list[list[int]], fill: int, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (to the longest sequence, or to ``length`` if longer) and the mask of real tokens."""
    L = max(max(map(len, seqs)), length)
    ids = torch.full((len(seqs), L), fill, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, torch.arange(L)[None] < torch.tensor([len(s) for s in seqs])[:, None]


def common_ends(a: list, b: list) -> tuple[int, int]:
    """Lengths of the common prefix and of the common suffix (not overlapping it) of two sequences."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    return p, s


def invariance_loss(fa: torch.Tensor, fb: torch.Tensor, ta: list[list[int]], tb: list[list[int]]) -> torch.Tensor:
    """Mean squared difference of a minimal pair's features, relative to their mean square: every token after the
    swapped span (position by position from the end) and the mean over the span."""
    terms = []
    for i, (a, b) in enumerate(zip(ta, tb)):
        p, s = common_ends(a, b)
        if p == len(a) == len(b):
            continue
        xa = torch.cat([fa[i, len(a) - s:len(a)], fa[i, p:len(a) - s].mean(0, keepdim=True)]) if len(a) - s > p else fa[i, len(a) - s:len(a)]
        xb = torch.cat([fb[i, len(b) - s:len(b)], fb[i, p:len(b) - s].mean(0, keepdim=True)]) if len(b) - s > p else fb[i, len(b) - s:len(b)]
        if xa.shape != xb.shape:  # one side's span is empty (a synonym that tokenizes to nothing new): compare the suffix only
            xa, xb = fa[i, len(a) - s:len(a)], fb[i, len(b) - s:len(b)]
        terms.append(((xa - xb) ** 2).mean() / ((xa ** 2).mean() + (xb ** 2).mean()).detach().clamp_min(1e-6) * 2)
    return torch.stack(terms).mean()


def tokenized_pairs(root: Path, out: Path, lang) -> tuple[list, int]:
    """Token ids of every (caption, twin) of the language corpus by the checkpoint's tokenizer, and the padding id."""
    from gguf_dit.runtime.text_encoder import TextEncoder

    enc = TextEncoder.load(convert_te(root, out))  # the tokenizer is the skeleton's; the weights do not matter here
    try:
        toks = [(enc.tokenize(C.encoder_string(a)), enc.tokenize(C.encoder_string(b))) for a, b, _ in lang]
    finally:
        enc.close()
    return toks, toks[0][0][-1]


def train_encoder(model, reader, read, toks, fill, steps: int, lr: float, pct_start: float, g, batch: int, name: str) -> tuple[dict, float]:
    """Encoder + reader steps on the language corpus: ``read(reader, feats, valid, idx)`` -> (loss, share right),
    plus 4 × the minimal pairs' invariance. Returns the encoder's state dict and the share read right at the last
    step, smoothed over the last batches as logged (``converged`` judges it).

    With ``COMPILE_TE`` the forward (``te_features``) runs through ``torch.compile`` whole, every batch padded to the
    corpus's longest caption so that one compilation serves every step: 36 tiny layers are thousands of kernel
    launches a step eagerly (0.369 against 0.292 s a step on the Zen 4, after about 90 s of compilation;
    docs/benchmarks.md). Right padding changes no feature (causal attention) and the readers and the invariance
    read valid tokens only, so it computes the same losses; compiled code rounds differently, another model. And not
    the same model twice: on a 2-core AMD EPYC Zen 3 (AVX2) three runs of a few steps each gave three different
    encoders (the eager forward and the compiled DiT layers gave the same bytes every time), so the option is for
    timing experiments, never for a model to ship. Where: inductor's own C++ kernels on two threads give one of
    several outputs, nearly always the same within a process and not between processes, from the same generated
    code; ``backend="aot_eager"`` and ``options={"cpp.threads": 1}`` each agreed in six processes (docs/demo.md, run
    q1, with the candidate fix and why it is not in yet)."""
    params = list(model.parameters()) + list(reader.parameters())
    length = max(len(t) for pair in toks for t in pair) if COMPILE_TE else 0
    features = torch.compile(te_features, dynamic=False) if COMPILE_TE else te_features
    if COMPILE_TE:
        log(f"{name}: the encoder's forward compiled whole, every batch padded to {length} tokens; NOT deterministic "
            f"(three runs, three encoders on an AMD EPYC Zen 3): for timing experiments only")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=pct_start)
    t0, smooth = time.time(), None
    for step in range(steps):
        idx = torch.randint(0, len(toks), (batch,), generator=g).tolist()
        ta, tb = [toks[i][0] for i in idx], [toks[i][1] for i in idx]
        ids, valid = pad(ta + tb, fill, length)
        f = features(model, ids)
        ce, right = read(reader, f, valid, idx + idx)
        inv = invariance_loss(f[:batch], f[batch:], ta, tb)
        loss = ce + 4.0 * inv
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        cur = np.array([ce.item(), inv.item(), right])
        smooth = cur if smooth is None else 0.95 * smooth + 0.05 * cur
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} step {step} reader {smooth[0]:.3f} invariance {smooth[1]:.4f} right {smooth[2]:.3f} ({time.time() - t0:.0f} s)")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, float(smooth[2])


#: --min-encoder-right: the share of its training batches an encoder stage's reader must read right at the last step
#: (smoothed, as logged) for the DiT stages to go on. Seed 0 ends its language stage at 1.000 and its place stage at
#: 0.994; seed 1's language stage ended at 0.845 and its encoder read held-out shapes at 55-68 % (docs/demo.md), a
#: DiT trained on it would fail the gate an hour later.
MIN_ENCODER_RIGHT = 0.98


def converged(work: Path, name: str, right: float | None = None) -> None:
    """Record an encoder stage's final share right in ``<name>.json`` (or read it back for a stage cached on disk)
    and stop the run, exit code 2, if it is under ``MIN_ENCODER_RIGHT``: its weights stay in --work to inspect."""
    record = work / f"{name}.json"
    if right is not None:
        record.write_text(json.dumps({"right": right}))
    elif record.exists():
        right = json.loads(record.read_text())["right"]
    else:
        return log(f"{name}: cached without its final share right (an older run); not checked")
    if right < MIN_ENCODER_RIGHT:
        print(f"error: {work / (name + '.pt')}: the {name} stage did not converge: its reader read {right:.3f} of its last "
              f"training batches right, under --min-encoder-right {MIN_ENCODER_RIGHT}; delete it and try --language-lr 1e-3 "
              f"--place-steps 1600 --place-sink, or another --seed (docs/demo.md, \"An encoder schedule for more seeds\")", file=sys.stderr)
        raise SystemExit(2)


def stage_language(root: Path, work: Path, lang, steps: int, seed: int, batch: int = 32, lr: float = 3e-3) -> None:
    """Teach the encoder words on the language corpus (see the module docstring); write it back into root."""
    done = work / "language.pt"
    if not done.exists() and (work / "place.pt").exists():
        return  # the place stage continues this one's weights and is on disk: it writes the encoder (stage_place)
    if done.exists():
        sd = torch.load(done)
        converged(work, "language")
    else:
        toks, fill = tokenized_pairs(root, work / "te_random", lang)
        obj, bg = scene_labels([s for *_, s in lang])
        torch.manual_seed(seed + 20)
        model = te_model(root).train()

        def read(reader, f, valid, idx):
            ce, right = reader_loss(reader, f, valid, obj[idx], bg[idx], per_head=True)
            return ce, float(np.mean(list(right.values())))

        sd, right = train_encoder(model, Reader(), read, toks, fill, steps, lr, 0.05, torch.Generator().manual_seed(seed + 21), batch, "language")
        torch.save(sd, done)
        converged(work, "language", right)
    write_te(root, sd)


def write_te(root: Path, sd: dict) -> None:
    from gguf_dit.converter.text_encoder import WEIGHTS_NAME
    from gguf_dit.converter.tiny import save_folder

    te_dir = root / "text_encoder"
    config = json.loads((te_dir / "config.json").read_text())
    save_folder(te_dir, {"model.language_model." + k: v.to(torch.bfloat16) for k, v in sd.items() if not k.startswith("rotary")}, config, WEIGHTS_NAME)


def stage_place(root: Path, work: Path, lang, steps: int, seed: int, batch: int = 32, sink: bool = False) -> None:
    """Continue the language stage's encoder with the place reader (``PlaceReader``) and the same minimal-pair
    invariance, on the same text-only corpus; write it back into root."""
    done = work / "place.pt"
    if done.exists():
        converged(work, "place")
        return write_te(root, torch.load(done))
    toks, fill = tokenized_pairs(root, work / "te_language", lang)
    labels = place_labels([s for *_, s in lang])
    _, bg = scene_labels([s for *_, s in lang])
    torch.manual_seed(seed + 22)
    model = te_model(root).train()
    model.load_state_dict(torch.load(work / "language.pt"))
    sd, right = train_encoder(model, PlaceReader(sink=sink), lambda reader, f, valid, idx: place_loss(reader, f, valid, labels[idx], bg[idx]),
                              toks, fill, steps, 1e-3, 0.1, torch.Generator().manual_seed(seed + 23), batch, "place")
    torch.save(sd, done)
    converged(work, "place", right)
    write_te(root, sd)


def probe(root: Path, work: Path, seed: int, n_train: int = 3000, n_test: int = 600, steps: int = 600) -> dict:
    """What the DiT faces, in miniature: a fresh reader trained on the features of training captions only, scored
    on the held-out test captions (patterns, synonyms and combinations never seen). Logged; changes nothing."""
    from gguf_dit.runtime.text_encoder import TextEncoder

    enc = TextEncoder.load(convert_te(root, work / "te_probe"))
    try:
        def feats(part, n, s):
            ps = C.pairs(part, n, s)
            fs = [torch.from_numpy(enc.encode(C.encoder_string(c))) for c, _ in ps]
            L = max(len(f) for f in fs)
            x = torch.zeros(len(fs), L, fs[0].shape[1])
            for i, f in enumerate(fs):
                x[i, :len(f)] = f
            return x, torch.arange(L)[None] < torch.tensor([len(f) for f in fs])[:, None], *scene_labels([s for _, s in ps])
        tr, te = feats("train", n_train, seed + 30), feats("test", n_test, 0)
    finally:
        enc.close()
    torch.manual_seed(seed + 31)
    reader = Reader()
    opt = torch.optim.AdamW(reader.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed + 32)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (64,), generator=g)
        loss = reader_loss(reader, tr[0][idx], tr[1][idx], tr[2][idx], tr[3][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, r_train = reader_loss(reader, *tr, per_head=True)
        _, r_test = reader_loss(reader, *te, per_head=True)
    return {"train": r_train, "test": r_test}


def stage_features(root: Path, work: Path, train) -> list[np.ndarray]:
    """Every training caption encoded once by the runtime's encoder (the converted, trained one)."""
    path = work / "text_features.pt"
    if path.exists():
        return torch.load(path)
    from gguf_dit.runtime.text_encoder import TextEncoder

    enc = TextEncoder.load(convert_te(root, work / "te"))
    t0 = time.time()
    try:
        feats = [torch.from_numpy(enc.encode(C.encoder_string(c))).to(torch.float16) for c, _ in train]
    finally:
        enc.close()
    torch.save(feats, path)
    log(f"encoded {len(feats)} captions ({time.time() - t0:.0f} s); tokens mean {np.mean([len(f) for f in feats]):.1f} max {max(len(f) for f in feats)}")
    return feats


# -- 3. VAE -------------------------------------------------------------------------------------
def recon_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + squared error with the objects' pixels weighted 10x: they cover a few percent of a picture, and with the
    plain mean the autoencoder learned the backgrounds and drew the objects grey (measured on 40 training scenes after
    an encode/decode round trip: 44 % of the objects' colours read right after 2000 plain steps, 100 % after 2400
    weighted ones, and 99.3 % of all attributes). The corner pixel is always background."""
    w = 1 + 9 * ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
    return (w * ((rec - x).abs() + (rec - x) ** 2)).mean() / w.mean()


def stage_vae(work: Path, scenes, steps: int, seed: int):
    from diffusers import AutoencoderKLFlux2

    path = work / "vae.pt"
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**VAE_CONFIG)
    if path.exists():
        vae.load_state_dict(torch.load(path))
        return vae.eval()
    x_all = to_tensor(render_all(scenes, 1, seed + 1))
    g = torch.Generator().manual_seed(seed + 2)
    t0 = time.time()
    # Most steps on the whole scenes at half size (4x cheaper per picture: batch 16 for the cost of 4), then a
    # quarter at full size so the mid-block attention and the norms see 128x128 statistics.
    half = steps * 3 // 4
    for phase, n, bs, lr, down in (("half", half, 16, 3e-3, True), ("full", steps - half, 4, 1e-3, False)):
        opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(n, 1), pct_start=0.05)
        for step in range(n):
            x = x_all[torch.randint(0, len(x_all), (bs,), generator=g)]
            x = F.avg_pool2d(x, 2) if down else x
            z = vae.encode(x).latent_dist.mean  # the DiT is trained on the posterior mean; a small L2 keeps the latents bounded
            rec = vae.decode(z).sample
            kl = z.pow(2).mean()
            loss = recon_loss(rec, x) + 1e-4 * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == n - 1:
                log(f"vae {phase} step {step} loss {loss.item():.4f} latent l2 {kl.item():.3f} ({time.time() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        sample = x_all[:1024]
        mu = torch.cat([vae.encode(sample[i:i + 64]).latent_dist.mean for i in range(0, len(sample), 64)])
        fold_latent_norm(vae, mu, VAE_CONFIG["batch_norm_eps"])
        rec = vae.decode(vae.encode(sample[:64]).latent_dist.mean).sample
        log(f"vae reconstruction mse {F.mse_loss(rec, sample[:64]).item():.5f} (after fold, 128×128)")
    torch.save(vae.state_dict(), path)
    return vae


def roundtrip_shapes(vae, n: int = 96, seed: int = 0) -> dict[str, float]:
    """The share of ``n`` rendered single objects per (shape, size), every colour, background and place drawn at
    random, whose shape the scorer (``regions``) still reads right after an encode -> decode round trip: how much of
    the gate's shape score the autoencoder alone leaves. Logged after the VAE and decoder stages; it touches no
    random stream of training, so the run's bytes are the same. Small squares and triangles are where autoencoders
    differ: after the decoder stage 74-94 % and 74-91 % for seeds 0 and 2 and the shipped model's, and seed 2's
    (74 % and 74 %) went with the lowest DiT shape score of the three (70 % against 81 and 86 %; 2-core Intel Xeon with
    AMX; docs/demo.md, "Run x and the autoencoder")."""
    from gguf_dit.demo import regions as R

    rng = np.random.default_rng(seed)
    out = {}
    for shape in S.SHAPES:
        for size in S.SIZES:
            scenes = []
            while len(scenes) < n:
                colour, bg = rng.choice(list(S.COLOURS)), rng.choice(list(S.BACKGROUNDS))
                if colour != bg:
                    scenes.append(S.Scene((S.Obj(shape, str(colour), str(rng.choice(list(S.POSITIONS))), size),), str(bg)))
            x = to_tensor(np.stack([S.render(sc, rng) for sc in scenes]))
            with torch.no_grad():
                y = torch.cat([vae.decode(vae.encode(x[i:i + 16]).latent_dist.mean).sample for i in range(0, n, 16)])
            imgs = to_uint8(y)
            out[f"{shape} {size}"] = float(np.mean([R.grade(sc, R.analyse(im))["shape"][0] for sc, im in zip(scenes, imgs)]))
    return out


def log_roundtrip(vae, when: str, n: int) -> None:
    if n:
        log(f"{when} round trip, shapes read right: " + ", ".join(f"{k} {v:.3f}" for k, v in roundtrip_shapes(vae, n).items()))


def latent_tokens(vae, imgs: np.ndarray) -> torch.Tensor:
    """Images -> normalised DiT tokens (B, N, 128), 64 pictures at a time (36,000 at 128×128 do not fit at once)."""
    return torch.cat([train_demo.latent_tokens(vae, imgs[i:i + 64]) for i in range(0, len(imgs), 64)])


def decoder_data(vae, scenes, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder stages' clean pictures (one rendering of each scene) and the encoder's latents of them."""
    x_all = to_tensor(render_all(scenes, 1, seed + 5))
    with torch.no_grad():
        z_all = torch.cat([vae.encode(x_all[i:i + 64]).latent_dist.mean for i in range(0, len(x_all), 64)])
    return x_all, z_all


def stage_decoder(work: Path, vae, scenes, steps: int, seed: int):
    """Fine-tune the decoder (and post_quant_conv) on full pictures with the encoder frozen: the latent space the
    DiT learned stays exactly the same, the pictures get sharper. Latents get a little noise, as DiT samples are not exact."""
    path = work / "vae_decoder.pt"
    if path.exists():
        vae.load_state_dict(torch.load(path))
        return vae.eval()
    x_all, z_all = decoder_data(vae, scenes, seed)
    g = torch.Generator().manual_seed(seed + 6)

    def batch():
        idx = torch.randint(0, len(x_all), (8,), generator=g)
        return z_all[idx] + 0.1 * 1.65 * torch.randn(z_all[idx].shape, generator=g), x_all[idx]

    return fit_decoder(vae, path, batch, steps, 1e-3, "decoder")


def fit_decoder(vae, path: Path, batch, steps: int, lr: float, name: str):
    """Train the decoder and post_quant_conv ``steps`` steps on ``batch()``'s (latents, pictures) with
    ``recon_loss`` (AdamW, one cycle to ``lr``), then save the autoencoder to ``path``."""
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    t0 = time.time()
    vae.train()
    for step in range(steps):
        z, x = batch()
        loss = recon_loss(vae.decode(z).sample, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    torch.save(vae.state_dict(), path)
    return vae


def stage_sampled_decoder(work: Path, vae, cond, unc, data, feats, is_json, scenes, clean_scenes, steps: int, n: int, seed: int,
                          dit_seed: int, *, share: float = 0.5, lr: float = 3e-4, m: int = 48, batch: int = 8):
    """Fine-tune the decoder further on the pictures the sampler makes: ``n`` training captions (plain text) drawn
    by the default-20 preset with the final backbones (``guided_states`` run to the last step), each latent's
    target its caption's scene in the layout nearest to what it decodes to (``nearest_layout``), ``share`` of each
    batch; the rest is the decoder stage's clean pictures and loss. The encoder, its latent space and the DiT stay
    as they are. A DiT's samples are not an encoder's latents (a square's corners come out soft, a stray smudge
    beside an object): the decoder learns to draw what those latents were meant to be, from training captions only.
    On run w (AMX Xeon; its pictures drawn eagerly by a first version of this stage): shape 81.4 -> 85.1 %, all
    attributes 92.0 -> 92.7 % on the test captions, 92.4 -> 92.9 % on validation ones; the example's round square
    stayed round. On run w6, this stage: 90.7 -> 89.4 %, colours worse (docs/demo.md, "a decoder for the sampler's
    pictures"). So off by default. Its file goes to the DiT seed's folder, as it depends on the backbones."""
    from gguf_dit.runtime.schedule import PRESETS

    path = work / "vae_sampled_decoder.pt"
    if path.exists():
        vae.load_state_dict(torch.load(path))
        return vae.eval()
    t0 = time.time()
    g = torch.Generator().manual_seed(dit_seed + 130)
    k = PRESETS["default-20"].steps
    idx, states, _ = guided_states(cond.eval(), unc.eval(), data, feats, plain_pool(data, is_json), n, k, g, k_fixed=k)
    cap_idx = data[1]
    pics = token_pictures(vae, states)
    rng = np.random.default_rng(dit_seed + 131)
    caps = [int(cap_idx[i]) for i in idx]
    x_gen = to_tensor(np.stack([S.render(scenes[c], lay=nearest_layout(scenes[c], im, rng, m)) for c, im in zip(caps, pics)]))
    z_gen = token_latents(states)
    log(f"sampled decoder: {n} pictures of the preset, mean |picture - nearest layout| {(to_tensor(pics) - x_gen).abs().mean().item() * 127.5:.2f} "
        f"of 255 ({time.time() - t0:.0f} s)")
    x_all, z_all = decoder_data(vae, clean_scenes, seed)
    n_gen = int(round(batch * share))

    def mixed():
        i_c = torch.randint(0, len(x_all), (batch - n_gen,), generator=g)
        i_s = torch.randint(0, len(x_gen), (n_gen,), generator=g)
        z = torch.cat([z_all[i_c] + 0.1 * 1.65 * torch.randn(z_all[i_c].shape, generator=g), z_gen[i_s]])
        return z, torch.cat([x_all[i_c], x_gen[i_s]])

    return fit_decoder(vae, path, mixed, steps, lr, "sampled decoder")


# -- 4. DiT -------------------------------------------------------------------------------------
def stage_latents(work: Path, vae, train, per_caption: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training latents (float16) and the caption index of each."""
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path)
    t0 = time.time()
    lat = latent_tokens(vae, render_all([s for _, s in train], per_caption, seed + 3)).to(torch.float16)
    cap_idx = torch.arange(len(train)).repeat_interleave(per_caption)
    torch.save((lat, cap_idx), path)
    log(f"latents {tuple(lat.shape)} mean {lat.float().mean():.3f} std {lat.float().std():.3f} ({time.time() - t0:.0f} s)")
    return lat, cap_idx


def cover_tokens(lay) -> np.ndarray:
    """(tokens,) bool: the DiT tokens (16×16-pixel patches) a layout's objects cover by at least 5 %."""
    patch = 16
    cover = np.zeros((SIZE, SIZE))
    for o, cx, cy, r in lay:
        cover = np.maximum(cover, S.mask(o.shape, cx, cy, r))
    return cover.reshape(SIZE // patch, patch, SIZE // patch, patch).mean(axis=(1, 3)).ravel() > 0.05


def object_tokens(work: Path, train, per_caption: int, seed: int) -> torch.Tensor:
    """(N, tokens) bool, aligned with ``stage_latents``: which DiT tokens (16×16-pixel patches) an object covers by
    at least 5 %. The layouts are redrawn with the latents' own generator (``render`` draws only through ``layout``),
    so they are exactly the rendered ones."""
    path = work / "object_tokens.pt"
    if path.exists():
        return torch.load(path)
    rng = np.random.default_rng(seed + 3)
    mask = torch.from_numpy(np.stack([cover_tokens(S.layout(s, rng)) for _, s in train for _ in range(per_caption)]))
    torch.save(mask, path)
    return mask


def stage_dit(work: Path, data, feats, is_json, steps: int, seed: int, batch: int, *, role: str = "cond",
              lr: float = 1.5e-3, warm: int = 100, ema_decay: float = 0.999, snapshot_every: int = 0,
              schedule_t: float = 0.0, overshoot: float = 0.0, caption_noise: float = 0.0, init=None, tag: str = "", bf16: bool | None = None,
              where_weight: float = 0.0, objects: torch.Tensor | None = None, object_weight: float = 1.0,
              resume_every: int | None = None):
    """Train one backbone: ``role`` "cond" (packed [text, image] samples) or "uncond" (image tokens only). The saved
    weights are the exponential moving average of the trained ones (``ema_decay``). ``snapshot_every`` also writes
    EMA snapshots (``snapshot_<role>[_<tag>]_<step>.pt``) so a long run can be evaluated while it trains.

    ``bf16``: matmuls under bfloat16 autocast (weights, optimiser and loss stay float32; None: the process's
    ``BF16``): one forward + backward at batch 32 took 0.24 s against 0.78 s in float32 on an AMD EPYC Zen 5 with
    AVX512_BF16, and 18.8 s against 0.66 s on an AVX2-only Zen 3, where PyTorch emulates bfloat16 (2 threads;
    ``native_bf16``). Deterministic on one machine like the float32 path.

    ``caption_noise``: that share of the conditional samples is paired with another training caption, as web
    captions are often wrong. The conditional backbone alone then follows the prompt less reliably, and guidance,
    which divides out what the image-only backbone expects anyway, is what makes it reliable.

    ``schedule_t`` > 0: that share of the samples takes its t from the sampler's own density at the demo size (the
    official schedule's resolution shift puts most default-preset steps at high t, which logit-normal(−1, 1.75)
    rarely trains).

    ``overshoot`` > 0: half of the samples get noise that carries some of the picture, ε' = ε + c·(x1 − m) with c
    uniform in [0, overshoot] and m the data set's mean latent, and the usual target x1 − ε': what a guided
    trajectory looks like after its first, over-shot step.

    ``init``: start from these weights (the unconditional backbone starts as a copy of the conditional one).

    ``resume_every`` (None: ``RESUME_EVERY``): every that many steps the whole training state (weights, their
    average, optimiser, schedule, generators, the probe) goes to ``<stage>.resume.pt``, and a stage that finds one
    goes on from it: a run stopped mid-stage (a session's end) loses at most that many steps, and finishes with the
    bytes of an unstopped run (a test). The first phase alone takes 73 minutes on an AVX2-only Zen 3."""
    from diffusers import Ideogram4Transformer2DModel

    assert role in ("cond", "uncond")
    path = work / f"{role}{'_' + tag if tag else ''}.pt"
    torch.manual_seed(seed + 10)
    model = compiled(Ideogram4Transformer2DModel(**DIT_CONFIG))
    if init is not None:
        model.load_state_dict(init.state_dict())
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    model.train()
    lat, cap_idx = data
    grid = (SIZE // 16, SIZE // 16)
    # A batch is all JSON captions or all plain text (run wraps plain text), so its padding stays short.
    everything = torch.arange(len(lat))
    pools = [torch.nonzero(is_json[cap_idx] == j).flatten() for j in (False, True)]
    pools = [p if len(p) else everything for p in pools]  # a tiny check run may lack one form
    params = list(model.parameters())
    averaged = [p.detach().clone() for p in params]
    # "Where am I": RoPE gives attention only relative positions, and a caption's words sit at a different text
    # position in every caption, so an image token cannot match "on the left" by position alone; it must first know
    # its own place. A linear probe on the first block's image tokens, trained with the model and never saved,
    # asks for it (docs/demo.md, "Toward a 128×128 demo").
    n_img = (SIZE // 16) ** 2
    where = torch.nn.Linear(DIT_CONFIG["attention_head_dim"] * DIT_CONFIG["num_attention_heads"], n_img) if where_weight else None
    first: list = []  # the first block's output, one per forward of dit_forward's groups
    if where is not None:
        model.layers[0].register_forward_hook(lambda m, i, o: first.append(o[0] if isinstance(o, tuple) else o))
    opt = torch.optim.AdamW(params + (list(where.parameters()) if where is not None else []), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    lr_at = lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(seed + 4 + {"": 0, "late": 1000}.get(tag, 2000) + (0 if role == "cond" else 5000))

    noise, sample_t = flow_sampling(g, SIZE, lat[:4096].float().mean(0), overshoot, schedule_t)

    t0 = time.time()
    smooth = None
    resume = work / f"{path.stem}.resume.pt"
    resume_every = RESUME_EVERY if resume_every is None else resume_every

    # what the saved state is only valid for: a resume file of another configuration would train on silently
    setup = {"steps": steps, "seed": seed, "batch": batch, "role": role, "tag": tag, "lr": lr, "warm": warm, "ema_decay": ema_decay,
             "schedule_t": schedule_t, "overshoot": overshoot, "caption_noise": caption_noise, "where_weight": where_weight,
             "object_weight": object_weight, "bf16": BF16 if bf16 is None else bf16, "samples": len(lat),
             **({"compile": True} if COMPILE else {}), **({} if LENGTH_GROUPS else {"length_groups": False})}

    def state(step: int) -> dict:
        return {"setup": setup, "step": step, "model": model.state_dict(), "averaged": averaged, "opt": opt.state_dict(),
                "sched": sched.state_dict(), "g": g.get_state(), "rng": torch.get_rng_state(), "smooth": smooth,
                "where": where.state_dict() if where is not None else None}

    start = 0
    if resume.exists():
        st = torch.load(resume, weights_only=False)  # written above by this stage; LambdaLR's state holds numpy floats
        if "setup" in st and st["setup"] != setup:  # (the first resume files, of 4 December, recorded none)
            diff = {k: (st["setup"].get(k), v) for k, v in setup.items() if st["setup"].get(k) != v}
            raise SystemExit(f"{resume}: saved by a run with other settings (saved, now: {diff}); delete it to start the stage over")
        model.load_state_dict(st["model"])
        for a, b in zip(averaged, st["averaged"]):
            a.copy_(b)
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        g.set_state(st["g"])
        torch.set_rng_state(st["rng"])
        if where is not None:
            where.load_state_dict(st["where"])
        start, smooth = st["step"], st["smooth"]
        log(f"dit {path.stem}: resumed at step {start} of {steps} from {resume.name}")
    for step in range(start, steps):
        pool = pools[int(torch.rand(1, generator=g).item() < 0.25)] if role == "cond" else everything
        idx = pool[torch.randint(0, len(pool), (batch,), generator=g)]
        x1 = lat[idx].float()
        eps = noise(x1)
        t = sample_t(batch)
        xt = t[:, None, None] * x1 + (1 - t[:, None, None]) * eps
        fb = None
        if role == "cond":
            caps = cap_idx[idx].clone()
            wrong = torch.nonzero(torch.rand(batch, generator=g) < caption_noise).flatten()
            for i in wrong.tolist():  # another caption of the same form
                other = pool[int(torch.randint(0, len(pool), (1,), generator=g))]
                caps[i] = cap_idx[other]
            fb = [feats[int(k)] for k in caps]  # float16 tensors; batch_inputs casts
        first.clear()
        with low_precision(bf16):
            v = dit_forward(model, xt, t, fb, grid)
        if objects is not None and object_weight != 1.0:
            # Objects cover a few percent of a picture: at plain MSE, predicting the background alone from the caption
            # is almost all the loss there is to gain at small t (measured: E[x1 | caption] showed no objects at all).
            w = 1 + (object_weight - 1) * objects[idx].float()
            loss = (((v.float() - (x1 - eps)) ** 2).mean(-1) * w).mean() / w.mean()
        else:
            loss = F.mse_loss(v.float(), x1 - eps)
        if where is not None:
            groups = forward_groups(batch, fb, n_img)
            assert len(first) == len(groups), (len(first), len(groups))
            # every sample asks the same question of its n_img tokens, so the groups' order needs no undoing
            h_img = torch.cat([torch.gather(h.float(), 1, torch.stack([torch.arange(n_img) + (len(fb[i]) if fb else 0) for i in gr])[..., None]
                                            .expand(-1, -1, h.shape[-1])) for gr, h in zip(groups, first)])
            where_loss = F.cross_entropy(where(h_img).flatten(0, 1), torch.arange(n_img).repeat(batch))
            loss = loss + where_weight * where_loss
        smooth = dit_step(model, params, opt, sched, averaged, loss, step, ema_decay, smooth)
        if step % 50 == 0 or step == steps - 1:
            log(f"dit {path.stem} step {step} loss {smooth:.4f}" + (f" where {where_loss.item():.3f}" if where is not None else "") + f" ({time.time() - t0:.0f} s)")
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            torch.save(ema_state(model, averaged), work / f"snapshot_{path.stem}_{step + 1}.pt")
        if resume_every and (step + 1) % resume_every == 0 and step + 1 < steps:
            torch.save(state(step + 1), resume.with_suffix(".tmp"))
            resume.with_suffix(".tmp").replace(resume)  # a stop while writing leaves the previous state whole
    model.load_state_dict(ema_state(model, averaged))
    torch.save(model.state_dict(), path)
    resume.unlink(missing_ok=True)
    return model.eval()


def plain_pool(data, is_json) -> torch.Tensor:
    """Indices of the training samples with plain-text captions (all of them in a tiny check run that has none):
    ``run`` wraps plain text, and sampler states need one caption form per batch for short padding."""
    lat, cap_idx = data
    pool = torch.nonzero(~is_json[cap_idx]).flatten()
    return pool if len(pool) else torch.arange(len(lat))


def token_pictures(vae, tokens: torch.Tensor) -> np.ndarray:
    """Normalised DiT tokens (B, N, 128) -> uint8 pictures (B, SIZE, SIZE, 3): the inverse of ``latent_tokens``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(tokens), 64):
            out.append(to_uint8(vae.decode(token_latents(tokens[i:i + 64])).sample))
    return np.concatenate(out)


def token_latents(tokens: torch.Tensor) -> torch.Tensor:
    """Normalised DiT tokens (B, N, 128) -> the decoder's latents (B, 32, SIZE/8, SIZE/8): ``latent_tokens``' inverse."""
    from gguf_dit.arch.latent import LATENT_SCALE, LATENT_SHIFT

    g = SIZE // 16
    lat = tokens * torch.from_numpy(LATENT_SCALE.copy()) + torch.from_numpy(LATENT_SHIFT.copy())
    return lat.view(-1, g, g, 2, 2, lat.shape[-1] // 4).permute(0, 5, 1, 3, 2, 4).reshape(-1, lat.shape[-1] // 4, 2 * g, 2 * g)


def coverage_counts(shape: str, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """(len(cx), rows, cols) int64: how many of each pixel's 2×2 samples lie inside each shape (cx, cy, r), over a
    window of the picture; ``S.mask(shape, cx, cy, r, ss=2)`` is that count / 4, sample for sample the same test
    (the same sample coordinates, the same float64 expressions), evaluated for every candidate at once."""
    ss = 2
    x = (np.arange(cols.start * ss, cols.stop * ss) + 0.5) / ss
    y = (np.arange(rows.start * ss, rows.stop * ss) + 0.5) / ss
    cx, cy, r = cx[:, None], cy[:, None], r[:, None]
    if shape == "circle":
        m = (y - cy)[:, :, None] ** 2 + (x - cx)[:, None, :] ** 2 <= (r * r)[:, :, None]
    elif shape == "square":
        m = (np.abs(y - cy) <= r)[:, :, None] & (np.abs(x - cx) <= r)[:, None, :]
    elif shape == "triangle":
        fy = (y - (cy - r)) / (2 * r)
        m = ((fy >= 0) & (fy <= 1))[:, :, None] & (np.abs(x - cx)[:, None, :] <= (r * fy)[:, :, None])
    else:
        raise ValueError(shape)
    m = m.view(np.uint8)  # a strided sum of the four samples: numpy's reduce over two inner axes is 10× slower
    return (m[:, 0::2, 0::2] + m[:, 0::2, 1::2] + m[:, 1::2, 0::2] + m[:, 1::2, 1::2]).astype(np.int64)


def _window(o: S.Obj) -> tuple[slice, slice]:
    """The rows and columns around an object's place that any training-style draw of it can cover."""
    reach = S.JITTER + max(S.SIZES["large"]) + 2
    px, py = S.POSITIONS[o.position]
    return slice(max(int(py - reach), 0), min(int(py + reach) + 1, SIZE)), slice(max(int(px - reach), 0), min(int(px + reach) + 1, SIZE))


@functools.lru_cache(maxsize=None)
def _pairs_by_rank(m: int) -> list[tuple[int, int]]:
    return [(i, j) for _, i, j in sorted((i + j, i, j) for i in range(m) for j in range(m))]


def nearest_layout(scene: S.Scene, img: np.ndarray, rng: np.random.Generator, m: int) -> list:
    """Of ``m`` training-style draws of each object's jittered place and size (``S.layout``'s ranges), the one whose
    rendering is nearest to ``img`` in pixels, around the object's place; two objects keep ``S.layout``'s gap.

    The distance is sum((img - bg - cover · (colour - bg))²) over the window, cover = ``S.mask(..., ss=2)``. Every
    term is a multiple of 1/16 (integer pixels and colours, cover in quarters) and the sum stays below 2^36 of
    them, so it is computed exactly, in integers, from the samples' counts (``coverage_counts``), for all ``m``
    draws at once: the same numbers, and so the same choice, as rendering each draw (a test), 8.7× faster
    (benchmarks/nearest_layout.py)."""
    d = img.astype(np.int64) - np.array(S.BACKGROUNDS[scene.background], np.int64)
    ranked = []
    for o in scene.objects:
        c = np.array(S.COLOURS[o.colour], np.int64) - np.array(S.BACKGROUNDS[scene.background], np.int64)
        px, py = S.POSITIONS[o.position]
        rows, cols = _window(o)
        draws = []
        for _ in range(m):
            size = o.size or ("small", "large")[int(rng.integers(2))]
            draws.append((size, px + rng.uniform(-S.JITTER, S.JITTER), py + rng.uniform(-S.JITTER, S.JITTER), rng.uniform(*S.SIZES[size])))
        cx, cy, r = (np.array([dr[i] for dr in draws]) for i in (1, 2, 3))
        # Where no draw reaches (outside every draw's S.mask box) the count is 0 and the term is d², the same for all.
        box = (slice(max(rows.start, int((cy - r).min()) - 1), min(rows.stop, int((cy + r).max()) + 2)),
               slice(max(cols.start, int((cx - r).min()) - 1), min(cols.stop, int((cx + r).max()) + 2)))
        k = coverage_counts(o.shape, cx, cy, r, *box).reshape(m, -1)
        dw, db = d[rows, cols], d[box].reshape(-1, 3)
        # 16 · sum over pixels and channels of (d - k/4 · c)² = 16 Σd² − 8 Σ k (d·c) + |c|² Σ k²
        err16 = 16 * int((dw * dw).sum()) - 8 * (k @ (db @ c)) + int(c @ c) * (k * k).sum(axis=1)
        order = np.argsort(err16, kind="stable")  # sorted() is stable too: equal distances keep the draw order
        ranked.append([(S.Obj(o.shape, o.colour, o.position, draws[i][0]), *draws[i][1:]) for i in order])
    if len(ranked) == 1:
        return [ranked[0][0]]
    for i, j in _pairs_by_rank(m):
        if S._apart(ranked[0][i][1:], ranked[1][j][1:]):
            return [ranked[0][i], ranked[1][j]]
    return S.layout(scene, rng)


def nearest_layout_by_rendering(scene: S.Scene, img: np.ndarray, rng: np.random.Generator, m: int) -> list:
    """``nearest_layout``'s definition, drawn out, and how the recipe computed it until 5 December 2026: each draw
    rendered by ``S.mask`` (2×2 samples), its float distance to the picture over the window summed by numpy, the
    draws sorted by it (stably), the first pair in rank order that keeps the gap. Kept as the reference that
    ``nearest_layout`` must equal (tests/test_demo_scorer.py) and the baseline of benchmarks/nearest_layout.py."""
    img, bg = img.astype(np.float32), np.array(S.BACKGROUNDS[scene.background], np.float32)
    ranked = []
    for o in scene.objects:
        col, (px, py) = np.array(S.COLOURS[o.colour], np.float32), S.POSITIONS[o.position]
        win = _window(o)
        cands = []
        for _ in range(m):
            size = o.size or ("small", "large")[int(rng.integers(2))]
            cx, cy, r = px + rng.uniform(-S.JITTER, S.JITTER), py + rng.uniform(-S.JITTER, S.JITTER), rng.uniform(*S.SIZES[size])
            cover = S.mask(o.shape, cx, cy, r, ss=2)[win][..., None]
            cands.append((float(((img[win] - bg - cover * (col - bg)) ** 2).sum()), (S.Obj(o.shape, o.colour, o.position, size), cx, cy, r)))
        ranked.append([c for _, c in sorted(cands, key=lambda c: c[0])])
    if len(ranked) == 1:
        return [ranked[0][0]]
    for _, i, j in sorted((i + j, i, j) for i in range(m) for j in range(m)):
        if S._apart(ranked[0][i][1:], ranked[1][j][1:]):
            return [ranked[0][i], ranked[1][j]]
    return S.layout(scene, rng)


def matched_pictures(cond, vae, found, data, feats, scenes, seed: int, m: int = 48):
    """For each sampler state, the training-style picture of its caption's scene nearest to the picture the state is
    heading for (the conditional backbone's clean-picture estimate x_t + (1 − t)·v, decoded), as normalised tokens,
    and the tokens its objects cover. A state from fresh noise has no picture of its own: the training picture of
    its caption that ``train_on_states`` would otherwise pull it to is drawn at random among layouts (place jittered
    ±5 px, size in its range), and the backbone learns the mean of those pulls: a blob (docs/demo.md)."""
    idx_s, states, t_s = found
    cap_idx = data[1]
    rng = np.random.default_rng(seed)
    grid = (SIZE // 16, SIZE // 16)
    x1, covers = [], []
    for s in range(0, len(idx_s), 64):
        idx, z, t = idx_s[s:s + 64], states[s:s + 64], t_s[s:s + 64]
        fb = [feats[int(cap_idx[i])] for i in idx]
        with torch.no_grad(), low_precision():
            v = dit_forward(cond, z, t, fb, grid).float()
        heading = token_pictures(vae, z + (1 - t)[:, None, None] * v)
        lays = [nearest_layout(scenes[int(cap_idx[i])], im, rng, m) for i, im in zip(idx, heading)]
        pics = np.stack([S.render(scenes[int(cap_idx[i])], lay=lay) for i, lay in zip(idx, lays)])
        x1.append(latent_tokens(vae, pics))
        covers.append(torch.from_numpy(np.stack([cover_tokens(lay) for lay in lays])))
    return torch.cat(x1), torch.cat(covers)


def guided_states(cond, unc, data, feats, pool, n: int, k_max: int, g, preset: str = "default-20", guidance=None, per: int = 1,
                  k_fixed: int | None = None):
    """n states of the sampler's own guided trajectories: a training sample's caption, fresh noise, then k (uniform in
    1..k_max) Euler steps of ``preset``'s schedule at its guidance (or at ``guidance``, one value per step).
    Returns (sample index, state, its t).

    Each step runs only the rows whose state lies further along, and a step at guidance 1 takes the conditional
    velocity without the image-only pass, as the runtime's sampler does: with k uniform, a batch that stepped every
    row k_max times did about twice the work it kept, and trajectories that end at guidance 1 (``interval_guidance``)
    spent most of their time in image-only passes guidance then discards (benchmarks/train_states.py).

    ``per`` > 1: each trajectory gives ``per`` states, at distinct k drawn without replacement (each k still
    uniform), so n states cost n / per trajectories, each run to its largest k; fewer captions and noises per round.
    ``per`` = 1 draws exactly as before. ``k_fixed``: every trajectory runs exactly that many steps (one state each;
    no k is drawn): with the preset's step count, the pictures the sampler makes."""
    from gguf_dit.runtime.schedule import PRESETS, timesteps

    lat, cap_idx = data
    st = PRESETS[preset]
    gs = st.guidance if guidance is None else tuple(guidance)
    assert len(gs) == st.steps, (len(gs), st.steps)
    assert 1 <= per <= k_max, (per, k_max)
    assert k_fixed is None or (per == 1 and 1 <= k_fixed <= k_max), (k_fixed, per, k_max)
    ts = [float(x) for x in timesteps(st.steps, SIZE, SIZE, st.mu, st.std)]
    grid = (SIZE // 16, SIZE // 16)
    m = -(-n // per)
    idx_t = pool[torch.randint(0, len(pool), (m,), generator=g)]
    k_t = (torch.full((m, 1), k_fixed) if k_fixed is not None else torch.randint(1, k_max + 1, (m, 1), generator=g) if per == 1
           else torch.stack([torch.randperm(k_max, generator=g)[:per] + 1 for _ in range(m)]))
    states = torch.empty(m * per, *lat.shape[1:])
    with torch.no_grad(), low_precision():
        for s in range(0, m, 64):
            idx, ks = idx_t[s:s + 64], k_t[s:s + 64]
            last = ks.max(1).values
            z = torch.randn(len(idx), *lat.shape[1:], generator=g)
            fb = [feats[int(cap_idx[i])] for i in idx]
            live = torch.arange(len(idx))
            for k in range(k_max):
                live = live[last[live] > k]
                if not len(live):
                    break
                zl, fl = z[live], [fb[i] for i in live]
                t = torch.full((len(live),), ts[k]).to(torch.bfloat16).float()
                v = dit_forward(cond, zl, t, fl, grid).float()
                if gs[k] != 1.0:
                    vu = dit_forward(unc, zl, t, None, grid).float()
                    v = vu + gs[k] * (v - vu)
                z[live] = zl + v * (ts[k + 1] - ts[k])
                for c in range(per):
                    end = live[ks[live, c] == k + 1]
                    states[(s + end) * per + c] = z[end]
    k_all = k_t.flatten()[:n]
    t_all = torch.tensor([ts[int(k)] for k in k_all]).to(torch.bfloat16).float()  # the runtime rounds t to bfloat16
    return idx_t.repeat_interleave(per)[:n], states[:n], t_all


def stage_guided(work: Path, cond, unc, data, feats, is_json, rounds: list[int], steps: int, seed: int, batch: int, *,
                 n_states: int = 2048, share: float = 0.5, objects: torch.Tensor | None = None, object_weight: float = 1.0,
                 bf16: bool | None = None, match: int = 0, vae=None, scenes=None):
    """Teach both backbones the states the preset's guidance puts them in. At 128×128 the schedule's first step goes
    from t = 0 to 0.184 with seven times the two backbones' disagreement about the whole picture, which no training
    sample looks like; guidance 7 on that step alone cost as much as the whole preset (docs/demo.md). Per round
    (``rounds``: its k_max), states of the current backbones' guided trajectories (``guided_states``) make up
    ``share`` of each batch, with the target that leads straight to a picture x1 of its caption, v = (x1 − x_t)/(1 − t):
    with ``match``, the layout nearest to where the state heads (``matched_pictures``), else the sample's own (the
    rest are ordinary samples at t from the sampler's schedule); ``steps`` steps for the conditional backbone,
    then as many for the image-only one on the same states (image tokens only). Later rounds start from the earlier
    rounds' backbones, so their states are the ones the sampler now reaches."""
    from diffusers import Ideogram4Transformer2DModel

    lat = data[0]
    pool = plain_pool(data, is_json)
    for r, k_max in enumerate(rounds):
        paths = [work / f"{role}_guided{r + 1}.pt" for role in ("cond", "uncond")]
        done = all(p.exists() for p in paths)  # a round cut short is redone whole, so a resumed run equals an unbroken one
        models = []
        for path, init in zip(paths, (cond, unc)):
            m = compiled(Ideogram4Transformer2DModel(**DIT_CONFIG))
            m.load_state_dict(torch.load(path) if done else init.state_dict())
            models.append(m)
        if done:
            cond, unc = (m.eval() for m in models)
            continue
        g = torch.Generator().manual_seed(seed + 40 + r)
        t0 = time.time()
        idx_s, states, t_s = guided_states(cond.eval(), unc.eval(), data, feats, pool, n_states, k_max, g)
        found = (idx_s, states, t_s)
        if match:
            found = (*found, *matched_pictures(cond, vae, found, data, feats, scenes, seed + 80 + r, match))
        log(f"guided round {r + 1}: {n_states} states, k <= {k_max} ({time.time() - t0:.0f} s)")
        noise, sample_t = flow_sampling(g, SIZE, lat[:4096].float().mean(0), 0.0, 0.5)
        for model, path, role in zip(models, paths, ("cond", "uncond")):
            train_on_states(model, role, found, data, feats, pool, steps, g, batch, noise, sample_t, share=share,
                            objects=objects, object_weight=object_weight, bf16=bf16, label=f"guided round {r + 1} {role}")
            torch.save(model.state_dict(), path)
        cond, unc = (m.eval() for m in models)
    return cond, unc


def late_weights(t: torch.Tensor, late_weight: float) -> torch.Tensor:
    """min(1, ((1 − t)/late_weight)²): a velocity error's weight once measured on the clean-picture estimate
    x_t + (1 − t)·v, relative to the weight 1 it has up to t = 1 − late_weight."""
    return ((1 - t) / late_weight).pow(2).clamp(max=1.0)


def train_on_states(model, role: str, found, data, feats, pool, steps: int, g, batch: int, noise, sample_t, *, share: float = 0.5,
                    objects: torch.Tensor | None = None, object_weight: float = 1.0, bf16: bool | None = None, label: str = "", targets=None,
                    late_weight: float = 0.0):
    """Train ``model`` (``role`` "cond" reads the captions, "uncond" image tokens only) ``steps`` steps, lr 5e-4 after
    a 50-step warm-up, on batches of which ``share`` are sampler states ``found`` = (training sample index, state,
    its t[, matched pictures and their object tokens]) with the target that leads straight to that sample's picture
    (or its matched one), v = (x1 − x_t)/(1 − t), and the rest
    ordinary samples (``noise``, ``sample_t`` from ``flow_sampling``). ``targets(xt, t, fb, target)`` may replace
    targets (``stage_agree``). ``late_weight`` > 0: a state's loss is weighted by min(1, ((1 − t)/late_weight)²), i.e.
    measured on the clean-picture estimate x_t + (1 − t)·v once t > 1 − late_weight: near t = 1 the target divides
    the state's distance from its picture by 1 − t (70× at the last step) and would swamp the batch. Loads the
    exponential moving average (0.99) into ``model`` at the end."""
    lat, cap_idx = data
    idx_s, states, t_s = found[:3]
    matched = found[3:]  # (pictures, their object tokens) from matched_pictures, else each state's training sample
    grid = (SIZE // 16, SIZE // 16)
    n_g = int(batch * share)
    model.train()
    params = list(model.parameters())
    averaged = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    smooth, t0 = None, time.time()
    for step in range(steps):
        j = torch.randint(0, len(states), (n_g,), generator=g)
        idx = torch.cat([idx_s[j], pool[torch.randint(0, len(pool), (batch - n_g,), generator=g)]])
        x1 = lat[idx].float()
        if matched:
            x1[:n_g] = matched[0][j]
        eps = noise(x1[n_g:])
        t_r = sample_t(batch - n_g)
        xt = torch.cat([states[j], t_r[:, None, None] * x1[n_g:] + (1 - t_r[:, None, None]) * eps])
        t = torch.cat([t_s[j], t_r])
        target = torch.cat([(x1[:n_g] - states[j]) / (1 - t_s[j])[:, None, None], x1[n_g:] - eps])
        fb = [feats[int(cap_idx[i])] for i in idx]
        if targets is not None:
            target = targets(xt, t, fb, target)
        with low_precision(bf16):
            v = dit_forward(model, xt, t, fb if role == "cond" else None, grid)
        w = 1 + (object_weight - 1) * objects[idx].float() if objects is not None else torch.ones(len(idx), xt.shape[1])
        if matched and objects is not None:
            w[:n_g] = 1 + (object_weight - 1) * matched[1][j].float()
        if late_weight:
            w[:n_g] *= late_weights(t[:n_g], late_weight)[:, None]
        loss = (((v.float() - target) ** 2).mean(-1) * w).mean() / w.mean()
        smooth = dit_step(model, params, opt, sched, averaged, loss, step, 0.99, smooth)
        if step % 50 == 0 or step == steps - 1:
            log(f"{label} step {step} loss {smooth:.4f} ({time.time() - t0:.0f} s)")
    model.load_state_dict(ema_state(model, averaged))
    return model.eval()


def own_states(cond, data, feats, pool, n: int, k_range: tuple[int, int], g, preset: str = "default-20"):
    """n states of the conditional backbone's own trajectories from a known picture: a training latent x1 noised to
    the schedule's k_a-th t (k_a uniform in ``k_range``, both ends included), then Euler steps of ``preset``'s
    schedule at guidance 1 up to a later step k_b (uniform in k_a+1 .. steps-1). Returns (sample index, state, its t
    rounded to bfloat16)."""
    from gguf_dit.runtime.schedule import PRESETS, timesteps

    lat, cap_idx = data
    st = PRESETS[preset]
    ts = [float(x) for x in timesteps(st.steps, SIZE, SIZE, st.mu, st.std)]
    grid = (SIZE // 16, SIZE // 16)
    k_lo, k_hi = k_range
    idx_all = pool[torch.randint(0, len(pool), (n,), generator=g)]
    ka_all = torch.randint(k_lo, k_hi + 1, (n,), generator=g)
    kb_all = (ka_all + 1 + (torch.rand(n, generator=g) * (st.steps - 1 - ka_all)).long()).clamp(max=st.steps - 1)
    states = torch.empty(n, *lat.shape[1:])
    with torch.no_grad(), low_precision():
        for s in range(0, n, 64):
            idx, ka, kb = idx_all[s:s + 64], ka_all[s:s + 64], kb_all[s:s + 64]
            x1 = lat[idx].float()
            eps = torch.randn(x1.shape, generator=g)
            fb = [feats[int(cap_idx[i])] for i in idx]
            z = torch.empty_like(x1)
            for k in range(k_lo, int(kb.max())):
                start = ka == k
                z[start] = ts[k] * x1[start] + (1 - ts[k]) * eps[start]
                on = torch.nonzero((ka <= k) & (kb > k)).flatten()
                if len(on):
                    tk = torch.full((len(on),), ts[k]).to(torch.bfloat16).float()
                    z[on] = z[on] + dit_forward(cond, z[on], tk, [fb[i] for i in on.tolist()], grid).float() * (ts[k + 1] - ts[k])
            states[s:s + 64] = z
    t_all = torch.tensor([ts[int(k)] for k in kb_all]).to(torch.bfloat16).float()
    return idx_all, states, t_all


def stage_own(work: Path, cond, unc, data, feats, is_json, steps: int, k_range: tuple[int, int], seed: int, batch: int, *,
              n_states: int = 2048, share: float = 0.5, objects: torch.Tensor | None = None, object_weight: float = 1.0,
              bf16: bool | None = None):
    """Teach the backbones to finish their own trajectories. The conditional backbone's one-step estimate of the
    clean picture from a noised training picture is sharp (squares square, circles round, at t = 0.3 and 0.6), yet
    twenty Euler steps from noise end in ragged blobs, squares and circles alike (docs/demo.md): each step starts
    where the previous step's error put it, a state no training sample looks like. Half of each batch are such
    states (``own_states``: a training picture noised to a t at which its layout is set, then the conditional
    backbone's own steps), with the target that leads back to that picture, v = (x1 − x_t)/(1 − t), weighted on the
    clean-picture estimate late (``train_on_states``' late_weight 0.5); half ordinary samples at the sampler's t.
    The image-only backbone then trains on the same states, image tokens only, as in ``stage_guided``: changed
    alone, the conditional backbone disagreed with it at the guided first steps (preset with guidance 7 on the first
    two steps only: 84.2 % before, 72.1 % after, 120 held-out captions). Off by default: with both trained, the
    guided rounds after it undid the gain (docs/demo.md)."""
    paths = [work / f"{role}_own.pt" for role in ("cond", "uncond")]
    if all(p.exists() for p in paths):
        cond.load_state_dict(torch.load(paths[0]))
        unc.load_state_dict(torch.load(paths[1]))
        return cond.eval(), unc.eval()
    lat = data[0]
    pool = plain_pool(data, is_json)
    g = torch.Generator().manual_seed(seed + 70)
    t0 = time.time()
    found = own_states(cond.eval(), data, feats, pool, n_states, k_range, g)
    log(f"own: {n_states} states ({time.time() - t0:.0f} s)")
    noise, sample_t = flow_sampling(g, SIZE, lat[:4096].float().mean(0), 0.0, 0.5)
    for model, path, role in zip((cond, unc), paths, ("cond", "uncond")):
        train_on_states(model, role, found, data, feats, pool, steps, g, batch, noise, sample_t, share=share, objects=objects,
                        object_weight=object_weight, bf16=bf16, label=f"own {role}", late_weight=0.5)
        torch.save(model.state_dict(), path)
    return cond, unc


def resume(model, path: Path) -> bool:
    """Load a stage's saved weights into ``model`` (in eval mode) if the stage ran before."""
    if not path.exists():
        return False
    model.load_state_dict(torch.load(path))
    model.eval()
    return True


def agree_targets(cond, xt: torch.Tensor, t: torch.Tensor, fb: list, target: torch.Tensor, tau: float) -> torch.Tensor:
    """``target`` with every row whose t >= ``tau`` replaced by the conditional backbone's own prediction for it
    (in the process's precision, ``low_precision``), given that row's caption features ``fb``."""
    out = target.clone()
    late = torch.nonzero(t >= tau).flatten()
    if len(late):
        with torch.no_grad(), low_precision():
            out[late] = dit_forward(cond, xt[late], t[late], [fb[i] for i in late.tolist()], (SIZE // 16, SIZE // 16)).float()
    return out


def stage_agree(work: Path, cond, unc, data, feats, is_json, steps: int, tau: float, seed: int, batch: int, *,
                n_states: int = 2048, share: float = 0.5, objects: torch.Tensor | None = None, object_weight: float = 1.0,
                bf16: bool | None = None, match: int = 0, vae=None, scenes=None, r: int = 0, per: int = 1):
    """Teach the image-only backbone to agree with the conditional one where the picture is already decided (t >= tau).
    There the two should predict the same velocity, and what they still disagree on is their two estimation errors,
    which guidance 7 multiplies by six at every step: the specks and stripes of the preset's pictures (docs/demo.md).
    Half of each batch are states along the preset's whole guided trajectory (``guided_states`` with k up to the
    last step), half ordinary samples at t from the sampler's schedule; for t >= tau the target is the conditional
    backbone's prediction with the sample's caption, below it the usual target (as in ``stage_guided``: the matched
    picture with ``match``), so guidance keeps its full effect where the picture is made. ``per`` states a
    trajectory (``guided_states``)."""
    path = work / ("uncond_agree.pt" if r == 0 else f"uncond_agree{r + 1}.pt")
    if resume(unc, path):
        return unc
    lat = data[0]
    pool = plain_pool(data, is_json)
    g = torch.Generator().manual_seed(seed + 60 + 1000 * r)
    t0 = time.time()
    found = trajectory_states(cond, unc, data, feats, pool, n_states, tau, g, per=per)
    if match:
        found = (*found, *matched_pictures(cond, vae, found, data, feats, scenes, seed + 90 + 1000 * r, match))
    log(f"agree: {n_states} guided states, {per} a trajectory ({time.time() - t0:.0f} s)")
    noise, sample_t = flow_sampling(g, SIZE, lat[:4096].float().mean(0), 0.0, 0.5)
    train_on_states(unc, "uncond", found, data, feats, pool, steps, g, batch, noise, sample_t, share=share, objects=objects,
                    object_weight=object_weight, bf16=bf16, label="agree", targets=lambda xt, t, fb, target: agree_targets(cond, xt, t, fb, target, tau))
    torch.save(unc.state_dict(), path)
    return unc


def interval_guidance(tau: float, preset: str = "default-20") -> list[float]:
    """``preset``'s guidance per step where the step's t < tau, 1 after it: the trajectories the sampler follows once
    the image-only backbone agrees with the conditional one from tau on (``stage_agree``)."""
    from gguf_dit.runtime.schedule import PRESETS, timesteps

    st = PRESETS[preset]
    ts = timesteps(st.steps, SIZE, SIZE, st.mu, st.std)
    return [gk if float(ts[k]) < tau else 1.0 for k, gk in enumerate(st.guidance)]


def trajectory_states(cond, unc, data, feats, pool, n: int, tau: float, g, per: int = 1):
    """``guided_states`` along the whole trajectory the sampler follows once the two backbones agree from ``tau`` on
    (k up to the last step; ``interval_guidance``), ``per`` states a trajectory."""
    interval = interval_guidance(tau)
    return guided_states(cond.eval(), unc.eval(), data, feats, pool, n, len(interval) - 1, g, guidance=interval, per=per)


def stage_finish(work: Path, cond, unc, data, feats, is_json, steps: int, tau: float, seed: int, batch: int, *, r: int = 0,
                 n_states: int = 2048, share: float = 0.5, objects: torch.Tensor | None = None, object_weight: float = 1.0,
                 bf16: bool | None = None, match: int = 48, vae=None, scenes=None, per: int = 1):
    """Teach the conditional backbone to finish its own pictures. States along the whole trajectory the sampler
    follows (``guided_states``, k up to the last step, the preset's guidance before ``tau`` and none after, as after
    ``stage_agree``), each pulled to the layout of its caption's scene nearest to where it is heading
    (``matched_pictures``), weighted on the clean-picture estimate late (``late_weights``, 0.5); half of each batch,
    the rest ordinary samples. The guided rounds teach the first steps (k <= 8); here a blob that is neither round nor
    square at t = 0.5 learns to become the square its caption asks for (docs/demo.md). ``per`` states a trajectory
    (``guided_states``)."""
    path = work / f"cond_finish{r + 1}.pt"
    if resume(cond, path):
        return cond
    lat = data[0]
    pool = plain_pool(data, is_json)
    g = torch.Generator().manual_seed(seed + 100 + 1000 * r)
    t0 = time.time()
    found = trajectory_states(cond, unc, data, feats, pool, n_states, tau, g, per=per)
    found = (*found, *matched_pictures(cond, vae, found, data, feats, scenes, seed + 101 + 1000 * r, match))
    log(f"finish round {r + 1}: {n_states} matched states, {per} a trajectory ({time.time() - t0:.0f} s)")
    noise, sample_t = flow_sampling(g, SIZE, lat[:4096].float().mean(0), 0.0, 0.5)
    train_on_states(cond, "cond", found, data, feats, pool, steps, g, batch, noise, sample_t, share=share, objects=objects,
                    object_weight=object_weight, bf16=bf16, label=f"finish round {r + 1}", late_weight=0.5)
    torch.save(cond.state_dict(), path)
    return cond


def canonical_data(work: Path, vae, scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """One picture per training caption: its scene at the nominal places and sizes (``S.layout`` without a generator;
    a size the caption leaves open is large), as normalised tokens (float16), and the DiT tokens its objects cover."""
    path = work / "canon_latents.pt"
    if path.exists():
        return torch.load(path)
    t0 = time.time()
    lays = [S.layout(s) for s in scenes]
    lat = torch.cat([latent_tokens(vae, np.stack([S.render(s, lay=lay) for s, lay in zip(scenes[i:i + 500], lays[i:i + 500])]))
                     for i in range(0, len(scenes), 500)]).to(torch.float16)
    covers = torch.from_numpy(np.stack([cover_tokens(lay) for lay in lays]))
    torch.save((lat, covers), path)
    log(f"canonical latents {tuple(lat.shape)} ({time.time() - t0:.0f} s)")
    return lat, covers


def stage_canon(work: Path, cond, unc, feats, is_json, steps: int, agree_steps: int, tau: float, seed: int, batch: int, *,
                r: int = 0, n_states: int = 2048, share: float = 0.5, object_weight: float = 1.0, bf16: bool | None = None,
                vae=None, scenes=None, per: int = 4):
    """Teach both backbones one picture per caption: its nominal layout (``canonical_data``). Training pictures
    jitter each object's place (±5 px) and size, and draw a size the caption leaves open at random; at small t the
    loss rewards the mean of those pictures, and what is left of it after twenty steps is a ragged blob, neither
    round nor square (docs/demo.md). Here every state of the sampler's whole trajectory (``trajectory_states``)
    and every ordinary sample of a caption is pulled to the same picture: the conditional backbone ``steps`` steps
    (as ``stage_finish``, late states weighted on the clean-picture estimate), then the image-only one
    ``agree_steps`` on new states of the new conditional backbone's trajectories (as ``stage_agree``: the
    conditional backbone's prediction where t >= tau, the nominal picture's target below). Seeds apart for the two
    halves, so a run resumed between them equals an unbroken one. ``per`` states a trajectory (``guided_states``):
    with 4 instead of 1 the states cost about 30 s instead of 80 a half-round on the Zen 4, and the model scored
    higher (docs/demo.md, "Four states per trajectory")."""
    paths = [work / f"{role}_canon{r + 1}.pt" for role in ("cond", "uncond")]
    lat, covers = canonical_data(work, vae, scenes)
    data = (lat, torch.arange(len(lat)))  # sample i is caption i
    pool = plain_pool(data, is_json)
    for part, (model, path) in enumerate(zip((cond, unc), paths)):
        if resume(model, path):
            continue
        g = torch.Generator().manual_seed(seed + 120 + part + 1000 * r)
        t0 = time.time()
        found = trajectory_states(cond, unc, data, feats, pool, n_states, tau, g, per=per)
        found = (*found, lat[found[0]].float(), covers[found[0]])
        log(f"canon round {r + 1} {('cond', 'uncond')[part]}: {n_states} states, {per} a trajectory ({time.time() - t0:.0f} s)")
        noise, sample_t = flow_sampling(g, SIZE, lat[:4096].float().mean(0), 0.0, 0.5)
        if part == 0:
            train_on_states(cond, "cond", found, data, feats, pool, steps, g, batch, noise, sample_t, share=share, objects=covers,
                            object_weight=object_weight, bf16=bf16, label=f"canon round {r + 1} cond", late_weight=0.5)
        else:
            train_on_states(unc, "uncond", found, data, feats, pool, agree_steps, g, batch, noise, sample_t, share=share, objects=covers,
                            object_weight=object_weight, bf16=bf16, label=f"canon round {r + 1} uncond",
                            targets=lambda xt, t, fb, target: agree_targets(cond, xt, t, fb, target, tau))
        torch.save(model.state_dict(), path)
        model.eval()
    return cond, unc


# -- 6. convert ---------------------------------------------------------------------------------
SIZE_ARGS = ["--size-range", "64..256", "--default-size", str(SIZE)]  # trained at 128 only; other sizes not measured yet
CONVERT = [
    # (args after `gguf-dit convert ROOT -o OUT`)
    ["--parts", "dit", "--role", "cond", "--recipe", "q4_k-protect", *SIZE_ARGS],
    ["--parts", "dit", "--role", "uncond", "--recipe", "q8_0", *SIZE_ARGS],
    ["--parts", "text_encoder,vae", "--te-type", TE_TYPE],
]


def dit_seed(a) -> int:
    """The seed of the DiT stages: ``--dit-seed``, or ``--seed`` when it is not given."""
    return a.seed if a.dit_seed is None else a.dit_seed


def dit_work(a) -> Path:
    """Where the DiT stages keep their files: --work itself for ``--seed``'s own draw, ``dit_seed<N>/`` under it for
    another ``--dit-seed`` (the stage files are not named by seed, so a redraw beside them would read theirs)."""
    return a.work if dit_seed(a) == a.seed else a.work / f"dit_seed{dit_seed(a)}"


def dit_plan(a) -> list[tuple[str, Path | None, Path | None]]:
    """The DiT stages main() runs, in order, each with the conditional and image-only weights it leaves in
    ``dit_work`` (None: that backbone is unchanged by the stage). A stage of several rounds (guided) names its last
    round's files."""
    w = dit_work(a)
    plan: list[tuple[str, Path | None, Path | None]] = [("dit", w / "cond.pt", None)]
    if a.late_steps:
        plan.append(("late", w / "cond_late.pt", None))
    plan.append(("copy", None, w / "uncond_copy.pt"))
    if a.own_steps:
        plan.append(("own", w / "cond_own.pt", w / "uncond_own.pt"))
    if a.guided_steps and a.guided_rounds:
        n = len(a.guided_rounds)
        plan.append(("guided", w / f"cond_guided{n}.pt", w / f"uncond_guided{n}.pt"))
    for r in range(max(a.finish_rounds, 1)):
        if a.finish_rounds:
            plan.append((f"finish{r + 1}", w / f"cond_finish{r + 1}.pt", None))
        if a.agree_steps:
            plan.append((f"agree{r + 1}", None, w / ("uncond_agree.pt" if r == 0 else f"uncond_agree{r + 1}.pt")))
    plan += [(f"canon{r + 1}", w / f"cond_canon{r + 1}.pt", w / f"uncond_canon{r + 1}.pt") for r in range(a.canon_rounds)]
    return plan


def continue_point(plan) -> tuple[int, Path, Path] | None:
    """Where a run can go on from: after the furthest stage k whose own files exist and for which the latest
    conditional and image-only weights at or before k exist too. Returns (k + 1, those two files), or None when no
    stage after the image-only copy has both backbones on disk (the stages then find their own caches)."""
    for k in range(len(plan) - 1, -1, -1):
        if not all(p.exists() for p in plan[k][1:] if p is not None) or all(p is None for p in plan[k][1:]):
            continue
        conds = [c for _, c, _ in plan[:k + 1] if c is not None]
        uncs = [u for _, _, u in plan[:k + 1] if u is not None]
        if conds and uncs and conds[-1].exists() and uncs[-1].exists():
            return k + 1, conds[-1], uncs[-1]
    return None


def load_dit(path: Path):
    from diffusers import Ideogram4Transformer2DModel

    model = compiled(Ideogram4Transformer2DModel(**DIT_CONFIG))
    model.load_state_dict(torch.load(path))
    return model.eval()


def main(argv=None) -> None:
    global BF16, RESUME_EVERY, COMPILE, COMPILE_TE, LENGTH_GROUPS, MIN_ENCODER_RIGHT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/demo128_ckpt"), help="checkpoint folder to write (official HF layout)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/demo128_work"), help="cache for intermediate stages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dit-seed", type=int, default=None, help="draw the DiT stages from this seed instead of --seed (the encoder, captions, autoencoder, latents and decoder stay --seed's); their files go to --work's dit_seed<N>/")
    ap.add_argument("--captions", type=int, default=12000, help="training (caption, scene) pairs")
    ap.add_argument("--images-per-caption", type=int, default=3)
    ap.add_argument("--language-pairs", type=int, default=20000, help="minimal pairs of the language corpus")
    ap.add_argument("--language-steps", type=int, default=2500, help="1000 left colours and shapes half learned; 2500 gives the probe 100 %% on training captions (docs/demo.md)")
    ap.add_argument("--language-lr", type=float, default=3e-3, help="the language stage's peak learning rate (one cycle, 5 %% warm-up); 3e-3 trained the shipped model, 1e-3 converged from more seeds (docs/demo.md)")
    ap.add_argument("--place-steps", type=int, default=800, help="then train the encoder with the place reader (PlaceReader) this many steps")
    ap.add_argument("--place-sink", action="store_true", help="give the place reader a learned key and value besides the caption's tokens, where a place with no object can look (PlaceReader; off: the shipped model)")
    ap.add_argument("--min-encoder-right", type=float, default=MIN_ENCODER_RIGHT, help="stop (exit code 2) after an encoder stage whose reader reads less than this share of its last training batches right (converged; 0: never)")
    ap.add_argument("--probe", action="store_true", help="after the language stage, log how well a reader trained on training captions' features reads the held-out ones")
    ap.add_argument("--vae-steps", type=int, default=2400)
    ap.add_argument("--roundtrip-renders", type=int, default=96, help="after the VAE and decoder stages, log the share of this many rendered objects per (shape, size) whose shape survives an encode -> decode round trip (roundtrip_shapes; 0: skip); the run's bytes are the same either way")
    ap.add_argument("--dit-steps", type=int, default=6000, help="phase 1 of the conditional backbone")
    ap.add_argument("--dit-lr", type=float, default=1.5e-3, help="peak learning rate of phase 1 (cosine to a tenth)")
    ap.add_argument("--late-steps", type=int, default=300, help="phase 2 of the conditional backbone: half the t drawn from the sampler's schedule, half the noise over-shot (see stage_dit)")
    ap.add_argument("--uncond-steps", type=int, default=600, help="the unconditional backbone: a copy of the conditional one, trained on image-only samples")
    ap.add_argument("--guided-steps", type=int, default=300, help="steps per backbone per round of training on the preset's own guided states (stage_guided; 0: none)")
    ap.add_argument("--guided-states", type=int, default=2048, help="sampler states per guided round (and per round of the later stages unless --later-states)")
    ap.add_argument("--later-states", type=int, default=None, help="sampler states per round of the finish, agreement and canon stages (default: --guided-states)")
    ap.add_argument("--guided-rounds", type=lambda v: [int(k) for k in v.split(",")], default=[3, 5, 8], help="k_max of each round: states after up to k guided steps (a third round, k <= 8, hurt the preset with unmatched targets and helps with --match: docs/demo.md)")
    ap.add_argument("--own-steps", type=int, default=0, help="before the guided rounds, train both backbones on the conditional one's own trajectories from noised training pictures (stage_own; 0: none, the default: docs/demo.md)")
    ap.add_argument("--own-from", type=lambda v: tuple(int(k) for k in v.split(",")), default=(2, 8), help="own_states start steps k_a: first,last")
    ap.add_argument("--match", type=int, default=48, help="sampler states from fresh noise are pulled to the nearest of this many layouts of their caption's scene (matched_pictures; 0: to a random training picture of it, as before)")
    ap.add_argument("--finish-rounds", type=int, default=1, help="rounds of stage_finish (the conditional backbone on matched states of its whole trajectory), each followed by the agreement (a second round did not help: docs/demo.md)")
    ap.add_argument("--finish-steps", type=int, default=600, help="steps per finish round (1200 instead of 600: 85.4 against 87.1 %%, docs/demo.md)")
    ap.add_argument("--canon-rounds", type=int, default=4, help="last, rounds of stage_canon: both backbones learn one picture per caption, its nominal layout (docs/demo.md: held-out 87.1 -> 90.3 %% after one round, 92.1 %% after two, torch harness; the from-scratch float32 run, through the runtime: 83.8 %% after two, 87.4 %% after three; the shipped bfloat16 run: 88.6 %% after three, 91.6 %% after four, and a fifth gave nothing on validation captions)")
    ap.add_argument("--canon-steps", type=int, default=600, help="conditional backbone steps per canon round (the image-only one: --agree-steps)")
    ap.add_argument("--agree-steps", type=int, default=400, help="then train the image-only backbone to agree with the conditional one where t >= --agree-tau (stage_agree; 0: none)")
    ap.add_argument("--agree-tau", type=float, default=0.3, help="from this t on, the image-only backbone learns the conditional one's prediction")
    ap.add_argument("--where-weight", type=float, default=0.1, help="weight of the conditional backbone's auxiliary \"where am I\" loss (0: none)")
    ap.add_argument("--object-weight", type=float, default=10.0, help="loss weight of the DiT tokens an object covers (1: plain MSE)")
    ap.add_argument("--caption-noise", type=float, default=0.1, help="share of conditional samples paired with another caption")
    ap.add_argument("--snapshot-every", type=int, default=0, help="also save EMA snapshots every N DiT steps (for evaluating a run in progress)")
    ap.add_argument("--resume-every", type=int, default=RESUME_EVERY, help="save the DiT stages' whole training state every N steps; a rerun with the same --work goes on from it (0: never)")
    ap.add_argument("--decoder-steps", type=int, default=600)
    ap.add_argument("--decoder-scenes", type=int, default=8000, help="scenes of every combination the decoder stages draw their clean pictures from (image_scenes)")
    ap.add_argument("--sampled-decoder-steps", type=int, default=0, help="then fine-tune the decoder on the preset's own pictures of training captions, targets their scenes in the nearest layout (stage_sampled_decoder; 0: none, as the shipped model; 600 gained run w 0.7 points and cost run w6 1.3, docs/demo.md)")
    ap.add_argument("--sampled-decoder-pictures", type=int, default=3072, help="pictures the sampled-decoder stage draws with the preset")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="DiT matmuls under bfloat16 autocast or in float32; auto (default): bfloat16 where the CPU has it natively (native_bf16: 3x faster than float32 on a Zen 5 with AVX512_BF16, 28x slower on an AVX2-only Zen 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="run the DiT's layers through torch.compile (compiled; the default, as the shipped model was trained): 1.29x faster DiT stages on a Zen 4; --no-compile trains eagerly, a different model from the same seed (rounding), so keep its --work apart")
    ap.add_argument("--canon-states-per-trajectory", type=int, default=4, help="states each canon round takes from one sampler trajectory, at distinct steps (guided_states per): a quarter of the trajectories for the same states (4, the default, as the shipped model was trained: 91.9 %% against 90.5 %% with 1, and the canon rounds 1572 s against 1991 s on the Zen 4; docs/demo.md)")
    ap.add_argument("--finish-states-per-trajectory", type=int, default=1, help="the same for the finish and agreement rounds' sampler states (default 1, as the shipped model was trained; 4 made their states 90 and 60 s quicker on the Zen 4, but the one run with it and --compile-encoder scored 86.9 %%, below the bar: docs/demo.md, run q)")
    ap.add_argument("--compile-encoder", action=argparse.BooleanOptionalAction, default=False, help="run the text encoder's training forward through torch.compile, whole, every batch padded to the corpus's longest caption (train_encoder): its stage 1135 s instead of ~1470 on a Zen 4, compilation included; another model, and NOT deterministic: two runs can train different encoders (off by default: for timing experiments only; the one run with it and 4 --finish-states-per-trajectory scored 86.9 %%, docs/demo.md, run q)")
    ap.add_argument("--length-groups", action=argparse.BooleanOptionalAction, default=True, help="split each conditional DiT batch into runs of similar caption length (length_groups; the default, as the shipped model was trained); --no-length-groups runs the batch as one, padded to its longest caption: fewer, larger forwards, another model (rounding); its one whole run, on a 2-core AMX Xeon, took 1 h 20 min and scored 82.5 %%, below the bar (docs/demo.md, run r2)")
    ap.add_argument("--convert-to", type=Path, default=None, help="also run gguf-dit convert into this folder")
    ap.add_argument("--stop-after", choices=("language", "features", "vae", "latents", "dit"), default=None, help="stop after this stage (for checks)")
    a = ap.parse_args(argv)
    if a.finish_rounds and not a.match:
        ap.error("--finish-rounds needs --match (its states have no picture of their own)")
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    COMPILE = a.compile
    MIN_ENCODER_RIGHT = a.min_encoder_right
    COMPILE_TE = a.compile_encoder
    LENGTH_GROUPS = a.length_groups
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    lang = language_pairs(a.language_pairs, a.seed)
    train = train_pairs(a.captions, a.seed)
    stage_skeleton(a.root, a.work, lang, train)
    stage_language(a.root, a.work, lang, a.language_steps, a.seed, lr=a.language_lr)
    if a.place_steps:
        stage_place(a.root, a.work, lang, a.place_steps, a.seed, sink=a.place_sink)
    log(f"text encoder trained ({time.time() - t0:.0f} s)")
    if a.probe:
        log(f"probe {json.dumps(probe(a.root, a.work, a.seed))}")
    if a.stop_after == "language":
        return
    feats = stage_features(a.root, a.work, train)
    is_json = torch.tensor([isinstance(c, dict) for c, _ in train])
    if a.stop_after == "features":
        return
    scenes = [s for _, s in train]
    vae = stage_vae(a.work, scenes[:8000], a.vae_steps, a.seed)
    log(f"vae ready ({time.time() - t0:.0f} s)")
    log_roundtrip(vae, "vae", a.roundtrip_renders)
    if a.stop_after == "vae":
        return
    RESUME_EVERY = a.resume_every
    BF16 = bf16 = {"auto": native_bf16(), "bf16": True, "fp32": False}[a.precision]
    log(f"DiT precision: {'bfloat16 autocast' if bf16 else 'float32'} (--precision {a.precision})")
    data = stage_latents(a.work, vae, train, a.images_per_caption, a.seed)
    if a.stop_after == "latents":
        return
    objects = object_tokens(a.work, train, a.images_per_caption, a.seed) if a.object_weight != 1.0 else None
    seed, work = dit_seed(a), dit_work(a)
    work.mkdir(exist_ok=True)
    if seed != a.seed:
        log(f"DiT stages from --dit-seed {seed} in {work}")

    # The DiT stages in order, each a function of the two backbones so far (see dit_plan for the files each leaves).
    def first_phase(cond, unc):
        return stage_dit(work, data, feats, is_json, a.dit_steps, seed, a.batch, caption_noise=a.caption_noise, snapshot_every=a.snapshot_every,
                         lr=a.dit_lr, bf16=bf16, where_weight=a.where_weight, objects=objects, object_weight=a.object_weight), unc

    def second_phase(cond, unc):
        # No "where" probe here: a fresh head would start at chance and pull on the first block, which already knows.
        return stage_dit(work, data, feats, is_json, a.late_steps, seed, a.batch, caption_noise=a.caption_noise,
                         lr=5e-4, warm=50, schedule_t=0.5, overshoot=3.0, init=cond, tag="late", bf16=bf16,
                         objects=objects, object_weight=a.object_weight), unc

    def copy(cond, unc):
        # The image-only backbone starts as a copy of the conditional one: guidance multiplies whatever the two
        # backbones disagree on, and two separately initialised networks disagree by their own, unrelated errors
        # where the picture is already decided (docs/demo.md: the first 64×64 release ran away that way).
        # Its loss weighs objects as the conditional one's does, so that the two weigh their errors alike.
        return cond, stage_dit(work, data, feats, is_json, a.uncond_steps, seed, a.batch, role="uncond",
                               lr=5e-4, warm=50, schedule_t=0.5, init=cond, tag="copy", bf16=bf16, objects=objects, object_weight=a.object_weight)

    def own(cond, unc):
        return stage_own(work, cond, unc, data, feats, is_json, a.own_steps, a.own_from, seed, a.batch,
                         n_states=a.guided_states, objects=objects, object_weight=a.object_weight, bf16=bf16)

    def guided(cond, unc):
        return stage_guided(work, cond, unc, data, feats, is_json, a.guided_rounds, a.guided_steps, seed, a.batch,
                            n_states=a.guided_states, objects=objects, object_weight=a.object_weight, bf16=bf16,
                            match=a.match, vae=vae, scenes=scenes)

    def finish(r):
        return lambda cond, unc: (stage_finish(work, cond, unc, data, feats, is_json, a.finish_steps, a.agree_tau, seed, a.batch, r=r,
                                               n_states=a.later_states or a.guided_states, objects=objects, object_weight=a.object_weight, bf16=bf16,
                                               match=a.match, vae=vae, scenes=scenes, per=a.finish_states_per_trajectory), unc)

    def agree(r):
        return lambda cond, unc: (cond, stage_agree(work, cond, unc, data, feats, is_json, a.agree_steps, a.agree_tau, seed, a.batch, r=r,
                                                    n_states=a.later_states or a.guided_states, objects=objects, object_weight=a.object_weight, bf16=bf16,
                                                    match=a.match, vae=vae, scenes=scenes, per=a.finish_states_per_trajectory))

    def canon(r):
        return lambda cond, unc: stage_canon(work, cond, unc, feats, is_json, a.canon_steps, a.agree_steps, a.agree_tau, seed, a.batch, r=r,
                                             n_states=a.later_states or a.guided_states, object_weight=a.object_weight, bf16=bf16, vae=vae, scenes=scenes,
                                             per=a.canon_states_per_trajectory)

    run = {"dit": first_phase, "late": second_phase, "copy": copy, "own": own, "guided": guided,
           **{f"finish{r + 1}": finish(r) for r in range(a.finish_rounds)}, **{f"agree{r + 1}": agree(r) for r in range(max(a.finish_rounds, 1))},
           **{f"canon{r + 1}": canon(r) for r in range(a.canon_rounds)}}
    plan = dit_plan(a)
    start, cond, unc = 0, None, None
    point = continue_point(plan)
    if point is not None:
        # Both backbones of a later stage are on disk (a run carried over from another machine, docs/demo.md):
        # the stages before it are not needed, and a stage run from its cached inputs gives the same bytes.
        start, cond_path, unc_path = point
        cond, unc = (load_dit(p) for p in (cond_path, unc_path))
        log(f"continuing after stage {plan[start - 1][0]} from {cond_path.name} and {unc_path.name}")
    for name, *_ in plan[start:]:
        cond, unc = run[name](cond, unc)
    log(f"dit ready ({time.time() - t0:.0f} s)")
    if a.stop_after == "dit":
        return
    vae = stage_decoder(a.work, vae, image_scenes(a.decoder_scenes, a.seed), a.decoder_steps, a.seed)
    log(f"decoder fine-tuned ({time.time() - t0:.0f} s)")
    log_roundtrip(vae, "decoder", a.roundtrip_renders)
    if a.sampled_decoder_steps:
        vae = stage_sampled_decoder(work, vae, cond, unc, data, feats, is_json, scenes, image_scenes(a.decoder_scenes, a.seed), a.sampled_decoder_steps,
                                    a.sampled_decoder_pictures, a.seed, seed)
        log(f"sampled decoder fine-tuned ({time.time() - t0:.0f} s)")
        log_roundtrip(vae, "sampled decoder", a.roundtrip_renders)
    # bfloat16, as the text encoder already is: the checkpoint is small enough to ship (checkpoints/demo/, 15 MB
    # against 28 in float32) and is then exactly the source the shipped GGUFs were converted from.
    save(a.root, vae, cond, unc, DIT_CONFIG, VAE_CONFIG, dtype=torch.bfloat16)
    if a.convert_to:
        for extra in CONVERT:
            subprocess.run([sys.executable, "-m", "gguf_dit.cli", "convert", str(a.root), "-o", str(a.convert_to), "-q", "--force", *extra], check=True)
        log(f"converted to {a.convert_to}")


if __name__ == "__main__":
    main()
