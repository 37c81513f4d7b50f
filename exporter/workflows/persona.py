"""One persona of a run: its mask saved, the pruned checkpoint written and proven, ONNX and GGUF added, report.json."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporter.evaluation.items import quality_texts
from exporter.export.hf import DTYPES, export_hf
from exporter.export.prune import count_parameters, prune_model
from exporter.export.shards import prune_checkpoint
from exporter.io import folder_bytes
from exporter.masking.masks import PersonaMask
from exporter.model.checkpoint import checkpoint_parameters
from exporter.model.sources import Loaded
from exporter.recipe.schema import Recipe
from exporter.reports.persona import (
    BaseModelInfo,
    CalibrationInfo,
    Check,
    Geometries,
    Parameters,
    PersonaReport,
    RecipeRef,
    Sizes,
    write_report,
)
from exporter.reports.provenance import Timer, versions
from exporter.verify.hf import PromptSet, verify_export
from exporter.verify.layers import verify_layers
from exporter.workflows.genai_stage import genai_stage
from exporter.workflows.gguf_stage import gguf_stage
from exporter.workflows.onnx_stage import onnx_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    """A pruned checkpoint on disk: its files' sizes and the parameter counts before and after."""

    folder: Path
    files: dict[str, int]  # file name -> bytes
    dense_params: int
    pruned_params: int


def describe(mask: PersonaMask) -> str:
    d, p = mask.geometry, mask.pruned_geometry()
    parts = [f"{d.intermediate - p.intermediate} of {d.intermediate} MLP neurons"]
    if p.heads != d.heads:
        parts.append(f"{d.heads - p.heads} of {d.heads} query heads ({d.kv_heads - p.kv_heads} KV heads)")
    return " and ".join(parts) + " per layer"


