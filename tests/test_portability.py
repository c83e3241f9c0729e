"""Every CPU (issue 10 §1): the text encoder never uses llama.cpp's extra (repacking / AMX) buffer types,
DiT weights live in the backend's default buffer, a ggml build compiled for another CPU is refused, and
`gguf-dit --version` / `gguf-dit info` report what a bug report needs.

These tests pass on any CPU; what they prove differs by CPU. On an Intel CPU with AMX, loading the
demo encoder with llama.cpp's default model parameters dies with SIGSEGV in ggml_backend_amx_mul_mat
(llama.cpp issue 20824), so there `test_demo_encoder_encodes_without_extra_buffers` is the regression
test itself; elsewhere the parameter spy is what proves the fix.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from gguf_dit import __version__


def _demo(name: str) -> Path:
    from gguf_dit.runtime import demo

    return Path(demo.model_dir()) / name


@pytest.fixture
def load_spy(monkeypatch):
    """Records the llama_model_params every llama_model_load_from_file call receives, then loads for real."""
    from gguf_dit.runtime import text_encoder as te

    lc = te._llama_cpp()
    real = lc.llama_model_load_from_file
    seen = []

    def spy(path, params):
        seen.append({"use_extra_bufts": bool(params.use_extra_bufts), "n_gpu_layers": int(params.n_gpu_layers)})
        # Never really load with extra buffers: on an AMX CPU that is the crash this file guards against.
        return real(path, params) if not params.use_extra_bufts else None

    monkeypatch.setattr(lc, "llama_model_load_from_file", spy)
    return seen


def test_text_encoder_loads_without_extra_buffer_types(load_spy):
    from gguf_dit.runtime.text_encoder import TextEncoder

    with TextEncoder.load(_demo("text_encoder.gguf")):
        pass
    assert load_spy == [{"use_extra_bufts": False, "n_gpu_layers": 0}]


def test_extra_buffer_types_only_when_asked(load_spy):
    # The spy must see the parameter change, or the test above proves nothing.
    from gguf_dit.errors import ModelError
    from gguf_dit.runtime.text_encoder import TextEncoder

    with pytest.raises(ModelError):
        TextEncoder.load(_demo("text_encoder.gguf"), use_extra_bufts=True)
    assert load_spy == [{"use_extra_bufts": True, "n_gpu_layers": 0}]


def test_demo_encoder_encodes_without_extra_buffers():
    # On an AMX CPU this is where the process died before the fix; here it must give finite features.
    import numpy as np

    from gguf_dit.runtime.text_encoder import TextEncoder

    with TextEncoder.load(_demo("text_encoder.gguf")) as enc:
        f = enc.encode("A red circle on the left.")
    assert f.shape[1] == enc.features_dim and np.isfinite(f).all()


@pytest.mark.parametrize("mmap", [False, True], ids=["copied", "mapped"])
def test_dit_weights_live_in_the_default_buffer_type(mmap):
    from gguf_dit.ggml_ops import lib, system
    from gguf_dit.ggml_ops._lib import tensor_struct
    from gguf_dit.runtime.dit import Ideogram4DiT, RuntimeOptions

    dit = Ideogram4DiT.load(_demo("transformer.gguf"), "cpu", threads=1, options=RuntimeOptions(mmap=mmap))
    try:
        default = lib.ggml_backend_buft_name(dit.backend.buffer_type).decode()
        # copied: the default buffer; memory-mapped: ggml's CPU buffer over host memory ("CPU_Mapped", what
        # llama.cpp's mmap uses), which the extra-buffer routing does not match either
        used = {system.buffer_type_name(tensor_struct(t.ptr).buffer) for t in dit.weights.tensors.values()}
        assert default == "CPU" and used == ({"CPU_Mapped"} if mmap else {"CPU"})
        assert not used & set(system.extra_buffer_types(dit.backend.device))
    finally:
        dit.close()


def test_cpu_mismatch_names_missing_instructions():
    from gguf_dit.ggml_ops.system import cpu_mismatch

    built = {"AVX2": "1", "AVX512": "1", "AVX512_BF16": "1", "AMX_INT8": "1", "OPENMP": "1"}
    assert cpu_mismatch(built, {"avx2", "avx512f"}) == ["AVX512_BF16", "AMX_INT8"]
    assert cpu_mismatch(built, {"avx2", "avx512f", "avx512_bf16", "amx_int8"}) == []
    assert cpu_mismatch(built, set()) == []  # no /proc/cpuinfo: unknown, not "lacks everything"


@pytest.fixture
def foreign_build(monkeypatch):
    """This ggml build as if compiled on a CPU with AVX512_BF16 and AMX, run on one without them: works on any
    machine (the real features stay; two are added to what ggml reports and removed from /proc/cpuinfo's flags)."""
    import dataclasses

    from gguf_dit.ggml_ops import system

    real_regs, real_flags = system.registries(), system.cpu_flags()
    extra = {"AVX512_BF16": "1", "AMX_INT8": "1"}
    regs = [dataclasses.replace(r, features={**r.features, **extra}) if r.name == "CPU" else r for r in real_regs]
    monkeypatch.setattr(system, "registries", lambda: regs)
    monkeypatch.setattr(system, "cpu_flags", lambda: (real_flags or {"sse3"}) - {"avx512_bf16", "amx_int8"})
    monkeypatch.setattr(system, "_cpu_ok", False)
    return ["AVX512_BF16", "AMX_INT8"]


def test_build_for_another_cpu_is_refused(foreign_build):
    import numpy as np

    from gguf_dit.errors import GGMLError
    from gguf_dit.ggml_ops import Backend, GGMLType, quantize, system

    with pytest.raises(GGMLError, match="uses AVX512_BF16, AMX_INT8, which this CPU .* --no-cache-dir llama-cpp-python==0.3.36"):
        system.check_cpu()
    with pytest.raises(GGMLError, match="does not have"):  # before ggml computes anything
        Backend("cpu")
    with pytest.raises(GGMLError, match="does not have"):
        quantize(np.zeros((1, 32), np.float32), GGMLType.Q8_0)


def test_own_build_passes_the_cpu_check(monkeypatch):
    from gguf_dit.ggml_ops import system

    monkeypatch.setattr(system, "_cpu_ok", False)
    system.check_cpu()
    assert system._cpu_ok


def test_info_still_reports_a_build_for_another_cpu(foreign_build, cli):
    # The case info exists for: it must run and say what is wrong, where every other command refuses.
    code, out, err = cli("info", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["cpu"]["build_features_missing_on_this_cpu"] == foreign_build
    assert data["llama_cpp_system_info"].startswith("not queried")  # llama.cpp would run the wrong instructions
    code, text, _ = cli("info")
    assert code == 0 and "this ggml build uses AVX512_BF16, AMX_INT8, which this CPU lacks" in text


def test_build_features_match_this_cpu():
    # The features ggml reports are compile-time; on a correct install each x86 one is a flag of this CPU.
    from gguf_dit.ggml_ops import system

    flags = system.cpu_flags()
    feats = system.cpu_registry().features
    for feat, flag in system.X86_FLAGS.items():
        if feats.get(feat) == "1" and flags:
            assert flag in flags, feat


def test_version(cli):
    import platform
    import sys

    from gguf_dit.ggml_ops import lib

    code, out, _ = cli("--version")
    assert code == 0
    assert out.strip() == (
        f"gguf-dit {__version__} (llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, "
        f"ggml 0.25.3 ({lib.ggml_commit().decode()}), gguf {importlib.metadata.version('gguf')}, "
        f"Python {platform.python_version()}, {sys.platform})"
    )


def test_info_names_backend_devices_and_features(cli):
    from gguf_dit.ggml_ops import system

    code, out, err = cli("info", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["ggml"]["version"] == "0.25.3"
    assert data["packages"]["llama-cpp-python"] == "0.3.36"
    names = [b["name"] for b in data["backends"]]
    assert "CPU" in names
    assert data["cuda"] == ("CUDA" in names)
    cpu = next(b for b in data["backends"] if b["name"] == "CPU")
    assert cpu["features"] == system.cpu_registry().features
    assert data["cpu"]["model"] == system.cpu_model()
    assert data["cpu"]["build_features_missing_on_this_cpu"] == []
    import inspect

    from gguf_dit.runtime.text_encoder import TextEncoder

    assert data["defaults"]["text_encoder_extra_buffer_types"] is inspect.signature(TextEncoder.load).parameters["use_extra_bufts"].default is False
    dev = next(d for d in data["devices"] if d["kind"] == "cpu")
    assert dev["name"] == "CPU"
    code, text, _ = cli("info")
    assert code == 0
    assert "backend       CPU: CPU" in text and data["cpu"]["model"] in text
    assert ("AVX2" in text) == (cpu["features"].get("AVX2") == "1")


def test_dit_velocity_does_not_depend_on_the_thread_count():
    # docs/portability.md says each output row is computed by one thread: the bytes must not change with threads.
    import numpy as np

    from gguf_dit.runtime.dit import Ideogram4DiT

    from gguf_dit.runtime.backbone_file import BackboneFile

    cfg = BackboneFile(_demo("transformer.gguf")).config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, cfg.in_channels)).astype(np.float32)
    f = rng.standard_normal((5, cfg.llm_features_dim)).astype(np.float32)
    out = []
    for threads in (1, 2, 3):
        dit = Ideogram4DiT.load(_demo("transformer.gguf"), "cpu", threads=threads)
        try:
            out.append(dit.velocity(x, 0.4, f, grid=(4, 4)))
        finally:
            dit.close()
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])


def test_cpu_line_names_the_cpu_its_family_and_the_flags_that_pick_kernels(monkeypatch):
    # What every benchmark prints first (gguf_dit.sysinfo.cpu_line), from /proc/cpuinfo as a KVM guest shows it:
    # "model name" names only the line, "cpu family" and "model" tell Zen 3, 4 and 5 apart.
    from gguf_dit.ggml_ops import system
    from gguf_dit.sysinfo import cpu_line

    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
            "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\ncpu family\t: 26\n")

    class FakePath:
        def __init__(self, p):
            assert p == "/proc/cpuinfo"

        def read_text(self):
            return text

    monkeypatch.setattr(system, "Path", FakePath)
    assert cpu_line() == "AMD EPYC (family 25 model 17); avx avx2 fma avx512f avx512_bf16 amx_tile"
    text = "model name\t: Some CPU\nflags\t\t: sse2\n"  # neither family nor model, no flag of interest
    assert cpu_line().startswith("Some CPU; none of avx, avx2, ")
