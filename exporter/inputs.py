"""Reading what a user hands in: paths that must be regular files or folders, JSON objects, and YAML that is
plain data (no duplicate keys, no tags that would build objects).

Messages say what a path is when it is not what was expected (a folder, a named pipe, a symlink loop, ...),
instead of calling it missing.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from exporter.errors import PersonaExportError


def path_kind(path: str | Path) -> str:
    """What is at `path`: 'a file', 'a folder', 'a named pipe (FIFO)', ..., 'a symlink loop', 'nothing'."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        if os.path.islink(path):
            return f"a broken symlink (to {os.readlink(path)!r})"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "nothing"
        return f"unreadable ({exc.strerror})"
    kinds = [
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _kind_problem(path: str | Path, want: str, called: str) -> str | None:
    kind = path_kind(path)
    if kind == want:
        return None
    if kind == "nothing":
        return f"{str(path)!r} does not exist"
    return f"{str(path)!r} is {kind}, not {called}"


def file_problem(path: str | Path) -> str | None:
    """None when `path` is a regular file (after symlinks); else what it is, e.g. "'x' is a folder, not a file"."""
    return _kind_problem(path, "a file", "a regular file")


def folder_problem(path: str | Path) -> str | None:
    """None when `path` is a folder (after symlinks); else what it is."""
    return _kind_problem(path, "a folder", "a folder")


def read_json_object(path: Path, error: type[PersonaExportError], fix: str) -> dict[str, Any]:
    """A JSON object read from a regular file; anything else raises `error` naming the file and `fix`."""
    problem = file_problem(path)
    if problem is not None:
        raise error(f"{problem}; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, expected an object; {fix}")
    return data


class _PlainLoader(yaml.SafeLoader):
    """safe_load, and a clear refusal of any tag it does not know (it never builds objects from tags)."""


def _refuse_tag(loader: yaml.SafeLoader, node: Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None,
        None,
        f"the YAML tag {node.tag!r} is not allowed: recipes are plain data (write the value without a tag)",
        node.start_mark,
    )


_PlainLoader.add_constructor(None, _refuse_tag)  # type: ignore[arg-type]


def _duplicates(node: Node, path: str, found: list[str]) -> None:
    if isinstance(node, MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, ScalarNode) else None
            if name is not None and name != "<<":
                if name in lines:
                    found.append(
                        f"{path}{name}: duplicate key (lines {lines[name]} and {key.start_mark.line + 1}); "
                        "YAML keeps only the last one: merge the two into one"
                    )
                lines.setdefault(name, key.start_mark.line + 1)
            _duplicates(value, f"{path}{name}." if name is not None else path, found)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _duplicates(item, f"{path}{i}.", found)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (every duplicate, with its key path)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_yaml(text: str) -> Any:
    """Like yaml.safe_load, but duplicate keys raise DuplicateKeyError and unknown tags a YAMLError."""
    loader = _PlainLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        found: list[str] = []
        _duplicates(node, "", found)
        if found:
            raise DuplicateKeyError(found)
        return loader.construct_document(node)
    finally:
        loader.dispose()
