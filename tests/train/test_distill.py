"""Distillation runs (logit, on-policy, sequence-level) and the engine as their sampler."""

import json
import os

import pytest
import torch

from nanoseek import load
from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.data.tokenizer import EOS, Tokenizer
from nanoseek.eval.sampling import stop_ids
from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.tasks import format_completion, get_task
from nanoseek.train.distill import (
    DistillOptions,
    OnPolicyData,
    default_sample_fn,
    run_distill,
)
from nanoseek.train.sft_data import (
    SFTDataset,
    encode_chat,
    read_chat_jsonl,
    task_conversations,
    write_chat_jsonl,
)
from tests.helpers import random_model, tiny_config
from tests.train.test_sft import make_model_dir, tok, tok_dir  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def teacher_dir(tok_dir, tmp_path_factory):  # noqa: F811
    return make_model_dir(tmp_path_factory.mktemp("teacher") / "m", tok_dir, seed=1, std=0.05)


@pytest.fixture
def student_cfg(tmp_path):
    """A config.json for a fresh student smaller than the teacher."""
    tiny_config(vocab_size=64, num_hidden_layers=1, hidden_size=32).save_pretrained(tmp_path)
    os.replace(tmp_path / "config.json", tmp_path / "student.json")
    return str(tmp_path / "student.json")


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_chat_jsonl(task_conversations("addition", 24, level=1), str(path))
    return str(path)


def _opts(tmp_path, teacher_dir, student, data=None, **kw):
    base = dict(
        out=str(tmp_path / "kd"), teacher=teacher_dir, student=student, data=[data] if data else [],
        seq_len=127, batch_size=4, max_steps=12, warmup_steps=2, lr=3e-3, eval_every=12,
        eval_batches=2, save_every=6, precision="fp32", plot=False, val_fraction=0.1,
    )  # fmt: skip
    base.update(kw)
    return DistillOptions(**base)


