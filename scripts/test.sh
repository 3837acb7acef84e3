#!/usr/bin/env bash
# Set up (if needed), run ruff and mypy, then the test suite. `--slow` runs only the slow tests (no checks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# One intra-op thread: the tests use small tensors, and with 2 threads any other job on a core makes
# OpenMP barriers stall (measured: tests/flows + tests/training 144 s with 2 threads vs 26 s with 1
# while one other process ran). Override with OMP_NUM_THREADS=N.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MPLBACKEND=Agg
if [ "${1:-}" = "--slow" ]; then
  shift
  exec python -m pytest -m slow "$@"
fi
# Static checks first (configured in pyproject.toml; installed by setup.sh with the `test` extra):
# lint (pyflakes, pycodestyle, import order, bugbear) and a lenient mypy.
python -m ruff check src tests benchmarks examples scripts tools
python -m mypy
exec python -m pytest "$@"
