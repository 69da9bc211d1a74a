"""shared_vision: a prompt's images through the vision tower once per forward, not once per completion.
A batch is one prompt and its completions; with sharing and without it (grpo_vl.shared_vision patched to do
nothing) the completions, the log-probs and the gradients agree, for a prompt of one image and a prompt of
two; the tower sees each prompt's images once per pass, not once per copy. One process here, 2 FSDP ranks in
vision_sharing_worker.py."""

import contextlib
import copy
import json
import os
import subprocess
import sys

import pytest
import tiny
import torch

import data
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


def no_sharing(n, *models):
    """shared_vision turned off: every copy of the prompt's images goes through the vision tower."""
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


def two_images(ex, other):
    """ex asked about two images: its own, then other's (the instruct prompt places one slot per image)."""
    return {**ex, "images": ex["images"] + other["images"]}


def scored_step(model, ref, batches, banned, device):
    """The reference log-probs, the policy log-probs (one tensor per batch) and the gradients of one GRPO
    loss (G3-G6) over the one-prompt batches, each forward inside g.shared_vision as grpo_step runs it, the
    gradients accumulated over the batches. Gradients are returned as local tensors."""
    model.zero_grad(set_to_none=True)
    n = sum(len(b["completion"]) for b in batches)
    ref_lps, lps = [], []
    for k, b in enumerate(batches):
        mask = b["mask"].to(device)
        with torch.no_grad(), g.shared_vision(len(mask), ref):
            ref_lps.append(g.token_logprobs(ref, b, 1.0, banned, device))
        with g.shared_vision(len(mask), model):
            logp = g.token_logprobs(model, b, 1.0, banned, device)
        A = torch.linspace(-1.5, 1.5, len(mask), device=device) + 0.5 * k  # both signs, none zero
        loss, _, _ = g.grpo_loss(logp, logp.detach(), ref_lps[-1], A, mask, BETA, n)
        loss.backward()
        lps.append(logp.detach())
    grads = {k: getattr(p.grad, "_local_tensor", p.grad).clone() for k, p in model.named_parameters()}
    return ref_lps, lps, grads


def assert_same_step(with_sharing, without, masks):
    """Log-probs and gradients equal within fp32 tolerance; the vision tower's gradients are not zero."""
    (ref_a, lp_a, grads_a), (ref_b, lp_b, grads_b) = with_sharing, without
    assert len(ref_a) == len(ref_b) == len(lp_a) == len(lp_b) == len(masks)
    for k, mask in enumerate(masks):
        m = mask.bool()
        assert torch.allclose(ref_a[k][m], ref_b[k][m], atol=1e-5), (
            k,
            (ref_a[k][m] - ref_b[k][m]).abs().max(),
        )
        assert torch.allclose(lp_a[k][m], lp_b[k][m], atol=1e-5), (k, (lp_a[k][m] - lp_b[k][m]).abs().max())
    assert grads_a.keys() == grads_b.keys()
    for k in grads_b:
        assert torch.allclose(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-7), (
            k,
            (grads_a[k] - grads_b[k]).abs().max(),
        )
    vision = [k for k in grads_b if ".visual." in k]  # so the vision tower's equality is not 0 == 0
    assert len(vision) > 10 and sum(grads_b[k].abs().sum() for k in vision) > 1e-3


def rollouts_and_steps_agree(model, ref, exs, args, run, device):
    """Greedy rollouts of `exs` with vision sharing and without are the same, and so are the two GRPO steps
    scored on them (log-probs and gradients). Returns the rollout batches."""
    rollouts = []
    for on in (True, False):
        with vision_sharing(on):
            rollouts.append(g.rollout(model, exs, args, run, seed=0))
    assert len(rollouts[0]) == len(rollouts[1]) == len(exs)
    for a, b in zip(*rollouts):
        assert torch.equal(a["completion"], b["completion"]), (a["completion"], b["completion"])
    steps = []
    for on in (True, False):
        with vision_sharing(on):
            steps.append(scored_step(model, ref, rollouts[0], run.banned, device))
    assert_same_step(*steps, [b["mask"] for b in rollouts[0]])
    return rollouts[0]


