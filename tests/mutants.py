"""./run.sh mutants [LABEL-PREFIX ... | --check]: break each line that matters, one at a time, and check a
test notices.

Each mutant below is one entry: a label, a file, an exact snippet of it (found exactly once), the snippet
that replaces it, and the tests that guard it (node ids under tests/). The script copies the repository to a
temporary folder (the working tree is never touched), checks that every guarding test passes there as is,
then applies each mutant alone, runs its tests (stopping at the first failure) and restores the file. It
prints caught / survived per mutant and the kill rate, and exits 1 if a mutant survived or a snippet was not
found. Not part of ./run.sh test: the resume and FSDP mutants each rerun multi-process runs.
"""

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Mutant = collections.namedtuple("Mutant", "label file original mutated tests")

# test node ids, shortened
EQ = "test_equations.py::test_"
RW = "test_rewards.py::test_"
STEP = "test_stepgrpo.py::test_"
VR1 = "test_vision_r1.py::test_"
G8 = "test_model.py::test_g8_scoring_logprobs_equal_sampling_distribution"
G8_SAMPLING = "test_model.py::test_rollout_samples_at_the_flag_temperature"
I8 = "test_train.py::test_i8_each_completion_is_generated_scored_and_rewarded_with_its_own_prompt"
RESUME = (
    "test_reliability.py::test_resume_after_sigkill_is_bitwise_identical "
    "test_reliability.py::test_resume_under_two_ranks_matches_within_float_tolerance"
)
FSDP = (
    "test_train.py::test_fsdp_rollouts_gather_once_and_match_unsharded "
    "test_train.py::test_fsdp_two_ranks_match_one_process"
)
VS = (  # fastest first: pytest stops at the first failure
    "test_vision_sharing.py::test_sharing_changes_no_completion_log_prob_or_gradient "
    "test_vision_sharing.py::test_the_vision_tower_sees_each_distinct_image_once_per_pass "
    "test_vision_sharing.py::test_two_fsdp_ranks"
)
MEM = "test_memory.py::test_"
FLAGS = MEM + "the_precision_and_checkpointing_flags_reach_the_model"
BF16 = f"{MEM}bf16_logprobs_agree_with_fp32 {MEM}bf16_run_trains_with_fp32_master_weights"
PREC = "test_precision.py::test_"
FSDP_BF16 = PREC + "fsdp_bf16_computes_in_bf16_over_fp32_shards_and_reduces_gradients_in_fp32"

