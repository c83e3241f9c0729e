"""Ideogram 4 prompts: read prompt files, validate JSON captions, wrap plain text, serialise.

Ideogram 4 was trained on structured JSON captions (model reference §12). This module turns what a
user gives us into the exact string the text encoder sees (the `{caption}` of the §11.2 chat
template). Pure Python (json, re, dataclasses); no model, no tokenizer. The full rules, with example
messages, are in docs/captions.md. In short:

* a prompt file holds JSON captions (one object, pretty-printed or not; JSON Lines; a JSON array of
  objects; or several of those in a row) or plain text (one prompt per non-blank line); lines whose
  first non-blank character is `#` are comments (in JSON files only between captions);
* a JSON caption is checked against the published spec: structural problems the model cannot
  sensibly consume are errors (`CaptionError`, an `InputError`: exit code 2); softer deviations are
  warnings (`Prompt.warnings`);
* `aspect_ratio` and (by default) every element's `bbox` are stripped, as the official pipeline
  does, and the caption is serialised compactly with non-ASCII kept literal;
* plain text is wrapped as `{"high_level_description":TEXT,"compositional_deconstruction":
  {"background":"","elements":[]}}`;
* raw mode passes each prompt's source text through untouched.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf_dit.arch.text_encoder import MAX_TOKENS as MAX_TEXT_TOKENS  # counting tokens needs the tokenizer: the encoder enforces it
from gguf_dit.errors import InputError
from gguf_dit.files import json_type, open_regular, show

__all__ = [
    "Prompt",
    "CaptionError",
    "read_prompt_file",
    "prompts_from_file",
    "prompt_from_string",
    "check_caption",
    "validate_caption",
    "prepare_caption",
    "wrap_plain_text",
    "check_encodable",
    "serialise",
    "caption_summary",
    "MAX_TEXT_TOKENS",
    "MAX_CAPTION_CHARS",
    "MAX_PROMPT_FILE_BYTES",
    "PLAIN_TEXT_NOTE",
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

# --- the published caption spec (§12) ------------------------------------------------------------

TOP_KEYS = ("high_level_description", "style_description", "compositional_deconstruction")
#: Accepted at the top level (the magic prompt emits it first) and always stripped.
STRIPPED_TOP_KEYS = ("aspect_ratio",)
STYLE_KEYS_PHOTO = ("aesthetics", "lighting", "photo", "medium", "color_palette")
STYLE_KEYS_ART = ("aesthetics", "lighting", "medium", "art_style", "color_palette")
STYLE_KEYS_ALL = ("aesthetics", "lighting", "photo", "medium", "art_style", "color_palette")
CD_KEYS = ("background", "elements")
ELEMENT_KEYS_OBJ = ("type", "bbox", "desc", "color_palette")
ELEMENT_KEYS_TEXT = ("type", "bbox", "text", "desc", "color_palette")
ELEMENT_TYPES = ("obj", "text")

STYLE_PALETTE_MAX = 16
ELEMENT_PALETTE_MAX = 5
BBOX_MIN, BBOX_MAX = 0, 1000
HIGH_LEVEL_MAX_WORDS = 50
DESC_MAX_WORDS = 60
_MAX_REPORTED_ERRORS = 10

_HEX_RE = re.compile(r"#[0-9A-Fa-f]{6}")


@dataclass
class Prompt:
    """One prompt, ready for the text encoder."""

    text: str  #: the exact string given to the encoder (the `{caption}` of the chat template)
    source: str  #: "json" (a validated JSON caption), "text" (wrapped plain text) or "raw" (untouched)
    line: int | None  #: 1-based line in the prompt file where this prompt starts; None if not from a file
    warnings: list[str] = field(default_factory=list)  #: soft spec deviations, one line each
    original: str = ""  #: the prompt's source text as written (a JSON value's exact text, or the line)


class CaptionError(InputError, ValueError):
    """A JSON caption breaks the spec in a way the model cannot sensibly consume.

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


