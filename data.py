"""Data: the prompts (P1-P4), and the data sets, each row turned into one example: {"images": [PIL / path /
URL / bytes], "question", "answer": the gold text (None for a chat row), "choices": [option texts] or None,
"task", "source", "row"}, plus "solution" and "key_steps" (step-wise rows, R4) or "target" (a chat row's
reply, for SFT). A mistake in a data set is one ValueError line naming it, its row and column or JSON line."""

import collections
import functools
import io
import json
import os
import random
import re

from PIL import Image
from qwen_vl_utils import fetch_image

from rewards import FINAL, step_answer  # "### The final answer is:", P3's last section (R4, R5)

# --------------------------------------------------------------------------- prompts (P1-P4)
# P1: VisualThinker-R1-Zero's base-model prompt (arXiv 2503.05132; make_conversation_sat in its released
# src/open-r1-multimodal/src/open_r1/grpo.py), by hand: the base model has no chat template. Note the space
# before "\nAssistant:" and the opened <think>: the completion continues the reasoning (R2 puts it back).
P1 = (
    "<|vision_start|><|image_pad|><|vision_end|>A conversation between User and Assistant. The user asks "
    "a question about the image, and the Assistant solves it. The assistant first thinks about the "
    "reasoning process in the mind and then provides the user with the answer.\nUser: {question} "
    "\nAssistant: Let me solve this step by step.\n<think>"
)
# P2: the same file's QUESTION_TEMPLATE for an Instruct model: the question, then this, in a user turn.
P2 = "  Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
# P3 (StepGRPO, R1-VL arXiv 2503.12937): Mulberry's reasoning prompt, as R1-VL's release sends it
# (REASONING_PROMPT in eval/qwen2_vl/model.py; its warm-up data is written with it), then "Question: " and the
# question. Its quote after "format: " is never closed, and a space ends "is: ": both as released.
P3 = (
    "Generate an image description based on the question.\nThen, provide a rationale to analyze the question."
    "\nNext, generate a step-by-step reasoning process to solve the problem. Ensure the steps are logical "
    "and concise.\nFinally, provide a concise summary of the final answer in the following format: 'The "
    "final answer is: xxx.\n\nFormat your response with the following sections, separated by ###:\n"
    "### Image Description:\n### Rationales:\n### Let's think step by step.\n### Step 1:\n### Step 2:\n...\n"
    "### The final answer is: \n\n"
)
# P4 (Vision-R1 arXiv 2503.06749): the question alone, as its release's inference.py sends it; the
# <think>/<answer> format is taught by the cold-start SFT, not by the prompt.


def prompt_text(ex, style, processor):
    """The prompt of style base (P1), instruct (P2), step (P3) or plain (P4), with one <|image_pad|> per image
    (the processor expands it); a chat row's user turn is sent as it is."""
    if style == "base":
        return P1.format(question=ex["question"])
    style = "plain" if ex.get("target") else style
    question = ex["question"]
    if style == "step" and "### Image Description" not in question:  # a row that carries P3 gets it once
        question = P3 + ("" if "Question: " in question else "Question: ") + question  # as the release
    text = question + P2 if style == "instruct" else question
    content = [{"type": "image"} for _ in ex["images"]] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def open_image(img):
    """PIL, path and URL pass through to qwen-vl-utils; raw bytes (as SAT stores them) are opened here."""
    if isinstance(img, dict):  # a datasets Image column read without decoding: {"bytes":..., "path":...}
        img = img.get("bytes") or img.get("path")
    return Image.open(io.BytesIO(img)) if isinstance(img, (bytes, bytearray)) else img


def encode(processor, examples, style, max_pixels):
    """Left-padded batch (I2), never truncated: a prompt holds image tokens (I4)."""
    bounds = {"min_pixels": 3136, "max_pixels": max_pixels}  # qwen-vl-utils: sides multiples of patch * merge
    specs = [{"image": open_image(im), **bounds} for ex in examples for im in ex["images"]]
    images = [fetch_image(s, image_patch_size=processor.image_processor.patch_size) for s in specs]
    texts = [prompt_text(ex, style, processor) for ex in examples]
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


