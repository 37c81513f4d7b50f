"""The GGUF stage of a persona: write `gguf/` from the proven checkpoint and verify it through transformers'
GGUF loader against the masked reference (a file that holds the weights exactly must match; others are measured)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from exporter.export.gguf import GGUF_TYPES, export_gguf
from exporter.export.q4blocks import DenseMlp
from exporter.io import shown_name
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.recipe.formats import FOLDERS
from exporter.recipe.schema import VerifySpec
from exporter.verify.gguf import verify_gguf
from exporter.verify.hf import PromptSet
from exporter.verify.quality import Pair

log = logging.getLogger(__name__)


def gguf_stage(
    folder: Path,
    reference_fp32: nn.Module,
    adapter: Adapter,
    mask: PersonaMask,
    prompts: PromptSet,
    spec: VerifySpec,
    tokenizer: Any,
    neutral: list[str] | None,
    timings: dict[str, float],
    pairs: list[Pair] | None = None,
) -> dict[str, Any]:
    """Write `gguf/` next to `folder/hf` and verify it; the report entry {"passed", "F16": ..., "Q8_0": ...,
    "Q4_1": ...}: passed when every file that is a parity target meets it (measured files pass)."""
    t = time.perf_counter()
    log.info("%s: writing GGUF (%s)", shown_name(folder), ", ".join(GGUF_TYPES))
    out = folder / FOLDERS["gguf"]
    files = export_gguf(folder / "hf", out, dense=dense_mlp(reference_fp32, adapter, mask))
    timings["export_gguf"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    log.info("%s: verifying GGUF through transformers' GGUF loader against the masked model", shown_name(folder))
    figures = verify_gguf(reference_fp32, adapter, mask, out, files, prompts, spec, tokenizer, neutral, pairs)
    timings["verify_gguf"] = round(time.perf_counter() - t, 3)
    return {"passed": all(f["passed"] for f in figures.values()), **figures}


def dense_mlp(model: nn.Module, adapter: Adapter, mask: PersonaMask) -> DenseMlp | None:
    """The dense down_proj weights and the kept neurons, for quantized GGUF files whose pruned MLP width does not
    split into blocks; None when no neuron is removed or the weights are not in memory (offloaded)."""
    if mask.mlp_keep is None:
        return None
    down = [adapter.mlp_out(layer).weight for layer in adapter.layers(model)]
    if any(w.device.type == "meta" for w in down):
        return None
    return DenseMlp(mask.mlp_keep.numpy(), [w.detach().float().numpy() for w in down])
