"""Token shards on disk and the packed, resumable batch stream read from them.

Tokenise once, train many times: `write_shards` turns documents into one flat token stream per
split, each document wrapped as `bos + tokens + eos`. A split `name` in a shard directory is
three files:
    name.bin   the tokens, raw uint16 (vocab <= 65536) or uint32, memory-mapped when read
    name.idx   raw int64 document start offsets, n_docs + 1 of them (the last is n_tokens)
    name.json  metadata: format version, dtype, n_tokens, n_docs, vocab_size, max_token_id,
               bos/eos ids, tokenizer fingerprint, split seed and fraction
Documents go to "val" or "train" by a hash of (seed, document index): deterministic, by whole
document, independent of batching; the val share is `val_fraction` in expectation.

`PackedDataset` cuts each split's stream into windows of T+1 tokens with stride T (every token is
a target exactly once per epoch) and yields `Batch`es of B windows in an order shuffled by
(seed, epoch). Documents share windows with no attention mask between them [V3 §3.3: document
packing without cross-sample masking]; instead every token carries its document id, so losses
can skip targets from another document: MTP depth k must never predict across one [V3 §2.2].
Positions: depth 0 is the main next-token loss (position i predicts t_{i+1}); MTP module k
predicts t_{i+k+1}. Position i is valid for depth k iff tokens i..i+k+1 share a document.

Shape legend: B batch, T sequence length (inputs), L = T + 1 tokens per window.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.fsio import fsync_path, naming

FORMAT_VERSION = 1
IGNORE_INDEX = -100  # same as nanoseek.model.transformer.IGNORE_INDEX and torch's cross_entropy
_M64 = (1 << 64) - 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _unit_hash(index: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, index) -> floats in [0, 1); one fixed coin per document."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64((seed * 0xD1B54A32D192ED03 + 1) & _M64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# ---------------------------------------------------------------------------------- writing
class ShardWriter:
    """Append documents (token ids) to one split; `close()` publishes it under its final name.

    Files are written as `*.tmp` and renamed at the end, so an interrupted run never leaves a
    shard that looks complete.
    """

    def __init__(
        self,
        prefix: str | os.PathLike,
        *,
        vocab_size: int,
        bos_id: int,
        eos_id: int,
        tokenizer_hash: str = "",
        extra_meta: dict | None = None,
    ):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        if not (0 <= bos_id < vocab_size and 0 <= eos_id < vocab_size):
            raise ValueError(f"bos_id {bos_id} / eos_id {eos_id} outside vocab_size {vocab_size}")
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id
        self.dtype = token_dtype(vocab_size)
        self.meta = {"tokenizer_hash": tokenizer_hash, **(extra_meta or {})}
        with naming(self._tmp(".bin")):
            self._bin = open(self._tmp(".bin"), "wb")
        self._starts: list[np.ndarray] = []
        self.n_tokens = self.n_docs = 0
        self.max_token_id = -1

    def _tmp(self, ext: str) -> Path:
        return self.prefix.with_name(self.prefix.name + ext + ".tmp")

    def add_batch(self, docs: Sequence[Sequence[int]]) -> None:
        """Wrap each document as bos + ids + eos and append; ids outside the vocabulary raise."""
        if not docs:
            return
        lens = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        flat = np.concatenate([np.asarray(d, dtype=np.int64).reshape(-1) for d in docs])
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            bad = int(np.flatnonzero((flat < 0) | (flat >= self.vocab_size))[0])
            doc = self.n_docs + int(np.searchsorted(np.cumsum(lens), bad, side="right"))
            raise ValueError(
                f"{self.prefix.name}: document {doc} has token id {int(flat[bad])} outside the "
                f"vocabulary [0, {self.vocab_size}) - wrong tokenizer or vocab_size?"
            )
        # vectorised wrapping: place bos/eos at each document's ends, the ids everywhere else
        ends = np.cumsum(lens + 2)  # exclusive end of each wrapped document
        starts = ends - (lens + 2)
        out = np.empty(int(ends[-1]), dtype=self.dtype)
        body = np.ones(out.size, dtype=bool)
        body[starts] = body[ends - 1] = False
        out[starts], out[ends - 1] = self.bos_id, self.eos_id
        out[body] = flat
        with naming(self._tmp(".bin")):  # a full disk: one error naming the file
            out.tofile(self._bin)
        self._starts.append(starts + self.n_tokens)
        self.n_tokens += out.size
        self.n_docs += len(docs)
        top = max(self.bos_id, self.eos_id, int(flat.max()) if flat.size else -1)
        self.max_token_id = max(self.max_token_id, top)

    def close(self) -> dict:
        """Write the index and metadata, rename into place, return the metadata. A failure
        (a full disk) drops the temp files and leaves any previous shard of this name whole."""
        try:
            with naming(self.prefix.with_name(self.prefix.name + ".bin")):
                return self._publish()
        except BaseException:
            self.abort()
            raise

    def _publish(self) -> dict:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        starts = np.concatenate(self._starts + [np.array([self.n_tokens], dtype=np.int64)])
        starts.astype(np.int64).tofile(self._tmp(".idx"))
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "n_tokens": self.n_tokens,
            "n_docs": self.n_docs,
            "vocab_size": self.vocab_size,
            "max_token_id": self.max_token_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            **self.meta,
        }
        with open(self._tmp(".json"), "w") as f:
            json.dump(meta, f, indent=2)
        for ext in (".idx", ".json"):  # data on disk before a rename can publish it
            fsync_path(str(self._tmp(ext)))
        # an old shard's .json goes first and the new one comes last: a .json is only ever
        # present beside the .bin and .idx it describes, even if we crash in between
        self.prefix.with_name(self.prefix.name + ".json").unlink(missing_ok=True)
        for ext in (".bin", ".idx", ".json"):
            os.replace(self._tmp(ext), self.prefix.with_name(self.prefix.name + ext))
        return meta

    def abort(self) -> None:
        """Drop everything written so far."""
        with contextlib.suppress(OSError):  # closing flushes: a full disk fails again here
            self._bin.close()
        for ext in (".bin", ".idx", ".json"):
            self._tmp(ext).unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bin.closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    docs_per_batch: int = 1024,
) -> dict[str, dict]:
    """Tokenise `documents` into `out_dir/train.*` (and `out_dir/val.*` when val_fraction > 0).

    Returns the metadata of each split written. Tokenisation runs `docs_per_batch` documents at
    a time through `tokenizers`' multi-threaded batch encoder.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    names = ["train", "val"] if val_fraction > 0 else ["train"]
    common = dict(
        vocab_size=tokenizer.vocab_size,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        tokenizer_hash=tokenizer.fingerprint,
    )
    split_meta = {"split_seed": seed, "val_fraction": val_fraction}
    writers = {
        n: ShardWriter(out / n, **common, extra_meta={"split": n, **split_meta}) for n in names
    }
    try:
        n_seen = 0
        for batch in _batched(documents, docs_per_batch):
            ids = tokenizer.encode_batch(batch)
            to_val = _unit_hash(np.arange(n_seen, n_seen + len(ids)), seed) < val_fraction
            writers["train"].add_batch([d for d, v in zip(ids, to_val) if not v])
            if val_fraction > 0:
                writers["val"].add_batch([d for d, v in zip(ids, to_val) if v])
            n_seen += len(ids)
        if n_seen == 0:
            raise ValueError("no documents to write")
        for n, w in writers.items():
            if w.n_docs == 0:
                raise ValueError(
                    f"split {n!r} got no documents out of {n_seen} (val_fraction {val_fraction}):"
                    " use more documents or another val_fraction"
                )
        if "val" not in writers:
            # a val split left from an earlier run would pair stale data with this train split
            for ext in (".bin", ".idx", ".json"):
                (out / f"val{ext}").unlink(missing_ok=True)
        return {n: w.close() for n, w in writers.items()}
    except BaseException:
        for w in writers.values():
            if not w._bin.closed:
                w.abort()
        raise


