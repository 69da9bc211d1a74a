"""Schema D adapters on local files, bad rows and data errors (one line each), prompts P1/P2, and the
synthetic task of tests/shapes.py (a JSON Lines data set in the plain schema)."""

import io
import json
import os

import pytest
from PIL import Image

import data
import rewards as R
import shapes
import tiny
from data import load_examples
from shapes import synthetic_rows


def png(color=(255, 0, 0), size=(60, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(tmp_path, columns, name="d.parquet"):
    import datasets

    path = str(tmp_path / name)
    datasets.Dataset.from_dict(columns).to_parquet(path)
    return path


def test_synthetic_is_deterministic_and_in_cvbench_schema(tmp_path):
    a, b, c = synthetic_rows(12, 0), synthetic_rows(12, 0), synthetic_rows(12, 1)
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b] != [r["prompt"] for r in c]
    assert [r["task"] for r in a[:4]] == ["Count", "Relation", "Depth", "Distance"]
    for r in a:
        letter = r["answer"].strip("()")
        assert (
            r["answer"] == f"({letter})" and f"({letter}) {r['choices']['ABCD'.index(letter)]}" in r["prompt"]
        )
        assert r["source"] in ("ADE20K", "COCO", "Omni3D") and r["type"] in ("2D", "3D")
    # held-out data is drawn with the next seed
    train = load_examples(shapes.write(str(tmp_path / "train"), 8, 0), "train")
    test = load_examples(shapes.write(str(tmp_path / "test"), 8, 1), "test")
    assert [e["question"] for e in train] != [e["question"] for e in test]


def centroid_x(img, rgb):
    xs = [x for x in range(img.width) for y in range(img.height) if img.getpixel((x, y)) == rgb]
    return sum(xs) / len(xs)


def test_synthetic_relation_answers_are_right():
    """Left/right read back from the pixels, for rows whose two objects have different colours."""
    checked = 0
    for r in synthetic_rows(200, 5):
        if r["task"] != "Relation":
            continue
        (c1, _), (c2, _) = [
            n.split() for n in r["question"][7:].split(" to the left or to the right of the ")
        ]
        c2 = c2.rstrip("?")
        if c1 == c2:
            continue
        gold = r["choices"]["ABCD".index(r["answer"][1])]
        left = centroid_x(r["image"], shapes.COLORS[c1]) < centroid_x(r["image"], shapes.COLORS[c2])
        assert gold == ("left" if left else "right"), r["question"]
        checked += 1
    assert checked > 20


def test_synthetic_color_answers_are_the_shapes_colour_with_choices_in_one_order():
    """The demo's task: the gold colour is the one that covers the most pixels; the letters never move."""
    rows = synthetic_rows(40, 7, ["Color"])
    for r in rows:
        assert r["choices"] == ["red", "green", "blue", "yellow"] and r["source"] in ("ADE20K", "COCO")
        counts = {rgb: n for n, rgb in r["image"].getcolors(1 << 16)}
        pixels = {c: counts.get(rgb, 0) for c, rgb in shapes.COLORS.items()}
        gold = r["choices"]["ABCD".index(r["answer"][1])]
        assert (
            max(pixels, key=pixels.get) == gold and pixels[gold] > 0.1 * r["image"].width * r["image"].height
        )
        assert sum(v > 0 for v in pixels.values()) == 1  # one shape, no distractor
    assert len({r["answer"] for r in rows}) == 4  # every colour occurs


def test_synthetic_file_picks_size_and_tasks_and_loads_as_drawn(tmp_path):
    """shapes.write: n rows of the given tasks in turn, as a JSON Lines file whose images are PNGs beside it
    (relative paths); loaded, they are the rows synthetic_rows draws, pixel for pixel."""
    path = shapes.write(str(tmp_path / "cd"), 5, 0, ("Color", "Depth"))
    assert [e["task"] for e in load_examples(path, "train")] == ["Color", "Depth"] * 2 + ["Color"]
    exs = load_examples(shapes.write(str(tmp_path / "four"), 4, 0), "train")
    rows = synthetic_rows(4, 0)
    assert [e["question"] for e in exs] == [r["prompt"] for r in rows]
    assert [e["images"] for e in exs] == [
        [str(tmp_path / "four" / "images" / f"{i:05d}.png")] for i in range(4)
    ]
    assert all(Image.open(e["images"][0]).tobytes() == r["image"].tobytes() for e, r in zip(exs, rows))
    assert [e["row"] for e in exs] == [0, 1, 2, 3] and all(e["key_steps"] for e in exs)


def test_cvbench_adapter_on_a_local_parquet(tmp_path):
    path = write_parquet(
        tmp_path,
        {
            "image": [{"bytes": png(), "path": None}] * 2,
            "prompt": ["How many? (A) 1 (B) 2", "Where? (A) left (B) right"],
            "question": ["How many?", "Where?"],
            "choices": [["1", "2"], ["left", "right"]],
            "answer": ["(B)", "(A)"],
            "task": ["Count", "Relation"],
            "source": ["COCO", "ADE20K"],
            "type": ["2D", "2D"],
        },
    )
    exs = load_examples(path, "test")
    assert [e["answer"] for e in exs] == ["2", "left"] and exs[0]["choices"] == ["1", "2"]
    assert exs[0]["task"] == "Count" and exs[0]["question"] == "How many? (A) 1 (B) 2"


def test_sat_adapter_keeps_single_image_rows_and_shuffles_options(tmp_path, capsys):
    path = write_parquet(
        tmp_path,
        {
            "image_bytes": [[png()], [png(), png()], [png()]],
            "question": ["Which is nearer?"] * 3,
            "answers": [["the chair", "the table"], ["a", "b"], ["up", "down", "left"]],
            "correct_answer": ["the chair", "a", "left"],
        },
    )
    exs = load_examples(path, "train", seed=0)
    assert len(exs) == 2 and "kept the 2 single-image rows of 3" in capsys.readouterr().out
    assert exs[0]["answer"] == "the chair" and exs[0]["choices"] is None
    # VisualThinker's src/data/SAT/process_dataset.py and grpo.py: "<image> Answer in natural language. {q}
    # Choose between the following options: a, b or c", less its <image>
    assert exs[1]["question"].startswith(" Answer in natural language. Which is nearer? Choose between the ")
    assert sorted(exs[1]["question"].split(": ")[1].replace(" or ", ", ").split(", ")) == [
        "down",
        "left",
        "up",
    ]
    assert isinstance(data.open_image(exs[0]["images"][0]), Image.Image)
    # P1 as the release renders it for the base model, character for character (two spaces after "User:")
    released = (
        "A conversation between User and Assistant. The user asks a question about the image, and the "
        "Assistant solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer.\nUser:  Answer in natural language. Which is nearer? Choose "
        "between the following options: the table or the chair \nAssistant: Let me solve this step by step."
        "\n<think>"
    )
    p1 = data.prompt_text(exs[0], "base", None)
    assert p1 == "<|vision_start|><|image_pad|><|vision_end|>" + released  # seed 0 shuffles the table first


@pytest.mark.parametrize(
    "columns,where",
    [
        (
            {
                "image": [{"bytes": png(), "path": None}, None],
                "prompt": ["q", "q"],
                "choices": [["a", "b"]] * 2,
                "answer": ["(A)", "(A)"],
            },
            "row 1, column 'image'",
        ),
        (
            {
                "image": [{"bytes": png(), "path": None}] * 2,
                "prompt": ["q", "q"],
                "choices": [["a", "b"]] * 2,
                "answer": ["(A)", "(E)"],
            },
            "row 1, column 'answer'",
        ),
        (
            {
                "image_bytes": [[png()], [png()]],
                "question": ["q", "q"],
                "answers": [["a", "b"]] * 2,
                "correct_answer": ["a", ""],
            },
            "row 1, column 'correct_answer'",
        ),
        ({"picture": [1], "text": ["x"]}, "match no known schema"),
    ],
)
def test_bad_rows_name_data_set_row_and_column(tmp_path, columns, where):
    path = write_parquet(tmp_path, columns)
    with pytest.raises(ValueError, match=where) as e:
        load_examples(path, "train")
    assert path in str(e.value)


def test_data_errors_are_one_line_naming_the_data_set(tmp_path, monkeypatch):
    """Whatever is wrong with a file (not there, not UTF-8, not readable, bad JSON, no known schema, no such
    split) is one ValueError line that starts with the data set's name, and names the JSON line."""
    import datasets

    good = json.dumps({"image": "a.png", "question": "q", "answer": "1"})
    (tmp_path / "lines.jsonl").write_text(good + "\n" + good + '\n{"image": "a.png",\n')
    (tmp_path / "listed.json").write_text('[\n {"image": "a.png"},\n {"image": }\n]')
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / "rows.txt").write_text(good)
    (tmp_path / "other.jsonl").write_text(json.dumps({"picture": "a.png", "text": "hi"}) + "\n")
    (tmp_path / "set").mkdir()
    for split in ("train", "validation"):
        datasets.Dataset.from_list([{"image": png(), "question": split, "answer": "1"}]).to_parquet(
            tmp_path / "set" / f"{split}.parquet"
        )
    cases = [
        ("nope.jsonl", "train", ": no such file or folder"),
        ("lines.jsonl", "train", ": line 3: not valid JSON (Expecting property name"),
        ("listed.json", "train", ": line 3: not valid JSON (Expecting value)"),
        ("binary.jsonl", "train", ": UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0"),
        ("rows.txt", "train", ": expected a .json, .jsonl, .parquet or .csv file"),
        ("other.jsonl", "train", ": columns ['picture', 'text'] match no known schema: plain"),
        ("set", "test", ": no 'test' split (it has train, validation)"),
    ]
    for name, split, message in cases:
        with pytest.raises(ValueError) as e:
            load_examples(str(tmp_path / name), split)
        line = str(e.value)
        assert line.startswith(f"data set {str(tmp_path / name)!r}{message}") and "\n" not in line, line
    assert load_examples(str(tmp_path / "set"), "validation")[0]["question"] == "validation"
    with pytest.raises(ValueError, match="nobody/no-such-set': [A-Za-z]+Error: "):
        load_examples("nobody/no-such-set", "train")  # a hub id that cannot be fetched

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data, "open", unreadable, raising=False)  # read_json's open
    with pytest.raises(ValueError, match="lines.jsonl': PermissionError: \\[Errno 13\\] Permission denied$"):
        load_examples(str(tmp_path / "lines.jsonl"), "train")


