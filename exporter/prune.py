"""Physical removal: slice each layer's weights to the kept units and write the new sizes into the config."""

from __future__ import annotations

import torch
from torch import nn

from exporter.adapters import Adapter
from exporter.masks import PersonaMask


def _slice(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep `index` along dim 0 (output rows, with the bias) or dim 1 (input columns) of a Linear, in place."""
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(dim, index).contiguous())
        if dim == 0:
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias.index_select(0, index).contiguous())
            linear.out_features = len(index)
        else:
            linear.in_features = len(index)


def _channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads.unsqueeze(-1) * head_dim + torch.arange(head_dim)).flatten()


def prune_model(model: nn.Module, adapter: Adapter, mask: PersonaMask) -> nn.Module:
    """Remove the masked units from `model` in place and return it. Equal to the masked model, exactly."""
    g = mask.geometry
    for i, layer in enumerate(adapter.layers(model)):
        if mask.mlp_keep is not None:
            keep = mask.mlp_keep[i]
            for lin in adapter.mlp_in(layer):
                _slice(lin, keep, 0)
            _slice(adapter.mlp_out(layer), keep, 1)
        if mask.head_keep is not None and mask.group_keep is not None:
            q_channels = _channels(mask.head_keep[i], g.head_dim)
            _slice(adapter.attn_q(layer), q_channels, 0)
            _slice(adapter.attn_out(layer), q_channels, 1)
            kv_channels = _channels(mask.group_keep[i], g.head_dim)
            for lin in adapter.attn_kv(layer):
                _slice(lin, kv_channels, 0)
        adapter.update_modules(layer, mask.pruned_geometry())
    adapter.update_config(model.config, mask.pruned_geometry())
    return model


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
