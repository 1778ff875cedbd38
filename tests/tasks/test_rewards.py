"""Rule-based rewards on tricky completions, the registry, and fault-tolerant scoring."""

import math

import pytest

from nanoseek.tasks import Problem, get_task
from nanoseek.tasks.rewards import (
    REWARDS,
    RewardStats,
    accuracy_reward,
    format_reward,
    get_reward,
    language_share,
    make_format_reward,
    make_language_reward,
    readability_reward,
    register_reward,
    rewards_from_spec,
    score,
    score_batch,
    thinking,
)


def problem(answer="-12", task="arithmetic"):
    return Problem(id="p", task=task, question="What is 3 - 15?", answer=answer)


@pytest.mark.parametrize(
    "completion, want",
    [
        ("3 - 15 = -12</think> <answer>-12</answer>", 1.0),
        ("...</think><answer> -12 </answer>", 1.0),  # spaces inside the tag
        ("</think> <answer>\u221212</answer>", 1.0),  # Unicode minus sign
        ("</think> <answer>12</answer>", 0.0),  # sign lost
        ("</think> <answer>-12", 0.0),  # truncated: unclosed tag earns nothing
        ("the answer is -12", 0.0),  # strict: no last-number fallback for rewards
        ("</think> <answer>-12</answer> <answer>7</answer>", 0.0),  # the last answer counts
        ("<answer><answer>-12</answer>", 1.0),  # stray extra open tag
        ("</think> <answer>\\boxed{-12}</answer>", 1.0),
        ("</think> <answer>__import__('os').system('x')</answer>", 0.0),  # injection: just text
        ("</think> <answer>-24/2</answer>", 1.0),  # an equal fraction
        ("</think> <answer>1/0</answer>", 0.0),  # division by zero is not an answer, no crash
        ("", 0.0),
    ],
)
def test_accuracy_reward(completion, want):
    assert accuracy_reward(problem(), completion) == want


def test_accuracy_uses_the_task_verifier_or_falls_back():
    countdown = get_task("countdown")
    p = countdown.generate(1, seed=3, level=2)[0]
    assert accuracy_reward(p, f"</think> <answer>{p.answer}</answer>") == 1.0
    # a problem of an unregistered task is compared by value
    assert accuracy_reward(problem("7", task="nope"), "<answer>7.0</answer>") == 1.0


@pytest.mark.parametrize(
    "completion, prefilled_ok, open_ok",
    [
        ("reason</think> <answer>5</answer>", True, False),  # continues a prefilled <think>
        ("<think>reason</think>\n<answer>5</answer>", False, True),  # opens it itself
        ("  reason </think>  <answer> 5 </answer>  ", True, False),  # free whitespace
        ("reason</think> <answer>5</answer> trailing", False, False),  # text after the answer
        ("reason</think></think> <answer>5</answer>", False, False),  # two closes
        ("reason <answer>5</answer>", False, False),  # no </think>
        ("reason</think> <answer></answer>", False, False),  # empty answer
        ("<think>a</think><think>b</think><answer>5</answer>", False, False),
        ("reason</think> <answer>5</answer><answer>6</answer>", False, False),
    ],
)
def test_format_reward(completion, prefilled_ok, open_ok):
    p = problem()
    assert make_format_reward(True)(p, completion) == float(prefilled_ok)
    assert make_format_reward(False)(p, completion) == float(open_ok)
    assert format_reward(p, completion) == float(prefilled_ok or open_ok)  # auto: either


def test_thinking_extracts_the_cot():
    assert thinking("<think>abc</think><answer>1</answer>") == "abc"
    assert thinking("abc</think> <answer>1</answer>") == "abc"
    assert thinking("abc <answer>1</answer>") == "abc "
    assert thinking("still thinking") == "still thinking"


def test_language_reward():
    lang = make_language_reward("en")
    p = problem()
    assert lang(p, "Add the two numbers, carry one.</think><answer>5</answer>") == 1.0
    # 2 of 4 words are not ASCII-English
    assert lang(p, "Add größer die für</think>") == pytest.approx(0.5)
    assert lang(p, "先 add 再 carry</think>") == pytest.approx(0.5)
    assert lang(p, "12 + 7 = 19</think><answer>19</answer>") == 1.0  # no words: nothing foreign
    assert lang(p, "</think><answer>19</answer>") == 0.0  # empty CoT: nothing readable
    assert lang(p, "carry1 x_2</think>") == 1.0  # digits/underscores split words
    assert make_language_reward("zh")(p, "我们先算 then</think>") == pytest.approx(0.5)
    assert language_share("naïve", "latin") == 1.0 and language_share("naïve", "en") == 0.0
    with pytest.raises(ValueError, match="known: en"):
        make_language_reward("xx")


def test_readability_reward():
    p = problem()
    assert readability_reward(p, "a\nb\n\nc</think><answer>1</answer>") == 1.0
    assert readability_reward(p, "a\na\na\nb</think>") == pytest.approx(0.5)  # a loop
    assert readability_reward(p, "x" * 400 + "\nok</think>") == pytest.approx(0.5)
    assert readability_reward(p, "</think><answer>1</answer>") == 0.0


def test_score_weights_and_errors_are_counted():
    p = problem()
    good = "3 - 15 = -12</think> <answer>-12</answer>"

    def broken(problem, completion):
        raise ZeroDivisionError("boom")

    s = score(["accuracy", "format", broken], [1.0, 0.5, 2.0], p, good)
    assert s.total == 1.5 and s.values == {"accuracy": 1.0, "format": 1.0, "broken": 0.0}
    assert s.errors == {"broken": "ZeroDivisionError: boom"}

    s = score([lambda p, c: math.nan, lambda p, c: "1", lambda p, c: True], None, p, good)
    assert s.total == 1.0 and s.values == {"<lambda>": 0.0, "<lambda>#1": 0.0, "<lambda>#2": 1.0}
    assert sorted(s.errors) == ["<lambda>", "<lambda>#1"]  # NaN and a string fail, a bool counts
    assert all("not a finite number" in e for e in s.errors.values())

    stats = RewardStats()
    totals, means = score_batch(
        ["accuracy", broken], None, [p, p, p], [good, "x", good], stats=stats
    )
    assert totals == [1.0, 0.0, 1.0]
    assert means["reward/accuracy"] == pytest.approx(2 / 3) and means["reward_errors"] == 3
    assert stats.errors == {"broken": 3} and stats.n_scored == 3
    assert "'broken' failed on 3 of 3" in stats.report()[0] and "boom" in stats.report()[0]
    # a completion that is not even a string: every reward fails softly or returns 0
    s = score(["accuracy", "format", "language", "readability"], None, p, None)
    assert s.total == 0.0


def test_registry():
    assert {"accuracy", "format", "language", "readability"} <= set(REWARDS)
    with pytest.raises(ValueError, match="valid rewards: accuracy"):
        get_reward("acuracy")
    with pytest.raises(ValueError, match="valid rewards"):
        score(["nope"], None, problem(), "")
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        score(["accuracy", "format"], [1.0], problem(), "")
    register_reward("short_answer", lambda p, c: float(len(c) < 10))
    try:
        assert score(["short_answer"], None, problem(), "ok").total == 1.0
        with pytest.raises(ValueError, match="already registered"):
            register_reward("short_answer", len)
        assert rewards_from_spec({"accuracy": 1, "short_answer": 0.1}) == (
            ["accuracy", "short_answer"],
            [1.0, 0.1],
        )
    finally:
        del REWARDS["short_answer"]
