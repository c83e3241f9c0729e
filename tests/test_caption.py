"""Prompt files and JSON captions (runtime/caption.py, docs/captions.md). Pure Python, fast."""

from __future__ import annotations

import copy
import json

import pytest

from gguf_dit.errors import GgufDitError, InputError
from gguf_dit.runtime.caption import (
    Caption,
    CaptionError,
    Prompt,
    bbox_notice,
    caption_summary,
    check_caption,
    prepare_caption,
    prompt_from_string,
    prompts_from_file,
    read_prompt_file,
    validate_caption,
    wrap_plain_text,
)


def canonical() -> dict:
    """A caption that follows the spec exactly (art form, one obj and one text element)."""
    return {
        "high_level_description": "Une affiche rétro pour un café à Zürich, avec un chat noir.",
        "style_description": {
            "aesthetics": "warm, retro, hand-printed",
            "lighting": "soft even studio light",
            "medium": "screen print",
            "art_style": "mid-century poster illustration",
            "color_palette": ["#1B2A40", "#E8A23D", "#F4EBD9"],
        },
        "compositional_deconstruction": {
            "background": "A cream paper texture with faint halftone dots.",
            "elements": [
                {"type": "obj", "bbox": [300, 200, 900, 800], "desc": "A black cat sitting upright.",
                 "color_palette": ["#111111", "#E8A23D"]},
                {"type": "text", "bbox": [50, 100, 200, 900], "text": "CAFÉ ZÜRICH ☕",
                 "desc": "Bold condensed sans-serif headline, centred."},
            ],
        },
    }


def photo_style() -> dict:
    return {"aesthetics": "documentary", "lighting": "golden hour", "photo": "35mm street photograph",
            "medium": "photograph", "color_palette": ["#AABBCC"]}


def errors_of(obj) -> list[str]:
    return check_caption(obj)[0]


def warnings_of(obj) -> list[str]:
    errs, warns = check_caption(obj)
    assert errs == []
    return warns


# --- canonical caption, serialisation, stripping -------------------------------------------------


def test_canonical_caption_has_no_warnings():
    assert validate_caption(canonical()) == []
    assert check_caption(canonical()) == ([], [])


def test_serialisation_is_compact_with_literal_non_ascii():
    text = prepare_caption(canonical(), keep_bboxes=True)
    assert text == json.dumps(canonical(), separators=(",", ":"), ensure_ascii=False)
    assert '", "' not in text and '": ' not in text and "], [" not in text and "\n" not in text
    assert "CAFÉ ZÜRICH ☕" in text and "Zürich" in text and "\\u" not in text
    assert text.startswith('{"high_level_description":"Une affiche')


def test_key_order_is_preserved_in_serialisation():
    text = prepare_caption(canonical())
    keys = list(json.loads(text)["style_description"])
    assert keys == ["aesthetics", "lighting", "medium", "art_style", "color_palette"]


def test_aspect_ratio_stripped():
    cap = {"aspect_ratio": "16:9", **canonical()}
    assert validate_caption(cap) == []
    out = json.loads(prepare_caption(cap, keep_bboxes=True))
    assert "aspect_ratio" not in out
    assert out == canonical()
    assert "aspect_ratio" in cap  # input not modified


def test_bboxes_stripped_by_default():
    cap = canonical()
    out = json.loads(prepare_caption(cap))
    for el in out["compositional_deconstruction"]["elements"]:
        assert "bbox" not in el
    assert list(out["compositional_deconstruction"]["elements"][1]) == ["type", "text", "desc"]
    assert cap["compositional_deconstruction"]["elements"][0]["bbox"] == [300, 200, 900, 800]


def test_bboxes_kept_with_keep_bboxes():
    out = json.loads(prepare_caption(canonical(), keep_bboxes=True))
    assert [el["bbox"] for el in out["compositional_deconstruction"]["elements"]] == [
        [300, 200, 900, 800], [50, 100, 200, 900]]


# --- photo vs art_style -------------------------------------------------------------------------


def test_photo_form_in_canonical_order_is_valid():
    cap = canonical()
    cap["style_description"] = photo_style()
    assert validate_caption(cap) == []


def test_photo_form_wrong_order_is_reordered():
    cap = canonical()
    s = photo_style()
    cap["style_description"] = {k: s[k] for k in ["aesthetics", "lighting", "medium", "photo", "color_palette"]}
    assert validate_caption(cap) == []
    out = json.loads(prepare_caption(cap))["style_description"]
    assert list(out) == ["aesthetics", "lighting", "photo", "medium", "color_palette"] and out == s


