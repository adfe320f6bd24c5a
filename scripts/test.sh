#!/usr/bin/env bash
# Sets up .venv and runs every check CI runs: ruff lint, ruff format check, mypy on src/, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev,pl,onnx,wandb,mlflow bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy src
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
