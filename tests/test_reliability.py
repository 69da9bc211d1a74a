"""Reliability: exact resume after SIGKILL, atomic checkpoints, bad data and flags, hostile model output,
numerics, loading safety."""

import json
import os
import random
import re
import time

import pytest
import torch

import data
import grpo_vl as g
import learning
import rewards as R
import tiny as fixtures
from conftest import tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def steps(out):
    return [(m["phase"], m["step"]) for m in learning.metrics(out)]


def tiny_flags(rows, flags):
    """tests/tiny.py's flags with a training set of `rows` synthetic rows, then `flags` (one string)."""
    return [*fixtures.flags(), "--data", fixtures.data_file(rows), *flags.split()]


def test_resume_after_sigkill_is_bitwise_identical(learned_one, tmp_path):
    """tests/learning.py's run, killed in SFT and again in RL and resumed each time, ends with the same
    weights, bit for bit, as the uninterrupted run, through the same grad_norm at every step; and the
    steps run after each resume changed the weights (the comparison can fail)."""
    out = str(tmp_path / "killed")
    resumed_from = learning.kill_twice_and_resume(learning.ONE, out)
    assert resumed_from[0][0].startswith("sft-") and resumed_from[1][0].startswith("rl-")
    a, b = learning.weights(learned_one), learning.weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert steps(out) == steps(learned_one) == learning.PHASES
    norms = [[m["grad_norm"] for m in learning.metrics(o)] for o in (out, learned_one)]
    assert norms[0] == norms[1]
    for _, since in resumed_from:
        learning.assert_learned(out, since, tol=1e-4)


def test_resume_under_two_ranks_matches_within_float_tolerance(learned_two, learned_one, tmp_path):
    """The same on 2 FSDP ranks: every process of the run is killed (torchrun's workers too), and the
    resumed run matches the uninterrupted 2-rank run within float tolerance."""
    out = str(tmp_path / "killed2")
    resumed_from = learning.kill_twice_and_resume(learning.TWO, out)
    a, b = learning.weights(learned_two), learning.weights(out)
    diff = learning.max_diff(a, b)
    print(
        f"\n2 ranks, resumed from {[name for name, _ in resumed_from]} vs uninterrupted: max |diff| = "
        f"{diff:.3g}; vs 1 process: {learning.max_diff(learning.weights(learned_one), b):.3g}"
    )
    assert diff < 1e-6
    assert steps(out) == steps(learned_two) == learning.PHASES
    for _, since in resumed_from:
        learning.assert_learned(out, since, tol=1e-6)


