"""Table-driven bad input: each case raises the project's error class with a message naming the problem,
exits non-zero through the CLI, and leaves the output location exactly as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from exporter.cli import dispatch, main
from exporter.errors import (
    CalibrationDataError,
    MaskError,
    ModelSourceError,
    OutputError,
    RecipeError,
    UnsupportedModelError,
)
from tests.helpers import RECIPE_CASES, Case, cal, data_file, snapshot, tiny_model, tiny_tokenizer, write_recipe


def model_dir(tmp: Path, kind: str) -> str:
    folder = tmp / f"model-{kind}"
    folder.mkdir()
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    elif kind == "pickle":
        tiny_model("llama").save_pretrained(folder, safe_serialization=False)
    elif kind == "corrupt-config":
        tiny_model("llama").save_pretrained(folder)
        (folder / "config.json").write_text("{not json")
    elif kind == "corrupt-weights":
        tiny_model("llama").save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return str(folder)


def existing(tmp: Path) -> Path:
    out = tmp / "runs" / "demo"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    return out


def a_file(tmp: Path) -> Path:
    (tmp / "runs").mkdir()
    (tmp / "runs" / "demo").write_text("a file")
    return tmp / "runs" / "demo"


CASES = [
    # a recipe problem through the CLI (the others: tests/recipe/test_recipe.py, without the CLI)
    Case("unknown-top-key", RecipeError, "outptu: unknown key", lambda d, t: d.update(outptu={})),
    # calibration data
    Case(
        "data-missing",
        CalibrationDataError,
        "personas.introvert.calibration.path: file not found: ",
        lambda d, t: cal(d, path=str(t / "none.jsonl")),
    ),
    Case("data-empty", CalibrationDataError, "holds no records", lambda d, t: cal(d, path=data_file(t, "e.jsonl", ""))),
    Case(
        "data-bad-line",
        CalibrationDataError,
        "e.jsonl:2: not valid JSON",
        lambda d, t: cal(d, path=data_file(t, "e.jsonl", '{"prompt": "a", "introvert": "b"}\n{oops\n')),
    ),
    Case(
        "data-missing-field",
        CalibrationDataError,
        "has no text field 'introvert'",
        lambda d, t: cal(d, path=data_file(t, "f.jsonl", '{"prompt": "a", "other": "b"}\n')),
    ),
    Case(
        "data-too-few",
        CalibrationDataError,
        "max_samples is 500 but the file holds 24",
        lambda d, t: cal(d, max_samples=500),
    ),
    Case(
        "data-not-utf8",
        CalibrationDataError,
        "not UTF-8",
        lambda d, t: cal(d, path=data_file(t, "b.jsonl", b"\xff\xfe\x00")),
    ),
    Case(
        "data-csv-column",
        CalibrationDataError,
        "has no text field 'introvert'",
        lambda d, t: cal(d, path=data_file(t, "c.csv", "prompt,other\na,b\n")),
    ),
    Case(
        "data-json-object",
        CalibrationDataError,
        "expected a JSON list",
        lambda d, t: cal(d, path=data_file(t, "o.json", '"just text"')),
    ),
    Case("data-prompt-too-long", CalibrationDataError, "leaving no response token", lambda d, t: cal(d, max_tokens=8)),
    # model folders
    Case(
        "model-not-a-folder",
        ModelSourceError,
        "does not exist; point it at a Hugging Face model folder",
        lambda d, t: d.update(model={"path": str(t / "nothing")}),
    ),
    Case(
        "model-pickle-only",
        ModelSourceError,
        "pickle-based weights are not loaded",
        lambda d, t: d.update(model={"path": model_dir(t, "pickle")}),
    ),
    Case(
        "model-unsupported",
        UnsupportedModelError,
        "supported: llama, mistral",
        lambda d, t: d.update(model={"path": model_dir(t, "gpt2")}),
    ),
    Case(
        "model-corrupt-config",
        ModelSourceError,
        "config.json is not valid JSON",
        lambda d, t: d.update(model={"path": model_dir(t, "corrupt-config")}),
    ),
    Case(
        "model-corrupt-weights",
        ModelSourceError,
        "cannot load the model",
        lambda d, t: d.update(model={"path": model_dir(t, "corrupt-weights")}),
    ),
    # masks that cannot be made as asked
    Case(
        "disjoint-impossible",
        MaskError,
        "can be removed disjointly",
        overrides=("prune.attention={unit: query-head, sparsity: 0.67}",),
    ),
    # run folders
    Case("out-exists", OutputError, "exists; pass --overwrite", out=existing),
    Case("out-is-a-file", OutputError, "exists; pass --overwrite", out=a_file),
    Case("out-under-a-file", OutputError, "cannot create", out=lambda t: a_file(t) / "run"),
]


def test_the_table_is_large() -> None:
    assert len(CASES) + len(RECIPE_CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    recipe_path = write_recipe(tmp_path, tiny_llama_dir)
    if case.recipe is not None:
        data = yaml.safe_load(recipe_path.read_text())
        case.recipe(data, tmp_path)
        recipe_path.write_text(yaml.safe_dump(data))
    out = case.out(tmp_path) if case.out else tmp_path / "runs" / "demo"
    argv = ["run", str(recipe_path), "--out", str(out), *case.overrides]
    before = snapshot(tmp_path)

    with pytest.raises(case.error) as err:
        dispatch(argv)
    assert case.message in str(err.value)
    assert main(argv) == case.error.exit_code != 0
    assert case.message in capsys.readouterr().err
    after = snapshot(tmp_path)
    assert after == before, f"output changed: {set(after) ^ set(before)}"


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["run"], ["run", "recipe.yaml"], ["validate"], ["run", "r.yaml", "--out", "x", "--bogus"]],
    ids=["nothing", "unknown-command", "run-no-recipe", "run-no-out", "validate-no-recipe", "unknown-flag"],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "usage: persona-export" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "0", "-100", "abc", "1.5", ""])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_max_new_tokens_must_be_positive(
    value: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [command, str(tmp_path), "--max-new-tokens", value] + (["--prompt", "hi"] if command == "generate" else [])
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "--max-new-tokens" in capsys.readouterr().err
