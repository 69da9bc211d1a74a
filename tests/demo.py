"""./run.sh demo: watch GRPO learn on a laptop CPU, offline, in a few minutes.

0. tests/tiny.py writes a random 0.2M-parameter Qwen2-VL folder and tests/shapes.py two data sets in the
   plain schema: the four CV-Bench-style tasks (Count, Relation, Depth, Distance) and the Color task.
1. An SFT warm-up on the four tasks, and on Color questions with random answers, teaches the random model
   the r1zero answer format: <think> ... </think><answer>(X)</answer>. The four tasks are too hard for so
   small a model in minutes, so it learns the format and guesses the answers.
2. GRPO then trains it on the Color task (one big shape; four colours, always listed in the same order),
   whose right answers the warm-up never showed it: only the reward tells it which letter is right.
3. Greedy decoding on 200 held-out Color questions (another seed) before and after GRPO: the table.

Any flag of grpo_vl.py given to ./run.sh demo overrides the recipe below; --seed N also builds the model
with seed N. --quick runs a few steps of each phase (what the tests run).
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import grpo_vl as g  # noqa: E402
import shapes  # noqa: E402
import tiny  # noqa: E402


def recipe(out, seed, quick):
    """The demo's flags: the fixtures it writes under OUT, then the run."""
    sft_rows = 64 if quick else 4000  # one epoch of 8-example steps: 8 or 500 warm-up steps
    return [
        "--variant",
        "r1zero",
        "--model",
        tiny.write(os.path.join(out, "model"), seed),
        "--sft-data",
        # the four tasks and blind Color rows (random answers): the format, on Color questions too
        shapes.write(os.path.join(out, "shapes"), sft_rows, seed, shapes.TASKS + ("Color",), blind=True),
        "--sft-epochs",
        "1",
        "--sft-lr",
        "1e-2",
        "--data",
        shapes.write(os.path.join(out, "color"), 64 if quick else 2000, seed, ("Color",)),
        "--eval-data",
        shapes.write(os.path.join(out, "color-test"), 16 if quick else 200, seed + 1, ("Color",)),
        "--max-steps",
        "2" if quick else "250",
        "--prompts-per-step",
        "8",
        "--lr",
        "2e-3",
        "--max-new-tokens",
        "96",
        "--eval-max-new-tokens",
        "96",
        "--no-gradient-checkpointing",  # a 0.2M model: memory is no concern, recomputing is
        "--out",
        out,
        "--seed",
        str(seed),
    ]


def main(argv):
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    first = argparse.ArgumentParser(add_help=False)  # --seed and --out decide the fixtures' folders
    first.add_argument("--seed", type=int, default=0)
    first.add_argument("--out")
    given = first.parse_known_args(argv)[0]
    out = given.out or f"runs/demo-{given.seed}"
    flags = recipe(out, given.seed, quick) + argv
    steps = g.parse_args(flags).max_steps
    g.main(flags + ["--eval-every", str(steps)])  # evaluates at step 0 (the start of RL) and at the end
    before, after = (json.load(open(os.path.join(out, f"eval_step{s}.json"))) for s in (0, steps))
    print(f"\nheld-out Color questions (n = {after['n']}), greedy decoding:\n")
    print("| model | accuracy | format rate | mean completion length |\n|---|---|---|---|")
    for name, r in [("start of GRPO (after the SFT warm-up)", before), (f"after {steps} GRPO steps", after)]:
        print(f"| {name} | {r['accuracy']:.3f} | {r['format']:.3f} | {r['completion_len']:.1f} |")
    print(
        f"\naccuracy {after['accuracy'] - before['accuracy']:+.3f}; logs in {out}/metrics.jsonl, "
        f"sampled completions in {out}/trajectories/, the model in {out}/checkpoint"
    )
    return before, after


if __name__ == "__main__":
    main(sys.argv[1:])
