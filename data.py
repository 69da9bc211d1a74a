"""Data (RECIPES §D, §P): the prompts, the data set adapters, a synthetic task, and batching.

Every adapter turns a published row into one example: {"images": [PIL / path / URL / bytes], "question",
"answer": gold text, "choices": [option texts] or None, "task", "source"} plus, for SFT and StepGRPO,
"solution" (P3 sections), "key_steps" ([[equivalent forms], ...]) or "target" (a chat row's reply).
"""

import collections
import io
import json
import os
import random

from PIL import Image, ImageDraw
from qwen_vl_utils import fetch_image

# --------------------------------------------------------------------------- prompts (P1, P2)
# P1: the base model has no chat template, so the string is built by hand. Note the space before
# "\nAssistant:" and the opened <think>: the completion continues the reasoning (R2 puts it back).
P1 = (
    "<|vision_start|><|image_pad|><|vision_end|>A conversation between User and Assistant. The user asks "
    "a question about the image, and the Assistant solves it. The assistant first thinks about the "
    "reasoning process in the mind and then provides the user with the answer.\nUser: {question} "
    "\nAssistant: Let me solve this step by step.\n<think>"
)
P2 = "  Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
# P3 (StepGRPO): instructions for the step-wise sections, then the question.
P3 = (
    "Solve the question about the image step by step. First describe the image under '### Image Description:', "
    "then give the rationale under '### Rationales:', then write '### Let's think step by step.' and the "
    "numbered steps '### Step 1:', '### Step 2:', ..., and end with '### The final answer is:' and the "
    "answer.\n\n"
)
FINAL = "### The final answer is:"
PROMPT_STYLES = ("base", "instruct", "step", "plain")  # P1, P2, P3, P4 (Vision-R1: the question alone)


