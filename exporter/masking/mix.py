"""Composite personas (`personas.<name>.mix`, exporter/recipe/composites.py): one mask from the poles' rankings.

Removal. Each part p ranks its removal candidates exactly as its own pole export does (its own sparsity, scored
against its pair partner: exporter/masking/masks.py) and gets a quota of q_p = round(w_p * k_p) units per layer
(per KV group for query heads; halves round up), k_p being what the pole's export removes. The composite
removes K = sum_p q_p units in every layer (the same count in every layer: stock loaders build every layer
from one config):
  1. the union of each part's first q_p candidates, so it holds every part's top round(w_p k_p) units;
  2. where parts share a unit, it counts once and their next candidates fill in: the parts in turn (by
     decreasing weight, then name), each its next candidate not yet removed, until K are removed.
With `prune.mlp.round_to`, the fill goes on until the kept count is a multiple of it (never fewer removed).
A unit one pole removes is one its partner keeps, so a mix never names both poles of a pair (the recipe
refuses it). Units of one part may be ones another part's persona relies on; the composite's evaluation shows
each axis's shift. Steering and compensation: exporter/masking/steer.py (weighted sums of the parts').
"""

from __future__ import annotations

import math

import torch

from exporter.errors import MaskError
from exporter.masking.masks import WHAT, Order, PersonaMask, keep_indices, mask_from_keep, removals, unit_order
from exporter.masking.statistics import Statistics
from exporter.recipe.composites import MixSpec, ordered_parts
from exporter.recipe.schema import PruneSpec, Recipe


def quota(weight: float, k: int) -> int:
    """round(weight * k), halves up (Python's round() would take 2.5 to 2)."""
    return math.floor(weight * k + 0.5)


def merged(orders: list[tuple[list[int], int]], total: int) -> list[int]:
    """The units removed from one layer (or KV group): `orders` holds each part's ranked candidates and quota, in
    the order parts fill shared slots; `total` >= the sum of the quotas. Fewer than `total` when candidates run out."""
    removed: list[int] = []
    taken: set[int] = set()
    for cand, q in orders:  # 1. every part's top quota
        for unit in cand[:q]:
            if unit not in taken:
                taken.add(unit)
                removed.append(unit)
    at = [q for _, q in orders]  # 2. the parts' next candidates, in turn
    while len(removed) < total and any(i < len(cand) for i, (cand, _) in zip(at, orders, strict=True)):
        for p, (cand, _) in enumerate(orders):
            while at[p] < len(cand) and cand[at[p]] in taken:
                at[p] += 1
            if at[p] < len(cand) and len(removed) < total:
                taken.add(cand[at[p]])
                removed.append(cand[at[p]])
                at[p] += 1
    return removed


def mixed_keep(name: str, kind: str, parts: list[tuple[Order, int]], n: int, round_to: int) -> torch.Tensor:
    """Keep-indices (layers, kept) of one unit kind: `parts` holds each part's removal order and quota."""
    total = sum(q for _, q in parts)
    layers = len(parts[0][0])
    blocks = len(parts[0][0][0])  # KV groups for query heads, else 1
    size = n // blocks
    if round_to > 1:  # the kept count of a block rounded down to a multiple: more units fill in
        total = size - (size - total) // round_to * round_to
    removed = []
    for layer in range(layers):
        row = []
        for b in range(blocks):
            units = merged([(order[layer][b], q) for order, q in parts], total)
            if len(units) < total or total >= size:
                raise MaskError(
                    f"composite {name!r}: layer {layer}{f' group {b}' if blocks > 1 else ''} has "
                    f"{min(len(units), size)} {WHAT[kind]} that its parts can remove, {total} asked (the sum of "
                    "round(weight x units each part's export removes)); lower the weights or the sparsities"
                )
            row += units
        removed.append(row)
    return keep_indices(removed, n)


def composite_mask(
    name: str,
    spec: MixSpec,
    recipe: Recipe,
    stats: dict[str, Statistics],
    col_sq: dict[str, torch.Tensor],
    prune: PruneSpec,
) -> PersonaMask:
    """The composite's hard mask (soft masks and biases are added by exporter/masking/steer.py)."""
    parts = ordered_parts(spec.weights)
    g = stats[parts[0][0]].geometry
    by_kind: dict[str, list[tuple[Order, int]]] = {}
    for part, weight in parts:
        partner = recipe.partner(part)
        assert partner is not None, "a part is in a pair (checked by the recipe)"
        for kind, k in removals(part, prune, g).items():
            order = unit_order(kind, recipe.method, stats[part], stats[partner], col_sq)
            by_kind.setdefault(kind, []).append((order, quota(weight, k)))
    round_to = {"mlp": prune.mlp.round_to if prune.mlp is not None else 1}
    keep = {
        kind: mixed_keep(name, kind, orders, g.units(kind), round_to.get(kind, 1))
        for kind, orders in by_kind.items()
        if sum(q for _, q in orders) > 0
    }
    return mask_from_keep(name, g, keep)


def composite_masks(
    recipe: Recipe,
    stats: dict[str, Statistics],
    col_sq: dict[str, torch.Tensor],
    names: list[str],
    prune: PruneSpec | None = None,
) -> dict[str, PersonaMask]:
    """The masks of the composites among `names`; `prune` replaces the recipe's (a sweep's sparsities)."""
    prune = prune or recipe.prune
    composites = recipe.composites
    return {n: composite_mask(n, composites[n], recipe, stats, col_sq, prune) for n in names if n in composites}
