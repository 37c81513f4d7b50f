"""Where a recipe names files, and the recipe's one hash.

`file_keys` lists the keys that hold a file or folder path (model.path, every calibration and evaluation data
file) in a recipe as written or as validated; loading resolves them against the recipe's folder, errors name
them, and `recipe_sha256` hashes the data files' content in their place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exporter.recipe.schema import Recipe

Key = tuple[str, ...]
MODEL_PATH: Key = ("model", "path")
# what stands for model.path in the hash: the weights are identified by their own sha256 (run.json's model_sha256)
LOCAL_MODEL = "<a local model folder>"


def _sections(data: dict[str, Any]) -> list[tuple[Key, Any]]:
    """The evaluation sections that name data files: eval and tune.validation, each with its item sets (`sets`,
    keyed by their position)."""
    tune = data.get("tune")
    out: list[tuple[Key, Any]] = []
    for key, ev in (
        (("eval",), data.get("eval")),
        (("tune", "validation"), tune.get("validation") if isinstance(tune, dict) else None),
    ):
        out.append((key, ev))
        sets = ev.get("sets") if isinstance(ev, dict) else None
        if isinstance(sets, list):
            out += [((*key, "sets", str(i)), s) for i, s in enumerate(sets)]
    return out


def file_keys(data: dict[str, Any]) -> list[Key]:
    """The keys of `data` (a recipe mapping, as written or as model_dump gives it) that hold a path."""
    keys: list[Key] = []

    def add(key: Key, section: Any) -> None:
        if isinstance(section, dict) and isinstance(section.get("path"), str):
            keys.append((*key, "path"))

    add(("model",), data.get("model"))
    personas = data.get("personas")
    for name, spec in personas.items() if isinstance(personas, dict) else []:
        add(("personas", str(name), "calibration"), spec.get("calibration") if isinstance(spec, dict) else None)
    for top, ev in _sections(data):
        if not isinstance(ev, dict):
            continue
        for part in ("paired", "unpaired", "choices", "statements", "neutral", "replies"):
            add((*top, part), ev.get(part))
        for part in ("paired", "unpaired"):  # a persona's answers may sit in a file of their own
            section = ev.get(part)
            responses = section.get("responses") if isinstance(section, dict) else None
            for name, src in responses.items() if isinstance(responses, dict) else []:
                add((*top, part, "responses", str(name)), src)
    return keys


def get_key(data: dict[str, Any], key: Key) -> Any:
    node: Any = data
    for part in key:
        node = node[int(part)] if isinstance(node, list) else node[part]  # eval.sets is a list
    return node


def set_key(data: dict[str, Any], key: Key, value: Any) -> None:
    parent = get_key(data, key[:-1])
    parent[int(key[-1]) if isinstance(parent, list) else key[-1]] = value


def data_files(recipe: Recipe) -> dict[str, Path]:
    """Every data file the recipe reads, by its key ('personas.introvert.calibration.path': path)."""
    data = recipe.model_dump(mode="json")
    return {".".join(k): Path(get_key(data, k)) for k in file_keys(data) if k != MODEL_PATH}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def recipe_sha256(recipe: Recipe) -> str:
    """The recipe's hash, the same wherever its files sit: sha256 of the validated recipe as JSON (keys sorted,
    defaults filled in, overrides applied) in which each data file's path is replaced by "sha256:" and the
    sha256 of the file's bytes, and model.path by a placeholder (a local model is identified by the sha256 of its
    weight files, recorded beside this hash). The data files must be readable (validate checks them first)."""
    data = recipe.model_dump(mode="json")
    hashed: dict[str, str] = {}
    for key in file_keys(data):
        path = get_key(data, key)
        if key == MODEL_PATH:
            set_key(data, key, LOCAL_MODEL)
            continue
        if path not in hashed:
            hashed[path] = "sha256:" + file_sha256(Path(path))
        set_key(data, key, hashed[path])
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
