"""./run.sh bench: where the time of a GRPO step goes, on CPU, for the tiny model and a small one.

For each model and 1 or 2 processes it runs a few real steps of grpo_vl.py (G = 8, 64 new tokens) and reads
metrics.jsonl: seconds per step split into rollout, reward, reference/old log-probs and update; generated
tokens per second; peak memory (max RSS). It then times the floor on the same shapes with bare transformers
-- one generate(), one forward+backward, one no-grad forward (the reference, beta > 0) -- and prints the
overhead ratio = step time / floor. Figures go to bench.json. Not a test: it asserts nothing.
"""

import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vl as g  # noqa: E402

MODELS = {"tiny": dict(hidden=64, layers=2), "small": dict(hidden=256, layers=4)}
STEPS, P, G, NEW = 6, 4, 8, 64


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


def worker(name, out):
    """One run of grpo_vl.main on `name`'s model (inside torchrun for 2 processes); prints its peak RSS."""
    g.build_tiny = functools.partial(g.build_tiny, **MODELS[name])
    g.main(flags(out))
    if int(os.environ.get("RANK", 0)) == 0:
        print("MAXRSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run(name, procs):
    out = tempfile.mkdtemp(prefix=f"bench-{name}-{procs}-")
    launcher = [sys.executable] + (
        ["-m", "torch.distributed.run", f"--nproc_per_node={procs}"] if procs > 1 else []
    )
    p = subprocess.run(
        launcher + [__file__, "--worker", name, out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(2 // procs)},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rss = float(p.stdout.split("MAXRSS_MB")[1].split()[0])
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][1:]  # step 1 warms up
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    return {
        "step": mean("step_time"),
        "rollout": mean("time/rollout"),
        "reward": mean("time/reward"),
        "ref_old": mean("time/ref_old"),
        "update": mean("time/update"),
        "peak_rss_mb": rss,
        "tokens_per_s": mean("completion_len") * P * G / mean("time/rollout"),
        "completion_len": mean("completion_len"),
    }


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


def main():
    results = {}
    for name in MODELS:
        base = floor(name)
        for procs in (1, 2):
            r = run(name, procs)
            r["floor"] = base["generate"] + base["fwd_bwd"] + base["fwd"]
            r["overhead_ratio"] = r["step"] / r["floor"]
            results[f"{name} x{procs}"] = {**r, **{f"floor/{k}": v for k, v in base.items()}}
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
    ]
    print(f"\nGRPO step on CPU, G = {G}, {P} prompts, {NEW} new tokens (seconds unless named)")
    print(f"{'run':<10}" + "".join(f"{c:>15}" for c in cols))
    for run_name, r in results.items():
        print(f"{run_name:<10}" + "".join(f"{r[c]:>15.3f}" for c in cols))
    json.dump(results, open(os.path.join(ROOT, "bench.json"), "w"), indent=1)
    print("written to bench.json")


if __name__ == "__main__":
    worker(sys.argv[2], sys.argv[3]) if sys.argv[1:2] == ["--worker"] else main()
