#!/usr/bin/env bash
# The GPU check of issue 19 in one command, on a CUDA machine after `make setup`
# (< 8 min on one GPU): python -m benchmarks gpu (see benchmarks/gpu.py).
# Exits 2 with the reason when CUDA is absent. Extra arguments go to the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -m benchmarks gpu --device "${DEVICE:-cuda}" --out "${OUT:-bench-results/gpu}" "$@"
