#!/usr/bin/env bash
# ./run.sh test | demo | bench | mutants | gpu [flags]: creates .venv from requirements.txt when missing, then runs.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# gpu: the machine's own python3 when it has torch and transformers (a GPU machine builds no .venv)
if [ "${1:-}" = gpu ] && python3 -c "import torch, transformers" 2>/dev/null; then
  shift
  exec python3 tests/gpu.py "$@"
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r requirements.txt
fi
[ -x .venv/bin/ruff ] || .venv/bin/pip install --quiet -r requirements-dev.txt  # for tests/test_lint.py
cmd="${1:-}"; shift || true
case "$cmd" in
  test) exec .venv/bin/python -m pytest -q tests "$@" ;;
  demo) exec .venv/bin/python tests/demo.py "$@" ;;
  bench) exec .venv/bin/python tests/bench.py "$@" ;;
  mutants) exec .venv/bin/python tests/mutants.py "$@" ;;
  gpu) exec .venv/bin/python tests/gpu.py "$@" ;;
  *) echo "usage: ./run.sh test|demo|bench|mutants|gpu [flags]" >&2; exit 2 ;;
esac
