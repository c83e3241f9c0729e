"""Ideogram 4 prompts: read prompt files, validate JSON captions, wrap plain text, serialise.

Ideogram 4 was trained on structured JSON captions (model reference §12). This module turns what a
user gives us into the exact string the text encoder sees (the `{caption}` of the §11.2 chat
template). No model, no tokenizer. The full rules, with example messages, are in docs/captions.md.
In short:

* a prompt file holds JSON captions (one object, pretty-printed or not; JSON Lines; a JSON array of
  objects; or several of those in a row) or plain text (one prompt per non-blank line); lines whose
  first non-blank character is `#` are comments (in JSON files only between captions);
* a JSON caption is validated by the pydantic models below (`Caption`): what the model cannot
  consume (invalid JSON, wrong types, missing required keys) is a `CaptionError` (an `InputError`:
  exit code 2); keys the spec lacks and softer deviations are warnings (`Prompt.warnings`), and
  `strict=True` refuses unknown keys;
* known keys are written in the published order whatever order they came in, unknown keys where
  they were; `aspect_ratio` and (by default) every element's `bbox` are stripped, as the official
  pipeline does; the caption is serialised compactly with non-ASCII kept literal;
* plain text is wrapped as `{"high_level_description":TEXT,"compositional_deconstruction":
  {"background":"","elements":[]}}`;
* raw mode passes each prompt's source text through untouched.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from gguf_dit.arch.text_encoder import MAX_TOKENS as MAX_TEXT_TOKENS  # counting tokens needs the tokenizer: the encoder enforces it
from gguf_dit.errors import InputError
from gguf_dit.files import json_type, open_regular, show

__all__ = [
    "Prompt", "Caption", "CaptionError", "read_prompt_file", "prompts_from_file", "prompt_from_string", "check_caption",
    "validate_caption", "prepare_caption", "wrap_plain_text", "check_encodable", "serialise", "caption_summary",
    "bbox_notice", "MAX_TEXT_TOKENS", "MAX_CAPTION_CHARS", "MAX_PROMPT_FILE_BYTES", "PLAIN_TEXT_NOTE",
]


#: Characters per caption before tokenizing: 32 per allowed token, far above what 2048 tokens of
#: real text take (about 4 characters each), and small enough that a hostile caption (e.g.
#: thousands of special tokens, whose handling in llama.cpp's tokenizer grows quadratically) is
#: refused in milliseconds instead of being tokenized.
MAX_CAPTION_CHARS = 32 * MAX_TEXT_TOKENS

#: Bytes read from one prompt file (hundreds of maximal captions); larger files are refused unread.
MAX_PROMPT_FILE_BYTES = 16 << 20

#: JSON nesting depth of a caption: the spec needs 5 (root, composition, elements, element, bbox).
MAX_JSON_DEPTH = 32

#: A one-off notice a front end may print when it wraps plain text (not added to every prompt).
PLAIN_TEXT_NOTE = (
    "plain-text prompts are wrapped into a minimal JSON caption; Ideogram 4 was trained on structured "
    "JSON captions and follows them much better (see docs/captions.md)"
)

STYLE_PALETTE_MAX = 16
ELEMENT_PALETTE_MAX = 5
BBOX_MIN, BBOX_MAX = 0, 1000
HIGH_LEVEL_MAX_WORDS = 50
DESC_MAX_WORDS = 60
_MAX_REPORTED_ERRORS = 10

_HEX_RE = re.compile(r"#[0-9A-F]{6}")

# --- the published caption spec (§12) ------------------------------------------------------------
# Field order is the published key order: `_in_order` writes captions in it and the JSON schema lists it.
# `str = None` rather than Optional: a key may be left out, but null is a wrong type. Mirrors diffusers'
# build_caption_logits_processor models, with the spec's optional keys added.

_Bbox = Annotated[list[Union[int, float]], Field(min_length=4, max_length=4, description=(
    f"[y_min, x_min, y_max, x_max] on a {BBOX_MAX}x{BBOX_MAX} grid, origin top-left"),
    json_schema_extra={"items": {"type": "integer", "minimum": BBOX_MIN, "maximum": BBOX_MAX}})]
_Colour = Annotated[str, Field(json_schema_extra={"pattern": "^" + _HEX_RE.pattern + "$"})]


def _schema_extra(schema: dict) -> None:
    # The exported schema is what a caption writer (e.g. constrained decoding) should emit; validation only
    # warns about other keys, and a key that may be left out is not one that may be null.
    schema["additionalProperties"] = False
    for prop in schema["properties"].values():
        prop.pop("default", None)


class _Node(BaseModel):
    # strict: a number is not a string and true is not a number
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_schema_extra)

    @model_validator(mode="before")
    @classmethod
    def _no_duplicate_keys(cls, data: Any) -> Any:
        for k in getattr(data, "duplicate_keys", ())[:1]:
            raise PydanticCustomError("duplicate_key", "duplicate key {key}", {"key": k})
        return data


class StyleDescription(_Node):
    aesthetics: str = None
    lighting: str = None
    photo: str = None  # photographs only
    medium: str = None
    art_style: str = None  # everything that is not a photograph
    color_palette: Annotated[list[_Colour], Field(json_schema_extra={"maxItems": STYLE_PALETTE_MAX})] = None


class ObjElement(_Node):
    type: Literal["obj"]
    bbox: _Bbox = None
    desc: str = None
    color_palette: Annotated[list[_Colour], Field(json_schema_extra={"maxItems": ELEMENT_PALETTE_MAX})] = None


class TextElement(_Node):
    type: Literal["text"]
    bbox: _Bbox = None
    text: str = Field(None, description="the literal words to render")
    desc: str = None
    color_palette: Annotated[list[_Colour], Field(json_schema_extra={"maxItems": ELEMENT_PALETTE_MAX})] = None


class CompositionalDeconstruction(_Node):
    background: str
    elements: list[Annotated[Union[ObjElement, TextElement], Field(discriminator="type")]]


class Caption(_Node):
    """One JSON caption; `Caption.model_json_schema()` is the schema for constrained decoding."""

    aspect_ratio: SkipJsonSchema[Any] = Field(None, exclude=True)  # the magic prompt emits it; always stripped
    high_level_description: str = None
    style_description: StyleDescription = None
    compositional_deconstruction: CompositionalDeconstruction


@dataclass
class Prompt:
    """One prompt, ready for the text encoder."""

    text: str  #: the exact string given to the encoder (the `{caption}` of the chat template)
    source: str  #: "json" (a validated JSON caption), "text" (wrapped plain text) or "raw" (untouched)
    line: int | None  #: 1-based line in the prompt file where this prompt starts; None if not from a file
    warnings: list[str] = field(default_factory=list)  #: soft spec deviations, one line each
    original: str = ""  #: the prompt's source text as written (a JSON value's exact text, or the line)
    bboxes_stripped: int = 0  #: element bboxes removed from the caption (see `bbox_notice`)


class CaptionError(InputError, ValueError):
    """A JSON caption the model cannot consume (or, with strict, one with keys the spec lacks).

    `errors` lists every problem (path: what is wrong; what is expected); `warnings` the soft ones
    found in the same caption. The message is one line: all errors joined by "; ".
    """

    def __init__(self, errors: list[str], *, warnings: list[str] | None = None,
                 where: str | None = None, path: str | None = None):
        self.errors = list(errors)
        self.warnings = list(warnings or [])
        shown = self.errors[:_MAX_REPORTED_ERRORS]
        msg = "invalid caption: " + "; ".join(shown)
        if len(self.errors) > len(shown):
            msg += f"; (+{len(self.errors) - len(shown)} more)"
        if where:
            msg = f"{where}: {msg}"
        super().__init__(msg, path=path)


# --- JSON parsing helpers ------------------------------------------------------------------------


class _JsonObject(dict):
    """A parsed JSON object that remembers keys it saw twice (json keeps only the last value)."""

    duplicate_keys: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    dups = []
    for k, v in pairs:
        if k in obj and k not in dups:
            dups.append(k)
        obj[k] = v
    if dups:
        obj.duplicate_keys = tuple(dups)
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_object_pairs, parse_constant=_reject_constant)


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _decode_at(text: str, pos: int, *, where_prefix: str = "", path: str | None, hint: str) -> tuple[Any, int]:
    """raw_decode one JSON value at `pos`; a failure becomes a one-line InputError with line/column."""
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        raise InputError(f"{where_prefix}line {e.lineno} column {e.colno}: invalid JSON: {e.msg}{hint}",
                         path=path) from None
    except ValueError as e:  # NaN / Infinity
        line, col = _line_col(text, pos)
        raise InputError(f"{where_prefix}line {line}: invalid JSON: {e}{hint}", path=path) from None
    except RecursionError:
        too_deep = True
    else:
        too_deep = _too_deep(value)
    if too_deep:
        # Deeper values would exhaust the stack of every later step (validation, copy, serialisation).
        line, _ = _line_col(text, pos)
        raise InputError(f"{where_prefix}line {line}: JSON nested more than {MAX_JSON_DEPTH} levels deep; "
                         "a caption needs 5", path=path)
    return value, end


def _json_type(v: Any) -> str:
    t = json_type(v)
    return t if t == "null" else ("an " if t[0] in "aeiou" else "a ") + t


_show = functools.partial(show, limit=None)  # a caption's values are quoted whole in its messages

# --- validation ----------------------------------------------------------------------------------


def _p(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _path(loc: Iterable) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".") or "(root)"


_EXPECTED = {  # what the value at a key must be, for type errors; every key not listed holds a string
    "": "a JSON object (a caption)", "style_description": "an object",
    "compositional_deconstruction": 'an object with "background" and "elements"',
    "elements": "an array of element objects", "elements[]": "an element object",
    "color_palette": "an array of '#RRGGBB' strings", "color_palette[]": "a '#RRGGBB' string",
    "bbox": "an array of 4 integers [y_min, x_min, y_max, x_max]", "bbox[]": "a number",
}
_MISSING_HINT = {"compositional_deconstruction": ' (an object with "background" and "elements")',
                 "elements": " (an array, possibly empty)"}


def _error_lines(e: ValidationError) -> list[str]:
    """pydantic's errors as one-line messages: the key path, what is wrong, what is expected."""
    out = []
    for d in e.errors():
        raw = d["loc"]  # without the union member names pydantic puts after an element's or a bbox value's index
        loc = [k for i, k in enumerate(raw) if i < 2 or not isinstance(raw[i - 1], int) or raw[i - 2] not in ("elements", "bbox")]
        kind, value = d["type"], d["input"]
        if kind == "missing":
            out.append(f"{_path(loc[:-1])}: missing required key {_show(loc[-1])}{_MISSING_HINT.get(loc[-1], '')}")
        elif kind == "union_tag_not_found":
            out.append(f'{_path(loc)}: missing required key "type" ("obj" or "text")')
        elif kind == "union_tag_invalid":
            out.append(f'{_path([*loc, "type"])}: expected "obj" or "text", got {_show(value.get("type"))}')
        elif kind == "duplicate_key":
            out.append(f"{_path(loc)}: duplicate key {_show(d['ctx']['key'])}; expected each key once")
        else:
            leaf = "" if not loc else f"{loc[-2]}[]" if isinstance(loc[-1], int) else loc[-1]
            got = f"{len(value)} values" if kind in ("too_short", "too_long") else _json_type(value)
            out.append(f"{_path(loc)}: expected {_EXPECTED.get(leaf, 'a string')}, got {got}")
    return list(dict.fromkeys(out))  # a bbox value that is not a number fails both int and float


