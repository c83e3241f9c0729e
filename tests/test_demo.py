"""The embedded demo model (issue 13): the shipped quantized GGUFs in runtime/demo_model draw one or two shapes at
128×128 from prompts whose sentence patterns, synonyms and attribute combinations were held out of training, with
the default preset; CFG matters; `gguf-dit run` uses them without --model and draws the README's two-object
example; the training scripts are deterministic. Numbers in docs/demo.md; `scripts/check_demo128.py` measures the
same bars on a candidate folder before it ships.

CPU dependence: the scores run the shipped Q4_K/Q8_0 files through ggml's CPU kernels, which are compiled for the
machine's ISA (AVX2 / AVX-512 / AVX512_VNNI / AVX512_BF16; docs/portability.md), so pixel values can differ in the
last bits between CPUs and an image near a decision boundary can flip. The pins leave room for that below what
was measured (MEASURED): over the 120 images' 872 asked attributes one flipped attribute is 0.11 point."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_dit.demo import captions as C, data as D, regions as R, scene as S, score as S64
from gguf_dit.runtime.backbone_file import BackboneFile
from gguf_dit.runtime.demo import DEMO_DIR

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "demo.txt"
CHECKPOINT = ROOT / "checkpoints" / "demo"  # the float checkpoint the shipped files were converted from

# Measured on the shipped files (scripts/check_demo128.py runtime/demo_model; docs/demo.md), 60 held-out captions
# x seeds 0 and 1 for the preset and guidance 1, 20 x seed 0 for guidance 0:
MEASURED = {"preset": 0.919, "guidance 1": 0.896, "guidance 0": 0.392}
MIN_ACCURACY = 0.90  # the preset; issue 13's bar itself. The same files through a ggml built for AVX2 only (no AVX-512,
# VNNI or BF16 kernels) on the same machine scored all three the same; a candidate before them moved by 0.003 there
UNGUIDED_ACCURACY = 0.88  # guidance 1, pinned so that a regression shows
GUIDANCE_GAIN = 0.01  # preset minus guidance 1 on the same captions and seeds (measured 0.023): CFG must keep helping


def test_shipped_files_are_small_and_show_the_quantization_recipes():
    import gguf

    names = sorted(p.name for p in DEMO_DIR.glob("*.gguf"))
    assert names == ["text_encoder.gguf", "transformer.gguf", "unconditional_transformer.gguf", "vae.gguf"]
    assert sum(p.stat().st_size for p in DEMO_DIR.glob("*.gguf")) <= 20 * 10**6  # issue 13: 20 MB in all

    def types(name):
        return {t.tensor_type.name for t in gguf.GGUFReader(str(DEMO_DIR / name)).tensors}

    assert {"Q4_K", "Q8_0", "F16"} <= types("transformer.gguf")  # q4_k-protect: protected layers stay wider
    assert "Q8_0" in types("unconditional_transformer.gguf") and "Q8_0" in types("text_encoder.gguf")


def test_shipped_checkpoint_is_the_source_of_the_shipped_files(cli, tmp_path):
    """checkpoints/demo (bfloat16 safetensors, the official layout, written by scripts/train_demo128.py) converted
    with the script's own `gguf-dit convert` flags gives runtime/demo_model's four GGUFs byte for byte: it is what
    the quantization work measures against."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train_demo128 import CONVERT
    finally:
        sys.path.pop(0)
    for extra in CONVERT:
        code, _, err = cli("convert", CHECKPOINT, "-o", tmp_path, "-q", *extra)
        assert code == 0, err
    names = sorted(p.name for p in DEMO_DIR.glob("*.gguf"))
    assert {n: _sha(tmp_path / n) for n in names} == {n: _sha(DEMO_DIR / n) for n in names}


def test_backbones_store_the_size_range_and_default():
    """128×128 by default; `run` accepts 64..256 (docs/demo.md says what the model does there)."""
    for name in ("transformer.gguf", "unconditional_transformer.gguf"):
        f = BackboneFile(DEMO_DIR / name)
        assert (f.size_range, f.default_size) == ((64, 256), 128), name


@pytest.fixture(scope="module")
def default_preset():
    return R.evaluate(DEMO_DIR, n=60, seeds=(0, 1))


@pytest.fixture(scope="module")
def unguided():
    return R.evaluate(DEMO_DIR, n=60, seeds=(0, 1), guidance=1.0)


def _summary(r) -> dict:
    return {k: r[k] for k in ("background", *R.ATTRIBUTES, "count", "all_attributes")}


