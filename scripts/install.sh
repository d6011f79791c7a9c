#!/usr/bin/env bash
# Install skumatch and its test tools into .venv (created if missing). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned: our machines carry a CPU build of exactly this version.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]" -c constraints.txt
.venv/bin/python -c "import torch, prefect, mlflow, bentoml, faiss, great_expectations, dvc; print('installed: torch', torch.__version__, '| prefect', prefect.__version__, '| mlflow', mlflow.__version__, '| bentoml', bentoml.__version__)"
