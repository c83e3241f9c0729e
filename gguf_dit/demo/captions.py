"""Captions for the 128×128 demo (issue 13): many ways to ask for a ``scene.Scene``, and a held-out split.

A caption is plain text (``run`` wraps it: ``encoder_string``) or an Ideogram-style JSON caption in the published
schema (``runtime/caption.py``). Plain text comes from ``SINGLE`` / ``TWO`` sentence patterns filled with a noun
phrase (``NP_FORMS``: article, optional size, colour, shape) and a place phrase per object, an optional background
phrase (``BG_FORMS``, placed after, before or as its own sentence), optional filler words, then a random case and
ending. Every attribute value has synonyms (``SHAPE_WORDS`` ...; the first is the canonical one).

``Split.from_seed(seed)`` holds out, deterministically: a fifth of the sentence patterns, one noun-phrase form, a
filler, two background forms, one non-canonical synonym of every value that has three or more (never a phrase
that a kept phrase or pattern contains, so a held-out phrase is absent from every training caption), and
attribute combinations: 20 (shape, colour, place) triples and 2 (object colour, background) pairs.

``pairs("train" | "test" | "language", n, seed)`` gives (caption, scene) pairs:
* train: kept patterns and synonyms only, no held-out combination in any object; sizes named 80 % of the time;
* test: every caption uses a held-out sentence pattern and at least one held-out synonym (other forms: any), and
  every scene holds a held-out combination; sizes always named (so scored); plain text 80 %, JSON 20 %;
* language: kept patterns with *every* synonym, held-out ones included, and every combination: a text-only
  paraphrase corpus a text encoder may learn words from, as a real LLM knows words the image model never saw.
  The DiT must never train on it.
``scene.background`` is the default grey when a caption names none; an object's size is None when unnamed.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from .data import COLOURS
from .scene import BACKGROUNDS, DEFAULT_BACKGROUND, PAIRS, POSITIONS, SHAPES, SIZES, Obj, Scene

SHAPE_WORDS = {
    "circle": ["circle", "disc", "round shape", "circular shape", "dot"],
    "square": ["square", "box", "square shape", "block"],
    "triangle": ["triangle", "triangular shape", "three-sided shape", "wedge"],
}
COLOUR_WORDS = {  # object and background colours share words
    "red": ["red", "crimson", "scarlet"], "green": ["green", "emerald", "grass-green"], "blue": ["blue", "cobalt", "royal blue"],
    "yellow": ["yellow", "golden", "lemon-yellow"], "white": ["white", "snow-white", "ivory"],
    "grey": ["dark grey", "dark gray", "charcoal", "slate"], "purple": ["purple", "violet", "plum"],
}
POSITION_WORDS = {
    "left": ["on the left", "to the left", "on the left side", "on the left-hand side", "at the left"],
    "right": ["on the right", "to the right", "on the right side", "on the right-hand side", "at the right"],
    "top": ["at the top", "near the top", "at the top edge", "in the upper part", "up top"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom edge", "in the lower part", "down low"],
    "centre": ["in the centre", "in the center", "in the middle", "at the centre", "dead centre"],
    "top left": ["in the top left corner", "in the upper left corner", "at the top left", "in the top-left corner", "upper left"],
    "top right": ["in the top right corner", "in the upper right corner", "at the top right", "in the top-right corner", "upper right"],
    "bottom left": ["in the bottom left corner", "in the lower left corner", "at the bottom left", "in the bottom-left corner", "lower left"],
    "bottom right": ["in the bottom right corner", "in the lower right corner", "at the bottom right", "in the bottom-right corner", "lower right"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
NP_FORMS = ["{art} {size}{colour} {shape}", "{art} {size}{shape} in {colour}", "{art} {size}{colour} coloured {shape}", "{art} {size}{colour}-colored {shape}"]
ARTICLES = ["a", "one", "a single"]
SINGLE = [
    "{np} {where}", "{np}, {where}", "{where}, {np}", "{where} there is {np}", "{where} is {np}", "{where} we see {np}",
    "{where} sits {np}", "there is {np} {where}", "there's {np} {where}", "we see {np} {where}", "you can see {np} {where}",
    "{np} placed {where}", "{np} positioned {where}", "{np} located {where}", "{np} sitting {where}", "{np} drawn {where}",
    "{np} shown {where}", "{np} that is {where}", "{np} which sits {where}", "{np} is {where}", "{np} appears {where}",
    "{np} can be seen {where}", "paint {np} {where}", "render {np} {where}", "show {np} {where}", "make {np} {where}",
    "create {np} {where}", "generate {np} {where}", "put {np} {where}", "place {np} {where}", "I want {np} {where}",
    "I'd like {np} {where}", "can you draw {np} {where}?", "could you paint {np} {where}?", "an illustration of {np} {where}",
    "a scene with {np} {where}", "a simple graphic with {np} {where}", "an icon showing {np} {where}", "just {np} {where}",
    "only {np} {where}", "here is {np} {where}", "{where}: {np}", "one shape: {np} {where}", "a flat image, {np} {where}",
    "{np} drawn flat {where}", "somewhere {where}, {np}",
]
TWO = [
    "{np1} {where1} and {np2} {where2}", "{np1} {where1}, {np2} {where2}", "{np1} {where1}; {np2} {where2}",
    "{np1} {where1}, and {np2} {where2}", "{np1} {where1} with {np2} {where2}", "{np1} {where1} plus {np2} {where2}",
    "{np1} {where1} as well as {np2} {where2}", "{where1} {np1}, {where2} {np2}", "{where1}, {np1}; {where2}, {np2}",
    "{where1} there is {np1} and {where2} there is {np2}", "there is {np1} {where1} and {np2} {where2}",
    "two shapes: {np1} {where1} and {np2} {where2}", "{np1} {where1}. {np2} {where2}",
    "{np1} sits {where1} while {np2} sits {where2}", "{np1} {where1} and also {np2} {where2}",
    "both {np1} {where1} and {np2} {where2}", "I want {np1} {where1} and {np2} {where2}", "{np1} is {where1} and {np2} is {where2}",
]
FILLERS = ["please draw ", "draw ", "a picture of ", "an image of ", "please show ", "a drawing of ", "give me ", "I need "]
BG_FORMS = [  # "of a ..." follows a place phrase ("on the left side of a white background")
    "on a {bg} background", "against a {bg} background", "against {bg}", "on {bg}", "with a {bg} background",
    "over a {bg} backdrop", "on a plain {bg} background", "in front of a {bg} background", "on a solid {bg} background",
    "set against {bg}", "of a {bg} background",
]
BG_SENTENCES = ["The background is {bg}.", "Background: {bg}.", "{Bg} background."]
HEX = {c: "#%02X%02X%02X" % rgb for c, rgb in COLOURS.items()}
BG_HEX = {c: "#%02X%02X%02X" % rgb for c, rgb in BACKGROUNDS.items()}
_VERBS = (" is ", " sits ", " appears ", " can be seen ", " which ", " that ")  # no filler ("please draw") before a clause
_AN = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")
_OF_PLACES = ("side", "corner", "top", "bottom", "middle", "centre", "center", "edge", "part")


@dataclass(frozen=True)
class Split:
    seed: int
    single: frozenset[int]  # held-out indices into SINGLE
    two: frozenset[int]
    np_forms: frozenset[int]
    fillers: frozenset[int]
    bg_forms: frozenset[int]
    words: frozenset[str]  # held-out synonym phrases (any attribute)
    triples: frozenset[tuple[str, str, str]]  # held-out (shape, colour, position)
    colour_bg: frozenset[tuple[str, str]]  # held-out (object colour, background)

    @classmethod
    def from_seed(cls, seed: int = 0) -> "Split":
        rng = np.random.default_rng([13, seed])
        pick = lambda n, k, keep0=True: frozenset(int(i) + keep0 for i in rng.choice(n - keep0, k, replace=False))
        single, two, np_forms = pick(len(SINGLE), len(SINGLE) // 5), pick(len(TWO), len(TWO) // 5), pick(len(NP_FORMS), 1)
        fillers, bg_forms = pick(len(FILLERS), 1), pick(len(BG_FORMS) - 1, 2)  # "of a ... background" stays in training
        # A held-out phrase must not occur inside anything training keeps (a kept phrase, pattern or form).
        groups = [ws for table in (SHAPE_WORDS, COLOUR_WORDS, POSITION_WORDS, SIZE_WORDS) for ws in table.values()]
        held = {ws[1 + int(rng.integers(len(ws) - 1))] for ws in groups if len(ws) >= 3}
        for _ in range(3):
            kept = [w for ws in groups for w in ws if w not in held] + SINGLE + TWO + NP_FORMS + FILLERS + BG_FORMS + BG_SENTENCES
            held = {w for w in held if not any(w in k for k in kept)}
        triples = _hold_triples(rng)
        pairs = [(c, b) for c in COLOURS for b in BACKGROUNDS if c != b and b != DEFAULT_BACKGROUND]
        colour_bg = frozenset(pairs[int(i)] for i in rng.choice(len(pairs), 2, replace=False))
        return cls(seed, single, two, np_forms, fillers, bg_forms, frozenset(held), triples, colour_bg)

    def held_out_scene(self, s: Scene) -> bool:
        return any((o.shape, o.colour, o.position) in self.triples or (o.colour, s.background) in self.colour_bg for o in s.objects)


def _hold_triples(rng, n: int = 20) -> frozenset:
    """n (shape, colour, position) triples such that every pair of their values is still seen in training."""
    allt = list(itertools.product(SHAPES, COLOURS, POSITIONS))
    held: list = []
    for i in rng.permutation(len(allt)):
        cand = held + [allt[int(i)]]
        kept = [t for t in allt if t not in cand]
        if all({p for t in kept for p in [(t[a], t[b])]} >= {(t[a], t[b]) for t in allt} for a, b in ((0, 1), (0, 2), (1, 2))):
            held = cand
        if len(held) == n:
            break
    return frozenset(held)


SPLIT = Split.from_seed(0)


def _choose(rng, items):
    return items[int(rng.integers(len(items)))]


class _Writer:
    """Draws captions for one part of a split."""

    def __init__(self, split: Split, part: str, rng: np.random.Generator):
        assert part in ("train", "test", "language")
        self.s, self.part, self.rng = split, part, rng
        self.used_held = False

    def idx(self, n: int, held: frozenset[int], pattern: bool = False) -> int:
        """Training and the language corpus never use a held-out form; test captions always use a held-out
        sentence pattern (``pattern``) and any of the other forms."""
        if self.part == "test":
            return _choose(self.rng, sorted(held) if pattern else range(n))
        return _choose(self.rng, [i for i in range(n) if i not in held])

    def word(self, table: dict, key: str) -> str:
        ws = table[key]
        held = [w for w in ws if w in self.s.words]
        if self.part == "train":
            return _choose(self.rng, [w for w in ws if w not in held])
        if self.part == "test" and held and self.rng.random() < 0.6:
            self.used_held = True
            return held[0]
        w = _choose(self.rng, ws)
        self.used_held |= w in held
        return w

    def np(self, o: Obj, form: int | None = None) -> str:
        f = NP_FORMS[self.idx(len(NP_FORMS), self.s.np_forms) if form is None else form]
        size = self.word(SIZE_WORDS, o.size) + " " if o.size else ""
        return f.format(art=_choose(self.rng, ARTICLES), size=size, colour=self.word(COLOUR_WORDS, o.colour), shape=self.word(SHAPE_WORDS, o.shape))

    def plain(self, scene: Scene, bg_named: bool) -> str:
        rng = self.rng
        objs = scene.objects
        wheres = [self.word(POSITION_WORDS, o.position) for o in objs]
        if len(objs) == 1:
            tmpl = SINGLE[self.idx(len(SINGLE), self.s.single, True)]
            text = tmpl.format(np=self.np(objs[0]), where=wheres[0])
        else:
            tmpl = TWO[self.idx(len(TWO), self.s.two, True)]
            text = tmpl.format(np1=self.np(objs[0]), where1=wheres[0], np2=self.np(objs[1]), where2=wheres[1])
        if tmpl.startswith("{np") and not any(v in tmpl for v in _VERBS) and rng.random() < 0.3:
            text = FILLERS[self.idx(len(FILLERS), self.s.fillers)] + text
        question = text.endswith("?")
        text = text.rstrip("?")
        if bg_named:
            bg = self.word(COLOUR_WORDS, scene.background)
            form = BG_FORMS[self.idx(len(BG_FORMS), self.s.bg_forms)]
            how = rng.random()
            if form.startswith("of ") and not (tmpl.endswith("{where}") or tmpl.endswith("{where2}")) or form.startswith("of ") and not wheres[-1].endswith(_OF_PLACES):
                form = "on a {bg} background"
            if form.startswith("of ") or how < 0.45:
                text = f"{text} {form.format(bg=bg)}"
            elif how < 0.65:
                text = f"{text}, {form.format(bg=bg)}"
            elif how < 0.85 and not form.startswith(("with", "set", "of")):
                text = f"{form.format(bg=bg)}, {text}"
            else:
                sent = _choose(rng, BG_SENTENCES).format(bg=bg, Bg=bg[0].upper() + bg[1:])
                text = f"{text}. {sent}" if rng.random() < 0.5 else f"{sent} {text[0].upper()}{text[1:]}"
        text = _AN.sub(r"\1n ", text)
        end = "?" if question else _choose(rng, [".", ".", "", "!"])
        if not text.endswith("."):
            text += end
        case = rng.random()
        if case < 0.5:
            text = text[0].upper() + text[1:]
        elif case < 0.85:
            text = text.lower()
        elif case < 0.93:
            text = text.upper()
        else:
            text = text.title()
        return text

    def json(self, scene: Scene, bg_named: bool) -> dict:
        rng = self.rng
        cap: dict = {}
        cap["high_level_description"] = self.plain(scene, bg_named)  # recommended by the spec: always written
        if rng.random() < 0.4:
            style = {"aesthetics": _choose(rng, ["minimal", "clean and flat", "simple geometric"]),
                     "medium": _choose(rng, ["digital illustration", "vector graphic", "flat graphic"]),
                     "art_style": _choose(rng, ["flat geometric shapes", "minimalist", "flat design"])}
            if rng.random() < 0.5:
                style["color_palette"] = [HEX[o.colour] for o in scene.objects] + [BG_HEX[scene.background]]
            cap["style_description"] = {k: v for k, v in style.items() if k in ("medium", "art_style") or rng.random() < 0.6}  # the spec asks for both
        if bg_named:
            bg = self.word(COLOUR_WORDS, scene.background)
            background = _choose(rng, [f"Plain {bg} background.", f"A solid {bg} background.", f"{bg[0].upper()}{bg[1:]}.", f"Flat {bg} backdrop."])
        else:
            background = _choose(rng, ["", "Plain background.", "A plain, empty background."])
        elements = []
        for o in scene.objects:
            np_ = self.np(o)
            el = {"type": "obj", "desc": _AN.sub(r"\1n ", f"{np_[0].upper()}{np_[1:]} {self.word(POSITION_WORDS, o.position)}.")}
            if rng.random() < 0.3:  # run strips bboxes (as the official pipeline), so they never reach the encoder
                cx, cy = POSITIONS[o.position]
                el["bbox"] = [int((cy - 22) * 1000 / 128), int((cx - 22) * 1000 / 128), int((cy + 22) * 1000 / 128), int((cx + 22) * 1000 / 128)]
            if rng.random() < 0.3:
                el["color_palette"] = [HEX[o.colour]]
            elements.append(el)
        cap["compositional_deconstruction"] = {"background": background, "elements": elements}
        return cap


def _scene(split: Split, part: str, rng: np.random.Generator) -> tuple[Scene, bool]:
    """A random scene for ``part`` and whether its caption names the background."""
    for _ in range(1000):
        bg_named = rng.random() < 0.75
        bg = _choose(rng, list(BACKGROUNDS)) if bg_named else DEFAULT_BACKGROUND
        places = [_choose(rng, list(POSITIONS))] if rng.random() < 0.5 else list(_choose(rng, PAIRS))[::_choose(rng, [1, -1])]
        named = part == "test" or rng.random() < 0.8
        objs = tuple(Obj(_choose(rng, SHAPES), _choose(rng, [c for c in COLOURS if c != bg]), p,
                         _choose(rng, list(SIZES)) if named else None) for p in places)
        s = Scene(objs, bg)
        if part == "test" and not split.held_out_scene(s):
            continue
        if part == "train" and split.held_out_scene(s):
            continue
        return s, bg_named
    raise AssertionError("no scene")


def pairs(part: str, n: int, seed: int, split: Split = SPLIT, json_share: float | None = None) -> list[tuple[str | dict, Scene]]:
    """n (caption, scene) pairs of ``part`` ("train", "test" or "language"), deterministic in (split, seed).
    ``json_share``: share of JSON captions (default 0.3 for train and language, 0.2 for test)."""
    rng = np.random.default_rng([13, split.seed, seed, ("train", "test", "language").index(part)])
    share = json_share if json_share is not None else (0.2 if part == "test" else 0.3)
    out = []
    while len(out) < n:
        scene, bg_named = _scene(split, part, rng)
        w = _Writer(split, part, rng)
        cap = w.json(scene, bg_named) if rng.random() < share else w.plain(scene, bg_named)
        if part == "test" and not w.used_held:
            continue  # every test caption carries a held-out synonym
        out.append((cap, scene))
    return out


def encoder_string(caption: str | dict) -> str:
    """The exact string the text encoder sees for a caption, as ``gguf-dit run`` builds it (plain text wrapped)."""
    from gguf_dit.runtime.caption import prepare_caption, prompt_from_string

    return prepare_caption(caption) if isinstance(caption, dict) else prompt_from_string(caption).text


def caption_text(caption: str | dict) -> str:
    """One line for galleries and reports: the plain text, or the JSON caption serialised."""
    import json

    return caption if isinstance(caption, str) else json.dumps(caption, ensure_ascii=False)


_PHRASES = sorted(((w, attr, v) for attr, table in (("shape", SHAPE_WORDS), ("colour", COLOUR_WORDS), ("position", POSITION_WORDS), ("size", SIZE_WORDS))
                   for v, ws in table.items() for w in ws), key=lambda p: -len(p[0]))
_LOOKUP = {w: (attr, v) for w, attr, v in _PHRASES}
_PHRASE_RE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w, _, _ in _PHRASES) + r")(?![\w])")
_COLOUR_TO_SHAPE = ("", " ", " coloured ", "-colored ")  # what may stand between an object's colour and its shape


def read(caption: str | dict) -> Scene | None:
    """The scene a caption in this module's vocabulary asks for (a JSON caption: its ``high_level_description``),
    or None when it is not one: every object is a shape word with its colour just before it ("red circle", "red
    coloured circle", "red-colored circle") or after it ("circle in red"), an optional size word before that, and
    one place phrase, places in the same order as the objects; a colour word outside every object is the
    background (default grey). The inverse of ``pairs``' writer; a prompt written otherwise may be misread."""
    if isinstance(caption, dict):
        caption = caption.get("high_level_description")
        if not isinstance(caption, str):
            return None
    text = caption.lower()
    toks = [(m.start(), m.end(), *_LOOKUP[m.group(1)]) for m in _PHRASE_RE.finditer(text)]
    used: set[int] = set()
    objs: list[dict] = []
    for i, (s0, _, attr, value) in enumerate(toks):
        if attr != "shape":
            continue
        o = {"shape": value}
        k = i - 1
        if k >= 0 and toks[k][2] == "colour" and text[toks[k][1]:s0] in _COLOUR_TO_SHAPE:
            o["colour"], used = toks[k][3], used | {k}
        elif i + 1 < len(toks) and toks[i + 1][2] == "colour" and text[toks[i][1]:toks[i + 1][0]] == " in ":
            o["colour"], used = toks[i + 1][3], used | {i + 1}
            k = i
        else:
            return None
        j = k - 1 if k < i else i - 1
        if j >= 0 and toks[j][2] == "size" and text[toks[j][1]:toks[j + 1][0]] == " ":
            o["size"], used = toks[j][3], used | {j}
        objs.append(o)
        used.add(i)
    places = [t[3] for t in toks if t[2] == "position"]
    rest = [t for i, t in enumerate(toks) if i not in used and t[2] != "position"]
    if not 1 <= len(objs) <= 2 or len(places) != len(objs) or any(t[2] != "colour" for t in rest) or len({t[3] for t in rest}) > 1:
        return None
    try:
        return Scene(tuple(Obj(o["shape"], o["colour"], p, o.get("size")) for o, p in zip(objs, places)),
                     rest[0][3] if rest else DEFAULT_BACKGROUND)
    except ValueError:
        return None
