"""What a GPU run does differently, exercised on CPU: gradient checkpointing, bf16 compute over fp32 master
weights, the reference resharded after its forwards; and the memory arithmetic of tests/README.md, checked."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import tiny as fixtures
from memory import MODELS, QWEN2_VL_2B, QWEN25_VL_7B, per_gpu_gb
import torch
import transformers as tf

import data
import grpo_vl as g
import rewards as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
]  # a free port
CPU = torch.device("cpu")


def run(cmd, timeout=300):
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout


def load(*flags):
    """(args, run): grpo_vl.load_models of the tiny model in one CPU process, as conftest.tiny_run (beta 0,
    unless flags say otherwise), with the parsed flags too."""
    args = g.parse_args(fixtures.flags() + ["--beta", "0", *flags])
    return args, g.load_models(args, 0, 1, CPU, None)


def scoring_gradients(examples, checkpointing):
    """Gradients of one scoring forward + backward of the tiny model as load_models leaves it (with
    --gradient-checkpointing or without), and how often decoder layer 0 ran."""
    _, r = load("--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing")
    model = r.model
    assert model.training and model.is_activation_checkpointing == checkpointing
    b = g.sft_batch(r.processor, examples[:3], g.parse_args(fixtures.flags()))
    calls = []
    model.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    logp = g.token_logprobs(model, b, 1.0, r.banned, CPU)
    (-(logp * b["mask"]).sum()).backward()
    return {n: p.grad for n, p in model.named_parameters()}, len(calls)


def test_gradient_checkpointing_gives_the_same_gradients(examples):
    plain, plain_calls = scoring_gradients(examples, checkpointing=False)
    checkpointed, calls = scoring_gradients(examples, checkpointing=True)
    assert (plain_calls, calls) == (1, 2)  # the layer really ran again in the backward
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(checkpointed[name], grad, rtol=1e-5, atol=1e-7), name


def test_fsdp_checkpointed_gradients_and_reference_resharding():
    """2 ranks: the same with FSDP2; and no reference parameter stays gathered after a no-grad forward."""
    fixtures.data_file(4)  # written here, not raced for by the two ranks
    out = run([*TORCHRUN, "tests/fsdp_memory_worker.py"], timeout=180)
    assert "rank 0: checkpointed gradients equal, reference resharded" in out
    assert "rank 1: checkpointed gradients equal, reference resharded" in out


def test_generation_is_unchanged_by_gradient_checkpointing(examples):
    """generate() runs in eval mode: in training mode checkpointing would turn the KV cache off."""
    completions = []
    for checkpointing in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        args, r = load(checkpointing, "--max-new-tokens", "12")
        assert r.model.is_activation_checkpointing == (checkpointing == "--gradient-checkpointing")
        batches = g.rollout(r.model, examples[:2], args, r, seed=3)
        assert r.model.training  # restored after generate
        completions.append([b["completion"] for b in batches])
    assert len(completions[0]) == 2 and all(c.shape == (8, 12) for c in completions[0])  # G 8, 12 tokens
    for a, b in zip(*completions):
        assert torch.equal(a, b)


def test_bf16_logprobs_agree_with_fp32(tiny, examples):
    """The tolerance: 0.01 nats per token on the tiny random model (measured: max 0.0017, mean 0.0004)."""
    model, processor, eos, banned = tiny
    b = g.sft_batch(processor, examples[:4], g.parse_args(fixtures.flags()))
    with torch.no_grad():
        fp32 = g.token_logprobs(model, b, 1.0, banned, CPU)
        with torch.autocast("cpu", torch.bfloat16):
            bf16 = g.token_logprobs(model, b, 1.0, banned, CPU)
    diff = (fp32 - bf16).abs()[b["mask"].bool()]
    assert bf16.dtype == torch.float32  # log-softmax in fp32 whatever the compute dtype
    assert 0 < diff.max() < 0.01, diff.max()  # > 0: the forward really ran in bf16


@pytest.mark.parametrize("ranks", [1, 2])
def test_bf16_run_trains_with_fp32_master_weights(tmp_path, ranks):
    out = str(tmp_path / "bf16")
    flags = ["grpo_vl.py", *fixtures.flags(), "--data", fixtures.data_file(32), "--precision", "bf16"]
    flags += ["--max-steps", "3", "--length-bonus", "0.01", "--lr", "1e-3", "--max-new-tokens", "32"]
    run([*TORCHRUN, *flags, "--out", out] if ranks == 2 else [sys.executable, *flags, "--out", out])
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(steps) == 3
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["kl"]) and s["grad_norm"] > 0 for s in steps)
    assert steps[-1]["kl"] > 0  # the policy moved away from the reference
    weights = tf.AutoModelForImageTextToText.from_pretrained(os.path.join(out, "checkpoint")).state_dict()
    start = tf.AutoModelForImageTextToText.from_pretrained(fixtures.model_dir()).state_dict()
    assert all(weights[k].dtype == torch.float32 for k in start)  # master weights stay fp32
    moved = max((weights[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4, moved


# ---------------------------------------------------------------------- the arithmetic of tests/README.md
RUNS = {  # row -> (model, sequences per rank at once: G in a rollout, new tokens, micro-batch, generates)
    "r1zero, grpo: RL": ("Qwen2-VL-2B", 8, 700, 8, True),
    "stepgrpo: warm-up SFT": ("Qwen2-VL-2B", 128 // 4, 1024, 8, False),
    "stepgrpo: RL": ("Qwen2-VL-2B", 4, 1024, 8, True),
    "vision-r1: cold-start SFT": ("Qwen2.5-VL-7B", 32 // 4, 4096, 2, False),
    "vision-r1: PTST stage 1": ("Qwen2.5-VL-7B", 16, 4096, 2, True),
    "vision-r1: PTST stage 2": ("Qwen2.5-VL-7B", 8, 8192, 2, True),
    "vision-r1: PTST stage 3 (optional)": ("Qwen2.5-VL-7B", 4, 16384, 2, True),
}


@pytest.mark.parametrize("name,config", [("Qwen2-VL-2B", QWEN2_VL_2B), ("Qwen2.5-VL-7B", QWEN25_VL_7B)])
def test_parameter_counts_of_the_real_architectures(name, config):
    cls = (
        tf.Qwen2VLForConditionalGeneration if name == "Qwen2-VL-2B" else tf.Qwen2_5_VLForConditionalGeneration
    )
    with torch.device("meta"):  # the real shapes, no memory
        model = cls(config)
    assert sum(p.numel() for p in model.parameters()) == MODELS[name]["params"]
    readme = open(os.path.join(ROOT, "tests", "README.md")).read()  # the memory section
    assert f"{name} ({MODELS[name]['params'] / 1e9:.2f} B parameters" in readme


def test_readme_memory_table_is_the_arithmetic_and_every_run_fits_80_gb():
    readme = open(os.path.join(ROOT, "tests", "README.md")).read()  # the memory section
    for name, (model, sequences, tokens, micro, generates) in RUNS.items():
        gb = per_gpu_gb(model, sequences, tokens, micro, generates)
        without = per_gpu_gb(model, sequences, tokens, micro, generates, checkpointing=False)
        row = f"| {name} | {model} | {sequences} | {tokens:,} | {micro} | {gb:.1f} GB | {without:.1f} GB |"
        assert row in readme, f"tests/README.md memory table is out of date; expected:\n{row}"
        assert gb < 80, name
    # the variant defaults the table assumes
    assert re.search(
        r'"vision-r1": dict\((.|\n)*?micro_batch=2', open(os.path.join(ROOT, "grpo_vl.py")).read()
    )
    assert g.parse_args(["--variant", "vision-r1", "--data", "x", "--sft-data", "y"]).micro_batch == 2
    assert g.parse_args(["--variant", "r1zero"]).micro_batch == 8
    step = g.parse_args(["--variant", "stepgrpo", "--data", "x", "--sft-data", "y"])
    assert (step.prompts_per_step, step.sft_batch, step.micro_batch, step.num_generations) == (4, 128, 8, 4)


def test_the_precision_and_checkpointing_flags_reach_the_model():
    """--precision bf16 turns bf16 autocast on (on CPU too), auto leaves CPU in fp32; --gradient-checkpointing
    is switched on by load_models itself (the tests above check it on the models they score)."""
    _, on = load("--precision", "bf16", "--gradient-checkpointing", "--beta", "0.04")
    with on.amp:
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert on.model.is_activation_checkpointing and on.model.training and not on.ref.training
    assert all(p.dtype == torch.float32 for p in on.model.parameters())  # fp32 master weights
    _, off = load()
    with off.amp:
        assert not torch.is_autocast_enabled("cpu")
    assert not off.model.is_activation_checkpointing and off.ref is None  # beta 0: no reference


@pytest.mark.parametrize("micro", [1, 3])
def test_rollouts_give_each_micro_batch_its_own_completions_advantages(
    examples, monkeypatch, tmp_path, micro
):
    """One generate() call per prompt (the KV cache of one group at a time): batch k holds prompt k encoded
    once and its G completions, and its "idx", their places k*G..(k+1)*G-1 among the rank's completions, is
    where grpo_step reads each micro-batch's advantages (A[mb["idx"]], I8). An idx counted from 0 in every
    batch would give every prompt's completions the first group's advantages. A micro-batch is a slice of
    one prompt's completions, never two prompts' (micro-batches of 1 cut every group; of 3 > G, one each)."""
    P, G = 3, 2
    flags = ["--num-generations", str(G), "--max-new-tokens", "6"]
    args, r = load(*flags)
    batches = g.rollout(r.model, examples[:P], args, r, seed=0)
    style = g.PROMPT[args.variant]
    own = [
        data.encode(r.processor, [ex], style, args.max_pixels)["input_ids"][0].tolist() for ex in examples[:P]
    ]
    assert len(batches) == P and len(set(map(tuple, own))) == P  # P calls; P different prompts
    assert torch.equal(torch.cat([b["idx"] for b in batches]), torch.arange(P * G))
    for k, b in enumerate(batches):
        assert b["idx"].tolist() == list(range(k * G, (k + 1) * G)), (k, b["idx"])
        assert b["prompt"]["input_ids"].tolist() == [own[k]]  # the prompt once, (1, L)
        assert b["completion"].shape[0] == len(b["mask"]) == len(b["truncated"]) == G

    # main: rewards that make each group's advantages different
    rewards = iter([0.0, 1.0, 1.0, 0.0, 2.0, 2.0])  # A = -a, a, a, -a, 0, 0 (a = 1/sqrt(2))
    advantages, given, scored = [], [], []
    real_advantages, real_loss, real_logprobs = g.group_advantages, g.grpo_loss, g.token_logprobs

    def next_reward(text, ex, n_tokens=0):
        return next(rewards)

    def recording_advantages(r, G):
        advantages.append(real_advantages(r, G))
        return advantages[-1]

    def recording_loss(logp, old, ref, A, *rest):
        given.append(A)
        return real_loss(logp, old, ref, A, *rest)

    def recording_logprobs(model, b, *rest):
        if any(p.requires_grad for p in model.parameters()):  # the policy's forwards, not the reference's
            scored.append((b["prompt"]["input_ids"].tolist(), b["idx"].tolist(), len(b["completion"])))
        return real_logprobs(model, b, *rest)

    monkeypatch.setitem(R.REWARDS, "accuracy", next_reward)
    monkeypatch.setattr(g, "group_advantages", recording_advantages)
    monkeypatch.setattr(g, "grpo_loss", recording_loss)
    monkeypatch.setattr(g, "token_logprobs", recording_logprobs)
    more = ["--data", fixtures.data_file(16), "--max-steps", "1", "--prompts-per-step", str(P)]
    more += ["--micro-batch", str(micro), "--rewards", "accuracy", "--log-completions-every", "1"]
    g.main(fixtures.flags() + flags + more + ["--out", str(tmp_path / "idx")])
    ((A, _),) = advantages
    a = 2**-0.5
    assert torch.allclose(A, torch.tensor([-a, a, a, -a, 0, 0]), atol=1e-3), A
    sizes = [1] * P * G if micro == 1 else [G] * P  # micro-batch i: completions i*micro.. of one prompt
    assert [len(A_mb) for A_mb in given] == sizes and torch.equal(torch.cat(given), A)
    # each micro-batch scores one prompt (one sequence, repeated for its completions); its completions are
    # that prompt's group; different groups, different prompts
    assert [(len(idx), n) for _, idx, n in scored] == [(s, s) for s in sizes]
    prompt_of = {}
    for prompt, idx, _ in scored:
        assert len(prompt) == 1 and len({i // G for i in idx}) == 1, (len(prompt), idx)
        assert prompt_of.setdefault(idx[0] // G, prompt) == prompt
    assert len(prompt_of) == P and len({str(p) for p in prompt_of.values()}) == P
