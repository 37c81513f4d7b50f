"""Recipes and command lines (issue 15): overrides, tags, duplicate keys, names, null and wrong-type fields, one check
for validate and run before loading, sweep --sparsity, sparsity 0, --max-new-tokens; each family a table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.cli import main
from exporter.errors import (
    ModelSourceError,
    PersonaExportError,
    RecipeError,
    UnsupportedModelError,
)
from exporter.evaluation.items import EvalDataError
from exporter.recipe.schema import load_recipe
from tests.conftest import write_recipe
from tests.hardening import (  # noqa: F401 (no_model_load is a fixture)
    Edit,
    edited_recipe,
    eval_section,
    expect,
    no_model_load,
    snapshot,
)

# -- overrides: invalid YAML and tags ---------------------------------------------------------------------

BAD_OVERRIDES = [
    ("prune.mlp.sparsity=[0.1", "is not valid YAML"),
    ("prune.mlp={sparsity: 0.1", "is not valid YAML"),
    ('name="unterminated', "is not valid YAML"),
    ("name='a' 'b'", "is not valid YAML"),
    ("pairs=[[a, b]]]", "is not valid YAML"),
    ("name=a: b: c", "is not valid YAML"),
    ("name=!!python/object/apply:os.system ['touch {marker}']", "the YAML tag 'tag:yaml.org,2002:python/object/apply"),
    ("name=!!python/name:os.system", "the YAML tag 'tag:yaml.org,2002:python/name:os.system' is not allowed"),
    ("name=!!python/object/new:subprocess.Popen [['touch', '{marker}']]", "is not allowed"),
    ("prune.mlp={sparsity: !!python/object/apply:float ['0.1']}", "is not allowed"),
    ("name=!custom x", "the YAML tag '!custom' is not allowed"),
    ("prune.mlp={sparsity: 0.1, sparsity: 0.2}", "sparsity: duplicate key"),
    ("a..b=1", "expected KEY.PATH=VALUE"),
    ("name.=1", "expected KEY.PATH=VALUE"),
]


@pytest.mark.parametrize(("override", "message"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.usefixtures("no_model_load")
def test_bad_overrides_are_clear_errors_and_never_run_code(
    command: str, override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "MARKER"
    recipe = write_recipe(tmp_path, tmp_path / "model")
    argv = [command, str(recipe), *(["--out", str(tmp_path / "out")] if command == "run" else [])]
    text = expect([*argv, override.replace("{marker}", str(marker))], RecipeError, message, capsys)
    assert "override" in text and not marker.exists()


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/module:os",
        "!mytag 3",
    ],
)
def test_tags_in_a_recipe_file_run_nothing(value: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "MARKER"
    recipe = write_recipe(tmp_path, tmp_path / "model")
    recipe.write_text(recipe.read_text().replace("name: tiny", "name: " + value.replace("{marker}", str(marker))))
    expect(["validate", str(recipe)], RecipeError, "is not allowed", capsys)
    assert not marker.exists()


# -- validate checks what run checks, before loading ------------------------------------------------------


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
        eval_section(statements={"path": "s.jsonl", "labels": {"ambivert": "Yes"}, "max_per_label": 1}),
        RecipeError,
        "eval.statements.labels.ambivert: unknown persona 'ambivert'",
    ),
    (
        "eval-unknown-persona-prompt",
        eval_section(system_prompts={"ghost": "hi"}),
        RecipeError,
        "eval.system_prompts.ghost: unknown persona",
    ),
    (
        "eval-paired-unknown-persona",
        eval_section(
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
    ("eval-missing-file", eval_section(neutral={"path": "nothing.txt"}), EvalDataError, "does not exist"),
    (
        "eval-statements-missing-file",
        eval_section(statements={"path": "none.jsonl", "labels": {"introvert": "Yes"}, "max_per_label": 1}),
        EvalDataError,
        "eval.statements: data file",
    ),
    (
        "eval-file-is-a-folder",
        lambda d, t: (eval_section()(d, t), (t / "adir").mkdir(), d["eval"]["neutral"].update(path=str(t / "adir"))),
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
        lambda d, t: eval_section(max_tokens=1000)(d, t),
        RecipeError,
        "eval.max_tokens: 1000",
    ),
]


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
    assert "valid" in capsys.readouterr().out


# -- sweep --sparsity, before anything is loaded ----------------------------------------------------------

SWEEP_VALUES = [
    ("nan", "item 1 ('nan') is not a fraction"),
    ("0.1,nan", "item 2 ('nan') is not a fraction"),
    ("inf", "is not a fraction"),
    ("-inf,0.1", "is not a fraction"),
    (",,", "item 1 is empty; item 2 is empty; item 3 is empty"),
    ("0.1,,0.2", "item 2 is empty"),
    ("0.1,", "item 2 is empty"),
    ("", "item 1 is empty"),
    (" ", "item 1 is empty"),
    ("1", "item 1 ('1') is not a fraction in [0, 1)"),
    ("1.5", "is not a fraction"),
    ("-0.1", "is not a fraction"),
    ("abc", "item 1 ('abc') is not a number"),
    ("0.1;0.2", "is not a number"),
    ("0.1,0.10", "item 2 ('0.10') repeats an earlier value"),
    ("0,0.1", "0 with no other unit pruned and no steering removes nothing"),
]


@pytest.mark.parametrize(("values", "message"), SWEEP_VALUES, ids=[v or "empty" for v, _ in SWEEP_VALUES])
@pytest.mark.usefixtures("no_model_load")
def test_sweep_checks_its_sparsities_before_loading(
    values: str, message: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = edited_recipe(tmp_path, tiny_llama_dir, eval_section(), prune={"mlp": {"sparsity": 0.25}})
    before = snapshot(tmp_path)
    argv = ["sweep", str(recipe), f"--sparsity={values}", "--out", str(tmp_path / "sw")]  # "=": "-0.1" is a value
    expect(argv, RecipeError, message, capsys)
    assert snapshot(tmp_path) == before


# -- names and ids: no trailing newline -------------------------------------------------------------------

SHA = "0123456789abcdef0123456789abcdef01234567"
NAME_CASES: list[tuple[str, Edit, str]] = [
    (
        "persona-trailing-newline",
        lambda d, t: d["personas"].update({"introvert\n": d["personas"].pop("introvert")}),
        "is not a safe folder name",
    ),
    (
        "persona-leading-newline",
        lambda d, t: d["personas"].update({"\nintrovert": d["personas"].pop("introvert")}),
        "is not a safe folder name",
    ),
    (
        "persona-trailing-space",
        lambda d, t: d["personas"].update({"introvert ": d["personas"].pop("introvert")}),
        "is not a safe folder name",
    ),
    (
        "persona-crlf",
        lambda d, t: d["personas"].update({"introvert\r\n": d["personas"].pop("introvert")}),
        "is not a safe folder name",
    ),
    (
        "sha-trailing-newline",
        lambda d, t: d.update(model={"hub": {"repo_id": "org/m", "revision": SHA + "\n"}}),
        "is not a 40-character commit sha",
    ),
    (
        "sha-uppercase",
        lambda d, t: d.update(model={"hub": {"repo_id": "org/m", "revision": SHA.upper()}}),
        "is not a 40-character commit sha",
    ),
    (
        "push-branch-trailing-newline",
        lambda d, t: d.update(push={"repo_id": "org/{persona}", "revision": "main\n"}),
        "is not a branch name",
    ),
]


@pytest.mark.parametrize("case", NAME_CASES, ids=[c[0] for c in NAME_CASES])
def test_names_and_ids_are_matched_whole(
    case: tuple[str, Edit, str], tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    _, edit, message = case
    recipe = edited_recipe(tmp_path, tiny_llama_dir, edit)
    before = snapshot(tmp_path)
    expect(["run", str(recipe), "--out", str(tmp_path / "out")], RecipeError, message, capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("revision", ["main\n", "v1\n", "main\r"])
def test_push_revision_is_matched_whole(revision: str, tmp_path: Path) -> None:
    from exporter.errors import HubError
    from exporter.publish.hub import PushOptions, check_options

    with pytest.raises(HubError, match="is not a branch name"):
        check_options(PushOptions(repo_id="org/name", revision=revision))


# -- duplicate keys ---------------------------------------------------------------------------------------

DUPLICATES = [
    ("top-level", "name: tiny\n", "name: tiny\nname: other\n", "  name: duplicate key (lines"),
    (
        "persona-block",
        "personas:\n",
        "personas:\n  introvert: {description: x, calibration: {path: a.jsonl, max_samples: 1}}\n",
        "personas.introvert: duplicate key",
    ),
    (
        "nested",
        "      response_field: introvert\n",
        "      response_field: introvert\n      response_field: extravert\n",
        "personas.introvert.calibration.response_field: duplicate key",
    ),
    ("in-a-list", "pairs:\n", "pairs:\n- {a: 1, a: 2}\n", "pairs.0.a: duplicate key"),
    ("flow-mapping", "verify:\n", "verify: {greedy_tokens: 4, greedy_tokens: 8}\nverify_:\n", "verify.greedy_tokens"),
]


@pytest.mark.parametrize(("case", "anchor", "replacement", "message"), DUPLICATES, ids=[d[0] for d in DUPLICATES])
def test_duplicate_keys_are_errors_naming_the_key(
    case: str, anchor: str, replacement: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = write_recipe(tmp_path, tmp_path / "model")
    text = recipe.read_text()
    assert anchor in text
    recipe.write_text(text.replace(anchor, replacement, 1))
    expect(["validate", str(recipe)], RecipeError, message, capsys)


def test_all_duplicates_are_reported_at_once(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tmp_path / "model")
    recipe.write_text(recipe.read_text() + "name: again\nmethod: {score: wanda}\n")
    with pytest.raises(RecipeError, match=r"2 problem\(s\)") as err:
        load_recipe(recipe)
    assert "name: duplicate key" in str(err.value) and "method: duplicate key" in str(err.value)


# -- recipe fields: null, wrong type, numbers YAML reads as text ------------------------------------------

FIELD_CASES: list[tuple[str, str, str]] = [
    ("name=null", "name: the key is present but has no value (null)", "missing"),
    ("method=null", "method: the key is present but has no value (null)", "missing"),
    ("personas.introvert.calibration.max_samples=null", "max_samples: the key is present but has no value", "missing"),
    ("verify=null", "verify: the key is present but has no value", "missing"),
    ("personas.introvert.calibration.max_samples=1e20", "expected a whole number, got str '1e20'", "plain digits"),
    ("personas.introvert.calibration.max_samples=1e3", "got str '1e3'; write it in plain digits: 1000", "missing"),
    ("personas.introvert.calibration.max_samples=2.5", "expected a whole number, got float 2.5", "missing"),
    ("personas.introvert.calibration.max_samples=lots", "expected a whole number, got str 'lots'", "missing"),
    ("personas.introvert.calibration.max_samples=[1]", "expected a whole number, got list", "missing"),
    ("calibration.batch_size={a: 1}", "calibration.batch_size: expected a whole number, got dict", "missing"),
    ("method=[wanda]", "method: expected a mapping (key: value lines), got list", "missing"),
    ("personas.introvert.description=3", "description: expected text, got int 3", "missing"),
    ("output.formats=hf", "output.formats: expected a list", "missing"),
    ("calibration.layerwise=maybe", "calibration.layerwise: expected true or false, got str 'maybe'", "missing"),
]


@pytest.mark.parametrize(("override", "message", "absent"), FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_null_and_wrong_type_fields_are_not_called_missing(
    override: str, message: str, absent: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = write_recipe(tmp_path, tmp_path / "model")
    text = expect(["validate", str(recipe), override], RecipeError, message, capsys)
    if absent == "missing":
        assert "required key is missing" not in text
    else:
        assert absent in text


# -- sparsity 0 everywhere --------------------------------------------------------------------------------

ZERO_PRUNES = [
    {"mlp": {"sparsity": 0.0}},
    {"mlp": {"sparsity": 0}},
    {"attention": {"unit": "kv-group", "sparsity": 0.0}},
    {"mlp": {"sparsity": 0.0}, "attention": {"unit": "query-head", "sparsity": 0.0}},
    {"mlp": {"sparsity": 0.0, "round_to": 8}, "attention": {"unit": "kv-group", "sparsity": 0}},
]


@pytest.mark.parametrize("prune", ZERO_PRUNES, ids=[json.dumps(p) for p in ZERO_PRUNES])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_sparsity_of_zero_everywhere_is_refused(
    prune: dict[str, Any], command: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = write_recipe(tmp_path, tiny_llama_dir, prune=prune, method={"score": "wanda"}, pairs=[])
    argv = [command, str(recipe), *(["--out", str(tmp_path / "out")] if command == "run" else [])]
    expect(argv, RecipeError, "every sparsity is 0 and method.steer is 0", capsys)


def test_a_sparsity_of_zero_with_steering_is_a_steering_only_export(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = write_recipe(
        tmp_path, tiny_llama_dir, prune={"mlp": {"sparsity": 0.0}}, method={"score": "wanda", "steer": 1.0}
    )
    assert main(["validate", str(recipe)]) == 0


def test_a_mask_that_rounds_to_nothing_is_warned_and_reported(
    tmp_path: Path, tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = write_recipe(
        tmp_path, tiny_llama_dir, prune={"mlp": {"sparsity": 0.001}}, method={"score": "wanda"}, pairs=[]
    )
    caplog.set_level(logging.WARNING)
    data = yaml.safe_load(recipe.read_text())
    del data["personas"]["extravert"]
    recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "introvert" / "report.json").read_text())
    assert report["warnings"] and "unpruned model" in report["warnings"][0]
    assert "NOTHING WAS REMOVED" in caplog.text


# -- generate: token counts -------------------------------------------------------------------------------


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
