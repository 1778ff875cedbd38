"""SFT: assistant-only labels, packing without cross-conversation targets, bad input, a run."""

import json
import os
import re

import pytest
import torch

from nanoseek import CausalLM, load, save
from nanoseek.checkpoint.trainer_state import checkpoint_dirs
from nanoseek.cli import main
from nanoseek.data.corpus import generate_corpus
from nanoseek.data.tokenizer import EOS, Tokenizer, train_tokenizer
from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.tasks import format_chat, get_task
from nanoseek.train.sft import SFTOptions, run_sft
from nanoseek.train.sft_data import (
    DataStats,
    Example,
    SFTDataError,
    SFTDataset,
    encode_chat,
    fit_to_context,
    load_examples,
    pack_rows,
    read_chat_jsonl,
    split_examples,
    task_conversations,
    write_chat_jsonl,
)
from tests.helpers import tiny_config

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<think>\n2 + 3 = 5</think> <answer>5</answer>"},
    {"role": "user", "content": "And times 2?"},
    {"role": "assistant", "content": "10"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(list(generate_corpus(300, seed=0)), 512, d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def make_model_dir(path, tok_dir, seed=0, std=None, **cfg):
    """A tiny random checkpoint with the test tokenizer beside it (`std`: wider weights give
    peaked, far-from-uniform next-token distributions)."""
    torch.manual_seed(seed)
    base = dict(vocab_size=512, num_hidden_layers=2, max_position_embeddings=256)
    model = CausalLM(tiny_config(**{**base, **cfg}))
    if std is not None:
        model.init_weights(std=std)
    files = [os.path.join(tok_dir, f) for f in ("tokenizer.json", "tokenizer_config.json")]
    save(model, path, extra_files=files)
    return str(path)


def labelled_spans(tok, ids, labels):
    """Decoded runs of consecutive labelled tokens."""
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i  # labels are the ids themselves (shifted when batches are read)
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


# ------------------------------------------------------------------------------ labels
def test_labels_only_on_assistant_tokens(tok):
    ex = encode_chat(tok, CONV, "x:1")
    assert ex.ids == tok.apply_chat_template(CONV)  # exactly the chat template's tokens
    assert labelled_spans(tok, ex.ids, ex.labels) == [
        CONV[2]["content"] + EOS,  # the content and the eos that ends the turn ...
        CONV[4]["content"] + EOS,
    ]
    # ... and never the system text, the user turns or the <｜Assistant｜> markers
    prompt = tok.decode(ex.ids[: ex.prompt_len])
    assert prompt.endswith("<｜Assistant｜>") and "Be brief." in prompt


def test_prompt_completion_lines_and_task_conversations(tok, tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi", "completion": "Hello", "system": "S"}) + "\n\n"
        + json.dumps({"messages": CONV}) + "\n"
    )  # fmt: skip
    convs = list(read_chat_jsonl(path))
    assert [w for w, _ in convs] == [f"{path}:1", f"{path}:3"]  # blank line skipped, counted
    assert convs[0][1] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    # task data: the worked solution, in the format a generation continues
    (where, messages), *_ = task_conversations("addition", 3, level=2)
    p = get_task("addition").generate(1, level=2)[0]
    assert messages == format_chat(p) and where.startswith("task addition")
    ex = encode_chat(tok, messages)
    (span,) = labelled_spans(tok, ex.ids, ex.labels)
    assert span.startswith("<think>\n") and span.endswith(f"<answer>{p.answer}</answer>{EOS}")
    assert tok.decode(ex.ids[: ex.prompt_len + 2]).endswith("<｜Assistant｜><think>\n")
    out = tmp_path / "task.jsonl"
    assert write_chat_jsonl(task_conversations("addition", 3), str(out)) == 3
    assert [m for _, m in read_chat_jsonl(out)] == [m for _, m in task_conversations("addition", 3)]


@pytest.mark.parametrize(
    "line, words",
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "hi"}', "expected 'messages'"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "needs a 'role'"),
        ('{"messages": [{"role": "user", "content": 5}]}', "string 'content'"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
        ('{"prompt": "q", "completion": null}', "'completion' must be a string"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + line + "\n")
    with pytest.raises(SFTDataError, match=words) as err:
        list(read_chat_jsonl(path))
    assert f"{path}:3:" in str(err.value)


def test_system_message_must_come_first(tok):
    late = [CONV[1], CONV[2], {"role": "system", "content": "late"}]
    with pytest.raises(SFTDataError, match="system messages must come first"):
        encode_chat(tok, late, "f:2")


# ------------------------------------------------------------------------------ overlong
def test_overlong_policies(tok):
    ex = encode_chat(tok, CONV, "f:7")
    n, p = len(ex.ids), ex.prompt_len
    stats = DataStats()
    cut = fit_to_context(ex, n - 3, "truncate", stats)
    assert cut.ids == ex.ids[: n - 3] and stats.truncated == 1
    assert fit_to_context(ex, n - 3, "drop", stats) is None and stats.dropped == 1
    assert fit_to_context(ex, n, "error", stats) is ex  # fits exactly
    with pytest.raises(SFTDataError, match=r"f:7: the conversation is \d+ tokens"):
        fit_to_context(ex, n - 1, "error", stats)
    # a prompt that leaves no room for one target is an error even when truncating
    with pytest.raises(SFTDataError, match=rf"f:7: the prompt is {p} tokens .* overlong=drop"):
        fit_to_context(ex, p, "truncate", stats)
    assert fit_to_context(ex, p, "drop", stats) is None
    assert fit_to_context(ex, p + 1, "truncate", stats).n_labels == 1


def test_prompt_longer_than_context_in_a_file(tok, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(
        json.dumps({"prompt": "short", "completion": "ok"}) + "\n"
        + json.dumps({"prompt": "7 " * 200, "completion": "ok"}) + "\n"
    )  # fmt: skip
    with pytest.raises(SFTDataError, match=f"{path}:2: the prompt is"):
        load_examples([path], tok, 64)
    examples, stats = load_examples([path], tok, 64, overlong="drop")
    assert len(examples) == 1 and stats.dropped == 1


# ------------------------------------------------------------------------------ packing
def _examples(tok, n=24):
    convs = task_conversations("arithmetic", n, level=1) + task_conversations(
        "multiplication", n // 2, level=2
    )
    return [encode_chat(tok, m, w) for w, m in convs]


def test_packing_boundaries_and_targets(tok):
    examples = _examples(tok)
    ds = SFTDataset(examples, seq_len=127, batch_size=4, pad_id=tok.pad_id, seed=3)
    seen: dict[int, list[int]] = {}
    for i in range(len(ds)):
        b = ds.batch(0, i)
        assert b.tokens.shape[1] == 128
        for k in (0, 1, 2):  # main loss and two MTP depths
            t = b.targets(k)
            valid = t != IGNORE_INDEX
            rows, pos = valid.nonzero(as_tuple=True)
            # input position and target lie in one conversation, never in padding
            assert (b.doc_ids[rows, pos] == b.doc_ids[rows, pos + k + 1]).all()
            assert (b.doc_ids[rows, pos] >= 0).all()
            assert (t[valid] == b.tokens[:, k + 1 :][valid]).all()
        t0 = b.targets(0)
        for r in range(b.tokens.shape[0]):
            for d in b.doc_ids[r].unique().tolist():
                if d >= 0:
                    where = (b.doc_ids[r] == d).nonzero().flatten()
                    assert (where.diff() == 1).all()  # a conversation is contiguous in its row
                    seen[d] = t0[r, where[:-1]][t0[r, where[:-1]] != IGNORE_INDEX].tolist()
        assert (b.labels[b.doc_ids < 0] == IGNORE_INDEX).all()  # padding carries no label
        assert (b.tokens[b.doc_ids < 0] == tok.pad_id).all()
    # every conversation appears once per epoch and all of its labels are depth-0 targets
    assert sorted(seen) == list(range(len(examples)))
    for d, targets in seen.items():
        ex = examples[d]
        assert targets == [lab for lab in ex.labels if lab != IGNORE_INDEX]
    assert sum(len(r) for r in ds.rows(0)) == len(examples)


def test_pack_rows_first_fit():
    assert pack_rows([5, 5, 3, 2, 10], range(5), 10) == [[0, 1], [4], [2, 3]]
    rows = pack_rows([3] * 7, range(7), 10)
    assert rows == [[0, 1, 2], [3, 4, 5], [6]]


def test_validation_split_follows_the_content():
    """Where a file lives and the order of its lines do not move the split; a duplicate lands
    beside its twin; the seed does move it."""
    exs = [
        Example([i, i + 1, i + 2], [IGNORE_INDEX, i + 1, i + 2], f"/a/x.jsonl:{i}")
        for i in range(400)
    ]
    moved = [Example(e.ids, e.labels, f"/elsewhere/y.jsonl:{k}") for k, e in enumerate(exs[::-1])]
    train, val = split_examples(exs, 0.25, seed=0)
    assert 60 < len(val) < 140 and len(train) + len(val) == 400
    key = lambda part: sorted(tuple(e.ids) for e in part)
    assert key(split_examples(moved, 0.25, seed=0)[1]) == key(val)
    assert key(split_examples(exs, 0.25, seed=1)[1]) != key(val)
    twin = Example(list(val[0].ids), list(val[0].labels), "other.jsonl:1")
    val2 = split_examples([*exs, twin], 0.25, seed=0)[1]
    assert [e.ids for e in val2].count(twin.ids) == 2
    with pytest.raises(SFTDataError, match="val_fraction"):
        split_examples(exs, 1.0)


def test_shuffle_is_deterministic_and_resumes(tok):
    examples = _examples(tok)
    kw = dict(seq_len=127, batch_size=2, pad_id=tok.pad_id)
    a = SFTDataset(examples, seed=1, **kw)
    b = SFTDataset(examples, seed=1, **kw)
    c = SFTDataset(examples, seed=2, **kw)
    first = [next(a).tokens for _ in range(len(a) + 2)]  # crosses into epoch 1
    assert all(torch.equal(x, next(b).tokens) for x in first)
    assert not torch.equal(first[0], next(c).tokens)
    assert a.epoch == 1 and a.rows(1) != SFTDataset(examples, seed=1, **kw).rows(0)
    state = a.state_dict()
    resumed = SFTDataset(examples, seed=1, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(next(a).tokens, next(resumed).tokens) for _ in range(3))
    with pytest.raises(ValueError, match="batch_size was 2, is now 3"):
        SFTDataset(examples, seed=1, **{**kw, "batch_size": 3}).load_state_dict(state)


def test_text_files_label_every_token_and_chunk(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("What is 12 + 30? " * 20)
    examples, stats = load_examples([path], tok, 32)
    assert len(examples) > 1 and all(len(e.ids) <= 32 for e in examples)
    assert examples[0].labels[0] == IGNORE_INDEX and examples[0].labels[1:] == examples[0].ids[1:]
    assert sum(len(e.ids) for e in examples) == len(tok.encode(path.read_text())) + 2
    assert stats.truncated == 0


# ------------------------------------------------------------------------------ runs
def _sft_opts(tmp_path, model_dir, data=None, **kw):
    base = dict(
        out=str(tmp_path / "sft"), model=model_dir, data=[str(data)] if data else [], seq_len=127,
        batch_size=4, max_steps=30, warmup_steps=2, lr=3e-3, eval_every=30, eval_batches=2,
        save_every=15, precision="fp32", plot=False, val_fraction=0.1,
    )  # fmt: skip
    base.update(kw)
    return SFTOptions(**base)


def test_short_sft_run_lowers_loss_and_freezes_router_bias(tmp_path, tok_dir):
    model_dir = make_model_dir(tmp_path / "base", tok_dir)
    data = tmp_path / "chat.jsonl"
    write_chat_jsonl(task_conversations("addition", 40, level=1), str(data))
    opts = _sft_opts(tmp_path, model_dir, data)
    last = run_sft(opts, progress=False)
    rec = [json.loads(x) for x in open(os.path.join(opts.out, "metrics.jsonl"))]
    assert len(rec) == 30 and "mtp_loss_1" in rec[0] and last["val_loss"] is not None
    assert rec[-1]["main_loss"] < 0.6 * rec[0]["main_loss"]  # it learns its data
    assert [s for s, _ in checkpoint_dirs(opts.out)] == [15, 30]
    out = os.path.join(opts.out, "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert os.path.exists(os.path.join(out, f))
    before, after = load(model_dir), load(out)
    for m0, m1 in zip(before.moe_layers(), after.moe_layers()):
        assert torch.equal(m0.gate.e_score_correction_bias, m1.gate.e_score_correction_bias)
    assert not torch.equal(before.mtp[0].eh_proj.weight, after.mtp[0].eh_proj.weight)
    assert Tokenizer.load(out).fingerprint == Tokenizer.load(tok_dir).fingerprint
    assert json.load(open(os.path.join(opts.out, "data_stats.json")))["examples"] == 40


def test_sft_without_mtp_and_with_epochs(tmp_path, tok_dir, capsys):
    model_dir = make_model_dir(tmp_path / "base", tok_dir)
    opts = _sft_opts(tmp_path, model_dir, task="addition", task_n=16, task_level=1,
                     mtp_lambda=0.0, epochs=2, save_every=100, val_fraction=0.0)  # fmt: skip
    run_sft(opts, progress=False)
    per_epoch = int(re.search(r"(\d+) batches/epoch", capsys.readouterr().err).group(1))
    rec = [json.loads(x) for x in open(os.path.join(opts.out, "metrics.jsonl"))]
    assert "mtp_loss_1" not in rec[0]
    assert len(rec) == 2 * per_epoch == json.load(open(f"{opts.out}/options.json"))["max_steps"]
    before, after = load(model_dir), load(os.path.join(opts.out, "model"))
    assert torch.equal(before.mtp[0].eh_proj.weight, after.mtp[0].eh_proj.weight)


def test_cli_sft(tmp_path, tok_dir, capsys):
    model_dir = make_model_dir(tmp_path / "base", tok_dir)
    data = tmp_path / "chat.jsonl"
    write_chat_jsonl(task_conversations("addition", 8, level=1), str(data))
    out = tmp_path / "run"
    args = ["sft", "--model", model_dir, "--data", str(data), "--out", str(out),
            "--max_steps=2", "--seq_len=64", "--batch_size=2", "--precision=fp32",
            "--plot=false", "--val_fraction=0"]  # fmt: skip
    assert main(args) == 0
    assert "done: step 2" in capsys.readouterr().out
    assert os.path.exists(out / "model" / "model.safetensors")
    with open(data, "a") as f:
        f.write('{"prompt": "q"}\n')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek: error: ") and f"{data}:9:" in err and "Traceback" not in err
    assert main(["sft", "--model", model_dir, "--out", str(out)]) == 2
    assert "no data" in capsys.readouterr().err
    assert main(["sft", "--model", model_dir, "--task", "adition", "--out", str(out)]) == 2
    assert "valid tasks: addition" in capsys.readouterr().err


def test_sft_in_fp8_converts_the_layers_and_saves_a_normal_checkpoint(tmp_path, tok_dir, capsys):
    """precision=fp8 is not only pre-training's: the shared Trainer converts the model."""
    from nanoseek.fp8.linear import FP8Linear
    from nanoseek.train.loop import LoopOptions, Trainer

    model_dir = make_model_dir(tmp_path / "base", tok_dir)
    data = tmp_path / "chat.jsonl"
    write_chat_jsonl(task_conversations("addition", 12, level=1), str(data))
    opts = _sft_opts(tmp_path, model_dir, data, precision="fp8", max_steps=3, eval_every=3)
    last = run_sft(opts, progress=False)
    assert "FP8" in capsys.readouterr().err and last["loss"] == last["loss"]  # report, not NaN
    out = load(os.path.join(opts.out, "model"))  # plain nn.Linear keys and full precision
    assert not any(isinstance(m, FP8Linear) for m in out.modules())
    assert set(out.state_dict()) == set(load(model_dir).state_dict())
    # an already converted model (pre-training converts before sharding) is left as it is
    model = load(model_dir)
    Trainer(model, LoopOptions(out=str(tmp_path / "t"), precision="fp8"), None, [])
    n = sum(isinstance(m, FP8Linear) for m in model.modules())
    Trainer(model, LoopOptions(out=str(tmp_path / "t"), precision="fp8"), None, [])
    assert n > 0 and sum(isinstance(m, FP8Linear) for m in model.modules()) == n
