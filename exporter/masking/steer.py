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
own. Pure tensor math: the statistics come in, a (layers, hidden) float64 tensor goes out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from exporter.masking.masks import PersonaMask, soften
from exporter.masking.statistics import Statistics
from exporter.model.adapters import Adapter
from exporter.recipe.schema import PruneSpec, Recipe, mlp_biases, steered_layers


def steering_bias(
    down: list[torch.Tensor],
    own: Statistics,
    partner: Statistics,
    alpha: float,
    layers: float = 1.0,
    vector: str = "mlp",
) -> torch.Tensor:
    """(layers, hidden) float64. "mlp": alpha * W[l] (mu_own - mu_partner) per layer, zero from layer
    `steered_layers(len(down), layers)` on; "residual": alpha * (r_own - r_partner) of the last steered layer, in
    that layer only."""
    steered = steered_layers(len(down), layers)
    if vector == "residual":
        bias = torch.zeros(len(down), down[0].shape[0], dtype=torch.float64)
        bias[steered - 1] = alpha * (own.resid_mean()[steered - 1] - partner.resid_mean()[steered - 1])
        return bias
    delta = own.mlp_mean() - partner.mlp_mean()  # (layers, intermediate)
    bias = alpha * torch.stack([w.to(torch.float64) @ delta[i] for i, w in enumerate(down)])
    bias[steered:] = 0.0
    return bias


def compensation_bias(down: list[torch.Tensor], lost: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """W[l] (lost[l] * mu[l]) per layer; lost: (layers, intermediate) the fraction of each unit the mask takes
    away (1 removed, 1 - gamma soft-masked, 0 kept)."""
    taken = lost.to(torch.float64) * mean  # (layers, intermediate), zero on kept units
    return torch.stack([w.to(torch.float64) @ taken[i] for i, w in enumerate(down)])


def compensation_mean(mode: str, own: Statistics, partner: Statistics | None) -> torch.Tensor:
    """The mean activation that replaces removed units: the persona's own, or both personas' average."""
    if mode == "persona" or partner is None:
        return own.mlp_mean()
    return (own.mlp_mean() + partner.mlp_mean()) / 2


def with_biases(
    recipe: Recipe,
    masks: dict[str, PersonaMask],
    stats: dict[str, Statistics],
    model: Any,
    adapter: Adapter,
    storage: torch.dtype,
    prune: PruneSpec | None = None,
) -> dict[str, PersonaMask]:
    """Each persona's mask with its soft-mask scales (`soften`) and its `mlp_bias` (steering + compensation),
    rounded to the export's dtype so that the reference adds exactly what the checkpoint stores; `prune`
    replaces the recipe's (a sweep). Masks are returned unchanged when the recipe asks for none of these."""
    method, prune = recipe.method, prune or recipe.prune
    masks = soften(recipe, masks, str(storage).removeprefix("torch."), prune)
    if not mlp_biases(method, prune):
        return masks
    adapter.check_mlp_bias(model.config.model_type, "method.steer / prune.mlp.compensate")
    down = [adapter.mlp_out(layer).weight.detach() for layer in adapter.layers(model)]
    out = {}
    for name, mask in masks.items():
        partner = stats[p] if (p := recipe.partner(name)) else None
        bias = torch.zeros(len(down), down[0].shape[0], dtype=torch.float64)
        steering = None
        if (alpha := method.alpha(name)) > 0:
            assert partner is not None, "steering needs a pair (checked by the recipe)"
            steering = steering_bias(down, stats[name], partner, alpha, method.depth(name), method.vector(name))
            steering = steering.to(storage).to(torch.float64)
            bias += steering
        compensate = prune.mlp.compensate if prune.mlp is not None else "none"
        mlp_scale, _ = mask.channel_scales()
        compensated = False
        if compensate != "none" and mlp_scale is not None:
            lost = (1.0 - mlp_scale).clamp_min(0.0)  # amplified units take nothing away
            bias += compensation_bias(down, lost, compensation_mean(compensate, stats[name], partner))
            compensated = True
        if steering is None and not compensated:
            out[name] = mask  # neither: its export carries no bias
            continue
        out[name] = replace(mask, mlp_bias=bias.to(storage).to(torch.float64), steering=steering)
    return out
