"""The embedded demo model (issue 5): the shipped quantized GGUFs in runtime/demo_model follow prompts they
were never trained on with the default preset (≥ 90 %, issue 5's bar; numbers in docs/demo.md), CFG matters,
`gguf-dit run` uses them without --model, and the training script is deterministic.

CPU dependence: the scores run the shipped Q4_K/Q8_0 files through ggml's CPU kernels, which are compiled
for the machine's ISA (AVX2 / AVX-512 / AVX512_VNNI / AVX512_BF16; docs/portability.md), so pixel values can
differ in the last bits between CPUs and an image near a decision boundary could flip. The thresholds leave
room for that. Measured here on an AMD EPYC (Zen 4): 93.3 % preset, 85.6 % guidance 1; issue 10 reports the same
scores on an Intel Xeon with AMX once the encoder stopped using llama.cpp's AMX buffer (not re-run since: no AMX
machine was available)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_dit.demo import data as D, score as S
from gguf_dit.runtime.demo import DEMO_DIR

ROOT = Path(__file__).resolve().parents[1]

# Held out, seeds 0 and 1 (30 images), measured on the shipped files (docs/demo.md):
MIN_ACCURACY = 0.90  # issue 5's bar, with the default-20 preset; measured 0.933
UNGUIDED_ACCURACY = 0.80  # guidance 1 measured 0.856: pinned so a regression shows
GUIDANCE_GAIN = 0.03  # the preset beats guidance 1 by 7.8 points here (3.4 over 120 images): room for other CPUs


def test_held_out_combinations_are_not_trained():
    assert len(D.HELD_OUT) == 15 and not set(D.HELD_OUT) & set(D.TRAIN)
    for i, values in enumerate((D.SHAPES, list(D.COLOURS), list(D.POSITIONS))):
        assert {k[i] for k in D.HELD_OUT} == set(values)  # balanced: every value appears


def test_analysis_reads_the_renders():
    imgs, idx = D.make_images(D.COMBOS, 2, seed=123)
    acc = S.score([(D.COMBOS[i], S.analyse(im)) for i, im in zip(idx, imgs)])
    assert acc["all_attributes"] >= 0.99, acc


def test_analysis_cannot_be_passed_by_ignoring_the_prompt():
    """One fixed picture for every held-out prompt scores far below the bar."""
    img = D.render("circle", "red", "centre")
    acc = S.score([(k, S.analyse(img)) for k in D.HELD_OUT])
    assert acc["all_attributes"] < 0.5, acc


def test_shipped_files_are_small_and_show_the_quantization_recipes():
    import gguf

    names = sorted(p.name for p in DEMO_DIR.glob("*.gguf"))
    assert names == ["text_encoder.gguf", "transformer.gguf", "unconditional_transformer.gguf", "vae.gguf"]
    assert sum(p.stat().st_size for p in DEMO_DIR.glob("*.gguf")) < 20 * 2**20

    def types(name):
        return {t.tensor_type.name for t in gguf.GGUFReader(str(DEMO_DIR / name)).tensors}

    assert {"Q4_K", "Q8_0", "F16"} <= types("transformer.gguf")  # q4_k-protect: protected layers stay wider
    assert "Q8_0" in types("unconditional_transformer.gguf") and "Q8_0" in types("text_encoder.gguf")


@pytest.fixture(scope="module")
def default_preset():
    return S.evaluate(DEMO_DIR, D.HELD_OUT, seeds=(0, 1))


@pytest.fixture(scope="module")
def unguided():
    return S.evaluate(DEMO_DIR, D.HELD_OUT, seeds=(0, 1), guidance=1.0)


def _every_value_drawn_right(r) -> None:
    """Different prompts give different, correct answers: every value of every attribute is drawn correctly
    for at least one prompt that asks for it."""
    for i, attr, values in ((0, "shape", D.SHAPES), (1, "colour", D.COLOURS), (2, "position", D.POSITIONS)):
        right = {k[i] for k, res in r["results"] if res[attr] == k[i]}
        assert right == set(values), (attr, set(values) - right)


def test_prompt_following_on_held_out_captions_with_the_default_preset(default_preset):
    """Issue 5's bar: ≥ 90 % of colours, positions and shapes right on ≥ 30 images of held-out combinations,
    with the default preset (guidance 7 × 18, 3 × 2) and the shipped quantized files. Measured 93.3 %."""
    r = default_preset
    assert r["n"] >= 30
    assert r["all_attributes"] >= MIN_ACCURACY, {k: r[k] for k in ("colour", "position", "shape", "all_attributes")}
    _every_value_drawn_right(r)


def test_prompt_following_without_guidance(unguided):
    """Guidance 1 (the conditional backbone alone; a quarter of its training captions were wrong on purpose).
    Measured 85.6 %; pinned so a regression shows."""
    r = unguided
    assert r["all_attributes"] >= UNGUIDED_ACCURACY, {k: r[k] for k in ("colour", "position", "shape", "all_attributes")}
    assert r["position"] >= 0.9


def test_guidance_changes_the_result(default_preset, unguided):
    """CFG matters: the same prompts and seeds score measurably better with the preset than with guidance 1."""
    assert default_preset["all_attributes"] - unguided["all_attributes"] >= GUIDANCE_GAIN


def test_unconditional_backbone_ignores_the_prompt():
    """The other half of CFG: guidance 0 samples the image-only backbone alone, which was never shown a
    caption, so its pictures cannot follow the held-out prompts (it still draws shapes: the analysis finds an
    object in most of them)."""
    r = S.evaluate(DEMO_DIR, D.HELD_OUT, seeds=(0, 1), guidance=0.0)
    assert r["all_attributes"] < 0.6, {k: r[k] for k in ("colour", "position", "shape", "all_attributes")}
    assert sum("fill" in res for _, res in r["results"]) >= 0.8 * r["n"]


def test_run_without_model_uses_the_demo_and_says_so(cli, tmp_path):
    from PIL import Image

    from gguf_dit.runtime.demo import NOTICE

    png = tmp_path / "demo.png"
    code, _, err = cli("run", ROOT / "examples" / "demo.txt", "-o", png)
    assert code == 0, err
    assert NOTICE in err and str(png) in err
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (D.SIZE, D.SIZE, 3)
    words = (ROOT / "examples" / "demo.txt").read_text().strip()
    got = S.analyse(img)
    assert D.plain_caption(got["shape"], got["colour"], got["position"]) == words, got


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_script_is_deterministic(tmp_path):
    """Two runs of scripts/train_demo.py from the same seed (a few steps per stage) write identical bytes."""
    hashes = []
    for run in ("a", "b"):
        cmd = [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--root", str(tmp_path / run / "ckpt"), "--work", str(tmp_path / run / "work"),
               "--vae-steps", "3", "--decoder-steps", "3", "--dit-steps", "3", "--late-steps", "3", "--uncond-steps", "3", "--batch", "4", "--images-per-combo", "2", "--threads", "2"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        files = sorted((tmp_path / run / "ckpt").rglob("*.safetensors")) + sorted((tmp_path / run / "ckpt").rglob("tokenizer.json"))
        hashes.append({str(f.relative_to(tmp_path / run)): _sha(f) for f in files})
    assert len(hashes[0]) == 5 and hashes[0] == hashes[1]
