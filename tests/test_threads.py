"""The default thread count (docs/cli.md "Threads"): physical cores less the busy ones, at least 1, decided by one
function that every default goes through. No timing here: the measurements are benchmarks/threads_under_load.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import subprocess

import numpy as np
import pytest

from gguf_dit.ggml_ops import threads


@pytest.mark.parametrize("physical,logical,busy,want", [
    (2, 2, 0.0, 2),  # idle: every core
    (2, 2, 0.4, 2),  # a little noise rounds away
    (2, 2, 0.6, 1),
    (2, 2, 1.0, 1),  # one busy process: one core left
    (2, 2, 2.0, 1),  # all busy: never below 1
    (2, 2, 7.5, 1),
    (8, 16, 0.0, 8),  # SMT: physical cores, not logical CPUs
    (8, 16, 4.0, 6),  # 4 busy logical CPUs = 2 cores' worth
    (8, 16, 16.0, 1),
    (1, 1, 0.0, 1),
])
def test_policy(physical, logical, busy, want):
    assert threads.pick_threads(physical, logical, busy) == want


@pytest.fixture
def fresh(monkeypatch):
    """The per-process cache emptied before and after, so a test's mocks neither see nor leave a decision."""
    real = threads.thread_budget  # a test may replace it
    real.cache_clear()
    yield
    real.cache_clear()


def test_busy_cpus_from_two_proc_stat_samples(monkeypatch, fresh):
    """CPU 0 fully busy over the window, CPU 1 idle, CPU 2 outside the affinity mask: 1 busy CPU, 1 thread."""
    samples = iter([{0: (100, 1000), 1: (500, 1000)}, {0: (100, 1100), 1: (600, 1100)}])
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.setattr(threads, "_allowed", lambda: [0, 1])
    monkeypatch.setattr(threads, "_physical", lambda cpus: 2)
    b = threads.thread_budget()
    assert (b.cpus, b.physical, b.busy, b.threads) == (2, 2, 1.0, 1)
    assert threads.default_threads() == 1


def test_proc_stat_is_read_for_the_allowed_cpus_only():
    allowed = sorted(os.sched_getaffinity(0))
    t = threads._cpu_times(allowed[:1])
    assert set(t) == {allowed[0]} and 0 <= t[allowed[0]][0] <= t[allowed[0]][1]


def test_physical_cores_agree_with_lscpu():
    """lscpu (util-linux) as the oracle: distinct (core, socket) pairs among the CPUs we may run on."""
    lscpu = shutil.which("lscpu")
    assert lscpu, "lscpu (util-linux) is needed as this test's oracle"
    allowed = set(os.sched_getaffinity(0))
    rows = [ln.split(",") for ln in subprocess.run([lscpu, "-p=CPU,CORE,SOCKET"], capture_output=True, text=True, check=True).stdout.splitlines()
            if not ln.startswith("#")]
    want = len({(core, sock) for cpu, core, sock in rows if int(cpu) in allowed})
    quota = Path("/sys/fs/cgroup/cpu.max")  # a container's CPU quota (docker --cpus) caps it, as the kernel enforces
    if quota.exists() and quota.read_text().split()[0] != "max":
        q, period = map(int, quota.read_text().split())
        want = min(want, max(1, -(-q // period)))
    assert threads._physical(sorted(allowed)) == want


def test_every_default_goes_through_the_one_function(monkeypatch, fresh, cli):
    """The DiT backend, the text encoder, quantization and `gguf-dit info` take the default from thread_budget."""
    from gguf_dit.ggml_ops import Backend, quant
    from gguf_dit.runtime import demo
    from gguf_dit.runtime.text_encoder import TextEncoder

    monkeypatch.setattr(threads, "thread_budget", lambda: threads.ThreadBudget(cpus=7, physical=5, busy=2.0, threads=3))
    assert Backend("cpu").threads == 3
    enc = TextEncoder.load(demo.model_dir() / "text_encoder.gguf")
    assert enc.n_threads == 3
    used = []

    class Pool:  # runs the chunks in turn, recording how many threads quantize asked for
        def __init__(self, n):
            used.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        map = staticmethod(map)

    monkeypatch.setattr(quant, "ThreadPoolExecutor", Pool)
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    assert np.array_equal(quant.quantize(x, quant.GGMLType.Q8_0), quant.quantize(x, quant.GGMLType.Q8_0, threads=1))
    assert used == [3]
    code, out, err = cli("info", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["defaults"]["threads"] == 3 and info["cpu"]["cores"] == {"cpus": 7, "physical": 5, "busy": 2.0, "threads": 3}