def prompt_text(ex, style, processor):
    """The prompt string for one example; one <|image_pad|> per image, which the processor expands.
    Rows from chat SFT data keep their own user turn ("plain")."""
    if style == "base":
        return P1.format(question=ex["question"])
    style = "plain" if ex.get("target") else style
    text = {"instruct": ex["question"] + P2, "step": P3 + ex["question"]}.get(style, ex["question"])
    content = [{"type": "image"} for _ in ex["images"]] + [{"type": "text", "text": text}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def open_image(img):
    """PIL, path and URL pass through to qwen-vl-utils; raw bytes (as SAT stores them) are opened here."""
    if isinstance(img, dict):  # a datasets Image column read without decoding: {"bytes":..., "path":...}
        img = img.get("bytes") or img.get("path")
    return Image.open(io.BytesIO(img)) if isinstance(img, (bytes, bytearray)) else img


def encode(processor, examples, style, max_pixels):
    """Left-padded processor batch for a list of examples (I2). Images are fetched and resized by
    qwen-vl-utils to a multiple of patch * merge with at most max_pixels."""
    patch = processor.image_processor.patch_size
    images = [
        fetch_image(
            {"image": open_image(im), "min_pixels": 3136, "max_pixels": max_pixels}, image_patch_size=patch
        )
        for ex in examples
        for im in ex["images"]
    ]
    texts = [prompt_text(ex, style, processor) for ex in examples]
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


def sft_target(ex, style):
    """What SFT teaches the model to write after the prompt: a chat row's assistant turn, or the row's
    step-wise solution (P3 sections) -- as it is for P3, rewritten as <think>...</think><answer>...</answer>
    for the other prompts (P1 has already opened the <think>)."""
    if ex.get("target"):
        return ex["target"]
    if style == "step":
        return ex["solution"]
    reasoning, _, answer = ex["solution"].rpartition(FINAL)
    reasoning = " ".join(line for line in reasoning.splitlines() if line and not line.startswith("### "))
    return ("" if style == "base" else "<think>") + f"{reasoning}</think><answer>{answer.strip()}</answer>"


# --------------------------------------------------------------------------- adapters (D)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BadRow(ValueError):
    def __init__(
        self, name, i, column, why
    ):  # `reason` counts skipped rows: the column and the why, no details
        super().__init__(f"data set {name!r}, row {i}, column {column!r}: {why}")
        self.reason = f"{column}: {why.split(' (')[0]}"


def check_images(ex, i, name):
    """Open each image's header now, so an unreadable one is named at load time, not mid-training."""
    for im in ex["images"]:
        try:  # a path or file:// is opened (its header only); a PIL image is open already; URLs are left to load
            if isinstance(im := open_image(im), str) and not im.startswith(("http://", "https://", "data:")):
                Image.open(im.removeprefix("file://")).size
        except Exception as e:  # noqa: BLE001 -- any failure to read it is this row's fault
            raise BadRow(name, i, "image", f"unreadable image ({type(e).__name__}: {str(e)[:80]})") from None


def from_cvbench(row, i, name):
    """CV-Bench: `prompt` already lists the lettered choices; `answer` is "(A)"..."""
    if row.get("image") is None:
        raise BadRow(name, i, "image", "no image")
    letter = str(row.get("answer") or "").strip("() ")
    if len(letter) != 1 or LETTERS.find(letter) >= len(row["choices"]) or LETTERS.find(letter) < 0:
        raise BadRow(name, i, "answer", f"expected a letter among the choices, got {row.get('answer')!r}")
    return {
        "images": [row["image"]],
        "question": row["prompt"],
        "choices": list(row["choices"]),
        "answer": row["choices"][LETTERS.index(letter)],
        "task": row.get("task", ""),
        "source": row.get("source", ""),
        "solution": row.get("solution"),
        "key_steps": key_steps(row),
    }


def row_images(row, i, name):
    for col in ("images", "image", "image_path"):
        if row.get(col):
            return list(row[col]) if isinstance(row[col], list) else [row[col]]
    raise BadRow(name, i, "image", "no image (looked in 'images', 'image', 'image_path')")


def key_steps(row):
    """R1-VL's {"Steps": [[forms of step 1], ...]} (a dict or its JSON text) -> [[forms], ...]."""
    ks = row.get("key_steps")
    ks = json.loads(ks) if isinstance(ks, str) and ks.strip() else ks
    return [list(forms) for forms in (ks or {}).get("Steps") or []]


def from_stepwise(row, i, name):
    """Step-wise CoT rows (R1-VL-10K / Mulberry): the gold answer is the solution's final-answer line."""
    solution = row.get("solution") or ""
    answer = (solution.rpartition(FINAL)[2].strip().splitlines() or [""])[0] if FINAL in solution else ""
    if not answer:
        raise BadRow(name, i, "solution", f"no answer after a '{FINAL}' line")
    return {
        "images": row_images(row, i, name),
        "question": row["problem"],
        "answer": answer,
        "choices": None,
        "task": row.get("task") or "step",
        "source": name,
        "solution": solution,
        "key_steps": key_steps(row),
    }


def from_chat(row, i, name):
    """Chat SFT rows (Mulberry-SFT, Vision-R1-cold): role/content or from/value turns, plus `images`.
    The first user turn is the prompt, the assistant turn after it the SFT target."""
    column = "messages" if row.get("messages") else "conversations"
    text = lambda c: (
        c if isinstance(c, str) else " ".join(x.get("text") or "" for x in c or [] if isinstance(x, dict))
    )
    turns = [
        (
            {"human": "user", "gpt": "assistant"}.get(
                t.get("role") or t.get("from"), t.get("role") or t.get("from")
            ),
            text(t["content"] if t.get("content") is not None else t.get("value")),
        )
        for t in row.get(column) or []
    ]
    roles = [role for role, _ in turns]
    if "user" not in roles or "assistant" not in roles[roles.index("user") :]:
        raise BadRow(name, i, column, "needs a user turn followed by an assistant turn")
    question, images = turns[roles.index("user")][1], row_images(row, i, name)
    if question.count("<image>") not in (0, len(images)):
        raise BadRow(name, i, "images", f"{len(images)} images for {question.count('<image>')} <image> slots")
    return {
        "images": images,
        "question": question.replace("<image>", "").strip(),
        "answer": None,
        "choices": None,
        "task": "sft",
        "source": name,
        "target": turns[roles.index("assistant", roles.index("user"))][1],
    }


def from_sat(row, i, name, rng):
    """SAT: options shuffled with a seeded RNG; the question names them; the gold is the answer text."""
    if not row.get("correct_answer"):
        raise BadRow(name, i, "correct_answer", "no answer")
    options = rng.sample(list(row["answers"]), len(row["answers"]))
    q = f"{row['question']} Choose between the following options: {', '.join(options[:-1])} or {options[-1]}"
    return {
        "images": list(row["image_bytes"]),
        "question": q,
        "answer": row["correct_answer"],
        "choices": None,
        "task": "SAT",
        "source": "SAT",
    }


def load_examples(spec, split, seed=0, skip_bad=False):
    """`synthetic[:N[:Task,...]]`, a hub id, a local data set folder, or a .json/.jsonl/.parquet/.csv file. A bad
    row stops the load with its data set, row and column named, or with skip_bad is skipped and counted."""
    if spec.startswith("synthetic"):
        n, tasks = (spec + "::").split(":")[1:3]
        if bad := [t for t in tasks.split(",") if tasks and t not in TASKS + ("Color",)]:
            raise ValueError(
                f"data set {spec!r}: no synthetic task {bad[0]!r} ({', '.join(TASKS + ('Color',))})"
            )
        rows = synthetic_rows(int(n or 2000), seed + (split != "train"), tasks.split(",") if tasks else TASKS)
        return [{**from_cvbench(r, i, spec), "row": i} for i, r in enumerate(rows)]
    import datasets  # imported here: start-up stays fast for the synthetic path

    ext = {"jsonl": "json"}.get(os.path.splitext(spec)[1][1:], os.path.splitext(spec)[1][1:])
    ds = datasets.load_dataset(ext, data_files=spec) if os.path.isfile(spec) else datasets.load_dataset(spec)
    ds = ds[split] if split in ds else ds[next(iter(ds))]  # the asked split, else the only/first one
    cols, rng, out, multi, skipped = set(ds.column_names), random.Random(seed), [], 0, collections.Counter()
    if not (
        "image_bytes" in cols
        or {"prompt", "choices", "answer"} <= cols
        or "problem" in cols
        or cols & {"messages", "conversations"}
    ):
        raise ValueError(
            f"data set {spec!r}: columns {sorted(cols)} match no known schema "
            "(SAT, CV-Bench, step-wise CoT, math RL, chat SFT)"
        )
    for i in range(len(ds)):
        try:
            try:
                row = ds[i]  # decodes the row's images: a corrupt one fails here
            except OSError as e:
                raise BadRow(
                    spec, i, "image", f"unreadable image ({type(e).__name__}: {str(e)[:80]})"
                ) from None
            if "image_bytes" in cols:  # SAT: single-image rows only (r1zero trains on those)
                if len(row["image_bytes"] or []) != 1:
                    multi += 1
                    continue
                ex = from_sat(row, i, spec, rng)
            elif {"prompt", "choices", "answer"} <= cols:
                ex = from_cvbench(row, i, spec)
            elif {"problem", "solution"} <= cols:
                ex = from_stepwise(row, i, spec)
            elif {"problem", "answer"} <= cols:  # math RL rows (geometry3k / Vision-R1-rl)
                if not str(row.get("answer") or "").strip():
                    raise BadRow(spec, i, "answer", "no answer")
                ex = {
                    "images": row_images(row, i, spec),
                    "question": row["problem"],
                    "answer": str(row["answer"]),
                    "choices": None,
                    "task": "math",
                    "source": spec,
                }
            else:
                ex = from_chat(row, i, spec)
            check_images(ex, i, spec)
            out.append({**ex, "row": i})
        except BadRow as e:
            if not skip_bad:
                raise
            skipped[e.reason] += 1
    if skipped:
        counts = ", ".join(f"{n} x {reason}" for reason, n in skipped.items())
        print(f"{spec}: skipped {sum(skipped.values())} bad rows: {counts}")
    if multi:
        print(f"{spec}: kept {len(out)} single-image rows, left out {multi} multi-image rows")
    no_steps = sum(1 for ex in out if "key_steps" in ex and not ex["key_steps"])
    if no_steps and "solution" in cols:
        print(f"{spec}: {no_steps} rows have no key steps (StepRAR gives them k = 0)")
    if not out:
        raise ValueError(f"data set {spec!r} (split {split!r}) has no usable rows")
    return out


# --------------------------------------------------------------------------- the synthetic task
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
TASKS = ("Count", "Relation", "Depth", "Distance")


def draw(d, shape, color, x, y, r, drawn):
    drawn.append(f"a {color} {shape}")
    color, box = COLORS[color], [x - r, y - r, x + r, y + r]
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)


