"""The one MTP training objective [V3 eq. 25]: hand-computed values, document-safe targets, and
the model's own loss equal to every trainer's."""

import math

import torch

from nanoseek.data.shards import Batch
from nanoseek.model.loss import IGNORE_INDEX as IG
from nanoseek.model.loss import lm_loss
from nanoseek.model.mtp_objective import (
    depth_loss,
    document_ids,
    label_targets,
    mtp_objective,
)
from nanoseek.train.pretrain import PretrainOptions
from nanoseek.train.pretrain import make_loss_fn as pretrain_loss_fn
from nanoseek.train.sft import make_loss_fn as sft_loss_fn
from tests.helpers import random_model, tiny_config


def one_hot_logits(rows: list[int], V: int = 4, right: float = math.log(3.0)) -> torch.Tensor:
    """[1,T,V] logits giving probability 3/(3+V-1) to token rows[i] at position i."""
    x = torch.zeros(1, len(rows), V)
    for i, r in enumerate(rows):
        x[0, i, r] = right
    return x


def test_hand_computed_eq_25():
    # V = 4, the right token has logit ln 3, the others 0: p(right) = 3/6, p(other) = 1/6
    right, wrong = -math.log(0.5), -math.log(1 / 6)
    logits = one_hot_logits([1, 2, 3])  # [1,3,4]
    mtp1 = one_hot_logits([0, 0])  # depth 1: [1,2,4]
    mtp2 = one_hot_logits([3])  # depth 2: [1,1,4]
    targets = {0: torch.tensor([[1, 0, IG]]), 1: torch.tensor([[0, 1]]), 2: torch.tensor([[2]])}
    obj = mtp_objective(logits, [mtp1, mtp2], targets.__getitem__, mtp_lambda=0.3)
    main = (right + wrong) / 2  # position 2 ignored
    l1, l2 = (right + wrong) / 2, wrong
    assert math.isclose(obj.main_loss.item(), main, rel_tol=1e-5)
    assert [round(m.item(), 5) for m in obj.mtp_losses] == [round(l1, 5), round(l2, 5)]
    # lambda / D * sum over depths, D = 2
    assert math.isclose(obj.loss.item(), main + 0.3 / 2 * (l1 + l2), rel_tol=1e-5)
    # D given explicitly (a model with 3 modules whose deepest had no room) divides by 3
    obj3 = mtp_objective(logits, [mtp1, mtp2], targets.__getitem__, 0.3, depths=3)
    assert math.isclose(obj3.loss.item(), main + 0.1 * (l1 + l2), rel_tol=1e-5)
    aux = torch.tensor(0.25)
    weighted = mtp_objective(logits, [mtp1], targets.__getitem__, 0.3, aux, main_weight=0.5)
    assert math.isclose(weighted.loss.item(), 0.5 * main + 0.3 * l1 + 0.25, rel_tol=1e-5)
    assert weighted.parts() == {"main_loss": weighted.main_loss.item(),
                                "mtp_loss_1": weighted.mtp_losses[0].item(), "aux_loss": 0.25}  # fmt: skip
    # lambda 0: no MTP term at all
    assert mtp_objective(logits, [mtp1], targets.__getitem__, 0.0).mtp_losses == []


def test_a_depth_without_targets_is_a_connected_zero():
    logits = torch.randn(1, 2, 5, requires_grad=True)
    z = depth_loss(logits, torch.full((1, 2), IG))
    assert z.item() == 0.0 and z.requires_grad
    z.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_label_targets_shift_and_stop_at_document_starts():
    labels = torch.tensor([[10, 11, 12, 20, 21, 22]])
    t = label_targets(labels)
    assert t(0).tolist() == [[11, 12, 20, 21, 22, IG]]
    assert t(1).tolist() == [[12, 20, 21, 22, IG]]
    # two packed documents: positions restart at 0 where the second begins
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert document_ids(pos).tolist() == [[1, 1, 1, 2, 2, 2]]
    t = label_targets(labels, pos)
    assert t(0).tolist() == [[11, 12, IG, 21, 22, IG]]  # 12 -> 20 crosses documents
    assert t(1).tolist() == [[12, IG, IG, 22, IG]]
    assert t(2).tolist() == [[IG, IG, IG, IG]]
    # positions that continue (one document at an offset, e.g. after a prefix) mask nothing
    assert label_targets(labels, torch.arange(5, 11)[None])(0).tolist() == t_plain(labels)


def t_plain(labels):
    return label_targets(labels)(0).tolist()


def test_model_loss_equals_the_pretraining_and_sft_objectives():
    """CausalLM.forward(labels=) and the trainers' loss functions are one objective: on the
    same tokens and targets, equal losses and equal terms."""
    cfg = tiny_config(num_nextn_predict_layers=2, mtp_loss_weight=0.1)
    model = random_model(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    # pre-training: one document per window; the window's extra last token starts another,
    # so the batch scores exactly the positions HF-style labels can (none past the end)
    batch = Batch(tokens, torch.tensor([[0] * 12 + [1], [4] * 12 + [5]]))
    opts = PretrainOptions(mtp_lambda=0.1, mtp_lambda_final=0.1, max_steps=10)
    loss_p, parts = pretrain_loss_fn(opts)(model, batch, step=3)
    inputs = batch.inputs  # [2,12]
    out = model(inputs, labels=inputs)
    assert torch.allclose(loss_p, out.loss, rtol=1e-5, atol=1e-6)
    assert math.isclose(parts["main_loss"], out.main_loss.item(), rel_tol=1e-5)
    assert len(out.mtp_losses) == 2
    for k in (1, 2):
        assert math.isclose(parts[f"mtp_loss_{k}"], out.mtp_losses[k - 1].item(), rel_tol=1e-5)
    # SFT: labels masked outside the replies; the SFT loss function on those targets
    labels = inputs.masked_fill(torch.arange(12) < 4, IG)
    out = model(inputs, labels=labels)
    loss_s, sparts = sft_loss_fn(0.1)(model, SFTLikeBatch(inputs, label_targets(labels)), step=0)
    assert torch.allclose(loss_s, out.loss, rtol=1e-5, atol=1e-6)
    for k in (1, 2):
        assert math.isclose(sparts[f"mtp_loss_{k}"], out.mtp_losses[k - 1].item(), rel_tol=1e-5)
    # packed documents (positions restarting): no loss across the boundary
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.arange(12)])
    out = model(inputs, labels=inputs, position_ids=pos)
    t0 = label_targets(inputs, pos)(0)
    assert t0[0, 4].item() == IG and t0[1, 4].item() == inputs[1, 5].item()
    assert torch.allclose(out.main_loss, lm_loss(out.logits, t0))


class SFTLikeBatch:
    """What sft's loss function reads from a batch: inputs, targets(k), token_mask."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets, self.token_mask = inputs, targets, None
