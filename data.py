"""Data: the prompts (P1-P4), the data set adapters (D), and batching.

An example: {"images": [PIL / path / URL / bytes], "question", "answer": gold text or None, "choices": [option
texts] or None, "task", "source", "row"} plus, for SFT and StepGRPO, "solution" (P3 sections or free text),
"key_steps" ([[equivalent forms], ...]) or "target" (a chat row's reply).
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
from PIL import Image
from qwen_vl_utils import fetch_image

from rewards import FINAL  # "### The final answer is:", P3's last section, read by R4 and R5

# --------------------------------------------------------------------------- prompts (P1-P4)
# P1: VisualThinker-R1-Zero's base-model prompt (arXiv 2503.05132; make_conversation_sat in its released
# src/open-r1-multimodal/src/open_r1/grpo.py). The base model has no chat template, so the string is built
# by hand. Note the space before "\nAssistant:" and the opened <think>: the completion continues the
# reasoning (R2 puts it back).
P1 = (
    "<|vision_start|><|image_pad|><|vision_end|>A conversation between User and Assistant. The user asks "
    "a question about the image, and the Assistant solves it. The assistant first thinks about the "
    "reasoning process in the mind and then provides the user with the answer.\nUser: {question} "
    "\nAssistant: Let me solve this step by step.\n<think>"
)
# P2: the same file's QUESTION_TEMPLATE for an Instruct model: the question, then this, in a user turn.
P2 = "  Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
# P3 (StepGRPO, R1-VL arXiv 2503.12937): the sections of Mulberry's reasoning prompt, which R1-VL's release
# sends (REASONING_PROMPT in eval/qwen2_vl/model.py), in shorter words; then the question.
P3 = (
    "Solve the question about the image step by step. First describe the image under "
    "'### Image Description:', then give the rationale under '### Rationales:', then write "
    "'### Let's think step by step.' and the numbered steps '### Step 1:', '### Step 2:', ..., and end with "
    "'### The final answer is:' and the answer.\n\n"
)
# P4 (Vision-R1 arXiv 2503.06749): the question alone, as its release's inference.py sends it; the
# <think>/<answer> format is taught by the cold-start SFT, not by the prompt.
PROMPT_STYLES = ("base", "instruct", "step", "plain")  # P1, P2, P3, P4


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
    """BadRow(column, why): a row the run cannot use; load_examples names the data set and the row."""


def row_images(row, spec):
    """The row's images (SAT's in `image_bytes`), each header read now (not its pixels) so that an unreadable
    one is named at load time; a relative path (no http:, file:, data:) starts at the data file's folder."""
    column = next((c for c in ("images", "image", "image_path", "image_bytes") if row.get(c)), None)
    if column is None:
        raise BadRow("image", "no image (looked in 'images', 'image', 'image_path')")
    images = row[column] if isinstance(row[column], list) else [row[column]]
    folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
    images = [
        os.path.join(folder, im) if isinstance(im, str) and not re.match(r"\w+:", im) else im for im in images
    ]
    for im in images:
        try:  # bytes are opened by open_image, paths here; a PIL image is open already; URLs are left to load
            if isinstance(im := open_image(im), str) and not im.startswith(("http://", "https://", "data:")):
                Image.open(im.removeprefix("file://")).close()
        except Exception as e:  # any failure to read it is this row's fault
            raise BadRow("image", f"unreadable image ({type(e).__name__}: {str(e)[:80]})") from None
        if not isinstance(im, (str, Image.Image)):
            raise BadRow("image", f"not a path, URL, bytes or image ({type(im).__name__})")
    return images


def without_slots(text, images):
    """The text without its <image> placeholders (the prompt places the images): none, or one per image."""
    if text.count("<image>") not in (0, len(images)):
        raise BadRow("images", f"images and <image> slots differ ({len(images)} and {text.count('<image>')})")
    return text.replace("<image>", "").strip()


