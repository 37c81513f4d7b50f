"""`eval RUN_DIR`: evaluate a finished run's persona masks against baselines, into its reports."""

from __future__ import annotations

from pathlib import Path

from exporter.errors import ExportFolderError, OutputError, RecipeError
from exporter.folders.run_folder import RunFolder
from exporter.io import RUN_FOLDER, check_target, link_copy, refuse_links, staged
from exporter.recipe.load import load_recipe
from exporter.reports.evaluation import PersonaEvaluation
from exporter.reports.markdown import write_run_reports

FIX = "pass the --out folder of a `run` (or re-run it)"


def evaluate_run_dir(
    run_dir: Path, recipe_path: str | None = None, overrides: list[str] | None = None
) -> dict[str, PersonaEvaluation]:
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
    if run_dir.is_symlink():
        raise OutputError(f"{str(run_dir)!r} is a symlink; pass the run folder itself ({run_dir.resolve()})")
    run = RunFolder(run_dir, OutputError, FIX).check()
    refuse_links(run_dir, "replace each link with the file itself")  # eval rewrites the run's reports
    recipe = run.recipe() if recipe_path else run.recipe(overrides)
    spec = load_recipe(recipe_path, overrides).eval if recipe_path else recipe.eval
    if spec is None:
        raise RecipeError(f"{recipe_path or run_dir / 'recipe.json'}: no eval section; add one or pass --recipe")
    # torch and the model code are imported once the recipe and its overrides were read: bad YAML is refused at once
    from exporter.evaluation.items import prepare
    from exporter.evaluation.scorer import MaskScorer
    from exporter.model.sources import load_model

    items = prepare(recipe, spec)
    info = run.info()  # every file is read before the model
    try:
        reports = {p: run.persona(p).report() for p in recipe.personas}
    except ExportFolderError as exc:
        raise OutputError(f"{exc}; or {FIX}") from None
    masks = {p: run.persona(p).mask() for p in recipe.personas}
    stats = {p: s for p in recipe.personas if (s := run.statistics(p)) is not None}  # else a calibration pass
    check_target(run_dir, True, RUN_FOLDER)  # the run folder can be written, before the model loads
    m = load_model(recipe)
    if info.get("model_sha256") != m.model_sha256:
        raise OutputError(f"{run_dir}: the run was made from another model file than the recipe now loads")
    evaluations = MaskScorer(recipe, spec, items, m.model, m.tokenizer, m.adapter, stats).evaluate(masks)
    with staged(run_dir, True, RUN_FOLDER) as stage:  # every report changes in one step, or none
        link_copy(run_dir, stage)
        write_run_reports(stage, recipe.name, evaluations, reports)
    return evaluations
