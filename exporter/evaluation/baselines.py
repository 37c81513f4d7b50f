"""Baselines of the same size as a persona mask: a random structured mask, and the paper's unstructured
row-wise Wanda mask (METHOD.md section 2, items 1-3) applied in memory.

Wanda: for every Linear of the decoder layers, S[i, j] = |W[i, j]| * ||X_j||_2, with X_j the input channel j
over the persona's calibration tokens (the tokens the recipe counts); each output row drops its lowest
scores. Each layer drops exactly as many weights as the structured mask removes parameters there; they are
shared among the layer's Linears in proportion to their size and among a Linear's rows as evenly as
possible (the rows whose next-lowest score is smallest drop one more).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from exporter.export.prune import layer_plan, planned_linear
from exporter.masking.calibrate import Batch
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.model.hooks import decoder_linears, linear_input_squares


def _random_keep(keep: torch.Tensor, n: int, groups: int, gen: torch.Generator) -> torch.Tensor:
    """Same number kept per layer (and per group of n // groups units) as `keep`, chosen at random."""
    size = n // groups
    rows = []
    for row in keep:
        chosen: list[int] = []
        for b in range(groups):
            k = int(((row >= b * size) & (row < (b + 1) * size)).sum())
            chosen += (b * size + torch.randperm(size, generator=gen)[:k]).tolist()
        rows.append(torch.tensor(sorted(chosen), dtype=torch.long))
    return torch.stack(rows)


def random_mask(mask: PersonaMask, seed: int) -> PersonaMask:
    """A mask that removes as many units of each kind from each layer as `mask`, uniformly at random, and
    gives its soft-mask factors to as many random kept units."""
    g = mask.geometry
    gen = torch.Generator().manual_seed(seed)
    mlp = head = group = None
    if mask.mlp_keep is not None:
        mlp = _random_keep(mask.mlp_keep, g.intermediate, 1, gen)
    if mask.group_keep is not None and mask.group_keep.shape[1] < g.kv_heads:  # whole KV groups removed
        group = _random_keep(mask.group_keep, g.kv_heads, 1, gen)
        head = (group.unsqueeze(-1) * g.group_size + torch.arange(g.group_size)).flatten(1)
    elif mask.head_keep is not None:  # query heads, the same number from every group
        head = _random_keep(mask.head_keep, g.heads, g.kv_heads, gen)
        group = mask.group_keep
    mlp_scale = attn_scale = None
    if mask.mlp_scale is not None:
        mlp_scale = _random_scales(mask.mlp_scale, mask.mlp_keep, mlp, gen)
    if mask.attn_scale is not None:  # one factor per head, spread over its channels
        per_head = mask.attn_scale.view(g.layers, g.heads, g.head_dim)[:, :, 0]
        attn_scale = _random_scales(per_head, mask.head_keep, head, gen).repeat_interleave(g.head_dim, dim=1)
    return PersonaMask(f"random-{seed}", g, mlp, head, group, None, None, mlp_scale, attn_scale, mask.scale_dtype)


def _random_scales(
    scale: torch.Tensor, keep: torch.Tensor | None, new_keep: torch.Tensor | None, gen: torch.Generator
) -> torch.Tensor:
    """The soft-mask factors (not 1) of each layer's kept units, moved to as many randomly chosen kept units
    of the random mask: (layers, units)."""
    out = torch.ones_like(scale)
    for i, row in enumerate(scale):
        kept = keep[i] if keep is not None else torch.arange(len(row))
        values = row[kept][row[kept] != 1]
        pool = new_keep[i] if new_keep is not None else torch.arange(len(row))
        chosen = pool[torch.randperm(len(pool), generator=gen)[: len(values)]]
        out[i, chosen] = values
    return out


def removed_parameters(model: nn.Module, adapter: Adapter, mask: PersonaMask) -> list[int]:
    """Parameters that physically removing `mask` takes out of each layer (weights and biases), from the same
    slice plan that `prune_model` applies, so fused projections (phi3) are counted like separate ones."""
    out = []
    for i, layer in enumerate(adapter.layers(model)):
        n = 0
        for name, (dim, keep) in layer_plan(adapter, mask, i).items():
            linear = planned_linear(layer, name, i)
            gone = linear.weight.shape[dim] - len(keep)
            if dim == 0:
                n += gone * (linear.in_features + (1 if linear.bias is not None else 0))
            else:
                n += gone * linear.out_features
        out.append(n)
    return out


@torch.inference_mode()
def input_norms(model: nn.Module, adapter: Adapter, work: Iterable[Batch]) -> list[dict[str, torch.Tensor]]:
    """||X_j||_2 of every decoder Linear's input channels over the counted tokens of `work` (fp64); `work` is
    calibration batches as `exporter.masking.calibrate.batches` makes them."""
    current: dict[str, torch.Tensor] = {}
    with linear_input_squares(model, adapter, lambda: current["w"]) as sq:
        for ids, attn, weight in work:
            current["w"] = weight
            adapter.base(model)(input_ids=ids, attention_mask=attn, use_cache=False)
    return [{n: v.sqrt() for n, v in d.items()} for d in sq]


def _split(total: int, sizes: list[int]) -> list[int]:
    """`total` shared in proportion to `sizes`, largest remainder first; sums to `total` exactly."""
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    parts = [int(e) for e in exact]
    for k in sorted(range(len(sizes)), key=lambda k: parts[k] - exact[k])[: total - sum(parts)]:
        parts[k] += 1
    return parts


def _row_wise(weight: torch.Tensor, norms: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the `count` weights a row-wise Wanda mask drops from `weight` (out, in)."""
    rows, cols = weight.shape
    scores = weight.detach().abs().to(torch.float64) * norms.unsqueeze(0)
    order = scores.argsort(dim=1, stable=True)  # (rows, cols), lowest first
    base, extra = divmod(count, rows)
    drop = torch.zeros(rows, dtype=torch.long) + base
    if extra:
        nxt = scores.gather(1, order[:, base : base + 1]).squeeze(1)
        drop[nxt.argsort(stable=True)[:extra]] += 1
    take = torch.arange(cols).unsqueeze(0) < drop.unsqueeze(1)
    return (torch.arange(rows).unsqueeze(1) * cols + order)[take]


def wanda_mask(
    model: nn.Module, adapter: Adapter, norms: list[dict[str, torch.Tensor]], per_layer: list[int]
) -> list[dict[str, torch.Tensor]]:
    """Flat indices of the weights to zero in each decoder Linear; layer l loses `per_layer[l]` weights."""
    out = []
    for layer, (linears, total) in enumerate(zip(decoder_linears(model, adapter), per_layer, strict=True)):
        names = sorted(linears)
        counts = _split(total, [linears[n].weight.numel() for n in names])
        out.append({n: _row_wise(linears[n].weight, norms[layer][n], c) for n, c in zip(names, counts, strict=True)})
    return out


@contextmanager
def zeroed(model: nn.Module, adapter: Adapter, removal: list[dict[str, torch.Tensor]]) -> Iterator[None]:
    """Zero the given weights for the duration of the block, then restore them exactly."""
    linears = decoder_linears(model, adapter)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer, idx_by_name in enumerate(removal):
                for name, idx in idx_by_name.items():
                    flat = linears[layer][name].weight.view(-1)
                    saved.append((flat, idx, flat[idx].clone()))
                    flat[idx] = 0.0
        yield
    finally:
        with torch.no_grad():
            for flat, idx, values in saved:
                flat[idx] = values


def steering_only(mask: PersonaMask) -> PersonaMask:
    """The export's steering bias on the dense model: no unit removed, no compensation."""
    return PersonaMask(mask.persona, mask.geometry, None, None, None, mlp_bias=mask.steering)
