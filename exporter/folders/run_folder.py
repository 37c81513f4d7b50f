"""A finished run's files, read in one place: the run folder's recipe.json, run.json and calibration statistics,
and each persona folder's report.json, masks and hf/config.json. Every command that takes a run or persona
folder (export, eval, generate and chat, push) reads it through `RunFolder` and `PersonaFolder`.

Each is given the error to raise and the fix to name, so that a problem reads as the command's own (`eval`
says "pass the --out folder of a `run`", `export` says "re-run `persona-export run`").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.errors import ExportFolderError, PersonaExportError
from exporter.inputs import folder_problem, read_json_object
from exporter.recipe.load import apply_overrides, described, parse_recipe
from exporter.recipe.schema import Recipe
from exporter.reports.persona import PersonaReport, read_report

if TYPE_CHECKING:  # masks and statistics need torch, imported when they are read: a recipe is refused without it
    from exporter.masking.masks import PersonaMask
    from exporter.masking.statistics import Statistics

RERUN = "re-run `persona-export run`"


@dataclass(frozen=True)
class RunFolder:
    """The --out folder of a `run`."""

    path: Path
    error: type[PersonaExportError] = ExportFolderError
    fix: str = RERUN

    def check(self) -> RunFolder:
        """A folder holding recipe.json; else `error`."""
        if (problem := folder_problem(self.path)) is not None:
            raise self.error(f"{problem}; {self.fix}")
        if not (self.path / "recipe.json").exists():
            raise self.error(f"{str(self.path)!r} is not a run folder (no recipe.json); {self.fix}")
        return self

    def recipe(self, overrides: list[str] | None = None) -> Recipe:
        """The recipe the run was made with (paths resolved when it ran), `overrides` applied."""
        file = self.check().path / "recipe.json"
        data = apply_overrides(read_json_object(file, self.error, self.fix), overrides or [])
        return parse_recipe(data, self.path, described(str(file), overrides))

    def info(self) -> dict[str, Any]:
        """run.json: the base model's hash, each persona's status, timings and versions."""
        return read_json_object(self.path / "run.json", self.error, self.fix)

    def persona(self, name: str) -> PersonaFolder:
        return PersonaFolder(self.path / name, self.error, self.fix)

    def statistics(self, persona: str) -> Statistics | None:
        """The persona's calibration statistics saved by the run, or None where they cannot be read."""
        from exporter.masking.statistics import UNREADABLE, Statistics

        try:
            return Statistics.load(self.path / "stats" / f"{persona}.safetensors")[0]
        except UNREADABLE:
            return None


@dataclass(frozen=True)
class PersonaFolder:
    """One persona's exports inside a run folder (RUN_DIR/<persona>)."""

    path: Path
    error: type[PersonaExportError] = ExportFolderError
    fix: str = RERUN

    @property
    def run(self) -> RunFolder:
        return RunFolder(self.path.parent, self.error, self.fix)

    def report(self) -> PersonaReport:
        """report.json; a folder that is not a persona export is refused (ExportFolderError)."""
        return read_report(self.path)

    def mask(self) -> PersonaMask:
        from exporter.masking.masks import load_mask

        return load_mask(self.path / "masks.safetensors")

    def config(self) -> dict[str, Any]:
        """The checkpoint's hf/config.json."""
        return read_json_object(self.path / "hf" / "config.json", self.error, self.fix)
