"""Token shards and packed batches: the stream is bos+doc+eos per document, splits are disjoint
by document and fixed by the seed, batches are deterministic and resumable, and the depth-k
masks keep MTP targets inside the input's document."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek.data.shards import (
    IGNORE_INDEX,
    Batch,
    PackedDataset,
    ShardWriter,
    TokenShard,
    depth_mask,
    depth_targets,
    token_dtype,
    write_shards,
)
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def documents(n: int = 400) -> list[str]:
    """Distinct documents of varied length (tinyshakespeare paragraphs when available), each
    tagged with its index so a decoded document tells where it came from."""
    if SHAKESPEARE.is_file():
        paras = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    else:
        rng = random.Random(0)
        words = "the king shall speak to my lord and thou art".split()
        paras = [" ".join(rng.choices(words, k=rng.randint(3, 80))) for _ in range(n)]
    return [f"#{i}\n{paras[i % len(paras)]}" for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(documents(), 512)


@pytest.fixture(scope="module")
def shard_dir(tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(documents(), tok, out, val_fraction=0.2, seed=3, docs_per_batch=64)
    return out


def split_docs(tok: Tokenizer, shard: TokenShard) -> list[str]:
    docs = []
    for i in range(shard.n_docs):
        d = shard.document(i)
        assert d[0] == tok.bos_id and d[-1] == tok.eos_id
        docs.append(tok.decode(d[1:-1].tolist()))
    return docs


def test_stream_is_concatenation_of_wrapped_documents(tok, tmp_path):
    docs = documents(50)
    meta = write_shards(docs, tok, tmp_path, docs_per_batch=7)["train"]
    shard = TokenShard.open(tmp_path, "train", tokenizer=tok)
    wrapped = [tok.encode(d, add_bos=True, add_eos=True) for d in docs]
    assert shard.tokens.tolist() == [t for w in wrapped for t in w]
    assert shard.doc_starts.tolist() == np.cumsum([0] + [len(w) for w in wrapped]).tolist()
    assert shard.tokens.dtype == np.uint16 == token_dtype(tok.vocab_size)
    assert (meta["n_docs"], meta["n_tokens"]) == (50, sum(map(len, wrapped)))
    assert meta["tokenizer_hash"] == tok.fingerprint and meta["vocab_size"] == tok.vocab_size
    assert split_docs(tok, shard) == docs


def test_packed_windows_cover_the_stream_in_order(tok, tmp_path):
    write_shards(documents(60), tok, tmp_path)
    shard = TokenShard.open(tmp_path)
    T, B = 16, 3
    ds = PackedDataset(shard, T, B, shuffle=False, loop=False)
    batches = list(ds)
    assert len(batches) == len(ds) == ds.n_windows // B
    assert ds.n_windows == (shard.n_tokens - 1) // T
    tokens = torch.cat([b.tokens for b in batches])  # [N,T+1]
    assert tokens.dtype == torch.int64 and tokens.shape[1] == T + 1
    n = tokens.shape[0] * T
    assert tokens[:, :-1].reshape(-1).tolist() == shard.tokens[:n].tolist()
    assert torch.equal(tokens[:-1, -1], tokens[1:, 0])  # windows overlap by one token
    # document ids: the document holding each position, found the slow way
    doc_of = np.repeat(np.arange(shard.n_docs), np.diff(shard.doc_starts))
    doc_ids = torch.cat([b.doc_ids for b in batches])
    assert doc_ids[:, :-1].reshape(-1).tolist() == doc_of[:n].tolist()
    bos = tokens == tok.bos_id  # a new document begins exactly where a bos sits
    assert torch.equal(bos[:, 1:], doc_ids[:, 1:] != doc_ids[:, :-1])


def test_train_val_disjoint_by_document_and_fixed_by_seed(tok, shard_dir, tmp_path):
    train, val = TokenShard.open(shard_dir, "train"), TokenShard.open(shard_dir, "val")
    tr, va = split_docs(tok, train), split_docs(tok, val)
    assert not set(tr) & set(va)
    assert sorted(tr + va) == sorted(documents())
    assert 0.1 < len(va) / (len(tr) + len(va)) < 0.3  # val_fraction 0.2 in expectation
    # same seed, other batching -> byte-identical files; another seed -> another split
    write_shards(documents(), tok, tmp_path / "same", val_fraction=0.2, seed=3, docs_per_batch=1000)
    for name in ("train.bin", "train.idx", "val.bin", "val.idx"):
        assert (tmp_path / "same" / name).read_bytes() == (shard_dir / name).read_bytes()
    write_shards(documents(), tok, tmp_path / "other", val_fraction=0.2, seed=4)
    assert split_docs(tok, TokenShard.open(tmp_path / "other", "val")) != va


def test_empty_val_split_raises(tok, tmp_path):
    with pytest.raises(ValueError, match="split 'val' got no documents out of 2"):
        write_shards(["a", "b"], tok, tmp_path, val_fraction=0.01)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind
    with pytest.raises(ValueError, match="no documents"):
        write_shards([], tok, tmp_path)


def test_shuffle_is_deterministic_by_seed_and_epoch(shard_dir):
    shard = TokenShard.open(shard_dir)
    a, b = PackedDataset(shard, 32, 4, seed=7), PackedDataset(shard, 32, 4, seed=7)
    c = PackedDataset(shard, 32, 4, seed=8)
    for _ in range(len(a) + 3):  # runs into the second epoch
        x, y, z = next(a), next(b), next(c)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.doc_ids, y.doc_ids)
    assert a.epoch == 1
    assert not torch.equal(x.tokens, z.tokens)
    assert sorted(a.order(0).tolist()) == list(range(a.n_windows))
    assert not np.array_equal(a.order(0), a.order(1))


def test_resume_yields_the_same_remaining_batches(shard_dir):
    shard = TokenShard.open(shard_dir)
    ref = PackedDataset(shard, 64, 8, seed=1)
    n_epoch = len(ref)
    n = n_epoch + 4  # resume point and the rest straddle an epoch boundary
    want = [next(ref) for _ in range(2 * n)]
    first = PackedDataset(shard, 64, 8, seed=1)
    got = [next(first) for _ in range(n)]
    state = first.state_dict()
    resumed = PackedDataset(TokenShard.open(shard_dir), 64, 8, seed=1)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(n)]
    for w, g in zip(want, got):
        assert torch.equal(w.tokens, g.tokens) and torch.equal(w.doc_ids, g.doc_ids)
    with pytest.raises(ValueError, match="cannot resume: seq_len was 64, is now 32"):
        PackedDataset(shard, 32, 8, seed=1).load_state_dict(state)


def test_resume_mid_epoch_exact_counts(shard_dir):
    """The brief's case: 10 batches straight vs 5, state_dict, a new loader, 5 more."""
    shard = TokenShard.open(shard_dir)
    ref = PackedDataset(shard, 16, 2, seed=5)
    straight = [next(ref) for _ in range(10)]
    a = PackedDataset(shard, 16, 2, seed=5)
    half = [next(a) for _ in range(5)]
    b = PackedDataset(shard, 16, 2, seed=5)
    b.load_state_dict(a.state_dict())
    for x, y in zip(straight, half + [next(b) for _ in range(5)]):
        assert torch.equal(x.tokens, y.tokens)


