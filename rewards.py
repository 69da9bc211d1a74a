"""Rewards R1-R7: plain functions reward(text, ex, n_tokens=0) -> float of a completion, its data row `ex`
(gold `answer`, lettered `choices`, `key_steps`) and token count, summed by the trainer (G1). Model output is
hostile: nothing here raises on any string, runs it as code (no eval, no sympy) or scans it superlinearly."""

import math
import re

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen".split()
NUMBER_WORDS += "fifteen sixteen seventeen eighteen nineteen twenty".split()  # a word is its index: "three"
UNIT = re.compile(  # a unit after a number: 30°, 30^\circ, 50%, 12 cm, 4\text{m}^2
    r"(\^\{?\\circ\}?|°|\\%|%|(\\text\{|\\mathrm\{)?(degrees?|units?|[ckm]?m|in|ft)\}?(\^\{?[23]\}?)?)$"
)
TOKEN = re.compile(r"\\frac|\\sqrt|\d+\.?\d*|\.\d+|[-+*/(){}]|.")  # parse_number's; any other character: one
LETTER = re.compile(r"\(?([a-z])\)?[.:)]?")  # "a", "(a)", "a.", "a)"
LETTER_ANSWER = re.compile(r"\(?([a-z])(?:\)?[.:)]?|[.:)]\s*(.{1,200}))")  # a LETTER or "(a) left", "a. left"
FINAL = "### The final answer is:"  # P3's sections (R1-VL), "Let's think step by step" with a period or colon
SECTION = re.compile(
    r"### (?:(Image Description|Rationales|Step (\d{1,6})|The final answer is):|Let's think step by step[.:])"
)
ALPHA = 0.1  # R4's alpha, the weight of the share of key steps matched (R1-VL's value)
REFLECTION = re.compile(  # R7's words of self-reflection
    r"\b(?:wait|re-?check|re-?evaluate|reconsider|let me (?:check|verify|think again)|"
    r"on second thought|alternatively|double[- ]check)\b"
)


def last_tag(text, tag):
    """Contents of the last <tag>...</tag> (DOTALL), stripped; None if there is none."""
    end = text.rfind(f"</{tag}>")
    start = text.rfind(f"<{tag}>", 0, max(end, 0))
    return None if end < 0 or start < 0 else text[start + len(tag) + 2 : end].strip()


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
    """A float from a number, a number word or simple math (+ - * / ( ) { } \\frac \\sqrt), else None."""
    s = s.strip()
    s = str(NUMBER_WORDS.index(s)) if s in NUMBER_WORDS else s
    spaced = re.search(r"[\d.]\s+[\d.]", s)  # whitespace between digits: "1 2" is not 12, nor "1 000" 1000
    s = re.sub(r"\\[dt]frac", r"\\frac", s.replace(" ", "")).replace("\\cdot", "*").replace("\\times", "*")
    s = UNIT.sub("", s)
    if spaced or len(s) > 100:  # capped in length, so in recursion depth
        return None
    toks = ["end"] + TOKEN.findall(s)[::-1]  # a stack, next token last, on an "end" that no rule takes

    def expr():  # expr := term (('+'|'-') term)*
        v = term()
        while toks[-1] in ("+", "-"):
            v = v + term() if toks.pop() == "+" else v - term()
        return v

    def term():  # term := factor (('*'|'/'|implicit *) factor)*: "2\sqrt{3}" is 2*sqrt(3), "1.2.3" no number
        v = factor()
        while toks[-1] in ("*", "/", "(", "{", "\\sqrt", "\\frac"):
            op = toks.pop() if toks[-1] in ("*", "/") else "*"
            v = v * factor() if op == "*" else v / factor()
        return v

    def factor():  # factor := '-' factor | (expr) | {expr} | \frac factor factor | \sqrt factor | number
        t = toks.pop()
        if t in ("(", "{"):
            v = expr()
            if toks.pop() != {"(": ")", "{": "}"}[t]:  # "(1}" is no number
                raise ValueError(t)
            return v
        if t == "\\frac":
            return factor() / factor()
        if t in ("-", "\\sqrt"):  # -a; \sqrt{a} or \sqrt3
            return -factor() if t == "-" else math.sqrt(factor())
        return float(t)  # raises on anything that is not a number token

    try:
        v = expr()
        return v if toks == ["end"] and math.isfinite(v) else None
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def answers_equal(pred, gold):
    """Two numbers compare as numbers, anything else as text. An integer equals only that integer (7.000005 is
    not 7, 1000000 not 1000001); two other numbers may differ by a relative 1e-6."""
    p, g = normalize(pred), normalize(gold)
    x, y = parse_number(p), parse_number(g)
    if x is None or y is None:
        return p == g
    if x.is_integer() or y.is_integer():
        return x == y
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def is_correct(pred, ex):
    """R1's equality; with lettered choices (CV-Bench) the letter counts too, unless options are letters."""
    gold = ex.get("answer")
    if pred is None or gold is None:
        return False
    if answers_equal(pred, gold):
        return True
    choices = ex.get("choices") or []
    gold_letter = LETTER.fullmatch(normalize(gold))
    if gold_letter and not choices:  # a letter whose options are in the question (Mulberry): "B", "(B)", "B)"
        m = LETTER.fullmatch(normalize(pred))
        return bool(m) and m.group(1) == gold_letter.group(1)
    if gold not in choices or len(choices) > 26 or any(LETTER.fullmatch(normalize(c)) for c in choices):
        return False
    letter = "abcdefghijklmnopqrstuvwxyz"[choices.index(gold)]
    m = LETTER_ANSWER.fullmatch(normalize(pred))  # the letter, and the option's text if it follows
    return bool(m) and m.group(1) == letter and (m.group(2) is None or answers_equal(m.group(2), gold))


