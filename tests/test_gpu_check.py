"""benchmarks/gpu_check.sh, the one prepared command for a lent NVIDIA GPU (issue 14 item 6), on a machine without
one: no device fails at once with one line and exit 3; --dry-run exercises every stage except CUDA (the venv, the
printed build command, `gguf-dit info`, a backend-parametrized test on the CPU, the benchmark on a tiny DiT writing
its JSON with diffusers bf16 as the baseline and the machine's flags); the budget stops stages that no longer fit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
VENV = Path(sys.executable).parent.parent


def gpu_check(*args: str, path_prefix: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("OUT", None)
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_script_parses():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_no_gpu_is_one_line_and_exit_3_with_nothing_created(tmp_path):
    """nvidia-smi as it behaves on a machine without a GPU ("No devices were found", exit 6)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    (fake / "nvidia-smi").chmod(0o755)
    out_dir = tmp_path / "results"
    res = gpu_check("--out", str(out_dir), path_prefix=fake)
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and "no CUDA device" in res.stderr and "--dry-run" in res.stderr
    assert not out_dir.exists()


@pytest.mark.parametrize("args,message", [(["--bogus"], "unknown option '--bogus'"), (["--budget", "ten"], "--budget must be whole seconds"),
                                          (["--stages", "info,test"], "unknown stage 'test'")])
def test_bad_options_exit_2(tmp_path, args, message):
    res = gpu_check(*args, "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and message in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_a_spent_budget_stops_the_next_stage_and_says_so(tmp_path):
    res = gpu_check("--dry-run", "--venv", str(VENV), "--budget", "0", "--out", str(tmp_path))
    assert res.returncode == 1, res.stdout + res.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "stage build: not run, budget spent" in summary and "FAILED at: build" in summary
    assert not (tmp_path / "dit_step.json").exists()


def test_stages_runs_only_those_named(tmp_path):
    """The split for a build that leaves no time for the rest: the later call names only the later stages."""
    res = gpu_check("--dry-run", "--venv", str(VENV), "--stages", "info", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "stage info: ok" in summary
    for stage in ("build", "tests", "demo", "bench"):
        assert f"stage {stage}: skipped" in summary
    assert not (tmp_path / "pytest.log").exists() and not (tmp_path / "dit_step.json").exists()


def test_a_build_only_call_gives_the_build_the_whole_budget(tmp_path):
    """nvcc's time is unknown beforehand: a call of only venv and build must not kill the build at its 330 s share."""
    res = gpu_check("--dry-run", "--venv", str(VENV), "--stages", "venv,build", "--budget", "590",
                    "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "build 590," in summary
    limit = int(re.search(r"== stage build \(limit (\d+) s", summary).group(1))
    assert 580 <= limit <= 585, summary  # the budget less what the venv check took, not the 330 s share
    res = gpu_check("--dry-run", "--venv", str(VENV), "--stages", "build,info", "--budget", "590",
                    "--out", str(tmp_path))
    assert "build 330," in (tmp_path / "summary.txt").read_text()


def test_tests_run_in_two_processes_with_the_options_in_both(tmp_path):
    """The sampler's file runs alone (a native abort there must not take the others' results); a quoted -k
    expression and a file::test path survive the split."""
    res = gpu_check("--dry-run", "--venv", str(VENV), "--stages", "tests", "--out", str(tmp_path), "--pytest-args",
                    'tests/test_ggml_ops.py::test_graph_ops_match_numpy tests/test_sampler.py -k "cpu and not turbo"')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    counts = re.findall(r"^(\d+) passed(?:, (\d+) deselected)?", (tmp_path / "pytest.log").read_text(), re.M)
    assert counts == [("1", ""), ("1", "4")], counts  # ops: its one cpu case; sampler: default-20 on cpu only


def test_dry_run_exercises_every_stage_but_cuda(tmp_path):
    res = gpu_check("--dry-run", "--venv", str(VENV), "--out", str(tmp_path),
                    "--pytest-args", "tests/test_ggml_ops.py -k cpu")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "total budget 570 s" in summary
    assert 'would run: env CMAKE_ARGS=-DGGML_CUDA=on' in summary and "llama-cpp-python==0.3.36" in summary
    for stage in ("build", "info", "tests", "demo", "bench"):
        assert f"stage {stage}: ok" in summary
    assert "all stages passed" in summary
    assert "gguf-dit" in (tmp_path / "info.txt").read_text()
    pytest_log = (tmp_path / "pytest.log").read_text()
    assert " passed" in pytest_log and "failed" not in pytest_log
    # every parity comparison logged, passing ones too: what CUDA's tolerances are set from (tests/_helpers.py)
    rows = [line.split("\t") for line in (tmp_path / "errors.tsv").read_text().splitlines()]
    ops = {what for test, what, _, _ in rows if "test_graph_ops_match_numpy[cpu]" in test}
    assert ops == {"mm", "rms", "ln", "act", "glu", "cat", "perm"}, rows
    assert any("flash_attention" in test for test, *_ in rows)
    assert all(float(err) <= float(tol) for _, _, err, tol in rows), rows
    result = json.loads((tmp_path / "dit_step.json").read_text())
    names = [name for name, _ in result["rows"]]
    assert names == ["diffusers bf16", "gguf-dit q4_k"]
    for _, row in result["rows"]:
        assert row["step_s"] > 0 and row["speedup_vs"].keys() == {"bf16"}
        # the machine's ISA flags travel with every row; /proc/cpuinfo is the oracle
        cpuinfo_flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split(":")[1].split()
        assert set(row["machine"]["cpu_flags"]) <= set(cpuinfo_flags) and ("avx2" in cpuinfo_flags) == ("avx2" in row["machine"]["cpu_flags"])
        assert row["machine"]["amx"] == ("amx_tile" in cpuinfo_flags)
        assert "ggml_cpu_features" in row["machine"]
    assert not (tmp_path / ".work").exists()  # the scratch checkpoint and GGUFs are removed
