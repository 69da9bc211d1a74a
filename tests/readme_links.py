"""Regenerate the line links of README.md: each `[LABEL](file#Ln)` points at the first line of `file` that
contains its anchor text (below). Run: .venv/bin/python tests/readme_links.py  (test_readme checks them)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHORS = {  # label -> (file, text on the line)
    "G1": ("grpo_vl.py", "r = sum(per_fn.values())"),
    "G2": ("grpo_vl.py", '"""G2: A_i'),
    "G3": ("grpo_vl.py", "ratio = torch.exp(logp - old)"),
    "G4": ("grpo_vl.py", "D = torch.exp(ref - logp)"),
    "G5": ("grpo_vl.py", "surrogate = torch.min("),
    "G6": ("grpo_vl.py", "aggregated as G6"),
    "G7": ("grpo_vl.py", "# G7: rho = 1 at mu = 1"),
    "G8": ("grpo_vl.py", "drawn from (G8)"),
    "G9": ("grpo_vl.py", '"""G9:'),
    "I1": ("grpo_vl.py", "(G8, I1)"),
    "I2": ("data.py", "(I2)"),
    "I3": ("grpo_vl.py", "concatenated (I3)"),
    "I4": ("grpo_vl.py", "(I4): one over"),
    "I5": ("grpo_vl.py", "(I5)"),
    "I6": ("grpo_vl.py", "# I6"),
    "I7": ("grpo_vl.py", "# I7"),
    "I8": ("grpo_vl.py", "# I8"),
    "I9": ("grpo_vl.py", "FSDP2 (I9)"),
    "I10": ("grpo_vl.py", "(I10)"),
    "R1": ("rewards.py", '"""R1:'),
    "R2": ("rewards.py", '"""R2:'),
    "R3": ("rewards.py", '"""R3'),
    "R4": ("rewards.py", '"""R4'),
    "R5": ("rewards.py", '"""R5'),
    "R6": ("rewards.py", '"""R6'),
    "R7": ("rewards.py", '"""R7'),
    "P1": ("data.py", "# P1:"),
    "P2": ("data.py", "P2 = "),
    "P3": ("data.py", "# P3"),
    "P4": ("data.py", "P4 (Vision-R1"),
}
LINK = re.compile(r"\[(G\d|I\d+|R\d|P\d)\]\((\w+\.py)#L(\d+)\)")


def line_of(name, text):
    for n, line in enumerate(open(os.path.join(ROOT, name)), 1):
        if text in line:
            return n
    raise KeyError(f"{name}: no line contains {text!r}")


def relink(readme):
    return LINK.sub(lambda m: f"[{m[1]}]({ANCHORS[m[1]][0]}#L{line_of(*ANCHORS[m[1]])})", readme)


if __name__ == "__main__":
    path = os.path.join(ROOT, "README.md")
    text = relink(open(path).read())
    open(path, "w").write(text)
