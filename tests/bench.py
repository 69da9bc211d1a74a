"""./run.sh bench: where the time of a GRPO step goes, on CPU, for the tiny model and a small one.

    python tests/bench.py [--quick] [--json PATH]   # prints a table, writes PATH (default: bench.json)

For each model and 1 or 2 processes it runs a few real steps of grpo_vl.py (G = 8, 4 prompts, 64 new tokens,
the tiny fixtures' settings: no gradient checkpointing) on a model folder written by tests/tiny.py and the
synthetic data of tests/shapes.py, and reads metrics.jsonl: seconds per step split into the rollout and the
rest (rewards, reference/old log-probs, update); generated tokens per second; peak memory (max RSS of rank 0).
It then
times the floor on the same shapes with bare transformers -- per prompt, as grpo_vl.py batches: one
generate() of its G completions, one forward+backward, one no-grad forward (the reference, beta > 0) -- and
prints the overhead ratio = step time / floor. Figures go to bench.json. Not a test: it asserts nothing.

The vision-heavy model runs in one process with vision sharing at odd steps and without it at even ones
(grpo_vl.shared_vision replaced by a context manager that does nothing), both under the same load of this
shared machine: the speed-up of the step and of its part after the rollout is `vision_sharing_speedup`
in bench.json.

--quick runs every configuration with the fewest steps that still take every path (1 warm-up step + 1
timed step, 2 of each kind for the vision-heavy run; 2 prompts, G = 2, 8 new tokens): the same table in
a minute or so (74 s at load average 4 on 2 cores), so tests/test_bench.py can keep this script working;
its figures mean nothing.
"""

import contextlib
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

# OpenMP threads wait for work passively: on this 2-core machine, shared with other jobs, the default
# spin-waiting made a 2-thread step of the tiny model 7x slower (and its floor 25x) at load average 7. (On an
# idle machine spinning may win back a little; the README's figures were taken with it.) Set before torch
# loads its OpenMP runtime, which reads it once; the subprocesses inherit it. (Imported, by test_bench.py,
# this module leaves the environment alone.)
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
import data  # noqa: E402
import grpo_vl as g  # noqa: E402
import tiny  # noqa: E402

