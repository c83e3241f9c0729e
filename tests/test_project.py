"""The project's own promises: README commands, CI wiring, CLI help."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_fresh_machine_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert "pip install torch==2.13.0" in lines[0] and "gguf-dit run examples/demo.txt -o " in lines[0] and "--model" not in lines[0]
    assert "pip install torch==2.13.0" in lines[1] and "pytest" in lines[1] and ".[test]" in lines[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n 2p README.md" in ci


def test_llama_cpp_python_is_pinned_exactly():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"llama-cpp-python==0.3.36"' in text and '"torch==2.13.0"' in text


def _synopsis() -> dict[str, set[str]]:
    """Option names per command in docs/cli.md's synopsis block (continuation lines belong to the command above)."""
    import re

    text = (ROOT / "docs" / "cli.md").read_text()
    block = text.split("```", 2)[1]
    out: dict[str, set[str]] = {}
    cmd = None
    for line in block.splitlines():
        m = re.match(r"gguf-dit (?:(\S+) )?", line)
        if m:
            cmd = m.group(1) if m.group(1) and not m.group(1).startswith("-") else ""
        if cmd is not None:
            out.setdefault(cmd, set()).update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line.split("gguf-dit", 1)[-1]))
    return out


def test_cli_reference_synopsis_lists_exactly_the_real_options():
    """docs/cli.md's synopsis names every option of every command, and none that does not exist."""
    import typer.main

    from gguf_dit.cli import app

    group = typer.main.get_command(app)
    documented = _synopsis()
    assert set(documented) == set(group.commands) | {""}
    for name, cmd in list(group.commands.items()) + [("", group)]:
        params = [p for p in cmd.params if p.param_type_name == "option" and p.name != "help"]
        for p in params:
            assert documented[name] & set(p.opts + p.secondary_opts), f"gguf-dit {name}: {p.opts} missing from docs/cli.md"
        real = {o for p in params for o in p.opts + p.secondary_opts}
        assert documented[name] <= real, f"gguf-dit {name}: docs/cli.md names {sorted(documented[name] - real)}, which do not exist"


def test_readme_journey_tiny_checkpoint_convert_run(cli, tmp_path):
    """The README's tiny-checkpoint journey (convert → run on random weights), step by step."""
    from PIL import Image

    code, _, err = cli("tiny-checkpoint", tmp_path / "ck")
    assert code == 0, err
    code, _, err = cli("convert", tmp_path / "ck", "-o", tmp_path / "out", "-q", "--recipe", "q4_k-protect")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["text_encoder.gguf", "transformer.gguf", "unconditional_transformer.gguf", "vae.gguf"]
    png = tmp_path / "img.png"
    code, _, err = cli("run", ROOT / "examples" / "prompt.json", "--model", tmp_path / "out", "-W", 64, "-H", 48, "--steps", 3, "-o", png, "-q", "--threads", 1)
    assert code == 0, err
    img = Image.open(png)
    assert img.size == (64, 48) and "Steps: 3" in img.info["parameters"]
    assert "bbox" not in img.info["parameters"].splitlines()[0]  # the official pipeline strips bboxes
    code, _, err = cli("tiny-checkpoint", tmp_path / "ck")
    assert code == 2 and "--force" in err


def _readme_commands() -> list[tuple[int, str, str]]:
    """(line number, kind, text) of every command in the README after its first two lines: each line of a fenced
    block ("block") and each inline code span that runs gguf-dit ("inline"), in document order."""
    import re

    out, fenced = [], False
    for i, line in enumerate((ROOT / "README.md").read_text().splitlines()[2:], start=3):
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            out.append((i, "block", line))
        else:
            out += [(i, "inline", span) for span in re.findall(r"`([^`]+)`", line)]
    return out


def test_readme_commands_work_in_a_fresh_shell_after_the_first_two_lines():
    """A fresh shell after lines 1-2 has no gguf-dit on PATH: a command may call `.venv/bin/gguf-dit`, or `gguf-dit`
    once the README has activated the venv (the tiny-checkpoint line once called a bare gguf-dit before any)."""
    import re

    activated = False
    calls = 0
    for i, kind, text in _readme_commands():
        if re.fullmatch(r"(source|\.) \.venv/bin/activate", text.strip()):
            activated = True
        for m in re.finditer(r"(?:^|&&|;|\|)\s*(\S*gguf-dit)\s+[a-z-]", text):  # a call: gguf-dit SUBCOMMAND
            calls += 1
            assert m.group(1) == ".venv/bin/gguf-dit" or (m.group(1) == "gguf-dit" and activated), f"README.md:{i}: {text!r} runs {m.group(1)} where it is not on PATH"
    assert activated and calls >= 4


