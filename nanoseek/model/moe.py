"""DeepSeekMoE: shared experts + fine-grained routed experts [V3 §2.1.2, eqs. 12-20].

Shape legend: B batch, T tokens, N = B*T tokens, D model dim, E routed experts, F expert width,
K experts per token, M = N*K token-expert pairs.

Two expert implementations that must agree (tests/model/test_moe.py):
- `grouped` (fast): sort the M pairs by expert, run each SwiGLU GEMM once for all experts with
  `torch._grouped_mm` over the contiguous per-expert row blocks (one split-loop fallback where
  grouped_mm does not apply), gather each token's K rows back and weight and sum them
  (gathers forward and backward: no scatter, which compiled CPU code runs with atomic adds).
  No host sync outside that fallback and static shapes, so torch.compile traces the whole layer; on CPU each block is padded with
  zero rows to a multiple of `_row_granule` rows (see there why) in a layout of fixed size.
- `looped` (reference): for each expert, gather its tokens and run its SwiGLU, like the
  original DeepSeek inference code.
No capacity limit and no token dropping.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.buffers import FixedDtypeBuffers
from nanoseek.model.ffn import SwiGLU
from nanoseek.model.grouped_mm import grouped_mm
from nanoseek.model.router import Router
from nanoseek.model.weights import MODULE_WEIGHTS

EXPERT_IMPLS = ("grouped", "looped")


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._grouped_mm needs bf16/fp32 and row strides that are multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype:
        return False
    if a.dtype not in (torch.float32, torch.bfloat16):
        return False
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    size = a.element_size()
    return (a.shape[-1] * size) % 16 == 0 and (b.shape[-1] * size) % 16 == 0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x runs in: autocast's when it is on for x's device, else x's."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert x_e @ w_e^T for row blocks of x sorted by expert.

    x [M,in] (rows of expert e in [offs[e-1], offs[e])), w [E,out,in] -> [M,out], in autocast's
    dtype when it is on: autocast lowers F.linear and matmul but knows nothing of
    _grouped_mm, which would otherwise run the routed experts (most of an MoE layer's FLOPs)
    in fp32 under bf16 autocast while every other projection runs in bf16.
    """
    dt = compute_dtype(x)
    x, w = x.to(dt), w.to(dt)
    w_t = w.transpose(1, 2)  # [E,in,out], a view
    if _grouped_mm_ok(x, w_t):
        if x.dtype == torch.float32:
            return _grouped_mm_eager(x, w_t, offs)
        return torch._grouped_mm(x, w_t, offs=offs)
    # fallback: one GEMM per expert on a view of its rows (costs one host sync for the sizes)
    counts = offs.diff(prepend=offs.new_zeros(1))
    parts = x.split(counts.tolist())
    return torch.cat([p @ w_t[e] for e, p in enumerate(parts)], dim=0)


