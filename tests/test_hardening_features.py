"""Issue 15's families applied to the persona-strength features: reply prompt files (eval.replies) through the
one records reader, the tune section checked by `validate` and before `tune` loads a model, context limits of
the reply metric, steering-only points (sparsity 0 with steering) and the report's `warnings`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.errors import OutputError, RecipeError
from exporter.evaluation.items import EvalDataError
from exporter.recipe.schema import load_recipe
from exporter.reports.persona import SCHEMA_VERSION, PersonaReport
from exporter.workflows.sweep import check_sweep
from exporter.workflows.validate import limit_problems
from tests.conftest import write_pair_data
from tests.hardening import edited_recipe, eval_section, expect, no_model_load  # noqa: F401 (a fixture)

PROMPTS = "How was your weekend?\nWhat should I cook tonight?\nAny plans for the holidays?\n"

# -- eval.replies: the prompt file goes through the one reader ------------------------------------------------

REPLY_FILES: list[tuple[str, Callable[[Path], Path], str | None]] = [
    ("plain", lambda t: _write(t / "p.txt", PROMPTS.encode()), None),
    ("bom-crlf", lambda t: _write(t / "p.txt", b"\xef\xbb\xbf" + PROMPTS.replace("\n", "\r\n").encode()), None),
    ("latin-1", lambda t: _write(t / "p.txt", "Caf\xe9 or tea?\n".encode("latin-1")), "not UTF-8 text"),
    ("empty", lambda t: _write(t / "p.txt", b""), "holds no records"),
    ("folder", lambda t: (t / "adir").mkdir() or t / "adir", "is a folder, not a regular file"),
    ("fifo", lambda t: os.mkfifo(t / "pipe") or t / "pipe", "is a named pipe (FIFO), not a regular file"),
    ("missing", lambda t: t / "none.txt", "does not exist"),
]


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", REPLY_FILES, ids=[c[0] for c in REPLY_FILES])
@pytest.mark.usefixtures("no_model_load")
def test_reply_prompt_files_are_read_by_the_one_reader(
    case: tuple[str, Callable[[Path], Path], str | None],
    tmp_path: Path,
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    _, make, message = case
    path = make(tmp_path)
    recipe = edited_recipe(tmp_path, tiny_llama_dir, eval_section(replies={"path": str(path)}))
    if message is None:
        assert expect_valid(recipe, capsys)
        return
    text = expect(["validate", str(recipe)], EvalDataError, message, capsys)
    assert text.startswith("eval.replies: ")


def expect_valid(recipe: Path, capsys: pytest.CaptureFixture) -> bool:
    from exporter.cli import main

    code = main(["validate", str(recipe)])
    return code == 0 and "valid" in capsys.readouterr().out


# -- the tune section ----------------------------------------------------------------------------------------


def _tune(tmp_path: Path, **validation: Any) -> dict[str, Any]:
    pairs = write_pair_data(tmp_path / "validation.jsonl", n=8, seed=5)
    paired = {
        "path": str(pairs),
        "prompt_field": "prompt",
        "responses": {"introvert": {"field": "introvert"}, "extravert": {"field": "extravert"}},
        "max_items": 4,
    }
    return {"sparsity": [0.0, 0.25], "steer": [0.0, 1.0], "validation": {"paired": paired} | validation}


TUNE_CASES: list[tuple[str, Callable[[dict[str, Any], Path], None], type[Exception], str]] = [
    (
        "unknown-persona",
        lambda d, t: d["tune"]["validation"].update(system_prompts={"ambivert": "hi"}),
        RecipeError,
        "tune.validation.system_prompts.ambivert: unknown persona",
    ),
    (
        "missing-file",
        lambda d, t: d["tune"]["validation"]["paired"].update(path=str(t / "gone.jsonl")),
        EvalDataError,
        "does not exist",
    ),
    (
        "not-utf8",
        lambda d, t: (
            _write(t / "bad.jsonl", b'{"prompt": "caf\xe9"}\n'),
            d["tune"]["validation"]["paired"].update(path=str(t / "bad.jsonl")),
        ),
        EvalDataError,
        "not UTF-8 text",
    ),
    (
        "folder",
        lambda d, t: ((t / "d.jsonl").mkdir(), d["tune"]["validation"]["paired"].update(path=str(t / "d.jsonl"))),
        EvalDataError,
        "is a folder, not a regular file",
    ),
]


@pytest.mark.parametrize("case", TUNE_CASES, ids=[c[0] for c in TUNE_CASES])
@pytest.mark.parametrize("command", ["validate", "tune"])
@pytest.mark.usefixtures("no_model_load")
def test_the_tune_section_is_checked_before_any_model_loads(
    case: tuple[str, Callable[[dict[str, Any], Path], None], type[Exception], str],
    command: str,
    tmp_path: Path,
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    _, change, error, message = case

    def edit(d: dict[str, Any], t: Path) -> None:
        eval_section()(d, t)
        d["tune"] = _tune(t, neutral=d["eval"]["neutral"])
        change(d, t)

    recipe = edited_recipe(tmp_path, tiny_llama_dir, edit)
    argv = [command, str(recipe), *(["--out", str(tmp_path / "out")] if command == "tune" else [])]
    expect(argv, error, message, capsys)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"not statistics", b""])
@pytest.mark.usefixtures("no_model_load")
def test_tune_refuses_a_corrupt_reuse_stats_file_before_loading(
    content: bytes, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    def edit(d: dict[str, Any], t: Path) -> None:
        eval_section()(d, t)
        d["tune"] = _tune(t, neutral=d["eval"]["neutral"])

    recipe = edited_recipe(tmp_path, tiny_llama_dir, edit)
    old = tmp_path / "old"
    (old / "stats").mkdir(parents=True)
    (old / "stats" / "introvert.safetensors").write_bytes(content)
    (old / "stats" / "introvert.json").write_text("{}")
    argv = ["tune", str(recipe), "--out", str(tmp_path / "out"), "--reuse-stats", str(old)]
    expect(argv, OutputError, "--reuse-stats", capsys)


# -- limits of the reply metric, steering-only points ----------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "max_new_tokens", "refused"), [(128, 64, False), (128, 128, True), (64, 100, True)]
)
def test_replies_must_fit_the_context(
    context: int, max_new_tokens: int, refused: bool, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    (tmp_path / "p.txt").write_text(PROMPTS)
    replies = {"path": str(tmp_path / "p.txt"), "max_new_tokens": max_new_tokens}
    recipe = load_recipe(edited_recipe(tmp_path, tiny_llama_dir, eval_section(replies=replies)))
    problems = limit_problems(recipe, {"max_position_embeddings": context})
    assert any(p.startswith("eval.replies.max_new_tokens") for p in problems) == refused


@pytest.mark.parametrize(("steer", "refused"), [(0.0, True), (1.0, False)])
def test_sweep_takes_sparsity_zero_only_as_a_steering_point(
    steer: float, refused: bool, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    path = edited_recipe(
        tmp_path,
        tiny_llama_dir,
        eval_section(),
        prune={"mlp": {"sparsity": 0.25}},
        method={"score": "wanda", "steer": steer},
    )
    recipe = load_recipe(path)
    if refused:
        with pytest.raises(RecipeError, match="removes nothing"):
            check_sweep(recipe, [0.0, 0.1], "mlp")
    else:
        check_sweep(recipe, [0.0, 0.1], "mlp")


def test_report_warnings_are_part_of_the_schema() -> None:
    assert SCHEMA_VERSION >= 2 and PersonaReport.model_fields["warnings"].default == []


@pytest.mark.parametrize(
    ("soft", "warned"),
    [({}, True), ({"mlp_scale": 0.5}, False), ({"attn_scale": 2.0}, False), ({"mlp_scale": 1.0}, True)],
)
def test_nothing_removed_counts_soft_masks_as_a_change(soft: dict[str, float], warned: bool) -> None:
    import torch

    from exporter.masking.masks import PersonaMask
    from exporter.model.adapters import Geometry
    from exporter.workflows.persona import nothing_removed

    g = Geometry(2, 8, 16, 4, 2, 2)
    scales = {
        name: torch.full(
            (g.layers, g.intermediate if name == "mlp_scale" else g.heads * g.head_dim), value, dtype=torch.float64
        )
        for name, value in soft.items()
    }
    mask = PersonaMask("introvert", g, torch.arange(16).repeat(2, 1), None, None, **scales)
    assert bool(nothing_removed(mask)) == warned
