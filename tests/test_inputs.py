"""What a user hands in (exporter/inputs.py): a path that exists but is not a regular file says what it is, as a
recipe, a calibration file or an evaluation file; YAML beyond a recipe's bounds is refused with bounded work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter import inputs
from exporter.errors import CalibrationDataError, RecipeError
from exporter.evaluation.items import EvalDataError
from tests.helpers import REPO, edited_recipe, expect, point_eval_at, write_recipe
from tests.workflows.test_bad_input import YAML_FILES, alias_bomb, persona_folder

PATH_KINDS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "folder": (lambda t: (t / "adir").mkdir() or t / "adir", "is a folder, not a regular file"),
    "fifo": (lambda t: os.mkfifo(t / "pipe") or t / "pipe", "is a named pipe (FIFO), not a regular file"),
    "dev-zero": (lambda t: Path("/dev/zero"), "is a character device, not a regular file"),
    "symlink-loop": (
        lambda t: ((t / "a").symlink_to(t / "b"), (t / "b").symlink_to(t / "a")) and t / "a",
        "is a symlink loop, not a regular file",
    ),
    "broken-symlink": (lambda t: (t / "dangling").symlink_to(t / "gone") or t / "dangling", "is a broken symlink"),
    "missing": (lambda t: t / "none.jsonl", "file not found: {target}"),  # a data file; a recipe: "does not exist"
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
    if kind == "missing" and used_as == "recipe":
        message = "does not exist"
    key = {"calibration": "personas.introvert.calibration.path: ", "eval": "eval.paired.path: "}.get(used_as, "")
    message = key + message.format(target=target) if kind == "missing" else message
    expect(["validate", str(target if used_as == "recipe" else recipe)], error, message, capsys)


# -- YAML larger than a recipe could be: refused while composing, before any value is built or expanded --


@pytest.mark.parametrize("kind", [k for k in YAML_FILES if k not in ("empty", "a-list", "not-utf8", "huge-integer")])
def test_yaml_beyond_the_bounds_is_refused_before_anything_is_built(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The work is bounded: no alias is expanded (the duplicate-key walk and the constructor, which would expand
    them, are never reached) and fewer than 2000 nodes are composed; the time is checked with a 100x margin."""
    text, message = YAML_FILES[kind]
    composed = []

    def never(*args: Any) -> None:
        raise AssertionError("reached a step that expands aliases")

    def counting(self: Any, parent: Any, index: Any) -> Any:
        composed.append(1)
        return compose(self, parent, index)

    compose = inputs._PlainLoader.compose_node
    monkeypatch.setattr(inputs, "_duplicates", never)
    monkeypatch.setattr(inputs._PlainLoader, "construct_document", never)
    monkeypatch.setattr(inputs._PlainLoader, "compose_node", counting)
    started = time.perf_counter()
    try:
        inputs.load_yaml(text)
    except inputs.YamlLimitError as exc:
        refused = str(exc)
    except (AssertionError, KeyError, RecursionError) as exc:  # no traceback: its frames hold the huge node
        pytest.fail(f"not refused while composing ({type(exc).__name__})", pytrace=False)
    else:
        pytest.fail("not refused", pytrace=False)
    assert time.perf_counter() - started < 1.0
    assert message.split(": ", 1)[-1] in refused and len(composed) < 2000


def test_a_100_mb_file_is_refused_from_its_size(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.truncate(100 << 20)
    started = time.perf_counter()
    with pytest.raises(inputs.YamlLimitError, match=r"104857600 bytes; YAML read here is at most 1048576"):
        inputs.read_yaml_file(path)
    assert time.perf_counter() - started < 1.0


def test_aliases_within_the_bounds_still_load() -> None:
    text = "base: &b {max_tokens: 64, seed: 1}\nboth: [*b, *b]\nmerged: {<<: *b, seed: 2}\n" + alias_bomb(3)
    data = inputs.load_yaml(text)
    assert data["both"] == [{"max_tokens": 64, "seed": 1}] * 2 and data["merged"] == {"max_tokens": 64, "seed": 2}
    assert len(data["name"]) == 9 and data["name"][0][0][0] == ["lol"] * 9  # 9**4 values: within the bound


@pytest.mark.subprocess
def test_every_yaml_command_refuses_a_bomb_before_loading_torch(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The refusal costs the recipe loader only: torch (seconds to import) is not imported first."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    out = str(tmp_path / "out")
    lines = [
        ["validate", str(bomb)],
        ["run", str(bomb), "--out", out],
        ["tune", str(bomb), "--out", out],
        ["sweep", str(bomb), "--sparsity", "0.1", "--out", out],
        ["eval", str(Path(persona_folder(tmp_path, tiny_llama_dir)).parent), "--recipe", str(bomb)],
        ["run", str(recipe), "--out", out, "pairs=&a [*a]"],
    ]
    script = (
        "import sys; from exporter.cli import main\n"
        f"codes = [main(argv) for argv in {lines!r}]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.stdout.strip() == "[2, 2, 2, 2, 2, 2] False", done.stdout + done.stderr
    assert done.stderr.count(f"{bomb}: line 6: the aliases here expand") == 5 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "folder",
    ["\u202emalicious\u202c \u05e2\u05d1\u05e8\u05d9\u05ea \U0001f4c1", "caf\udce9"],
    ids=["rtl-emoji", "not-utf8-bytes"],
)
@pytest.mark.usefixtures("no_model_load")
def test_unusual_but_valid_paths_work_and_print(
    folder: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Right-to-left marks, emoji and bytes that are not UTF-8 in a folder name: the recipe and its data load,
    and the paths print (escaped where they are not text) instead of crashing the output."""
    from exporter.cli import main

    where = tmp_path / folder
    where.mkdir()
    recipe = write_recipe(where, tiny_llama_dir)
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "valid (recipe sha256 " in out and ("\\udce9" in out if "\udce9" in folder else folder in out)
