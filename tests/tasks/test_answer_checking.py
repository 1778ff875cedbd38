"""Answer checking as GSM8K/MATH graders and Math-Verify do it, the same in rewards and in eval.

One table of (gold, completion, correct?) cases runs through every path that scores a model:
`answers_match` on the extracted answer, `Task.verify_completion` (what evaluation calls) and
the registered accuracy reward (what GRPO calls), for a registered JSONL task.
"""

import threading
import time
from fractions import Fraction

import pytest

from nanoseek.tasks import TASKS, JsonlTask, Problem, register_task
from nanoseek.tasks.extract import (
    answers_match,
    extract_answer,
    extract_gsm8k,
    extract_last_number,
    final_answer,
    parse_number,
)
from nanoseek.tasks.rewards import accuracy_reward
from nanoseek.tasks.symbolic import looks_symbolic, symbolic_match

THIN, NARROW = "\u2009", "\u202f"

# (gold answer, answer the model wrote, is it right?)
CASES = [
    # currency signs, with and without cents, LaTeX-escaped, either side of the minus sign
    ("18", "$18", True),
    ("18", "$18.00", True),
    ("18", "\\$18", True),
    ("18", "$18$", True),  # inline math
    ("5", "€5", True),
    ("5", "£5.0", True),
    ("-5", "-$5", True),
    ("-5", "$-5", True),
    ("5", "-$5", False),
    # percent signs: GSM8K writes "5%" for the answer 5
    ("5", "5%", True),
    ("5", "5\\%", True),
    ("5", "6%", False),
    # thousands separators: comma, plain, no-break, thin and narrow no-break spaces
    ("1080", "1,080", True),
    ("1080", "$1,080", True),
    ("1000", "1 000", True),
    ("1000", f"1{THIN}000", True),
    ("1000", f"1{NARROW}000", True),
    ("1000", "1\u00a0000", True),
    ("1234567", "1,234,567", True),
    ("1080", "1,08", False),  # groups have three digits
    ("108", "1,08", False),
    ("1080", "1,0800", False),
    ("1000", "1 00 0", False),
    # trailing sentence punctuation
    ("18", "18.", True),
    ("18", "18!", True),
    ("1080", "$1,080.", True),
    # values: decimals and fractions equal by value, near misses rejected
    ("18", "18.0", True),
    ("18", "18.5", False),
    ("0.5", ".5", True),
    ("0.5", "1/2", True),
    ("18", "180", False),
    ("18", "18 apples", False),  # a number answer must be a number
    ("18", "", False),
    # GSM8K's "#### N" on either side: a worked gold solution is judged on its final value
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", True),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "24", False),
    ("72", "#### 72", True),
    ("1080", "#### $1,080", True),
    # \boxed{} on either side
    ("\\boxed{18}", "18", True),
    ("18", "\\boxed{18}", True),
    ("18", "\\boxed{19}", False),
    # mathematics beyond a plain number: Math-Verify
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\sqrt{2}", "2^{1/2}", True),
    ("\\frac{1}{3}", "\\frac{1}{2}", False),
    ("2\\pi", "\\pi", False),
    # plain text answers: spacing and case do not matter, the words do
    ("Paris", "  paris ", True),
    ("Paris", "Lyon", False),
]


@pytest.mark.parametrize("gold, given, correct", CASES)
def test_answers_match(gold, given, correct):
    assert answers_match(gold, given) is correct


@pytest.fixture(scope="module")
def task():
    """A registered JSONL task, so rewards and evaluation both look it up by name."""
    problems = [
        Problem(id=f"p{i}", task="checking", question=f"q{i}", answer=g)
        for i, (g, _, _) in enumerate(CASES)
    ]
    register_task(JsonlTask("checking", problems), overwrite=True)
    yield TASKS["checking"]
    del TASKS["checking"]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_reward_and_evaluation_agree(task, i):
    gold, given, correct = CASES[i]
    p = task.problems[i]
    completion = f"some reasoning, 17 + 1 = 18\n</think>\n<answer>{given}</answer>"
    assert task.verify_completion(p, completion) is correct  # what `nanoseek eval` calls
    assert accuracy_reward(p, completion) == float(correct)  # what GRPO calls


def test_the_issue_example_earns_the_reward(task):
    p = Problem(id="x", task="checking", question="q", answer="1080")
    assert accuracy_reward(p, "</think> <answer>$1,080</answer>") == 1.0
    assert accuracy_reward(p, "</think> <answer>1,08</answer>") == 0.0
    assert accuracy_reward(p, "</think> The total is $1,080.\n#### 1,080") == 1.0
    assert accuracy_reward(p, "</think> The total is $1,080.") == 0.0  # never committed


@pytest.mark.parametrize(
    "text, value",
    [
        ("$18.00", 18),
        ("\\$18", 18),
        ("-$5", -5),
        ("5%", 5),
        (f"1{THIN}000", 1000),
        ("1 000 000", 1_000_000),
        (".25", Fraction(1, 4)),
        ("18.", 18),
        ("42!", 42),
    ],
)
def test_parse_number_dress(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["$", "%", "$-$5", "+-5", "-$-5", "1,08", "18 dollars", "5%%"])
def test_parse_number_rejects_dress_without_a_number(text):
    assert parse_number(text) is None


def test_extraction_of_marks():
    assert extract_gsm8k("She pays 3 * 6 = 18 dollars.\n#### 18\n") == "18"
    assert extract_gsm8k("#### 1\n#### 2") == "2"
    assert extract_gsm8k("####   \n") is None
    assert extract_gsm8k("no mark") is None
    assert final_answer("work \\boxed{7} #### 8") == "7"  # a box wins over the mark
    assert extract_answer("<answer>#### 9</answer>") == "9"
    assert extract_answer("work\n#### 9") == "9"
    assert extract_answer("work, no mark 9") is None
    assert extract_last_number("pays $18.00.") == "18.00"
    assert extract_last_number(f"about 1{THIN}080 of them") == "1080"
    assert extract_last_number("pages 12 345") == "345"  # plain spaces in prose: two numbers


def test_symbolic_routing_and_guards():
    assert looks_symbolic("\\frac{1}{2}") and looks_symbolic("x^2")
    assert not looks_symbolic("1/2") and not looks_symbolic("$1,080")
    assert not symbolic_match("\\frac{1}{2}", "\\frac{1}{2}</answer>")  # malformed completion
    assert not symbolic_match("\\frac{1}{2}", "\\frac{1}{2}" + " " * 400)  # length cap


def test_symbolic_match_off_the_main_thread():
    """Math-Verify's timeout uses signal.alarm, which only the main thread may set."""
    results = []
    worker = threading.Thread(target=lambda: results.append(symbolic_match("0.5", "\\frac{2}{4}")))
    worker.start()
    worker.join()
    assert results == [True]


def test_plain_numbers_never_reach_math_verify_and_stay_fast():
    start = time.perf_counter()
    for i in range(2000):
        assert answers_match(str(i), f"${i:,}.00")
    per_call = (time.perf_counter() - start) / 2000
    assert per_call < 1e-3, f"{per_call * 1e6:.0f} us per plain-number check"
