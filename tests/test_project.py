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


def test_every_command_has_accurate_help(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for cmd in ("convert", "inspect", "run", "tiny-checkpoint"):
        assert cmd in out
        code, text, _ = cli(cmd, "--help")
        assert code == 0 and "Usage" in text
    code, text, _ = cli("convert", "--help")
    for opt in ("--recipe", "--type", "--rule", "--force", "--out-dir", "q4_k-protect", "--parts", "--te-type", "--vae-type"):
        assert opt in text
    code, text, _ = cli("run", "--help")
    for opt in ("--model", "--text-encoder", "--preset", "--steps", "--guidance", "--width", "--height", "--seed", "--count", "--out", "--backend", "--raw", "--reference"):
        assert opt in text


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
