"""The one training loop every method (pre-training, SFT, distillation) runs on.

A method supplies a loss function and data; the loop owns the rest: AdamW, the schedule,
gradient accumulation, clipping, bf16 autocast, metrics (`metrics.jsonl`, a progress bar and,
when asked, TensorBoard or W&B: nanoseek/train/tracking.py), validation, atomic checkpoints and
exact resume.

Loss normalisation: a micro-batch's mean loss is weighted by its share of the step's target
tokens, so one step over k micro-batches equals one step over their concatenation.

Under torchrun the same loop runs on every rank (`parallel`, nanoseek/dist/parallel.py): the
share is of the *global* target tokens and gradients are summed across ranks, so W ranks x k
micro-batches make the same step as one process with W*k micro-batches; metrics are global
sums; rank 0 alone writes metrics and the progress bar; checkpoints are sharded (DCP).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import increment_version

from nanoseek.checkpoint.io import CheckpointError, load
from nanoseek.checkpoint.trainer_state import load_state, rng_state, save_checkpoint, set_rng_state
from nanoseek.dist.checkpoint import (
    adapt_data_state,
    is_sharded,
    load_full,
    load_sharded,
    save_sharded,
)
from nanoseek.dist.parallel import SingleProcess
from nanoseek.fp8 import convert_for_fp8
from nanoseek.fsio import naming
from nanoseek.model.compile import TrainingCompiler
from nanoseek.train.adamw_bf16 import AdamWBF16Moments
from nanoseek.train.run_dir import resumable_checkpoint, truncate_jsonl
from nanoseek.train.schedule import lr_at
from nanoseek.train.tracking import Trackers, open_trackers, parse_report_to

__all__ = ["LoopOptions", "Trainer", "TrainingDiverged", "make_optimizer", "truncate_jsonl"]


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


@dataclass
class LoopOptions:
    out: str = "runs/pretrain"
    max_steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    lr_schedule: str = "cosine"  # cosine | wsd | constant
    decay_frac: float = 0.2  # wsd: final fraction of steps that decays
    weight_decay: float = 0.1  # V3 §4.2
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16_moments: bool = False  # keep AdamW's moments in bf16 (V3 §3.3.2), halves their memory
    # fp32 | bf16 (autocast, fp32 master weights) | fp8 (the projections and experts become FP8
    # GEMMs with fine-grained scaling, nanoseek/fp8, for every method; the rest runs as bf16)
    precision: str = "bf16"
    # compile the training forward and backward of every decoder layer (torch.compile, one graph
    # per layer kind, no graph breaks, nanoseek/model/compile.py); evaluation and generation stay
    # eager. The first step pays the compilation (logged once); inductor caches it on disk
    compile: bool = False
    seed: int = 1337
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_last: int = 2
    # start afresh in an `out` that holds a previous run, deleting its checkpoints and logs
    # (without it, and without resume, such an `out` is an error: nanoseek/train/run_dir.py)
    overwrite: bool = False
    plot: bool = True
    # experiment tracking as TRL's option of this name: none | tensorboard | wandb (a comma list,
    # or all); metrics.jsonl and the plots are written either way (nanoseek/train/tracking.py)
    report_to: str = "none"
    run_name: str | None = None  # the tracker's run name; None: the name of `out`
    # scale-out, used under torchrun (docs/distributed.md); batch_size is then the GLOBAL number
    # of sequences per micro-batch, split over the ranks
    device: str = "cpu"  # cpu | cuda (rank r uses cuda:LOCAL_RANK); backend gloo | nccl
    dp: int = 0  # data-parallel groups of the expert mesh; 0: world size / ep
    ep: int = 1  # expert-parallel ranks (divides n_routed_experts)
    fsdp: bool = True  # shard weights with FSDP2; false: replicate them (DDP-style)
    dist_timeout_s: float = 600.0  # a collective waiting longer than this fails the run


# A method's loss: (model, batch, step) -> (loss, {metric: float})
LossFn = Callable[[torch.nn.Module, Any, int], tuple[torch.Tensor, dict[str, float]]]


class Trainer:
    def __init__(
        self,
        model,
        opts: LoopOptions,
        loss_fn: LossFn,
        train_data,
        val_data=None,
        extra_files=(),
        after_step: Callable[[int], dict] | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        run_info: dict | None = None,
        parallel: SingleProcess | None = None,
        varying_shapes: bool = False,
    ):
        """varying_shapes: the micro-batch shapes change from step to step (RL completions);
        with `compile`, the layers are compiled for symbolic shapes (nanoseek/model/compile.py)."""
        if opts.precision not in ("fp32", "bf16", "fp8"):
            raise ValueError(
                f"option 'precision' must be fp32, bf16 or fp8, got {opts.precision!r}"
            )
        if opts.compile and opts.precision == "fp8":  # checked before any work is done
            raise ValueError(
                "option 'compile' works with precision fp32 or bf16: FP8's grouped expert GEMMs "
                "split their rows on the host (nanoseek/fp8/grouped.py), which dynamo cannot trace"
            )
        self.model, self.opts, self.loss_fn = model, opts, loss_fn
        self.train_data, self.val_data = train_data, val_data
        self.extra_files, self.after_step = list(extra_files), after_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.run_info = run_info or {}
        self.parallel = parallel or SingleProcess()
        if opts.precision == "fp8":
            convert_for_fp8(model, self.parallel.is_main)
        parse_report_to(opts.report_to)  # a typo fails now, not after the first step
        self.optimizer = make_optimizer(model, opts)
        self.compiler = None
        if opts.compile:
            # after the FP8 conversion: its GEMMs are compiled too
            self.compiler = TrainingCompiler(model, varying_shapes=varying_shapes)
        self._compile_logged = False
        self.step = 0
        self.metrics_path = os.path.join(opts.out, "metrics.jsonl")

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Restore the latest checkpoint in `out` if there is one (weights, optimizer, data
        position, RNG); returns whether it did."""
        state = self.load_latest()
        if self.parallel.is_main:  # rows past the checkpoint (all rows, without one) are redone
            truncate_jsonl(self.metrics_path, state["step"] if state else 0)
        if state is None:
            return False
        try:
            self.train_data.load_state_dict(adapt_data_state(state["data"], self.train_data))
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{state['_path']}: field 'data' is malformed ({e})") from None
        set_rng_state(state["rng"])
        self.step = state["step"]
        return True

    def save(self) -> str:
        state = {
            "step": self.step,
            "data": self.train_data.state_dict(),
            "rng": rng_state(),
            "options": self.run_info,
        }
        return self.save_state(self.step, state)

    def load_latest(self) -> dict | None:
        """Weights and optimizer from the latest checkpoint in `out`, in either format
        (one-process HF directory or sharded) and written at any world size; returns the
        checkpoint's trainer state (None: no checkpoint). Methods with their own loop (GRPO)
        restore the rest themselves."""
        par = self.parallel
        # rank 0 picks the newest intact checkpoint (setting broken ones aside), all load it
        found = par.on_main(lambda: resumable_checkpoint(self.opts.out))
        path = par.broadcast(found[0] if found else None)
        if path is None:
            return None
        state = found[1] if found else load_state(path)
        state["_path"] = path  # for error messages; never saved (save() builds a fresh dict)
        if is_sharded(path):
            load_sharded(path, self.model, self.optimizer)
            return state
        if "optimizer" not in state:
            raise CheckpointError(f"{path}: the trainer state has no field 'optimizer'")
        try:
            if par.distributed:
                load_full(path, self.model, self.optimizer, state["optimizer"])
            else:
                loaded = load(path, dtype=torch.float32, device=self.model.device)
                self.model.load_state_dict(loaded.state_dict())
                self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError, IndexError) as e:  # a state of another model
            raise CheckpointError(f"{path}: optimizer state does not fit this run ({e})") from None
        return state

    def save_state(self, step: int, state: dict) -> str:
        """OUT/checkpoints/step-N: weights, optimizer and `state` (sharded under torchrun:
        every rank writes its shards)."""
        if self.parallel.distributed:
            return save_sharded(
                self.opts.out, step, self.model, self.optimizer, state,
                self.extra_files, self.opts.keep_last, self.parallel,
            )  # fmt: skip
        state = {**state, "optimizer": self.optimizer.state_dict()}
        return save_checkpoint(
            self.opts.out, step, self.model, state, self.extra_files, self.opts.keep_last
        )

    # ------------------------------------------------------------------ one step
    def autocast(self):
        if self.opts.precision in ("bf16", "fp8"):
            return torch.autocast(self.model.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compiled(self):
        """The compiled layers for a training forward (`compile`), else nothing; evaluation and
        generation never enter it, so they run the eager modules."""
        return self.compiler() if self.compiler is not None else contextlib.nullcontext()

    def _log_compile(self, metrics: dict[str, float]) -> None:
        """After the first compiled step: its compile time, once, and in that step's metrics."""
        if self.compiler is None or self._compile_logged:
            return
        self._compile_logged = True
        metrics["compile_s"] = self.compiler.compile_s
        if self.parallel.is_main:
            print(f"compiled in {self.compiler.compile_s:.1f} s", file=sys.stderr, flush=True)

    def train_step(self, batches: list[Any]) -> dict[str, float]:
        model, opts = self.model, self.opts
        lr = lr_at(
            self.step,
            peak=opts.lr,
            total=opts.max_steps,
            warmup=opts.warmup_steps,
            kind=opts.lr_schedule,
            min_ratio=opts.min_lr_ratio,
            decay_frac=opts.decay_frac,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        par = self.parallel
        counts = [_n_targets(b) for b in batches]
        total = int(par.sum([sum(counts)])[0]) or 1  # the step's target tokens, all ranks
        metrics: dict[str, float] = {}
        loss_value = 0.0
        for i, (batch, n) in enumerate(zip(batches, counts)):
            par.grad_sync(model, i == len(batches) - 1)  # FSDP: reduce after the last one
            batch = par.to_device(batch)
            with self.autocast(), self.compiled():
                loss, parts = self.loss_fn(model, batch, self.step)
            (loss * (n / total)).backward()  # the graph is freed micro-batch by micro-batch
            loss_value += loss.item() * n / total
            for k, v in parts.items():
                metrics[k] = metrics.get(k, 0.0) + v * n / total
        keys = list(metrics)  # the same keys, in the same order, on every rank
        loss_value, *values = par.sum([loss_value, *(metrics[k] for k in keys)])
        metrics = dict(zip(keys, values))
        par.reduce_grads(model)  # replicated weights: sum over ranks (FSDP already did)
        grad_norm = par.clip_grad_norm_(model, opts.grad_clip)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"step {self.step}: loss {loss_value} / grad norm {grad_norm} is not finite; "
                f"stopped without saving, the last good checkpoint in {self.opts.out} is kept"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics.update(loss=loss_value, lr=lr, grad_norm=grad_norm, target_tokens=total)
        self._log_compile(metrics)
        if self.after_step is not None:
            metrics.update(self.after_step(self.step))
        self.step += 1
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_data is None:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val_data:  # a fixed list: the same batches at every evaluation
            n = _n_targets(batch)
            with self.autocast():
                loss, parts = self.loss_fn(self.model, self.parallel.to_device(batch), self.step)
            total += parts.get("main_loss", loss.item()) * n
            count += n
        total, count = self.parallel.sum([total, count])  # each rank has its own rows
        self.model.train()
        return total / max(count, 1)

    # ------------------------------------------------------------------ the loop
    def open_trackers(self) -> Trackers:
        """The run's experiment trackers (`report_to`): opened on rank 0, empty elsewhere."""
        opts = self.opts
        return open_trackers(
            opts.report_to, opts.out, opts.run_name, self.run_info, enabled=self.parallel.is_main
        )

    def fit(self, progress=None) -> dict[str, Any]:
        """Train to `max_steps` from wherever `self.step` is; returns the last metrics."""
        opts, main = self.opts, self.parallel.is_main
        os.makedirs(opts.out, exist_ok=True)
        data: Iterator = iter(self.train_data)
        last: dict[str, Any] = {}
        bar = progress(total=opts.max_steps, initial=self.step) if progress and main else None
        log_file = open(self.metrics_path, "a") if main else contextlib.nullcontext()
        with log_file as log, self.open_trackers() as trackers:
            while self.step < opts.max_steps:
                t0 = time.perf_counter()
                batches = [next(data) for _ in range(opts.grad_accum)]
                n_tokens = self.parallel.sum([sum(_n_input_tokens(b) for b in batches)])[0]
                metrics = self.train_step(batches)
                dt = time.perf_counter() - t0
                metrics["step"] = self.step
                metrics["tokens_per_s"] = n_tokens / dt
                metrics["step_time_s"] = dt
                if self.flops_per_token and self.peak_flops:
                    metrics["mfu"] = (
                        metrics["tokens_per_s"] * self.flops_per_token / self.peak_flops
                    )
                if opts.eval_every and (
                    self.step % opts.eval_every == 0 or self.step == opts.max_steps
                ):
                    metrics["val_loss"] = self.evaluate()
                if log is not None:
                    with naming(self.metrics_path):  # a full disk: one line naming the file
                        log.write(json.dumps(metrics) + "\n")
                        log.flush()
                trackers.log(metrics, self.step)
                last = metrics
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
                    )
                if self.step % opts.save_every == 0 or self.step == opts.max_steps:
                    self.save()
        if bar is not None:
            bar.close()
        return last


def make_optimizer(model, opts: LoopOptions) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only (norm scales and biases are not decayed); the
    routing bias is a buffer and never reaches the optimizer [V3 §2.1.2]."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": opts.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if opts.bf16_moments:
        return AdamWBF16Moments(groups, lr=opts.lr, betas=(opts.beta1, opts.beta2))
    params = decay + no_decay
    kinds = {(type(p), getattr(p, "device_mesh", None)) for p in params}
    if len(kinds) <= 1 and all(p.device.type in ("cpu", "cuda") for p in params):
        # plain parameters, or FSDP shards of one mesh: the update fused into one kernel per
        # tensor list, on CPU 5x faster than the default per-tensor loop for fp32 (bench
        # model: 8 vs 22 ms a step; the foreach "fast" path is slower still there, 44 ms),
        # 2x for bf16, whose update it computes in fp32
        opt = torch.optim.AdamW(groups, lr=opts.lr, betas=(opts.beta1, opts.beta2), fused=True)
        # footgun: the fused kernel leaves the parameters' version counters alone, and the
        # decode caches (nanoseek/infer/weights.py: GRPO rollouts, in-training evaluation) see
        # new weights by those counters
        opt.register_step_post_hook(lambda opt, args, kwargs: increment_version(params))
        return opt
    # fused and foreach kernels cannot mix plain tensors and DTensors, or DTensors of two
    # meshes: expert slices beside FSDP shards (nanoseek/dist) take the per-tensor loop
    return torch.optim.AdamW(
        groups, lr=opts.lr, betas=(opts.beta1, opts.beta2), fused=False, foreach=False
    )


def _n_targets(batch) -> int:
    """Next-token targets of a micro-batch that carry a loss."""
    if hasattr(batch, "targets"):  # nanoseek.data.shards.Batch
        return int((batch.targets(0) != -100).sum())
    return int((batch["labels"][:, 1:] != -100).sum())  # HF convention: shifted inside


def _n_input_tokens(batch) -> int:
    return batch.inputs.numel() if hasattr(batch, "inputs") else batch["input_ids"].numel()
