"""Prompt files and JSON captions (runtime/caption.py, docs/captions.md). Pure Python, fast."""

from __future__ import annotations

import copy
import json

import pytest

from gguf_dit.errors import GgufDitError, InputError
from gguf_dit.runtime.caption import (
    CaptionError,
    Prompt,
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


def test_photo_form_wrong_order_is_error():
    cap = canonical()
    s = photo_style()
    cap["style_description"] = {k: s[k] for k in ["aesthetics", "lighting", "medium", "photo", "color_palette"]}
    with pytest.raises(CaptionError) as ei:
        validate_caption(cap)
    assert ei.value.errors == ["style_description: keys out of order: got aesthetics, lighting, medium, photo, "
                               "color_palette; expected aesthetics, lighting, photo, medium, color_palette"]


def test_art_form_wrong_order_is_error():
    cap = canonical()
    sd = cap["style_description"]
    cap["style_description"] = {k: sd[k] for k in ["aesthetics", "lighting", "art_style", "medium", "color_palette"]}
    errs = errors_of(cap)
    assert errs == ["style_description: keys out of order: got aesthetics, lighting, art_style, medium, "
                    "color_palette; expected aesthetics, lighting, medium, art_style, color_palette"]


def test_both_photo_and_art_style_is_error():
    cap = canonical()
    cap["style_description"]["photo"] = "studio photo"
    errs = errors_of(cap)
    assert len(errs) == 1 and errs[0].startswith('style_description: has both "photo" and "art_style"')


def test_neither_photo_nor_art_style_is_error():
    cap = canonical()
    del cap["style_description"]["art_style"]
    errs = errors_of(cap)
    assert len(errs) == 1 and errs[0].startswith('style_description: has neither "photo" nor "art_style"')


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


def test_wrong_top_level_key_order_is_error_naming_path():
    cap = canonical()
    cap = {k: cap[k] for k in ["compositional_deconstruction", "high_level_description", "style_description"]}
    with pytest.raises(InputError) as ei:
        validate_caption(cap)
    assert "(root): keys out of order: got compositional_deconstruction, high_level_description, " \
           "style_description; expected high_level_description, style_description, " \
           "compositional_deconstruction" in str(ei.value)


def test_wrong_element_key_order_is_error_naming_path():
    cap = canonical()
    cap["compositional_deconstruction"]["elements"][1] = {
        "type": "text", "bbox": [0, 0, 10, 10], "desc": "small caps", "text": "HELLO"}
    assert errors_of(cap) == ["compositional_deconstruction.elements[1]: keys out of order: got type, bbox, desc, "
                              "text; expected type, bbox, text, desc"]


def test_wrong_composition_key_order_is_error():
    cap = canonical()
    cd = cap["compositional_deconstruction"]
    cap["compositional_deconstruction"] = {"elements": cd["elements"], "background": cd["background"]}
    assert errors_of(cap) == ["compositional_deconstruction: keys out of order: got elements, background; "
                              "expected background, elements"]


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


def test_unknown_keys_are_errors():
    cap = canonical()
    cap["negative_prompt"] = "blurry"
    cap["compositional_deconstruction"]["elements"][0]["text"] = "oops"
    errs = errors_of(cap)
    assert errs[0] == ('(root): unknown key "negative_prompt"; allowed keys: high_level_description, '
                       "style_description, compositional_deconstruction")
    assert errs[1].startswith('compositional_deconstruction.elements[0]: unknown key "text"; allowed keys: '
                              'type, bbox, desc, color_palette (a "text" key needs "type": "text")')


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


def test_text_element_without_text_is_error():
    cap = canonical()
    del cap["compositional_deconstruction"]["elements"][1]["text"]
    assert errors_of(cap) == ['compositional_deconstruction.elements[1]: missing required key "text"']


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


def test_non_strict_returns_errors_as_warnings():
    cap = canonical()
    del cap["compositional_deconstruction"]
    out = validate_caption(cap, strict=False)
    assert out[0].startswith('error: (root): missing required key "compositional_deconstruction"')


def test_caption_error_message_is_one_line():
    cap = {"compositional_deconstruction": {"elements": "x", "background": 1}, "style_description": {}}
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
