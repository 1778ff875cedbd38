"""Symbolic answer checking with Hugging Face's Math-Verify, the verifier of open-r1 and TRL.

Plain numbers never come here: `answers_match` compares them exactly (fractions) in microseconds,
while a Math-Verify call costs milliseconds (it parses LaTeX with ANTLR and compares with SymPy;
about 3 ms for "18" and 10 ms for "\\frac{1}{2}" on one CPU core), which would dominate an RL
step that scores thousands of completions. Only answers that look like mathematics beyond a
number (`\\frac{1}{2}`, `\\sqrt{2}`, `2^{10}`, `3\\pi`) go to Math-Verify.

Math-Verify guards each parse and comparison with `signal.alarm`, which works in the main thread
only; elsewhere (a server's worker thread, say) we call it without its timeout, and the answer
length cap (`MAX_SYMBOLIC_CHARS`) is what bounds the work.

The package is imported on first use, so importing nanoseek stays cheap; it is a dependency of
nanoseek (pyproject.toml), and without it a symbolic answer simply does not match.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

MAX_SYMBOLIC_CHARS = 300  # a longer "answer" is a degenerate completion, not worth SymPy's time
TIMEOUT_S = 5  # Math-Verify's own default, per parse and per comparison
# Marks of mathematics beyond a plain number: LaTeX commands, powers, braces, roots, pi, tuples
# and intervals. Not "/": "1/2" is a plain fraction, and "-5</answer>" is no ratio.
_SYMBOLIC_MARKS = ("\\", "^", "{", "sqrt", "pi", "(", "[")
_TAGS = ("<answer", "</answer", "<think", "</think")  # leftovers of a malformed completion


def looks_symbolic(text: str) -> bool:
    """Does `text` hold mathematics that a plain-number comparison cannot judge?"""
    return any(mark in text for mark in _SYMBOLIC_MARKS)


@functools.lru_cache(maxsize=1)
def _math_verify() -> Any:
    """The `math_verify` module, or None when it is not installed (imported on first use)."""
    try:
        import math_verify  # heavy (sympy): loaded on the first symbolic answer
    except ImportError:
        return None
    return math_verify


def _as_latex(text: str) -> str:
    """Wrap a bare answer in `$...$` so Math-Verify reads it as LaTeX rather than hunting for an
    expression inside it; text that already carries math delimiters or a box is left alone."""
    if "$" in text or "\\(" in text or "\\[" in text or "\\boxed" in text:
        return text
    return f"${text}$"


@functools.lru_cache(maxsize=4096)
def _parse(text: str, timeout: int | None) -> tuple[Any, ...]:
    # gold answers repeat across a GRPO group (and across epochs), so their parses are cached
    mv = _math_verify()
    return tuple(mv.parse(_as_latex(text), parsing_timeout=timeout))


def symbolic_match(expected: str, given: str) -> bool:
    """Math-Verify's judgement of `given` against the gold `expected`; never raises."""
    if len(expected) > MAX_SYMBOLIC_CHARS or len(given) > MAX_SYMBOLIC_CHARS:
        return False
    if any(tag in given for tag in _TAGS):
        return False
    mv = _math_verify()
    if mv is None:
        return False
    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold, pred = _parse(expected, timeout), _parse(given, timeout)
        if not gold or not pred:
            return False
        return bool(mv.verify(list(gold), list(pred), timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - untrusted model output must never stop a run
        return False
