"""Pull the final answer out of a completion, and compare answers.

R1-Zero rewards check only the final answer, found by rule [R1 §2.2.2]: the content of the last
`<answer>...</answer>` (our template), else of the last `\\boxed{...}` (the math convention), else,
when asked for, the last number in the text. Everything here takes untrusted model output, so it
never raises on odd input and runs in linear time (no regex that can backtrack badly).
"""

from __future__ import annotations

import re
from fractions import Fraction

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_NUMBER_CHARS = 100  # a longer "number" is a degenerate completion, not an answer

# "1,000" style grouping must have exactly three digits per group, so "1,00" is not a number
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\.?")
_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
# the minus sign binds to a number only when it cannot be a binary minus ("5-3" ends in 3, not -3)
_BOXED = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")
_LAST_NUMBER = re.compile(r"(?<![\w.)])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


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
    return None if last is None else last.group(0).replace(",", "")


def extract_answer(text: str, *, fallback: str = "none") -> str | None:
    """The final answer of a completion.

    Order: last `<answer>` tag (and a `\\boxed{}` inside it, if any), else last `\\boxed{}`, else
    `fallback`: "none" -> None (strict, for rewards), "text" -> the whole text stripped (so a bare
    answer string passes through), "last_number" -> the last number in the text.
    """
    if not isinstance(text, str):
        return None
    answer = extract_tag(text)
    if answer is not None:
        boxed = extract_boxed(answer)
        return answer if boxed is None else boxed
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
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
    """Exact value of a plain number answer, or None.

    Accepts an optional sign, leading zeros ("007" is 7), correct thousands commas ("1,000"),
    decimals ("2.50"), a trailing full stop ("42."), a simple fraction ("-3/4") and the Unicode
    minus sign. Rejects everything else ("1,00", "1e3", "0x10", "42 apples", "5 + 3"), so a
    number answer is compared by value, never by evaluating text.
    """
    if not isinstance(text, str) or len(text) > MAX_NUMBER_CHARS:
        return None
    s = text.strip().replace("\u2212", "-")
    if _NUMBER.fullmatch(s):
        return Fraction(s.rstrip(".").replace(",", ""))
    m = _FRACTION.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


def answers_match(expected: str, given: str | None) -> bool:
    """Equal by value when both are numbers, else equal as whitespace-normalised, casefolded text."""
    if given is None or not isinstance(given, str):
        return False
    a, b = parse_number(expected), parse_number(given)
    if a is not None and b is not None:
        return a == b
    if a is not None or b is not None:
        return False
    return " ".join(expected.split()).casefold() == " ".join(given.split()).casefold()
