"""Supervised fine-tuning on chat data [V3 §5.1, R1 §2.3], on the shared loop.

    nanoseek sft --model runs/tiny/model --data chats.jsonl --out runs/sft
    nanoseek sft --model runs/tiny/model --task countdown --task_n=2000 --out runs/cold
    nanoseek sft --model runs/tiny/model --task train.jsonl --epochs=2 --out runs/sft  # whole file
    nanoseek sft --config sft.toml --epochs=2 --lr=1e-4

What this method adds to the loop:
- data: chat JSONL (`messages`, or `prompt`/`completion`), plain text, and/or conversations made
  from a task's worked solutions (`--task`: R1's cold-start data); rendered with the model's
  chat template, labels on assistant tokens only, packed into rows (nanoseek/train/sft_data.py);
- the loss: `lm_loss` on assistant tokens, plus `mtp_lambda` times the mean MTP loss on the same
  tokens. MTP is trained by default: V3 ships post-trained MTP weights and uses them for
  speculative decoding with an 85-90% acceptance rate of the second token [V3 §5.4.3]; a head
  left at its pre-training weights drifts from the fine-tuned model and its drafts get rejected.
  `mtp_lambda=0` skips the modules (and their compute) entirely.
- no balancing: the routing bias is frozen (no bias updates during SFT; V3 updates it during
  pre-training only), the small sequence-wise balance loss stays as configured in the model.
The model comes from `nanoseek.load` and goes out through `nanoseek.save` as OUT/model with the
tokenizer files copied from the model (or `tokenizer`) directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from nanoseek.analysis.plots import plot_losses, read_metrics
from nanoseek.config import ConfigError
from nanoseek.dist.checkpoint import export_hf
from nanoseek.dist.parallel import launch
from nanoseek.model.mtp_objective import mtp_objective
from nanoseek.tasks.jsonl import is_task_file
from nanoseek.train.loop import LoopOptions, Trainer
from nanoseek.train.options import to_dict
from nanoseek.train.run_dir import claim_out_dir
from nanoseek.train.run_setup import (  # noqa: F401  (re-exported to distill.py, student.py)
    TOKENIZER_FILES,
    copy_tokenizer,
    load_for_training,
    routed_experts,
    tokenizer_dir,
    write_run_files,
)
from nanoseek.train.sft_data import (
    OVERLONG,
    DataStats,
    SFTBatch,
    SFTDataError,
    SFTDataset,
    load_examples,
    resolve_task,
    split_examples,
    task_conversations,
)


@dataclass
class ChatDataOptions:
    """Where SFT/distillation examples come from and how they are cut (sft_data.py)."""

    data: list[str] = field(default_factory=list)  # chat JSONL and/or text files
    text_field: str = "text"  # JSONL field / Parquet column of plain-text files
    task: str | None = None  # also: conversations from this task's worked solutions
    # problems drawn from the task's train split, a task file's in epochs without replacement;
    # None: each problem of a task file once, 1000 of a generated task
    task_n: int | None = None
    # a task file is a training set, trained on whole (rows' own "split" fields still rule);
    # True keeps its 10% hash test split out, for a file that is also evaluated on (pipeline)
    task_holdout: bool = False
    task_level: int | None = None  # None: every level of the task
    task_system: bool = False  # put the R1-Zero instruction in a system message
    seq_len: int = 512  # model inputs per row; a row holds seq_len + 1 tokens
    overlong: str = "truncate"  # truncate | drop | error (sft_data.py)
    val_data: list[str] = field(default_factory=list)  # held-out files; empty: val_fraction
    val_fraction: float = 0.05

    def validate_data(self) -> None:
        if not self.data and not self.task:
            raise ConfigError("no data: give --data FILE... and/or --task NAME")
        if self.task:
            resolve_task(self.task)  # an unknown name fails now, listing the valid ones
            if self.task_n is not None and self.task_n < 1:
                raise ConfigError(f"option 'task_n' must be >= 1, got {self.task_n}")
        for path in self.data:  # fail before the model loads
            if is_task_file(path):
                raise ConfigError(
                    f"{path}: a task file (question/answer lines), not chat or text data: "
                    f"pass it as --task {path}"
                )
        if self.overlong not in OVERLONG:
            raise ConfigError(f"option 'overlong' must be one of {OVERLONG}, got {self.overlong!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"option 'val_fraction' must be in [0, 1), got {self.val_fraction}")


@dataclass
class SFTOptions(ChatDataOptions, LoopOptions):
    out: str = "runs/sft"
    model: str = ""  # checkpoint directory to fine-tune
    tokenizer: str | None = None  # tokenizer directory; None: the model directory
    max_steps: int = 200
    epochs: float = 0.0  # > 0: max_steps = epochs over the packed data (R1 uses 2)
    lr: float = 5e-4
    warmup_steps: int = 10
    mtp_lambda: float = 0.1  # V3's final pre-training weight; 0 skips the MTP modules

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("no model: give --model DIR (a checkpoint directory)")
        if not os.path.isdir(self.model):
            raise ConfigError(f"option 'model': {self.model} is not a checkpoint directory")
        self.validate_data()
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        if self.mtp_lambda < 0 or self.epochs < 0:
            raise ConfigError("options 'mtp_lambda' and 'epochs' must be >= 0")


# ------------------------------------------------------------------------------ set-up
def prepare_datasets(
    opts: ChatDataOptions,
    tokenizer,
    seed: int,
    batch_size: int,
    eval_batches: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[SFTDataset, list[SFTBatch] | None, DataStats]:
    """(train SFTDataset, fixed validation batches or None, stats) from the data options.
    With several ranks, `batch_size` is each rank's share: rank r's batch i holds rows
    (i*W + r)*b .. of the packed order, so the W ranks' batches i together are one process's
    batch i of W*b rows."""
    convs = []
    if opts.task:
        convs = task_conversations(
            opts.task, opts.task_n, seed=seed, level=opts.task_level, system=opts.task_system,
            holdout=opts.task_holdout,
        )  # fmt: skip
    L = opts.seq_len + 1
    examples, stats = load_examples(
        opts.data, tokenizer, L, overlong=opts.overlong, text_field=opts.text_field,
        conversations=convs,
    )  # fmt: skip
    if opts.val_data:
        val, _ = load_examples(opts.val_data, tokenizer, L, overlong=opts.overlong,
                               text_field=opts.text_field)  # fmt: skip
        train = examples
    else:
        train, val = split_examples(examples, opts.val_fraction, seed)
    kw = dict(seq_len=opts.seq_len, batch_size=batch_size, pad_id=tokenizer.pad_id, seed=seed,
              rank=rank, world_size=world_size)  # fmt: skip
    train_ds = SFTDataset(train, **kw)
    val_batches = None  # None, not []: the loop then logs no validation loss at all
    if val and eval_batches > 0:
        try:
            val_ds = SFTDataset(val, shuffle=False, **kw)
        except SFTDataError:  # a small validation split over several ranks: 1 row per batch
            try:
                val_ds = SFTDataset(val, shuffle=False, **{**kw, "batch_size": 1})
            except SFTDataError:
                raise SFTDataError(
                    f"validation data: {len(val)} examples pack into fewer rows than the "
                    f"{world_size} ranks: raise val_fraction or give more val_data"
                ) from None
        val_batches = val_ds.fixed_batches(eval_batches)
    return train_ds, val_batches, stats


def describe(stats: DataStats, ds: SFTDataset, val_batches: list | None) -> str:
    rows = ds.rows(0)
    fill = sum(ds.lengths) / max(len(rows) * (ds.seq_len + 1), 1)
    return (
        f"{stats.examples} examples ({stats.label_tokens:,} of {stats.tokens:,} tokens labelled), "
        f"{len(rows)} rows of {ds.seq_len + 1} ({fill:.0%} full), {len(ds)} batches/epoch, "
        f"{len(val_batches or [])} validation batches; {stats.truncated} truncated, "
        f"{stats.dropped} dropped"
    )


def make_loss_fn(mtp_lambda: float):
    """lm_loss on assistant tokens [+ mtp_lambda * mean MTP loss] [+ the balance loss]."""

    def loss_fn(model, batch, step: int):
        use_mtp = mtp_lambda > 0 and len(model.mtp) > 0
        out = model(batch.inputs, mtp=use_mtp, token_mask=batch.token_mask)
        obj = mtp_objective(out.logits, out.mtp_logits, batch.targets, mtp_lambda, out.aux_loss)
        return obj.loss, obj.parts()

    return loss_fn


def steps_for_epochs(epochs: float, ds: SFTDataset, grad_accum: int) -> int:
    return max(1, math.ceil(epochs * len(ds) / grad_accum))


# ------------------------------------------------------------------------------ the run
def run_sft(opts: SFTOptions, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune `opts.model` on the data, export OUT/model; returns the final metrics.

    Under torchrun every rank calls this (nanoseek/dist/parallel.py decides from the
    environment), as in pre-training: `batch_size` is the global number of sequences per
    micro-batch, each rank trains on its share of every batch with the weights sharded (FSDP2,
    expert parallelism), rank 0 writes the files and the consolidated model."""
    opts.validate()
    with launch(opts, routed_experts(opts.model)) as par:
        return _run_sft(opts, par, resume, progress)


