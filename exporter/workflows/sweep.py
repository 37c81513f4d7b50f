"""Commands built on the evaluation: `eval RUN_DIR` (evaluate a finished run's masks) and `sweep RECIPE`
(calibrate once, then evaluate the recipe's masks at several sparsities against the same baselines)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from exporter.errors import ExportFolderError, MaskError, OutputError, RecipeError
from exporter.evaluation.conditions import (
    Evaluator,
    WeightCondition,
    conditions,
    dense_parameters,
    evaluate_masks,
    persona_evaluation,
    prepare,
    score_conditions,
    system_prompt,
    wanda_norms,
)
from exporter.inputs import folder_problem, read_json_object
from exporter.io import check_target, link_copy, staged, write_json
from exporter.masking.masks import compute_masks, load_mask
from exporter.masking.statistics import column_norms, persona_statistics
from exporter.masking.steer import with_biases
from exporter.model.sources import load_model
from exporter.recipe.schema import AttentionPrune, MlpPrune, PruneSpec, Recipe, load_recipe, parse_recipe
from exporter.reports.markdown import write_run_reports
from exporter.reports.persona import read_report
from exporter.reports.provenance import Timer
from exporter.reports.sweep import plot_sweep, sweep_markdown
from exporter.workflows.validate import validate

log = logging.getLogger(__name__)


def evaluate_run_dir(run_dir: Path, recipe_path: str | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate the masks of a finished run; the eval section comes from `recipe_path` or the run's recipe.

    Calibration data (for the leak check and the Wanda baseline) always come from the run's own recipe.
    """
    fix = "pass the --out folder of a `run` (or re-run it)"
    problem = folder_problem(run_dir)
    if problem is not None:
        raise OutputError(f"{problem}; {fix}")
    if not (run_dir / "recipe.json").exists():
        raise OutputError(f"{str(run_dir)!r} is not a run folder (no recipe.json); {fix}")
    recipe = parse_recipe(
        read_json_object(run_dir / "recipe.json", OutputError, fix), run_dir, str(run_dir / "recipe.json")
    )
    spec = load_recipe(recipe_path).eval if recipe_path else recipe.eval
    if spec is None:
        raise RecipeError(f"{recipe_path or run_dir / 'recipe.json'}: no eval section; add one or pass --recipe")
    items = prepare(recipe, spec)
    run_info = read_json_object(run_dir / "run.json", OutputError, fix)  # every file is read before the model
    try:
        reports = {p: read_report(run_dir / p) for p in recipe.personas}
    except ExportFolderError as exc:
        raise OutputError(f"{exc}; or {fix}") from None
    masks = {p: load_mask(run_dir / p / "masks.safetensors") for p in recipe.personas}
    check_target(run_dir, overwrite=True)  # the run folder can be written, before the model loads
    m = load_model(recipe)
    if run_info.get("model_sha256") != m.model_sha256:
        raise OutputError(f"{run_dir}: the run was made from another model file than the recipe now loads")
    evaluations = evaluate_masks(recipe, spec, items, m.model, m.tokenizer, m.adapter, masks)
    with staged(run_dir, overwrite=True) as stage:  # every report changes in one step, or none
        link_copy(run_dir, stage)
        write_run_reports(stage, recipe.name, evaluations, reports)
    return evaluations


def parse_sparsities(text: str) -> list[float]:
    """`--sparsity 0.01,0.02`: fractions in [0, 1), each given once; every problem is reported at once."""
    values: list[float] = []
    problems: list[str] = []
    for i, item in enumerate(text.split(","), 1):
        item = item.strip()
        if not item:
            problems.append(f"item {i} is empty")
            continue
        try:
            value = float(item)
        except ValueError:
            problems.append(f"item {i} ({item!r}) is not a number")
            continue
        if not math.isfinite(value) or not 0.0 <= value < 1.0:
            problems.append(f"item {i} ({item!r}) is not a fraction in [0, 1)")
        elif value in values:
            problems.append(f"item {i} ({item!r}) repeats an earlier value")
        else:
            values.append(value)
    if problems:
        raise RecipeError(
            f"--sparsity {text!r}: {'; '.join(problems)}; give fractions separated by commas, e.g. 0.01,0.02,0.05"
        )
    return values


