"""Statistics files that are not what save() writes: a corrupt cache entry is ignored with a warning and
recomputed; a corrupt --reuse-stats file (or one that is not a folder) is an input error."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from exporter.cli import main
from exporter.errors import OutputError
from exporter.masking import cache
from exporter.masking.collect import STATS_FORMAT
from exporter.masking.statistics import Statistics
from tests.helpers import expect, write_recipe

CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "garbage-weights": lambda e: e.write_bytes(b"\x00" * 100),
    "truncated-weights": lambda e: e.write_bytes(e.read_bytes()[: len(e.read_bytes()) // 2]),
    "empty-weights": lambda e: e.write_bytes(b""),
    "manifest-not-json": lambda e: e.with_suffix(".json").write_text("{oops"),
    "manifest-a-list": lambda e: e.with_suffix(".json").write_text("[]"),
    "manifest-without-geometry": lambda e: e.with_suffix(".json").write_text('{"n_samples": 1, "n_tokens": 1}'),
    "manifest-missing": lambda e: e.with_suffix(".json").unlink(),
    "wrong-shapes": lambda e: save_file({"sum.mlp": torch.zeros(1)}, str(e)),
    "weights-a-folder": lambda e: (e.unlink(), e.mkdir()),
}


def _saved_statistics(path: Path) -> tuple[Statistics, dict[str, Any]]:
    from exporter.model.adapters import Geometry

    stats = Statistics.empty(Geometry(2, 64, 96, 6, 2, 16))
    stats.n_samples, stats.n_tokens = 3, 30
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"key": "k" * 64}
    stats.save(path, info)
    return stats, info


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_cache_entry_is_ignored_with_a_warning(case: str, caplog: pytest.LogCaptureFixture) -> None:
    entry = cache.cache_root() / "stats" / ("k" * 64) / "stats.safetensors"
    _saved_statistics(entry)
    assert cache.load_cached("k" * 64) is not None
    CORRUPTIONS[case](entry)
    caplog.set_level(logging.WARNING)
    assert cache.load_cached("k" * 64) is None
    assert "ignoring an unreadable cache entry" in caplog.text and "recalibrating" in caplog.text


def test_a_run_recalibrates_over_a_corrupt_cache_entry(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    assert main(["run", str(recipe), "--out", str(tmp_path / "a")]) == 0
    entries = sorted((cache.cache_root() / "stats").glob("*/stats.safetensors"))
    assert len(entries) == 2
    for entry in entries:
        entry.write_bytes(b"corrupt")
    assert main(["run", str(recipe), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "introvert" / "masks.safetensors").read_bytes() == (
        tmp_path / "b" / "introvert" / "masks.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
@pytest.mark.usefixtures("no_model_load")
def test_a_corrupt_reuse_stats_file_is_an_input_error(
    case: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    earlier = tmp_path / "earlier"
    _saved_statistics(earlier / "stats" / "introvert.safetensors")
    CORRUPTIONS[case](earlier / "stats" / "introvert.safetensors")
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    argv = ["run", str(recipe), "--out", str(tmp_path / "out"), "--reuse-stats", str(earlier)]
    expect(argv, OutputError, "--reuse-stats: ", capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "file"])
@pytest.mark.usefixtures("no_model_load")
def test_reuse_stats_must_be_a_folder(
    kind: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    earlier = tmp_path / "earlier"
    if kind == "file":
        earlier.write_text("x")
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    argv = ["run", str(recipe), "--out", str(tmp_path / "out"), "--reuse-stats", str(earlier)]
    expect(argv, OutputError, "--reuse-stats: ", capsys)


def test_statistics_of_the_previous_format_are_stale_and_read_without_wanda_norms(
    tmp_path: Path, tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Format 3 files hold no `in_sq`: they still load (`eval RUN_DIR` of an older run then takes the Wanda
    norms from a calibration pass), and --reuse-stats recalibrates them as stale, saying so."""
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    assert main(["run", str(recipe), "--out", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "stats" / "introvert.safetensors"
    stats, info = Statistics.load(saved)
    assert stats.in_sq and all(v.shape[0] == 2 for v in stats.in_sq.values())  # (layers, in_features)
    stats.in_sq = {}
    stats.save(saved, {**info, "key": "an older format's key"})
    older, _ = Statistics.load(saved)
    assert older.in_sq == {} and torch.equal(older.chan_sq["mlp"], stats.chan_sq["mlp"])
    with caplog.at_level(logging.INFO):
        assert main(["run", str(recipe), "--out", str(tmp_path / "b"), "--reuse-stats", str(tmp_path / "a")]) == 0
    assert "introvert: saved statistics" in caplog.text and f"statistics format {STATS_FORMAT} changed" in caplog.text
    assert Statistics.load(tmp_path / "b" / "stats" / "introvert.safetensors")[0].in_sq
