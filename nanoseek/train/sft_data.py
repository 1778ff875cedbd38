"""SFT data: chat JSONL -> token ids with assistant-only labels -> packed, resumable batches.

Input files (one conversation a line; blank lines are skipped, anything else malformed raises an
error naming `file:line`):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "...", "system": "..." (optional)}
Plain pre-training text (.txt, or JSONL/Parquet with a `text` field) is accepted too, with every
token labelled: distillation runs on either.

Labels. A conversation is rendered with the tokenizer's chat template (ours, DeepSeek-R1 style:
`bos system <｜User｜>q <｜Assistant｜>a<｜end▁of▁sentence｜>`; or any other, ChatML, Llama-3...)
and `labels[i]` is `ids[i]` on the tokens of each assistant reply (its content and the token
that ends the turn - eos, `<|im_end|>`, `<|eot_id|>` - so the model learns to stop) and
IGNORE_INDEX elsewhere (bos, system, user turns, the assistant header such as `<｜Assistant｜>`,
which the generation prompt supplies, and what follows the end-of-turn token). Where each reply
lies is read off the template itself (nanoseek/data/chat_template.py), not from marker names.
Labels are the ids themselves (HF convention); targets are shifted when a batch is read.

Packing. Whole conversations are packed first-fit (shuffled by (seed, epoch)) into rows of
`seq_len + 1` tokens and the rest is padding. There is no attention mask between conversations
(as in pre-training [V3 §3.3]); instead every token carries its conversation's id, and a target
counts only when its input position lies in the same conversation - so no label ever crosses a
conversation, at any MTP depth.

Overlong conversations (more than `seq_len + 1` tokens), by `overlong`:
    "truncate" (default) cut at the end and counted (`DataStats.truncated`); the cut-off part of
               the answer (and its eos) is not learnt;
    "drop"     skipped and counted (`DataStats.dropped`);
    "error"    raise, naming file and line.
A conversation whose *prompt* (everything before its first labelled token) leaves no room for a
single target is an error under "truncate" - truncating it would teach nothing and usually
means seq_len is far too small - and is dropped under "drop".

Shape legend: B rows, L = T + 1 tokens per row, T = seq_len model inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jinja2.exceptions import TemplateError

from nanoseek.data.chat_template import CHAT_ROLES, assistant_spans
from nanoseek.data.shards import depth_mask
from nanoseek.data.sources import read_documents
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.fsio import naming
from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.tasks import format_chat
from nanoseek.tasks.jsonl import is_task_file
from nanoseek.tasks.resolve import draws, resolve_task  # noqa: F401 - resolve_task: old home

OVERLONG = ("truncate", "drop", "error")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_MAX_OPEN_ROWS = 32  # first-fit looks back over this many unfilled rows


class SFTDataError(ValueError):
    """A bad SFT file or example; the message names the file and line."""


@dataclass
class Example:
    """One conversation (or text chunk): ids [n] and labels [n] (ids, or IGNORE_INDEX)."""

    ids: list[int]
    labels: list[int]
    where: str = ""  # "file:line", for error messages

    @property
    def prompt_len(self) -> int:
        """Tokens before the first labelled one: the prompt a generator continues from."""
        return next((i for i, lab in enumerate(self.labels) if lab != IGNORE_INDEX), len(self.ids))

    @property
    def n_labels(self) -> int:
        return sum(lab != IGNORE_INDEX for lab in self.labels)


@dataclass
class DataStats:
    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    truncated: int = 0
    dropped: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------ reading
def read_chat_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Yield ("file:line", messages) for each line of a chat JSONL file, validated."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SFT data file not found: {p}")
    found = False
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise SFTDataError(f"{where}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTDataError(
                    f"{where}: malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            found = True
            yield where, conversation(row, where)
    if not found:
        raise SFTDataError(f"{p}: holds no conversations")


def conversation(row: object, where: str = "") -> list[dict[str, str]]:
    """A parsed JSONL object -> checked chat messages (raises SFTDataError naming `where`)."""
    if not isinstance(row, Mapping):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise SFTDataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or m.get("role") not in CHAT_ROLES:
                raise SFTDataError(
                    f"{where}: message {i} needs a 'role' in {CHAT_ROLES}, got {m!r:.80}"
                )
            if not isinstance(m.get("content"), str):
                raise SFTDataError(f"{where}: message {i} needs a string 'content'")
            out.append({"role": m["role"], "content": m["content"]})
    elif "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise SFTDataError(f"{where}: '{key}' must be a string")
        out = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        if row.get("system") is not None:
            if not isinstance(row["system"], str):
                raise SFTDataError(f"{where}: 'system' must be a string")
            out.insert(0, {"role": "system", "content": row["system"]})
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise SFTDataError(
            f"{where}: expected 'messages' (a list of role/content objects) or 'prompt' and "
            f"'completion' strings; found fields: {keys}"
        )
    if not any(m["role"] == "assistant" for m in out):
        raise SFTDataError(f"{where}: no assistant message, so nothing to learn")
    return out


def is_chat_file(path: str | os.PathLike) -> bool:
    """A JSONL file whose first record has `messages` or `prompt`/`completion` fields."""
    p = Path(path)
    if p.suffix.lower() not in JSONL_SUFFIXES or not p.is_file():
        return False
    with p.open(encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return True  # let the chat reader report the line
                return isinstance(row, dict) and bool(
                    {"messages", "prompt", "completion"} & set(row)
                )
    return False


# ------------------------------------------------------------------------------ tokenising
def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], where: str = ""
) -> Example:
    """Messages -> ids (exactly `tokenizer.apply_chat_template(messages)`) and labels on each
    assistant reply (its content and its end-of-turn token), IGNORE_INDEX elsewhere.

    The reply spans come from the template itself (`chat_template.assistant_spans`), and a
    token is labelled when the character it starts at lies in one, so the ids are those of
    the whole rendered text whatever the template's markers are."""
    try:
        text, spans = assistant_spans(tokenizer.render, messages, tokenizer.added_tokens)
    except (ValueError, TemplateError) as e:
        raise SFTDataError(f"{where}: {e}") from None
    ids, offsets = tokenizer.encode_offsets(text)
    labels = [IGNORE_INDEX] * len(ids)
    k = 0  # spans and offsets both ascend: one pass
    for j, (start, _) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and start >= spans[k][0]:
            labels[j] = ids[j]
    return Example(ids, labels, where)