def test_art_form_wrong_order_is_reordered():
    cap = canonical()
    sd = cap["style_description"]
    cap["style_description"] = {k: sd[k] for k in ["aesthetics", "lighting", "art_style", "medium", "color_palette"]}
    assert errors_of(cap) == []
    assert prepare_caption(cap) == prepare_caption(canonical())


def test_both_photo_and_art_style_warns():
    cap = canonical()
    cap["style_description"]["photo"] = "studio photo"
    w = warnings_of(cap)
    assert len(w) == 1 and w[0].startswith('style_description: has both "photo" and "art_style"')


def test_neither_photo_nor_art_style_warns():
    cap = canonical()
    del cap["style_description"]["art_style"]
    w = warnings_of(cap)
    assert len(w) == 1 and w[0].startswith('style_description: has neither "photo" nor "art_style"')


def test_style_without_medium_warns():
    cap = canonical()
    del cap["style_description"]["medium"]
    assert warnings_of(cap) == ['style_description: no "medium"; the spec asks for one whenever '
                                "style_description is given"]


def test_style_description_optional():
    cap = canonical()
    del cap["style_description"]
    assert validate_caption(cap) == []


# --- palettes -----------------------------------------------------------------------------------


def test_style_palette_over_16_colours_warns():
    cap = canonical()
    cap["style_description"]["color_palette"] = [f"#{i:06X}" for i in range(17)]
    assert warnings_of(cap) == ["style_description.color_palette: 17 colours; expected at most 16"]


def test_element_palette_over_5_colours_warns():
    cap = canonical()
    cap["compositional_deconstruction"]["elements"][0]["color_palette"] = ["#000000"] * 6
    assert warnings_of(cap) == ["compositional_deconstruction.elements[0].color_palette: 6 colours; expected at most 5"]


def test_lowercase_and_bad_hex_warn():
    cap = canonical()
    cap["style_description"]["color_palette"] = ["#1b2a40", "red", "#12345"]
    assert warnings_of(cap) == [
        'style_description.color_palette[0]: "#1b2a40" is lowercase; expected uppercase \'#RRGGBB\' ("#1B2A40")',
        'style_description.color_palette[1]: "red" is not a colour of the form \'#RRGGBB\' (uppercase hex)',
        'style_description.color_palette[2]: "#12345" is not a colour of the form \'#RRGGBB\' (uppercase hex)',
    ]


def test_palette_of_wrong_type_is_error():
    cap = canonical()
    cap["style_description"]["color_palette"] = "#FFFFFF"
    assert errors_of(cap) == ["style_description.color_palette: expected an array of '#RRGGBB' strings, got a string"]


# --- bboxes -------------------------------------------------------------------------------------


def test_bbox_out_of_range_warns_with_element_path():
    cap = canonical()
    els = cap["compositional_deconstruction"]["elements"]
    els.append({"type": "obj", "bbox": [0, -5, 500, 1200], "desc": "a tree"})
    w = warnings_of(cap)
    assert len(w) == 1
    assert w[0].startswith("compositional_deconstruction.elements[2].bbox: [0, -5, 500, 1200] has values outside "
                           "0..1000 (-5, 1200)")


def test_bbox_min_greater_than_max_and_non_integer_warn():
    cap = canonical()
    cap["compositional_deconstruction"]["elements"][0]["bbox"] = [900, 200, 300, 800.5]
    w = warnings_of(cap)
    p = "compositional_deconstruction.elements[0].bbox"
    assert w == [f"{p}: [900, 200, 300, 800.5] has non-integer values; expected integers in 0..1000",
                 f"{p}: y_min 900 > y_max 300; expected [y_min, x_min, y_max, x_max]"]


def test_bbox_value_warnings_skipped_when_bboxes_are_stripped():
    cap = canonical()
    cap["compositional_deconstruction"]["elements"][0]["bbox"] = [0, 0, 2000, 2000]
    assert check_caption(cap, check_bboxes=False) == ([], [])


def test_bbox_wrong_shape_is_error():
    cap = canonical()
    cap["compositional_deconstruction"]["elements"][1]["bbox"] = [1, 2, 3]
    assert errors_of(cap) == ["compositional_deconstruction.elements[1].bbox: expected an array of 4 integers "
                              "[y_min, x_min, y_max, x_max], got 3 values"]


