"""Data: the prompts (P1-P4), the data set adapters, a synthetic task, and batching.

Every adapter turns a row into one example: {"images": [PIL / path / URL / bytes], "question", "answer":
gold text, "choices": [option texts] or None, "task", "source"} plus, for SFT and StepGRPO, "solution" (P3
sections or free text), "key_steps" ([[equivalent forms], ...]) or "target" (a chat row's reply).
"""

import collections
import functools
import io
import itertools
import json
import os
import random
import re

import pyarrow.compute as pc
from PIL import Image, ImageDraw
from qwen_vl_utils import fetch_image

from rewards import FINAL  # "### The final answer is:", P3's last section, read by R4 and R5

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
    "Solve the question about the image step by step. First describe the image under "
    "'### Image Description:', then give the rationale under '### Rationales:', then write "
    "'### Let's think step by step.' and the numbered steps '### Step 1:', '### Step 2:', ..., and end with "
    "'### The final answer is:' and the answer.\n\n"
)
PROMPT_STYLES = ("base", "instruct", "step", "plain")  # P1, P2, P3, P4 (Vision-R1: the question alone)


def prompt_text(ex, style, processor):
    """One <|image_pad|> per image (the processor expands it); a chat SFT row's user turn is sent as is."""
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
    """Left-padded batch (I2); qwen-vl-utils sizes each image to multiples of patch * merge, <= max_pixels."""
    images = []
    for ex in examples:
        for im in ex["images"]:
            image = {"image": open_image(im), "min_pixels": 3136, "max_pixels": max_pixels}
            images.append(fetch_image(image, image_patch_size=processor.image_processor.patch_size))
    texts = [prompt_text(ex, style, processor) for ex in examples]
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


def sft_target(ex, style):
    """What SFT teaches: a chat row's reply, or the solution (free text gets a final-answer line) -- as it is
    for P3, as <think>...</think><answer>...</answer> for the others (P1 has opened the <think>)."""
    if ex.get("target"):
        return ex["target"]
    solution = ex["solution"] if FINAL in ex["solution"] else f"{ex['solution']}\n{FINAL} {ex['answer']}"
    if style == "step":
        return solution
    reasoning, _, answer = solution.rpartition(FINAL)
    reasoning = " ".join(line for line in reasoning.splitlines() if line and not line.startswith("### "))
    return ("" if style == "base" else "<think>") + f"{reasoning}</think><answer>{answer.strip()}</answer>"


# --------------------------------------------------------------------------- adapters (D)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BadRow(ValueError):
    def __init__(self, name, i, column, why):
        super().__init__(f"data set {name!r}, row {i}, column {column!r}: {why}")
        self.reason = f"{column}: {why.split(' (')[0]}"  # what --skip-bad counts: no details in parentheses


def check_images(ex, i, name):
    """Read each image's header now (not its pixels), so an unreadable one is named at load time."""
    for im in ex["images"]:
        try:  # bytes are opened by open_image, paths here; a PIL image is open already; URLs are left to load
            if isinstance(im := open_image(im), str) and not im.startswith(("http://", "https://", "data:")):
                Image.open(im.removeprefix("file://")).close()
        except Exception as e:  # any failure to read it is this row's fault
            raise BadRow(name, i, "image", f"unreadable image ({type(e).__name__}: {str(e)[:80]})") from None
        if not isinstance(im, (str, Image.Image)):
            raise BadRow(name, i, "image", f"not a path, URL, bytes or image ({type(im).__name__})")


def row_images(row, i, name):
    """The row's images; a relative path (no http:, file:, data:) starts at the data file's folder."""
    for col in ("images", "image", "image_path"):
        if row.get(col):
            images = row[col] if isinstance(row[col], list) else [row[col]]
            base = name if os.path.isdir(name) else os.path.dirname(name)
            return [
                os.path.join(base, im) if isinstance(im, str) and not re.match(r"\w+:", im) else im
                for im in images
            ]
    raise BadRow(name, i, "image", "no image (looked in 'images', 'image', 'image_path')")