class _Checker:
    def __init__(self, check_bboxes: bool):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.check_bboxes = check_bboxes

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path or '(root)'}: {msg}")

    def warn(self, path: str, msg: str) -> None:
        self.warnings.append(f"{path or '(root)'}: {msg}")

    # generic pieces

    def object_keys(self, obj: dict, path: str, allowed: tuple[str, ...], order: tuple[str, ...] | None,
                    *, also_allowed: tuple[str, ...] = (), allowed_note: str = "") -> None:
        """Duplicate keys, unknown keys, then the order of the known keys (a subsequence of `order`)."""
        for k in getattr(obj, "duplicate_keys", ()):
            self.err(path, f"duplicate key {_show(k)}; expected each key once")
        unknown = [k for k in obj if k not in allowed and k not in also_allowed]
        for k in unknown:
            self.err(path, f"unknown key {_show(k)}; allowed keys: {', '.join(allowed)}{allowed_note}")
        if order is None:
            return
        present = [k for k in obj if k in order]
        expected = [k for k in order if k in present]
        if present != expected:
            self.err(path, f"keys out of order: got {', '.join(present)}; expected {', '.join(expected)}")

    def string(self, obj: dict, key: str, path: str, *, required: bool = False) -> str | None:
        if key not in obj:
            if required:
                self.err(path, f"missing required key {_show(key)}")
            return None
        v = obj[key]
        if not isinstance(v, str):
            self.err(_p(path, key), f"expected a string, got {_json_type(v)}")
            return None
        return v

    def words(self, text: str | None, path: str, limit: int, what: str) -> None:
        if text is None:
            return
        n = len(text.split())
        if n > limit:
            self.warn(path, f"{n} words; the spec asks for {what} of at most about {limit} words")

    def palette(self, obj: dict, path: str, limit: int) -> None:
        if "color_palette" not in obj:
            return
        pp = _p(path, "color_palette")
        pal = obj["color_palette"]
        if not isinstance(pal, list):
            self.err(pp, f"expected an array of '#RRGGBB' strings, got {_json_type(pal)}")
            return
        if len(pal) > limit:
            self.warn(pp, f"{len(pal)} colours; expected at most {limit}")
        for i, c in enumerate(pal):
            cp = f"{pp}[{i}]"
            if not isinstance(c, str):
                self.err(cp, f"expected a '#RRGGBB' string, got {_json_type(c)}")
            elif not _HEX_RE.fullmatch(c):
                self.warn(cp, f"{_show(c)} is not a colour of the form '#RRGGBB' (uppercase hex)")
            elif c != c.upper():
                self.warn(cp, f"{_show(c)} is lowercase; expected uppercase '#RRGGBB' ({_show(c.upper())})")

    # levels

    def caption(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.err("", f"expected a JSON object (a caption), got {_json_type(obj)}")
            return
        self.object_keys(obj, "", TOP_KEYS, TOP_KEYS, also_allowed=STRIPPED_TOP_KEYS)
        if "high_level_description" in obj:
            hld = self.string(obj, "high_level_description", "")
            self.words(hld, "high_level_description", HIGH_LEVEL_MAX_WORDS, "a high-level description")
        else:
            self.warn("", "no \"high_level_description\"; the spec recommends one (a short summary, "
                          f"at most about {HIGH_LEVEL_MAX_WORDS} words) as the first key")
        if "style_description" in obj:
            self.style(obj["style_description"], "style_description")
        if "compositional_deconstruction" in obj:
            self.composition(obj["compositional_deconstruction"], "compositional_deconstruction")
        else:
            self.err("", "missing required key \"compositional_deconstruction\" "
                         "(an object with \"background\" and \"elements\")")

    def style(self, sd: Any, path: str) -> None:
        if not isinstance(sd, dict):
            self.err(path, f"expected an object, got {_json_type(sd)}")
            return
        has_photo = "photo" in sd
        order = (STYLE_KEYS_PHOTO if has_photo else STYLE_KEYS_ART) if has_photo != ("art_style" in sd) else None
        if order is None:
            both = "both \"photo\" and" if has_photo else "neither \"photo\" nor"
            self.err(path, f"has {both} \"art_style\"; expected exactly one (\"photo\" for photographs, \"art_style\" otherwise)")
        self.object_keys(obj=sd, path=path, allowed=STYLE_KEYS_ALL, order=order)
        for k in ("aesthetics", "lighting", "photo", "medium", "art_style"):
            self.string(sd, k, path)
        if "medium" not in sd:
            self.warn(path, "no \"medium\"; the spec asks for one whenever style_description is given")
        self.palette(sd, path, STYLE_PALETTE_MAX)

    def composition(self, cd: Any, path: str) -> None:
        if not isinstance(cd, dict):
            self.err(path, f"expected an object with \"background\" and \"elements\", got {_json_type(cd)}")
            return
        self.object_keys(cd, path, CD_KEYS, CD_KEYS)
        self.string(cd, "background", path, required=True)
        if "elements" not in cd:
            self.err(path, "missing required key \"elements\" (an array, possibly empty)")
            return
        els = cd["elements"]
        ep = _p(path, "elements")
        if not isinstance(els, list):
            self.err(ep, f"expected an array of element objects, got {_json_type(els)}")
            return
        for i, el in enumerate(els):
            self.element(el, f"{ep}[{i}]")

    def element(self, el: Any, path: str) -> None:
        if not isinstance(el, dict):
            self.err(path, f"expected an element object, got {_json_type(el)}")
            return
        kind = el.get("type")
        if kind not in ELEMENT_TYPES:
            if "type" not in el:
                self.err(path, "missing required key \"type\" (\"obj\" or \"text\")")
            else:
                self.err(_p(path, "type"), f"expected \"obj\" or \"text\", got {_show(kind)}")
            self.object_keys(el, path, ELEMENT_KEYS_TEXT, None)
            return
        keys = ELEMENT_KEYS_TEXT if kind == "text" else ELEMENT_KEYS_OBJ
        note = " (a \"text\" key needs \"type\": \"text\")" if kind == "obj" and "text" in el else ""
        self.object_keys(el, path, keys, keys, allowed_note=note)
        if kind == "text":
            t = self.string(el, "text", path, required=True)
            if t is not None and not t.strip():
                self.warn(_p(path, "text"), "empty; expected the literal words to render")
        if "desc" in el:
            self.words(self.string(el, "desc", path), _p(path, "desc"), DESC_MAX_WORDS, "an element description")
        else:
            self.warn(path, "no \"desc\"; the spec asks for a description of every element")
        if "bbox" in el:
            self.bbox(el["bbox"], _p(path, "bbox"))
        self.palette(el, path, ELEMENT_PALETTE_MAX)

    def bbox(self, b: Any, path: str) -> None:
        shape = "an array of 4 integers [y_min, x_min, y_max, x_max]"
        if not isinstance(b, list) or len(b) != 4:
            got = f"{len(b)} values" if isinstance(b, list) else _json_type(b)
            self.err(path, f"expected {shape}, got {got}")
            return
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in b):
            self.err(path, f"expected {shape}, got {_show(b)}")
            return
        if not self.check_bboxes:
            return
        non_int = [v for v in b if isinstance(v, float) and not v.is_integer()]
        if non_int:
            self.warn(path, f"{_show(b)} has non-integer values; expected integers in {BBOX_MIN}..{BBOX_MAX}")
        out = [v for v in b if not BBOX_MIN <= v <= BBOX_MAX]
        if out:
            self.warn(path, f"{_show(b)} has values outside {BBOX_MIN}..{BBOX_MAX} "
                            f"({', '.join(_show(v) for v in out)}); expected [y_min, x_min, y_max, x_max] "
                            f"on a {BBOX_MAX}x{BBOX_MAX} grid, origin top-left")
        y0, x0, y1, x1 = b
        if y0 > y1:
            self.warn(path, f"y_min {_show(y0)} > y_max {_show(y1)}; expected [y_min, x_min, y_max, x_max]")
        if x0 > x1:
            self.warn(path, f"x_min {_show(x0)} > x_max {_show(x1)}; expected [y_min, x_min, y_max, x_max]")