# --- structure errors ---------------------------------------------------------------------------


def test_wrong_top_level_key_order_is_reordered():
    cap = canonical()
    cap = {k: cap[k] for k in ["compositional_deconstruction", "high_level_description", "style_description"]}
    assert validate_caption(cap) == []
    assert prepare_caption(cap, keep_bboxes=True) == json.dumps(canonical(), separators=(",", ":"), ensure_ascii=False)


def test_wrong_element_key_order_is_reordered():
    cap = canonical()
    cap["compositional_deconstruction"]["elements"][1] = {
        "type": "text", "bbox": [0, 0, 10, 10], "desc": "small caps", "text": "HELLO"}
    assert errors_of(cap) == []
    out = json.loads(prepare_caption(cap, keep_bboxes=True))["compositional_deconstruction"]["elements"][1]
    assert list(out) == ["type", "bbox", "text", "desc"]


def test_wrong_composition_key_order_is_reordered():
    cap = canonical()
    cd = cap["compositional_deconstruction"]
    cap["compositional_deconstruction"] = {"elements": cd["elements"], "background": cd["background"]}
    assert errors_of(cap) == []
    assert prepare_caption(cap) == prepare_caption(canonical())


def _reversed_keys(v):
    if isinstance(v, dict):
        return {k: _reversed_keys(v[k]) for k in reversed(list(v))}
    return [_reversed_keys(x) for x in v] if isinstance(v, list) else v


@pytest.mark.parametrize("keep_bboxes", [False, True])
def test_keys_reversed_at_every_level_serialise_identically(keep_bboxes):
    for style in (canonical()["style_description"], photo_style()):
        cap = canonical()
        cap["style_description"] = style
        rev = _reversed_keys(cap)
        assert list(rev) != list(cap) and list(rev["style_description"]) != list(style)
        assert check_caption(rev) == ([], [])
        assert prepare_caption(rev, keep_bboxes=keep_bboxes) == prepare_caption(cap, keep_bboxes=keep_bboxes)
        if keep_bboxes:  # canonical() is written in the published order (the official docs/prompting.md tables)
            assert prepare_caption(rev, keep_bboxes=True) == json.dumps(cap, separators=(",", ":"), ensure_ascii=False)


def test_missing_compositional_deconstruction_is_error():
    cap = canonical()
    del cap["compositional_deconstruction"]
    with pytest.raises(CaptionError) as ei:
        validate_caption(cap)
    assert isinstance(ei.value, InputError) and isinstance(ei.value, GgufDitError)
    assert ei.value.errors == ['(root): missing required key "compositional_deconstruction" '
                               '(an object with "background" and "elements")']


def test_missing_background_and_elements_are_errors():
    cap = canonical()
    cap["compositional_deconstruction"] = {}
    assert errors_of(cap) == ['compositional_deconstruction: missing required key "background"',
                              'compositional_deconstruction: missing required key "elements" (an array, possibly empty)']


def test_unknown_keys_warn_naming_their_path_and_are_kept():
    cap = canonical()
    cap["negative_prompt"] = "blurry"
    cap["compositional_deconstruction"]["elements"][0]["text"] = "oops"
    w = warnings_of(cap)
    assert w[0] == ("negative_prompt: unknown key (the spec has high_level_description, style_description, "
                    "compositional_deconstruction here); kept as written")
    assert w[1] == ('compositional_deconstruction.elements[0].text: unknown key (the spec has type, bbox, desc, '
                    'color_palette here; a "text" key needs "type": "text"); kept as written')
    out = json.loads(prepare_caption(cap))
    assert out["negative_prompt"] == "blurry" and out["compositional_deconstruction"]["elements"][0]["text"] == "oops"


def test_strict_refuses_unknown_keys():
    cap = canonical()
    cap["compositional_deconstruction"] = {"canvas": "square", **cap["compositional_deconstruction"]}
    with pytest.raises(CaptionError) as ei:
        validate_caption(cap, strict=True)
    assert ei.value.errors == ["compositional_deconstruction.canvas: unknown key (the spec has background, "
                               "elements here)"]
    with pytest.raises(CaptionError, match=r"^prompt: invalid caption: compositional_deconstruction\.canvas: unknown key"):
        prompt_from_string(json.dumps(cap), strict=True)
    assert prompt_from_string(json.dumps(cap)).warnings[0].startswith("compositional_deconstruction.canvas: unknown key")


