"""grpo-vl: GRPO reinforcement learning for vision-language models (Qwen2-VL / Qwen2.5-VL), in plain PyTorch.

GRPO (DeepSeekMath, arXiv 2402.03300, section 4.1): sample G completions o_1..o_G of each prompt q (an image
and a question), score each with rule-based rewards, take o_i's reward standardised within the group as every
token's advantage (no value network), then maximise PPO's clipped objective minus beta times a KL estimate.

    python grpo_vl.py --variant r1zero                                                # one GPU
    torchrun --nproc_per_node=4 grpo_vl.py --variant stepgrpo --data D --sft-data S   # 4 GPUs, FSDP2

Labels in comments (G1-G9 the GRPO equations, R1-R7 the rewards, P1-P4 the prompts, I1-I10 details peers got
wrong) index README.md's tables, which also list what this code simplifies; each line says its formula.
"""

import argparse
import contextlib
import copy
import datetime
import functools
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from statistics import fmean
from types import SimpleNamespace

import huggingface_hub
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers as tf
from torch.distributed.checkpoint import state_dict as dsd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

import data
import rewards as R

# one process saves and loads its checkpoint with torch.distributed.checkpoint too, as it should
warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")


# ================================================================================ 1. flags and recipes
def flag(default, help, choices=None):
    """A dataclass field whose metadata carries its --help text (and its allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:
    """Every flag, as `--name-with-dashes`. These defaults are r1zero's; VARIANTS changes them per recipe."""

    variant: str = flag("r1zero", "the recipe (r1zero, grpo, stepgrpo, vision-r1): sets the other defaults")
    model: str = flag("Qwen/Qwen2-VL-2B", "a Qwen2-VL / Qwen2.5-VL hub id or model folder")
    data: str = flag("array/SAT", "RL data: hub id, data set folder or .json(l)/.parquet file; '': SFT only")
    max_rows: int = flag(15000, "use a seeded sample of this many --data rows; 0 = all")
    eval_data: str = flag("nyu-visionx/CV-Bench", "evaluation data, in the same forms as --data")
    out: str = flag("runs/grpo", "output folder: metrics.jsonl, trajectories/, checkpoint/, eval*.json")
    rewards: str = flag("accuracy,format", "the rewards summed (G1), from: " + ", ".join(R.REWARDS))
    length_bonus: float = flag(0.0, "R3: reward per completion token (0.001 in VisualThinker's ablation)")
    num_generations: int = flag(8, "G: completions sampled per prompt")
    prompts_per_step: int = flag(8, "prompts per optimizer step, summed over all ranks")
    temperature: float = flag(1.0, "T: sampling temperature, applied to every log-prob too (G8)")
    max_new_tokens: int = flag(700, "cap on a completion's length during training")
    ptst: str = flag("", "Vision-R1's PTST stages 'tokens:G:steps,...' (for G, the cap, the steps)")
    lr: float = flag(1e-6, "RL learning rate (AdamW, no weight decay), decayed linearly to 0")
    beta: float = flag(0.04, "KL coefficient (G4); 0 loads no reference model")
    mu: int = flag(1, "policy epochs per rollout batch (G7); 1 = pi_old is pi_theta detached")
    epochs: int = flag(2, "RL passes over --data (when --max-steps is 0)")
    max_steps: int = flag(0, "RL steps (a rollout, then --mu policy epochs); 0 = --epochs passes")
    sft_data: str = flag("", "SFT data: rows with a solution or an answer, or chat rows")
    sft_epochs: int = flag(0, "SFT passes over --sft-data before RL; 0 = no SFT")
    sft_lr: float = flag(2e-5, "SFT peak learning rate (linear warm-up, then cosine decay)")
    sft_warmup: float = flag(0.03, "share of the SFT steps spent warming the learning rate up")
    sft_weight_decay: float = flag(0.05, "AdamW weight decay during SFT")
    sft_batch: int = flag(8, "SFT examples per optimizer step, summed over all ranks")
    max_pixels: int = flag(401408, "images are resized (qwen-vl-utils) to at most this many pixels")
    micro_batch: int = flag(8, "sequences per forward/backward pass (gradients accumulate within a step)")
    precision: str = flag("auto", "bf16 or fp32 compute (auto: bf16 on GPU)", ("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = flag(True, "recompute activations in the backward pass (saves memory)")
    freeze: str = flag("", "freeze the vision tower or the LLM (an ablation)", ("", "vision", "llm"))
    seed: int = flag(0, "seed of the data order and the sampling")
    save_every: int = flag(100, "checkpoint every N steps (0: never) and at the end of each phase")
    eval_every: int = flag(0, "evaluate on --eval-data at the start of RL, every N steps and at the end")
    eval: bool = flag(False, "only evaluate --model on --eval-data (greedy), write OUT/eval.json")
    eval_max_new_tokens: int = flag(1024, "cap on a completion's length during evaluation")
    log_completions_every: int = flag(10, "write completions and rewards to OUT/trajectories/ every N steps")
    resume: bool = flag(False, "continue from OUT/checkpoint: weights, optimizer, schedule, phase, step")
    skip_bad_rows: bool = flag(False, "skip unusable data rows (counted by reason) instead of stopping")


# Table V: what each recipe changes in the defaults above (flags given on the command line win).
VARIANTS = {
    "r1zero": dict(),  # VisualThinker-R1-Zero (arXiv 2503.05132): Args' defaults (README.md's table V)
    "grpo": dict(model="Qwen/Qwen2-VL-2B-Instruct"),  # the plain GRPO baseline: the Instruct model, P2
    "stepgrpo": dict(  # R1-VL (arXiv 2503.12937): warm-up SFT on step-wise CoT, then StepGRPO
        model="Qwen/Qwen2-VL-2B-Instruct",
        rewards="step_accuracy,step_validity",
        num_generations=4,
        temperature=1.2,
        max_new_tokens=1024,  # the paper's "maximum length"; the 2B script caps prompt + completion (vLLM)
        max_pixels=400000,
        prompts_per_step=4,  # the paper's batch size 4
        max_steps=13125,  # the released 2B script's (src/r1-vl/run_grpo_2b_vllm.sh): ~5 passes over 10K rows
        data="data/R1-VL-10K",  # R1-VL's released RL rows (data.RELEASES says how to get them)
        sft_data="data/Mulberry-SFT/mulberry_images/mulberry_sft.json",  # Mulberry-260K, the paper's warm-up
        sft_epochs=2,
        sft_lr=1e-5,  # the paper's, for 2B (5e-6 for 7B); the released config used 2e-5
        sft_batch=128,
    ),
    "vision-r1": dict(  # Vision-R1 (arXiv 2503.06749): cold-start SFT, then GRPO with R6 under PTST
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        rewards="hard_format",
        beta=0.01,  # the paper's (section 3.4); it states no lr, T or prompts per step: ours are r1zero's
        ptst="4096:16:100,8192:8:100",  # 100 steps at 4K tokens, G 16, then 100 at 8K, G 8: sections 3.4, 4.1
        data="Osilly/Vision-R1-rl",  # its released RL rows (geometry3k's layout, images inside): the hub
        sft_data="data/Vision-R1-cold/vision_r1_llava_cot_full.json,"  # Vision-R1-cold: its two files
        "data/Vision-R1-cold/vision_r1_mulberry_sft_full.json",
        sft_epochs=2,  # section 4.1; lr, warm-up, batch (32 GPUs x 1): the release's cold-start train.yaml
        sft_lr=5e-6,
        sft_warmup=0.05,
        sft_weight_decay=0.0,
        sft_batch=32,
        micro_batch=2,  # sequences of up to 9,000 tokens on a 7B model: see tests/README.md's memory section
    ),
}
PROMPT = {"r1zero": "base", "grpo": "instruct", "stepgrpo": "step", "vision-r1": "plain"}  # P1-P4 (data.py)
EPS = 0.2  # the clip range epsilon of G5: DeepSeekMath's and the three papers' released value
MAX_GRAD_NORM = 1.0  # gradient-norm clip, as the papers' released code
LOGPROB_CHUNK = 512  # completion tokens projected on the vocabulary at once: 512 x 151,936 x 4 B = 0.3 GB
AUTO_MODEL = tf.AutoModelForImageTextToText  # Qwen2-VL's or Qwen2.5-VL's class, by the config
VISION_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]  # never sampled (I5)


# ================================================================================ 2. the GRPO math
# DeepSeekMath (arXiv 2402.03300) Eq. 3, the objective maximised, for a prompt q and its group o_1..o_G:
#   J(theta) = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta D_it ]
# with rho_it the probability ratio of token t of o_i under pi_theta and pi_old (the sampling policy), A_i
# the group-relative advantage, and D_it an estimate of KL(pi_theta || pi_ref) against the frozen start.
def completion_mask(completion, eos):
    """G9: tokens count up to and including the first EOS. Returns the mask (N, C) and no-EOS flags (N,)."""
    is_eos = torch.isin(completion, torch.tensor(eos))  # (N, C)
    C = completion.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), C)  # (N,) index of the first EOS
    return (torch.arange(C)[None] <= first[:, None]).float(), ~is_eos.any(1)


