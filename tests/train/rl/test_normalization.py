"""Loss normalisations against hand-computed numbers, and micro-batches that add up to the batch
as `Trainer.train_step` weights them (rl/normalization.py)."""

import pytest
import torch

from nanoseek.train.rl.normalization import NORMS, BatchCounts, normalise

# two completions: 3 tokens (1, 2, 3) and 1 token (4)
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
M = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_by_hand():
    assert normalise("token", X, M).item() == pytest.approx(10 / 4)  # (1+2+3+4) / 4 tokens
    assert normalise("sequence", X, M).item() == pytest.approx((6 / 3 + 4 / 1) / 2)  # = 3
    # Dr. GRPO: the token sum over completions x max length; alone, the batch's own 2 x 3
    assert normalise("constant", X, M).item() == pytest.approx(10 / 6)
    # in a step that sampled 4 completions of up to 5 tokens: 10 / 20, whatever was filtered
    c = BatchCounts(n_tokens=4, n_seqs=2, n_rollouts=4, max_len=5)
    # (this micro-batch holds all 4 tokens, so the loop's units are the batch loss itself)
    assert normalise("constant", X, M, c).item() == pytest.approx(0.5)


@pytest.mark.parametrize("norm", ["token", "sequence", "constant"])
def test_micro_batches_add_up_to_the_batch(norm):
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    c = BatchCounts(n_tokens=float(m.sum()), n_seqs=5.0, n_rollouts=8.0, max_len=6)
    whole = normalise(norm, x, m, c)
    # the loop weights a micro-batch's loss by its tokens / the step's tokens
    parts = sum(normalise(norm, x[s], m[s], c) * m[s].sum() / c.n_tokens
                for s in (slice(0, 2), slice(2, 3), slice(3, 5)))  # fmt: skip
    torch.testing.assert_close(whole, parts)
    expect = {
        "token": (x * m).sum() / m.sum(),
        "sequence": ((x * m).sum(1) / m.sum(1)).mean(),
        "constant": (x * m).sum() / (8 * 6),
    }[norm]
    torch.testing.assert_close(whole, expect)


def test_length_weighting_differs():
    # the same per-token loss 1 on a long and a short completion, -1 on another short one:
    # token weighs by length (8 - 2) / 10 = 0.6, sequence weighs completions equally (1 - 1) / 2
    x = torch.tensor([[1.0] * 8, [-1.0] * 8])
    m = torch.tensor([[1] * 8, [1, 1] + [0] * 6])
    assert normalise("token", x, m).item() == pytest.approx(0.6)
    assert normalise("sequence", x, m).item() == pytest.approx(0.0)
    assert set(NORMS.names()) >= {"token", "sequence", "constant"}
