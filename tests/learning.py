"""A tiny run that learns something, for the tests that compare two runs or two paths.

A random tiny model never writes the format: every RL reward is 0, every group has zero std, grad_norm is 0
and the weights never move. Two such runs are two untouched models, equal whatever the code does. In the run
below RL really updates the weights, and assert_learned() checks that it did, by more than the tolerance of
the comparison it is used for: a test that compares two runs of it can fail.
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ONE = [sys.executable]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # a free port
# 4 SFT steps (32 rows, 8 a step, one epoch) teach the random model to end some completions early, so
# completion lengths, hence the R3 length rewards, differ within groups: every GRPO step has a gradient, and
# lr 1e-3 makes it move the weights. Sampling does not depend on the rank count (one generate() call per
# prompt); --micro-batch 3 cuts each group of 8 into micro-batches; --save-every 1 checkpoints every step, so
# a kill at any step resumes from the step before (only the newest checkpoint is kept).
LEARNS = ["grpo_vl.py", *tiny.flags(), "--data", tiny.data_file(64), "--sft-data", tiny.data_file(32)] + (
    "--sft-epochs 1 --sft-batch 8 --sft-lr 1e-3 --max-steps 5 --lr 1e-3 --length-bonus 0.01 "
    "--max-new-tokens 24 --micro-batch 3 --save-every 1 --log-completions-every 0"
).split()
PHASES = [("sft", i) for i in range(1, 5)] + [("rl", i) for i in range(1, 6)]  # the (phase, step) of LEARNS


def run(launcher, out, *flags):
    """LEARNS (and flags) under `launcher` (ONE or TWO), writing to `out`; its output shown if it fails."""
    p = subprocess.run(
        [*launcher, *LEARNS, "--out", out, *flags], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return out


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def weights(out, checkpoint="checkpoint"):
    """The weights of OUT/checkpoint (the newest) or of OUT/checkpoints/<checkpoint> (while it exists)."""
    from safetensors.torch import load_file

    folder = "checkpoint" if checkpoint == "checkpoint" else os.path.join("checkpoints", checkpoint)
    return load_file(os.path.join(out, folder, "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


_SFT_ENDS = {}


def sft_end(launcher):
    """The output folder of LEARNS without --data (SFT only) under `launcher`: its OUT/checkpoint holds the
    weights the full run has at the end of its SFT (SFT is deterministic; only the newest checkpoint is kept,
    so the full run's own sft-000004 is gone). Run once per launcher."""
    key = tuple(launcher)
    if key not in _SFT_ENDS:
        out = tempfile.mkdtemp(prefix="learning-sft-")
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        _SFT_ENDS[key] = run(launcher, out, "--data", "")
    return _SFT_ENDS[key]


def assert_learned(out, since, tol):
    """RL really trained in the run at `out`: grad_norm > 0 at every RL step, and the weights moved by more
    than `tol` (the tolerance of the comparison) from `since` to the end. `since`: the weights to measure
    from (a dict, e.g. those kill_twice_and_resume resumed from), or an output folder whose run is this run's
    SFT (sft_end(launcher)): its SFT steps must then be the run's, same loss and grad_norm."""
    norms = [m["grad_norm"] for m in metrics(out) if m["phase"] == "rl"]
    assert norms and min(norms) > 0, f"RL steps without a gradient: grad_norm {norms}"
    if isinstance(since, str):
        sft = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(out) if m["phase"] == "sft"]
        assert [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(since)] == sft, "not this run's SFT"
        since = weights(since)
    moved = max_diff(since, weights(out))
    assert moved > tol, (
        f"weights moved by {moved:.3g} after SFT / the resume: not more than the tolerance {tol}"
    )


def process_tree(pid):
    """pid and its descendants, read from /proc: torchrun starts its workers in sessions of their own, so
    killing torchrun's process group leaves them running (and writing into the same folder)."""
    parent = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(d)] = int(open(f"/proc/{d}/stat").read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):  # it ended while we looked
            pass
    tree, i = [pid], 0
    while i < len(tree):
        tree += [child for child, p in parent.items() if p == tree[i]]
        i += 1
    return tree


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def kill_when(launcher, out, n_lines, *flags, timeout=300):
    """Start LEARNS under `launcher`, SIGKILL it and every process it started once metrics.jsonl has n_lines
    lines, and wait until all of them are gone."""
    p = subprocess.Popen(
        [*launcher, *LEARNS, "--out", out, *flags],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    t0, path, tree = time.time(), os.path.join(out, "metrics.jsonl"), []
    while time.time() - t0 < timeout and p.poll() is None:
        if os.path.exists(path) and len(open(path).readlines()) >= n_lines:
            tree = process_tree(p.pid)
            for pid in tree:
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    while any(map(alive, tree)) and time.time() - t0 < timeout:
        time.sleep(0.05)


def kill_twice_and_resume(launcher, out):
    """LEARNS killed (SIGKILL) in SFT after 2 of its 4 steps, resumed, killed in RL after 2 of its 5 steps,
    resumed to the end. Returns the two checkpoints it resumed from, as (name, weights) pairs (their folders
    are deleted by the next save): each leaves at least two steps of its phase, since the first step after a
    resume takes its lr from the optimizer's state, the next from the restored schedule."""
    resumed_from = []
    for n_lines, flags in [(2, ()), (4 + 2, ("--resume",))]:  # 4 SFT lines, then RL steps 1 and 2
        kill_when(launcher, out, n_lines, *flags)
        name = os.path.basename(os.path.realpath(os.path.join(out, "checkpoint")))
        resumed_from.append((name, weights(out)))
    run(launcher, out, "--resume")
    return resumed_from
