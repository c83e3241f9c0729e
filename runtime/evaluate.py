"""`gguf-dit eval`: what a conversion costs, measured against another conversion of the same checkpoint.

Both sides draw the same prompts with the same text features (the reference's text encoder), the same seeded noise
and the same schedule; both images are decoded by the reference's VAE, so every difference comes from the backbones.
Two error measures per step (docs/quantization.md "eval"):

- velocity error, teacher-forced: each candidate backbone is evaluated on the reference's own trajectory states
  (same z, t, text) and compared with the reference's velocity there. This isolates what one evaluation of the
  quantized backbone costs at that noise level, without the drift accumulated by earlier steps; it is the quantity
  `calibrate`'s fragility measures, per linear.
- latent drift: the candidate samples its own trajectory; its latent after each step against the reference's. The
  last step's is the final-latent error, which, with PSNR and SSIM of the decoded images, is what the user sees.

The sides run one after the other (the reference, then the candidate), so peak memory is the larger side's backbones
plus the reference's recorded trajectories (3 × N × 128 float32 per step per image: 6.3 MB per step at 1024²).
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from gguf_dit import keys
from gguf_dit.errors import ModelError, OptionError, OutputError

from . import demo
from .backbone_file import BackboneFile
from .generate import Generator, Prompts
from .interrupt import native_call
from .model_files import identify
from .sampler import needs_uncond, sample, token_grid
from .schedule import SamplerSettings, initial_noise, resolve_settings

SCHEMA = "gguf-dit-eval/1"
BACKBONES = ("transformer", "unconditional_transformer")


def rel_err(ref: np.ndarray, x: np.ndarray) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    num, den = float(np.linalg.norm(x - ref)), float(np.linalg.norm(ref))
    return num / den if den else (0.0 if num == 0 else math.inf)


def psnr(mse: float) -> float:
    """PSNR in dB of 8-bit images from their mean squared error; inf for identical images."""
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _side(given: str | Path, base: str | Path, shared: dict, backend: str, threads: int | None) -> Generator:
    """A side's model: a folder, or a backbone file replacing the backbone of its recorded role (the conditional one
    where none is recorded) in ``base``'s set. ``shared``: components taken from elsewhere (the reference's encoder
    and VAE for the candidate)."""
    p = Path(given)
    if p.is_dir():
        return Generator(p, **shared, backend=backend, threads=threads)
    if not p.exists():
        raise ModelError("does not exist (eval takes a model folder or a backbone GGUF)", path=p)
    component, what = identify(p)
    if component not in (*BACKBONES, "backbone"):
        raise OptionError(f"eval takes a model folder or a backbone GGUF; this file is {what}", path=p)
    role = "uncond_diffusion_model" if component == "unconditional_transformer" else "diffusion_model"
    return Generator(base, **{role: p}, **shared, backend=backend, threads=threads)


def check_same_model(ref: Generator, cand: Generator, components: tuple[str, ...]) -> None:
    """Refuse two sides that are not conversions of one checkpoint: a different source hash (where both files record
    one), config or tensor inventory, naming the candidate's file."""
    for comp in components:
        a, b = getattr(ref.files, comp), getattr(cand.files, comp)  # present: each side's generate() checked it
        fa, fb = BackboneFile(a), BackboneFile(b)
        ha, hb = fa.metadata.get(keys.SOURCE_SHA256), fb.metadata.get(keys.SOURCE_SHA256)
        if ha and hb and ha != hb:
            raise ModelError(f"converted from another checkpoint than {a} ({keys.SOURCE_SHA256} {hb[:19]}… vs {ha[:19]}…): "
                             "eval compares two conversions of the same checkpoint", path=b)
        ca, cb = fa.config.to_metadata(), fb.config.to_metadata()
        if (k := next((k for k in ca if ca[k] != cb[k]), None)) is not None:
            raise ModelError(f"{k} is {cb[k]}, but {a} has {ca[k]}: not the same model", path=b)
        ia, ib = {n: t.ne for n, t in fa.tensors.items()}, {n: t.ne for n, t in fb.tensors.items()}
        if (n := next((n for n in sorted(ia.keys() | ib.keys()) if ia.get(n) != ib.get(n)), None)) is not None:
            where = f"missing (present in {a})" if n not in ib else f"not in {a}" if n not in ia else f"has shape {ib[n]}, {a} has {ia[n]}"
            raise ModelError(f"{where}: not the same model's tensors", path=b, tensor=n)


