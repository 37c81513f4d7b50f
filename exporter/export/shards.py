"""A pruned export written shard by shard (`prune_checkpoint`), never holding the whole model.

Each pruned shard is written tensor by tensor in the safetensors layout (8-byte header length, JSON header,
data), its header computed from shapes first, so peak memory is about one tensor, whatever the shard size.
Tensors are read from the source with `exporter.model.checkpoint.SourceCheckpoint`.
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
    source_shard: str
    shape: tuple[int, ...]
    nbytes: int


def _plan_outputs(
    source: SourceCheckpoint, plans: list[SlicePlan], prefix: str, dtype: torch.dtype, max_shard_bytes: int
) -> list[list[_Planned]]:
    """Output shards (in source shard, then name order) from shapes alone: no tensor is read."""
    element = torch.tensor([], dtype=dtype).element_size()
    shards: list[list[_Planned]] = [[]]
    size = 0
    for name, shard, shape in source.shapes():
        if (rule := _rule(name, plans, prefix)) is not None:
            shape[rule[0]] = len(rule[1])
        nbytes = math.prod(shape) * element
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(_Planned(name, shard, tuple(shape), nbytes))
        size += nbytes
    return shards


def _write_shard(
    path: Path, items: list[_Planned], source: SourceCheckpoint, plans: list[SlicePlan], prefix: str, dtype: torch.dtype
) -> None:
    """One safetensors file written tensor by tensor: the header first (it needs only shapes), then each
    tensor read from its source shard, sliced, converted and written before the next is read."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for it in items:
        header[it.name] = {
            "dtype": ST_DTYPES[dtype],
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
            with safe_open(str(source.folder / it.source_shard), framework="pt") as f:  # unmapped after each tensor
                tensor = _sliced(it.name, f.get_tensor(it.name), plans, prefix).to(dtype).contiguous()
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

    source = SourceCheckpoint(source_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = [layer_plan(adapter, mask, i) for i in range(mask.geometry.layers)]
    prefix = adapter.layers_prefix
    shards = [s for s in _plan_outputs(source, plans, prefix, dtype, max_shard_bytes) if s]
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, items in enumerate(shards):
        tmp = out_dir / f".part-{i:05d}.safetensors"
        _write_shard(tmp, items, source, plans, prefix, dtype)
        os.replace(tmp, out_dir / names[i])
    if n > 1:
        weight_map = {it.name: names[i] for i, items in enumerate(shards) for it in items}
        total = sum(it.nbytes for items in shards for it in items)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))

    config = AutoConfig.from_pretrained(source_dir)
    adapter.update_config(config, mask.pruned_geometry())
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if (source_dir / "generation_config.json").is_file():
        shutil.copyfile(source_dir / "generation_config.json", out_dir / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
