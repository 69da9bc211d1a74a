"""The real script end to end on the tiny model: single process, FSDP2 on 2 CPU ranks, frozen parts."""

import contextlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import data
import grpo_vl as g
import learning
import rewards as R
import tiny as fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd, timeout=300):
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def load_weights(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def start_weights():
    """The tiny model's weights before any training: its cached folder, as every run loads it."""
    return load_weights(fixtures.model_dir())


def tiny_flags(rows, flags):
    """tests/tiny.py's flags with a training set of `rows` synthetic rows, then `flags` (one string)."""
    return [*fixtures.flags(), "--data", fixtures.data_file(rows), *flags.split()]


def test_r1zero_two_steps_writes_metrics_trajectories_and_a_loadable_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    stdout = run(
        [
            sys.executable,
            "grpo_vl.py",
            *fixtures.flags(),
            "--variant",
            "r1zero",
            "--data",
            fixtures.data_file(64),
            "--max-steps",
            "2",
            "--out",
            out,
            "--log-completions-every",
            "1",
            "--length-bonus",
            "0.001",
            "--eval-every",
            "2",
            "--eval-data",
            fixtures.data_file(8, seed=1),
        ]
    )
    assert "step 2/2" in stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in [
        "reward",
        "reward_std",
        "frac_zero_std",
        "rewards/accuracy",
        "rewards/format",
        "rewards/length",
        "completion_len",
        "truncated_frac",
        "kl",
        "clip_frac",
        "reflection_rate",
        "lr",
        "step_time",
        "grad_norm",
    ]:
        assert key in rows[0], key
    r = rows[0]
    assert r["reward"] == pytest.approx(
        r["rewards/accuracy"] + r["rewards/format"] + r["rewards/length"]
    )  # G1
    assert r["rewards/length"] == pytest.approx(0.001 * r["completion_len"])  # R3
    assert r["kl"] == 0.0 and rows[1]["kl"] > 0  # pi_theta = pi_ref before the first update, not after
    assert rows[0]["lr"] == 1e-6 and rows[1]["lr"] == pytest.approx(0.5e-6)  # linear decay
    traj = [json.loads(x) for x in open(os.path.join(out, "trajectories", "step_000001.jsonl"))]
    assert len(traj) == 4 * 8 and traj[0]["completion"].startswith("<think>")
    report, start = (
        json.load(open(os.path.join(out, f"eval_step{s}.json"))) for s in (2, 0)
    )  # 0: start of RL
    assert report["n"] == start["n"] == 8 and set(report["per_task"]) == {
        "Count",
        "Relation",
        "Depth",
        "Distance",
    }
    assert 1 <= start["completion_len"] <= 96 and 1 <= report["completion_len"] <= 96
    assert "cvbench_combined" in report
    weights = load_weights(os.path.join(out, "checkpoint"))
    start = start_weights()
    assert all(weights[k].shape == v.shape for k, v in start.items())
    assert any(not torch.equal(weights[k], v) for k, v in start.items())  # it trained


def test_fsdp_two_ranks_match_one_process(learned_one, learned_two):
    """tests/learning.py's run (4 SFT steps, then 5 GRPO steps that really train) on 2 FSDP ranks equals it
    in one process, step by step, within float tolerance: same prompts, same completions (one generate()
    call per prompt, seeded with its index in the step, makes sampling rank-count independent), micro-batches
    of 3 that cut groups of 8."""
    one, two = metrics(learned_one), metrics(learned_two)
    assert [(m["phase"], m["step"]) for m in one] == [(m["phase"], m["step"]) for m in two] == learning.PHASES
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-9), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    rl = [(a, b) for a, b in zip(one, two) if a["phase"] == "rl"]
    assert rl[0][0]["kl"] == 0.0 == rl[0][1]["kl"]  # the reference was refreshed to the post-SFT weights
    for a, b in rl:  # the same completions, so the same rewards (float32 means)
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6), (a, b)
        assert a["frac_zero_std"] == b["frac_zero_std"], (a, b)
    w1, w2 = (load_weights(os.path.join(out, "checkpoint")) for out in (learned_one, learned_two))
    start = start_weights()
    for k in start:
        assert not torch.equal(w1[k], start[k]), f"{k} did not move"  # every parameter group was updated
        # Adam's step is lr*m/(sqrt(v)+eps): float-order noise in a near-zero gradient can move a weight by a
        # small fraction of lr (1e-3), so the tolerance is relative to lr; the gradient norms above are exact
        assert torch.allclose(w1[k], w2[k], atol=1e-4), (k, (w1[k] - w2[k]).abs().max())
    # and GRPO moved them by more than that, from the end of SFT (the same flags without --data)
    for out, launcher in ((learned_one, learning.ONE), (learned_two, learning.TWO)):
        learning.assert_learned(out, learning.sft_end(launcher), tol=1e-4)