def _findings(cap: Caption, check_bboxes: bool) -> tuple[list[str], list[str]]:
    """(keys the spec lacks, soft deviations) of a caption that validated."""
    unknown: list[str] = []
    warnings: list[str] = []

    def warn(path: str, msg: str) -> None:
        warnings.append(f"{path or '(root)'}: {msg}")

    def extra(node: _Node, path: str, note: str = "") -> None:
        known = ", ".join(k for k in type(node).model_fields if k != "aspect_ratio")
        unknown.extend(f"{_p(path, k)}: unknown key (the spec has {known} here{note})" for k in node.model_extra)

    def words(text: str | None, path: str, limit: int, what: str) -> None:
        n = len(text.split()) if text is not None else 0
        if n > limit:
            warn(path, f"{n} words; the spec asks for {what} of at most about {limit} words")

    def palette(pal: list[str] | None, path: str, limit: int) -> None:
        if len(pal or ()) > limit:
            warn(path, f"{len(pal)} colours; expected at most {limit}")
        for i, c in enumerate(pal or ()):
            if not _HEX_RE.fullmatch(c.upper()):
                warn(f"{path}[{i}]", f"{_show(c)} is not a colour of the form '#RRGGBB' (uppercase hex)")
            elif c != c.upper():
                warn(f"{path}[{i}]", f"{_show(c)} is lowercase; expected uppercase '#RRGGBB' ({_show(c.upper())})")

    extra(cap, "")
    if cap.high_level_description is None:
        warn("", "no \"high_level_description\"; the spec recommends one (a short summary, "
                 f"at most about {HIGH_LEVEL_MAX_WORDS} words) as the first key")
    words(cap.high_level_description, "high_level_description", HIGH_LEVEL_MAX_WORDS, "a high-level description")
    sd = cap.style_description
    if sd is not None:
        extra(sd, "style_description")
        if (sd.photo is None) == (sd.art_style is None):
            which = "neither \"photo\" nor" if sd.photo is None else "both \"photo\" and"
            warn("style_description", f"has {which} \"art_style\"; expected exactly one "
                                      "(\"photo\" for photographs, \"art_style\" otherwise)")
        if sd.medium is None:
            warn("style_description", "no \"medium\"; the spec asks for one whenever style_description is given")
        palette(sd.color_palette, "style_description.color_palette", STYLE_PALETTE_MAX)
    extra(cap.compositional_deconstruction, "compositional_deconstruction")
    for i, el in enumerate(cap.compositional_deconstruction.elements):
        path = f"compositional_deconstruction.elements[{i}]"
        extra(el, path, "; a \"text\" key needs \"type\": \"text\"" if "text" in el.model_extra else "")
        if isinstance(el, TextElement) and el.text is None:
            warn(path, "no \"text\"; the spec gives a text element the literal words to render")
        elif isinstance(el, TextElement) and not el.text.strip():
            warn(_p(path, "text"), "empty; expected the literal words to render")
        if el.desc is None:
            warn(path, "no \"desc\"; the spec asks for a description of every element")
        words(el.desc, _p(path, "desc"), DESC_MAX_WORDS, "an element description")
        b, bp = el.bbox, _p(path, "bbox")
        if check_bboxes and b is not None:
            if any(isinstance(v, float) and not v.is_integer() for v in b):
                warn(bp, f"{_show(b)} has non-integer values; expected integers in {BBOX_MIN}..{BBOX_MAX}")
            if out := [v for v in b if not BBOX_MIN <= v <= BBOX_MAX]:
                warn(bp, f"{_show(b)} has values outside {BBOX_MIN}..{BBOX_MAX} ({', '.join(map(_show, out))}); "
                         f"expected [y_min, x_min, y_max, x_max] on a {BBOX_MAX}x{BBOX_MAX} grid, origin top-left")
            for j, axis in enumerate("yx"):
                if b[j] > b[j + 2]:
                    warn(bp, f"{axis}_min {_show(b[j])} > {axis}_max {_show(b[j + 2])}; expected [y_min, x_min, y_max, x_max]")
        palette(el.color_palette, _p(path, "color_palette"), ELEMENT_PALETTE_MAX)
    return unknown, warnings


