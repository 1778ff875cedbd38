"""How a module's matrices are multiplied: the weights as the modules hold them.

Every projection, norm, FFN, routing decision and decode-time attention of the model goes
through a *weights* object with thirteen methods, so that one forward serves training, prefill
and decode while the layout of the matrices (and the kernels that multiply them) may differ:
- `linear(x, *modules)`: the outputs of several projections of the same input, one per module;
- `experts(param)`: the E per-expert W^T [in, out] of a stacked [E, out, in] expert weight;
- `mm(x, w_t)`: x @ W^T for one of those;
- `experts_mm(x, param, ids, gates, out)`: one token through several experts of a stacked
  weight at once (with gates: their gate-weighted sum added to out);
- `absorbed(mla)`: W_UK [H,N,C] and W_UV^T [H,C,V] of MLA's absorbed attention [V3 §2.1.1];
- `bmm(x, w)`: x [H,T,in] @ w per head for one of those;
- `experts_ffn(x, gate_up, down, ids, gates, out)`: one token through several experts' SwiGLU
  FFNs, their gate-weighted sum added to out;
- `grouped_experts_ffn(x, gate_up, down, ids, gates, out)`: several tokens through their chosen
  experts, each chosen expert once for all the tokens that chose it;
- `swiglu(x, gate_proj, up_proj, down_proj)`: a SwiGLU FFN of three projection modules;
- `norm(module, x)`: an RMSNorm module applied to x;
- `route(router, x)`: the MoE router's gate weights and expert ids for x;
- `mla_decode(mla, x, cache)`: MLA for new tokens after cached ones (`MLA.decode`);
- `decoder_layer(layer, x, cache)`: a whole decoder layer for them (`DecoderLayer.decode`).

`ModuleWeights` (here) calls the modules themselves: training, FP8 training (which swaps the
modules) and prefill use it. The inference engine passes its own implementation
(nanoseek/infer/weights.py: fused, transposed or int8 copies that decoding a few tokens reads
faster); tests/infer/test_weights.py checks that both give the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ModuleWeights:
    """The modules' own weights ([out, in], F.linear): the default of every forward."""

    expert_dtype: torch.dtype | None = None  # experts take their input in the input's dtype
    modules_hold_weights = True  # the modules' parameters are real (not meta) tensors

    @staticmethod
    def linear(x: torch.Tensor, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m in modules)

    @staticmethod
    def few_tokens(x: torch.Tensor) -> int:
        """Tokens of x up to which `MoE.forward` runs only the chosen experts whatever the
        module's `few_tokens` says (decode weights: the rows their native calls take); 0."""
        return 0

    @staticmethod
    def experts(param: torch.Tensor) -> list[torch.Tensor]:
        return [param[e].t() for e in range(param.shape[0])]  # [in, out] views

    @staticmethod
    def mm(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        return x @ w_t

    @staticmethod
    def experts_mm(x: torch.Tensor, param: torch.Tensor, ids: list[int],
                   gates: list[float] | None = None, out: torch.Tensor | None = None):  # fmt: skip
        """x [in] (one input for every expert) or [K, in] (row i for expert ids[i]) through
        experts `ids` of a stacked [E, out, in] weight -> [K, out]. With `gates`: out [out] +=
        sum_i gates[i] * row i, added in expert order, and out is returned [V3 eq. 12]."""
        h = torch.stack([(x if x.dim() == 1 else x[i]) @ param[e].t() for i, e in enumerate(ids)])
        return h if gates is None else combine(h, gates, out)

    def experts_ffn(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                    ids: list[int], gates: list[float], out: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return experts_ffn(self, x, gate_up, down, ids, gates, out)

    def grouped_experts_ffn(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                            ids: torch.Tensor, gates: torch.Tensor, out: torch.Tensor):  # fmt: skip
        return grouped_experts_ffn(self, x, gate_up, down, ids, gates, out)

    def swiglu(self, x: torch.Tensor, gate_proj: nn.Module, up_proj: nn.Module,
               down_proj: nn.Module) -> torch.Tensor:  # fmt: skip
        return swiglu(self, x, gate_proj, up_proj, down_proj)

    @staticmethod
    def absorbed(mla) -> tuple[torch.Tensor, torch.Tensor]:
        w_uk, w_uv = mla.absorbed_weights()  # views of kv_b_proj
        return w_uk, w_uv.transpose(1, 2)

    bmm = staticmethod(torch.bmm)

    @staticmethod
    def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    @staticmethod
    def route(router: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,D] -> (gate weights [N,K] fp32, expert ids [N,K] int64)."""
        return router(x)[:2]

    @staticmethod
    def mla_decode(mla: nn.Module, x: torch.Tensor, cache) -> torch.Tensor:
        """MLA for x [B,T,D] after the tokens in `cache` (a layer's view of a decode step)."""
        return mla.decode(x, cache)

    @staticmethod
    def decoder_layer(layer: nn.Module, x: torch.Tensor, cache) -> torch.Tensor:
        """A decoder layer for x [B,T,D] after the tokens in `cache` (a layer's view of a
        decode step)."""
        return layer.decode(x, cache)


def experts_ffn(weights, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                ids: list[int], gates: list[float], out: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """x [D] (one token) through experts `ids` of the stacked gate/up [E, 2F, D] (gate rows,
    then up rows) and down [E, D, F] weights as SwiGLU FFNs: out [D] += sum_i gates[i] *
    down_i(silu(gate_i(x)) * up_i(x)), the experts added in order [V3 eq. 12]; returns out.
    Through `weights.experts_mm`: the reference of every fused implementation."""
    gate, up = weights.experts_mm(x, gate_up, ids).chunk(2, dim=-1)  # [K,F] each
    return weights.experts_mm(F.silu(gate).mul_(up), down, ids, gates, out)


def grouped_experts_ffn(weights, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                        ids: torch.Tensor, gates: torch.Tensor, out: torch.Tensor):  # fmt: skip
    """x [N, D] (a few tokens) through their chosen experts ids [N, K] of the stacked gate/up
    [E, 2F, D] and down [E, D, F] weights as SwiGLU FFNs: out [N, D] += sum_k gates[n, k] *
    FFN_ids[n,k](x_n) [V3 eq. 12]; returns out. The token-expert pairs sorted by expert (one
    sort, one gather, one scatter-add), one GEMM pair per chosen expert on its contiguous rows,
    through `weights.experts` / `weights.mm`: the reference of every fused implementation."""
    K = ids.shape[1]
    w1, w2 = weights.experts(gate_up), weights.experts(down)  # E x W^T [D,2F], [F,D]
    expert, order = ids.reshape(-1).sort(stable=True)  # [M] pairs by expert
    counts = torch.bincount(expert, minlength=gate_up.shape[0]).tolist()
    token = order // K  # [M]
    outs = []
    for e, rows in enumerate(x[token].split_with_sizes(counts)):
        if rows.shape[0]:
            gate, up = weights.mm(rows, w1[e]).chunk(2, dim=-1)  # [n,F] each
            outs.append(weights.mm(F.silu(gate).mul_(up), w2[e]))  # [n,D]
    y = torch.cat(outs).to(out.dtype) * gates.reshape(-1)[order].to(out.dtype)[:, None]
    return out.index_add_(0, token, y)


def swiglu(weights, x: torch.Tensor, gate_proj: nn.Module, up_proj: nn.Module,
           down_proj: nn.Module) -> torch.Tensor:  # fmt: skip
    """down(silu(gate(x)) * up(x)) [V3 §2.1.2] for x [..., D] through `weights.linear` (gate and
    up from one fused product where the weights object fuses): the reference of every fused
    implementation."""
    gate, up = weights.linear(x, gate_proj, up_proj)
    return weights.linear(F.silu(gate) * up, down_proj)[0]


def combine(h: torch.Tensor, gates: list[float], out: torch.Tensor) -> torch.Tensor:
    """out += sum_i gates[i] * h[i], one expert after another (the order every fp32 result of
    the decode path was computed in)."""
    for w, h_e in zip(gates, h.unbind()):
        out.add_(h_e, alpha=w)
    return out


MODULE_WEIGHTS = ModuleWeights()
