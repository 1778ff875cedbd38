"""Pull the final answer out of a completion, and compare answers.

R1-Zero rewards check only the final answer, found by rule [R1 §2.2.2]: the content of the last
`<answer>...</answer>` (our template), else of the last `\\boxed{...}` (the math convention), else
the text after the last `#### ` (GSM8K's convention [Cobbe et al. 2021]), else, when asked for,
the last number in the text. Everything here takes untrusted model output, so it never raises on
odd input and runs in linear time (no regex that can backtrack badly).

Answers are compared as the field compares them (GSM8K and MATH graders, Math-Verify): a number is
a number whatever its dress, so `$1,080`, `1 080`, `1080.`, `\\$1080.00` and `1080%` all equal
1080; mathematics beyond a plain number (`\\frac{1}{2}`, `\\sqrt{2}`) goes to Math-Verify
(`nanoseek.tasks.symbolic`). Evaluation and the RL accuracy reward both call `answers_match`
through `Task.verify_completion`, so a model is scored by one rule everywhere.
"""

from __future__ import annotations

import re
from fractions import Fraction

from nanoseek.tasks.symbolic import looks_symbolic, symbolic_match

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_NUMBER_CHARS = 100  # a longer "number" is a degenerate completion, not an answer

GSM8K_MARK = "####"

# Thousands groups have exactly three digits each, so "1,08" and "1,0800" are not numbers. The
# separator is a comma, or a space: plain, no-break (U+00A0), thin (U+2009) or narrow no-break
# (U+202F), the SI/ISO 80000 style; one number uses one separator.
_GROUP_SPACES = " \u00a0\u2009\u202f"
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?:[ \u00a0\u2009\u202f]\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# sign, currency (a LaTeX-escaped "\$" too), sign, digits, then a percent sign or the closing "$"
# of inline math ("$18$"); "-$5" and "$-5" are both minus five
_NUMBER = re.compile(
    rf"(?P<s1>[+-]?)\s*(?:\\?\$|[€£¥₹])?\s*(?P<s2>[+-]?)(?P<digits>{_DIGITS})\s*(?:\\?%|\\?\$)?"
)
_TRAILING = ".,;:!?"  # sentence punctuation after an answer ("18." or "18!") is not part of it
_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_BOXED = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")
# The minus sign binds to a number only when it cannot be a binary minus ("5-3" ends in 3, not
# -3). In running text only no-break and thin spaces group digits: "pages 12 345" may be two
# numbers.
_LAST_NUMBER = re.compile(
    r"(?<![\w.)])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d{1,3}(?:[\u00a0\u2009\u202f]\d{3})+(?!\d)|\d+)"
    r"(?:\.\d+)?"
)


def extract_tag(
    text: str, open_tag: str = ANSWER_OPEN, close_tag: str = ANSWER_CLOSE
) -> str | None:
    """Content of the last `open_tag ... close_tag` pair, stripped; None if there is none.

    The last close tag is paired with the nearest open tag before it, and the answer runs to the
    first close tag after that, so stray extra tags (`<answer><answer>5</answer>`,
    `<answer>5</answer></answer>`) still give "5". An unclosed tag (a truncated completion) gives
    None: a cut-off answer earns no reward.
    """
    if not isinstance(text, str):
        return None
    end = text.rfind(close_tag)
    if end < 0:
        return None
    start = text.rfind(open_tag, 0, end)
    if start < 0:
        return None
    start += len(open_tag)
    # the first close after that open ends the answer: "<answer>5</answer></answer>" gives "5"
    return text[start : text.find(close_tag, start)].strip()


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces matched (`\\boxed{\\frac{1}{2}}`); None if none.

    One pass pairs every brace with a stack, so even a megabyte of unbalanced `\\boxed{` costs
    linear time; an unbalanced last box falls back to the last balanced one.
    """
    if not isinstance(text, str):
        return None
    opens = [m.end() - 1 for m in _BOXED.finditer(text)]  # index of each box's "{"
    if not opens:
        return None
    close_of: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text, opens[0]):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close_of[stack.pop()] = m.start()
    for i in reversed(opens):
        if i in close_of:
            return text[i + 1 : close_of[i]].strip()
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in `text` with thousands commas removed ("1,000" -> "1000"); None if none."""
    if not isinstance(text, str):
        return None
    last = None
    for last in _LAST_NUMBER.finditer(text):  # noqa: B007 - we want the final match
        pass
    return None if last is None else _strip_groups(last.group(0))


def _strip_groups(digits: str) -> str:
    for sep in "," + _GROUP_SPACES:
        digits = digits.replace(sep, "")
    return digits


def extract_gsm8k(text: str) -> str | None:
    """The rest of the line after the last `####` (GSM8K's answer mark), stripped; None if none."""
    if not isinstance(text, str):
        return None
    start = text.rfind(GSM8K_MARK)
    if start < 0:
        return None
    rest = text[start + len(GSM8K_MARK) :].lstrip(" \t")
    line = rest.split("\n", 1)[0].strip()
    return line or None


