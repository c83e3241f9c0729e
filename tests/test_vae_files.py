"""The VAE as users download it (issue 15): the stock FLUX.2 autoencoder in Black Forest Labs' naming
(``ae.safetensors`` / ``flux2-vae.safetensors``), a diffusers-named file, or a diffusers ``vae/`` folder, taken by
``gguf-dit convert`` and by ``run --vae`` (converted once into a cache).

The BFL-named file is built here from a tiny diffusers ``AutoencoderKLFlux2``. That the names are BFL's is checked
against diffusers itself: its single-file LDM VAE conversion (``convert_ldm_vae_checkpoint``, installed) plus the
FLUX.2 entries its ``scripts/convert_flux2_to_diffusers.py`` adds (``FLUX2_EXTRA`` below) must map the file back
onto the model's own tensors exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _helpers import make_tiny_vae
from gguf_dit.errors import ModelError, SourceError

#: FLUX.2's 32 GroupNorm groups (BFL's autoencoder.py hard-codes them): a file without config.json cannot state
#: another count, so the tiny model keeps 32 and channel counts that are multiples of it.
FLUX2_TINY = dict(norm_num_groups=32, block_out_channels=(32, 32, 32, 64))
LEVELS = len(FLUX2_TINY["block_out_channels"])
#: diffusers scripts/convert_flux2_to_diffusers.py, DIFFUSERS_VAE_TO_FLUX2_MAPPING: the FLUX.2 entries missing from
#: the installed LDM VAE mapping (BFL keeps quant_conv in the encoder and post_quant_conv in the decoder).
FLUX2_EXTRA = {
    "quant_conv.weight": "encoder.quant_conv.weight",
    "quant_conv.bias": "encoder.quant_conv.bias",
    "post_quant_conv.weight": "decoder.post_quant_conv.weight",
    "post_quant_conv.bias": "decoder.post_quant_conv.bias",
    "bn.running_mean": "bn.running_mean",
    "bn.running_var": "bn.running_var",
}
# diffusers -> BFL, written for the test; the oracle check in the fixture is what makes it trustworthy.
_TO_BFL = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^quant_conv\.", "encoder.quant_conv."),
    (r"^post_quant_conv\.", "decoder.post_quant_conv."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{LEVELS - 1 - int(m[1])}.block."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{LEVELS - 1 - int(m[1])}.upsample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.to_out\.0\.", ".proj_out."),
]


def bfl_state_dict(sd: dict) -> dict:
    """``sd`` (diffusers) in BFL's names and shapes: the mid attention projections are 1x1 convs there."""
    out = {}
    for k, v in sd.items():
        for pattern, repl in _TO_BFL:
            k = re.sub(pattern, repl, k)
        out[k] = (v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v).contiguous()
    return out


@pytest.fixture(scope="module")
def vae_src(tmp_path_factory):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("vae_files")
    folder = root / "flux2" / "vae"
    make_tiny_vae(folder, **FLUX2_TINY)
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    bfl = bfl_state_dict(sd)
    # Oracle: diffusers maps the BFL file back onto the model's tensors, every one (bn's int64 counter is not mapped).
    back = convert_ldm_vae_checkpoint(dict(bfl), json.loads((folder / "config.json").read_text()))
    back.update({d: bfl[o] for d, o in FLUX2_EXTRA.items()})
    assert set(back) == set(sd) - {"bn.num_batches_tracked"}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    # BFL's bn is a BatchNorm2d(affine=False, track_running_stats=True): its state_dict is what the file holds.
    bn = torch.nn.BatchNorm2d(128, affine=False, track_running_stats=True).state_dict()
    assert {k for k in bfl if k.startswith("bn.")} == {f"bn.{k}" for k in bn}
    assert "decoder.up.3.block.0.conv1.weight" in bfl and bfl["decoder.mid.attn_1.q.weight"].ndim == 4
    save_file(bfl, str(root / "ae.safetensors"))
    return SimpleNamespace(root=root, folder=folder, ae=root / "ae.safetensors", sd=sd, bfl=bfl)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    return xdg


def gguf_contents(path: Path) -> tuple[dict, dict]:
    """({tensor name: (type, shape, bytes)}, {flux2_vae.* key: value}) of a vae.gguf."""
    import gguf

    r = gguf.GGUFReader(str(path))
    tensors = {t.name: (t.tensor_type, tuple(t.shape), t.data.tobytes()) for t in r.tensors}
    config = {k: f.contents() for k, f in r.fields.items() if k.startswith("flux2_vae.")}
    return tensors, config


def assert_same_vae(a: Path, b: Path) -> None:
    ta, ca = gguf_contents(a)
    tb, cb = gguf_contents(b)
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name] == tb[name], name
    assert ca == cb and ca["flux2_vae.norm_num_groups"] == 32 and "flux2_vae.checkpoint_bn_mean" in ca


def save_edited(bfl: dict, path: Path, edit) -> Path:
    from safetensors.torch import save_file

    sd = dict(bfl)
    edit(sd)
    save_file(sd, str(path))
    return path


