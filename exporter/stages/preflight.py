"""Every check of a recipe that needs no model weights, made by `persona-export validate` and again by `run`,
`sweep` and `tune` before a model is loaded, so that a recipe that validates is not refused later for its data
or its model folder: the schema and its rules (push destinations included, see exporter/recipe/), each
persona's calibration data, the eval section with its data files, the tune section's validation items, the
model source without reading weights (a `model.path` folder with a config.json object of a supported
architecture), limits set by the model's context length, what the requested export formats need of that
config.json, and a `--reuse-stats` folder with its statistics files. `export --format` checks a persona's
hf/config.json the same way (exporter/recipe/formats.py `format_problems`) before it loads a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exporter.errors import OutputError, RecipeError
from exporter.evaluation.items import EvalItems, check_disjoint_splits, prepare
from exporter.inputs import file_problem, folder_problem
from exporter.masking.data import select_samples
from exporter.masking.statistics import UNREADABLE, Statistics
from exporter.recipe.formats import BASE_FIX, format_problems
from exporter.recipe.rules import check_limits
from exporter.recipe.schema import Recipe
from exporter.recipe.tune import tune_validation


@dataclass(frozen=True)
class Validated:
    samples: dict[str, int]  # persona -> calibration samples selected
    items: EvalItems | None  # the eval section's items, read and checked; None without an eval section
    tune_items: EvalItems | None = None  # the tune section's validation items, likewise


def validate(recipe: Recipe, reuse: Path | None = None) -> Validated:
    """Raise the project's error for the first kind of problem found; the recipe itself was checked when it
    loaded. Nothing is loaded or written."""
    from exporter.model import sources

    samples = {name: len(select_samples(p.calibration)) for name, p in recipe.personas.items()}
    items = prepare(recipe) if recipe.eval else None
    tune_items = prepare(recipe, tune_validation(recipe.tune)) if recipe.tune else None  # what tune ranks on
    if items is not None and tune_items is not None:
        check_disjoint_splits(tune_items, items)
    if recipe.model.path is not None:
        sources.resolve(recipe.model)  # config.json, weights present, architecture: no weights are read
        config = sources.read_config(Path(recipe.model.path))
        check_limits(recipe, config)
        problems = format_problems(recipe.output.formats, config, Path(recipe.model.path) / "config.json", BASE_FIX)
        if problems:
            raise RecipeError("output.formats: " + "; ".join(problems))
    elif recipe.model.embedded is not None:
        sources.resolve(recipe.model)
    if reuse is not None:
        check_reuse(recipe, reuse)
    return Validated(samples, items, tune_items)


def check_reuse(recipe: Recipe, reuse: Path) -> None:
    """`--reuse-stats RUN_DIR`: a folder; each statistics file of a persona in it must be readable."""
    problem = folder_problem(reuse)
    if problem is not None:
        raise OutputError(f"--reuse-stats: {problem}; pass the --out folder of an earlier run")
    for name in recipe.personas:
        saved = reuse / "stats" / f"{name}.safetensors"
        if saved.exists() or saved.is_symlink():
            for path in (saved, saved.with_suffix(".json")):
                if (problem := file_problem(path)) is not None:
                    raise OutputError(f"--reuse-stats: {problem}; remove it, or run without --reuse-stats")
            try:
                Statistics.load(saved)
            except UNREADABLE as exc:
                raise OutputError(
                    f"--reuse-stats: {saved} cannot be read ({type(exc).__name__}: {exc}); delete it (and its "
                    ".json) to recalibrate that persona, or run without --reuse-stats"
                ) from None