def _weights(gen: Generator, components: tuple[str, ...]) -> dict:
    out = {}
    for comp in components:
        f = BackboneFile(getattr(gen.files, comp))
        out[comp] = {"path": str(f.path), "recipe": f.recipe, "weight_bytes": sum(t.nbytes for t in f.tensors.values()),
                     "source_sha256": f.metadata.get(keys.SOURCE_SHA256)}
    return out


DEMO_ATTRIBUTES = {"64": "colour, position, shape", "128": "background; per object colour, position, shape, size"}


def _demo_targets(prompts, height: int, width: int) -> list | None:
    """What each prompt asks of a demo model, or None where it asks nothing the demo scorers read; None when no prompt
    does. At 64×64, a caption of the 64×64 demo (``demo.data``: plain or JSON, exactly as the encoder sees it) is a
    ("combo", (shape, colour, position)); any other caption that ``demo.captions.read`` understands is a
    ("scene", Scene) of the 128×128 demo, read back at any size by ``demo.regions``. Decided by the prompts and the size,
    not the files: a retrained or re-converted demo model is scored too."""
    import json

    from gguf_dit.demo import captions
    from gguf_dit.demo.data import COMBOS, SIZE, encoder_strings

    known = {s: k for k in COMBOS for s in encoder_strings(*k)} if (height, width) == (SIZE, SIZE) else {}
    out: list = []
    for p in prompts:
        if p.text in known:
            out.append(("combo", known[p.text]))
            continue
        try:
            cap = json.loads(p.original) if p.source == "json" else (p.original or p.text)
        except ValueError:
            cap = None
        scene = captions.read(cap) if isinstance(cap, (str, dict)) else None
        out.append(("scene", scene) if scene is not None else None)
    return out if any(out) else None


def _sample(cond, uncond, feats, h, w, settings, noise, record: bool):
    """One trajectory: final latents, seconds, and per step (t, z before the step, then, when ``record``, v_cond and
    v_uncond or None where the step skipped it)."""
    steps: list = []

    def keep(info, _z):
        z_in, v_c, v_u = info.arrays
        steps.append((info.t, z_in, v_c, v_u if info.uncond_ran else None) if record else (info.t, z_in))

    t0 = time.perf_counter()
    z = sample(cond, uncond, feats, h, w, settings=settings, noise=noise, callback=keep)
    return z, time.perf_counter() - t0, steps


