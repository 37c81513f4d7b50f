"""`validate` checks what `run` checks, before any model loads (exporter/stages/preflight.py): the eval
section's cross-references and files, model.path and its config.json, lengths against the model's context, and
the tune section; each family a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exporter.cli import main
from exporter.errors import ModelSourceError, PersonaExportError, RecipeError, UnsupportedModelError
from exporter.evaluation.items import EvalDataError
from exporter.recipe.load import load_recipe
from exporter.recipe.rules import limit_problems
from tests.helpers import Edit, edited_recipe, expect, snapshot, with_eval, write_recipe


def _gpt2(tmp: Path) -> str:
    from transformers import GPT2Config

    folder = tmp / "gpt2"
    folder.mkdir()
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


def _model_with_config(tmp: Path, config: Any, name: str = "m") -> str:
    folder = tmp / name
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


VALIDATE_CASES: list[tuple[str, Edit, type[PersonaExportError], str]] = [
    (
        "eval-unknown-persona-label",
        with_eval(statements={"path": "s.jsonl", "labels": {"ambivert": "Yes"}, "max_per_label": 1}),
        RecipeError,
        "eval.statements.labels.ambivert: unknown persona 'ambivert'",
    ),
    (
        "eval-unknown-persona-prompt",
        with_eval(system_prompts={"ghost": "hi"}),
        RecipeError,
        "eval.system_prompts.ghost: unknown persona",
    ),
    (
        "eval-paired-unknown-persona",
        with_eval(
            paired={
                "path": "p.jsonl",
                "prompt_field": "prompt",
                "responses": {"introvert": {"field": "a"}, "ghost": {"field": "b"}},
                "max_items": 2,
            }
        ),
        RecipeError,
        "eval.paired.responses.ghost: unknown persona",
    ),
    (
        "eval-missing-file",
        with_eval(neutral={"path": "nothing.txt"}),
        EvalDataError,
        "eval.neutral.path: file not found",
    ),
    (
        "eval-statements-missing-file",
        with_eval(statements={"path": "none.jsonl", "labels": {"introvert": "Yes"}, "max_per_label": 1}),
        EvalDataError,
        "eval.statements.path: file not found: ",
    ),
    (
        "eval-file-is-a-folder",
        lambda d, t: (with_eval()(d, t), (t / "adir").mkdir(), d["eval"]["neutral"].update(path=str(t / "adir"))),
        EvalDataError,
        "is a folder, not a regular file",
    ),
    (
        "model-path-missing",
        lambda d, t: d.update(model={"path": str(t / "nowhere")}),
        ModelSourceError,
        "does not exist",
    ),
    (
        "model-path-is-a-file",
        lambda d, t: ((t / "f").write_text("x"), d.update(model={"path": str(t / "f")})),
        ModelSourceError,
        "is a file, not a folder",
    ),
    ("model-gpt2", lambda d, t: d.update(model={"path": _gpt2(t)}), UnsupportedModelError, "model_type 'gpt2'"),
    (
        "model-no-model-type",
        lambda d, t: d.update(model={"path": _model_with_config(t, {"hidden_size": 8})}),
        UnsupportedModelError,
        "model_type None",
    ),
    (
        "config-is-a-list",
        lambda d, t: d.update(model={"path": _model_with_config(t, [1, 2])}),
        ModelSourceError,
        "holds a JSON list, expected an object",
    ),
    (
        "config-is-a-string",
        lambda d, t: d.update(model={"path": _model_with_config(t, '"llama"')}),
        ModelSourceError,
        "holds a JSON str, expected an object",
    ),
    (
        "config-is-not-json",
        lambda d, t: d.update(model={"path": _model_with_config(t, "{model_type: llama")}),
        ModelSourceError,
        "config.json is not valid JSON",
    ),
    (
        "config-is-a-folder",
        lambda d, t: (
            (t / "m").mkdir(),
            (t / "m" / "config.json").mkdir(),
            d.update(model={"path": str(t / "m")}),
        ),
        ModelSourceError,
        "config.json' is a folder, not a regular file",
    ),
    (
        "custom-code",
        lambda d, t: d.update(
            model={"path": _model_with_config(t, {"model_type": "mine", "auto_map": {"AutoConfig": "x.Cfg"}})}
        ),
        UnsupportedModelError,
        "'model.trust_remote_code: true'",
    ),
    (
        "greedy-past-the-context",
        lambda d, t: d["verify"].update(greedy_tokens=100000),
        RecipeError,
        "verify.greedy_tokens: 100000 tokens do not fit the model's context of 256 positions",
    ),
    (
        "greedy-at-the-context",
        lambda d, t: d["verify"].update(greedy_tokens=256),
        RecipeError,
        "verify.greedy_tokens",
    ),
    (
        "calibration-tokens-past-the-context",
        lambda d, t: d["personas"]["introvert"]["calibration"].update(max_tokens=4096),
        RecipeError,
        "personas.introvert.calibration.max_tokens: 4096 is more than the model's context of 256",
    ),
    (
        "eval-tokens-past-the-context",
        lambda d, t: with_eval(max_tokens=1000)(d, t),
        RecipeError,
        "eval.max_tokens: 1000",
    ),
    (
        "gguf-of-a-model-with-attention-biases",
        lambda d, t: (
            _set_config(t / "tiny-llama", attention_bias=True),
            d.update(output={"formats": ["hf", "gguf"]}),
        ),
        RecipeError,
        "has attention_bias true (biases on q/k/v/o_proj",
    ),
]


def _set_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("case", VALIDATE_CASES, ids=[c[0] for c in VALIDATE_CASES])
@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.usefixtures("no_model_load")
def test_validate_refuses_what_run_refuses(
    command: str,
    case: tuple[str, Edit, type[PersonaExportError], str],
    tmp_path: Path,
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    _, edit, error, message = case
    recipe = edited_recipe(tmp_path, tiny_llama_dir, edit)
    argv = [command, str(recipe), *(["--out", str(tmp_path / "out")] if command == "run" else [])]
    before = snapshot(tmp_path)
    expect(argv, error, message, capsys)
    assert snapshot(tmp_path) == before


def test_validate_accepts_the_tiny_recipe(tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(write_recipe(tmp_path, tiny_llama_dir))]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "eval:" not in out


def test_validate_lists_what_the_evaluation_reads(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "p.txt").write_text(PROMPTS)
    replies = {"path": str(tmp_path / "p.txt"), "max_new_tokens": 8}
    recipe = edited_recipe(tmp_path, tiny_llama_dir, with_eval(replies=replies))
    assert main(["validate", str(recipe)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"  eval: 3 reply prompts from {tmp_path / 'p.txt'}" in lines, lines
    assert f"  eval: 2 neutral paragraphs from {tmp_path / 'neutral.txt'}" in lines, lines


def test_a_sparsity_of_zero_with_steering_is_a_steering_only_export(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = write_recipe(
        tmp_path, tiny_llama_dir, prune={"mlp": {"sparsity": 0.0}}, method={"score": "wanda", "steer": 1.0}
    )
    assert main(["validate", str(recipe)]) == 0


PROMPTS = "How was your weekend?\nWhat should I cook tonight?\nAny plans for the holidays?\n"


@pytest.mark.parametrize(
    ("context", "max_new_tokens", "refused"), [(128, 64, False), (128, 128, True), (64, 100, True)]
)
def test_replies_must_fit_the_context(
    context: int, max_new_tokens: int, refused: bool, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    (tmp_path / "p.txt").write_text(PROMPTS)
    replies = {"path": str(tmp_path / "p.txt"), "max_new_tokens": max_new_tokens}
    recipe = load_recipe(edited_recipe(tmp_path, tiny_llama_dir, with_eval(replies=replies)))
    problems = limit_problems(recipe, {"max_position_embeddings": context})
    assert any(p.startswith("eval.replies.max_new_tokens") for p in problems) == refused
