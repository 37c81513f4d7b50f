"""`persona-export export`: add export formats to a persona folder (`RUN_DIR/<persona>`) of a finished run.

What a format is made from is built first when missing; formats already there (and verified) are reused, not
rebuilt. The base model is loaded only when a format is verified against the masked reference.

A staged copy of the persona folder gets the new exports and report.json; it replaces the folder in one step
once verified, so an interruption or a failed export leaves the verified folders and their report as they were.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from exporter.errors import ExportFolderError, GgufExportError, OutputError
from exporter.export.gguf import BIAS_FIX
from exporter.inputs import read_json_object
from exporter.io import check_target, link_copy, refuse_links, staged
from exporter.model.checkpoint import stored_parameters
from exporter.model.sources import check_sizes
from exporter.recipe.formats import FOLDERS, with_sources
from exporter.recipe.schema import Recipe
from exporter.reports.persona import SCHEMA_VERSION, Check, PersonaReport, read_report, write_report
from exporter.workflows.space import check_space, persona_bytes
from exporter.workflows.validate import format_problems

NEEDS_REFERENCE = ("onnx", "gguf", "onnx-genai")  # verified against the masked reference model
RERUN = "re-run `persona-export run`"


def add_formats(
    folder: Path, formats: list[str], overwrite: bool = False, genai_precision: str | None = None
) -> PersonaReport:
    """Add `formats` to an existing persona. A requested format that exists is refused unless `overwrite`;
    a folder without a passed verification is rebuilt. `genai_precision` overrides the recipe's
    output.genai_precision for `onnx-genai`.

    The model loads as the run that made the persona loaded it (within model.max_memory, offload included).
    """
    if folder.is_symlink():
        raise OutputError(f"{folder} is a symlink; pass the persona folder itself ({folder.resolve()})")
    report = read_report(folder)
    verification = report.verification
    if verification.get("hf", Check()).passed is not True:
        raise ExportFolderError(f"{folder}: its checkpoint is not verified; {RERUN} first")
    needed = [n for n in with_sources(formats) if n != "hf"]  # written, or read as the source of one
    for name in needed:
        target = folder / FOLDERS[name]
        if target.is_symlink():
            raise OutputError(
                f"{target} is a symlink (to {os.readlink(target)!r}); persona-export neither follows nor replaces "
                "links in a persona folder: remove the link (or replace it with the folder itself) and retry"
            )
    refuse_links(folder, "replace each link with the file itself")  # the persona's folder is copied and rewritten
    for name in formats:
        if (folder / FOLDERS[name]).exists() and not overwrite:
            raise OutputError(f"{folder / FOLDERS[name]} exists; pass --overwrite to replace it")
    replaced = {n for n in formats if (folder / FOLDERS[n]).exists()}  # rebuilt, its old result dropped
    present = {
        n
        for n in FOLDERS
        if n not in replaced and (folder / FOLDERS[n]).exists() and verification.get(n, Check()).passed
    }
    todo = [n for n in with_sources(formats) if n not in present]  # a stale folder is rebuilt too
    for name in todo:  # a folder is replaced only when report.json records it as this project's export
        if (folder / FOLDERS[name]).exists() and name not in verification:
            raise OutputError(
                f"{folder / FOLDERS[name]} exists but report.json records no {name} export: persona-export did not "
                "write it, and replaces only the format folders its report records; move it away and retry"
            )
    recipe_file = folder.parent / "recipe.json"
    if not recipe_file.exists():
        raise ExportFolderError(f"{recipe_file} is missing: the persona must sit in the run folder that made it")
    recipe_data = read_json_object(recipe_file, ExportFolderError, RERUN)
    try:
        recipe = Recipe.model_validate(recipe_data)
    except ValidationError as exc:
        raise ExportFolderError(
            f"{recipe_file} is not a recipe written by `run` ({exc.error_count()} problem(s)); {RERUN}"
        ) from None
    config_file = folder / "hf" / "config.json"
    config = read_json_object(config_file, ExportFolderError, RERUN)
    problems = format_problems(todo, config, config_file, BIAS_FIX)
    if problems:  # refused before the model is loaded
        raise GgufExportError("; ".join(problems))
    check_target(folder, overwrite=True)  # the run folder can be written, before the model loads
    weights = tuple(sorted((folder / "hf").glob("*.safetensors")))
    check_sizes("the export", folder / "hf", config, weights, ExportFolderError)  # readable headers, sane sizes
    params = stored_parameters(weights)
    new = [n for n in todo if n != "hf"]
    size = persona_bytes(new, report.dtype, genai_precision or recipe.output.genai_precision, params)
    check_space({folder.parent: (size, f"{folder.name}: {', '.join(new)}")})
    timings: dict[str, float] = {}
    with staged(folder, overwrite=True) as stage:
        link_copy(folder, stage, skip={FOLDERS[n] for n in todo})
        if genai_precision is not None:
            output = recipe.output.model_copy(update={"genai_precision": genai_precision})
            recipe = recipe.model_copy(update={"output": output})
        results = _build(stage, report, todo, recipe, timings)
        for name in replaced:
            verification.pop(name, None)
        verification.update({name: Check(**figures) for name, figures in results.items()})
        report.timings_s.update(timings)
        report.schema_version = SCHEMA_VERSION  # dump() writes this version's layout
        write_report(stage, report)
    return report


def _build(
    folder: Path, report: PersonaReport, todo: list[str], recipe: Recipe, timings: dict[str, float]
) -> dict[str, Any]:
    """Make the formats in `todo` (build order) in `folder`, the staged copy; {format: figures}."""
    from transformers import AutoTokenizer

    from exporter.evaluation.items import quality_texts
    from exporter.export.hf import DTYPES
    from exporter.masking.masks import load_mask
    from exporter.model.sources import open_model
    from exporter.verify.hf import build_prompts, references
    from exporter.workflows.genai_stage import genai_stage
    from exporter.workflows.gguf_stage import gguf_stage
    from exporter.workflows.onnx_stage import onnx_stage

    neutral, pairs = quality_texts(recipe, report.persona, todo)
    mask = load_mask(folder / "masks.safetensors")
    fp32_passed = report.verification.get("onnx", Check()).passed
    if not any(n in todo for n in NEEDS_REFERENCE):  # made from existing proven exports: no base model
        prompts = build_prompts(AutoTokenizer.from_pretrained(folder / "hf"), recipe.verify.prompts)
        return onnx_stage(folder, todo, None, None, mask, prompts, recipe.verify, timings, neutral, fp32_passed, pairs)
    with open_model(recipe) as m:
        if m.model_sha256 != report.base_model.sha256:
            raise ExportFolderError(
                f"the base model's files changed since this run (sha256 {m.model_sha256[:12]} now, "
                f"{report.base_model.sha256[:12]} then); {RERUN}"
            )
        reference = references(m, DTYPES[report.dtype], exact=False)[torch.float32]
        prompts = build_prompts(m.tokenizer, recipe.verify.prompts)
        results = onnx_stage(
            folder, todo, reference, m.adapter, mask, prompts, recipe.verify, timings, neutral, fp32_passed, pairs
        )
        if "gguf" in todo:
            shipped = AutoTokenizer.from_pretrained(folder / "hf")
            results["gguf"] = gguf_stage(
                folder, reference, m.adapter, mask, prompts, recipe.verify, shipped, neutral, timings, pairs
            )
        if "onnx-genai" in todo:
            shipped = AutoTokenizer.from_pretrained(folder / "hf")
            results["onnx-genai"] = genai_stage(
                folder,
                recipe.output.genai_precision,
                reference,
                m.adapter,
                mask,
                prompts,
                recipe.verify,
                shipped,
                neutral,
                timings,
                pairs,
            )
        return results
