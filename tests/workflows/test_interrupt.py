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
    if sig != signal.SIGKILL:
        assert proc.returncode == 130 and "interrupted" in printed
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
