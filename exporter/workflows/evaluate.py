"""`eval RUN_DIR`: evaluate a finished run's persona masks against baselines, into its reports."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.errors import ExportFolderError, OutputError, RecipeError
from exporter.inputs import folder_problem, read_json_object
from exporter.io import RUN_FOLDER, check_target, link_copy, refuse_links, staged
from exporter.recipe.load import apply_overrides, described, load_recipe, parse_recipe
from exporter.reports.markdown import write_run_reports
from exporter.reports.persona import read_report

if TYPE_CHECKING:
    from exporter.masking.stats import Statistics


def evaluate_run_dir(
    run_dir: Path, recipe_path: str | None = None, overrides: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Evaluate the masks of a finished run; the eval section comes from `recipe_path` or the run's recipe,
    with `overrides` (eval.KEY=VALUE only, e.g. eval.baselines=all) applied to it.

    Calibration data (for the leak check and the Wanda baseline) always come from the run's own recipe.
    """
    overrides = overrides or []
    for item in overrides:
        if not item.startswith("eval."):
            raise RecipeError(
                f"override {item!r}: `eval` takes overrides of the eval section only (eval.KEY=VALUE, e.g. "
                "eval.baselines=all); the masks were made by the run's recipe"
            )
    fix = "pass the --out folder of a `run` (or re-run it)"
    if run_dir.is_symlink():
        raise OutputError(f"{str(run_dir)!r} is a symlink; pass the run folder itself ({run_dir.resolve()})")
    problem = folder_problem(run_dir)
    if problem is not None:
        raise OutputError(f"{problem}; {fix}")
    if not (run_dir / "recipe.json").exists():
        raise OutputError(f"{str(run_dir)!r} is not a run folder (no recipe.json); {fix}")
    refuse_links(run_dir, "replace each link with the file itself")  # eval rewrites the run's reports
    data = read_json_object(run_dir / "recipe.json", OutputError, fix)
    own = str(run_dir / "recipe.json")
    if recipe_path:
        recipe = parse_recipe(data, run_dir, own)
    else:
        recipe = parse_recipe(apply_overrides(data, overrides), run_dir, described(own, overrides))
    spec = load_recipe(recipe_path, overrides).eval if recipe_path else recipe.eval
    if spec is None:
        raise RecipeError(f"{recipe_path or run_dir / 'recipe.json'}: no eval section; add one or pass --recipe")
    # torch and the model code are imported once the recipe and its overrides were read: bad YAML is refused at once
    from exporter.evaluation.conditions import evaluate_masks, prepare
    from exporter.masking.masks import load_mask
    from exporter.model.sources import load_model

    items = prepare(recipe, spec)
    run_info = read_json_object(run_dir / "run.json", OutputError, fix)  # every file is read before the model
    try:
        reports = {p: read_report(run_dir / p) for p in recipe.personas}
    except ExportFolderError as exc:
        raise OutputError(f"{exc}; or {fix}") from None
    masks = {p: load_mask(run_dir / p / "masks.safetensors") for p in recipe.personas}
    stats = saved_statistics(run_dir, list(recipe.personas))
    check_target(run_dir, True, RUN_FOLDER)  # the run folder can be written, before the model loads
    m = load_model(recipe)
    if run_info.get("model_sha256") != m.model_sha256:
        raise OutputError(f"{run_dir}: the run was made from another model file than the recipe now loads")
    evaluations = evaluate_masks(recipe, spec, items, m.model, m.tokenizer, m.adapter, masks, stats)
    with staged(run_dir, True, RUN_FOLDER) as stage:  # every report changes in one step, or none
        link_copy(run_dir, stage)
        write_run_reports(stage, recipe.name, evaluations, reports)
    return evaluations


def saved_statistics(run_dir: Path, personas: list[str]) -> dict[str, Statistics]:
    """The run's own calibration statistics where they can be read (they spare the Wanda baseline a pass over
    the calibration data); a persona whose file is missing or unreadable gets that pass instead."""
    from exporter.masking.stats import UNREADABLE, Statistics

    out = {}
    for p in personas:
        try:
            out[p] = Statistics.load(run_dir / "stats" / f"{p}.safetensors")[0]
        except UNREADABLE:
            continue
    return out
