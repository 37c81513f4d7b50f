"""Checkpoints on disk, shard by shard: read a source's safetensors lazily, write a pruned sharded export.

Nothing here holds the whole model: tensors are read one at a time with `safe_open` and pruned shards are
flushed as soon as they reach `max_shard_bytes`, so peak memory is about one output shard plus one tensor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exporter.adapters import Adapter, SlicePlan
from exporter.errors import ModelSourceError
from exporter.masks import PersonaMask
from exporter.prune import layer_plan

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class SourceCheckpoint:
    """The tensors of a Hugging Face safetensors checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            with safe_open(str(self.folder / SINGLE), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise ModelSourceError(
                f"{str(self.folder)!r} has neither {SINGLE} nor {INDEX}; layer-by-layer calibration and "
                "shard-by-shard export need a safetensors checkpoint (convert it with save_pretrained)"
            )
        self.weight_map = weight_map

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read `names` (grouped by shard), nothing else."""
        out: dict[str, torch.Tensor] = {}
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        for shard, keys in by_shard.items():
            with safe_open(str(self.folder / shard), framework="pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key)
        return out

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with `prefix`, keyed by the rest of its name."""
        names = [n for n in self.weight_map if n.startswith(prefix)]
        return {n[len(prefix) :]: t for n, t in self.load(names).items()}


def checkpoint_dtype(folder: Path) -> str | None:
    """The storage dtype a checkpoint's config.json names (`dtype`, or the older `torch_dtype`)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    name = data.get("dtype") or data.get("torch_dtype")
    return name if isinstance(name, str) else None


def _sliced(name: str, tensor: torch.Tensor, plans: list[SlicePlan], prefix: str) -> torch.Tensor:
    """`tensor` cut to the kept rows/columns if `name` is a weight or bias the plan of its layer names."""
    m = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None:
        return tensor
    rule = plans[int(m.group(1))].get(m.group(2))
    if rule is None:
        return tensor
    dim, index = rule
    if m.group(3) == "bias":
        return tensor.index_select(0, index) if dim == 0 else tensor
    return tensor.index_select(dim, index)


def pruned_tensors(
    source: SourceCheckpoint, adapter: Adapter, mask: PersonaMask, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, pruned tensor in `dtype`) for every tensor of the source, one at a time, in name order."""
    plans = [layer_plan(adapter, mask, i) for i in range(mask.geometry.layers)]
    for shard in source.shards():
        with safe_open(str(source.folder / shard), framework="pt") as f:
            for name in sorted(f.keys()):
                if source.weight_map.get(name) == shard:
                    yield name, _sliced(name, f.get_tensor(name), plans, adapter.layers_prefix).to(dtype).contiguous()


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
    when present. Returns {file name: bytes}.
    """
    from transformers import AutoConfig

    source = SourceCheckpoint(source_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    tmp_names: list[Path] = []

    def flush() -> None:
        nonlocal current, size
        tmp = out_dir / f".part-{len(tmp_names):05d}.safetensors"
        save_file(current, str(tmp), metadata={"format": "pt"})
        tmp_names.append(tmp)
        parts.append({k: torch.empty(0) for k in current})  # names only: the tensors are on disk now
        current, size = {}, 0

    for name, tensor in pruned_tensors(source, adapter, mask, dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor
        size += nbytes
        total += nbytes
    if current:
        flush()
    n = len(tmp_names)
    if n == 1:
        os.replace(tmp_names[0], out_dir / SINGLE)
    else:
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(zip(tmp_names, parts, strict=True)):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, out_dir / final)
            weight_map |= dict.fromkeys(names, final)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))

    config = AutoConfig.from_pretrained(source_dir)
    adapter.update_config(config, mask.pruned_geometry())
    config.torch_dtype = dtype
    config.save_pretrained(out_dir)
    if (source_dir / "generation_config.json").is_file():
        shutil.copyfile(source_dir / "generation_config.json", out_dir / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
