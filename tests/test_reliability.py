"""Reliability: exact resume after SIGKILL, atomic checkpoints, bad data and flags, hostile model output,
numerics, loading safety."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import grpo_vl as g
import rewards as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
RUN = [
    "grpo_vl.py",
    "--model",
    "tiny",
    "--data",
    "synthetic:64",
    "--sft-steps",
    "3",
    "--sft-lr",
    "1e-3",
    "--max-steps",
    "5",
    "--save-every",
    "1",
    "--length-bonus",
    "0.01",
    "--lr",
    "1e-3",
    "--max-new-tokens",
    "24",
    "--gen-batch",
    "1",
    "--log-completions-every",
    "0",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]


def weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "checkpoint", "model.safetensors"))


def steps(out):
    return [(r["phase"], r["step"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]


def kill_when(cmd, out, n_lines, timeout=300):
    """Start cmd, SIGKILL it (and its children) once metrics.jsonl has n_lines lines."""
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    t0, path = time.time(), os.path.join(out, "metrics.jsonl")
    while time.time() - t0 < timeout and p.poll() is None:
        if os.path.exists(path) and len(open(path).readlines()) >= n_lines:
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("whole"))
    subprocess.run([sys.executable, *RUN, "--out", out], cwd=ROOT, env=ENV, check=True, capture_output=True)
    return out


def test_resume_after_sigkill_is_bitwise_identical(uninterrupted, tmp_path):
    out = str(tmp_path / "killed")
    n = random.Random(7).randint(2, 6)  # somewhere in SFT (3 steps) or RL (5 steps)
    kill_when([sys.executable, *RUN, "--out", out], out, n)
    subprocess.run(
        [sys.executable, *RUN, "--out", out, "--resume"], cwd=ROOT, env=ENV, check=True, capture_output=True
    )
    a, b = weights(uninterrupted), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        steps(out)
        == steps(uninterrupted)
        == [("sft", i) for i in (1, 2, 3)] + [("rl", i) for i in range(1, 6)]
    )


def test_resume_under_two_ranks_matches_within_float_tolerance(uninterrupted, tmp_path):
    whole, out = str(tmp_path / "whole2"), str(tmp_path / "killed2")
    subprocess.run([*TORCHRUN, *RUN, "--out", whole], cwd=ROOT, env=ENV, check=True, capture_output=True)
    kill_when([*TORCHRUN, *RUN, "--out", out], out, 5)
    subprocess.run(
        [*TORCHRUN, *RUN, "--out", out, "--resume"], cwd=ROOT, env=ENV, check=True, capture_output=True
    )
    a, b, c = weights(whole), weights(out), weights(uninterrupted)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(
        f"\n2 ranks, resumed vs uninterrupted: max |diff| = {diff:.3g}; "
        f"vs 1 process: {max((c[k] - b[k]).abs().max().item() for k in a):.3g}"
    )
    assert diff < 1e-6
    assert steps(out) == steps(uninterrupted)


def test_checkpoints_are_atomic_and_only_the_last_k_are_kept(tmp_path, monkeypatch):
    out = str(tmp_path / "c")
    g.main(
        [
            "--model",
            "tiny",
            "--data",
            "synthetic:16",
            "--max-steps",
            "3",
            "--save-every",
            "1",
            "--keep",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            out,
            "--log-completions-every",
            "0",
        ]
    )
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["rl-000002", "rl-000003"]
    assert os.path.realpath(os.path.join(out, "checkpoint")).endswith("rl-000003")
    # a crash in the middle of writing the next checkpoint leaves the previous one complete and current
    model, processor, _, _ = g.load_model(g.parse_args(["--model", "tiny"]))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    monkeypatch.setattr(g.dcp, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    args = g.parse_args(["--model", "tiny", "--out", out])
    with pytest.raises(OSError):
        g.save_checkpoint(model, opt, sched, None, processor, args, "rl", 4, 0)
    assert os.path.realpath(os.path.join(out, "checkpoint")).endswith("rl-000003")
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(os.path.join(out, "checkpoint"))
    assert json.load(open(os.path.join(out, "checkpoint", "progress.json")))["step"] == 3


def test_skip_bad_rows_counts_them_by_reason(tmp_path, capsys):
    import datasets
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"images": [str(tmp_path / "ok.png")], "problem": "p", "answer": "1"},
        {"images": [str(tmp_path / "broken.png")], "problem": "p", "answer": "1"},
        {"images": [str(tmp_path / "missing.png")], "problem": "p", "answer": "1"},
        {"images": [], "problem": "p", "answer": "1"},
        {"images": [str(tmp_path / "ok.png")], "problem": "p", "answer": ""},
    ]
    path = str(tmp_path / "m.jsonl")
    datasets.Dataset.from_list(rows).to_json(path)
    with pytest.raises(ValueError, match="row 1, column 'image': unreadable image"):
        data.load_examples(path, "train")
    exs = data.load_examples(path, "train", skip_bad=True)
    assert len(exs) == 1
    out = capsys.readouterr().out
    assert (
        "skipped 4 bad rows" in out
        and "2 x image: unreadable image" in out
        and "1 x answer: no answer" in out
    )


@pytest.mark.parametrize(
    "argv,env,message",
    [
        (["--prompts-per-step", "8"], {"WORLD_SIZE": "3"}, "must divide by the 3 ranks"),
        (["--model", "/no/such/folder"], {}, "no such folder"),
        (["--model", "./relative/nothing"], {}, "no such folder"),
        (["--ptst", "64-8-3"], {}, "--ptst"),
    ],
)
def test_bad_flags_exit_2_before_loading_a_model(argv, env, message, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        g.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_data_flag_exits_2_with_the_row(tmp_path, capsys):
    path = str(tmp_path / "x.jsonl")
    open(path, "w").write(json.dumps({"images": [], "problem": "p", "answer": "1"}) + "\n")
    with pytest.raises(SystemExit) as e:
        g.main(["--model", "tiny", "--data", path, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "row 0, column 'image'" in capsys.readouterr().err


def hostile_strings(n, seed=0):
    rng = random.Random(seed)
    tags = [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "### Step 1:",
        "### The final answer is:",
        "\\frac{",
        "\\sqrt{",
        "{",
        "}",
        "(",
        ")",
        "$",
        "\\boxed{",
        " ",
        "\n",
        "__import__('os').system('id')",
        "9**9**9",
    ]
    for i in range(n):
        kind = i % 5
        if kind == 0:
            yield (
                "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(rng.randint(0, 200)))
                .encode("utf-8", "surrogatepass")
                .decode("utf-8", "replace")
            )
        elif kind == 1:
            yield "".join(rng.choice(tags) for _ in range(rng.randint(0, 300)))
        elif kind == 2:
            yield rng.choice(tags) * rng.randint(1, 2000)
        elif kind == 3:
            yield (
                "<think>"
                + "a " * rng.randint(0, 500)
                + "</think><answer>"
                + rng.choice(tags) * 50
                + "</answer>"
            )
        else:
            yield "".join(rng.choice("\\{}()^_$0123456789+-*/ frac sqrt") for _ in range(rng.randint(0, 400)))
    yield "x" * 1_000_000
    yield "<answer>" * 50_000
    yield "### Step 1:" * 50_000


def test_fuzz_every_reward_on_10000_hostile_strings():
    ex = {"answer": "2", "choices": ["2", "3"], "key_steps": [["6/3 = 2"], ["area is 12"]]}
    times, n = [], 0
    for text in hostile_strings(10_000):
        t0 = time.perf_counter()
        for name, fn in R.REWARDS.items():
            v = fn(text, ex, len(text))
            lo, hi = (0.0, 1.1) if name == "step_accuracy" else (0.0, 1.0)
            assert name == "length" or lo <= v <= hi, (name, v)
        R.reflects(text)
        times.append(time.perf_counter() - t0)
        n += 1
    assert n >= 10_000
    mean = sum(times) / len(times)
    print(f"\nfuzz: {n} strings, mean {mean * 1e3:.3f} ms, worst {max(times) * 1e3:.1f} ms")
    assert mean < 1e-3


def test_numerics_zero_std_groups_and_all_truncated(tmp_path):
    out = str(tmp_path / "n")
    g.main(
        [
            "--model",
            "tiny",
            "--data",
            "synthetic:16",
            "--max-steps",
            "1",
            "--max-new-tokens",
            "1",
            "--out",
            out,
            "--log-completions-every",
            "0",
        ]
    )
    (m,) = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    # one token each: rewards all 0, every group flat; a random model rarely says EOS first
    assert (
        m["frac_zero_std"] == 1.0
        and m["completion_len"] == 1.0
        and m["loss"] == 0.0
        and m["grad_norm"] < 1e-6
    )
    assert 0.9 <= m["truncated_frac"] <= 1.0


def test_non_finite_gradient_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    g.main(
        [
            "--model",
            "tiny",
            "--data",
            "synthetic:16",
            "--max-steps",
            "1",
            "--max-new-tokens",
            "8",
            "--out",
            out,
            "--log-completions-every",
            "0",
            "--length-bonus",
            "0.01",
        ]
    )
    good = weights(out)
    real = g.grpo_loss
    monkeypatch.setattr(g, "grpo_loss", lambda *a: (real(*a)[0] * float("nan"), *real(*a)[1:]))
    with pytest.raises(SystemExit, match="gradient norm nan"):
        g.main(
            [
                "--model",
                "tiny",
                "--data",
                "synthetic:16",
                "--max-steps",
                "2",
                "--max-new-tokens",
                "8",
                "--out",
                out,
                "--log-completions-every",
                "0",
                "--length-bonus",
                "0.01",
                "--resume",
            ]
        )
    after = weights(out)
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_loading_is_safe_by_default():
    import re

    assert g.parse_args([]).trust_remote_code is False
    for name in ("grpo_vl.py", "rewards.py", "data.py"):
        src = open(os.path.join(ROOT, name)).read()
        assert not re.search(
            r"torch\.load\((?![^)]*weights_only=True)", src
        )  # pickles only with weights_only
        assert not re.search(r"(?<![\w.])(eval|exec|sympify|parse_expr)\(", src)  # model text is never run


def test_prompts_over_the_cap_are_bad_rows_never_cut(tiny, tmp_path, capsys):
    _, processor, _, _ = tiny
    args = g.parse_args(["--model", "tiny"])
    lengths = [
        g.encode(processor, [ex], args)["input_ids"].shape[1]
        for ex in data.load_examples("synthetic:12", "train")
    ]
    cap = sorted(lengths)[6]
    over = [i for i, n in enumerate(lengths) if n > cap]
    assert 0 < len(over) < 12
    flags = [
        "--model",
        "tiny",
        "--data",
        "synthetic:12",
        "--max-prompt-tokens",
        str(cap),
        "--max-steps",
        "1",
        "--max-new-tokens",
        "8",
        "--out",
        str(tmp_path / "p"),
        "--log-completions-every",
        "0",
    ]
    with pytest.raises(SystemExit) as e:
        g.main(flags)
    assert (
        e.value.code == 2
        and f"row {over[0]}, column 'question': {lengths[over[0]]} tokens" in capsys.readouterr().err
    )
    g.main(flags + ["--skip-bad-rows"])
    assert f"skipped {len(over)} rows whose prompts are over --max-prompt-tokens" in capsys.readouterr().out