def check_sweep(recipe: Recipe, sparsities: list[float], unit: str) -> None:
    """Before anything is loaded: an eval section, some values, and no point that removes nothing."""
    if recipe.eval is None:
        raise RecipeError("sweep: the recipe has no eval section; add one (see recipes/*-shared-eval.yaml)")
    if not sparsities:
        raise RecipeError("sweep: no sparsity given; pass e.g. --sparsity 0.01,0.02,0.05")
    other = recipe.prune.attention if unit == "mlp" else recipe.prune.mlp
    if 0.0 in sparsities and (other is None or other.sparsity == 0) and recipe.method.steer == 0:
        raise RecipeError(
            "--sparsity: 0 with no other unit pruned and no steering removes nothing (the dense model is already "
            "the baseline of every point); leave 0 out"
        )


def with_sparsity(prune: PruneSpec, unit: str, sparsity: float) -> PruneSpec:
    """The recipe's prune section with the MLP (or attention) sparsity replaced."""
    if unit == "mlp":
        mlp = prune.mlp.model_copy(update={"sparsity": sparsity}) if prune.mlp else MlpPrune(sparsity=sparsity)
        return prune.model_copy(update={"mlp": mlp})
    kind = prune.attention.unit if prune.attention else "kv-group"
    return prune.model_copy(update={"attention": AttentionPrune(unit=kind, sparsity=sparsity)})


def sweep(
    recipe: Recipe,
    sparsities: list[float],
    out: Path,
    *,
    unit: str = "mlp",
    overwrite: bool = False,
    reuse: Path | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the recipe's method at each sparsity; writes report.json, report.md and sweep.png to `out`."""
    check_sweep(recipe, sparsities, unit)
    spec = recipe.eval
    assert spec is not None
    items = validate(recipe, reuse).items  # what `persona-export validate` checks
    assert items is not None  # the recipe has an eval section
    check_target(out, overwrite)
    m = load_model(recipe)
    timer = Timer()
    stats = {p: persona_statistics(recipe, p, m, reuse, timer)[0] for p in recipe.personas}
    col_sq = column_norms(m)
    ev = Evaluator(m.model, m.tokenizer, m.adapter, spec, items)
    norms = {}
    if "wanda" in spec.baselines:
        norms = {p: wanda_norms(recipe, m.model, m.tokenizer, m.adapter, p) for p in recipe.personas}
    prompts = {p: system_prompt(recipe, spec, p) for p in recipe.personas}
    dense = WeightCondition(None, 0, sorted(recipe.personas) if "prompt" in spec.baselines else [])
    done = score_conditions(ev, {"dense": dense}, prompts)
    n_dense = dense_parameters(m.model)
    points: list[dict[str, Any]] = []
    for s in sparsities:
        prune = with_sparsity(recipe.prune, unit, s)
        log.info("sweep: %s sparsity %g", unit, s)
        try:
            masks = compute_masks(recipe, stats, col_sq, prune)
            masks = with_biases(recipe, masks, stats, m.model, m.adapter, torch.float32, prune)
        except MaskError as exc:
            points.append({"sparsity": s, "error": str(exc)})
            continue
        raw = score_conditions(ev, conditions(ev, masks, norms), prompts, done=done)
        evals = {p: persona_evaluation(recipe, spec, items, raw, p, masks[p], n_dense) for p in masks}
        points.append({"sparsity": s, "unit": unit, "prune": prune.model_dump(mode="json"), "personas": evals})
    with staged(out, overwrite) as stage:
        write_json(
            stage / "report.json",
            {
                "recipe": recipe.name,
                "recipe_sha256": recipe.digest(),
                "unit": unit,
                "method": recipe.method.model_dump(mode="json"),
                "points": points,
            },
        )
        plot_sweep(points, stage / "sweep.png")
        (stage / "report.md").write_text(sweep_markdown(recipe.name, points, "sweep.png"))
    return points
