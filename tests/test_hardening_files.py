"""Files and folders (issue 15): BOM and CRLF, evaluation and calibration data through one reader, paths that are
not regular files, corrupt caches and run files, unwritable outputs; each family a table."""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from exporter.cli import main
from exporter.errors import (
    CalibrationDataError,
    OutputError,
    RecipeError,
)
from exporter.evaluation.items import EvalDataError
from exporter.masking import cache
from exporter.masking.data import read_samples
from exporter.masking.stats import Statistics
from exporter.recipe.schema import DataSpec, load_recipe
from tests.conftest import write_recipe
from tests.hardening import (  # noqa: F401 (no_model_load is a fixture)
    edited_recipe,
    eval_section,
    expect,
    no_model_load,
    point_eval_at,
)

# -- files a spreadsheet writes: BOM and CRLF -------------------------------------------------------------

ROWS = [{"prompt": f"question {i}", "answer": f"reply {i}, with a comma"} for i in range(3)]


def _csv(rows: list[dict[str, str]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["prompt", "answer"], lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


SPREADSHEET = {
    "csv": ("d.csv", _csv(ROWS)),
    "jsonl": ("d.jsonl", "".join(json.dumps(r) + "\r\n" for r in ROWS)),
    "json": ("d.json", json.dumps(ROWS, indent=1).replace("\n", "\r\n")),
    "json-object": ("d.json", json.dumps({"rows": ROWS}, indent=2).replace("\n", "\r\n")),
}


@pytest.mark.parametrize("bom", [True, False], ids=["bom", "no-bom"])
@pytest.mark.parametrize("fmt", sorted(SPREADSHEET))
def test_bom_and_crlf_files_read_as_plain_ones(fmt: str, bom: bool, tmp_path: Path) -> None:
    name, text = SPREADSHEET[fmt]
    path = tmp_path / name
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    spec = DataSpec(path=str(path), prompt_field="prompt", response_field="answer", max_samples=1)
    samples = read_samples(spec)
    assert [(s.prompt, s.response) for s in samples] == [(r["prompt"], r["answer"]) for r in ROWS]


def test_bom_and_crlf_text_and_recipe(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("\ufefffirst paragraph\r\nstill first\r\n\r\nsecond\r\n".encode())
    samples = read_samples(DataSpec(path=str(path), max_samples=1))
    assert [s.response for s in samples] == ["first paragraph\nstill first", "second"]
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    recipe.write_bytes(b"\xef\xbb\xbf" + recipe.read_text().replace("\n", "\r\n").encode())
    assert load_recipe(recipe).name == "tiny"


# -- evaluation and calibration data ----------------------------------------------------------------------

DATA_CASES: list[tuple[str, str, bytes, str]] = [
    # (id, file name, content, message); the file is used as calibration data and as eval data
    ("not-utf8", "x.jsonl", b'{"prompt": "a", "introvert": "\xff\xfe"}\n', "not UTF-8 text"),
    ("latin1-csv", "x.csv", "prompt,introvert\ncaf\xe9,ol\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ("bad-json", "x.json", b'[{"prompt": "a", "introvert": "b"', "not valid JSON"),
    ("bad-jsonl-line", "x.jsonl", b'{"prompt": "a", "introvert": "b"}\n{"prompt": \n', "x.jsonl:2: not valid JSON"),
    ("json-scalar", "x.json", b"42", "expected a JSON list"),
    ("csv-extra-cell", "x.csv", b"prompt,introvert\na,b,c\n", "row 1 (after the header) has 3 cells but the header"),
    ("csv-extra-cells", "x.csv", b"prompt,introvert\na,b\nc,d,e,f\n", "row 2 (after the header) has 4 cells"),
    ("csv-short-row", "x.csv", b"prompt,introvert\na\n", "has 'introvert' set to null (or an empty CSV cell)"),
    ("null-field", "x.jsonl", b'{"prompt": "a", "introvert": null}\n', "has 'introvert' set to null"),
    ("number-field", "x.jsonl", b'{"prompt": "a", "introvert": 3}\n', "has 'introvert' as a int (3), expected text"),
    ("list-field", "x.jsonl", b'{"prompt": ["a"], "introvert": "b"}\n', "has 'prompt' as a list"),
    ("blank-field", "x.jsonl", b'{"prompt": "a", "introvert": "  "}\n', "has 'introvert' blank"),
]


@pytest.mark.parametrize("where", ["calibration", "eval"])
@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
@pytest.mark.usefixtures("no_model_load")
def test_bad_data_files_through_one_reader(
    case: tuple[str, str, bytes, str],
    where: str,
    tmp_path: Path,
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    _, name, content, message = case
    bad = tmp_path / name
    bad.write_bytes(content)

    def edit(d: dict[str, Any], t: Path) -> None:
        if where == "calibration":
            d["personas"]["introvert"]["calibration"].update(path=str(bad), max_samples=1)
        else:
            point_eval_at(d, bad)

    recipe = edited_recipe(tmp_path, tiny_llama_dir, edit)
    error = CalibrationDataError if where == "calibration" else EvalDataError
    text = expect(["validate", str(recipe)], error, message, capsys)
    assert where == "calibration" or text.startswith("eval.paired.responses.") or "record" in text


# -- paths that exist but are not regular files -----------------------------------------------------------

PATH_KINDS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "folder": (lambda t: (t / "adir").mkdir() or t / "adir", "is a folder, not a regular file"),
    "fifo": (lambda t: os.mkfifo(t / "pipe") or t / "pipe", "is a named pipe (FIFO), not a regular file"),
    "dev-zero": (lambda t: Path("/dev/zero"), "is a character device, not a regular file"),
    "symlink-loop": (
        lambda t: ((t / "a").symlink_to(t / "b"), (t / "b").symlink_to(t / "a")) and t / "a",
        "is a symlink loop, not a regular file",
    ),
    "broken-symlink": (lambda t: (t / "dangling").symlink_to(t / "gone") or t / "dangling", "is a broken symlink"),
    "missing": (lambda t: t / "none.jsonl", "does not exist"),
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
    expect(["validate", str(target if used_as == "recipe" else recipe)], error, message, capsys)


# -- unwritable output ------------------------------------------------------------------------------------


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

    recipe = edited_recipe(tmp_path, tiny_llama_dir, eval_section())
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


# -- caches and run folders -------------------------------------------------------------------------------

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


RUN_FILES: dict[str, tuple[str, bytes | None]] = {
    "recipe-not-json": ("recipe.json", b"{not json"),
    "recipe-a-list": ("recipe.json", b"[1, 2]"),
    "recipe-not-utf8": ("recipe.json", b"\xff\xfe{}"),
    "recipe-empty": ("recipe.json", b""),
    "run-not-json": ("run.json", b"name: yaml"),
    "run-missing": ("run.json", None),
    "report-not-json": ("introvert/report.json", b"<html>"),
    "report-a-string": ("introvert/report.json", b'"passed"'),
    "report-missing": ("introvert/report.json", None),
}


@pytest.mark.parametrize("case", sorted(RUN_FILES))
@pytest.mark.usefixtures("no_model_load")
def test_eval_refuses_run_files_that_are_not_json_objects(
    case: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from exporter.recipe.schema import parse_recipe

    recipe_path = edited_recipe(tmp_path, tiny_llama_dir, eval_section())
    recipe = load_recipe(recipe_path)
    run = tmp_path / "run"
    for p in ("introvert", "extravert"):
        (run / p).mkdir(parents=True)
        (run / p / "report.json").write_text("{}")
    (run / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json")))
    (run / "run.json").write_text("{}")
    parse_recipe(json.loads((run / "recipe.json").read_text()), run)  # the untouched folder is a run
    name, content = RUN_FILES[case]
    if content is None:
        (run / name).unlink()
    else:
        (run / name).write_bytes(content)
    text = expect(["eval", str(run)], OutputError, name.split("/")[-1], capsys)
    assert "pass the --out folder of a `run`" in text


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
