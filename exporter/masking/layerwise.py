"""Layer-by-layer calibration: one decoder layer in memory at a time, weights read from the safetensors shards.

The model is built without weights (accelerate's `init_empty_weights`: parameters on the meta device, buffers
such as the rotary `inv_freq` computed for real). The model's own `forward` runs once per batch with its
decoder layers replaced by recorders, so the position embeddings, causal masks (per attention type) and every
other layer argument are exactly those the whole model would pass. Then each layer is loaded, run over all
batches with the same unit hooks as `exporter.masking.calibrate`, and released. Peak memory: the embedding table
(released once the inputs are embedded), one layer, and the hidden states of the calibration set.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from exporter.masking.calibrate import batches
from exporter.masking.data import TokenizedSample
from exporter.masking.stats import Statistics
from exporter.model.adapters import Adapter
from exporter.model.checkpoint import SourceCheckpoint
from exporter.model.hooks import capture_unit_inputs

Call = tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]  # (hidden states in, args, kwargs) of a layer


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


class _Recorder(nn.Module):
    """Stands in for decoder layer i: records the arguments it is called with and passes hidden states on."""

    def __init__(self, layer: nn.Module, calls: list[Call], last: bool) -> None:
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)  # picks the mask in sliding-window models
        self.calls, self.last = calls, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def empty_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model without weights: parameters on the meta device, buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, torch_dtype=dtype).eval()


def _load(module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> None:
    """Give `module` its weights (replacing meta parameters); every parameter must be in `tensors`."""
    wanted = set(module.state_dict())
    missing = wanted - set(tensors)
    assert not missing, f"{where}: tensors missing from the checkpoint: {sorted(missing)}"
    module.load_state_dict({k: tensors[k].to(dtype) for k in wanted}, strict=True, assign=True)


def _release(module: nn.Module) -> None:
    module.to_empty(device="meta")


def record_layer_calls(
    model: nn.Module, adapter: Adapter, source: SourceCheckpoint, inputs: list[dict[str, torch.Tensor]]
) -> list[list[Call]]:
    """For each batch of `inputs` (keyword arguments of the model body), the call of every decoder layer.

    Only the embedding is loaded (and released after); the layers' hidden-state inputs other than layer 0's
    are placeholders (the recorders pass hidden states on unchanged), their other arguments are exact.
    """
    body = adapter.base(model)
    layers = adapter.layers(model)
    embed = body.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    _load(embed, source.with_prefix(f"{embed_name}."), dtype, embed_name)
    calls: list[list[Call]] = []  # per batch, per layer
    original = body.layers
    try:
        for kwargs in inputs:
            record: list[Call] = []
            body.layers = nn.ModuleList(
                _Recorder(layer, record, i == len(layers) - 1) for i, layer in enumerate(layers)
            )
            with contextlib.suppress(_Stop):
                body(**kwargs, use_cache=False)
            calls.append(record)
    finally:
        body.layers = original
        _release(embed)
    return calls


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
        for i, layer in enumerate(tqdm(layers, desc=desc, leave=False)):
            _load(layer, source.with_prefix(f"{prefix}.{i}."), dtype, f"{prefix}.{i}")
            for b, (_, _, weight) in enumerate(work):
                current["weight"] = weight
                _, args, kwargs = calls[b][i]
                hidden[b] = layer(hidden[b], *args, **kwargs)
            _release(layer)
    for ids, _, weight in work:
        stats.n_samples += ids.shape[0]
        stats.n_tokens += int(weight.sum())
    return stats


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
