"""Where `run` writes its images (runtime/png.py, docs/cli.md "-o"): a folder numbered on from its highest index
(A1111's counter), sd.cpp's printf pattern (``-o out_%03d.png``), JPEG and WebP with the A1111 text in EXIF,
unknown suffixes refused, concurrent runs that never overwrite each other, and --force only for an explicit file.

Oracles: A1111's counter rule (modules/images.py ``get_next_sequence_number``: the digits before the first ``-`` of
each name in the folder, the next number is the highest plus one, from 0); sd.cpp's ``-o`` help
(``output_%03d.png``: printf, index from 0); A1111's EXIF (``piexif.helper.UserComment.dump(text, encoding=
"unicode")``: the EXIF 2.3 character code ``UNICODE\\0`` then UTF-16 in the EXIF header's byte order) and its
infotext regular expression (modules/infotext_utils.py ``re_param_code``), re-implemented here.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gguf_dit.errors import OutputError
from gguf_dit.runtime.png import Outputs, write_image

from _demo_files import SIZE

FAST = ("--steps", "2", "-q")
# A1111's modules/infotext_utils.py: one "key: value" of the settings line (a value may be a quoted JSON string).
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _pixels(v: int) -> np.ndarray:
    return np.full((16, 16, 3), v, np.uint8)


def _a1111_settings(text: str) -> dict[str, str]:
    """A1111's parse_generation_parameters, for the settings line: the last line, when it holds 3 or more pairs."""
    last = text.strip().split("\n")[-1]
    pairs = A1111_PARAM.findall(last)
    assert len(pairs) >= 3, text
    return dict(pairs)


def _user_comment(path: Path) -> str:
    """EXIF UserComment as A1111 reads it: the 8-byte character code, then UCS-2 in the header's byte order."""
    im = Image.open(path)
    raw = im.info["exif"]
    raw = raw[6:] if raw.startswith(b"Exif\0\0") else raw
    comment = im.getexif().get_ifd(0x8769)[0x9286]
    assert comment[:8] == b"UNICODE\0"
    return comment[8:].decode({b"MM": "utf-16-be", b"II": "utf-16-le"}[raw[:2]])


@pytest.fixture
def prompt(tmp_path) -> Path:
    p = tmp_path / "p.txt"
    p.write_text("A red circle on the left.\n")
    return p


@pytest.fixture
def no_encode(forbid):
    from gguf_dit.runtime.pipeline import Pipeline

    forbid(Pipeline, "encode", "encoding started before the output location was checked")


# -- the folder counter ----------------------------------------------------------------------------------


def test_counter_continues_after_the_highest_index_and_ignores_unrelated_files(tmp_path):
    out = tmp_path / "out"
    assert [p.name for p in Outputs(out, [5, 6]).paths] == ["00000-5.png", "00001-6.png"]  # no folder yet: from 0
    out.mkdir()
    for name in ("00007-3.png", "00012-99.jpg", "00002.png", "notes.txt", "cat-0042.png", "x00050-1.png", "-00060.png",
                 "2024_05_01.txt", ".gguf-dit-123-abcd.tmp"):
        (out / name).write_bytes(b"old")
    (out / "sub").mkdir()
    outputs = Outputs(out, [5, 6, 7])
    assert [p.name for p in outputs.paths] == ["00013-5.png", "00014-6.png", "00015-7.png"]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    written = [outputs.write(_pixels(v), {"parameters": "x"}) for v in (10, 20, 30)]
    assert written == outputs.paths
    assert all((out / n).read_bytes() == b for n, b in before.items())  # nothing earlier was touched
    assert [int(np.asarray(Image.open(p))[0, 0, 0]) for p in written] == [10, 20, 30]


