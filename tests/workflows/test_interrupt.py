"""Interruptions and disk trouble: a killed or failing run never leaves a visible partial output."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.export import hf as export_hf
from tests.helpers import REPO, kill_at, write_recipe


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def start(recipe: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "exporter", "run", str(recipe), "--out", str(out), "calibration.batch_size=1"]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        # a shell's background jobs (CI) inherit SIGINT ignored, and Python then keeps ignoring it: restore the
        # default so that the child behaves as under a terminal's Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.parametrize(
    ("sig", "marker"),
    [
        (signal.SIGINT, "calibrate introvert"),
        (signal.SIGTERM, "removing"),
        (signal.SIGKILL, "calibrate extravert"),
        (signal.SIGKILL, "verifying"),
    ],
    ids=["sigint-calibration", "sigterm-export", "sigkill-calibration", "sigkill-verification"],
)
@pytest.mark.subprocess
def test_killed_run_leaves_nothing_visible_and_a_rerun_completes(
    tmp_path: Path, tiny_llama_dir: Path, sig: int, marker: str
) -> None:
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "demo"
    proc = start(recipe, out)
    printed = kill_at(proc, marker, sig)
    assert proc.returncode != 0
    assert not out.exists() and visible(runs) == []
    if sig != signal.SIGKILL:  # 128 + the signal's number; the message says which
        assert proc.returncode == 128 + sig
        assert ("terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted") in printed
        assert list(runs.iterdir()) == []  # the staging folder was removed too

    rerun = subprocess.run(
        [sys.executable, "-m", "exporter", "run", str(recipe), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert list(runs.iterdir()) == [out]  # a killed run's hidden staging folder is gone as well
    assert json.loads((out / "run.json").read_text())["personas"] == {"introvert": "passed", "extravert": "passed"}
    if marker in ("removing", "verifying"):  # calibration had finished: its statistics are reused
        assert rerun.stderr.count("reusing cached statistics") == 2


def test_disk_full_during_export_is_a_clear_error(tmp_path: Path, tiny_llama_dir: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr(export_hf, "export_hf", full)
    monkeypatch.setattr("exporter.stages.checkpoint.export_hf", full)
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    out = tmp_path / "runs" / "demo"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free disk space or choose another --out" in err
    assert not (tmp_path / "runs").exists()  # not even the parent folder it had to create


def test_unwritable_location_is_refused_before_any_work(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    assert main(["run", str(recipe), "--out", "/proc/persona-export/run"]) == 2
    assert "cannot create '/proc/persona-export'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", str(recipe), "--out", str(blocker / "run")]) == 2
    assert "cannot create" in capsys.readouterr().err


class _Streaming:
    """A runner whose reply is interrupted (Ctrl-C) after `pieces` were streamed."""

    truncated = False
    repetition_penalty = 1.0  # what the export ships

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def stream(self, messages: object, max_new_tokens: int, sampling: object):  # type: ignore[no-untyped-def]
        yield from self.pieces
        raise KeyboardInterrupt


@pytest.mark.parametrize("pieces", [["Sure", ", here"], []], ids=["mid-reply", "before-the-reply"])
def test_ctrl_c_during_generate_says_the_reply_was_cut(
    pieces: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from exporter import cli

    monkeypatch.setattr(cli, "_runners", lambda args: [("introvert", _Streaming(pieces))])
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 130
    out, err = capsys.readouterr()
    assert out == ("Sure, here\n" if pieces else "")  # the streamed line is ended before the message
    expected = "interrupted: the reply above was cut there" if pieces else "interrupted: nothing was written"
    assert err.strip() == expected and "no partial output" not in err


# -- disk space: estimated before the model loads; a full disk while writing is a clear error --


def _need(recipe: Path) -> int:
    """What `run` estimates for the tiny recipe (exporter/stages/space.py): 2 personas, hf at fp32."""
    from exporter.model.checkpoint import stored_parameters
    from exporter.recipe.load import load_recipe
    from exporter.stages.space import persona_bytes, statistics_bytes

    r = load_recipe(recipe)
    assert r.model.path is not None
    params = stored_parameters(sorted(Path(r.model.path).glob("*.safetensors")))
    return 2 * (persona_bytes(["hf"], "float32", "int4", params) + statistics_bytes(params))


@pytest.mark.parametrize("bounded", [False, True], ids=["whole", "bounded-memory"])
@pytest.mark.usefixtures("no_model_load")
def test_too_little_free_space_is_refused_before_loading(
    bounded: bool, tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    from exporter.cli import dispatch
    from exporter.errors import OutputError
    from exporter.stages import space

    recipe = write_recipe(tmp_path, tiny_llama_dir)
    need = _need(recipe)
    out = tmp_path / "runs" / "demo"
    argv = ["run", str(recipe), "--out", str(out), *(["model.max_memory=1GiB"] if bounded else [])]
    monkeypatch.setattr(space, "free_bytes", lambda path: need - 1)
    with pytest.raises(OutputError) as err:
        dispatch(argv)
    text = str(err.value)
    assert (
        f"not enough disk space: about {space._size(need + (tiny_params(recipe) * 4 if bounded else 0))} needed" in text
    )
    assert f"{space._size(need - 1)} free there" in text and "Nothing was written" in text
    assert ("the offload folder: the model at fp32" in text) == bounded and not (tmp_path / "runs").exists()
    monkeypatch.setattr(space, "free_bytes", lambda path: need)  # exactly enough: the model is loaded next
    if not bounded:
        with pytest.raises(AssertionError, match="a model was loaded"):
            dispatch(argv)


def tiny_params(recipe: Path) -> int:
    from exporter.model.checkpoint import stored_parameters

    return stored_parameters(sorted((recipe.parent / "tiny-llama").glob("*.safetensors")))


@pytest.mark.usefixtures("no_model_load")
def test_export_checks_free_space_for_the_formats_it_adds(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    from exporter.errors import OutputError
    from exporter.stages import space
    from tests.helpers import expect, snapshot
    from tests.workflows.test_bad_input import persona_folder

    persona = persona_folder(tmp_path, tiny_llama_dir)
    monkeypatch.setattr(space, "free_bytes", lambda path: 1000)
    before = snapshot(tmp_path)
    text = expect(["export", persona, "--format", "onnx-int8"], OutputError, "not enough disk space", capsys)
    assert "introvert: onnx, onnx-int8" in text and "1000 B" not in text and snapshot(tmp_path) == before


def _safetensors_full(*args, **kwargs):  # type: ignore[no-untyped-def]
    from safetensors import SafetensorError

    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


def _stats_full(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    ("target", "writer"),
    [
        ("transformers.modeling_utils.safe_save_file", _safetensors_full),
        ("exporter.masking.statistics.Statistics.save", _stats_full),
    ],
    ids=["checkpoint-safetensors", "statistics"],
)
def test_a_full_disk_at_a_writer_is_a_clear_error(
    target: str, writer, tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(target, writer)
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    out = tmp_path / "runs" / "demo"
    assert main(["run", str(recipe), "--out", str(out), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert f"error: writing the output under '{out.parent}' failed: No space left on device" in err
    assert "free disk space or choose another --out. Nothing was written." in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
