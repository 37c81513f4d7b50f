"""Checkpoints on disk, read lazily: a safetensors checkpoint's tensors, shapes, parameter count and dtype.

Nothing here holds the whole model: tensors are read one at a time with `safe_open`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from exporter.errors import ModelSourceError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


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

    def shapes(self) -> Iterator[tuple[str, str, list[int]]]:
        """(name, shard, shape) of every tensor, in shard then name order, from the headers alone."""
        for shard in self.shards():
            with safe_open(str(self.folder / shard), framework="pt") as f:
                for name in sorted(f.keys()):
                    if self.weight_map.get(name) == shard:
                        yield name, shard, list(f.get_slice(name).get_shape())

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with `prefix`, keyed by the rest of its name."""
        names = [n for n in self.weight_map if n.startswith(prefix)]
        return {n[len(prefix) :]: t for n, t in self.load(names).items()}


def checkpoint_parameters(folder: Path) -> int:
    """Parameters stored in a checkpoint, from the shapes in its headers (a tied LM head is stored once)."""
    return sum(math.prod(shape) for _, _, shape in SourceCheckpoint(folder).shapes())


def checkpoint_dtype(folder: Path) -> str | None:
    """The storage dtype a checkpoint's config.json names (`dtype`, or the older `torch_dtype`)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    name = data.get("dtype") or data.get("torch_dtype")
    return name if isinstance(name, str) else None