def test_unknown_keys_stay_in_place_while_known_keys_are_reordered():
    # Known keys take the places known keys had, in the published order; others keep theirs, so a caption
    # already in order passes unchanged (as diffusers and sd.cpp pass every caption).
    cd = {"elements": [], "canvas": "square", "background": "white", "layout": "centred"}
    cap = {"compositional_deconstruction": cd, "high_level_description": "x"}
    assert prepare_caption(cap) == ('{"high_level_description":"x","compositional_deconstruction":'
                                    '{"background":"white","canvas":"square","elements":[],"layout":"centred"}}')


def test_wrong_types_are_errors():
    cap = canonical()
    cap["high_level_description"] = 42
    cap["compositional_deconstruction"]["elements"][0]["type"] = "image"
    cap["compositional_deconstruction"]["elements"].append("a dog")
    assert errors_of(cap) == [
        "high_level_description: expected a string, got a number",
        'compositional_deconstruction.elements[0].type: expected "obj" or "text", got "image"',
        "compositional_deconstruction.elements[2]: expected an element object, got a string",
    ]


def test_text_element_without_text_warns():
    cap = canonical()
    del cap["compositional_deconstruction"]["elements"][1]["text"]
    assert warnings_of(cap) == ['compositional_deconstruction.elements[1]: no "text"; the spec gives a text element '
                                'the literal words to render']


def test_missing_recommended_fields_warn():
    cap = canonical()
    del cap["high_level_description"]
    del cap["compositional_deconstruction"]["elements"][0]["desc"]
    assert warnings_of(cap) == [
        '(root): no "high_level_description"; the spec recommends one (a short summary, at most about 50 words) '
        "as the first key",
        'compositional_deconstruction.elements[0]: no "desc"; the spec asks for a description of every element',
    ]


def test_word_count_warnings():
    cap = canonical()
    cap["high_level_description"] = "word " * 51
    cap["compositional_deconstruction"]["elements"][0]["desc"] = "word " * 61
    assert warnings_of(cap) == [
        "high_level_description: 51 words; the spec asks for a high-level description of at most about 50 words",
        "compositional_deconstruction.elements[0].desc: 61 words; the spec asks for an element description of "
        "at most about 60 words",
    ]


def test_caption_error_message_is_one_line():
    cap = {"compositional_deconstruction": {"elements": "x", "background": 1}, "style_description": {"medium": 2}}
    with pytest.raises(CaptionError) as ei:
        validate_caption(cap)
    assert "\n" not in str(ei.value) and len(ei.value.errors) >= 3


# --- files --------------------------------------------------------------------------------------


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_single_pretty_printed_json_file(tmp_path):
    p = write(tmp_path, "cap.json", "\n" + json.dumps(canonical(), indent=2, ensure_ascii=False) + "\n")
    (pr,) = read_prompt_file(p)
    assert isinstance(pr, Prompt)
    assert pr.source == "json" and pr.line == 2 and pr.warnings == []
    assert pr.text == prepare_caption(canonical())
    assert json.loads(pr.original) == canonical()


def test_json_lines_file(tmp_path):
    a, b = canonical(), canonical()
    b["high_level_description"] = "Second."
    b["style_description"]["color_palette"] = ["#abcdef"]
    p = write(tmp_path, "caps.jsonl", "# two captions\n" + json.dumps(a) + "\n\n" + json.dumps(b) + "\n")
    prompts = prompts_from_file(p)
    assert [x.line for x in prompts] == [2, 4]
    assert [x.source for x in prompts] == ["json", "json"]
    assert prompts[0].warnings == []
    assert prompts[1].warnings == ['style_description.color_palette[0]: "#abcdef" is lowercase; '
                                   'expected uppercase \'#RRGGBB\' ("#ABCDEF")']
    assert json.loads(prompts[1].text)["high_level_description"] == "Second."


def test_json_array_file(tmp_path):
    p = write(tmp_path, "caps.json", "[\n  " + json.dumps(canonical()) + ",\n  " + json.dumps(canonical()) + "\n]\n")
    prompts = read_prompt_file(p)
    assert [x.line for x in prompts] == [2, 3]
    assert all(x.text == prepare_caption(canonical()) for x in prompts)


def test_keep_bboxes_through_file(tmp_path):
    p = write(tmp_path, "cap.json", json.dumps({"aspect_ratio": "1:1", **canonical()}))
    (stripped,) = read_prompt_file(p)
    (kept,) = read_prompt_file(p, keep_bboxes=True)
    assert '"bbox"' not in stripped.text and '"aspect_ratio"' not in stripped.text
    assert kept.text == prepare_caption(canonical(), keep_bboxes=True)


