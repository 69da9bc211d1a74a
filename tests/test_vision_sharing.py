"""shared_vision: each distinct image through the vision tower once per forward, not once per completion.
With it and without it (grpo_vl.shared_vision patched to do nothing) the completions, the log-probs and the
gradients agree; the tower sees each prompt's image once per pass, not G times. One process here, 2 FSDP
ranks in vision_sharing_worker.py."""

import contextlib
import copy
import json
import os
import subprocess
import sys

import pytest
import tiny
import torch

import grpo_vl as g
import rewards as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CPU = torch.device("cpu")
G = 4
BETA = 0.04  # the KL term's weight in the loss below (the reference differs from the policy: KL > 0)


def load(name, *more):
    """(args, run): the tiny model ('tiny' or 'tiny-2.5') as grpo_vl.load_models loads it in one process,
    unsharded, without a reference (beta 0), G completions per prompt."""
    args = g.parse_args(
        tiny.flags() + ["--model", tiny.model_dir(name), "--beta", "0", "--num-generations", str(G), *more]
    )
    return args, g.load_models(args, 0, 1, CPU, None)


def no_sharing(batch, *models):
    """shared_vision turned off: every sequence's copy of its image goes through the vision tower."""
    return contextlib.nullcontext()


@contextlib.contextmanager
def vision_sharing(on):
    """grpo_vl as it is (on), or with grpo_vl.shared_vision replaced by no_sharing (off)."""
    real = g.shared_vision
    if not on:
        g.shared_vision = no_sharing
    try:
        yield
    finally:
        g.shared_vision = real


def count_images(*models, seen=None):
    """A list that grows by the number of images of every call to the models' vision towers."""
    seen = [] if seen is None else seen
    for model in models:
        model.model.visual.register_forward_hook(
            lambda module, a, kw, out: seen.append(len(kw["grid_thw"])), with_kwargs=True
        )
    return seen


def perturbed(model, seed=1):
    """A copy with every weight moved a little: a reference model that differs from the policy (KL > 0)."""
    ref = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def scored_step(model, ref, b, banned, device):
    """The reference log-probs, the policy log-probs and the gradients of one GRPO loss (G3-G6) on batch b,
    each forward inside g.shared_vision as grpo_step runs it. Gradients are returned as local tensors."""
    mask = b["mask"].to(device)
    with torch.no_grad(), g.shared_vision(b, ref):
        ref_lp = g.token_logprobs(ref, b, 1.0, banned, device)
    model.zero_grad(set_to_none=True)
    with g.shared_vision(b, model):
        logp = g.token_logprobs(model, b, 1.0, banned, device)
    A = torch.linspace(-1.5, 1.5, len(mask), device=device)  # advantages of both signs, none zero
    loss, _, _ = g.grpo_loss(logp, logp.detach(), ref_lp, A, mask, BETA, len(mask))
    loss.backward()
    grads = {n: getattr(p.grad, "_local_tensor", p.grad).clone() for n, p in model.named_parameters()}
    return ref_lp, logp.detach(), grads


def assert_same_step(with_sharing, without, mask):
    """Log-probs and gradients equal within fp32 tolerance; the vision tower's gradients are not zero."""
    (ref_a, lp_a, grads_a), (ref_b, lp_b, grads_b) = with_sharing, without
    m = mask.bool()
    assert torch.allclose(ref_a[m], ref_b[m], atol=1e-5), (ref_a[m] - ref_b[m]).abs().max()
    assert torch.allclose(lp_a[m], lp_b[m], atol=1e-5), (lp_a[m] - lp_b[m]).abs().max()
    assert grads_a.keys() == grads_b.keys()
    for k in grads_b:
        assert torch.allclose(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-7), (
            k,
            (grads_a[k] - grads_b[k]).abs().max(),
        )
    vision = [k for k in grads_b if ".visual." in k]  # so the vision tower's equality is not 0 == 0
    assert len(vision) > 10 and sum(grads_b[k].abs().sum() for k in vision) > 1e-3


def one_batch(processor, exs, args, batches):
    """The rollout's per-prompt batches as one batch of the prompts' G copies each (several distinct images
    in one forward, two of them the same size), the completions and masks padded to the longest."""
    b = g.take(g.encode(processor, exs, args), torch.arange(len(exs)).repeat_interleave(G))
    C = max(x["completion"].shape[1] for x in batches)
    pad = processor.tokenizer.pad_token_id
    b["completion"] = torch.cat(
        [
            torch.nn.functional.pad(x["completion"], (0, C - x["completion"].shape[1]), value=pad)
            for x in batches
        ]
    )
    b["mask"] = torch.cat([torch.nn.functional.pad(x["mask"], (0, C - x["mask"].shape[1])) for x in batches])
    return b