def check_caption(obj: Any, *, check_bboxes: bool = True, strict: bool = False) -> tuple[list[str], list[str]]:
    """Check a parsed caption against the spec; return (errors, warnings), raising nothing.

    Keys the spec lacks are warnings, or errors with `strict`. `check_bboxes=False` skips the bbox
    *value* warnings (range, order, integers): used when the bboxes are stripped anyway.
    """
    try:
        cap = Caption.model_validate(obj)
    except ValidationError as e:
        return _error_lines(e), []
    unknown, warnings = _findings(cap, check_bboxes)
    return (unknown, warnings) if strict else ([], [f"{u}; kept as written" for u in unknown] + warnings)


def validate_caption(obj: Any, *, strict: bool = False, check_bboxes: bool = True) -> list[str]:
    """Validate a parsed JSON caption; return its warnings; any error raises `CaptionError`."""
    errors, warnings = check_caption(obj, check_bboxes=check_bboxes, strict=strict)
    if errors:
        raise CaptionError(errors, warnings=warnings)
    return warnings


# --- preparation ---------------------------------------------------------------------------------


def serialise(obj: Any) -> str:
    """Compact JSON, `,`/`:` separators, non-ASCII literal (§12), key order as given."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _in_order(raw: dict, model: type[_Node], drop: tuple[str, ...] = ()) -> dict:
    """`raw` with the model's keys in the published order, in the places where `raw` had its known keys; other
    keys stay where they are. So a caption already in order passes unchanged, as diffusers and sd.cpp pass
    every caption, and one without unknown keys comes out as the official magic prompt's reorder writes it."""
    known = iter([k for k in model.model_fields if k in raw and k not in drop])
    return {k: raw[k] for k in [next(known) if k in model.model_fields else k for k in raw if k not in drop]}