def without_slots(text, images, i, name):
    """The text without its <image> placeholders (the prompt places the images): none, or one per image."""
    if text.count("<image>") not in (0, len(images)):
        raise BadRow(
            name, i, "images", f"images and <image> slots differ ({len(images)} and {text.count('<image>')})"
        )
    return text.replace("<image>", "").strip()


def from_text(value, i, name, column):
    """A list or dict column as it is, or as the JSON text a CSV cell (or a JSON export) holds."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as e:
        raise BadRow(name, i, column, f"not valid JSON ({e.msg})") from None


def key_steps(row, i, name):
    """R1-VL's {"Steps": [[forms of step 1], ...]} -> [[forms], ...]; a step given as a string is one form."""
    ks = from_text(row.get("key_steps"), i, name, "key_steps") or {}
    if not isinstance(ks, dict) or not isinstance(ks.get("Steps") or [], list):
        raise BadRow(name, i, "key_steps", 'expected {"Steps": [[forms of step 1], ...]}')
    return [[forms] if isinstance(forms, str) else list(forms) for forms in ks.get("Steps") or []]


def from_plain(row, i, name):
    """Plain rows (CV-Bench, step-wise CoT and math RL rows are plain rows with more columns): an image, a
    question (prompt, question or problem), the gold `answer` (or the line after a solution's FINAL),
    optional `choices` (the answer may be an option or its letter), `solution` and `key_steps`."""
    images = row_images(row, i, name)
    column = next((c for c in ("prompt", "question", "problem") if row.get(c)), None)
    if column is None:
        raise BadRow(name, i, "question", "no question (looked in 'prompt', 'question', 'problem')")
    question = without_slots(str(row[column]), images, i, name)
    solution = row.get("solution")
    answer = row.get("answer")
    if answer is None and FINAL in (solution or ""):  # step-wise CoT rows
        answer = solution.rpartition(FINAL)[2].strip().partition("\n")[0]
    answer = "" if answer is None else str(answer).strip()
    if not answer:
        raise BadRow(name, i, "answer", f"no answer (nor a '{FINAL}' line in a solution)")
    choices = from_text(row.get("choices"), i, name, "choices") or None
    if choices is not None and not (isinstance(choices, list) and len(choices) <= len(LETTERS)):
        raise BadRow(
            name, i, "choices", f"expected a list of at most 26 options (got {type(choices).__name__})"
        )
    choices = [str(c) for c in choices] if choices else None
    if choices and answer not in choices:  # then it is a letter: "B" or "(B)"
        letter = answer.strip("() ").upper()
        if len(letter) != 1 or not 0 <= LETTERS.find(letter) < len(choices):
            raise BadRow(name, i, "answer", f"neither one of the choices nor a letter of one ({answer!r})")
        answer = choices[LETTERS.index(letter)]
    if choices and f"(A) {choices[0]}" not in question:  # list them as CV-Bench does, unless it does already
        question = with_choices(question, choices)
    return {
        "images": images,
        "question": question,
        "answer": answer,
        "choices": choices,
        "task": row.get("task") or "untagged",
        "source": row.get("source") or name,
        "solution": solution,
        "key_steps": key_steps(row, i, name),
    }


def with_choices(question, choices):
    """The question, then its lettered choices as CV-Bench writes them."""
    options = "\n".join(f"({LETTERS[j]}) {c}" for j, c in enumerate(choices))
    return f"{question} Select from the following choices.\n{options}"


def turn_text(content):
    """A chat turn's text: a string, or the text parts of a list of {"type", "text"} parts."""
    if isinstance(content, str):
        return content
    return " ".join(x.get("text") or "" for x in content or [] if isinstance(x, dict))


