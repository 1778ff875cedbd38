"""Knowledge distillation: a teacher into a smaller student that shares its tokenizer.

    nanoseek distill --teacher runs/big/model --student tiny --data chats.jsonl --out runs/kd
    nanoseek distill --teacher T --student S --task countdown --loss=jsd --beta=0.5 \\
        --onpolicy_frac=0.5 --out runs/gkd                              # GKD
    nanoseek distill --teacher T --student S --task countdown --mode=sequence --out runs/seq

Two modes:
- `logit` (default): the student matches the teacher's next-token distributions on the labelled
  tokens of each batch, with forward KL, reverse KL or the generalised JSD(beta) at a temperature
  (distill_losses.py), optionally plus `ce_weight` x the hard-label loss. Batches come from the
  dataset (SFT chat JSONL, task conversations or plain pre-training text) or, with probability
  `onpolicy_frac` (GKD's lambda), are sequences the student itself samples from the data's prompts
  and the teacher then grades token by token - training on its own mistakes removes the
  train/inference mismatch of plain KD [GKD, Agarwal et al. 2024].
- `sequence`: R1-Distill [R1 §2.4]: the teacher samples `samples_per_prompt` completions for
  `task_n` problems of `task`, the verifier keeps the correct, well-formed, finished ones
  (de-duplicated; written to OUT/teacher_samples.jsonl with OUT/teacher_samples.json holding the
  counts), and the student is fine-tuned on them with `run_sft`. R1 found this beats RL on the
  small model itself.

The student is a checkpoint directory (its tokenizer must be the teacher's), or a preset name /
config.json for a fresh one whose vocabulary is the teacher's. Validation loss is the student's
plain cross-entropy on held-out labelled tokens, so it compares directly with an SFT run on the
same data; the teacher's own validation loss is printed once at the start for reference.
Like SFT, distillation never updates the routing bias.

Shape legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nanoseek.checkpoint.io import load, save
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.dist.checkpoint import export_hf
from nanoseek.dist.parallel import launch
from nanoseek.eval.sampling import SampleFn, engine_sample_fn, sample_problems, stop_ids
from nanoseek.fsio import write_json
from nanoseek.model.loss import IGNORE_INDEX, lm_loss
from nanoseek.model.mtp_objective import mtp_objective
from nanoseek.model.transformer import CausalLM
from nanoseek.presets import PRESETS
from nanoseek.tasks.resolve import draws, resolve_task
from nanoseek.train.distill_losses import LOSSES, distill_loss
from nanoseek.train.loop import LoopOptions, Trainer
from nanoseek.train.options import to_dict
from nanoseek.train.rejection import SampleFilter, reply_opening, to_conversation
from nanoseek.train.run_dir import claim_out_dir
from nanoseek.train.sft import (
    ChatDataOptions,
    SFTOptions,
    copy_tokenizer,
    describe,
    prepare_datasets,
    progress_bar,
    routed_experts,
    run_sft,
    steps_for_epochs,
    tokenizer_dir,
    write_plot,
    write_run_files,
)
from nanoseek.train.sft import make_loss_fn as sft_loss_fn
from nanoseek.train.sft_data import Example, SFTBatch, collate, write_chat_jsonl

MODES = ("logit", "sequence")


# ------------------------------------------------------------------------------ generation
def default_sample_fn(tokenizer, batch_size: int = 64) -> SampleFn:
    """The inference engine (continuous batching over the latent cache), stopping at eos: what
    samples the teacher (sequence mode) and the student (on-policy batches). Runs and tests
    inject scripted ones instead (`run_distill(..., sample_fn=...)`)."""
    return engine_sample_fn(stop_ids(tokenizer), batch_size=batch_size)


# ------------------------------------------------------------------------------ options
@dataclass
class DistillOptions(ChatDataOptions, LoopOptions):
    out: str = "runs/distill"
    teacher: str = ""  # checkpoint directory
    student: str = "tiny"  # checkpoint directory, preset name or config.json
    tokenizer: str | None = None  # tokenizer directory; None: the teacher's
    mode: str = "logit"  # logit | sequence
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    beta: float = 0.5  # JSD(beta): 0 = forward KL, 1 = reverse KL
    temperature: float = 1.0  # divides both logit sets in the loss
    ce_weight: float = 0.0  # + ce_weight x hard-label cross-entropy
    onpolicy_frac: float = 0.0  # lambda: share of batches the student samples itself (GKD)
    max_new_tokens: int = 128  # on-policy and sequence-level generation
    gen_temperature: float = 1.0
    samples_per_prompt: int = 4  # sequence mode: teacher samples per problem
    keep_unverified: bool = False  # sequence mode: keep wrong/ill-formed samples too
    max_steps: int = 200
    epochs: float = 0.0
    lr: float = 5e-4
    warmup_steps: int = 10
    mtp_lambda: float = 0.1  # student MTP loss on the batch's tokens; 0 skips the modules

    def validate(self) -> None:
        if not self.teacher or not os.path.isdir(self.teacher):
            raise ConfigError(f"option 'teacher': {self.teacher!r} is not a checkpoint directory")
        if self.mode not in MODES:
            raise ConfigError(f"option 'mode' must be one of {MODES}, got {self.mode!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"option 'loss' must be one of {LOSSES}, got {self.loss!r}")
        if not 0 <= self.beta <= 1 or not 0 <= self.onpolicy_frac <= 1:
            raise ConfigError("options 'beta' and 'onpolicy_frac' must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"option 'temperature' must be > 0, got {self.temperature}")
        if self.mode == "sequence" and not self.task:
            raise ConfigError("mode=sequence needs --task (its verifier filters the samples)")
        self.validate_data()
        for name in ("seq_len", "batch_size", "max_steps", "max_new_tokens", "samples_per_prompt"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")


# ------------------------------------------------------------------------------ models
def load_teacher(path: str):
    teacher = load(path, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    return teacher


def check_same_tokenizer(student_dir: str, tokenizer) -> None:
    """A student directory with a tokenizer must have the teacher's (same ids for same text)."""
    if os.path.isfile(os.path.join(student_dir, "tokenizer.json")):
        theirs = Tokenizer.load(student_dir).fingerprint
        if theirs != tokenizer.fingerprint:
            raise ConfigError(
                f"student {student_dir} has another tokenizer than the teacher ({theirs} vs "
                f"{tokenizer.fingerprint}): distillation needs a shared vocabulary"
            )


