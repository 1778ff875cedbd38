"""The shared sampling path: prompt encoding (chat or raw), cutting at stop ids, scoring by hand,
and the held-out problems GRPO evaluates on."""

import json

import pytest
import torch

from nanoseek import CausalLM
from nanoseek.eval import (
    cut_at_stop,
    encode_prompt,
    heldout_across,
    sample_problems,
    score_samples,
    stop_ids,
    to_sample,
)
from nanoseek.eval.evaluate import resolve
from nanoseek.eval.sampling import Sample
from nanoseek.tasks import R1_ZERO_SYSTEM, TaskError, format_completion, get_task
from nanoseek.tasks.rewards import accuracy_reward
from tests.helpers import tiny_config
from tests.train.test_sft import tok, tok_dir  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def problem():
    return get_task("addition").generate(1, "test", seed=0, level=2)[0]


# ------------------------------------------------------------------------------ prompts
def test_chat_prompt_is_the_templates_generation_prompt(tok, problem):  # noqa: F811
    ids = encode_prompt(tok, problem, "chat")
    text = tok.decode(ids)
    assert text.startswith(tok.decode([tok.bos_id]))
    assert problem.question in text and text.endswith("<think>\n")  # the R1 generation prompt
    assert R1_ZERO_SYSTEM not in text
    messages = [{"role": "user", "content": problem.question}]
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=True)
    with_system = tok.decode(encode_prompt(tok, problem, "chat", system=True))
    assert R1_ZERO_SYSTEM in with_system and with_system.endswith("<think>\n")
    # prefill belongs to the raw templates: the chat template opens the block itself
    assert encode_prompt(tok, problem, "chat", prefill=False) == ids


def test_raw_prompt_is_bos_and_the_template(tok, problem):  # noqa: F811
    ids = encode_prompt(tok, problem, "short")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.decode(ids[1:]) == f"User: {problem.question}\nAssistant: <think>"
    bare = encode_prompt(tok, problem, "short", prefill=False)
    assert tok.decode(bare[1:]) == f"User: {problem.question}\nAssistant:"
    r1zero = tok.decode(encode_prompt(tok, problem, "r1zero")[1:])
    assert r1zero.startswith(R1_ZERO_SYSTEM) and r1zero.endswith("Assistant: <think>")
    with pytest.raises(TaskError, match="unknown template 'chatty'; valid templates: chat"):
        encode_prompt(tok, problem, "chatty")


def test_evaluation_also_stops_at_the_answer_close(tok):  # noqa: F811
    (close,) = tok.encode("</answer>")
    assert stop_ids(tok) == (*tok.stop_ids, close)


# ------------------------------------------------------------------------------ cutting
def test_cut_at_the_first_stop_id():
    assert cut_at_stop([5, 6, 9, 7], (1, 9)) == [5, 6, 9]  # an end-of-turn token, kept
    assert cut_at_stop([5, 1, 9], (1, 9)) == [5, 1]  # eos: what follows never counts
    assert cut_at_stop([5, 6], (1, 9)) == [5, 6]  # no stop: truncated
    assert cut_at_stop([], (1,)) == []


def test_to_sample_drops_the_end_of_turn_but_keeps_the_answer_close(tok, problem):  # noqa: F811
    good = format_completion(problem)
    ids = tok.encode(good)
    (close,) = tok.encode("</answer>")
    stops = stop_ids(tok)
    s = to_sample(tok, problem, [*ids, tok.eos_id, 7, 7], stops)
    assert s.text == good and s.finished  # ids end in </answer>: cut there, eos never reached
    assert s.token_ids == ids and ids[-1] == close and s.n_tokens == len(ids)
    s = to_sample(tok, problem, [*ids[:3], tok.eos_id, 7], stops)
    assert s.token_ids == [*ids[:3], tok.eos_id] and s.n_tokens == 4 and s.finished
    assert s.text == tok.decode(ids[:3]) and "end" not in s.text  # eos is no text
    s = to_sample(tok, problem, ids[:3], stops)
    assert not s.finished and s.n_tokens == 3  # cut at max_new_tokens
    # the engine's word wins where the caller has it (it stops at the config's eos ids too)
    assert to_sample(tok, problem, ids[:3], stops, finished=True).finished


