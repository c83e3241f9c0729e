"""Shared fixtures: tiny random Ideogram 4 checkpoints (built with diffusers) and a CLI runner."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _checkpoints import make_checkpoint, official_state_dict  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Lazily built checkpoints keyed by (dtype, layout, shards); each is built once per session."""
    cache: dict = {}

    def get(dtype: str = "f32", layout: str = "official", shards: int = 1):
        key = (dtype, layout, shards)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"ck_{dtype}_{layout}_{shards}")
            models = make_checkpoint(root, dtype=dtype, layout=layout, shards=shards)
            cache[key] = (root, {k: official_state_dict(m) for k, m in models.items()}, models)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def f32_gguf(tmp_path_factory, checkpoints):
    """The f32 checkpoint converted with the f32 recipe: (folder with both backbone GGUFs, diffusers models)."""
    from typer.testing import CliRunner

    from gguf_dit.cli import app

    root, _, models = checkpoints("f32")
    out = tmp_path_factory.mktemp("gguf_f32")
    r = CliRunner().invoke(app, ["convert", str(root), "-o", str(out), "--recipe", "f32", "-q"])
    assert r.exit_code == 0, r.stderr
    return out, models


@pytest.fixture
def cli():
    """Invoke the gguf-dit CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from gguf_dit.cli import app

    def run(*args: str):
        r = CliRunner().invoke(app, [str(a) for a in args])
        return r.exit_code, r.stdout, r.stderr

    return run


def backend_names():
    from gguf_dit import ggml_ops

    return ggml_ops.available()