def test_i8_each_completion_is_generated_scored_and_rewarded_with_its_own_prompt(tiny, monkeypatch, tmp_path):
    """One rank, 3 prompts with different images, G = 3, micro-batches of 2 that cut each group in two.
    Completion j is generated from prompt j // G (its prompt tokens and image rows in that prompt's rollout
    batch, whose "idx" names it j), scored under that prompt (every scoring forward, whose "idx" picks its
    advantage), and rewarded with that prompt's data row (I8). A reward that depends on the row alone is
    then constant within each group."""
    _, processor, _, _ = tiny
    G, rollouts, scored, rewarded = 3, [], [], []
    real_rollout, real_logprobs = g.rollout, g.token_logprobs

    def recording_rollout(model, exs, *rest, **kw):
        rollouts.append((exs, real_rollout(model, exs, *rest, **kw)))
        return rollouts[-1][1]

    def recording_logprobs(model, b, *rest):
        scored.append({k: b[k] for k in ("prompt", "completion", "idx")})
        return real_logprobs(model, b, *rest)

    def row_reward(text, ex, n_tokens=0):  # depends on the data row only
        rewarded.append((text, ex))
        return float(ex["row"])

    monkeypatch.setattr(g, "rollout", recording_rollout)
    monkeypatch.setattr(g, "token_logprobs", recording_logprobs)
    monkeypatch.setitem(R.REWARDS, "accuracy", row_reward)
    out = str(tmp_path / "i8")
    g.main(
        tiny_flags(
            16,
            f"--max-steps 1 --prompts-per-step 3 --num-generations {G} --micro-batch 2 --max-new-tokens 8 "
            f"--rewards accuracy --log-completions-every 0 --out {out}",
        )
    )
    ((exs, batches),) = rollouts  # one rollout for the rank's 3 prompts: one batch (one generate()) each
    assert [b["idx"].tolist() for b in batches] == [list(range(k * G, (k + 1) * G)) for k in range(3)]
    args = g.parse_args(fixtures.flags())
    alone = [data.encode(processor, [ex], g.PROMPT[args.variant], args.max_pixels) for ex in exs]
    assert len({ex["row"] for ex in exs}) == 3 and len({a["pixel_values"].shape for a in alone}) > 1
    completions = [b["completion"][i : i + 1] for b in batches for i in range(G)]  # completion j
    texts = [
        g.completion_text(t, args) for b in batches for t in processor.batch_decode(b["completion"], True)
    ]

    def assert_own_prompt(batch, i, j):  # sequence i of `batch` is completion j under prompt j // G
        prompt, own = batch["prompt"], alone[j // G]
        tokens = prompt["input_ids"][prompt["attention_mask"].bool()].tolist()
        assert len(prompt["input_ids"]) == 1, (i, j)  # one prompt, copied for each of its completions
        assert tokens == own["input_ids"][0].tolist(), (i, j)
        assert torch.equal(prompt["pixel_values"], own["pixel_values"]), (i, j)
        assert torch.equal(batch["completion"][i : i + 1], completions[j]), (i, j)
        assert batch["idx"][i].item() == j, (i, j)  # the advantage it gets: A[j]

    for j in range(3 * G):  # generated from
        assert_own_prompt(batches[j // G], j % G, j)
    assert sum(len(mb["completion"]) for mb in scored) == 2 * 3 * G  # reference, then policy forwards
    assert max(len(mb["completion"]) for mb in scored) == 2  # micro-batches of 2: each group cut in two
    j = 0
    for mb in scored:  # scored against
        for i in range(len(mb["completion"])):
            assert_own_prompt(mb, i, j % (3 * G))
            j += 1
    assert [ex["row"] for _, ex in rewarded] == [ex["row"] for ex in exs for _ in range(G)]  # rewarded with
    assert [t for t, _ in rewarded] == texts
    (m,) = metrics(out)
    assert m["frac_zero_std"] == 1.0 and m["reward"] == pytest.approx(sum(ex["row"] for ex in exs) / 3)


def test_a_policy_step_climbs_the_objective(monkeypatch, tmp_path):
    """The update ascends J (G5, G6): after one step, completions with A > 0 are likelier and those with
    A < 0 less likely than under pi_old, as seen in the second policy epoch (mu = 2). Every other test
    passes with the loss's sign flipped. A reward of the text's length varies in every group."""
    seen, real = [], g.grpo_loss

    def recording_objective(logp, old, *rest):
        seen.append((logp.detach(), old, rest[1], rest[2]))  # log pi, log pi_old, A, mask
        return real(logp, old, *rest)

    def text_length(text, ex, n_tokens=0):
        return float(len(text))

    monkeypatch.setattr(g, "grpo_loss", recording_objective)
    monkeypatch.setitem(R.REWARDS, "accuracy", text_length)
    g.main(
        tiny_flags(
            16,
            "--max-steps 1 --rewards accuracy --mu 2 --beta 0 --lr 1e-3 --max-new-tokens 16 "
            f"--log-completions-every 0 --out {tmp_path}",
        )
    )
    second = seen[len(seen) // 2 :]  # the micro-batches of epoch 2, after one optimizer step
    # sum_i A_i * mean_t log(pi / pi_old): how far the step moved the sequence-mean surrogate (G6) upwards
    gain = sum((A * ((logp - old) * mask).sum(1) / mask.sum(1)).sum().item() for logp, old, A, mask in second)
    assert all((A != 0).any() for _, _, A, _ in second) and gain > 0, gain


def test_fsdp_rollouts_gather_once_and_match_unsharded():
    out = run([*learning.TWO, "tests/fsdp_worker.py"], timeout=120)
    assert "rank 0: generated 3 tokens" in out and "rank 1: generated 40 tokens" in out


def test_under_torchrun_only_rank_0_reads_the_weights():
    """Issue 20: the policy and the reference are built empty and filled from rank 0's one read, so no other
    rank ever holds the full model (tests/README.md, "Host memory at load", has the measured figures)."""
    out = run([*learning.TWO, "tests/load_memory_worker.py"], timeout=120)
    assert "rank 0: P = " in out and "rank 1: P = " in out, out
    assert "rank 0: P = 1.5M, read the weights 1 time(s)" in out, out
    assert "rank 1: P = 1.5M, read the weights 0 time(s)" in out, out


@pytest.mark.parametrize("part", ["vision", "llm"])
def test_freeze_really_freezes(tmp_path, part):
    out = str(tmp_path / part)
    g.main(
        tiny_flags(
            16,
            f"--max-steps 1 --length-bonus 0.01 --lr 1e-2 --freeze {part} --out {out} "
            "--log-completions-every 0 --max-new-tokens 16",
        )
    )
    weights, start = load_weights(os.path.join(out, "checkpoint")), start_weights()
    frozen = (
        [k for k in start if k.startswith("model.visual")]
        if part == "vision"
        else [k for k in start if not k.startswith("model.visual")]
    )
    assert frozen and all(torch.equal(weights[k], start[k]) for k in frozen)
    assert any(not torch.equal(weights[k], start[k]) for k in start if k not in frozen)


@pytest.mark.parametrize(
    "flags,eps,check",
    [
        ("--mu 2", 0.05, lambda m: m["clip_frac"] > 0),  # 2nd epoch: rho != 1, clipped (eps patched)
        ("--beta 0", g.EPS, lambda m: m["kl"] == 0.0),  # no reference model at all
    ],
)
def test_policy_epochs_and_no_reference(tmp_path, monkeypatch, flags, eps, check):
    monkeypatch.setattr(g, "EPS", eps)  # --eps is gone: the constant grpo_loss reads
    out = str(tmp_path / "run")
    g.main(
        tiny_flags(
            16,
            f"--max-steps 1 --length-bonus 0.01 --lr 1e-2 --out {out} --log-completions-every 0 "
            f"--max-new-tokens 16 {flags}",
        )
    )
    (m,) = metrics(out)
    assert check(m), m


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--variant", "nope"], "argument --variant: invalid choice: 'nope'"),
        (["--rewards", "accuracy,vibes"], "--rewards: no reward 'vibes' (choose from accuracy"),
        (["--num-generations", "1"], "at least 2"),
        (["--freeze", "everything"], "argument --freeze: invalid choice: 'everything'"),
        (["--data", ""], "needs --data (its RL rows), or --sft-data with --sft-epochs"),
        (["--sft-epochs", "1"], "--sft-epochs needs --sft-data"),
    ],
)
def test_bad_flags_exit_2_with_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        g.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_readme_flags_table_matches_the_dataclass():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import readme_links

    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
    flags = readme.index("## Flags")
    shown = [line for line in readme[flags:] if line.startswith("| `--")]
    assert shown == readme_links.flag_rows(), "README's flags table is out of date: run tests/readme_links.py"


def test_readme_links_point_at_the_lines_that_implement_them():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import readme_links

    readme = open(os.path.join(ROOT, "README.md")).read()
    links = readme_links.LINK.findall(readme)
    assert {label for label, _, _ in links} == set(
        readme_links.ANCHORS
    )  # every equation, detail, reward, prompt
    for label, name, n in links:
        line = open(os.path.join(ROOT, name)).read().splitlines()[int(n) - 1]
        assert label in line, f"README's {label} link ({name}#L{n}) is stale: run tests/readme_links.py"
    assert readme_links.relink(readme) == readme


def test_evaluation_counts_completion_length_as_g9_does(tiny, examples, tmp_path):
    """Greedy completions stubbed: one stops at its EOS (3 tokens + EOS = 4), one runs to the cap (6)."""
    model, processor, eos, banned = tiny
    args = g.parse_args([*fixtures.flags(), "--eval-max-new-tokens", "6", "--out", str(tmp_path)])
    a, pad = processor.tokenizer("a", add_special_tokens=False)["input_ids"][0], eos[0]

    class Stub(torch.nn.Module):
        def generate(self, input_ids, **kw):
            assert kw["do_sample"] is False and kw["max_new_tokens"] == 6  # greedy, at the evaluation cap
            tails = torch.tensor([[a, a, a, pad, pad, pad], [a] * 6])
            return torch.cat([input_ids, tails[: len(input_ids)]], 1)

    run = SimpleNamespace(
        model=Stub(), processor=processor, eos=eos, banned=banned, device=torch.device("cpu"), rank=0, world=1
    )
    run.amp = contextlib.nullcontext()
    report = g.run_eval(examples[:2], args, run, "eval_g9")
    assert report["n"] == 2 and report["completion_len"] == (4 + 6) / 2 and report["format"] == 0.0
    assert json.load(open(tmp_path / "eval_g9.json")) == report  # written by rank 0


def test_demo_prints_the_before_after_table_from_its_evaluations(tmp_path):
    """./run.sh demo's script, --quick and cut to 2 SFT and 2 GRPO steps: the table shows the two
    evaluations' numbers."""
    out = str(tmp_path / "demo")
    stdout = run(
        [
            sys.executable,
            "tests/demo.py",
            "--quick",
            *("--sft-data", fixtures.data_file(16), "--sft-epochs", "1", "--sft-batch", "8"),  # 2 SFT steps
            *("--max-steps", "2", "--prompts-per-step", "2"),
            *("--eval-data", fixtures.data_file(8, seed=1, tasks=("Color",)), "--out", out),
        ]
    )
    before, after = (json.load(open(os.path.join(out, f"eval_step{s}.json"))) for s in (0, 2))
    assert "sft 2/2" in stdout and "step 2/2" in stdout and "held-out" in stdout and "(n = 8)" in stdout
    assert (
        f"| start of GRPO (after the SFT warm-up) | {before['accuracy']:.3f} | {before['format']:.3f} | "
        f"{before['completion_len']:.1f} |"
    ) in stdout
    assert f"| after 2 GRPO steps | {after['accuracy']:.3f} | {after['format']:.3f} |" in stdout


def test_readme_demo_command_is_the_demo_recipe(monkeypatch):
    """The README shows the demo as one grpo_vl.py command: it must be what tests/demo.py runs by default
    (seed 0, into runs/demo-0, the fixture folders it writes there)."""
    import demo

    # the paths demo.recipe's fixtures would have, without writing them
    monkeypatch.setattr(demo.tiny, "write", lambda folder, seed=0, **kw: folder)
    monkeypatch.setattr(demo.shapes, "write", lambda folder, *a, **kw: os.path.join(folder, "rows.jsonl"))
    monkeypatch.setattr(g.os.path, "isdir", lambda path: path == "runs/demo-0/model" or os.path.isdir(path))
    recipe = demo.recipe("runs/demo-0", 0, quick=False)
    readme = open(os.path.join(ROOT, "README.md")).read()
    demo_section = readme.split("## The demo", 1)[1]
    block = demo_section.split("python grpo_vl.py ", 1)[1].split("```", 1)[0]
    shown = block.replace("\\\n", " ").split()
    steps = g.parse_args(recipe).max_steps
    assert g.parse_args(shown) == g.parse_args(recipe + ["--eval-every", str(steps)])


def test_a_run_whose_groups_stay_flat_says_why_once(tmp_path, capsys):
    """A random model never earns R1 or R2: every group's rewards are equal, every advantage 0. After 10 such
    steps in a row the run says so, once, with the cause and the flag that helps."""
    flags = "--max-new-tokens 4 --prompts-per-step 2 --num-generations 2 --max-steps 12 --beta 0"
    g.main(tiny_flags(16, f"{flags} --out {tmp_path / 'flat'}"))
    out = capsys.readouterr().out
    steps = [json.loads(line) for line in open(tmp_path / "flat" / "metrics.jsonl")]
    assert [s["frac_zero_std"] for s in steps] == [1.0] * 12
    assert out.count("10 steps without a reward that differs") == 1 and "--sft-data, --sft-epochs" in out
    assert out.index("step 10/12") < out.index("10 steps without a reward") < out.index("step 11/12")