def test_loop_false_stops_each_epoch(shard_dir):
    ds = PackedDataset(TokenShard.open(shard_dir, "val"), 16, 4, loop=False)
    first, second = list(ds), list(ds)
    assert len(first) == len(second) == len(ds)
    assert (ds.epoch, ds.index) == (2, 0)
    assert not all(torch.equal(x.tokens, y.tokens) for x, y in zip(first, second))


def test_ranks_take_disjoint_windows(shard_dir):
    shard = TokenShard.open(shard_dir)
    seen = []
    for rank in range(3):
        ds = PackedDataset(shard, 32, 2, seed=2, rank=rank, world_size=3, loop=False)
        seen.append({tuple(row) for b in ds for row in b.tokens.tolist()})
    assert not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2])


def test_two_shards_in_one_dataset(tok, shard_dir):
    train, val = TokenShard.open(shard_dir, "train"), TokenShard.open(shard_dir, "val")
    ds = PackedDataset([train, val], 32, 4, shuffle=False, loop=False)
    rows = torch.cat([b.tokens for b in ds])
    n_train = (train.n_tokens - 1) // 32
    assert torch.equal(rows[n_train, :-1], torch.from_numpy(val.tokens[:32].astype(np.int64)))
    doc_ids = torch.cat([b.doc_ids for b in ds])
    assert doc_ids[n_train, 0] == train.n_docs  # document ids continue across shards


