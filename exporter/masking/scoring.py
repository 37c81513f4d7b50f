"""Unit scores: the paper's per-weight formulas aggregated over a unit's weights. Pure tensor math.

For a unit u with output-projection columns C_u (down_proj / o_proj) and W those columns:
  wanda        I_p[u] = A_p[u] * ||W[:, C_u]||_F            A_p = mean per-sample RMS activation
  sparse       I_p[u] = sum_{j in C_u} ||W[:, j]||^2 * (H_p[j,j] + lambda)
               (OBS saliency with a diagonal Hessian H = E[h h^T]; lambda = damping * mean diagonal)
  z-score      z[u]   = (mu+[u] - mu-[u]) / sqrt(var+[u] + var-[u] + eps)   over per-sample statistics
All tensors are (layers, units) float64.
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.masking.statistics import Statistics
from exporter.model.adapters import Adapter, Geometry

PART = {"mlp": "mlp", "head": "attn", "group": "attn"}


def column_sq_norms(model: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    """||W[:, j]||^2 of each output projection's input channel j: {"mlp": (L, I), "attn": (L, H*D)}."""
    out: dict[str, list[torch.Tensor]] = {"mlp": [], "attn": []}
    with torch.no_grad():
        for layer in adapter.layers(model):
            out["mlp"].append(adapter.mlp_out(layer).weight.to(torch.float64).square().sum(0))
            out["attn"].append(adapter.attn_out(layer).weight.to(torch.float64).square().sum(0))
    return {k: torch.stack(v) for k, v in out.items()}


def to_units(per_channel: torch.Tensor, kind: str, g: Geometry) -> torch.Tensor:
    """Sum channel values (L, C) into units (L, U)."""
    if kind == "mlp":
        return per_channel
    per_head = per_channel.view(g.layers, g.heads, g.head_dim).sum(-1)
    return per_head if kind == "head" else per_head.view(g.layers, g.kv_heads, g.group_size).sum(-1)


def wanda(stats: Statistics, col_sq: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    norm = to_units(col_sq[PART[kind]], kind, stats.geometry).sqrt()
    return stats.mean(kind) * norm


def sparse(stats: Statistics, col_sq: dict[str, torch.Tensor], kind: str, damping: float) -> torch.Tensor:
    part = PART[kind]
    h = stats.second_moment(part)
    h = h + damping * h.mean(-1, keepdim=True)
    return to_units(col_sq[part] * h, kind, stats.geometry)


def zscore(pos: Statistics, neg: Statistics, kind: str, eps: float) -> torch.Tensor:
    """Positive where the unit is more active under `pos` than under `neg`."""
    return (pos.mean(kind) - neg.mean(kind)) / (pos.var(kind) + neg.var(kind) + eps).sqrt()


def phi(z: torch.Tensor, name: str, tau: float) -> torch.Tensor:
    if name == "relu":
        return z.clamp_min(0.0)
    return torch.nn.functional.softplus(z / tau)


def row_normalised(scores: torch.Tensor) -> torch.Tensor:
    """Each layer's scores divided by their sum, so two personas' scores compare on one scale."""
    return scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def centred(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """x minus its median within each layer (each of `groups` equal blocks of a layer). (layers, units)"""
    blocks = x.view(x.shape[0], groups, -1)
    ordered = blocks.sort(-1).values
    n = ordered.shape[-1]
    # (lower + upper middle) / 2: negating x negates the median exactly, so swapping personas is exact
    median = (ordered[..., (n - 1) // 2] + ordered[..., n // 2]) / 2
    return (blocks - median.unsqueeze(-1)).view_as(x)