def _dump(raw: dict, keep_bboxes: bool) -> tuple[str, int]:
    """(encoder string, bboxes stripped) of a validated caption: published key order, no `aspect_ratio`, no
    bbox unless kept."""
    top = _in_order(raw, Caption, drop=("aspect_ratio",))
    if "style_description" in top:
        top["style_description"] = _in_order(top["style_description"], StyleDescription)
    cd = top["compositional_deconstruction"] = _in_order(top["compositional_deconstruction"], CompositionalDeconstruction)
    drop = () if keep_bboxes else ("bbox",)
    cd["elements"] = [_in_order(el, TextElement if el["type"] == "text" else ObjElement, drop) for el in cd["elements"]]
    return serialise(top), sum("bbox" in el for el in raw["compositional_deconstruction"]["elements"]) if drop else 0


def prepare_caption(obj: Any, *, keep_bboxes: bool = False, strict: bool = False) -> str:
    """The encoder string for a caption: validated (errors raise `CaptionError`), keys in the published
    order (`_in_order`), top-level `aspect_ratio` and (unless `keep_bboxes`) every element's `bbox`
    dropped, serialised compactly. The input is not modified."""
    return _caption_prompt(obj, line=None, original="", keep_bboxes=keep_bboxes, strict=strict, where="", path=None).text