def check_caption(obj: Any, *, check_bboxes: bool = True) -> tuple[list[str], list[str]]:
    """Check a parsed caption against the spec; return (errors, warnings), raising nothing.

    `check_bboxes=False` skips the bbox *value* warnings (range, order, integers) — used when the
    bboxes are about to be stripped anyway; a bbox that is not an array of 4 numbers is still an error.
    """
    c = _Checker(check_bboxes)
    c.caption(obj)
    return c.errors, c.warnings


def validate_caption(obj: Any, *, strict: bool = True, check_bboxes: bool = True) -> list[str]:
    """Validate a parsed JSON caption; return its warnings.

    strict=True (default): any error raises `CaptionError` (an `InputError`) listing all errors.
    strict=False: errors are returned too, first, each prefixed "error: ".
    """
    errors, warnings = check_caption(obj, check_bboxes=check_bboxes)
    if errors and strict:
        raise CaptionError(errors, warnings=warnings)
    return [f"error: {e}" for e in errors] + warnings


# --- preparation ---------------------------------------------------------------------------------


def serialise(obj: Any) -> str:
    """Compact JSON, `,`/`:` separators, non-ASCII literal (§12), key order as given."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def prepare_caption(obj: dict, *, keep_bboxes: bool = False) -> str:
    """The encoder string for a caption: drop top-level `aspect_ratio` and, unless `keep_bboxes`,
    every element's `bbox`; serialise compactly. The input is not modified."""
    obj = copy.deepcopy(obj)
    if isinstance(obj, dict):
        for k in STRIPPED_TOP_KEYS:
            obj.pop(k, None)
        cd = obj.get("compositional_deconstruction")
        if not keep_bboxes and isinstance(cd, dict) and isinstance(cd.get("elements"), list):
            for el in cd["elements"]:
                if isinstance(el, dict):
                    el.pop("bbox", None)
    return serialise(obj)


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


