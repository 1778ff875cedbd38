"""The causal LM: loss composition, MTP alignment, causality, dtype handling."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek import CausalLM
from nanoseek.model import IGNORE_INDEX
from tests.helpers import random_model, tiny_config


def test_output_shapes_and_loss_composition():
    cfg = tiny_config(num_nextn_predict_layers=2, mtp_loss_weight=0.3, aux_loss_alpha=0.01)
    model = random_model(cfg).train()
    B, T, V = 2, 12, cfg.vocab_size
    ids = torch.randint(0, V, (B, T))
    out = model(ids, labels=ids)
    assert out.logits.shape == (B, T, V)
    assert [t.shape for t in out.mtp_logits] == [(B, T - 1, V), (B, T - 2, V)]
    main = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    mtp = [
        F.cross_entropy(
            out.mtp_logits[k - 1][:, : T - k - 1].reshape(-1, V), ids[:, k + 1 :].reshape(-1)
        )
        for k in (1, 2)
    ]
    assert out.main_loss.item() == pytest.approx(main.item(), rel=1e-5)
    for a, b in zip(out.mtp_losses, mtp):
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    expected = main + 0.3 / 2 * (mtp[0] + mtp[1]) + out.aux_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_ignore_index_masks_targets():
    cfg = tiny_config(num_nextn_predict_layers=0)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    labels = ids.clone()
    labels[0, 5:] = IGNORE_INDEX
    out = model(ids, labels=labels)
    V = cfg.vocab_size
    expected = F.cross_entropy(out.logits[0, :4].reshape(-1, V), ids[0, 1:5])
    assert out.main_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mtp_depth_k_sees_only_tokens_up_to_i_plus_k():
    """Depth k at position i combines h_i with emb(t_{i+k}): changing t_j must leave depth-k
    logits at positions i < j - k unchanged, and change those at i = j - k."""
    cfg = tiny_config(num_nextn_predict_layers=2)
    model = random_model(cfg)
    for moe in model.moe_layers():
        moe.few_tokens = 0  # the grouped dispatch: batch-invariant, so exact to 1e-6
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    j = 10
    ids2 = ids.clone()
    ids2[0, j] = (ids[0, j] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    assert torch.allclose(a.logits[:, :j], b.logits[:, :j], atol=1e-5)
    for k in (1, 2):
        la, lb = a.mtp_logits[k - 1], b.mtp_logits[k - 1]
        assert torch.allclose(la[:, : j - k], lb[:, : j - k], atol=1e-6)
        assert not torch.allclose(la[:, j - k], lb[:, j - k], atol=1e-4)


def test_moe_layers_include_mtp_and_impl_switch():
    cfg = tiny_config(num_hidden_layers=3, first_k_dense_replace=1, num_nextn_predict_layers=1)
    model = CausalLM(cfg)
    assert len(model.moe_layers()) == 3  # two main MoE layers + the MTP module's
    with pytest.raises(ValueError, match="attn"):
        model.set_impl(attn="flash")
    model.set_impl(attn="eager", experts="looped")


def test_bf16_model_runs_and_keeps_fp32_router_bias():
    cfg = tiny_config()
    model = random_model(cfg).to(torch.bfloat16)
    for moe in model.moe_layers():
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    ref = random_model(cfg)(ids).logits
    assert (out.logits.float() - ref).abs().max() < 0.25 * ref.abs().max()
