"""Pre-training [V3 §4]: next-token loss + MTP loss + balancing, on the shared loop.

    nanoseek pretrain --out runs/tiny                      # built-in corpus, tiny preset
    nanoseek pretrain --config my.toml --data a.jsonl b.txt --max_steps=2000

What this method adds to the loop:
- data: the user's text/JSONL/Parquet files, or the built-in reasoning corpus; a byte-level BPE
  tokenizer trained on it unless one is given; token shards written once under OUT/data;
- the loss: L_main + lambda/D * sum_k L_k [V3 eq. 25] + the balance loss, where no target
  crosses a document boundary at any depth (`Batch.targets(k)`), and lambda follows V3's
  schedule (0.3, then 0.1);
- balancing after every optimizer step (nanoseek/train/balance.py): auxiliary-loss-free bias
  updates (default, with the small sequence-wise loss), or a classic batch-wise auxiliary loss
  to compare against, or none.

Under torchrun (docs/distributed.md) rank 0 writes the tokenizer and shards while the others
wait, each rank reads its own rows of every global batch, expert counts are summed over ranks
before the bias update, and rank 0 writes the consolidated OUT/model.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from nanoseek.analysis.plots import plot_expert_load, plot_losses, read_metrics
from nanoseek.checkpoint.accounting import account
from nanoseek.checkpoint.io import load
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.data.corpus import generate_corpus
from nanoseek.data.shards import PackedDataset, TokenShard, write_shards
from nanoseek.data.sources import read_documents
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer
from nanoseek.dist.checkpoint import export_hf
from nanoseek.dist.parallel import launch
from nanoseek.fsio import write_json
from nanoseek.model.mtp_objective import mtp_objective
from nanoseek.model.transformer import CausalLM
from nanoseek.presets import PRESETS
from nanoseek.train.balance import gather_loads, load_stats, start_counting, update_bias
from nanoseek.train.loop import LoopOptions, Trainer
from nanoseek.train.mfu import matmul_peak_flops
from nanoseek.train.options import to_dict
from nanoseek.train.run_dir import claim_out_dir
from nanoseek.train.schedule import piecewise

BALANCE = ("aux_free", "aux_loss", "none")


@dataclass
class PretrainOptions(LoopOptions):
    model: str = "tiny"  # preset name, a config.json, or a checkpoint directory to start from
    data: list[str] = field(default_factory=list)  # .txt/.jsonl/.parquet; empty: built-in corpus
    data_field: str = "text"  # JSONL field / Parquet column
    data_separator: str | None = None  # split .txt files into documents on this string
    corpus_docs: int = 30000  # size of the built-in corpus
    corpus_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # fit 256 tokens
    tokenizer: str | None = None  # a tokenizer directory; None: train one on the data
    vocab_size: int = 4096  # when training the tokenizer
    seq_len: int = 256
    val_fraction: float = 0.02
    mtp_lambda: float = 0.3  # [V3 §4.2] 0.3 for the first 10T tokens ...
    mtp_lambda_final: float = 0.1  # ... then 0.1
    mtp_switch_frac: float = 0.7  # fraction of steps at which lambda switches
    balance: str = "aux_free"  # aux_free | aux_loss | none
    bias_update_speed: float = 0.001  # gamma [V3 §4.2]
    bias_freeze_frac: float = 0.9  # gamma = 0 for the final 10% (V3: the last 500B tokens)
    seq_aux_alpha: float = 1e-4  # the complementary sequence-wise loss of aux_free [V3 eq. 17]
    aux_loss_alpha: float = 0.01  # the classic batch-wise auxiliary loss of balance=aux_loss

    def validate(self) -> None:
        if self.balance not in BALANCE:
            raise ConfigError(f"option 'balance' must be one of {BALANCE}, got {self.balance!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"option 'val_fraction' must be in [0, 1), got {self.val_fraction}")


# ------------------------------------------------------------------------------ set-up
def prepare_tokenizer(opts: PretrainOptions, documents_fn):
    if opts.tokenizer:
        return Tokenizer.load(opts.tokenizer)
    path = os.path.join(opts.out, "tokenizer")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return Tokenizer.load(path)
    return train_tokenizer(documents_fn(), opts.vocab_size, path)


def documents(opts: PretrainOptions):
    """The training documents: the user's files, or the built-in corpus."""
    if opts.data:
        return read_documents(opts.data, field=opts.data_field, separator=opts.data_separator)
    return generate_corpus(opts.corpus_docs, seed=opts.seed, levels=opts.corpus_levels)