def token_logprobs(model, b, T, banned, device):
    """log pi(o_t | q, o_<t) of every completion token, (N, C). G8: from logits / T less the banned tokens:
    exactly the distribution each token was drawn from, so rho and D score what was really sampled."""
    comp = b["completion"].to(device)  # (N, C)
    N, C = comp.shape
    prompt = copies(b["prompt"], N // len(b["prompt"]["input_ids"]), device)  # N completions of one prompt
    out = model(
        input_ids=torch.cat([prompt["input_ids"], comp], 1),
        attention_mask=torch.cat([prompt["attention_mask"], b["mask"].to(device).long()], 1),
        mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(comp)], 1),  # I6
        pixel_values=prompt["pixel_values"],
        image_grid_thw=prompt["image_grid_thw"],
        logits_to_keep=1,  # the model's own logits at one position only; ours are computed below
        output_hidden_states=-1,  # an index, not a bool: the last layer's (normed) states only
        use_cache=False,
    )
    h = out.hidden_states[-1][:, -C - 1 : -1].reshape(N * C, -1)  # (N*C, H): the states predicting o_1..o_C
    # I7: logits at completion positions only, LOGPROB_CHUNK tokens at a time, recomputed in the backward
    # (checkpoint) rather than kept: at 151,936 entries an (N, C, V) fp32 logits tensor is most of the memory.
    logp = []
    for h_s, o_s in zip(h.split(LOGPROB_CHUNK), comp.reshape(N * C).split(LOGPROB_CHUNK)):
        logp.append(checkpoint(chunk_logprobs, model.lm_head, h_s, o_s, T, banned, use_reentrant=False))
    if not torch.is_grad_enabled() and isinstance(model, FSDPModule):
        model.reshard()  # no backward follows (reference, pi_old): free the root's gathered parameters (I9)
    return torch.cat(logp).view(N, C)


def chunk_logprobs(lm_head, h, o, T, banned):
    """log softmax(logits / T)[o] at n positions: (n, H), (n,) -> (n,)."""
    logits = lm_head(h).float() / T  # (n, V) G8: z / T
    logits[:, banned] = float("-inf")  # never sampled (I5), so not part of the distribution either
    return logits.gather(-1, o[:, None]).squeeze(-1) - logits.logsumexp(-1)  # z_o/T - log sum_v exp(z_v/T)


def group_advantages(r, G):
    """G2, DeepSeekMath section 4.1.2 (outcome supervision): every token of o_i gets the advantage
        A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4),
    std unbiased (N - 1, as torch.std and the released code). A group whose rewards are all equal teaches
    nothing: its A is 0 exactly, and frac_zero_std counts such groups. r: (P*G,) -> A: (P*G,)."""
    r = r.view(-1, G)  # (P, G): one row per prompt
    A = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    flat = r.max(1).values == r.min(1).values  # (P,)
    return A.masked_fill(flat[:, None], 0.0).view(-1), flat.float().mean().item()


