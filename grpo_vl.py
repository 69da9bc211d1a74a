"""grpo-vl: GRPO reinforcement learning for vision-language models (Qwen2-VL / Qwen2.5-VL), in plain PyTorch.

GRPO in five lines: for each prompt (image + question) sample a group of G completions; score each with
rule-based rewards (G1); the advantage of a completion is its reward standardised within its group (G2) --
no value network; maximise the PPO-style clipped ratio objective (G3, G5) minus beta times a k3 estimate
of the KL to the frozen starting model (G4), averaged per sequence (G6).

Run it:
    python grpo_vl.py --variant r1zero --model tiny --data synthetic --max-steps 20   # laptop CPU, seconds
    python grpo_vl.py --variant r1zero                                                # one GPU
    torchrun --nproc_per_node=4 grpo_vl.py --variant stepgrpo --data D --sft-data S   # 4 GPUs, FSDP2
    python grpo_vl.py --eval --model runs/grpo/checkpoint --eval-data nyu-visionx/CV-Bench   # protocol E

Labels in comments (README.md's "Labels" table gives each one's paper and equation):
    G1-G9  the GRPO equations: G1 reward sum, G2 group advantage, G3 ratio, G4 k3 KL, G5 clipped
           objective, G6 aggregation, G7 policy epochs, G8 temperature, G9 completion mask
    R1-R7  the rewards (rewards.py): R1 accuracy, R2 format, R3 length, R4 StepRAR, R5 StepRVR,
           R6 HFRRF, R7 reflection rate (a metric)
    P1-P4  the prompts (data.py): P1 base model, P2 instruct, P3 step-wise, P4 Vision-R1
    I1-I10 implementation details peers got wrong: I1 one temperature, I2 left padding, I3 pixel rows,
           I4 no cut prompts, I5 no vision tokens sampled, I6 mm_token_type_ids, I7 logits only where
           needed, I8 groups aligned, I9 FSDP2 units, I10 loadable checkpoints
    table V the variants (VARIANTS below); protocol E the evaluation; PTST Vision-R1's staged RL

Deliberate simplifications:
 1. Rollouts use transformers' generate (KV cache) with the FSDP parameters gathered once per rollout,
    not a separate inference engine (vLLM): slower, but one model, one set of weights, nothing to sync.
 2. Every rank loads the full model on CPU before sharding: host RAM = ranks x model size.
 3. With mu > 1 every policy epoch uses the whole rollout batch (no minibatch shuffling, as the papers).
 4. Gradients are reduce-scattered after every micro-batch (correct, a little more communication).
 5. Logged means over ranks are means of per-rank means (equal counts per rank); trajectories are rank 0's.
"""

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist
import transformers as tf
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import state_dict as dsd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

import data
import rewards as R