def _metrics(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


# ------------------------------------------------------------------------------ sampler
def test_default_sampler_is_the_engine(tok):  # noqa: F811
    """Teacher and on-policy samples come from the inference engine: greedy equals a plain
    greedy loop over full forwards, a row ends at the tokenizer's stop ids, seeds reproduce."""
    model = random_model(tiny_config(vocab_size=512, max_position_embeddings=64), seed=0)
    prompts = [[5, 6, 7, 8, 9], [3], [10, 11, 12]]
    sample = default_sample_fn(tok)
    got = sample(model, prompts, 6, 0.0, 0)
    for p, g in zip(prompts, got):
        ids = list(p)
        for _ in range(len(g)):
            ids.append(int(model(torch.tensor([ids]), mtp=False).logits[0, -1].argmax()))
        assert g == ids[len(p) :]
        assert len(g) == 6 or g[-1] in stop_ids(tok)
    assert sample(model, prompts, 5, 1.0, 3) == sample(model, prompts, 5, 1.0, 3)


# ------------------------------------------------------------------------------ logit mode
def test_logit_distillation_end_to_end(tmp_path, teacher_dir, student_cfg, chat_file):
    opts = _opts(tmp_path, teacher_dir, student_cfg, chat_file, loss="jsd", beta=0.5)
    last = run_distill(opts, progress=False)
    rec = _metrics(opts.out)
    assert len(rec) == 12 and last["val_loss"] is not None
    assert {"kd_loss", "main_loss", "mtp_loss_1"} <= set(rec[0])
    assert rec[-1]["kd_loss"] < 0.7 * rec[0]["kd_loss"]  # the student moves to the teacher
    student = load(os.path.join(opts.out, "model"))
    assert student.config.hidden_size == 32 and student.config.vocab_size == 512
    assert (
        Tokenizer.load(os.path.join(opts.out, "model")).vocab_size
        == Tokenizer.load(teacher_dir).vocab_size
    )
    info = json.load(open(os.path.join(opts.out, "teacher_eval.json")))
    assert info["teacher_val_loss"] > 0


def test_onpolicy_mix_resumes_exactly(tmp_path, teacher_dir, student_cfg, chat_file, monkeypatch):
    """A run killed after its step-3 checkpoint and resumed logs the same losses as one that
    ran through: the data position, the on-policy draws and the RNG all come back."""

    def fake_sample(model, prompt_ids, max_new_tokens, temperature, seed):
        return [[30 + (seed + i) % 50, 31, 1] for i in range(len(prompt_ids))]

    kw = dict(loss="forward_kl", onpolicy_frac=0.5, max_steps=6, save_every=3, eval_every=0)
    full = _opts(tmp_path, teacher_dir, student_cfg, chat_file, out=str(tmp_path / "f"), **kw)
    run_distill(full, progress=False, sample_fn=fake_sample)
    assert 0 < _metrics(full.out)[-1]["onpolicy_batches"] < 6

    import nanoseek.train.loop as loop

    class Stop(Exception):
        pass

    original = loop.Trainer.save

    def save_then_stop(self):
        path = original(self)
        if self.step == 3:
            raise Stop
        return path

    half = _opts(tmp_path, teacher_dir, student_cfg, chat_file, out=str(tmp_path / "h"), **kw)
    monkeypatch.setattr(loop.Trainer, "save", save_then_stop)
    with pytest.raises(Stop):
        run_distill(half, progress=False, sample_fn=fake_sample)
    monkeypatch.setattr(loop.Trainer, "save", original)
    run_distill(half, resume=True, progress=False, sample_fn=fake_sample)
    assert [r["loss"] for r in _metrics(half.out)] == [r["loss"] for r in _metrics(full.out)]


def test_onpolicy_batches_label_only_generated_tokens(tok, tmp_path):  # noqa: F811
    examples = [encode_chat(tok, m, w) for w, m in task_conversations("addition", 12, level=1)]

    def ds():
        return SFTDataset(examples, seq_len=95, batch_size=3, pad_id=tok.pad_id, seed=0)

    prompts = [ex.ids[: ex.prompt_len] for ex in examples]
    calls = []

    def fake_sample(model, prompt_ids, max_new_tokens, temperature, seed):
        calls.append((model, len(prompt_ids), max_new_tokens, temperature))
        return [[40 + i, 41, tok.eos_id] for i in range(len(prompt_ids))]

    student = object()
    data = OnPolicyData(ds(), prompts, student, 1.0, fake_sample, max_new_tokens=8,
                        temperature=0.7, batch_size=3, seq_len=95, pad_id=tok.pad_id, seed=5)  # fmt: skip
    b = next(data)
    assert calls == [(student, 3, 8, 0.7)]
    for r in range(3):
        labelled = b.labels[r][b.labels[r] != IGNORE_INDEX].tolist()
        assert labelled == [40 + r, 41, tok.eos_id]
        start = int((b.labels[r] != IGNORE_INDEX).nonzero()[0])
        assert tok.decode(b.tokens[r, :start].tolist()).endswith("<｜Assistant｜>")  # a prompt
    assert (b.targets(0) != IGNORE_INDEX).sum() == 9
    # lambda = 0.5: a deterministic mix, resumable from the state dict
    mixed = OnPolicyData(ds(), prompts, student, 0.5, fake_sample, max_new_tokens=8,
                         temperature=1.0, batch_size=3, seq_len=95, pad_id=tok.pad_id, seed=5)  # fmt: skip
    kinds = []
    for _ in range(8):
        n = len(calls)
        next(mixed)
        kinds.append(len(calls) > n)
    assert 0 < sum(kinds) < 8 and mixed.stats()["onpolicy_batches"] == sum(kinds)
    state = mixed.state_dict()
    twin = OnPolicyData(ds(), prompts, student, 0.5, fake_sample, max_new_tokens=8,
                        temperature=1.0, batch_size=3, seq_len=95, pad_id=tok.pad_id, seed=5)  # fmt: skip
    twin.load_state_dict(state)
    for _ in range(4):
        assert torch.equal(next(mixed).tokens, next(twin).tokens)


def test_onpolicy_run_with_the_default_sampler(tmp_path, teacher_dir, student_cfg, chat_file):
    opts = _opts(tmp_path, teacher_dir, student_cfg, chat_file, loss="reverse_kl",
                 onpolicy_frac=1.0, max_new_tokens=4, max_steps=2, save_every=100,
                 eval_every=0)  # fmt: skip
    run_distill(opts, progress=False)
    rec = _metrics(opts.out)
    assert rec[-1]["onpolicy_batches"] == 2 and 0 < rec[-1]["onpolicy_gen_len"] <= 4
    with pytest.raises(ConfigError, match="needs prompts"):
        text = tmp_path / "text.txt"
        text.write_text("What is 1 + 2? 3. " * 30)
        run_distill(_opts(tmp_path, teacher_dir, student_cfg, str(text), onpolicy_frac=0.5,
                          out=str(tmp_path / "t")), progress=False)  # fmt: skip


# ------------------------------------------------------------------------------ sequence mode
def test_sequence_level_distillation(tmp_path, teacher_dir, student_cfg, tok):  # noqa: F811
    task = get_task("addition")

    def teacher_fn(model, prompt_ids, max_new_tokens, temperature, seed):
        """A scripted 'teacher': right, wrong, duplicate and unfinished answers."""
        out = []
        for i, ids in enumerate(prompt_ids):
            question = tok.decode(ids).split("<｜User｜>")[1].split("<｜Assistant｜>")[0]
            p = next(q for q in problems if q.question == question)
            text = format_completion(p)
            kind = (seed + i) % 4
            if kind == 1:
                text = text.replace(f"<answer>{p.answer}</answer>", "<answer>-1</answer>")
            ids = tok.encode(text)
            out.append(ids[:3] if kind == 3 else ids + [tok.eos_id])
        return out

    problems = task.generate(6, "train", seed=0, level=1)
    opts = _opts(tmp_path, teacher_dir, student_cfg, task="addition", seed=0,
                 task_n=6, task_level=1, mode="sequence", samples_per_prompt=4, batch_size=4,
                 max_steps=3, save_every=100, eval_every=0, val_fraction=0.0)  # fmt: skip
    run_distill(opts, progress=False, sample_fn=teacher_fn)
    counts = json.load(open(os.path.join(opts.out, "teacher_samples.json")))
    n = len({p.id for p in problems})  # a repeated problem is asked once
    assert counts["prompts"] == n and counts["samples"] == 4 * n
    assert counts["truncated"] == counts["wrong"] == counts["duplicates"] == n
    assert counts["kept"] == counts["prompts_kept"] == n and counts["ill_formed"] == 0
    kept = [m for _, m in read_chat_jsonl(os.path.join(opts.out, "teacher_samples.jsonl"))]
    for messages in kept:
        p = next(q for q in problems if q.question == messages[-2]["content"])
        assert messages[-1]["content"] == "<think>\n" + format_completion(p)
        assert EOS not in messages[-1]["content"]
    assert len(_metrics(opts.out)) == 3  # the student was SFT'ed on them
    student = load(os.path.join(opts.out, "model"))
    assert student.config.hidden_size == 32
    assert os.path.exists(os.path.join(opts.out, "student_init", "tokenizer.json"))


# ------------------------------------------------------------------------------ bad input
def test_bad_options_and_tokenizer_mismatch(tmp_path, teacher_dir, student_cfg, chat_file):
    with pytest.raises(ConfigError, match="valid|one of"):
        run_distill(_opts(tmp_path, teacher_dir, student_cfg, chat_file, loss="kl"))
    with pytest.raises(ConfigError, match="needs --task"):
        run_distill(_opts(tmp_path, teacher_dir, student_cfg, chat_file, mode="sequence"))
    with pytest.raises(ConfigError, match="neither a checkpoint directory, a preset"):
        run_distill(_opts(tmp_path, teacher_dir, "nonesuch", chat_file), progress=False)
    other = tmp_path / "other"
    from nanoseek.data.corpus import generate_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    train_tokenizer(list(generate_corpus(100, seed=9)), 400, other / "tok")
    student_dir = make_model_dir(other / "student", other / "tok")
    with pytest.raises(ConfigError, match="another tokenizer than the teacher"):
        run_distill(_opts(tmp_path, teacher_dir, student_dir, chat_file), progress=False)


def test_cli_distill(tmp_path, teacher_dir, student_cfg, chat_file, capsys):
    out = tmp_path / "cli"
    args = ["distill", "--teacher", teacher_dir, "--student", student_cfg, "--data", chat_file,
            "--out", str(out), "--max_steps=2", "--seq_len=64", "--batch_size=2",
            "--precision=fp32", "--plot=false", "--loss=reverse_kl", "--temperature=2"]  # fmt: skip
    assert main(args) == 0
    assert "done: step 2" in capsys.readouterr().out
    assert main([*args[:-1], "--loss=kl"]) == 2
    err = capsys.readouterr().err
    assert "option 'loss' must be one of" in err and "Traceback" not in err