def sft_target(ex, style):
    """What SFT teaches: a chat row's reply, or the solution (free text, or none, gets a final-answer line)
    -- as it is for P3, as <think>...</think><answer>...</answer> for the others (P1 opened the <think>)."""
    if ex.get("target"):
        return ex["target"]
    solution = ex.get("solution") or ""
    if FINAL not in solution:
        solution = f"{solution}\n{FINAL} {ex['answer']}"
    if style == "step":
        return solution.strip()
    reasoning, _, answer = solution.rpartition(FINAL)
    reasoning = " ".join(line for line in reasoning.splitlines() if line and not line.startswith("### "))
    return ("" if style == "base" else "<think>") + f"{reasoning}</think><answer>{answer.strip()}</answer>"


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name: a data set (or a model) on the hub
# The released data the recipes default to (grpo_vl.VARIANTS), each in data/<name>: README.md says why
RELEASES = ["HuanjinYao/Mulberry-SFT", "jingyiZ00/R1-VL-10K", "Osilly/Vision-R1-cold"]
REFLECTION = "Let me rethink it."  # Mulberry's reflective rows, which R1-VL's warm-up leaves out


class Row(dict):
    """A data row that remembers the column read last: an error while reading the row names that column."""

    def __getitem__(self, column):
        self.column = column
        return super().__getitem__(column)

    def get(self, column, default=None):
        self.column = column
        return super().get(column, default)


def images_of(row, folder):
    """The row's images, each one's header read now so that an unreadable image is named at load time; a
    relative path (no http:, file:, data:) starts at the data file's folder."""
    images = row.get("images") or row.get("image_path") or row.get("image_bytes") or row.get("image")
    if not images:
        raise ValueError("no image (looked in 'images', 'image', 'image_path')")
    images = list(images) if isinstance(images, list) else [images]
    for k, im in enumerate(images):
        if isinstance(im, str) and not re.match(r"\w+:", im):
            images[k] = im = os.path.join(folder, im)
        try:  # bytes are opened by open_image, paths here; a PIL image is open already; URLs are left to load
            im = open_image(im)
            if isinstance(im, str) and not im.startswith(("http://", "https://", "data:")):
                Image.open(im.removeprefix("file://")).close()
        except Exception as e:
            raise ValueError(f"unreadable image ({type(e).__name__}: {str(e)[:80]})") from None
        if not isinstance(im, (str, Image.Image)):
            raise ValueError(f"not a path, URL, bytes or image ({type(im).__name__})")
    return images


def question_of(text, images):
    """The question without its <image> placeholders (the prompt places the images): none, or one each."""
    if text.count("<image>") not in (0, len(images)):
        raise ValueError(f"{len(images)} images but {text.count('<image>')} <image> slots")
    return text.replace("<image>", "").strip()


def from_json(value):
    """A list or dict column as it is, or as the JSON text a CSV cell or a JSON export holds."""
    return json.loads(value) if isinstance(value, str) and value.strip() else value


def from_plain(row, folder):
    """Plain rows (CV-Bench; step-wise CoT and math RL rows have more columns): the gold is the answer (an
    option or its letter), else the line after FINAL; key_steps (R1-VL): {"Steps": [[forms], ...]}."""
    images = images_of(row, folder)
    question = question_of(str(row.get("prompt") or row.get("question") or row["problem"]), images)
    choices = from_json(row.get("choices")) or []
    if not isinstance(choices, list) or len(choices) > 26:
        raise ValueError("expected a list of at most 26 options")
    choices = [str(c) for c in choices] or None  # the options as text, once
    solution = row.get("solution")
    if not isinstance(solution, (str, type(None))):
        raise ValueError(f"expected text, not {type(solution).__name__}")
    answer = row.get("answer")
    if answer is None:  # step-wise CoT rows
        answer = step_answer(solution or "")
    answer = "" if answer is None else str(answer).strip()  # 0 is an answer
    if not answer:
        raise ValueError(f"no answer (nor a '{FINAL}' line in a solution)")
    if choices and answer not in choices:  # then it is a letter: "B" or "(B)"
        letter = answer.strip("() ").upper()
        if len(letter) != 1 or LETTERS.find(letter) not in range(len(choices)):
            raise ValueError(f"{answer!r} is neither one of the choices nor the letter of one")
        answer = choices[LETTERS.index(letter)]
    if choices and f"(A) {choices[0]}" not in question:  # list them as CV-Bench does, unless it does already
        question = with_choices(question, choices)
    steps = from_json(row.get("key_steps")) or {}
    steps = [[forms] if isinstance(forms, str) else list(forms) for forms in steps.get("Steps") or []]
    task = row.get("task") or "untagged"
    ex = dict(images=images, question=question, answer=answer, choices=choices, task=task)
    return {**ex, "source": row.get("source"), "solution": solution, "key_steps": steps}


