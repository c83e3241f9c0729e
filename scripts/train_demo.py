"""Train the embedded demo model (issue 5) from a seed, on CPU, and write it as an official HF checkpoint.

    python scripts/train_demo.py --root /tmp/demo_ckpt --work /tmp/demo_work --convert-to runtime/demo_model

(needs the test extras: diffusers, transformers; the defaults are the shipped recipe, see docs/demo.md).

Stages, each cached under --work (delete a file to redo its stage):
1. skeleton: ``converter/tiny.py`` writes the full tiny checkpoint, with the tokenizer's BPE merges learned on the
   captions; the 36-layer Qwen3-VL-layout text encoder stays random and frozen. The encoder is converted with the
   real CLI (the same type as shipped) and every distinct caption string is encoded once with the runtime's
   ``TextEncoder``, so the DiT trains on exactly the features the runtime will give it.
2. vae: a FLUX.2-architecture autoencoder (diffusers ``AutoencoderKLFlux2``, channels 8/16/32/32, 32 latent
   channels, ×8 down) trained on the images; an exact per-channel affine is then folded into ``quant_conv`` /
   ``post_quant_conv`` so that the Ideogram 4 latent normalisation (``latent_norm``) maps the latents of the
   data set to zero mean / unit variance.
3. dit: the conditional backbone (text tokens then image tokens, the official packed sequence), diffusers
   ``Ideogram4Transformer2DModel`` in float32, official flow matching: x_t = t·x1 + (1 − t)·ε (t = 0 is noise),
   target v = x1 − ε, t logit-normal, a quarter of the captions deliberately wrong; a second phase on the
   sampler's own t. Then the unconditional backbone (image tokens only): a copy of the conditional one trained on
   image-only samples, so that the two make the same errors where the caption no longer matters (see ``main``).
   Saved weights are exponential moving averages.
4. decoder: the VAE decoder is fine-tuned with the encoder frozen (same latent space, sharper pictures).
5. save: ``transformer/`` and ``unconditional_transformer/`` with the official fused names, ``vae/``; with
   ``--convert-to``, the ``CONVERT`` commands below (the real ``gguf-dit convert``).

Deterministic: fixed seeds, ``torch.use_deterministic_algorithms``, single process, a fixed thread count.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gguf_dit.demo import data as D

DIT_CONFIG = dict(
    in_channels=128, num_layers=3, attention_head_dim=256, num_attention_heads=1, intermediate_size=512,
    adaln_dim=128, llm_features_dim=416, rope_theta=5_000_000, mrope_section=[24, 20, 20], norm_eps=1e-5,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=32, block_out_channels=[8, 16, 32, 32], layers_per_block=1,
    norm_num_groups=8, act_fn="silu", down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True, patch_size=[2, 2], batch_norm_eps=1e-4,
)
TE_TYPE = "q8_0"


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# -- 1. skeleton + text features ------------------------------------------------------------
def stage_skeleton(root: Path, work: Path) -> dict[str, np.ndarray]:
    from gguf_dit.converter.tiny import write_tiny_checkpoint

    feats_path = work / "text_features.npz"
    if feats_path.exists():
        z = np.load(feats_path, allow_pickle=False)
        return {str(k): z[k] for k in z.files}
    # The tokenizer's merges are learned on the captions (plus the chat template's words), so a caption is
    # ~30 tokens instead of ~150 bytes: training is ~4x cheaper and each colour/shape/place word is one token.
    corpus = [s for k in D.COMBOS for s in D.encoder_strings(*k)] + ["user\n", "assistant\n"] * 2
    write_tiny_checkpoint(root, force=True, tokenizer_corpus=corpus)
    te_dir = work / "te"
    subprocess.run([sys.executable, "-m", "gguf_dit.cli", "convert", str(root), "-o", str(te_dir), "--parts", "text_encoder",
                    "--te-type", TE_TYPE, "-q", "--force"], check=True)
    from gguf_dit.runtime.text_encoder import TextEncoder

    enc = TextEncoder.load(te_dir / "text_encoder.gguf")
    feats = {}
    try:
        for k in D.COMBOS:
            for s in D.encoder_strings(*k):
                feats[s] = enc.encode(s)
    finally:
        enc.close()
    # npz keys must be plain names: store strings alongside
    np.savez(feats_path, **{s: f for s, f in feats.items()})
    log(f"encoded {len(feats)} caption strings")
    return feats


# -- 2. VAE -----------------------------------------------------------------------------------
def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """A decoder's (B, 3, H, W) output in [-1, 1] -> (B, H, W, 3) uint8 pictures: ``to_tensor``'s inverse, rounded."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def fold_latent_norm(vae, mu: torch.Tensor, batch_norm_eps: float) -> None:
    """Fold a per-channel affine into quant_conv / post_quant_conv: new latent z' = a·z + b, so that
    (z' − LATENT_SHIFT) / LATENT_SCALE (token layout, averaged over the 4 patch offsets) is standardised over ``mu``
    (the data set's posterior means); the decoder sees the same z as before."""
    from gguf_dit.arch.latent import LATENT_SCALE, LATENT_SHIFT
    from gguf_dit.converter.tiny import latent_bn

    m, s = mu.mean(dim=(0, 2, 3)), mu.std(dim=(0, 2, 3))
    shift = torch.from_numpy(LATENT_SHIFT.reshape(4, 32).mean(0))
    scale = torch.from_numpy(LATENT_SCALE.reshape(4, 32).mean(0))
    a = scale / s
    b = shift - a * m
    # quant_conv produces [mean, logvar]: scale the mean rows, shift the logvar rows by 2 ln a
    qw, qb = vae.quant_conv.weight, vae.quant_conv.bias
    qw[:32] *= a[:, None, None, None]
    qb[:32] = qb[:32] * a + b
    qb[32:] += 2 * torch.log(a)
    pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias
    pb -= (pw[:, :, 0, 0] * (b / a)[None]).sum(1)
    pw /= a[None, :, None, None]
    for k, v in latent_bn(batch_norm_eps).items():
        vae.get_buffer(k).copy_(v)


