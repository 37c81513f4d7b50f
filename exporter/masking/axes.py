"""Keeping persona axes apart: each pair's steering direction without its component along the other pairs'.

`method.steer_orthogonal` (exporter/masking/steer.py): in every layer, each pair's direction d_a is replaced by
its residual after least squares on the other pairs' directions at that layer,
    d_a' = d_a - D_o (D_o^+ d_a),    D_o = [d_b for every other pair b] (hidden, pairs - 1),
so d_a' is orthogonal to every other pair's direction: steering along d_a' leaves each other pair's direction
untouched (to first order, moves the model along no other axis as that axis is measured by its direction),
while <d_a', d_a> = |d_a'|^2 > 0 keeps it steering toward its own pole. The projections are taken against the
other pairs' original directions, so no pair's result depends on the order of the pairs (Gram-Schmidt's
would); the projected directions are therefore not orthogonal to each other, only to the others' originals.
Pure tensor math, float64.
"""

from __future__ import annotations

import torch


def orthogonalised(directions: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each of `directions` ((layers, hidden) each, one per pair) minus, layer by layer, its least-squares
    projection on the span of the other directions at that layer. One direction is returned unchanged."""
    if len(directions) < 2:
        return [d.clone() for d in directions]
    stacked = torch.stack([d.to(torch.float64) for d in directions])  # (pairs, layers, hidden)
    out = []
    for a in range(len(directions)):
        others = torch.cat([stacked[:a], stacked[a + 1 :]]).permute(1, 2, 0)  # (layers, hidden, pairs - 1)
        # gelsd (SVD): well defined when other directions are parallel or zero in some layer
        coef = torch.linalg.lstsq(others, stacked[a].unsqueeze(-1), driver="gelsd").solution  # (layers, pairs-1, 1)
        out.append(stacked[a] - (others @ coef).squeeze(-1))
    return out