MUTANTS = [
    # ---- the GRPO equations
    Mutant(
        "G2 biased std",
        "grpo_vl.py",
        "(r.std(1, keepdim=True) + 1e-4)",
        "(r.std(1, keepdim=True, correction=0) + 1e-4)",
        EQ + "g2_group_advantage_by_hand",
    ),
    Mutant(
        "G2 zero-std groups not zeroed",
        "grpo_vl.py",
        "return A.masked_fill(flat[:, None], 0.0).view(-1),",
        "return A.view(-1),",
        EQ + "g2_a_flat_group_is_exactly_zero_even_where_float_rounding_is_not",
    ),
    Mutant(
        "G2 groups read with .repeat's layout",
        "grpo_vl.py",
        "r = r.view(-1, G)  # (P, G)",
        "r = r.view(G, -1).T  # (P, G)",
        EQ + "g2_groups_are_contiguous",
    ),
    Mutant(
        "G3 ratio inverted",
        "grpo_vl.py",
        "ratio = torch.exp(logp - old)",
        "ratio = torch.exp(old - logp)",
        EQ + "g3_g4_g5_per_token_by_hand",
    ),
    Mutant(
        "G5 max instead of min",
        "grpo_vl.py",
        "surrogate = torch.min(",
        "surrogate = torch.max(",
        EQ + "g3_g4_g5_per_token_by_hand",
    ),
    Mutant(
        "G5 clip range",
        "grpo_vl.py",
        "ratio.clamp(1 - EPS, 1 + EPS)",
        "ratio.clamp(1 - EPS, 1 + 2 * EPS)",
        EQ + "g3_g4_g5_per_token_by_hand",
    ),
    Mutant(
        "G4 KL the other way",
        "grpo_vl.py",
        "D = torch.exp(ref - logp) - (ref - logp) - 1",
        "D = torch.exp(logp - ref) - (logp - ref) - 1",
        f"{EQ}g3_g4_g5_per_token_by_hand {EQ}g4_k3_is_zero_at_reference_and_positive_elsewhere",
    ),
    Mutant(
        "G6 token mean instead of sequence mean",
        "grpo_vl.py",
        "(per_seq / mask.sum(1).clamp(min=1)).sum()",
        "(per_seq / mask.sum().clamp(min=1)).sum()",
        EQ + "g6_sequence_mean_weights_short_answers_more",
    ),
    Mutant(
        "G5/G6 loss = +J: the update descends the objective",
        "grpo_vl.py",
        "loss = -(per_seq / mask.sum(1).clamp(min=1)).sum() / n_completions",
        "loss = (per_seq / mask.sum(1).clamp(min=1)).sum() / n_completions",
        "test_train.py::test_a_policy_step_climbs_the_objective",
    ),
    Mutant(
        "G8 scoring without the temperature",
        "grpo_vl.py",
        "logits = lm_head(h).float() / T",
        "logits = lm_head(h).float()",
        G8,
    ),
    Mutant(
        "G8 sampling at T = 1",
        "grpo_vl.py",
        "temperature=args.temperature,",
        "temperature=1.0,",
        G8_SAMPLING,
    ),
    Mutant(
        "G9 EOS left out of the mask",
        "grpo_vl.py",
        "(torch.arange(C)[None] <= first[:, None])",
        "(torch.arange(C)[None] < first[:, None])",
        EQ + "g9_mask_up_to_and_including_first_eos",
    ),
    # ---- each reward's defining condition
    Mutant(
        "R1 any answer counts",
        "rewards.py",
        'return float(is_correct(last_tag(text, "answer"), ex))',
        'return float(last_tag(text, "answer") is not None)',
        RW + "r1_accuracy",
    ),
    Mutant(
        "R2 text after </answer> allowed",
        "rewards.py",
        't.endswith("</answer>") and joined',
        '"</answer>" in t and joined',
        RW + "r2_format",
    ),
    Mutant(
        "R4 right answer: 1 + alpha*k lost",
        "rewards.py",
        "return float(is_correct(pred, ex)) + ALPHA * k",
        "return ALPHA * k",
        STEP + "r4_step_rar",
    ),
    Mutant(
        "R4 wrong answer: alpha*k lost",
        "rewards.py",
        "return float(is_correct(pred, ex)) + ALPHA * k",
        "return float(is_correct(pred, ex)) * (1 + ALPHA * k)",
        STEP + "r4_step_rar",
    ),
    Mutant(
        "R4 no answer: 0 lost",
        "rewards.py",
        "    if pred is None:\n        return 0.0\n",
        '    if pred is None:\n        pred = ""\n',
        STEP + "r4_step_rar",
    ),
    Mutant(
        "R4 every section counts, not the steps only",
        "rewards.py",
        "zip(parts[2::3], parts[3::3]) if n)",
        "zip(parts[2::3], parts[3::3]))",
        STEP + "r4_matches_inside_step_bodies_at_word_boundaries",
    ),
    Mutant(
        "R4 no word boundary on the left",
        "rewards.py",
        'left = r"(?<!\\w)" if re.match(r"\\w", f[:1]) else ""',
        'left = ""',
        STEP + "r4_word_boundaries_with_a_short_form",
    ),
    Mutant(
        "R5 order ignored",
        "rewards.py",
        'kinds == ["I", "R"] + [f"S{j}" for j in range(1, n + 1)] + ["T"])',
        'sorted(kinds) == sorted(["I", "R"] + [f"S{j}" for j in range(1, n + 1)] + ["T"]))',
        STEP + "r5_step_rvr",
    ),
    Mutant(
        "R5 'Let's think step by step.' without a colon not a section",
        "rewards.py",
        "Let's think step by step[.:])",
        "Let's think step by step:)",
        STEP + "r5_step_rvr",
    ),
    Mutant(
        "R6 repeated tags allowed",
        "rewards.py",
        "all(t.count(tag) == 1 for tag in",
        "all(t.count(tag) >= 1 for tag in",
        VR1 + "r6_hard_formatting_result_reward",
    ),
    Mutant(
        "R6 a wrong answer counts",
        "rewards.py",
        ' and is_correct(last_tag(t, "answer"), ex))',
        ")",
        VR1 + "r6_hard_formatting_result_reward",
    ),
    # ---- resume after a kill
    # (dcp.load fills the live tensors in place, so the model and reference lines of set_state_dict are
    # redundant today: the model and reference mutants leave them out of the saved state instead)
    Mutant(
        "resume: model weights not saved",
        "grpo_vl.py",
        'state = {"model": model_sd, "optim": optim_sd}',
        'state = {"optim": optim_sd}',
        RESUME,
    ),
    Mutant(
        "resume: optimizer not restored",
        "grpo_vl.py",
        'dsd.set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])',
        'dsd.set_model_state_dict(model, state["model"])',
        RESUME,
    ),
    Mutant(
        "resume: schedule not restored",
        "grpo_vl.py",
        'sched.load_state_dict(json.load(open(os.path.join(path, "progress.json")))["sched"])',
        "pass",
        RESUME,
    ),
    Mutant(
        "resume: reference model not saved",
        "grpo_vl.py",
        'state["ref"] = dsd.get_model_state_dict(ref)',
        "pass",
        RESUME,
    ),
    Mutant(
        "resume: data order from the process's RNG",
        "grpo_vl.py",
        "random.Random(seed + epoch).sample(range(n), n)",
        "random.sample(range(n), n)",
        RESUME,
    ),
    Mutant(
        "resume: rollouts not seeded per step",
        "grpo_vl.py",
        "torch.manual_seed(seed + j)",
        "None",
        RESUME,
    ),
    # ---- groups and their prompts (I8)
    Mutant(
        "I8 rewards read the wrong row",
        "grpo_vl.py",
        "ex_of = [exs[j // G] for j in range(len(texts))]",
        "ex_of = [exs[j % len(exs)] for j in range(len(texts))]",
        I8,
    ),
    Mutant(
        "I8 each prompt's completions indexed from 0 (every group gets group 0's A)",
        "grpo_vl.py",
        'b["idx"] = torch.arange(j * G, (j + 1) * G)',
        'b["idx"] = torch.arange(G)',
        MEM + "rollouts_give_each_micro_batch_its_own_completions_advantages",
    ),
    # ---- FSDP
    Mutant(
        "FSDP not resharded after the rollout",
        "grpo_vl.py",
        "            m.reshard()",
        "            pass",
        FSDP,
    ),
    Mutant(
        "FSDP root left gathered by shard()",
        "grpo_vl.py",
        "use_cache=False)\n    model.reshard()",
        "use_cache=False)",
        FSDP,
    ),
    Mutant(
        "FSDP rollouts all-gather every token",
        "grpo_vl.py",
        "m.set_reshard_after_forward(False, recurse=False)  # kept gathered",
        "pass  # kept gathered",
        FSDP,
    ),
    Mutant(
        "FSDP ranks share rollout seeds",
        "grpo_vl.py",
        "seed = args.seed + 1_000_003 * step + run.rank * len(exs)",
        "seed = args.seed + 1_000_003 * step",
        "test_train.py::test_fsdp_two_ranks_match_one_process",
    ),
    # ---- the loss's masking and metrics
    Mutant(
        "G6 padding multiplied by the mask (0 * inf = nan)",
        "grpo_vl.py",
        "per_seq = torch.where(mask.bool(), L, 0.0).sum(1)",
        "per_seq = (L * mask).sum(1)",
        EQ + "g6_sequence_mean_weights_short_answers_more",
    ),
    Mutant(
        "G5 clip_frac counts every ratio outside the range, whatever A's sign",
        "grpo_vl.py",
        "clipped = ((ratio > 1 + EPS) & (A > 0)) | ((ratio < 1 - EPS) & (A < 0))",
        "clipped = (ratio > 1 + EPS) | (ratio < 1 - EPS)",
        EQ + "g3_g4_g5_per_token_by_hand",
    ),
    # ---- batches (I3) and PTST
    Mutant(
        "I3 a prompt's rows interleaved, not repeated whole, for its copies",
        "grpo_vl.py",
        "v.repeat(n, 1).to(device)",
        "v.repeat_interleave(n, 0).to(device)",
        "test_model.py::test_i3_copies_keep_each_sequence_with_its_own_image_rows",
    ),
    Mutant(
        "PTST a stage's last step run under the next stage",
        "grpo_vl.py",
        "stage, cap, G = plan[step - 1]",
        "stage, cap, G = plan[min(step, len(plan) - 1)]",
        VR1 + "vision_r1_cold_start_then_two_ptst_stages",
    ),
    # ---- vision sharing
    Mutant(
        "vision sharing: every copy encoded (no de-duplication)",
        "grpo_vl.py",
        "out = get_image_features(pixel_values[:rows], image_grid_thw[:k], **kwargs)\n"
        "        out.pooler_output = list(out.pooler_output) * n",
        "out = get_image_features(pixel_values, image_grid_thw, **kwargs)\n"
        "        out.pooler_output = list(out.pooler_output)",
        VS,
    ),
    Mutant(
        "vision sharing: a multi-image prompt encoded as its first image",
        "grpo_vl.py",
        "k = len(image_grid_thw) // n  # the prompt's images",
        "k = 1  # the prompt's images",
        VS,
    ),
    Mutant(
        "vision sharing: a multi-image prompt's encodings handed over in reverse order",
        "grpo_vl.py",
        "out.pooler_output = list(out.pooler_output) * n",
        "out.pooler_output = list(out.pooler_output)[::-1] * n",
        VS,
    ),
    Mutant(
        "vision sharing: the one encoding detached (no gradient into the vision tower)",
        "grpo_vl.py",
        "out.pooler_output = list(out.pooler_output) * n",
        "out.pooler_output = [p.detach() for p in out.pooler_output] * n",
        VS,
    ),
    # ---- memory: bf16, gradient checkpointing, resharding
    Mutant(
        "bf16: --precision bf16 ignored off GPU",
        "grpo_vl.py",
        'bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")',
        'bf16 = args.precision == "auto" and device.type == "cuda"',
        FLAGS + " " + BF16,
    ),
    Mutant(
        "bf16: FSDP computes in fp32",
        "grpo_vl.py",
        "MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16",
        "MixedPrecisionPolicy(torch.float32, torch.float32) if bf16",
        FSDP_BF16,
    ),
    Mutant(
        "bf16: FSDP reduces gradients in bf16",
        "grpo_vl.py",
        "MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16",
        "MixedPrecisionPolicy(torch.bfloat16, torch.bfloat16) if bf16",
        FSDP_BF16,
    ),
    Mutant(
        "bf16: one process without autocast",
        "grpo_vl.py",
        "torch.autocast(device.type, torch.bfloat16) if bf16 and mesh is None else contextlib.nullcontext()",
        "contextlib.nullcontext()",
        PREC + "one_process_bf16_generates_and_scores_under_autocast_and_fp32_does_not",
    ),
    Mutant(
        "gradient checkpointing never enabled",
        "grpo_vl.py",
        'model.activation_checkpointing_enable({"use_reentrant": False})',
        "pass",
        FLAGS,
    ),
    Mutant(
        "generate() in training mode (checkpointing turns the KV cache off)",
        "grpo_vl.py",
        "    model.eval()\n    sharded",
        "    sharded",
        MEM + "generation_is_unchanged_by_gradient_checkpointing",
    ),
    Mutant(
        "FSDP reference left gathered after a no-grad forward",
        "grpo_vl.py",
        "model.reshard()  # no backward follows",
        "pass  # no backward follows",
        MEM + "fsdp_checkpointed_gradients_and_reference_resharding",
    ),
    # ---- issues 19 and 20: loading once, tied weights, the released data
    Mutant(
        "every rank reads the weights",
        "grpo_vl.py",
        "if rank == 0 or not mesh else None",
        "if True else None",
        "test_train.py::test_under_torchrun_only_rank_0_reads_the_weights",
    ),
    Mutant(
        "rotary buffers not broadcast to the meta-built ranks",
        "grpo_vl.py",
        "        dist.broadcast(buffer, 0)\n",
        "",
        "test_train.py::test_fsdp_two_ranks_match_one_process",
    ),
    Mutant(
        "2-rank checkpoints in transformers' own key layout",
        "grpo_vl.py",
        'model._weight_conversions = getattr(loaded, "_weight_conversions", None)',
        "pass",
        "test_tied.py::test_tied_checkpoint_loads_in_transformers_still_tied",
    ),
    Mutant(
        "a tied lm_head saved twice",
        "grpo_vl.py",
        "if k not in tied}",
        "}",
        "test_tied.py::test_tied_checkpoint_loads_in_transformers_still_tied",
    ),
    Mutant(
        "Mulberry's reflective rows kept for stepgrpo",
        "grpo_vl.py",
        'if sft and PROMPT[args.variant] == "step":',
        "if False:",
        "test_release_layouts.py::test_mulberry_sft_json_inside_the_extracted_mulberry_images_folder",
    ),
    Mutant(
        "only the first of comma-separated data files",
        "grpo_vl.py",
        'for part in spec.split(","):',
        'for part in spec.split(",")[:1]:',
        "test_release_layouts.py::test_vision_r1_cold_two_sharegpt_files_in_one_folder",
    ),
    Mutant(
        "no download line for a missing release",
        "data.py",
        "if spec.startswith(folder):",
        "if False:",
        "test_release_layouts.py::test_the_cards_command_offline_says_what_to_download_and_exits_2",
    ),
]


