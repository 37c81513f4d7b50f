"""Helpers shared by the tests/test_hardening_*.py tables (issue 15): a recipe edited in place, a snapshot of a
folder, a guard that fails when a model is loaded, and the CLI expectation every case shares."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.cli import dispatch, main
from exporter.errors import PersonaExportError
from exporter.model import sources
from tests.conftest import write_recipe

Edit = Callable[[dict[str, Any], Path], None]


def edited_recipe(tmp_path: Path, model_dir: Path, edit: Edit | None = None, **sections: Any) -> Path:
    path = write_recipe(tmp_path, model_dir, **sections)
    if edit is not None:
        data = yaml.safe_load(path.read_text())
        edit(data, tmp_path)
        path.write_text(yaml.safe_dump(data))
    return path


def snapshot(folder: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() and not p.is_fifo() else "other"
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model fails the test: the check under test must come first."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(sources, "load", refuse)


def expect(argv: list[str], error: type[PersonaExportError], message: str, capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(error) as err:
        dispatch(argv)
    assert message in str(err.value), str(err.value)
    assert main(argv) == error.exit_code
    text = capsys.readouterr().err
    assert message in text and "Traceback" not in text
    return str(err.value)


def eval_section(**section: Any) -> Edit:
    def edit(d: dict[str, Any], t: Path) -> None:
        (t / "neutral.txt").write_text("calm words here.\n\nmore calm words.\n")
        d["eval"] = {"neutral": {"path": str(t / "neutral.txt"), "window": 64}, **section}

    return edit


def point_eval_at(d: dict[str, Any], path: Path) -> None:
    d["eval"] = {
        "paired": {
            "path": str(path),
            "prompt_field": "prompt",
            "responses": {"introvert": {"field": "introvert"}, "extravert": {"field": "introvert"}},
            "max_items": 1,
        }
    }