def test_readme_shows_each_fresh_machine_command_in_a_code_block_and_the_torch_wheels():
    lines = (ROOT / "README.md").read_text().splitlines()
    blocks = [text for _, kind, text in _readme_commands() if kind == "block"]
    assert lines[0] in blocks and lines[1] in blocks
    text = "\n".join(lines)
    assert "--index-url https://download.pytorch.org/whl/cpu" in text and "CUDA" in text


def test_readme_tiny_checkpoint_block_runs_as_written(tmp_path):
    """The README's tiny-checkpoint block, run by bash after activating the venv (paths moved under tmp_path)."""
    import subprocess

    block, lines = [], _readme_commands()
    for j, (i, kind, text) in enumerate(lines):
        if kind == "block" and text.startswith("gguf-dit tiny-checkpoint"):
            block = [t for i2, k2, t in lines[j:] if k2 == "block" and i2 - i < 4 and t.startswith("gguf-dit ")]
            break
    assert [c.split()[1] for c in block] == ["tiny-checkpoint", "convert", "run"]
    script = "set -e\nsource .venv/bin/activate\n" + "\n".join(c.replace("/tmp/", f"{tmp_path}/") for c in block)
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ideogram4-tiny.png").stat().st_size > 0


def _all_help() -> dict[str, str]:
    """`--help` of the group and of every command, as a user's terminal renders it."""
    import typer.main
    from typer.testing import CliRunner

    from gguf_dit.cli import app

    names = [""] + sorted(typer.main.get_command(app).commands)
    out = {}
    for name in names:
        r = CliRunner().invoke(app, ([name] if name else []) + ["--help"])
        assert r.exit_code == 0, r.output
        out[name] = r.output
    return out


def test_help_shows_no_bool_placeholders():
    """Flags take no value: typer's rich help printed "<bool>" after each (--force, --json, --help ...)."""
    helps = _all_help()
    assert len(helps) >= 6 and "--force" in helps["convert"] and "--json" in helps["inspect"]
    for name, text in helps.items():
        assert "<bool>" not in text, f"gguf-dit {name} --help:\n{text}"


def test_the_cli_works_with_a_typer_that_lacks_the_help_hook():
    """The flag-type patch uses typer's internal display_type_rich; the H200 image's typer had none, and every command
    (the GPU check's tests and benchmark included) died importing gguf_dit.cli."""
    import subprocess
    import sys

    # Hidden while gguf_dit.cli imports, then put back: this typer's own help calls it, the image's did not.
    code = ("import typer.core\n"
            "saved = [(k, vars(k)['display_type_rich']) for k in typer.core.TyperOption.__mro__ if 'display_type_rich' in vars(k)]\n"
            "for k, _ in saved: delattr(k, 'display_type_rich')\n"
            "from gguf_dit.cli import app\n"
            "for k, f in saved: setattr(k, 'display_type_rich', f)\n"
            "app(['info', '--help'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--json" in r.stdout or "Usage" in r.stdout, r.stdout


def test_convert_help_names_all_four_output_files():
    from gguf_dit.arch import MODEL_FILES

    text = _all_help()["convert"]
    assert sorted(MODEL_FILES.values()) == ["text_encoder.gguf", "transformer.gguf", "unconditional_transformer.gguf", "vae.gguf"]
    for f in MODEL_FILES.values():
        assert f in text, f


def _sdcpp_table() -> list[tuple[str, str]]:
    """(sd.cpp cell, gguf-dit cell) of each row of docs/cli.md's one sd.cpp mapping table."""
    text = (ROOT / "docs" / "cli.md").read_text()
    assert text.count("| sd.cpp | gguf-dit |") == 1  # one table, not one per section
    rows = text.split("| sd.cpp | gguf-dit |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [tuple(c.strip() for c in r.strip("|").split(" | ")[:2]) for r in rows if r.startswith("|")]


def test_sdcpp_mapping_table_covers_sdcpp_options_and_names_real_ones():
    """Every sd.cpp option with a counterpart here has a row (the option names are sd-cli's, from its README), and
    every option the gguf-dit column names exists."""
    import re

    import typer.main

    from gguf_dit.cli import app

    rows = _sdcpp_table()
    sdcpp = " ".join(a for a, _ in rows)
    for opt in ("-p", "-n", "-m", "--diffusion-model", "--llm", "--vae", "--cfg-scale", "--sampling-method", "--scheduler", "--steps",
                "-W", "-H", "--seed", "--batch-count", "-o", "--threads", "--vae-tiling", "--verbose", "-M convert", "--type", "--tensor-type-rules"):
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", sdcpp), f"no row for sd.cpp's {opt}"
    group = typer.main.get_command(app)
    real = {o for cmd in group.commands.values() for p in cmd.params for o in p.opts + p.secondary_opts}
    for _, ours in rows:
        for opt in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", ours.replace("`", " ")):
            assert opt in real, f"docs/cli.md sd.cpp table names {opt}, which gguf-dit does not have"
