"""The tune section as recipes: the setting of each point of its grid, the recipe at that point, the setting as
one persona's export sees it, and the validation items as an eval section."""

from __future__ import annotations

import itertools

from exporter.recipe.eval import EvalSpec
from exporter.recipe.schema import MethodSpec, Recipe, SteerVector, Strict, TuneSpec, per_persona

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

    def applied(self, recipe: Recipe) -> Recipe:
        """`recipe` with this setting."""
        prune = recipe.prune.with_sparsity("mlp", self.sparsity)
        assert prune.mlp is not None
        update = {"compensate": self.compensate, "gamma": self.gamma, "amplify": self.amplify}
        prune = prune.model_copy(update={"mlp": prune.mlp.model_copy(update=update)})
        steering = {"steer": self.steer, "steer_layers": self.steer_layers, "steer_vector": self.steer_vector}
        method = recipe.method.model_copy(update=steering)
        return recipe.model_copy(update={"prune": prune, "method": method})

    def own(self) -> tuple[str, ...]:
        """The settings a persona takes on its own at this point: with amplify > 1 its export also depends on its
        partner's mask, so its sparsity stays common."""
        return OWN if self.amplify == 1 else OWN[1:]

    @property
    def per_persona(self) -> bool:
        """Some setting a persona can take on its own is given per persona."""
        return any(isinstance(getattr(self, k), dict) for k in OWN)

    def for_persona(self, persona: str) -> Setting:
        """The setting as one persona's export sees it: its own sparsity and steering (alpha, depth), by the
        recipe's rules for a persona left out of a per-persona mapping."""
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
    vectors = t.steer_vector or [recipe.method.steer_vector]
    axes = (t.sparsity, t.steer, t.steer_layers, vectors, t.compensate, t.gamma, t.amplify)
    points = []
    for s, alpha, depth, vector, comp, gamma, amp in itertools.product(*axes):
        setting = Setting(
            sparsity=s,
            steer=alpha,
            steer_layers=depth,
            steer_vector=vector,
            compensate=comp,
            gamma=gamma,
            amplify=amp,
        )
        points.append((setting, setting.applied(recipe)))
    return points


def tune_validation(spec: TuneSpec) -> EvalSpec:
    """The tune section's validation items as an eval section: only what the grid is ranked by (the shift,
    perplexity and, when given, the replies' persona scores and repetition)."""
    return spec.validation.model_copy(update={"baselines": [], "statements": None, "depth": "full"})