def test_run_twice_into_one_folder_numbers_on(cli, prompt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00004-99.png").write_bytes(b"an A1111 image")
    code, stdout, err = cli("run", prompt, "-o", out, "-b", 2, *FAST)
    assert code == 0, err
    assert stdout.split() == [str(out / "00005-0.png"), str(out / "00006-1.png")]
    code, stdout, err = cli("run", prompt, "-o", out, *FAST)  # no --force needed, nothing overwritten
    assert code == 0, err
    assert stdout.split() == [str(out / "00007-0.png")]
    assert (out / "00004-99.png").read_bytes() == b"an A1111 image"
    assert (out / "00007-0.png").read_bytes() == (out / "00005-0.png").read_bytes()  # same seed, same bytes


def test_python_api_batch_plans_numbered_names(tmp_path):
    from gguf_dit.runtime.generate import Generator
    from gguf_dit.runtime.schedule import resolve_settings

    out = tmp_path / "out"
    out.mkdir()
    (out / "00001-8.png").write_bytes(b"old")
    gen = Generator()
    batch = gen.generate("a blue square", seed=7, count=2, settings=resolve_settings(steps=2), out=out)
    assert [p.name for p in batch.paths] == ["00002-7.png", "00003-8.png"]
    assert [i.path for i in batch] == batch.paths
    assert (out / "00001-8.png").read_bytes() == b"old"
    gen.close()


# -- sd.cpp's printf pattern -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern,first,second",
    [
        ("output_%03d.png", "output_000.png", "output_001.png"),  # sd.cpp's help example
        ("img%d.webp", "img0.webp", "img1.webp"),
        ("100%%_%02d.jpg", "100%_00.jpg", "100%_01.jpg"),  # %% is a literal %
        ("frame_%04d", "frame_0000.png", "frame_0001.png"),  # no suffix: PNG, as sd.cpp
    ],
)
def test_pattern_puts_the_index_where_it_says(tmp_path, pattern, first, second):
    outputs = Outputs(tmp_path / "d" / pattern, [0, 1])
    assert [p.name for p in outputs.paths] == [first, second]
    assert outputs.write(_pixels(1), {}) == tmp_path / "d" / first


def test_pattern_numbers_on_after_its_own_names_only(tmp_path):
    for name in ("img_004.png", "img_abc.png", "img_010.jpg", "other_050.png", "00099-1.png", "img_0007.png.bak"):
        (tmp_path / name).write_bytes(b"old")
    assert [p.name for p in Outputs(tmp_path / "img_%03d.png", [0, 1]).paths] == ["img_005.png", "img_006.png"]
    # Several images to one file path: stem-NNN numbered the same way.
    (tmp_path / "fox-002.png").write_bytes(b"old")
    assert [p.name for p in Outputs(tmp_path / "fox.png", [0, 1]).paths] == ["fox-003.png", "fox-004.png"]


def test_pattern_on_the_command_line(cli, prompt, tmp_path):
    pattern = tmp_path / "new" / "img_%03d.png"
    code, stdout, err = cli("run", prompt, "-o", pattern, "-b", 2, *FAST)
    assert code == 0, err
    code, stdout2, err = cli("run", prompt, "-o", pattern, *FAST)
    assert code == 0, err
    assert (stdout + stdout2).split() == [str(tmp_path / "new" / f"img_{i:03d}.png") for i in range(3)]


def test_index_in_a_folder_name_is_refused(cli, prompt, tmp_path, no_encode):
    code, _, err = cli("run", prompt, "-o", tmp_path / "run_%d" / "img.png", *FAST)
    assert code == 2 and err.strip() == f"error: {tmp_path / 'run_%d' / 'img.png'}: the %d index goes in the file name, not in a folder name"
    assert _tree(tmp_path) == {"p.txt"}


# -- JPEG and WebP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,fmt", [("a.jpg", "JPEG"), ("b.JPEG", "JPEG"), ("c.webp", "WEBP")])
def test_jpeg_and_webp_carry_the_a1111_text(cli, prompt, tmp_path, name, fmt):
    png, lossy = tmp_path / "ref.png", tmp_path / name
    for out in (png, lossy):
        code, _, err = cli("run", prompt, "-o", out, "--seed", 3, *FAST)
        assert code == 0, err
    im = Image.open(lossy)
    assert im.format == fmt and im.size == (SIZE, SIZE) and im.mode == "RGB"
    diff = np.abs(np.asarray(im, np.int16) - np.asarray(Image.open(png), np.int16))
    print(f"{fmt} vs PNG: mean {diff.mean():.2f}, max {diff.max()} /255")
    assert diff.mean() < 2.5  # lossy at quality 90: observed 1.75 (JPEG) and 1.52 (WebP) on the demo image
    text = _user_comment(lossy)
    assert text == Image.open(png).info["parameters"]  # the very text the PNG carries
    settings = _a1111_settings(text)
    assert (settings["Steps"], settings["Seed"], settings["Size"]) == ("2", "3", f"{SIZE}x{SIZE}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p.txt", "ref.png", name])  # no folder named a.jpg