def nothing_removed(mask: PersonaMask) -> list[str]:
    """A warning when the mask removes no unit, scales none (soft masks) and adds no steering bias: the export
    is then the unpruned model."""
    steered = mask.steering is not None and bool(mask.steering.any())
    scaled = any(s is not None and bool((s != 1).any()) for s in (mask.mlp_scale, mask.attn_scale))
    if steered or scaled or any(units for k in ("mlp", "head", "group") for units in mask.removed(k)):
        return []
    return [
        "the mask removes no unit (the sparsities round to 0 units per layer), scales none and adds no steering "
        "bias: this export is the unpruned model, not a persona subnetwork; raise prune.mlp.sparsity (or attention)"
    ]


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
    references: dict[torch.dtype, Any],
    prompts: PromptSet,
    name: str,
) -> dict[str, Any]:
    """The export against the masked model: end to end (float64 and/or fp32), and layer by layer if asked."""
    figures = verify_export(
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
    if recipe.verify.layerwise:
        figures["fp64_layers"] = verify_layers(
            m.resolved.folder,
            hf_dir,
            m.adapter,
            mask,
            prompts,
            storage=DTYPES[recipe.output.dtype],
            max_abs=recipe.verify.fp64_max_abs,
        )
        figures["passed"] = figures["fp64_layers"]["passed"]
    return figures


def export_persona(
    recipe: Recipe,
    recipe_sha: str,
    name: str,
    m: Loaded,
    mask: PersonaMask,
    stats_info: dict[str, Any],
    references: dict[torch.dtype, Any],
    prompts: PromptSet,
    stage: Path,
    timer: Timer,
) -> PersonaReport:
    """Write `stage/<name>` (masks, hf/, onnx/ when asked, report.json); returns the report. `recipe_sha` is the
    recipe's hash as validated (Recipe.digest), recorded in the manifests."""
    folder = stage / name
    folder.mkdir()
    mask_manifest = {"recipe_sha256": recipe_sha, "model_sha256": m.model_sha256, "stats_key": stats_info["key"]}
    mask.save(folder / "masks.safetensors", mask_manifest)

    log.info("%s: removing %s and exporting", name, describe(mask))
    written = write_checkpoint(m, mask, folder / "hf", recipe.output.dtype, timer, name)
    t = time.perf_counter()
    log.info("%s: verifying the export against the masked model (float64 and fp32)", name)
    figures = verify_checkpoint(recipe, m, mask, folder / "hf", references, prompts, name)
    timer.add(f"verify_hf.{name}", t)
    warnings = nothing_removed(mask)
    for warning in warnings:
        log.warning("%s: NOTHING WAS REMOVED: %s", name, warning)
    onnx_timings: dict[str, float] = {}
    onnx: dict[str, Any] = {}
    if figures["passed"]:  # ONNX is made from the proven checkpoint only
        formats: list[str] = list(recipe.output.formats)
        reference = references[torch.float32]
        neutral, pairs = quality_texts(recipe, name, formats)
        onnx = onnx_stage(
            folder, formats, reference, m.adapter, mask, prompts, recipe.verify, onnx_timings, neutral, pairs=pairs
        )
        if "gguf" in formats:
            tokenizer = m.export_tokenizer
            onnx["gguf"] = gguf_stage(
                folder, reference, m.adapter, mask, prompts, recipe.verify, tokenizer, neutral, onnx_timings, pairs
            )
        if "onnx-genai" in formats:
            onnx["onnx-genai"] = genai_stage(
                folder,
                recipe.output.genai_precision,
                reference,
                m.adapter,
                mask,
                prompts,
                recipe.verify,
                m.export_tokenizer,
                neutral,
                onnx_timings,
                pairs,
            )
    for stage_name, seconds in onnx_timings.items():  # run.json's timings list the ONNX and GGUF stages too
        timer.stages[f"{stage_name}.{name}"] = seconds
    timings = {k.split(".")[0]: v for k, v in timer.stages.items() if k.endswith(f".{name}")}
    verification = {"hf": figures, **onnx}
    report = persona_report(recipe, recipe_sha, name, m, mask, stats_info, written, verification, timings, warnings)
    write_report(folder, report)
    if not figures["passed"]:
        log.error(
            "%s: the export does not match the masked model: %s", name, figures.get("fp64_layers", figures.get("fp64"))
        )
    elif not report.passed:
        failed = {k: v for k, v in onnx.items() if not v["passed"]}
        log.error("%s: an export format does not match the masked model: %s", name, failed)
    return report


def persona_report(
    recipe: Recipe,
    recipe_sha: str,
    name: str,
    m: Loaded,
    mask: PersonaMask,
    stats_info: dict[str, Any],
    written: Written,
    verification: dict[str, Any],
    timings: dict[str, float],
    warnings: list[str],
) -> PersonaReport:
    element = torch.tensor([], dtype=DTYPES[recipe.output.dtype]).element_size()
    weights_bytes = sum(size for f, size in written.files.items() if f.endswith(".safetensors"))
    dense_params, pruned_params = written.dense_params, written.pruned_params
    gguf = m.resolved.gguf_file
    return PersonaReport(
        persona=name,
        description=recipe.personas[name].description,
        partner=recipe.partner(name),
        base_model=BaseModelInfo(
            name=m.resolved.base_model,
            sha256=m.model_sha256,
            license=m.resolved.license,
            model_type=m.model.config.model_type,
            weights=f"GGUF file {gguf}, de-quantized to float32 by transformers" if gguf else "safetensors",
        ),
        recipe=RecipeRef(name=recipe.name, sha256=recipe_sha),
        method=recipe.method,
        prune=recipe.prune,
        calibration=CalibrationInfo(
            path=recipe.personas[name].calibration.path,
            samples=stats_info["n_samples"],
            tokens_counted=stats_info["n_tokens"],
            data_sha256=stats_info["data_sha256"],
            statistic=stats_info["statistic"],
            tokens=stats_info["tokens"],
        ),
        geometry=Geometries(dense=vars(mask.geometry), pruned=vars(mask.pruned_geometry())),
        removed_per_layer={k: mask.removed(k) for k in ("mlp", "head", "group")},
        parameters=Parameters(dense=dense_params, pruned=pruned_params, ratio=pruned_params / dense_params),
        bytes=Sizes(
            dense_weights=dense_params * element,
            pruned_weights_on_disk=weights_bytes,
            hf_folder=folder_bytes(written.folder),
            ratio=weights_bytes / (dense_params * element),
        ),
        dtype=recipe.output.dtype,
        loading={"max_memory": m.max_memory, "device_map": m.device_map()} if m.bounded else {"whole": True},
        verification={k: Check(**v) for k, v in verification.items()},
        timings_s=timings,
        versions=versions(),
        warnings=warnings,
    )
