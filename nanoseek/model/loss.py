"""Next-token cross-entropy over the vocabulary, computed in fp32 whatever the logits' dtype.

Shape legend: N rows (tokens that predict something), V vocabulary.

Two implementations that must agree (to fp32 rounding):
- `reference`: `F.cross_entropy(logits.float())`, which materialises fp32 log-probabilities for
  the whole batch (and, in backward, fp32 gradients of the same size, then a cast).
- `chunked` (fast, the default): an autograd Function that walks the rows in chunks small enough
  to stay in cache, so fp32 never touches the full [N,V] array; backward writes the gradient
  straight in the logits' dtype. One fp32 chunk buffer is reused (fresh multi-MB allocations
  cost page faults on CPU). On CPU with [2048, 8192] bf16 logits this is ~3.5x faster than the
  reference (fwd + bwd) and allocates ~200 MB less per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_IMPLS = ("chunked", "reference")
_CHUNK_ELEMENTS = 1 << 19  # fp32 elements per chunk: 2 MB, fits a core's L2


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, impl: str = "chunked") -> torch.Tensor:
    """Mean cross-entropy in fp32 over targets != IGNORE_INDEX. logits [...,V], targets [...]
    (same leading shape, already aligned: targets[i] is what logits[i] predicts)."""
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    if impl == "reference" or torch.compiler.is_compiling():
        # under torch.compile the reference is the fast path: inductor fuses the cast and the
        # log-softmax itself, and the chunk loop would only be unrolled into the graph
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    return ChunkedCrossEntropy.apply(logits, targets)


class ChunkedCrossEntropy(torch.autograd.Function):
    """CE(logits [N,V], targets [N]) averaged over valid targets, in row chunks.

    Forward keeps only the per-row loss; backward recomputes the softmax chunk by chunk:
    d loss / d logits = (softmax - onehot(target)) / n_valid for valid rows, 0 for the rest.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        N, V = logits.shape
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)[:, None]  # [N,1], ignored rows point at class 0
        chunk = min(N, max(1, _CHUNK_ELEMENTS // V))
        nll = torch.empty(N, dtype=torch.float32, device=logits.device)
        buf = torch.empty(chunk, V, dtype=torch.float32, device=logits.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            logp = torch.log_softmax(logits[s:e], -1, dtype=torch.float32, out=buf[: e - s])
            nll[s:e] = logp.gather(1, safe[s:e]).squeeze(1).neg()
        n_valid = valid.sum()
        ctx.save_for_backward(logits, safe, valid, n_valid)
        return torch.where(valid, nll, 0.0).sum() / n_valid  # NaN with no valid target, as F.*

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe, valid, n_valid = ctx.saved_tensors
        N, V = logits.shape
        chunk = min(N, max(1, _CHUNK_ELEMENTS // V))
        w = (valid * (grad_loss / n_valid)).to(torch.float32)[:, None]  # [N,1] row weights
        grad = torch.empty_like(logits)
        buf = torch.empty(chunk, V, dtype=torch.float32, device=logits.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            p = torch.softmax(logits[s:e], -1, dtype=torch.float32, out=buf[: e - s])
            p.mul_(w[s:e]).scatter_add_(1, safe[s:e], -w[s:e])
            grad[s:e] = p
        return grad, None