def with_choices(question, choices):
    """The question, then its lettered choices as CV-Bench writes them."""
    options = "\n".join(f"({LETTERS[j]}) {c}" for j, c in enumerate(choices))
    return f"{question} Select from the following choices.\n{options}"


def from_chat(row, folder):
    """Chat SFT rows (LLaMA-Factory's sharegpt: Mulberry-SFT, Vision-R1-cold): role/content or from/value
    turns, and images. The first user turn is the prompt, the assistant turn after it the SFT target."""
    roles = []
    texts = []
    for turn in row.get("messages") or row["conversations"]:
        role = turn.get("role") or turn.get("from")
        roles.append({"human": "user", "gpt": "assistant"}.get(role, role))
        content = turn.get("content") or turn.get("value") or ""
        if not isinstance(content, str):  # a list of {"type", "text"} parts
            content = " ".join(part.get("text") or "" for part in content if isinstance(part, dict))
        texts.append(content)
    user = roles.index("user")
    reply = roles.index("assistant", user)
    images = images_of(row, folder)
    question = question_of(texts[user], images)
    return dict(images=images, question=question, answer=None, choices=None, task="sft", target=texts[reply])


def from_sat(row, folder, rng):
    """SAT (array/SAT, r1zero's data): options shuffled (seeded) and named in the question; gold: the text."""
    options = rng.sample(list(row["answers"]), len(row["answers"]))
    answer = str(row["correct_answer"])
    if answer not in [str(o) for o in options]:
        raise ValueError(f"{answer!r} is not one of the answers")
    # as VisualThinker's release writes it, less its "<image>" (so with a space first: P1 has "User:  Answer")
    q = f" Answer in natural language. {row['question']} Choose between the following options: "
    q += f"{', '.join(options[:-1])} or {options[-1]}"
    images = images_of(row, folder)
    return dict(images=images, question=q, answer=answer, choices=None, task="SAT", source="SAT")


def read_rows(spec, split):
    """A .json/.jsonl file, parsed here (an error names its line; rows need not agree on their columns'
    types), or a .parquet/.csv file, a data set folder or a hub id, through datasets (memory-mapped)."""
    ext = os.path.splitext(spec)[1]
    is_file = os.path.isfile(spec)
    if not (is_file or os.path.isdir(spec) or (not ext and HUB_ID.fullmatch(spec))):
        for hub_id in RELEASES:  # a recipe's default: how to get it
            folder = "data/" + hub_id.split("/")[1]
            if spec.startswith(folder):
                how = f"huggingface-cli download --repo-type dataset {hub_id} --local-dir {folder}"
                raise ValueError(f"not downloaded: {how}; its images: README.md, 'The released data'")
        raise ValueError("no such file or folder")
    if is_file and ext in (".json", ".jsonl"):
        text = open(spec, encoding="utf-8").read()
        listed = text.lstrip().startswith("[")  # a JSON list, else JSON Lines
        try:
            if listed:
                return json.loads(text)
            rows = []
            for n, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    rows.append(json.loads(line))
            return rows
        except json.JSONDecodeError as e:
            raise ValueError(f"line {e.lineno if listed else n}: not valid JSON ({e.msg})") from None
    if is_file and ext not in (".parquet", ".csv"):
        raise ValueError("expected a .json, .jsonl, .parquet or .csv file")
    import datasets  # imported here: a JSON data set starts fast

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failure is reported in one line
    ds = datasets.load_dataset(ext[1:], data_files=spec) if is_file else datasets.load_dataset(spec)
    if split not in ds and len(ds) > 1:  # never evaluate on the training split by mistake
        raise ValueError(f"no {split!r} split (it has {', '.join(ds)})")
    return ds[split] if split in ds else ds[next(iter(ds))]  # the asked split, else the only one