def _caption_prompt(obj: Any, *, line: int | None, original: str, keep_bboxes: bool,
                    where: str, path: str | None) -> Prompt:
    errors, warnings = check_caption(obj, check_bboxes=keep_bboxes)
    if errors:
        raise CaptionError(errors, warnings=warnings, where=where.rstrip(": ") or None, path=path)
    text = prepare_caption(obj, keep_bboxes=keep_bboxes)
    check_encodable(text, where, path)
    return Prompt(text=text, source="json", line=line, warnings=warnings, original=original)


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


def read_prompt_file(path: str | Path, *, raw: bool = False, keep_bboxes: bool = False, text: str | None = None) -> list[Prompt]:
    """Read PROMPT_FILE into encoder-ready prompts (see module doc and docs/captions.md).

    The file is JSON if its first character that is not blank and not in a `#` comment line is `{`
    or `[`; otherwise it is plain text. JSON: every top-level value is a caption object or an array
    of them (so one pretty-printed object, JSON Lines and concatenated objects all work); each is
    validated (errors raise `CaptionError`), stripped and serialised. Text: each non-blank,
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
            prompts.append(_raw_prompt(src, **at) if raw else _caption_prompt(value, original=src, keep_bboxes=keep_bboxes, **at))
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


def prompt_from_string(text: str, *, raw: bool = False, keep_bboxes: bool = False) -> Prompt:
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
        return _caption_prompt(value, line=None, original=s, keep_bboxes=keep_bboxes, where="prompt: ", path=None)
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