def from_chat(row, i, name):
    """Chat SFT rows (Mulberry-SFT, Vision-R1-cold): role/content or from/value turns, plus `images`.
    The first user turn is the prompt, the assistant turn after it the SFT target."""
    column = "messages" if row.get("messages") else "conversations"
    turns = [
        (t.get("role") or t.get("from"), t.get("content") or t.get("value")) for t in row.get(column) or []
    ]
    roles = [{"human": "user", "gpt": "assistant"}.get(role, role) for role, _ in turns]
    if "user" not in roles or "assistant" not in roles[roles.index("user") :]:
        raise BadRow(name, i, column, "needs a user turn followed by an assistant turn")
    images = row_images(row, i, name)
    return {
        "images": images,
        "question": without_slots(turn_text(turns[roles.index("user")][1]), images, i, name),
        "answer": None,
        "choices": None,
        "task": "sft",
        "source": name,
        "target": turn_text(turns[roles.index("assistant", roles.index("user"))][1]),
    }


def from_sat(row, i, name, rng):
    """SAT: options shuffled with a seeded RNG; the question names them; the gold is the answer text."""
    if not row.get("correct_answer"):
        raise BadRow(name, i, "correct_answer", "no answer")
    options = rng.sample(list(row["answers"]), len(row["answers"]))
    if str(row["correct_answer"]) not in [str(o) for o in options]:
        raise BadRow(name, i, "correct_answer", f"not one of the answers ({row['correct_answer']!r})")
    q = f"{row['question']} Choose between the following options: {', '.join(options[:-1])} or {options[-1]}"
    return {
        "images": list(row["image_bytes"]),
        "question": q,
        "answer": str(row["correct_answer"]),
        "choices": None,
        "task": "SAT",
        "source": "SAT",
    }


