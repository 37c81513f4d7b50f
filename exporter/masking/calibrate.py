"""Calibration: run a persona's samples through the model and accumulate unit statistics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from exporter.masking.data import TokenizedSample, collate
from exporter.masking.statistics import Statistics
from exporter.model.adapters import Adapter
from exporter.model.hooks import capture_layer_outputs, capture_unit_inputs, linear_input_squares
from exporter.quiet import progress

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # right-padded input_ids, attention_mask, counted tokens


def batches(samples: list[TokenizedSample], batch_size: int, pad_id: int, response_only: bool) -> Iterator[Batch]:
    """Length-sorted batches (less padding); the order is deterministic."""
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].input_ids), i))
    for start in range(0, len(order), batch_size):
        yield collate([samples[i] for i in order[start : start + batch_size]], pad_id, response_only)


@torch.inference_mode()
def calibrate(
    model: nn.Module,
    adapter: Adapter,
    samples: list[TokenizedSample],
    *,
    pad_id: int,
    batch_size: int,
    response_only: bool,
    desc: str = "calibrate",
) -> Statistics:
    """Statistics over `samples`, with every decoder Linear's input channel squares (the Wanda baseline's
    norms, so evaluation needs no second pass). Runs the decoder body only: the LM head's logits are not needed."""
    geometry = adapter.geometry(model.config)
    stats = Statistics.empty(geometry)
    current: dict[str, Any] = {}

    def on_input(layer: int, part: str, x: torch.Tensor) -> None:
        stats.add(layer, part, x, current["weight"])

    body = adapter.base(model)
    n_batches = -(-len(samples) // batch_size)
    with (
        capture_unit_inputs(model, adapter, on_input, {"mlp", "attn"}),
        capture_layer_outputs(model, adapter, lambda i, h: stats.add_residual(i, h, current["weight"])),
        linear_input_squares(model, adapter, lambda: current["weight"]) as in_sq,
    ):
        for ids, attn, weight in progress(
            n_batches, desc, "batch", batches(samples, batch_size, pad_id, response_only)
        ):
            current["weight"] = weight
            body(input_ids=ids, attention_mask=attn, use_cache=False)
            stats.n_samples += ids.shape[0]
            stats.n_tokens += int(weight.sum())
    stats.in_sq = {name: torch.stack([layer[name] for layer in in_sq]) for name in in_sq[0]}
    return stats