def _batched(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in documents:
        if not isinstance(doc, str):
            raise TypeError(f"documents must be strings, got {type(doc).__name__}")
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------- reading
class TokenShard:
    """One split, memory-mapped: `tokens` [n_tokens], `doc_starts` [n_docs + 1] (int64)."""

    def __init__(self, prefix: str | os.PathLike, *, tokenizer: Tokenizer | None = None):
        self.prefix = Path(prefix)
        meta_path = self.prefix.with_name(self.prefix.name + ".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"no token shard at {self.prefix} ({meta_path.name} missing)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {self.meta.get('format_version')}")
        self.dtype = np.dtype(self.meta["dtype"])
        n_tok, n_doc = self.meta["n_tokens"], self.meta["n_docs"]
        bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        for path, want in ((bin_path, n_tok * self.dtype.itemsize), (idx_path, (n_doc + 1) * 8)):
            have = path.stat().st_size if path.is_file() else None
            if have != want:
                raise ValueError(f"{path}: expected {want} bytes, found {have} (truncated shard?)")
        if tokenizer is not None and tokenizer.fingerprint != self.meta.get("tokenizer_hash"):
            raise ValueError(
                f"{meta_path}: written with tokenizer {self.meta.get('tokenizer_hash')!r}, "
                f"not the given one ({tokenizer.fingerprint!r}); re-tokenise the corpus"
            )
        if n_tok == 0:
            raise ValueError(f"{self.prefix}: shard holds no tokens")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(n_tok,))
        self.doc_starts = np.memmap(idx_path, dtype=np.int64, mode="r", shape=(n_doc + 1,))

    @classmethod
    def open(cls, out_dir: str | os.PathLike, split: str = "train", **kw) -> TokenShard:
        return cls(Path(out_dir) / split, **kw)

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    def document(self, i: int) -> np.ndarray:
        """Document i with its bos and eos."""
        return np.asarray(self.tokens[self.doc_starts[i] : self.doc_starts[i + 1]])

    def doc_index(self, positions: np.ndarray) -> np.ndarray:
        """Token positions -> index of the document holding each (vectorised binary search)."""
        return np.searchsorted(self.doc_starts, positions, side="right") - 1

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if any stored id would index past an embedding table of `vocab_size` rows."""
        if self.meta["max_token_id"] >= vocab_size:
            raise ValueError(
                f"{self.prefix}: holds token id {self.meta['max_token_id']} but the model's "
                f"vocab_size is {vocab_size}"
            )


# ---------------------------------------------------------------------------------- batches
def depth_mask(doc_ids: torch.Tensor, depth: int) -> torch.Tensor:
    """doc_ids [B,L] -> bool [B, L-depth-1]: position i may predict t_{i+depth+1}, i.e. tokens
    i..i+depth+1 lie in one document (documents are contiguous, so the two ends decide)."""
    return doc_ids[:, : doc_ids.shape[1] - depth - 1] == doc_ids[:, depth + 1 :]


def depth_targets(
    tokens: torch.Tensor, doc_ids: torch.Tensor, depth: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """tokens, doc_ids [B,L] -> targets [B, L-depth-1] for depth `depth`, `ignore_index` where
    the target sits in another document than the input position."""
    t = tokens[:, depth + 1 :]
    return t.masked_fill(~depth_mask(doc_ids, depth), ignore_index)


@dataclass
class Batch:
    """B packed windows of L = T + 1 tokens.

    `inputs` [B,T] feed the model; `targets(k)` [B, T-k] line up with the main logits (k = 0,
    [B,T,V]) and with MTP module k's logits ([B,T-k,V] for inputs of length T), so that
    `cross_entropy(logits_k, batch.targets(k), ignore_index=-100)` is the loss of depth k.
    """

    tokens: torch.Tensor  # [B,L] int64
    doc_ids: torch.Tensor  # [B,L] int64, index of each token's document in the split

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    def targets(self, depth: int = 0, *, mask_documents: bool = True) -> torch.Tensor:
        """Targets for depth `depth` (0: main loss). With mask_documents=False the main loss
        also trains eos -> next bos, which plain V3 packing does and which is harmless."""
        if not mask_documents:
            return self.tokens[:, depth + 1 :]
        return depth_targets(self.tokens, self.doc_ids, depth)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.tokens.to(device, non_blocking=non_blocking),
            self.doc_ids.to(device, non_blocking=non_blocking),
        )


class PackedDataset:
    """Batches of packed windows from one or more shards, deterministic and resumable.

    An iterator: `next(ds)` returns the next `Batch` and advances the position (epoch, index),
    which `state_dict()` captures, so a loader restored from it yields exactly the batches the
    original would have yielded next. With `loop=True` epochs follow each other forever; with
    `loop=False` iteration stops at each epoch's end (the next `for` runs the next epoch).
    Windows never span two shards. The last `n_windows % (B * world_size)` windows of an epoch
    are dropped (fixed shapes); the shuffle picks different ones each epoch.
    For data parallelism every rank builds the same order and takes batches rank, rank + W, ...
    """

    def __init__(
        self,
        shards: TokenShard | Sequence[TokenShard],
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ):
        self.shards = [shards] if isinstance(shards, TokenShard) else list(shards)
        if seq_len < 1 or batch_size < 1 or seed < 0 or not 0 <= rank < world_size:
            raise ValueError(
                "need seq_len >= 1, batch_size >= 1, seed >= 0 and 0 <= rank < world_size"
            )
        if vocab_size is not None:
            for s in self.shards:
                s.check_vocab(vocab_size)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.shuffle, self.loop, self.rank, self.world_size = shuffle, loop, rank, world_size
        # window j of shard s starts at token j*T; a window needs T+1 tokens
        per_shard = [max(s.n_tokens - 1, 0) // seq_len for s in self.shards]
        self.window_offsets = np.cumsum([0] + per_shard)  # global window id -> shard
        self.doc_offsets = np.cumsum([0] + [s.n_docs for s in self.shards])
        self.n_windows = int(self.window_offsets[-1])
        self.batches_per_epoch = self.n_windows // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.n_windows} windows of {seq_len + 1} tokens cannot fill one batch of "
                f"{batch_size} x {world_size} ranks: use more data or smaller sizes"
            )
        self.epoch, self.index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """The window permutation of `epoch` (cached: one per epoch)."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                perm = np.arange(self.n_windows)
            self._order = (epoch, perm)
        return self._order[1]

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch `index` of `epoch` for this rank (random access; does not move the position)."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch index {index} out of range [0, {self.batches_per_epoch})")
        B, L = self.batch_size, self.seq_len + 1
        first = (index * self.world_size + self.rank) * B
        windows = self.order(epoch)[first : first + B]  # [B] global window ids
        shard_of = np.searchsorted(self.window_offsets, windows, side="right") - 1
        tokens = np.empty((B, L), dtype=np.int64)
        doc_ids = np.empty((B, L), dtype=np.int64)
        span = np.arange(L)
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            shard = self.shards[s]
            pos = (windows[rows] - self.window_offsets[s])[:, None] * self.seq_len + span  # [b,L]
            tokens[rows] = shard.tokens[pos]  # one fancy-indexed gather from the memmap
            doc_ids[rows] = shard.doc_index(pos) + self.doc_offsets[s]
        return Batch(torch.from_numpy(tokens), torch.from_numpy(doc_ids))

    def __iter__(self) -> PackedDataset:
        return self

    def __next__(self) -> Batch:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            if not self.loop:
                raise StopIteration
        b = self.batch(self.epoch, self.index)
        self.index += 1
        return b

    def state_dict(self) -> dict:
        """Position plus what fixes the order; loading checks the latter still matches."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "batch_size", "world_size", "shuffle", "n_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: {key} was {state[key]}, is now {getattr(self, key)} "
                    "(the batch order would differ)"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