# --------------------------------------------------------------------------- loading
FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def read_json(path):
    """The rows of a .json/.jsonl file: one list of objects, or one object a line. Parsed here rather than by
    datasets, so that a syntax error names its line, and rows need not agree on their columns' types."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"data set {path!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    listed = text.lstrip().startswith("[")
    try:
        if listed:
            rows = json.loads(text)
        else:  # JSON Lines
            rows = []
            for n, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    rows.append(json.loads(line))
    except json.JSONDecodeError as e:
        line = e.lineno if listed else n
        raise ValueError(f"data set {path!r}, line {line}: not valid JSON ({e.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"data set {path!r}: expected a list of JSON objects, or one object a line")
    return rows


def read_table(spec, split):
    """A .parquet/.csv file, a data set folder or a hub id, through datasets: a memory-mapped table."""
    import datasets  # imported here: start-up stays fast for the synthetic path

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failure is reported below, in one line
    try:
        if os.path.isfile(spec):
            ds = datasets.load_dataset(FILE_TYPES[os.path.splitext(spec)[1]], data_files=spec)
        else:
            ds = datasets.load_dataset(spec)
    except Exception as e:  # whatever it is, it is this data set's: say what, in one line
        if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__:
            e = e.__cause__  # what went wrong inside datasets' generic wrapper
        first_line = str(e).partition("\n")[0]
        raise ValueError(f"data set {spec!r}: cannot load it ({type(e).__name__}: {first_line})") from None
    if split not in ds and len(ds) > 1:  # never evaluate on the training split by mistake
        raise ValueError(f"data set {spec!r}: no {split!r} split (it has {', '.join(ds)})")
    return ds[split] if split in ds else ds[next(iter(ds))]  # the asked split, else the only one


def example(adapter, row, i, name):
    """One row through its adapter, its images checked. A missing column or a value of a type the adapter
    does not expect (a number for a text, a string for a list) is a bad row like any other."""
    try:
        ex = adapter(row, i, name)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        why = f"a missing column or a value of the wrong type ({type(e).__name__}: {e})"
        raise BadRow(name, i, "row", why) from None
    check_images(ex, i, name)
    return {**ex, "row": i}


def load_examples(spec, split, seed=0, skip_bad=False, max_rows=0):
    """`synthetic[:N[:Task,...]]`, a .json/.jsonl/.parquet/.csv file, a data set folder or a hub id. Only the
    rows used are read (SAT's single-image ones; a seeded sample of max_rows, 0: all), images only when
    batched. A bad row stops the load (data set, row, column named); skip_bad skips and counts it."""
    ext = os.path.splitext(spec)[1]
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n, tasks = (spec + "::").split(":")[1:3]  # N and the tasks may be left out
        tasks = tasks.split(",") if tasks else TASKS
        if bad := [t for t in tasks if t not in TASKS + ("Color",)]:
            raise ValueError(f"data set {spec!r}: no synthetic task {bad[0]!r} ({', '.join(TASKS)}, Color)")
        rows = synthetic_rows(int(n or 2000), seed + (split != "train"), tasks)  # eval rows: seed + 1
    elif not os.path.exists(spec) and (ext in FILE_TYPES or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec)):
        raise ValueError(f"data set {spec!r}: no such file or folder")
    elif os.path.isfile(spec) and ext not in FILE_TYPES:
        raise ValueError(f"data set {spec!r}: expected a .json, .jsonl, .parquet or .csv file")
    elif ext in (".json", ".jsonl") and os.path.isfile(spec):
        rows = read_json(spec)
    else:
        rows = read_table(spec, split)
    columns = set().union(*rows) if isinstance(rows, list) else set(rows.column_names)
    keep = list(range(len(rows)))
    if "image_bytes" in columns:  # SAT: single-image rows only (r1zero trains on those)
        adapter = functools.partial(from_sat, rng=random.Random(seed))
        if isinstance(rows, list):
            counts = [len(row.get("image_bytes") or []) for row in rows]
        else:  # read from the arrow list offsets: no image is touched
            counts = pc.list_value_length(rows.with_format("arrow")["image_bytes"]).to_pylist()
        keep = [i for i, n in enumerate(counts) if n == 1]
        print(f"{spec}: kept the {len(keep)} single-image rows of {len(rows)}")
    elif columns & {"messages", "conversations"}:
        adapter = from_chat
    elif columns & {"prompt", "question", "problem"} and columns & {"answer", "solution"}:
        adapter = from_plain
    else:
        raise ValueError(
            f"data set {spec!r}: columns {sorted(columns)} match no known schema; expected "
            "plain (image|images|image_path, prompt|question|problem, answer|solution), SAT (image_bytes, "
            "question, answers, correct_answer) or chat (messages|conversations, images)"
        )
    if 0 < max_rows < len(keep):  # a seeded sample, drawn before any row is read
        keep = sorted(random.Random(seed).sample(keep, max_rows))
        print(f"{spec}: using a seeded sample of {max_rows} rows (--max-rows)")
    out = []
    skipped = collections.Counter()
    if isinstance(rows, list):
        rows = [rows[i] for i in keep]
    else:  # only the kept rows are read, a batch at a time, images as stored ({"bytes", "path"}), undecoded
        rows = itertools.chain.from_iterable(
            b.to_pylist() for b in rows.select(keep).with_format("arrow").iter(256)
        )
    for i, row in zip(keep, rows):
        try:
            out.append(example(adapter, row, i, spec))
        except BadRow as e:
            if not skip_bad:
                raise
            skipped[e.reason] += 1
    if skipped:
        counts = ", ".join(f"{n} x {reason}" for reason, n in skipped.items())
        print(f"{spec}: skipped {sum(skipped.values())} bad rows: {counts}")
    no_steps = sum(1 for ex in out if FINAL in (ex.get("solution") or "") and not ex["key_steps"])
    if no_steps:  # step-wise rows
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
    box = [x - r, y - r, x + r, y + r]
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])


def synthetic_rows(n, seed, tasks=TASKS):
    """n rows of coloured shapes in CV-Bench's schema, `tasks` in turn: Count, Relation (left/right), Depth
    (the bigger is closer), Distance; Color, the demo's easy one, lists its choices in one order. Seeded."""
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
