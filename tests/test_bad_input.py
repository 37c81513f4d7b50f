"""Table-driven bad input: each case raises the project's error class with a message naming the problem,
exits non-zero through the CLI, and leaves the output location exactly as it was."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.cli import dispatch, main
from exporter.errors import (
    CalibrationDataError,
    MaskError,
    ModelSourceError,
    OutputError,
    PersonaExportError,
    RecipeError,
    UnsupportedModelError,
)
from tests.conftest import tiny_model, tiny_tokenizer, write_recipe

Recipe = dict[str, Any]


@dataclass(frozen=True)
class Case:
    id: str
    error: type[PersonaExportError]
    message: str
    recipe: Callable[[Recipe, Path], None] | None = None  # edits the recipe dict (tmp_path for files)
    overrides: tuple[str, ...] = ()
    out: Callable[[Path], Path] | None = None  # prepares and returns the --out path


def cal(d: Recipe, **kw: Any) -> None:
    d["personas"]["introvert"]["calibration"].update(kw)


def data_file(tmp: Path, name: str, content: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


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
    # recipe schema
    Case("unknown-top-key", RecipeError, "outptu: unknown key", lambda d, t: d.update(outptu={})),
    Case(
        "misspelled-nested-key",
        RecipeError,
        "personas.introvert.calibration.max_sample: unknown key",
        lambda d, t: cal(d, max_sample=3),
    ),
    Case("missing-method", RecipeError, "method: required key is missing", lambda d, t: d.pop("method")),
    Case("missing-name", RecipeError, "name: required key is missing", lambda d, t: d.pop("name")),
    Case("sparsity-one", RecipeError, "prune.mlp.sparsity", overrides=("prune.mlp.sparsity=1.0",)),
    Case("sparsity-negative", RecipeError, "prune.mlp.sparsity", overrides=("prune.mlp.sparsity=-0.1",)),
    Case("sparsity-text", RecipeError, "prune.mlp.sparsity", overrides=("prune.mlp.sparsity=lots",)),
    Case("attention-unit", RecipeError, "prune.attention.unit", overrides=("prune.attention.unit=layer",)),
    Case("score-unknown", RecipeError, "method.score", overrides=("method.score=magic",)),
    Case("score-import-path", RecipeError, "method.score", overrides=("method.score=os.system",)),
    Case("phi-unknown", RecipeError, "method.phi", overrides=("method.phi=tanh",)),
    Case("tau-zero", RecipeError, "method.tau", overrides=("method.tau=0",)),
    Case("max-samples-zero", RecipeError, "calibration.max_samples", lambda d, t: cal(d, max_samples=0)),
    Case("batch-size-zero", RecipeError, "calibration.batch_size", overrides=("calibration.batch_size=0",)),
    Case("greedy-zero", RecipeError, "verify.greedy_tokens", overrides=("verify.greedy_tokens=0",)),
    Case("dtype-unknown", RecipeError, "output.dtype", overrides=("output.dtype=int4",)),
    Case("personas-list", RecipeError, "personas", lambda d, t: d.update(personas=["a", "b"])),
    # recipe meaning
    Case(
        "persona-path-name",
        RecipeError,
        "'../x' is not a safe folder name",
        lambda d, t: d["personas"].update({"../x": d["personas"]["introvert"]}),
    ),
    Case(
        "persona-upper-name",
        RecipeError,
        "'Intro' is not a safe folder name",
        lambda d, t: d["personas"].update(Intro=d["personas"].pop("introvert")),
    ),
    Case("pair-unknown", RecipeError, "unknown persona 'ghost'", overrides=("pairs=[[extravert, ghost]]",)),
    Case("pair-self", RecipeError, "cannot oppose itself", overrides=("pairs=[[extravert, extravert]]",)),
    Case(
        "persona-in-two-pairs",
        RecipeError,
        "is already in pairs.0",
        overrides=("pairs=[[extravert, introvert], [introvert, extravert]]",),
    ),
    Case("contrastive-unpaired", RecipeError, "needs every persona in an opposing pair", overrides=("pairs=[]",)),
    Case("no-personas", RecipeError, "at least one persona is required", overrides=("personas={}", "pairs=[]")),
    Case("prune-nothing", RecipeError, "name at least one unit kind", overrides=("prune={}",)),
    Case("two-model-sources", RecipeError, "exactly one of", overrides=("model.embedded=smollm2-135m-instruct",)),
    Case("no-model-source", RecipeError, "exactly one of", overrides=("model={}",)),
    Case(
        "hub-unpinned",
        RecipeError,
        "not a 40-character commit sha",
        overrides=("model={hub: {repo_id: org/model, revision: main}}",),
    ),
    Case("formats-without-hf", RecipeError, "'hf' is required", overrides=("output.formats=[onnx]",)),
    Case("int8-without-onnx", RecipeError, "add 'onnx'", overrides=("output.formats=[hf, onnx-int8]",)),
    Case("bad-override", RecipeError, "expected KEY.PATH=VALUE", overrides=("=3",)),
    Case("override-unknown-key", RecipeError, "prune.mlp.sparsty: unknown key", overrides=("prune.mlp.sparsty=0.1",)),
    Case(
        "data-format-unknown",
        RecipeError,
        "cannot infer the format",
        lambda d, t: cal(d, path=data_file(t, "d.parquet", "x")),
    ),
    # calibration data
    Case("data-missing", CalibrationDataError, "does not exist", lambda d, t: cal(d, path=str(t / "none.jsonl"))),
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


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def test_the_table_is_large() -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


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
