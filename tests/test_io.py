"""Outputs (exporter/io.py): an output that cannot be written is refused before a model loads, and any OSError on the
staging path is an OutputError naming the output's folder."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from exporter.errors import OutputError
from tests.helpers import edited_recipe, expect, with_eval, write_recipe


@pytest.mark.parametrize("code", [errno.EPERM, errno.EACCES, errno.EROFS, errno.ENOSPC])
@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.usefixtures("no_model_load")
def test_an_unwritable_output_is_refused_before_loading(
    code: int,
    command: str,
    tmp_path: Path,
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tempfile

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise OSError(code, os.strerror(code))

    recipe = edited_recipe(tmp_path, tiny_llama_dir, with_eval())
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    out = tmp_path / "deeper" / "out"
    extra = ["--sparsity", "0.1"] if command == "sweep" else []
    text = expect([command, str(recipe), "--out", str(out), *extra], OutputError, "cannot be written", capsys)
    assert os.strerror(code) in text and str(out.parent) in text
    assert not (tmp_path / "deeper").exists()


@pytest.mark.parametrize("out", ["/sys/persona-export-out", "/proc/persona-export-out", "/proc/self/x/y"])
@pytest.mark.usefixtures("no_model_load")
def test_pseudo_file_systems_are_refused_before_loading(
    out: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    if not Path(out).parts[1] or not Path("/" + Path(out).parts[1]).is_dir():
        pytest.skip(f"no {out} here")
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    expect(["run", str(recipe), "--out", out], OutputError, "cannot", capsys)


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOTDIR, errno.EISDIR, errno.EPERM, errno.ENOSPC, errno.EROFS])
def test_any_os_error_on_the_staging_path_is_an_output_error(code: int, tmp_path: Path) -> None:
    from exporter.io import staged

    out = tmp_path / "runs" / "demo"
    with pytest.raises(OutputError, match=r"writing the output under .*runs' failed") as err, staged(out) as stage:
        raise OSError(code, os.strerror(code), str(stage / "hf" / "model.safetensors"))
    assert os.strerror(code) in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_an_os_error_elsewhere_is_not_called_an_output_problem(tmp_path: Path) -> None:
    from exporter.io import staged

    with pytest.raises(OSError) as err, staged(tmp_path / "out"):
        raise OSError(errno.EIO, "Input/output error", "/somewhere/else/model.safetensors")
    assert not isinstance(err.value, OutputError) and not (tmp_path / "out").exists()


def test_a_staging_folder_shows_under_the_name_it_will_have(tmp_path: Path) -> None:
    from exporter.io import shown_name, staged

    with staged(tmp_path / "extravert.v2") as stage:
        assert stage.name != "extravert.v2" and shown_name(stage) == "extravert.v2"
    assert shown_name(tmp_path / "extravert.v2") == "extravert.v2" and shown_name(Path(".hidden")) == ".hidden"


def test_links_next_to_or_inside_the_output_are_removed_never_followed(tmp_path: Path) -> None:
    """A stale staging folder that is a link, or holds one, and a link inside an output being replaced: the links
    go, what they point at stays."""
    from exporter.io import RUN_FOLDER, staged

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / ".demo.partial-link").symlink_to(outside)
    (runs / ".demo.partial-old").mkdir()
    (runs / ".demo.partial-old" / "into").symlink_to(outside)
    out = runs / "demo"
    for overwrite in (False, True):
        with staged(out, overwrite, RUN_FOLDER) as stage:
            (stage / "run.json").write_text('{"personas": {}}')
        (out / "link").symlink_to(outside)
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert (outside / "precious.txt").read_text() == "keep" and not (runs / ".demo.partial-old").exists()