def synthetic_rows(n, seed, tasks=TASKS):
    """n rows of coloured shapes in CV-Bench's schema, `tasks` in turn: Count, Relation (left/right), Depth (the
    bigger is closer), Distance; Color, the demo's easy one, lists its choices in one order. Seeded."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        task = tasks[i % len(tasks)]
        W, H = rng.choice([(112, 112), (112, 84), (84, 112)])
        img = Image.new("RGB", (W, H), (245, 245, 245))
        d, drawn = ImageDraw.Draw(img), []
        kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], 3)
        name = [f"{c} {s}" for c, s in kinds]
        if task == "Count":  # k shapes of one colour among distractors of other colours
            color, k = rng.choice(list(COLORS)), rng.randint(1, 4)
            others = [c for c in COLORS if c != color]
            for j in range(k + rng.randint(0, 2)):
                c = color if j < k else rng.choice(others)
                draw(d, rng.choice(SHAPES), c, rng.randint(8, W - 8), rng.randint(8, H - 8), 6, drawn)
            q, choices = f"How many {color} shapes are in the image?", [str(k)]
            choices += rng.sample([str(v) for v in range(0, 6) if v != k], 3)
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
            c, r = rng.choice(list(COLORS)), rng.randint(30, 42)
            draw(d, rng.choice(SHAPES), c, rng.randint(r, W - r), rng.randint(r, H - r), r, drawn)
            q, choices, steps, keys = (
                "What colour is the shape?",
                list(COLORS),
                [f"The shape is {c}."],
                [[f"is {c}"]],
            )
        else:  # Distance: which of two objects is nearer (in the picture) to a third
            pts = [(rng.randint(10, W - 10), rng.randint(10, H - 10)) for _ in range(3)]
            dist = [abs(complex(*pts[j]) - complex(*pts[0])) for j in (1, 2)]
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
        prompt = (
            q
            + " Select from the following choices.\n"
            + "\n".join(f"({LETTERS[j]}) {c}" for j, c in enumerate(choices))
        )
        answer = f"({LETTERS[choices.index(gold)]})"
        solution = (
            f"### Image Description:\nThe image shows {', '.join(sorted(set(drawn)))}.\n"
            f"### Rationales:\nThe question is about "
            f"{task.lower()}; I compare the shapes in the image.\n### Let's think step by step.\n"
            + "".join(f"### Step {j + 1}:\n{st}\n" for j, st in enumerate(steps))
            + f"{FINAL} {answer}"
        )
        rows.append(
            {
                "image": img,
                "prompt": prompt,
                "question": q,
                "choices": choices,
                "task": task,
                "answer": answer,
                "type": "3D" if task in ("Depth", "Distance") else "2D",
                "source": "Omni3D"
                if task in ("Depth", "Distance")
                else ("ADE20K", "COCO")[i // len(tasks) % 2],
                "solution": solution,
                "key_steps": {"Steps": keys},
            }
        )
    return rows
