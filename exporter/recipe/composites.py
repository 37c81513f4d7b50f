"""Composite personas in a recipe: `personas.<name>.mix`, a weighted mix of the recipe's poles. The rules a
mix must follow: exporter/recipe/rules.py (`composite_problems`). How a composite's mask and biases are made:
exporter/masking/mix.py.

    personas:
      INTJ: {mix: {introvert: 1, intuitive: 1, thinking: 1, judging: 1}}
      mix70: {mix: {introvert: 0.7, thinking: 0.3}, description: Mostly reserved, somewhat analytical.}

A weight of 1 gives a part as much removal and steering as the pole's own export has, 0.5 half of each.
`scale` multiplies every weight (`ESTJ: {mix: {extravert: 1, sensing: 1, thinking: 1, judging: 1}, scale: 0.4}`
is the four poles at 0.4 each): the strength `tune.mix_scale` chooses.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MixSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mix: dict[str, float]  # pole -> weight (> 0)
    # every weight times this (`weights`): the composite's strength, which `tune.mix_scale` chooses (it sets this
    # key, so a tuned recipe tunes again from the weights as written)
    scale: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    description: str | None = None  # default: the parts' descriptions (`mix_description`)

    @property
    def weights(self) -> dict[str, float]:
        """Each part's weight as applied: its `mix` weight times `scale` (removal quota and steering bias)."""
        if self.scale == 1.0:
            return dict(self.mix)
        return {p: round(w * self.scale, 6) for p, w in self.mix.items()}


def ordered_parts(mix: dict[str, float]) -> list[tuple[str, float]]:
    """The parts by decreasing weight, then name: the order in which parts fill a shared removal slot, the same
    whatever order the recipe lists them in (the recipe's digest does not see that order either)."""
    return sorted(mix.items(), key=lambda item: (-item[1], item[0]))


def mix_description(spec: MixSpec, descriptions: dict[str, str]) -> str:
    """The composite's description: its own, else its parts' descriptions (with their weights when unequal)."""
    if spec.description is not None:
        return spec.description
    parts = ordered_parts(spec.mix)  # the weights as written: the scale does not change what the mix is
    equal = len({w for _, w in parts}) == 1
    return " ".join(descriptions[p] if equal else f"{descriptions[p]} (weight {w:g})" for p, w in parts)
