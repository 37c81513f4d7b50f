"""A run of two tiny ONNX personas, built once for the serve tests (tests that change it copy it first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.running import two_persona_run


@pytest.fixture(scope="package")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_persona_run(tmp_path_factory.mktemp("serve"))
