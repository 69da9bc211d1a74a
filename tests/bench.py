"""./run.sh bench: where the time of a GRPO step goes, on CPU, for the tiny model and a small one.

For each model and 1 or 2 processes it runs a few real steps of grpo_vl.py (G = 8, 64 new tokens) and reads
metrics.jsonl: seconds per step split into rollout, reward, reference/old log-probs and update; generated
tokens per second; peak memory (max RSS). It then times the floor on the same shapes with bare transformers
-- one generate(), one forward+backward, one no-grad forward (the reference, beta > 0) -- and prints the
overhead ratio = step time / floor. Figures go to bench.json. Not a test: it asserts nothing.

The vision-heavy model runs in one process with vision sharing at odd steps and --no-vision-sharing at even
ones (both under the same load of this shared machine): the speed-up of the step and of its reference/old
+ update part is `vision_sharing_speedup` in bench.json.
"""

import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vl as g  # noqa: E402

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
STEPS, P, G, NEW = 6, 4, 8, 64
ALTERNATE_STEPS = 8  # the vision-heavy run: 2 warm-up steps, then 3 shared and 3 plain ones in turn


def flags(out):
    return [
        "--model",
        "tiny",
        "--data",
        "synthetic:64",
        "--max-steps",
        str(STEPS),
        "--prompts-per-step",
        str(P),
        "--num-generations",
        str(G),
        "--max-new-tokens",
        str(NEW),
        "--micro-batch",
        str(P * G),
        "--log-completions-every",
        "0",
        "--out",
        out,
    ]