def _grouped_mm_eager(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """fp32 grouped GEMM: torch's fake (tracing) kernel for it admits only bf16 inputs, so
    compiled code takes a custom op with its own (nanoseek/model/grouped_mm.py)."""
    if torch.compiler.is_compiling():
        return grouped_mm(x, w_t, offs)
    return torch._grouped_mm(x, w_t, offs=offs)


class ExpertRows(NamedTuple):
    """The expert-sorted row layout of the N*K (token, expert) pairs (`expert_rows`)."""

    src: torch.Tensor  # [M'] the token of each row, N for a padding row
    offs: torch.Tensor  # [E] int32, the end of each expert's block
    pos: torch.Tensor  # [N,K] the rows of each token's pairs, ascending (expert order)
    slot: torch.Tensor  # [N,K] the slot k (column of indices) of each entry of pos
    inv: torch.Tensor  # [M'] the entry of pos.reshape(-1) that names each row, N*K if padding


def expert_rows(indices: torch.Tensor, n_experts: int, granule: int = 1) -> ExpertRows:
    """Lay the N*K (token, expert) pairs out as per-expert row blocks.

    indices [N,K] -> `ExpertRows`. With granule 1, M' = N*K and nothing is padded. Otherwise
    each block starts at a multiple of `granule` and M' is a bound fixed by the shapes alone,
    N*K + E*(granule-1) rounded up to the granule, whatever the routing: the last expert's
    block runs to M' over the slack (padding rows). A data-independent M' needs no host sync,
    so torch.compile traces it without a graph break.
    """
    N, K = indices.shape
    flat = indices.reshape(-1)  # [M]
    M = flat.numel()
    expert, order = flat.sort(stable=True)  # pairs sorted by expert
    # block ends; unlike bincount, searchsorted has a data-independent shape (no graph break)
    ends = torch.searchsorted(expert, torch.arange(1, n_experts + 1, device=flat.device))
    token = order // K
    if granule == 1:
        rows, row, src, offs = M, torch.arange(M, device=flat.device), token, ends
    else:
        rows = -(-(M + n_experts * (granule - 1)) // granule) * granule  # M' (static)
        counts = ends.diff(prepend=ends.new_zeros(1))
        padded_ends = ((counts + granule - 1) // granule * granule).cumsum(0)  # [E]
        starts = torch.cat((padded_ends.new_zeros(1), padded_ends[:-1]))  # [E]
        row = torch.arange(M, device=flat.device) + (starts - (ends - counts))[expert]  # [M]
        src = token.new_full((rows,), N).scatter(0, row, token)
        # the slack goes to the last expert: zero rows, so the GEMM stays exact and every block
        # (its block too) keeps a multiple of `granule` rows
        offs = torch.cat((padded_ends[:-1], padded_ends.new_full((1,), rows)))
    # sorted pair i (flat pair order[i]) went to row[i]; a token's rows ascending are its
    # experts in order, the order index_add_ would add them in
    pos, slot = torch.empty_like(order).scatter_(0, order, row).view(N, K).sort(dim=1)
    inv = order.new_full((rows,), M).scatter(
        0, pos.reshape(-1), torch.arange(M, device=flat.device)
    )
    return ExpertRows(src, offs.to(torch.int32), pos, slot, inv)


class _GatherRows(torch.autograd.Function):
    """x.index_select(0, index) whose backward gathers too, through `inverse`: [R] (the entry
    of index naming each row of x, len(index) for none: a zero gradient) or [R,K] (the K
    entries naming each row, summed in that order). Autograd's own backward, index_add_, is a
    scatter, which compiled CPU code runs with atomic adds (the slowest kernel of a compiled MoE
    layer); the values are the same, for K = 2 the same bits."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if inverse.dim() == 1:  # may name the zero row past the end
            grad = F.pad(grad, (0, 0, 0, 1))
        g = grad.index_select(0, inverse.reshape(-1))
        if inverse.dim() == 2:
            g = g.view(*inverse.shape, -1).sum(1)
        return F.pad(g, (0, 0, 0, ctx.rows - g.shape[0])), None, None  # x's padding row: 0


def dispatch_rows(x: torch.Tensor, layout: ExpertRows) -> torch.Tensor:
    """x [N(+1),D] -> the expert-sorted rows [M',D] (row r holds token src[r]; padding rows
    read row N, all zero)."""
    return _GatherRows.apply(x, layout.src, layout.pos)


def combine_rows(
    out: torch.Tensor, layout: ExpertRows, weights: torch.Tensor, dtype
) -> torch.Tensor:
    """y [N,D] = sum_k weights[n,k] * (row of pair (n,k) of out [M',D]) [V3 eq. 12], weighted
    in out's dtype, summed in `dtype`: the products and sums of weighting the rows and
    index_add_-ing them, without a scatter forward or backward."""
    N, K = layout.pos.shape
    rows = _GatherRows.apply(out, layout.pos.reshape(-1), layout.inv).view(N, K, -1)  # [N,K,D]
    w = weights.gather(1, layout.slot)  # [N,K] in pos order
    return (rows * w[..., None].to(rows.dtype)).to(dtype).sum(1)


def _row_granule(x: torch.Tensor) -> int:
    """Rows per expert block are padded to a multiple of this on CPU (1 elsewhere: no padding,
    no host sync).

    - bf16/fp16, speed: oneDNN builds and caches one kernel per GEMM shape, and the expert row
      counts change every step, so nearly every expert GEMM (forward and backward) would pay
      ~0.5 ms of kernel creation, 2-4x the GEMM itself at these sizes. Multiples of 16 keep the
      shapes few enough to stay cached after the first steps; the padded layout (see
      `expert_rows`) then has E*(16-1)/2 ~ 1.5% extra zero rows for 8K routed rows. Multiples
      of 64 (four times fewer shapes) cost ~4% more per step from the extra rows.
    - fp32, batch invariance: MKL uses another kernel for 1-3 rows, which rounds differently, so
      a token's output would depend on how many other tokens picked its experts (a prefix's
      logits would move by ~1e-6 when a later token changes). Multiples of 4 avoid it.
    """
    if x.device.type != "cpu":
        return 1
    return 16 if compute_dtype(x) in (torch.bfloat16, torch.float16) else 4


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as 3D tensors; checkpoints keep the per-expert HF keys
    (`experts.{e}.gate_proj/up_proj/down_proj`), see nanoseek/checkpoint/keys.py."""

    # every expert's weights live in this process, so `MoE.forward_few` may pick any of them
    # (expert parallelism swaps in a module holding a shard, nanoseek/dist/expert_parallel.py)
    all_local = True

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))  # [E,2F,D]
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))  # [E,D,F]
        # the grouped GEMM (x [M,in], w [E,out,in], offs [E]) -> [M,out]; FP8 training swaps in
        # nanoseek.fp8.fp8_grouped_linear (nanoseek/fp8/convert.py)
        self.linear_fn = grouped_linear

    def forward(self, x, indices, weights, impl: str = "grouped"):
        """x [N,D], indices [N,K], weights [N,K] fp32 -> y [N,D] = sum_k w_k * expert_k(x)."""
        if impl == "looped":
            return self._looped(x, indices, weights)
        N, D = x.shape
        granule = _row_granule(x)
        layout = expert_rows(indices, self.n_experts, granule)
        # row r of the expert-sorted layout holds token src[r]; src = N marks a padding row,
        # which reads (and writes) one extra all-zero row
        x_src = x if granule == 1 else F.pad(x, (0, 0, 0, 1))  # [N(+1),D]
        # cast to the GEMMs' dtype (autocast's, if on) before the gather: K times fewer values
        x_src = x_src.to(compute_dtype(x))
        h = self.linear_fn(dispatch_rows(x_src, layout), self.gate_up_proj, layout.offs)
        gate, up = h.split(self.hidden, dim=-1)  # [M',F] each
        h = F.silu(gate) * up
        out = self.linear_fn(h, self.down_proj, layout.offs)  # [M',D], autocast's dtype if on
        # the K weighted expert outputs of a token are summed in x's dtype (fp32 under autocast)
        return combine_rows(out, layout, weights, x.dtype)

    def _looped(self, x, indices, weights):
        y = torch.zeros_like(x)
        for e in range(self.n_experts):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                continue
            gate, up = F.linear(x[token], self.gate_up_proj[e]).split(self.hidden, dim=-1)
            h = F.linear(F.silu(gate) * up, self.down_proj[e])
            y.index_add_(0, token, (h * weights[token, slot, None].to(h.dtype)).to(y.dtype))
        return y


