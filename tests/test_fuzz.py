"""Seeded fuzz test over every file gguf-dit reads (issue 10 §3): the four GGUF roles (`inspect --check` and `run`), `convert`'s safetensors / config.json / tokenizer.json / index.json inputs, and prompt files.

Each family fails on any signal, traceback, hang, leftover, changed input, foreign stderr line, error that does not
name the mutated file, or mutation that must be refused but ran; the message lists each failure class with a
reproducer. Harness, mutators and classification: tests/_fuzz.py. GGUF_DIT_FUZZ_CASES (per family) and
GGUF_DIT_FUZZ_SEED change the run; `python tests/_fuzz.py --cases N --seed S` runs longer campaigns.
"""

from __future__ import annotations

import os

import pytest

from _fuzz import DEFAULT_CASES, FAMILIES, GGUF_ROLES, Fuzzer, gguf_mutators

SEED = int(os.environ.get("GGUF_DIT_FUZZ_SEED", "0"))
CASES = os.environ.get("GGUF_DIT_FUZZ_CASES")


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    fz = Fuzzer(tmp_path_factory.mktemp("fuzz"))
    yield fz
    fz.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz(fuzzer, family):
    n = int(CASES) if CASES else DEFAULT_CASES[family]
    report = fuzzer.run_family(family, n, SEED)
    if report.failures():
        pytest.fail(f"seed {SEED}: " + report.summary(), pytrace=False)
    errors = [o for o in report.outcomes if o.status == "error"]
    # most mutations break the file; if nearly none is refused, the mutators or the classifier stopped working
    assert len(errors) >= n // 3, report.summary()
    if family in GGUF_ROLES and not CASES:
        assert {o.case.mutation for o in report.outcomes} == set(gguf_mutators(fuzzer.inputs.layout[family]))
