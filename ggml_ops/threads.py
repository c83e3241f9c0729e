"""How many CPU threads gguf-dit uses when ``--threads`` is not given: the one default of `run` (DiT graphs, the text
encoder) and `convert` (quantization).

ggml splits every op across its threads and waits at a barrier after each one, so a graph advances only as fast as
its least-scheduled thread: with another process busy on a core, a thread that shares that core holds the others up
at every op (benchmarks/threads_under_load.py; docs/benchmarks.md "Threads under load"). The default is therefore
the physical cores we may run on (as llama.cpp's default: SMT siblings add little to matmuls), less the cores other
processes keep busy right now, never below 1. "Busy" is measured once per process, over 0.1 s of /proc/stat for the
CPUs in our affinity mask (the load average lags by a minute and counts gguf-dit's own previous runs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path

SAMPLE_S = 0.1


def pick_threads(physical: int, logical: int, busy: float) -> int:
    """Threads for ``physical`` cores (``logical`` CPUs with SMT) when other processes keep ``busy`` logical CPUs busy."""
    free = physical - busy * physical / max(logical, 1)
    return max(1, min(physical, round(free)))


def _allowed() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _physical(cpus: list[int]) -> int:
    """Distinct cores among ``cpus`` (SMT siblings counted once), capped by a cgroup CPU quota; ``len(cpus)`` where
    the topology is unknown."""
    cores = set()
    for c in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(c))
    n = len(cores)
    try:  # cgroup v2: "max 100000" or "<quota> <period>" (docker --cpus)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def _cpu_times(cpus: list[int]) -> dict[int, tuple[int, int]] | None:
    """(idle, total) jiffies of each CPU in ``cpus`` from /proc/stat, None without it."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, *vals = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (v[3] + v[4], sum(v))
    return out


def busy_cpus(cpus: list[int], seconds: float = SAMPLE_S) -> float:
    """Logical CPUs among ``cpus`` that other processes keep busy, measured over ``seconds`` while this thread sleeps
    (the 1-minute load average where /proc/stat is absent)."""
    a = _cpu_times(cpus)
    if not a:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(seconds)
    b = _cpu_times(cpus) or {}
    busy = 0.0
    for c, (idle0, total0) in a.items():
        idle1, total1 = b.get(c, (idle0, total0))
        if total1 > total0:
            busy += 1.0 - (idle1 - idle0) / (total1 - total0)
    return busy


@dataclasses.dataclass(frozen=True)
class ThreadBudget:
    cpus: int  # logical CPUs in our affinity mask
    physical: int  # cores among them (SMT siblings once), within a cgroup quota
    busy: float  # logical CPUs other processes kept busy when measured
    threads: int  # the default: pick_threads(physical, cpus, busy)


@functools.lru_cache(maxsize=1)
def thread_budget() -> ThreadBudget:
    """What the default is made of, measured once per process (`gguf-dit info` shows it)."""
    cpus = _allowed()
    physical, busy = _physical(cpus), busy_cpus(cpus)
    return ThreadBudget(len(cpus), physical, round(busy, 2), pick_threads(physical, len(cpus), busy))


def default_threads() -> int:
    """The default thread count (module docstring)."""
    return thread_budget().threads
