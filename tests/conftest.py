"""Shared fixtures: tiny random checkpoints (the oracle's, built with diffusers; the product's tiny-checkpoint) and a
CLI runner. Plain helper functions live in ``_helpers.py``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _helpers import make_checkpoint, official_state_dict  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _hash_cache(tmp_path_factory):
    """Model hashes are cached under $XDG_CACHE_HOME (gguf_dit/hashes.py): the tests' stay out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
    yield
    mp.undo()


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
def tiny_checkpoints(tmp_path_factory):
    """Full checkpoints as ``gguf-dit tiny-checkpoint`` writes them (converter/tiny.py), one per DiT format (``fp8``:
    the official FP8, else BF16), each built once per session. Shared: use ``tiny_copy`` to change one."""
    cache: dict = {}

    def get(fp8: bool = True) -> Path:
        if fp8 not in cache:
            from gguf_dit.converter.tiny import write_tiny_checkpoint

            cache[fp8] = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ck", fp8=fp8)
        return cache[fp8]

    return get


@pytest.fixture
def tiny_copy(tiny_checkpoints, tmp_path):
    """``tiny_copy(name, fp8=True)``: a private copy of a full tiny checkpoint at ``tmp_path / name``."""
    return lambda name, fp8=True: Path(shutil.copytree(tiny_checkpoints(fp8), tmp_path / name))


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
def forbid(monkeypatch):
    """``forbid(target, name, why)``: calling ``target.name`` during the test fails it with ``why``."""

    def patch(target, name: str, why: str) -> None:
        def boom(*a, **k):
            raise AssertionError(why)

        monkeypatch.setattr(target, name, boom)

    return patch


@pytest.fixture
def cli():
    """Invoke the gguf-dit CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from gguf_dit.cli import app

    def run(*args: str):
        r = CliRunner().invoke(app, [str(a) for a in args])
        return r.exit_code, r.stdout, r.stderr

    return run



@pytest.fixture
def graphs_alive(monkeypatch):
    """``graphs_alive()``: every ggml_ops Graph constructed during the test that is still referenced (after a gc),
    counted from the constructor, not from the cache under test."""
    import gc
    import weakref

    from gguf_dit.ggml_ops import Graph

    built: list[weakref.ref] = []
    init = Graph.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        built.append(weakref.ref(self))

    monkeypatch.setattr(Graph, "__init__", tracked)

    def alive() -> list:
        gc.collect()
        return [g for r in built if (g := r()) is not None]

    return alive
