"""The synthetic data set of the tests and the demo: coloured shapes with CV-Bench-style questions.

    python tests/shapes.py OUT [N] [SEED] [TASKS]   # writes OUT/rows.jsonl and OUT/images/*.png

writes what a user would bring: a JSON Lines file in the plain schema (image, prompt, answer, choices, task,
source, solution, key_steps) with its images beside it. Tasks: Count, Relation (left/right), Depth (the bigger
is closer), Distance, and Color, the demo's easy one (one big shape; four colours, always listed in one
order).
"""

import json
import os
import random
import sys

from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import with_choices  # noqa: E402
from rewards import FINAL  # noqa: E402

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
TASKS = ("Count", "Relation", "Depth", "Distance")


def draw(d, shape, color, x, y, r, drawn):
    drawn.append(f"a {color} {shape}")
    box = [x - r, y - r, x + r, y + r]
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])


def synthetic_rows(n, seed, tasks=TASKS, blind=False):
    """n rows of coloured shapes in CV-Bench's schema, `tasks` in turn: Count, Relation (left/right), Depth
    (the bigger is closer), Distance; Color, the demo's easy one, lists its choices in one order. Seeded.
    blind: a Color row's answer is a random letter and it has no solution (which would name the colour): SFT
    on such rows teaches the answer format on Color questions, not which colour is right."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        W, H = rng.choice([(112, 112), (112, 84), (84, 112)])
        img = Image.new("RGB", (W, H), (245, 245, 245))
        d = ImageDraw.Draw(img)
        drawn = []  # "a red circle", ...: the solution's image description
        kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], 3)
        name = [f"{c} {s}" for c, s in kinds]
        if task == "Count":  # k shapes of one colour among distractors of other colours
            color = rng.choice(list(COLORS))
            k = rng.randint(1, 4)
            others = [c for c in COLORS if c != color]
            for j in range(k + rng.randint(0, 2)):
                c = color if j < k else rng.choice(others)
                draw(d, rng.choice(SHAPES), c, rng.randint(8, W - 8), rng.randint(8, H - 8), 6, drawn)
            q = f"How many {color} shapes are in the image?"
            choices = [str(k)] + rng.sample([str(v) for v in range(0, 6) if v != k], 3)
            steps = [f"I look for the {color} shapes.", f"I count {k} {color} shapes."]
            keys = [[f"{k} {color} shapes", f"{'zero one two three four'.split()[k]} {color} shapes"]]
        elif task == "Relation":
            xs = rng.sample(range(12, W - 12, 20), 2)  # 20 px apart at least: never overlapping
            for (c, s), x in zip(kinds[:2], xs):
                draw(d, s, c, x, rng.randint(12, H - 12), 9, drawn)
            q = f"Is the {name[0]} to the left or to the right of the {name[1]}?"
            choices = ["left", "right"] if xs[0] < xs[1] else ["right", "left"]
            steps = [f"The {name[0]} is on the {choices[0]} of the {name[1]}."]
            keys = [[f"{name[0]} is on the {choices[0]}", f"{name[0]} is to the {choices[0]}"]]
        elif task == "Depth":
            r = rng.sample([6, 9, 13, 17], 2)
            for (c, s), rr, x in zip(kinds[:2], r, (W // 4, 3 * W // 4)):
                draw(d, s, c, x, H // 2, rr, drawn)
            q = f"Which is closer to the camera, the {name[0]} or the {name[1]}?"
            choices = [name[0], name[1]] if r[0] > r[1] else [name[1], name[0]]
            steps = [
                f"The {choices[0]} is bigger than the {choices[1]}.",
                f"Bigger means closer, so the {choices[0]} is closer.",
            ]
            keys = [[f"{choices[0]} is bigger", f"{choices[0]} is larger"], [f"{choices[0]} is closer"]]
        elif task == "Color":  # one big shape, whose colour alone answers
            c = rng.choice(list(COLORS))
            r = rng.randint(30, 42)
            draw(d, rng.choice(SHAPES), c, rng.randint(r, W - r), rng.randint(r, H - r), r, drawn)
            q = "What colour is the shape?"
            choices = list(COLORS)
            steps = [f"The shape is {c}."]
            keys = [[f"is {c}"]]
        else:  # Distance: which of two objects is nearer (in the picture) to a third
            pts = [(rng.randint(10, W - 10), rng.randint(10, H - 10)) for _ in range(3)]
            dist = [abs(complex(*pts[j]) - complex(*pts[0])) for j in (1, 2)]  # |p - q| in the plane
            while abs(dist[0] - dist[1]) < 10:  # no near ties: the question must have one answer
                pts[2] = (rng.randint(10, W - 10), rng.randint(10, H - 10))
                dist[1] = abs(complex(*pts[2]) - complex(*pts[0]))
            for (c, s), (x, y) in zip(kinds, pts):
                draw(d, s, c, x, y, 7, drawn)
            q = f"Which is closer to the {name[0]}, the {name[1]} or the {name[2]}?"
            choices = [name[1], name[2]] if dist[0] < dist[1] else [name[2], name[1]]
            steps = [f"The {choices[0]} is nearer to the {name[0]} than the {choices[1]}."]
            keys = [[f"{choices[0]} is nearer", f"{choices[0]} is closer"]]
        gold = c if task == "Color" else choices[0]
        if task != "Color":
            rng.shuffle(choices)
        answer = f"({LETTERS[choices.index(gold)]})"
        source = "Omni3D" if task in ("Depth", "Distance") else ("ADE20K", "COCO")[i // len(tasks) % 2]
        numbered = "".join(f"### Step {j + 1}:\n{st}\n" for j, st in enumerate(steps))
        solution = (
            f"### Image Description:\nThe image shows {', '.join(sorted(set(drawn)))}.\n"
            f"### Rationales:\nThe question is about {task.lower()}; I compare the shapes in the image.\n"
            f"### Let's think step by step.\n{numbered}{FINAL} {answer}"
        )
        if blind and task == "Color":
            answer = f"({rng.choice(LETTERS[:4])})"
            solution = None
        rows.append(
            {
                "image": img,
                "prompt": with_choices(q, choices),
                "question": q,
                "choices": choices,
                "task": task,
                "answer": answer,
                "type": "3D" if task in ("Depth", "Distance") else "2D",
                "source": source,
                "solution": solution,
                "key_steps": {"Steps": keys},
            }
        )
    return rows


def write(folder, n=64, seed=0, tasks=TASKS, blind=False):
    """n rows of `tasks` as folder/rows.jsonl, each image as folder/images/<row>.png (a relative path).
    Written once: a folder that holds rows.jsonl already is left as it is. Returns the file's path."""
    path = os.path.join(folder, "rows.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        for i, row in enumerate(synthetic_rows(n, seed, tasks, blind)):
            name = f"images/{i:05d}.png"
            row.pop("image").save(os.path.join(folder, name))
            f.write(json.dumps({"image": name, **row}) + "\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    out, n, seed, tasks = (sys.argv[1:] + ["", "", ""])[:4]
    print(write(out, int(n or 2000), int(seed or 0), tuple(tasks.split(",")) if tasks else TASKS))
