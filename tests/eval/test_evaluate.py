"""Evaluation: known accuracy from a scripted model, the engine path, JSON keys, bad input."""

import json

import pytest
import torch

from nanoseek import CausalLM
from nanoseek.cli import main
from nanoseek.eval import evaluate, heldout_problems, pass_at_k, sample_problems
from nanoseek.tasks import TaskError, format_completion, get_task
from tests.helpers import tiny_config
from tests.train.test_sft import make_model_dir, tok, tok_dir  # noqa: F401 - fixtures


def question_of(tok, ids):  # noqa: F811
    """The question inside a chat prompt or a raw ("short"/"r1zero") prompt."""
    text = tok.decode(ids)
    if "<｜User｜>" in text:
        return text.split("<｜User｜>")[1].split("<｜Assistant｜>")[0]
    return text.split("User: ")[1].split("\nAssistant:")[0]


def scripted(tok, problems, script):  # noqa: F811
    """A SampleFn whose completions `script(problem_index, sample_index)` decides: "right",
    "wrong", "ill_formed" (right answer, no </think>), "truncated" (cut, no stop token)."""
    index = {p.question: i for i, p in enumerate(problems)}
    calls = []

    def sample_fn(model, prompts, max_new_tokens, temperature, seed):
        calls.append((len(prompts), temperature, seed))
        seen: dict[int, int] = {}
        out = []
        for ids in prompts:
            i = index[question_of(tok, ids)]
            j = seen[i] = seen.get(i, -1) + 1
            p, kind = problems[i], script(i, j)
            text = format_completion(p)
            if kind == "wrong":
                text = text.replace(f"<answer>{p.answer}</answer>", "<answer>-1</answer>")
            elif kind == "ill_formed":
                text = text.replace("</think>", "")
            ids = tok.encode(text)
            out.append(ids[:5] if kind == "truncated" else ids + [tok.eos_id])
        return out

    sample_fn.calls = calls
    return sample_fn


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalLM(tiny_config(vocab_size=512, num_hidden_layers=2)).eval()


def test_scripted_model_gives_the_known_accuracy(tok, model):  # noqa: F811
    task, n, k = get_task("addition"), 8, 4
    problems = heldout_problems(task, n, seed=3, level=2)
    # problem i has i % 5 right samples out of 4 (capped), the rest wrong; problem 0's first
    # sample is truncated, problem 1's last is ill-formed but right
    n_right = [min(i % 5, k) for i in range(n)]

    def script(i, j):
        if i == 0 and j == 0:
            return "truncated"
        if i == 1 and j == k - 1:
            return "ill_formed"
        return "right" if j < n_right[i] else "wrong"

    fn = scripted(tok, problems, script)
    r = evaluate(model, tok, "addition", n, k, seed=3, level=2, sample_fn=fn)
    correct = list(n_right)
    correct[1] += 1  # ill-formed but right still verifies: format is scored on its own
    assert r["accuracy"] == pytest.approx(sum(c / k for c in correct) / n)
    assert r["pass@k"] == pytest.approx(sum(pass_at_k(k, c, k) for c in correct) / n)
    assert r["pass_at"]["2"] == pytest.approx(sum(pass_at_k(k, c, 2) for c in correct) / n)
    assert r["format_rate"] == pytest.approx((n * k - 2) / (n * k))
    assert r["truncated"] == pytest.approx(1 / (n * k))
    assert r["temperature"] == 0.6 and fn.calls == [(n * k, 0.6, 3)]  # one batched call
    for key in ("accuracy", "pass@k", "k", "format_rate", "mean_length", "truncated",
                "by_level", "samples", "wall_s", "n_problems"):  # fmt: skip
        assert key in r
    assert list(r["by_level"]) == ["2"] and r["by_level"]["2"]["accuracy"] == r["accuracy"]
    assert len(r["samples"]) == 3 and r["samples"][1]["correct"] is True
    json.dumps(r)  # JSON-able


