"""The three modules as ruff leaves them: formatted at line length 110 and clean under the lint rules in
pyproject.toml (no named lambdas, no unused names, no line over 110). Formatting is a tool, not effort."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUFF = os.path.join(os.path.dirname(sys.executable), "ruff")  # installed beside python by ./run.sh
MODULES = ["grpo_vl.py", "rewards.py", "data.py"]


def ruff(*argv):
    return subprocess.run([RUFF, *argv], cwd=ROOT, capture_output=True, text=True)


def test_modules_are_formatted():
    p = ruff("format", "--check", *MODULES)
    assert p.returncode == 0, p.stdout + p.stderr


def test_modules_pass_the_lint_rules():
    p = ruff("check", "--output-format", "concise", *MODULES)
    assert p.returncode == 0, p.stdout + p.stderr
