"""A persona's checkpoint (hf/): pruned and written (shard by shard when the model is not whole in memory), then
proven against the masked model, end to end in float64 and fp32 or layer by layer. Every other format is made
from it once it is proven."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from exporter.export.hf import DTYPES, export_hf
from exporter.export.prune import count_parameters, prune_model
from exporter.export.shards import prune_checkpoint
from exporter.masking.masks import PersonaMask
from exporter.model.checkpoint import checkpoint_parameters
from exporter.model.sources import Loaded
from exporter.recipe.schema import Recipe
from exporter.reports.checks import CheckpointCheck
from exporter.reports.provenance import Timer
from exporter.verify.hf import PromptSet, verify_export
from exporter.verify.layers import verify_layers


@dataclass(frozen=True)
class Written:
    """A pruned checkpoint on disk: its files' sizes and the parameter counts before and after."""

    folder: Path
    files: dict[str, int]  # file name -> bytes
    dense_params: int
    pruned_params: int


def write_checkpoint(m: Loaded, mask: PersonaMask, out: Path, dtype: str, timer: Timer, name: str) -> Written:
    """Prune and save: shard by shard from the source checkpoint when the model is not whole in memory."""
    t = time.perf_counter()
    if m.bounded:
        files = prune_checkpoint(
            m.resolved.folder, m.adapter, mask, out, dtype=DTYPES[dtype], tokenizer=m.export_tokenizer
        )
        timer.add(f"export_hf.{name}", t)
        return Written(out, files, checkpoint_parameters(m.resolved.folder), checkpoint_parameters(out))
    pruned = prune_model(copy.deepcopy(m.model), m.adapter, mask)
    timer.add(f"prune.{name}", t)
    t = time.perf_counter()
    files = export_hf(pruned, m.export_tokenizer, out, dtype)
    timer.add(f"export_hf.{name}", t)
    return Written(out, files, count_parameters(m.model), count_parameters(pruned))


def verify_checkpoint(
    recipe: Recipe,
    m: Loaded,
    mask: PersonaMask,
    hf_dir: Path,
    references: dict[torch.dtype, nn.Module],
    prompts: PromptSet,
    name: str,
) -> CheckpointCheck:
    """The export against the masked model: end to end (float64 and/or fp32), and layer by layer if asked."""
    check = verify_export(
        references,
        m.adapter,
        mask,
        hf_dir,
        prompts,
        pad_id=m.tokenizer.pad_token_id,
        greedy_tokens=recipe.verify.greedy_tokens,
        fp64_max_abs=recipe.verify.fp64_max_abs,
        load_kwargs=m.placement(name),
    )
    if not recipe.verify.layerwise:
        return check
    layers = verify_layers(
        m.resolved.folder,
        hf_dir,
        m.adapter,
        mask,
        prompts,
        storage=DTYPES[recipe.output.dtype],
        max_abs=recipe.verify.fp64_max_abs,
    )
    return check.model_copy(update={"fp64_layers": layers})
