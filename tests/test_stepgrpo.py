"""StepGRPO (R1-VL): R4 StepRAR and R5 StepRVR on written-out completions, the warm-up SFT phase, the
step-wise and chat data schemas, and the whole stepgrpo pipeline on the tiny model."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import grpo_vl as g
import rewards as R
import tiny as tiny_fixtures  # the model and data fixtures (the name `tiny` is conftest's fixture)

EX = {
    "answer": "2",
    "choices": None,
    "key_steps": [["6/3 = 2", "\\frac{6}{3}=2", "6 divided by 3 is 2"], ["area is 12", "area = 12"]],
}


def steps(*body, answer="2", desc=True, rat=True, lets=True):
    parts = (
        (["### Image Description:\nA rectangle 4 by 3."] if desc else [])
        + (["### Rationales:\nCompute the area, then divide."] if rat else [])
        + (["### Let's think step by step."] if lets else [])
    )
    parts += [f"### Step {i}:\n{b}" for i, b in enumerate(body, 1)]
    return "\n".join(parts + ([f"### The final answer is: {answer}"] if answer is not None else []))


FULL = steps("The area is 12.", "Then 6/3 = 2.")
HALF = steps("The area is 13.", "Then 6/3 = 2.")


@pytest.mark.parametrize(
    "text,expected",
    [
        (FULL, 1 + 0.1 * 1.0),  # correct, all key steps
        (HALF, 1 + 0.1 * 0.5),  # correct, half the key steps
        (steps("The area is 12.", "6/3 = 2", answer="3"), 0.1 * 1.0),  # answered but wrong
        (steps("The area is 12.", "6/3 = 2", answer=None), 0.0),  # no answer at all
        (steps("The area is 12.", "6/3 = 2", answer=""), 0.0),  # the final answer's line is empty
        (steps("Six divided by three... 6 DIVIDED   by\n3 is 2."), 1 + 0.1 * 0.5),  # case and whitespace
        (steps("we get \\frac{6}{3}=2 and AREA = 12"), 1 + 0.1 * 1.0),  # equivalent surface forms
        (steps("x", answer="\\boxed{2}"), 1.0),  # R1's equality on the answer
        (
            FULL.replace("The area is 12.", "") + "\n(area is 12 after the answer)",
            1 + 0.1 * 0.5,
        ),  # the final answer's section is not a step
    ],
)
def test_r4_step_rar(text, expected):
    assert R.step_accuracy(text, EX) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text,expected",
    [
        # only the bodies of the '### Step N:' sections count: 'area is 12' elsewhere is not a matched step
        (
            FULL.replace("A rectangle 4 by 3.", "A rectangle, area is 12.").replace("The area is 12.", "x"),
            1.05,
        ),
        (
            FULL.replace("Compute the area", "The area is 12, compute it").replace("The area is 12.", "x"),
            1.05,
        ),
        (steps("x", "6/3 = 2").replace("step by step.", "step by step. The area is 12."), 1.05),  # its line
        # a header inside the steps ends the step before it: what follows is not that step's body
        (steps("6/3 = 2\n### Let's think step by step:\nthe area is 12"), 1.05),
        (steps("6/3 = 2", "the area is 12"), 1.1),  # the same two steps, each in its own body
        # whitespace runs collapse to one space, they are not deleted: "6/3=2" is not the form "6/3 = 2"
        (steps("Then 6/3=2, and the area  is\t12."), 1.05),
        # word boundaries at a word-character edge of the form, on both sides
        (steps("16/3 = 2 and the area is 123"), 1.0),
        (steps("x=6/3 = 2; (area is 12)"), 1.1),  # punctuation next to the form is a boundary
        (steps("thearea is 12, 6/3 = 2b"), 1.0),
        # a form that starts with punctuation ('\\frac') has no boundary to keep on that side
        (steps("so\\frac{6}{3}=2, y"), 1.05),
        (steps("\\frac{6}{3}=25"), 1.0),
    ],
)
def test_r4_matches_inside_step_bodies_at_word_boundaries(text, expected):
    assert R.step_accuracy(text, EX) == pytest.approx(expected)


def test_r4_word_boundaries_with_a_short_form():
    """'is 2' is in 'this is 2' but not in 'this 2' (the whitespace-deleting comparison found it there)."""
    ex = {"answer": "2", "key_steps": [["is 2"]]}
    assert R.step_accuracy(steps("So this is 2."), ex) == pytest.approx(1.1)
    assert R.step_accuracy(steps("So this 2."), ex) == 1.0
    assert R.step_accuracy(steps("So it IS\n 2"), ex) == pytest.approx(1.1)
    assert R.step_accuracy(steps("So it is 2x"), ex) == 1.0
    assert R.step_accuracy(steps("So it is 2"), {"answer": "2", "key_steps": [["  "], ["is 2"]]}) == 1.05


def test_r4_rows_without_key_steps_still_reward_the_outcome():
    assert R.step_accuracy(FULL, {"answer": "2", "key_steps": []}) == 1.0
    # alpha weighs the share of key steps matched: R1-VL's 0.1, a constant
    assert R.ALPHA == 0.1
    assert R.step_accuracy(FULL, EX) == pytest.approx(1 + R.ALPHA)
    assert R.step_accuracy(HALF, EX) == pytest.approx(1 + R.ALPHA * 0.5)


@pytest.mark.parametrize(
    "text,expected",
    [
        (FULL, 1.0),
        (steps("a", "b", "c", lets=False), 1.0),  # "Let's think" is optional
        (steps("a", desc=False), 0.0),  # no description
        (steps("a", rat=False), 0.0),  # no rationale
        (steps(), 0.0),  # no step
        (steps("a", answer=None), 0.0),  # no final answer
        (FULL.replace("### Step 2:", "### Step 3:"), 0.0),  # numbering skips
        (FULL.replace("### Step 1:", "### Step 0:"), 0.0),  # does not start at 1
        (
            "### Rationales:\nr\n### Image Description:\nd\n### Step 1:\na\n### The final answer is: 2",
            0.0,
        ),  # order
        (
            steps("a", "b").replace(
                "### Step 2:\nb\n### The final answer is: 2", "### The final answer is: 2\n### Step 2:\nb"
            ),
            0.0,
        ),  # answer before last step
        (FULL + "\n### The final answer is: 3", 0.0),  # two final answers
        # "### Let's think step by step." is a section, as P3 writes it (no colon) or with a colon
        (FULL.replace("step by step.", "step by step:"), 1.0),
        (
            "### Image Description:\nd\n### Let's think step by step.\n### Rationales:\nr\n"
            "### Step 1:\na\n### The final answer is: 2",
            0.0,
        ),  # before the rationale: out of order
        (steps("a", "b").replace("### Step 2:", "### Let's think step by step.\n### Step 2:"), 0.0),
        (FULL.replace("### Step 1:", "### Let's think step by step.\n### Step 1:"), 0.0),  # twice
    ],
)
def test_r5_step_rvr(text, expected):
    assert R.step_validity(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "### Step 1:" * 50000,
        "### " * 200000,
        "### The final answer is:" * 30000,
        "\x00\ud800" * 10000 + FULL,
        "a" * 1_000_000,
    ],
)
def test_step_rewards_on_hostile_text(text):
    assert R.step_accuracy(text, EX) in (0.0, 0.1, 0.05, 1.0, 1.05, 1.1)
    assert R.step_validity(text) in (0.0, 1.0)


def test_sft_batch_masks_exactly_the_prompt_and_image_tokens(tiny, examples):
    """Hand-built check: the mask covers the target's tokens plus <|im_end|>, nothing of the prompt, and
    the loss equals cross-entropy computed by hand from the full logits at those positions."""
    model, processor, _, banned = tiny
    args = g.parse_args(
        ["--variant", "stepgrpo", *tiny_fixtures.flags(), "--sft-data", tiny_fixtures.data_file(16)]
    )
    assert g.PROMPT[args.variant] == "step"  # the P3 prompt, and its target as it is
    exs = [examples[0], examples[1]]
    b = g.sft_batch(processor, exs, args)
    tok = processor.tokenizer
    for i, ex in enumerate(exs):
        target = tok(ex["solution"], add_special_tokens=False)["input_ids"] + [
            tok.convert_tokens_to_ids("<|im_end|>")
        ]
        n = int(b["mask"][i].sum())
        assert b["completion"][i, :n].tolist() == target and n == len(target)
        assert (b["completion"][i, n:] == tok.pad_token_id).all()
    # the prompt (with its image tokens) is in the encoded prompt, never in the scored part
    p = b["prompt"]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert (p["input_ids"] == image_id).any() and not (b["completion"] == image_id).any()
    with torch.no_grad():
        logp = g.token_logprobs(model, b, 1.0, [], torch.device("cpu"))
        full = torch.cat([p["input_ids"], b["completion"]], 1)
        out = model(
            input_ids=full,
            attention_mask=torch.cat([p["attention_mask"], b["mask"].long()], 1),
            mm_token_type_ids=torch.cat([p["mm_token_type_ids"], torch.zeros_like(b["completion"])], 1),
            pixel_values=p["pixel_values"],
            image_grid_thw=p["image_grid_thw"],
        )
        L = p["input_ids"].shape[1]
        by_hand = torch.nn.functional.cross_entropy(
            out.logits[:, L - 1 : -1].transpose(1, 2), b["completion"], reduction="none"
        )
    m = b["mask"].bool()
    assert torch.allclose(-logp[m], by_hand[m], atol=1e-4)


def test_sft_lowers_the_loss(tmp_path):
    out = str(tmp_path / "sft")
    # 12 SFT steps: 2 epochs x (48 rows // 8 per step)
    g.main(
        [
            "--variant",
            "stepgrpo",
            *tiny_fixtures.flags(),
            "--sft-data",
            tiny_fixtures.data_file(48),
            "--sft-epochs",
            "2",
            "--sft-batch",
            "8",
            "--data",
            "",
            "--out",
            out,
        ]
    )
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["phase"] for r in rows] == ["sft"] * 12 and [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    # transformers' schedule: a ceil(3% of 12) = 1-step warm-up from lr 0, then cosine decay over 11 steps
    expected = [0.0] + [1e-2 * 0.5 * (1 + math.cos(math.pi * s / 11)) for s in range(0, 11)]
    assert [r["lr"] for r in rows] == pytest.approx(expected)
    assert os.path.exists(os.path.join(out, "checkpoint", "model.safetensors"))


def test_stepgrpo_sft_then_rl_on_the_tiny_model(tmp_path):
    out = str(tmp_path / "s")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # 4 SFT steps (1 epoch x (32 rows // 8 per step)), then 2 RL steps
    p = subprocess.run(
        [
            sys.executable,
            "grpo_vl.py",
            "--variant",
            "stepgrpo",
            *tiny_fixtures.flags(),
            "--sft-data",
            tiny_fixtures.data_file(32),
            "--data",
            tiny_fixtures.data_file(64),
            "--sft-epochs",
            "1",
            "--sft-batch",
            "8",
            "--max-steps",
            "2",
            "--out",
            out,
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["phase"], r["step"]) for r in rows] == [
        ("sft", 1),
        ("sft", 2),
        ("sft", 3),
        ("sft", 4),
        ("rl", 1),
        ("rl", 2),
    ]
    rl = rows[4]
    assert {"rewards/step_accuracy", "rewards/step_validity"} <= set(rl)
    assert rl["kl"] == 0.0  # the reference is the model SFT left, not the random start


def test_stepwise_and_chat_rows(tmp_path):
    import datasets
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40), "red").save(img)
    step_rows = str(tmp_path / "steps.jsonl")
    datasets.Dataset.from_list(
        [
            {
                "problem": "What is 6/3?",
                "image_path": str(img),
                "solution": steps("6/3 = 2"),
                "key_steps": json.dumps({"Steps": [["6/3 = 2", "6 divided by 3 is 2"]]}),
            },
            {"problem": "And 4/2?", "image_path": str(img), "solution": steps("4/2 = 2"), "key_steps": ""},
        ]
    ).to_json(step_rows)
    exs = data.load_examples(step_rows, "train")
    assert exs[0]["answer"] == "2" and exs[0]["key_steps"] == [["6/3 = 2", "6 divided by 3 is 2"]]
    assert exs[1]["key_steps"] == [] and R.step_accuracy(exs[1]["solution"], exs[1]) == 1.0
    assert data.sft_target(exs[0], "step") == exs[0]["solution"]
    assert data.sft_target(exs[0], "plain").startswith("<think>") and data.sft_target(
        exs[0], "plain"
    ).endswith("</think><answer>2</answer>")
    chat = str(tmp_path / "chat.jsonl")
    datasets.Dataset.from_list(
        [
            {
                "conversations": [
                    {"from": "human", "value": "<image>What is shown?"},
                    {"from": "gpt", "value": "<think>red</think><answer>red</answer>"},
                ],
                "images": [str(img)],
            }
        ]
    ).to_json(chat)
    (ex,) = data.load_examples(chat, "train", sft=True)  # chat rows are SFT data (no answer to reward)
    assert ex["question"] == "What is shown?" and ex["target"] == "<think>red</think><answer>red</answer>"
    bad = str(tmp_path / "bad.jsonl")
    datasets.Dataset.from_list(
        [
            {
                "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}],
                "images": [str(img), str(img)],
            }
        ]
    ).to_json(bad)
    with pytest.raises(ValueError) as e:
        data.load_examples(bad, "train", sft=True)
    # data.py's wording may change: the data set, row and column, then 2 images and 1 <image> slot
    why = row_error(str(e.value), bad, 0, "images")
    assert "<image>" in why and re.search(r"\b2\b.*\b1\b", why), why


def row_error(message, path, row, column):
    """The reason of data.py's one-line row error `data set 'FILE', row N, column 'C': why` (asserted)."""
    head = f"data set {path!r}, row {row}, column {column!r}: "
    assert message.startswith(head) and "\n" not in message, message
    return message[len(head) :]


