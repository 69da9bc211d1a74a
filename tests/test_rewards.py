"""R1, R2, R3 and the R7 metric on written-out completions, hostile ones included."""

import random
import re
import time

import pytest

import rewards as R

MC = {"answer": "left", "choices": ["left", "right"]}  # CV-Bench style: (A) left (B) right
COUNT = {"answer": "3", "choices": ["5", "3", "0", "1"]}  # (B) is right
SAT = {"answer": "the red chair", "choices": None}


@pytest.mark.parametrize(
    "text,ex,expected",
    [
        ("<think>it is on the left</think><answer>(A)</answer>", MC, 1.0),
        ("<think>x</think><answer>A</answer>", MC, 1.0),
        ("<think>x</think><answer>A.</answer>", MC, 1.0),
        ("<think>x</think><answer> left </answer>", MC, 1.0),
        ("<think>x</think><answer>(A) left</answer>", MC, 1.0),
        ("<think>x</think><answer>Left.</answer>", MC, 1.0),
        ("<think>x</think><answer>(B)</answer>", MC, 0.0),
        ("<think>x</think><answer>(A) right</answer>", MC, 0.0),  # letter and text disagree
        ("<think>x</think><answer>C</answer>", MC, 0.0),  # no such option
        ("<think>x</think><answer>B</answer>", COUNT, 1.0),
        ("<think>x</think><answer>three</answer>", COUNT, 1.0),
        ("<think>x</think><answer>3.0</answer>", COUNT, 1.0),
        ("<think>x</think><answer>$\\boxed{3}$</answer>", COUNT, 1.0),
        ("<think>x</think><answer>4</answer>", COUNT, 0.0),
        ("<think>the answer is left</think>", MC, 0.0),  # no answer tag: nothing to credit
        ("<think>3 3 3</think><answer>5</answer>", COUNT, 0.0),  # stray numbers in reasoning don't count
        ("<answer>(B)</answer> then <answer>(A)</answer>", MC, 1.0),  # the last answer tag counts
        ("<answer>(A)</answer> then <answer>(B)</answer>", MC, 0.0),
        ("<answer>The red chair</answer>", SAT, 1.0),
        ("<answer>A</answer>", SAT, 0.0),  # no lettered choices to map to
        ("<answer>the red chair.</answer>", SAT, 1.0),
    ],
)
def test_r1_accuracy(text, ex, expected):
    assert R.accuracy(text, ex) == expected


@pytest.mark.parametrize(
    "a,b,equal",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("1/2", "0.5", True),
        ("\\dfrac{3}{4}", "0.75", True),
        ("\\sqrt{4}", "2", True),
        ("2\\sqrt{3}", "\\sqrt{12}", True),
        ("$7$", "7", True),
        ("30°", "30", True),
        ("2", "3", False),
        ("1/0", "0", False),
        ("\\frac{1}{0}", "inf", False),
        ("__import__('os').system('echo hi')", "0", False),
        ("9**9**9**9", "0", False),
        ("2^{1000000}", "0", False),
        ("\\sqrt{-1}", "0", False),
        # whitespace between digits is not a number: "1 2" is neither 12 nor 1*2
        ("1 2", "12", False),
        ("1 2", "2", False),
        ("1. 5", "1.5", False),
        ("2 3/4", "5.75", False),  # a mixed number is not read as 23/4
        # "1 000": a thousands separator or two numbers? Not a number, as "1,000" is not
        ("1 000", "1000", False),
        ("1,000", "1000", False),
        # spaces next to an operator, a unit or a command stay fine
        ("12 cm", "12", True),
        ("3 / 4", "0.75", True),
        ("- 3", "-3", True),
        ("2 \\sqrt{ 4 }", "4", True),
        ("\\frac{1}{2}", "1/2", True),
    ],
)
def test_r1_number_equality(a, b, equal):
    assert R.answers_equal(a, b) is equal


def test_numbers_with_spaces_between_digits_are_not_numbers():
    assert [R.parse_number(s) for s in ("12", "1 2", "1 000", "3 / 4", "12 cm")] == [
        12.0,
        None,
        None,
        0.75,
        12.0,
    ]
    assert R.accuracy("<think>x</think><answer>1 2</answer>", {"answer": "12"}) == 0.0
    assert R.accuracy("<think>x</think><answer>12 cm</answer>", {"answer": "12"}) == 1.0


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>reasoning</think><answer>A</answer>", 1.0),
        ("<think>reasoning</think>\n\n<answer>A</answer>\n", 1.0),
        ("<think>\nmulti\nline\n</think> <answer>\nA\n</answer>", 1.0),
        ("<think>reasoning</think><answer>A</answer> and more", 0.0),  # text after </answer>
        ("<think>reasoning</think>junk<answer>A</answer>", 0.0),  # text between the blocks
        ("<answer>A</answer>", 0.0),  # no think
        ("<think>reasoning</think>", 0.0),  # no answer
        (" <think>r</think><answer>A</answer>", 0.0),  # must start with <think>
        ("<think>a</think>x</think><answer>b</answer>", 1.0),  # as re.fullmatch: .*? may span
        ("", 0.0),
    ],
)
def test_r2_format(text, expected):
    assert R.think_answer_format(text) == expected


def test_r2_agrees_with_the_regex_on_random_tag_soup():
    pattern = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.S)
    rng = random.Random(0)
    parts = ["<think>", "</think>", "<answer>", "</answer>", " ", "x", "\n"]
    for _ in range(5000):
        t = "".join(rng.choice(parts) for _ in range(rng.randint(0, 8)))
        assert R.think_answer_format(t) == float(pattern.fullmatch(t.rstrip()) is not None), t