def stage_vae(root: Path, work: Path, steps: int, seed: int, per_combo: int = 24):
    from diffusers import AutoencoderKLFlux2

    path = work / "vae.pt"
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**VAE_CONFIG)
    if path.exists():
        vae.load_state_dict(torch.load(path))
        return vae.eval()
    imgs, _ = D.make_images(D.TRAIN, per_combo, seed=seed + 1)
    x_all = to_tensor(imgs)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 2)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (8,), generator=g)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        z = post.mean  # the DiT is trained on the posterior mean; a small L2 keeps the latents bounded
        rec = vae.decode(z).sample
        kl = z.pow(2).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} latent l2 {kl.item():.3f} ({time.time() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        mu = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
        fold_latent_norm(vae, mu, VAE_CONFIG["batch_norm_eps"])
        rec = vae.decode(vae.encode(x_all[:256]).latent_dist.mean).sample
        log(f"vae reconstruction mse {F.mse_loss(rec, x_all[:256]).item():.5f} (after fold)")
    torch.save(vae.state_dict(), path)
    return vae


def latent_tokens(vae, imgs: np.ndarray) -> torch.Tensor:
    """Images -> normalised DiT tokens (B, N, 128): inverse of runtime/vae.py tokens_to_latents."""
    from gguf_dit.arch.latent import LATENT_SCALE, LATENT_SHIFT

    x = to_tensor(imgs)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])  # (B, 32, 2gh, 2gw)
    B, c, H, W = z.shape
    gh, gw = H // 2, W // 2
    t = z.view(B, c, gh, 2, gw, 2).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, 4 * c)  # dim (ph*2+pw)*32+c
    return (t - torch.from_numpy(LATENT_SHIFT.copy())) / torch.from_numpy(LATENT_SCALE.copy())


