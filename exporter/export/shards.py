"""A pruned export written shard by shard (`prune_checkpoint`), never holding the whole model.

Each pruned shard is written tensor by tensor in the safetensors layout (8-byte header length, JSON header,
data), its header computed from shapes first, so peak memory is about one tensor, whatever the shard size.
Tensors are read from the source with `exporter.model.checkpoint.SourceCheckpoint`. Each tensor is made as
`exporter.export.prune.prune_model` makes it on the model loaded whole in float32: soft-mask column scales
(`scaled_columns`), then the slice, then the persona's down_proj bias (`mlp_bias`: every MLP projection gets a
bias, zeros on gate/up, written after its weight when the source has none), then the export's dtype; so the
two paths write the same bits.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from exporter.export.prune import layer_plan
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter, SlicePlan
from exporter.model.checkpoint import INDEX, SINGLE, SourceCheckpoint
from exporter.model.hooks import scaled_columns
from exporter.model.layer_by_layer import empty_model

LOADED = torch.float32  # the dtype a whole-model run loads the model in: the in-memory path's intermediate


def _rule(name: str, plans: list[SlicePlan], prefix: str) -> tuple[int, torch.Tensor] | None:
    """(dim, kept indices) for a weight or bias that the plan of its layer slices; None if it is kept whole.

    A bias follows its Linear's output rows and is untouched by an input-column slice.
    """
    m = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None:
        return None
    rule = plans[int(m.group(1))].get(m.group(2))
    if rule is None or (m.group(3) == "bias" and rule[0] != 0):
        return None
    return rule


def _sliced(name: str, tensor: torch.Tensor, plans: list[SlicePlan], prefix: str) -> torch.Tensor:
    """`tensor` cut to the kept rows/columns if `name` is a weight or bias the plan of its layer names."""
    rule = _rule(name, plans, prefix)
    return tensor if rule is None else tensor.index_select(rule[0], rule[1])


# safetensors' dtype names (the format's header), for the dtypes an export is written in
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


@dataclass(frozen=True)
class _Planned:
    name: str
    source_shard: str | None  # None: an MLP bias the source lacks (zeros before the persona's bias is added)
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class _Pruning:
    """What turns a source tensor into the export's: the slices, soft-mask scales and down_proj bias of `mask`."""

    source: SourceCheckpoint
    adapter: Adapter
    mask: PersonaMask
    plans: list[SlicePlan]
    outputs: tuple[str, str]  # the unit-output projections inside a layer: (mlp, attention), e.g. "mlp.down_proj"
    dtype: torch.dtype

    @property
    def prefix(self) -> str:
        return self.adapter.layers_prefix

    def _where(self, name: str) -> tuple[int, str, str] | None:
        """(layer, Linear inside the layer, "weight" or "bias") of a decoder Linear's tensor, else None."""
        m = re.fullmatch(rf"{re.escape(self.prefix)}\.(\d+)\.(.+)\.(weight|bias)", name)
        return None if m is None else (int(m.group(1)), m.group(2), m.group(3))

    def entries(self) -> list[tuple[str, str | None, list[int]]]:
        """(name, source shard, pruned shape) of every output tensor, the biases a persona's mlp_bias adds to
        the source after their weights."""
        out: list[tuple[str, str | None, list[int]]] = []
        for name, shard, shape in self.source.shapes():
            if (rule := _rule(name, self.plans, self.prefix)) is not None:
                shape[rule[0]] = len(rule[1])
            out.append((name, shard, shape))
            where = self._where(name)
            if self.mask.mlp_bias is None or where is None or where[2] != "weight":
                continue
            bias = name.removesuffix(".weight") + ".bias"
            if where[1] in self.adapter.mlp_linears and bias not in self.source.weight_map:
                out.append((bias, None, [shape[0]]))
        return out

    def tensor(self, it: _Planned) -> torch.Tensor:
        """The export's tensor `it`, as prune_model makes it and export_hf stores it."""
        where = self._where(it.name)
        tensor = None
        if it.source_shard is not None:
            with safe_open(str(self.source.folder / it.source_shard), framework="pt") as f:  # unmapped after use
                tensor = f.get_tensor(it.name)
        if where is not None and where[2] == "weight" and where[1] in self.outputs:
            scale = (self.mask.mlp_scale, self.mask.attn_scale)[self.outputs.index(where[1])]
            if scale is not None:  # soft mask: columns scaled before the removed ones are cut
                assert tensor is not None
                tensor = scaled_columns(tensor.to(LOADED), scale[where[0]], self.mask.scale_storage)
        if tensor is not None:
            tensor = _sliced(it.name, tensor, self.plans, self.prefix)
        mlp_bias = self.mask.mlp_bias
        if mlp_bias is not None and where is not None and where[2] == "bias" and where[1] in self.adapter.mlp_linears:
            tensor = self.adapter.mlp_bias_value(where[1], tensor, it.shape[0], mlp_bias[where[0]], LOADED)
        assert tensor is not None, it.name
        return tensor.to(self.dtype).contiguous()


