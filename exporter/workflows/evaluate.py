"""`eval RUN_DIR`: evaluate a finished run's persona masks against baselines, into its reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exporter.errors import OutputError, RecipeError
from exporter.evaluation.conditions import evaluate_masks, prepare
from exporter.masking.masks import PersonaMask
from exporter.model.sources import load_model
from exporter.recipe.load import load_recipe, parse_recipe
from exporter.reports.markdown import write_run_reports
from exporter.reports.persona import read_report


def evaluate_run_dir(run_dir: Path, recipe_path: str | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate the masks of a finished run; the eval section comes from `recipe_path` or the run's recipe.

    Calibration data (for the leak check and the Wanda baseline) always come from the run's own recipe.
    """
    if not (run_dir / "recipe.json").is_file():
        raise OutputError(f"{str(run_dir)!r} is not a run folder (no recipe.json); pass the --out of a `run`")
    recipe = parse_recipe(json.loads((run_dir / "recipe.json").read_text()), run_dir, str(run_dir / "recipe.json"))
    spec = load_recipe(recipe_path).eval if recipe_path else recipe.eval
    if spec is None:
        raise RecipeError(f"{recipe_path or run_dir / 'recipe.json'}: no eval section; add one or pass --recipe")
    items = prepare(recipe, spec)
    m = load_model(recipe)
    run_info = json.loads((run_dir / "run.json").read_text())
    if run_info.get("model_sha256") != m.model_sha256:
        raise OutputError(f"{run_dir}: the run was made from another model file than the recipe now loads")
    masks = {p: PersonaMask.load(run_dir / p / "masks.safetensors") for p in recipe.personas}
    reports = {p: read_report(run_dir / p) for p in recipe.personas}
    evaluations = evaluate_masks(recipe, spec, items, m.model, m.tokenizer, m.adapter, masks)
    write_run_reports(run_dir, recipe.name, evaluations, reports)
    return evaluations
