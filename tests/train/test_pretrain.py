"""The pre-training method on the shared loop: exact resume, metrics, balancing, failures."""

import json
import os

import pytest
import torch

from nanoseek import ModelConfig
from nanoseek.checkpoint.trainer_state import checkpoint_dirs
from nanoseek.train.loop import TrainingDiverged
from nanoseek.train.options import build
from nanoseek.train.pretrain import PretrainOptions, run_pretrain
from tests.helpers import tiny_config


def _opts(tmp_path, name="run", **kw) -> PretrainOptions:
    cfg_path = tmp_path / "model.json"
    if not cfg_path.exists():
        tiny_config(
            vocab_size=512, num_hidden_layers=2, max_position_embeddings=128
        ).save_pretrained(tmp_path)
        os.replace(tmp_path / "config.json", cfg_path)
    base = dict(
        out=str(tmp_path / name), model=str(cfg_path), corpus_docs=400, vocab_size=512,
        seq_len=64, batch_size=4, max_steps=6, warmup_steps=2, eval_every=3, eval_batches=2,
        save_every=3, precision="fp32", plot=False, lr=3e-3,
    )  # fmt: skip
    base.update(kw)
    return PretrainOptions(**base)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_metrics_checkpoints_and_exact_resume(tmp_path):
    full = _opts(tmp_path, "full")
    run_pretrain(full, progress=False)
    rec = [json.loads(x) for x in open(os.path.join(full.out, "metrics.jsonl"))]
    assert [r["step"] for r in rec] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "main_loss",
        "mtp_loss_1",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "maxvio",
        "maxvio_global",
        "maxvio_per_layer",
        "expert_load",
        "aux_loss",
    ):
        assert key in rec[-1], key
    assert rec[2]["val_loss"] is not None and rec[5]["val_loss"] is not None
    assert len(rec[-1]["expert_load"]) == 2  # one main MoE layer + the MTP module's
    assert sum(rec[-1]["expert_load"][0]) == 4 * 64 * 2  # tokens x top-k, one micro-batch
    assert [s for s, _ in checkpoint_dirs(full.out)] == [3, 6]  # keep_last=2
    assert os.path.exists(os.path.join(full.out, "model", "tokenizer.json"))

    # the same run, stopped after 3 steps and resumed: identical losses, step for step
    half = _opts(tmp_path, "half", max_steps=6)
    half_first = _opts(tmp_path, "half", max_steps=6)
    half_first.save_every = 3
    trainer_steps = 3

    class Stop(Exception):
        pass

    import nanoseek.train.loop as loop

    original = loop.Trainer.save

    def save_then_stop(self):
        path = original(self)
        if self.step == trainer_steps:
            raise Stop  # a kill right after the checkpoint of step 3
        return path

    loop.Trainer.save = save_then_stop
    try:
        with pytest.raises(Stop):
            run_pretrain(half_first, progress=False)
    finally:
        loop.Trainer.save = original
    run_pretrain(half, resume=True, progress=False)
    assert _losses(half.out) == _losses(full.out)


def test_grad_accum_counts_whole_step_and_bias_moves_against_load(tmp_path):
    opts = _opts(tmp_path, "acc", max_steps=1, grad_accum=2, eval_every=0, save_every=100)
    run_pretrain(opts, progress=False)
    rec = json.loads(open(os.path.join(opts.out, "metrics.jsonl")).readline())
    load = torch.tensor(rec["expert_load"][0])
    assert load.sum().item() == 2 * 4 * 64 * 2  # both micro-batches counted
    from nanoseek import load as load_model

    bias = load_model(os.path.join(opts.out, "model")).moe_layers()[0].gate.e_score_correction_bias
    # one step of b += gamma * sign(mean - load), centred: overloaded experts go down
    sign = torch.sign(load.double().mean() - load.double()).float()
    expected = 1e-3 * (sign - sign.mean())
    assert torch.allclose(bias, expected, atol=1e-7)


def test_aux_loss_strategy_keeps_bias_at_zero(tmp_path):
    opts = _opts(tmp_path, "aux", max_steps=2, balance="aux_loss", eval_every=0, save_every=100)
    last = run_pretrain(opts, progress=False)
    assert last["bias_update_speed"] == 0.0 and last["aux_loss"] > 0
    cfg = ModelConfig.from_pretrained(os.path.join(opts.out, "model"))
    assert cfg.seq_aux is False and cfg.aux_loss_alpha == 0.01


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    opts = _opts(tmp_path, "nan", max_steps=6, save_every=2, eval_every=0)
    import nanoseek.train.pretrain as pre

    real = pre.make_loss_fn

    def poisoned(o):
        fn = real(o)

        def loss_fn(model, batch, step):
            loss, parts = fn(model, batch, step)
            return (loss * float("nan") if step == 3 else loss), parts

        return loss_fn

    monkeypatch.setattr(pre, "make_loss_fn", poisoned)
    with pytest.raises(TrainingDiverged, match="not finite"):
        run_pretrain(opts, progress=False)
    assert [s for s, _ in checkpoint_dirs(opts.out)] == [2]


def test_options_errors_name_the_option(tmp_path):
    from nanoseek.config import ConfigError

    with pytest.raises(ConfigError, match="'max_steps'"):
        build(PretrainOptions, overrides=["--max_steps=ten"])
    with pytest.raises(ConfigError, match="unknown option 'max_step'"):
        build(PretrainOptions, overrides=["--max_step=10"])
    with pytest.raises(ConfigError, match="'balance'"):
        run_pretrain(_opts(tmp_path, "bad", balance="magic"), progress=False)


def test_fp8_precision_converts_and_trains(tmp_path, capsys):
    opts = _opts(tmp_path, "fp8", max_steps=2, precision="fp8", eval_every=0, save_every=100)
    last = run_pretrain(opts, progress=False)
    err = capsys.readouterr().err
    assert "FP8" in err or "fp8" in err  # the converted/kept layer report is printed
    assert last["loss"] == last["loss"] and last["loss"] < 10  # finite
    # checkpoints stay full precision (fp32 master weights), loadable as usual
    from nanoseek import load as load_model

    model = load_model(os.path.join(opts.out, "model"))
    assert model.lm_head.weight.dtype == torch.float32