def bbox_notice(prompts: Iterable[Prompt]) -> str | None:
    """One line for a whole run saying how many bboxes were stripped (None when none were)."""
    counts = [p.bboxes_stripped for p in prompts if p.bboxes_stripped]
    if not counts:
        return None
    n, m = sum(counts), len(counts)
    return (f"stripped {n} element bbox{'es' if n > 1 else ''} from {m} caption{'s' if m > 1 else ''}, "
            "as the official pipeline does (--keep-bboxes keeps them)")


def wrap_plain_text(text: str) -> dict:
    """Plain text → the minimal schema-valid caption

        {"high_level_description": TEXT, "compositional_deconstruction": {"background": "", "elements": []}}

    TEXT is the prompt with surrounding whitespace removed (inner text untouched). Nothing is
    invented: no style block, no background, no elements.
    """
    return {
        "high_level_description": text.strip(),
        "compositional_deconstruction": {"background": "", "elements": []},
    }


def check_encodable(text: str, where: str = "", path: str | None = None) -> None:
    """Refuse a caption too long to tokenize quickly, or one that is not valid Unicode."""
    if len(text) > MAX_CAPTION_CHARS:
        raise InputError(f"{where}caption is {len(text)} characters; at most {MAX_CAPTION_CHARS} are tokenized "
                         f"(the text encoder takes {MAX_TEXT_TOKENS} tokens)", path=path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}contains an unpaired \\ud800-\\udfff surrogate escape; "
                         "expected valid Unicode text", path=path) from None


