"""Issue 14 item 1: memory modes. A streamed backbone (its blocks copied into one slot just before each computes)
against the resident one it replaces, which is the oracle: the same bytes through the same builders must give the
same bits. Then the plan (which mode a budget gets, the error when none fits) and the CLI options."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from _helpers import backend_names
from gguf_dit.errors import InputError, OptionError
from gguf_dit.ggml_ops import GGMLType
from gguf_dit.runtime.backbone_file import BackboneFile
from gguf_dit.runtime.demo import DEMO_DIR
from gguf_dit.runtime.dit import Ideogram4DiT, RuntimeOptions
from gguf_dit.runtime.memory_plan import PROCESS_BYTES, plan, vae_bytes
from gguf_dit.runtime.sampler import sample

COND, UNCOND = DEMO_DIR / "transformer.gguf", DEMO_DIR / "unconditional_transformer.gguf"
BACKENDS = backend_names()
CASES = (((4, 4), 5, 0.3), ((3, 5), 0, 0.8), ((2, 6), 11, 0.55), ((4, 4), 5, 0.9))  # the last reuses the first graph


def velocities(path, options: RuntimeOptions, backend="cpu", replace=None) -> list[np.ndarray]:
    dit = Ideogram4DiT(BackboneFile(path), _backend(backend), options, replace=replace)
    try:
        out = []
        for grid, n_text, t in CASES:
            rng = np.random.default_rng(n_text)
            x = rng.standard_normal((grid[0] * grid[1], dit.config.in_channels)).astype(np.float32)
            feats = rng.standard_normal((n_text, dit.config.llm_features_dim)).astype(np.float32) if n_text else None
            out.append(dit.velocity(x, t, feats, grid=grid))
        return out
    finally:
        dit.close()


_BACKENDS: dict = {}


def _backend(name: str):
    from gguf_dit.ggml_ops import Backend

    if name not in _BACKENDS:
        _BACKENDS[name] = Backend(name)
    return _BACKENDS[name]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", [COND, UNCOND], ids=["cond", "uncond"])
@pytest.mark.parametrize("source", ["read", "map"])
def test_streamed_blocks_give_the_resident_velocities_bit_for_bit(backend, path, source):
    """Conditional (text + image tokens) and unconditional (image only) sequences, several shapes, both files;
    "read" fills the slot with plain reads (CPU), "map" copies from the memory map (what CUDA always does)."""
    resident = velocities(path, RuntimeOptions(), backend)
    streamed = velocities(path, RuntimeOptions(placement="stream", stream_source=source), backend)
    for a, b in zip(resident, streamed):
        np.testing.assert_array_equal(a, b)


def test_a_streamed_backbone_holds_one_block_and_says_so():
    f = BackboneFile(COND)
    dit = Ideogram4DiT(f, _backend("cpu"), RuntimeOptions(placement="stream"))
    try:
        blocks = {n for n in f.tensors if n.startswith("layers.")}
        assert blocks and not blocks & set(dit.weights.tensors)  # no block weight is resident
        per_block = [sum(f.tensors[n].nbytes for n in blocks if n.startswith(f"layers.{i}.")) for i in range(f.config.num_layers)]
        s = dit.summary()
        assert s["placement"] == "stream" and s["streamed_bytes"] == sum(per_block)
        assert max(per_block) <= dit._stream.buffer.nbytes < max(per_block) + 64 * len(blocks)  # one block, aligned
        assert s["weight_bytes"] == dit.weights.nbytes + dit._stream.buffer.nbytes
        assert sum(d["count"] for d in s["types"].values()) == len(f.tensors)
    finally:
        dit.close()


def test_blocks_of_different_types_share_the_slot_and_match_resident():
    """A recipe may give blocks different types: each signature gets its block graph, all in one slot. Made here with
    ``replace``: block 1's w1 as F32 (its Q-type's values dequantized), which also checks ``replace`` when streaming."""
    from gguf_dit.ggml_ops import dequantize

    f = BackboneFile(COND)
    name = "layers.1.feed_forward.w1.weight"
    t = f.tensors[name]
    assert t.type not in (GGMLType.F32,)
    data = dequantize(np.asarray(t.data).view(np.uint8), t.type, t.shape[-1]) if t.type is not GGMLType.F16 else np.asarray(t.data, np.float32)
    replace = {name: (GGMLType.F32, np.ascontiguousarray(data, dtype=np.float32).reshape(-1))}
    dit = Ideogram4DiT(f, _backend("cpu"), RuntimeOptions(placement="stream"), replace=replace)
    try:
        assert len(dit._stream.slots) == 2 and dit._stream.sig_of == [0, 1] + [0] * (f.config.num_layers - 2)
        assert dit._stream.slots[1]["layers.1.feed_forward.w1.weight"].type is GGMLType.F32
    finally:
        dit.close()
    resident = velocities(COND, RuntimeOptions(), replace=replace)
    streamed = velocities(COND, RuntimeOptions(placement="stream"), replace=replace)
    plain = velocities(COND, RuntimeOptions())
    for a, b, c in zip(resident, streamed, plain):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c) or t.type is GGMLType.F32  # the replacement is really used


def test_sampling_with_streamed_backbones_gives_the_same_latents():
    def run(placement):
        opts = RuntimeOptions(placement=placement)
        cond, uncond = Ideogram4DiT.load(COND, "cpu", options=opts), Ideogram4DiT.load(UNCOND, "cpu", options=opts)
        try:
            feats = np.random.default_rng(3).standard_normal((6, cond.config.llm_features_dim)).astype(np.float32)
            return sample(cond, uncond, feats, 64, 48, steps=3, seed=2)
        finally:
            cond.close()
            uncond.close()

    np.testing.assert_array_equal(run("resident"), run("stream"))


def test_streamed_graph_cache_stays_bounded(graphs_alive):
    """Each cached shape of a streamed backbone is head + one graph per signature + output, sharing one compute buffer
    the size of the largest; with the default bound of one shape, prompts of many lengths leave those and nothing
    more placed."""
    dit = Ideogram4DiT.load(COND, "cpu", options=RuntimeOptions(placement="stream"))
    try:
        x = np.zeros((16, dit.config.in_channels), np.float32)
        for n in (3, 17, 1, 9, 30, 5):
            dit.velocity(x, 0.4, np.ones((n, dit.config.llm_features_dim), np.float32), grid=(4, 4))
            live = [g for g in graphs_alive() if g.ready]
            assert len(dit._graphs) == 1 and len(live) == 2 + len(dit._stream.slots)
            bundle = next(iter(dit._graphs.values()))
            assert not any(g.allocr for g in live) and bundle.compute_bytes == bundle.shared.compute_bytes == max(g.compute_bytes for g in live)
    finally:
        dit.close()


@pytest.mark.parametrize("placement", ["resident", "stream"])
def test_measure_predicts_what_loading_allocates(placement):
    """The plan's numbers come from ``measure`` (nothing read or allocated): they must be what a load then holds."""
    opts = RuntimeOptions(placement=placement)
    for path, n_text in ((COND, 7), (UNCOND, 0)):
        m = Ideogram4DiT.measure(BackboneFile(path), opts, n_text=n_text, grid=(3, 4))
        dit = Ideogram4DiT.load(path, "cpu", options=opts)
        try:
            x = np.zeros((12, dit.config.in_channels), np.float32)
            dit.velocity(x, 0.5, np.ones((n_text, dit.config.llm_features_dim), np.float32) if n_text else None, grid=(3, 4))
            g = next(iter(dit._graphs.values()))
            assert m["weights"] == dit.summary()["weight_bytes"] and m["compute"] == g.compute_bytes
            assert m["streamed"] == dit.summary()["streamed_bytes"] and m["compute"] > 0
        finally:
            dit.close()