# "vision": small's language model under a vision tower that costs as much per image as the language model
# per sequence, as on Qwen2-VL-2B (README: 3.3 TFLOP per image against 3.9 per 1,300-token sequence).
# Forward FLOPs at 2 per weight per token (attention scores add under 10 %), on the synthetic images
# (54.75 patches of 14 x 14 on average) and sequences of 144 prompt + 64 completion tokens:
#   tower: 54.75 patches x 11 blocks x 2 x 789,760 weights (e = 256: qkv 3e^2, proj e^2, MLP 2 x 4e^2)
#          = 0.95 G, + patch embedding (1176 x 256) and merger (1024^2 + 1024 x 256 per 4 patches) = 1.02 G
#   LM:    208 tokens x 4 layers x 2 x 590,848 weights (q, o 256^2; k, v 256 x 128; MLP 3 x 256 x 512)
#          = 0.98 G, + lm_head (256 x 512) at the 65 scored positions                         = 1.00 G
# flops() recounts both from the built model, and the bench prints them.
MODELS = {
    "tiny": dict(hidden=64, layers=2),
    "small": dict(hidden=256, layers=4),
    "vision": dict(hidden=256, layers=4, tower=dict(depth=11, embed_dim=256, num_heads=4, mlp_ratio=4)),
}
# The configurations, in the table's order: (model, processes); the vision-heavy one alternates sharing.
RUNS = {
    "tiny x1": ("tiny", 1),
    "tiny x2": ("tiny", 2),
    "small x1": ("small", 1),
    "small x2": ("small", 2),
    "vision x1": ("vision", 1),
    "vision x1 no sharing": ("vision", 1),
}
# steps: RL steps of a plain run, the first a warm-up; alternate_steps: the vision-heavy run's (2 warm-up
# steps, one of each kind, then shared and plain in turn); P prompts per step, G completions each, NEW new
# tokens at most; floor_repeats: the floor is the best of these; scoring_C: completion lengths whose scoring
# memory is measured.
FULL = dict(steps=6, alternate_steps=8, P=4, G=8, NEW=64, floor_repeats=3, scoring_C=[128, 512])
QUICK = dict(steps=2, alternate_steps=4, P=2, G=2, NEW=8, floor_repeats=1, scoring_C=[32])
COLS = [
    "step",
    "rollout",
    "train",
    "tokens_per_s",
    "peak_rss_mb",
    "floor",
    "overhead_ratio",
    "tower_images_per_step",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def model_folder(name):
    """The model folder of `name` (tests/tiny.py writes it once; its sizes are in its name)."""
    if name == "tiny":
        return tiny.model_dir()  # the tests' cached tiny model: MODELS["tiny"] is tiny.build's default
    sizes = hashlib.sha256(json.dumps(MODELS[name], sort_keys=True).encode()).hexdigest()[:8]
    return tiny.write(os.path.join(tiny.CACHE, f"bench-{name}-{sizes}"), 0, **MODELS[name])


def flags(name, cfg, steps, out):
    return [
        "--model",
        model_folder(name),
        "--data",
        tiny.data_file(64),
        "--max-steps",
        str(steps),
        "--prompts-per-step",
        str(cfg["P"]),
        "--num-generations",
        str(cfg["G"]),
        "--max-new-tokens",
        str(cfg["NEW"]),
        "--micro-batch",
        str(cfg["G"]),  # a prompt's G completions in one forward (grpo_vl never mixes two prompts)
        "--no-gradient-checkpointing",  # as tiny.flags() and the old `--model tiny`
        "--log-completions-every",
        "0",
        "--out",
        out,
    ]


def no_sharing(n, *models):
    """grpo_vl.shared_vision turned off: every copy of a prompt's image goes through the vision tower."""
    return contextlib.nullcontext()


def worker(name, out, cfg, alternate):
    """One run of grpo_vl.main on `name`'s model (inside torchrun for 2 processes); prints its peak RSS and
    the images its vision towers (policy and reference, counted by a forward hook) encoded at each step.
    alternate: vision sharing at odd steps, none at even ones, so that both see the same load of this
    shared machine."""
    images = []  # per step
    load_models, rollout, shared_vision = g.load_models, g.rollout, g.shared_vision

    def count(module, args, kwargs, output):
        if images:
            images[-1] += len(kwargs["grid_thw"])

    def load_and_count(*a, **k):  # the reference is a deep copy made inside: hooked here too
        run = load_models(*a, **k)
        for m in (run.model, run.ref):
            if m is not None:
                m.model.visual.register_forward_hook(count, with_kwargs=True)
        return run

    def rollout_and_alternate(*a, **k):  # each step starts here; grpo_step looks shared_vision up by name
        images.append(0)
        g.shared_vision = no_sharing if alternate and len(images) % 2 == 0 else shared_vision
        return rollout(*a, **k)

    g.load_models = load_and_count
    g.rollout = rollout_and_alternate
    g.main(flags(name, cfg, cfg["alternate_steps"] if alternate else cfg["steps"], out))
    if int(os.environ.get("RANK", 0)) == 0:
        print("MAXRSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print("TOWER_IMAGES", json.dumps(images))


def run(name, procs, cfg, alternate=False):
    """Means over the steps after the first (it warms up); alternate: (shared steps 3, 5, ...; plain
    steps 4, 6, ...), step 2 warming the plain path up."""
    launcher = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    )
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-{procs}-") as out:
        cmd = launcher + [__file__, "--worker", name, out, json.dumps(cfg), "alternate" if alternate else ""]
        env = {**ENV, "OMP_NUM_THREADS": str(2 // procs)}
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(f"bench: {name} x{procs} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        rss = float(p.stdout.split("MAXRSS_MB")[1].split()[0])
        images = json.loads(p.stdout.split("TOWER_IMAGES")[1].splitlines()[0])
        rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    rows = [r for r in rows if r["phase"] == "rl"]
    if alternate:
        return summary(rows[2::2], images[2::2], rss, cfg), summary(rows[3::2], images[3::2], rss, cfg)
    return summary(rows[1:], images[1:], rss, cfg)


def summary(rows, images, rss, cfg):
    """Means over the timed steps' metrics.jsonl rows, with the peak RSS and the tower's images per step."""
    assert rows and len(rows) == len(images), (len(rows), len(images))
    keys = ("step_time", "rollout_time", "completion_len")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return {
        "step": mean["step_time"],
        "rollout": mean["rollout_time"],
        "train": mean["step_time"] - mean["rollout_time"],  # rewards, reference/old log-probs, update
        "peak_rss_mb": rss,
        "tokens_per_s": mean["completion_len"] * cfg["P"] * cfg["G"] / mean["rollout_time"],
        "completion_len": mean["completion_len"],
        "tower_images_per_step": sum(images) / len(images),
        "steps_timed": len(rows),
    }


def weights(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def load_bare(name):
    """`name`'s model folder loaded by bare transformers, and the sampling settings grpo_vl's rollout uses
    (load_models puts them in the generation config: plain sampling at T = 1, vision tokens banned)."""
    folder = model_folder(name)
    model = tf.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    processor = tf.AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    sampling = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.pad_token_id)
    sampling.update(
        eos_token_id=tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]),
        suppress_tokens=tok.convert_tokens_to_ids(g.VISION_TOKENS),
    )
    return model, processor, sampling


def encode(processor, exs):
    """Prompts as grpo_vl encodes them for the default recipe (r1zero: the base model's prompt P1)."""
    return data.encode(processor, exs, g.PROMPT[g.Args.variant], g.Args.max_pixels)


def flops(name):
    """Forward FLOPs at 2 per weight per token, in G: (the tower per image, the language model per sequence),
    on the bench's data and completion cap (FULL's, whatever this run's)."""
    model, processor, _ = load_bare(name)
    b = encode(processor, data.load_examples(tiny.data_file(64), "train"))
    patches = b["image_grid_thw"].prod(-1).float().mean().item()  # per image, before the 2 x 2 merge
    tokens = b["attention_mask"].sum(1).float().mean().item() + FULL["NEW"]  # prompt + completion
    v = model.model.visual
    tower = 2 * patches * (weights(v.patch_embed, v.blocks) + weights(v.merger) / 4)
    lm = 2 * tokens * weights(model.model.language_model.layers) + 2 * (FULL["NEW"] + 1) * weights(
        model.lm_head
    )
    return tower / 1e9, lm / 1e9


def floor(name, cfg):
    """Bare transformers on the same shapes, summed over the step's P prompts (grpo_vl batches one prompt's G
    completions at a time): generate, forward+backward, no-grad forward (seconds, best of floor_repeats)."""
    torch.set_num_threads(2)
    model, processor, sampling = load_bare(name)
    exs = data.load_examples(tiny.data_file(64), "train")[: cfg["P"]]
    prompts = [g.copies(encode(processor, [ex]), cfg["G"], torch.device("cpu")) for ex in exs]
    best = {"generate": math.inf, "fwd_bwd": math.inf, "fwd": math.inf}
    for _ in range(cfg["floor_repeats"]):
        times = dict.fromkeys(best, 0.0)
        for inputs in prompts:
            t0 = time.perf_counter()
            with torch.no_grad():
                seqs = model.generate(**inputs, **sampling, max_new_tokens=cfg["NEW"])
            t1 = time.perf_counter()
            C = seqs.shape[1] - inputs["input_ids"].shape[1]
            full = {
                **inputs,
                "input_ids": seqs,
                "attention_mask": torch.ones_like(seqs),
                "mm_token_type_ids": torch.cat(
                    [inputs["mm_token_type_ids"], torch.zeros_like(seqs[:, -C:])], 1
                ),
            }
            model(**full, logits_to_keep=C + 1).logits.float().logsumexp(-1).mean().backward()
            t2 = time.perf_counter()
            with torch.no_grad():
                model(**full, logits_to_keep=C + 1)
            t3 = time.perf_counter()
            for k, t in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[k] += t
        best = {k: min(best[k], times[k]) for k in best}
    return best


def full_vocab_logprobs(model, b, T, banned):
    """How token_logprobs computed log-probs before it worked in chunks: (N, C, V) fp32 logits at once."""
    N, C = b["completion"].shape
    prompt = g.copies(b["prompt"], N, torch.device("cpu"))
    logits = (
        model(
            input_ids=torch.cat([prompt["input_ids"], b["completion"]], 1),
            attention_mask=torch.cat([prompt["attention_mask"], b["mask"].long()], 1),
            mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(b["completion"])], 1),
            pixel_values=prompt["pixel_values"],
            image_grid_thw=prompt["image_grid_thw"],
            logits_to_keep=C + 1,
        )
        .logits[:, :-1]
        .float()
        / T
    )
    logits[..., banned] = float("-inf")
    return logits.gather(-1, b["completion"][..., None]).squeeze(-1) - logits.logsumexp(-1)


