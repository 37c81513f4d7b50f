"""Composite personas in a recipe: `personas.<name>.mix`, a weighted mix of the recipe's poles, and the rules a
mix must follow (`composite_problems`). How a composite's mask and biases are made: exporter/masking/mix.py.

    personas:
      INTJ: {mix: {introvert: 1, intuitive: 1, thinking: 1, judging: 1}}
      mix70: {mix: {introvert: 0.7, thinking: 0.3}, description: Mostly reserved, somewhat analytical.}

A weight of 1 gives a part as much removal and steering as the pole's own export has, 0.5 half of each.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from exporter.recipe.schema import Recipe


class MixSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mix: dict[str, float]  # pole -> weight (> 0)
    description: str | None = None  # default: the parts' descriptions (`mix_description`)


def ordered_parts(mix: dict[str, float]) -> list[tuple[str, float]]:
    """The parts by decreasing weight, then name: the order in which parts fill a shared removal slot, the same
    whatever order the recipe lists them in (the recipe's digest does not see that order either)."""
    return sorted(mix.items(), key=lambda item: (-item[1], item[0]))


def mix_description(spec: MixSpec, descriptions: dict[str, str]) -> str:
    """The composite's description: its own, else its parts' descriptions (with their weights when unequal)."""
    if spec.description is not None:
        return spec.description
    parts = ordered_parts(spec.mix)
    equal = len({w for _, w in parts}) == 1
    return " ".join(descriptions[p] if equal else f"{descriptions[p]} (weight {w:g})" for p, w in parts)


def composite_problems(r: Recipe) -> list[str]:
    """Every problem of the recipe's composites, with key paths: unknown parts, composites of composites, parts
    without a pair, non-positive weights, both poles of one pair, composites in `pairs`, settings that a
    composite cannot take."""
    problems: list[str] = []
    poles, composites = r.poles, r.composites
    pair_of = {name: i for i, pair in enumerate(r.pairs) for name in pair}
    for i, pair in enumerate(r.pairs):
        problems += [
            f"pairs.{i}: {name!r} is a composite (personas.{name}.mix); a pair opposes two personas calibrated on "
            "their own data"
            for name in pair
            if name in composites
        ]
    for name, spec in composites.items():
        where = f"personas.{name}.mix"
        if not spec.mix:
            problems.append(f"{where}: name at least one persona to mix, e.g. {{introvert: 1, thinking: 1}}")
        for part, weight in spec.mix.items():
            if part in composites:
                inner = ", ".join(f"{p}: {w:g}" for p, w in composites[part].mix.items())
                problems.append(
                    f"{where}.{part}: {part!r} is itself a composite; mix poles only (e.g. its parts {{{inner}}})"
                )
            elif part not in poles:
                problems.append(f"{where}.{part}: unknown persona {part!r}; known personas: {sorted(poles)}")
            elif part not in pair_of:
                problems.append(
                    f"{where}.{part}: {part!r} is in no pair; a part's units are scored and its steering taken "
                    "against its opposite pole: add it to 'pairs'"
                )
            if not (math.isfinite(weight) and weight > 0):
                problems.append(
                    f"{where}.{part}: the weight {weight!r} is not a positive number; give e.g. 1 (as much removal "
                    f"and steering as the {part} export alone) or 0.5 (half)"
                )
        by_pair: dict[int, list[str]] = {}
        for part in spec.mix:
            if part in pair_of and part in poles:
                by_pair.setdefault(pair_of[part], []).append(part)
        for i, both in sorted(by_pair.items()):
            if len(both) > 1:
                problems.append(
                    f"{where}: names {both[0]!r} and {both[1]!r}, the two poles of pairs.{i}; their steering "
                    "cancels and each removes the units the other keeps: keep one of them"
                )
    if composites:
        units = {"mlp": r.prune.mlp, "attention": r.prune.attention}
        problems += [
            f"prune.{kind}.amplify: a composite has no opposite whose mask names its own units to amplify; set "
            f"amplify to 1, or remove the composites ({sorted(composites)})"
            for kind, spec in units.items()
            if spec is not None and spec.amplify > 1
        ]
        if r.tune is not None and any(a > 1 for a in r.tune.amplify):
            problems.append(
                "tune.amplify: a composite has no opposite whose mask names its own units to amplify; keep the "
                "values at 1, or remove the composites"
            )
    return problems