def one_line(e):
    """An exception as one line: its message, after its type unless it is a plain ValueError."""
    text = str(e).partition("\n")[0]
    return text if type(e) is ValueError else f"{type(e).__name__}: {text}"


def load_examples(spec, split, seed=0, skip_bad=False, max_rows=0, sft=False):
    """A .json/.jsonl/.parquet/.csv file, a data set folder or a hub id -> examples, reading only the rows
    used (SAT's single-image ones; a seeded sample of max_rows, 0: all), their images only when batched. A bad
    row (for RL, one with no answer: a chat row) stops the load, or with skip_bad is skipped and counted."""
    try:
        rows = read_rows(spec, split)
        columns = set().union(*rows) if isinstance(rows, list) else set(rows.column_names)
    except Exception as e:  # whatever it is, it is this data set's: one line, of the cause datasets wraps
        raise ValueError(f"data set {spec!r}: {one_line(e.__cause__ or e)}") from None
    keep = list(range(len(rows)))
    if "image_bytes" in columns:  # SAT: r1zero trains on its single-image rows
        adapter = functools.partial(from_sat, rng=random.Random(seed))
        if isinstance(rows, list):
            counts = [len(row.get("image_bytes") or []) for row in rows]
        else:  # read from the arrow list offsets: no image is touched (pyarrow comes with datasets)
            import pyarrow.compute as pc

            counts = pc.list_value_length(rows.with_format("arrow")["image_bytes"]).to_pylist()
        keep = [i for i, n in enumerate(counts) if n == 1]
        print(f"{spec}: kept the {len(keep)} single-image rows of {len(rows)}")
    elif columns & {"messages", "conversations"}:
        adapter = from_chat
    elif columns & {"prompt", "question", "problem"} and columns & {"answer", "solution"}:
        adapter = from_plain
    else:
        raise ValueError(
            f"data set {spec!r}: columns {sorted(columns)} match no known schema: plain (image, question, "
            "answer; README.md names their other spellings), SAT (image_bytes, question, answers, "
            "correct_answer) or chat (messages or conversations, images)"
        )
    if 0 < max_rows < len(keep):  # a seeded sample, drawn before any row is read
        keep = sorted(random.Random(seed).sample(keep, max_rows))
        print(f"{spec}: using a seeded sample of {max_rows} rows (--max-rows)")
    if isinstance(rows, list):
        rows = [rows[i] for i in keep]
    else:  # only the kept rows are read, a batch at a time, images as stored ({"bytes", "path"}), undecoded
        batches = rows.select(keep).with_format("arrow").iter(256)
        rows = (row for batch in batches for row in batch.to_pylist())
    folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
    out = []
    skipped = collections.Counter()
    for i, row in zip(keep, map(Row, rows)):
        try:  # whatever is wrong with a row ends here, named by its column
            ex = adapter(row, folder)
            if ex["answer"] is None and not sft:
                row.column = "answer"
                raise ValueError("no answer to reward (chat rows are SFT data)")
            out.append({**ex, "source": ex.get("source") or spec, "row": i})
        except Exception as e:
            why = one_line(e)
            if not skip_bad:
                raise ValueError(f"data set {spec!r}, row {i}, column {row.column!r}: {why}") from None
            skipped[f"{row.column}: {re.split(r' [(]|: ', why)[0]}"] += 1  # counted without the details
    if skipped:
        counts = ", ".join(f"{n} x {reason}" for reason, n in skipped.items())
        print(f"{spec}: skipped {sum(skipped.values())} bad rows: {counts}")
    if not out:
        raise ValueError(f"data set {spec!r} (split {split!r}) has no usable rows")
    return out