def grpo_loss(logp, old, ref, A, mask, beta, n_completions):
    """-J (DeepSeekMath Eq. 3) for a micro-batch; logp, old, ref, mask: (N, C), A: (N,). Each rank divides by
    its own number of completions and FSDP2 averages the gradients over the ranks: J's gradient over all the
    step's prompts. Returns the loss, and D (N, C) and where clipping changed L (N, C) for the logs."""
    A = A[:, None]  # (N, 1): one advantage for every token of a completion
    ratio = torch.exp(logp - old)  # G3: rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    surrogate = torch.min(ratio * A, ratio.clamp(1 - EPS, 1 + EPS) * A)  # G5: min(rho A, clip(rho) A)
    D = torch.zeros_like(logp)  # beta = 0: no reference, no KL term
    if ref is not None:  # G4, DeepSeekMath Eq. 4 (the k3 estimator): D = pi_ref/pi - log(pi_ref/pi) - 1 >= 0
        D = torch.exp(ref - logp) - (ref - logp) - 1
    L = surrogate - beta * D  # G5: L_it, the term inside Eq. 3's sums
    per_seq = torch.where(mask.bool(), L, 0.0).sum(1)  # sum_t L_it over o_i's tokens (G9); not 0 * inf
    loss = -(per_seq / mask.sum(1).clamp(min=1)).sum() / n_completions  # G6: -1/G sum_i 1/|o_i| sum_t L_it
    # the clipped term wins (and its gradient is 0) only past 1+eps with A > 0, or below 1-eps with A < 0
    clipped = ((ratio > 1 + EPS) & (A > 0)) | ((ratio < 1 - EPS) & (A < 0))
    return loss, D, clipped.float()


# ================================================================================ 3. the rollout
@torch.no_grad()
def rollout(model, exs, args, run, seed):
    """G completions of each prompt, sampled at T (G8) with the KV cache. A batch per prompt: the prompt
    encoded once, its completions (G, C), masks (G9), "idx": completion j answers prompt j // G (I8)."""
    G = args.num_generations
    sampling = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens, synced_gpus=False)
    batches = []
    with gathered(model):  # no forward then needs another rank, so none waits on them (synced_gpus=False)
        for j, ex in enumerate(exs):
            prompt = data.encode(run.processor, [ex], PROMPT[args.variant], args.max_pixels)  # (1, L)
            torch.manual_seed(seed + j)  # seed + the prompt's index in the step: free of the rank count
            with shared_vision(G, model):  # the prefill encodes the prompt's image once, not G times
                seqs = model.generate(**copies(prompt, G, run.device), **sampling)  # from G copies (G, L)
            b = {"prompt": prompt, "completion": seqs[:, prompt["input_ids"].shape[1] :].cpu()}  # (G, C)
            b["mask"], b["truncated"] = completion_mask(b["completion"], run.eos)
            b["idx"] = torch.arange(j * G, (j + 1) * G)
            batches.append(b)
    return batches


def completion_text(text, args):
    """What the rewards read: P1 ends its prompt with an opened <think>, so it is put back (R2)."""
    return "<think>" + text if PROMPT[args.variant] == "base" else text


