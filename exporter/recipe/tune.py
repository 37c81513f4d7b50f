"""The tune section as recipes: the setting of each point of its grid, the recipe at that point, the setting as
one persona's export sees it, and the validation items as an eval section."""

from __future__ import annotations

import itertools
from typing import Any

from exporter.recipe.eval import EvalSpec
from exporter.recipe.schema import MethodSpec, MlpPrune, Recipe, SteerVector, Strict, TuneSpec, per_persona

PerPersona = float | dict[str, float]  # one value for every persona, or one per persona
OWN = ("sparsity", "steer", "steer_layers", "steer_vector")  # the settings a persona can take on its own


class Setting(Strict):
    """One point of the tune grid: MLP sparsity, steering alpha, layers and vector kind, compensation, soft-mask
    factor and amplification."""

    sparsity: PerPersona
    steer: PerPersona
    steer_layers: PerPersona = 1.0
    steer_vector: SteerVector | dict[str, SteerVector] = "mlp"
    compensate: str
    gamma: float = 0.0
    amplify: float = 1.0
    # tune.mix_scale: each composite's `scale`, the factor on its weights as written (the personas scored are
    # composites; the pole settings above are the recipe's)
    mix_scale: PerPersona | None = None

    def applied(self, recipe: Recipe) -> Recipe:
        """`recipe` with this setting."""
        prune = recipe.prune.with_sparsity("mlp", self.sparsity)
        assert prune.mlp is not None
        update = {"compensate": self.compensate, "gamma": self.gamma, "amplify": self.amplify}
        prune = prune.model_copy(update={"mlp": prune.mlp.model_copy(update=update)})
        steering = {"steer": self.steer, "steer_layers": self.steer_layers, "steer_vector": self.steer_vector}
        method = recipe.method.model_copy(update=steering)
        changes: dict[str, Any] = {"prune": prune, "method": method}
        if self.mix_scale is not None:
            personas = dict(recipe.personas)
            for name, spec in recipe.composites.items():
                scale = per_persona(self.mix_scale, name, spec.scale)  # one not in a mapping keeps its own
                personas[name] = spec.model_copy(update={"scale": scale})
            changes["personas"] = personas
        return recipe.model_copy(update=changes)

    def own(self) -> tuple[str, ...]:
        """The settings a persona takes on its own at this point: a composite its mix factor; with amplify > 1 a
        pole's export also depends on its partner's mask, so its sparsity stays common."""
        if self.mix_scale is not None:
            return ("mix_scale",)
        return OWN if self.amplify == 1 else OWN[1:]

    @property
    def per_persona(self) -> bool:
        """Some setting a persona can take on its own is given per persona."""
        return any(isinstance(getattr(self, k), dict) for k in self.own())

    def for_persona(self, persona: str) -> Setting:
        """The setting as one persona's export sees it: its own sparsity and steering (alpha, depth), by the
        recipe's rules for a persona left out of a per-persona mapping; a composite its own mix factor."""
        if self.mix_scale is not None:
            return self.model_copy(update={"mix_scale": per_persona(self.mix_scale, persona, 1.0)})
        method = MethodSpec.model_construct(
            steer=self.steer, steer_layers=self.steer_layers, steer_vector=self.steer_vector
        )
        sparsity = per_persona(self.sparsity, persona, 0.0)
        own = {
            "sparsity": sparsity,
            "steer": method.alpha(persona),
            "steer_layers": method.depth(persona),
            "steer_vector": method.vector(persona),
        }
        return self.model_copy(update=own)


def grid(recipe: Recipe) -> list[tuple[Setting, Recipe]]:
    """Every point of the recipe's tune grid: its setting and the recipe with it."""
    t = recipe.tune
    assert t is not None
    if t.mix_scale is not None:  # the poles at the recipe's settings, the composites' weights scaled
        mlp, method = recipe.prune.mlp or MlpPrune(sparsity=0.0), recipe.method
        pole = (mlp.sparsity, method.steer, method.steer_layers, method.steer_vector, mlp.compensate, mlp.gamma)
        axes: tuple[list[Any], ...] = (*([v] for v in (*pole, mlp.amplify)), list(t.mix_scale))
    else:
        vectors = t.steer_vector or [recipe.method.steer_vector]
        assert t.sparsity is not None, "required without mix_scale (checked by the recipe)"
        axes = (t.sparsity, t.steer, t.steer_layers, vectors, t.compensate, t.gamma, t.amplify, [None])
    points = []
    for s, alpha, depth, vector, comp, gamma, amp, scale in itertools.product(*axes):
        setting = Setting(
            sparsity=s,
            steer=alpha,
            steer_layers=depth,
            steer_vector=vector,
            compensate=comp,
            gamma=gamma,
            amplify=amp,
            mix_scale=scale,
        )
        points.append((setting, setting.applied(recipe)))
    return points


def tune_validation(spec: TuneSpec) -> EvalSpec:
    """The tune section's validation items as an eval section: only what the grid is ranked by (the shift,
    perplexity and, when given, the replies' persona scores and repetition)."""
    return spec.validation.model_copy(update={"baselines": [], "statements": None, "depth": "full"})
