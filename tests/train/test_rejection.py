"""Rejection sampling: only verified, well-formed, readable, unique samples are kept."""

import json
import os

import pytest

from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.eval.sampling import Sample
from nanoseek.tasks import format_completion, get_task
from nanoseek.train.rejection import (
    RejectionOptions,
    SampleFilter,
    normalise,
    run_rejection,
    stats_path,
)
from nanoseek.train.sft_data import load_examples, read_chat_jsonl
from tests.eval.test_evaluate import question_of
from tests.train.test_sft import make_model_dir, tok, tok_dir  # noqa: F401 - fixtures

NOT_ENGLISH = "先 计算 个位 然后 十位 再 进位 最后 写下 结果 答案 就是 这样 对 吧 好\n"


def variant(p, kind: str) -> tuple[str, bool]:
    """(completion text, finished) of one kind of sample for problem p."""
    good = format_completion(p)
    return {
        "right": (good, True),
        "dup": (good, True),
        "dup_spaced": ("  " + good.replace(" ", "  ").upper().lower(), True),
        "wrong": (good.replace(f"<answer>{p.answer}</answer>", "<answer>-1</answer>"), True),
        "ill_formed": (good.replace("</think>", ""), True),
        "trailing": (good + " and more", True),
        "not_english": (NOT_ENGLISH + good, True),
        "repetitive": ("Add the digits.\n" * 4 + good, True),
        "truncated": (good[:10], False),
        "right2": ("Let me check.\n" + good, True),
    }[kind]


KINDS = ["right", "dup", "dup_spaced", "wrong", "ill_formed", "trailing", "not_english",
         "repetitive", "truncated", "right2"]  # fmt: skip


def test_filter_keeps_only_good_unique_samples():
    task = get_task("addition")
    p, q = task.generate(2, "train", seed=0, level=2, unique=True)
    filt = SampleFilter(task, min_language=0.9, min_readability=0.9)
    kept = []
    for prob in (p, q):
        for kind in KINDS:
            text, finished = variant(prob, kind)
            if filt.add(Sample(prob, text, 10, finished)):
                kept.append((prob.id, kind))
    assert kept == [(p.id, "right"), (p.id, "right2"), (q.id, "right"), (q.id, "right2")]
    c = filt.counts()
    assert c["prompts"] == 2 and c["samples"] == 20 and c["kept"] == 4 and c["prompts_kept"] == 2
    assert c["duplicates"] == 4 and c["wrong"] == 2 and c["truncated"] == 2
    assert c["ill_formed"] == 4  # no </think>; text after </answer>
    assert c["unreadable"] == 4  # mixed language; repeated lines
    assert c["acceptance_rate"] == pytest.approx(4 / 20)
    assert c["verified"] == 2 * 8  # everything but the wrong and the truncated one
    per = filt.per_prompt()
    assert [r["id"] for r in per] == [p.id, q.id] and per[0]["kept"] == 2 and per[0]["level"] == 2


def test_thresholds_off_and_keep_unverified():
    task = get_task("addition")
    (p,) = task.generate(1, "train", seed=1, level=2)
    lax = SampleFilter(task)  # min_language = min_readability = 0: no readability check
    assert lax.add(Sample(p, variant(p, "not_english")[0], 9, True))
    assert lax.add(Sample(p, variant(p, "repetitive")[0], 9, True))
    keep = SampleFilter(task, keep_unverified=True)
    assert keep.add(Sample(p, variant(p, "wrong")[0], 9, True))
    assert not keep.add(Sample(p, variant(p, "wrong")[0], 9, True))  # duplicates still go
    assert keep.counts()["wrong"] == 2 and keep.counts()["duplicates"] == 1
    assert normalise("  A\n b ") == normalise("a b")


def scripted_fn(tok, problems):  # noqa: F811
    """Sample j of each problem is KINDS[j % len(KINDS)]."""
    index = {p.question: p for p in problems}

    def sample_fn(model, prompts, max_new_tokens, temperature, seed):
        seen: dict[str, int] = {}
        out = []
        for ids in prompts:
            p = index[question_of(tok, ids)]
            j = seen[p.id] = seen.get(p.id, -1) + 1
            text, finished = variant(p, KINDS[j % len(KINDS)])
            out.append(tok.encode(text) + ([tok.eos_id] if finished else []))
        return out

    return sample_fn


