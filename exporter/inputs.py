"""Reading what a user hands in: paths that must be regular files or folders, JSON objects, and YAML that is
plain data (no duplicate keys, no tags that would build objects) of bounded size.

Messages say what a path is when it is not what was expected (a folder, a named pipe, a symlink loop, ...),
instead of calling it missing. YAML is refused while it is composed, before any value is built, when it is
larger than a recipe could be: more bytes than `MAX_YAML_BYTES`, a value longer than `MAX_SCALAR`, nesting deeper
than `MAX_DEPTH`, or more than `MAX_NODES` values once every alias is expanded (an alias bomb, "billion laughs",
is refused after composing a few dozen nodes); an alias inside the collection it names (a value that would
contain itself) is refused too.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from exporter.errors import PersonaExportError


def path_kind(path: str | Path) -> str:
    """What is at `path`: 'a file', 'a folder', 'a named pipe (FIFO)', ..., 'a symlink loop', 'nothing'."""
    try:
        mode = os.stat(path).st_mode
    except ValueError:  # the kernel takes no path with a NUL byte (YAML writes one as "\0")
        return "an impossible path (it holds a NUL byte)"
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


MAX_JSON_BYTES = 1 << 28  # a manifest, config or report: far less; a larger file is not what it claims to be


def special_entries(folder: Path) -> list[str]:
    """The entries of `folder` (not recursive) that are neither regular files nor folders after links: named
    pipes, devices, sockets, broken links and link loops, each said as what it is. Reading one blocks or fails
    inside a library (a named pipe named tokenizer.json waits forever for a writer)."""
    found = []
    for entry in sorted(folder.iterdir()):
        kind = path_kind(entry)
        if kind not in ("a file", "a folder"):
            found.append(f"{entry.name!r} is {kind}")
    return found


def check_folder_files(folder: Path, error: type[PersonaExportError], fix: str) -> None:
    """Raise `error` naming every special entry of `folder` (special_entries), before a library opens one."""
    found = special_entries(folder)
    if found:
        raise error(f"{folder} holds {'; '.join(found)}: a model folder holds regular files only; {fix}")


def read_json_object(path: Path, error: type[PersonaExportError], fix: str) -> dict[str, Any]:
    """A JSON object read from a regular file of at most MAX_JSON_BYTES; anything else raises `error` naming the
    file and `fix`."""
    problem = file_problem(path)
    if problem is not None:
        raise error(f"{problem}; {fix}")
    try:
        if (size := os.stat(path).st_size) > MAX_JSON_BYTES:
            raise error(f"{path} holds {size} bytes, more than a JSON file here can be ({MAX_JSON_BYTES}); {fix}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise error(f"{path} is JSON nested too deeply to read; {fix}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, expected an object; {fix}")
    return data


MAX_YAML_BYTES = 1 << 20  # a recipe is a few kilobytes
MAX_SCALAR = 1 << 16  # characters of one value (a system prompt is a few hundred)
MAX_DEPTH = 64  # nesting levels (a recipe uses about 6)
MAX_NODES = 100_000  # values once every alias is expanded (the demo recipe has about 150)


class YamlLimitError(yaml.MarkedYAMLError):
    """YAML refused for its size or shape (see the module docstring), with the line it was refused at."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)

    @property
    def line(self) -> int:
        return int(self.problem_mark.line) + 1 if self.problem_mark is not None else 0


class _PlainLoader(yaml.SafeLoader):
    """safe_load, a clear refusal of any tag it does not know (it never builds objects from tags), and bounds
    checked while composing: every node's size is counted with its aliases expanded, from its children's
    counts, so an alias bomb is refused before anything is expanded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.sizes: dict[int, int] = {}  # id(node) -> values it stands for, aliases expanded; set once composed
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)  # type: ignore[attr-defined]
            if target is not None and id(target) not in self.sizes:  # still being composed: an ancestor
                raise YamlLimitError(
                    f"the alias *{event.anchor} stands inside the value anchored as &{event.anchor}, so that "
                    "value would contain itself; remove the alias",
                    event.start_mark,
                )
            alias: Node = super().compose_node(parent, index)  # type: ignore[assignment]
            return alias
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise YamlLimitError(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
        node: Node = super().compose_node(parent, index)  # type: ignore[assignment]
        self.depth -= 1
        if isinstance(node, ScalarNode):
            if len(node.value) > MAX_SCALAR:
                raise YamlLimitError(
                    f"a value of {len(node.value)} characters; values are at most {MAX_SCALAR}", node.start_mark
                )
            size = 1
        else:
            children = [c for pair in node.value for c in pair] if isinstance(node, MappingNode) else node.value
            size = 1 + sum(self.sizes[id(c)] for c in children)
        if size > MAX_NODES:
            raise YamlLimitError(
                f"the aliases here expand to more than {MAX_NODES} values (an alias bomb?)", node.start_mark
            )
        self.sizes[id(node)] = size
        return node


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


def load_yaml(text: str, name: str = "<string>") -> Any:
    """Like yaml.safe_load, but duplicate keys raise DuplicateKeyError, unknown tags a YAMLError, and YAML larger
    than a recipe could be (see the module docstring) YamlLimitError; marks name `name`."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlLimitError(f"{len(text)} characters; YAML read here is at most {MAX_YAML_BYTES}", None)
    loader = _PlainLoader(text)
    loader.name = name  # type: ignore[attr-defined]
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        found: list[str] = []
        _duplicates(node, "", found)
        if found:
            raise DuplicateKeyError(found)
        try:
            return loader.construct_document(node)
        except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
            raise YamlLimitError(f"a value cannot be read ({exc})", None) from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path) -> Any:
    """The YAML data in the file at `path` (a regular file: check with file_problem), refused from its size
    alone when larger than MAX_YAML_BYTES (nothing more is read)."""
    with path.open("rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        size = os.stat(path).st_size
        raise YamlLimitError(f"{size} bytes; YAML read here is at most {MAX_YAML_BYTES} bytes (1 MiB)", None)
    return load_yaml(raw.decode("utf-8-sig"), str(path))