def stage_decoder(work: Path, vae, steps: int, seed: int, per_combo: int = 24):
    """Fine-tune the decoder (and post_quant_conv) with the encoder frozen: the latent space the DiT learned
    stays exactly the same, the pictures get sharper. Latents get a little noise, as DiT samples are not exact."""
    path = work / "vae_decoder.pt"
    if path.exists():
        vae.load_state_dict(torch.load(path))
        return vae.eval()
    imgs, _ = D.make_images(D.TRAIN, per_combo, seed=seed + 5)
    x_all = to_tensor(imgs)
    with torch.no_grad():
        z_all = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 6)
    t0 = time.time()
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (8,), generator=g)
        z = z_all[idx] + 0.1 * 1.65 * torch.randn(z_all[idx].shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x_all[idx]) + F.mse_loss(rec, x_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    torch.save(vae.state_dict(), path)
    return vae


# -- 3. DiT -------------------------------------------------------------------------------------
def batch_inputs(x: torch.Tensor, feats: list[np.ndarray] | None, grid):
    """Pack a batch: per sample [text, image, padding]; padding gets segment 0 so it is never attended to."""
    from gguf_dit.runtime.dit import positions

    B, n_img, _ = x.shape
    gh, gw = grid
    n_text = [0 if feats is None else f.shape[0] for f in (feats or [None] * B)]
    L = max(n_text) + n_img
    hs = torch.zeros(B, L, 128)
    enc = torch.zeros(B, L, DIT_CONFIG["llm_features_dim"])
    ind = torch.zeros(B, L, dtype=torch.long)
    seg = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, L, 3, dtype=torch.long)
    img_idx = torch.zeros(B, n_img, dtype=torch.long)
    for i, n in enumerate(n_text):
        hs[i, n:n + n_img] = x[i]
        if n:
            enc[i, :n] = torch.as_tensor(feats[i])  # numpy (this script) or torch, any float type
        ind[i, :n] = 3
        ind[i, n:n + n_img] = 2
        seg[i, :n + n_img] = 1
        p = torch.from_numpy(positions(n, gh, gw))
        pos[i, :n + n_img] = p.view(n + n_img, -1)
        img_idx[i] = torch.arange(n, n + n_img)
    return hs, enc, ind, seg, pos, img_idx


def dit_forward(model, x, t, feats, grid):
    hs, enc, ind, seg, pos, img_idx = batch_inputs(x, feats, grid)
    out = model(hidden_states=hs, timestep=t, encoder_hidden_states=enc, position_ids=pos, segment_ids=seg, indicator=ind).sample
    return torch.gather(out, 1, img_idx[..., None].expand(-1, -1, out.shape[-1]))


def flow_sampling(g: torch.Generator, size: int, mean_latent: torch.Tensor, overshoot: float, schedule_t: float):
    """``noise(x1)`` and ``sample_t(n)`` for flow-matching training at ``size`` (see ``stage_dit``'s docstring)."""
    from gguf_dit.runtime.schedule import timesteps

    # The sampler's own t density at the demo size: the official schedule's grid is its quantile function.
    sampler_t = torch.from_numpy(timesteps(4096, size, size, 0.0, 1.75)[:-1].astype(np.float32))

    def noise(x1):
        eps = torch.randn(x1.shape, generator=g)
        if overshoot:
            c = overshoot * torch.rand(len(x1), generator=g) * (torch.rand(len(x1), generator=g) < 0.5)
            eps = eps + c[:, None, None] * (x1 - mean_latent)
        return eps

    def sample_t(n):
        t = torch.sigmoid(-1.0 + 1.75 * torch.randn(n, generator=g))
        if schedule_t:
            pick = torch.rand(n, generator=g) < schedule_t
            t = torch.where(pick, sampler_t[torch.randint(0, len(sampler_t), (n,), generator=g)], t)
        return t.clamp(1e-4, 1 - 1e-4).to(torch.bfloat16).float()  # the runtime rounds t to bfloat16 (official pipeline)

    return noise, sample_t


def ema_state(model, averaged: list[torch.Tensor]) -> dict:
    """The model's state dict with its parameters replaced by their moving averages."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for (name, _), a in zip(model.named_parameters(), averaged):
        sd[name] = a.clone()
    return sd


def dit_step(model, params, opt, sched, averaged, loss, step: int, ema_decay: float, smooth: float | None) -> float:
    """One optimiser step (gradients clipped to norm 1), the moving average of the weights, the smoothed loss."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    d = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - d)
    return loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()


