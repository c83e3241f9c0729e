"""The settings an image was drawn with, written into it and read back.

Two text chunks: ``parameters``, the infotext A1111's web UI writes (and its PNG Info tab, Civitai, sd-parsers and
ComfyUI loaders read): the prompt, then one line of ``Key: value`` fields, values holding a comma, colon or newline
JSON-quoted; ``gguf-dit``, every setting as JSON, which `gguf-dit run --from-png` reads to draw the image again.
Field names follow A1111 where it has one (``CFG scale`` is a number, so the per-step schedule gets its own
``CFG schedule`` field; ``Model hash`` is AutoV2), and its "X hash, X" pattern for the other components.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from gguf_dit import __version__
from gguf_dit.arch import MODEL_FILES
from gguf_dit.errors import InputError
from gguf_dit.files import open_regular

from .caption import Prompt
from .schedule import SamplerSettings, guidance_text

TEXT_KEY, JSON_KEY = "parameters", "gguf-dit"
#: A1111's name for the Euler step; the flow-matching time grid is the schedule type.
SAMPLER, SCHEDULE_TYPE = "Euler", "Logit-normal"
#: Infotext labels of the components after the conditional backbone (A1111's "Model"), in the order written.
COMPONENT_LABELS = {"unconditional_transformer": "Uncond model", "text_encoder": "Text encoder", "vae": "VAE"}
_EXIF_IFD, _USER_COMMENT, _IMAGE_DESCRIPTION = 0x8769, 0x9286, 0x010E
_UNICODE = b"UNICODE\0"  # EXIF's character-code prefix for UCS-2 text (the byte order is the EXIF header's)


def quote(value) -> str:
    """A value as A1111's infotext writes it: JSON-quoted when it holds a comma, colon or newline, else as is."""
    s = str(value)
    return json.dumps(s, ensure_ascii=False) if any(c in s for c in ",:\n") else s


def model_name(role: str, path: Path) -> str:
    """What the infotext calls a component: its folder's name for a file under its standard name in a converted
    model folder (``ideogram4-q8/transformer.gguf`` → ``ideogram4-q8``), else the file's stem (A1111's model name)."""
    path = Path(path).absolute()
    return path.parent.name if path.name == MODEL_FILES[role] and path.parent.name else path.stem


def infotext(prompt_text: str, settings: SamplerSettings, seed: int, height: int, width: int, models: dict, reference: str) -> str:
    """The A1111 ``parameters`` text: the prompt line(s) (no negative prompt: Ideogram 4 has none), then the fields."""
    t = models["transformer"]
    fields = {
        "Steps": settings.steps,
        "Sampler": SAMPLER,
        "Schedule type": SCHEDULE_TYPE,
        "CFG scale": f"{settings.guidance[0]:g}",  # the main value: the presets' low-guidance steps come last
        "CFG schedule": guidance_text(settings.guidance) if len(set(settings.guidance)) > 1 else None,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": t["hash"],
        "Model": t["name"],
    }
    for role, label in COMPONENT_LABELS.items():
        m = models.get(role) or {}  # no unconditional backbone where every step has guidance 1
        fields |= {f"{label} hash": m.get("hash"), label: m.get("name")}
    fields |= {"Schedule mu": f"{settings.mu:g}", "Schedule std": f"{settings.std:g}", "Reference": reference,
               "Preset": settings.name, "Recipe": t.get("recipe"), "Version": f"gguf-dit {__version__}"}
    line = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    return f"{prompt_text}\n{line}".strip()


def png_metadata(prompt: Prompt, settings: SamplerSettings, seed: int, height: int, width: int, models: dict, reference: str) -> dict[str, str]:
    """Both text chunks of one image."""
    full = {"prompt": prompt.text, "prompt_source": prompt.source, "seed": seed, "height": height, "width": width,
            "preset": settings.name, "steps": settings.steps, "guidance": list(settings.guidance), "mu": settings.mu,
            "std": settings.std, "reference": reference, "models": models, "version": __version__}
    return {TEXT_KEY: infotext(prompt.text, settings, seed, height, width, models, reference),
            JSON_KEY: json.dumps(full, ensure_ascii=False, separators=(",", ":"))}


def exif_of(text: dict[str, str]):
    """The EXIF block of a JPEG/WebP: ``parameters`` in UserComment, where A1111 writes and reads it (Pillow writes
    big-endian EXIF, so the comment is UTF-16BE as A1111's piexif writes it), and the ``gguf-dit`` JSON, ASCII-escaped,
    in ImageDescription, so that `run --from-png` reads these formats too."""
    from PIL import Image

    exif = Image.Exif()
    if TEXT_KEY in text:
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE + text[TEXT_KEY].encode("utf-16-be")
    if JSON_KEY in text:
        exif[_IMAGE_DESCRIPTION] = json.dumps(json.loads(text[JSON_KEY]), ensure_ascii=True, separators=(",", ":"))
    return exif


