"""Checkpoints on disk, read lazily: a safetensors checkpoint's tensors, shapes, parameter count and dtype.

Nothing here holds the whole model: tensors are read one at a time with `safe_open`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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


def stored_parameters(files: Sequence[Path]) -> int:
    """Parameters the safetensors `files` hold, from their headers alone."""
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in names)
    return total


def least_parameters(config: dict[str, Any]) -> int | None:
    """The fewest parameters a model of this config.json has, with transformers' defaults for what it leaves
    out: the embedding and each layer's attention and MLP projections (norms, biases and an untied LM head come
    on top). None when the config's architecture is not one transformers knows."""
    from transformers import CONFIG_MAPPING

    kind = config.get("model_type")
    if not isinstance(kind, str) or kind not in CONFIG_MAPPING:
        return None
    known = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    c = CONFIG_MAPPING[kind](**known)
    hidden, heads = c.hidden_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    per_layer = 2 * hidden * head_dim * (heads + kv) + 3 * hidden * c.intermediate_size
    return int(c.vocab_size * hidden + c.num_hidden_layers * per_layer)


SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def size_problem(config: dict[str, Any], files: Sequence[Path]) -> str | None:
    """Why config.json's sizes cannot describe the weight `files` (said of the checkpoint): a size that is not a positive whole number, or
    more parameters than twice what the files hold. transformers would allocate every tensor config.json
    describes before reading a weight, so an absurd size must be refused first; only headers are read here."""
    bad = [
        f"{k} is {config[k]!r}"
        for k in (*SIZE_FIELDS, "num_key_value_heads", "head_dim")
        if config.get(k) is not None
        and (not isinstance(config[k], int) or isinstance(config[k], bool) or config[k] < 1)
    ]
    if bad:
        return f"has a config.json whose {', '.join(bad)}; sizes are positive whole numbers"
    try:
        least = least_parameters(config)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        return f"has a config.json whose sizes transformers cannot read ({type(exc).__name__}: {exc})"
    stored = stored_parameters(files)
    if least is not None and least > 2 * stored:
        return (
            f"does not match its config.json: that describes a model of at least {least:.3g} parameters, and the "
            f"weight files hold {stored:.3g}"
        )
    return None
