#!/usr/bin/env bash
# ./run.sh test | demo | bench | mutants [flags]: creates .venv from requirements.txt when missing, then runs.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r requirements.txt
fi
[ -x .venv/bin/ruff ] || .venv/bin/pip install --quiet -r requirements-dev.txt  # for tests/test_lint.py
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cmd="${1:-}"; shift || true
case "$cmd" in
  test) exec .venv/bin/python -m pytest -q tests "$@" ;;
  demo) exec .venv/bin/python tests/demo.py "$@" ;;
  bench) exec .venv/bin/python tests/bench.py "$@" ;;
  mutants) exec .venv/bin/python tests/mutants.py "$@" ;;
  *) echo "usage: ./run.sh test|demo|bench|mutants [flags]" >&2; exit 2 ;;
esac
