"""tokenizer.json (Hugging Face, Qwen2 byte-level BPE) to the GGUF tokenizer fields llama.cpp reads.

The tokenizer goes into the text encoder's GGUF as llama.cpp's ``gpt2`` BPE with pre-tokenizer ``qwen2``; every
field used is type-checked, naming the file and key, and a vocabulary llama.cpp would abort on is refused.
"""

from __future__ import annotations

from pathlib import Path

from gguf_dit.errors import SourceError

from .inputs import json_int, read_json

#: Qwen2's pre-tokenizer regex, which llama.cpp implements as pre-tokenizer ``qwen2``.
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# gguf TokenType values
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def read_tokenizer(tok_dir: str | Path, n_rows: int) -> dict:
    """The GGUF tokenizer fields from ``tokenizer.json`` (+ ``tokenizer_config.json``), padded to ``n_rows``.
    Every field used is type-checked, naming the file and key."""
    tok_dir = Path(tok_dir)
    path = tok_dir / "tokenizer.json" if tok_dir.is_dir() else tok_dir
    if not path.exists():
        raise SourceError("tokenizer.json not found", path=path)
    tj = read_json(path, what="tokenizer.json")
    model = tj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else model
        raise SourceError(f"tokenizer model is {str(kind)[:40]!r}, expected a byte-level BPE (Qwen2)", path=path)
    _check_pretokenizer(tj.get("pre_tokenizer"), path)
    conf_path = path.parent / "tokenizer_config.json"
    conf: dict = read_json(conf_path, what="tokenizer_config.json") if conf_path.exists() else {}

    vocab = _typed(model.get("vocab", {}), dict, "model.vocab", path)
    tokens: dict[int, str] = {json_int(i, f"model.vocab[{_utf8(t, 'model.vocab key', path)!r}]", path): t for t, i in vocab.items()}
    types: dict[int, int] = {i: TOKEN_NORMAL for i in tokens}
    for n, at in enumerate(_typed(tj.get("added_tokens", []), list, "added_tokens", path)):
        at = _typed(at, dict, f"added_tokens[{n}]", path)
        i = json_int(at.get("id"), f"added_tokens[{n}].id", path)
        content = _utf8(at.get("content"), f"added_tokens[{n}].content", path)
        tokens[i] = content
        special = bool(at.get("special")) or (content.startswith("<|") and content.endswith("|>"))
        types[i] = TOKEN_CONTROL if special else TOKEN_USER_DEFINED
    if not tokens:
        raise SourceError("tokenizer has an empty vocabulary", path=path)
    n_tok = max(tokens) + 1
    if n_tok > n_rows:
        raise SourceError(f"tokenizer has ids up to {n_tok - 1} but the embedding has only {n_rows} rows", path=path)
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(n_rows)]
    type_list = [types.get(i, TOKEN_UNUSED) for i in range(n_rows)]
    # llama.cpp aborts the process on a vocabulary with a repeated token.
    seen: dict[str, int] = {}
    for i, t in enumerate(token_list):
        if t in seen:
            raise SourceError(f"token {t[:40]!r} appears twice (ids {seen[t]} and {i})", path=path)
        seen[t] = i
    merges = []
    for n, m in enumerate(_typed(model.get("merges", []), list, "model.merges", path)):
        if isinstance(m, list) and len(m) == 2:
            m = " ".join(_utf8(x, f"model.merges[{n}]", path) for x in m)
        merges.append(_utf8(m, f"model.merges[{n}]", path))
    by_content = {t: i for i, t in tokens.items()}

    def special_id(name: str, fallback: str | None) -> int | None:
        v = conf.get(name)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str) and v in by_content:
            return by_content[v]
        return by_content.get(fallback) if fallback else None

    eos = special_id("eos_token", "<|im_end|>")
    template = conf.get("chat_template")
    return {
        "tokens": token_list,
        "types": type_list,
        "merges": merges,
        "n_tokenizer": n_tok,
        "eos": by_content.get("<|endoftext|>") if eos is None else eos,
        "bos": special_id("bos_token", "<|endoftext|>"),
        "pad": special_id("pad_token", "<|endoftext|>"),
        "chat_template": _utf8(template, "chat_template", conf_path) if isinstance(template, str) else None,
        "files": [p.name for p in (path, conf_path) if p.exists()],
    }


def _typed(value, kind: type, key: str, path: Path):
    if not isinstance(value, kind):
        raise SourceError(f"{key} is {str(value)[:40]!r}, expected a JSON {'object' if kind is dict else 'array'}", path=path)
    return value


def _utf8(value, key: str, path: Path) -> str:
    """A string the GGUF writer can store (JSON may hold lone surrogates, which UTF-8 cannot)."""
    if not isinstance(value, str):
        raise SourceError(f"{key} is {str(value)[:40]!r}, expected a string", path=path)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(f"{key} is not valid Unicode (a lone surrogate)", path=path) from None
    return value


def _check_pretokenizer(pt, path: Path) -> None:
    """llama.cpp's ``qwen2`` pre-tokenizer hard-codes Qwen2's split regex; refuse anything else."""
    nodes, todo = [], [pt] if pt else []
    while todo:  # iterative: a deeply nested hostile file must not exhaust the Python stack
        node = todo.pop()
        if isinstance(node, dict):
            nodes.append(node)
            children = node.get("pretokenizers") or []
            todo.extend(reversed(_typed(children, list, "pre_tokenizer.pretokenizers", path)))
    kinds = [n.get("type") for n in nodes]
    if "ByteLevel" not in kinds:
        raise SourceError(f"pre-tokenizer {str(kinds or None)[:80]} is not byte-level; expected Qwen2's Split + ByteLevel", path=path)
    for n in nodes:
        if n.get("type") == "Split":
            pat = n.get("pattern", {})
            regex = pat.get("Regex") if isinstance(pat, dict) else None
            if regex != QWEN2_SPLIT:
                raise SourceError("pre-tokenizer split pattern is not Qwen2's (llama.cpp pre-tokenizer qwen2 would tokenize differently)", path=path)
