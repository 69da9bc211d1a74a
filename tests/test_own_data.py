"""Your own data: a mistake in --data, --sft-data or --eval-data ends the run before the model is loaded,
with one line on stderr and exit code 2; a plain-schema JSONL with image paths trains; the README's examples
load."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from PIL import Image

import data
import grpo_vl as g
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [
    {"image": "img/red.png", "question": "What colour is the shape?", "answer": "red"},
    {"image": "img/blue.png", "question": "Which colour?", "choices": ["red", "blue"], "answer": "B"},
    {
        "images": ["img/red.png"],
        "problem": "<image>Name the colour.",
        "answer": "red",
        "solution": "It is red.",
    },
    {"image_path": "img/blue.png", "prompt": "Colour?", "choices": ["blue", "green"], "answer": "blue"},
]


def write_plain(folder):
    (folder / "img").mkdir(exist_ok=True)
    Image.new("RGB", (56, 56), "red").save(folder / "img" / "red.png")
    Image.new("RGB", (56, 56), "blue").save(folder / "img" / "blue.png")
    (folder / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(folder / "plain.jsonl")


def bad_inputs(tmp_path):
    """(flags, the parts of the line expected on stderr, in order) for each kind of mistake. data.py words
    the reasons; the parts are the stable ones: the data set, where in it (line, row, column), key words."""
    good = write_plain(tmp_path)
    broken = str(tmp_path / "broken.jsonl")
    (tmp_path / "broken.jsonl").write_text(
        json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + '\n{"image": "img/red.png",\n'
    )
    listed = str(tmp_path / "listed.json")
    (tmp_path / "listed.json").write_text('[\n {"image": "img/red.png"},\n {"image": }\n]')
    binary = str(tmp_path / "binary.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01")
    garbage = str(tmp_path / "garbage.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file at all")
    other = str(tmp_path / "other.jsonl")
    (tmp_path / "other.jsonl").write_text(json.dumps({"picture": "img/red.png", "text": "hi"}) + "\n")
    chat = str(tmp_path / "chat.jsonl")
    turns = [{"role": "user", "content": "<image>Which colour?"}, {"role": "assistant", "content": "red"}]
    chat_rows = [{"image": "img/red.png", "messages": turns}] * 2 + [
        {"image": "img/red.png", "messages": turns[:1]}
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows))
    missing = str(tmp_path / "nope.jsonl")
    return [
        (["--data", missing], [f"data set {missing!r}", "no such file"]),
        (["--data", "no/such/folder"], ["data set 'no/such/folder'", "no such file"]),
        (["--data", broken], [f"data set {broken!r}", "line 3", "not valid JSON", "Expecting property name"]),
        (["--data", listed], [f"data set {listed!r}", "line 3", "not valid JSON", "Expecting value"]),
        (["--data", binary], [f"data set {binary!r}", "utf-8", "decode"]),
        (["--data", garbage], [f"data set {garbage!r}", "parquet"]),
        (["--data", "nobody/no-such-set"], ["data set 'nobody/no-such-set': "]),  # offline, or not on the hub
        (["--data", other], [f"data set {other!r}", "['picture', 'text']", "no known schema"]),
        (
            ["--data", good, "--sft-data", missing, "--sft-epochs", "1"],
            [f"data set {missing!r}", "no such file"],
        ),
        (
            ["--data", good, "--eval-data", missing, "--eval-every", "1"],
            [f"data set {missing!r}", "no such file"],
        ),
        (["--eval", "--eval-data", broken], [f"data set {broken!r}", "line 3", "not valid JSON"]),
        (  # its third row has no reply to learn from
            ["--data", good, "--sft-data", chat, "--sft-epochs", "1"],
            [f"data set {chat!r}, row 2, column 'messages': ", "assistant"],
        ),
    ]


def in_order(text, parts):
    """Each of `parts` in `text`, each after the one before, whatever their case."""
    at = 0
    for part in parts:
        at = text.lower().find(part.lower(), at)
        if at < 0:
            return False
        at += len(part)
    return True


def test_every_data_mistake_ends_the_run_before_the_model_with_one_line(tmp_path, capfd, monkeypatch):
    def no_model(*args):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(g, "load_models", no_model)
    for flags, parts in bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as e:
            g.main([*tiny.flags(), "--out", str(tmp_path / "o"), *flags])
        err = capfd.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, (flags, err)
        assert err.startswith("grpo_vl.py: error: data set ") and in_order(err, parts), (flags, err)


def test_a_data_mistake_from_the_command_line_is_one_line_in_seconds(tmp_path):
    flags, parts = bad_inputs(tmp_path)[2]  # a JSON syntax error
    command = [sys.executable, "grpo_vl.py", *tiny.flags(), "--out", str(tmp_path / "o"), *flags]
    t0 = time.time()
    p = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(f"\nfailed in {time.time() - t0:.1f} s: {p.stderr.strip()}")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("grpo_vl.py: error: ") and in_order(p.stderr, parts), p.stderr
    assert "Traceback" not in p.stderr and not os.path.exists(tmp_path / "o" / "metrics.jsonl")


def test_two_steps_on_a_plain_jsonl_with_image_paths(tmp_path):
    """Two GRPO steps and an evaluation on the plain rows; their image paths are relative to the file."""
    path, out = write_plain(tmp_path), str(tmp_path / "run")
    g.main(
        [
            *tiny.flags(),
            "--data",
            path,
            "--eval-data",
            path,
            "--eval-every",
            "2",
            "--eval-max-new-tokens",
            "8",
            "--max-steps",
            "2",
            "--prompts-per-step",
            "2",
            "--max-new-tokens",
            "16",
            "--out",
            out,
            "--log-completions-every",
            "1",
        ]
    )
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] == r["grad_norm"] for r in rows)
    gold = {e["question"]: e["answer"] for e in data.load_examples(path, "train")}
    lines = [json.loads(x) for x in open(os.path.join(out, "trajectories", "step_000001.jsonl"))]
    assert len(lines) == 2 * 8 and len({t["question"] for t in lines}) == 2
    assert all(gold[t["question"]] == t["answer"] for t in lines)  # the rewards saw the rows' own answers
    report = json.load(open(os.path.join(out, "eval_step2.json")))
    assert report["n"] == 4 and set(report["per_task"]) == {"untagged"}
    said = [json.loads(x) for x in open(os.path.join(out, "eval_step2.jsonl"))]  # each row, what was said
    assert sorted(r["question"] for r in said) == sorted(gold) and all(
        gold[r["question"]] == r["answer"] for r in said
    )
    assert sum(r["accuracy"] for r in said) / 4 == report["accuracy"] and all("completion" in r for r in said)


def test_the_readmes_jsonl_examples_load(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Bring your own data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```jsonl\n(.*?)```", section, re.S)
    assert len(blocks) == 5 and all(len(b.strip().splitlines()) == 2 for b in blocks)
    (tmp_path / "images").mkdir()
    for name in set(re.findall(r"images/(\w+\.png)", section)):
        Image.new("RGB", (40, 40)).save(tmp_path / "images" / name)
    for j, block in enumerate(blocks):
        (tmp_path / f"{j}.jsonl").write_text(block)
        chat = '"messages"' in block or '"conversations"' in block  # SFT rows: a reply, no answer to reward
        exs = data.load_examples(str(tmp_path / f"{j}.jsonl"), "train", sft=chat)
        assert len(exs) == 2 and all(os.path.exists(im) for ex in exs for im in ex["images"])
        assert all(ex.get("answer") or ex.get("target") for ex in exs)


def test_rows_of_the_wrong_shape_are_bad_rows_named_by_column(tmp_path):
    """A value of an unexpected type is a bad row naming its column (never a traceback, never split into
    characters), counted by --skip-bad-rows under one reason whatever the value."""
    write_plain(tmp_path)
    img = {"image": "img/red.png", "question": "q"}
    cases = [  # (row, its column named, key words of the reason: data.py words the rest)
        ({**img, "answer": "B", "choices": "red, blue"}, "choices", ["JSON"]),
        ({**img, "answer": "x", "choices": [str(j) for j in range(27)]}, "choices", ["26"]),
        ({**img, "answer": "1", "key_steps": [["a"]]}, "key_steps", ["list"]),  # not {"Steps": [...]}
        ({**img, "answer": "1", "key_steps": "{not json"}, "key_steps", ["JSON"]),
        ({"image": 5, "question": "q", "answer": "1"}, "image", ["not a path", "int"]),
        ({"images": [None], "question": "q", "answer": "1"}, "images", ["not a path"]),
        ({**img, "solution": 5}, "solution", ["int"]),
        (
            {"image_bytes": ["x"], "question": "q", "answers": ["a", "b"], "correct_answer": "zzz"},
            "correct_answer",
            ["zzz", "not one of the answers"],
        ),
    ]
    for j, (row, column, words) in enumerate(cases):
        path = str(tmp_path / f"case{j}.jsonl")
        open(path, "w").write(json.dumps(row) + "\n")
        with pytest.raises(ValueError) as e:
            data.load_examples(path, "train")
        head = f"data set {path!r}, row 0, column {column!r}: "
        message = str(e.value)
        assert message.startswith(head) and in_order(message[len(head) :], words), (row, message)
        assert "\n" not in message, message
    # CSV cells and JSON exports hold lists as JSON text; a key step given as one string is one form
    path = tmp_path / "text.jsonl"
    steps = json.dumps({"Steps": ["area is 12", ["x", "y"]]})
    path.write_text(
        json.dumps({**img, "answer": "B", "choices": '["red", "blue"]', "key_steps": steps}) + "\n"
    )
    ex = data.load_examples(str(path), "train")[0]
    assert ex["choices"] == ["red", "blue"] and ex["answer"] == "blue"
    assert ex["key_steps"] == [["area is 12"], ["x", "y"]]
    # two wrong letters, one reason
    path = tmp_path / "letters.jsonl"
    path.write_text("".join(json.dumps({**img, "choices": ["a", "b"], "answer": x}) + "\n" for x in "CD"))
    with pytest.raises(ValueError, match="no usable rows"):
        data.load_examples(str(path), "train", skip_bad=True)


def test_a_missing_split_and_chat_rows_for_rl(tmp_path, monkeypatch, capfd):
    """Asking for a split a multi-split set does not have is an error, not its training split; chat rows
    (no answer) are SFT data: as RL data they end the run with exit 2 instead of crashing a reward."""
    import datasets

    write_plain(tmp_path)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "set"
    folder.mkdir()
    red = str(tmp_path / "img" / "red.png")
    for split in ("train", "validation"):
        datasets.Dataset.from_list([{"image": red, "question": split, "answer": "1"}]).to_parquet(
            folder / f"{split}.parquet"
        )
    assert [ex["question"] for ex in data.load_examples(str(folder), "validation")] == ["validation"]
    with pytest.raises(ValueError) as e:
        data.load_examples(str(folder), "test")
    message = str(e.value)  # data.py's wording: the data set, the split asked for, the splits it has
    assert message.startswith(f"data set {str(folder)!r}") and in_order(
        message, ["'test'", "train, validation"]
    )
    chat = {
        "image": "img/red.png",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    capfd.readouterr()  # the parquet writer's progress bars
    with pytest.raises(SystemExit) as e:
        g.main([*tiny.flags(), "--data", "chat.jsonl", "--out", str(tmp_path / "o")])
    err = capfd.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    head = "grpo_vl.py: error: data set 'chat.jsonl', row 0, column 'answer': "
    assert err.startswith(head) and in_order(err[len(head) :], ["no answer", "chat rows are SFT data"]), err
