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
