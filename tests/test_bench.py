"""./run.sh bench keeps working: `tests/bench.py --quick` (every configuration, 1 warm-up + 1 timed step, tiny
sizes) prints its table with a positive, finite figure in every cell of every configuration, writes the same
figures to bench.json, and its vision-heavy run really alternated vision sharing (G times the tower's images
without it). The figures themselves are not checked: on this shared machine they mean nothing."""

import json
import math
import os
import subprocess
import sys

import pytest

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(stdout, bench.json) of one `bench.py --quick`."""
    path = str(tmp_path_factory.mktemp("bench") / "bench.json")
    cmd = [sys.executable, os.path.join(ROOT, "tests", "bench.py"), "--quick", "--json", path]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout, json.load(open(path))


def printed_table(stdout):
    """{run: {column: value}} read back from the printed table (a name fills the first 22 characters)."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    assert lines[header].split() == ["run", *bench.COLS], lines[header]
    rows = {}
    for line in lines[header + 1 :]:
        if not line.strip():
            break
        rows[line[:22].strip()] = dict(zip(bench.COLS, map(float, line[22:].split()), strict=True))
    return rows


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_bench_prints_and_writes_every_configuration(quick):
    stdout, results = quick
    table = printed_table(stdout)
    assert list(table) == list(bench.RUNS), stdout
    assert results["settings"]["quick"] is True
    assert list(results["runs"]) == list(bench.RUNS)
    for name, row in table.items():
        saved = results["runs"][name]
        for col in bench.COLS:
            assert positive(row[col]), (name, col, row[col])
            assert positive(saved[col]), (name, col, saved[col])
            assert row[col] == pytest.approx(saved[col], rel=1e-3), (name, col)  # printed to 4 digits
        assert saved["steps_timed"] == 1
    for section in ("scoring_peak_mb", "vision_sharing_speedup", "vision_flops_g"):
        assert results[section] and all(positive(v) for v in results[section].values()), (section, results)


def test_quick_bench_counts_what_sharing_saves(quick):
    """Per step, rank 0's prompts through the tower in the rollout, the reference and the policy forward:
    once each with sharing, G times each without."""
    _, results = quick
    P, G = bench.QUICK["P"], bench.QUICK["G"]
    images = {name: r["tower_images_per_step"] for name, r in results["runs"].items()}
    for name, (_, procs) in bench.RUNS.items():
        per_prompt = G if name.endswith("no sharing") else 1
        assert images[name] == 3 * per_prompt * P // procs, (name, images)
