"""`persona-export export`: add export formats to a persona folder (`RUN_DIR/<persona>`) of a finished run.

What a format is made from is built first when missing; formats already there (and verified) are reused, not
rebuilt. The base model is loaded only when a format is verified against the masked reference.

A staged copy of the persona folder gets the new exports and report.json; it replaces the folder in one step
once verified, so an interruption or a failed export leaves the verified folders and their report as they were.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from exporter.errors import ExportFolderError, GgufExportError, OutputError
from exporter.export.gguf import BIAS_FIX
from exporter.folders.run_folder import RERUN, PersonaFolder
from exporter.io import check_target, link_copy, refuse_links, staged
from exporter.model.adapters import Adapter
from exporter.model.checkpoint import stored_parameters
from exporter.model.sources import check_sizes
from exporter.recipe.formats import FORMATS, format_problems, with_sources
from exporter.recipe.schema import Recipe
from exporter.reports.checks import Check
from exporter.reports.persona import PersonaReport, write_report
from exporter.reports.provenance import Timer
from exporter.stages.space import check_space, persona_bytes, working_bytes


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
    persona = PersonaFolder(folder)
    report = persona.report()
    hf = report.verification.get("hf")
    if hf is None or not hf.passed:
        raise ExportFolderError(f"{folder}: its checkpoint is not verified; {RERUN} first")
    todo, done, replaced = plan(folder, formats, report, overwrite)
    recipe = persona.run.recipe()
    if genai_precision is not None:
        output = recipe.output.model_copy(update={"genai_precision": genai_precision})
        recipe = recipe.model_copy(update={"output": output})
    config = persona.config()
    problems = format_problems(todo, config, folder / "hf" / "config.json", BIAS_FIX)
    if problems:  # refused before the model is loaded
        raise GgufExportError("; ".join(problems))
    check_target(folder, overwrite=True)  # the run folder can be written, before the model loads
    weights = tuple(sorted((folder / "hf").glob("*.safetensors")))
    check_sizes("the export", folder / "hf", config, weights, ExportFolderError)  # readable headers, sane sizes
    new = [n for n in todo if n != "hf"]
    params = stored_parameters(weights)
    size = persona_bytes(new, report.dtype, recipe.output.genai_precision, params)
    size += working_bytes(new, report.dtype, params)
    check_space({folder.parent: (size, f"{folder.name}: {', '.join(new)}")})
    timer = Timer()
    with staged(folder, overwrite=True) as stage:
        link_copy(folder, stage, skip={FORMATS[n].folder for n in todo})
        results = build(stage, report, todo, recipe, timer, done)
        kept = {n: c for n, c in report.verification.items() if n not in replaced}  # a rebuilt format's old check goes
        report = report.model_copy(
            update={"verification": kept | results, "timings_s": {**report.timings_s, **timer.stages}}
        )
        write_report(stage, report)
    return report


def plan(
    folder: Path, formats: list[str], report: PersonaReport, overwrite: bool
) -> tuple[list[str], dict[str, Check], set[str]]:
    """What to build (with what it is made from, in build order), the proven formats already there, and the
    requested formats that replace a folder."""
    for name in (n for n in with_sources(formats) if n != "hf"):  # written, or read as the source of one
        target = folder / FORMATS[name].folder
        if target.is_symlink():
            raise OutputError(
                f"{target} is a symlink (to {os.readlink(target)!r}); persona-export neither follows nor replaces "
                "links in a persona folder: remove the link (or replace it with the folder itself) and retry"
            )
    refuse_links(folder, "replace each link with the file itself")  # the persona's folder is copied and rewritten
    for name in formats:
        if (folder / FORMATS[name].folder).exists() and not overwrite:
            raise OutputError(f"{folder / FORMATS[name].folder} exists; pass --overwrite to replace it")
    replaced = {n for n in formats if (folder / FORMATS[n].folder).exists()}  # rebuilt, its old result dropped
    verification = report.verification
    done = {
        n: c
        for n, c in verification.items()
        if n not in replaced and (folder / FORMATS[n].folder).exists() and c.passed
    }
    todo = [n for n in with_sources(formats) if n not in done]  # a stale folder is rebuilt too
    for name in todo:  # a folder is replaced only when report.json records it as this project's export
        if (folder / FORMATS[name].folder).exists() and name not in verification:
            raise OutputError(
                f"{folder / FORMATS[name].folder} exists but report.json records no {name} export: persona-export "
                "did not write it, and replaces only the format folders its report records; move it away and retry"
            )
    return todo, done, replaced


def build(
    folder: Path, report: PersonaReport, todo: list[str], recipe: Recipe, timer: Timer, done: Mapping[str, Check]
) -> dict[str, Check]:
    """Make the formats in `todo` (build order) in `folder`, the staged copy; {format: check}."""
    from transformers import AutoTokenizer

    from exporter.evaluation.items import quality_texts
    from exporter.export.hf import DTYPES
    from exporter.model.sources import open_model
    from exporter.stages.base import StageInputs
    from exporter.stages.build import build_formats
    from exporter.verify.hf import Probes, build_prompts, references

    neutral, pairs = quality_texts(recipe, report.persona, todo)
    mask, shipped = PersonaFolder(folder).mask(), AutoTokenizer.from_pretrained(folder / "hf")

    def inputs(reference: torch.nn.Module | None, adapter: Adapter | None, tokenizer: Any) -> StageInputs:
        prompts = build_prompts(tokenizer, recipe.verify.prompts)
        return StageInputs(
            folder=folder,
            mask=mask,
            probes=Probes(prompts, recipe.verify, shipped, neutral, pairs),
            reference=reference,
            adapter=adapter,
            genai_precision=recipe.output.genai_precision,
            q4_activations=recipe.output.q4_activations,
            timer=timer,
        )

    if not any(FORMATS[n].reference for n in todo):  # made from existing proven exports: no base model
        return build_formats(inputs(None, None, shipped), todo, done)
    with open_model(recipe) as m:
        if m.model_sha256 != report.base_model.sha256:
            raise ExportFolderError(
                f"the base model's files changed since this run (sha256 {m.model_sha256[:12]} now, "
                f"{report.base_model.sha256[:12]} then); {RERUN}"
            )
        reference = references(m, DTYPES[report.dtype], exact=False)[torch.float32]
        return build_formats(inputs(reference, m.adapter, m.tokenizer), todo, done)
