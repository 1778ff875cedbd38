import time
from fractions import Fraction

import pytest

from nanoseek.tasks.safe_eval import (
    SafeEvalError,
    integer_literals,
    parse_safe,
    safe_eval,
    try_eval,
)


@pytest.mark.parametrize(
    "expr, value",
    [
        ("1 + 2", 3),
        ("2 * (3 + 4)", 14),
        ("10 - 2 - 3", 5),  # left-associative
        ("8 / 3 * 3", 8),  # exact: no float rounding
        ("(75 - 3) / 8 * 11", 99),
        ("-5 + 2", -3),
        ("--5", 5),
        ("+7", 7),
        ("  ( 1 )  ", 1),
        ("1 / 3", Fraction(1, 3)),
        ("0.1 + 0.2", Fraction(3, 10)),  # decimal literals are read exactly
    ],
)
def test_values(expr, value):
    assert safe_eval(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo hi')",
        "().__class__.__bases__[0].__subclasses__()",
        "2**9999999",
        "9**9**9",
        "7 // 2",
        "7 % 2",
        "1 << 1000000",
        "abs(-1)",
        "x + 1",
        "[1, 2]",
        "1, 2",
        "'1' + '2'",
        "1e308 * 10",
        "0x10",
        "1_000",
        "True + 1",
        "lambda: 1",
        "1 if 1 else 2",
        "1 == 1",
        "007",  # Python forbids leading zeros in integer literals
        "",
        "   ",
        "(",
        "1 +",
        "()",
        "1\n+1",
        "\u0663 + 1",  # Arabic-Indic digit three: not an ASCII digit
    ],
)
def test_rejected(expr):
    with pytest.raises(SafeEvalError):
        safe_eval(expr)
    assert try_eval(expr) is None


def test_division_by_zero_is_invalid_not_a_crash():
    for expr in ("1 / 0", "5 / (3 - 3)", "1 / (2 / 4 - 1 / 2)"):
        with pytest.raises(SafeEvalError, match="division by zero"):
            safe_eval(expr)


def test_length_limit_and_deep_nesting_are_fast():
    start = time.perf_counter()
    for expr in ("1+" * 100_000 + "1", "(" * 200 + "1" + ")" * 200, "-" * 300 + "1", "9" * 10**6):
        assert try_eval(expr) is None  # over the length limit
    assert try_eval("(" * 120 + "1" + ")" * 120) == 1  # within the limit: fine
    assert try_eval("-" * 200 + "1", max_chars=300) == 1
    # past the limit the parser or our walk gives up cleanly, never with a crash
    assert try_eval("(" * 5000 + "1" + ")" * 5000, max_chars=20_000) is None
    assert try_eval("-" * 50_000 + "1", max_chars=100_000) is None
    assert time.perf_counter() - start < 2.0


def test_largest_allowed_product_is_cheap():
    expr = "*".join(["99999999"] * 28)  # 251 chars: a 224-digit product, still microseconds
    assert len(expr) <= 256
    assert safe_eval(expr) == 99999999**28


def test_integer_literals_in_reading_order():
    assert integer_literals(parse_safe("(75 - 3) / 8 * -11")) == [75, 3, 8, 11]
    with pytest.raises(SafeEvalError):
        parse_safe("1.5 + 2", allow_decimals=False)


def test_non_string_input():
    with pytest.raises(SafeEvalError):
        safe_eval(12)  # type: ignore[arg-type]
    assert try_eval(None) is None  # type: ignore[arg-type]
