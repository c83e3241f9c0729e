"""A model's four GGUF files: from a folder `gguf-dit convert` wrote, from single files (sd.cpp-style component
options), or both (a component overrides the folder's file); found, identified, and their roles checked."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from gguf_dit import hashes, keys
from gguf_dit.arch import MODEL_FILES
from gguf_dit.arch.dit import ARCH as DIT_ARCH, is_ideogram4
from gguf_dit.arch.text_encoder import ACCEPTED_ARCHES
from gguf_dit.arch.vae import ARCH as VAE_ARCH
from gguf_dit.errors import ModelError, OptionError
from gguf_dit.gguf_header import read_header

#: Each component's command-line option (sd.cpp's names) and how messages name it.
OPTIONS = {"transformer": "--diffusion-model", "unconditional_transformer": "--uncond-diffusion-model", "text_encoder": "--llm", "vae": "--vae"}
NAMES = {"transformer": "conditional backbone", "unconditional_transformer": "unconditional backbone", "text_encoder": "text encoder",
         "vae": "VAE"}
_ROLE_COMPONENT = {"cond": "transformer", "uncond": "unconditional_transformer"}
_BACKBONES = ("transformer", "unconditional_transformer")


def identify(path: Path) -> tuple[str | None, str]:
    """(component, description) of a GGUF from its header alone: ``transformer``/``unconditional_transformer`` by the
    recorded role, ``backbone`` when none is recorded (stable-diffusion.cpp files), ``text_encoder``, ``vae``, or
    None. Reads no weights (a text encoder's vocabulary makes it ~0.3 s)."""
    h = read_header(path)
    arch = h.value(keys.ARCHITECTURE, ("STRING",))
    if arch == DIT_ARCH or (arch is None and is_ideogram4(h.tensors)):
        role = h.value(keys.ROLE, ("STRING",))
        return _ROLE_COMPONENT.get(role, "backbone"), f"an Ideogram 4 backbone ({f'role {role}' if role in _ROLE_COMPONENT else 'no role recorded'})"
    if arch in ACCEPTED_ARCHES:
        return "text_encoder", f"a text encoder (architecture {arch})"
    if arch == VAE_ARCH:
        return "vae", "a VAE decoder"
    return None, f"not an Ideogram 4 component (architecture {arch!r})" if arch else "not an Ideogram 4 component"


def _where(component: str | None) -> str:
    if component == "backbone":
        return f"give it as {OPTIONS['transformer']} FILE or {OPTIONS['unconditional_transformer']} FILE"
    return f"give it as {OPTIONS[component]} FILE"


def _regular(path: Path) -> Path:
    if not path.exists():
        raise ModelError("does not exist", path=path)
    if not path.is_file():  # a FIFO would block the first open forever, a device never end
        raise ModelError("is not a regular file (a folder, FIFO or device); expected a GGUF file", path=path)
    return path


def _file_as_model(path: Path) -> OptionError:
    """The one-line answer to a file given where a model folder belongs: which option the file belongs to."""
    start = "--model takes a folder (the GGUFs gguf-dit convert writes)"
    if path.suffix.lower() == ".safetensors":
        return OptionError(f"{start}; convert this checkpoint file with `gguf-dit convert`, or give a FLUX.2 VAE file as --vae FILE", path=path)
    try:
        component, what = identify(path)
    except ModelError:  # not a readable GGUF: the generic answer
        component, what = None, "not a GGUF file"
    if component is None:
        return OptionError(f"{start}; this file is {what} (components go to {', '.join(OPTIONS.values())})", path=path)
    return OptionError(f"{start}; this file is {what}: {_where(component)}", path=path)


def same_content(a: Path, b: Path, samples: int = 8, block: int = 1 << 20) -> bool:
    """Whether two files hold the same bytes. Sizes and ``samples`` blocks spread over them (first and last included)
    tell two different backbones apart after a few MiB (separately trained weights differ in nearly every block);
    only files that match there are compared by their whole sha256 (cached, and needed for the metadata anyway)."""
    if os.path.samefile(a, b):
        return True
    size = a.stat().st_size
    if size != b.stat().st_size:
        return False
    offsets = sorted({i * max(size - block, 0) // (samples - 1) for i in range(samples)})
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in offsets:
            fa.seek(off)
            fb.seek(off)
            if fa.read(block) != fb.read(block):
                return False
    return hashes.sha256(a) == hashes.sha256(b)


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    transformer: Path
    unconditional_transformer: Path | None  # None: not given; only runs whose every step has guidance 1 need none
    text_encoder: Path
    vae: Path

    @classmethod
    def find(cls, model_dir: str | Path | None = None, *, transformer: str | Path | None = None,
             unconditional_transformer: str | Path | None = None, text_encoder: str | Path | None = None,
             vae: str | Path | None = None) -> "ModelFiles":
        """The folder's files (``model_dir``, as `convert` writes it), each replaced by the component given; without a
        folder every component but the unconditional backbone must be given."""
        given = {k: Path(v) for k, v in (("transformer", transformer), ("unconditional_transformer", unconditional_transformer),
                                         ("text_encoder", text_encoder), ("vae", vae)) if v is not None}
        paths: dict[str, Path | None] = {"unconditional_transformer": None}
        if model_dir is not None:
            d = Path(model_dir)
            if d.is_file():
                raise _file_as_model(d)
            if not d.is_dir():
                raise ModelError("model folder does not exist", path=d)
            for k, name in MODEL_FILES.items():
                p = d / name
                if k in given or (k == "unconditional_transformer" and not p.exists()):
                    continue
                if not p.exists():
                    raise ModelError(f"missing {k} file (convert a checkpoint with `gguf-dit convert`, or pass {OPTIONS[k]} FILE)", path=p)
                paths[k] = _regular(p)
        else:
            missing = [k for k in MODEL_FILES if k not in given and k != "unconditional_transformer"]
            if missing:
                give = " and ".join(f"{OPTIONS[k]} FILE" for k in missing)
                raise OptionError(f"no {' and no '.join(NAMES[k] for k in missing)}: give {give}{',' if len(missing) > 1 else ''} or --model DIR")
        for k, p in given.items():
            paths[k] = _regular(p)
            if k == "text_encoder":  # its own reader names a wrong architecture; identifying it would read the vocabulary twice
                continue
            component, what = identify(p)
            if component != k and not (k in _BACKBONES and component in (*_BACKBONES, "backbone")):
                hint = f": {_where(component)}" if component else ""
                raise OptionError(f"given as {OPTIONS[k]} ({NAMES[k]}), but this file is {what}{hint}", path=p)
        return cls(**paths)

    def check_roles(self, cond_role: str | None, uncond_role: str | None) -> list[str]:
        """Refuse a backbone pair that cannot be right: one file (or identical content) in both roles, a recorded role
        that contradicts where the file is used. Where a role is not recorded (stable-diffusion.cpp files), nothing
        tells the two apart (same architecture and tensor inventory, ideogram4-model.md §1, §4), so the returned
        warning says which file is used as which."""
        a, b = self.transformer, self.unconditional_transformer
        if same_content(a, b):
            same = "given as both backbones" if os.path.samefile(a, b) else f"holds the same bytes as {a}"
            raise ModelError(f"{same}, but the conditional and unconditional backbones are two models with their own weights "
                             "(transformer.gguf and unconditional_transformer.gguf; sd.cpp's ideogram4-*.gguf and ideogram4_uncond-*.gguf)", path=b)
        wrong = [(p, role, k) for p, role, k in ((a, cond_role, "transformer"), (b, uncond_role, "unconditional_transformer"))
                 if role is not None and _ROLE_COMPONENT[role] != k]
        if len(wrong) == 2:
            raise ModelError(f"the backbones are swapped: {a} records role uncond, {b} role cond; exchange "
                             f"{OPTIONS['transformer']} and {OPTIONS['unconditional_transformer']}")
        if wrong:
            p, role, k = wrong[0]
            raise ModelError(f"used as the {NAMES[k]} ({OPTIONS[k]}), but its metadata records role={role}", path=p)
        if cond_role is not None and uncond_role is not None:
            return []
        # A user's own names are the one hint left: sd.cpp's documentation names the file ideogram4_uncond-Q8_0.gguf.
        swapped = "uncond" in a.name.lower() and "uncond" not in b.name.lower()
        advice = "their names suggest they are swapped" if swapped else "if the images are noise, they are swapped"
        return [f"backbone roles not recorded in the files, taken from how they are given: {a} is the conditional backbone, {b} the "
                f"unconditional one; {advice} (exchange {OPTIONS['transformer']} and {OPTIONS['unconditional_transformer']})"]