def _run_sft(opts: SFTOptions, par, resume: bool, progress: bool) -> dict:
    os.makedirs(opts.out, exist_ok=True)
    torch.manual_seed(opts.seed)
    tok_src, tokenizer, model = load_for_training(opts.model, opts.tokenizer)
    cfg = model.config
    if opts.seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"option 'seq_len' {opts.seq_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    train_ds, val_batches, stats = prepare_datasets(
        opts, tokenizer, opts.seed, opts.batch_size // par.world_size, opts.eval_batches,
        par.rank, par.world_size,
    )  # fmt: skip
    if par.is_main:
        print(f"sft data: {describe(stats, train_ds, val_batches)}", file=sys.stderr)
    if opts.epochs > 0:
        opts = dataclasses.replace(
            opts, max_steps=steps_for_epochs(opts.epochs, train_ds, opts.grad_accum)
        )

    # after the checks of model and data: a failing new run leaves the previous one in place
    claim_out_dir(opts.out, resume, opts.overwrite, par)
    tok_files = write_run_files(par, opts, tok_src, data_stats=stats.to_dict())
    trainer = Trainer(
        par.parallelize(model, opts.precision),
        opts,
        make_loss_fn(opts.mtp_lambda),
        train_ds,
        val_batches,
        extra_files=tok_files,
        run_info=to_dict(opts),
        parallel=par,
    )
    if resume and trainer.resume() and par.is_main:
        print(f"resumed from step {trainer.step} in {opts.out}", file=sys.stderr)
    last = trainer.fit(progress=progress_bar("sft") if progress else None)
    export_hf(trainer.model, os.path.join(opts.out, "model"), tok_files, par)
    if opts.plot and par.is_main:
        write_plot(opts.out, "SFT loss (assistant tokens)")
    return last


def progress_bar(desc: str):
    def make(total: int, initial: int):
        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                    mininterval=1.0)  # fmt: skip

    return make


def write_plot(out_dir: str, title: str) -> None:
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    if records:
        plot_losses(records, os.path.join(out_dir, "loss.png"), title=title)
