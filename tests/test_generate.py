"""The Python API (runtime/generate.py, docs/runtime.md "Python API"): the documented example runs as written and
draws the PNG `gguf-dit run` draws; a batch is checked before any work, then names, seeds and reports as `run`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _demo_files import HIGH, LOW, SIZE

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A yellow triangle at the top."


def _documented_example() -> str:
    section = (ROOT / "docs" / "runtime.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_documented_example_runs_and_writes_what_run_writes(tmp_path, monkeypatch, cli):
    code = _documented_example()
    assert len([ln for ln in code.splitlines() if ln.strip()]) == 5 and PROMPT in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(ROOT / "docs" / "runtime.md"), "exec"), scope)
    image = scope["image"]
    assert image.image.shape == (SIZE, SIZE, 3) and image.image.dtype == np.uint8 and image.seed == 0
    png = tmp_path / "triangle.png"
    assert image.path == Path("triangle.png") and png.is_file()
    info = Image.open(png).info
    assert info["parameters"].startswith('{"high_level_description":"A yellow triangle at the top.",') and "Seed: 0" in info["parameters"]
    assert json.loads(info["gguf-dit"])["prompt_source"] == "text"
    assert np.array_equal(np.asarray(Image.open(png)), image.image)
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    code, _, err = cli("run", tmp_path / "p.txt", "--seed", 0, "-o", tmp_path / "cli.png", "-q")
    assert code == 0, err
    assert (tmp_path / "cli.png").read_bytes() == png.read_bytes()  # same pixels and metadata, byte for byte


def test_batch_is_checked_before_work_then_named_seeded_and_reported(tmp_path, monkeypatch):
    from gguf_dit.errors import InputError, OutputError
    from gguf_dit.runtime.generate import Generator
    from gguf_dit.runtime.pipeline import Pipeline
    from gguf_dit.runtime.schedule import resolve_settings

    gen = Generator()
    assert gen.demo
    out = tmp_path / "out"
    out.mkdir()
    (out / "00001-8.png").write_bytes(b"old")
    prompts, settings = ["a red circle on the left", "a blue square"], resolve_settings(steps=2)
    with monkeypatch.context() as m:
        m.setattr(Pipeline, "encode", lambda *a, **k: pytest.fail("encoding started before the request was checked"))
        with pytest.raises(OutputError) as e:
            gen.generate(prompts[0], seed=7, settings=settings, out=out / "00001-8.png")
        assert e.value.path == str(out / "00001-8.png") and "already exists" in str(e.value)
        with pytest.raises(InputError, match=f"outside the model's range {LOW}..{HIGH}"):
            gen.generate(prompts, width=HIGH + 16)
        with pytest.raises(InputError, match="image count must be at least 1"):
            gen.generate(prompts, count=0)
    batch = gen.generate(prompts, seed=7, count=2, settings=settings, out=out)  # numbered after 00001-8.png
    assert batch.seeds == [7, 8, 9, 10] and (batch.height, batch.width) == (SIZE, SIZE)
    assert [p.name for p in batch.paths] == ["00002-7.png", "00003-8.png", "00004-9.png", "00005-10.png"]
    events: list = []
    images = list(batch.run(lambda *ev: events.append(ev)))
    assert [(i.seed, i.prompt.original) for i in images] == [(7, prompts[0]), (8, prompts[0]), (9, prompts[1]), (10, prompts[1])]
    assert events[:3] == [("encode", 0, 2), ("encode", 1, 2), ("encode", 2, 2)]
    assert events[3:6] == [("load", 0, 2), ("load", 1, 2), ("load", 2, 2)]  # both backbones, before the first image
    assert events[6:10] == [("sample 1/4", 0, 2), ("sample 1/4", 1, 2), ("sample 1/4", 2, 2), ("decode 1/4", 0, 1)]
    assert events[-1] == ("decode 4/4", 1, 1)
    for i in images:
        assert np.array_equal(np.asarray(Image.open(i.path)), i.image) and json.loads(Image.open(i.path).info["gguf-dit"])["seed"] == i.seed
    # In memory only (no out): image j of a batch is the image a lone request with its prompt and seed draws.
    [again] = gen.generate(prompts[0], seed=8, settings=settings)
    assert again.path is None and np.array_equal(again.image, images[1].image)
    assert not np.array_equal(images[0].image, images[1].image)
    gen.close()