def test_write_image_formats_and_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("x.png", "x.jpg", "x.webp"):
        p = write_image(tmp_path / name, _pixels(200), {"parameters": "caf\u00e9 \u72d0\nSteps: 2, Seed: 1, Size: 16x16", "gguf-dit": "{}"})
        assert p == tmp_path / name and os.stat(p).st_mode & 0o777 == 0o666 & ~umask
    assert Image.open(tmp_path / "x.png").info["parameters"].startswith("caf\u00e9 \u72d0")
    for name in ("x.jpg", "x.webp"):
        assert _user_comment(tmp_path / name) == "caf\u00e9 \u72d0\nSteps: 2, Seed: 1, Size: 16x16"


def test_metadata_a_jpeg_cannot_hold_is_a_one_line_output_error_leaving_nothing(tmp_path):
    """JPEG caps EXIF at 64 KiB (Pillow raises ValueError): an OutputError naming the file, no temp file, no folder."""
    out = tmp_path / "new" / "x.jpg"
    with pytest.raises(OutputError, match=re.escape(str(out)) + ".*EXIF"):
        write_image(out, _pixels(200), {"parameters": "\u00e9" * 40000})
    assert not (tmp_path / "new").exists()
    write_image(tmp_path / "x.webp", _pixels(200), {"parameters": "\u00e9" * 40000})  # WebP holds it


# -- unknown suffixes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.gif", "x.bmp", "outputs.v2", "deeper/x.tiff", "img_%03d.gif"])
def test_unknown_suffix_is_refused_and_nothing_is_created(cli, prompt, tmp_path, no_encode, name):
    out = tmp_path / name
    code, _, err = cli("run", prompt, "-o", out, *FAST)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: unknown image suffix ") and ".jpg" in lines[0]
    assert _tree(tmp_path) == {"p.txt"}


def test_an_existing_folder_with_a_dot_is_a_folder(tmp_path):
    (tmp_path / "outputs.v2").mkdir()
    assert Outputs(tmp_path / "outputs.v2", [4]).paths == [tmp_path / "outputs.v2" / "00000-4.png"]
    with pytest.raises(OutputError, match="unknown image suffix '.txt'"):
        write_image(tmp_path / "x.txt", _pixels(0), {})
    assert _tree(tmp_path) == {"outputs.v2"}


# -- concurrent runs ---------------------------------------------------------------------------------------


def test_runs_writing_alternately_into_one_folder_number_on(tmp_path):
    # Two runs that checked the same empty folder (so planned the same names) write alternately.
    a, b = Outputs(tmp_path, [1, 2, 3]), Outputs(tmp_path, [1, 2, 3])
    assert a.paths == b.paths
    got = []
    for v in range(3):
        got += [a.write(_pixels(10 + v), {}), b.write(_pixels(20 + v), {})]
    assert {p.name: int(np.asarray(Image.open(p))[0, 0, 0]) for p in got} == {
        "00000-1.png": 10, "00001-1.png": 20, "00002-2.png": 11, "00003-2.png": 21, "00004-3.png": 12, "00005-3.png": 22}
    assert _tree(tmp_path) == {p.name for p in got}  # no temp file left


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_name_claimed_after_the_scan_is_not_overwritten(tmp_path, monkeypatch, hard_links):
    # The other run claims the name between our scan of the folder and our rename: the scan is made stale.
    monkeypatch.setattr(Outputs, "_first_free", lambda self: 0)
    if not hard_links:  # FAT/exFAT and some network shares: the name is reserved with O_EXCL, then replaced
        def no_link(src, dst):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    a, b = Outputs(tmp_path / "img_%d.png", [0, 1]), Outputs(tmp_path / "img_%d.png", [0, 1])
    got = [a.write(_pixels(10), {}), b.write(_pixels(20), {}), a.write(_pixels(11), {}), b.write(_pixels(21), {})]
    assert [p.name for p in got] == ["img_0.png", "img_1.png", "img_2.png", "img_3.png"]
    assert [int(np.asarray(Image.open(p))[0, 0, 0]) for p in got] == [10, 20, 11, 21]
    assert _tree(tmp_path) == {p.name for p in got}