def test_a_streamed_load_that_fails_leaves_no_open_file(tmp_path):
    """A non-finite resident tensor is found after the block stream opened its descriptor on the file: the failed
    load must not keep it (a caller retrying, e.g. eval or a server, would run out of descriptors)."""
    import os
    import shutil

    from gguf_dit.errors import ModelError

    bad = tmp_path / "transformer.gguf"
    shutil.copy(COND, bad)
    t = BackboneFile(bad).tensors["final_layer.linear.bias"]
    w = np.memmap(bad, dtype=np.float32, mode="r+", offset=t.offset, shape=t.shape)
    w[0] = np.nan
    w.flush()
    del w
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        try:
            Ideogram4DiT(BackboneFile(bad), _backend("cpu"), RuntimeOptions(placement="stream"))
        except ModelError as e:
            assert "final_layer.linear.bias" in str(e)
        else:
            raise AssertionError("the NaN was not found")
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_options_are_checked():
    with pytest.raises(InputError, match="placement must be"):
        RuntimeOptions(placement="disk")
    with pytest.raises(InputError, match="stream_source must be"):
        RuntimeOptions(stream_source="mmap")


# -- the plan -------------------------------------------------------------------------------------------------------


def _plan(budget, offload="auto", backend="cuda", **kw):
    return plan(BackboneFile(COND), BackboneFile(UNCOND), backend=backend, height=64, width=64, n_text=9, offload=offload,
                budget=budget, budget_source="--max-vram" if backend != "cpu" else "--max-ram", **kw)


