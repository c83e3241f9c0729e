"""`gguf-dit convert` writes its outputs as one set: the output folder ends up with the whole old set or the whole
new one, whatever fails, whoever interrupts, and whoever else writes there at the same time.

The checkpoint is the full tiny one (`gguf-dit tiny-checkpoint`): parts are written in the order transformer,
unconditional_transformer, text_encoder, vae, so a failure in the encoder or the VAE comes after finished parts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from gguf_dit.converter import output as outmod

NAMES = ["text_encoder.gguf", "transformer.gguf", "unconditional_transformer.gguf", "vae.gguf"]


@pytest.fixture(autouse=True)
def real_ctrl_c():
    """SIGINT raises KeyboardInterrupt during every test here, as in a terminal. A process started in the background
    by a non-interactive shell (``pytest &``, ``nohup``) inherits SIGINT ignored, and Python then installs no handler:
    the simulated Ctrl-C would do nothing and the interrupt tests would fail for a reason that is not the converter's."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(scope="module")
def old_set(tiny_checkpoints, tmp_path_factory):
    """A finished f16 conversion: the 'old state' that failing --force reruns must leave intact."""
    from typer.testing import CliRunner

    from gguf_dit.cli import app

    out = tmp_path_factory.mktemp("old") / "out"
    r = CliRunner().invoke(app, ["convert", str(tiny_checkpoints()), "-o", str(out), "-q", "--recipe", "f16"])
    assert r.exit_code == 0, r.stderr
    return out


@pytest.fixture
def ck(tiny_copy):
    return tiny_copy("ck")