# ================================================================================ 4. one GRPO step
def grpo_step(step, exs, args, run):
    """One GRPO step on this rank's prompts `exs`, with the stage's args (PTST). Returns the step's statistics
    (means over the ranks) and this rank's samples (question, completion, rewards, advantage) for the logs."""
    model, ref, device = run.model, run.ref, run.device
    G = args.num_generations
    t0 = time.time()
    # ---- 1. rollout: G completions of each prompt (a group never spans two ranks)
    seed = args.seed + 1_000_003 * step + run.rank * len(exs)  # + the step index of this rank's 1st prompt
    with run.amp:
        batches = rollout(model, exs, args, run, seed)
    rollout_time = time.time() - t0
    # ---- 2. reward, G1: r_i = sum_k R_k(o_i, q), the recipe's rewards summed without weights
    decoded = [t for b in batches for t in run.processor.batch_decode(b["completion"], True)]
    texts = [completion_text(t, args) for t in decoded]
    ex_of = [exs[j // G] for j in range(len(texts))]  # I8: completion j answers prompt j // G
    n_tok = torch.cat([b["mask"].sum(1) for b in batches]).tolist()  # |o_i|, counted as G9 counts
    per_fn = {}
    for name, fn in run.rewards.items():
        per_fn[name] = torch.tensor([fn(t, ex, n) for t, ex, n in zip(texts, ex_of, n_tok)])
    r = sum(per_fn.values())  # (P*G,) G1
    # ---- 3. advantage, G2: A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4), within each group
    A, frac_zero_std = group_advantages(r, G)
    # ---- 4. log-probs of pi_ref (G4) and of pi_old (G7), without gradients, by micro-batch
    micro = []  # micro-batches of up to --micro-batch completions of one prompt
    for b in batches:
        for s in range(0, G, args.micro_batch):
            micro.append({k: v if k == "prompt" else v[s : s + args.micro_batch] for k, v in b.items()})
    for mb in micro:  # mu = 1: no "old", pi_old is pi_theta itself, detached in 5; no extra forward (G7)
        with torch.no_grad(), run.amp, shared_vision(len(mb["idx"]), ref, model):
            if ref is not None:
                mb["ref"] = token_logprobs(ref, mb, args.temperature, run.banned, device)
            if args.mu > 1:
                mb["old"] = token_logprobs(model, mb, args.temperature, run.banned, device)
    # ---- 5. policy update: mu epochs (G7), each a gradient step on -J (G5, G6) over all micro-batches
    n_tokens = sum(mb["mask"].sum() for mb in micro).item()  # this rank's completion tokens, for the logs
    for epoch in range(args.mu):
        run.opt.zero_grad(set_to_none=True)
        kl = clip_frac = loss_sum = 0.0
        for mb in micro:
            mask = mb["mask"].to(device)
            with run.amp, shared_vision(len(mb["idx"]), model):  # the copies' gradients sum into one encoding
                logp = token_logprobs(model, mb, args.temperature, run.banned, device)  # (n, C) log pi_theta
            old = mb.get("old", logp.detach())  # G7: at mu = 1, rho = 1
            A_mb = A[mb["idx"]].to(device)  # this micro-batch's completions' advantages (I8)
            loss, D, clipped = grpo_loss(logp, old, mb.get("ref"), A_mb, mask, args.beta, len(r))
            loss.backward()
            loss_sum += loss.item()
            kl += (torch.where(mask.bool(), D, 0.0).sum() / n_tokens).item()
            clip_frac += (torch.where(mask.bool(), clipped, 0.0).sum() / n_tokens).item()
        grad_norm = clip_and_step(run.opt)
    # ---- 6. statistics; kl, clip_frac and loss are the last policy epoch's (loss ~ beta * kl: README.md)
    stats = {f"rewards/{name}": values.mean().item() for name, values in per_fn.items()}
    stats["reward"] = r.mean().item()
    stats["reward_std"] = r.view(-1, G).std(1).mean().item()
    stats["frac_zero_std"] = frac_zero_std
    stats["completion_len"] = sum(n_tok) / len(n_tok)
    stats["truncated_frac"] = torch.cat([b["truncated"] for b in batches]).float().mean().item()
    stats["reflection_rate"] = sum(R.reflects(t) for t in texts) / len(texts)  # R7
    stats.update(kl=kl, clip_frac=clip_frac, loss=loss_sum)
    stats = over_ranks(stats, device)
    lr = run.opt.param_groups[0]["lr"]  # the step's, before the schedule moves on
    run.sched.step()
    stats.update(grad_norm=grad_norm, lr=lr, rollout_time=rollout_time, step_time=time.time() - t0)
    samples = []
    for i, (text, ex) in enumerate(zip(texts, ex_of)):
        sample = {"question": ex["question"], "answer": ex["answer"], "completion": text, "tokens": n_tok[i]}
        rewards_i = {name: values[i].item() for name, values in per_fn.items()}
        samples.append({**sample, "rewards": rewards_i, "advantage": A[i].item()})
    return stats, samples


# ================================================================================ 5. the run
def main(argv=None):
    args = parse_args(argv)
    rank, world, device, mesh = init_distributed()
    log = print if rank == 0 else ignore  # rank 0 alone prints and writes
    os.makedirs(args.out, exist_ok=True)
    # The data first: a mistake in it ends the run in seconds, not after the model has loaded
    sft_exs = load_data(args.sft_data, "train", args, sft=True) if args.sft_epochs and not args.eval else None
    exs = load_data(args.data, "train", args, args.max_rows) if args.data and not args.eval else None
    eval_exs = load_data(args.eval_data, "test", args) if args.eval or args.eval_every else None
    run = load_models(args, rank, world, device, mesh)
    if args.eval:
        run_eval(eval_exs, args, run, "eval")
        return barrier(finish=True)
    saved = os.path.join(args.out, "checkpoint", "progress.json")  # --resume: phase, step, sched, args
    progress = json.load(open(saved)) if args.resume and os.path.exists(saved) else None
    record = open_metrics(args.out, progress) if rank == 0 else ignore
    n_params = sum(p.numel() for p in run.model.parameters()) / 1e6
    log(f"{args.variant}: {args.model} ({n_params:.1f}M parameters), {world} rank(s), {device} -> {args.out}")
    # ---- warm-up (R1-VL) or cold-start (Vision-R1) SFT; the RL reference is the model it leaves (G4)
    in_rl = progress is not None and progress["phase"] == "rl"
    if progress and not in_rl and not sft_exs:
        fail("OUT/checkpoint is an SFT checkpoint: --resume with its SFT flags, or start RL with --model it")
    if sft_exs and not in_rl:
        sft(sft_exs, args, run, progress, record, log)
        if run.ref is not None:
            run.ref.load_state_dict(run.model.state_dict())
    if not exs:  # no --data: SFT alone, its model in OUT/checkpoint
        return barrier(finish=True)
    # ---- GRPO, in PTST's stages of (completion cap, G, steps); without PTST one stage of the plain flags
    P = args.prompts_per_step
    plain_steps = args.max_steps or args.epochs * (len(exs) // P)
    stages = parse_ptst(args.ptst) or [(args.max_new_tokens, args.num_generations, plain_steps)]
    plan = [(k, cap, G) for k, (cap, G, n) in enumerate(stages) for _ in range(n)]  # step s: plan[s - 1]
    steps = len(plan)
    if steps == 0:
        fail(f"{args.data}: {len(exs)} usable rows, fewer than --prompts-per-step {P}: no RL step to take")
    order = data_order(len(exs), steps * P, args.seed)
    run.rewards = {name: R.REWARDS[name] for name in args.rewards.split(",")}  # G1's terms
    if args.length_bonus:
        run.rewards["length"] = functools.partial(R.length_bonus, per_token=args.length_bonus)  # R3
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=args.lr, weight_decay=0.0)  # frozen: no grad
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda s: 1 - s / steps)  # 1 -> 0, linearly
    log(f"GRPO: {steps} steps x {P} prompts, rewards {', '.join(run.rewards)}")
    if in_rl:
        resume(run.model, run.opt, run.sched, run.ref, args)
        log(f"resuming after RL step {progress['step']}")
    elif args.eval_every:  # the starting point of RL, which the later evaluations are measured against
        run_eval(eval_exs, args, run, "eval_step0")
    flat_steps = 0  # steps in a row in which every group's rewards were equal
    for step in range(progress["step"] + 1 if in_rl else 1, steps + 1):
        stage, cap, G = plan[step - 1]  # the same prompts per step; PTST changes G and the cap
        if step == 1 or plan[step - 2][0] != stage:
            log(f"stage {stage + 1}: up to {cap} new tokens, G = {G}, from step {step}")
        mine = [exs[i] for i in my_share(order, step, P, rank, world)]
        stats, samples = grpo_step(step, mine, replace(args, max_new_tokens=cap, num_generations=G), run)
        stats = {"phase": "rl", "step": step, "stage": stage + 1, **stats}
        record(stats)
        terms = " ".join(f"{name} {stats['rewards/' + name]:.3f}" for name in run.rewards)
        log(
            f"step {step}/{steps} | reward {stats['reward']:.3f} (std {stats['reward_std']:.2f}, zero-std "
            f"{stats['frac_zero_std']:.2f}) | {terms} | len {stats['completion_len']:.0f} (cut "
            f"{stats['truncated_frac']:.0%}) | kl {stats['kl']:.2e} | {stats['step_time']:.1f}s"
        )
        flat_steps = flat_steps + 1 if stats["frac_zero_std"] == 1 else 0
        if flat_steps == 10:  # every advantage was 0 (G2): GRPO learned nothing but the KL term
            log("note: 10 steps without a reward that differs within a group. A model that never earns one")
            log("(OUT/trajectories/ shows what it writes) needs a warm-up first: --sft-data, --sft-epochs")
        if rank == 0 and args.log_completions_every and (step == 1 or step % args.log_completions_every == 0):
            os.makedirs(os.path.join(args.out, "trajectories"), exist_ok=True)
            with open(os.path.join(args.out, "trajectories", f"step_{step:06d}.jsonl"), "w") as f:
                f.writelines(json.dumps(sample) + "\n" for sample in samples)
        # ---- 7. evaluate and checkpoint
        if args.eval_every and (step % args.eval_every == 0 or step == steps):
            run_eval(eval_exs, args, run, f"eval_step{step}")
        if step == steps or (args.save_every and step % args.save_every == 0):
            save_checkpoint(run, run.opt, run.sched, args, "rl", step)
    barrier(finish=True)


# ==================================================== plumbing: engineering, not the algorithm (skip it)
def parse_args(argv=None):
    """Args from the command line, over the defaults of the --variant (which --help shows)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--variant", choices=VARIANTS)
    first.add_argument("--model", default="")
    first.add_argument("--eval", action="store_true")
    given = first.parse_known_args(argv)[0]
    variant = given.variant or "r1zero"
    saved = os.path.join(given.model, "progress.json")  # a checkpoint of ours: the flags it was trained with
    if given.eval and not given.variant and os.path.isfile(saved):  # evaluated with its own prompt
        variant = json.load(open(saved))["args"]["variant"]
    defaults = {**asdict(Args()), "variant": variant, **VARIANTS[variant]}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="default: the --variant's value")
    for f in fields(Args):
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        name = "--" + f.name.replace("_", "-")
        help = f.metadata["help"] + " (default: %(default)r)"
        p.add_argument(name, default=defaults[f.name], help=help, choices=f.metadata["choices"], **kind)
    args = Args(**vars(p.parse_args(argv)))
    if bad := [name for name in args.rewards.split(",") if name not in R.REWARDS]:
        p.error(f"--rewards: no reward {bad[0]!r} (choose from {', '.join(R.REWARDS)})")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.prompts_per_step % world or args.sft_batch % world:
        p.error(f"--prompts-per-step and --sft-batch must divide by the {world} ranks")
    if not os.path.isdir(args.model) and not data.HUB_ID.fullmatch(args.model):
        p.error(f"--model {args.model!r}: no such folder, and not a hub id (owner/name)")
    if not (args.data or args.sft_epochs or args.eval):
        p.error(f"--variant {args.variant} needs --data (its RL rows), or --sft-data with --sft-epochs")
    if args.sft_epochs and not args.sft_data and not args.eval:
        p.error("--sft-epochs needs --sft-data (rows with a solution or an answer, or chat rows)")
    try:
        stages = parse_ptst(args.ptst)
    except ValueError:
        p.error(f"--ptst {args.ptst!r}: expected tokens:G:steps stages, as 4096:16:100,8192:8:100")
    if min([args.num_generations] + [G for _, G, _ in stages]) < 2:
        p.error("--num-generations (and each PTST stage's G) must be at least 2: a lone completion has no G2")
    if args.mu < 1:
        p.error(f"--mu {args.mu}: at least 1 policy epoch per rollout batch (G7)")
    return args


def parse_ptst(spec):
    """'4096:16:100,8192:8:100' -> [(4096, 16, 100), (8192, 8, 100)]: (completion cap, G, steps) per stage."""
    stages = [tuple(int(n) for n in stage.split(":")) for stage in spec.split(",")] if spec else []
    if any(len(stage) != 3 or min(stage) < 1 for stage in stages):
        raise ValueError(spec)
    return stages


def fail(message):
    """A mistake in the input ends the run: one line naming it (by rank 0), exit 2 (as for a bad flag)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"grpo_vl.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_data(spec, split, args, max_rows=0, sft=False):
    """data.load_examples of each comma-separated part, before a model loads: any mistake is one line."""
    exs = []
    try:
        for part in spec.split(","):
            exs += data.load_examples(part, split, args.seed, args.skip_bad_rows, max_rows, sft)
    except (ValueError, OSError) as e:
        fail(e)
    if sft and PROMPT[args.variant] == "step":  # R1-VL warms up on Mulberry-260K less its reflective rows
        kept = [ex for ex in exs if data.REFLECTION not in (ex.get("target") or ex.get("solution") or "")]
        print(f"{spec}: left out {len(exs) - len(kept)} reflective rows ({data.REFLECTION!r}), as R1-VL does")
        exs = kept
    if PROMPT[args.variant] == "base" and (bad := [ex for ex in exs if len(ex["images"]) != 1]):
        fail(f"data set {spec!r}, row {bad[0]['row']}: {len(bad[0]['images'])} images; P1 has one image slot")
    return exs


# ------------------------------------------------------------------ processes and models (FSDP2, I9)
def init_distributed():
    """(rank, world, device, mesh): under torchrun one process per device (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world == 1:
        return rank, world, device, None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # an hour, not the default 10 min, for the other ranks to wait while rank 0 writes a 7B model (33 GB fp32)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    return rank, world, device, init_device_mesh(device.type, (world,))


def ignore(*args, **kwargs):
    pass  # what printing and recording are on ranks other than 0


def barrier(finish=False):
    if dist.is_initialized():
        dist.barrier()  # also before destroying the group: a teardown race was seen without it
        if finish:
            dist.destroy_process_group()


def over_ranks(stats, device):
    """Each value's mean over the ranks (which hold equal numbers of completions)."""
    if dist.is_initialized():
        t = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        stats = dict(zip(stats, (t / dist.get_world_size()).tolist()))
    return stats


def load_models(args, rank, world, device, mesh):
    """The policy (fp32 master weights), the frozen reference (G4; none when beta = 0), the processor, the EOS
    and banned token ids, the precision. Rank 0 alone reads the weights and fills every rank's shards (I9)."""
    tf.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()  # no line per retry when offline: one line below
    try:
        config = tf.AutoConfig.from_pretrained(args.model)
        processor = tf.AutoProcessor.from_pretrained(args.model)
        dtype = torch.float32 if mesh is None else config.dtype  # torchrun: read in the model's own dtype
        loaded = AUTO_MODEL.from_pretrained(args.model, dtype=dtype) if rank == 0 or not mesh else None
    except (OSError, ValueError) as e:  # not a model folder, or a hub id neither cached nor reachable
        how = "a model folder, or a hub id: huggingface-cli download ID, or HF_HUB_OFFLINE=0 with a network"
        fail(f"--model {args.model!r}: cannot load it ({str(e).splitlines()[0]}); expected {how}")
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])  # what ends a completion (G9)
    # Hub generation configs sample nearly greedily (Instruct: top_k 1, top_p 0.001): RL samples and scores
    # the plain distribution at T (G8, I1), never a vision token (I5), which would break the scoring forward.
    banned = tok.convert_tokens_to_ids(VISION_TOKENS)
    plain = dict(do_sample=True, top_k=0, top_p=1.0, repetition_penalty=1.0, suppress_tokens=banned)
    with_ref = args.beta > 0 and not args.eval
    if mesh is None:  # one process: the model on its device, the reference a copy there
        model = loaded.to(device)
        ref = copy.deepcopy(model) if with_ref else None
    else:
        with torch.device("meta"):  # shapes only, no memory: filled in shard()
            model = AUTO_MODEL.from_config(config, dtype=torch.float32)
            ref = AUTO_MODEL.from_config(config, dtype=torch.float32) if with_ref else None
        if loaded is not None:  # rank 0 saves: in the key layout the weights were read in (the hub's)
            model._weight_conversions = getattr(loaded, "_weight_conversions", None)
    model.generation_config = tf.GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id, **plain)
    if ref is not None:
        ref.eval().requires_grad_(False)
    if args.freeze == "vision":  # the r1zero ablations, really frozen (the release froze nothing: README.md)
        model.model.visual.requires_grad_(False)
    if args.freeze == "llm":
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if args.gradient_checkpointing:  # non-reentrant: the kind that composes with FSDP2
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()  # checkpointing acts in training mode only; generate() runs in eval mode (gathered)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    for m in (model, ref):
        if m is not None and mesh is not None:
            shard(m, loaded, mesh, device, bf16)
    # one process: bf16 autocast over the fp32 weights, as FSDP's mixed-precision policy does under torchrun
    amp = torch.autocast(device.type, torch.bfloat16) if bf16 and mesh is None else contextlib.nullcontext()
    run = dict(model=model, ref=ref, processor=processor, eos=eos, banned=banned, amp=amp, device=device)
    run["dtype"] = config.dtype or torch.float32  # checkpoints are saved in it: bf16 for Qwen's releases
    return SimpleNamespace(**run, rank=rank, world=world)


