"""What a path handed to `generate`, `chat` or `serve` holds, told from its files: a persona folder of a run
(report.json, hf/ and format folders), one export folder (hf/, onnx/, ort-int8/, genai/, ...), a GGUF file, a
folder downloaded from the Hub (a checkpoint at its root, format folders beside it), or a whole run.

Each model found lists its formats with the runtime that runs them. A folder is an onnxruntime export when it
holds `model.onnx` and config.json, an onnxruntime-genai folder when it holds genai_config.json, a checkpoint
when it holds config.json and safetensors: a format added later (a new folder of model.onnx) is found without
an edit here, under its registered name or, unregistered, under its folder's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ExportFolderError, OnnxModelError, PersonaExportError
from exporter.folders.run_folder import PersonaFolder, RunFolder
from exporter.inputs import path_kind
from exporter.recipe.formats import FORMATS

ORT, GENAI, TORCH = "onnxruntime", "onnxruntime-genai", "torch"
# the format a command runs when none is named: proven ones first (fp32 ONNX, then genai, then the checkpoint)
PREFERRED = ("onnx", "onnx-genai", "hf", "gguf")
FORMAT_OF_FOLDER = {f.folder: name for name, f in FORMATS.items()}
BACKEND_NAMES = {"torch": "hf"}  # `--backend torch` runs the checkpoint
BASE = "base"  # RUN_DIR/base: the run's dense model exported beside its personas (`serve --base`)


@dataclass(frozen=True)
class Found:
    """One runnable format: its name, its folder (or GGUF file) and the runtime that runs it."""

    format: str
    path: Path
    runtime: str


def runtime_of(path: Path) -> str | None:
    """The runtime for a folder or file, from what it holds; None when it is not a runnable export."""
    if path.is_file():
        return TORCH if path.suffix == ".gguf" else None
    if not path.is_dir():
        return None
    if (path / "genai_config.json").is_file():
        return GENAI
    if (path / "config.json").is_file() and (path / "model.onnx").is_file():
        return ORT
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return TORCH
    return None


@dataclass(frozen=True)
class Export:
    """A model to run: its name and the formats found for it, in the order a command prefers them, and the
    registered format folders present but incomplete (no model.onnx, no genai_config.json)."""

    name: str
    path: Path
    formats: dict[str, Found]
    incomplete: tuple[str, ...] = ()

    def pick(self, fmt: str | None = None) -> Found:
        """The format named (`torch` meaning the checkpoint), else the preferred one present; an incomplete
        folder that would be preferred is an error rather than passed over."""
        if fmt is None:
            first = next(iter(self.formats))
            passed_over = [f for f in self.incomplete if _rank(f) < _rank(first)]
            if passed_over:
                self._refuse_incomplete(passed_over[0])
            return self.formats[first]
        name = BACKEND_NAMES.get(fmt, fmt)
        if name in self.incomplete:
            self._refuse_incomplete(name)
        if name in self.formats:
            return self.formats[name]
        have = ", ".join(self.formats)
        fix = f"add it with `persona-export export {self.path} --format {fmt}`, or " if _is_persona(self.path) else ""
        raise OnnxModelError(
            f"{self.path} has no {_folder(name)}/ folder for the format {fmt!r} (it holds: {have}); "
            f"{fix}pass one of: {have}"
        )

    def _refuse_incomplete(self, name: str) -> None:
        folder = self.path / _folder(name)
        raise OnnxModelError(
            f"{folder} is not a complete {name} export (no config.json with model.onnx, no genai_config.json); "
            f"re-export it (`persona-export export {self.path} --format {name} --overwrite`) or pass another format"
        )


def _folder(name: str) -> str:
    """The folder of a registered format; an unregistered format is named after its folder."""
    return FORMATS[name].folder if name in FORMATS else name


def _rank(name: str) -> int:
    return PREFERRED.index(name) if name in PREFERRED else len(PREFERRED)


def _is_persona(path: Path) -> bool:
    return PersonaFolder(path).holds_export()


def _ordered(found: list[Found]) -> dict[str, Found]:
    return {f.format: f for f in sorted(found, key=lambda f: (_rank(f.format), f.format))}


def _scan(folder: Path, name: str) -> Export:
    """The folder itself (a checkpoint at the root of a Hub download) and its format folders. A gguf/ folder is
    left out: hf/ runs the same weights; a GGUF file is run when it is passed itself."""
    found, incomplete = [], []
    root = runtime_of(folder)
    if root is not None:
        found.append(Found(_format_name(folder, root, root=True), folder, root))
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != FORMATS["gguf"].folder):
        runtime = runtime_of(sub)
        if runtime is not None:
            found.append(Found(_format_name(sub, runtime), sub, runtime))
        elif sub.name in FORMAT_OF_FOLDER and sub.name != FORMATS["hf"].folder:
            incomplete.append(FORMAT_OF_FOLDER[sub.name])
    return Export(name, folder, _ordered(found), tuple(incomplete))


def _format_name(path: Path, runtime: str, root: bool = False) -> str:
    """The registered name of the folder's format (genai/ and q4-genai/ both run on onnxruntime-genai); an
    unregistered folder is named after itself, or `onnx` / `onnx-genai` when it is the folder handed in (a
    separate repository downloaded from the Hub)."""
    if path.is_file():
        return "gguf"
    if runtime == TORCH:
        return "hf"
    registered = FORMAT_OF_FOLDER.get(path.name)
    if registered is not None and FORMATS[registered].family == runtime:
        return registered
    if root:
        return "onnx-genai" if runtime == GENAI else "onnx"
    return path.name


def locate(path: Path) -> Export:
    """The model at `path`: a persona folder, an export folder, a GGUF file or a Hub download."""
    path = Path(path)
    kind = path_kind(path)
    if kind == "nothing":
        raise ExportFolderError(f"{str(path)!r} does not exist; pass a persona folder (e.g. runs/demo/introvert)")
    if kind not in ("a file", "a folder"):
        raise ExportFolderError(f"{str(path)!r} is {kind}, not an export folder or a GGUF file")
    if kind == "a file":
        if path.suffix != ".gguf":
            raise ExportFolderError(f"{str(path)!r} is a file but not a GGUF file; pass an export folder or a .gguf")
        return Export(path.stem, path, {"gguf": Found("gguf", path, TORCH)})
    runtime = runtime_of(path)
    if runtime is not None and runtime != TORCH and not _is_persona(path):  # one export folder
        found = Found(_format_name(path, runtime, root=True), path, runtime)
        return Export(_model_name(path), path, {found.format: found})
    export = _scan(path, _model_name(path))
    if export.formats:
        return export
    raise ExportFolderError(_not_an_export(path))


def _model_name(path: Path) -> str:
    """A persona's name for its folder or one of its format folders (the parent's name for any folder named
    like a format: dense/onnx is "dense"); else the folder's own name (a Hub download's is its repository's)."""
    path = path.resolve()
    if (_is_persona(path.parent) and not _is_persona(path)) or path.name in FORMAT_OF_FOLDER:
        return path.parent.name
    return path.name


