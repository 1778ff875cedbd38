"""Routing analytics: which routed experts each kind of input uses, and how specialised they are.

DeepSeekMoE splits experts finely so that each can specialise [V3 §2.1.2; DeepSeekMoE, arXiv
2401.06066]. V3 reports that its auxiliary-loss-free balancing leaves experts *more* specialised by
domain than an auxiliary balance loss does: [V3 §4.5.3 and Appendix C] plot the expert load of the
16B models on Pile domains (Wikipedia, GitHub, DM Mathematics), and the aux-loss-free model's load
differs more between domains (qualitative; the figure's details are unverified here). This
module measures the same on our models: run labelled documents through the model, count per label
("task") the tokens each MoE layer routes to each expert, and score how much the label decides
the expert.

Shape legend: B batch, T tokens, S tasks (labels), L MoE layers, E routed experts, K experts per
token.

Specialisation score of a layer (`specialisation`): with p_s = the distribution of task s's
token-expert picks over the E experts and m = the mean of the p_s over tasks (every task weighted
equally, whatever its token count),

    score = (1/S) sum_s KL(p_s || m) / ln S  =  I(expert; task) / H(task)   (uniform task prior)

i.e. the Jensen-Shannon divergence of the task distributions, normalised to [0, 1]: 0 when every
task loads the experts identically, 1 when the tasks use disjoint sets of experts (the expert
names the task). `task_divergence` gives each task's own term KL(p_s || m) / ln S. The plug-in
estimate is biased upwards on few tokens (two different samples of one task score above 0), so
compare scores measured on similar token counts.

Capture is by forward hooks on each `moe.gate` (the Router returns weights, indices, scores): the
model code is untouched. Only the main model's MoE layers are counted (the forward runs with
`mtp=False`; MTP modules draft tokens and see shifted inputs). Padding is excluded.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.analysis.plots import plot_routing_heatmap
from nanoseek.data.corpus import generate_corpus
from nanoseek.data.sources import JSONL_SUFFIXES, DataSourceError, read_documents

SCORE_DEFINITION = (
    "per layer, I(expert; task) / H(task) with every task weighted equally = the Jensen-Shannon "
    "divergence of the tasks' expert-load distributions / ln(#tasks): 0 = every task uses the "
    "experts alike, 1 = disjoint experts per task"
)


@dataclass
class RoutingStats:
    """What `collect_routing` counted."""

    tasks: list[str]
    layers: list[int]  # decoder-layer index of each MoE layer counted (HF `model.layers.{i}`)
    counts: torch.Tensor  # [S,L,E] int64: token-expert picks (each token picks K experts)
    tokens: list[int]  # [S] real (non-padding) tokens run per task
    documents: list[int]  # [S] documents (or parts of them) those tokens came from
    top_k: int

    @property
    def n_experts(self) -> int:
        return self.counts.shape[-1]

    def to_dict(self) -> dict:
        """JSON-ready: counts per task as [layer][expert], plus the scores when S >= 2."""
        d = {
            "tasks": self.tasks,
            "layers": self.layers,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "tokens": dict(zip(self.tasks, self.tokens)),
            "documents": dict(zip(self.tasks, self.documents)),
            "counts": {t: self.counts[i].tolist() for i, t in enumerate(self.tasks)},
        }
        if len(self.tasks) >= 2:
            per_task = task_divergence(self.counts)  # [S,L]
            d["specialisation"] = {
                "definition": SCORE_DEFINITION,
                "layers": dict(zip(map(str, self.layers), specialisation(self.counts).tolist())),
                "per_task": {t: per_task[i].tolist() for i, t in enumerate(self.tasks)},
            }
        return d


def to_json(d: dict) -> str:
    """Indented JSON with every list of numbers on one line (a [layers][experts] count table
    stays a readable block instead of one number per line)."""
    text = json.dumps(d, indent=1)
    return re.sub(r"\[\s*([-+\deE.,\s]+?)\s*\]", lambda m: "[" + " ".join(m[1].split()) + "]", text)


# ------------------------------------------------------------------------------ scores
def load_shares(counts: torch.Tensor) -> torch.Tensor:
    """counts [..., E] -> share of picks per expert (float64, each row sums to 1; all-zero rows
    stay 0)."""
    c = counts.to(torch.float64)
    return c / c.sum(-1, keepdim=True).clamp(min=1)


def _check_counts(counts: torch.Tensor) -> None:
    if counts.dim() != 3:
        raise ValueError(
            f"counts must be [tasks, layers, experts], got shape {tuple(counts.shape)}"
        )
    if counts.shape[0] < 2:
        raise ValueError("the specialisation score needs at least two tasks")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    empty = (counts.sum(-1) == 0).any(-1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"task(s) {empty} have no routed tokens")


def task_divergence(counts: torch.Tensor) -> torch.Tensor:
    """counts [S,L,E] -> [S,L] KL(p_s || m) / ln S in [0, 1], m the equal-weight mixture."""
    _check_counts(counts)
    p = load_shares(counts)  # [S,L,E]
    m = p.mean(0, keepdim=True)  # [1,L,E]; m > 0 wherever some p_s > 0
    kl = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)  # [S,L], 0 log 0 = 0
    return (kl / math.log(counts.shape[0])).clamp(0.0, 1.0)


def specialisation(counts: torch.Tensor) -> torch.Tensor:
    """counts [S,L,E] -> [L] score per layer: I(expert; task) / H(task), see the module doc."""
    return task_divergence(counts).mean(0)


def top_experts(counts: torch.Tensor, n: int = 3) -> list[list[list[tuple[int, float]]]]:
    """counts [S,L,E] -> per task, per layer, the n most loaded (expert, share of picks)."""
    shares = load_shares(counts)
    vals, idx = shares.topk(min(n, counts.shape[-1]), dim=-1)  # [S,L,n]
    return [
        [list(zip(idx[s, j].tolist(), vals[s, j].tolist())) for j in range(counts.shape[1])]
        for s in range(counts.shape[0])
    ]


# ------------------------------------------------------------------------------ data
def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def token_windows(
    tokenizer, docs: Iterable[str], seq_len: int, max_tokens: int
) -> tuple[list[list[int]], int]:
    """Each document as bos + ids + eos, cut into windows of at most `seq_len` tokens, until
    exactly `max_tokens` tokens (or the documents run out). Returns (windows, documents used).

    Later windows of a long document lose the context before them; routing is still per token.
    Documents are pulled lazily, so an endless generator is fine.
    """
    if seq_len < 1 or max_tokens < 1:
        raise ValueError(f"seq_len and max_tokens must be >= 1, got {seq_len}, {max_tokens}")
    windows: list[list[int]] = []
    total = n_docs = 0
    for batch in _batched(docs, 64):
        for ids in tokenizer.encode_batch(batch):
            seq = [tokenizer.bos_id, *ids, tokenizer.eos_id]
            n_docs += 1
            for i in range(0, len(seq), seq_len):
                w = seq[i : i + seq_len][: max_tokens - total]
                windows.append(w)
                total += len(w)
                if total == max_tokens:
                    return windows, n_docs
    return windows, n_docs


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: (ids [B,T] int64, token_mask [B,T] bool, True = real token).
    Causal attention means right padding never changes what the real tokens see."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = True
    return ids, mask


def read_labelled(
    paths: Sequence[str | os.PathLike], *, field: str = "text", label_field: str = "task"
) -> dict[str, list[str]]:
    """Documents grouped by label: a JSONL line's `label_field` when it has one (a string),
    otherwise its file's name (the stem, or the path when two files share a stem).

    Non-JSONL files go through `sources.read_documents` (one text file = one document).
    Every file is read whole: point this at analysis-sized files, not a pre-training corpus.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no data files given")
    stems = [p.stem for p in paths]
    by_label: dict[str, list[str]] = {}
    for p, stem in zip(paths, stems):
        name = stem if stems.count(stem) == 1 else str(p)
        if p.suffix.lower() not in JSONL_SUFFIXES:
            by_label.setdefault(name, []).extend(read_documents(p, field=field))
            continue
        list(read_documents(p, field=field))  # validates the file, naming file:line on errors
        with p.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                label = obj.get(label_field, name)
                if not isinstance(label, str):
                    raise DataSourceError(
                        f"{p}:{lineno}: field {label_field!r} is {type(label).__name__}, "
                        "expected a string"
                    )
                doc = obj[field]
                if doc and not doc.isspace():
                    by_label.setdefault(label, []).append(doc)
    return by_label


