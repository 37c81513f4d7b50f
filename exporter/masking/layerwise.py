"""Layer-by-layer calibration: one decoder layer in memory at a time, weights read from the safetensors shards.

Each layer's inputs are recorded with `exporter.model.layer_by_layer`; then each layer is loaded, run over all
batches with the same unit hooks as `exporter.masking.calibrate`, and released. Peak memory: the embedding table
(released once the inputs are embedded), one layer, and the hidden states of the calibration set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from exporter.masking.calibrate import batches
from exporter.masking.data import TokenizedSample
from exporter.masking.statistics import Statistics
from exporter.model.adapters import Adapter
from exporter.model.checkpoint import SourceCheckpoint
from exporter.model.hooks import capture_unit_inputs
from exporter.model.layer_by_layer import empty_model, load_weights, record_layer_calls, release
from exporter.quiet import progress


@torch.inference_mode()
def calibrate_layerwise(
    folder: Path,
    adapter: Adapter,
    samples: list[TokenizedSample],
    *,
    pad_id: int,
    batch_size: int,
    response_only: bool,
    config: Any = None,
    dtype: torch.dtype = torch.float32,
    desc: str = "calibrate (layer by layer)",
) -> Statistics:
    """The statistics `exporter.masking.calibrate.calibrate` gives on the model in `folder`, one layer in memory at a time.

    `dtype` is the compute dtype (as the whole model would be loaded); statistics accumulate in fp32/fp64.
    """
    from transformers import AutoConfig

    source = SourceCheckpoint(folder)
    config = config if config is not None else AutoConfig.from_pretrained(folder)
    model = empty_model(config, dtype)
    layers = adapter.layers(model)
    prefix = adapter.layers_prefix

    work = list(batches(samples, batch_size, pad_id, response_only))
    calls = record_layer_calls(model, adapter, source, [{"input_ids": ids, "attention_mask": a} for ids, a, _ in work])
    hidden = [record[0][0] for record in calls]  # (batch, seq, hidden): the embedded inputs of layer 0

    geometry = adapter.geometry(config)
    stats = Statistics.empty(geometry)
    current: dict[str, torch.Tensor] = {}

    def on_input(layer: int, part: str, x: torch.Tensor) -> None:
        stats.add(layer, part, x, current["weight"])

    with capture_unit_inputs(model, adapter, on_input, {"mlp", "attn"}):
        for i, layer in enumerate(progress(len(layers), desc, "layer", layers)):
            load_weights(layer, source.with_prefix(f"{prefix}.{i}."), dtype, f"{prefix}.{i}")
            for b, (_, _, weight) in enumerate(work):
                current["weight"] = weight
                _, args, kwargs = calls[b][i]
                out = layer(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
                stats.add_residual(i, hidden[b], weight)
            release(layer)
    for ids, _, weight in work:
        stats.n_samples += ids.shape[0]
        stats.n_tokens += int(weight.sum())
    return stats


class CheckpointDownWeights:
    """Each decoder layer's down_proj weight (hidden, intermediate), read from the shards when indexed: one at
    a time, never the whole model (exporter/masking/steer.py's `Layers`)."""

    def __init__(self, folder: Path, adapter: Adapter, config: Any = None) -> None:
        from transformers import AutoConfig

        self.source = SourceCheckpoint(folder)
        config = config if config is not None else AutoConfig.from_pretrained(folder)
        layers = adapter.layers(empty_model(config))
        self.names = []
        for i, layer in enumerate(layers):
            local = {id(m): n for n, m in layer.named_modules()}[id(adapter.mlp_out(layer))]
            self.names.append(f"{adapter.layers_prefix}.{i}.{local}.weight")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int, /) -> torch.Tensor:
        return self.source.load([self.names[i]])[self.names[i]]


def column_sq_norms_from_checkpoint(folder: Path, adapter: Adapter, config: Any = None) -> dict[str, torch.Tensor]:
    """`exporter.masking.scoring.column_sq_norms` read from the shards, one output projection at a time."""
    from transformers import AutoConfig

    source = SourceCheckpoint(folder)
    config = config if config is not None else AutoConfig.from_pretrained(folder)
    out: dict[str, list[torch.Tensor]] = {"mlp": [], "attn": []}
    for i, layer in enumerate(adapter.layers(empty_model(config))):
        names = {id(m): n for n, m in layer.named_modules()}
        for part, module in (("mlp", adapter.mlp_out(layer)), ("attn", adapter.attn_out(layer))):
            key = f"{adapter.layers_prefix}.{i}.{names[id(module)]}.weight"
            out[part].append(source.load([key])[key].to(torch.float64).square().sum(0))
    return {k: torch.stack(v) for k, v in out.items()}
