"""Recipes from YAML: read with `safe_load`, `key.path=value` overrides applied, relative paths resolved
against the recipe file's folder, then validated into the typed schema (exporter/recipe/schema.py).

Every problem in a recipe is reported at once, each with its key path (`personas.introvert.calibration.path`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from exporter.errors import RecipeError
from exporter.recipe.schema import Recipe, semantic_problems


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<top level>"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
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
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    def fix(p: Any) -> Any:
        return str((base / p).resolve()) if isinstance(p, str) and not Path(p).is_absolute() else p

    model = data.get("model")
    if isinstance(model, dict) and "path" in model:
        model["path"] = fix(model["path"])
    personas = data.get("personas")
    if isinstance(personas, dict):
        for spec in personas.values():
            cal = spec.get("calibration") if isinstance(spec, dict) else None
            if isinstance(cal, dict) and "path" in cal:
                cal["path"] = fix(cal["path"])
    tune = data.get("tune")
    for ev in (data.get("eval"), tune.get("validation") if isinstance(tune, dict) else None):
        if not isinstance(ev, dict):
            continue
        sections = [ev.get(k) for k in ("paired", "statements", "neutral", "replies")]
        paired = ev.get("paired")
        if isinstance(paired, dict) and isinstance(paired.get("responses"), dict):
            sections += list(paired["responses"].values())
        for section in sections:
            if isinstance(section, dict) and "path" in section:
                section["path"] = fix(section["path"])


def parse_recipe(data: Any, base: Path, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping at the top level, got {type(data).__name__}")
    _resolve_paths(data, base)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if err["type"] == "extra_forbidden":
                msg = "unknown key (misspelled? remove it or check the recipe reference in README.md)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            else:
                msg = f"{err['msg']} (got {err.get('input')!r})"
            lines.append(f"  {_loc(err['loc'])}: {msg}")
        raise RecipeError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(lines)) from None
    problems = semantic_problems(recipe)
    if problems:
        raise RecipeError(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist; pass the path of a YAML recipe (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    return parse_recipe(data, path.parent.resolve(), source=str(path))
