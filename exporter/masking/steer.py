"""Constant vectors baked into the `down_proj` biases: a persona steering bias and bias compensation.

Both are per layer l a vector of the hidden size added to the MLP output at every position (METHOD.md
section 6). With mu_p[l] = E[h] the mean `down_proj` input of persona p over its counted calibration tokens
(exporter/masking/statistics.py) and W[l] the dense `down_proj` weight (hidden, intermediate):
  steering      alpha * W[l] (mu_p[l] - mu_q[l])      the mean MLP-output difference between p and its partner q,
                                                       in the first `method.steer_layers` fraction of the layers
  (residual)    alpha * (r_p[k] - r_q[k]) at layer k   with `method.steer_vector: residual`: the mean difference of
                                                       the residual stream after layer k, the last steered layer,
                                                       added there once (r: each layer's mean output hidden state)
  compensation  W[l] ((1 - s[l]) * mu[l])             s = what each unit is multiplied by (0 removed, gamma
                                                       soft-masked, 1 kept): the mean contribution the mask
                                                       takes away, so removal shifts no mean (FLAP)
`compensate: personas` takes mu as the average of both personas' means, `compensate: persona` the persona's
own. With `method.steer_orthogonal` each pair's direction (W[l] (mu_a[l] - mu_b[l]), or r_a - r_b) is first
projected off the other pairs' directions of the same kind (exporter/masking/axes.py).
A composite (exporter/masking/mix.py) carries the weighted sum of its parts' steering biases (each its pole's
own: alpha, layers, vector kind, projection) and compensates with the weighted mean of its parts' means.
Pure tensor math: the statistics come in, a (layers, hidden) float64 tensor goes out. The down_proj weights
are read one layer at a time (`Layers`: the model's, or a checkpoint's read from its shards).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

import torch

from exporter.masking.axes import orthogonalised
from exporter.masking.masks import PersonaMask, soften
from exporter.masking.statistics import Statistics
from exporter.model.adapters import Adapter
from exporter.recipe.composites import ordered_parts
from exporter.recipe.schema import PruneSpec, Recipe, mlp_biases, steered_layers


class Layers(Protocol):
    """Each decoder layer's down_proj weight (hidden, intermediate), by layer index."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> torch.Tensor: ...