# =================================================================== arguments and variants (table V)
def flag(default, help):
    """A dataclass field whose metadata carries its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    """Every flag: `--name-with-dashes`, with its help text; the variant (table V) sets the defaults."""

    variant: str = flag("r1zero", "recipe (table V): r1zero | grpo | stepgrpo | vision-r1; sets the defaults")
    model: str = flag("Qwen/Qwen2-VL-2B", "Qwen2-VL / 2.5-VL hub id or folder; tiny, tiny-2.5: offline")
    data: str = flag("array/SAT", "hub id, folder, .json(l)/.parquet/.csv file, or synthetic[:N[:Tasks]]")
    max_rows: int = flag(0, "a seeded sample of this many --data rows (SAT: single-image ones); 0 = all")
    eval_data: str = flag("nyu-visionx/CV-Bench", "evaluation data (protocol E), same forms as --data")
    out: str = flag("runs/grpo", "output folder: metrics.jsonl, trajectories/, checkpoint/, eval_*.json")
    prompt: str = flag("base", "base (P1, no chat template) | instruct (P2) | step (P3) | plain (P4)")
    rewards: str = flag(
        "accuracy,format", "G1: accuracy (R1) format (R2) step_accuracy, step_validity (R4, R5) hard_format"
    )
    length_bonus: float = flag(0.0, "R3: reward per completion token (0.001 in the VisualThinker ablation)")
    alpha: float = flag(0.1, "R4 StepRAR: weight of the share of matched key steps")
    num_generations: int = flag(8, "G: completions sampled per prompt")
    prompts_per_step: int = flag(8, "prompts per optimizer step, summed over all ranks")
    temperature: float = flag(1.0, "T: sampling temperature, also applied to every log-prob (G8)")
    max_new_tokens: int = flag(700, "cap on completion length during training")
    ptst: str = flag("", "PTST stages 'tokens:G:steps,...': cap and G per stage; replaces --max-steps")
    lr: float = flag(1e-6, "AdamW learning rate, decayed linearly to 0")
    beta: float = flag(0.04, "KL coefficient (G4/G5); 0 loads no reference model")
    mu: int = flag(1, "policy epochs per rollout batch (G7); 1 = pi_old is pi_theta detached")
    eps: float = flag(0.2, "clip range of the ratio (G5)")
    loss_agg: str = flag("seq", "seq: per completion, then mean (G6, papers) | token: over all tokens (DAPO)")
    max_grad_norm: float = flag(1.0, "gradient-norm clip")
    epochs: int = flag(2, "passes over the training data (when --max-steps is 0)")
    max_steps: int = flag(
        0, "RL steps (a rollout, then --mu policy epochs); 0 = --epochs passes over the data"
    )
    sft_data: str = flag("", "SFT data (rows with a solution, or chat rows); r1zero/grpo: empty = --data")
    sft_epochs: int = flag(0, "SFT passes over --sft-data before RL; 0 = no SFT (unless --sft-steps)")
    sft_steps: int = flag(0, "SFT optimizer steps (overrides --sft-epochs)")
    sft_only: bool = flag(False, "run the SFT phase, write OUT/checkpoint and stop")
    sft_lr: float = flag(2e-5, "SFT peak learning rate (cosine schedule after a linear warm-up)")
    sft_warmup: float = flag(0.03, "share of the SFT steps spent warming the learning rate up")
    sft_weight_decay: float = flag(0.05, "AdamW weight decay during SFT")
    sft_batch: int = flag(8, "SFT examples per optimizer step, summed over all ranks")
    max_prompt_tokens: int = flag(0, "longer prompts are bad rows, never cut (image tokens, I4); 0 = no cap")
    max_pixels: int = flag(401408, "images are resized (qwen-vl-utils) to at most this many pixels")
    micro_batch: int = flag(8, "sequences per forward/backward pass (gradients accumulate within a step)")
    precision: str = flag("auto", "bf16 | fp32 compute over fp32 master weights; auto: bf16 on GPU")
    gradient_checkpointing: bool = flag(True, "recompute activations in the backward (off for tiny)")
    gen_batch: int = flag(0, "prompts per generate() call (0: all of a rank's; 1: rank-count free)")
    vision_sharing: bool = flag(True, "each distinct image through the vision tower once, not G times")
    freeze: str = flag("", "'vision' or 'llm': stop their gradients (the r1zero ablations)")
    seed: int = flag(0, "seed of the data order, the tiny model and the rollouts")
    save_every: int = flag(0, "checkpoint every N steps (and at the end of each phase); 0 = at the ends only")
    eval_every: int = flag(0, "evaluate on --eval-data every N steps and at the end; 0 = never")
    eval: bool = flag(False, "evaluate --model on --eval-data (protocol E), write OUT/eval.json and exit")
    eval_max_new_tokens: int = flag(1024, "greedy decoding cap for evaluation (protocol E)")
    log_completions_every: int = flag(10, "write completions and rewards to OUT/trajectories/ every N steps")
    resume: bool = flag(False, "continue from OUT/checkpoint: weights, optimizer, schedule, phase, step")
    keep: int = flag(2, "checkpoints kept in OUT/checkpoints/, 0 = all (OUT/checkpoint links to the newest)")
    skip_bad_rows: bool = flag(False, "skip unusable data rows, counted by reason, instead of stopping")
    trust_remote_code: bool = flag(False, "run code shipped with a model (off: safetensors weights only)")


# Table V: each variant's defaults, as changes to the Args defaults above (which are r1zero's, but for the
# data sample). A flag given on the command line wins over both.
VARIANTS = {
    "r1zero": dict(max_rows=15000),  # VisualThinker-R1-Zero: base model, P1, R1 + R2, G 8, T 1.0, 700 tokens
    "grpo": dict(model="Qwen/Qwen2-VL-2B-Instruct", prompt="instruct", max_rows=15000),  # the baseline, P2
    "stepgrpo": dict(  # R1-VL: warm-up SFT, then StepGRPO
        model="Qwen/Qwen2-VL-2B-Instruct",
        prompt="step",
        rewards="step_accuracy,step_validity",
        num_generations=4,
        temperature=1.2,
        max_new_tokens=1024,
        max_pixels=400000,
        prompts_per_step=4,  # the paper's batch size 4
        data="",
        sft_epochs=2,
        sft_lr=1e-5,  # the paper's, for 2B (5e-6 for 7B); the released config used 2e-5
        sft_batch=128,
    ),
    "vision-r1": dict(  # Vision-R1: cold-start SFT, then GRPO under PTST
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        prompt="plain",
        rewards="hard_format",
        ptst="4096:16:100,8192:8:100",  # 100 steps per stage is our default, not a published number
        data="",
        sft_epochs=2,
        sft_lr=5e-6,
        sft_warmup=0.05,
        sft_weight_decay=0.0,
        sft_batch=32,
        micro_batch=2,  # sequences of up to 9,000 tokens on a 7B model: see the README's memory section
    ),
}
# --model tiny: a laptop run -- short completions, few prompts, offline data, an SFT lr a 0.2M model notices
TINY = dict(
    data="synthetic",
    eval_data="synthetic:64",
    max_new_tokens=96,
    prompts_per_step=4,
    eval_max_new_tokens=96,
    sft_lr=1e-2,
    sft_batch=8,
    gradient_checkpointing=False,
)


# ============================================================================ the GRPO math
def completion_mask(completion, eos):
    """G9: a completion counts up to and including its first EOS; what follows is padding.
    Returns the mask (N, C) and which completions hit the length cap (N,)."""
    is_eos = torch.isin(completion, torch.tensor(eos))
    C = completion.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), C)  # (N,) index of the first EOS
    return (torch.arange(C)[None] <= first[:, None]).float(), ~is_eos.any(1)


LOGPROB_CHUNK = 512  # completion tokens projected on the vocabulary at once: 512 x 151,936 x 4 B = 0.3 GB


def token_logprobs(model, b, T, banned, device):
    """log pi(o_t | q, o_<t) of each completion token, from logits / T with the sampling-time banned
    tokens removed: exactly the distribution the token was drawn from (G8). Returns (N, C)."""
    comp = b["completion"].to(device)
    N, C = comp.shape
    out = model(
        input_ids=torch.cat([b["input_ids"].to(device), comp], 1),
        attention_mask=torch.cat([b["attention_mask"].to(device), b["mask"].to(device).long()], 1),
        mm_token_type_ids=torch.cat([b["mm_token_type_ids"].to(device), torch.zeros_like(comp)], 1),  # I6
        pixel_values=b["pixel_values"].to(device),
        image_grid_thw=b["image_grid_thw"].to(device),
        logits_to_keep=1,  # the model's own logits: one position; ours are below
        output_hidden_states=-1,  # an index, not a bool: the last layer's (normed) states only
        use_cache=False,
    )
    h = out.hidden_states[-1][:, -C - 1 : -1].reshape(N * C, -1)  # (N*C, H): the states that predict o_1..o_C
    o = comp.reshape(N * C)
    # I7: logits at completion positions only, LOGPROB_CHUNK tokens at a time, and recomputed in the backward
    # (checkpoint) rather than kept: at 151,936 entries an (N, C, V) fp32 logits tensor is most of the memory.
    logp = []
    for s in range(0, N * C, LOGPROB_CHUNK):
        chunk = (model.lm_head, h[s : s + LOGPROB_CHUNK], o[s : s + LOGPROB_CHUNK], T, banned)
        logp.append(checkpoint(chunk_logprobs, *chunk, use_reentrant=False))
    if not torch.is_grad_enabled() and isinstance(model, FSDPModule):
        model.reshard()  # no backward follows (reference, pi_old): free the root's gathered parameters (I9)
    return torch.cat(logp).view(N, C)


def chunk_logprobs(lm_head, h, o, T, banned):
    """log-softmax of logits / T at n positions, read at the tokens o: (n, H), (n,) -> (n,)."""
    logits = lm_head(h).float() / T  # (n, V)
    logits[:, banned] = float("-inf")  # never sampled (I5), so not part of the distribution either
    return logits.gather(-1, o[:, None]).squeeze(-1) - logits.logsumexp(-1)


def group_advantages(r, G):
    """G2: A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4), unbiased std, one A_i per completion.
    A group whose rewards are all equal teaches nothing: A = 0 exactly; frac_zero_std counts them."""
    r = r.view(-1, G)  # (P, G)
    A = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    flat = r.max(1).values == r.min(1).values  # (P,)
    return A.masked_fill(flat[:, None], 0.0).view(-1), flat.float().mean().item()


def grpo_loss(logp, old, ref, A, mask, args, n_completions, n_tokens):
    """The loss of one micro-batch: -J, with the per-token objective (G3-G5)
        L_it = min(rho_it * A_i, clip(rho_it, 1-eps, 1+eps) * A_i) - beta * D_it,
        rho_it = exp(logp - old) (G3),   D_it = exp(ref - logp) - (ref - logp) - 1 >= 0 (G4, k3),
    aggregated as G6: J = (1/G) sum_i (1/|o_i|) sum_t L_it, averaged over prompts (--loss-agg seq, the
    papers), or sum_it L_it / sum_i |o_i| (token, DAPO). Over ranks: each rank divides by its own number of
    completions (seq) or by the mean number of completion tokens per rank (token), and FSDP2 averages the
    gradients over ranks, so the gradient is the one of the global mean. n_completions and n_tokens are
    those denominators. Returns the loss, D (N, C) and where clipping changed L (N, C)."""
    ratio = torch.exp(logp - old)  # (N, C) G3
    surrogate = torch.min(ratio * A[:, None], ratio.clamp(1 - args.eps, 1 + args.eps) * A[:, None])  # G5
    D = torch.exp(ref - logp) - (ref - logp) - 1 if ref is not None else torch.zeros_like(logp)  # G4
    L = surrogate - args.beta * D
    per_seq = torch.where(mask.bool(), L, 0.0).sum(1)  # padding zeroed, even an inf there (not 0 * inf)
    if args.loss_agg == "seq":
        loss = -(per_seq / mask.sum(1).clamp(min=1)).sum() / n_completions
    else:
        loss = -per_seq.sum() / n_tokens
    # the clipped term wins (and the gradient is cut) only past 1+eps with A > 0, or below 1-eps with A < 0
    clipped = ((ratio > 1 + args.eps) & (A[:, None] > 0)) | ((ratio < 1 - args.eps) & (A[:, None] < 0))
    return loss, D, clipped.float()


# ============================================================================ the rollout
@torch.no_grad()
def rollout(model, processor, exs, args, eos, banned, device, seed):
    """Sample G completions per prompt (G8) with the KV cache. Returns one batch per generate() call, each
    with its completions, their G9 masks and "idx": completion j of this rank answers prompt j // G (I8)."""
    G = args.num_generations
    n = args.gen_batch or len(exs)
    batches = []
    with gathered(model):
        for start in range(0, len(exs), n):
            chunk = exs[start : start + n]
            groups = torch.arange(len(chunk)).repeat_interleave(G)  # 0,0,..,0, 1,1,..: never .repeat (I3)
            b = take(encode(processor, chunk, args), groups)  # (P*G, L)
            b["idx"] = torch.arange(start * G, (start + len(chunk)) * G)
            torch.manual_seed(seed + start)  # --gen-batch 1: the prompt's global index, not the rank count
            with shared_vision(b, args, model):  # the prefill encodes each prompt's image once
                seqs = model.generate(**{k: b[k].to(device) for k in MODEL_KEYS}, **sampling(args, banned))
            b["completion"] = seqs[:, b["input_ids"].shape[1] :].cpu()  # (P*G, C)
            b["mask"], b["truncated"] = completion_mask(b["completion"], eos)
            batches.append(b)
    return batches