def encode_text(tokenizer: Tokenizer, text: str, max_len: int, where: str = "") -> list[Example]:
    """A pre-training document `bos text eos`, every token after bos labelled, cut into chunks
    of at most `max_len` tokens (each its own example; no chunk sees the one before)."""
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    out = []
    for s in range(0, len(ids), max_len):
        chunk = ids[s : s + max_len]
        if len(chunk) < 2:
            break
        labels = list(chunk)
        if s == 0:
            labels[0] = IGNORE_INDEX  # bos is never a target
        out.append(Example(chunk, labels, where))
    return out


def fit_to_context(
    example: Example, max_len: int, overlong: str, stats: DataStats
) -> Example | None:
    """Apply the overlong policy (module docstring) to one example; None = dropped."""
    n = len(example.ids)
    if n <= max_len:
        return example
    if overlong == "drop":
        stats.dropped += 1
        return None
    if example.prompt_len >= max_len:  # not one labelled token would be left in the row
        raise SFTDataError(
            f"{example.where}: the prompt is {example.prompt_len} tokens but a row holds "
            f"seq_len + 1 = {max_len}, leaving no room for the answer; raise seq_len, shorten "
            "the prompt, or set overlong=drop"
        )
    if overlong == "error":
        raise SFTDataError(
            f"{example.where}: the conversation is {n} tokens but a row holds seq_len + 1 = "
            f"{max_len}; raise seq_len, or set overlong=truncate or overlong=drop"
        )
    stats.truncated += 1
    return Example(example.ids[:max_len], example.labels[:max_len], example.where)


def load_examples(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    max_len: int,
    *,
    overlong: str = "truncate",
    text_field: str = "text",
    conversations: Iterable[tuple[str, Sequence[Mapping[str, str]]]] = (),
) -> tuple[list[Example], DataStats]:
    """Examples from chat JSONL files, plain-text files and/or `(where, messages)` pairs,
    each fitted to `max_len` tokens."""
    if overlong not in OVERLONG:
        raise SFTDataError(f"option 'overlong' must be one of {OVERLONG}, got {overlong!r}")
    stats = DataStats()
    examples: list[Example] = []

    def add(ex: Example | None) -> None:
        if ex is not None and ex.n_labels > 0:
            examples.append(ex)
            stats.examples += 1
            stats.tokens += len(ex.ids)
            stats.label_tokens += ex.n_labels

    for path in paths:
        if is_task_file(path):
            raise SFTDataError(
                f"{path}: a task file (question/answer lines), not chat or text data: "
                f"pass it as --task {path}"
            )
        if is_chat_file(path):
            for where, messages in read_chat_jsonl(path):
                add(
                    fit_to_context(
                        encode_chat(tokenizer, messages, where), max_len, overlong, stats
                    )
                )
        else:
            for i, doc in enumerate(read_documents(path, field=text_field)):
                for ex in encode_text(tokenizer, doc, max_len, f"{path}: document {i}"):
                    add(ex)
    for where, messages in conversations:
        add(fit_to_context(encode_chat(tokenizer, messages, where), max_len, overlong, stats))
    if not examples:
        raise SFTDataError(f"no training examples in {', '.join(map(str, paths)) or 'the data'}")
    return examples, stats


