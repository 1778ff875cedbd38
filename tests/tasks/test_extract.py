import time
from fractions import Fraction

import pytest

from nanoseek.tasks.extract import (
    answers_match,
    check_format,
    extract_answer,
    extract_boxed,
    extract_last_number,
    extract_tag,
    parse_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>42</answer>", "42"),
        ("<answer>  42 \n</answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last one counts
        ("<answer><answer>5</answer>", "5"),  # stray extra open tag
        ("<answer>5</answer></answer>", "5"),  # stray extra close tag: nearest open before it
        ("<think>maybe <answer>3</answer>?</think> <answer>4</answer>", "4"),
        ("<answer>7", None),  # truncated completion: no reward
        ("7</answer>", None),
        ("no tags at all", None),
        ("<answer></answer>", ""),
        ("<ANSWER>7</ANSWER>", None),  # tags are case-sensitive, as the template writes them
    ],
)
def test_extract_tag(text, expected):
    assert extract_tag(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{42}", "42"),
        (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
        (r"\boxed{1} and later \boxed{2}", "2"),
        (r"\boxed{{nested {deep}}}", "{nested {deep}}"),
        (r"\boxed {7}", "7"),
        (r"\boxed{3} then \boxed{unclosed", "3"),  # unbalanced last box: the last balanced one
        (r"\boxed{unclosed", None),
        (r"\boxed", None),
        ("nothing", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_is_linear_on_adversarial_input():
    start = time.perf_counter()
    assert extract_boxed("\\boxed{" * 100_000) is None
    assert extract_boxed("{" * 500_000 + "\\boxed{1}") == "1"
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the answer is 42.", "42"),
        ("x = -3", "-3"),
        ("5-3", "3"),  # binary minus is not a sign
        ("costs 1,000 dollars", "1000"),
        ("pi is 3.14", "3.14"),
        ("1, 2, 3", "3"),
        ("first 7 then 8 apples", "8"),
        ("no digits", None),
        ("", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_extract_answer_order_and_fallbacks():
    assert extract_answer("<answer>\\boxed{9}</answer>") == "9"  # boxed inside the tag
    assert extract_answer("<answer>8</answer> \\boxed{9}") == "8"  # tag wins over box
    assert extract_answer("so \\boxed{9}") == "9"
    assert extract_answer("it is 12") is None  # strict by default
    assert extract_answer("it is 12", fallback="last_number") == "12"
    assert extract_answer("  12 ", fallback="text") == "12"
    assert extract_answer(None) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fallback"):
        extract_answer("x", fallback="guess")


@pytest.mark.parametrize(
    "text, value",
    [
        ("42", 42),
        (" 42 ", 42),
        ("-42", -42),
        ("+42", 42),
        ("\u221242", -42),  # Unicode minus
        ("007", 7),
        ("1,000", 1000),
        ("1,234,567", 1234567),
        ("2.50", Fraction(5, 2)),
        ("42.", 42),
        ("-3/4", Fraction(-3, 4)),
        ("6 / 8", Fraction(3, 4)),
    ],
)
def test_parse_number_accepts(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text",
    ["1,00", "1,0000", "1e3", "0x10", "42 apples", "5 + 3", "--5", "1/0", "", ".", "9" * 101, "½"],
)
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_answers_match():
    assert answers_match("1000", "1,000")
    assert answers_match("-5", " -5 ")
    assert answers_match("0.5", "1/2")
    assert not answers_match("5", "5 apples")
    assert not answers_match("5", None)
    assert answers_match("Paris", "  paris ")
    assert not answers_match("Paris", "Lyon")


def test_check_format():
    good = "step 1\nstep 2</think> <answer>42</answer>"
    assert check_format(good)
    assert check_format("<think>" + good, prefilled=False)
    assert not check_format("<think>" + good)  # the prompt already opened <think>
    assert not check_format(good, prefilled=False)
    assert not check_format("no think</answer>")
    assert not check_format("a</think> <answer>42</answer> trailing text")
    assert not check_format("a</think> b</think> <answer>42</answer>")
    assert not check_format("a</think> <answer>   </answer>")
    assert not check_format("a</think> <answer>4<answer>2</answer>")
    assert not check_format("a</think> <answer>42")  # truncated
    assert check_format("  a </think>\n<answer> 42 </answer>\n")  # whitespace is free