def test_the_fastest_mode_that_fits_the_budget_is_chosen():
    peak = {m: _plan(1 << 40, m).peak for m in ("none", "uncond", "all")}
    assert peak["none"] > peak["uncond"] > peak["all"]
    for budget, want in ((1 << 40, "none"), (peak["none"], "none"), (peak["none"] - 1, "uncond"), (peak["uncond"] - 1, "all"), (peak["all"], "all")):
        p = _plan(budget)
        assert p.offload == want and p.fits and p.peak <= budget
        assert p.placements == dict(zip(("cond", "uncond"), {"none": ("resident",) * 2, "uncond": ("resident", "stream"), "all": ("stream",) * 2}[want]))
    p = _plan(peak["none"] - 1)
    streamed = Ideogram4DiT.measure(BackboneFile(UNCOND), RuntimeOptions(placement="stream"), n_text=0, grid=(4, 4))["streamed"]
    assert p.streamed_per_step == streamed and "--offload uncond" in p.line() and "--max-vram" in p.line()


def test_a_budget_nothing_fits_is_one_error_with_the_numbers():
    small = _plan(1 << 40, "all").peak - 1
    with pytest.raises(OptionError) as e:
        _plan(small)
    msg = str(e.value)
    assert "\n" not in msg and "--max-vram" in msg and "none " in msg and "all " in msg and "64x64" in msg
    with pytest.raises(OptionError, match="--offload none"):  # an explicit mode is held to the budget too
        _plan(_plan(1 << 40, "none").peak - 1, "none")


def test_on_the_cpu_the_backbones_are_freed_for_a_decode_that_needs_their_room():
    p = _plan(1 << 40, "none", backend="cpu")
    alone = vae_bytes(64, 64, None) + PROCESS_BYTES
    assert not p.unload_before_decode and p.phases["decode"] > alone
    tight = _plan(max(p.phases["sample"], p.phases["encode"], alone), "none", backend="cpu")
    assert tight.unload_before_decode and tight.phases["decode"] == alone and "freed before each decode" in tight.line()


# -- the command line -----------------------------------------------------------------------------------------------


def test_run_offload_all_draws_the_same_image(cli, tmp_path):
    a, b = tmp_path / "none.png", tmp_path / "all.png"
    code, _, err = cli("run", "-p", "A red circle.", "-o", a, "--offload", "none", "--steps", "3")
    assert code == 0, err
    assert "memory: both backbones resident (--offload none)" in err
    code, _, err = cli("run", "-p", "A red circle.", "-o", b, "--offload", "all", "--steps", "3")
    assert code == 0, err
    assert "memory: both backbones streamed block by block (--offload all)" in err and "per step" in err
    assert "load: backbone 2/2" in err and "ignored" not in err
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_a_budget_for_the_other_device_is_said_to_be_ignored(tmp_path):
    from gguf_dit.runtime.generate import Generator

    gen = Generator(backend="cpu", max_vram=0.001)  # a GPU budget that would fit nothing: not applied on the CPU
    try:
        line = gen.generate("A red circle.").plan.line()
    finally:
        gen.close()
    assert "--max-vram ignored: this run's weights are in RAM" in line and "does not fit" not in line


@pytest.mark.parametrize("args, match", [
    (("--max-ram", "0.001"), "does not fit the 0.00 GiB --max-ram budget"),
    (("--max-ram", "-2"), "--max-ram must be a positive number"),
    (("--offload", "disk"), "offload must be one of auto, none, uncond, all"),
])
def test_run_memory_errors_are_one_line_exit_2_and_write_nothing(cli, tmp_path, args, match):
    out = tmp_path / "out"
    code, _, err = cli("run", "-p", "A red circle.", "-o", out, "--backend", "cpu", *args)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and match in lines[0], err
    assert not out.exists()


def test_several_prompts_features_wait_on_disk_not_in_memory():
    from gguf_dit.runtime.generate import Generator

    gen = Generator()
    try:
        both = gen.pipeline.encode(["A red circle.", "A blue square."])
        assert not isinstance(both, list) and len(both) == 2
        for i, c in enumerate(["A red circle.", "A blue square."]):
            np.testing.assert_array_equal(both[i], gen.pipeline.encode([c])[0])
    finally:
        gen.close()



def test_run_asking_for_a_missing_gpu_is_one_line_exit_2(cli, tmp_path):
    """The plan runs before any backend exists: with no GPU it must not fail on the GPU's free memory (a traceback)
    but leave the refusal to the backend, one line."""
    from gguf_dit.ggml_ops import available

    if "cuda" in available():
        pytest.skip("a GPU is present")
    out = tmp_path / "a.png"
    code, _, err = cli("run", "-p", "A red circle.", "-o", out, "--backend", "cuda", "--steps", "1")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "backend 'cuda'" in lines[0], err
    assert not out.exists()