def test_rl_rows_need_an_answer_and_sft_rows_something_to_learn_from(tmp_path, capsys):
    """Chat rows are SFT data: as RL data (sft=False) they are bad rows, which stop the load or with skip_bad
    are skipped and counted. For SFT a plain row with an answer and no solution teaches the answer alone."""
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    chat = {
        "image": "a.png",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    with pytest.raises(ValueError, match="row 0, column 'answer': no answer to reward \\(chat rows are SFT"):
        load_examples(str(tmp_path / "chat.jsonl"), "train")
    (ex,) = load_examples(str(tmp_path / "chat.jsonl"), "train", sft=True)
    assert ex["target"] == "a" and ex["answer"] is None and ex["row"] == 0
    rows = [
        {"image": "a.png", "question": "q", "answer": "1", "solution": "It is 1."},
        {"image": "a.png", "question": "q", "answer": "2"},
    ]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_examples(str(tmp_path / "plain.jsonl"), "train")) == 2
    sft_rows = load_examples(str(tmp_path / "plain.jsonl"), "train", sft=True)
    assert [data.sft_target(ex, "base") for ex in sft_rows] == [
        "It is 1.</think><answer>1</answer>",
        "</think><answer>2</answer>",
    ]
    both = tmp_path / "both.jsonl"
    both.write_text((tmp_path / "plain.jsonl").read_text() + json.dumps({"image": "a.png", "question": "q"}))
    capsys.readouterr()
    assert [ex["row"] for ex in load_examples(str(both), "train", skip_bad=True)] == [0, 1]
    assert capsys.readouterr().out == f"{both}: skipped 1 bad rows: 1 x answer: no answer\n"
    with pytest.raises(ValueError, match="chat.jsonl' \\(split 'train'\\) has no usable rows"):
        load_examples(str(tmp_path / "chat.jsonl"), "train", skip_bad=True)


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny.model_dir())