def sampling(args, banned):
    """Plain sampling at T (G8, I1): transformers' top_k=50 default or a hub config would change it."""
    return dict(
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        max_new_tokens=args.max_new_tokens,
        suppress_tokens=banned,
    )


def completion_text(text, args):
    """What the rewards read: P1 ends its prompt with an opened <think>, so put it back (R2)."""
    return "<think>" + text if args.prompt == "base" else text


# ============================================================================ the training loop
def main(argv=None):
    args = parse_args(argv)
    rank, world, device, mesh = init_distributed()
    log = print if rank == 0 else ignore  # rank 0 alone prints and writes
    os.makedirs(args.out, exist_ok=True)
    # The data first: a mistake in it ends the run in seconds, not after the model has loaded
    sft_on = (args.sft_epochs or args.sft_steps or args.sft_only) and not args.eval
    rl_on = not (args.eval or args.sft_only)
    sft_exs = load_examples_or_exit(args.sft_data or args.data, "train", args, sft=True) if sft_on else None
    exs = load_examples_or_exit(args.data, "train", args, args.max_rows) if rl_on else None
    eval_exs = load_examples_or_exit(args.eval_data, "test", args) if args.eval or args.eval_every else None
    model, ref, processor, eos, banned = prepare_models(args, device, mesh)
    # One process: bf16 autocast over the fp32 weights, as FSDP's mixed-precision policy does under torchrun.
    bf16_autocast = use_bf16(args, device) and mesh is None
    amp = torch.autocast(device.type, torch.bfloat16) if bf16_autocast else contextlib.nullcontext()
    run = dict(processor=processor, eos=eos, banned=banned, device=device, rank=rank, world=world, amp=amp)
    if args.eval:
        run_eval(model, eval_exs, args, run, "eval")
        return barrier(finish=True)

    # --resume picks up where OUT/checkpoint left off: {"phase", "step", "sched", "args"}
    saved = os.path.join(args.out, "checkpoint", "progress.json")
    progress = json.load(open(saved)) if args.resume and os.path.exists(saved) else None
    record = open_metrics(args.out, progress) if rank == 0 else ignore
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"{args.variant}: {args.model} ({n_params:.1f}M parameters), {world} rank(s), {device} -> {args.out}")
    if progress:
        log(f"resuming after {progress['phase']} step {progress['step']}")
    # ---- 0. warm-up (R1-VL) / cold-start (Vision-R1) SFT; the RL reference is the model it leaves (G4)
    in_rl = progress is not None and progress["phase"] == "rl"
    if progress and not in_rl and not sft_on:
        fail("OUT/checkpoint is an SFT checkpoint: --resume with its SFT flags, or start RL with --model it")
    if sft_on and not in_rl:
        sft_exs = within_prompt_cap(sft_exs, args.sft_data or args.data, args, processor)
        sft(model, sft_exs, args, run, record, progress)
        if ref is not None:
            ref.load_state_dict(model.state_dict())
        if args.sft_only:
            return barrier(finish=True)
    exs = within_prompt_cap(exs, args.data, args, processor)
    P = args.prompts_per_step
    # PTST (Vision-R1): stages of (completion cap, G, steps); without it, one stage of the plain flags
    plain_steps = args.max_steps or args.epochs * (len(exs) // P)
    stages = parse_ptst(args.ptst) or [(args.max_new_tokens, args.num_generations, plain_steps)]
    steps = sum(n for _, _, n in stages)
    if steps == 0:
        fail(f"{args.data}: {len(exs)} usable rows, fewer than --prompts-per-step {P}: no RL step to take")
    order = data_order(len(exs), steps * P, args.seed)
    reward_fns = {name: R.REWARDS[name] for name in args.rewards.split(",")}  # G1's terms; R3, R4 take flags
    if "step_accuracy" in reward_fns:
        reward_fns["step_accuracy"] = functools.partial(R.step_accuracy, alpha=args.alpha)
    if args.length_bonus:
        reward_fns["length"] = functools.partial(R.length_bonus, per_token=args.length_bonus)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(linear_decay, steps=steps))
    log(f"GRPO: {steps} steps x {P} prompts, rewards {', '.join(reward_fns)}")
    if in_rl:
        resume(model, opt, sched, ref, args)
    elif args.eval_every:  # the starting point of RL, which the later evaluations are measured against
        run_eval(model, eval_exs, args, run, "eval_step0")
    for step in range(progress["step"] + 1 if in_rl else 1, steps + 1):
        t0 = time.time()
        stage, stage_args = ptst_stage(args, stages, step)  # the same prompts per step; G and the cap change
        G = stage_args.num_generations
        if step == 1 or ptst_stage(args, stages, step - 1)[0] != stage:
            log(f"stage {stage + 1}: up to {stage_args.max_new_tokens} new tokens, G = {G}, from step {step}")
        # ---- 1. rollout: this rank's prompts of the step, G completions each (groups never split over ranks)
        mine = [exs[i] for i in my_share(order, step, P, rank, world)]
        seed = args.seed + 1_000_003 * step + rank * P // world  # + this rank's first prompt of the step
        with amp:
            batches = rollout(model, processor, mine, stage_args, eos, banned, device, seed)
        t1 = time.time()
        # ---- 2. reward (G1): the sum of the variant's rewards
        texts = []
        for b in batches:
            texts += [completion_text(t, args) for t in processor.batch_decode(b["completion"], True)]
        ex_of = [mine[j // G] for j in range(len(texts))]  # I8: completion j answers prompt j // G
        n_tok = torch.cat([b["mask"].sum(1) for b in batches]).tolist()  # completion lengths (G9)
        per_fn = {}
        for name, fn in reward_fns.items():
            per_fn[name] = torch.tensor([fn(t, ex, n) for t, ex, n in zip(texts, ex_of, n_tok)])
        r = sum(per_fn.values())  # (P_local*G,) G1
        # ---- 3. advantage (G2), within each group
        A, frac_zero_std = group_advantages(r, G)
        t2 = time.time()
        # ---- 4. reference (G4) and old (G7) log-probs, no grad, in micro-batches
        micro = [mb for b in batches for mb in split(b, args.micro_batch)]
        for mb in micro:
            with torch.no_grad(), amp, shared_vision(mb, stage_args, ref, model):  # each image encoded once
                mb["ref"] = None
                mb["old"] = None  # mu = 1: pi_old is pi_theta itself, detached below; no extra forward (G7)
                if ref is not None:
                    mb["ref"] = token_logprobs(ref, mb, args.temperature, banned, device)
                if args.mu > 1:
                    mb["old"] = token_logprobs(model, mb, args.temperature, banned, device)
        t3 = time.time()
        # ---- 5. policy update: mu epochs over the rollout batch (G5, G6)
        n_tokens = sum(mb["mask"].sum() for mb in micro).item()  # this rank's completion tokens
        n_tokens_per_rank = over_ranks({"n": n_tokens}, device)["n"]  # the token mean's denominator (G6)
        for epoch in range(args.mu):
            opt.zero_grad(set_to_none=True)
            kl = clip_frac = loss_sum = 0.0
            for mb in micro:
                mask = mb["mask"].to(device)
                with amp, shared_vision(mb, stage_args, model):  # G copies' gradients sum into one encoding
                    logp = token_logprobs(model, mb, args.temperature, banned, device)  # (n, C)
                old = logp.detach() if mb["old"] is None else mb["old"]  # G7: rho = 1 at mu = 1
                A_mb = A[mb["idx"]].to(device)  # the advantages of this micro-batch's completions
                loss, D, clipped = grpo_loss(
                    logp, old, mb["ref"], A_mb, mask, args, len(r), n_tokens_per_rank
                )
                loss.backward()
                loss_sum += loss.item()
                kl += (torch.where(mask.bool(), D, 0.0).sum() / n_tokens).item()
                clip_frac += (torch.where(mask.bool(), clipped, 0.0).sum() / n_tokens).item()
            grad_norm = clip_and_step(params, opt, args.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        t4 = time.time()
        # ---- 6. log: means over ranks; kl, clip_frac, loss, grad_norm of the last policy epoch. At mu = 1
        # and seq aggregation the loss is ~beta*KL (rho = 1, A sums to 0 in a group); its gradient is not 0
        stats = {f"rewards/{name}": values.mean().item() for name, values in per_fn.items()}
        stats["reward"] = r.mean().item()
        stats["reward_std"] = r.view(-1, G).std(1).mean().item()
        stats["frac_zero_std"] = frac_zero_std
        stats["completion_len"] = sum(n_tok) / len(n_tok)
        stats["kl"] = kl
        stats["clip_frac"] = clip_frac
        stats["loss"] = loss_sum
        stats["truncated_frac"] = torch.cat([b["truncated"] for b in batches]).float().mean().item()
        stats["reflection_rate"] = sum(R.reflects(t) for t in texts) / len(texts)  # R7
        stats = over_ranks(stats, device)
        stats["step"] = step
        stats["phase"] = "rl"
        stats["stage"] = stage + 1
        stats["max_new_tokens"] = stage_args.max_new_tokens
        stats["num_generations"] = G
        stats["grad_norm"] = grad_norm
        stats["lr"] = lr
        stats["step_time"] = time.time() - t0
        stats["time/rollout"] = t1 - t0
        stats["time/reward"] = t2 - t1
        stats["time/ref_old"] = t3 - t2
        stats["time/update"] = t4 - t3
        stats["completion_len_max"] = over_ranks({"m": max(n_tok)}, device, dist.ReduceOp.MAX)["m"]
        record(stats)
        terms = " ".join(f"{name} {stats['rewards/' + name]:.3f}" for name in per_fn)
        log(
            f"step {step}/{steps} | reward {stats['reward']:.3f} (std {stats['reward_std']:.2f}, zero-std "
            f"{stats['frac_zero_std']:.2f}) | {terms} | len {stats['completion_len']:.0f} (cut "
            f"{stats['truncated_frac']:.0%}) | kl {stats['kl']:.2e} | {stats['step_time']:.1f}s"
        )
        if rank == 0 and args.log_completions_every and (step == 1 or step % args.log_completions_every == 0):
            write_trajectories(args.out, step, texts, ex_of, n_tok, per_fn, A)
        # ---- 7. evaluate and checkpoint
        if args.eval_every and (step % args.eval_every == 0 or step == steps):
            run_eval(model, eval_exs, args, run, f"eval_step{step}")
        if step == steps or (args.save_every and step % args.save_every == 0):
            save_checkpoint(model, opt, sched, ref, processor, args, "rl", step, rank)
    barrier(finish=True)


def linear_decay(s, steps):
    """The RL learning-rate factor after s steps (one rollout each): 1 at the start, 0 at the end."""
    return 1 - s / steps


def write_trajectories(out, step, texts, ex_of, n_tok, per_fn, A):
    """OUT/trajectories/step_N.jsonl: rank 0's completions and rewards, where an 'aha moment' is read."""
    os.makedirs(os.path.join(out, "trajectories"), exist_ok=True)
    with open(os.path.join(out, "trajectories", f"step_{step:06d}.jsonl"), "w") as f:
        for i, (text, ex) in enumerate(zip(texts, ex_of)):
            row = {"question": ex["question"], "answer": ex["answer"], "completion": text, "tokens": n_tok[i]}
            row["rewards"] = {name: values[i].item() for name, values in per_fn.items()}
            row["advantage"] = A[i].item()
            f.write(json.dumps(row) + "\n")


# ============================================================================ engineering: set-up
def init_distributed():
    """(rank, world, device, mesh). Under torchrun one process per device and FSDP2 over all of them (nccl
    on GPUs, gloo on CPU); a plain `python grpo_vl.py` uses no process group and no mesh."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world == 1:
        return rank, world, device, None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device, init_device_mesh(device.type, (world,))


def ignore(*args, **kwargs):
    """What printing and recording are on ranks other than 0."""


def barrier(finish=False):
    if dist.is_initialized():
        dist.barrier()  # also before destroying the group: a teardown race was seen without it
        if finish:
            dist.destroy_process_group()


def over_ranks(stats, device, op=dist.ReduceOp.SUM):
    """Each value's mean over ranks (ranks hold equal numbers of completions), or its max."""
    if dist.is_initialized():
        t = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        if op == dist.ReduceOp.SUM:
            t = t / dist.get_world_size()
        stats = dict(zip(stats, t.tolist()))
    return stats


def prepare_models(args, device, mesh):
    """The policy (trainable, fp32 master weights) and the frozen reference (G4; none when beta = 0), each
    sharded with FSDP2 under torchrun, with the run's freezing, checkpointing and precision."""
    model, processor, eos, banned = load_model(args)
    ref = None
    if args.beta > 0 and not args.eval:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    # the r1zero ablations, really frozen (the released flag assigned to a method, froze nothing)
    if args.freeze == "vision":
        model.model.visual.requires_grad_(False)
    if args.freeze == "llm":
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if args.gradient_checkpointing:  # non-reentrant: the kind that composes with FSDP2
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing acts in training mode only; generate() runs in eval mode (gathered)
    for m in (model, ref):
        if m is not None and mesh is not None:
            shard(m, mesh, device, use_bf16(args, device))
        elif m is not None:
            m.to(device)
    return model, ref, processor, eos, banned


def parse_ptst(spec):
    """'4096:16:100,8192:8:100' -> [(4096, 16, 100), (8192, 8, 100)]: (completion cap, G, steps) per stage."""
    if not spec:
        return []
    return [tuple(int(n) for n in stage.split(":")) for stage in spec.split(",")]


def ptst_stage(args, stages, step):
    """PTST (Vision-R1): the stage (0-based) that step is in, and a copy of args with that stage's
    completion cap and G; args itself is not changed."""
    end = 0
    for stage, (cap, G, n) in enumerate(stages):
        end += n  # the stage's last step
        if step <= end:
            return stage, replace(args, max_new_tokens=cap, num_generations=G)


def open_metrics(out, progress):
    """OUT/metrics.jsonl, one JSON line per step, flushed line by line. On --resume the lines written after
    the checkpoint are dropped first, so the file reads as if the run had never stopped."""
    path = os.path.join(out, "metrics.jsonl")
    if progress and os.path.exists(path):
        kept = [line for line in open(path) if position(json.loads(line)) <= position(progress)]
        open(path, "w").writelines(kept)
    metrics = open(path, "a" if progress else "w", buffering=1)

    def record(stats):
        metrics.write(json.dumps(stats) + "\n")

    return record


def position(entry):
    """Where a metrics line or a checkpoint stands in the run: SFT before RL, then the step."""
    return (entry["phase"] == "rl", entry["step"])


def parse_args(argv=None):
    """Flags from the dataclass Args; variant defaults, then the flags given, win in that order."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Args):
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        p.add_argument(
            "--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, help=f.metadata["help"], **kind
        )
    given = vars(p.parse_args(argv))
    variant = given.get("variant", Args.variant)
    if variant not in VARIANTS:
        p.error(f"--variant {variant!r} is not one of {', '.join(VARIANTS)}")
    tiny = given.get("model", "").startswith("tiny")
    defaults = {**VARIANTS[variant], **(TINY if tiny else {})}
    args = Args(**{**defaults, **given})
    for name, values, allowed in [
        ("--rewards", args.rewards.split(","), R.REWARDS),
        ("--prompt", [args.prompt], data.PROMPT_STYLES),
        ("--loss-agg", [args.loss_agg], ("seq", "token")),
        ("--freeze", [args.freeze], ("", "vision", "llm")),
        ("--precision", [args.precision], ("auto", "bf16", "fp32")),
    ]:
        if bad := [v for v in values if v not in allowed]:
            p.error(f"{name} {bad[0]!r}: expected one of {', '.join(map(repr, allowed))}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.prompts_per_step % world or args.sft_batch % world:
        p.error(f"--prompts-per-step and --sft-batch must divide by the {world} ranks")
    if not tiny and not os.path.isdir(args.model) and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.model):
        p.error(f"--model {args.model!r}: no such folder, and not a hub id (owner/name)")
    if not args.data:
        p.error(f"--variant {args.variant} needs --data (rows: problem, image, solution, key_steps)")
    if args.sft_only and not (args.sft_epochs or args.sft_steps):
        p.error("--sft-only needs --sft-epochs or --sft-steps")
    sft_on = args.sft_epochs or args.sft_steps or args.sft_only
    if sft_on and not args.sft_data and args.variant in ("stepgrpo", "vision-r1"):  # warm-up set != RL set
        p.error(f"--variant {args.variant} needs --sft-data (or --sft-epochs 0 for no SFT)")
    stage = r"[1-9]\d*:[1-9]\d*:[1-9]\d*"
    if args.ptst and not re.fullmatch(rf"{stage}(,{stage})*", args.ptst):
        p.error(f"--ptst {args.ptst!r}: expected tokens:G:steps stages, as 4096:16:100,8192:8:100")
    if min([args.num_generations] + [G for _, G, _ in parse_ptst(args.ptst)]) < 2:
        p.error("--num-generations (and each PTST stage's G) must be at least 2: a lone completion has no G2")
    if args.mu < 1:
        p.error(f"--mu {args.mu}: at least 1 policy epoch per rollout batch (G7)")
    return args


# ============================================================================ engineering: FSDP2 (I9)
def use_bf16(args, device):
    """--precision: bf16 compute over fp32 master weights (auto: on GPU), or fp32 throughout."""
    return args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")


def shard(model, mesh, device, bf16):
    """fully_shard each vision block, each decoder layer, the vision tower, then the root. With bf16:
    bf16 compute over fp32 master weights, fp32 gradient reduction (lr 1e-6 updates vanish in bf16)."""
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for module in [*model.model.visual.blocks, *model.model.language_model.layers, model.model.visual, model]:
        fully_shard(module, mesh=mesh, mp_policy=mp)
    # FSDP takes the first module to run forward as its root; transformers' generate runs the vision tower
    # alone first. A text-only forward through the root settles it. Reshard after it: the root stays
    # gathered after a forward, and an optimizer built now would hold those copies, not the shards.
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    model.reshard()
    return model


@contextlib.contextmanager
def gathered(model):
    """For generate(): eval mode, since gradient checkpointing (a training-mode feature) turns the KV cache
    off; under FSDP, the parameters gathered once for the whole call. Without that every generated token
    all-gathers every layer, and a rank that finishes early would leave the others waiting on it."""
    was_training = model.training
    model.eval()
    sharded = isinstance(model, FSDPModule)
    if sharded:
        model.set_reshard_after_forward(False)  # recursively: keep them gathered between forwards
        model.unshard()
    yield
    if sharded:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root stays gathered, as FSDP's default
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
    model.train(was_training)


@contextlib.contextmanager
def shared_vision(batch, args, *models):
    """Each model's vision tower encodes each distinct image of `batch` once, not once per sequence: a
    group's G sequences hold copies of one image (batch["image_src"] names the copies, I3). The one encoding
    goes to all G, so autograd sums their G gradients into it and back-propagates the sum through the tower
    once -- by linearity, the sum of G backward passes: the gradient is exact. Only get_image_features is
    replaced; the tower is still called as a module, so FSDP2's hooks gather and reshard it (I9)."""
    src = batch["image_src"].tolist()
    distinct = list(dict.fromkeys(src))  # in order of first appearance
    first = [src.index(s) for s in distinct]  # one copy of each

    def encode_distinct(get_image_features, pixel_values, image_grid_thw, **kwargs):
        pixels = pixel_values.split(image_grid_thw.prod(-1).tolist())  # one block of rows per image
        out = get_image_features(torch.cat([pixels[i] for i in first]), image_grid_thw[first], **kwargs)
        out.pooler_output = [out.pooler_output[distinct.index(s)] for s in src]  # copies share one tensor
        return out

    models = [m for m in models if m is not None] if args.vision_sharing else []
    for m in models:  # an instance attribute is found before the class's method, by forward and generate
        m.model.get_image_features = functools.partial(encode_distinct, m.model.get_image_features)
    try:
        yield
    finally:
        for m in models:
            del m.model.get_image_features


# ============================================================================ engineering: batches (I3)
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def take(batch, idx):
    """Sequences `idx` of a batch. pixel_values holds one row per image patch of all the batch's images,
    concatenated (I3): cut it per image by image_grid_thw.prod(-1), then pick the chosen sequences' images."""
    idx = torch.as_tensor(idx)
    pixels = torch.split(batch["pixel_values"], batch["image_grid_thw"].prod(-1).tolist())  # one per image
    images_of = torch.split(torch.arange(len(pixels)), batch["n_images"].tolist())  # each sequence's images
    images = torch.cat([images_of[i] for i in idx.tolist()])  # (n,) the chosen sequences' images, in order
    out = {k: v[idx] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw", "image_src")}
    out["image_grid_thw"] = batch["image_grid_thw"][images]
    out["image_src"] = batch["image_src"][images]
    out["pixel_values"] = torch.cat([pixels[i] for i in images.tolist()])
    return out


def encode(processor, exs, args):
    return {
        **data.encode(processor, exs, args.prompt, args.max_pixels),
        "n_images": torch.tensor([len(ex["images"]) for ex in exs]),
        "image_src": torch.arange(sum(len(ex["images"]) for ex in exs)),  # which image; copies keep it
    }


def split(b, size):
    """Micro-batches of `size` sequences (gradient accumulation)."""
    n = len(b["completion"])
    return [take(b, torch.arange(s, min(s + size, n))) for s in range(0, n, size)]


def data_order(n, needed, seed):
    """The data order: one seeded permutation per epoch, as many epochs as `needed` takes."""
    return [
        i for epoch in range(math.ceil(needed / n)) for i in random.Random(seed + epoch).sample(range(n), n)
    ]


def my_share(order, step, n, rank, world):
    """This rank's part of step `step`'s n examples (a prompt's G completions stay on one rank)."""
    return order[(step - 1) * n : step * n][rank * n // world : (rank + 1) * n // world]


# ============================================================================ engineering: SFT
def sft_batch(processor, exs, args):
    """An SFT batch in the rollout layout: the prompt exactly as RL sees it, and the target as the
    'completion', whose mask covers the target tokens and the closing EOS -- never the prompt or image."""
    b = encode(processor, exs, args)
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|endoftext|>" if args.prompt == "base" else "<|im_end|>")
    ids = [tok(data.sft_target(ex, args.prompt), add_special_tokens=False)["input_ids"] + [end] for ex in exs]
    C = max(len(x) for x in ids)
    b["completion"] = torch.tensor([x + [tok.pad_token_id] * (C - len(x)) for x in ids])  # (B, C)
    b["mask"] = (torch.arange(C)[None] < torch.tensor([len(x) for x in ids])[:, None]).float()
    return b


def sft(model, exs, args, run, record, progress):
    """Next-token cross-entropy on the target tokens (a token mean over all ranks); AdamW with weight
    decay, linear warm-up then cosine decay. The target is scored exactly as RL scores a completion."""
    device, rank, world = run["device"], run["rank"], run["world"]
    n = args.sft_batch
    steps = args.sft_steps or args.sft_epochs * max(len(exs) // n, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.sft_lr, weight_decay=args.sft_weight_decay)
    warm = max(1, round(args.sft_warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(warmup_cosine, warm=warm, steps=steps))
    order = data_order(len(exs), steps * n, args.seed)
    if rank == 0:
        print(f"SFT: {steps} steps x {n} examples, lr {args.sft_lr}")
    if progress and progress["phase"] == "sft":
        resume(model, opt, sched, None, args)
    for step in range(progress["step"] + 1 if progress else 1, steps + 1):
        t0 = time.time()
        b = sft_batch(run["processor"], [exs[i] for i in my_share(order, step, n, rank, world)], args)
        n_tok = over_ranks({"n": b["mask"].sum().item()}, device)["n"]  # mean target tokens per rank
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for mb in split(b, args.micro_batch):  # / mean tokens per rank, then FSDP's mean = the token mean
            with run["amp"]:
                logp = token_logprobs(model, mb, 1.0, run["banned"], device)
                nll = -(logp * mb["mask"].to(device)).sum() / n_tok
            nll.backward()
            loss += nll.item()
        grad_norm = clip_and_step(params, opt, args.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        loss = over_ranks({"loss": loss}, device)["loss"]
        seconds = time.time() - t0
        stats = {"phase": "sft", "step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr}
        stats["tokens"] = n_tok * world
        stats["step_time"] = seconds
        record(stats)
        if rank == 0:
            print(f"sft {step}/{steps} | loss {loss:.4f} | lr {lr:.2e} | {seconds:.1f}s")
        if step == steps or (args.save_every and step % args.save_every == 0):
            save_checkpoint(model, opt, sched, None, run["processor"], args, "sft", step, rank)


def warmup_cosine(s, warm, steps):
    """The SFT learning-rate factor at step s: a linear warm-up over `warm` steps, then a cosine decay."""
    if s < warm:
        return (s + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(steps - warm, 1)))


def clip_and_step(params, opt, max_norm):
    """Clip the gradient norm, then step -- unless it is not finite: then stop; the last checkpoint stays."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.item()
    if not math.isfinite(grad_norm):
        raise SystemExit(f"error: gradient norm {grad_norm}; stopped (OUT/checkpoint: the last good weights)")
    opt.step()
    return grad_norm


# ======================================================================= engineering: evaluation (protocol E)
def run_eval(model, exs, args, run, name):
    """Protocol E on --eval-data, printed and written to OUT/<name>.json by rank 0."""
    with run["amp"]:
        report = evaluate(model, exs, args, run)
    if run["rank"] == 0:
        print(f"{name}: {json.dumps(report)}")
        json.dump(report, open(os.path.join(args.out, f"{name}.json"), "w"), indent=1)


@torch.no_grad()
def evaluate(model, exs, args, run):
    """Greedy decoding; an answer is right as the variant's reward judges it. Accuracy overall (micro), per
    task, and CV-Bench's combined score ((ADE20K + COCO)/2 + Omni3D)/2."""
    processor, device = run["processor"], run["device"]
    mine = exs[run["rank"] :: run["world"]]
    results = []
    with gathered(model):
        for s in range(0, len(mine), 16):
            chunk = mine[s : s + 16]
            b = encode(processor, chunk, args)
            seqs = model.generate(
                **{k: b[k].to(device) for k in MODEL_KEYS},
                do_sample=False,
                max_new_tokens=args.eval_max_new_tokens,
                suppress_tokens=run["banned"],
            )
            o = seqs[:, b["input_ids"].shape[1] :].cpu()  # the completions
            lengths = completion_mask(o, run["eos"])[0].sum(1)  # counted as G9 counts them
            for ex, text, n in zip(chunk, processor.batch_decode(o, True), lengths):
                correct, formatted = judge(completion_text(text, args), ex, args.prompt)
                result = {"task": ex["task"], "source": ex["source"], "correct": correct, "format": formatted}
                result["length"] = float(n)
                results.append(result)
    if run["world"] > 1:  # every rank's results
        everyone = [None] * run["world"]
        dist.all_gather_object(everyone, results)
        results = [r for rs in everyone for r in rs]
    report = {"n": len(results)}
    report["accuracy"] = mean(r["correct"] for r in results)
    report["format"] = mean(r["format"] for r in results)
    report["completion_len"] = mean(r["length"] for r in results)
    tasks = sorted({r["task"] for r in results})
    report["per_task"] = {t: mean(r["correct"] for r in results if r["task"] == t) for t in tasks}
    if {"ADE20K", "COCO", "Omni3D"} <= {r["source"] for r in results}:
        by_source = {
            s: mean(r["correct"] for r in results if r["source"] == s) for s in ("ADE20K", "COCO", "Omni3D")
        }
        report["cvbench_combined"] = ((by_source["ADE20K"] + by_source["COCO"]) / 2 + by_source["Omni3D"]) / 2
    return report


def mean(values):
    values = list(values)
    return sum(values) / max(len(values), 1)


def judge(text, ex, style):
    """(correct, well formatted), as the variant's rewards read it: P3 sections (R4/R5), else tags (R1/R2)."""
    if style == "step":
        return float(R.is_correct(R.step_answer(text), ex)), R.step_validity(text)
    return R.accuracy(text, ex), R.think_answer_format(text)


# ============================================================================ engineering: checkpoints
def save_checkpoint(model, opt, sched, ref, processor, args, phase, step, rank):
    """OUT/checkpoints/<phase>-<step>/ (I10): the model for any transformers user (gathered on rank 0, written
    with save_pretrained) and, for --resume, every rank's shards of model, optimizer and reference
    (torch.distributed.checkpoint) with the schedule. Written to a temporary folder, then renamed: a kill
    mid-write leaves the previous checkpoint whole. OUT/checkpoint links to the newest; --keep are kept."""
    root = os.path.join(args.out, "checkpoints")
    name = f"{phase}-{step:06d}"
    tmp = os.path.join(root, ".tmp-" + name)
    options = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = dsd.get_model_state_dict(model, options=options)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        with transformers_class(model):
            model.save_pretrained(tmp, state_dict=full)
        processor.save_pretrained(tmp)
        progress = {"phase": phase, "step": step, "sched": sched.state_dict(), "args": asdict(args)}
        json.dump(progress, open(os.path.join(tmp, "progress.json"), "w"), indent=1)
    model_sd, optim_sd = dsd.get_state_dict(model, opt)
    train_state = {"model": model_sd, "optim": optim_sd}
    if ref is not None:
        train_state["ref"] = dsd.get_model_state_dict(ref)
    dcp.save(train_state, checkpoint_id=os.path.join(tmp, "train_state"))
    barrier()
    if rank == 0:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # a run repeated in the same --out
        os.replace(tmp, os.path.join(root, name))  # atomic on POSIX
        link = os.path.join(args.out, "checkpoint")
        if os.path.lexists(link + ".tmp"):  # left by a kill
            os.remove(link + ".tmp")
        os.symlink(os.path.join("checkpoints", name), link + ".tmp")
        os.replace(link + ".tmp", link)
        done = [d for d in os.listdir(root) if not d.startswith(".")]
        done.sort(key=lambda d: os.path.getmtime(os.path.join(root, d)))
        for old in done[: -args.keep]:
            shutil.rmtree(os.path.join(root, old))
    barrier()


@contextlib.contextmanager
def transformers_class(model):
    """FSDP2 gives a sharded model a class of its own, FSDP<Name>, whose method resolution order is
    (FSDP<Name>, FSDPModule, <Name>, ...). save_pretrained writes the hub's key layout only for transformers'
    own classes, so for the call the model wears <Name> again."""
    cls = type(model)
    if isinstance(model, FSDPModule):
        model.__class__ = cls.__mro__[2]
    yield model
    model.__class__ = cls


def resume(model, opt, sched, ref, args):
    """Load what save_checkpoint wrote into this phase's model, optimizer, schedule (and reference)."""
    path = os.path.join(args.out, "checkpoint")
    model_sd, optim_sd = dsd.get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    if ref is not None:
        state["ref"] = dsd.get_model_state_dict(ref)
    # partial: a parameter that never had a gradient has no Adam state to restore (fresh zeros act the same)
    planner = dcp.DefaultLoadPlanner(allow_partial_load=True)
    dcp.load(state, checkpoint_id=os.path.join(path, "train_state"), planner=planner)
    dsd.set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ref is not None:
        dsd.set_model_state_dict(ref, state["ref"])
    sched.load_state_dict(json.load(open(os.path.join(path, "progress.json")))["sched"])


# ============================================================================ engineering: data
def fail(message):
    """A mistake in the input ends the run: one line naming it, exit status 2 (as for a bad flag)."""
    print(f"grpo_vl.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_examples_or_exit(spec, which, args, max_rows=0, sft=False):
    """data.load_examples, before any model is loaded: a missing or unreadable file, bad JSON, an unknown
    schema or a bad row (for SFT also a row with nothing to learn from) ends the run: one line, exit 2."""
    try:
        exs = data.load_examples(spec, which, args.seed, args.skip_bad_rows, max_rows)
        if sft:
            bad = [ex["row"] for ex in exs if not (ex.get("solution") or ex.get("target"))]
            why = "no 'solution' or assistant turn to learn from"
        else:
            bad = [ex["row"] for ex in exs if ex["answer"] is None]
            why = "no answer to reward (chat rows are SFT data)"
        if bad:
            raise ValueError(f"data set {spec!r}, row {bad[0]}: {why}")
        return exs
    except (ValueError, OSError) as e:
        fail(e)


def within_prompt_cap(exs, spec, args, processor):
    """A prompt is never cut, since it holds image tokens (I4): one over --max-prompt-tokens, measured through
    the processor, is a bad row: it ends the run (exit 2), or with --skip-bad-rows is skipped and counted."""
    if not args.max_prompt_tokens:
        return exs
    kept = []
    for ex in exs:
        n = encode(processor, [ex], args)["input_ids"].shape[1]
        if n <= args.max_prompt_tokens:
            kept.append(ex)
        elif not args.skip_bad_rows:
            fail(data.BadRow(spec, ex["row"], "question", f"{n} tokens > --max-prompt-tokens"))
    if len(kept) < len(exs):
        print(f"{spec}: skipped {len(exs) - len(kept)} rows whose prompts are over --max-prompt-tokens")
    return kept


# ============================================================================ engineering: models
TINY_TEMPLATE = (  # Qwen2-VL's chat template, minus the default system turn
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]  # never sampled (I5)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"] + VISION_TOKENS  # Qwen2-VL's


def build_tiny(seed=0, hidden=64, layers=2, qwen25=False, tower=None):
    """A random-weight Qwen2-VL or Qwen2.5-VL (~0.2M parameters) with a byte-level BPE tokenizer trained on
    the spot on the prompts and the synthetic task: real processor, real model class, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rows = data.synthetic_rows(200, 12345)
    corpus = [data.P1 + data.P2 + data.P3] + [r["prompt"] for r in rows] + [r["solution"] for r in rows]
    corpus += ["<think> I see the image. Wait, let me check. </think> <answer> (A) </answer> 0123456789"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    ids = tok.convert_tokens_to_ids
    special = dict.fromkeys(["bos_token_id", "eos_token_id", "pad_token_id"], ids("<|endoftext|>"))
    hd = (
        hidden // 4
    )  # head_dim; M-RoPE splits its hd/2 rotary frequencies over (t, h, w) 2:3:3 (2B: 16, 24, 24)
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [hd // 8, 3 * hd // 16, 3 * hd // 16]}
    vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2)  # patch 14, merge 2
    if qwen25:  # the 2.5 tower names its sizes differently and adds windowed attention
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden)
        vision.update(window_size=56, fullatt_block_indexes=[1])
    cfg = (tf.Qwen2_5_VLConfig if qwen25 else tf.Qwen2VLConfig)(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_attention_heads=4,
            num_hidden_layers=layers,
            num_key_value_heads=2,
            rope_parameters=rope,
            **special,
        ),
        vision_config={**vision, **(tower or {})},  # tower: overrides (the bench's vision-heavy model)
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
        **special,
    )
    torch.manual_seed(seed)
    model = (tf.Qwen2_5_VLForConditionalGeneration if qwen25 else tf.Qwen2VLForConditionalGeneration)(cfg)
    processor = (tf.Qwen2_5_VLProcessor if qwen25 else tf.Qwen2VLProcessor)(
        image_processor=tf.Qwen2VLImageProcessor(),
        tokenizer=tok,
        video_processor=tf.Qwen2VLVideoProcessor(),
        chat_template=TINY_TEMPLATE,
    )
    return model, processor


def load_model(args):
    """(model, processor, eos ids, banned ids). Real models through the auto classes, fp32 master weights."""
    if args.model in ("tiny", "tiny-2.5"):
        model, processor = build_tiny(args.seed, qwen25=args.model == "tiny-2.5")
    else:
        model = tf.AutoModelForImageTextToText.from_pretrained(
            args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code
        )
        processor = tf.AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    gen_eos = model.generation_config.eos_token_id  # an int or a list
    eos += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    eos = sorted({i for i in eos if i is not None})
    # Hub generation configs sample nearly greedily (Qwen2-VL-Instruct: top_k=1, top_p=0.001, repetition
    # penalty 1.05). Replace it: RL must sample from, and score, the plain tempered distribution (G8).
    model.generation_config = tf.GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
    banned = tok.convert_tokens_to_ids(VISION_TOKENS)
    return model, processor, eos, banned


if __name__ == "__main__":
    main()