def test_run_writes_sft_jsonl_and_statistics(tmp_path, tok_dir, tok):  # noqa: F811
    model = make_model_dir(tmp_path / "m", tok_dir)
    out = str(tmp_path / "rs" / "samples.jsonl")
    opts = RejectionOptions(model=model, task="addition", out=out, n_prompts=3,
                            samples=len(KINDS), level=2, seed=5)  # fmt: skip
    problems = get_task("addition").generate(3, "train", seed=5, level=2, unique=True)
    stats = run_rejection(opts, progress=False, sample_fn=scripted_fn(tok, problems))
    assert stats_path(out) == str(tmp_path / "rs" / "samples.json")
    on_disk = json.load(open(stats_path(out)))
    assert on_disk["kept"] == stats["kept"] == 6 and on_disk["samples"] == 3 * len(KINDS)
    assert on_disk["acceptance_rate"] == pytest.approx(6 / 30)
    assert len(on_disk["per_prompt"]) == 3
    # "trailing" is cut at its `</answer>` (a stop id: the engine never writes past it), which
    # leaves a duplicate of the right sample, not an ill-formed one
    assert {k: on_disk["per_prompt"][0][k] for k in ("kept", "duplicates", "ill_formed")} == {
        "kept": 2, "duplicates": 3, "ill_formed": 1,
    }  # fmt: skip
    convs = [m for _, m in read_chat_jsonl(out)]
    assert len(convs) == 6
    for messages in convs:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        p = next(q for q in problems if q.question == messages[0]["content"])
        text = messages[1]["content"]
        assert text.startswith("<think>\n") and get_task("addition").verify_completion(p, text)
    examples, data_stats = load_examples([out], tok, 257)  # what `nanoseek sft` reads
    assert data_stats.examples == 6 and all(e.n_labels > 0 for e in examples)


def test_bad_options(tmp_path, tok_dir):  # noqa: F811
    model = make_model_dir(tmp_path / "m", tok_dir)
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: .*countdown"):
        run_rejection(RejectionOptions(model=model, task="nope"))
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        run_rejection(RejectionOptions(model=str(tmp_path / "none"), task="addition"))
    with pytest.raises(ConfigError, match="min_language"):
        run_rejection(RejectionOptions(model=model, task="addition", min_language=2))
    small = make_model_dir(tmp_path / "s", tok_dir, max_position_embeddings=16)
    with pytest.raises(ValueError, match="more than the model's context"):
        run_rejection(RejectionOptions(model=small, task="addition", template="r1zero",
                                       out=str(tmp_path / "x.jsonl")), progress=False)  # fmt: skip


def test_cli_rejection_sample_with_the_engine(tmp_path, tok_dir, capsys):  # noqa: F811
    model = make_model_dir(tmp_path / "m", tok_dir)
    out = str(tmp_path / "samples.jsonl")
    code = main(["rejection-sample", "--model", model, "--task", "addition", "--n-prompts", "2",
                 "--samples", "2", "--out", out, "--max_new_tokens=4", "--level=2"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "of 4 samples" in captured.out and os.path.exists(stats_path(out))
    assert json.load(open(stats_path(out)))["samples"] == 4
    assert main(["rejection-sample", "--model", model, "--task", "nope", "--out", out]) == 2
    assert "valid tasks:" in capsys.readouterr().err


def test_the_sft_reply_continues_the_templates_generation_prompt(tmp_path, tok):  # noqa: F811
    """R1's template opens "<think>\\n" in the generation prompt, ChatML opens nothing: the
    kept reply starts with exactly what the prompt already wrote, so SFT targets continue where
    a generation starts."""
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.train.rejection import reply_opening, to_conversation
    from tests.hf_tokenizers import build

    assert reply_opening(tok) == "<think>\n"
    chatml = Tokenizer.load(build("chatml", tmp_path / "chatml"))
    assert reply_opening(chatml) == ""
    problem = get_task("addition").generate(1, "train", seed=0)[0]
    sample = Sample(problem, "7 + 8 = 15</think> <answer>15</answer>", 9, True)
    reply = to_conversation(sample, opening=reply_opening(chatml))[-1]
    assert reply == {"role": "assistant", "content": sample.text}
    reply = to_conversation(sample, opening=reply_opening(tok))[-1]
    assert reply["content"] == "<think>\n" + sample.text