def test_all_right_and_per_level_breakdown(tok, model):  # noqa: F811
    task = get_task("addition")
    problems = heldout_problems(task, 6, seed=0)  # level=None: a mix of levels
    fn = scripted(tok, problems, lambda i, j: "right" if problems[i].level <= 3 else "wrong")
    r = evaluate(model, tok, task, 6, 1, sample_fn=fn)
    assert r["temperature"] == 0.0  # k = 1: greedy
    for lvl, v in r["by_level"].items():
        assert v["accuracy"] == (1.0 if int(lvl) <= 3 else 0.0)
    assert sum(v["n_problems"] for v in r["by_level"].values()) == 6


def test_engine_path_on_a_tiny_random_model(tok, model):  # noqa: F811
    problems = heldout_problems(get_task("addition"), 3, level=2)
    rows = sample_problems(model, tok, problems, 2, temperature=1.0, max_new_tokens=6, seed=1)
    assert [len(r) for r in rows] == [2, 2, 2]
    for row in rows:
        for s in row:
            assert 1 <= s.n_tokens <= 6
            if s.n_tokens < 6:  # stopped early: it ended in a stop token
                assert s.finished
    again = sample_problems(model, tok, problems, 2, temperature=1.0, max_new_tokens=6, seed=1)
    assert [[s.text for s in r] for r in rows] == [[s.text for s in r] for r in again]
    r = evaluate(model, tok, "addition", 3, 2, max_new_tokens=6, level=2, template="short")
    assert 0.0 <= r["accuracy"] <= r["pass@k"] <= 1.0 and r["mean_length"] <= 6


def test_unknown_task_and_template(tok, model):  # noqa: F811
    with pytest.raises(TaskError, match="unknown task 'nope'; valid tasks: .*addition"):
        evaluate(model, tok, "nope", 2)
    with pytest.raises(TaskError, match="unknown template 'chatty'; valid templates: chat"):
        evaluate(model, tok, "addition", 2, template="chatty")


def test_prompt_longer_than_the_context(tok):  # noqa: F811
    small = CausalLM(tiny_config(vocab_size=512, num_hidden_layers=1, max_position_embeddings=16))
    with pytest.raises(ValueError, match=r"prompt of problem addition-\w+ is \d+ tokens.*16"):
        evaluate(small, tok, "addition", 2, level=2, template="r1zero")


def test_cli_eval(tmp_path, tok_dir, capsys):  # noqa: F811
    d = make_model_dir(tmp_path / "m", tok_dir)
    args = ["eval", d, "--task", "addition", "--n", "2", "--k", "2", "--max-new-tokens", "4"]
    assert main([*args, "--level", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"accuracy", "pass@k", "format_rate"} <= set(r) and r["n_problems"] == 2
    assert main([*args, "--template", "short"]) == 0
    assert "accuracy (pass@1)" in capsys.readouterr().out
    assert main(["eval", d, "--task", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nope'; valid tasks:" in err and "countdown" in err
    assert err.count("\n") == 1  # one line, no traceback
    small = make_model_dir(tmp_path / "s", tok_dir, max_position_embeddings=16)
    assert main(["eval", small, "--task", "addition", "--template", "r1zero"]) == 2
    assert "more than the model's context" in capsys.readouterr().err


def test_small_problem_space_and_jsonl_tasks(tmp_path, tok, model):  # noqa: F811
    task = get_task("addition")
    with pytest.warns(UserWarning, match="only \\d+ distinct held-out problems at level 1"):
        few = heldout_problems(task, 100, level=1)
    assert 0 < len(few) < 100 and len({p.id for p in few}) == len(few)
    path = tmp_path / "plus_one.jsonl"
    rows = [{"question": f"What is {i} plus one?", "answer": str(i + 1),
             "solution": f"{i} + 1 = {i + 1}."} for i in range(200)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from nanoseek.tasks import JsonlTask

    problems = heldout_problems(JsonlTask("plus_one", str(path)), 4)
    fn = scripted(tok, problems, lambda i, j: "right" if i % 2 else "wrong")
    r = evaluate(model, tok, str(path), 4, sample_fn=fn)  # a task file, as `--task FILE`
    assert r["task"] == "plus_one" and r["accuracy"] == 0.5
