"""The `run` orchestrator: recipe -> load -> calibrate -> score/mask -> prune -> export -> verify -> eval -> push.

Each stage lives in its own module; this file only wires them, times them and writes the run's manifests.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from exporter.evaluation.scorer import MaskScorer
from exporter.export.hf import DTYPES
from exporter.io import RUN_FOLDER, staged
from exporter.masking.collect import column_norms, down_weights, persona_statistics
from exporter.masking.masks import compute_masks
from exporter.masking.mix import composite_masks
from exporter.masking.statistics import Statistics
from exporter.masking.steer import with_biases
from exporter.model.checkpoint import checkpoint_dtype
from exporter.model.sources import Loaded, open_model, parameter_count
from exporter.recipe.rules import check_limits
from exporter.recipe.schema import Recipe
from exporter.reports.markdown import write_run_reports
from exporter.reports.provenance import Timer, versions
from exporter.stages.persona import export_persona
from exporter.stages.preflight import check_output, validate
from exporter.stages.space import check_run_space
from exporter.verify.hf import build_prompts, references

log = logging.getLogger(__name__)


def bounded(recipe: Recipe) -> Recipe:
    """With a memory budget the float64 proof is layer by layer and calibration reads one layer at a time."""
    if recipe.model.max_memory is None:
        return recipe
    return recipe.model_copy(
        update={
            "calibration": recipe.calibration.model_copy(update={"layerwise": True}),
            "verify": recipe.verify.model_copy(update={"layerwise": True}),
        }
    )


def run(
    recipe: Recipe, out: Path, *, overwrite: bool = False, reuse: Path | None = None, use_cache: bool = True
) -> dict[str, Any]:
    """Run the whole pipeline into `out` (atomically). Returns the run summary (also in run.json)."""
    eval_items = validate(recipe, reuse).items  # what `persona-export validate` checks, before the model loads
    check_output(recipe, out, overwrite, RUN_FOLDER)
    recipe_sha = recipe.digest()  # the recipe as validated: before `auto` and a memory budget are resolved below
    recipe = bounded(recipe)
    params = parameter_count(recipe.model)
    if params is not None:  # before the model loads; a Hub model's size is known once it is downloaded
        check_run_space(recipe, out, params)
    timer = Timer()
    t = time.perf_counter()
    log.info("loading the model (%s)", recipe.model.embedded or recipe.model.path or recipe.model.hub)
    with open_model(recipe) as m:
        if params is None:
            check_run_space(recipe, out, sum(p.numel() for p in m.model.parameters()))
        if recipe.output.dtype == "auto":  # the source checkpoint's dtype
            recipe = recipe.model_copy(update={"output": recipe.output.resolved(checkpoint_dtype(m.resolved.folder))})
        timer.add("load", t)
        prompts = build_prompts(m.tokenizer, recipe.verify.prompts)
        check_limits(recipe, m.model.config.to_dict(), max(len(ids[0]) for ids, _ in prompts.singles))
        scorer = None
        if eval_items is not None:  # an eval item that does not fit eval.max_tokens fails now, not after the exports
            assert recipe.eval is not None
            scorer = MaskScorer(recipe, recipe.eval, eval_items, m.model, m.tokenizer, m.adapter)
        with staged(out, overwrite, RUN_FOLDER) as stage:
            stats, infos = statistics_into(stage, recipe, m, reuse, timer, use_cache)
            t = time.perf_counter()
            col_sq = column_norms(m)
            # every pole's mask (the ingredients of composites), the exported composites' masks
            masks = compute_masks(recipe, stats, col_sq) | composite_masks(recipe, stats, col_sq, recipe.exported)
            storage = DTYPES[recipe.output.dtype]
            masks = with_biases(recipe, masks, stats, m.model, m.adapter, storage, down=down_weights(m))
            masks = {name: masks[name] for name in recipe.exported}
            timer.add("score", t)
            refs = references(m, DTYPES[recipe.output.dtype], exact=not recipe.verify.layerwise)
            reports = {
                name: export_persona(recipe, recipe_sha, name, m, masks[name], infos, refs, prompts, stage, timer)
                for name in recipe.exported
            }
            if scorer is not None:
                t = time.perf_counter()
                scorer.stats = stats  # spares the Wanda baseline a second pass over the calibration data
                evaluations = scorer.evaluate(masks, timings=timer.stages)
                reports = write_run_reports(stage, recipe.name, evaluations, reports)
                timer.add("eval", t)
            summary = {
                "recipe": recipe.name,
                "recipe_sha256": recipe_sha,
                "base_model": m.resolved.base_model,
                "model_sha256": m.model_sha256,
                "personas": {n: r.status for n, r in reports.items()},
                "timings_s": timer.stages,
                "versions": versions(),
            }
            (stage / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2))
            (stage / "run.json").write_text(json.dumps(summary, indent=2))
        if recipe.push is not None:  # only once the run folder is complete; pushes personas that passed
            from exporter.publish.hub import push_run

            push_run(out, recipe.push)
    summary["reports"] = reports
    return summary


def statistics_into(
    stage: Path, recipe: Recipe, m: Loaded, reuse: Path | None, timer: Timer, use_cache: bool
) -> tuple[dict[str, Statistics], dict[str, dict[str, Any]]]:
    """Every pole's statistics (exported or mixed into an exported composite), saved to `stage/stats`, and their
    manifests with sample and token counts."""
    (stage / "stats").mkdir()
    all_stats: dict[str, Statistics] = {}
    infos: dict[str, dict[str, Any]] = {}
    for name in recipe.poles:
        stats, info = persona_statistics(recipe, name, m, reuse, timer, use_cache)
        stats.save(stage / "stats" / f"{name}.safetensors", info)
        all_stats[name] = stats
        infos[name] = {**info, "n_samples": stats.n_samples, "n_tokens": stats.n_tokens}
    return all_stats, infos