def _is_ours(description) -> bool:
    """Whether an EXIF ImageDescription is the JSON `exif_of` writes (any other description is left alone)."""
    try:
        data = json.loads(description)
    except (TypeError, ValueError):
        return False
    return isinstance(data, dict) and "prompt" in data and "version" in data


def _user_comment(raw: bytes, endian: str) -> str:
    """EXIF UserComment: an 8-byte character-code prefix, then the text (UCS-2 in the EXIF header's byte order)."""
    code, body = raw[:8], raw[8:]
    if code == b"UNICODE\0":
        return body.decode("utf-16-be" if endian == ">" else "utf-16-le", errors="replace")
    return body.decode("ascii" if code == b"ASCII\0\0\0" else "utf-8", errors="replace")


def read_text(path: str | Path) -> dict[str, str]:
    """An image's text: PNG text chunks, or (JPEG, WebP) the EXIF ImageDescription as ``gguf-dit`` and UserComment as ``parameters``, where A1111 keeps
    it. A file Pillow cannot open is an InputError."""
    from PIL import Image, UnidentifiedImageError

    f, _ = open_regular(Path(path), InputError)  # not a FIFO or device: Pillow would block or read forever
    try:
        with f, Image.open(f) as im:
            text = {k: v for k, v in getattr(im, "text", {}).items() if isinstance(v, str)}  # a PNG's: decodes it for chunks after the pixels
            exif = im.getexif()
            comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
            if TEXT_KEY not in text and isinstance(comment, bytes):
                text[TEXT_KEY] = _user_comment(comment, getattr(exif, "endian", ">"))
            description = exif.get(_IMAGE_DESCRIPTION)
            if JSON_KEY not in text and _is_ours(description):
                text[JSON_KEY] = description
            return text
    except UnidentifiedImageError:
        raise InputError("is not an image file Pillow can read", path=path) from None
    except Image.DecompressionBombError:
        raise InputError("has more pixels than Pillow reads safely (its decompression bomb limit)", path=path) from None
    except OSError as e:
        raise InputError(f"cannot read the image: {e.strerror or e}", path=path) from None


def read_settings(path: str | Path) -> dict:
    """The ``gguf-dit`` JSON chunk of an image; an image without one (or with a broken one) is an InputError."""
    text = read_text(path).get(JSON_KEY)
    if text is None:
        raise InputError(f"has no gguf-dit metadata (no {JSON_KEY!r} text chunk or EXIF description: only images gguf-dit run wrote carry it)", path=path)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InputError(f"the {JSON_KEY!r} text chunk is not valid JSON ({e.msg} at character {e.pos})", path=path) from None
    if not isinstance(data, dict):
        raise InputError(f"the {JSON_KEY!r} text chunk is not a JSON object", path=path)
    return data


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: What ``from_png`` needs from the JSON chunk, and how each value is checked.
_FIELDS = {
    "prompt": lambda v: isinstance(v, str),
    "prompt_source": lambda v: v in ("json", "text", "raw"),
    "seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "width": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "height": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "guidance": lambda v: isinstance(v, list) and all(map(_number, v)),
    "mu": _number,
    "std": lambda v: _number(v) and v > 0,
    "preset": lambda v: isinstance(v, str),
    "reference": lambda v: isinstance(v, str),
}


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """What drew an image, as `run --from-png` reuses it."""

    prompt: Prompt
    seed: int
    width: int
    height: int
    settings: SamplerSettings
    reference: str
    models: dict

    @property
    def model_hash(self) -> str | None:
        """The conditional backbone's AutoV2 hash, where the image records one."""
        t = self.models.get("transformer")
        return t.get("hash") if isinstance(t, dict) and isinstance(t.get("hash"), str) else None


def from_png(path: str | Path) -> ImageSettings:
    """The settings stored in an image `gguf-dit run` wrote; the prompt is the exact text the encoder saw."""
    data = read_settings(path)
    for key, ok in _FIELDS.items():
        if key not in data:
            raise InputError(f"gguf-dit metadata has no {key!r}", path=path)
        if not ok(data[key]):
            raise InputError(f"gguf-dit metadata: {key!r} has an unusable value {json.dumps(data[key])[:60]}", path=path)
    if len(data["guidance"]) != data["steps"]:
        raise InputError(f"gguf-dit metadata: 'guidance' has {len(data['guidance'])} values for {data['steps']} steps", path=path)
    settings = SamplerSettings(steps=data["steps"], guidance=tuple(float(g) for g in data["guidance"]), mu=float(data["mu"]),
                               std=float(data["std"]), name=data["preset"])
    prompt = Prompt(text=data["prompt"], source=data["prompt_source"], line=None, original=data["prompt"])
    models = data.get("models") if isinstance(data.get("models"), dict) else {}
    return ImageSettings(prompt, data["seed"], data["width"], data["height"], settings, data["reference"], models)
