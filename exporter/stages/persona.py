"""One persona of a run: its mask saved, its checkpoint written and proven, the other export formats added by
their stages, report.json written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.evaluation.items import quality_texts
from exporter.export.hf import DTYPES
from exporter.io import folder_bytes
from exporter.masking.masks import PersonaMask
from exporter.model.sources import Loaded
from exporter.recipe.formats import with_sources
from exporter.recipe.schema import Recipe
from exporter.reports.checks import Check
from exporter.reports.persona import (
    BaseModelInfo,
    CalibrationInfo,
    Geometries,
    MixPart,
    Parameters,
    PersonaReport,
    RecipeRef,
    Sizes,
    write_report,
)
from exporter.reports.provenance import Timer, versions
from exporter.stages.base import StageInputs
from exporter.stages.build import build_formats
from exporter.stages.checkpoint import Written, verify_checkpoint, write_checkpoint
from exporter.verify.hf import Probes, PromptSet

log = logging.getLogger(__name__)


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


def export_persona(
    recipe: Recipe,
    recipe_sha: str,
    name: str,
    m: Loaded,
    mask: PersonaMask,
    infos: dict[str, dict[str, Any]],
    references: dict[torch.dtype, nn.Module],
    prompts: PromptSet,
    stage: Path,
    timer: Timer,
) -> PersonaReport:
    """Write `stage/<name>` (masks, hf/, the other formats asked for, report.json); returns the report.
    `recipe_sha` is the recipe's hash as validated (Recipe.digest), recorded in the manifests; `infos`: every
    pole's calibration manifest (a composite's mask comes from its parts' statistics)."""
    folder = stage / name
    folder.mkdir()
    mask_manifest: dict[str, Any] = {"recipe_sha256": recipe_sha, "model_sha256": m.model_sha256}
    if name in recipe.composites:
        mask_manifest["stats_keys"] = {p: infos[p]["key"] for p in recipe.composites[name].mix}
    else:
        mask_manifest["stats_key"] = infos[name]["key"]
    mask.save(folder / "masks.safetensors", mask_manifest)

    log.info("%s: removing %s and exporting", name, describe(mask))
    written = write_checkpoint(m, mask, folder / "hf", recipe.output, timer, name)
    log.info("%s: verifying the export against the masked model (float64 and fp32)", name)
    with timer.timed(f"verify_hf.{name}"):
        hf = verify_checkpoint(recipe, m, mask, folder / "hf", references, prompts, name)
    warnings = nothing_removed(mask)
    for warning in warnings:
        log.warning("%s: NOTHING WAS REMOVED: %s", name, warning)
    timings = Timer()
    formats: dict[str, Check] = {}
    if hf.passed:  # the other formats are made from the proven checkpoint only
        todo = [n for n in with_sources(recipe.output.formats) if n != "hf"]
        neutral, pairs = quality_texts(recipe, name, todo)
        inputs = StageInputs(
            folder=folder,
            mask=mask,
            probes=Probes(prompts, recipe.verify, m.export_tokenizer, neutral, pairs),
            reference=references[torch.float32],
            adapter=m.adapter,
            genai_precision=recipe.output.genai_precision,
            q4_activations=recipe.output.q4_activations,
            timer=timings,
        )
        formats = build_formats(inputs, todo, {"hf": hf})
    for step, seconds in timings.stages.items():  # run.json's timings list the format stages too
        timer.stages[f"{step}.{name}"] = seconds
    own = {k.split(".")[0]: v for k, v in timer.stages.items() if k.endswith(f".{name}")}
    verification = {"hf": hf, **formats}
    report = persona_report(recipe, recipe_sha, name, m, mask, infos, written, verification, own, warnings)
    write_report(folder, report)
    if not hf.passed:
        log.error("%s: the export does not match the masked model: %s", name, hf.fp64_layers or hf.fp64)
    elif not report.passed:
        failed = {k: v for k, v in formats.items() if not v.passed}
        log.error("%s: an export format does not match the masked model: %s", name, failed)
    return report


def calibration_info(recipe: Recipe, pole: str, info: dict[str, Any]) -> CalibrationInfo:
    return CalibrationInfo(
        path=recipe.poles[pole].calibration.path,
        samples=info["n_samples"],
        tokens_counted=info["n_tokens"],
        data_sha256=info["data_sha256"],
        statistic=info["statistic"],
        tokens=info["tokens"],
    )


def persona_report(
    recipe: Recipe,
    recipe_sha: str,
    name: str,
    m: Loaded,
    mask: PersonaMask,
    infos: dict[str, dict[str, Any]],
    written: Written,
    verification: dict[str, Check],
    timings: dict[str, float],
    warnings: list[str],
) -> PersonaReport:
    element = torch.tensor([], dtype=DTYPES[recipe.output.dtype]).element_size()
    weights_bytes = sum(size for f, size in written.files.items() if f.endswith(".safetensors"))
    dense_params, pruned_params = written.dense_params, written.pruned_params
    gguf = m.resolved.gguf_file
    mix = recipe.composites[name].weights if name in recipe.composites else None
    parts = {
        p: MixPart(weight=w, partner=str(recipe.partner(p)), calibration=calibration_info(recipe, p, infos[p]))
        for p, w in (mix or {}).items()
    }
    return PersonaReport(
        persona=name,
        description=recipe.description(name),
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
        calibration=None if mix else calibration_info(recipe, name, infos[name]),
        mix=parts or None,
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
        generation=recipe.output.generation,
        loading={"max_memory": m.max_memory, "device_map": m.device_map()} if m.bounded else {"whole": True},
        verification=verification,
        timings_s=timings,
        versions=versions(),
        warnings=warnings,
    )
