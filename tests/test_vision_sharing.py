"""shared_vision: each distinct image through the vision tower once per forward, not once per completion.
With it and without it (--no-vision-sharing) the completions, the log-probs and the gradients agree; the
tower sees P images per pass, not P x G. One process here, 2 FSDP ranks in vision_sharing_worker.py."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import grpo_vl as g

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
G = 4


def flags(name, share, *more):
    return g.parse_args(["--model", name, *([] if share else ["--no-vision-sharing"]), *more])


def count_images(model):
    """A list that grows by the number of images of every call to the model's vision tower."""
    seen = []
    model.model.visual.register_forward_hook(
        lambda module, a, kw, out: seen.append(len(kw["grid_thw"])), with_kwargs=True
    )
    return seen


def perturbed(model, seed=1):
    """A copy with every weight moved a little: a reference model that differs from the policy (KL > 0)."""
    ref = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(seed)
    for p in ref.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return ref


def greedy_rollout(model, processor, exs, args, eos, banned, monkeypatch):
    """grpo_vl.rollout (its shared_vision call included) with greedy decoding instead of sampling."""
    monkeypatch.setattr(g, "sampling", lambda a, b: {"do_sample": False, "max_new_tokens": a.max_new_tokens})
    return g.rollout(model, processor, exs, args, eos, banned, torch.device("cpu"), seed=0)[0]


def grpo_step(model, ref, b, args, banned, device):
    """The reference log-probs, the policy log-probs and the gradients of one GRPO loss (G3-G6) on batch b,
    each forward inside shared_vision as main() runs it. Gradients are returned as local tensors."""
    mask = b["mask"].to(device)
    with torch.no_grad(), g.shared_vision(b, args, ref):
        ref_lp = g.token_logprobs(ref, b, args.temperature, banned, device)
    model.zero_grad(set_to_none=True)
    with g.shared_vision(b, args, model):
        logp = g.token_logprobs(model, b, args.temperature, banned, device)
    A = torch.linspace(-1.5, 1.5, len(mask), device=device)  # advantages of both signs, none zero
    loss, _, _ = g.grpo_loss(logp, logp.detach(), ref_lp, A, mask, args, len(mask), mask.sum())
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


@pytest.mark.parametrize("name", ["tiny", "tiny-2.5"])
def test_sharing_changes_no_completion_log_prob_or_gradient(name, examples, monkeypatch):
    """Three prompts, two of them with images of the same size (a wrong image would fit their slots), G = 4:
    greedy rollouts identical, reference and policy log-probs and every gradient of a GRPO loss equal."""
    on, off = flags(name, True, "--max-new-tokens", "12"), flags(name, False, "--max-new-tokens", "12")
    on.num_generations = off.num_generations = G
    model, processor, eos, banned = g.load_model(on)
    ref = perturbed(model)
    seen = count_images(model)
    exs = [examples[0], examples[1], examples[3]]
    assert g.encode(processor, exs, on)["image_grid_thw"].tolist()[:2] == [[1, 6, 8]] * 2
    b = greedy_rollout(model, processor, exs, on, eos, banned, monkeypatch)
    b_off = greedy_rollout(model, processor, exs, off, eos, banned, monkeypatch)
    assert torch.equal(b["completion"], b_off["completion"])
    assert b["mask"].sum() > 3 * G * 4  # the completions have some length
    cpu = torch.device("cpu")
    shared, plain = grpo_step(model, ref, b, on, banned, cpu), grpo_step(model, ref, b, off, banned, cpu)
    assert_same_step(shared, plain, b["mask"])
    # the prefill, then the policy's forward (the reference has no hook): each image once, or G times
    assert seen == [3, 3 * G, 3, 3 * G]


def test_the_vision_tower_sees_each_distinct_image_once_per_pass(tmp_path, monkeypatch):
    """One real GRPO step (4 prompts, G = 4, mu = 2, micro-batches of 8 = 2 groups): the tower encodes the
    4 images once in the rollout and 2 per micro-batch in each reference, old and policy forward, where the
    plain path encodes every copy (G times as many); the step's numbers are the same either way."""
    load, seen = g.load_model, []

    def load_and_count(args):  # the reference model is a deep copy: it inherits the hook
        model, *rest = load(args)
        seen.append(count_images(model))
        return (model, *rest)

    monkeypatch.setattr(g, "load_model", load_and_count)
    rows = []
    for share in (True, False):
        out = str(tmp_path / str(share))
        argv = ["--model", "tiny", "--data", "synthetic:16", "--max-steps", "1", "--prompts-per-step", "4"]
        argv += ["--num-generations", str(G), "--mu", "2", "--micro-batch", "8", "--max-new-tokens", "8"]
        g.main(
            argv + ["--log-completions-every", "0", "--out", out] + ([] if share else ["--no-vision-sharing"])
        )
        rows.append(json.loads(open(os.path.join(out, "metrics.jsonl")).read()))
    # rollout; then per micro-batch the reference and old (mu = 2) forwards; then 2 epochs x 2 micro-batches
    assert seen[0] == [4] + [2] * 8, seen[0]
    assert seen[1] == [4 * G] + [2 * G] * 8, seen[1]
    shared, plain = rows
    assert shared["reward"] == plain["reward"] and shared["completion_len"] == plain["completion_len"]
    for k in ("kl", "loss", "grad_norm"):
        assert shared[k] == pytest.approx(plain[k], rel=1e-4, abs=1e-9), k
    assert shared["clip_frac"] == plain["clip_frac"]


def test_two_fsdp_ranks(tmp_path):
    """tiny and tiny-2.5 sharded over 2 ranks: completions, log-probs and gradient shards equal."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
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
