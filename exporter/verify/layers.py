"""Parity proven layer by layer, for models whose float64 copy does not fit in memory.

Each pruned decoder layer, read from the export's shards, runs on the same inputs as its masked original,
read from the source's shards, both in float64; the inputs of layer i+1 are the masked original's outputs,
so every layer is checked on exactly what the masked model feeds it. Peak memory: two layers (one dense, one
pruned) in float64 plus the prompt set's hidden states. Every tensor outside the decoder layers (embedding,
final norm, LM head) must equal the source's, rounded to the export's dtype, bit for bit. Together these
prove that the export computes the masked model's logits; the end-to-end fp32 check stays as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.model.checkpoint import SourceCheckpoint
from exporter.model.encoding import position_ids
from exporter.model.layer_by_layer import empty_model, load_weights, record_layer_calls, release
from exporter.quiet import progress
from exporter.reports.checks import LayerParity
from exporter.verify.hf import PromptSet, masked


def _rounded(tensors: dict[str, torch.Tensor], storage: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference's parameters as the export stores them: rounded to `storage`, computed in float64."""
    return {k: v.to(storage).to(torch.float64) for k, v in tensors.items()}


def outside_layers_identical(
    source: SourceCheckpoint, export: SourceCheckpoint, prefix: str, storage: torch.dtype
) -> list[str]:
    """Names of tensors outside the decoder layers that differ between source (rounded) and export."""
    pattern = re.compile(rf"{re.escape(prefix)}\.\d+\.")
    names = sorted(n for n in source.weight_map if not pattern.match(n))
    bad = [n for n in names if n not in export.weight_map]
    for name in (n for n in names if n in export.weight_map):
        a = source.load([name])[name].to(storage)
        b = export.load([name])[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            bad.append(name)
    return bad


@torch.inference_mode()
def verify_layers(
    source_dir: Path,
    export_dir: Path,
    adapter: Adapter,
    mask: PersonaMask,
    prompts: PromptSet,
    *,
    storage: torch.dtype,
    max_abs: float,
) -> LayerParity:
    """Per-layer max |output difference| (float64) and the tensors outside layers that differ."""
    from transformers import AutoConfig

    source, export = SourceCheckpoint(source_dir), SourceCheckpoint(export_dir)
    dense = empty_model(AutoConfig.from_pretrained(source_dir), torch.float64)
    pruned = empty_model(AutoConfig.from_pretrained(export_dir), torch.float64)
    batches = prompts.all()
    inputs = [{"input_ids": ids, "attention_mask": a, "position_ids": position_ids(a)} for ids, a in batches]
    calls = record_layer_calls(dense, adapter, source, inputs)
    hidden = [record[0][0].to(storage).to(torch.float64) for record in calls]  # the embedding as stored
    prefix = adapter.layers_prefix
    per_layer: list[float] = []
    pairs = zip(adapter.layers(dense), adapter.layers(pruned), strict=True)
    for i, (ref, cand) in enumerate(progress(mask.geometry.layers, "verify layers", "layer", pairs)):
        where = f"{prefix}.{i}"
        load_weights(ref, _rounded(source.with_prefix(f"{where}."), storage), torch.float64, f"source {where}")
        load_weights(cand, export.with_prefix(f"{where}."), torch.float64, f"export {where}")
        worst = 0.0
        # entered once the layer holds its weights: its down_proj bias and soft-mask scales are then stored
        # in the layer as the export stores them (a layer without weights would get them through hooks)
        with masked(dense, adapter, mask):
            for b, (_, attn) in enumerate(batches):
                _, args, kwargs = calls[b][i]
                want = ref(hidden[b], *args, **kwargs)
                got = cand(hidden[b], *args, **kwargs)
                worst = max(worst, float((want - got).abs()[attn.bool()].max()))
                hidden[b] = want
        per_layer.append(worst)
        release(ref)
        release(cand)
    outside = outside_layers_identical(source, export, prefix, storage)
    worst_layer = max(range(len(per_layer)), key=per_layer.__getitem__)
    return LayerParity(
        method="layer by layer: each pruned layer against its masked original on the same inputs",
        max_abs_layer_output_diff=per_layer[worst_layer],
        worst_layer=worst_layer,
        per_layer_max_abs=per_layer,
        outside_layers_differ=outside,
        threshold=max_abs,
    )
