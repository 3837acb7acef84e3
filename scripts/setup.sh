#!/usr/bin/env bash
# Set up boltzflow in ./.venv (idempotent). Pins the CPU build of torch so no CUDA build is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: 2.13.0 is the CPU build on this project's machines (see DEVELOPERS.md).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -c "import boltzflow, openmm, torch; print(f'boltzflow {boltzflow.__version__} ready (OpenMM {openmm.__version__}, torch {torch.__version__})')"
