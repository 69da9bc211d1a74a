"""Rewards (R1-R7): plain functions reward(text, ex, n_tokens) -> float of the completion (with the <think>
a P1 prompt opened put back), the data row `ex` (gold `answer`, lettered `choices` if any) and the
completion's token count; G1 sums them. Model output is hostile input: nothing here raises on any string
or runs it as code (no eval, no sympy: parse_number), and every scan of it is linear in its length.
"""

import math
import re


# --------------------------------------------------------------------------- the answer and its equality (R1)
def last_tag(text, tag):
    """Contents of the last <tag>...</tag> (DOTALL), stripped; None if there is none."""
    end = text.rfind(f"</{tag}>")
    start = text.rfind(f"<{tag}>", 0, max(end, 0))
    return None if end < 0 or start < 0 else text[start + len(tag) + 2 : end].strip()


NUMBER_WORDS = (  # read as numbers, their index: "three" for small counts
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
UNIT = re.compile(
    r"(\^\{?\\circ\}?|°|\\%|%|(\\text\{|\\mathrm\{)?(degrees?|units?|[ckm]?m|in|ft)\}?(\^\{?[23]\}?)?)$"
)


def normalize(s):
    """Strip an answer's wrappers ($..$, \\boxed{}, \\text{}, 'answer:'), its case and outer punctuation."""
    s = s.strip()[:1000].lower()  # an answer, not an essay: bounded work
    for _ in range(3):  # a few layers of wrapping, no more: bounded work on hostile nesting
        s = re.sub(r"^(?:the )?(?:final )?answer(?: is)?\s*[:：]?\s*", "", s).strip()
        s = s.strip("$ ").replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
        m = re.fullmatch(r"\\(?:boxed|text|mathrm|textbf)\{(.*)\}", s, re.S)
        s = m.group(1).strip() if m else s
    return re.sub(r"\s+", " ", s).strip(" .,;:!?\"'`")


def parse_number(s):
    """A float from a number, a number word or simple math, or None: recursive descent over a whitelist of
    tokens (digits . + - * / ( ) { } \\frac \\sqrt), a trailing unit dropped; length-, so depth-capped."""
    s = s.strip()
    if s in NUMBER_WORDS:
        return float(NUMBER_WORDS.index(s))
    if re.search(r"[\d.]\s+[\d.]", s):  # whitespace between digits: "1 2" is not 12, nor "1 000" a thousand
        return None
    s = re.sub(r"\\[dt]frac", r"\\frac", s.replace(" ", "")).replace("\\cdot", "*").replace("\\times", "*")
    s = UNIT.sub("", s)  # 30°, 30^\circ, 50%, 12 cm, 4\text{m}^2: the number
    if not s or len(s) > 100:
        return None
    toks = re.findall(r"\\frac|\\sqrt|\d+\.?\d*|\.\d+|[-+*/(){}]|.", s)[::-1]  # a stack: next token last

    def peek():
        return toks[-1] if toks else None

    def take(expected=None):
        if not toks or expected not in (None, toks[-1]):
            raise ValueError(expected)
        return toks.pop()

    def expr():  # expr := term (('+'|'-') term)*
        v = term()
        while peek() in ("+", "-"):
            v = v + term() if take() == "+" else v - term()
        return v

    def term():  # term := factor (('*'|'/'|implicit) factor)*: "2\sqrt{3}" is 2*sqrt(3), "1.2.3" no number
        v = factor()
        while peek() in ("*", "/", "(", "{", "\\sqrt", "\\frac"):
            op = take() if peek() in ("*", "/") else "*"
            v = v * factor() if op == "*" else v / factor()
        return v

    def factor():
        t = take()
        if t == "-":
            return -factor()
        if t in ("(", "{"):
            v = expr()
            take(")" if t == "(" else "}")
            return v
        if t == "\\frac":  # \frac{a}{b}: two braced factors
            return factor() / factor()
        if t == "\\sqrt":  # \sqrt{a} or \sqrt3
            return math.sqrt(factor())
        return float(t)  # raises on anything that is not a number token

    try:
        v = expr()
        return v if not toks and math.isfinite(v) else None
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def answers_equal(pred, gold):
    """Normalised strings equal, or both parse to the same number."""
    p, g = normalize(pred), normalize(gold)
    if p == g:
        return True
    x, y = parse_number(p), parse_number(g)
    if x is None or y is None:
        return False
    if x.is_integer() and y.is_integer():  # counts, years: 1000000 is not 1000001, whatever the tolerance
        return x == y
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


LETTER = re.compile(r"\(?([a-z])\)?[.:)]?")  # "a", "(a)", "a.", "a)"
LETTER_AND_TEXT = re.compile(r"\(?([a-z])[.:)]\s*(.{1,200})")  # "(a) left", "a. left"


def is_correct(pred, ex):
    """R1 equality. With lettered choices (CV-Bench style) the letter or the option's text counts."""
    if pred is None or ex.get("answer") is None:
        return False
    if answers_equal(pred, ex["answer"]):
        return True
    choices = ex.get("choices") or []
    if ex["answer"] not in choices or len(choices) > 26:
        return False
    if any(LETTER.fullmatch(normalize(c)) for c in choices):  # options that are letters: their text alone
        return False
    gold_letter = "abcdefghijklmnopqrstuvwxyz"[choices.index(ex["answer"])]
    p = normalize(pred)
    if m := LETTER.fullmatch(p):
        return m.group(1) == gold_letter
    m = LETTER_AND_TEXT.fullmatch(p)
    return bool(m) and m.group(1) == gold_letter and answers_equal(m.group(2), ex["answer"])


# --------------------------------------------------------------------------- the rewards
def accuracy(text, ex, n_tokens=0):
    """R1: 1 if the answer inside the last <answer>...</answer> equals the ground truth, else 0."""
    return float(is_correct(last_tag(text, "answer"), ex))


def think_answer_format(text, ex=None, n_tokens=0):
    """R2: 1 if text fully matches <think>.*?</think>\\s*<answer>.*?</answer> (DOTALL) + trailing space.
    The same language as re.fullmatch of it (quadratic on hostile text), in linear time: the text starts
    with <think>, ends with </answer>, and between them stands '</think>', optional space, '<answer>'."""
    t = text.rstrip()
    return float(
        t.startswith("<think>")
        and t.endswith("</answer>")
        and re.search(r"</think>\s*<answer>", t[len("<think>") : len(t) - len("</answer>")]) is not None
    )


def length_bonus(text, ex=None, n_tokens=0, per_token=0.001):
    """R3 (VisualThinker §5.3 ablation, shown not to help): +0.001 per completion token, uncapped."""
    return per_token * n_tokens


# --------------------------------------------------------------------------- StepGRPO (R1-VL)
FINAL = "### The final answer is:"
SECTION = re.compile(  # P3's headers; "### Let's think step by step." as P3 writes it, or with a colon
    r"### (?:(Image Description|Rationales|Step (\d{1,6})|The final answer is):|Let's think step by step[.:])"
)


def step_answer(text):
    """The answer of a P3 completion: the first line after the last '### The final answer is:'."""
    lines = text.rpartition(FINAL)[2].strip().splitlines() if FINAL in text else []
    return lines[0] if lines else None


def occurs(form, steps):
    """Does the form, compared as the steps are, stand in them at word boundaries (R4)? A word-character
    edge of it may not continue a word ('is 2' is in 'this is 2', not 'this 2'); punctuation is its own."""
    f = re.sub(r"\s+", " ", form.lower()).strip()
    left = r"(?<!\w)" if re.match(r"\w", f[:1]) else ""
    right = r"(?!\w)" if re.match(r"\w", f[-1:]) else ""
    return bool(f) and re.search(left + re.escape(f) + right, steps) is not None


def step_accuracy(text, ex, n_tokens=0, alpha=0.1):
    """R4 StepRAR: k = |key steps matched| / |key steps|, a key step matching if one of its forms occurs in a
    '### Step N:' body (not the description, rationale or answer). r = 1 + alpha*k if the final answer is
    right, alpha*k if an answer is given but wrong, 0 if there is no answer (the paper's three cases)."""
    pred = step_answer(text)
    if pred is None:
        return 0.0
    parts = SECTION.split(text.rpartition(FINAL)[0])  # [before, name, step number, body, name, ...]
    # the bodies of the steps, one a line: whitespace runs in a body are one space, so no form spans two
    steps = "\n".join(re.sub(r"\s+", " ", b.lower()) for n, b in zip(parts[2::3], parts[3::3]) if n)
    keys = ex.get("key_steps") or []
    k = sum(any(occurs(f, steps) for f in forms) for forms in keys) / max(len(keys), 1)
    return float(is_correct(pred, ex)) + alpha * k


def step_validity(text, ex=None, n_tokens=0):
    """R5 StepRVR: 1 iff complete (description, rationale, >= 1 step, final answer all present) and logical
    (in that order, steps numbered 1..n consecutively, the final answer after the last step), else 0."""
    # the headers in order: I(mage Description), R(ationales), S1, S2, ..., T(he final answer), L(et's think)
    kinds = [f"S{m.group(2)}" if m.group(2) else (m.group(1) or "L")[0] for m in SECTION.finditer(text)]
    if kinds[2:3] == ["L"]:  # '### Let's think step by step.' may stand between the rationale and step 1
        del kinds[2]
    n = len(kinds) - 3  # the steps
    return float(n >= 1 and kinds == ["I", "R"] + [f"S{j}" for j in range(1, n + 1)] + ["T"])


# --------------------------------------------------------------------------- Vision-R1
def hard_format(text, ex, n_tokens=0):
    """R6 HFRRF: 1 iff the completion is exactly one <think>...</think> then one <answer>...</answer> with
    nothing but whitespace outside them, AND the answer is right (R1's equality); else 0."""
    t = text.strip()
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if not (t.startswith("<think>") and t.endswith("</answer>")) or any(t.count(tag) != 1 for tag in tags):
        return 0.0
    after_think = t.partition("</think>")[2]  # must be space, then the <answer>
    return float(after_think.lstrip().startswith("<answer>") and is_correct(last_tag(t, "answer"), ex))


REWARDS = {
    "accuracy": accuracy,
    "format": think_answer_format,
    "length": length_bonus,
    "step_accuracy": step_accuracy,
    "step_validity": step_validity,
    "hard_format": hard_format,
}

# --------------------------------------------------------------------------- R7, a metric
REFLECTION = re.compile(
    r"\b(?:wait|re-?check|re-?evaluate|reconsider|let me (?:check|verify|think again)|"
    r"on second thought|alternatively|double[- ]check)\b"
)


def reflects(text):
    """R7: does the completion contain self-reflection? (the 'aha moment' signal; a metric only)."""
    return REFLECTION.search(text.lower()) is not None
