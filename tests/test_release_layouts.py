"""The papers' released data sets, as small fixtures in exactly their released layouts (columns, types, image
paths and folders), each with its own tiny PNGs, through data.load_examples (issue 19)."""

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import data
import grpo_vl as g

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFLECTION = "I think I have made a mistake. Let me rethink it.\n\n"  # Mulberry's REFLECTION_PROMPT


def png(path=None, color="red"):
    """The bytes of an 8x8 PNG, also written to path (its folders made) if given. PIL reads the content, not
    the name, so a release's .jpg names are kept."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    return buf.getvalue()


def pixel(image):
    """The colour of an image given as a path or as {"bytes", "path"}: which file or bytes a row points at."""
    with Image.open(image if isinstance(image, str) else io.BytesIO(image["bytes"])) as im:
        return im.convert("RGB").getpixel((0, 0))


def test_mulberry_sft_json_inside_the_extracted_mulberry_images_folder(tmp_path):
    # HuanjinYao/Mulberry-SFT: mulberry_images.tar extracts to mulberry_images/<Source>/...; each row's
    # "images" is ONE string relative to that folder, so the JSON goes inside it
    root = tmp_path / "mulberry_images"
    png(str(root / "AI2D/images/4506.png"), "red")
    png(str(root / "ChartQA/train/png/two_col_1.png"), "blue")
    answer = (
        "### Image Description:\nA food web.\n\n### Rationales:\nFollow the arrows.\n\n"
        "### Let's think step by step.\n\n### Step 1:\nThe frog eats the insect.\n\n"
        "### The final answer is:\nB"
    )
    reflective = (  # data_construction.py: prefix, a wrong next step, REFLECTION_PROMPT, the right path on
        "### Image Description:\nA bar chart.\n\n### Rationales:\nRead the bars.\n\n### Let's think step by "
        f"step.\n\n### Step 1:\nThe tallest bar is 2019.\n\n{REFLECTION}### Step 1:\nThe tallest bar is 2020."
        "\n\n### The final answer is:\n2020"
    )
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image>What does the frog eat?\nA: grass\nB: insect"},
                {"role": "assistant", "content": answer},
            ],
            "images": "AI2D/images/4506.png",
        },
        {
            "messages": [
                {"role": "user", "content": "<image>Which year had the most sales?"},
                {"role": "assistant", "content": reflective},
            ],
            "images": "ChartQA/train/png/two_col_1.png",
        },
    ]
    spec = str(root / "mulberry_sft.json")
    with open(spec, "w") as f:
        json.dump(rows, f)
    a, b = data.load_examples(spec, "train", seed=0, skip_bad=False, max_rows=0, sft=True)
    assert a["images"] == [str(root / "AI2D/images/4506.png")] and pixel(a["images"][0]) == (255, 0, 0)
    assert a["question"] == "What does the frog eat?\nA: grass\nB: insect" and a["target"] == answer
    assert (a["answer"], a["choices"], a["task"], a["source"], a["row"]) == (None, None, "sft", spec, 0)
    # a reflective row (R1-VL removes these from its warm-up data) is kept today, the reflection in its target
    assert b["images"] == [str(root / "ChartQA/train/png/two_col_1.png")] and pixel(b["images"][0]) == (
        0,
        0,
        255,
    )
    assert b["question"] == "Which year had the most sales?" and b["target"] == reflective and b["row"] == 1
    # ... and the stepgrpo warm-up leaves it out, as R1-VL does; Vision-R1's cold start keeps such rows
    step = g.load_data(spec, "train", g.parse_args(["--variant", "stepgrpo"]), sft=True)
    assert [ex["row"] for ex in step] == [0]
    cold = g.load_data(spec, "train", g.parse_args(["--variant", "vision-r1"]), sft=True)
    assert [ex["row"] for ex in cold] == [0, 1]
    # the JSON beside mulberry_images/ (not inside) does not find the images: the row and column are named
    beside = str(tmp_path / "mulberry_sft.json")
    with open(beside, "w") as f:
        json.dump(rows, f)
    with pytest.raises(ValueError, match=r"row 0, column 'images': unreadable image \(FileNotFoundError"):
        data.load_examples(beside, "train", sft=True)


def test_r1vl_10k_rows_with_absolute_and_relative_image_paths_in_json_and_jsonl(tmp_path):
    # jingyiZ00/R1-VL-10K: image_path, problem, solution (P3 sections), key_steps {"Steps": [forms or a form]}
    folder = tmp_path / "r1vl"
    absolute = str(tmp_path / "elsewhere/geo/1.png")
    png(absolute, "red")
    png(str(folder / "images/chart/2.png"), "blue")
    solution = (
        "### Image Description:\nTwo parallel lines cut by a transversal.\n### Rationales:\nUse the angles."
        "\n### Let's think step by step.\n### Step 1:\nThe lines are parallel lines, so 2x + 10 = 50.\n"
        "### Step 2:\nx = 20\n### The final answer is:\nC"
    )
    steps = {"Steps": [["2x + 10 = 50", "2x+10=50"], ["x = 20"], "parallel lines"]}
    rows = [
        {
            "image_path": absolute,
            "problem": "Find x.\nA: 10\nB: 15\nC: 20",
            "solution": solution,
            "key_steps": steps,
        },
        {
            "image_path": "images/chart/2.png",  # the release: from the working folder; data.py: the file's
            "problem": "What is the total?",
            "solution": "### Step 1:\n3 + 4 = 7\n### The final answer is: 7",  # the answer on the same line
            "key_steps": {"Steps": ["3 + 4 = 7"]},
        },
    ]
    texts = {"r1vl_10k.json": json.dumps(rows, indent=1), "r1vl_10k.jsonl": "\n".join(map(json.dumps, rows))}
    for name, text in texts.items():
        (folder / name).write_text(text)
        a, b = data.load_examples(str(folder / name), "train", seed=0, skip_bad=False, max_rows=0, sft=False)
        assert a["images"] == [absolute] and pixel(a["images"][0]) == (255, 0, 0)
        assert a["question"] == "Find x.\nA: 10\nB: 15\nC: 20" and a["solution"] == solution
        assert (a["answer"], a["choices"], a["task"]) == ("C", None, "untagged")
        assert a["key_steps"] == [["2x + 10 = 50", "2x+10=50"], ["x = 20"], ["parallel lines"]]
        assert b["images"] == [str(folder / "images/chart/2.png")] and pixel(b["images"][0]) == (0, 0, 255)
        assert (b["question"], b["answer"], b["row"]) == ("What is the total?", "7", 1)
        assert b["key_steps"] == [["3 + 4 = 7"]]  # a lone string is one key step of one form


def test_vision_r1_cold_two_sharegpt_files_in_one_folder(tmp_path):
    # Osilly/Vision-R1-cold: vision_r1_cold/{llava_cot_images,mulberry_images,<the two JSON files>}; one file
    # names its column "image" and its roles human/gpt, the other "images" and user/assistant
    root = tmp_path / "vision_r1_cold"
    png(str(root / "llava_cot_images/coco/train2017/000.jpg"), "red")
    png(str(root / "mulberry_images/AI2D/images/4506.png"), "blue")
    llava_reply = "<think>\nThe bus is red. Wait, is it? Yes, red.\n</think>\n\nThe answer is B."
    mulberry_reply = "<think>The frog eats insects.</think>The answer is B."
    files = {
        "vision_r1_llava_cot_full.json": {
            "id": "coco_000",
            "image": "llava_cot_images/coco/train2017/000.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the bus?\nA. blue\nB. red"},
                {"from": "gpt", "value": llava_reply},
            ],
        },
        "vision_r1_mulberry_sft_full.json": {
            "images": "mulberry_images/AI2D/images/4506.png",
            "conversations": [
                {"from": "user", "value": "<image>What does the frog eat?"},
                {"from": "assistant", "value": mulberry_reply},
            ],
        },
    }
    for name, row in files.items():
        (root / name).write_text(json.dumps([row]))
    (llava,) = data.load_examples(str(root / "vision_r1_llava_cot_full.json"), "train", sft=True)
    assert llava["images"] == [str(root / "llava_cot_images/coco/train2017/000.jpg")]
    assert pixel(llava["images"][0]) == (255, 0, 0) and llava["target"] == llava_reply
    assert (llava["question"], llava["answer"]) == ("What colour is the bus?\nA. blue\nB. red", None)
    (mulberry,) = data.load_examples(str(root / "vision_r1_mulberry_sft_full.json"), "train", sft=True)
    assert mulberry["images"] == [str(root / "mulberry_images/AI2D/images/4506.png")]
    assert pixel(mulberry["images"][0]) == (0, 0, 255) and mulberry["target"] == mulberry_reply
    assert (mulberry["question"], mulberry["task"]) == ("What does the frog eat?", "sft")
    # the vision-r1 default names both files, comma-separated: one data set of both files' rows
    both = ",".join(str(root / name) for name in files)
    rows = g.load_data(both, "train", g.parse_args(["--variant", "vision-r1"]), sft=True)
    assert [ex["target"] for ex in rows] == [llava_reply, mulberry_reply]


def test_vision_r1_rl_geometry3k_parquet_with_embedded_images(tmp_path):
    # Osilly/Vision-R1-rl: images (a list of datasets Images: {"bytes", "path"}), problem (<image>...), answer
    import datasets

    path = str(tmp_path / "vision_r1_rl/train.parquet")
    os.makedirs(os.path.dirname(path))
    datasets.Dataset.from_dict(
        {
            "images": [
                [{"bytes": png(color="red"), "path": None}],
                [{"bytes": png(color="blue"), "path": None}],
            ],
            "problem": ["<image>Find x.\nChoices:\nA: 20\nB: 30", "<image>Find the measure of angle 1."],
            "answer": ["B", "30"],
        }
    ).cast_column("images", datasets.Sequence(datasets.Image())).to_parquet(path)
    a, b = data.load_examples(path, "train", seed=0, skip_bad=False, max_rows=0, sft=False)
    assert a["images"] == [{"bytes": png(color="red"), "path": None}]  # as stored, decoded when batched
    assert data.open_image(a["images"][0]).size == (8, 8) and pixel(b["images"][0]) == (0, 0, 255)
    assert (a["question"], a["answer"], a["choices"]) == ("Find x.\nChoices:\nA: 20\nB: 30", "B", None)
    assert (b["question"], b["answer"], b["key_steps"], b["row"]) == (
        "Find the measure of angle 1.",
        "30",
        [],
        1,
    )


def test_sat_train_parquet_with_its_released_columns(tmp_path, capsys):
    # array/SAT's SAT_train.parquet: image_bytes (a list of Images), question, answers, question_type,
    # correct_answer; r1zero trains on the single-image rows (tests/test_data.py tests the option order)
    import datasets

    path = str(tmp_path / "SAT/SAT_train.parquet")
    os.makedirs(os.path.dirname(path))
    datasets.Dataset.from_dict(
        {
            "image_bytes": [
                [png(color="red")],
                [png(color="green"), png(color="green")],
                [png(color="blue")],
            ],
            "question": ["Is the lamp left of the sofa?", "Did the camera turn left?", "Which is closer?"],
            "answers": [["yes", "no"], ["left", "right"], ["the cup", "the plate"]],
            "question_type": ["obj_rel", "ego_movement", "depth"],
            "correct_answer": ["no", "left", "the plate"],
        }
    ).cast_column("image_bytes", datasets.Sequence(datasets.Image())).to_parquet(path)
    a, b = data.load_examples(path, "train", seed=0, skip_bad=False, max_rows=0, sft=False)
    assert "kept the 2 single-image rows of 3" in capsys.readouterr().out  # the two-image row is dropped
    assert (a["row"], b["row"]) == (0, 2) and (a["answer"], b["answer"]) == ("no", "the plate")
    assert pixel(a["images"][0]) == (255, 0, 0) and data.open_image(b["images"][0]).size == (8, 8)
    assert a["question"].startswith(
        " Answer in natural language. Is the lamp left of the sofa? Choose between"
    )
    assert (b["task"], b["source"], b["choices"]) == ("SAT", "SAT", None)  # question_type is not kept


@pytest.mark.parametrize("variant", ["stepgrpo", "vision-r1"])
def test_the_cards_command_offline_says_what_to_download_and_exits_2(tmp_path, variant):
    """`grpo_vl.py --variant stepgrpo` (the card's command, one process) from a folder without the released
    data: one line naming what to download and where, exit 2, before any model loads (none is on disk)."""
    command = [sys.executable, os.path.join(ROOT, "grpo_vl.py"), "--variant", variant]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    release = {"stepgrpo": "HuanjinYao/Mulberry-SFT", "vision-r1": "Osilly/Vision-R1-cold"}[variant]
    assert (
        f"not downloaded: huggingface-cli download --repo-type dataset {release} --local-dir data/"
        in p.stderr
    )
    assert "--model" not in p.stderr and p.stdout == "", p.stdout
