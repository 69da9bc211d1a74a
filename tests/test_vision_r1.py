"""Vision-R1: R6 HFRRF, math-answer equality, PTST stages, the math RL schema, a tiny Qwen2.5-VL, and the
vision-r1 recipe (cold start, then two PTST stages) on the tiny model."""

import json
import os

import pytest

import data
import grpo_vl as g
import rewards as R
import tiny

EX = {"answer": "\\frac{1}{2}", "choices": None}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>half of one</think><answer>0.5</answer>", 1.0),  # right answer, right format
        ("\n<think>a</think>\n\n<answer>\\frac{1}{2}</answer>\n", 1.0),  # whitespace outside is fine
        ("So: <think>a</think><answer>0.5</answer>", 0.0),  # text before
        ("<think>a</think><answer>0.5</answer> done", 0.0),  # text after
        ("<think>a</think> so <answer>0.5</answer>", 0.0),  # text between
        ("<think>a</think><answer>0.5</answer><answer>0.5</answer>", 0.0),  # two answer blocks
        ("<think>a</think><think>b</think><answer>0.5</answer>", 0.0),  # two think blocks
        ("<answer>0.5</answer>", 0.0),  # missing think
        ("<think>a</think><answer>0.25</answer>", 0.0),  # wrong answer
        ("<answer>0.5</answer><think>a</think>", 0.0),  # wrong order
        ("<think><answer>0.5</think></answer>", 0.0),  # interleaved
    ],
)
def test_r6_hard_formatting_result_reward(text, expected):
    assert R.hard_format(text, EX) == expected


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "1/2"),
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("30°", "30"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("12 cm", "12"),
        ("4\\text{m}^2", "4"),
        ("\\boxed{7}", "7"),
        ("$7$", "7"),
        ("Final Answer: 7", "7"),
        ("The answer is 7.", "7"),
        ("3.50", "3.5"),
        ("-\\frac{3}{4}", "-0.75"),
        ("\\frac{\\sqrt{2}}{2}", "0.7071067811865476"),
        ("2 \\times 3", "6"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("A", "a"),
    ],
)
def test_math_answers_that_must_match(pred, gold):
    assert R.answers_equal(pred, gold), (pred, gold)


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("\\frac{1}{3}", "0.33"),
        ("2\\sqrt{3}", "\\sqrt{13}"),
        ("31°", "30"),
        ("2a", "2"),
        ("x", "0"),
        ("", "0"),
        ("__import__('os').system('rm -rf /')", "0"),
        ("eval('1+1')", "2"),
        ("exec('x=2')", "2"),
        ("(lambda: 2)()", "2"),
        ("2**10", "1024"),
        ("9^9^9", "0"),
        ("\\frac{1}{0}", "1"),
        ("1e400", "1"),
        ("{" * 60 + "1" + "}" * 60, "1"),
    ],
)
def test_math_answers_that_must_not_match(pred, gold):
    assert not R.answers_equal(pred, gold), (pred, gold)


def test_parsing_never_executes_model_text(tmp_path):
    marker = tmp_path / "pwned"
    for code in [
        f"__import__('os').system('touch {marker}')",
        f"open('{marker}', 'w')",
        f"\\boxed{{__import__('pathlib').Path('{marker}').touch()}}",
    ]:
        text = f"<think>x</think><answer>{code}</answer>"
        for fn in R.REWARDS.values():
            fn(text, {"answer": "1", "choices": None, "key_steps": []}, 1)
    assert not marker.exists()


def test_ptst_spec_parses_and_bad_specs_exit_2(capsys):
    assert g.parse_ptst("4096:16:100,8192:8:100") == [(4096, 16, 100), (8192, 8, 100)]
    assert g.parse_ptst("") == []
    for bad in ["4096:16", "a:b:c", "4096:16:100;8192:8:100", "64:1:3", "0:8:3"]:
        with pytest.raises(SystemExit) as e:
            g.parse_args(["--ptst", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and ("--ptst" in err or "must be at least 2" in err), err
    cold = ["--variant", "vision-r1", "--sft-data", "x"]
    assert g.parse_args(cold + ["--data", "x"]).ptst == "4096:16:100,8192:8:100"
    assert g.parse_args(cold + ["--data", "x", "--ptst", "64:8:3"]).ptst == "64:8:3"  # a flag given wins


def test_math_rl_rows(tmp_path):
    import datasets
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "g.png")
    path = str(tmp_path / "math.jsonl")
    datasets.Dataset.from_list(
        [
            {"images": [str(tmp_path / "g.png")], "problem": "Find x.", "answer": "2\\sqrt{3}"},
            {"images": [str(tmp_path / "g.png")], "problem": "Find y.", "answer": ""},
        ]
    ).to_json(path)
    with pytest.raises(ValueError) as e:
        data.load_examples(path, "train")
    # data.py's wording may change: the data set, the row, the column, then "no answer"
    assert str(e.value).startswith(f"data set {path!r}, row 1, column 'answer': no answer"), e.value
    datasets.Dataset.from_list(  # geometry3k rows carry an <image> placeholder: the prompt places the image
        [{"images": [str(tmp_path / "g.png")], "problem": "<image>Find x.", "answer": "2\\sqrt{3}"}]
    ).to_json(path)
    (ex,) = data.load_examples(path, "train")
    assert (
        ex["question"] == "Find x."
        and R.hard_format("<think>.</think><answer>\\sqrt{12}</answer>", ex) == 1.0
    )


def test_tiny_qwen25_vl_runs_two_rl_steps(tmp_path):
    out = str(tmp_path / "q25")
    g.main(
        [
            "--variant",
            "grpo",
            *tiny.flags(),
            "--model",
            tiny.model_dir("tiny-2.5"),
            "--max-steps",
            "2",
            "--max-new-tokens",
            "16",
            "--length-bonus",
            "0.01",
            "--lr",
            "1e-3",
            "--out",
            out,
            "--log-completions-every",
            "0",
        ]
    )
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["kl"] > 0
    cfg = json.load(open(os.path.join(out, "checkpoint", "config.json")))
    assert cfg["model_type"] == "qwen2_5_vl"


def test_vision_r1_cold_start_then_two_ptst_stages(tmp_path):
    out = str(tmp_path / "v")
    g.main(
        [
            "--variant",
            "vision-r1",
            *tiny.flags(),
            "--sft-data",
            tiny.data_file(24),  # 3 SFT steps: 1 epoch x (24 rows // 8 per step)
            "--sft-epochs",
            "1",
            "--sft-batch",
            "8",
            "--data",
            tiny.data_file(32),
            "--ptst",
            "24:4:2,40:2:2",
            "--out",
            out,
            "--log-completions-every",
            "1",
        ]
    )
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["phase"] for r in rows] == ["sft"] * 3 + ["rl"] * 4
    rl = rows[3:]
    assert [r["stage"] for r in rl] == [1, 1, 2, 2] and "rewards/hard_format" in rl[0]
    # each step's cap and G, read from its completions: the same 4 prompts per step, G completions each,
    # the longest as long as the stage's cap (the tiny model seldom stops before it) and none longer
    for step, (cap, G) in enumerate([(24, 4), (24, 4), (40, 2), (40, 2)], 1):
        samples = [json.loads(x) for x in open(os.path.join(out, "trajectories", f"step_{step:06d}.jsonl"))]
        assert len(samples) == 4 * G and len({s["question"] for s in samples}) == 4
        assert max(s["tokens"] for s in samples) == cap, (step, [s["tokens"] for s in samples])