def _caption_prompt(obj: Any, *, line: int | None, original: str, keep_bboxes: bool, strict: bool,
                    where: str, path: str | None) -> Prompt:
    errors, warnings = check_caption(obj, check_bboxes=keep_bboxes, strict=strict)
    if errors:
        raise CaptionError(errors, warnings=warnings, where=where.rstrip(": ") or None, path=path)
    text, stripped = _dump(obj, keep_bboxes)
    check_encodable(text, where, path)
    return Prompt(text=text, source="json", line=line, warnings=warnings, original=original, bboxes_stripped=stripped)


def _text_prompt(text: str, *, line: int | None, where: str, path: str | None) -> Prompt:
    out = serialise(wrap_plain_text(text))
    check_encodable(out, where, path)
    return Prompt(text=out, source="text", line=line, warnings=[], original=text.strip())


def _raw_prompt(text: str, *, line: int | None, where: str, path: str | None) -> Prompt:
    check_encodable(text, where, path)
    return Prompt(text=text, source="raw", line=line, warnings=[], original=text)


# --- prompt files --------------------------------------------------------------------------------

_JSON_HINT = " (the file starts with '{' or '[', so it is read as JSON captions)"
_REFUSALS = {"missing": "prompt file not found", "unreadable": "cannot read prompt file: {why}",
             "folder": "prompt file is a directory, expected a text file",
             "special": "prompt file is not a regular file (a FIFO, socket or device); expected a text file"}


def _read_text(path: Path) -> str:
    f, size = open_regular(path, InputError, _REFUSALS)
    with f:
        if size > MAX_PROMPT_FILE_BYTES:
            raise InputError(f"prompt file is {size} bytes; at most {MAX_PROMPT_FILE_BYTES} are read "
                             "(split it into several files)", path=str(path))
        try:
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)
        except OSError as e:
            raise InputError(f"cannot read prompt file: {e.strerror or e}", path=str(path)) from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise InputError(f"prompt file is over {MAX_PROMPT_FILE_BYTES} bytes (split it into several files)",
                         path=str(path))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file is not UTF-8 text (bad byte at offset {e.start})", path=str(path)) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _skip_blank_and_comments(text: str, pos: int) -> int:
    n = len(text)
    while pos < n:
        c = text[pos]
        if c in " \t\n\f\v":
            pos += 1
        elif c == "#":
            nl = text.find("\n", pos)
            pos = n if nl < 0 else nl + 1
        else:
            break
    return pos


