"""ggml_ops: the ctypes layer over llama-cpp-python's ggml (no Ideogram knowledge)."""

from __future__ import annotations

import logging
import subprocess
import sys

import gguf
import numpy as np
import pytest

from gguf_dit import ggml_ops as g
from gguf_dit.errors import GGMLError

from _helpers import TF32_UNIT_ROUNDOFF, backend_names, check_err


def test_import_checks_the_pinned_ggml_version():
    assert g.version() == g.EXPECTED_GGML_VERSION == "0.25.3"


def test_libraries_load_without_importing_llama_cpp():
    code = "import sys; from gguf_dit import ggml_ops; assert 'llama_cpp' not in sys.modules; print(ggml_ops.version())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.25.3"


def test_wrong_library_directory_is_a_clear_error(tmp_path):
    code = "from gguf_dit import ggml_ops"
    env = {"GGUF_DIT_GGML_LIB": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "libggml-base.so not found" in out.stderr


def test_cpu_backend_is_always_available_and_threads_are_settable():
    assert "cpu" in g.available()
    be = g.Backend("cpu", threads=1)
    assert be.is_cpu and be.threads == 1
    be.set_threads(2)
    assert be.threads == 2
    with pytest.raises(GGMLError):
        be.set_threads(0)


def test_requesting_cuda_without_a_cuda_build_is_a_clear_error():
    if "cuda" in g.available():
        pytest.skip("this build has CUDA")
    with pytest.raises(GGMLError, match="GGML_CUDA=on"):
        g.Backend("cuda")


def test_q8_0_quantize_equals_gguf_py_bytes():
    x = np.random.default_rng(0).standard_normal((37, 96)).astype(np.float32)
    np.testing.assert_array_equal(g.quantize(x, g.GGMLType.Q8_0), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))


@pytest.mark.parametrize("imp", [None, "ones"])
def test_threaded_quantize_equals_single_thread(imp):
    x = np.random.default_rng(1).standard_normal((50, 512)).astype(np.float32)
    importance = np.ones(512, np.float32) if imp else None
    a = g.quantize(x, g.GGMLType.Q4_K, importance=importance, threads=1)
    b = g.quantize(x, g.GGMLType.Q4_K, importance=importance, threads=3)
    np.testing.assert_array_equal(a, b)


def test_dequantize_matches_gguf_py_and_the_source():
    x = np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)
    for t in (g.GGMLType.Q8_0, g.GGMLType.Q4_K, g.GGMLType.Q6_K):
        q = g.quantize(x, t)
        ours = g.dequantize(q, t, 256)
        theirs = gguf.quants.dequantize(q, gguf.GGMLQuantizationType(int(t)))
        np.testing.assert_array_equal(ours, theirs)
        assert np.linalg.norm(ours - x) / np.linalg.norm(x) < 0.1


def test_block_size_rules_are_checked_before_ggml():
    x = np.zeros((4, 128), np.float32)
    with pytest.raises(GGMLError, match="divisible by 256"):
        g.quantize(x, g.GGMLType.Q4_K)
    with pytest.raises(GGMLError, match="divisible by 32"):
        g.quantize(np.zeros((4, 48), np.float32), g.GGMLType.Q8_0)
    with pytest.raises(GGMLError, match="activation-only"):
        g.quantize(np.zeros((4, 256), np.float32), g.GGMLType.Q8_K)
    with pytest.raises(GGMLError):
        g.Context(4).new_tensor(g.GGMLType.Q4_K, (64, 4))
    with pytest.raises(GGMLError, match="non-finite"):
        g.quantize(np.full((1, 32), np.nan, np.float32), g.GGMLType.Q8_0)


#: max |ggml - numpy float32| / max |numpy|. Observed on AMD EPYC Zen 4: 9.6e-8 to 1.6e-7 for the ops below, 2.0e-7
#: for flash attention. Both sides sum float32 in an order their CPU kernels choose (ggml's SIMD, numpy's BLAS),
#: so this moves a little between CPUs; about 3x margin. The norms run at a mean square near their eps, where a
#: tenfold eps moves them by 3 % (LayerNorm) and 25 % (RMSNorm).
#: CUDA (TF32 products, F16 K/V in flash attention: tests/_helpers.py), observed on an H200 (ggml-cuda built for
#: sm_90 by llama-cpp-python 0.3.36): mm, cat and perm 6.4e-4, act 6.2e-4, rms 5.6e-4, ln 3.0e-4, glu 1.2e-3 (a
#: product of two rounded values), flash attention 5.8e-4; six TF32 unit roundoffs, 2.9e-3, is 2.4x the largest.
OPS_TOL = {"cpu": 6e-7, "cuda": 6 * TF32_UNIT_ROUNDOFF}