def from_text(value, column):
    """A list or dict column as it is, or as the JSON text a CSV cell (or a JSON export) holds; or None."""
    if not isinstance(value, str):
        return value or None
    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as e:
        raise BadRow(column, f"not valid JSON ({e.msg})") from None


def from_plain(row, spec):
    """Plain rows (CV-Bench; step-wise CoT and math RL rows are plain rows with more columns): an image, a
    question (prompt, question or problem), the gold `answer` (or the line after a solution's FINAL),
    optional `choices` (the answer may be an option or its letter), `solution` and R1-VL's `key_steps`
    {"Steps": [[forms of step 1], ...]} (a step given as a string is one form)."""
    images = row_images(row, spec)
    question = row.get("prompt") or row.get("question") or row.get("problem")
    if not question:
        raise BadRow("question", "no question (looked in 'prompt', 'question', 'problem')")
    question = without_slots(str(question), images)
    solution = row.get("solution")
    answer = row.get("answer")
    if FINAL in (solution or "") and answer is None:  # step-wise CoT rows (a non-text solution: TypeError)
        answer = solution.rpartition(FINAL)[2].strip().partition("\n")[0]
    answer = "" if answer is None else str(answer).strip()
    if not answer:
        raise BadRow("answer", f"no answer (nor a '{FINAL}' line in a solution)")
    choices = from_text(row.get("choices"), "choices")
    if choices is not None and not (isinstance(choices, list) and len(choices) <= len(LETTERS)):
        raise BadRow("choices", f"expected a list of at most 26 options (got {type(choices).__name__})")
    choices = [str(c) for c in choices] if choices else None
    if choices and answer not in choices:  # then it is a letter: "B" or "(B)"
        letter = answer.strip("() ").upper()
        if letter not in list(LETTERS[: len(choices)]):
            raise BadRow("answer", f"neither one of the choices nor a letter of one ({answer!r})")
        answer = choices[LETTERS.index(letter)]
    if choices and f"(A) {choices[0]}" not in question:  # list them as CV-Bench does, unless it does already
        question = with_choices(question, choices)
    steps = from_text(row.get("key_steps"), "key_steps") or {}
    if not isinstance(steps, dict) or not isinstance(steps.get("Steps") or [], list):
        raise BadRow("key_steps", 'expected {"Steps": [[forms of step 1], ...]}')
    steps = [[forms] if isinstance(forms, str) else list(forms) for forms in steps.get("Steps") or []]
    return dict(
        images=images,
        question=question,
        answer=answer,
        choices=choices,
        task=row.get("task") or "untagged",
        source=row.get("source") or spec,
        solution=solution,
        key_steps=steps,
    )


def with_choices(question, choices):
    """The question, then its lettered choices as CV-Bench writes them."""
    options = "\n".join(f"({LETTERS[j]}) {c}" for j, c in enumerate(choices))
    return f"{question} Select from the following choices.\n{options}"


def turn_text(content):
    """A chat turn's text: a string, or the text parts of a list of {"type", "text"} parts."""
    if isinstance(content, str):
        return content
    return " ".join(x.get("text") or "" for x in content or [] if isinstance(x, dict))


def from_chat(row, spec):
    """Chat SFT rows (Mulberry-SFT, Vision-R1-cold): role/content or from/value turns, and `images`. The
    first user turn is the prompt, the assistant turn after it the SFT target."""
    column = "messages" if row.get("messages") else "conversations"
    turns = [
        (t.get("role") or t.get("from"), t.get("content") or t.get("value")) for t in row.get(column) or []
    ]
    roles = [{"human": "user", "gpt": "assistant"}.get(role, role) for role, _ in turns]
    if "user" not in roles or "assistant" not in roles[roles.index("user") :]:
        raise BadRow(column, "needs a user turn followed by an assistant turn")
    user = roles.index("user")
    images = row_images(row, spec)
    question = without_slots(turn_text(turns[user][1]), images)
    target = turn_text(turns[roles.index("assistant", user)][1])
    return dict(
        images=images, question=question, answer=None, choices=None, task="sft", source=spec, target=target
    )