def test_prompts_p1_and_p2(processor):
    ex = load_examples(tiny.data_file(16), "train", seed=0)[0]
    p1 = data.prompt_text(ex, "base", processor)
    assert p1.startswith(
        "<|vision_start|><|image_pad|><|vision_end|>A conversation between User and Assistant."
    )
    assert p1.endswith(f"User: {ex['question']} \nAssistant: Let me solve this step by step.\n<think>")
    p2 = data.prompt_text(ex, "instruct", processor)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" in p2
    assert (
        ex["question"] + "  Output the thinking process in <think> </think> and final answer (option) in "
        "<answer> </answer> tags."
    ) in p2 and p2.endswith("<|im_start|>assistant\n")


def test_corrupt_embedded_image_names_its_row(tmp_path):
    import datasets

    path = str(tmp_path / "cv.parquet")
    datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png(), "path": None}, {"bytes": b"garbage", "path": None}],
            "prompt": ["q", "q"],
            "choices": [["a", "b"]] * 2,
            "answer": ["(A)", "(B)"],
        }
    ).cast_column("image", datasets.Image()).to_parquet(path)
    with pytest.raises(ValueError, match="row 1, column 'image': unreadable image"):
        load_examples(path, "test")
    assert len(load_examples(path, "test", skip_bad=True)) == 1