def stage_dit(work: Path, vae, feats: dict[str, np.ndarray], steps: int, seed: int, batch: int, *, role: str = "cond",
              lr: float = 1.5e-3, warm: int = 100, ema_decay: float = 0.999, snapshot_every: int = 0, per_combo: int = 64,
              schedule_t: float = 0.0, overshoot: float = 0.0, caption_noise: float = 0.0, init=None, tag: str = ""):
    """Train one backbone: ``role`` "cond" (packed [text, image] samples) or "uncond" (image tokens only). The saved
    weights are the exponential moving average of the trained ones (``ema_decay``). ``snapshot_every`` also writes
    EMA snapshots (``snapshot_<role>[_<tag>]_<step>.pt``) so a long run can be evaluated while it trains; they change nothing.

    ``caption_noise``: that share of the conditional samples is paired with the caption of another (training)
    combination, as web captions are often wrong. The conditional backbone alone then follows the prompt less
    reliably, and guidance, which divides out what the image-only backbone expects anyway, is what makes it reliable.

    ``schedule_t`` > 0: that share of the samples takes its t from the sampler's own density at the demo size. The
    official schedule's resolution shift puts 15 of the 20 default-preset steps at t > 0.7 for 64×64 images, where
    a logit-normal(−1, 1.75) t rarely trains (P(t > 0.8) ≈ 9 %); there the shapes' edges are decided.

    ``overshoot`` > 0: half of the samples get noise that carries some of the picture, ε' = ε + c·(x1 − m) with c
    uniform in [0, overshoot] and m the data set's mean latent, and the usual target x1 − ε' (whose x1 prediction is
    still the clean x1). That is what a guided trajectory looks like after the first step: at 64×64 the official
    schedule's first step jumps from t = 0 to 0.31 with guidance 7, leaving ~2.7× too much of the picture in x_t.

    ``init``: start from these weights (the unconditional backbone starts as a copy of the conditional one; see
    ``main``)."""
    from diffusers import Ideogram4Transformer2DModel

    assert role in ("cond", "uncond")
    path = work / f"{role}{'_' + tag if tag else ''}.pt"
    torch.manual_seed(seed + 10)
    model = Ideogram4Transformer2DModel(**DIT_CONFIG)
    if init is not None:
        model.load_state_dict(init.state_dict())
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    model.train()
    lat_path = work / "latents.pt"
    if lat_path.exists():
        lat, combo_idx = torch.load(lat_path)
    else:
        imgs, combo_idx = D.make_images(D.TRAIN, per_combo, seed=seed + 3)
        lat = latent_tokens(vae, imgs)
        combo_idx = torch.from_numpy(combo_idx)
        torch.save((lat, combo_idx), lat_path)
    log(f"latents {tuple(lat.shape)} mean {lat.mean():.3f} std {lat.std():.3f}")
    strings = [D.encoder_strings(*k) for k in D.TRAIN]
    grid = (D.SIZE // 16, D.SIZE // 16)
    params = list(model.parameters())
    averaged = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    lr_at = lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(seed + 4 + {"": 0, "late": 1000}.get(tag, 2000) + (0 if role == "cond" else 5000))

    noise, sample_t = flow_sampling(g, D.SIZE, lat.mean(0), overshoot, schedule_t)

    t0 = time.time()
    smooth = None
    for step in range(steps):
        idx = torch.randint(0, len(lat), (batch,), generator=g)
        x1 = lat[idx]
        eps = noise(x1)
        t = sample_t(batch)
        xt = t[:, None, None] * x1 + (1 - t[:, None, None]) * eps
        fb = None
        if role == "cond":
            form = int(torch.rand(1, generator=g).item() < 0.25)  # a batch is all JSON captions (25 %) or all wrapped plain text
            combos = combo_idx[idx].clone()
            wrong = torch.rand(batch, generator=g) < caption_noise
            combos[wrong] = torch.randint(0, len(D.TRAIN), (int(wrong.sum()),), generator=g)
            fb = [feats[strings[int(k)][form]] for k in combos]
        loss = F.mse_loss(dit_forward(model, xt, t, fb, grid), x1 - eps)
        smooth = dit_step(model, params, opt, sched, averaged, loss, step, ema_decay, smooth)
        if step % 50 == 0 or step == steps - 1:
            log(f"dit {path.stem} step {step} loss {smooth:.4f} ({time.time() - t0:.0f} s)")
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            torch.save(ema_state(model, averaged), work / f"snapshot_{path.stem}_{step + 1}.pt")
    model.load_state_dict(ema_state(model, averaged))
    torch.save(model.state_dict(), path)
    return model.eval()


# -- 4. save ------------------------------------------------------------------------------------
def save(root: Path, vae, cond, unc, dit_config: dict | None = None, vae_config: dict | None = None, dtype=None) -> None:
    """The official layout (fused attention names), through the same writer as ``gguf-dit tiny-checkpoint``, in
    ``dtype`` (default float32)."""
    from gguf_dit.converter.tiny import DIT_CLASS, VAE_CLASS, official_names, save_folder

    def fresh(d: Path, sd: dict, config: dict) -> None:
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            f.unlink()
        save_folder(d, {k: v.detach().to(dtype or torch.float32) for k, v in sd.items() if not k.endswith("num_batches_tracked")}, config)

    for sub, model in (("transformer", cond), ("unconditional_transformer", unc)):
        fresh(root / sub, official_names(model.state_dict()), {"_class_name": DIT_CLASS, **(dit_config or DIT_CONFIG)})
    fresh(root / "vae", vae.state_dict(), {"_class_name": VAE_CLASS, **(vae_config or VAE_CONFIG)})
    log(f"checkpoint written to {root}")


CONVERT = [
    # (args after `gguf-dit convert ROOT -o OUT`)
    ["--parts", "dit", "--role", "cond", "--recipe", "q4_k-protect", "--size-range", "64..64", "--default-size", "64"],
    ["--parts", "dit", "--role", "uncond", "--recipe", "q8_0", "--size-range", "64..64", "--default-size", "64"],
    ["--parts", "text_encoder,vae", "--te-type", TE_TYPE],
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/demo_ckpt"), help="checkpoint folder to write (official HF layout)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/demo_work"), help="cache for intermediate stages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--dit-steps", type=int, default=8000, help="phase 1 of the conditional backbone")
    ap.add_argument("--late-steps", type=int, default=1000, help="phase 2 of the conditional backbone: half the t drawn from the sampler's schedule, half the noise over-shot (see stage_dit)")
    ap.add_argument("--uncond-steps", type=int, default=400, help="the unconditional backbone: a copy of the conditional one, trained on image-only samples")
    ap.add_argument("--caption-noise", type=float, default=0.25, help="share of conditional samples paired with another combination's caption")
    ap.add_argument("--snapshot-every", type=int, default=0, help="also save EMA snapshots every N DiT steps (for evaluating a run in progress)")
    ap.add_argument("--decoder-steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images-per-combo", type=int, default=64, help="training images per (shape, colour, position); smaller only for quick checks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--convert-to", type=Path, default=None, help="also run gguf-dit convert into this folder")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    feats = stage_skeleton(a.root, a.work)
    small = a.images_per_combo  # VAE stages use 24 images per combination unless the data set is shrunk
    vae = stage_vae(a.root, a.work, a.vae_steps, a.seed, min(24, small))
    log(f"vae ready ({time.time() - t0:.0f} s)")
    cond = stage_dit(a.work, vae, feats, a.dit_steps, a.seed, a.batch, caption_noise=a.caption_noise, snapshot_every=a.snapshot_every,
                     per_combo=small)
    if a.late_steps:
        cond = stage_dit(a.work, vae, feats, a.late_steps, a.seed, a.batch, caption_noise=a.caption_noise, per_combo=small,
                         lr=5e-4, warm=50, schedule_t=0.5, overshoot=3.0, init=cond, tag="late")
    # The image-only backbone starts as a copy of the conditional one. Guidance 7 multiplies whatever the two
    # backbones disagree on by 6 at every step, and at 64x64 18 of the preset's 20 steps are at t > 0.35, where the
    # picture is already decided and both should predict the same velocity; two separately initialised networks disagree there by
    # their own, unrelated errors (measured: the pair ran away and the preset scored 75.6 %, docs/demo.md). A copy
    # fine-tuned on image-only samples learns to predict without a caption but keeps the errors it shares with
    # the conditional backbone.
    unc = stage_dit(a.work, vae, feats, a.uncond_steps, a.seed, a.batch, role="uncond", per_combo=small,
                    lr=5e-4, warm=50, schedule_t=0.5, init=cond, tag="copy")
    log(f"dit ready ({time.time() - t0:.0f} s)")
    vae = stage_decoder(a.work, vae, a.decoder_steps, a.seed, min(24, small))
    log(f"decoder fine-tuned ({time.time() - t0:.0f} s)")
    save(a.root, vae, cond, unc)
    if a.convert_to:
        for extra in CONVERT:
            subprocess.run([sys.executable, "-m", "gguf_dit.cli", "convert", str(a.root), "-o", str(a.convert_to), "-q", "--force", *extra], check=True)
        log(f"converted to {a.convert_to}")


if __name__ == "__main__":
    main()
