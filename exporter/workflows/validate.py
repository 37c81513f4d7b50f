"""`persona-export validate`: every check made before a model loads (exporter/stages/preflight.py), and what the
recipe would read: each persona's calibration samples, the evaluation's and the tune grid's items."""

from __future__ import annotations

from exporter.evaluation.items import EvalItems
from exporter.recipe.eval import EvalSpec, set_spec
from exporter.recipe.schema import Recipe
from exporter.recipe.tune import tune_validation
from exporter.stages.preflight import validate


def item_lines(label: str, spec: EvalSpec, items: EvalItems) -> list[str]:
    """What an evaluation reads, one line per source: counts selected and the file they come from."""
    parts = [
        (spec.paired, len(items.paired), "paired items"),
        (spec.choices, len(items.choices), "A/B choices"),
        (spec.statements, len(items.statements), "statements"),
        (spec.replies, len(items.reply_prompts), "reply prompts"),
        (spec.neutral, len(items.neutral), "neutral paragraphs"),
    ]
    lines = [f"  {label}: {n} {what} from {source.path}" for source, n, what in parts if source is not None]
    if spec.unpaired is not None:
        lines += [
            f"  {label}: {len(items.unpaired.get(name, []))} unpaired {name} answers from {src.path}"
            for name, src in spec.unpaired.responses.items()
        ]
    for item_set in spec.sets:
        lines += item_lines(f"{label} {item_set.name}", set_spec(item_set, spec), items.sets[item_set.name])
    return lines


def validate_recipe(recipe: Recipe) -> list[str]:
    """Check `recipe` (raising the project's error for the first kind of problem) and list what it reads."""
    checked = validate(recipe)
    lines = [
        f"  {name}: {checked.samples[name]} calibration samples from {persona.calibration.path}"
        for name, persona in recipe.poles.items()
    ]
    for name, mix in recipe.composites.items():
        parts = ", ".join(f"{p} {w:g}" for p, w in mix.mix.items())
        scaled = f", all x scale {mix.scale:g}" if mix.scale != 1 else ""
        lines.append(f"  {name}: a composite of {parts}{scaled} (no calibration of its own)")
    if recipe.output.personas is not None:
        lines.append(f"  exported: {', '.join(recipe.exported)} (output.personas)")
    if recipe.eval is not None and checked.items is not None:
        lines += item_lines("eval", recipe.eval, checked.items)
    if recipe.tune is not None and checked.tune_items is not None:
        lines += item_lines("tune", tune_validation(recipe.tune), checked.tune_items)
    return lines
