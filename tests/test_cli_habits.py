"""`gguf-dit run` as sd.cpp / A1111 users type it (issue 15, "Prompts and seeds" and progress): -p prompts, a prompt
file from stdin, a hint for a prompt given as the positional argument, -n that is not sd.cpp's negative prompt,
--seed -1, and plain progress lines on a stderr that is not a terminal. Runs on the embedded demo model."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from gguf_dit.cli import app

FAST = ("--steps", "2")


def _run(*args, input=None):
    r = CliRunner().invoke(app, ["run", *map(str, args)], input=input)
    return r.exit_code, r.stdout, r.stderr


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def _settings(png) -> dict:
    return json.loads(Image.open(png).text["gguf-dit"])


def test_prompt_option_repeatable_without_a_file(tmp_path):
    code, out, err = _run("-p", "A red circle.", "--prompt", "A blue square.", "-o", tmp_path / "o", *FAST, "-q")
    assert code == 0, err
    pngs = sorted((tmp_path / "o").glob("*.png"))
    assert len(pngs) == 2
    assert [_settings(p)["prompt"] for p in pngs] == [
        json.dumps({"high_level_description": t, "compositional_deconstruction": {"background": "", "elements": []}},
                   separators=(",", ":"), ensure_ascii=False) for t in ("A red circle.", "A blue square.")]


def test_prompt_option_adds_to_the_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("A red circle.\n")
    code, _, err = _run(f, "-p", "A blue square.", "-o", tmp_path / "o", *FAST, "-q")
    assert code == 0, err
    assert len(list((tmp_path / "o").glob("*.png"))) == 2


def test_prompt_file_from_stdin_matches_the_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("A red circle.\nA blue square.\n")
    code, _, err = _run(f, "-o", tmp_path / "file", *FAST, "-q")
    assert code == 0, err
    code, _, err = _run("-", "-o", tmp_path / "stdin", *FAST, "-q", input=f.read_text())
    assert code == 0, err
    a, b = sorted((tmp_path / "file").glob("*.png")), sorted((tmp_path / "stdin").glob("*.png"))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert Image.open(x).tobytes() == Image.open(y).tobytes()


def test_empty_stdin_names_stdin(tmp_path):
    code, _, err = _run("-", "-o", tmp_path / "o", *FAST, "-q", input="")
    assert code == 2
    assert "<stdin>" in _one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_prompt_as_positional_gets_a_hint(tmp_path):
    code, _, err = _run("a red fox in the snow", "-o", tmp_path / "o", "-q")
    assert code == 2
    assert _one_error_line(err) == 'error: a red fox in the snow: prompt file not found; did you mean -p "a red fox in the snow"?'
    assert not (tmp_path / "o").exists()


def test_no_prompt_at_all(tmp_path):
    code, _, err = _run("-o", tmp_path / "o", "-q")
    assert code == 2
    assert "-p" in _one_error_line(err)


@pytest.mark.parametrize("flag", ["-b", "--batch-count", "-n", "--count"])
def test_batch_count_names(flag, tmp_path):
    code, _, err = _run("-p", "A red circle.", flag, "2", "-o", tmp_path / "o", *FAST, "-q")
    assert code == 0, err
    assert len(list((tmp_path / "o").glob("*.png"))) == 2


def test_n_with_a_negative_prompt_is_a_clear_usage_error(tmp_path):
    code, _, err = _run("-p", "A red circle.", "-n", "blurry, low quality", "-o", tmp_path / "o", "-q")
    assert code == 2
    line = _one_error_line(err)
    assert "no negative prompt" in line and "--batch-count" in line and "blurry" in line
    assert not (tmp_path / "o").exists()


def test_count_help_says_there_is_no_negative_prompt():
    import typer.main

    run = typer.main.get_command(app).commands["run"]
    (opt,) = [p for p in run.params if "--batch-count" in p.opts]
    assert {"-b", "-n", "--count"} <= set(opt.opts) and "no negative prompt" in opt.help


def test_seed_minus_one_draws_a_random_seed_printed_and_stored(tmp_path):
    seeds = []
    for i in range(2):
        png = tmp_path / f"{i}.png"
        code, _, err = _run("-p", "A red circle.", "--seed", "-1", "-o", png, *FAST, "-q")
        assert code == 0, err
        m = re.search(r"^seed (\d+) \(random\)$", err, re.M)
        assert m, err
        seeds.append(int(m.group(1)))
        assert _settings(png)["seed"] == seeds[-1]
        assert f"Seed: {seeds[-1]}," in Image.open(png).text["parameters"]
    assert seeds[0] != seeds[1]  # 2**32 choices


def test_library_seed_none_is_random_and_reproducible(tmp_path):
    from gguf_dit.runtime.generate import Generator

    gen = Generator()
    a, b = gen.generate("A red circle.", seed=None), gen.generate("A red circle.", seed=-1)
    assert a.seeds[0] != b.seeds[0] and 0 <= a.seeds[0] < 2**32
    assert gen.generate("A red circle.", seed=7).seeds == [7]


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    code, _, err = _run("-p", "A red circle.", "-b", "2", "-o", tmp_path / "o", *FAST)
    assert code == 0, err
    lines = err.splitlines()
    step = re.compile(r"^sample (\d)/2: step (\d)/2, [\d.]+ (step/s|s/step), [\d.]+ s elapsed$")
    assert [step.match(ln).group(1, 2) for ln in lines if step.match(ln)] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert sum(bool(re.match(r"^decode \d/2: done in [\d.]+ s$", ln)) for ln in lines) == 2
    assert sum(ln.startswith("wrote ") for ln in lines) == 2
    assert not any("\r" in ln or "\x1b" in ln for ln in lines)


def test_rate_turns_into_seconds_per_step_when_slow(monkeypatch):
    from gguf_dit import cli

    lines = cli._RunLines()
    clock = iter([0.0, 2.5, 1.0])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    lines("sample 1/1", 0, 20)
    assert lines.rate("sample 1/1", 1) == "2.5 s/step"
    assert lines.rate("sample 1/1", 4) == "4.00 step/s"


def test_terminal_bars_have_one_overall_bar_for_the_batch():
    from gguf_dit import cli

    with cli._RunBars() as bars:
        for j in (1, 2):
            bars(f"sample {j}/2", 0, 3)
            for i in (1, 2, 3):
                bars(f"sample {j}/2", i, 3)
            bars(f"decode {j}/2", 0, 1)
            bars(f"decode {j}/2", 1, 1)
        (overall,) = [t for t in bars.p.tasks if t.description == "images"]
        assert (overall.completed, overall.total) == (2, 2)