def _not_an_export(path: Path) -> str:
    personas = run_personas(path) if (path / "run.json").is_file() else []
    if personas:
        return (
            f"{str(path)!r} is a run folder (personas: {', '.join(personas)}); pass one persona, e.g. "
            f"{path / personas[0]}, or serve the whole run with `persona-export serve {path}`"
        )
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return f"{str(path)!r} holds GGUF files; pass one of them, e.g. {ggufs[0]}"
    return (
        f"{str(path)!r} is not an export: it holds no report.json with hf/, no config.json with model.onnx or "
        "safetensors, no genai_config.json and no .gguf; pass a persona folder (e.g. runs/demo/introvert), one of "
        "its format folders, a folder downloaded from the Hub, or a .gguf file"
    )


def run_personas(run_dir: Path) -> list[str]:
    """The persona folders a run's run.json lists that hold a persona export."""
    try:
        listed = RunFolder(run_dir).info().get("personas", {})
    except PersonaExportError:
        return []
    names = listed if isinstance(listed, dict | list) else []
    return [name for name in names if isinstance(name, str) and _is_persona(run_dir / name)]


def locate_models(path: Path) -> dict[str, Export]:
    """What `serve` answers for: a run's personas (and RUN_DIR/base when it was exported), or the one model at
    `path`."""
    path = Path(path)
    if not (path.is_dir() and (path / "run.json").is_file()):
        export = locate(path)
        return {export.name: export}
    personas = run_personas(path)
    if not personas:
        raise ExportFolderError(f"{path} is a run folder without a persona export (run.json lists none that exists)")
    models = {name: locate(path / name) for name in personas}
    if (path / BASE).is_dir() and BASE not in models:
        models[BASE] = _scan(path / BASE, BASE)
    return models
