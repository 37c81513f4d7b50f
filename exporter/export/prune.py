"""Physical removal: slice each layer's weights to the kept units and write the new sizes into the config."""

from __future__ import annotations

import torch
from torch import nn

from exporter.errors import UnsupportedModelError
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter, SlicePlan
from exporter.model.hooks import scaled_columns


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


def channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices (head * head_dim + j) of the given heads, in order."""
    return (heads.unsqueeze(-1) * head_dim + torch.arange(head_dim)).flatten()


def layer_plan(adapter: Adapter, mask: PersonaMask, i: int) -> SlicePlan:
    """The adapter's slicing of layer i for this mask."""
    g = mask.geometry
    mlp = mask.mlp_keep[i] if mask.mlp_keep is not None else None
    q = kv = None
    if mask.head_keep is not None and mask.group_keep is not None:
        q, kv = channels(mask.head_keep[i], g.head_dim), channels(mask.group_keep[i], g.head_dim)
    return adapter.slice_plan(g, mlp, q, kv)


def planned_linear(layer: nn.Module, name: str, index: int) -> nn.Linear:
    """The Linear `name` of decoder layer `index` that a slice plan names; anything else cannot be sliced."""
    module = layer.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(
            f"{name} of decoder layer {index} is a {type(module).__name__}, not a torch Linear (a LoRA-wrapped "
            "or quantized model?); merge the adapters or load unquantized weights before pruning"
        )
    return module


def prune_model(model: nn.Module, adapter: Adapter, mask: PersonaMask) -> nn.Module:
    """Remove the masked units from `model` in place and return it. Equal to the masked model, exactly."""
    for i, layer in enumerate(adapter.layers(model)):
        for out, scale in ((adapter.mlp_out(layer), mask.mlp_scale), (adapter.attn_out(layer), mask.attn_scale)):
            if scale is not None:  # soft mask: columns scaled before the removed ones are cut
                with torch.no_grad():
                    out.weight = nn.Parameter(scaled_columns(out.weight, scale[i], mask.scale_storage))
        for name, (dim, index) in layer_plan(adapter, mask, i).items():
            _slice(planned_linear(layer, name, i), index, dim)
        adapter.update_modules(layer, mask.pruned_geometry())
    adapter.update_config(model.config, mask.pruned_geometry())
    if mask.mlp_bias is not None:
        adapter.add_mlp_bias(model, mask.mlp_bias)
    return model


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
