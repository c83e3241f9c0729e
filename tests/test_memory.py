"""Issue 14 items 2 and 3: CPU weights computed from the GGUF's memory map, and a bounded graph cache.

The oracle for both is the path they replace: weights copied into a backend buffer (``RuntimeOptions(mmap=False)``,
the loader before issue 14) and one graph kept per shape for ever (a cache larger than the shapes used). Same bytes
and the same graph must give the same bits, so every comparison here is exact equality.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _gguf_edit import GGUFFile, KV, V
from gguf_dit.errors import GGMLError, ModelError
from gguf_dit.ggml_ops import Backend, GGMLType, TensorStore, upload
from gguf_dit.ggml_ops._lib import tensor_struct
from gguf_dit.runtime.backbone_file import BackboneFile
from gguf_dit.runtime.demo import DEMO_DIR
from gguf_dit.runtime.dit import Ideogram4DiT, RuntimeOptions
from gguf_dit.runtime.sampler import sample

COND, UNCOND = DEMO_DIR / "transformer.gguf", DEMO_DIR / "unconditional_transformer.gguf"
COPY = RuntimeOptions(mmap=False)


def inputs(dit: Ideogram4DiT, grid=(4, 4), n_text=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((grid[0] * grid[1], dit.config.in_channels)).astype(np.float32)
    feats = rng.standard_normal((n_text, dit.config.llm_features_dim)).astype(np.float32) if n_text else None
    return x, feats


def velocities(path, options: RuntimeOptions, backend="cpu") -> tuple[list[np.ndarray], dict]:
    dit = Ideogram4DiT.load(path, backend, options=options)
    try:
        out = []
        for grid, n_text, t in (((4, 4), 5, 0.3), ((3, 5), 0, 0.8), ((2, 6), 11, 0.55)):
            x, feats = inputs(dit, grid, n_text, seed=n_text)
            out.append(dit.velocity(x, t, feats, grid=grid))
        return out, dit.summary()
    finally:
        dit.close()


def aliases_file(dit: Ideogram4DiT, name: str) -> bool:
    """Whether the ggml tensor's data pointer is the file map's own bytes of that tensor."""
    return tensor_struct(dit.weights[name].ptr).data == dit.file.tensors[name].data.ctypes.data


# -- memory-mapped weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COND, UNCOND], ids=["cond", "uncond"])
def test_demo_weights_compute_from_the_file_map_with_identical_velocities(path):
    dit = Ideogram4DiT.load(path, "cpu")
    try:
        stored = {n for n, t in dit.file.tensors.items() if t.type is dit.weights[n].type}
        assert dit.weights.mapped == stored and not dit.weights.copy_reasons
        # cond: Q8_0, Q4_K, F16 and F32; uncond: Q8_0 and F32
        assert {dit.weights[n].type for n in stored} >= {GGMLType.Q8_0, GGMLType.F32}
        assert all(aliases_file(dit, n) for n in stored)
        assert dit.summary()["mapped_bytes"] == sum(dit.file.tensors[n].nbytes for n in stored)
    finally:
        dit.close()
    mapped, _ = velocities(path, RuntimeOptions())
    copied, summary = velocities(path, COPY)
    assert summary["mapped_bytes"] == 0
    for a, b in zip(mapped, copied):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("recipe", ["q8_0", "q4_k-protect"])
def test_tiny_quantized_model_mapped_equals_copied(cli, checkpoints, tmp_path, recipe):
    root, _, _ = checkpoints("f32")
    code, _, err = cli("convert", root, "-o", tmp_path, "--recipe", recipe, "-q", "--force")
    assert code == 0, err
    for name in ("transformer.gguf", "unconditional_transformer.gguf"):
        mapped, summary = velocities(tmp_path / name, RuntimeOptions())
        copied, _ = velocities(tmp_path / name, COPY)
        assert summary["mapped_bytes"] > 0.9 * summary["weight_bytes"]
        assert any(GGMLType[t].is_quantized for t in summary["types"])
        for a, b in zip(mapped, copied):
            np.testing.assert_array_equal(a, b)


def test_misaligned_tensors_are_copied_saying_why(tmp_path):
    """general.alignment 4 (a power of two, so a valid GGUF) puts most tensors off ggml's 32-byte boundary, where
    ggml_backend_cpu_buffer_from_ptr would abort the process: those are copied, the rest still mapped."""
    f = GGUFFile.from_file(COND)
    f.alignment = 4
    f.kvs = [k for k in f.kvs if k.key != "general.alignment"] + [KV("general.alignment", V.UINT32, 4)]
    start, cur = f.layout()[0], 0
    for i, t in enumerate(f.tensors):  # every other tensor 4 bytes past a 32-byte boundary of the file
        t.offset = cur + (i % 2 * 4 - start - cur) % 32
        cur = t.offset + len(t.data)
    path = f.write(tmp_path / "align4.gguf")
    dit = Ideogram4DiT.load(path, "cpu")
    try:
        reasons = dit.weights.copy_reasons
        assert reasons and dit.weights.mapped and set(reasons).isdisjoint(dit.weights.mapped)
        assert all(dit.file.tensors[n].data.ctypes.data % 32 for n in reasons)
        assert all("32-byte aligned" in why for why in reasons.values())
        assert all(aliases_file(dit, n) for n in dit.weights.mapped)
        assert not any(aliases_file(dit, n) for n in reasons)
    finally:
        dit.close()
    a, _ = velocities(path, RuntimeOptions())
    b, _ = velocities(COND, COPY)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_a_backend_that_cannot_map_host_memory_copies_everything():
    """CUDA's device has no buffer_from_host_ptr (calling it would crash): such a backend gets every weight copied."""
    be = Backend("cpu")
    be.maps_host_memory = False
    dit = Ideogram4DiT(BackboneFile(COND), be)
    try:
        assert not dit.weights.mapped and dit.summary()["mapped_bytes"] == 0
        assert set(dit.weights.copy_reasons.values()) == {"backend cpu cannot compute from host memory"}
        x, feats = inputs(dit, (4, 4), 5, seed=5)  # the first case of velocities()
        np.testing.assert_array_equal(dit.velocity(x, 0.3, feats, grid=(4, 4)), velocities(COND, RuntimeOptions())[0][0])
    finally:
        dit.close()