def shard(model, loaded, mesh, device, bf16):
    """I9: fully_shard the empty model module by module (below), then fill its shards from rank 0's `loaded`.
    bf16: bf16 compute over fp32 master weights, fp32 gradient reduction (lr 1e-6 steps vanish in bf16)."""
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for module in [*model.model.visual.blocks, *model.model.language_model.layers, model.model.visual, model]:
        fully_shard(module, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)  # this rank's shards, allocated, not yet filled
    weights = loaded.state_dict() if loaded is not None else {}  # rank 0's full weights; {} elsewhere
    options = dsd.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    dsd.set_model_state_dict(model, weights, options=options)  # broadcast; each rank keeps its shards (fp32)
    for name, buffer in model.named_buffers():  # in no state dict (rotary frequencies): sent whole
        if loaded is not None:
            buffer.copy_(loaded.get_buffer(name))
        dist.broadcast(buffer, 0)
    # FSDP's root is the first module to run forward (generate runs the tower first): a text-only forward
    # settles it. Then reshard: an optimizer built now would hold the root's gathered copies, not the shards.
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    model.reshard()


@contextlib.contextmanager
def gathered(model):
    """For generate(): eval mode (training mode's checkpointing turns the KV cache off) and, under FSDP, every
    parameter gathered up front on every rank: no forward needs a collective, so no rank stalls another."""
    model.eval()
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)  # kept gathered between forwards
    try:
        yield
    finally:
        for m in sharded:
            # FSDP's default again: a module reshards after its forward, but the root stays gathered
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()
        model.train()  # back to training mode, where load_models left it