def prepare_data(opts: PretrainOptions, tokenizer, rank: int = 0, world_size: int = 1):
    """Token shards under OUT/data (written once; reused on resume). With several ranks each
    reads rows rank*B/W .. of every global batch of B sequences: the windows of one process."""
    data_dir = os.path.join(opts.out, "data")
    if not os.path.exists(os.path.join(data_dir, "train.json")):
        write_shards(
            documents(opts), tokenizer, data_dir, val_fraction=opts.val_fraction, seed=opts.seed
        )
    train = TokenShard.open(data_dir, "train", tokenizer=tokenizer)
    B, shard = opts.batch_size // world_size, dict(rank=rank, world_size=world_size)
    train_ds = PackedDataset([train], opts.seq_len, B, seed=opts.seed, **shard)
    val_batches = []
    if opts.val_fraction > 0 and os.path.exists(os.path.join(data_dir, "val.json")):
        val = TokenShard.open(data_dir, "val", tokenizer=tokenizer)
        try:
            val_ds = PackedDataset([val], opts.seq_len, B, seed=opts.seed, shuffle=False, **shard)
        except ValueError:  # a small validation split: fewer sequences per batch
            val_ds = PackedDataset([val], opts.seq_len, 1, seed=opts.seed, shuffle=False, **shard)
        val_batches = [val_ds.batch(0, i) for i in range(min(opts.eval_batches, len(val_ds)))]
    return train_ds, val_batches


def base_config(opts: PretrainOptions) -> tuple[ModelConfig, str | None]:
    """(config as named by option 'model', checkpoint to start from or None)."""
    init = None
    if opts.model in PRESETS:
        cfg = ModelConfig.from_preset(opts.model)
    elif os.path.isdir(opts.model):
        cfg, init = ModelConfig.from_pretrained(opts.model), opts.model
    elif os.path.isfile(opts.model):
        cfg = ModelConfig.from_json_file(opts.model)
    else:
        raise ConfigError(
            f"option 'model': {opts.model!r} is neither a preset ({', '.join(PRESETS)}) "
            "nor a config.json / checkpoint directory"
        )
    return cfg, init