def _plan_outputs(pruning: _Pruning, max_shard_bytes: int) -> list[list[_Planned]]:
    """Output shards (in source shard, then name order) from shapes alone: no tensor is read."""
    element = torch.tensor([], dtype=pruning.dtype).element_size()
    shards: list[list[_Planned]] = [[]]
    size = 0
    for name, shard, shape in pruning.entries():
        nbytes = math.prod(shape) * element
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(_Planned(name, shard, tuple(shape), nbytes))
        size += nbytes
    return shards


def _write_shard(path: Path, items: list[_Planned], pruning: _Pruning) -> None:
    """One safetensors file written tensor by tensor: the header first (it needs only shapes), then each
    tensor read from its source shard, made (`_Pruning.tensor`) and written before the next is read."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for it in items:
        header[it.name] = {
            "dtype": ST_DTYPES[pruning.dtype],
            "shape": list(it.shape),
            "data_offsets": [offset, offset + it.nbytes],
        }
        offset += it.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for it in items:
            tensor = pruning.tensor(it)
            assert tuple(tensor.shape) == it.shape, f"{it.name}: planned {it.shape}, got {tuple(tensor.shape)}"
            out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)  # little-endian, as the format
            del tensor


def prune_checkpoint(
    source_dir: Path,
    adapter: Adapter,
    mask: PersonaMask,
    out_dir: Path,
    *,
    dtype: torch.dtype,
    max_shard_bytes: int = 2 * 1024**3,
    tokenizer: Any = None,
) -> dict[str, int]:
    """Write the pruned checkpoint of `source_dir` into `out_dir` without loading the model.

    Shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` (one `model.safetensors` when
    everything fits in one shard), config.json with the pruned sizes, the generation config and tokenizer
    when present. Tensors stream from source to output one at a time, so peak memory is about the largest
    tensor (twice: as read and as sliced), whatever the shard size. Returns {file name: bytes}.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source_dir)
    if mask.mlp_bias is not None:
        adapter.check_mlp_bias(config.model_type, "an MLP bias (method.steer, prune.mlp.compensate)")
    layer = adapter.layers(empty_model(config))[0]
    local = {id(m): n for n, m in layer.named_modules()}
    outputs = (local[id(adapter.mlp_out(layer))], local[id(adapter.attn_out(layer))])
    plans = [layer_plan(adapter, mask, i) for i in range(mask.geometry.layers)]
    pruning = _Pruning(SourceCheckpoint(source_dir), adapter, mask, plans, outputs, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = [s for s in _plan_outputs(pruning, max_shard_bytes) if s]
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, items in enumerate(shards):
        tmp = out_dir / f".part-{i:05d}.safetensors"
        _write_shard(tmp, items, pruning)
        os.replace(tmp, out_dir / names[i])
    if n > 1:
        weight_map = {it.name: names[i] for i, items in enumerate(shards) for it in items}
        total = sum(it.nbytes for items in shards for it in items)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))

    adapter.update_config(config, mask.pruned_geometry())
    if mask.mlp_bias is not None:
        setattr(config, str(adapter.mlp_bias_flag), True)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if (source_dir / "generation_config.json").is_file():
        shutil.copyfile(source_dir / "generation_config.json", out_dir / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