@contextlib.contextmanager
def shared_vision(n, *models):
    """For n copies of one prompt (a group): each vision tower encodes the prompt's images once, not n times.
    Autograd sums the n copies' gradients into the one encoding, then back-propagates once: by linearity the
    gradient is exact. The tower is still called as a module, so FSDP2's hooks gather and reshard it (I9)."""

    def encode_once(get_image_features, pixel_values, image_grid_thw, **kwargs):
        k = len(image_grid_thw) // n  # the prompt's images
        rows = image_grid_thw[:k].prod(-1).sum()  # their patches: the first copy's rows of pixel_values
        out = get_image_features(pixel_values[:rows], image_grid_thw[:k], **kwargs)
        out.pooler_output = list(out.pooler_output) * n  # every copy shares the one encoding
        return out

    models = [m for m in models if m is not None]
    for m in models:  # an instance attribute is found before the class's method, by forward and generate
        m.model.get_image_features = functools.partial(encode_once, m.model.get_image_features)
    try:
        yield
    finally:
        for m in models:
            del m.model.get_image_features


# ------------------------------------------------------------------ batches (I3)
def copies(prompt, n, device):
    """n copies of an encoded prompt on the device. pixel_values has a row per image patch, image_grid_thw
    a row per image (I3): both repeat n times, as input_ids do."""
    return {k: v.repeat(n, 1).to(device) for k, v in prompt.items()}