def worker(name, out, alternate=""):
    """One run of grpo_vl.main on `name`'s model (inside torchrun for 2 processes); prints its peak RSS and
    the images its vision tower encoded at each step (policy and reference, counted by a forward hook).
    alternate: vision sharing at odd steps, --no-vision-sharing at even ones, so that both see the same
    load of this shared machine."""
    images = []  # per step
    build = functools.partial(g.build_tiny, **MODELS[name])
    rollout = g.rollout

    def count(module, args, kwargs, output):
        images[-1] += len(kwargs["grid_thw"])

    def build_and_count(*a, **k):  # the reference model is a deep copy: it inherits the hook
        model, processor = build(*a, **k)
        model.model.visual.register_forward_hook(count, with_kwargs=True)
        return model, processor

    def rollout_and_alternate(model, processor, exs, args, *rest, **kw):  # each step starts here
        images.append(0)
        args.vision_sharing = not (bool(alternate) and len(images) % 2 == 0)
        return rollout(model, processor, exs, args, *rest, **kw)

    g.build_tiny = build_and_count
    g.rollout = rollout_and_alternate
    g.main(flags(out) + (["--max-steps", str(ALTERNATE_STEPS)] if alternate else []))
    if int(os.environ.get("RANK", 0)) == 0:
        print("MAXRSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print("TOWER_IMAGES", json.dumps(images))


def run(name, procs, alternate=False):
    """Means over the steps after the first (it warms up); alternate: (shared steps 3, 5, ...; plain
    steps 4, 6, ...), step 2 warming the plain path up."""
    out = tempfile.mkdtemp(prefix=f"bench-{name}-{procs}-")
    launcher = [sys.executable] + (
        ["-m", "torch.distributed.run", f"--nproc_per_node={procs}"] if procs > 1 else []
    )
    p = subprocess.run(
        launcher + [__file__, "--worker", name, out] + (["alternate"] if alternate else []),
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(2 // procs)},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rss = float(p.stdout.split("MAXRSS_MB")[1].split()[0])
    images = json.loads(p.stdout.split("TOWER_IMAGES")[1].splitlines()[0])
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    if alternate:
        return summary(rows[2::2], images[2::2], rss), summary(rows[3::2], images[3::2], rss)
    return summary(rows[1:], images[1:], rss)


def summary(rows, images, rss):
    """Means over the timed steps' metrics.jsonl rows, with the peak RSS and the tower's images per step."""
    keys = ("step_time", "time/rollout", "time/reward", "time/ref_old", "time/update", "completion_len")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return {
        "step": mean["step_time"],
        "rollout": mean["time/rollout"],
        "reward": mean["time/reward"],
        "ref_old": mean["time/ref_old"],
        "update": mean["time/update"],
        "peak_rss_mb": rss,
        "tokens_per_s": mean["completion_len"] * P * G / mean["time/rollout"],
        "completion_len": mean["completion_len"],
        "tower_images_per_step": sum(images) / len(images),
        "steps_timed": len(rows),
    }


def weights(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def flops(name):
    """Forward FLOPs at 2 per weight per token, in G: (the tower per image, the language model per sequence)."""
    model, processor = g.build_tiny(0, **MODELS[name])
    b = g.encode(processor, data.load_examples("synthetic:64", "train"), g.parse_args(["--model", "tiny"]))
    patches = b["image_grid_thw"].prod(-1).float().mean().item()  # per image, before the 2 x 2 merge
    tokens = b["attention_mask"].sum(1).float().mean().item() + NEW  # prompt + completion
    v = model.model.visual
    tower = 2 * patches * (weights(v.patch_embed, v.blocks) + weights(v.merger) / 4)
    lm = 2 * tokens * weights(model.model.language_model.layers) + 2 * (NEW + 1) * weights(model.lm_head)
    return tower / 1e9, lm / 1e9


def floor(name):
    """Bare transformers on the same shapes: generate, forward+backward, no-grad forward (seconds)."""
    torch.set_num_threads(2)
    model, processor = g.build_tiny(0, **MODELS[name])
    args = g.parse_args(["--model", "tiny", "--max-new-tokens", str(NEW)])
    b = g.take(
        g.encode(processor, data.load_examples("synthetic:8", "train")[:P], args),
        torch.arange(P).repeat_interleave(G),
    )
    inputs = {k: b[k] for k in g.MODEL_KEYS}
    times = {"generate": [], "fwd_bwd": [], "fwd": []}
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
            seqs = model.generate(
                **inputs, **g.sampling(args, processor.tokenizer.convert_tokens_to_ids(g.VISION_TOKENS))
            )
        t1 = time.perf_counter()
        full = {
            **inputs,
            "input_ids": seqs,
            "attention_mask": torch.ones_like(seqs),
            "mm_token_type_ids": torch.cat(
                [b["mm_token_type_ids"], torch.zeros_like(seqs[:, b["input_ids"].shape[1] :])], 1
            ),
        }
        model(**full, logits_to_keep=seqs.shape[1] - b["input_ids"].shape[1] + 1).logits.float().logsumexp(
            -1
        ).mean().backward()
        t2 = time.perf_counter()
        with torch.no_grad():
            model(**full, logits_to_keep=seqs.shape[1] - b["input_ids"].shape[1] + 1)
        t3 = time.perf_counter()
        for k, t in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[k].append(t)
    return {k: min(v) for k, v in times.items()}  # best of 3: the floor


def full_vocab_logprobs(model, b, T, banned):
    """How token_logprobs computed log-probs before it worked in chunks: (N, C, V) fp32 logits at once."""
    C = b["completion"].shape[1]
    logits = (
        model(
            input_ids=torch.cat([b["input_ids"], b["completion"]], 1),
            attention_mask=torch.cat([b["attention_mask"], b["mask"].long()], 1),
            mm_token_type_ids=torch.cat([b["mm_token_type_ids"], torch.zeros_like(b["completion"])], 1),
            pixel_values=b["pixel_values"],
            image_grid_thw=b["image_grid_thw"],
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
    of C tokens on the tiny model given the real vocabulary (151,936), the old way or the chunked way."""
    torch.set_num_threads(2)
    model, processor = g.build_tiny(0)
    model.resize_token_embeddings(
        151_936, mean_resizing=False
    )  # the real vocabulary; the rest of the model stays tiny
    args = g.parse_args(["--model", "tiny"])
    banned = processor.tokenizer.convert_tokens_to_ids(g.VISION_TOKENS)
    exs = data.load_examples("synthetic:8", "train")[:N]
    b = g.encode(processor, exs, args)
    b["completion"] = torch.randint(len(g.SPECIAL), 500, (N, C))  # ordinary tokens (special ones come first)
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


def measure_scoring_memory():
    """Each way in a fresh process, so neither inherits the other's freed-but-kept memory."""
    peaks = {}
    for C in (128, 512):
        for how in ("full", "chunked"):
            cmd = [sys.executable, __file__, "--scoring-memory", how, str(C)]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            assert p.returncode == 0, p.stderr[-3000:]
            peaks[f"{how} 4x{C}"] = float(p.stdout.split("PEAK_MB")[1].split()[0])
    return peaks


def main():
    peaks = measure_scoring_memory()
    print("scoring forward + backward at vocabulary 151,936, peak MB above start (4 completions x C tokens):")
    for C in (128, 512):
        full, chunked = peaks[f"full 4x{C}"], peaks[f"chunked 4x{C}"]
        print(
            f"  C = {C}: (N, C, V) fp32 logits at once {full:.0f}, in {g.LOGPROB_CHUNK}-token chunks {chunked:.0f}"
        )
    results = {"scoring_peak_mb": peaks}
    for name in MODELS:
        base = floor(name)  # bare transformers: every copy of an image through the tower
        if name == "vision":  # one process, sharing and not in alternate steps
            runs = dict(zip(["vision x1", "vision x1 no sharing"], run(name, 1, alternate=True)))
        else:
            runs = {f"{name} x{procs}": run(name, procs) for procs in (1, 2)}
        for run_name, r in runs.items():
            r["floor"] = base["generate"] + base["fwd_bwd"] + base["fwd"]
            r["overhead_ratio"] = r["step"] / r["floor"]
            results[run_name] = {**r, **{f"floor/{k}": v for k, v in base.items()}}
    cols = [
        "step",
        "rollout",
        "reward",
        "ref_old",
        "update",
        "tokens_per_s",
        "peak_rss_mb",
        "floor",
        "overhead_ratio",
        "tower_images_per_step",
    ]
    print(f"\nGRPO step on CPU, G = {G}, {P} prompts, {NEW} new tokens (seconds unless named)")
    width = [max(15, len(c) + 2) for c in cols]
    print(f"{'run':<22}" + "".join(f"{c:>{w}}" for c, w in zip(cols, width)))
    for run_name, r in results.items():
        print(f"{run_name:<22}" + "".join(f"{r[c]:>{w}.3f}" for c, w in zip(cols, width)))
    shared, plain = results["vision x1"], results["vision x1 no sharing"]
    speedup = {
        "step": plain["step"] / shared["step"],
        "ref_old_update": (plain["ref_old"] + plain["update"]) / (shared["ref_old"] + shared["update"]),
        "rollout": plain["rollout"] / shared["rollout"],
    }
    tower, lm = flops("vision")
    print(
        f"\nvision sharing on the vision-heavy model (tower {tower:.2f} GFLOP per image, language model "
        f"{lm:.2f} GFLOP per sequence): step {speedup['step']:.2f}x faster, reference/old + update "
        f"{speedup['ref_old_update']:.2f}x, rollout {speedup['rollout']:.2f}x; tower images per step "
        f"{plain['tower_images_per_step']:.0f} -> {shared['tower_images_per_step']:.0f}"
    )
    results["vision_sharing_speedup"] = speedup
    results["vision_flops_g"] = {"tower_per_image": tower, "lm_per_sequence": lm}
    json.dump(results, open(os.path.join(ROOT, "bench.json"), "w"), indent=1)
    print("written to bench.json")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:])
    elif sys.argv[1:2] == ["--scoring-memory"]:
        scoring_memory(sys.argv[2], int(sys.argv[3]))
    else:
        main()
