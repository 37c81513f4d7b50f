"""Paths a user hands in (exporter/inputs.py): a path that exists but is not a regular file says what it is, as a
recipe, a calibration file or an evaluation file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.errors import CalibrationDataError, RecipeError
from exporter.evaluation.items import EvalDataError
from tests.helpers import edited_recipe, expect, point_eval_at

PATH_KINDS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "folder": (lambda t: (t / "adir").mkdir() or t / "adir", "is a folder, not a regular file"),
    "fifo": (lambda t: os.mkfifo(t / "pipe") or t / "pipe", "is a named pipe (FIFO), not a regular file"),
    "dev-zero": (lambda t: Path("/dev/zero"), "is a character device, not a regular file"),
    "symlink-loop": (
        lambda t: ((t / "a").symlink_to(t / "b"), (t / "b").symlink_to(t / "a")) and t / "a",
        "is a symlink loop, not a regular file",
    ),
    "broken-symlink": (lambda t: (t / "dangling").symlink_to(t / "gone") or t / "dangling", "is a broken symlink"),
    "missing": (lambda t: t / "none.jsonl", "file not found: {target}"),  # a data file; a recipe: "does not exist"
}


@pytest.mark.parametrize("kind", sorted(PATH_KINDS))
@pytest.mark.parametrize("used_as", ["calibration", "eval", "recipe"])
@pytest.mark.usefixtures("no_model_load")
def test_paths_that_are_not_files_say_what_they_are(
    kind: str, used_as: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    make, message = PATH_KINDS[kind]
    target = make(tmp_path)

    def edit(d: dict[str, Any], t: Path) -> None:
        if used_as == "calibration":
            d["personas"]["introvert"]["calibration"].update(path=str(target), format="jsonl")
        elif used_as == "eval":
            point_eval_at(d, target)
            d["eval"]["paired"]["format"] = "jsonl"

    recipe = edited_recipe(tmp_path, tiny_llama_dir, edit)
    error = {"calibration": CalibrationDataError, "eval": EvalDataError, "recipe": RecipeError}[used_as]
    if kind == "missing" and used_as == "recipe":
        message = "does not exist"
    key = {"calibration": "personas.introvert.calibration.path: ", "eval": "eval.paired.path: "}.get(used_as, "")
    message = key + message.format(target=target) if kind == "missing" else message
    expect(["validate", str(target if used_as == "recipe" else recipe)], error, message, capsys)
