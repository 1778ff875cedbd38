"""Cached forward passes of a CausalLM: prefill, decode/verify, and the MTP module's steps.

Shape legend: B rows, T new tokens per row, S key positions, D model dim, H heads, R rope head
dim, Vocab the vocabulary.

- Prefill (all rows start at position 0): the model's own modules (`MLA.project_q`,
  `project_latent`, the plain `attend_plain` path with decompressed keys and values, causal SDPA),
  which is cheaper than the absorbed path when T is large. Prompts of different
  lengths are right-padded; every row uses its own positions 0..T-1, and causality alone keeps
  padding (which only ever sits after a row's real tokens) out of the real tokens' attention.
  The padding's cache entries lie past the row's length: garbage by the cache invariant,
  overwritten by the first decode step.
- Decode and verification (rows at their own positions p_b..p_b+T-1): the absorbed path over the
  latent cache (`decode.py`), with a per-row causal mask.
- The output head runs on the positions the caller asks for (the last prompt token in prefill).

Left padding would also work but shifts every row's positions (RoPE) unless position ids are
passed around; per-row positions keep the prompt exactly as it would run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.infer.cache import LatentCache
from nanoseek.infer.decode import DecodeLayer, DecodeWeights, linear, rms_norm
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import CausalLM


@dataclass
class Step:
    """What every layer of one forward shares: rows, positions, rotary tables, the mask."""

    row0: int  # rows row0..row0+B-1 of the cache
    positions: torch.Tensor  # [B,T] int64
    cos: torch.Tensor  # [B,T,1,R/2] fp32
    sin: torch.Tensor
    seq: int  # key positions to read, S = max position + 1
    prefill: bool  # all rows start at 0: plain attention over the fresh latents
    freqs: torch.Tensor | None = None  # decode: cos + i sin [B,T,1,R/2] complex64
    bias: torch.Tensor | None = None  # decode: [B,T*H|1,S] additive mask, 0 or -inf


class ModelRunner:
    """Owns the latent caches and runs the model over them; knows nothing about requests."""

    def __init__(
        self,
        model: CausalLM,
        max_batch: int,
        max_seq_len: int,
        mtp: bool = False,
        sparse_moe_max_tokens: int = 64,
        transpose_weights: bool | None = None,
        quantize: str | None = None,
    ):
        c = model.config
        if mtp and not len(model.mtp):
            raise ValueError("speculative='mtp' needs a model with MTP modules (none in this one)")
        self.model, self.config = model, c
        self.layers = list(model.model.layers)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        new_cache = lambda n: LatentCache(  # noqa: E731
            n, max_batch, max_seq_len, c.kv_lora_rank, c.qk_rope_head_dim, model.dtype, model.device
        )
        with torch.inference_mode():
            self.cache = new_cache(len(self.layers))
            # decode-time weight layout (W^T copies on CPU, see decode.py); default: CPU only
            if transpose_weights is None:
                transpose_weights = model.device.type == "cpu"
            self.weights = DecodeWeights(transpose_weights, quantize)
            self.weights.add(model.lm_head.weight)
            # kv_b_proj is split here, once, into W_UK / W_UV views
            self.decode_layers = [DecodeLayer(layer, self.weights) for layer in self.layers]
            # one MTP module drafts every position (reused for k > 1): one cached layer
            self.mtp_layer = model.mtp[0] if mtp else None
            self.mtp_cache = new_cache(1) if mtp else None
            self.mtp_decode = DecodeLayer(model.mtp[0], self.weights) if mtp else None
            if mtp:
                self.weights.add(self.mtp_layer.eh_proj.weight)
        # MoE of a few tokens: run only the chosen experts, one GEMV each (decode.sparse_moe)
        self.sparse_moe_max_tokens = sparse_moe_max_tokens
        self.n_heads = c.num_attention_heads

    # ------------------------------------------------------------------ set-up of a forward
    def make_step(self, row0: int, start: list[int], T: int) -> Step:
        """Rows row0..row0+B-1 get T new tokens each at positions start[b]..start[b]+T-1."""
        dev = self.model.device
        B = len(start)
        s0 = torch.tensor(start, device=dev)
        positions = s0[:, None] + torch.arange(T, device=dev)  # [B,T]
        cos, sin = self.model.rope(positions)
        seq = max(start) + T
        if seq > self.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds max_seq_len {self.max_seq_len}")
        prefill = not any(start)
        step = Step(row0, positions, cos, sin, seq, prefill)
        self.weights.refresh()  # pick up weights changed since the last forward (training)
        if not prefill:
            step.freqs = torch.complex(cos, sin)
            keys = torch.arange(seq, device=dev)
            allowed = keys <= positions[:, :, None]  # [B,T,S]: causal per row
            bias = torch.zeros(B, T, seq, dtype=self.model.dtype, device=dev)
            bias = bias.masked_fill_(~allowed, float("-inf"))
            if T > 1:  # query rows are (t, h) pairs: repeat each t's mask over the heads
                bias = (
                    bias[:, :, None]
                    .expand(B, T, self.n_heads, seq)
                    .reshape(B, T * self.n_heads, seq)
                )
            step.bias = bias
        return step

    # ------------------------------------------------------------------ the blocks
    def block(self, dl: DecodeLayer, cache: LatentCache, i: int, x: torch.Tensor, st: Step):
        """One decoder block over `cache` layer i: x [B,T,D] -> [B,T,D]."""
        if not st.prefill:
            return dl.forward(x, st, cache, i, self.sparse_moe_max_tokens)
        # prefill: the model's modules, plain attention over the fresh latents, one cache copy
        layer, mla = dl.layer, dl.attn
        B, T, _ = x.shape
        h = layer.input_layernorm(x)
        q_nope, q_rope = mla.project_q(h, st.cos, st.sin)  # [B,T,H,N], [B,T,H,R]
        c_kv, k_rope = mla.project_latent(h, st.cos, st.sin)  # [B,T,C], [B,T,R]
        cache.write_prefix(i, st.row0, c_kv, k_rope)
        out = mla.attend_plain(q_nope, q_rope, c_kv, k_rope)  # causal, [B,T,H,V]
        x = x + mla.o_proj(out.reshape(B, T, -1))
        h = layer.post_attention_layernorm(x)
        return x + (layer.mlp(h)[0] if isinstance(layer.mlp, MoE) else layer.mlp(h))

    # ------------------------------------------------------------------ main model
    def forward(self, input_ids: torch.Tensor, row0: int, start: list[int]) -> torch.Tensor:
        """input_ids [B,T] at positions start[b]+t of rows row0.. -> hidden [B,T,D] (the last
        block's output before the final norm, what the MTP module consumes)."""
        st = self.make_step(row0, start, input_ids.shape[1])
        x = self.model.model.embed_tokens(input_ids)
        for i, dl in enumerate(self.decode_layers):
            x = self.block(dl, self.cache, i, x, st)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Main head: hidden [...,D] -> fp32 logits [...,Vocab]."""
        return self._head(rms_norm(self.model.model.norm, h))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The shared output head [..., D] -> fp32 logits (main model and MTP module)."""
        return linear(h, self.weights.t(self.model.lm_head.weight)).float()

    def prefill(self, input_ids: torch.Tensor, lengths: list[int], row0: int):
        """Right-padded prompts [B,T] (real lengths `lengths`) into rows row0.. from position 0.
        Returns (fp32 logits of each row's last real token [B,Vocab], hidden [B,T,D])."""
        h = self.forward(input_ids, row0, [0] * len(lengths))
        last = torch.tensor(lengths, device=h.device) - 1
        h_last = h[torch.arange(len(lengths), device=h.device), last]  # [B,D]
        for b, n in enumerate(lengths):
            self.cache.lengths[row0 + b] = n
        return self.logits(h_last), h

    def decode(self, input_ids: torch.Tensor, start: list[int] | None = None):
        """input_ids [B,T] for rows 0..B-1 appended at their cache lengths (or `start`).
        Returns (fp32 logits [B,T,Vocab], hidden [B,T,D]); the caller commits the lengths."""
        start = self.cache.lengths[: input_ids.shape[0]] if start is None else start
        h = self.forward(input_ids, 0, list(start))
        return self.logits(h), h

    def move_row(self, src: int, dst: int) -> None:
        """Move a sequence's cache rows (main and MTP) from row src to row dst."""
        self.cache.move_row(src, dst)
        if self.mtp_cache is not None:
            self.mtp_cache.move_row(src, dst)

    # ------------------------------------------------------------------ MTP module
    def mtp_forward(
        self, h_prev: torch.Tensor, next_ids: torch.Tensor, row0: int, start: list[int]
    ):
        """The MTP module at positions start[b]+t: position i combines h_prev (the main model's
        hidden at i, or the module's own output when drafting further) with the embedding of
        token i+1, and predicts token i+2 [V3 eq. 21-23]. h_prev [B,T,D], next_ids [B,T].
        Returns (fp32 logits [B,T,Vocab], the module's hidden [B,T,D])."""
        layer = self.mtp_layer
        st = self.make_step(row0, start, next_ids.shape[1])
        emb = self.model.model.embed_tokens(next_ids)
        # embedding first, as the released weights expect (V3 eq. 21 shows the other order)
        x = torch.cat((rms_norm(layer.enorm, emb), rms_norm(layer.hnorm, h_prev)), dim=-1)
        x = linear(x, self.weights.t(layer.eh_proj.weight))
        h = self.block(self.mtp_decode, self.mtp_cache, 0, x, st)
        logits = self._head(rms_norm(layer.shared_head.norm, h))
        return logits, h