def test_r3_length_bonus():
    assert R.length_bonus("whatever", MC, 250) == pytest.approx(0.25)
    assert R.length_bonus("x", MC, 250, per_token=0.002) == pytest.approx(0.5)


def test_r7_reflection():
    assert R.reflects("The cube is left. Wait, let me re-check the image.")
    assert R.reflects("On second thought it is B")
    assert not R.reflects("The cube is on the left, so the answer is A.")
    assert not R.reflects("awaiting")  # whole words only


HOSTILE = [
    "<answer>" * 20000,
    "</answer>" * 20000,
    "<think>" + "</think>" * 20000 + "<answer>x",
    "<think>" + " " * 100000 + "</think>" + "\t" * 100000,
    "(" * 50000 + ")" * 50000,
    "<think>" + "</think> " * 50000 + "</answer>",
    "<think>" + ("</think>" + " " * 50) * 20000 + "</answer>",
    "<answer>" + "{" * 5000 + "}" * 5000 + "</answer>",
    "<answer>\\frac{" * 3000 + "</answer>",
    "<answer>__import__('os').system('touch /tmp/pwned')</answer>",
    "\x00\xff\ud800" * 1000,
    "<answer>" + "1" * 5000 + "</answer>",
    "<answer>" + "\\sqrt{" * 40 + "2" + "}" * 40 + "</answer>",
    "<answer>" + "$" * 10000 + "</answer>",
    "a" * 1_000_000,
]


@pytest.mark.parametrize("i", range(len(HOSTILE)))
def test_hostile_completions_never_raise_and_stay_fast(i):
    text = HOSTILE[i]
    t0 = time.perf_counter()
    for fn in R.REWARDS.values():
        assert fn(text, MC, 10) in (0.0, 1.0) or fn is R.length_bonus
    R.reflects(text)
    assert time.perf_counter() - t0 < 2.0  # linear scans; a backtracking regex would take minutes


def test_deep_nesting_does_not_recurse_out():
    assert R.parse_number("(" * 49 + "1" + ")" * 49) == 1.0
    assert R.parse_number("(" * 60 + "1" + ")" * 60) is None  # over the length cap: not parsed at all


def test_r1_never_credits_what_it_cannot_tell_apart():
    """Options that are letters themselves: only their text counts (else "B" would score as the letter of
    "A"); more than 26 options or no gold (a chat row) give 0, not an exception; integers compare exactly
    (a relative tolerance made 1000000 equal 1000001); two numbers side by side are not a product."""
    letters = {"answer": "A", "choices": ["B", "A"]}
    assert R.accuracy("<answer>A</answer>", letters) == 1.0
    assert R.accuracy("<answer>B</answer>", letters) == 0.0
    many = {"answer": "o26", "choices": [f"o{j}" for j in range(27)]}
    assert R.accuracy("<answer>x</answer>", many) == 0.0 and R.accuracy("<answer>o26</answer>", many) == 1.0
    assert R.accuracy("<answer>2</answer>", {"answer": None, "choices": None}) == 0.0
    assert not R.answers_equal("1000000", "1000001") and R.answers_equal("1000000", "1e6") is False
    assert R.answers_equal("1000000", "1000000.0")
    assert not R.answers_equal("1.2.3", "0.36") and R.answers_equal("2(3)", "6")


@pytest.mark.parametrize(
    "s,value",
    [
        ("1+2*3", 7.0),  # products bind tighter than sums
        ("2-3-4", -5.0),  # left to right
        ("8/4/2", 1.0),
        ("-\\sqrt{4}", -2.0),
        ("2(3)(4)", 24.0),  # a factor after a factor multiplies
        ("{1}+(2)", 3.0),
        ("eleven", 11.0),
        ("twenty", 20.0),
        ("50\\%", 50.0),
        ("(1}", None),  # a bracket closes as it opened
        ("{1)", None),
        ("(1", None),
        ("1)", None),
        ("1+", None),  # nothing may be left over or missing
        ("", None),
        ("()", None),
        ("\\frac{1}", None),
    ],
)
def test_parse_number_grammar(s, value):
    assert R.parse_number(s) == value


def test_r6_any_whitespace_around_and_between_the_blocks_only():
    ex = {"answer": "2"}
    assert R.hard_format("\u2003<think>a</think>\n\u00a0<answer>2</answer>\t", ex) == 1.0
    assert R.hard_format("<think>a</think>\u00a0.<answer>2</answer>", ex) == 0.0


@pytest.mark.parametrize("pred", ["B", "(B)", "B)", "B.", "b", " (b) "])
def test_a_gold_letter_without_choices_matches_its_own_letter(pred):
    """Mulberry-style rows keep their options inside the question: gold `B` or `(B)`, no choices column."""
    for gold in ("B", "(B)"):
        assert R.is_correct(pred, {"answer": gold}) and R.accuracy(
            f"<answer>{pred}</answer>", {"answer": gold}
        )
    for wrong in ("A", "(A)", "(A) and (B)", "AB", "B and C", ""):
        assert not R.is_correct(wrong, {"answer": "B"}), wrong


def test_an_integer_gold_is_matched_only_by_that_integer():
    assert not R.answers_equal("7.000005", "7") and not R.answers_equal("1000000.5", "1000000")
    assert not R.answers_equal("7", "7.000005")
    assert R.answers_equal("7.0", "7") and R.answers_equal("\\frac{14}{2}", "7")
    assert R.answers_equal("0.3333333", "\\frac{1}{3}")  # two non-integers: a relative 1e-6


def test_r6_needs_a_thinking_process():
    ex = {"answer": "2"}
    assert R.hard_format("<think>so 2</think><answer>2</answer>", ex) == 1.0
    for empty in ("<think></think><answer>2</answer>", "<think> \n </think><answer>2</answer>"):
        assert R.hard_format(empty, ex) == 0.0