def split_examples(
    examples: Sequence[Example], val_fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(train, val) by a hash of (seed, the example's tokens): stable whatever the batch
    settings, the order of the examples or where their file lives, and identical examples
    always land on the same side (no copy of a validation example is trained on)."""
    if not 0 <= val_fraction < 1:
        raise SFTDataError(f"option 'val_fraction' must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for ex in examples:
        key = f"{seed}|{','.join(map(str, ex.ids))}|{','.join(map(str, ex.labels))}"
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        (val if int.from_bytes(digest, "big") / 2**64 < val_fraction else train).append(ex)
    if not train:
        raise SFTDataError("val_fraction leaves no training examples")
    return train, val


# ------------------------------------------------------------------------------ from a task
def task_conversations(
    task: str,
    n: int | None,
    *,
    split: str = "train",
    seed: int = 0,
    level: int | None = None,
    system: bool | str = False,
    holdout: bool = True,
) -> list[tuple[str, list[dict[str, str]]]]:
    """`n` problems of a task (name or JSONL file) as SFT conversations with the worked solution
    (`format_chat`): the R1 cold-start data [R1 §2.3.1] for tasks that come with solutions.
    A task file is drawn in epochs without replacement (n = None: each problem once); with
    `holdout` it keeps its hash test split out, else all of it is `split`."""
    t = resolve_task(task, split=None if holdout else split)
    problems = t.generate(draws(t, n, split, level), split=split, seed=seed, level=level)
    missing = [p.id for p in problems if not p.solution]
    if missing:
        raise SFTDataError(f"task {task!r}: problem {missing[0]} has no worked solution for SFT")
    return [(f"task {task}: {p.id}", format_chat(p, system=system)) for p in problems]


def write_chat_jsonl(
    conversations: Iterable[Sequence[Mapping[str, str]] | tuple[str, Sequence]], path: str
) -> int:
    """Write `{"messages": [...]}` lines (atomically); returns the number written."""
    tmp = f"{path}.tmp"
    n = 0

    with naming(path):  # a full disk: one error naming the file, the old one left as it was
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for conv in conversations:
                messages = conv[1] if isinstance(conv, tuple) else conv
                f.write(json.dumps({"messages": list(messages)}, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename publishes it
        os.replace(tmp, path)
    return n


# ------------------------------------------------------------------------------ batches
@dataclass
class SFTBatch:
    """B rows of L = T + 1 tokens: ids, labels (IGNORE_INDEX where no loss) and the id of each
    token's conversation (-1 for padding). Same interface as `shards.Batch`."""

    tokens: torch.Tensor  # [B,L] int64
    labels: torch.Tensor  # [B,L] int64
    doc_ids: torch.Tensor  # [B,L] int64

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]  # [B,T]

    @property
    def token_mask(self) -> torch.Tensor:
        """[B,T] real (non-padding) input tokens, for the router statistics."""
        return self.doc_ids[:, :-1] >= 0

    def targets(self, depth: int = 0) -> torch.Tensor:
        """[B, T-depth]: position i predicts labels[i+depth+1] when tokens i..i+depth+1 are one
        conversation (so lined up with depth `depth`'s logits); IGNORE_INDEX otherwise."""
        t = self.labels[:, depth + 1 :]
        return t.masked_fill(~depth_mask(self.doc_ids, depth), IGNORE_INDEX)

    def to(self, device, non_blocking: bool = False) -> SFTBatch:
        return SFTBatch(
            *(
                t.to(device, non_blocking=non_blocking)
                for t in (self.tokens, self.labels, self.doc_ids)
            )
        )


def collate(
    rows: Sequence[Sequence[tuple[int, Example]]], pad_id: int, length: int | None = None
) -> SFTBatch:
    """Rows of (conversation id, example) -> an SFTBatch padded to `length` (default: the
    longest row)."""
    L = length or max(sum(len(ex.ids) for _, ex in row) for row in rows)
    B = len(rows)
    tokens = np.full((B, L), pad_id, dtype=np.int64)
    labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.full((B, L), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for doc, ex in row:
            n = len(ex.ids)
            assert at + n <= L, "a row overflows its length"
            tokens[r, at : at + n] = ex.ids
            labels[r, at : at + n] = ex.labels
            doc_ids[r, at : at + n] = doc
            at += n
    return SFTBatch(*(torch.from_numpy(a) for a in (tokens, labels, doc_ids)))


def pack_rows(lengths: Sequence[int], order: Iterable[int], row_len: int) -> list[list[int]]:
    """First-fit packing of items (in `order`) into rows of `row_len`: each item goes into the
    first of the last _MAX_OPEN_ROWS unfilled rows with room, else a new row. Deterministic."""
    done: list[list[int]] = []
    open_rows: list[tuple[int, list[int]]] = []  # (free space, item ids)
    for i in order:
        n = lengths[i]
        assert 0 < n <= row_len, (i, n, row_len)
        for k, (free, items) in enumerate(open_rows):
            if free >= n:
                items.append(i)
                open_rows[k] = (free - n, items)
                if free == n:
                    done.append(open_rows.pop(k)[1])
                break
        else:
            if n == row_len:
                done.append([i])
                continue
            open_rows.append((row_len - n, [i]))
            if len(open_rows) > _MAX_OPEN_ROWS:
                done.append(open_rows.pop(0)[1])
    return done + [items for _, items in open_rows]


@dataclass
class SFTDataset:
    """Packed batches of whole examples, shuffled by (seed, epoch), resumable like
    `shards.PackedDataset`: `next(ds)` advances (epoch, index), `state_dict()` captures it.

    Each epoch packs every example exactly once; the last batch of an epoch may hold fewer rows
    (the loop weights micro-batches by their target count, so that is harmless). With data
    parallelism each rank takes batches rank, rank + W, ... of the same order.
    """

    examples: list[Example] = field(repr=False)
    seq_len: int
    batch_size: int
    pad_id: int
    seed: int = 0
    shuffle: bool = True
    loop: bool = True
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    index: int = 0
    _rows: tuple[int, list[list[int]]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.batch_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError("need seq_len >= 1, batch_size >= 1 and 0 <= rank < world_size")
        if not self.examples:
            raise SFTDataError("no examples to batch")
        self.lengths = [len(ex.ids) for ex in self.examples]
        too_long = [ex.where for ex in self.examples if len(ex.ids) > self.seq_len + 1]
        if too_long:
            raise SFTDataError(
                f"{too_long[0]}: longer than seq_len + 1 = {self.seq_len + 1} (fit examples first)"
            )
        if self.batches_per_epoch(0) == 0:
            raise SFTDataError(
                f"{len(self.examples)} examples fill fewer than {self.world_size} batches"
            )

    def rows(self, epoch: int) -> list[list[int]]:
        """The packed rows of `epoch` (example indices), cached for the current epoch."""
        if self._rows is None or self._rows[0] != epoch:
            n = len(self.examples)
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._rows = (epoch, pack_rows(self.lengths, order.tolist(), self.seq_len + 1))
        return self._rows[1]

    def batches_per_epoch(self, epoch: int = 0) -> int:
        n_batches = -(-len(self.rows(epoch)) // self.batch_size)
        return n_batches // self.world_size

    def __len__(self) -> int:
        return self.batches_per_epoch(self.epoch)

    def batch(self, epoch: int, index: int) -> SFTBatch:
        """Batch `index` of `epoch` for this rank (random access; the position is unchanged)."""
        rows = self.rows(epoch)
        first = (index * self.world_size + self.rank) * self.batch_size
        chosen = rows[first : first + self.batch_size]
        if not chosen or index >= self.batches_per_epoch(epoch):
            raise IndexError(f"batch {index} out of range for epoch {epoch}")
        return collate(
            [[(i, self.examples[i]) for i in row] for row in chosen],
            self.pad_id,
            self.seq_len + 1,
        )

    def __iter__(self) -> SFTDataset:
        return self

    def __next__(self) -> SFTBatch:
        if self.index >= self.batches_per_epoch(self.epoch):
            self.epoch, self.index = self.epoch + 1, 0
            if not self.loop:
                raise StopIteration
        b = self.batch(self.epoch, self.index)
        self.index += 1
        return b

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "n_examples": len(self.examples),
            "n_tokens": sum(self.lengths),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in (
            "seed",
            "seq_len",
            "batch_size",
            "world_size",
            "shuffle",
            "n_examples",
            "n_tokens",
        ):
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume: {key} was {state[key]}, is now {mine[key]} "
                    "(the data or the batch order would differ)"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def fixed_batches(self, n: int) -> list[SFTBatch]:
        """The first `n` batches of epoch 0, for validation (the same at every evaluation)."""
        return [self.batch(0, i) for i in range(min(n, self.batches_per_epoch(0)))]