def model_config(opts: PretrainOptions, tokenizer) -> tuple[ModelConfig, str | None]:
    """(config, checkpoint to start from or None), with vocabulary and balancing filled in."""
    cfg, init = base_config(opts)
    if init is None:  # a fresh model: its vocabulary is the tokenizer's (rounded up for GEMMs)
        cfg = cfg.replace(
            vocab_size=-(-tokenizer.vocab_size // 64) * 64,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )
    elif cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"option 'model': checkpoint vocab_size {cfg.vocab_size} is smaller "
            f"than the tokenizer's {tokenizer.vocab_size}"
        )
    if opts.balance == "aux_free":
        cfg = cfg.replace(aux_loss_alpha=opts.seq_aux_alpha, seq_aux=True)
    elif opts.balance == "aux_loss":
        cfg = cfg.replace(aux_loss_alpha=opts.aux_loss_alpha, seq_aux=False)
    else:
        cfg = cfg.replace(aux_loss_alpha=0.0)
    return cfg, init


def make_loss_fn(opts: PretrainOptions):
    def loss_fn(model: CausalLM, batch, step: int):
        out = model(batch.inputs, mtp=True)
        # lambda 0.3 for the first part of training, then 0.1 [V3 §4.2]
        lam = piecewise(
            step, opts.max_steps, opts.mtp_lambda, opts.mtp_lambda_final, opts.mtp_switch_frac
        )
        obj = mtp_objective(out.logits, out.mtp_logits, batch.targets, lam, out.aux_loss)
        parts = obj.parts()
        if obj.mtp_losses:
            parts["mtp_lambda"] = lam
        return obj.loss, parts

    return loss_fn


def make_balancer(opts: PretrainOptions, model: CausalLM, all_reduce=None):
    """After each step: the loads (summed over ranks by `all_reduce`), stats, bias update."""
    moes = model.moe_layers()
    start_counting(moes)

    def after_step(step: int) -> dict:
        loads = gather_loads(moes, all_reduce)
        stats = load_stats(loads)
        gamma = 0.0
        if opts.balance == "aux_free":
            gamma = piecewise(
                step, opts.max_steps, opts.bias_update_speed, 0.0, opts.bias_freeze_frac
            )
        update_bias(moes, loads, gamma)
        stats["bias_update_speed"] = gamma
        return stats

    return after_step if moes else None


# ------------------------------------------------------------------------------ the run
def run_pretrain(opts: PretrainOptions, resume: bool = False, progress=True) -> dict:
    """Prepare everything, train, export OUT/model; returns the final metrics. Under torchrun
    every rank calls this (nanoseek/dist/parallel.py decides from the environment)."""
    opts.validate()
    with launch(opts, base_config(opts)[0].n_routed_experts) as par:
        return _run(opts, par, resume, progress)


def _run(opts: PretrainOptions, par, resume: bool, progress) -> dict:
    claim_out_dir(opts.out, resume, opts.overwrite, par)  # before anything is written there
    os.makedirs(opts.out, exist_ok=True)
    torch.manual_seed(opts.seed)  # data preparation draws nothing from torch: every rank, and
    # every world size, initialises the same full model below and keeps its part of it

    def write_run_files(tokenizer):
        tokenizer.save(os.path.join(opts.out, "tokenizer"))  # atomic; unchanged: not rewritten
        write_json(os.path.join(opts.out, "options.json"), to_dict(opts))

    def prepare():
        tokenizer = prepare_tokenizer(opts, lambda: documents(opts))
        data = prepare_data(opts, tokenizer, par.rank, par.world_size)
        if par.is_main:  # rewrites OUT/tokenizer: done before the other ranks read it
            write_run_files(tokenizer)
        return (tokenizer, *data)

    tokenizer, train_ds, val_batches = par.main_first(prepare)  # rank 0 writes, others read
    cfg, init = model_config(opts, tokenizer)
    train_ds.shards[0].check_vocab(cfg.vocab_size)
    if init is not None:
        model = load(init, dtype=torch.float32)
        model.config = cfg.replace(num_nextn_predict_layers=model.config.num_nextn_predict_layers)
    else:
        model = CausalLM(cfg)  # fp32 master weights; bf16 runs under autocast
    tok_files = [
        os.path.join(opts.out, "tokenizer", f) for f in ("tokenizer.json", "tokenizer_config.json")
    ]
    acct = account(model.config, seq_len=opts.seq_len)
    peak = None
    if par.is_main:  # measured once; the run's peak is W times one rank's
        dtype = torch.float32 if opts.precision == "fp32" else torch.bfloat16
        peak = matmul_peak_flops(dtype, device=par.device) * par.world_size
    model = par.parallelize(model, opts.precision)
    trainer = Trainer(
        model,
        opts,
        make_loss_fn(opts),
        train_ds,
        val_batches,
        extra_files=tok_files,
        after_step=make_balancer(opts, model, par.all_reduce_),
        flops_per_token=acct.train_flops_per_token_with_mtp,
        peak_flops=peak,
        run_info=to_dict(opts),
        parallel=par,
    )
    if resume and trainer.resume() and par.is_main:
        print(f"resumed from step {trainer.step} in {opts.out}", file=sys.stderr)
    bar = _progress_bar if progress else None
    last = trainer.fit(progress=bar)
    export_hf(trainer.model, os.path.join(opts.out, "model"), tok_files, par)
    if opts.plot and par.is_main:
        write_plots(opts.out)
    return last


def _progress_bar(total: int, initial: int):
    return tqdm(
        total=total,
        initial=initial,
        desc="pretrain",
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )


def write_plots(out_dir: str) -> None:
    """OUT/loss.png and OUT/expert_load.png (load averaged over the last 10% of steps)."""
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    if not records:
        return
    plot_losses(records, os.path.join(out_dir, "loss.png"))
    with_load = [r for r in records if r.get("expert_load")]
    if with_load:
        tail = with_load[-max(1, len(with_load) // 10) :]
        n_layers = len(tail[0]["expert_load"])
        avg = [
            [
                sum(r["expert_load"][layer][e] for r in tail) / len(tail)
                for e in range(len(tail[0]["expert_load"][layer]))
            ]
            for layer in range(n_layers)
        ]
        plot_expert_load(avg, os.path.join(out_dir, "expert_load.png"))
