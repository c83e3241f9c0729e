"""Checks for a 128×128 demo run in progress (issue 13; docs/demo.md, "Toward a 128×128 demo"). Not shipped.

    python scripts/demo128_checks.py caption --feats taught --steps 400     # does a fresh DiT read the captions?
    python scripts/demo128_checks.py caption --feats oracle --steps 1500 --save /tmp/oracle.pt
    python scripts/demo128_checks.py draw /tmp/demo128_work/snapshot_cond_2000.pt --n 30   # guidance 1, held out
    python scripts/demo128_checks.py draw /tmp/oracle.pt --feats oracle

``caption`` trains a conditional DiT (``train_demo128.DIT_CONFIG``, bf16 autocast, constant lr after a 100-step
warm-up, raw weights, no wrong captions) on the cached latents of a ``train_demo128.py`` work folder, and every
``--every`` steps prints the flow-matching loss at fixed t on 48 training samples, same x_t, with each sample's
own caption and with another sample's: the caption is read when "right" is clearly below "wrong" at small t. At
mid-range t, x_t already shows the picture and the two are close even in a model that reads.

``--feats``: ``taught`` (the work folder's encoder features, what the runtime gives), ``oracle`` (one made-up
416-d token per attribute: what perfect features would give; a reference for how fast the DiT can learn),
``random`` (noise of the features' shapes: nothing to read).

``draw`` samples held-out prompts with a torch Euler loop on the runtime's default-20 schedule (by default guidance
1, the conditional backbone alone; ``--uncond STATE --guidance preset`` for the preset's guidance, ``--trace`` for
the two backbones' disagreement per step), decodes with the work folder's fine-tuned decoder (``--vae`` for
another) and scores with ``regions``, also split by object count and by held-out combination. A quick look at a
snapshot, not the shipped path (``regions.evaluate`` runs converted files through the real pipeline).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo128 as T  # noqa: E402
from train_demo import dit_forward, flow_sampling  # noqa: E402

from gguf_dit.demo import captions as C, regions as R, scene as S  # noqa: E402

GRID = (S.SIZE // 16, S.SIZE // 16)


def oracle_features(scenes, dim: int, seed: int = 1) -> list[torch.Tensor]:
    """One fixed random vector per (slot, value): background, then per object shape, colour, place, size."""
    emb = torch.randn(200, dim, generator=torch.Generator().manual_seed(seed)) * 3
    out = []
    for s in scenes:
        ids = [190 + list(S.BACKGROUNDS).index(s.background)]
        for j, o in enumerate(s.objects):
            ids += [50 * j + S.SHAPES.index(o.shape), 50 * j + 5 + list(S.COLOURS).index(o.colour),
                    50 * j + 10 + list(S.POSITIONS).index(o.position), 50 * j + 20 + (list(S.SIZES).index(o.size) if o.size else 2)]
        out.append(emb[ids].half())
    return out


def new_dit(state: Path | None = None):
    from diffusers import Ideogram4Transformer2DModel

    model = Ideogram4Transformer2DModel(**T.DIT_CONFIG)
    if state:
        model.load_state_dict(torch.load(state))
    return model


def caption(a) -> None:
    lat, cap = torch.load(a.work / "latents.pt")
    train = T.train_pairs(a.captions, a.seed)
    if a.feats == "oracle":
        feats = oracle_features([s for _, s in train], T.DIT_CONFIG["llm_features_dim"])
    else:
        feats = torch.load(a.work / "text_features.pt")
        if a.feats == "random":
            g = torch.Generator().manual_seed(1)
            feats = [torch.randn(f.shape, generator=g).half() * 3 for f in feats]
    torch.manual_seed(a.seed)
    model = new_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    g = torch.Generator().manual_seed(a.seed + 5)
    noise, sample_t = flow_sampling(g, S.SIZE, lat[:4096].float().mean(0), 0.0, 0.0)
    ge = torch.Generator().manual_seed(a.seed + 9)
    ev = torch.randint(0, len(lat), (48,), generator=ge)
    ex1 = lat[ev].float()
    eeps = torch.randn(ex1.shape, generator=ge)
    right, wrong = [feats[int(cap[i])] for i in ev], [feats[int(cap[i])] for i in ev.roll(1)]

    def check(step: int) -> None:
        model.eval()
        out = []
        with torch.no_grad():
            for tv in (0.02, 0.2, 0.5):
                t = torch.full((len(ev),), tv)
                xt, target = tv * ex1 + (1 - tv) * eeps, ex1 - eeps
                lr_, lw = (F.mse_loss(dit_forward(model, xt, t, f, GRID), target).item() for f in (right, wrong))
                out.append(f"t={tv}: right {lr_:.3f} wrong {lw:.3f}")
        print(f"step {step} | " + " | ".join(out), flush=True)
        model.train()

    t0, smooth = time.time(), None
    for step in range(a.steps):
        idx = torch.randint(0, len(lat), (a.batch,), generator=g)
        x1 = lat[idx].float()
        eps = noise(x1)
        t = sample_t(a.batch)
        xt = t[:, None, None] * x1 + (1 - t[:, None, None]) * eps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = dit_forward(model, xt, t, [feats[int(k)] for k in cap[idx]], GRID)
        loss = F.mse_loss(v.float(), x1 - eps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step} loss {smooth:.4f} ({time.time() - t0:.0f} s)", flush=True)
        if (step + 1) % a.every == 0:
            check(step + 1)
            if a.save:
                torch.save(model.state_dict(), a.save)


def draw(a) -> None:
    from diffusers import AutoencoderKLFlux2

    from gguf_dit.arch.latent import LATENT_SCALE, LATENT_SHIFT
    from gguf_dit.runtime.schedule import resolve_settings, timesteps
    from gguf_dit.runtime.text_encoder import TextEncoder

    test = C.pairs(a.part, a.n, 0)
    if a.feats == "oracle":
        feats = oracle_features([s for _, s in test], T.DIT_CONFIG["llm_features_dim"])
    else:
        enc = TextEncoder.load(a.work / "te" / "text_encoder.gguf")
        try:
            feats = [torch.from_numpy(enc.encode(C.encoder_string(c))).half() for c, _ in test]
        finally:
            enc.close()
    model = new_dit(a.state).eval()
    unc = new_dit(a.uncond).eval() if a.uncond else None
    st = resolve_settings(a.preset, guidance=None if a.guidance == "preset" else a.guidance)
    if unc is None and any(g != 1.0 for g in st.guidance):
        raise SystemExit("guidance other than 1 needs --uncond")
    ts = timesteps(st.steps, S.SIZE, S.SIZE, st.mu, st.std)
    z = torch.randn(len(test), GRID[0] * GRID[1], 128, generator=torch.Generator().manual_seed(0))
    vae = AutoencoderKLFlux2(**T.VAE_CONFIG)
    vae.load_state_dict(torch.load(a.vae or a.work / "vae_decoder.pt"))
    with torch.no_grad():
        for k in range(st.steps):
            t = torch.full((len(test),), float(ts[k])).to(torch.bfloat16).float()
            v = dit_forward(model, z, t, feats, GRID)
            if st.guidance[k] != 1.0:
                vu = dit_forward(unc, z, t, None, GRID)
                if a.trace:  # the table of docs/demo.md: how far the two backbones disagree along the guided path
                    print(f"step {k} t {float(ts[k]):.3f} rms x {z.pow(2).mean().sqrt():.2f} rms v_c - v_u {(v - vu).pow(2).mean().sqrt():.3f}")
                v = vu + st.guidance[k] * (v - vu)
            z = z + v * (float(ts[k + 1]) - float(ts[k]))
        lat = z * torch.from_numpy(LATENT_SCALE.copy()) + torch.from_numpy(LATENT_SHIFT.copy())  # inverse of latent_tokens
        lat = lat.view(-1, *GRID, 2, 2, 32).permute(0, 5, 1, 3, 2, 4).reshape(-1, 32, 2 * GRID[0], 2 * GRID[1])
        img = vae.eval().decode(lat).sample
    img = T.to_uint8(img)
    found = [R.analyse(im) for im in img]
    graded = [R.grade(sc, f) for (_, sc), f in zip(test, found)]
    for label, keep in (("all", lambda sc: True), ("one object", lambda sc: len(sc.objects) == 1), ("two objects", lambda sc: len(sc.objects) == 2)):
        r = R.score([g for (_, sc), g in zip(test, graded) if keep(sc)])
        print(label, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
    # Per object: its colour, shape and place, split by whether training ever showed that colour on that background
    # and that (shape, colour, place) triple (captions.SPLIT holds both kinds out).
    for label, held in (("held-out colour/background", lambda o, sc: (o.colour, sc.background) in C.SPLIT.colour_bg),
                        ("held-out triple", lambda o, sc: (o.shape, o.colour, o.position) in C.SPLIT.triples)):
        for inside in (True, False):
            objs = [(o, f) for (_, sc), fd in zip(test, found) for o, f in zip(sc.objects, R.match(sc, fd["objects"])) if held(o, sc) == inside]
            if objs:
                right = {k: np.mean([f is not None and f[k] == getattr(o, k) for o, f in objs]) for k in ("colour", "shape", "position")}
                print(f"{label} {'yes' if inside else 'no'} ({len(objs)} objects): " + ", ".join(f"{k} {v:.3f}" for k, v in right.items()))
    if a.save:
        from PIL import Image

        rows = [np.concatenate(list(img[i:i + 10]), 1) for i in range(0, len(img) - len(img) % 10, 10)]
        Image.fromarray(np.concatenate(rows, 0)).save(a.save)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("caption", "draw"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, default=Path("/tmp/demo128_work"), help="a train_demo128.py work folder (latents, features, VAE)")
        p.add_argument("--feats", choices=("taught", "oracle", "random"), default="taught")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--save", type=Path, help="caption: the trained weights; draw: a grid of the pictures")
    c = sub.choices["caption"]
    c.add_argument("--captions", type=int, default=12000, help="as the work folder was made with")
    c.add_argument("--steps", type=int, default=400)
    c.add_argument("--every", type=int, default=100)
    c.add_argument("--lr", type=float, default=1.5e-3)
    c.add_argument("--batch", type=int, default=32)
    d = sub.choices["draw"]
    d.add_argument("state", type=Path, help="a conditional DiT state dict (a snapshot, cond.pt, or caption --save)")
    d.add_argument("--n", type=int, default=30)
    d.add_argument("--part", default="test", help="captions.pairs part: test (held out) or train")
    d.add_argument("--uncond", type=Path, help="the unconditional backbone's state dict (for guidance other than 1)")
    d.add_argument("--preset", default="default-20")
    d.add_argument("--vae", type=Path, help="VAE state dict (default: the work folder's vae_decoder.pt)")
    d.add_argument("--trace", action="store_true", help="print, per guided step, rms of x and of v_cond - v_uncond")
    d.add_argument("--guidance", default="1", help="guidance schedule (parse_guidance syntax); \"preset\": the preset's own")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    (caption if a.cmd == "caption" else draw)(a)


if __name__ == "__main__":
    main()