def build_student(spec: str, teacher_cfg: ModelConfig, tokenizer):
    """A checkpoint directory (loaded), or a preset / config.json (fresh, with the teacher's
    vocabulary and special ids)."""
    if os.path.isdir(spec):
        check_same_tokenizer(spec, tokenizer)
        model = load(spec, dtype=torch.float32)
    else:
        if spec in PRESETS:
            cfg = ModelConfig.from_preset(spec)
        elif os.path.isfile(spec):
            cfg = ModelConfig.from_json_file(spec)
        else:
            raise ConfigError(
                f"option 'student': {spec!r} is neither a checkpoint directory, a preset "
                f"({', '.join(PRESETS)}) nor a config.json"
            )
        cfg = cfg.replace(
            vocab_size=teacher_cfg.vocab_size,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )
        model = CausalLM(cfg)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"student vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    return model


@torch.no_grad()
def sum_ce(model, batches: Sequence[SFTBatch]) -> tuple[float, int]:
    """(summed cross-entropy, labelled targets) of `model` over the batches (a reference
    number: the teacher's loss on the validation data)."""
    total, count = 0.0, 0
    for b in batches:
        t = b.targets(0)
        n = int((t != IGNORE_INDEX).sum())
        if n:
            total += lm_loss(model(b.inputs, mtp=False).logits, t).item() * n
            count += n
    return total, count


