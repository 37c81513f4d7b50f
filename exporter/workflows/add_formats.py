"""`persona-export export`: add export formats to a persona folder (`RUN_DIR/<persona>`) of a finished run.

What a format is made from is built first when missing; formats already there (and verified) are reused, not
rebuilt. The base model is loaded only when a format is verified against the masked reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from exporter.errors import ExportFolderError, OutputError
from exporter.recipe.formats import FOLDERS, with_sources
from exporter.recipe.schema import Recipe
from exporter.reports.persona import Check, PersonaReport, read_report, write_report

NEEDS_REFERENCE = ("onnx", "gguf")  # verified against the masked reference model


def add_formats(folder: Path, formats: list[str], overwrite: bool = False) -> PersonaReport:
    """Add `formats` to an existing persona. A requested format that exists is refused unless `overwrite`;
    a folder without a passed verification is rebuilt.

    The model loads as the run that made the persona loaded it (within model.max_memory, offload included).
    """
    report = read_report(folder)
    verification = report.verification
    if verification.get("hf", Check()).passed is not True:
        raise ExportFolderError(f"{folder}: its checkpoint is not verified; re-run `persona-export run` first")
    for name in formats:
        if (folder / FOLDERS[name]).exists():
            if not overwrite:
                raise OutputError(f"{folder / FOLDERS[name]} exists; pass --overwrite to replace it")
            shutil.rmtree(folder / FOLDERS[name])
            verification.pop(name, None)
    present = {n for n in FOLDERS if (folder / FOLDERS[n]).exists() and verification.get(n, Check()).passed}
    todo = [n for n in with_sources(formats) if n not in present]
    recipe_file = folder.parent / "recipe.json"
    if not recipe_file.is_file():
        raise ExportFolderError(f"{recipe_file} is missing: the persona must sit in the run folder that made it")
    if "gguf" in todo:  # refused before the model is loaded
        from exporter.export.gguf import check_no_biases

        check_no_biases(json.loads((folder / "hf" / "config.json").read_text()), folder / "hf")
    for name in todo:  # a stale folder without a passed verification is rebuilt
        if (folder / FOLDERS[name]).exists():
            shutil.rmtree(folder / FOLDERS[name])
    recipe = Recipe.model_validate(json.loads(recipe_file.read_text()))
    timings: dict[str, float] = {}
    results = _build(folder, report, todo, recipe, timings)
    verification.update({name: Check(**figures) for name, figures in results.items()})
    report.timings_s.update(timings)
    write_report(folder, report)
    return report


def _build(
    folder: Path, report: PersonaReport, todo: list[str], recipe: Recipe, timings: dict[str, float]
) -> dict[str, Any]:
    """Make the formats in `todo` (build order); {format: figures}."""
    from transformers import AutoTokenizer

    from exporter.evaluation.items import read_neutral
    from exporter.export.hf import DTYPES
    from exporter.masking.masks import PersonaMask
    from exporter.model.sources import open_model
    from exporter.verify.hf import build_prompts, references
    from exporter.workflows.gguf_stage import gguf_stage
    from exporter.workflows.onnx_stage import onnx_stage

    neutral = read_neutral(recipe.eval.neutral.path) if recipe.eval and recipe.eval.neutral else None
    mask = PersonaMask.load(folder / "masks.safetensors")
    fp32_passed = report.verification.get("onnx", Check()).passed
    if not any(n in todo for n in NEEDS_REFERENCE):  # made from existing proven exports: no base model
        prompts = build_prompts(AutoTokenizer.from_pretrained(folder / "hf"), recipe.verify.prompts)
        return onnx_stage(folder, todo, None, None, mask, prompts, recipe.verify, timings, neutral, fp32_passed)
    with open_model(recipe) as m:
        if m.model_sha256 != report.base_model.sha256:
            raise ExportFolderError(
                f"the base model's files changed since this run (sha256 {m.model_sha256[:12]} now, "
                f"{report.base_model.sha256[:12]} then); re-run `persona-export run`"
            )
        reference = references(m, DTYPES[report.dtype], exact=False)[torch.float32]
        prompts = build_prompts(m.tokenizer, recipe.verify.prompts)
        results = onnx_stage(
            folder, todo, reference, m.adapter, mask, prompts, recipe.verify, timings, neutral, fp32_passed
        )
        if "gguf" in todo:
            shipped = AutoTokenizer.from_pretrained(folder / "hf")
            results["gguf"] = gguf_stage(
                folder, reference, m.adapter, mask, prompts, recipe.verify, shipped, neutral, timings
            )
        return results