def test_invalid_json_reports_file_line_and_column(tmp_path):
    p = write(tmp_path, "bad.json", '{\n  "high_level_description": "x",\n  "compositional_deconstruction" {}\n}\n')
    with pytest.raises(InputError) as ei:
        read_prompt_file(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: line 3 column 34: invalid JSON: Expecting ':' delimiter")
    assert "\n" not in msg


def test_invalid_json_lines_second_line(tmp_path):
    p = write(tmp_path, "bad.jsonl", json.dumps(canonical()) + "\n{\"high_level_description\": }\n")
    with pytest.raises(InputError, match=r"line 2 column 28: invalid JSON: Expecting value"):
        read_prompt_file(p)


def test_text_after_json_is_error(tmp_path):
    p = write(tmp_path, "mixed.json", json.dumps(canonical()) + "\na cat\n")
    with pytest.raises(InputError, match=r"line 2 column 1: expected a JSON caption object"):
        read_prompt_file(p)


def test_caption_error_in_file_names_file_and_line(tmp_path):
    bad = canonical()
    del bad["compositional_deconstruction"]
    p = write(tmp_path, "caps.jsonl", json.dumps(canonical()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(CaptionError) as ei:
        read_prompt_file(p)
    assert str(ei.value).startswith(f'{p}: line 2: invalid caption: (root): missing required key '
                                    '"compositional_deconstruction"')


def test_duplicate_key_is_error(tmp_path):
    p = write(tmp_path, "dup.json", '{"high_level_description":"a","high_level_description":"b",'
                                    '"compositional_deconstruction":{"background":"","elements":[]}}')
    with pytest.raises(CaptionError, match=r'\(root\): duplicate key "high_level_description"'):
        read_prompt_file(p)


def test_missing_file_is_input_error(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(InputError) as ei:
        read_prompt_file(p)
    assert str(ei.value) == f"{p}: prompt file not found"


@pytest.mark.parametrize("content", ["", "   \n\n", "# only a comment\n\n  # another\n", "[]\n"])
def test_empty_file_is_input_error(tmp_path, content):
    p = write(tmp_path, "empty.txt", content)
    with pytest.raises(InputError, match="no prompt"):
        read_prompt_file(p)


def test_plain_text_wrap_exact_output():
    assert wrap_plain_text("  a red fox in the snow \n") == {
        "high_level_description": "a red fox in the snow",
        "compositional_deconstruction": {"background": "", "elements": []},
    }
    assert check_caption(wrap_plain_text("x")) == ([], [])


def test_plain_text_file_with_comments_and_blank_lines(tmp_path):
    p = write(tmp_path, "prompts.txt", "# my prompts\n\na red fox in the snow\n   \n  # indented comment\n"
                                       "  ein Café in Zürich  \n")
    prompts = read_prompt_file(p)
    assert [x.line for x in prompts] == [3, 6]
    assert [x.source for x in prompts] == ["text", "text"]
    assert prompts[0].text == ('{"high_level_description":"a red fox in the snow",'
                               '"compositional_deconstruction":{"background":"","elements":[]}}')
    assert prompts[1].text == ('{"high_level_description":"ein Café in Zürich",'
                               '"compositional_deconstruction":{"background":"","elements":[]}}')
    assert prompts[1].original == "ein Café in Zürich"


def test_json_line_inside_text_file_is_error(tmp_path):
    p = write(tmp_path, "mixed.txt", "a cat\n" + json.dumps(canonical()) + "\n")
    with pytest.raises(InputError, match=r"line 2: starts with '\{' like a JSON caption"):
        read_prompt_file(p)


def test_raw_mode_text_file(tmp_path):
    p = write(tmp_path, "prompts.txt", "# c\n  a red fox  \n\n{not json at all\n")
    prompts = read_prompt_file(p, raw=True)
    assert [(x.text, x.source, x.line) for x in prompts] == [("  a red fox  ", "raw", 2),
                                                             ("{not json at all", "raw", 4)]


def test_raw_mode_json_file_keeps_exact_source(tmp_path):
    src = json.dumps({"aspect_ratio": "1:1", **canonical()}, indent=2, ensure_ascii=False)
    p = write(tmp_path, "cap.json", src + "\n")
    (pr,) = read_prompt_file(p, raw=True)
    assert pr.source == "raw" and pr.text == src and pr.original == src


def test_crlf_and_bom(tmp_path):
    p = tmp_path / "win.txt"
    p.write_bytes("\ufeffa cat\r\n# c\r\na dog\r\n".encode("utf-8"))
    assert [json.loads(x.text)["high_level_description"] for x in read_prompt_file(p)] == ["a cat", "a dog"]


def test_not_utf8_is_input_error(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_prompt_file(p)


# --- single prompt strings and summaries --------------------------------------------------------


def test_prompt_from_string():
    assert prompt_from_string("a cat").text == serialise_wrap("a cat")
    pr = prompt_from_string(json.dumps(canonical()))
    assert pr.source == "json" and pr.text == prepare_caption(canonical()) and pr.line is None
    assert prompt_from_string(" raw text ", raw=True).text == " raw text "
    with pytest.raises(InputError, match=r"^prompt: line 1 column 2: invalid JSON"):
        prompt_from_string("{oops}")
    with pytest.raises(CaptionError, match=r"^prompt: invalid caption"):
        prompt_from_string('{"high_level_description":"x"}')


def serialise_wrap(text):
    return json.dumps(wrap_plain_text(text), separators=(",", ":"), ensure_ascii=False)


def test_caption_summary():
    assert caption_summary(prepare_caption(canonical())) == canonical()["high_level_description"]
    assert caption_summary("a  red\n fox") == "a red fox"
    cap = canonical()
    del cap["high_level_description"]
    assert caption_summary(json.dumps(cap)) == cap["compositional_deconstruction"]["background"]
    s = caption_summary("word " * 100, max_len=20)
    assert len(s) <= 20 and s.endswith("…") and "\n" not in s


def test_validation_does_not_modify_input():
    cap = canonical()
    before = copy.deepcopy(cap)
    validate_caption(cap)
    prepare_caption(cap)
    assert cap == before


# --- sd.cpp's documented caption, bbox notice, schema export, errors through files and the CLI ----------------

# Oracle: the caption of the `-p` example in stable-diffusion.cpp's docs/ideogram4.md at commit 97d2990807fe6d5
# (file last changed in 0321ce17fbf5eec), pasted verbatim. sd.cpp hands it to the encoder as written.
SDCPP_EXAMPLE = (
    '{"high_level_description":"A square 1024 x 1024 luxury fashion magazine cover featuring exactly one short '
    'chubby fluffy cat as the main model. The cat sits on a soft ivory studio floor, facing the viewer with a '
    'stylish calm expression, wearing tiny black sunglasses, a red silk scarf, and a small gold collar charm. In '
    'front of the cat on the floor is a wide horizontal luxury nameplate that clearly reads ideogram4.cpp. The '
    'whole design feels premium, fashionable, clean, and editorial.","style_description":{"aesthetics":"luxury '
    'fashion magazine cover, high-end pet couture campaign, minimalist editorial design, elegant studio '
    'photography, soft paper texture, refined typography, fashionable and polished","lighting":"Soft diffused '
    'studio lighting, gentle spotlight on the cat, subtle floor shadow, warm ivory highlights, clean separation '
    'between subject and background","photo":"high-resolution fashion editorial photography look, front-facing '
    'cat portrait, crisp fur details, glossy sunglasses, clear readable nameplate text, shallow depth of '
    'field","medium":"mixed media fashion photography and premium editorial graphic '
    'design","color_palette":["#F4EFE7","#111111","#D8B56D","#B73A3A","#FFFFFF","#8A7A6A"]},"compositional_deconstruction":{"canvas":"Square '
    '1024 x 1024 canvas with a normal upright orientation. Do not rotate the poster or any text. Use a clean '
    'fashion magazine cover layout.","background":"Warm ivory studio backdrop with subtle paper grain, a soft '
    'spotlight gradient, faint floor shadow, and a few minimal gold editorial lines. The background is spacious, '
    'premium, and uncluttered.","layout":"Top center has a small elegant headline. Center area features one cat '
    'as the main fashion model. Lower foreground has a wide horizontal luxury nameplate placed on the floor in '
    'front of the cat. Bottom center has a small footer. All text is horizontal, upright, and readable left to '
    'right.","elements":[{"type":"text","desc":"Top center headline reading LOOK WHAT I FOUND in a refined '
    'high-fashion serif font. The headline is horizontal, centered, elegant, and secondary to the nameplate '
    'text."},{"type":"obj","desc":"Exactly one short chubby fluffy cat sitting in the center like a luxury '
    'fashion model. The cat has a large round head, compact body, short legs, soft detailed fur, expressive '
    'eyes, and a calm confident pose. The cat is cute and rounded, not tall, not stretched, not '
    'duplicated."},{"type":"obj","desc":"Tiny glossy black sunglasses worn naturally by the cat, slightly '
    'oversized but still showing the cat face clearly. The sunglasses add a chic fashion-editorial '
    'attitude."},{"type":"obj","desc":"A red silk scarf tied neatly around the cat neck, with soft folds and a '
    'couture feeling. The scarf must not cover the cat face or the nameplate."},{"type":"obj","desc":"A small '
    'gold collar charm or fashion accessory under the scarf, subtle and premium, adding a luxury campaign '
    'detail."},{"type":"obj","desc":"In the lower foreground, place a wide horizontal luxury nameplate on the '
    'floor in front of the cat. The nameplate is low, flat, landscape-oriented, much wider than tall, like a '
    'fashion show seat card or premium display plaque. It is centered, front-facing, level, and fully visible. '
    'It must not become vertical, tall, standing, rotated, or side-facing."},{"type":"text","desc":"Print the '
    'exact text ideogram4.cpp only on the wide horizontal nameplate. Use clean bold black lettering, perfectly '
    'spelled, lowercase, with the number 4 and .cpp extension. The text must fit completely inside the '
    'nameplate, stay horizontal, and be readable from left to right."},{"type":"obj","desc":"Add sparse premium '
    'editorial accents around the edges: thin gold lines, small code brackets, tiny cursor marks, subtle dots, '
    'and minimal geometric details. No extra cats, no stickers, no animal faces, no busy '
    'decorations."},{"type":"text","desc":"Bottom center footer reading tiny paws, big compile energy in a small '
    'refined monospace or editorial font. The footer is horizontal, centered, understated, and much smaller than '
    'the nameplate text."}]}}'
)


def test_sdcpp_documented_example_is_accepted_and_passed_unchanged(tmp_path):
    pr = prompt_from_string(SDCPP_EXAMPLE)
    assert pr.source == "json" and pr.text == SDCPP_EXAMPLE and pr.bboxes_stripped == 0
    unknown = [w for w in pr.warnings if "unknown key" in w]
    assert unknown == [
        "compositional_deconstruction.canvas: unknown key (the spec has background, elements here); kept as written",
        "compositional_deconstruction.layout: unknown key (the spec has background, elements here); kept as written"]
    # its text elements carry their words in "desc", not in the spec's "text": a warning each, not a refusal
    assert sum('no "text"' in w for w in pr.warnings) == 3
    (from_file,) = read_prompt_file(write(tmp_path, "sdcpp.json", SDCPP_EXAMPLE + "\n"))
    assert from_file.text == SDCPP_EXAMPLE and from_file.warnings == pr.warnings
    with pytest.raises(CaptionError, match=r"compositional_deconstruction\.canvas: unknown key.*; "
                                           r"compositional_deconstruction\.layout: unknown key"):
        prompt_from_string(SDCPP_EXAMPLE, strict=True)


def test_sdcpp_example_with_keys_shuffled_serialises_to_the_same_string():
    cap = json.loads(SDCPP_EXAMPLE)
    cd = cap["compositional_deconstruction"]
    # the known keys swap places; the unknown ones keep theirs
    shuffled = {"compositional_deconstruction": {"canvas": cd["canvas"], "elements": [_reversed_keys(e) for e in cd["elements"]],
                                                 "layout": cd["layout"], "background": cd["background"]},
                "style_description": _reversed_keys(cap["style_description"]),
                "high_level_description": cap["high_level_description"]}
    assert prompt_from_string(json.dumps(shuffled)).text == SDCPP_EXAMPLE


def test_bbox_notice_is_one_line_counting_bboxes_and_captions(tmp_path):
    no_bbox = canonical()
    for el in no_bbox["compositional_deconstruction"]["elements"]:
        del el["bbox"]
    p = write(tmp_path, "caps.jsonl", "\n".join(json.dumps(c) for c in (canonical(), no_bbox, canonical())) + "\n")
    prompts = read_prompt_file(p)
    assert [x.bboxes_stripped for x in prompts] == [2, 0, 2]
    assert bbox_notice(prompts) == ("stripped 4 element bboxes from 2 captions, as the official pipeline does "
                                    "(--keep-bboxes keeps them)")
    assert bbox_notice(read_prompt_file(p, keep_bboxes=True)) is None
    assert bbox_notice([prompt_from_string("a cat")]) is None


def test_json_schema_export_follows_the_published_order():
    # Oracle: the key-order tables of the official docs/prompting.md (ideogram4, release-day copy).
    schema = Caption.model_json_schema()
    defs = schema["$defs"]
    assert list(schema["properties"]) == ["high_level_description", "style_description", "compositional_deconstruction"]
    assert schema["required"] == ["compositional_deconstruction"] and schema["additionalProperties"] is False
    assert list(defs["StyleDescription"]["properties"]) == ["aesthetics", "lighting", "photo", "medium", "art_style",
                                                            "color_palette"]
    assert list(defs["CompositionalDeconstruction"]["properties"]) == ["background", "elements"]
    assert list(defs["ObjElement"]["properties"]) == ["type", "bbox", "desc", "color_palette"]
    assert list(defs["TextElement"]["properties"]) == ["type", "bbox", "text", "desc", "color_palette"]
    assert defs["TextElement"]["properties"]["type"]["const"] == "text"
    assert defs["ObjElement"]["properties"]["color_palette"]["maxItems"] == 5
    assert defs["StyleDescription"]["properties"]["color_palette"]["maxItems"] == 16
    assert all("default" not in prop for d in [schema, *defs.values()] for prop in d["properties"].values())


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c["compositional_deconstruction"]["elements"][0].update(desc=5),
     "compositional_deconstruction.elements[0].desc: expected a string, got a number"),
    (lambda c: c["compositional_deconstruction"]["elements"][1].update(type="image"),
     'compositional_deconstruction.elements[1].type: expected "obj" or "text", got "image"'),
    (lambda c: c["compositional_deconstruction"]["elements"][1].pop("type"),
     'compositional_deconstruction.elements[1]: missing required key "type" ("obj" or "text")'),
    (lambda c: c["compositional_deconstruction"]["elements"][0].update(bbox=[1, 2, True, 4]),
     "compositional_deconstruction.elements[0].bbox[2]: expected a number, got a boolean"),
    (lambda c: c["compositional_deconstruction"].pop("background"),
     'compositional_deconstruction: missing required key "background"'),
    (lambda c: c["style_description"].update(color_palette=["#FFFFFF", None]),
     "style_description.color_palette[1]: expected a '#RRGGBB' string, got null"),
    (lambda c: c.update(compositional_deconstruction=[]),
     'compositional_deconstruction: expected an object with "background" and "elements", got an array'),
])
def test_errors_are_one_line_naming_file_line_and_key_path(tmp_path, mutate, error):
    bad = canonical()
    mutate(bad)
    p = write(tmp_path, "caps.jsonl", json.dumps(canonical()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(CaptionError) as ei:
        read_prompt_file(p)
    assert str(ei.value) == f"{p}: line 2: invalid caption: {error}"


def _cli(*args):
    from typer.testing import CliRunner

    from gguf_dit.cli import app

    r = CliRunner().invoke(app, ["run", *map(str, args), "--steps", "2"])
    return r.exit_code, r.stderr


def test_cli_strict_refuses_an_unknown_key_in_one_line(tmp_path):
    p = write(tmp_path, "caps.jsonl", "# sd.cpp's example\n" + SDCPP_EXAMPLE + "\n")
    code, err = _cli(p, "--strict", "-o", tmp_path / "out", "-q")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {p}: line 2: invalid caption: compositional_deconstruction.canvas: unknown key")
    assert not (tmp_path / "out").exists()


def test_cli_warns_about_unknown_keys_and_says_once_that_bboxes_were_stripped(tmp_path):
    caps = [canonical(), canonical()]
    caps[1]["compositional_deconstruction"]["canvas"] = "square"
    p = write(tmp_path, "caps.jsonl", "\n".join(json.dumps(c) for c in caps) + "\n")
    code, err = _cli(p, "-o", tmp_path / "out")
    assert code == 0, err
    assert f"warning: {p}:2: compositional_deconstruction.canvas: unknown key" in err
    notes = [ln for ln in err.splitlines() if "bbox" in ln]
    assert notes == ["stripped 4 element bboxes from 2 captions, as the official pipeline does (--keep-bboxes keeps them)"]
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
