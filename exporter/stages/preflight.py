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

import exporter
from exporter.errors import OutputError, RecipeError
from exporter.evaluation.items import EvalItems, prepare
from exporter.inputs import file_problem, folder_problem
from exporter.io import Product, check_target
from exporter.masking.data import select_samples
from exporter.masking.statistics import UNREADABLE, Statistics
from exporter.recipe.formats import BASE_FIX, format_problems
from exporter.recipe.paths import data_files
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

    samples = {
        name: len(select_samples(p.calibration, f"personas.{name}.calibration.path"))
        for name, p in recipe.personas.items()
    }
    items = prepare(recipe) if recipe.eval else None
    tune_items = prepare(recipe, tune_validation(recipe.tune), "tune.validation") if recipe.tune else None
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


PACKAGE = Path(exporter.__file__).resolve().parent  # the project's own code
SHIPPED = PACKAGE.parent / "recipes"  # the shipped recipes and their data, in a source checkout


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(recipe: Recipe, out: Path, overwrite: bool, product: Product) -> None:
    """Before any work: `out` can be written (check_target), is not inside what a run reads or ships (the model
    folder, the project's code, the shipped recipes/), and, when --overwrite would replace it, holds none of
    the recipe's inputs (they would go with it)."""
    check_target(out, overwrite, product)
    where = out.absolute().resolve()  # the folder the output would be, links in its parents followed
    inputs = {"the project's code": PACKAGE, "the shipped recipes/": SHIPPED}
    if recipe.model.path is not None:
        inputs["the model folder (model.path)"] = Path(recipe.model.path).resolve()
    for what, folder in inputs.items():
        if _within(where, folder):
            raise OutputError(
                f"--out {str(out)!r} is inside {what} ({folder}); outputs are kept apart from what a run reads "
                "and from the project's files: choose a folder elsewhere, e.g. runs/NAME"
            )
    if not out.exists():
        return
    held = {"model.path": Path(recipe.model.path)} if recipe.model.path is not None else {}
    for key, path in {**held, **data_files(recipe)}.items():
        if _within(Path(path).resolve(), where):
            raise OutputError(
                f"--out {str(out)!r} holds {key} ({path}); --overwrite would delete it with the old output: "
                "move the file out of that folder or choose another --out"
            )