def test_convert_bfl_file_equals_diffusers_folder(vae_src, cli, tmp_path):
    """`convert ae.safetensors` and `convert vae/` (each found to be a VAE by itself) write the same tensors and
    config as each other, in both dtypes."""
    from gguf_dit.converter.vae import convert_vae

    for src, out in ((vae_src.ae, "a"), (vae_src.folder, "b")):
        code, stdout, stderr = cli("convert", src, "-o", tmp_path / out, "-q")
        assert code == 0, stderr
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == ["vae.gguf"], stdout
    assert_same_vae(tmp_path / "a" / "vae.gguf", tmp_path / "b" / "vae.gguf")
    code, _, stderr = cli("convert", vae_src.ae, "-o", tmp_path / "c", "--parts", "vae", "--vae-type", "f32", "-q")
    assert code == 0, stderr
    convert_vae(vae_src.folder, tmp_path / "d.gguf", dtype="f32")
    assert_same_vae(tmp_path / "c" / "vae.gguf", tmp_path / "d.gguf")
    # The F32 file holds the model's own decoder weights (attention projections squeezed from BFL's 1x1 convs).
    t, _ = gguf_contents(tmp_path / "d.gguf")
    q = "decoder.mid_block.attentions.0.to_q.weight"
    assert t[q][2] == vae_src.sd[q].numpy().astype(np.float32).tobytes()


def test_diffusers_named_file(vae_src, tiny_checkpoints, tmp_path):
    """A diffusers-named weights file: alone, its config is inferred from its shapes; beside its config.json (the
    tiny checkpoint's 8-group VAE, which shapes could not tell), that config is used."""
    from gguf_dit.converter.vae import convert_vae

    alone = tmp_path / "flux2_vae_diffusers.safetensors"
    shutil.copy(vae_src.folder / "diffusion_pytorch_model.safetensors", alone)
    convert_vae(alone, tmp_path / "alone.gguf")
    convert_vae(vae_src.folder, tmp_path / "folder.gguf")
    assert_same_vae(tmp_path / "alone.gguf", tmp_path / "folder.gguf")

    ck = tiny_checkpoints()
    convert_vae(ck / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "beside.gguf", dtype="f32")
    convert_vae(ck / "vae", tmp_path / "tiny_folder.gguf", dtype="f32")
    ta, ca = gguf_contents(tmp_path / "beside.gguf")
    tb, cb = gguf_contents(tmp_path / "tiny_folder.gguf")
    assert ta == tb and ca == cb and ca["flux2_vae.norm_num_groups"] == 8


def test_groups_shapes_cannot_tell(tiny_checkpoints, cli, tmp_path):
    """The tiny checkpoint's VAE (8 groups, 16 channels) in BFL naming has no config to say so: one line naming
    the file and the assumed count, exit 2, no output folder."""
    from safetensors.torch import load_file, save_file

    ck = tiny_checkpoints()
    f = tmp_path / "flux2-vae.safetensors"
    save_file(bfl_state_dict(load_file(str(ck / "vae" / "diffusion_pytorch_model.safetensors"))), str(f))
    code, _, stderr = cli("convert", f, "-o", tmp_path / "out", "-q")
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith(f"error: {f}: unsupported VAE config: channel count 16 is not a positive multiple of norm_num_groups 32")
    assert "norm_num_groups 32" in stderr and "inferred from the tensor shapes" in stderr
    assert not (tmp_path / "out").exists()


def test_run_vae_safetensors_same_image_cache_reused(vae_src, cli, cache, tmp_path, monkeypatch):
    """`run --vae ae.safetensors` converts once (one notice) into the cache, draws the image the converted
    vae.gguf draws, names the VAE as the user's file, and later runs reuse the cache silently."""
    import gguf_dit.converter.vae as conv
    from PIL import Image

    from gguf_dit.runtime.demo import DEMO_DIR

    code, _, stderr = cli("convert", vae_src.ae, "-o", tmp_path / "conv", "-q")
    assert code == 0, stderr
    run = ("run", "-m", DEMO_DIR, "-p", "a red circle", "--steps", "2", "-W", "64", "-H", "64", "-q")
    code, _, stderr = cli(*run, "--vae", vae_src.ae, "-o", tmp_path / "a.png")
    assert code == 0, stderr
    notices = [line for line in stderr.splitlines() if "converting VAE" in line]
    assert len(notices) == 1 and str(vae_src.ae) in notices[0]
    cached = list((cache / "gguf-dit" / "vae").rglob("*.gguf"))
    assert [p.name for p in cached] == ["ae.gguf"]
    # The cached file is byte for byte what `gguf-dit convert ae.safetensors` wrote.
    assert cached[0].read_bytes() == (tmp_path / "conv" / "vae.gguf").read_bytes()

    code, _, stderr = cli(*run, "--vae", tmp_path / "conv" / "vae.gguf", "-o", tmp_path / "b.png")
    assert code == 0, stderr
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert "VAE: ae," in a.text["parameters"] and "VAE: conv," in b.text["parameters"]
    assert a.text["parameters"].replace("VAE: ae,", "VAE: conv,") == b.text["parameters"]

    def boom(*args, **kwargs):
        raise AssertionError("the cached conversion should be reused")

    monkeypatch.setattr(conv, "prepare_vae", boom)
    code, _, stderr = cli(*run, "--vae", vae_src.ae, "-o", tmp_path / "c.png")
    assert code == 0, stderr
    assert "converting" not in stderr
    assert (tmp_path / "c.png").read_bytes() == (tmp_path / "a.png").read_bytes()