def from_sat(row, spec, rng):
    """SAT: options shuffled with a seeded RNG; the question names them; the gold is the answer text."""
    if not row.get("correct_answer"):
        raise BadRow("correct_answer", "no answer")
    options = rng.sample(list(row["answers"]), len(row["answers"]))
    answer = str(row["correct_answer"])
    if answer not in [str(o) for o in options]:
        raise BadRow("correct_answer", f"not one of the answers ({answer!r})")
    q = f"{row['question']} Choose between the following options: {', '.join(options[:-1])} or {options[-1]}"
    images = row_images(row, spec)
    return dict(images=images, question=q, answer=answer, choices=None, task="SAT", source="SAT")


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
    except OSError as e:  # a file we may not read
        raise ValueError(f"data set {path!r}: cannot read it ({e.strerror})") from None
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
    import datasets  # imported here: a JSON data set starts fast

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


def load_examples(spec, split, seed=0, skip_bad=False, max_rows=0, sft=False):
    """A .json/.jsonl/.parquet/.csv file, a data set folder or a hub id -> examples. Only the rows used are
    read (SAT's single-image ones; a seeded sample of max_rows, 0: all), images only when batched. A row
    must hold an answer to reward, or with sft something to learn from. Any failure is one ValueError line
    naming the data set; a bad row stops the load (row and column named), or with skip_bad is counted."""
    ext = os.path.splitext(spec)[1]
    if not os.path.exists(spec) and (ext in FILE_TYPES or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec)):
        raise ValueError(f"data set {spec!r}: no such file or folder")
    if os.path.isfile(spec) and ext not in FILE_TYPES:
        raise ValueError(f"data set {spec!r}: expected a .json, .jsonl, .parquet or .csv file")
    rows = read_json(spec) if ext in (".json", ".jsonl") and os.path.isfile(spec) else read_table(spec, split)
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
            f"data set {spec!r}: columns {sorted(columns)} match no known schema; expected plain "
            "(image|images|image_path, prompt|question|problem, answer|solution), SAT (image_bytes, "
            "question, answers, correct_answer) or chat (messages|conversations, images)"
        )
    if 0 < max_rows < len(keep):  # a seeded sample, drawn before any row is read
        keep = sorted(random.Random(seed).sample(keep, max_rows))
        print(f"{spec}: using a seeded sample of {max_rows} rows (--max-rows)")
    if isinstance(rows, list):
        rows = [rows[i] for i in keep]
    else:  # only the kept rows are read, a batch at a time, images as stored ({"bytes", "path"}), undecoded
        rows = itertools.chain.from_iterable(
            b.to_pylist() for b in rows.select(keep).with_format("arrow").iter(256)
        )
    out = []
    skipped = collections.Counter()
    for i, row in zip(keep, rows):
        try:  # whatever is wrong with a row ends here
            ex = adapter(row, spec)
            if sft and not (ex.get("solution") or ex.get("target")):
                raise BadRow("solution", "no 'solution' or assistant turn to learn from")
            if not sft and ex["answer"] is None:
                raise BadRow("answer", "no answer to reward (chat rows are SFT data)")
            out.append({**ex, "row": i})
        except (ValueError, LookupError, TypeError, AttributeError) as e:
            if not isinstance(e, BadRow):  # a missing column, or a value of a type the adapter did not expect
                e = BadRow("row", f"a missing column or a value of the wrong type ({type(e).__name__}: {e})")
            column, why = e.args
            if not skip_bad:
                raise ValueError(f"data set {spec!r}, row {i}, column {column!r}: {why}") from None
            skipped[f"{column}: {why.split(' (')[0]}"] += 1  # counted without the details in parentheses
    if skipped:
        counts = ", ".join(f"{n} x {reason}" for reason, n in skipped.items())
        print(f"{spec}: skipped {sum(skipped.values())} bad rows: {counts}")
    if not out:
        raise ValueError(f"data set {spec!r} (split {split!r}) has no usable rows")
    return out
