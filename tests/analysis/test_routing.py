"""Routing analytics (nanoseek/analysis/routing.py) and `nanoseek routing`, on a tiny random model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import random_model, tiny_config

from nanoseek import save
from nanoseek.analysis.routing import (
    collect_routing,
    pad_batch,
    read_labelled,
    specialisation,
    task_divergence,
    token_windows,
    top_experts,
    write_outputs,
)
from nanoseek.cli import main
from nanoseek.data.corpus import generate_corpus
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random MoE checkpoint (2 MoE layers x 8 experts, top-2) with its tokenizer."""
    root = tmp_path_factory.mktemp("routing")
    texts = list(generate_corpus(200, seed=1))
    train_tokenizer(texts, 320, root / "tok")
    model = random_model(tiny_config(vocab_size=320, max_position_embeddings=64))
    files = [root / "tok" / "tokenizer.json", root / "tok" / "tokenizer_config.json"]
    save(model, root / "model", extra_files=files)
    return root / "model"


@pytest.fixture(scope="module")
def loaded(model_dir):
    from nanoseek import load

    return load(model_dir), Tokenizer.load(model_dir)


def docs(task: str, n: int = 40, seed: int = 0) -> list[str]:
    return list(generate_corpus(n, seed, tasks=(task,), split="test"))


# ------------------------------------------------------------------------------ counting
def test_counts_sum_to_tokens_times_top_k(loaded):
    model, tok = loaded
    stats = collect_routing(
        model,
        tok,
        {"arithmetic": docs("arithmetic"), "countdown": docs("countdown")},
        max_tokens=300,
        batch_size=4,
        seq_len=48,
    )
    S, L, E = stats.counts.shape
    assert (S, L, E) == (2, 2, 8) and stats.counts.dtype == torch.int64
    assert stats.layers == [1, 2] and stats.top_k == 2
    assert stats.tokens == [300, 300]
    for s in range(S):
        assert stats.counts[s].sum(-1).tolist() == [stats.tokens[s] * stats.top_k] * L


def test_padding_is_excluded(loaded):
    """Batches of windows of different lengths are right-padded: the counts must equal those of
    running one window at a time (no padding at all)."""
    model, tok = loaded
    data = {"linear_equation": docs("linear_equation", 12)}
    windows, _ = token_windows(tok, data["linear_equation"], 40, 400)
    assert len({len(w) for w in windows}) > 1  # so batches of 6 really hold padding
    padded = collect_routing(model, tok, data, max_tokens=400, batch_size=6, seq_len=40)
    single = collect_routing(model, tok, data, max_tokens=400, batch_size=1, seq_len=40)
    assert torch.equal(padded.counts, single.counts)
    assert padded.counts[0].sum(-1).tolist() == [400 * 2] * 2


def test_token_windows_and_padding_helpers(loaded):
    _, tok = loaded
    windows, n_docs = token_windows(tok, ["1+2=3", "x" * 50, "never read"], 16, 30)
    assert n_docs == 2 and sum(map(len, windows)) == 30 and max(map(len, windows)) <= 16
    assert windows[0][0] == tok.bos_id and windows[0][-1] == tok.eos_id
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2]]
    assert mask.tolist() == [[True] * 3, [True, False, False]]


def test_identical_tasks_score_zero(loaded):
    model, tok = loaded
    same = docs("countdown", 20)
    stats = collect_routing(model, tok, {"a": same, "b": list(same)}, 250, 4, 48)
    assert torch.equal(stats.counts[0], stats.counts[1])
    assert specialisation(stats.counts).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)


def test_model_restored_to_training_mode(loaded):
    model, tok = loaded
    model.train()
    collect_routing(model, tok, {"a": docs("arithmetic", 4)}, 50, 2, 32)
    assert model.training
    assert all(not m.gate._forward_hooks for m in model.moe_layers())  # hooks removed
    model.eval()


# ------------------------------------------------------------------------------ the score
def test_disjoint_experts_score_one():
    counts = torch.tensor([[[10, 30, 0, 0]], [[0, 0, 7, 1]]])  # [S=2,L=1,E=4]
    assert specialisation(counts).tolist() == pytest.approx([1.0])
    three = torch.tensor([[[5, 0, 0]], [[0, 9, 0]], [[0, 0, 2]]])
    assert specialisation(three).tolist() == pytest.approx([1.0])


