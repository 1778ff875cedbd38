"""The same entry point on CUDA with NCCL (skipped where there is no GPU).

One GPU is enough to run the code path: FSDP2 over 1 rank, DCP checkpoints, the consolidated
export; with 2+ GPUs the run also splits the experts over 2 ranks (all_to_all over NCCL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL backend)")
def test_torchrun_pretrain_on_cuda_with_nccl(tmp_path):
    n = min(2, torch.cuda.device_count())
    tiny_config(vocab_size=512, num_hidden_layers=2).save_pretrained(tmp_path / "cfg")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
        "-m", "nanoseek", "pretrain", "--out", str(out), f"--model={tmp_path / 'cfg'}/config.json",
        "--device=cuda", f"--ep={n}", "--precision=bf16", "--corpus_docs=400", "--vocab_size=512",
        "--seq_len=64", "--batch_size=4", "--max_steps=4", "--warmup_steps=1", "--eval_every=2",
        "--eval_batches=2", "--save_every=2", "--plot=false", "--dist_timeout_s=120",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (out / "checkpoints" / "step-000004" / "dcp" / ".metadata").exists()
    assert (out / "model" / "model.safetensors").exists()