def evaluate(reference: str | Path, candidate: str | Path, prompts: Prompts, *, model: str | Path | None = None,
             settings: SamplerSettings | str = "default-20", size: tuple[int, int] | None = None, seeds: int = 1, seed: int = 0,
             backend: str = "auto", threads: int | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Compare CANDIDATE with REFERENCE on ``prompts`` × ``seeds`` seeds (seed, seed + 1, ...); returns the report
    (the ``--json`` document, schema in docs/quantization.md). ``size`` = (width, height). ``model``: the folder a
    backbone file's other components come from (default: REFERENCE if it is a folder, else the embedded demo)."""
    from gguf_dit.ggml_ops.threads import default_threads

    say = progress or (lambda line: None)
    t_start = time.perf_counter()
    threads = threads or default_threads()  # one count for both sides: same work split, so a self-eval is exact
    base = model if model is not None else reference if Path(reference).is_dir() else demo.model_dir()
    ref = _side(reference, base, {}, backend, threads)
    cand = _side(candidate, base, {"text_encoder": ref.files.text_encoder, "vae": ref.files.vae}, backend, threads)
    settings = resolve_settings(settings) if isinstance(settings, str) else settings
    for gen, given in ((ref, reference), (cand, candidate)):
        if gen.files.unconditional_transformer is None and needs_uncond(settings.guidance):
            raise ModelError("has no unconditional_transformer.gguf, and the schedule's guidance is not 1 at every step", path=given)
    width, height = size or (None, None)
    batch = ref.generate(prompts, seed=seed, count=seeds, width=width, height=height, settings=settings)
    cand.generate(batch.prompts, seed=seed, width=batch.width, height=batch.height, settings=settings)  # its size checks only
    h, w = batch.height, batch.width
    components = BACKBONES if needs_uncond(settings.guidance) else BACKBONES[:1]
    check_same_model(ref, cand, components)
    n_img = len(batch.seeds)
    grid = token_grid(h, w)
    prompt_of = [batch.prompts[j // seeds] for j in range(n_img)]

    say(f"encoding {len(batch.prompts)} prompt(s) with {ref.files.text_encoder}")
    feats = ref.pipeline.encode([p.text for p in batch.prompts], origins=batch.origins)
    feats = [np.array(f, np.float32) for f in feats]
    for f in feats:
        f.setflags(write=False)  # uploaded once per graph, not every teacher-forced step
    noises = [initial_noise(s, grid[0] * grid[1]) for s in batch.seeds]
    sides: dict[str, dict] = {}

    # The reference: its trajectories, recorded.
    t0 = time.perf_counter()
    r_cond, r_uncond = ref.pipeline.load_backbones(len(components) == 2)
    sides["reference"] = {"load_seconds": time.perf_counter() - t0}
    r_final, r_steps, r_secs = [], [], []
    for j in range(n_img):
        z, secs, rec = _sample(r_cond, r_uncond, feats[j // seeds], h, w, settings, noises[j], record=True)
        r_final.append(z), r_steps.append(rec), r_secs.append(secs)
        say(f"reference {j + 1}/{n_img}: {secs:.1f} s")
    ref.pipeline.close()
    del r_cond, r_uncond
    gc.collect()  # the backbones' file maps go with them: the candidate's phase must not hold the reference's pages

    # The candidate: its own trajectory (first, so that its first image pays the graph build as the reference's did),
    # then teacher-forced on the reference's states.
    t0 = time.perf_counter()
    c_cond, c_uncond = cand.pipeline.load_backbones(len(components) == 2)
    sides["candidate"] = {"load_seconds": time.perf_counter() - t0}
    images, c_final, c_secs, tf_secs = [], [], [], 0.0
    for j in range(n_img):
        f = feats[j // seeds]
        z, secs, states = _sample(c_cond, c_uncond, f, h, w, settings, noises[j], record=False)
        # states[i] is z before step i: the drift after step i is states[i + 1] (the final latents for the last step)
        drift = [rel_err(rs[1], cs[1]) for rs, cs in zip(r_steps[j][1:], states[1:])] + [rel_err(r_final[j], z)]
        err_c, err_u = [], []
        t0 = time.perf_counter()
        for t, z_in, v_c, v_u in r_steps[j]:
            with native_call(c_cond.backend):
                err_c.append(rel_err(v_c, c_cond.velocity(z_in[0], t, f, grid=grid)))
                err_u.append(None if v_u is None else rel_err(v_u, c_uncond.velocity(z_in[0], t, None, grid=grid)))
        tf_secs += time.perf_counter() - t0
        c_final.append(z), c_secs.append(secs)
        images.append({"prompt": prompt_of[j].original or prompt_of[j].text, "line": prompt_of[j].line, "seed": batch.seeds[j],
                       "velocity_error": {"cond": err_c, "uncond": err_u}, "latent_error": drift, "final_latent_error": drift[-1]})
        say(f"candidate {j + 1}/{n_img}: {secs:.1f} s (+{time.perf_counter() - t0:.1f} s teacher-forced)")
    cand.pipeline.close()
    del c_cond, c_uncond
    gc.collect()

    # Decoding: one VAE (the reference's) for both sides.
    say(f"decoding {2 * n_img} image(s)")
    from skimage.metrics import structural_similarity

    t0 = time.perf_counter()
    ref.pipeline.vae()
    vae_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    pix = {name: [ref.pipeline.decode(z, h, w) for z in finals] for name, finals in (("reference", r_final), ("candidate", c_final))}
    decode = (time.perf_counter() - t0) / (2 * n_img)
    ref.pipeline.close()
    mses = []
    for im, a, b in zip(images, pix["reference"], pix["candidate"]):
        mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        mses.append(mse)
        im["psnr_db"] = _finite(psnr(mse))
        im["ssim"] = float(structural_similarity(a, b, channel_axis=-1, data_range=255))

    targets = _demo_targets(prompt_of, h, w)
    if targets is not None:
        from dataclasses import asdict

        from gguf_dit.demo import regions, score as combo_score

        # one world per report: the 128×128 demo's when any prompt is one of its scenes; the other world's prompts drop out
        world = "scene" if any(t is not None and t[0] == "scene" for t in targets) else "combo"
        targets = [t if t is not None and t[0] == world else None for t in targets]
        for name in ("reference", "candidate"):
            combos, graded = [], []
            for im, target, img in zip(images, targets, pix[name]):
                if target is None:
                    continue
                kind, asked = target
                if kind == "combo":
                    found = combo_score.analyse(img)
                    combos.append((asked, found))
                    im.setdefault("demo", {"combo": list(asked)})[name] = found
                else:
                    found = regions.analyse(img)
                    graded.append(regions.grade(asked, found))
                    im.setdefault("demo", {"scene": asdict(asked)})[name] = found | {"graded": graded[-1]}
            sides[name]["demo_score"] = (regions.score(graded) | {"world": "128", "n": len(graded)} if world == "scene"
                                         else combo_score.score(combos) | {"world": "64", "n": len(combos)})
    for name, gen, secs in (("reference", ref, r_secs), ("candidate", cand, c_secs)):
        wts = _weights(gen, components)
        sides[name] |= {"given": str(reference if name == "reference" else candidate), "backbones": wts,
                        "weight_bytes": sum(v["weight_bytes"] for v in wts.values()),
                        "sample_seconds_per_image": sum(secs) / n_img}
        sides[name].setdefault("demo_score", None)
    sides["candidate"]["teacher_forced_seconds_per_image"] = tf_secs / n_img

    steps = settings.steps
    per_step = {k: [_mean([im["velocity_error"][k][i] for im in images]) for i in range(steps)] for k in ("cond", "uncond")}
    total = {
        "velocity_error": {"cond": _mean(per_step["cond"]), "uncond": _mean(per_step["uncond"]), "per_step": per_step},
        "latent_error_per_step": [_mean([im["latent_error"][i] for im in images]) for i in range(steps)],
        "final_latent_error": _mean([im["final_latent_error"] for im in images]),
        "psnr_db": _finite(psnr(sum(mses) / len(mses))),  # of the pooled MSE: finite unless every image is identical
        "ssim": _mean([im["ssim"] for im in images]),
    }
    for im in images:
        im["velocity_error"] |= {"cond_mean": _mean(im["velocity_error"]["cond"]), "uncond_mean": _mean(im["velocity_error"]["uncond"])}
    return {
        "schema": SCHEMA,
        "settings": {"preset": settings.name, "steps": steps, "guidance": list(settings.guidance), "mu": settings.mu, "std": settings.std,
                     "t": [st[0] for st in r_steps[0]], "width": w, "height": h, "seeds": list(batch.seeds), "threads": threads,
                     "backend": backend, "text_encoder": str(ref.files.text_encoder), "vae": str(ref.files.vae)},
        "reference": sides["reference"], "candidate": sides["candidate"],
        "images": images, "total": total, "vae_load_seconds": vae_load, "decode_seconds_per_image": decode, "wall_seconds": time.perf_counter() - t_start,
    }


def write_json(report: dict, path: str | Path, *, force: bool = False) -> Path:
    """The report as JSON, written under a temporary name and renamed: no partial file, no overwrite without ``force``."""
    from gguf_dit.files import write_json_atomic

    path = Path(path)
    if path.exists() and not force:
        raise OutputError("already exists (use --force to overwrite)", path=path)
    write_json_atomic(path, report, indent=1, ensure_ascii=False)
    return path


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _finite(x: float) -> float | None:
    """JSON has no infinity: an infinite PSNR (identical images) is written as null."""
    return None if math.isinf(x) else x


# -- terminal ----------------------------------------------------------------------------------------------------------
def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _db(x: float | None) -> str:
    return "inf" if x is None else f"{x:.2f}"


def render(report: dict, console) -> None:
    """The report as rich tables: one row per image and the total, the per-step means, and each side's cost."""
    from rich import box
    from rich.table import Table

    def table(title: str, *cols: str) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
        for c in cols:
            t.add_column(c, justify="left" if c in ("prompt", "side", "recipes") else "right", no_wrap=True, overflow="ellipsis",
                         max_width=18 if c == "prompt" else None, min_width=None if c == "prompt" else len(c))
        return t

    tab = table("candidate vs reference: velocity error (teacher-forced, mean over steps), final latents, images",
                "prompt", "seed", "v cond", "v uncond", "latent", "PSNR dB", "SSIM")
    for im in report["images"]:
        v = im["velocity_error"]
        tab.add_row(im["prompt"], str(im["seed"]), _e(v["cond_mean"]), _e(v["uncond_mean"]), _e(im["final_latent_error"]), _db(im["psnr_db"]), f"{im['ssim']:.4f}")
    t = report["total"]
    tab.add_row("total", "", _e(t["velocity_error"]["cond"]), _e(t["velocity_error"]["uncond"]), _e(t["final_latent_error"]),
                _db(t["psnr_db"]), f"{t['ssim']:.4f}", style="bold")
    console.print(tab)

    s = report["settings"]
    steps = table("per step, mean over images (latent drift: the candidate's own trajectory)", "step", "t", "guidance", "v cond", "v uncond", "latent drift")
    for i in range(s["steps"]):
        steps.add_row(str(i + 1), f"{s['t'][i]:.4f}", f"{s['guidance'][i]:g}", _e(t["velocity_error"]["per_step"]["cond"][i]),
                      _e(t["velocity_error"]["per_step"]["uncond"][i]), _e(t["latent_error_per_step"][i]))
    console.print(steps)

    cost = table(f"sides: {s['width']}x{s['height']}, {s['steps']} steps, {len(report['images'])} image(s), {s['threads']} thread(s)",
                 "side", "recipes", "MB", "load s", "s/image", "score")
    for name in ("reference", "candidate"):
        d = report[name]
        sc = d["demo_score"]
        cost.add_row(name, ", ".join(str(b["recipe"]) for b in d["backbones"].values()), f"{d['weight_bytes'] / 1e6:.2f}", f"{d['load_seconds']:.2f}",
                     f"{d['sample_seconds_per_image']:.2f}", "-" if sc is None else f"{100 * sc['all_attributes']:.1f} %")
    console.print(cost)
    sc = report["reference"]["demo_score"]
    console.print(f"MB: both backbones' weights; s/image: sampling (decoding, by the reference's VAE: {report['decode_seconds_per_image']:.2f} s/image)"
                  + (f"; score: the demo's prompt following ({DEMO_ATTRIBUTES[sc['world']]}) on {sc['n']} image(s)" if sc else ""))
    for name in ("reference", "candidate"):
        console.print(f"{name}: " + ", ".join(b["path"] for b in report[name]["backbones"].values()), soft_wrap=True)
    console.print(f"eval took {report['wall_seconds']:.1f} s (the candidate's teacher-forced evaluations: "
                  f"{report['candidate']['teacher_forced_seconds_per_image']:.2f} s/image)")
