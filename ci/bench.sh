#!/usr/bin/env bash
# Benchmarks (printed figures, not tests). Needs the environment from ci/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash ci/setup.sh
.venv/bin/python ci/bench.py "$@"
.venv/bin/python ci/bench_onnx.py
.venv/bin/python ci/bench_scale.py --sizes 0.1b 0.5b 1b
