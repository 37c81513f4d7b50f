"""`validate`: every check of a recipe that needs no model, run by `persona-export validate` and again by
`run` and `sweep` before a model is loaded: the schema and its rules (push destinations included, see
exporter/recipe/), each persona's calibration data, and the eval section with its data files."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.evaluation.conditions import prepare
from exporter.evaluation.items import EvalItems
from exporter.masking.data import select_samples
from exporter.recipe.schema import Recipe


@dataclass(frozen=True)
class Validated:
    samples: dict[str, int]  # persona -> calibration samples selected
    items: EvalItems | None  # the eval section's items, read and checked; None without an eval section


def validate(recipe: Recipe) -> Validated:
    """Raise the project's error for the first data problem; the recipe itself was checked when it loaded."""
    samples = {name: len(select_samples(p.calibration)) for name, p in recipe.personas.items()}
    return Validated(samples, prepare(recipe) if recipe.eval else None)
