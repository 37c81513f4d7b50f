"""Hook plumbing: capture the inputs of each layer's unit-output projections, or mask them.

The unit activation is the input of `down_proj` (MLP neuron k = channel k) and of `o_proj` (head h =
channels h*D:(h+1)*D). Multiplying these inputs by a 0/1 mask is exactly what removing the units computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from exporter.model.adapters import Adapter

Capture = Callable[[int, str, torch.Tensor], None]


@contextmanager
def pre_hooks(pairs: list[tuple[nn.Module, Callable[..., Any]]], *, after: bool = False) -> Iterator[None]:
    """Forward pre-hooks (`after`: forward hooks) registered on each module for the duration of the block,
    removed however it ends."""
    handles = [
        module.register_forward_hook(fn) if after else module.register_forward_pre_hook(fn) for module, fn in pairs
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def decoder_linears(model: nn.Module, adapter: Adapter) -> list[dict[str, nn.Linear]]:
    """Every Linear of each decoder layer, by its name inside the layer."""
    return [
        {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        for layer in adapter.layers(model)
    ]


@contextmanager
def linear_input_squares(
    model: nn.Module, adapter: Adapter, weight: Callable[[], torch.Tensor]
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Per layer and decoder Linear, the running sum of each input channel squared over the tokens that count
    (`weight()`: (batch, seq), 0 for the others), float64 from fp32: (in_features,). Linears fed the same
    tensor (q/k/v, gate/up) share one computation (the same expression on the same tensor)."""
    linears = decoder_linears(model, adapter)
    sq = [{n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in d.items()} for d in linears]
    last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (input, its channel sums)

    def make(layer: int, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if layer not in last or last[layer][0] is not x:
                counted = x.to(torch.float32) * weight().to(torch.float32).unsqueeze(-1)  # (batch, seq, in)
                last[layer] = (x, counted.square().sum((0, 1), dtype=torch.float64))
            sq[layer][name] += last[layer][1]

        return hook

    try:
        with pre_hooks([(m, make(i, n)) for i, d in enumerate(linears) for n, m in d.items()]):
            yield sq
    finally:
        last.clear()


@contextmanager
def capture_unit_inputs(model: nn.Module, adapter: Adapter, callback: Capture, kinds: set[str]) -> Iterator[None]:
    """Call `callback(layer_index, kind, x)` with x = (batch, seq, channels) for kind in {"mlp", "attn"}."""

    def make(i: int, kind: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            callback(i, kind, args[0])

        return hook

    pairs: list[tuple[nn.Module, Callable[..., Any]]] = []
    for i, layer in enumerate(adapter.layers(model)):
        if "mlp" in kinds:
            pairs.append((adapter.mlp_out(layer), make(i, "mlp")))
        if "attn" in kinds:
            pairs.append((adapter.attn_out(layer), make(i, "attn")))
    with pre_hooks(pairs):
        yield


@contextmanager
def capture_layer_outputs(
    model: nn.Module, adapter: Adapter, callback: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Call `callback(layer_index, hidden)` with each decoder layer's output hidden state (batch, seq, hidden)."""

    def make(i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            callback(i, output[0] if isinstance(output, tuple) else output)

        return hook

    with pre_hooks([(layer, make(i)) for i, layer in enumerate(adapter.layers(model))], after=True):
        yield


def _multiplying(vec: torch.Tensor) -> Callable[..., tuple[torch.Tensor]]:
    """A pre-hook multiplying a module's input by `vec` (broadcast against it)."""

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        return (args[0] * vec.to(args[0].dtype),)

    return hook


def _adding(vec: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A forward hook adding `vec` to a module's output (broadcast against it)."""

    def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        return out + vec.to(out.dtype)

    return hook


def _unit_masks(
    model: nn.Module, adapter: Adapter, mlp: torch.Tensor | None, attn: torch.Tensor | None
) -> list[tuple[nn.Module, Callable[..., Any]]]:
    """Pre-hooks multiplying each layer's unit activations (batch, seq, channels) by mlp[i] / attn[i], which
    broadcast against them: (channels,) for the whole batch, (batch, 1, channels) for one value per row."""
    pairs: list[tuple[nn.Module, Callable[..., Any]]] = []
    for i, layer in enumerate(adapter.layers(model)):
        if mlp is not None:
            pairs.append((adapter.mlp_out(layer), _multiplying(mlp[i])))
        if attn is not None:
            pairs.append((adapter.attn_out(layer), _multiplying(attn[i])))
    return pairs


@dataclass(frozen=True)
class ChannelMasks:
    """0/1 unit-activation masks and a down_proj bias: `mlp` (..., layers, intermediate), `attn` (..., layers,
    heads*head_dim), `mlp_bias` (..., layers, hidden); None where nothing changes."""

    mlp: torch.Tensor | None
    attn: torch.Tensor | None
    mlp_bias: torch.Tensor | None = None


@contextmanager
def apply_channel_masks(
    model: nn.Module,
    adapter: Adapter,
    masks: ChannelMasks,
    scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    scale_dtype: torch.dtype = torch.float32,
) -> Iterator[None]:
    """Zero unit activations (`masks.mlp` (layers, intermediate), `masks.attn` (layers, heads*head_dim)); add
    `masks.mlp_bias` (layers, hidden) to every `down_proj` output, as the export's down_proj bias does; scale the
    down_proj / o_proj input columns by `scales` (mlp, attn), as the export stores them (`scaled_columns`)."""
    pairs = _unit_masks(model, adapter, masks.mlp, masks.attn)
    with pre_hooks(pairs), _mlp_biases(model, adapter, masks.mlp_bias), _scaled(model, adapter, scales, scale_dtype):
        yield


@contextmanager
def per_row_channel_masks(model: nn.Module, adapter: Adapter, masks: ChannelMasks) -> Iterator[None]:
    """`apply_channel_masks` with its own condition in each row of the batch: `masks.mlp` (rows, layers,
    intermediate) and `masks.attn` (rows, layers, heads*head_dim) of 0/1, `masks.mlp_bias` (rows, layers, hidden)
    added to each row's down_proj output. The bias is added by a hook, `(x W^T) + b`, which can round differently
    from the export's `x W^T + b` in the last bit; every forward inside must have exactly these rows, in order."""

    def by_layer(x: torch.Tensor | None) -> torch.Tensor | None:  # (rows, layers, c) -> (layers, rows, 1, c)
        return None if x is None else x.transpose(0, 1).unsqueeze(2)

    mlp, attn, mlp_bias = by_layer(masks.mlp), by_layer(masks.attn), by_layer(masks.mlp_bias)
    layers = list(adapter.layers(model))
    biases: list[tuple[nn.Module, Callable[..., Any]]] = (
        [(adapter.mlp_out(layer), _adding(mlp_bias[i])) for i, layer in enumerate(layers)]
        if mlp_bias is not None
        else []
    )
    with pre_hooks(_unit_masks(model, adapter, mlp, attn)), pre_hooks(biases, after=True):
        yield


def scaled_columns(weight: torch.Tensor, scale: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """`weight` (out, in) with input column j multiplied by scale[j]: computed in float64, rounded once to
    the export's `storage` dtype, returned in weight's dtype. The export and the reference both use this."""
    return (weight.to(torch.float64) * scale.to(torch.float64)).to(storage).to(weight.dtype)


def _offloaded(linear: nn.Linear) -> bool:
    """Whether the Linear's weights are not in memory (the meta device: accelerate reads them from disk at each
    forward, or a layer-by-layer model's layer not loaded yet); changes to them go through hooks."""
    return linear.weight.device.type == "meta"


@contextmanager
def _scaled(
    model: nn.Module,
    adapter: Adapter,
    scales: tuple[torch.Tensor | None, torch.Tensor | None],
    storage: torch.dtype,
) -> Iterator[None]:
    """Give the unit-output projections the scaled input columns an export with these scales holds (a Linear
    whose weights are not in memory: its inputs scaled instead, equal up to rounding)."""
    saved: list[tuple[nn.Linear, torch.Tensor]] = []
    hooks: list[tuple[nn.Module, Callable[..., Any]]] = []
    mlp, attn = scales
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers(model)):
            for linear, scale in ((adapter.mlp_out(layer), mlp), (adapter.attn_out(layer), attn)):
                if scale is not None and _offloaded(linear):
                    hooks.append((linear, _multiplying(scale[i])))
                elif scale is not None:
                    saved.append((linear, linear.weight.data))
                    linear.weight.data = scaled_columns(linear.weight.data, scale[i], storage)
    try:
        with pre_hooks(hooks):
            yield
    finally:
        for linear, old in saved:
            linear.weight.data = old


@contextmanager
def _mlp_biases(model: nn.Module, adapter: Adapter, bias: torch.Tensor | None) -> Iterator[None]:
    """Give the MLP projections the biases an export with `bias` holds (zeros on gate/up), for the duration.

    Stored as real Linear biases rather than added by a hook, so that the reference computes the very same
    operations as the exported checkpoint: `x W^T + b` in one call, not `(x W^T) + b`; a Linear whose weights
    are not in memory gets the hook (accelerate would look for a stored bias).
    """
    if bias is None:
        yield
        return
    saved: list[tuple[nn.Linear, Any]] = []
    hooks: list[tuple[nn.Module, Callable[..., Any]]] = []
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers(model)):
            if _offloaded(adapter.mlp_out(layer)):
                hooks.append((adapter.mlp_out(layer), _adding(bias[i])))
                continue
            for linear, value in adapter.mlp_biases(layer, bias[i]).items():
                saved.append((linear, linear.bias))
                linear.bias = nn.Parameter(value, requires_grad=False)
    try:
        with pre_hooks(hooks, after=True):
            yield
    finally:
        for linear, old in saved:
            linear.bias = old
