"""The router against a direct, loop-per-token transcription of [V3 §2.1.2, eqs. 12-16]."""

import pytest
import torch

from nanoseek.model.router import Router
from tests.helpers import tiny_config


def reference_route(x, weight, bias, cfg):
    """One token at a time, in plain Python where it helps readability."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    G, TG = cfg.n_group or 1, cfg.topk_group or (cfg.n_group or 1)
    out_w, out_i = [], []
    for tok in x.float():
        logits = weight.float() @ tok
        s = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        choice = s + bias if cfg.topk_method == "noaux_tc" else s.clone()
        if G > 1 and cfg.topk_method != "greedy":
            groups = choice.view(G, E // G)
            if cfg.topk_method == "noaux_tc":
                gscore = groups.sort(descending=True).values[:, :2].sum(-1)
            else:
                gscore = groups.max(-1).values
            kept = set(gscore.argsort(descending=True)[:TG].tolist())
            for g in range(G):
                if g not in kept:
                    choice[g * (E // G) : (g + 1) * (E // G)] = float("-inf")
        idx = choice.argsort(descending=True)[:K]
        w = s[idx]  # unbiased scores
        if cfg.norm_topk_prob and K > 1:
            w = w / w.sum()
        out_w.append(w * cfg.routed_scaling_factor)
        out_i.append(idx)
    return torch.stack(out_w), torch.stack(out_i)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # V3: sigmoid, noaux_tc, 2 groups keep 1
        dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
        dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4,
             topk_group=2, norm_topk_prob=False, routed_scaling_factor=16.0),  # V2
        dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
             norm_topk_prob=False, routed_scaling_factor=1.0),  # V2-Lite
    ],
)  # fmt: skip
def test_router_matches_reference(overrides):
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, 0, 0.5)
    r.e_score_correction_bias.uniform_(-0.3, 0.3)  # large enough to change selections
    x = torch.randn(64, cfg.hidden_size)
    w, i, s = r(x)
    w_ref, i_ref = reference_route(x, r.weight, r.e_score_correction_bias, cfg)
    order, order_ref = i.sort(-1), i_ref.sort(-1)
    assert torch.equal(order.values, order_ref.values)
    assert torch.allclose(w.gather(1, order.indices), w_ref.gather(1, order_ref.indices), atol=1e-6)
    assert s.dtype == torch.float32 and w.dtype == torch.float32


def test_bias_selects_but_does_not_weight():
    cfg = tiny_config(n_group=1, topk_group=1, num_experts_per_tok=2)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, 0, 0.5)
    x = torch.randn(32, cfg.hidden_size)
    r.e_score_correction_bias.zero_()
    r.e_score_correction_bias[3] = 10.0  # forces expert 3 into every selection
    w, i, s = r(x)
    assert (i == 3).any(-1).all()
    # the weight of expert 3 comes from the unbiased score, normalised and scaled
    pos = (i == 3).float().argmax(-1)
    w3 = w.gather(1, pos[:, None]).squeeze(1)
    sel = s.gather(1, i)
    expected = s[:, 3] / sel.sum(-1) * cfg.routed_scaling_factor
    assert torch.allclose(w3, expected, atol=1e-6)


def test_bias_stays_fp32_through_dtype_casts():
    r = Router(tiny_config())
    r.e_score_correction_bias.fill_(1.0 + 1e-3)  # not representable in bf16
    r.to(torch.bfloat16)
    assert r.weight.dtype == torch.bfloat16
    assert r.e_score_correction_bias.dtype == torch.float32
    assert r.e_score_correction_bias[0].item() == pytest.approx(1.001, abs=1e-7)