def _rel(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("backend", backend_names())
def test_graph_ops_match_numpy(backend):
    be = g.Backend(backend)
    rng = np.random.default_rng(3)
    W = rng.standard_normal((64, 96)).astype(np.float32)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    store = g.TensorStore(be, [("W", g.GGMLType.F32, (96, 64)), ("w", g.GGMLType.F32, (64,))])
    g.upload(store["W"], W)
    g.upload(store["w"], w)

    def build(b, i):
        y = b.mul_mat(store["W"], i["x"])  # [64, 5]
        small = b.scale(y, 1e-3)  # mean square ~1e-4: the eps counts
        return {
            "mm": y,
            "rms": b.mul(b.rms_norm(small, 1e-5), store["w"]),
            "ln": b.norm(small, 1e-6),
            "act": b.add(b.silu(y), b.tanh(y)),
            "glu": b.swiglu(y, b.scale(y, 0.5)),
            "cat": b.concat(y, b.neg(y), 0),
            "perm": b.cont(b.permute(b.reshape(y, 8, 8, 5), 1, 0, 2, 3)),
        }

    gr = g.Graph(be, [("x", g.GGMLType.F32, (96, 5))], build)
    gr.set("x", x)
    gr.compute()
    y = x @ W.T
    small = y * np.float32(1e-3)
    silu = y / (1 + np.exp(-y))
    want = {
        "mm": y,
        "rms": small / np.sqrt((small**2).mean(-1, keepdims=True) + 1e-5) * w,
        "ln": (small - small.mean(-1, keepdims=True)) / np.sqrt(small.var(-1, keepdims=True) + 1e-6),
        "act": silu + np.tanh(y),
        "glu": silu * y * 0.5,
        "cat": np.concatenate([y, -y], -1),
        "perm": y.reshape(5, 8, 8).transpose(0, 2, 1),
    }
    for name, ref in want.items():
        err = _rel(gr.get(name), ref)
        check_err(err, OPS_TOL[backend], name)


@pytest.mark.parametrize("backend", backend_names())
def test_flash_attention_matches_softmax_attention(backend):
    be = g.Backend(backend)
    rng = np.random.default_rng(4)
    D, L, H = 64, 7, 3
    q, k, v = (rng.standard_normal((H, L, D)).astype(np.float32) for _ in range(3))
    inputs = [(n, g.GGMLType.F32, (D, L, H)) for n in "qkv"]
    gr = g.Graph(be, inputs, lambda b, i: {"o": b.cont(b.flash_attn(i["q"], i["k"], i["v"], 0.125))})
    for n, a in zip("qkv", (q, k, v)):
        gr.set(n, a)
    gr.compute()
    s = np.einsum("hld,hmd->hlm", q, k) * 0.125
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("hlm,hmd->lhd", p, v)  # ggml returns [D, H, L]
    check_err(_rel(gr.get("o"), ref), OPS_TOL[backend], "flash_attn")


def test_bad_shapes_raise_instead_of_aborting():
    be = g.Backend("cpu")
    ctx = g.Context(8, graph_size=16)
    b = g.Builder(ctx)
    a = ctx.new_tensor(g.GGMLType.F32, (8, 4))
    c = ctx.new_tensor(g.GGMLType.F32, (6, 4))
    with pytest.raises(GGMLError, match="mul_mat"):
        b.mul_mat(a, c)
    with pytest.raises(GGMLError, match="broadcast"):
        b.add(a, c)
    with pytest.raises(GGMLError, match="reshape"):
        b.reshape(a, 5, 7)
    with pytest.raises(GGMLError, match="exceeds"):
        b.view(a, (8, 5), (32,))
    with pytest.raises(GGMLError, match="permutation"):
        b.permute(a, 0, 0, 1, 2)
    store = g.TensorStore(be, [("t", g.GGMLType.F32, (8,))])
    with pytest.raises(GGMLError, match="9 values"):
        g.upload(store["t"], np.zeros(9, np.float32))
    with pytest.raises(GGMLError, match="63"):
        ctx.new_tensor(g.GGMLType.F32, (2,), "x" * 70)


def test_ggml_log_goes_to_python_logging(caplog):
    from gguf_dit.ggml_ops import _lib

    with caplog.at_level(logging.DEBUG, logger="gguf_dit.ggml"):
        _lib._log_cb(3, b"hello from ggml ", None)
        _lib._log_cb(5, b"continued\n", None)
    assert ("gguf_dit.ggml", logging.WARNING, "hello from ggml continued") in caplog.record_tuples


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux-only")
def test_each_ggml_library_is_mapped_once_even_with_llama_cpp():
    code = (
        "import re; from gguf_dit import ggml_ops; import llama_cpp; "
        "libs = set(re.findall(r'(/\\S*/lib(ggml[a-z-]*)\\.so[.0-9]*)', open('/proc/self/maps').read())); "
        "names = sorted(n for _, n in libs); print(names); assert len(names) == len(set(names)), names"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "'ggml-cpu'" in out.stdout and "'ggml-base'" in out.stdout