def test_score_by_hand_and_weighting():
    # p1 = (1, 0), p2 = (1/2, 1/2), m = (3/4, 1/4): mean KL / ln 2
    kl1 = math.log(1 / 0.75)
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    want = (kl1 + kl2) / 2 / math.log(2)
    counts = torch.tensor([[[4, 0], [3, 3]], [[2, 2], [3, 3]]])  # layer 2: identical
    assert specialisation(counts).tolist() == pytest.approx([want, 0.0])
    assert task_divergence(counts)[:, 0].tolist() == pytest.approx(
        [kl1 / math.log(2), kl2 / math.log(2)]
    )
    # every task weighs the same, however many tokens it ran
    assert torch.allclose(
        specialisation(counts * torch.tensor([1, 7])[:, None, None]), specialisation(counts)
    )


def test_score_needs_two_tasks_with_tokens():
    with pytest.raises(ValueError, match="two tasks"):
        specialisation(torch.ones(1, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no routed tokens"):
        specialisation(torch.tensor([[[1, 2]], [[0, 0]]]))


def test_top_experts():
    top = top_experts(torch.tensor([[[1, 6, 3]]]), n=2)
    assert [e for e, _ in top[0][0]] == [1, 2]
    assert top[0][0][0][1] == pytest.approx(0.6)


# ------------------------------------------------------------------------------ files
def test_read_labelled_groups_by_field_then_file(tmp_path):
    lines = [{"text": "1+1", "task": "add"}, {"text": "2*3", "task": "mul"}, {"text": "4+4"}]
    (tmp_path / "mix.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "prose.txt").write_text("once upon a time")
    got = read_labelled([tmp_path / "mix.jsonl", tmp_path / "prose.txt"])
    assert got == {"add": ["1+1"], "mul": ["2*3"], "mix": ["4+4"], "prose": ["once upon a time"]}


def test_png_and_json_written(loaded, tmp_path):
    model, tok = loaded
    data = {"arithmetic": docs("arithmetic", 10), "countdown": docs("countdown", 10)}
    stats = collect_routing(model, tok, data, 120, 4, 48)
    json_path, png_path = write_outputs(stats, tmp_path / "out")
    with open(png_path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    d = json.load(open(json_path))
    assert d["tokens"] == {"arithmetic": 120, "countdown": 120}
    assert sum(d["counts"]["countdown"][0]) == 240
    assert set(d["specialisation"]["layers"]) == {"1", "2"}


# ------------------------------------------------------------------------------ CLI
def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_tasks_table_and_png(model_dir, tmp_path, capsys):
    code, out, err = run(
        capsys, "routing", model_dir, "--tasks", "arithmetic", "countdown",
        "--max-tokens", "150", "--seq-len", "48", "--out", tmp_path / "r",
    )  # fmt: skip
    assert code == 0, err
    assert "layer 1  specialisation" in out and "layer 2  specialisation" in out
    assert "arithmetic" in out and "countdown" in out and "routing.png" in out
    assert (tmp_path / "r" / "routing.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_json_from_files(model_dir, tmp_path, capsys):
    lines = [{"text": t, "task": "arith"} for t in docs("arithmetic", 5)]
    lines += [{"text": t, "task": "lin"} for t in docs("linear_equation", 5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, out, err = run(
        capsys, "routing", model_dir, "--data", tmp_path / "d.jsonl", "--json",
        "--max-tokens", "100",
    )  # fmt: skip
    assert code == 0, err
    d = json.loads(out)
    assert d["tasks"] == ["arith", "lin"] and d["tokens"] == {"arith": 100, "lin": 100}
    assert [sum(row) for row in d["counts"]["lin"]] == [200, 200]
    assert 0.0 <= d["specialisation"]["layers"]["1"] <= 1.0


def assert_user_error(capsys, argv, *words) -> None:
    code, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("nanoseek: error: "), err
    for w in words:
        assert w in lines[0]


def test_cli_user_errors(model_dir, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert_user_error(capsys, ["routing", missing, "--tasks", "countdown"], str(missing))
    assert_user_error(capsys, ["routing", model_dir], "no data")
    assert_user_error(capsys, ["routing", model_dir, "--tasks", "chess"], "unknown task")
    assert_user_error(capsys, ["routing", model_dir, "--data", missing], str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(capsys, ["routing", empty, "--tasks", "countdown"], "tokenizer.json")
    assert_user_error(capsys, ["routing", model_dir, "--tasks", "countdown", "--max-tokens", "0"])