def test_concurrent_writers_lose_no_image(tmp_path):
    writers, per = 6, 5
    outputs = [Outputs(tmp_path / "img_%03d.png", list(range(per))) for _ in range(writers)]
    start = threading.Barrier(writers)
    errors: list = []

    def work(w):
        try:
            start.wait()
            for k in range(per):
                outputs[w].write(_pixels(w * per + k), {})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == [f"img_{i:03d}.png" for i in range(writers * per)]
    assert sorted(int(np.asarray(Image.open(p))[0, 0, 0]) for p in files) == list(range(writers * per))


# -- --force -----------------------------------------------------------------------------------------------


def test_force_overwrites_an_explicit_file_only(cli, prompt, tmp_path, no_encode):
    img = tmp_path / "img.jpg"
    img.write_bytes(b"old")
    code, _, err = cli("run", prompt, "-o", img, *FAST)
    assert code == 2 and err.strip() == f"error: {img}: already exists (use --force to overwrite)"
    assert img.read_bytes() == b"old"


def test_force_semantics(cli, prompt, tmp_path):
    img = tmp_path / "img.jpg"
    img.write_bytes(b"old")
    code, stdout, err = cli("run", prompt, "-o", img, "--force", *FAST)
    assert code == 0 and stdout.split() == [str(img)] and Image.open(img).format == "JPEG"
    # A folder or a pattern never overwrites, --force or not: numbering goes on.
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000-0.png").write_bytes(b"old")
    (out / "x_000.png").write_bytes(b"old")
    for target, name in ((out, "00001-0.png"), (out / "x_%03d.png", "x_001.png")):
        code, stdout, err = cli("run", prompt, "-o", target, "--force", *FAST)
        assert code == 0 and stdout.split() == [str(out / name)], err
    assert (out / "00000-0.png").read_bytes() == (out / "x_000.png").read_bytes() == b"old"


def test_file_that_appears_after_the_check_is_not_overwritten(tmp_path):
    img = tmp_path / "img.png"
    outputs = Outputs(img, [0])
    outputs.check(16, 16)
    img.write_bytes(b"theirs")  # another run wrote it meanwhile
    with pytest.raises(OutputError, match="already exists"):
        outputs.write(_pixels(1), {})
    assert img.read_bytes() == b"theirs" and _tree(tmp_path) == {"img.png"}
    forced = Outputs(img, [0], force=True)
    assert forced.write(_pixels(1), {}) == img and Image.open(img).format == "PNG"


# -- failures leave nothing --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["a/b/img_%03d.jpg", "a/b/x.webp", "a/b"])
@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_or_interrupted_write_leaves_nothing(tmp_path, monkeypatch, target, failure):
    real_save = Image.Image.save

    def half_then_fail(self, fp, *a, **k):
        real_save(self, fp, *a, **k)  # the temp file is complete on disk ...
        raise failure  # ... when the disk fills up (or Ctrl-C arrives)

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    outputs = Outputs(tmp_path / target, [0])
    outputs.check(16, 16)
    with pytest.raises(type(failure)) if isinstance(failure, KeyboardInterrupt) else pytest.raises(OutputError) as e:
        outputs.write(_pixels(1), {"parameters": "x"})
    if isinstance(failure, OSError):
        fmt = {".jpg": "JPEG", ".webp": "WEBP"}.get(Path(target).suffix, "PNG")
        assert str(e.value) == f"{outputs.paths[0]}: cannot write the {fmt}: No space left on device (disk full)"
    assert _tree(tmp_path) == set()  # no image, no temp file, no folder this write created
