"""SFT and logit distillation under torchrun (2 gloo ranks) equal one process.

`run_sft` / `run_distill` are called exactly as `torchrun -m nanoseek sft ...` calls them on every
rank. With `batch_size` 4 (global) each rank packs 2 sequences of each batch; the reference is
one process with `batch_size` 2 and `grad_accum` 2, so it sees the same rows in the same two
groups (MTP losses are means per micro-batch) and validates on the same rows (2 batches of 2
rows against 1 batch of 2 rows per rank). Losses (weighted by the global number of assistant
tokens),
gradient norms, validation losses and the exported model must agree to float32 tolerance, for
FSDP2 (dp=2) and for expert parallelism (ep=2, replicated rest). In sequence mode rank 0 alone
samples the teacher; on-policy distillation is refused under torchrun with a message.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from nanoseek import load
from nanoseek.config import ConfigError
from nanoseek.train.distill import DistillOptions, run_distill
from nanoseek.train.sft import SFTOptions, run_sft
from nanoseek.train.sft_data import task_conversations, write_chat_jsonl
from tests.dist.launch import spawn
from tests.train.test_sft import make_model_dir, tok_dir  # noqa: F401 - fixtures

MESHES = {"fsdp": dict(), "ep": dict(ep=2, fsdp=False)}
LR = 3e-3


def _common(out: str, data: str, one_process: bool = False) -> dict:
    return dict(
        out=out, data=[data], seq_len=63, max_steps=4, warmup_steps=1, lr=LR,
        batch_size=2 if one_process else 4, grad_accum=2 if one_process else 1,
        eval_every=4, eval_batches=2 if one_process else 1, val_fraction=0.25,
        save_every=100, precision="fp32", plot=False, seed=3,
    )  # fmt: skip


def _sft(out, model_dir, data, one_process=False, **mesh):
    return SFTOptions(model=model_dir, **_common(out, data, one_process), **mesh)


def _distill(out, model_dir, data, one_process=False, **kw):
    # a fresh one-layer student with the teacher's dimensions
    return DistillOptions(**{
        **_common(out, data, one_process), "teacher": model_dir, "loss": "forward_kl",
        "student": os.path.join(os.path.dirname(out), "student.json"), **kw,
    })  # fmt: skip


def _worker(rank: int, world_size: int, tmp: str, model_dir: str, data: str) -> None:
    from nanoseek.dist.parallel import shutdown

    dist.init_process_group("gloo")  # every run below reuses it
    try:
        for name, mesh in MESHES.items():
            run_sft(_sft(f"{tmp}/sft-{name}", model_dir, data, **mesh), progress=False)
        run_distill(_distill(f"{tmp}/kd-fsdp", model_dir, data), progress=False)
        seq = dict(mode="sequence", task="addition", task_n=8, task_level=1, samples_per_prompt=2,
                   max_new_tokens=12, keep_unverified=True, val_fraction=0.0, eval_every=0)  # fmt: skip
        run_distill(_distill(f"{tmp}/seqkd", model_dir, data, **seq), progress=False)
        try:
            run_distill(_distill(f"{tmp}/gkd", model_dir, data, onpolicy_frac=0.5), progress=False)
        except ConfigError as e:
            if rank == 0:
                with open(f"{tmp}/gkd_error.txt", "w") as f:
                    f.write(str(e))
    except BaseException:
        shutdown(synchronize=False)
        raise
    shutdown(synchronize=True)


def _metrics(out: str) -> torch.Tensor:
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return torch.tensor([[r["loss"], r["main_loss"], r["grad_norm"]] for r in rows])


def _val(out: str) -> float:
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [r["val_loss"] for r in rows if r.get("val_loss") is not None][-1]


def test_sft_and_distill_on_two_ranks_match_one_process(tmp_path, tok_dir):  # noqa: F811
    model_dir = make_model_dir(tmp_path / "base", tok_dir)
    load(model_dir).config.replace(num_hidden_layers=1).save_pretrained(tmp_path)
    os.replace(tmp_path / "config.json", tmp_path / "student.json")
    data = str(tmp_path / "chat.jsonl")
    write_chat_jsonl(task_conversations("addition", 48, seed=0, level=1), data)
    run_sft(_sft(str(tmp_path / "sft-ref"), model_dir, data, True), progress=False)
    run_distill(_distill(str(tmp_path / "kd-ref"), model_dir, data, True), progress=False)
    spawn(_worker, 2, str(tmp_path), model_dir, data, timeout=240)

    for run, ref in [("sft-fsdp", "sft-ref"), ("sft-ep", "sft-ref"), ("kd-fsdp", "kd-ref")]:
        got, want = tmp_path / run, tmp_path / ref
        torch.testing.assert_close(_metrics(got), _metrics(want), rtol=1e-5, atol=1e-6, msg=run)
        assert abs(_val(got) - _val(want)) < 1e-5, run
        if run.startswith("kd"):
            teacher = [json.load(open(d / "teacher_eval.json")) for d in (got, want)]
            assert teacher[0]["teacher_val_loss"] == pytest.approx(teacher[1]["teacher_val_loss"])
        a, b = load(got / "model").state_dict(), load(want / "model").state_dict()
        assert a.keys() == b.keys()
        for key in a:  # see tests/dist/test_parallel_training.py for the tolerance
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0.2 * LR, msg=f"{run} {key}")
    assert "onpolicy_frac" in (tmp_path / "gkd_error.txt").read_text()
    # sequence mode: rank 0 sampled the teacher once (both ranks read its file), then SFT
    counts = json.load(open(tmp_path / "seqkd" / "teacher_samples.json"))
    assert counts["samples"] == 2 * counts["prompts"] > 0
    assert (
        len(_metrics(tmp_path / "seqkd")) == 4 and (tmp_path / "seqkd/model/config.json").exists()
    )