@pytest.mark.parametrize("name", ["tiny", "tiny-2.5"])
def test_sharing_changes_no_completion_log_prob_or_gradient(name, examples, monkeypatch):
    """Two prompts under the instruct prompt (P2: one image slot per image), G = 4: one of one image, one of
    two different images of the same size (either's encoding would fit the other's slots). Greedy rollouts
    identical, and the reference and policy log-probs of each prompt's batch and every gradient of a GRPO
    loss over both batches equal."""
    args, run = load(name, "--variant", "grpo", "--max-new-tokens", "12")
    model, processor = run.model, run.processor
    monkeypatch.setattr(model.generation_config, "do_sample", False)  # greedy: rollouts comparable
    ref = perturbed(model)
    seen = count_images(model)
    exs = [examples[3], two_images(examples[0], examples[1])]
    pair = data.encode(processor, exs[1:], g.PROMPT[args.variant], args.max_pixels)
    assert pair["image_grid_thw"].tolist() == [[1, 6, 8]] * 2
    assert not torch.equal(*pair["pixel_values"].chunk(2))  # two different images
    batches = rollouts_and_steps_agree(model, ref, exs, args, run, CPU)
    assert [len(b["prompt"]["image_grid_thw"]) for b in batches] == [1, 2]  # each prompt encoded once
    assert all(b["mask"].sum() > G * 4 for b in batches)  # the completions have some length
    # each prompt's prefill (its 1 or 2 images, or G copies of them), then the policy's forward of each
    # prompt's batch (the reference has no hook): the prompt's images once, or G times
    assert seen == [1, 2, G, 2 * G, 1, 2, G, 2 * G], seen


def two_image_rows(folder):
    """The 16-row synthetic data set with each row asked about two images (its own, then the next row's)."""
    rows = [json.loads(line) for line in open(tiny.data_file(16))]
    images = [os.path.join(os.path.dirname(tiny.data_file(16)), row.pop("image")) for row in rows]
    path = os.path.join(folder, "two_images.jsonl")
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, "images": [images[i], images[(i + 1) % len(rows)]]}) + "\n")
    return path


@pytest.mark.parametrize("k", [1, 2])
def test_the_vision_tower_sees_each_distinct_image_once_per_pass(tmp_path, monkeypatch, k):
    """One real GRPO step (4 prompts of k images, G = 4, mu = 2, micro-batches of 3, so each group is cut in
    3 + 1): the tower encodes each prompt's k images once in its rollout and once per micro-batch in each
    reference, old and policy forward, where the plain path encodes every copy; the step's numbers are the
    same either way, and they are not those of a step that learned nothing (a reward of the text's length
    varies in every group, lr 1e-3)."""
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
        argv = ["--data", tiny.data_file(16)] if k == 1 else ["--data", two_image_rows(tmp_path)]
        argv += [] if k == 1 else ["--variant", "grpo"]  # P1 has one image slot; P2 one per image
        argv += ["--max-steps", "1", "--prompts-per-step", "4", "--num-generations", str(G), "--mu", "2"]
        argv += ["--micro-batch", "3", "--max-new-tokens", "8", "--rewards", "accuracy", "--lr", "1e-3"]
        argv += ["--log-completions-every", "1", "--out", out]
        seen.append([])
        with vision_sharing(on):
            g.main(tiny.flags() + argv)
        rows.append(json.loads(open(os.path.join(out, "metrics.jsonl")).read()))
        trajectories = open(os.path.join(out, "trajectories", "step_000001.jsonl")).readlines()
        completions.append([json.loads(line)["completion"] for line in trajectories])
    # 4 rollouts (one per prompt); per micro-batch (3 + 1 copies of a prompt) the reference and old (mu = 2)
    # forwards; then 2 epochs x the 8 micro-batches
    assert seen[0] == [k] * 4 + [k] * 16 + [k] * 16, seen[0]
    assert seen[1] == [G * k] * 4 + [3 * k, 3 * k, k, k] * 4 + [3 * k, k] * 8, seen[1]
    shared, plain = rows
    assert len(completions[0]) == 4 * G and completions[0] == completions[1]
    assert shared["reward"] == plain["reward"] and shared["completion_len"] == plain["completion_len"]
    assert shared["grad_norm"] > 0 and shared["kl"] > 0  # the step learned: its numbers can differ
    for key in ("kl", "loss", "grad_norm"):
        assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-9), key
    assert shared["clip_frac"] == plain["clip_frac"]


def test_two_fsdp_ranks():
    """tiny and tiny-2.5 sharded over 2 ranks, a prompt of one image and one of two per rank: completions,
    log-probs and gradient shards equal; the tower sees each prompt's images once per pass."""
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
