"""`sweep RECIPE`: calibrate once, then evaluate the recipe's masks at several sparsities against the same
baselines; one table and one plot."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from exporter.errors import MaskError, RecipeError
from exporter.evaluation.scorer import MaskScorer
from exporter.io import SWEEP_FOLDER, staged, write_json
from exporter.masking.collect import column_norms, persona_statistics
from exporter.masking.masks import compute_masks
from exporter.masking.steer import with_biases
from exporter.model.sources import load_model
from exporter.recipe.schema import Recipe
from exporter.reports.provenance import Timer
from exporter.reports.sweep import SweepPoint, SweepReport, plot_sweep, sweep_markdown
from exporter.stages.preflight import check_output, validate

log = logging.getLogger(__name__)


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
    if 0.0 in sparsities and (other is None or not other.prunes) and not recipe.method.steers:
        raise RecipeError(
            "--sparsity: 0 with no other unit pruned and no steering removes nothing (the dense model is already "
            "the baseline of every point); leave 0 out"
        )


def sweep(
    recipe: Recipe,
    sparsities: list[float],
    out: Path,
    *,
    unit: str = "mlp",
    overwrite: bool = False,
    reuse: Path | None = None,
) -> list[SweepPoint]:
    """Evaluate the recipe's method at each sparsity; writes report.json, report.md and sweep.png to `out`."""
    check_sweep(recipe, sparsities, unit)
    spec = recipe.eval
    assert spec is not None
    items = validate(recipe, reuse).items  # what `persona-export validate` checks
    assert items is not None  # the recipe has an eval section
    check_output(recipe, out, overwrite, SWEEP_FOLDER)
    m = load_model(recipe)
    timer = Timer()
    stats = {p: persona_statistics(recipe, p, m, reuse, timer)[0] for p in recipe.personas}
    col_sq = column_norms(m)
    scorer = MaskScorer(recipe, spec, items, m.model, m.tokenizer, m.adapter, stats)
    points: list[SweepPoint] = []
    for s in sparsities:
        prune = recipe.prune.with_sparsity(unit, s)
        log.info("sweep: %s sparsity %g", unit, s)
        try:
            masks = compute_masks(recipe, stats, col_sq, prune)
            masks = with_biases(recipe, masks, stats, m.model, m.adapter, torch.float32, prune)
        except MaskError as exc:
            points.append(SweepPoint(sparsity=s, error=str(exc)))
            continue
        evals = scorer.evaluate(masks, replies=False)
        points.append(SweepPoint(sparsity=s, unit=unit, prune=prune, personas=evals))
    report = SweepReport(
        recipe=recipe.name, recipe_sha256=recipe.digest(), unit=unit, method=recipe.method, points=points
    )
    with staged(out, overwrite, SWEEP_FOLDER) as stage:
        write_json(stage / "report.json", report.model_dump())
        plot_sweep(points, stage / "sweep.png")
        (stage / "report.md").write_text(sweep_markdown(recipe.name, points, "sweep.png"))
    return points