@pytest.mark.parametrize("name", ["tiny", "tiny-2.5"])
def test_sharing_changes_no_completion_log_prob_or_gradient(name, examples, monkeypatch):
    """Three prompts, two of them with images of the same size (a wrong image would fit their slots), G = 4:
    greedy rollouts identical, and on one batch of all three prompts the reference and policy log-probs
    and every gradient of a GRPO loss equal."""
    args, run = load(name, "--max-new-tokens", "12")
    model, processor = run.model, run.processor
    monkeypatch.setattr(model.generation_config, "do_sample", False)  # greedy: rollouts comparable
    ref = perturbed(model)
    seen = count_images(model)
    exs = [examples[0], examples[1], examples[3]]
    assert g.encode(processor, exs, args)["image_grid_thw"].tolist()[:2] == [[1, 6, 8]] * 2
    rollouts = []
    for on in (True, False):
        with vision_sharing(on):
            rollouts.append(g.rollout(model, exs, args, run, seed=0))
    assert len(rollouts[0]) == len(rollouts[1]) == 3
    for a, b in zip(*rollouts):
        assert torch.equal(a["completion"], b["completion"])
    b = one_batch(processor, exs, args, rollouts[0])
    assert b["mask"].sum() > 3 * G * 4  # the completions have some length
    steps = []
    for on in (True, False):
        with vision_sharing(on):
            steps.append(scored_step(model, ref, b, run.banned, CPU))
    assert_same_step(*steps, b["mask"])
    # each prompt's prefill (one image, or G copies of it), then the policy's forward of all three prompts
    # (the reference has no hook): each image once, or G times
    assert seen == [1, 1, 1, G, G, G, 3, 3 * G], seen


def test_the_vision_tower_sees_each_distinct_image_once_per_pass(tmp_path, monkeypatch):
    """One real GRPO step (4 prompts, G = 4, mu = 2, micro-batches of 3, so each group is cut in 3 + 1): the
    tower encodes each prompt's image once in its rollout and once per micro-batch in each reference, old
    and policy forward, where the plain path encodes every copy; the step's numbers are the same either
    way, and they are not those of a step that learned nothing (a reward of the text's length varies in every
    group, lr 1e-3)."""
    load_models, seen = g.load_models, []

    def load_and_count(*a):  # policy and reference (a deep copy made inside) both counted
        run = load_models(*a)
        count_images(*[m for m in (run.model, run.ref) if m is not None], seen=seen[-1])
        return run

    def text_length(text, ex, n_tokens=0):
        return float(len(text))

    monkeypatch.setattr(g, "load_models", load_and_count)
    monkeypatch.setitem(R.REWARDS, "accuracy", text_length)
    rows, completions = [], []
    for on in (True, False):
        out = str(tmp_path / str(on))
        argv = ["--data", tiny.data_file(16), "--max-steps", "1", "--prompts-per-step", "4"]
        argv += ["--num-generations", str(G), "--mu", "2", "--micro-batch", "3", "--max-new-tokens", "8"]
        argv += ["--rewards", "accuracy", "--lr", "1e-3", "--log-completions-every", "1", "--out", out]
        seen.append([])
        with vision_sharing(on):
            g.main(tiny.flags() + argv)
        rows.append(json.loads(open(os.path.join(out, "metrics.jsonl")).read()))
        trajectories = open(os.path.join(out, "trajectories", "step_000001.jsonl")).readlines()
        completions.append([json.loads(line)["completion"] for line in trajectories])
    # 4 rollouts (one per prompt); per micro-batch (3 + 1 copies of a prompt) the reference and old (mu = 2)
    # forwards; then 2 epochs x the 8 micro-batches
    assert seen[0] == [1] * 4 + [1] * 16 + [1] * 16, seen[0]
    assert seen[1] == [G] * 4 + [3, 3, 1, 1] * 4 + [3, 1] * 8, seen[1]
    shared, plain = rows
    assert len(completions[0]) == 4 * G and completions[0] == completions[1]
    assert shared["reward"] == plain["reward"] and shared["completion_len"] == plain["completion_len"]
    assert shared["grad_norm"] > 0 and shared["kl"] > 0  # the step learned: its numbers can differ
    for k in ("kl", "loss", "grad_norm"):
        assert shared[k] == pytest.approx(plain[k], rel=1e-4, abs=1e-9), k
    assert shared["clip_frac"] == plain["clip_frac"]


def test_two_fsdp_ranks():
    """tiny and tiny-2.5 sharded over 2 ranks: completions, log-probs and gradient shards equal."""
    tiny.model_dir("tiny-2.5"), tiny.data_file(16)  # written here, not raced for by the two ranks
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "tests/vision_sharing_worker.py",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    for rank in (0, 1):
        for name in ("tiny", "tiny-2.5"):
            assert f"rank {rank} {name}: equal" in p.stdout, p.stdout