# ------------------------------------------------------------------------------ on-policy data
class OnPolicyData:
    """GKD's data mix: each draw is, with probability `frac`, a batch of sequences the student
    samples from random dataset prompts (labels on the sampled tokens only), else the dataset's
    next batch. Deterministic in (seed, draw number) and resumable."""

    def __init__(
        self,
        dataset,
        prompts: list[list[int]],
        model,
        frac: float,
        sample_fn: SampleFn,
        *,
        max_new_tokens: int,
        temperature: float,
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
    ):
        L = seq_len + 1
        self.prompts = [p for p in prompts if 0 < len(p) < L - 1]
        if frac > 0 and not self.prompts:
            raise ConfigError(
                "onpolicy_frac > 0 needs prompts that fit seq_len: use chat data or --task "
                "(plain text has no prompt/answer split)"
            )
        self.dataset, self.model, self.frac, self.sample_fn = dataset, model, frac, sample_fn
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.batch_size, self.L, self.pad_id, self.seed = batch_size, L, pad_id, seed
        self.draws = self.generated_batches = 0
        self.last_gen_len = 0.0

    def __iter__(self) -> OnPolicyData:
        return self

    def __next__(self) -> SFTBatch:
        rng = np.random.default_rng([self.seed, self.draws])
        self.draws += 1
        if self.frac == 0 or rng.random() >= self.frac:
            return next(self.dataset)
        idx = rng.choice(len(self.prompts), size=self.batch_size)
        prompts = [self.prompts[i] for i in idx]
        room = self.L - max(len(p) for p in prompts)
        gens = self.sample_fn(
            self.model,
            prompts,
            min(self.max_new_tokens, room),
            self.temperature,
            int(rng.integers(2**31)),
        )
        rows = [
            [(r, Example(p + g, [IGNORE_INDEX] * len(p) + list(g), "on-policy"))]
            for r, (p, g) in enumerate(zip(prompts, gens))
            if g
        ]
        if not rows:  # nothing generated at all: fall back to the data
            return next(self.dataset)
        self.generated_batches += 1
        self.last_gen_len = sum(len(g) for g in gens) / len(gens)
        return collate(rows, self.pad_id, self.L)

    def stats(self) -> dict[str, float]:
        return {
            "onpolicy_batches": float(self.generated_batches),
            "onpolicy_gen_len": self.last_gen_len,
        }

    def state_dict(self) -> dict:
        return {
            "dataset": self.dataset.state_dict(),
            "draws": self.draws,
            "generated_batches": self.generated_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.draws, self.generated_batches = int(state["draws"]), int(state["generated_batches"])


# ------------------------------------------------------------------------------ the loss
def make_loss_fn(teacher, opts: DistillOptions, vocab: int):
    """kd(student, teacher) on labelled targets [+ ce_weight * CE] [+ MTP] [+ balance loss].

    In eval mode (validation) only the student's cross-entropy is computed: `main_loss` is the
    hard-label loss in both modes, so validation curves compare with SFT's.
    """
    plain = sft_loss_fn(opts.mtp_lambda)

    def loss_fn(model, batch, step: int):
        if not model.training:
            return plain(model, batch, step)
        use_mtp = opts.mtp_lambda > 0 and len(model.mtp) > 0
        out = model(batch.inputs, mtp=use_mtp, token_mask=batch.token_mask)
        targets = batch.targets(0)  # [B,T]
        with torch.no_grad():
            t_logits = teacher(batch.inputs, mtp=False, token_mask=batch.token_mask).logits
        # both vocabularies cut to the tokenizer's: rows past it are padding ids, never targets
        kd = distill_loss(
            opts.loss, out.logits[..., :vocab], t_logits[..., :vocab], targets != IGNORE_INDEX,
            beta=opts.beta, temperature=opts.temperature,
        )  # fmt: skip
        obj = mtp_objective(out.logits, out.mtp_logits, batch.targets, opts.mtp_lambda,
                            out.aux_loss, main_weight=opts.ce_weight)  # fmt: skip
        return kd + obj.loss, {**obj.parts(), "kd_loss": kd.item()}

    return loss_fn


# ------------------------------------------------------------------------------ the runs
def run_distill(
    opts: DistillOptions,
    resume: bool = False,
    progress: bool = True,
    sample_fn: SampleFn | None = None,
) -> dict:
    """Distil `opts.teacher` into `opts.student`, export OUT/model; returns the final metrics.
    `sample_fn` replaces the generator (default: the engine, `default_sample_fn`).

    Under torchrun every rank calls this, as in SFT: the student is sharded like a pre-training
    model, every rank holds the whole (frozen) teacher and scores its own share of each batch;
    in sequence mode rank 0 alone samples the teacher. The student's own on-policy samples
    (onpolicy_frac > 0) are single-process only: ranks would run different numbers of
    generation steps through the sharded student."""
    opts.validate()
    with launch(opts, student_experts(opts.student, opts.teacher)) as par:
        if par.distributed and opts.mode == "logit" and opts.onpolicy_frac > 0:
            raise ConfigError(
                "option 'onpolicy_frac' > 0 (the student samples its own sequences) runs in "
                "one process only: drop torchrun or set onpolicy_frac=0"
            )
        if opts.mode == "sequence":
            return run_sequence_distill(opts, par, resume, progress, sample_fn)
        return _run_logit_distill(opts, par, resume, progress, sample_fn)


def student_experts(student: str, teacher: str) -> int | None:
    """n_routed_experts of the student to be (expert parallelism must divide it)."""
    if os.path.isdir(student):
        return routed_experts(student)
    if student in PRESETS:
        return ModelConfig.from_preset(student).n_routed_experts
    if os.path.isfile(student):
        return ModelConfig.from_json_file(student).n_routed_experts
    return routed_experts(teacher)  # not a student spec: build_student reports it


def _run_logit_distill(opts: DistillOptions, par, resume, progress, sample_fn) -> dict:
    os.makedirs(opts.out, exist_ok=True)
    torch.manual_seed(opts.seed)
    tok_src = tokenizer_dir(opts.teacher, opts.tokenizer)
    tokenizer = Tokenizer.load(tok_src)
    teacher = load_teacher(opts.teacher).to(par.device)
    student = build_student(opts.student, teacher.config, tokenizer)
    for name, m in (("teacher", teacher), ("student", student)):
        if opts.seq_len > m.config.max_position_embeddings:
            raise ConfigError(
                f"option 'seq_len' {opts.seq_len} exceeds the {name}'s max_position_embeddings"
            )
    W = par.world_size
    train_ds, val_batches, stats = prepare_datasets(
        opts, tokenizer, opts.seed, opts.batch_size // W, opts.eval_batches, par.rank, W
    )
    if par.is_main:
        print(f"distill data: {describe(stats, train_ds, val_batches)}", file=sys.stderr)
    if opts.epochs > 0:
        opts = dataclasses.replace(
            opts, max_steps=steps_for_epochs(opts.epochs, train_ds, opts.grad_accum)
        )
    prompts = [ex.ids[: ex.prompt_len] for ex in train_ds.examples if ex.prompt_len > 1]
    data = OnPolicyData(
        train_ds, prompts, student, opts.onpolicy_frac,
        sample_fn or default_sample_fn(tokenizer, opts.batch_size),
        max_new_tokens=opts.max_new_tokens, temperature=opts.gen_temperature,
        batch_size=opts.batch_size, seq_len=opts.seq_len, pad_id=tokenizer.pad_id, seed=opts.seed,
    )  # fmt: skip
    # the teacher's loss on every rank's validation rows, summed over the ranks
    total, count = par.sum(list(sum_ce(teacher, [par.to_device(b) for b in val_batches or []])))
    teacher_val = total / count if count else None

    teacher_eval = {"teacher_val_loss": teacher_val, **stats.to_dict()}
    # after the checks of models and data: a failing new run leaves the previous one in place
    claim_out_dir(opts.out, resume, opts.overwrite, par)
    tok_files = write_run_files(par, opts, tok_src, teacher_eval=teacher_eval)
    if teacher_val is not None and par.is_main:
        print(f"teacher val loss {teacher_val:.4f}", file=sys.stderr)
    trainer = Trainer(
        par.parallelize(student, opts.precision),
        opts,
        make_loss_fn(teacher, opts, tokenizer.vocab_size),
        data,
        val_batches,
        extra_files=tok_files,
        after_step=(lambda step: data.stats()) if opts.onpolicy_frac > 0 else None,
        run_info=to_dict(opts),
        parallel=par,
    )
    if resume and trainer.resume() and par.is_main:
        print(f"resumed from step {trainer.step} in {opts.out}", file=sys.stderr)
    last = trainer.fit(progress=progress_bar("distill") if progress else None)
    export_hf(trainer.model, os.path.join(opts.out, "model"), tok_files, par)
    if opts.plot and par.is_main:
        write_plot(opts.out, f"distillation ({opts.loss}), student cross-entropy")
    return last


def teacher_samples(
    teacher,
    tokenizer,
    task,
    problems,
    sample_fn: SampleFn,
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int = 0,
    system: bool = False,
    keep_unverified: bool = False,
) -> tuple[list[list[dict[str, str]]], dict]:
    """The teacher's verified samples as SFT conversations, and counts of what was dropped.

    A sample is kept when it finished (ends in a stop token), passes the task's strict verifier
    and the format reward, and is not a duplicate of a kept sample for the same problem: the
    rules of rejection sampling (`SampleFilter`, nanoseek/train/rejection.py).
    """
    rows = sample_problems(
        teacher, tokenizer, problems, samples_per_prompt, system=system, temperature=temperature,
        max_new_tokens=max_new_tokens, seed=seed, sample_fn=sample_fn, chunk_size=batch_size,
    )  # fmt: skip
    filt = SampleFilter(task, keep_unverified=keep_unverified)
    opening = reply_opening(tokenizer, system)
    conversations = [
        to_conversation(s, system, opening) for row in rows for s in row if filt.add(s)
    ]
    return conversations, filt.counts()


def run_sequence_distill(
    opts: DistillOptions, par, resume: bool, progress: bool, sample_fn: SampleFn | None
) -> dict:
    """Teacher samples -> verifier -> OUT/teacher_samples.jsonl -> SFT of the student. Rank 0
    samples and writes the files (under torchrun the others wait), then every rank runs SFT."""
    claim_out_dir(opts.out, resume, opts.overwrite, par)  # before the teacher data is written
    os.makedirs(opts.out, exist_ok=True)
    tok_src = tokenizer_dir(opts.teacher, opts.tokenizer)
    student_dir = par.broadcast(
        par.on_main(lambda: _teacher_data(opts, tok_src, resume, sample_fn))
    )
    shared = {f.name for f in dataclasses.fields(SFTOptions)} & {
        f.name for f in dataclasses.fields(DistillOptions)
    }
    values = {k: getattr(opts, k) for k in shared}
    samples_path = os.path.join(opts.out, "teacher_samples.jsonl")
    # overwrite: done above; SFT must not delete the teacher data and student just written
    values.update(model=student_dir, data=[samples_path], task=None, tokenizer=tok_src,
                  overwrite=False)  # fmt: skip
    return run_sft(SFTOptions(**values), resume=resume, progress=progress)


def _teacher_data(opts: DistillOptions, tok_src: str, resume: bool, sample_fn) -> str:
    """Sequence mode's data: the teacher's verified samples and the student's starting
    checkpoint (written once, kept on resume); returns the student's directory."""
    tokenizer = Tokenizer.load(tok_src)
    samples_path = os.path.join(opts.out, "teacher_samples.jsonl")
    stats_path = os.path.join(opts.out, "teacher_samples.json")
    teacher = None
    if not (resume and os.path.exists(stats_path)):  # the stats file is written last
        task = resolve_task(opts.task, split=None if opts.task_holdout else "train")
        n = draws(task, opts.task_n, "train", opts.task_level)
        problems = list({p.id: p for p in task.generate(
            n, "train", seed=opts.seed, level=opts.task_level)}.values())  # fmt: skip
        teacher = load_teacher(opts.teacher)
        convs, counts = teacher_samples(
            teacher, tokenizer, task, problems, sample_fn or default_sample_fn(tokenizer),
            samples_per_prompt=opts.samples_per_prompt, max_new_tokens=opts.max_new_tokens,
            temperature=opts.gen_temperature, batch_size=opts.batch_size, seed=opts.seed,
            system=opts.task_system, keep_unverified=opts.keep_unverified,
        )  # fmt: skip
        print(f"teacher samples: {json.dumps(counts)}", file=sys.stderr)
        if not convs:
            raise ValueError(
                f"the teacher produced no verified sample for {len(problems)} {opts.task} "
                "problems: raise max_new_tokens or samples_per_prompt, or use a stronger teacher"
            )
        write_chat_jsonl(convs, samples_path)
        write_json(stats_path, counts)  # written last: its presence marks the samples complete
    write_json(os.path.join(opts.out, "distill_options.json"), to_dict(opts))
    student_dir = opts.student
    if os.path.isdir(student_dir):
        check_same_tokenizer(student_dir, tokenizer)
    else:  # a fresh student: save it so SFT can load it
        student_dir = os.path.join(opts.out, "student_init")
        if not os.path.exists(os.path.join(student_dir, "config.json")):
            teacher_cfg = (teacher or load_teacher(opts.teacher)).config
            torch.manual_seed(opts.seed)
            student = build_student(opts.student, teacher_cfg, tokenizer)
            save(student, student_dir, extra_files=copy_tokenizer(tok_src, opts.out))
    return student_dir