@pytest.fixture
def out(old_set, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(old_set, dst)
    return dst


def snapshot(d):
    """Every entry of a folder (hidden ones included) with its bytes: what 'left as it was' compares."""
    return {p.name: p.read_bytes() if p.is_file() else "<dir>" for p in sorted(d.iterdir())}


def one_line_error(code, err, *must):
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    for s in must:
        assert s in lines[0], lines[0]
    return lines[0]


def _poison(path, key):
    sd = load_file(str(path))
    sd[key][0] = float("nan")
    save_file(sd, str(path))


@pytest.mark.parametrize(
    "file, key",
    [
        ("text_encoder/model.safetensors", "model.language_model.layers.30.mlp.up_proj.weight"),
        ("vae/diffusion_pytorch_model.safetensors", "decoder.conv_out.weight"),
    ],
    ids=["text_encoder", "vae"],
)
def test_failure_in_a_later_part_keeps_the_old_set_and_leaves_no_new_folder(cli, ck, out, tmp_path, file, key):
    _poison(ck / file, key)
    before = snapshot(out)
    code, _, err = cli("convert", ck, "-o", out, "-q", "--recipe", "q8_0", "--force")
    one_line_error(code, err, str(ck / file), key, "non-finite")
    assert snapshot(out) == before  # the DiTs finished before the failure were not moved in; no temp, no lock
    fresh = tmp_path / "new" / "deeper"
    code, _, err = cli("convert", ck, "-o", fresh, "-q", "--recipe", "q8_0")
    one_line_error(code, err, key)
    assert not (tmp_path / "new").exists()  # neither OUT nor the parent the command created


def test_rerun_after_a_failure_succeeds(cli, ck, tmp_path):
    out = tmp_path / "o"
    vae_w = ck / "vae" / "diffusion_pytorch_model.safetensors"
    good = vae_w.read_bytes()
    _poison(vae_w, "decoder.conv_out.weight")
    code, _, err = cli("convert", ck, "-o", out, "-q", "--recipe", "f16")
    one_line_error(code, err, "decoder.conv_out.weight")
    vae_w.write_bytes(good)
    code, _, err = cli("convert", ck, "-o", out, "-q", "--recipe", "f16")  # not "already exists"
    assert code == 0, err
    assert sorted(os.listdir(out)) == NAMES


def _interrupt_on_call(n, real):
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: Python raises KeyboardInterrupt at the next bytecode
        return real(*a, **k)

    return wrapped


@pytest.mark.parametrize("where", ["dit", "text_encoder", "vae"])
def test_ctrl_c_in_any_part_leaves_the_old_set(cli, ck, out, monkeypatch, where):
    from gguf_dit.converter import convert as conv
    from gguf_dit.converter import text_encoder as te
    from gguf_dit.converter import vae

    if where == "dit":
        monkeypatch.setattr(conv, "encode_rows", _interrupt_on_call(60, conv.encode_rows))  # in the second backbone (42 tensors each)
    elif where == "text_encoder":
        monkeypatch.setattr(te, "encode_rows", _interrupt_on_call(200, te.encode_rows))
    else:
        monkeypatch.setattr(vae, "encode_rows", _interrupt_on_call(50, vae.encode_rows))
    before = snapshot(out)
    code, _, err = cli("convert", ck, "-o", out, "-q", "--recipe", "q8_0", "--force")
    assert code == 130 and "interrupted" in err, err
    assert snapshot(out) == before


def test_ctrl_c_into_a_new_folder_leaves_no_folder(cli, ck, tmp_path, monkeypatch):
    from gguf_dit.converter import text_encoder as te

    monkeypatch.setattr(te, "encode_rows", _interrupt_on_call(5, te.encode_rows))
    code, _, err = cli("convert", ck, "-o", tmp_path / "fresh", "-q")
    assert code == 130 and "interrupted" in err, err
    assert not (tmp_path / "fresh").exists()


def _on_move_into(out, n, action):
    """os.replace that runs ``action`` on the n-th rename into or out of ``out`` itself (the final moves; the
    per-file renames inside the private folder are not counted); returns (replacement, call counter)."""
    real = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        if out in (os.path.dirname(src), os.path.dirname(dst)):
            calls["n"] += 1
            if calls["n"] == n:
                action()
        return real(src, dst)

    return replace, calls


def test_failure_while_moving_into_place_puts_the_old_set_back(cli, ck, out, monkeypatch):
    """The moves are renames; if one fails, those already done are undone."""

    def fail():
        raise OSError(errno.EIO, "Input/output error")

    # old transformer -> backup, new -> place, the same for uncond, then the encoder's backup fails
    failing_replace, calls = _on_move_into(str(out), 5, fail)
    before = snapshot(out)
    monkeypatch.setattr(outmod.os, "replace", failing_replace)
    code, _, err = cli("convert", ck, "-o", out, "-q", "--recipe", "q8_0", "--force")
    monkeypatch.undo()
    one_line_error(code, err, str(out), "Input/output error")
    assert calls["n"] > 5  # the rollback ran
    assert snapshot(out) == before


def test_ctrl_c_while_moving_into_place_completes_the_new_set(cli, ck, out, monkeypatch):
    """Ctrl-C is held over the renames: the set is finished, so it is put in place whole."""
    interrupting_replace, calls = _on_move_into(str(out), 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    monkeypatch.setattr(outmod.os, "replace", interrupting_replace)
    code, _, err = cli("convert", ck, "-o", out, "-q", "--recipe", "q8_0", "--force")
    monkeypatch.undo()
    assert code == 0, err
    assert calls["n"] == 8
    assert sorted(os.listdir(out)) == NAMES
    types = {p.name: _linear_type(p) for p in out.iterdir() if p.name.startswith(("transformer", "unconditional"))}
    assert types == {"transformer.gguf": "Q8_0", "unconditional_transformer.gguf": "Q8_0"}  # the new set, both files


def _linear_type(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return next(t.tensor_type.name for t in r.tensors if t.name == "layers.0.attention.qkv.weight")


def test_a_second_convert_into_the_same_folder_is_refused(cli, ck, out):
    lock = out / outmod.LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(out)
        code, _, err = cli("convert", ck, "-o", out, "-q", "--force")
        one_line_error(code, err, str(out), "another gguf-dit convert is writing here")
        assert snapshot(out) == before
    finally:
        os.close(fd)


def test_concurrent_convert_started_mid_way_is_refused_and_the_first_completes(cli, ck, out, monkeypatch):
    """A second conversion into the folder while the first writes its encoder: refused; the first then puts its
    whole set in place."""
    from gguf_dit.converter import convert as conv
    from gguf_dit.converter import text_encoder as te
    from gguf_dit.converter.recipe import resolve
    from gguf_dit.errors import OutputError

    seen = []
    real = te.write_text_encoder

    def write_and_race(*a, **k):
        with pytest.raises(OutputError, match="another gguf-dit convert") as e:
            conv.convert_checkpoint(ck, out, resolve("f32"), force=True)
        seen.append(str(e.value))
        return real(*a, **k)

    monkeypatch.setattr(te, "write_text_encoder", write_and_race)
    code, _, err = cli("convert", ck, "-o", out, "-q", "--recipe", "q8_0", "--force")
    assert code == 0, err
    assert len(seen) == 1 and str(out) in seen[0]
    assert sorted(os.listdir(out)) == NAMES
    assert _linear_type(out / "transformer.gguf") == _linear_type(out / "unconditional_transformer.gguf") == "Q8_0"


def test_leftovers_of_a_killed_convert_are_cleared(cli, ck, tmp_path):
    """A convert killed with SIGKILL mid-way through its renames leaves its private folder (with the manifest) and an
    unlocked lock file; the next one puts back the old output the killed one had moved aside and removes the rest."""
    out = tmp_path / "o"
    stale = out / f"{outmod.TMP_PREFIX}999999"
    stale.mkdir(parents=True)
    (stale / outmod.MANIFEST).write_text("vae.gguf\ntransformer.gguf")
    (stale / "transformer.gguf").write_bytes(b"half")
    (stale / ".old-vae.gguf").write_bytes(b"old vae")
    (out / outmod.LOCK_NAME).write_bytes(b"")
    code, _, err = cli("convert", ck, "-o", out, "-q", "--parts", "vae")
    one_line_error(code, err, str(out / "vae.gguf"), "already exists")  # the old file is back, and not overwritten
    assert snapshot(out) == {"vae.gguf": b"old vae"}
    code, _, err = cli("convert", ck, "-o", out, "-q", "--parts", "vae", "--force")
    assert code == 0, err
    assert os.listdir(out) == ["vae.gguf"] and (out / "vae.gguf").read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("folders", [False, True], ids=["files", "folders"])
def test_a_kill_at_any_point_of_the_commit_leaves_one_whole_set(tmp_path, monkeypatch, folders):
    """The disk as a SIGKILL would leave it before each rename into place, before and after the DONE mark, is
    resolved by the next conversion to the whole old set (a, b) or the whole new one (a, b, c): never a mix."""
    names = ["a", "b", "c"]

    def put(path, text):
        if folders:
            path.mkdir()
            (path / "x").write_text(text)
        else:
            path.write_text(text)

    def read(path):
        return (path / "x").read_text() if folders else path.read_text()

    out = tmp_path / "o"
    out.mkdir()
    put(out / "a", "old")
    put(out / "b", "old")
    snaps = []

    def snap():
        dst = tmp_path / f"snap{len(snaps)}"
        shutil.copytree(out, dst, symlinks=True)
        snaps.append(dst)

    real_replace, real_write = os.replace, outmod._write_synced

    def replace(src, dst):
        if Path(dst).is_relative_to(out):  # not the hash cache's own update (gguf_dit/hashes.py)
            snap()
        real_replace(src, dst)

    def write(path, text):
        if path.name == outmod.DONE:
            snap()
        real_write(path, text)
        if path.name == outmod.DONE:
            snap()

    with outmod.OutputSet(out, names, force=True, folders=folders) as outs:
        for n in names:
            put(outs.path(n), "new")
        monkeypatch.setattr(outmod.os, "replace", replace)
        monkeypatch.setattr(outmod, "_write_synced", write)
    monkeypatch.undo()
    assert len(snaps) == 2 * 2 + 1 + 2  # two old ones moved aside, three new ones moved in, around DONE
    seen = set()
    for s in snaps:
        with pytest.raises(RuntimeError), outmod.OutputSet(s, names, force=True, folders=folders):
            raise RuntimeError  # the next conversion fails after its recovery: what is left is the recovered state
        state = {n: read(s / n) for n in names if os.path.lexists(s / n)}
        assert state in ({"a": "old", "b": "old"}, {"a": "new", "b": "new", "c": "new"}), (s.name, state)
        assert not [p for p in os.listdir(s) if p.startswith(outmod.TMP_PREFIX)]
        seen.add(len(state))
    assert seen == {2, 3}  # both outcomes occur: killed mid-way rolls back, killed after DONE rolls forward


# -- the output location, checked before any work ----------------------------------------------------------


@pytest.fixture
def no_work(forbid):
    """Fail the test if a single tensor gets converted."""
    from gguf_dit.converter import convert as conv

    forbid(conv, "write_backbone", "conversion started before the output location was refused")


def test_output_path_that_is_a_file(cli, ck, tmp_path, no_work):
    f = tmp_path / "out"
    f.write_bytes(b"x")
    one_line_error(*cli("convert", ck, "-o", f, "-q")[::2], str(f), "not a folder")
    assert f.read_bytes() == b"x"


def test_parent_path_that_is_a_file(cli, ck, tmp_path, no_work):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    one_line_error(*cli("convert", ck, "-o", f / "sub" / "out", "-q")[::2], str(f / "sub" / "out"), f"{f} is not a folder")
    assert sorted(os.listdir(tmp_path)) == ["ck", "file"]


@pytest.mark.parametrize("existing", [True, False], ids=["out-read-only", "parent-read-only"])
def test_read_only_location(cli, ck, tmp_path, monkeypatch, no_work, existing):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits: answer as access(2) does for anyone else
        real = os.access
        monkeypatch.setattr(outmod.os, "access", lambda p, m: False if os.path.samefile(p, ro) and m & os.W_OK else real(p, m))
    try:
        target = ro if existing else ro / "new"
        line = one_line_error(*cli("convert", ck, "-o", target, "-q")[::2], str(target), "not writable")
        assert existing or str(ro) in line.split(": ", 1)[1]
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_not_enough_space(cli, ck, tmp_path, monkeypatch):
    from gguf_dit.converter import convert as conv

    real_statvfs, real_write = os.statvfs, conv.write_backbone
    written = []

    class Small:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, (10 << 20) // st.f_frsize  # 10 MB free

    monkeypatch.setattr(outmod.os, "statvfs", lambda p: Small(real_statvfs(p)))
    monkeypatch.setattr(conv, "write_backbone", lambda *a, **k: written.append(1) or real_write(*a, **k))
    out = tmp_path / "o"
    line = one_line_error(*cli("convert", ck, "-o", out, "-q", "--recipe", "f32")[::2], str(out), "not enough free space")
    assert not written and not out.exists()
    # The estimate comes from the plan: at least what is written, and not far above it.
    needed = float(line.split("needs about ")[1].split(" MB")[0]) * 1e6
    monkeypatch.undo()
    code, _, err = cli("convert", ck, "-o", out, "-q", "--recipe", "f32")
    assert code == 0, err
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size <= needed <= 1.1 * size + 5e6, (size, needed)


def test_disk_full_while_writing(cli, ck, out, monkeypatch):
    """ENOSPC in the middle of a part: one line naming the output, the old set intact."""
    from gguf_dit.converter import gguf_out

    real = gguf_out.stream_tensor
    calls = {"n": 0}

    def full(writer, *a, **k):
        calls["n"] += 1
        if calls["n"] == 60:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(writer, *a, **k)

    monkeypatch.setattr(gguf_out, "stream_tensor", full)
    before = snapshot(out)
    code, _, err = cli("convert", ck, "-o", out, "-q", "--force")
    one_line_error(code, err, "No space left on device", str(out))
    assert snapshot(out) == before


def test_tiny_checkpoint_is_written_as_a_set(cli, tmp_path, monkeypatch):
    from gguf_dit.converter import tiny

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "_write_vae", interrupted)
    code, _, err = cli("tiny-checkpoint", tmp_path / "t")
    assert code == 130 and "interrupted" in err
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    code, _, err = cli("tiny-checkpoint", tmp_path / "t", "--dit-only")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "t")) == ["transformer", "unconditional_transformer"]
    cfg = json.loads((tmp_path / "t" / "transformer" / "config.json").read_text())
    assert cfg["num_layers"] == 2