# ----------------------------------------------------------------------------- depth masks
def test_depth_masks_on_hand_built_example():
    # documents:  [ b  x  y  e ][ b  z  e ][ b  w ...
    tokens = torch.tensor([[0, 10, 11, 1, 0, 12, 1, 0, 13]])
    doc_ids = torch.tensor([[5, 5, 5, 5, 6, 6, 6, 7, 7]])
    # depth 0 (main loss): every next-token pair except eos -> bos
    assert depth_mask(doc_ids, 0).int().tolist() == [[1, 1, 1, 0, 1, 1, 0, 1]]
    # depth 1: i, i+1, i+2 in one document
    assert depth_mask(doc_ids, 1).int().tolist() == [[1, 1, 0, 0, 1, 0, 0]]
    # depth 2: i..i+3 in one document
    assert depth_mask(doc_ids, 2).int().tolist() == [[1, 0, 0, 0, 0, 0]]
    X = IGNORE_INDEX
    assert depth_targets(tokens, doc_ids, 1).tolist() == [[11, 1, X, X, 1, X, X]]
    assert depth_targets(tokens, doc_ids, 2).tolist() == [[1, X, X, X, X, X]]
    batch = Batch(tokens, doc_ids)
    assert batch.inputs.tolist() == [[0, 10, 11, 1, 0, 12, 1, 0]]
    assert batch.targets(0).tolist() == [[10, 11, 1, X, 12, 1, X, 13]]
    assert batch.targets(0, mask_documents=False).tolist() == [[10, 11, 1, 0, 12, 1, 0, 13]]


def test_targets_align_with_model_outputs(tok, shard_dir):
    """targets(k) has the shape of MTP module k's logits for inputs of length T."""
    from helpers import random_model, tiny_config

    from nanoseek.model import IGNORE_INDEX as MODEL_IGNORE

    assert IGNORE_INDEX == MODEL_IGNORE
    cfg = tiny_config(vocab_size=tok.vocab_size, num_nextn_predict_layers=2)
    model = random_model(cfg)
    batch = next(PackedDataset(TokenShard.open(shard_dir), 24, 2, vocab_size=cfg.vocab_size))
    out = model(batch.inputs)
    assert out.logits.shape[:2] == batch.targets(0).shape
    for k, logits in enumerate(out.mtp_logits, start=1):
        assert logits.shape[:2] == batch.targets(k).shape
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets(k).flatten())
        assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- errors
def test_out_of_vocab_ids_raise(tmp_path):
    with ShardWriter(tmp_path / "t", vocab_size=100, bos_id=0, eos_id=1) as w:
        w.add_batch([[5, 6], [7]])
        with pytest.raises(ValueError, match="document 3 has token id 100 outside the vocabulary"):
            w.add_batch([[2], [3, 100]])
        with pytest.raises(ValueError, match="token id -1"):
            w.add_batch([[-1]])
        w.add_batch([[99]])
    shard = TokenShard(tmp_path / "t")
    assert shard.tokens.tolist() == [0, 5, 6, 1, 0, 7, 1, 0, 99, 1]
    with pytest.raises(ValueError, match="holds token id 99 but the model's vocab_size is 64"):
        PackedDataset(shard, 2, 1, vocab_size=64)
    with pytest.raises(ValueError, match="bos_id 0 / eos_id 7 outside vocab_size 5"):
        ShardWriter(tmp_path / "u", vocab_size=5, bos_id=0, eos_id=7)


def test_failed_write_leaves_nothing(tmp_path):
    with (
        pytest.raises(RuntimeError),
        ShardWriter(tmp_path / "t", vocab_size=9, bos_id=0, eos_id=1) as w,
    ):
        w.add_batch([[3, 4]])
        raise RuntimeError("interrupted")
    assert not list(tmp_path.iterdir())


def test_large_vocab_uses_uint32(tmp_path):
    w = ShardWriter(tmp_path / "t", vocab_size=100_000, bos_id=0, eos_id=1)
    w.add_batch([[70_000, 99_999]])
    assert w.close()["dtype"] == "uint32"
    assert TokenShard(tmp_path / "t").tokens.tolist() == [0, 70_000, 99_999, 1]


def test_bad_shards_raise_clear_errors(tok, shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no token shard"):
        TokenShard.open(tmp_path, "train")
    for name in ("train.bin", "train.idx", "train.json"):
        (tmp_path / name).write_bytes((shard_dir / name).read_bytes())
    with open(tmp_path / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="train.bin: expected .* bytes, found 10"):
        TokenShard.open(tmp_path)
    other = train_tokenizer(["something else entirely"], 300)
    with pytest.raises(ValueError, match="re-tokenise"):
        TokenShard.open(shard_dir, tokenizer=other)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        PackedDataset(TokenShard.open(shard_dir, "val"), 10_000, 64)