def test_checkpoints_are_atomic_and_only_the_newest_is_kept(tmp_path, monkeypatch):
    out = str(tmp_path / "c")
    g.main(
        tiny_flags(
            16, f"--max-steps 3 --save-every 1 --max-new-tokens 8 --out {out} --log-completions-every 0"
        )
    )
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["rl-000003"]
    assert os.path.realpath(os.path.join(out, "checkpoint")).endswith("rl-000003")
    # a crash in the middle of writing the next checkpoint leaves the previous one complete and current
    run = tiny_run("--out", out)
    opt = torch.optim.AdamW(run.model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    monkeypatch.setattr(g.dcp, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    args = g.parse_args([*fixtures.flags(), "--out", out])
    with pytest.raises(OSError):
        g.save_checkpoint(run, opt, sched, args, "rl", 4)
    assert os.path.realpath(os.path.join(out, "checkpoint")).endswith("rl-000003")
    assert "rl-000004" not in os.listdir(os.path.join(out, "checkpoints"))  # only its temporary folder
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(os.path.join(out, "checkpoint"))
    assert json.load(open(os.path.join(out, "checkpoint", "progress.json")))["step"] == 3


def test_a_run_repeated_in_the_same_out_and_runs_that_cannot_start(tmp_path, capsys):
    """A run started again in the same --out (no --resume) replaces its checkpoint instead of dying at the
    final save on the folder already there, and a checkpoint.tmp link left by a kill is replaced too. An SFT
    checkpoint resumed with SFT off, and fewer rows than one step's prompts, are clear errors (exit 2)."""
    out = str(tmp_path / "o")
    sft_only = tiny_flags(8, f"--sft-data {fixtures.data_file(8)} --sft-epochs 1 --sft-batch 8 --out {out}")
    sft_only += ["--data", ""]  # SFT alone
    g.main(sft_only)
    first = os.path.getmtime(os.path.join(out, "checkpoint", "progress.json"))
    os.symlink("nowhere", os.path.join(out, "checkpoint.tmp"))
    g.main(sft_only)
    assert os.path.realpath(os.path.join(out, "checkpoint")).endswith("sft-000001")
    assert os.path.getmtime(os.path.join(out, "checkpoint", "progress.json")) > first
    for argv, message in [
        (tiny_flags(8, f"--out {out} --resume"), "OUT/checkpoint is an SFT checkpoint"),
        (tiny_flags(3, f"--out {tmp_path / 'p'}"), "3 usable rows, fewer than --prompts-per-step 4"),
    ]:
        with pytest.raises(SystemExit) as e:
            g.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


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
    # the column named is the image column of the schema ('image') or the row's own ('images')
    with pytest.raises(ValueError, match="row 1, column 'images?': unreadable image"):
        data.load_examples(path, "train")
    exs = data.load_examples(path, "train", skip_bad=True)
    assert len(exs) == 1
    out = capsys.readouterr().out
    assert "skipped 4 bad rows" in out and "1 x answer: no answer" in out
    assert re.search(r"2 x images?: unreadable image", out), out


@pytest.mark.parametrize(
    "argv,env,message",
    [
        (["--prompts-per-step", "8"], {"WORLD_SIZE": "3"}, "must divide by the 3 ranks"),
        (["--ptst", "64-8-3"], {}, "--ptst '64-8-3': expected tokens:G:steps"),
    ],
)
def test_bad_flags_exit_2_before_loading_a_model(argv, env, message, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        g.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("model", ["/no/such/folder", "./relative/nothing", "empty"])
def test_a_model_that_cannot_load_exits_2_with_one_line(model, tmp_path, capsys):
    """A --model that is no folder and no hub id is a flag error; a folder that holds no model ends the run
    with one line naming it. Exit 2 either way, before any training."""
    if model == "empty":
        model = str(tmp_path / "empty")
        os.makedirs(model)
    with pytest.raises(SystemExit) as e:
        g.main(tiny_flags(16, f"--model {model} --out {tmp_path / 'o'}"))
    err = capsys.readouterr().err.strip().splitlines()
    why = "cannot load it" if model.endswith("empty") else "no such folder, and not a hub id"
    assert e.value.code == 2 and f"error: --model {model!r}: {why}" in err[-1], err


def test_bad_data_flag_exits_2_with_the_row(tmp_path, capsys):
    path = str(tmp_path / "x.jsonl")
    open(path, "w").write(json.dumps({"images": [], "problem": "p", "answer": "1"}) + "\n")
    with pytest.raises(SystemExit) as e:
        g.main([*fixtures.flags(), "--data", path, "--out", str(tmp_path / "o")])
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
    g.main(tiny_flags(16, f"--max-steps 1 --max-new-tokens 1 --out {out} --log-completions-every 0"))
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
    flags = f"--max-new-tokens 8 --out {out} --log-completions-every 0 --length-bonus 0.01"
    g.main(tiny_flags(16, f"--max-steps 1 {flags}"))
    good = learning.weights(out)
    real = g.grpo_loss
    monkeypatch.setattr(g, "grpo_loss", lambda *a: (real(*a)[0] * float("nan"), *real(*a)[1:]))
    with pytest.raises(SystemExit, match="gradient norm nan"):
        g.main(tiny_flags(16, f"--max-steps 2 {flags} --resume"))
    after = learning.weights(out)
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_loading_is_safe_by_default():
    assert not hasattr(g.parse_args([]), "trust_remote_code")  # no flag to run a model's own code
    for name in ("grpo_vl.py", "rewards.py", "data.py"):
        src = open(os.path.join(ROOT, name)).read()
        assert not re.search(r"trust_remote_code\s*=(?!\s*False)", src)  # never runs a model's own code
        assert not re.search(
            r"torch\.load\((?![^)]*weights_only=True)", src
        )  # pickles only with weights_only
        assert not re.search(r"(?<![\w.])(eval|exec|sympify|parse_expr)\(", src)  # model text is never run


def test_evaluation_on_two_ranks_with_fewer_rows_than_ranks_or_uneven_ones(tmp_path):
    """1 row on 2 ranks (rank 1 has nothing to generate) and 3 rows (2 and 1): each rank finishes, and the
    report is the one process's. Under FSDP2 a rank with no rows joined no collective of the other's
    generate() before every parameter was gathered up front and transformers' per-token sync was off."""
    import subprocess

    for rows in (1, 3):
        argv = [
            *fixtures.flags(),
            "--eval",
            "--eval-data",
            fixtures.data_file(rows),
            "--eval-max-new-tokens",
            "8",
        ]
        one = str(tmp_path / f"one-{rows}")
        g.main(argv + ["--out", one])
        two = str(tmp_path / f"two-{rows}")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(
            [*learning.TWO, "grpo_vl.py", *argv, "--out", two],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        reports = [json.load(open(os.path.join(out, "eval.json"))) for out in (one, two)]
        assert reports[0] == reports[1] and reports[0]["n"] == rows


def test_resume_refuses_a_checkpoint_that_lacks_a_part_it_needs(tmp_path, capsys):
    """A checkpoint written without a reference (--beta 0) resumed with one: not a silent partial load (the
    reference would stay the starting model's weights by chance), but one line naming what is missing."""
    out = str(tmp_path / "o")
    g.main(tiny_flags(8, f"--max-steps 1 --max-new-tokens 4 --beta 0 --out {out} --log-completions-every 0"))
    with pytest.raises(SystemExit) as e:
        g.main(tiny_flags(8, f"--max-steps 2 --max-new-tokens 4 --beta 0.04 --out {out} --resume"))
    assert (
        e.value.code == 2
        and "checkpoint holds no ref state: resume with the flags" in capsys.readouterr().err
    )


def test_a_checkpoint_is_evaluated_with_the_variant_it_was_trained_with(tmp_path):
    """--eval --model OUT/checkpoint reads the checkpoint's progress.json: a StepGRPO model is asked with P3
    and judged by R4/R5, not with r1zero's P1; a --variant given on the command line still wins."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "progress.json").write_text(json.dumps({"args": {"variant": "stepgrpo"}}))
    args = g.parse_args(["--eval", "--model", str(folder)])
    assert args.variant == "stepgrpo" and args.max_pixels == 400000 and g.PROMPT[args.variant] == "step"
    assert g.parse_args(["--eval", "--model", str(folder), "--variant", "grpo"]).variant == "grpo"
    assert g.parse_args(["--model", str(folder), "--data", "x"]).variant == "r1zero"  # training: as given


def test_a_checkpoint_is_saved_in_the_models_own_dtype(tmp_path):
    """A bf16 model folder (as Qwen's releases are) trains in fp32 and is saved in bf16: half the disk, what
    users expect; transformers loads it. The fp32 training state for --resume is unchanged (train_state/)."""
    import safetensors
    import transformers as tf

    folder = str(tmp_path / "bf16")
    tf.AutoModelForImageTextToText.from_pretrained(
        fixtures.model_dir(), dtype=torch.bfloat16
    ).save_pretrained(folder)
    tf.AutoProcessor.from_pretrained(fixtures.model_dir()).save_pretrained(folder)
    out = str(tmp_path / "o")
    g.main(
        tiny_flags(
            8, f"--model {folder} --max-steps 1 --max-new-tokens 4 --out {out} --log-completions-every 0"
        )
    )
    saved = os.path.join(out, "checkpoint")
    with safetensors.safe_open(os.path.join(saved, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.load(open(os.path.join(saved, "config.json")))["dtype"] == "bfloat16"
    loaded = tf.AutoModelForImageTextToText.from_pretrained(saved, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
