"""Cached forward passes of a CausalLM: prefill, decode/verify, and the MTP module's steps.

Shape legend: B rows, T new tokens per row, S key positions, D model dim, H heads, R rope head
dim, Vocab the vocabulary.

The runner owns the latent caches and the decode-time weight layout (`DecodeWeights`) and runs
the model's own modules over them (`Backbone.forward`, `MTPLayer.forward` with a `CacheStep`);
the maths of a block lives only in nanoseek/model/.

- Prefill (all rows start at position 0): the modules' weights and MLA's plain attention over
  the fresh latents (causal SDPA), cheaper than the absorbed path when T is large. Prompts of
  different lengths are right-padded; every row uses its own positions 0..T-1, and causality
  alone keeps padding (which only ever sits after a row's real tokens) out of the real tokens'
  attention. The padding's cache entries lie past the row's length: garbage by the cache
  invariant, overwritten by the first decode step.
- Decode and verification (rows at their own positions p_b..p_b+T-1): the decode weight layout
  and MLA's absorbed attention over the latent cache, with a per-row causal bias.
- The output head runs on the positions the caller asks for (the last prompt token in prefill).

Left padding would also work but shifts every row's positions (RoPE) unless position ids are
passed around; per-row positions keep the prompt exactly as it would run alone.
"""

from __future__ import annotations

import torch

from nanoseek.infer import native
from nanoseek.infer.cache import CacheStep, LatentCache, write_rows
from nanoseek.infer.weights import DecodeWeights
from nanoseek.model.mla import score_dtype
from nanoseek.model.transformer import CausalLM
from nanoseek.model.weights import MODULE_WEIGHTS

PREFILL_INT8 = 64  # prompt tokens (all rows) an int8 engine prefills with its int8 weights
# bytes of weights a draft reads from which `draft_quantize="auto"` drafts in int8: below it a
# draft step is overhead-bound, and the int8 calls cost more (the main job's 1.2M model: MTP
# greedy 0.90x plain with fp32 drafts, 0.84x with int8); the 803M bench model's reads 103 MB
DRAFT_INT8_BYTES = 16 << 20
DRAFT_QUANTIZE = ("auto", None, "int8")


def draft_bytes(model: CausalLM) -> int:
    """Bytes of weights one draft step reads: the first MTP module's (K of its E routed
    experts) and the output head."""
    c, total = model.config, model.lm_head.weight.nbytes
    for name, p in model.mtp[0].named_parameters():
        routed = name.startswith("mlp.experts.")
        total += p.nbytes * c.num_experts_per_tok // c.n_routed_experts if routed else p.nbytes
    return total