def pytest(copy, tests, timeout=1800):
    """Run the tests in the copy, stopping at the first failure: (passed, the first failure's summary)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider"]
    cmd += [f"tests/{t}" for t in tests.split()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    failed = re.findall(r"^(?:FAILED|ERROR) .*$", p.stdout, re.M) or p.stdout.strip().splitlines()[-1:]
    return p.returncode == 0, (failed[0] if failed else "")[:150]


def main(prefixes):
    chosen = [m for m in MUTANTS if not prefixes or m.label.startswith(tuple(prefixes))]
    if not chosen:
        raise SystemExit(f"no mutant's label starts with {' or '.join(map(repr, prefixes))}")
    t0, tmp = time.time(), tempfile.mkdtemp(prefix="grpo-vl-mutants-")
    copy = os.path.join(tmp, "repo")
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__"))
    results = {}  # label -> caught | survived | not found
    for m in chosen:
        if (n := open(os.path.join(copy, m.file)).read().count(m.original)) != 1:
            results[m.label] = "not found"
            print(f"NOT FOUND  {m.label}: {n} copies of its snippet in {m.file}")
    try:
        found = [m for m in chosen if m.label not in results]
        passed, why = pytest(copy, " ".join(dict.fromkeys(t for m in found for t in m.tests.split())))
        if not passed:
            raise SystemExit(f"the guarding tests fail without any mutant, so nothing can be judged: {why}")
        print(f"{len(found)} mutants; their tests pass unmutated ({time.time() - t0:.0f} s)", flush=True)
        for m in found:
            path, t1 = os.path.join(copy, m.file), time.time()
            source = open(path).read()
            open(path, "w").write(source.replace(m.original, m.mutated))
            try:
                passed, why = pytest(copy, m.tests)
            finally:
                open(path, "w").write(source)
            results[m.label] = "survived" if passed else "caught"
            print(f"{results[m.label].upper():9}  {m.label}  ({time.time() - t1:.0f} s)  {why}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    caught = list(results.values()).count("caught")
    print(
        f"{caught}/{len(chosen)} caught (kill rate {caught / len(chosen):.0%}), "
        f"{list(results.values()).count('survived')} survived, {list(results.values()).count('not found')} "
        f"not found; {(time.time() - t0) / 60:.1f} min"
    )
    return 0 if caught == len(chosen) else 1


def check():
    """The quick form (--check, run by the tests): every snippet stands exactly once in its file, and every
    guarding test is defined, so that the list cannot rot between mutation runs. Returns the problems."""
    problems = []
    for m in MUTANTS:
        if (n := open(os.path.join(ROOT, m.file)).read().count(m.original)) != 1:
            problems.append(f"{m.label}: {n} copies of its snippet in {m.file}")
        for test in m.tests.split():
            file, _, name = test.partition("::")
            source = open(os.path.join(ROOT, "tests", file)).read()
            if not re.search(rf"^def {re.escape(name)}", source, re.M):
                problems.append(f"{m.label}: no test {test}")
    return problems


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(__doc__))
    if "--check" in sys.argv[1:]:
        problems = check()
        print("\n".join(problems) or f"{len(MUTANTS)} mutants: every snippet found once, every test defined")
        sys.exit(1 if problems else 0)
    sys.exit(main(sys.argv[1:]))