def _json_entries(text: str, start: int, path: str) -> list[tuple[Any, int, str]]:
    """(value, line, exact source text) for every caption in a JSON prompt file."""
    out: list[tuple[Any, int, str]] = []
    pos = start
    while True:
        pos = _skip_blank_and_comments(text, pos)
        if pos >= len(text):
            return out
        if text[pos] not in "{[":
            line, col = _line_col(text, pos)
            raise InputError(f"line {line} column {col}: expected a JSON caption object ('{{') or an array "
                             f"of them ('['), got {text[pos]!r}{_JSON_HINT}", path=path)
        value, end = _decode_at(text, pos, path=path, hint=_JSON_HINT)
        if isinstance(value, list):
            # positions of the items: walk the (already valid) array again
            ipos = pos + 1
            for i, item in enumerate(value):
                ipos = _skip_ws(text, ipos)
                _, iend = _DECODER.raw_decode(text, ipos)
                line, _ = _line_col(text, ipos)
                if not isinstance(item, dict):
                    raise InputError(f"line {line}: array item {i}: expected a JSON caption object, "
                                     f"got {_json_type(item)}", path=path)
                out.append((item, line, text[ipos:iend]))
                ipos = _skip_ws(text, iend) + 1  # past ','
        else:
            line, _ = _line_col(text, pos)
            out.append((value, line, text[pos:end]))
        pos = end


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def read_prompt_file(path: str | Path, *, raw: bool = False, keep_bboxes: bool = False, strict: bool = False,
                     text: str | None = None) -> list[Prompt]:
    """Read PROMPT_FILE into encoder-ready prompts (see module doc and docs/captions.md).

    The file is JSON if its first character that is not blank and not in a `#` comment line is `{`
    or `[`; otherwise it is plain text. JSON: every top-level value is a caption object or an array
    of them (so one pretty-printed object, JSON Lines and concatenated objects all work); each is
    validated (errors raise `CaptionError`; `strict` also refuses keys the spec lacks), reordered,
    stripped and serialised. Text: each non-blank,
    non-comment line is one prompt, wrapped by `wrap_plain_text`. `raw=True`: the same splitting,
    but each prompt is its exact source text (the JSON value as written, or the line without its
    newline), with no validation, wrapping or stripping. ``text``: the file's content, already read (stdin;
    ``path`` then only names it in errors).
    """
    where_path = str(path)
    text = _read_text(Path(path)) if text is None else text
    start = _skip_blank_and_comments(text, 0)
    prompts: list[Prompt] = []
    if start < len(text) and text[start] in "{[":
        for value, line, src in _json_entries(text, start, where_path):
            at = dict(line=line, where=f"line {line}: ", path=where_path)
            prompts.append(_raw_prompt(src, **at) if raw else _caption_prompt(value, original=src, keep_bboxes=keep_bboxes, strict=strict, **at))
    else:
        first_line: int | None = None
        for i, line_text in enumerate(text.split("\n"), start=1):
            if not line_text.strip() or line_text.lstrip().startswith("#"):
                continue
            if first_line is None:
                first_line = i
            if raw:
                prompts.append(_raw_prompt(line_text, line=i, where=f"line {i}: ", path=where_path))
                continue
            if line_text.lstrip().startswith("{"):
                raise InputError(
                    f"line {i}: starts with '{{' like a JSON caption, but this file is read as plain text "
                    f"because its first prompt (line {first_line}) is not JSON; keep JSON captions and "
                    "plain-text prompts in separate files", path=where_path)
            prompts.append(_text_prompt(line_text, line=i, where=f"line {i}: ", path=where_path))
    if not prompts:
        raise InputError("no prompt in file (it is empty or holds only blank lines and # comments)",
                         path=where_path)
    return prompts


prompts_from_file = read_prompt_file  # the same function under its older name


def prompt_from_string(text: str, *, raw: bool = False, keep_bboxes: bool = False, strict: bool = False) -> Prompt:
    """One prompt given directly (e.g. on the command line), by the same rules as one file entry:
    raw → untouched; starts with '{' → one JSON caption (validated, stripped, serialised);
    otherwise plain text (wrapped). Errors are prefixed "prompt: "."""
    if raw:
        return _raw_prompt(text, line=None, where="prompt: ", path=None)
    s = text.strip()
    if not s:
        raise InputError("prompt: empty prompt")
    if s.startswith("{"):
        value, end = _decode_at(s, 0, where_prefix="prompt: ", path=None, hint="")
        if s[end:].strip():
            line, col = _line_col(s, _skip_ws(s, end))
            raise InputError(f"prompt: line {line} column {col}: invalid JSON: extra data after the caption")
        return _caption_prompt(value, line=None, original=s, keep_bboxes=keep_bboxes, strict=strict,
                               where="prompt: ", path=None)
    return _text_prompt(s, line=None, where="prompt: ", path=None)


# --- display -------------------------------------------------------------------------------------


def caption_summary(prompt_text: str, max_len: int = 120) -> str:
    """A short single-line description of a prompt, for progress display and PNG metadata.

    For a JSON caption: its high_level_description, else its background, else the first element's
    text/desc; for anything else the text itself. Whitespace runs become one space; longer than
    `max_len` characters is cut and ends with "…".
    """
    s = prompt_text
    try:
        obj = json.loads(prompt_text)
    except (ValueError, TypeError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        cands: list[Any] = [obj.get("high_level_description")]
        cd = obj.get("compositional_deconstruction")
        if isinstance(cd, dict):
            cands.append(cd.get("background"))
            els = cd.get("elements")
            if isinstance(els, list):
                for el in els:
                    if isinstance(el, dict):
                        cands += [el.get("text"), el.get("desc")]
        s = next((c for c in cands if isinstance(c, str) and c.strip()), prompt_text)
    s = " ".join(s.split())
    if max_len < 1:
        return ""
    if len(s) > max_len:
        s = s[: max_len - 1].rstrip() + "…"
    return s