class ModelRunner:
    """Owns the latent caches and runs the model over them; knows nothing about requests."""

    def __init__(
        self,
        model: CausalLM,
        max_batch: int,
        max_seq_len: int,
        mtp: bool = False,
        transpose_weights: bool | None = None,
        quantize: str | None = None,
        exact: bool = False,
        weights: DecodeWeights | None = None,
        draft_quantize: str | None = "auto",
    ):
        c = model.config
        if mtp and not len(model.mtp):
            raise ValueError("speculative='mtp' needs a model with MTP modules (none in this one)")
        if draft_quantize not in DRAFT_QUANTIZE:
            raise ValueError(
                f"draft_quantize must be one of {DRAFT_QUANTIZE}, got {draft_quantize!r}"
            )
        self.model, self.config = model, c
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

        def new_cache(layers: int) -> LatentCache:
            return LatentCache(layers, max_batch, max_seq_len, c.kv_lora_rank,
                               c.qk_rope_head_dim, model.dtype, model.device)  # fmt: skip

        with torch.inference_mode():
            self.cache = new_cache(c.num_hidden_layers)
            # one MTP module drafts every position (reused for k > 1): one cached layer
            self.mtp_layer = model.mtp[0] if mtp else None
            self.mtp_cache = new_cache(1) if mtp else None
        # decode-time layout (see weights.py), or the int8 copies of a streamed model
        # (streamed.py): W^T copies for fp32 on CPU through PyTorch's operators (exact, or no
        # native kernels), where MKL streams one row at a time fastest; nn.Linear's own
        # [out, in] layout for the native kernels, for bf16 and for the 2-3 rows of a
        # speculative verify step, which MKL streams up to 2x faster that way
        if transpose_weights is None:
            cpu_fp32 = model.device.type == "cpu" and model.dtype == torch.float32
            aten = exact or native.kernels() is None
            transpose_weights = cpu_fp32 and not mtp and aten and quantize is None
        self.weights = weights or DecodeWeights(transpose_weights, quantize, exact)
        # the MTP module's forwards only propose tokens (the verify step decides what is
        # emitted: greedy output stays plain greedy's, sampling keeps p's distribution), so they
        # may multiply with int8 copies of its weights and of the head: a quarter of an fp32
        # module's bytes (half of bf16's) in a step bound by reading them
        if draft_quantize == "auto":
            native_cpu = model.device.type == "cpu" and native.kernels() is not None
            big = mtp and draft_bytes(model) >= DRAFT_INT8_BYTES
            draft_quantize = "int8" if native_cpu and big and not exact else None
        self.draft_weights = self.weights
        if mtp and draft_quantize is not None and draft_quantize != self.weights.quantize:
            self.draft_weights = DecodeWeights(False, draft_quantize)
        self.n_heads = c.num_attention_heads

    def reset(self) -> None:
        """Every cache row empty."""
        self.cache.reset()
        if self.mtp_cache is not None:
            self.mtp_cache.reset()

    # ------------------------------------------------------------------ set-up of a forward
    def make_step(self, cache: LatentCache, row0: int, start: list[int], T: int,
                  weights: DecodeWeights | None = None) -> CacheStep:  # fmt: skip
        """Rows row0..row0+B-1 get T new tokens each at positions start[b]..start[b]+T-1,
        multiplying with `weights` (default the engine's decode weights)."""
        weights = weights or self.weights
        dev = self.model.device
        B = len(start)
        s0 = torch.tensor(start, device=dev)
        positions = s0[:, None] + torch.arange(T, device=dev)  # [B,T]
        seq = max(start) + T
        if seq > self.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds max_seq_len {self.max_seq_len}")
        cos, sin = self.model.rope(positions)  # [B,T,1,R/2]
        if not any(start):  # prefill: the modules' own weights (if any), plain attention
            # pick up weights changed since the last prefill (training between generate calls;
            # a request decodes with the weights it was admitted with)
            weights.refresh()
            w = weights if self._prefill_quantized(weights, B * T) else MODULE_WEIGHTS
            return CacheStep(cache, row0, positions, seq, True, w, cos, sin)

        def deferred():  # what the composed MLA reads (CacheStep.made)
            keys = torch.arange(seq, device=dev)
            allowed = keys <= positions[:, :, None]  # [B,T,S]: causal per row
            bias = torch.zeros(B, T, seq, dtype=score_dtype(self.model.dtype, dev), device=dev)
            bias = bias.masked_fill_(~allowed, float("-inf"))
            if T > 1:  # query rows are (t, h) pairs: repeat each t's mask over the heads
                bias = bias[:, :, None].expand(B, T, self.n_heads, seq).reshape(B, -1, seq)
            return torch.complex(cos, sin), bias, write_rows(row0, positions)

        return CacheStep(cache, row0, positions, seq, False, weights, cos, sin,
                         start=list(start), deferred=deferred)  # fmt: skip

    @staticmethod
    def _prefill_quantized(w: DecodeWeights, tokens: int) -> bool:
        """Whether a prefill of `tokens` multiplies with the int8 decode weights rather than the
        modules' own: always for a streamed model (its modules hold none); in an int8 engine,
        prompts of up to PREFILL_INT8 tokens, whose prefill reads weights (a quarter of the
        bytes, and the numbers the decode steps then use), where longer ones are compute-bound
        and MKL's fp32 / bf16 GEMMs are faster than int8 products."""
        return not w.modules_hold_weights or (w.quantize is not None and tokens <= PREFILL_INT8)

    def _run(self, fn, cache: LatentCache, row0: int, start: list[int], T: int,
             last_only: bool = False, weights: DecodeWeights | None = None):  # fmt: skip
        """fn(cos, sin, step) over the cache; commits lengths start[b] + T for the rows."""
        step = self.make_step(cache, row0, start, T, weights)
        step.last_only = last_only and not step.prefill
        h = fn(step.cos, step.sin, step)
        cache.commit(row0, [s + T for s in start])
        return h

    # ------------------------------------------------------------------ main model
    def forward(self, input_ids: torch.Tensor, row0: int, start: list[int]) -> torch.Tensor:
        """input_ids [B,T] at positions start[b]+t of rows row0.. -> hidden [B,T,D] (the last
        block's output before the final norm, what the MTP module consumes)."""

        def fn(cos, sin, step):
            return self.model.model(input_ids, cos, sin, cache=step)[0]

        return self._run(fn, self.cache, row0, start, input_ids.shape[1])

    def logits(self, h: torch.Tensor, norm=None, weights: DecodeWeights | None = None):
        """Hidden [...,D] -> fp32 logits [...,Vocab] through the decode layout of the head."""
        return self.model.logits(h, weights or self.weights, norm).float()

    def prefill(self, input_ids: torch.Tensor, lengths: list[int], row0: int):
        """Right-padded prompts [B,T] (real lengths `lengths`) into rows row0.. from position 0.
        Returns (fp32 logits of each row's last real token [B,Vocab], hidden [B,T,D])."""
        h = self.forward(input_ids, row0, [0] * len(lengths))
        last = torch.tensor(lengths, device=h.device) - 1
        h_last = h[torch.arange(len(lengths), device=h.device), last]  # [B,D]
        for b, n in enumerate(lengths):
            self.cache.rollback(row0 + b, n)  # the padding is garbage
        return self.logits(h_last), h

    def decode(self, input_ids: torch.Tensor, start: list[int] | None = None):
        """input_ids [B,T] for rows 0..B-1 appended at their cache lengths (or `start`); commits
        the lengths start + T. Returns (fp32 logits [B,T,Vocab], hidden [B,T,D])."""
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
        self,
        h_prev: torch.Tensor,
        next_ids: torch.Tensor,
        row0: int,
        start: list[int],
        last_only: bool = False,
    ):
        """The MTP module at positions start[b]+t over its own cache (commits start + T): position
        i combines h_prev (the main model's hidden at i, or the module's own output when drafting
        further) with the embedding of token i+1, and predicts token i+2 [V3 eqs. 21-23].
        h_prev [B,T,D], next_ids [B,T]. Returns (fp32 logits [B,T,Vocab], its hidden [B,T,D]);
        with `last_only` (a decode step) those of each row's last position, [B,1,...]: the
        earlier positions write their cache entries, and their FFN and head are skipped."""
        layer = self.mtp_layer
        emb = self.model.model.embed_tokens(next_ids)

        def fn(cos, sin, step):
            return layer(h_prev, emb, cos, sin, cache=step.layer(0))[0]

        w = self.draft_weights
        h = self._run(fn, self.mtp_cache, row0, start, next_ids.shape[1], last_only, w)
        return self.logits(h, layer.shared_head.norm, w), h
