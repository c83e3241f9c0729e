"""What a user pastes into a bug report: versions, ggml backends and devices, the CPU and the features the
ggml build was compiled with, and what gguf-dit does with them (``gguf-dit info``, like llama.cpp's
system info)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys

from gguf_dit import __version__

PACKAGES = ("llama-cpp-python", "gguf", "numpy", "torch", "safetensors", "typer", "Pillow", "diffusers", "transformers")
#: /proc/cpuinfo flags that decide which ggml/llama.cpp/torch kernels run (docs/portability.md).
INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_line() -> str:
    """The CPU's model and which of ``INTERESTING_FLAGS`` it has, in one line: what every benchmark prints first,
    since the same code picks other kernels on another CPU."""
    from gguf_dit.ggml_ops import system

    flags = system.cpu_flags()
    # a KVM guest often names only the vendor's line ("AMD EPYC"): family and model tell Zen 3, 4 and 5 apart
    fam, mod = system._cpuinfo("cpu family"), system._cpuinfo("model\t")
    where = f" (family {fam.strip()} model {mod.strip()})" if fam and mod else ""
    return f"{system.cpu_model()}{where}; {' '.join(f for f in INTERESTING_FLAGS if f in flags) or 'none of ' + ', '.join(INTERESTING_FLAGS)}"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """Everything ``gguf-dit info`` reports, as plain data (``--json`` prints it as is)."""
    from gguf_dit.ggml_ops import devices, lib, system
    from gguf_dit.ggml_ops.threads import thread_budget

    info: dict = {
        "gguf_dit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "ggml": {"version": lib.ggml_version().decode(), "commit": lib.ggml_commit().decode(), "library_dir": str(lib.dir)},
    }
    flags = system.cpu_flags()
    regs = system.registries()
    cpu_reg = next((r for r in regs if r.name == "CPU"), None)
    info["cpu"] = {
        "model": system.cpu_model(),
        "cores": dataclasses.asdict(thread_budget()),
        "flags": [f for f in INTERESTING_FLAGS if f in flags],
        "build_features_missing_on_this_cpu": system.cpu_mismatch(cpu_reg.features if cpu_reg else {}, flags),
    }
    info["backends"] = [{"name": r.name, "devices": list(r.devices), "features": r.features} for r in regs]
    info["devices"] = [{
        "name": d.name, "description": d.description, "kind": d.kind, "memory_total": d.memory_total, "memory_free": d.memory_free,
        "extra_buffer_types": system.extra_buffer_types(lib.ggml_backend_dev_get(i)),
    } for i, d in enumerate(devices())]
    info["cuda"] = any(r.name == "CUDA" for r in regs)
    import inspect

    from gguf_dit.runtime.text_encoder import TextEncoder

    info["defaults"] = {
        "backend": "cuda" if info["cuda"] else "cpu",
        "threads": thread_budget().threads,
        "text_encoder_extra_buffer_types": inspect.signature(TextEncoder.load).parameters["use_extra_bufts"].default,
        "dit_weights_buffer": "CPU: the GGUF's memory map (CPU_Mapped); CUDA: the device's default buffer type; never repacked",
    }
    if info["cpu"]["build_features_missing_on_this_cpu"]:  # llama.cpp would run the wrong instructions
        info["llama_cpp_system_info"] = "not queried: this llama-cpp-python build targets another CPU"
    else:
        from gguf_dit.runtime.text_encoder import llama_system_info

        info["llama_cpp_system_info"] = llama_system_info()
    return info


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _cores(c: dict) -> str:
    return f"{c['cpus']} usable CPUs, {c['physical']} physical cores, {c['busy']:.1f} busy with other processes now"


def render(info: dict) -> str:
    lines = [
        f"gguf-dit {info['gguf_dit']}  (Python {info['python']}, {info['platform']})",
        "packages      " + ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v),
        f"ggml          {info['ggml']['version']} (commit {info['ggml']['commit']}) from {info['ggml']['library_dir']}",
        f"CPU           {info['cpu']['model']}; {_cores(info['cpu']['cores'])}",
        "CPU flags     " + (" ".join(info["cpu"]["flags"]) or "(none of interest)"),
    ]
    missing = info["cpu"]["build_features_missing_on_this_cpu"]
    if missing:
        lines.append(f"WARNING       this ggml build uses {', '.join(missing)}, which this CPU lacks: reinstall llama-cpp-python with --no-cache-dir")
    for b in info["backends"]:
        feats = " ".join(f"{k}" if v == "1" else f"{k}={v}" for k, v in b["features"].items())
        lines.append(f"backend       {b['name']}: {', '.join(b['devices']) or 'no devices'}" + (f"; features {feats}" if feats else ""))
    for d in info["devices"]:
        extra = ", ".join(d["extra_buffer_types"]) or "none"
        mem = f"; {_mib(d['memory_free'])} free of {_mib(d['memory_total'])}" if d["memory_total"] else ""
        lines.append(f"device        {d['name']} ({d['kind']}): {d['description']}{mem}; extra buffer types: {extra} (unused)")
    lines.append(f"CUDA          {'yes' if info['cuda'] else 'no (CPU-only build of llama-cpp-python)'}")
    lines.append(f"defaults      backend {info['defaults']['backend']}, {info['defaults']['threads']} thread{'s' * (info['defaults']['threads'] != 1)} (physical cores less busy ones, at least 1; --threads N overrides)")
    lines.append(f"llama.cpp     {info['llama_cpp_system_info']}")
    return "\n".join(lines)


def version_line() -> str:
    """``gguf-dit --version``: the versions that identify a build (loads ggml, not llama.cpp or torch)."""
    try:
        from gguf_dit.ggml_ops import lib

        ggml = f"ggml {lib.ggml_version().decode()} ({lib.ggml_commit().decode()})"
    except Exception as e:  # --version must answer even when the native libraries are broken
        ggml = f"ggml unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return f"gguf-dit {__version__} (llama-cpp-python {_version('llama-cpp-python')}, {ggml}, gguf {_version('gguf')}, Python {platform.python_version()}, {sys.platform})"