def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def scoring_memory(how, C, N=4):
    """Peak host memory (MB, above what was in use before) of one scoring forward + backward of N completions
    of C tokens of one prompt on the tiny model given the real vocabulary (151,936), the old way or the
    chunked way."""
    torch.set_num_threads(2)
    model, processor = tiny.build(0)
    model.resize_token_embeddings(151_936, mean_resizing=False)  # the real vocabulary; the rest stays tiny
    banned = processor.tokenizer.convert_tokens_to_ids(g.VISION_TOKENS)
    exs = data.load_examples(tiny.data_file(64), "train")[:1]
    b = {"prompt": encode(processor, exs)}
    b["completion"] = torch.randint(len(tiny.SPECIAL), 500, (N, C))  # ordinary tokens (special ones first)
    b["mask"] = torch.ones(N, C)
    samples, done = [], threading.Event()

    def poll():  # the peak, sampled every millisecond
        while not done.is_set():
            samples.append(rss_mb())
            time.sleep(0.001)

    before = rss_mb()
    thread = threading.Thread(target=poll)
    thread.start()
    try:
        if how == "chunked":
            logp = g.token_logprobs(model, b, 1.0, banned, torch.device("cpu"))
        else:
            logp = full_vocab_logprobs(model, b, 1.0, banned)
        (-logp.sum()).backward()
    finally:
        done.set()
        thread.join()
    print("PEAK_MB", max(samples) - before)


