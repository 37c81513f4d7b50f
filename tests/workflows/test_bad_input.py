"""Table-driven bad input: each case raises the project's error class with a message naming the problem,
exits non-zero through the CLI, and leaves the output location exactly as it was."""

from __future__ import annotations

import json
import os
import shutil
import struct
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
    RecipeError,
    UnsupportedModelError,
)
from tests.helpers import (
    RECIPE_CASES,
    REPO,
    Case,
    cal,
    data_file,
    eval_section,
    make_report,
    snapshot,
    tiny_model,
    tiny_tokenizer,
    write_recipe,
)


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
    Case(
        "persona-name-slash",
        RecipeError,
        "'a/b' is not a safe folder name",
        lambda d, t: (
            d["personas"].update({"a/b": d["personas"].pop("introvert")}) or d.update(pairs=[["extravert", "a/b"]])
        ),
    ),
    Case(
        "persona-name-absolute",
        RecipeError,
        "'/tmp/x' is not a safe folder name",
        lambda d, t: (
            d["personas"].update({"/tmp/x": d["personas"].pop("introvert")})
            or d.update(pairs=[["extravert", "/tmp/x"]])
        ),
    ),
    # values that would take hours or all memory, or that a random generator refuses
    Case(
        "eval-seed-negative",
        RecipeError,
        "eval.seed: Input should be greater than or equal to 0 (got -1)",
        overrides=("eval={neutral: {path: n.txt}, seed: -1}",),
    ),
    Case(
        "eval-bootstrap-huge",
        RecipeError,
        "eval.bootstrap: Input should be less than or equal to 100000 (got 1000000000)",
        overrides=("eval={neutral: {path: n.txt}, bootstrap: 1000000000}",),
    ),
    Case(
        "tune-grid-huge",
        RecipeError,
        "tune: the grid has 1331 points (the product of its lists' lengths); each is evaluated, so at most 1000",
        overrides=(
            "tune={sparsity: [0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.01,0.02], steer: [0,1,2,3,4,5,6,7,8,9,10], "
            "steer_layers: [0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,0.05], validation: {}}",
        ),
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


# -- every command: a command line built in tmp_path (tiny: a tiny Llama folder), the exit code and the message;
# nothing under tmp_path changes and nothing else is created --


@dataclass(frozen=True)
class Line:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (tmp_path, tiny model folder) -> the command line
    message: str  # in the error message, exactly
    code: int = 2


def recipe_file(t: Path, m: Path, text: str | None = None, edit: Callable[[dict[str, Any]], None] | None = None) -> str:
    """The tiny recipe (edited), or a recipe file holding `text`."""
    path = write_recipe(t, m)
    if edit is not None:
        data = yaml.safe_load(path.read_text())
        edit(data)
        path.write_text(yaml.safe_dump(data))
    if text is not None:
        path = t / "given.yaml"
        path.write_text(text)
    return str(path)


def full_recipe(t: Path, m: Path) -> str:
    """The tiny recipe with an eval section and a tune grid: valid for every command."""
    return recipe_file(
        t, m, edit=lambda d: d.update(eval=eval_section(t), tune={"sparsity": [0.1], "validation": eval_section(t)})
    )


def persona_folder(t: Path, m: Path, edit: Callable[[Path], object] | None = None) -> str:
    """A persona export as a run leaves it (report.json, hf/) in a run folder with its recipe.json and run.json."""
    from exporter.recipe.load import load_recipe

    run = t / "run"
    shutil.copytree(m, run / "introvert" / "hf")
    (run / "introvert" / "report.json").write_text(json.dumps(make_report("introvert")))
    (t / "made").mkdir()  # the recipe that made it, apart from the one a case edits
    (run / "recipe.json").write_text(json.dumps(load_recipe(write_recipe(t / "made", m)).model_dump(mode="json")))
    (run / "run.json").write_text(json.dumps({"recipe": "tiny", "personas": {"introvert": "passed"}}))
    if edit is not None:
        edit(run / "introvert")
    return str(run / "introvert")


def alias_bomb(levels: int = 12, where: str = "name") -> str:
    """'Billion laughs': each anchor lists the previous one nine times, 9**levels values in 14 lines."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\n{where}: *a{levels}\n"


BIG = 100 * 1024 * 1024


def big_file(t: Path) -> str:
    path = t / "big.yaml"
    with path.open("wb") as f:
        f.truncate(BIG)  # sparse: 100 MB of NUL bytes without writing them
    return str(path)


# YAML larger than a recipe could be: the file's text and the message (after "<file>: ")
YAML_FILES = {
    "alias-bomb": (alias_bomb(), "line 6: the aliases here expand to more than 100000 values (an alias bomb?)"),
    "alias-bomb-in-push": (
        alias_bomb(where="push"),
        "line 6: the aliases here expand to more than 100000 values",
    ),
    "self-alias": ("pairs: &a [*a]\n", "line 1: the alias *a stands inside the value anchored as &a"),
    "deep-nesting": ("name: " + "[" * 100 + "]" * 100 + "\n", "line 1: nested more than 64 levels deep"),
    "huge-scalar": ("name: " + "x" * 70_000 + "\n", "line 1: a value of 70000 characters; values are at most 65536"),
    "huge-integer": ("name: a\nseed: " + "9" * 5000 + "\n", "a value cannot be read (Exceeds the limit"),
    "empty": ("", "the recipe is empty"),
    "a-list": ("- name\n- model\n", "a recipe is a YAML mapping at the top level, got list"),
    "not-utf8": ("\udcff", "not UTF-8 text"),
}
YAML_COMMANDS: dict[str, Callable[[Path, Path, str], list[str]]] = {
    "run": lambda t, m, r: ["run", r, "--out", str(t / "out")],
    "validate": lambda t, m, r: ["validate", r],
    "tune": lambda t, m, r: ["tune", r, "--out", str(t / "out")],
    "sweep": lambda t, m, r: ["sweep", r, "--sparsity", "0.1", "--out", str(t / "out")],
    "eval": lambda t, m, r: ["eval", str(Path(persona_folder(t, m)).parent), "--recipe", r],
}


def _yaml_file(t: Path, text: str) -> str:
    path = t / "given.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return str(path)


def foreign(t: Path) -> str:
    """A folder of the user's, not written by persona-export."""
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("mine")
    return str(t / "mine")


def linked(t: Path, target: Path | None = None) -> str:
    """A symlink to a folder (by default one outside what the command writes)."""
    if target is None:
        target = Path(foreign(t))
    (t / "link").symlink_to(target)
    return str(t / "link")


def move_data_into_run(t: Path, d: dict[str, Any]) -> None:
    """A run folder holding the recipe's calibration data (for --overwrite to delete)."""
    run = Path(persona_folder(t, t / "tiny-llama")).parent
    shutil.copy(t / "pairs.jsonl", run / "pairs.jsonl")
    d["personas"]["introvert"]["calibration"]["path"] = str(run / "pairs.jsonl")


def link_inside(t: Path, m: Path, command: str) -> list[str]:
    """A run whose persona's report.md links to a file of the user's: eval and export rewrite what they copy."""
    (t / "outside.txt").write_text("the user's")
    persona = persona_folder(t, m, lambda p: (p / "report.md").symlink_to(t / "outside.txt"))
    return [str(Path(persona).parent)] if command == "eval" else [persona, "--format", "onnx"]


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def huge_header(folder: Path) -> None:
    """A safetensors file whose header claims a 10^12-element tensor it does not hold."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 4 * 10**12]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


def fifo_tokenizer(folder: Path) -> None:
    """A named pipe where the tokenizer should be: opening it would wait forever for a writer."""
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")


def set_config(folder: Path, **sizes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **sizes}))


def model_line(command: str, t: Path, m: Path, edit: Callable[[Path], None]) -> list[str]:
    """The command on a model folder (validate, run) or a persona export (generate) edited by `edit`."""
    if command == "generate":
        persona = persona_folder(t, m, lambda p: edit(p / "hf"))
        return [persona, "--backend", "torch", "--prompt", "hi"]
    edit(m)
    return [recipe_file(t, m), *(["--out", str(t / "o")] if command == "run" else [])]


LINES = [
    *(
        Line(
            f"{command}-{kind}",
            lambda t, m, c=command, x=text: YAML_COMMANDS[c](t, m, _yaml_file(t, x)),
            message,
        )
        for command in YAML_COMMANDS
        for kind, (text, message) in YAML_FILES.items()
    ),
    *(
        Line(f"{command}-100mb", lambda t, m, c=command: YAML_COMMANDS[c](t, m, big_file(t)), f"{BIG} bytes; YAML")
        for command in YAML_COMMANDS
    ),
    # overrides on the command line: the same bounds, the message names the override
    *(
        Line(
            f"{command}-override-{kind}",
            lambda t, m, c=command, v=value: [*YAML_COMMANDS[c](t, m, recipe_file(t, m)), v],
            message,
        )
        for command in YAML_COMMANDS
        for kind, value, message in [
            ("self-alias", "eval.x=&a [*a]", "override 'eval.x=&a [*a]': the alias *a stands inside the value"),
            ("deep", "eval.x=" + "[" * 80 + "]" * 80, "nested more than 64 levels deep"),
            ("huge", "eval.x=" + "y" * 70_000, "a value of 70000 characters"),
            (
                "bomb",
                "eval.x=[&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
                "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e]]",
                "expand to more than 100000 values",
            ),
        ]
    ),
    Line(
        "run-override-pairs-self-alias",
        lambda t, m: ["run", recipe_file(t, m), "--out", str(t / "o"), "pairs=&a [*a]"],
        "override 'pairs=&a [*a]': the alias *a stands inside the value anchored as &a",
    ),
    # everyday mistakes
    Line(
        "key-typo-suggests",
        lambda t, m: [
            "validate",
            recipe_file(t, m, edit=lambda d: d["personas"]["introvert"]["calibration"].update(max_sample=3)),
        ],
        "personas.introvert.calibration.max_sample: unknown key; did you mean `max_samples`?",
    ),
    Line(
        "data-file-missing-names-key",
        lambda t, m: [
            "run",
            recipe_file(t, m, edit=lambda d: d["personas"]["extravert"]["calibration"].update(path="gone.jsonl")),
            "--out",
            str(t / "o"),
        ],
        "personas.extravert.calibration.path: file not found: ",
    ),
    Line(
        "tune-validation-file-missing-names-key",
        lambda t, m: [
            "validate",
            recipe_file(
                t,
                m,
                edit=lambda d: d.update(
                    eval=eval_section(t),
                    tune={"sparsity": [0.1], "validation": eval_section(t, neutral={"path": "no.txt"})},
                ),
            ),
        ],
        "tune.validation.neutral.path: file not found: ",
    ),
    Line(
        "data-path-nul",
        lambda t, m: [
            "validate",
            recipe_file(t, m, edit=lambda d: d["personas"]["introvert"]["calibration"].update(path="a\0b.jsonl")),
        ],
        "is an impossible path (it holds a NUL byte)",
    ),
    Line("argument-nul", lambda t, m: ["run", recipe_file(t, m), "--out", "o\0ut"], "an argument holds a NUL byte"),
    # generate / chat settings outside their ranges: usage errors naming the range
    *(
        Line(
            f"{c}-{option[2:]}-{value or 'empty'}",
            lambda t, m, c=c, o=option, v=value: [c, str(t), o, v, *(["--prompt", "hi"] if c == "generate" else [])],
            f"argument {option}: {message}",
        )
        for c in ("generate", "chat")
        for option, value, message in [
            ("--temperature", "-1", "-1 is outside the valid range: 0 (greedy) or more"),
            ("--temperature", "nan", "nan is outside the valid range: 0 (greedy) or more"),
            ("--temperature", "abc", "'abc' is not a number; give 0 (greedy) or more"),
            ("--repetition-penalty", "0", "0 is outside the valid range: above 0: 1 is none, above 1 discourages"),
            ("--repetition-penalty", "-2", "-2 is outside the valid range: above 0"),
            ("--top-p", "0", "0 is outside the valid range: above 0 and at most 1"),
            ("--top-p", "1.5", "1.5 is outside the valid range: above 0 and at most 1"),
            ("--top-p", "-0.1", "-0.1 is outside the valid range: above 0 and at most 1"),
            ("--max-new-tokens", "0", "0 is outside the valid range: 1 or more"),
            ("--max-new-tokens", "-100", "-100 is outside the valid range: 1 or more"),
            ("--max-new-tokens", "1.5", "'1.5' is not a whole number; give 1 or more"),
            ("--max-new-tokens", "", "'' is not a whole number; give 1 or more"),
            ("--seed", "-1", "-1 is outside the valid range: a whole number, 0 or more"),
        ]
    ),
    *(
        Line(
            f"generate-prompt-{name}",
            lambda t, m, p=prompt: ["generate", str(t), "--prompt", p],
            "argument --prompt: the prompt is empty",
        )
        for name, prompt in [("empty", ""), ("spaces", "   "), ("newlines", "\n\t\n")]
    ),
    *(
        Line(
            f"{c}-path-missing", lambda t, m, c=c, x=extra: [c, str(t / "nothing"), *x], "'{t}/nothing' does not exist"
        )
        for c, extra in [
            ("generate", ["--prompt", "hi"]),
            ("chat", []),
            ("export", ["--format", "onnx"]),
            ("push", ["--repo-id", "a/b"]),
            ("eval", []),
        ]
    ),
    Line("generate-a-file", lambda t, m: ["generate", recipe_file(t, m), "--prompt", "hi"], "is a file, not a folder"),
    Line(
        "generate-a-run-folder",
        lambda t, m: ["generate", str(Path(persona_folder(t, m)).parent), "--prompt", "hi"],
        "is not a persona export (expected report.json and hf/config.json)",
    ),
    # --overwrite replaces only what the project wrote; links are never followed or replaced
    *(
        Line(
            f"{c}-overwrite-foreign-folder",
            lambda t, m, c=c: [*YAML_COMMANDS[c](t, m, full_recipe(t, m))[:-2], "--out", foreign(t), "--overwrite"],
            f"--overwrite replaces only a {c} folder that persona-export wrote",
        )
        for c in ("run", "sweep", "tune")
    ),
    Line(
        "sweep-overwrite-a-run-folder",
        lambda t, m: [
            "sweep",
            full_recipe(t, m),
            "--sparsity",
            "0.1",
            "--out",
            str(Path(persona_folder(t, m)).parent),
            "--overwrite",
        ],
        "is not one (it has no report.json)",
    ),
    Line("run-out-symlink", lambda t, m: ["run", recipe_file(t, m), "--out", linked(t)], "is a symlink (to "),
    Line(
        "run-out-in-model-folder",
        lambda t, m: ["run", recipe_file(t, m), "--out", str(m / "runs" / "x")],
        "is inside the model folder (model.path)",
    ),
    Line(
        "run-out-in-shipped-recipes",
        lambda t, m: ["run", recipe_file(t, m), "--out", str(REPO / "recipes" / "data" / f"run-{t.name}")],
        "is inside the shipped recipes/",
    ),
    Line(
        "run-out-in-the-code",
        lambda t, m: ["run", recipe_file(t, m), "--out", str(REPO / "exporter" / f"run-{t.name}")],
        "is inside the project's code",
    ),
    Line(
        "run-overwrite-holds-the-data",
        lambda t, m: [
            "run",
            recipe_file(t, m, edit=lambda d: move_data_into_run(t, d)),
            "--out",
            str(t / "run"),
            "--overwrite",
        ],
        "holds personas.introvert.calibration.path",
    ),
    Line(
        "export-overwrite-foreign-format-folder",
        lambda t, m: [
            "export",
            persona_folder(t, m, lambda p: (p / "onnx").mkdir()),
            "--format",
            "onnx",
            "--overwrite",
        ],
        "onnx exists but report.json records no onnx export: persona-export did not write it",
    ),
    *(
        Line(
            f"{c}-link-to-outside-inside",
            lambda t, m, c=c: [c, *link_inside(t, m, c)],
            "holds 1 symlink(s) (",
        )
        for c in ("eval", "export")
    ),
    Line(
        "eval-symlinked-run-folder",
        lambda t, m: ["eval", linked(t, Path(persona_folder(t, m)).parent)],
        "is a symlink; pass the run folder itself",
    ),
    # model files: truncated weights, a header or a config.json claiming huge tensors
    *(
        Line(f"{c}-{kind}", lambda t, m, c=c, e=e: [c, *model_line(c, t, m, e)], message)
        for c in ("validate", "run", "generate")
        for kind, e, message in [
            ("truncated-weights", truncate_weights, "its weights cannot be read"),
            ("header-claims-huge-tensor", huge_header, "its weights cannot be read"),
            ("config-absurd-size", lambda f: set_config(f, hidden_size=1 << 40), "describes a model of at least"),
            (
                "config-negative-size",
                lambda f: set_config(f, num_hidden_layers=-2),
                "num_hidden_layers is -2; sizes are positive",
            ),
            ("config-text-size", lambda f: set_config(f, intermediate_size="big"), "intermediate_size is 'big'"),
            ("tokenizer-is-a-fifo", fifo_tokenizer, "'tokenizer.json' is a named pipe (FIFO)"),
        ]
    ),
]


def test_the_command_table_is_large() -> None:
    assert len(LINES) >= 100 and len({c.id for c in LINES}) == len(LINES)


@pytest.mark.parametrize("line", LINES, ids=lambda c: c.id)
@pytest.mark.usefixtures("no_model_load")
def test_bad_command_line(line: Line, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    argv = line.argv(tmp_path, tiny_llama_dir)
    before, repo_before = snapshot(tmp_path), sorted(p.name for p in (REPO / "recipes" / "data").iterdir())
    try:
        code = main(argv)
    except SystemExit as exit_:  # a usage error
        code = int(exit_.code or 0)
    err = capsys.readouterr().err
    assert code == line.code, err
    assert line.message.format(t=tmp_path) in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in (REPO / "recipes" / "data").iterdir()) == repo_before
    assert not (REPO / "exporter" / f"run-{tmp_path.name}").exists()


@pytest.mark.parametrize(
    "setting", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.01}, {"repetition_penalty": 0.0}, {"seed": -3}]
)
def test_sampling_refuses_settings_outside_their_ranges(setting: dict[str, float]) -> None:
    from exporter.runtime.sampling import Sampling

    with pytest.raises(ValueError, match=f"{next(iter(setting))}: .* is outside the valid range"):
        Sampling(**setting)  # type: ignore[arg-type]
