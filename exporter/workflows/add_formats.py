"""`persona-export export`: add verified ONNX formats to a persona folder (`RUN_DIR/<persona>`) of a finished run.

A staged copy of the persona folder gets the new exports and report.json; it replaces the folder in one step
once verified, so an interruption leaves the verified onnx/ and its report as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import ValidationError

from exporter.errors import ExportFolderError, OutputError
from exporter.inputs import read_json_object
from exporter.io import check_target, link_copy, staged
from exporter.reports.persona import Check, PersonaReport, read_report, write_report


def add_formats(folder: Path, formats: list[str], overwrite: bool = False) -> PersonaReport:
    """Add ONNX (and int8) exports to an existing persona, verified against its masked reference.

    The model loads as the run that made the persona loaded it (within model.max_memory, offload included).
    """
    from exporter.export.hf import DTYPES
    from exporter.masking.masks import load_mask
    from exporter.model.sources import open_model
    from exporter.recipe.schema import Recipe
    from exporter.verify.hf import build_prompts, references
    from exporter.workflows.onnx_stage import onnx_stage

    if folder.is_symlink():
        raise OutputError(f"{folder} is a symlink; pass the persona folder itself ({folder.resolve()})")
    report = read_report(folder)
    if report.verification.get("hf", Check()).passed is not True:
        raise ExportFolderError(f"{folder}: its checkpoint is not verified; re-run `persona-export run` first")
    names = ["onnx", *(["onnx-int8"] if "onnx-int8" in formats else [])]
    for name in names:
        target = folder / name
        if target.is_symlink():
            raise OutputError(
                f"{target} is a symlink (to {os.readlink(target)!r}); persona-export neither follows nor replaces "
                "links in a persona folder: remove the link (or replace it with the folder itself) and retry"
            )
        if target.exists() and not overwrite:
            raise OutputError(f"{target} exists; pass --overwrite to replace it")
    recipe_file = folder.parent / "recipe.json"
    if not recipe_file.exists():
        raise ExportFolderError(f"{recipe_file} is missing: the persona must sit in the run folder that made it")
    recipe_data = read_json_object(recipe_file, ExportFolderError, "re-run `persona-export run`")
    try:
        recipe = Recipe.model_validate(recipe_data)
    except ValidationError as exc:
        raise ExportFolderError(
            f"{recipe_file} is not a recipe written by `run` ({exc.error_count()} problem(s)); "
            "re-run `persona-export run`"
        ) from None
    check_target(folder, overwrite=True)  # the run folder can be written, before the model loads
    with open_model(recipe) as m:
        if m.model_sha256 != report.base_model.sha256:
            raise ExportFolderError(
                f"the base model's files changed since this run (sha256 {m.model_sha256[:12]} now, "
                f"{report.base_model.sha256[:12]} then); re-run `persona-export run`"
            )
        mask = load_mask(folder / "masks.safetensors")
        reference = references(m, DTYPES[report.dtype], exact=False)[torch.float32]
        timings: dict[str, float] = {}
        prompts = build_prompts(m.tokenizer, recipe.verify.prompts)
        with staged(folder, overwrite=True) as stage:
            link_copy(folder, stage, skip=set(names))
            results = onnx_stage(stage, names, reference, m.adapter, mask, prompts, recipe.verify, timings)
            report.verification.update({name: Check(**figures) for name, figures in results.items()})
            report.timings_s.update(timings)
            write_report(stage, report)
    return report