def measure_scoring_memory(cfg):
    """Each way in a fresh process, so neither inherits the other's freed-but-kept memory (side by side: a
    process's RSS is its own, and nothing here is timed)."""
    procs = {}
    for C in cfg["scoring_C"]:
        for how in ("full", "chunked"):
            cmd = [sys.executable, __file__, "--scoring-memory", how, str(C)]
            procs[f"{how} 4x{C}"] = subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
            )
    peaks = {}
    for key, p in procs.items():
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"bench: scoring memory ({key}) failed:\n{err[-4000:]}")
        peaks[key] = float(out.split("PEAK_MB")[1].split()[0])
    return peaks


def cell(value, width):
    """A table cell: 4 significant digits (a reward time of 0.0004 s is not 0.000), '-' if absent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:>{width}.4g}"
    return f"{'-':>{width}}"


def table(runs, cfg):
    """The table as printed: a title, a header, one line per configuration."""
    width = [max(10, len(c) + 2) for c in COLS]
    lines = [
        f"GRPO step on CPU, G = {cfg['G']}, {cfg['P']} prompts, {cfg['NEW']} new tokens"
        " (seconds unless named)",
        f"{'run':<22}" + "".join(f"{c:>{w}}" for c, w in zip(COLS, width)),
    ]
    for run_name, r in runs.items():
        lines.append(f"{run_name:<22}" + "".join(cell(r.get(c), w) for c, w in zip(COLS, width)))
    return "\n".join(lines)


def main(argv):
    quick = "--quick" in argv
    path = argv[argv.index("--json") + 1] if "--json" in argv else os.path.join(ROOT, "bench.json")
    cfg = QUICK if quick else FULL
    started = time.time()
    tf.utils.logging.disable_progress_bar()
    for name in MODELS:  # written once, here: not raced for by two ranks
        model_folder(name)
    tiny.data_file(64)
    results = {"settings": {**cfg, "quick": quick}, "load_average_start": os.getloadavg()}
    peaks = measure_scoring_memory(cfg)
    print("scoring forward + backward at vocabulary 151,936, peak MB above start (4 completions x C tokens):")
    for C in cfg["scoring_C"]:
        full, chunked = peaks[f"full 4x{C}"], peaks[f"chunked 4x{C}"]
        print(
            f"  C = {C}: (N, C, V) fp32 logits at once {full:.0f}, "
            f"in {g.LOGPROB_CHUNK}-token chunks {chunked:.0f}"
        )
    results["scoring_peak_mb"] = peaks
    runs = {}
    for name in MODELS:
        base = floor(name, cfg)  # bare transformers: every copy of an image through the tower
        if name == "vision":  # one process, sharing and not in alternate steps
            mine = dict(zip(["vision x1", "vision x1 no sharing"], run(name, 1, cfg, alternate=True)))
        else:
            mine = {f"{name} x{procs}": run(name, procs, cfg) for procs in (1, 2)}
        for run_name, r in mine.items():
            r["floor"] = base["generate"] + base["fwd_bwd"] + base["fwd"]
            r["overhead_ratio"] = r["step"] / r["floor"]
            runs[run_name] = {**r, **{f"floor/{k}": v for k, v in base.items()}}
        print(f"  {', '.join(mine)}: done ({time.time() - started:.0f} s)", flush=True)
    assert list(runs) == list(RUNS), list(runs)
    results["runs"] = runs
    print("\n" + table(runs, cfg))
    shared, plain = runs["vision x1"], runs["vision x1 no sharing"]
    speedup = {
        "step": plain["step"] / shared["step"],
        "train": plain["train"] / shared["train"],
        "rollout": plain["rollout"] / shared["rollout"],
    }
    tower, lm = flops("vision")
    print(
        f"\nvision sharing on the vision-heavy model (tower {tower:.2f} GFLOP per image, language model "
        f"{lm:.2f} GFLOP per sequence): step {speedup['step']:.2f}x faster, after the rollout "
        f"{speedup['train']:.2f}x, rollout {speedup['rollout']:.2f}x; tower images per step "
        f"{plain['tower_images_per_step']:.0f} -> {shared['tower_images_per_step']:.0f}"
    )
    results["vision_sharing_speedup"] = speedup
    results["vision_flops_g"] = {"tower_per_image": tower, "lm_per_sequence": lm}
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.time() - started
    json.dump(results, open(path, "w"), indent=1)
    load = ", ".join(f"{x:.2f}" for x in results["load_average_end"])
    print(
        f"written to {path} ({results['seconds']:.0f} s; load average at the end {load}, "
        f"{os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        name, out, cfg, alternate = sys.argv[2:6]
        worker(name, out, json.loads(cfg), alternate == "alternate")
    elif sys.argv[1:2] == ["--scoring-memory"]:
        scoring_memory(sys.argv[2], int(sys.argv[3]))
    else:
        main(sys.argv[1:])
