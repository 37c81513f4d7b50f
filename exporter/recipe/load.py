"""Recipes from YAML: read as plain data (no duplicate keys, no tags), `key.path=value` overrides applied, relative paths resolved
against the recipe file's folder, then validated into the typed schema (exporter/recipe/schema.py).

Every problem in a recipe is reported at once, each with its key path (`personas.introvert.calibration.path`).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from exporter.errors import RecipeError
from exporter.inputs import DuplicateKeyError, YamlLimitError, file_problem, load_yaml, read_yaml_file
from exporter.recipe.paths import file_keys, get_key, set_key
from exporter.recipe.rules import semantic_problems
from exporter.recipe.schema import Recipe


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<top level>"


def _branch(part: Any) -> str | None:
    """Which side of a 'one value, or a mapping per persona' setting a location part names, if it is one."""
    if not isinstance(part, str):
        return None
    if part.startswith("dict["):
        return "mapping"
    return "value" if part in ("float", "constrained-float", "int", "constrained-int") else None


def _relevant(errors: list[Any]) -> list[Any]:
    """Errors of the branch the user wrote: a number given where one value or a per-persona mapping is
    accepted is judged as a value, a mapping as a mapping; the branch's name leaves the location."""
    out = []
    for err in errors:
        loc = tuple(err["loc"])
        branch = next(((i, b) for i, part in enumerate(loc) if (b := _branch(part))), None)
        if branch is not None:
            i, side = branch
            if side != ("mapping" if isinstance(err.get("input"), dict) or len(loc) > i + 1 else "value"):
                continue
            err = {**err, "loc": loc[:i] + loc[i + 1 :]}
        out.append(err)
    return out


def override_value(item: str, raw: str) -> Any:
    """An override's value, read as YAML data (no tags, no duplicate keys); errors name the override."""
    try:
        return load_yaml(raw, f"override {item!r}")
    except YamlLimitError as exc:
        raise RecipeError(f"override {item!r}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            f"override {item!r}: the value is not valid YAML ({problem}); quote it if it is text "
            "(e.g. name='a: b'), or close its brackets (e.g. prune.mlp.sparsity=0.1, pairs=[[a, b]])"
        ) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML data (never with tags)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise RecipeError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. prune.mlp.sparsity=0.1")
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not inside a mapping")
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: the parent of {parts[-1]!r} is not a mapping")
        node[parts[-1]] = override_value(item, raw)
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for key in file_keys(data):
        path = get_key(data, key)
        if not Path(path).is_absolute() and "\0" not in path:  # a NUL byte is reported where the file is read
            set_key(data, key, str((base / path).resolve()))


_EXPECTED = {  # pydantic error type -> what the key needs, in the recipe's words
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "int_type": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text",
    "dict_type": "a mapping (key: value lines)",
    "model_type": "a mapping (key: value lines)",
    "model_attributes_type": "a mapping (key: value lines)",
    "list_type": "a list ([a, b] or '- ' lines)",
    "tuple_type": "a list ([a, b] or '- ' lines)",
}


def _members(annotation: Any) -> list[Any]:
    """The types an annotation allows: Annotated, Optional and unions unwrapped."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [t for arg in get_args(annotation) for t in _members(arg)]
    return [annotation]


def allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows in the mapping at `loc` (a persona's name or a list index passes through)."""
    current: list[Any] = [Recipe]
    for part in loc:
        nxt = []
        for t in (t for a in current for t in _members(a)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                if isinstance(part, str) and part in t.model_fields:
                    nxt.append(t.model_fields[part].annotation)
            elif get_origin(t) in (dict, list, tuple) and get_args(t):
                nxt.append(get_args(t)[-1])  # a mapping's value, a list's item
        current = nxt
    models = [t for a in current for t in _members(a) if isinstance(t, type) and issubclass(t, BaseModel)]
    return sorted({name for m in models for name in m.model_fields})


def _unknown_key(loc: tuple[Any, ...]) -> str:
    match = difflib.get_close_matches(str(loc[-1]), allowed_keys(loc[:-1]), n=1, cutoff=0.6)
    if match:
        return f"unknown key; did you mean `{match[0]}`?"
    return "unknown key (misspelled? remove it or check the recipe reference in docs/recipes.md)"


def _schema_message(err: Any) -> str:
    """One schema problem: unknown, missing, null, or of the wrong type, with what is expected."""
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(tuple(err["loc"]))
    if kind == "missing":
        return "required key is missing"
    if value is None:
        return "the key is present but has no value (null); give it a value, or remove the key if it is optional"
    if kind in _EXPECTED:
        hint = ""
        if kind.startswith("int") and isinstance(value, str | float):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number == int(number) and abs(number) < 1e9:
                hint = f"; write it in plain digits: {int(number)}"
            elif isinstance(value, str) and math.isfinite(number):
                hint = f"; write a whole number in plain digits (e.g. 96): YAML reads {value} as text, not a number"
        return f"expected {_EXPECTED[kind]}, got {type(value).__name__} {value!r}{hint}"
    if kind == "value_error" and "error" in err.get("ctx", {}):  # a validator's own message, naming the value
        return str(err["ctx"]["error"])
    return f"{err['msg']} (got {value!r})"


def described(source: str, overrides: list[str] | None) -> str:
    """How errors name a recipe: its file, and the overrides applied to it (a problem may come from either)."""
    return f"{source} with {' '.join(overrides)}" if overrides else source


def parse_recipe(data: Any, base: Path, source: str = "<recipe>") -> Recipe:
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty; start from a shipped one (recipes/*.yaml)")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping at the top level, got {type(data).__name__}")
    _resolve_paths(data, base)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in _relevant(exc.errors()):
            lines.append(f"  {_loc(err['loc'])}: {_schema_message(err)}")
        raise RecipeError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(lines)) from None
    problems = semantic_problems(recipe)
    if problems:
        raise RecipeError(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise RecipeError(f"recipe {problem}; pass the path of a YAML recipe (see recipes/)")
    try:
        data = read_yaml_file(path)
    except YamlLimitError as exc:
        where = f"line {exc.line}: " if exc.line else ""
        raise RecipeError(
            f"{path}: {where}{exc.problem}; refused unread (a recipe is a few kilobytes of plain data)"
        ) from None
    except DuplicateKeyError as exc:
        lines = "\n".join(f"  {p}" for p in exc.problems)
        raise RecipeError(f"{path}: {len(exc.problems)} problem(s):\n{lines}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe {path} ({exc.strerror})") from None
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    return parse_recipe(data, path.parent.resolve(), source=described(str(path), overrides))