def test_plain_rows_any_image_and_question_column_letters_and_relative_paths(tmp_path):
    """The plain schema: image | images | image_path, question | prompt | problem, answer; choices with the
    answer as text or letter; relative image paths are relative to the data file's folder."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "img" / "a.png")
    rows = [
        {"image": "img/a.png", "question": "What colour?", "answer": "red"},
        {"images": ["img/a.png"], "problem": "<image>Find x.", "answer": 3, "solution": "x is 3."},
        {"image_path": "img/a.png", "prompt": "Which?", "choices": ["left", "right"], "answer": "(B)"},
        {"image": "img/a.png", "question": "Which?", "choices": ["B", "A"], "answer": "A", "task": "T"},
    ]
    path = tmp_path / "plain.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is no row
    exs = load_examples(str(path), "train")
    assert [e["answer"] for e in exs] == ["red", "3", "right", "A"]  # "A" is an option: text, not a letter
    assert [e["images"] for e in exs] == [[str(tmp_path / "img" / "a.png")]] * 4
    assert exs[1]["question"] == "Find x." and exs[1]["choices"] is None
    assert exs[2]["question"] == "Which? Select from the following choices.\n(A) left\n(B) right"
    assert [e["task"] for e in exs] == ["untagged"] * 3 + ["T"]
    # a free-text solution is taught as <think>solution</think><answer>answer</answer>
    assert data.sft_target(exs[1], "instruct") == "<think>x is 3.</think><answer>3</answer>"
    assert data.sft_target(exs[1], "step") == "x is 3.\n### The final answer is: 3"
    # a .json list of the same rows, same examples
    (tmp_path / "plain.json").write_text(json.dumps(rows, indent=1))
    assert load_examples(str(tmp_path / "plain.json"), "train") == [
        {**e, "source": str(tmp_path / "plain.json")} for e in exs
    ]
    path.write_text(json.dumps({**rows[0], "choices": ["x", "y"], "answer": "C"}))
    with pytest.raises(
        ValueError, match=r"row 0, column 'answer': 'C' is neither one of the choices nor the letter of one"
    ):
        load_examples(str(path), "train")


def sat_parquet(tmp_path, n):
    import datasets

    path = str(tmp_path / "sat.parquet")
    datasets.Dataset.from_dict(
        {
            "image_bytes": [[png()] * (2 if i % 5 == 4 else 1) for i in range(n)],
            "question": [f"q{i}" for i in range(n)],
            "answers": [["a", "b"]] * n,
            "correct_answer": ["a"] * n,
        }
    ).cast_column("image_bytes", datasets.List(datasets.Image())).to_parquet(path)
    return path


def test_max_rows_samples_single_image_rows_and_reads_only_those(tmp_path, monkeypatch):
    path, opened, real = sat_parquet(tmp_path, 50), [], data.open_image  # rows 4, 9, ... have two images

    def counted(im):
        opened.append(im)
        return real(im)

    monkeypatch.setattr(data, "open_image", counted)
    exs = load_examples(path, "train", seed=0, max_rows=10)
    rows = [e["row"] for e in exs]
    assert len(rows) == 10 and rows == sorted(rows) and all(r % 5 != 4 for r in rows)
    assert len(opened) == 10  # the other 30 single-image rows' images are never opened
    assert isinstance(exs[0]["images"][0], dict) and exs[0]["images"][0]["bytes"] == png()  # not decoded
    assert [e["row"] for e in load_examples(path, "train", seed=0, max_rows=10)] == rows  # seeded
    assert [e["row"] for e in load_examples(path, "train", seed=1, max_rows=10)] != rows
    assert (
        len(load_examples(path, "train", max_rows=0)) == len(load_examples(path, "train", max_rows=99)) == 40
    )


def test_r1zero_default_is_15k_sat_rows_for_3750_steps_and_tiny_still_loads():
    import grpo_vl as g

    for variant in ("r1zero", "grpo"):
        a = g.parse_args(["--variant", variant])
        assert (a.data, a.max_rows, a.epochs * a.max_rows // a.prompts_per_step) == ("array/SAT", 15000, 3750)
    assert "**3,750 steps**" in open(os.path.join(os.path.dirname(data.__file__), "README.md")).read()
    demo = g.parse_args(tiny.flags())  # the tiny run's synthetic data: 2,000 rows, under the cap
    assert len(load_examples(demo.data, "train", max_rows=demo.max_rows)) == 2000


def test_prompt_p3_is_the_released_reasoning_prompt(processor):
    """R1-VL's eval/qwen2_vl/model.py: REASONING_PROMPT.format(question='Question: ' + q), 'Question: ' added
    only when missing; a row that carries the prompt already (### Image Description) is sent as it is."""
    released = (
        "Generate an image description based on the question.\nThen, provide a rationale to analyze the "
        "question.\nNext, generate a step-by-step reasoning process to solve the problem. Ensure the steps "
        "are logical and concise.\nFinally, provide a concise summary of the final answer in the following "
        "format: 'The final answer is: xxx.\n\nFormat your response with the following sections, "
        "separated by ###:\n"
        "### Image Description:\n### Rationales:\n### Let's think step by step.\n### Step 1:\n### Step 2:\n"
        "...\n### The final answer is: \n\nQuestion: How many red shapes are there?"
    )
    user = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    for question in ("How many red shapes are there?", "Question: How many red shapes are there?", released):
        p3 = data.prompt_text({"images": ["a.png"], "question": question}, "step", processor)
        assert p3.endswith(user + released + "<|im_end|>\n<|im_start|>assistant\n"), (question, p3)


def test_a_zero_answer_is_an_answer(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "How many blue shapes?", "answer": 0}]
    (tmp_path / "zero.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ex,) = load_examples(str(tmp_path / "zero.jsonl"), "train")
    assert ex["answer"] == "0" and R.accuracy("<answer>0</answer>", ex) == 1.0