def final_answer(text: str) -> str:
    """An answer with its wrapping removed: the last `\\boxed{}` in it, else the text after its
    last `####`, else the text itself, stripped. Applied to gold answers too, so a task file whose
    answers are GSM8K worked solutions ("... #### 72") or boxed is compared on the final value."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    marked = extract_gsm8k(text)
    return text.strip() if marked is None else marked


def extract_answer(text: str, *, fallback: str = "none") -> str | None:
    """The final answer of a completion.

    Order: last `<answer>` tag (and a `\\boxed{}` or `####` inside it, if any), else last
    `\\boxed{}`, else the text after the last `####` on its line, else `fallback`: "none" -> None (strict, for rewards), "text" -> the whole text stripped (so a bare
    answer string passes through), "last_number" -> the last number in the text.
    """
    if not isinstance(text, str):
        return None
    answer = extract_tag(text)
    if answer is not None:
        return final_answer(answer)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    marked = extract_gsm8k(text)
    if marked is not None:
        return marked
    if fallback == "none":
        return None
    if fallback == "text":
        return text.strip()
    if fallback == "last_number":
        return extract_last_number(text)
    raise ValueError(f"fallback must be 'none', 'text' or 'last_number', got {fallback!r}")


def check_format(completion: str, *, prefilled: bool = True) -> bool:
    """Does the completion follow the R1-Zero format `... </think> <answer> ... </answer>`?

    With `prefilled=True` the prompt already ended in `<think>`, so the completion must not open
    another one. Whitespace between the parts is free; nothing may follow `</answer>`. This is the
    check behind a format reward ("format reward always 0" usually means the
    template and this check disagree about the prefill).
    """
    if not isinstance(completion, str):
        return False
    text = completion.strip()
    if not prefilled:
        if not text.startswith(THINK_OPEN):
            return False
        text = text[len(THINK_OPEN) :]
    if THINK_OPEN in text or text.count(THINK_CLOSE) != 1:
        return False
    _, rest = text.split(THINK_CLOSE)
    rest = rest.strip()
    if not (rest.startswith(ANSWER_OPEN) and rest.endswith(ANSWER_CLOSE)):
        return False
    inner = rest[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)]
    return ANSWER_OPEN not in inner and ANSWER_CLOSE not in inner and inner.strip() != ""


def parse_number(text: str) -> Fraction | None:
    """Exact value of a number answer, or None.

    Accepts what graders of GSM8K-style answers accept: an optional sign, leading zeros ("007"
    is 7), thousands separators in three-digit groups ("1,000", "1 000", "1\u2009000"), decimals
    ("2.50", ".5"), a currency sign ("$18", "\\$18.00", "€5", "-$5"), a percent sign ("5%" is 5,
    as GSM8K writes percentages), the "$...$" of inline math, trailing sentence punctuation
    ("42."), a simple fraction ("-3/4") and the Unicode minus sign. Rejects everything else
    ("1,08", "1e3", "0x10", "42 apples", "5 + 3"), so a number answer is compared by value, never
    by evaluating text.
    """
    if not isinstance(text, str) or len(text) > MAX_NUMBER_CHARS:
        return None
    s = text.strip().replace("\u2212", "-").rstrip(_TRAILING).rstrip()
    m = _NUMBER.fullmatch(s)
    if m and not (m.group("s1") and m.group("s2")):
        digits = (m.group("s1") or m.group("s2")) + _strip_groups(m.group("digits"))
        # int() first: parsing a Fraction from a string is several times slower, and most answers
        # are integers
        return Fraction(int(digits)) if "." not in digits else Fraction(digits)
    m = _FRACTION.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


def answers_match(expected: str, given: str | None) -> bool:
    """Is `given` the gold answer `expected`?

    Both sides lose their wrapping first (`final_answer`: a box, a `####` mark). Then: equal by
    exact value when both are numbers (`parse_number`); when either is mathematics beyond a plain
    number, equal up to spacing or by Math-Verify's judgement (`\\frac{1}{2}` against 0.5); a
    number against plain text ("5 apples") is wrong; two texts are compared
    whitespace-normalised and casefolded.
    """
    if given is None or not isinstance(given, str) or not isinstance(expected, str):
        return False
    expected, given = final_answer(expected), final_answer(given)
    a, b = parse_number(expected), parse_number(given)
    if a is not None and b is not None:
        return a == b
    if looks_symbolic(expected) or looks_symbolic(given):
        # LaTeX is case-sensitive (\\Pi is not \\pi): only the spacing may differ
        return expected.split() == given.split() or symbolic_match(expected, given)
    if a is not None or b is not None:
        return False
    return " ".join(expected.split()).casefold() == " ".join(given.split()).casefold()
