"""Per-tensor storage types: named recipes, ``--type``, ``--rule REGEX=TYPE`` and recipe JSON files.

Resolution order for a tensor (first decision wins):

1. user rules (``--rule`` then the JSON file's ``rules``), first matching regex;
2. 1-D tensors (norm weights, biases) and ``embed_image_indicator`` stay F32;
3. linears take the recipe's linear type (``--type`` overrides it), or the recipe's protected-set type.

A built-in choice that a tensor cannot hold (K-quants need the input dimension divisible by 256,
Q8_0/Q4_0 by 32) falls back to Q8_0, then F16, and the fallback is recorded in the reason. A type the
*user* asked for explicitly through a rule that the tensor cannot hold is an error naming the tensor.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

from gguf_dit.arch.dit import TensorSpec
from gguf_dit.errors import GGMLError, RecipeError
from gguf_dit.ggml_ops import GGMLType, fits
from gguf_dit.ggml_ops.types import fitting_type

from .inputs import read_json

PROTECTED_W2 = r"^layers\.\d+\.feed_forward\.w2\.weight$"
#: q4_k-m's protected linears, from `gguf-dit calibrate` on the trained demo's float checkpoint (each linear alone at
#: Q4_K, both backbones; docs/quantization.md "Measurements on the demo model"): the final projection to latent
#: channels ranks first in both backbones (kept Q8_0, as calibrate's own recipe chose: it is small), every FFN
#: down-projection next (ranks 2-4, as the paper finds; Q6_K). The timestep MLP ranked 17th-21st and is not kept.
SENSITIVE_OUTPUT = r"^final_layer\.linear\.weight$"
SENSITIVE = r"^layers\.\d+\.feed_forward\.w2\.weight$"


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    type: GGMLType
    why: str

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    linear_type: GGMLType
    rules: tuple[Rule, ...] = ()  # explicit: impossible type -> error
    builtin_rules: tuple[Rule, ...] = ()  # part of a named recipe: impossible type -> fallback
    description: str = ""

    def choose(self, spec: TensorSpec, path: Path | str | None = None) -> tuple[GGMLType, str]:
        """The type and reason for one tensor; an impossible explicit rule is an error naming ``path`` and it."""
        for r in self.rules:
            if r.matches(spec.name):
                if spec.kind not in ("linear", "embedding") and r.type.is_quantized:
                    raise RecipeError(f"rule {r.pattern}={r.type.name.lower()} asks for a quantized type on a 1-D tensor", path=path, tensor=spec.name)
                if not fits(r.type, spec.in_features):
                    raise RecipeError(f"rule {r.pattern}={r.type.name.lower()}: {r.type.name} needs the input dimension divisible by "
                                      f"{r.type.block_size}, this tensor has {spec.in_features}", path=path, tensor=spec.name)
                return r.type, r.why
        if spec.kind in ("bias", "norm"):
            return GGMLType.F32, "1-D tensor kept F32"
        if spec.kind == "embedding":
            return GGMLType.F32, "embedding kept F32"
        for r in self.builtin_rules:
            if r.matches(spec.name):
                return fallback(r.type, spec.in_features, r.why, spec.name)
        return fallback(self.linear_type, spec.in_features, f"recipe {self.name}: linear", spec.name)

    def to_json(self) -> dict:
        def rules(rs: tuple[Rule, ...]) -> list[dict]:
            return [{"pattern": r.pattern, "type": r.type.name, "why": r.why} for r in rs]

        return {"name": self.name, "linear_type": self.linear_type.name, "rules": rules(self.rules), "builtin_rules": rules(self.builtin_rules)}


def fallback(t: GGMLType, n_in: int, why: str, tensor: str | None = None) -> tuple[GGMLType, str]:
    """``t`` and ``why`` if a row of ``n_in`` fits ``t``, else the first of its fallbacks that does, with the reason."""
    alt = fitting_type(t, n_in)
    if alt is None:  # pragma: no cover - F16 holds any row
        raise RecipeError(f"no storage type fits input dimension {n_in}", tensor=tensor)
    if alt is t:
        return t, why
    return alt, f"{why}; {t.name} needs in % {t.block_size} == 0 (in = {n_in}), fell back to {alt.name}"


BUILTIN: dict[str, Recipe] = {
    "f32": Recipe("f32", GGMLType.F32, description="no quantization, float32 (exact comparisons)"),
    "f16": Recipe("f16", GGMLType.F16, description="no quantization, float16 linears"),
    "bf16": Recipe("bf16", GGMLType.BF16, description="no quantization, bfloat16 linears"),
    "q8_0": Recipe("q8_0", GGMLType.Q8_0, description="all linears Q8_0"),
    "q6_k": Recipe("q6_k", GGMLType.Q6_K, description="all linears Q6_K (Q8_0 where in % 256 != 0, e.g. input_proj)"),
    "q5_k": Recipe("q5_k", GGMLType.Q5_K, description="all linears Q5_K (Q8_0 where in % 256 != 0, e.g. input_proj)"),
    "q4_k": Recipe("q4_k", GGMLType.Q4_K, description="all linears Q4_K (Q8_0 where in % 256 != 0, e.g. input_proj)"),
    "q4_k-protect": Recipe(
        "q4_k-protect",
        GGMLType.Q4_K,
        builtin_rules=(Rule(PROTECTED_W2, GGMLType.F16, "protected set (paper): FFN down-projection w2 kept F16"),),
        description="as q4_k, with every feed_forward.w2 kept F16 (the paper's protected set)",
    ),
    "q4_k-m": Recipe(
        "q4_k-m",
        GGMLType.Q4_K,
        builtin_rules=(Rule(SENSITIVE_OUTPUT, GGMLType.Q8_0, "q4_k-m: the most Q4_K-sensitive linear (measured) kept Q8_0"),
                       Rule(SENSITIVE, GGMLType.Q6_K, "q4_k-m: measured Q4_K-sensitive linear kept Q6_K")),
        description="llama.cpp Q4_K_M-style: Q4_K, with the measured most sensitive linears in Q6_K (feed_forward.w2) "
                    "and Q8_0 (final_layer.linear)",
    ),
}


def parse_type(name: str | GGMLType, what: str, path: Path | None = None) -> GGMLType:
    """A storage type from its name; errors begin with ``what`` (where the name came from) and name ``path``."""
    t = name
    if not isinstance(t, GGMLType):
        try:
            t = GGMLType.parse(str(name))
        except GGMLError as e:  # carries no file or tensor: its message is all there is to keep
            raise RecipeError(f"{what}: {e}", path=path) from None
    if not t.traits.storage:
        raise RecipeError(f"{what}: {t.name} cannot store weights", path=path)
    return t


def parse_rule(text: str, path: Path | None = None) -> Rule:
    if "=" not in text:
        raise RecipeError(f"rule {text!r} is not REGEX=TYPE", path=path)
    pattern, type_name = text.rsplit("=", 1)
    try:
        re.compile(pattern)
    except re.error as e:
        raise RecipeError(f"rule {text!r}: invalid regex ({e})", path=path) from None
    t = parse_type(type_name, f"rule {text!r}", path)
    return Rule(pattern, t, f"rule {pattern}={t.name.lower()}")


def _from_file(path: Path) -> Recipe:
    if not path.exists():
        raise RecipeError("recipe file not found", path=path)
    d = read_json(path, what="recipe JSON", error=RecipeError)
    if not isinstance(d.get("rules", []), list):
        raise RecipeError("recipe JSON's rules must be a list", path=path)
    base = BUILTIN.get(str(d.get("base", "f32")))
    if base is None:
        raise RecipeError(f"unknown base recipe {d.get('base')!r}; known: {', '.join(BUILTIN)}", path=path)
    linear = parse_type(str(d["linear_type"]), "linear_type", path) if "linear_type" in d else base.linear_type
    rules = []
    for i, r in enumerate(d.get("rules", [])):
        if isinstance(r, str):
            rules.append(parse_rule(r, path))
            continue
        try:
            text = f"{r['pattern']}={r['type']}"
        except (KeyError, TypeError):
            raise RecipeError(f"rules[{i}] needs 'pattern' and 'type'", path=path) from None
        reason = r.get("reason")  # calibrate's measured reason for the choice: recorded as the tensor's why
        if reason is not None and not isinstance(reason, str):
            raise RecipeError(f"rules[{i}]: 'reason' must be a string, got {type(reason).__name__}", path=path)
        rule = parse_rule(text, path)
        rules.append(Rule(rule.pattern, rule.type, reason or str(r.get("why", rule.why))))
    return Recipe(str(d.get("name", path.stem)), linear, tuple(rules), base.builtin_rules, str(d.get("description", "")))


def resolve(recipe: str, type_override: str | None = None, rules: Sequence[str] = ()) -> Recipe:
    """A recipe from a built-in name or a JSON path, with ``--type`` and ``--rule`` applied."""
    if recipe in BUILTIN:
        r = BUILTIN[recipe]
    elif recipe.endswith(".json") or Path(recipe).exists():
        r = _from_file(Path(recipe))
    else:
        raise RecipeError(f"unknown recipe {recipe!r}; built-in recipes: {', '.join(BUILTIN)}, or a path to a recipe .json")
    linear, name = r.linear_type, r.name
    if type_override:
        linear = parse_type(type_override, f"--type {type_override}")
        name = f"{name}+type={linear.name.lower()}"
    user = tuple(parse_rule(x) for x in rules)
    if user:
        name = f"{name}+rules"
    return Recipe(name, linear, user + r.rules, r.builtin_rules, r.description)