def test_prompt_following_on_held_out_captions_with_the_default_preset(default_preset):
    """Issue 13: attributes right on >= 60 images of captions whose sentence patterns, synonyms and attribute
    combinations training never showed (one and two objects, backgrounds, sizes), with the default preset and the
    shipped quantized files; every value of every attribute drawn right at least once."""
    r = default_preset
    assert r["n"] >= 60 and all(len(res["scene"].objects) in (1, 2) for res in r["results"])
    assert any(len(res["scene"].objects) == 2 for res in r["results"])
    assert r["all_attributes"] >= MIN_ACCURACY, _summary(r)
    right = R.values_drawn_right(r["results"])
    assert right == {"shape": set(S.SHAPES), "colour": set(S.COLOURS), "position": set(S.POSITIONS), "size": set(S.SIZES),
                     "background": set(S.BACKGROUNDS)}, right


def test_prompt_following_without_guidance(unguided):
    """Guidance 1: the conditional backbone alone."""
    assert unguided["all_attributes"] >= UNGUIDED_ACCURACY, _summary(unguided)


def test_guidance_changes_the_result(default_preset, unguided):
    """CFG matters: the same captions and seeds score measurably better with the preset than with guidance 1."""
    assert default_preset["all_attributes"] - unguided["all_attributes"] >= GUIDANCE_GAIN, (_summary(default_preset), _summary(unguided))


def test_unconditional_backbone_ignores_the_prompt(unguided):
    """The other half of CFG: guidance 0 samples the image-only backbone alone, which never reads a caption, so its
    pictures cannot follow held-out prompts; it scores far below guidance 1."""
    r = R.evaluate(DEMO_DIR, n=20, seeds=(0,), guidance=0.0)
    assert r["all_attributes"] < unguided["all_attributes"] - 0.1, (_summary(r), _summary(unguided))


def test_run_without_model_draws_the_two_object_example_and_says_so(cli, tmp_path):
    """README line 1: `gguf-dit run examples/demo.txt` with no --model uses the demo, says so, and draws both objects
    of the example prompt with every attribute right at 128×128."""
    from PIL import Image

    from gguf_dit.runtime.demo import NOTICE

    png = tmp_path / "demo.png"
    code, _, err = cli("run", EXAMPLE, "-o", png)
    assert code == 0, err
    assert NOTICE in err and str(png) in err
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (128, 128, 3)
    scene = C.read(EXAMPLE.read_text().strip())
    assert scene is not None and len(scene.objects) == 2
    graded = R.grade(scene, R.analyse(img))
    assert all(all(v) for v in graded.values()), graded


# The 64×64 demo's data and scorer (gguf_dit.demo.data / score) still serve `gguf-dit eval` on 64×64 demo captions
# (runtime/evaluate.py) and scripts/train_demo.py, on whose configs the 128×128 recipe builds.


def test_held_out_combinations_of_the_64_recipe_are_not_trained():
    assert len(D.HELD_OUT) == 15 and not set(D.HELD_OUT) & set(D.TRAIN)
    for i, values in enumerate((D.SHAPES, D.COLOURS, D.POSITIONS)):
        assert {k[i] for k in D.HELD_OUT} == set(values)  # balanced: every value appears


def test_64_analysis_reads_the_renders():
    imgs, idx = D.make_images(D.COMBOS, 2, seed=123)
    acc = S64.score([(D.COMBOS[i], S64.analyse(im)) for i, im in zip(idx, imgs)])
    assert acc["all_attributes"] >= 0.99, acc


def test_64_analysis_cannot_be_passed_by_ignoring_the_prompt():
    """One fixed picture for every held-out prompt scores far below the bar."""
    img = D.render("circle", "red", "centre")
    acc = S64.score([(k, S64.analyse(img)) for k in D.HELD_OUT])
    assert acc["all_attributes"] < 0.5, acc


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_script_is_deterministic(tmp_path):
    """Two runs of scripts/train_demo.py (the 64×64 recipe, whose configs and pieces train_demo128.py reuses) from
    the same seed (a few steps per stage) write identical bytes."""
    hashes = []
    for run in ("a", "b"):
        cmd = [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--root", str(tmp_path / run / "ckpt"), "--work", str(tmp_path / run / "work"),
               "--vae-steps", "3", "--decoder-steps", "3", "--dit-steps", "3", "--late-steps", "3", "--uncond-steps", "3", "--batch", "4", "--images-per-combo", "2", "--threads", "2"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        files = sorted((tmp_path / run / "ckpt").rglob("*.safetensors")) + sorted((tmp_path / run / "ckpt").rglob("tokenizer.json"))
        hashes.append({str(f.relative_to(tmp_path / run)): _sha(f) for f in files})
    assert len(hashes[0]) == 5 and hashes[0] == hashes[1]