def mlp_outputs(down: Layers, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W[l] v[l] of every (layers, intermediate) vector, float64 (layers, hidden), each layer's weight read once."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in vectors}
    for i in range(len(down) if vectors else 0):
        w = down[i].to(torch.float64)
        for k, v in vectors.items():
            out[k].append(w @ v[i])
    return {k: torch.stack(v) for k, v in out.items()}


def layer_bias(direction: torch.Tensor, alpha: float, layers: float, vector: str) -> torch.Tensor:
    """alpha x `direction` (layers, hidden) where it is added: "mlp", the first `steered_layers` layers;
    "residual", the last steered layer only."""
    steered = steered_layers(direction.shape[0], layers)
    if vector == "residual":
        bias = torch.zeros_like(direction)
        bias[steered - 1] = alpha * direction[steered - 1]
        return bias
    bias = alpha * direction
    bias[steered:] = 0.0
    return bias


def steering_bias(
    down: Layers,
    own: Statistics,
    partner: Statistics,
    alpha: float,
    layers: float = 1.0,
    vector: str = "mlp",
) -> torch.Tensor:
    """One pole's bias, (layers, hidden) float64. "mlp": alpha * W[l] (mu_own - mu_partner) per layer, zero from
    layer `steered_layers(len(down), layers)` on; "residual": alpha * (r_own - r_partner) of the last steered
    layer, in that layer only."""
    if vector == "residual":
        return layer_bias(own.resid_mean() - partner.resid_mean(), alpha, layers, vector)
    direction = mlp_outputs(down, {"d": own.mlp_mean() - partner.mlp_mean()})["d"]
    return layer_bias(direction, alpha, layers, vector)


def pair_directions(
    recipe: Recipe, stats: dict[str, Statistics], down: Layers, kinds: set[str]
) -> dict[str, list[torch.Tensor]]:
    """Per vector kind asked, each pair's (a, b) direction toward a, (layers, hidden) float64, in the order of
    `recipe.pairs`; projected off the other pairs' (`method.steer_orthogonal`)."""
    deltas = {str(i): stats[a].mlp_mean() - stats[b].mlp_mean() for i, (a, b) in enumerate(recipe.pairs)}
    out: dict[str, list[torch.Tensor]] = {}
    if "mlp" in kinds:
        mlp = mlp_outputs(down, deltas)
        out["mlp"] = [mlp[str(i)] for i in range(len(recipe.pairs))]
    if "residual" in kinds:
        out["residual"] = [stats[a].resid_mean() - stats[b].resid_mean() for a, b in recipe.pairs]
    if recipe.method.steer_orthogonal:
        out = {kind: orthogonalised(d) for kind, d in out.items()}
    return out


def pole_steering(recipe: Recipe, stats: dict[str, Statistics], down: Layers) -> dict[str, torch.Tensor]:
    """Each steered pole's bias (alpha > 0), float64 unrounded: its pair's direction, signed toward it."""
    method = recipe.method
    steered = [(i, p, sign) for i, pair in enumerate(recipe.pairs) for p, sign in zip(pair, (1.0, -1.0), strict=True)]
    steered = [(i, p, sign) for i, p, sign in steered if method.alpha(p) > 0]
    directions = pair_directions(recipe, stats, down, {method.vector(p) for _, p, _ in steered})
    return {
        p: layer_bias(sign * directions[method.vector(p)][i], method.alpha(p), method.depth(p), method.vector(p))
        for i, p, sign in steered
    }


def composite_steering(recipe: Recipe, name: str, poles: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The weighted sum of the parts' steering biases (`pole_steering`); None when no part steers."""
    total = None
    for part, weight in ordered_parts(recipe.composites[name].weights):
        if part in poles:
            total = weight * poles[part] if total is None else total + weight * poles[part]
    return total


def compensation_bias(down: Layers, lost: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """W[l] (lost[l] * mu[l]) per layer; lost: (layers, intermediate) the fraction of each unit the mask takes
    away (1 removed, 1 - gamma soft-masked, 0 kept)."""
    return mlp_outputs(down, {"c": lost.to(torch.float64) * mean})["c"]


def compensation_mean(mode: str, own: Statistics, partner: Statistics | None) -> torch.Tensor:
    """The mean activation that replaces removed units: the persona's own, or both personas' average."""
    if mode == "persona" or partner is None:
        return own.mlp_mean()
    return (own.mlp_mean() + partner.mlp_mean()) / 2


def persona_compensation_mean(recipe: Recipe, mode: str, name: str, stats: dict[str, Statistics]) -> torch.Tensor:
    """`compensation_mean` of a pole; of a composite, its parts' means weighted by the parts' weights."""
    if name not in recipe.composites:
        partner = stats[p] if (p := recipe.partner(name)) else None
        return compensation_mean(mode, stats[name], partner)
    parts = ordered_parts(recipe.composites[name].weights)
    total = sum(w for _, w in parts)
    means = [w / total * persona_compensation_mean(recipe, mode, p, stats) for p, w in parts]
    return torch.stack(means).sum(0)


def compensations(
    recipe: Recipe, masks: dict[str, PersonaMask], stats: dict[str, Statistics], down: Layers, mode: str
) -> dict[str, torch.Tensor]:
    """Each mask's compensation bias (masks that take nothing from the MLP neurons have none), one pass."""
    lost = {}
    for name, mask in masks.items():
        mlp_scale, _ = mask.channel_scales()
        if mode != "none" and mlp_scale is not None:
            taken = (1.0 - mlp_scale).clamp_min(0.0)  # amplified units take nothing away
            lost[name] = taken.to(torch.float64) * persona_compensation_mean(recipe, mode, name, stats)
    return mlp_outputs(down, lost)


def with_biases(
    recipe: Recipe,
    masks: dict[str, PersonaMask],
    stats: dict[str, Statistics],
    model: Any,
    adapter: Adapter,
    storage: torch.dtype,
    prune: PruneSpec | None = None,
    down: Layers | None = None,
) -> dict[str, PersonaMask]:
    """Each persona's mask with its soft-mask scales (`soften`) and its `mlp_bias` (steering + compensation),
    rounded to the export's dtype so that the reference adds exactly what the checkpoint stores; `prune`
    replaces the recipe's (a sweep); `down` the down_proj weights when the model does not hold them (a
    bounded-memory run reads them from the checkpoint). Masks are returned unchanged when the recipe asks for
    none of these."""
    method, prune = recipe.method, prune or recipe.prune
    masks = soften(recipe, masks, str(storage).removeprefix("torch."), prune)
    if not mlp_biases(method, prune):
        return masks
    adapter.check_mlp_bias(model.config.model_type, "method.steer / prune.mlp.compensate")
    if down is None:
        down = [adapter.mlp_out(layer).weight.detach() for layer in adapter.layers(model)]
    poles = pole_steering(recipe, stats, down)
    steering = {**poles, **{n: composite_steering(recipe, n, poles) for n in masks if n in recipe.composites}}
    compensate = prune.mlp.compensate if prune.mlp is not None else "none"
    compensated = compensations(recipe, masks, stats, down, compensate)
    out = {}
    for name, mask in masks.items():
        steer, comp = steering.get(name), compensated.get(name)
        if steer is None and comp is None:
            out[name] = mask  # neither: its export carries no bias
            continue
        bias = torch.zeros(mask.geometry.layers, mask.geometry.hidden, dtype=torch.float64)
        if steer is not None:
            steer = steer.to(storage).to(torch.float64)
            bias += steer
        if comp is not None:
            bias += comp
        out[name] = replace(mask, mlp_bias=bias.to(storage).to(torch.float64), steering=steer)
    return out