class MoE(FixedDtypeBuffers):
    """output = shared(x) + sum_k g_k expert_k(x) [V3 eq. 12]; returns (y, balance_loss)."""

    fixed_dtypes = {"expert_load": torch.int64}

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.top_k = c.num_experts_per_tok
        self.n_experts = c.n_routed_experts
        self.aux_loss_alpha = c.aux_loss_alpha
        # seq_aux (V3): balance within each sequence [eqs. 17-20]; otherwise the classic
        # batch-wise auxiliary loss of DeepSeekMoE / V2 (the whole batch is one "sequence")
        self.seq_aux = c.seq_aux
        self.experts_impl = "grouped"
        self.gate = Router(c)
        self.experts = RoutedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts)
            if c.n_shared_experts
            else None
        )
        # tokens routed to each expert since the trainer last reset it: int64 so counts never
        # round; counted only in training mode, only when `count_load` is set
        self.register_buffer(
            "expert_load", torch.zeros(self.n_experts, dtype=torch.int64), persistent=False
        )
        self.count_load = False
        self.few_tokens = 64  # inference: up to this many tokens take `forward_few`

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, weights=MODULE_WEIGHTS
    ):
        """x [B,T,D] -> (y [B,T,D], sequence-wise balance loss (scalar tensor) or None).

        token_mask [B,T] bool marks real tokens (padding is neither counted nor balanced).
        Outside training, at most `few_tokens` tokens (decode, verification, short prompts), or
        as many as `weights.few_tokens(x)` (a decode step of many rows through native calls),
        take `forward_few`, which runs only the chosen experts (when every expert lives in this
        process), as does any number of tokens when the experts exist only as `weights`' int8
        copies (a streamed model, nanoseek/infer/streamed.py); `weights` multiplies
        (nanoseek/model/weights.py).
        """
        B, T, D = x.shape
        if (
            not self.training
            and not torch.is_grad_enabled()
            and self.experts.all_local  # not sharded by expert parallelism
            and (
                B * T <= max(self.few_tokens, weights.few_tokens(x))
                or not weights.modules_hold_weights
            )
        ):
            return self.forward_few(x, weights), None
        flat = x.reshape(-1, D)
        gate_weights, indices, scores = self.gate(flat)  # [N,K], [N,K], [N,E]
        y = self.experts(flat, indices, gate_weights, impl=self.experts_impl).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x, weights)
        if self.count_load and self.training:
            with torch.no_grad():
                real = torch.ones_like(indices) if token_mask is None else token_mask.reshape(-1, 1)
                real = real.expand_as(indices).to(torch.int64).reshape(-1)
                self.expert_load.scatter_add_(0, indices.reshape(-1), real)  # static shapes
        aux = None
        if self.training and self.aux_loss_alpha > 0:
            shape = (B, T, -1) if self.seq_aux else (1, B * T, -1)
            mask = token_mask if token_mask is None or self.seq_aux else token_mask.reshape(1, -1)
            aux = self.sequence_balance_loss(scores.view(shape), indices.view(shape), mask)
        return y, aux

    def forward_few(self, x: torch.Tensor, weights=MODULE_WEIGHTS) -> torch.Tensor:
        """The MoE output for a handful of tokens: x [B,T,D] -> [B,T,D]; `forward`'s grouped
        path is the reference.

        The grouped path pads every expert's row block and reads all E experts' weights; here
        only the chosen experts run, on exactly their rows:
        - one token: its K experts' SwiGLU FFNs and their gate-weighted sum
          (`weights.experts_ffn`: one call for the gate/up projections, one for the down
          projections and the sum, where it does not run them as one native call), no gathers;
        - more: each chosen expert once for all the tokens that chose it
          (`weights.grouped_experts_ffn`: the pairs sorted by expert, one GEMM pair per chosen
          expert on its contiguous rows): an expert that several tokens chose (a batch's, a
          speculative verify step's) is read once.
        Measured alternative, not kept: every expert on every token as two batched matmuls with
        zero weights for the unchosen was no faster even at 8-16 tokens, where the bytes of
        expert weights read, not the kernel count, decide. Costs one host sync for the indices
        (free on CPU, a stall on GPU). Not batch-invariant in fp32, unlike the grouped path:
        MKL rounds a 1-3-row GEMM differently, so a token's output moves by ~1e-7 with the
        number of other tokens that chose its experts (padding those blocks to 4 rows, as the
        grouped path does, cost 14% of a batch-8 decode step).
        """
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        gate_weights, indices = weights.route(self.gate, flat)  # [N,K] fp32, [N,K]
        shared = self.shared_experts
        y = torch.zeros_like(flat) if shared is None else shared(flat, weights)
        # experts that take another input dtype (int8 kernels: bf16) get it cast once here, not
        # around every GEMM; their outputs are accumulated into y in x's dtype
        xe = flat if weights.expert_dtype is None else flat.to(weights.expert_dtype)
        params = self.experts.gate_up_proj, self.experts.down_proj
        if flat.shape[0] == 1:  # one token: its K experts in two calls, no gathers
            # [V3 eq. 12]: y += sum_i g_i FFN_i(x), the experts added in order
            weights.experts_ffn(xe[0], *params, indices[0].tolist(), gate_weights[0].tolist(), y[0])
            return y.view(B, T, D)
        return weights.grouped_experts_ffn(xe, *params, indices, gate_weights, y).view(B, T, D)

    def sequence_balance_loss(self, scores, indices, token_mask=None):
        """[V3 eqs. 17-20] alpha * sum_i f_i P_i per sequence, averaged over sequences.

        f_i = E/(K*T) * #tokens choosing expert i; P_i = mean_t s_i / sum_j s_j.
        scores [B,T,E] fp32, indices [B,T,K].
        """
        B, T, E = scores.shape
        mask = (
            torch.ones(B, T, dtype=scores.dtype, device=scores.device)
            if token_mask is None
            else token_mask.to(scores.dtype)
        )
        n_tok = mask.sum(1).clamp(min=1)  # [B]
        chosen = torch.zeros(B, T, E, dtype=scores.dtype, device=scores.device)
        chosen.scatter_(2, indices, 1.0)
        f = (chosen * mask[..., None]).sum(1) * (E / (self.top_k * n_tok[:, None]))  # [B,E]
        p_norm = scores / scores.sum(-1, keepdim=True)
        P = (p_norm * mask[..., None]).sum(1) / n_tok[:, None]  # [B,E]
        return self.aux_loss_alpha * (f * P).sum(-1).mean()


def max_violation(load: torch.Tensor) -> float:
    """MaxVio [arXiv 2408.15664] = (max_i load_i - mean load) / mean load; 0 for no tokens."""
    mean = load.float().mean().item()
    return 0.0 if mean == 0 else (load.float().max().item() - mean) / mean
