#!/usr/bin/env bash
# Benchmarks (printed figures, not tests). Needs the environment from ci/setup.sh.
# bench_deploy.py also times llama.cpp on the dense GGUF when llama-cpp-python is importable, and bench_serve.py
# llama.cpp's server (llama-cpp-python[server]) against `persona-export serve` (optional, never installed by
# ci/setup.sh: it compiles for minutes); LLAMA_PYTHON may name another interpreter that has it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash ci/setup.sh
.venv/bin/python ci/bench.py "$@"
.venv/bin/python ci/bench_onnx.py
.venv/bin/python ci/bench_deploy.py --llama-python "${LLAMA_PYTHON:-.venv/bin/python}"
.venv/bin/python ci/bench_serve.py --llama-python "${LLAMA_PYTHON:-.venv/bin/python}"
.venv/bin/python ci/bench_scale.py --sizes 0.1b 0.5b 1b