def test_a_map_shorter_than_the_header_says_is_one_error_before_ggml():
    """The header checks every range against the file's size; a file that shrank between that check and the map
    leaves a short view, which must be refused in Python (ggml would read past the map: SIGBUS)."""
    f = BackboneFile(COND)
    name = "layers.1.feed_forward.w1.weight"
    f.tensors[name].data = f.tensors[name].data[:-32]
    with pytest.raises(ModelError, match=r"file ends inside the tensor data") as e:
        Ideogram4DiT(f, Backend("cpu"))
    assert (e.value.path, e.value.tensor) == (str(COND), name)


def test_truncated_file_is_one_line_error_without_a_crash(tmp_path):
    """In a child process, so that a crash (SIGSEGV/SIGBUS) would show as a signal, not take pytest down."""
    data = COND.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 4096):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        code = textwrap.dedent(f"""
            from gguf_dit.errors import ModelError
            from gguf_dit.runtime.dit import Ideogram4DiT
            try:
                Ideogram4DiT.load({str(bad)!r}, "cpu")
            except ModelError as e:
                print(e)
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 1 and str(bad) in lines[0] and "truncated" in lines[0], r.stdout


def test_host_aliasing_checks_alignment_and_size_in_python():
    """Misaligned or wrongly sized host memory is copied instead (ggml would abort on the first). Run in a child:
    a missed check kills the process instead of failing one test."""
    code = textwrap.dedent("""
        import numpy as np
        from gguf_dit.errors import GGMLError
        from gguf_dit.ggml_ops import Backend, GGMLType, TensorStore, download, upload
        be = Backend("cpu")
        base = np.zeros(64 + 8, dtype=np.float32)
        off = (-base.ctypes.data % 32) // 4
        good = base[off : off + 8]                 # 32-byte aligned
        odd = base[off + 1 : off + 9]              # 4 bytes past it
        good[:] = np.arange(8); odd[:] = np.arange(8)
        s = TensorStore(be, [("a", GGMLType.F32, (8,)), ("b", GGMLType.F32, (8,)), ("c", GGMLType.F32, (8,))],
                        host={"a": good, "b": odd, "c": good[:4]})
        assert s.mapped == {"a"}, s.mapped
        assert "aligned" in s.copy_reasons["b"] and "16 bytes of data for a tensor of 32" in s.copy_reasons["c"], s.copy_reasons
        good[3] = 42.0                             # the tensor is that memory: ggml sees the change
        assert download(s["a"])[3] == 42.0
        try:
            upload(s["a"], np.zeros(8, np.float32))
        except GGMLError as e:
            print("refused:", e)
        s.close()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "refused: tensor a computes from host memory" in r.stdout


def test_upload_into_a_mapped_weight_is_refused():
    dit = Ideogram4DiT.load(COND, "cpu")
    try:
        w = dit.weights["input_proj.weight"]
        with pytest.raises(GGMLError, match="cannot be written"):
            upload(w, np.zeros(w.nbytes, np.uint8))
    finally:
        dit.close()


def test_store_without_host_memory_is_unchanged():
    s = TensorStore(Backend("cpu"), [("a", GGMLType.F32, (4,))])
    try:
        assert not s.mapped and s.nbytes >= 16
    finally:
        s.close()


# -- bounded graph cache --------------------------------------------------------------------------------------------


@pytest.fixture
def live_graphs(graphs_alive):
    """``live_graphs(dit)``: graphs built for this backbone whose compute buffer is still allocated."""
    return lambda dit: sum(1 for g in graphs_alive() if g.allocr and g.backend is dit.backend)


LENGTHS = [3, 17, 1, 9, 30, 5, 12, 2, 25, 7, 17, 3]


@pytest.mark.parametrize("bound", [1, 2])
def test_many_prompt_lengths_keep_at_most_the_bound_of_graphs_with_identical_velocities(bound, live_graphs):
    free = Ideogram4DiT.load(COND, "cpu", options=RuntimeOptions(max_graphs=len(LENGTHS)))
    bounded = Ideogram4DiT.load(COND, "cpu", options=RuntimeOptions(max_graphs=bound))
    try:
        for i, n in enumerate(LENGTHS):
            x, feats = inputs(bounded, (4, 4), n, seed=i)
            np.testing.assert_array_equal(bounded.velocity(x, 0.4, feats, grid=(4, 4)), free.velocity(x, 0.4, feats, grid=(4, 4)))
            assert len(bounded._graphs) <= bound and live_graphs(bounded) <= bound
        assert live_graphs(free) == len(set(LENGTHS))  # the unbounded path does grow: the count above is real
    finally:
        free.close()
        bounded.close()


def test_eviction_is_least_recently_used():
    dit = Ideogram4DiT.load(COND, "cpu", options=RuntimeOptions(max_graphs=2))
    try:
        x, _ = inputs(dit, (4, 4), 0)
        for n in (3, 5):
            dit.velocity(x, 0.4, inputs(dit, (4, 4), n)[1], grid=(4, 4))
        kept = dit._graphs[(3, 4, 4)]
        dit.velocity(x, 0.4, inputs(dit, (4, 4), 3)[1], grid=(4, 4))  # 3 used last: 5 is the oldest
        dit.velocity(x, 0.4, None, grid=(4, 4))
        assert list(dit._graphs) == [(3, 4, 4), (0, 4, 4)] and dit._graphs[(3, 4, 4)] is kept
    finally:
        dit.close()


def test_evicted_text_upload_is_redone_for_a_rebuilt_graph():
    """The read-only text features are uploaded once per graph; a rebuilt graph must get them again."""
    dit = Ideogram4DiT.load(COND, "cpu")
    try:
        x, feats = inputs(dit, (4, 4), 6)
        feats.setflags(write=False)
        first = dit.velocity(x, 0.4, feats, grid=(4, 4))
        dit.velocity(x, 0.4, inputs(dit, (4, 4), 2)[1], grid=(4, 4))  # evicts the 6-token graph
        np.testing.assert_array_equal(dit.velocity(x, 0.4, feats, grid=(4, 4)), first)
    finally:
        dit.close()


def test_a_batch_of_prompt_lengths_samples_the_same_latents_with_a_bounded_cache():
    """What `run` does with several prompts: each image's loop on both backbones, one prompt length after another."""
    def batch(max_graphs: int):
        opts = RuntimeOptions(max_graphs=max_graphs)
        cond, uncond = Ideogram4DiT.load(COND, "cpu", options=opts), Ideogram4DiT.load(UNCOND, "cpu", options=opts)
        try:
            out = []
            for i, n in enumerate((4, 11, 7, 4)):
                feats = inputs(cond, (4, 4), n, seed=10 + i)[1]
                out.append(sample(cond, uncond, feats, 64, 64, steps=3, seed=i))
                assert len(cond._graphs) <= max_graphs and len(uncond._graphs) <= max_graphs
            return out
        finally:
            cond.close()
            uncond.close()

    for a, b in zip(batch(1), batch(8)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_graphs_must_be_a_positive_integer(bad):
    from gguf_dit.errors import InputError

    with pytest.raises(InputError, match="max_graphs must be a positive integer"):
        RuntimeOptions(max_graphs=bad)
