"""Running a model one decoder layer at a time: a weightless model, and each layer's recorded call.

The model is built without weights (accelerate's `init_empty_weights`: parameters on the meta device, buffers
such as the rotary `inv_freq` computed for real). The model's own `forward` runs once per batch with its
decoder layers replaced by recorders, so the position embeddings, causal masks (per attention type) and every
other layer argument are exactly those the whole model would pass. A layer is then given its weights from
the checkpoint (`load_weights`), run, and released. Used by layer-by-layer calibration and parity.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from exporter.errors import ModelSourceError
from exporter.model.adapters import Adapter
from exporter.model.checkpoint import SourceCheckpoint

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
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> None:
    """Give `module` its weights (replacing meta parameters); every parameter must be in `tensors`."""
    wanted = set(module.state_dict())
    missing = wanted - set(tensors)
    if missing:
        raise ModelSourceError(
            f"{where}: tensors missing from the checkpoint: {sorted(missing)}; the checkpoint does not match its "
            "config.json (re-save it with save_pretrained)"
        )
    module.load_state_dict({k: tensors[k].to(dtype) for k in wanted}, strict=True, assign=True)


def release(module: nn.Module) -> None:
    """Drop `module`'s weights (back to the meta device)."""
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
    load_weights(embed, source.with_prefix(f"{embed_name}."), dtype, embed_name)
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
        release(embed)
    return calls
