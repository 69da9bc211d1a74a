"""./run.sh demo: watch GRPO learn on a laptop CPU in about five minutes, offline.

1. A brief SFT warm-up on the four CV-Bench-style synthetic tasks (Count, Relation, Depth, Distance) teaches
   a random 0.2M-parameter Qwen2-VL the r1zero answer format: <think> ... </think><answer>(X)</answer>.
   Those tasks are too hard for so small a model, so it learns the format and guesses the answers.
2. GRPO then trains it on the synthetic Color task (one big shape; four colours, always listed in the same
   order), which the warm-up never showed it: only the reward tells it which letter is right.
3. Greedy decoding on 200 held-out Color questions (another seed) before and after GRPO: the table.

Any flag of grpo_vl.py given to ./run.sh demo overrides the recipe below (e.g. --seed 1).
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo_vl as g  # noqa: E402

RECIPE = [
    "--variant",
    "r1zero",
    "--model",
    "tiny",
    "--sft-data",
    "synthetic",
    "--sft-steps",
    "400",
    "--data",
    "synthetic::Color",
    "--eval-data",
    "synthetic:200:Color",
    "--max-steps",
    "250",
    "--prompts-per-step",
    "8",
    "--lr",
    "2e-3",
    "--out",
    "runs/demo",
]


def main(argv):
    flags = RECIPE + argv
    args = g.parse_args(flags)
    steps = args.max_steps
    g.main(flags + ["--eval-every", str(steps)])  # evaluates at step 0 (the start of RL) and at the end
    before, after = (json.load(open(os.path.join(args.out, f"eval_step{s}.json"))) for s in (0, steps))
    print(f"\nheld-out {args.eval_data} (n = {after['n']}), greedy decoding:\n")
    print("| model | accuracy | format rate | mean completion length |\n|---|---|---|---|")
    for name, r in [("start of GRPO (after the SFT warm-up)", before), (f"after {steps} GRPO steps", after)]:
        print(f"| {name} | {r['accuracy']:.3f} | {r['format']:.3f} | {r['completion_len']:.1f} |")
    print(
        f"\naccuracy {after['accuracy'] - before['accuracy']:+.3f}; logs in {args.out}/metrics.jsonl, "
        f"sampled completions in {args.out}/trajectories/, the model in {args.out}/checkpoint"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
