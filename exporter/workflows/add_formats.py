"""A persona export folder (`RUN_DIR/<persona>`): checks, and adding formats to an existing run."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from exporter.errors import ExportFolderError, OutputError


def read_report(folder: Path) -> dict[str, Any]:
    """The persona's report.json; refuses folders that are not persona exports."""
    report = folder / "report.json"
    if not folder.is_dir() or not report.is_file() or not (folder / "hf" / "config.json").is_file():
        raise ExportFolderError(
            f"{str(folder)!r} is not a persona export (expected report.json and hf/config.json); pass "
            "RUN_DIR/<persona>, e.g. runs/demo/introvert"
        )
    try:
        data = json.loads(report.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportFolderError(f"{report} is not valid JSON ({exc}); re-run the export") from None
    if not isinstance(data, dict) or "persona" not in data:
        raise ExportFolderError(f"{report} is not a persona report; re-run the export")
    return data


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """Replace report.json in one rename."""
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, folder / "report.json")


def add_formats(folder: Path, formats: list[str], overwrite: bool = False) -> dict[str, Any]:
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
    if report.get("verification", {}).get("hf", {}).get("passed") is not True:
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
        if m.model_sha256 != report["base_model"]["sha256"]:
            raise ExportFolderError(
                f"the base model's files changed since this run (sha256 {m.model_sha256[:12]} now, "
                f"{report['base_model']['sha256'][:12]} then); re-run `persona-export run`"
            )
        mask = PersonaMask.load(folder / "masks.safetensors")
        reference = references(m, DTYPES[report["dtype"]], exact=False)[torch.float32]
        timings: dict[str, float] = {}
        prompts = build_prompts(m.tokenizer, recipe.verify.prompts)
        results = onnx_stage(folder, names, reference, m.adapter, mask, prompts, recipe.verify, timings)
    report["verification"].update(results)
    report["timings_s"].update(timings)
    report["status"] = "passed" if all(r["passed"] for r in report["verification"].values()) else "failed"
    write_report(folder, report)
    return report