def test_stepgrpo_and_vision_r1_default_to_their_released_data(capsys):
    """The card's command needs no data flag: the defaults are the releases (test_release_layouts.py checks
    the line that says how to get them); an SFT phase without SFT data is still a flag error."""
    step = g.parse_args(["--variant", "stepgrpo"])
    assert (step.data, step.sft_data) == (
        "data/R1-VL-10K",
        "data/Mulberry-SFT/mulberry_images/mulberry_sft.json",
    )
    files = ["vision_r1_llava_cot_full.json", "vision_r1_mulberry_sft_full.json"]
    cold = ",".join(f"data/Vision-R1-cold/{name}" for name in files)
    assert (
        g.parse_args(["--variant", "vision-r1"]).data,
        g.parse_args(["--variant", "vision-r1"]).sft_data,
    ) == (
        "Osilly/Vision-R1-rl",
        cold,
    )
    for variant in ("stepgrpo", "vision-r1"):
        with pytest.raises(SystemExit) as e:
            g.parse_args(["--variant", variant, "--sft-data", ""])
        assert e.value.code == 2 and "--sft-epochs needs --sft-data" in capsys.readouterr().err
        assert (
            g.parse_args(["--variant", variant, "--data", "rl.jsonl", "--sft-epochs", "0"]).data == "rl.jsonl"
        )
