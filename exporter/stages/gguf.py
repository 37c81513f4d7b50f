"""The GGUF stage: write `gguf/` (F16, Q8_0, Q4_1) from the proven checkpoint and check each file through
transformers' GGUF loader against the masked reference (a file that holds the weights exactly must match;
the others are measured)."""

from __future__ import annotations

import logging

from torch import nn

from exporter.export.gguf import GGUF_TYPES, export_gguf
from exporter.export.q4blocks import DenseMlp
from exporter.io import shown_name
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.recipe.formats import Format
from exporter.reports.checks import GgufCheck
from exporter.stages.base import StageInputs
from exporter.verify.gguf import verify_gguf

log = logging.getLogger(__name__)


def gguf_stage(fmt: Format, x: StageInputs) -> GgufCheck:
    reference, adapter = x.proven_reference()
    out = x.folder / fmt.folder
    with x.timer.timed("export_gguf"):
        log.info("%s: writing GGUF (%s)", shown_name(x.folder), ", ".join(GGUF_TYPES))
        files = export_gguf(x.folder / "hf", out, dense=dense_mlp(reference, adapter, x.mask))
    with x.timer.timed("verify_gguf"):
        log.info("%s: verifying GGUF through transformers' GGUF loader against the masked model", shown_name(x.folder))
        return verify_gguf(reference, adapter, x.mask, out, files, x.probes)


def dense_mlp(model: nn.Module, adapter: Adapter, mask: PersonaMask) -> DenseMlp | None:
    """The dense down_proj weights and the kept neurons, for quantized GGUF files whose pruned MLP width does not
    split into blocks; None when no neuron is removed or the weights are not in memory (offloaded)."""
    if mask.mlp_keep is None:
        return None
    down = [adapter.mlp_out(layer).weight for layer in adapter.layers(model)]
    if any(w.device.type == "meta" for w in down):
        return None
    return DenseMlp(mask.mlp_keep.numpy(), [w.detach().float().numpy() for w in down])
