"""The optimizer the trainers share (nanoseek/train/loop.py: make_optimizer)."""

import torch

from nanoseek.train.loop import LoopOptions, make_optimizer
from tests.helpers import random_model, tiny_config


def _step(opt, model):
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-2)
    opt.step()


def test_fused_adamw_matches_the_reference_update_and_bumps_versions():
    """CPU single-process training takes fused AdamW; its update equals the per-tensor loop's,
    decay only on matrices, and it bumps the version counters the decode caches rely on."""
    opts = LoopOptions(lr=1e-2, weight_decay=0.1)
    fused_model, ref_model = random_model(tiny_config()), random_model(tiny_config())
    fused = make_optimizer(fused_model, opts)
    assert fused.defaults["fused"]
    ref = make_optimizer(ref_model, opts)
    for g in ref.param_groups:  # same groups, the plain per-tensor update
        g["fused"], g["foreach"] = False, False
    versions = [p._version for p in fused_model.parameters()]
    for _ in range(3):
        _step(fused, fused_model)
        _step(ref, ref_model)
    assert all(p._version > v for p, v in zip(fused_model.parameters(), versions))
    for (name, a), b in zip(fused_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    decays = {g["weight_decay"]: {p.dim() for p in g["params"]} for g in fused.param_groups}
    assert decays == {0.1: {2, 3}, 0.0: {1}}