def accuracy(text, ex, n_tokens=0):
    """R1: r = 1 if the answer in the last <answer>...</answer> is the ground truth, else 0."""
    return float(is_correct(last_tag(text, "answer"), ex))  # VisualThinker-R1-Zero (arXiv 2503.05132)


def think_answer_format(text, ex=None, n_tokens=0):
    """R2: r = 1 if the text fully matches <think>.*?</think>\\s*<answer>.*?</answer> (DOTALL) up to trailing
    space, else 0 (VisualThinker-R1-Zero, arXiv 2503.05132); that language in linear, not quadratic, time."""
    t = text.rstrip()
    joined = re.search(r"</think>\s*<answer>", t[len("<think>") : len(t) - len("</answer>")])
    return float(t.startswith("<think>") and t.endswith("</answer>") and joined is not None)


def length_bonus(text, ex=None, n_tokens=0, per_token=0.001):
    """R3: r = 0.001 * |o|, per completion token, uncapped (VisualThinker-R1-Zero §5.3 ablation: no help)."""
    return per_token * n_tokens


def step_answer(text):
    """The answer of a P3 completion: the first line after the last '### The final answer is:'."""
    lines = text.rpartition(FINAL)[2].strip().splitlines() if FINAL in text else []
    return lines[0] if lines else None


def occurs(form, steps):
    """Does a form (lower case, whitespace runs one space) stand in the steps at word boundaries?"""
    f = re.sub(r"\s+", " ", form.lower()).strip()
    left = r"(?<!\w)" if re.match(r"\w", f[:1]) else ""  # 'is 2' is in 'this is 2', not in 'this 2'
    right = r"(?!\w)" if re.match(r"\w", f[-1:]) else ""  # punctuation is a boundary of its own
    return bool(f) and re.search(left + re.escape(f) + right, steps) is not None


def step_accuracy(text, ex, n_tokens=0):
    """R4 StepRAR: the answer's correctness plus ALPHA times the share of key steps found in the steps."""
    pred = step_answer(text)
    if pred is None:
        return 0.0
    parts = SECTION.split(text.rpartition(FINAL)[0])  # [before, name, step number, body, name, ...]
    # the '### Step N:' bodies (no description, rationale, answer), one a line, whitespace runs one space
    steps = "\n".join(re.sub(r"\s+", " ", b.lower()) for n, b in zip(parts[2::3], parts[3::3]) if n)
    keys = ex.get("key_steps") or []  # each key step a list of equivalent forms
    k = sum(any(occurs(f, steps) for f in forms) for forms in keys) / max(len(keys), 1)  # k = |v_match| / |v|
    # StepRAR (R1-VL, arXiv 2503.12937): r_auc = 1 + alpha*k (right answer), alpha*k (wrong), 0 (no answer)
    return float(is_correct(pred, ex)) + ALPHA * k


def step_validity(text, ex=None, n_tokens=0):
    """R5 StepRVR: 1 iff the P3 sections are all there, in order, else 0."""
    # the headers in order: I(mage Description), R(ationales), S1, S2, ..., T(he final answer), L(et's think)
    kinds = [f"S{m.group(2)}" if m.group(2) else (m.group(1) or "L")[0] for m in SECTION.finditer(text)]
    if kinds[2:3] == ["L"]:  # '### Let's think step by step.' may stand between the rationale and step 1
        del kinds[2]
    n = len(kinds) - 3  # the steps
    # StepRVR (R1-VL, arXiv 2503.12937): r_val = 1 iff complete (I, R, >= 1 S, T) and logical (in order)
    return float(n >= 1 and kinds == ["I", "R"] + [f"S{j}" for j in range(1, n + 1)] + ["T"])


def hard_format(text, ex, n_tokens=0):
    """R6 HFRRF: 1 iff the answer is right, in R2's format with one non-empty <think> and one <answer>."""
    t = text.strip()
    one_each = all(t.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))
    thought = one_each and bool(last_tag(t, "think"))  # HFRRF asks for a thinking process: not an empty one
    # HFRRF (Vision-R1, arXiv 2503.06749): r = 1 iff the format is right and the answer is right, else 0
    return float(thought and think_answer_format(t) and is_correct(last_tag(t, "answer"), ex))


REWARDS = dict(accuracy=accuracy, format=think_answer_format, length=length_bonus)  # VisualThinker-R1-Zero
REWARDS.update(step_accuracy=step_accuracy, step_validity=step_validity, hard_format=hard_format)  # R4-R6


def reflects(text):
    """R7, a metric: self-reflection, the 'aha moment' VisualThinker-R1-Zero (arXiv 2503.05132) tracks."""
    return REFLECTION.search(text.lower()) is not None
