"""Regenerate README.md's line links -- each `[LABEL](file#Ln)` points at the first line of `file` that
contains its anchor text (below) -- and its flags table, from grpo_vl.Args. Run:
.venv/bin/python tests/readme_links.py (test_train.py checks both)."""

import os
import re
import sys
from dataclasses import fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHORS = {  # label -> (file, text on the line); the line must also contain the label itself
    "G1": ("grpo_vl.py", "r = sum(per_fn.values())"),
    "G2": ("grpo_vl.py", '"""G2, DeepSeekMath'),
    "G3": ("grpo_vl.py", "ratio = torch.exp(logp - old)"),
    "G4": ("grpo_vl.py", "if ref is not None:  # G4"),
    "G5": ("grpo_vl.py", "surrogate = torch.min("),
    "G6": ("grpo_vl.py", "# G6: -1/G"),
    "G7": ("grpo_vl.py", "# G7: at mu = 1, rho = 1"),
    "G8": ("grpo_vl.py", "# (n, V) G8: z / T"),
    "G9": ("grpo_vl.py", '"""G9:'),
    "I1": ("grpo_vl.py", "(G8, I1)"),
    "I2": ("data.py", "batch (I2)"),
    "I3": ("grpo_vl.py", "a row per image (I3)"),
    "I4": ("data.py", "(I4)"),
    "I5": ("grpo_vl.py", "VISION_TOKENS = ["),
    "I6": ("grpo_vl.py", "# I6"),
    "I7": ("grpo_vl.py", "# I7"),
    "I8": ("grpo_vl.py", "# I8"),
    "I9": ("grpo_vl.py", '"""I9:'),
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
    "P4": ("data.py", "# P4"),
}
LINK = re.compile(r"\[(G\d|I\d+|R\d|P\d)\]\((\w+\.py)#L(\d+)\)")


def line_of(name, text):
    for n, line in enumerate(open(os.path.join(ROOT, name)), 1):
        if text in line:
            return n
    raise KeyError(f"{name}: no line contains {text!r}")


def relink(readme):
    return LINK.sub(lambda m: f"[{m[1]}]({ANCHORS[m[1]][0]}#L{line_of(*ANCHORS[m[1]])})", readme)


def flag_rows():
    """The flags table's rows, as the README shows them: flag, r1zero's default, the --help text."""
    sys.path.insert(0, ROOT)
    import grpo_vl

    rows = []
    for f in fields(grpo_vl.Args):
        help_ = f.metadata["help"].replace("|", "&#124;")
        rows.append(f"| `--{f.name.replace('_', '-')}` | `{f.default}` | {help_} |")
    return rows


if __name__ == "__main__":
    path = os.path.join(ROOT, "README.md")
    lines = relink(open(path).read()).split("\n")
    flags = lines.index("## Flags")  # the table under it: other tables may name a flag first too
    table = [n for n, line in enumerate(lines) if n > flags and line.startswith("| `--")]
    lines[table[0] : table[-1] + 1] = flag_rows()
    open(path, "w").write("\n".join(lines))
