"""Time of the 128×128 demo's DiT training step and sampler forward with the batch split by caption length
(``scripts/train_demo128.py``: ``dit_forward`` on ``length_groups``), against one batch padded to its longest
caption (the baseline: ``train_demo.dit_forward``, as the script ran until 4 December 2026).

The caption lengths are the real ones: the script's 12,000 training captions tokenized by the tokenizer its
skeleton stage learns (built here in a temporary folder, about a minute), and batches are drawn as the script
draws them: a training batch is all JSON captions (a quarter of the batches, 60–153 tokens) or all plain text
(32–57 tokens), as ``stage_dit``'s pools make it; a sampler batch is plain text (``plain_pool``). Random-initialised backbone of ``train_demo128.DIT_CONFIG`` and random feature
values (the cost does not depend on them); the same batches for every variant; precision as ``--precision auto``
picks it on this CPU. A training step is forward + backward + AdamW at batch 32; a sampler forward is batch 64
without gradients (``guided_states``). ``--costs`` also times other values of ``GROUP_COST``. ``--compile`` also
times the length groups through ``torch.compile(model, dynamic=True)`` (inductor), and through the script's own
``--compile`` (``train_demo128.compiled``: each layer's forward compiled, on a copy of the model), and the
script's ``--compile`` on one padded batch (``--no-length-groups``): each first runs every batch once untimed,
since each new group size may compile again, and reports that warm-up.

    python benchmarks/train_step_groups.py [--steps 48] [--costs 0,128,512] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gguf_dit.sysinfo import cpu_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_demo128 as T  # noqa: E402
from train_demo import dit_forward as padded_forward  # noqa: E402


def caption_lengths(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Token count and is-JSON of each of the script's first ``n`` training captions."""
    from gguf_dit.demo import captions as C
    from gguf_dit.runtime.text_encoder import TextEncoder

    with tempfile.TemporaryDirectory() as tmp:
        root, work = Path(tmp) / "ckpt", Path(tmp) / "work"
        work.mkdir()
        train = T.train_pairs(n, 0)
        T.stage_skeleton(root, work, T.language_pairs(20000, 0), train)
        enc = TextEncoder.load(T.convert_te(root, work / "te"))
        try:
            return (np.array([len(enc.tokenize(C.encoder_string(c))) for c, _ in train]),
                    np.array([isinstance(c, dict) for c, _ in train]))
        finally:
            enc.close()


def timed(fn, reps: int) -> float:
    fn(0)  # warm-up on batch 0; batches 1..reps are timed
    t0 = time.perf_counter()
    for r in range(1, reps + 1):
        fn(r)
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=48, help="batches timed per variant (after one warm-up); a quarter are JSON, so fewer make the ratio depend on the draw (16 read 1.51x where 48 read 1.15x)")
    ap.add_argument("--costs", type=lambda v: [int(c) for c in v.split(",")], default=[T.GROUP_COST])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the length groups under torch.compile")
    a = ap.parse_args(argv)
    from diffusers import Ideogram4Transformer2DModel

    lengths, is_json = caption_lengths(12000)
    plain, json_ = lengths[~is_json], lengths[is_json]
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    T.BF16 = T.native_bf16()
    torch.manual_seed(0)
    model = Ideogram4Transformer2DModel(**T.DIT_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    rng = np.random.default_rng(0)

    def batches(b: int, json_share: float):
        out = []
        for _ in range(a.steps + 1):
            pool = json_ if rng.random() < json_share else plain
            n = pool[rng.integers(0, len(pool), b)]
            out.append((torch.randn(b, 64, 128), torch.rand(b), [rng.standard_normal((k, 416)).astype(np.float16) for k in n]))
        return out

    train_b, sample_b = batches(32, 0.25), batches(64, 0.0)
    print(f"{cpu_line()}, torch {torch.__version__}, {a.threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {'bfloat16 autocast' if T.BF16 else 'float32'} "
          f"(native bfloat16: {T.native_bf16()})")
    print(f"caption tokens: plain text mean {plain.mean():.1f} (max {plain.max()}), JSON mean {json_.mean():.1f} (max {json_.max()}); "
          f"text tokens per sample in the timed training batches: {np.mean([f.shape[0] for b in train_b[1:] for f in b[2]]):.1f}, "
          f"padded to each batch's longest: {np.mean([max(f.shape[0] for f in b[2]) for b in train_b[1:]]):.1f}")

    def train_step(fwd, r=0, o=opt):
        x, t, f = train_b[r]
        with T.low_precision():
            loss = fwd(model, x, t, f, (8, 8)).float().pow(2).mean()
        o.zero_grad()
        loss.backward()
        o.step()

    def sample(fwd, r=0):
        x, t, f = sample_b[r]
        with torch.no_grad(), T.low_precision():
            fwd(model, x, t, f, (8, 8))

    variants = [("one padded batch (baseline)", padded_forward)]
    for c in a.costs:
        variants.append((f"length groups, GROUP_COST {c}", lambda m, x, t, f, g, c=c: T.dit_forward(m, x, t, f, g, cost=c)))
    rows = [(name, timed(lambda r=0: train_step(fwd, r), a.steps), timed(lambda r=0: sample(fwd, r), a.steps)) for name, fwd in variants]
    if a.compile:
        # the whole model, and layer by layer as the script's --compile does it (train_demo128.compiled), on a copy
        T.COMPILE = True
        layered = T.compiled(copy.deepcopy(model))
        layered_opt = torch.optim.AdamW(layered.parameters(), 1e-4)
        whole = torch.compile(model, dynamic=True)
        warm = {}
        for name, m, o, split in (("length groups, torch.compile, whole model", whole, opt, T.dit_forward),
                                  ("length groups, torch.compile, layers (--compile)", layered, layered_opt, T.dit_forward),
                                  ("one padded batch, torch.compile, layers (--compile --no-length-groups)", layered, layered_opt, padded_forward)):
            fwd = lambda _m, x, t, f, g, m=m, split=split: split(m, x, t, f, g)  # noqa: E731
            t0 = time.perf_counter()
            for r in range(a.steps + 1):
                train_step(fwd, r, o)
                sample(fwd, r)
            warm[name] = time.perf_counter() - t0
            rows.append((name, timed(lambda r=0: train_step(fwd, r, o), a.steps), timed(lambda r=0: sample(fwd, r), a.steps)))
    print(f"{'variant':<72}{'train s/step':>14}{'speed-up':>10}{'sample s/fwd':>14}{'speed-up':>10}")
    for name, tr, sa in rows:
        print(f"{name:<72}{tr:>14.3f}{rows[0][1] / tr:>10.2f}{sa:>14.3f}{rows[0][2] / sa:>10.2f}")
    if a.compile:
        for name, w in warm.items():
            print(f"{name} warm-up (compilation and one untimed pass over the batches): {w:.0f} s")
    x, t, f = sample_b[0]
    with torch.no_grad(), T.low_precision():
        diff = (padded_forward(model, x, t, f, (8, 8)).float() - T.dit_forward(model, x, t, f, (8, 8)).float()).abs().max().item()
    print(f"largest |difference| between the two forwards' outputs: {diff:.2e}")


if __name__ == "__main__":
    main()