def task_documents(
    names: Sequence[str], n_docs: int, seed: int = 0, split: str = "test"
) -> dict[str, Iterator[str]]:
    """Built-in task families (nanoseek.tasks) as lazy document streams, one per task, in the
    pre-training corpus format (held-out `test` problems by default)."""
    return {name: generate_corpus(n_docs, seed, tasks=(name,), split=split) for name in names}


# ------------------------------------------------------------------------------ capture
def main_moe_layers(model) -> list[tuple[int, torch.nn.Module]]:
    """(decoder-layer index, MoE) for the main model's MoE layers (MTP modules left out)."""
    index = {id(layer.mlp): i for i, layer in enumerate(model.model.layers)}
    return [(index[id(m)], m) for m in model.moe_layers() if id(m) in index]


@torch.no_grad()
def collect_routing(
    model,
    tokenizer,
    docs_by_task: Mapping[str, Iterable[str]],
    max_tokens: int = 16384,
    batch_size: int = 8,
    seq_len: int = 512,
) -> RoutingStats:
    """Run up to `max_tokens` tokens of each task's documents through `model` (eval mode, no
    MTP) and count, per task, layer and expert, the real tokens routed there (int64)."""
    if not docs_by_task:
        raise ValueError("no tasks to analyse")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = main_moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers to analyse")
    E, K = layers[0][1].n_experts, layers[0][1].top_k
    tasks = list(docs_by_task)
    counts = torch.zeros(len(tasks), len(layers), E, dtype=torch.int64)  # [S,L,E]
    current: dict = {}  # the batch in flight: its token mask [B*T] and task row

    def hook_for(j: int):
        def hook(module, inputs, outputs):
            _, indices, _ = outputs  # [N,K], N = B*T flattened tokens
            keep = current["mask"]
            assert indices.shape[0] == keep.numel(), "router saw tokens of another shape"
            picked = indices[keep].reshape(-1)  # padding dropped
            counts[current["row"], j] += torch.bincount(picked, minlength=E).cpu()

        return hook

    handles = [moe.gate.register_forward_hook(hook_for(j)) for j, (_, moe) in enumerate(layers)]
    was_training = model.training
    model.eval()
    tokens, documents = [], []
    try:
        for row, task in enumerate(tasks):
            windows, n_docs = token_windows(tokenizer, docs_by_task[task], seq_len, max_tokens)
            if not windows:
                raise ValueError(f"task {task!r}: no documents")
            windows.sort(key=len)  # similar lengths batched together: little padding
            for i in range(0, len(windows), batch_size):
                ids, mask = pad_batch(windows[i : i + batch_size], tokenizer.pad_id)
                current.update(mask=mask.reshape(-1).to(model.device), row=row)
                model(ids.to(model.device), token_mask=mask.to(model.device), mtp=False)
            tokens.append(sum(map(len, windows)))
            documents.append(n_docs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return RoutingStats(tasks, [i for i, _ in layers], counts, tokens, documents, K)


# ------------------------------------------------------------------------------ report
def format_report(stats: RoutingStats, n_top: int = 3) -> str:
    """The table `nanoseek routing` prints: tokens per task, then per layer the score and each
    task's most loaded experts as shares of its token-expert picks (uniform: 1/E each)."""
    S = len(stats.tasks)
    width = max(12, *(len(t) for t in stats.tasks)) + 2
    lines = [
        f"{len(stats.layers)} MoE layers x {stats.n_experts} experts, top-{stats.top_k}; "
        f"{S} task(s); uniform load = {100 / stats.n_experts:.1f}% of picks per expert",
        f"  {'task':<{width}}{'documents':>10}{'tokens':>10}",
    ]
    for t, d, n in zip(stats.tasks, stats.documents, stats.tokens):
        lines.append(f"  {t:<{width}}{d:>10,}{n:>10,}")
    scores = per_task = None
    if S >= 2:
        scores, per_task = specialisation(stats.counts), task_divergence(stats.counts)
        lines.append(
            "specialisation = I(expert; task) / H(task), tasks weighted equally "
            "(0 = same experts for every task, 1 = disjoint); divergence = KL(task || mixture) "
            "/ ln(#tasks)"
        )
    top = top_experts(stats.counts, n_top)
    for j, layer in enumerate(stats.layers):
        score = "" if scores is None else f"  specialisation {scores[j]:.3f}"
        lines.append(f"layer {layer}{score}")
        for s, t in enumerate(stats.tasks):
            experts = "  ".join(f"e{e:<3}{100 * share:5.1f}%" for e, share in top[s][j])
            div = "" if per_task is None else f"   (divergence {per_task[s, j]:.3f})"
            lines.append(f"  {t:<{width}}{experts}{div}")
    if scores is not None:
        lines.append(f"mean specialisation over layers: {scores.mean():.3f}")
    return "\n".join(lines)


def write_outputs(stats: RoutingStats, out_dir: str | os.PathLike, title: str = "") -> list[str]:
    """`routing.json` (counts and scores) and `routing.png` (the heatmap) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "routing.json")
    with open(json_path, "w") as f:
        f.write(to_json(stats.to_dict()) + "\n")
    png_path = os.path.join(out_dir, "routing.png")
    scores = specialisation(stats.counts).tolist() if len(stats.tasks) >= 2 else None
    plot_routing_heatmap(
        load_shares(stats.counts).permute(1, 0, 2).tolist(),  # [L,S,E]
        png_path,
        stats.tasks,
        [f"layer {i}" for i in stats.layers],
        scores=scores,
        title=title or "expert load per task (share of picks x experts; 1 = uniform)",
    )
    return [json_path, png_path]