def test_an_end_of_turn_token_the_decoder_keeps_is_still_no_text(problem):
    """ChatML's `<|im_end|>` may be a plain added token that decoding keeps: the text (what the
    verifier and the format reward read, which want nothing after `</answer>`) drops it."""

    class Words:  # a decoder that skips nothing
        stop_ids = (1, 50)  # eos, an end-of-turn token

        def decode(self, ids, skip_special_tokens=False):
            return " ".join(f"w{i}" for i in ids)

    s = to_sample(Words(), problem, [7, 8, 50, 9], (1, 50, 8))
    assert s.token_ids == [7, 8] and s.text == "w7 w8" and s.finished  # 8: `</answer>`, kept
    s = to_sample(Words(), problem, [7, 50, 9], (1, 50, 8))
    assert s.token_ids == [7, 50] and s.text == "w7" and s.n_tokens == 2


def test_sample_problems_cuts_what_the_sampler_returns(tok, problem):  # noqa: F811
    model = CausalLM(tiny_config(vocab_size=512, num_hidden_layers=1))
    ids = tok.encode(format_completion(problem))

    def sample_fn(model, prompts, max_new_tokens, temperature, seed):
        return [[*ids, tok.eos_id, 5, 5] for _ in prompts]  # rambling past the stop

    (row,) = sample_problems(model, tok, [problem], 2, sample_fn=sample_fn, template="short")
    assert [s.token_ids for s in row] == [ids, ids] and all(s.finished for s in row)
    assert row[0].text == format_completion(problem)


# ------------------------------------------------------------------------------ scoring
def test_scores_by_hand(tok):  # noqa: F811
    task = get_task("addition")
    a = task.generate(1, "test", seed=0, level=1)[0]
    b = task.generate(1, "test", seed=0, level=2)[0]

    def sample(p, kind, n_tokens, finished=True):
        text = format_completion(p)
        if kind == "wrong":
            text = text.replace(f"<answer>{p.answer}</answer>", "<answer>-1</answer>")
        elif kind == "ill_formed":  # right answer, no </think>
            text = text.replace("</think>", "")
        return Sample(p, text, n_tokens, finished)

    # a: 1 of 2 right (the other wrong and truncated); b: 2 of 2 right, one ill-formed
    rows = [
        [sample(a, "right", 10), sample(a, "wrong", 4, finished=False)],
        [sample(b, "ill_formed", 6), sample(b, "right", 8)],
    ]
    r = score_samples(task.verify_completion, rows, 2)
    assert r["accuracy"] == 0.75  # (1/2 + 2/2) / 2
    assert r["pass@k"] == 1.0 and r["pass_at"] == {"1": 0.75, "2": 1.0}
    assert r["format_rate"] == 0.75  # the wrong one is well-formed, the ill-formed one is not
    assert r["mean_length"] == 7.0 and r["truncated"] == 0.25 and r["n_problems"] == 2
    assert {lvl: v["accuracy"] for lvl, v in r["by_level"].items()} == {"1": 0.5, "2": 1.0}
    # the accuracy reward (what RL and GRPO's held-out evaluation score by) counts the same
    assert score_samples(accuracy_reward, rows, 2) == r
    json.dumps(r)
    nothing_right = score_samples(lambda p, t: 0.0, rows, 2)
    assert nothing_right["accuracy"] == nothing_right["pass@k"] == 0.0


# ------------------------------------------------------------------------------ held-out sets
def test_heldout_across_tasks(tmp_path):
    add, cd = get_task("addition"), get_task("countdown")
    problems = heldout_across([add, cd], 5, seed=0, level=2)
    assert [p.task for p in problems] == ["addition"] * 3 + ["countdown"] * 2
    assert all(p.split == "test" for p in problems)
    assert problems[:3] == add.generate(3, "test", seed=0, level=2, unique=True)
    # 1-digit sums: two distinct held-out problems, so the set repeats them
    small = heldout_across([add], 6, seed=0, level=1)
    assert len(small) == 6 and len({p.id for p in small}) <= 2
    # a task file without a test row: no held-out set, a warning
    path = tmp_path / "train_only.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2", "split": "train"}) + "\n")
    with pytest.warns(UserWarning, match="no held-out evaluation"):
        assert heldout_across([resolve(str(path))], 3) == []


def test_engine_completions_end_at_their_first_stop(tok, problem):  # noqa: F811
    torch.manual_seed(0)
    model = CausalLM(tiny_config(vocab_size=512, num_hidden_layers=1)).eval()
    stops = stop_ids(tok)
    rows = sample_problems(model, tok, [problem], 4, temperature=1.0, max_new_tokens=8, seed=2)
    for s in rows[0]:
        assert s.n_tokens == len(s.token_ids) <= 8
        assert not any(t in stops for t in s.token_ids[:-1])
        assert s.finished == (s.token_ids[-1] in stops)
