"""`persona-export export`: add verified ONNX formats to a persona folder (`RUN_DIR/<persona>`) of a finished run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from exporter.errors import ExportFolderError, OutputError
from exporter.reports.persona import Check, PersonaReport, read_report, write_report


def add_formats(folder: Path, formats: list[str], overwrite: bool = False) -> PersonaReport:
    """Add ONNX (and int8) exports to an existing persona, verified against its masked reference.

    The model loads as the run that made the persona loaded it (within model.max_memory, offload included).
    """
    from exporter.export.hf import DTYPES
    from exporter.masking.masks import PersonaMask
    from exporter.model.sources import open_model
    from exporter.recipe.schema import Recipe
    from exporter.verify.hf import build_prompts, references
    from exporter.workflows.onnx_stage import onnx_stage

    report = read_report(folder)
    if report.verification.get("hf", Check()).passed is not True:
        raise ExportFolderError(f"{folder}: its checkpoint is not verified; re-run `persona-export run` first")
    names = ["onnx", *(["onnx-int8"] if "onnx-int8" in formats else [])]
    for name in names:
        if (folder / name).exists():
            if not overwrite:
                raise OutputError(f"{folder / name} exists; pass --overwrite to replace it")
            shutil.rmtree(folder / name)
    recipe_file = folder.parent / "recipe.json"
    if not recipe_file.is_file():
        raise ExportFolderError(f"{recipe_file} is missing: the persona must sit in the run folder that made it")
    recipe = Recipe.model_validate(json.loads(recipe_file.read_text()))
    with open_model(recipe) as m:
        if m.model_sha256 != report.base_model.sha256:
            raise ExportFolderError(
                f"the base model's files changed since this run (sha256 {m.model_sha256[:12]} now, "
                f"{report.base_model.sha256[:12]} then); re-run `persona-export run`"
            )
        mask = PersonaMask.load(folder / "masks.safetensors")
        reference = references(m, DTYPES[report.dtype], exact=False)[torch.float32]
        timings: dict[str, float] = {}
        prompts = build_prompts(m.tokenizer, recipe.verify.prompts)
        results = onnx_stage(folder, names, reference, m.adapter, mask, prompts, recipe.verify, timings)
    report.verification.update({name: Check(**figures) for name, figures in results.items()})
    report.timings_s.update(timings)
    write_report(folder, report)
    return report