def data_order(n, needed, seed):
    """The data order: one seeded permutation per epoch, as many epochs as `needed` takes."""
    epochs = range(math.ceil(needed / n))
    return [i for epoch in epochs for i in random.Random(seed + epoch).sample(range(n), n)]


def my_share(order, step, n, rank, world):
    """This rank's part of step `step`'s n examples (a prompt's G completions stay on one rank)."""
    return order[(step - 1) * n : step * n][rank * n // world : (rank + 1) * n // world]


def sft(exs, args, run, progress, record, log):
    """Warm-up / cold-start SFT: cross-entropy on the target tokens after RL's prompt (a token mean over all
    ranks); AdamW with weight decay, linear warm-up then cosine decay (the releases' transformers Trainer)."""
    n = args.sft_batch
    m = args.micro_batch  # examples per forward/backward pass
    steps = args.sft_epochs * max(len(exs) // n, 1)
    opt = torch.optim.AdamW(run.model.parameters(), lr=args.sft_lr, weight_decay=args.sft_weight_decay)
    sched = tf.get_cosine_schedule_with_warmup(opt, math.ceil(args.sft_warmup * steps), steps)
    order = data_order(len(exs), steps * n, args.seed)
    log(f"SFT: {steps} steps x {n} examples, lr {args.sft_lr}")
    if progress:
        resume(run.model, opt, sched, None, args)
    for step in range(progress["step"] + 1 if progress else 1, steps + 1):
        t0 = time.time()
        mine = [exs[i] for i in my_share(order, step, n, run.rank, run.world)]
        micro = [sft_batch(run.processor, mine[s : s + m], args) for s in range(0, len(mine), m)]
        n_tok = over_ranks({"n": sum(mb["mask"].sum().item() for mb in micro)}, run.device)["n"]
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for mb in micro:  # divided by the mean target tokens per rank, then FSDP's mean: the token mean
            with run.amp:
                logp = token_logprobs(run.model, mb, 1.0, run.banned, run.device)
                nll = -(logp * mb["mask"].to(run.device)).sum() / n_tok  # -1/N sum_t log p(y_t | x, y_<t)
            nll.backward()
            loss += nll.item()
        grad_norm = clip_and_step(opt)
        stats = {"phase": "sft", "step": step, "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm}
        sched.step()
        stats["loss"] = over_ranks({"loss": loss}, run.device)["loss"]
        stats["step_time"] = time.time() - t0
        record(stats)
        log(f"sft {step}/{steps} | loss {stats['loss']:.4f} | lr {stats['lr']:.2e}")
        if step == steps or (args.save_every and step % args.save_every == 0):
            save_checkpoint(run, opt, sched, args, "sft", step)


def sft_batch(processor, exs, args):
    """An SFT batch as a rollout's: RL's prompt, the target as the 'completion', masked to it and its EOS."""
    style = PROMPT[args.variant]
    b = {"prompt": data.encode(processor, exs, style, args.max_pixels)}
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|endoftext|>" if style == "base" else "<|im_end|>")
    ids = [tok(data.sft_target(ex, style), add_special_tokens=False)["input_ids"] + [end] for ex in exs]
    C = max(len(x) for x in ids)
    b["completion"] = torch.tensor([x + [tok.pad_token_id] * (C - len(x)) for x in ids])  # (B, C)
    b["mask"] = (torch.arange(C)[None] < torch.tensor([len(x) for x in ids])[:, None]).float()
    return b


def clip_and_step(opt):
    """Clip the gradient norm, then step; a norm that is not finite stops the run (the checkpoint stays)."""
    norm = torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], MAX_GRAD_NORM)
    grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # DTensor under FSDP2
    if not math.isfinite(grad_norm):
        raise SystemExit(f"error: gradient norm {grad_norm}; stopped (OUT/checkpoint: the last good weights)")
    opt.step()
    return grad_norm


@torch.no_grad()
def run_eval(exs, args, run, name):
    """Protocol E: greedy decoding, judged as the recipe's rewards judge. Accuracy over all rows (as
    VisualThinker's 59.47%), per task, and CV-Bench's ((ADE20K + COCO) / 2 + Omni3D) / 2: OUT/<name>.json."""
    mine = exs[run.rank :: run.world]  # a rank may have fewer rows, or none: gathered() needs no forward
    greedy = dict(do_sample=False, max_new_tokens=args.eval_max_new_tokens, synced_gpus=False)
    stepwise = PROMPT[args.variant] == "step"  # judged by P3's sections (R4, R5), or by the tags (R1, R2)
    results = []
    with gathered(run.model), run.amp:
        for s in range(0, len(mine), 16):
            chunk = mine[s : s + 16]
            b = data.encode(run.processor, chunk, PROMPT[args.variant], args.max_pixels)
            seqs = run.model.generate(**copies(b, 1, run.device), **greedy)
            o = seqs[:, b["input_ids"].shape[1] :].cpu()  # the completions
            lengths = completion_mask(o, run.eos)[0].sum(1).tolist()  # counted as G9 counts them
            for ex, text, n in zip(chunk, run.processor.batch_decode(o, True), lengths):
                text = completion_text(text, args)
                pred = R.step_answer(text) if stepwise else R.last_tag(text, "answer")  # as R4 / R1 read it
                result = {key: ex[key] for key in ("task", "source", "question", "answer")}
                result.update(completion=text, completion_len=n, accuracy=float(R.is_correct(pred, ex)))
                result["format"] = R.step_validity(text) if stepwise else R.think_answer_format(text)
                results.append(result)
    if run.world > 1:  # every rank's results
        everyone = [None] * run.world
        dist.all_gather_object(everyone, results)
        results = [r for rs in everyone for r in rs]
    report = {"n": len(results)}
    for key in ("accuracy", "format", "completion_len"):
        report[key] = fmean(r[key] for r in results)
    for group in ("task", "source"):  # per task, and per source (CV-Bench's: ADE20K, COCO, Omni3D)
        keys = sorted({r[group] for r in results})
        report[f"per_{group}"] = {k: fmean(r["accuracy"] for r in results if r[group] == k) for k in keys}
    acc = report["per_source"]
    if {"ADE20K", "COCO", "Omni3D"} <= set(acc):  # CV-Bench's combined score
        report["cvbench_combined"] = ((acc["ADE20K"] + acc["COCO"]) / 2 + acc["Omni3D"]) / 2
    if run.rank == 0:
        print(f"{name}: {json.dumps(report)}")
        json.dump(report, open(os.path.join(args.out, f"{name}.json"), "w"), indent=1)
        open(os.path.join(args.out, f"{name}.jsonl"), "w").writelines(json.dumps(r) + "\n" for r in results)
    return report


# ------------------------------------------------------------------ checkpoints and metrics
def save_checkpoint(run, opt, sched, args, phase, step):
    """OUT/checkpoints/<phase>-<step>/ (I10): the model for transformers, and for --resume train_state and
    the schedule. Written aside, renamed, then linked: a kill mid-write leaves the last checkpoint whole."""
    root = os.path.join(args.out, "checkpoints")
    name = f"{phase}-{step:06d}"
    tmp = os.path.join(root, ".tmp-" + name)
    options = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = dsd.get_model_state_dict(run.model, options=options)
    if run.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tied = run.model.all_tied_weights_keys  # {"lm_head.weight": its embeddings} when tied: saved once
        full = {k: v.to(run.dtype) for k, v in full.items() if k not in tied}
        run.model.save_pretrained(tmp, state_dict=full)  # FSDP's class writes the hub's key layout too
        config = copy.deepcopy(run.model.config)  # save_pretrained wrote the fp32 of the live model
        config.dtype = run.dtype
        config.save_pretrained(tmp)
        run.processor.save_pretrained(tmp)
        progress = {"phase": phase, "step": step, "sched": sched.state_dict(), "args": asdict(args)}
        json.dump(progress, open(os.path.join(tmp, "progress.json"), "w"), indent=1)
    dcp.save(train_state(run.model, opt, run.ref), checkpoint_id=os.path.join(tmp, "train_state"))
    barrier()
    if run.rank == 0:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # a run repeated in the same --out
        os.replace(tmp, os.path.join(root, name))
        link = os.path.join(args.out, "checkpoint")
        if os.path.lexists(link + ".tmp"):  # left by a kill
            os.remove(link + ".tmp")
        os.symlink(os.path.join("checkpoints", name), link + ".tmp")
        os.replace(link + ".tmp", link)  # atomic: OUT/checkpoint is always a whole checkpoint
        for old in os.listdir(root):
            if old != name:
                shutil.rmtree(os.path.join(root, old))
    barrier()


def train_state(model, opt, ref):
    """What --resume needs beyond the weights: every rank's shards of model, optimizer (and reference)."""
    model_sd, optim_sd = dsd.get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    if ref is not None:
        state["ref"] = dsd.get_model_state_dict(ref)
    return state


def resume(model, opt, sched, ref, args):
    """Load what save_checkpoint wrote into this phase's model, optimizer, schedule (and reference)."""
    path = os.path.join(args.out, "checkpoint")
    state = train_state(model, opt, ref)
    state_path = os.path.join(path, "train_state")
    saved = dcp.FileSystemReader(state_path).read_metadata().state_dict_metadata
    if missing := sorted(set(state) - {key.split(".")[0] for key in saved}):  # "model.x.y" -> "model"
        fail(f"{path} holds no {missing[0]} state: resume with the flags it was written with (--beta)")
    # partial: a parameter that never had a gradient has no Adam state to restore (fresh zeros act the same)
    dcp.load(state, checkpoint_id=state_path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    dsd.set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ref is not None:
        dsd.set_model_state_dict(ref, state["ref"])
    sched.load_state_dict(json.load(open(os.path.join(path, "progress.json")))["sched"])


def open_metrics(out, progress):
    """OUT/metrics.jsonl, a JSON line per step; --resume first drops the lines after the checkpoint."""
    path = os.path.join(out, "metrics.jsonl")
    if progress and os.path.exists(path):
        last = (progress["phase"] == "rl", progress["step"])  # where the checkpoint stands: SFT before RL
        kept = [m for m in map(json.loads, open(path)) if (m["phase"] == "rl", m["step"]) <= last]
        open(path, "w").writelines(json.dumps(m) + "\n" for m in kept)
    metrics = open(path, "a" if progress else "w", buffering=1)

    def record(stats):
        metrics.write(json.dumps(stats) + "\n")

    return record


if __name__ == "__main__":
    main()