def test_vae_gguf_cache_keys(vae_src, cache, tmp_path, monkeypatch):
    """A .gguf passes through untouched; a source is converted once per (path, size, mtime); a folder and a
    checkpoint root work too; the cache follows XDG_CACHE_HOME, else ~/.cache."""
    from gguf_dit import vae_files

    said: list[str] = []
    gguf_file = tmp_path / "some.gguf"
    gguf_file.write_bytes(b"not even read")
    assert vae_files.vae_gguf(gguf_file, notice=said.append) == gguf_file
    assert not cache.exists() and not said

    ae = Path(shutil.copy(vae_src.ae, tmp_path / "flux2_ae.safetensors"))
    first = vae_files.vae_gguf(ae, notice=said.append)
    assert first.parent.parent == cache / "gguf-dit" / "vae" and first.name == "flux2_ae.gguf" and len(said) == 1
    assert vae_files.vae_gguf(ae, notice=said.append) == first and len(said) == 1
    st = ae.stat()
    os.utime(ae, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the user replaced the file
    second = vae_files.vae_gguf(ae, notice=said.append)
    assert second != first and len(said) == 2 and second.read_bytes() == first.read_bytes()

    folder = vae_files.vae_gguf(vae_src.folder, notice=said.append)
    assert folder.name == "flux2.gguf" and len(said) == 3  # named after the checkpoint holding vae/
    assert vae_files.vae_gguf(vae_src.folder.parent, notice=said.append).name == "flux2.gguf"
    assert_same_vae(folder, first)
    # A Hugging Face cache links snapshots/<rev>/flux2-vae.safetensors to a blob named by its hash.
    blob = Path(shutil.copy(vae_src.ae, tmp_path / "3f9a0c7e1b"))
    (tmp_path / "flux2-vae.safetensors").symlink_to(blob)
    assert vae_files.vae_gguf(tmp_path / "flux2-vae.safetensors", notice=said.append).name == "flux2-vae.gguf"

    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert vae_files.cache_dir() == tmp_path / "home" / ".cache" / "gguf-dit"

    with pytest.raises(ModelError, match="does not exist"):
        vae_files.vae_gguf(tmp_path / "missing.safetensors")
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"vae\.ckpt: is not a \.gguf, a \.safetensors VAE or a diffusers vae/ folder"):
        vae_files.vae_gguf(tmp_path / "vae.ckpt")


def _drop(sd):
    sd.pop("decoder.up.0.block.1.conv2.weight")


def _rename(sd):
    sd["decoder.mid.attn_1.query.weight"] = sd.pop("decoder.mid.attn_1.q.weight")


def _reshape(sd):
    sd["decoder.up.2.upsample.conv.weight"] = sd["decoder.up.2.upsample.conv.weight"][:, :, :1].contiguous()


@pytest.mark.parametrize("edit, tensor, message", [
    (_drop, "decoder.up.0.block.1.conv2.weight", "tensor missing"),
    (_rename, "decoder.mid.attn_1.query.weight", "unexpected tensor"),
    (_reshape, "decoder.up.2.upsample.conv.weight", "shape [32, 32, 1, 3], expected [32, 32, 3, 3] from the file's other shapes"),
], ids=["missing", "renamed", "shape"])
def test_bad_bfl_file(vae_src, cli, cache, tmp_path, edit, tensor, message):
    """A BFL file with a missing, renamed or misshapen tensor: one line naming the file and the tensor (as the file
    names it), exit 2, from `run --vae` (nothing left in the cache) and from `convert` (no output folder)."""
    from gguf_dit.runtime.demo import DEMO_DIR

    bad = save_edited(vae_src.bfl, tmp_path / "ae.safetensors", edit)
    code, _, stderr = cli("run", "-m", DEMO_DIR, "-p", "x", "--steps", "1", "-W", "32", "-H", "32", "-q", "--vae", bad, "-o", tmp_path / "x.png")
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith(f"error: {bad}: tensor {tensor}: {message}")
    assert not (cache / "gguf-dit" / "vae").exists() and not list(cache.rglob("*.gguf"))
    code, _, stderr = cli("convert", bad, "-o", tmp_path / "out", "-q")
    assert code == 2 and stderr.startswith(f"error: {bad}: tensor {tensor}: {message}")
    assert not (tmp_path / "out").exists()


def test_not_a_vae_file(tmp_path):
    """A .safetensors file with no decoder in either naming is named with the tensor it lacks."""
    from safetensors.torch import save_file

    from gguf_dit.converter.vae import convert_vae

    f = tmp_path / "other.safetensors"
    save_file({"decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2, 3, 3)}, str(f))
    with pytest.raises(SourceError, match=r"other\.safetensors: tensor decoder\.conv_in\.weight: tensor missing \(not a VAE decoder"):
        convert_vae(f, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()
