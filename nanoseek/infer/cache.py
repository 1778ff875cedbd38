"""The MLA latent KV cache: per layer and token only c_KV [C] and the rotated k_rope [R].

Shape legend: L cached layers, B batch rows (slots), S positions, C kv latent rank
(kv_lora_rank), R rope head dim.

[V3 §2.1.1; V2 §2.1] every head's key and value are functions of the normalised latent
c_KV and the rotated shared key k_rope, so a token costs (C + R) values per layer: 576 for V3,
against H * (N + R + V) = 40,960 for a cache of full per-head K and V (what transformers keeps).

Layout: one preallocated buffer `kv [L, B, S_max, C + R]` in the model dtype, c_KV in the first C
channels and k_rope in the last R. Keeping the two side by side lets absorbed attention score a
query `[q_lat ; q_rope]` against `[c_KV ; k_rope]` with one batched matmul; `c_kv(l)` and
`k_rope(l)` are views of the two halves. The latent is shared by all heads: do not shard it by head.

Invariant (what makes rollback free): for each row b, positions `< lengths[b]` hold valid
entries and everything at or past `lengths[b]` is garbage. A forward over new tokens at positions
p..p+T-1 writes all T entries before any query reads them, and a query at position p attends only
to keys at positions <= p, so garbage is never read. Rolling back rejected speculative tokens is
therefore just lowering `lengths[b]`; nothing is erased.

The cache owns the lengths: a forward over it (`CacheStep`) commits its rows' new lengths when
it ends, `rollback` lowers them, `move_row` and `reset` move or clear them; readers see a tuple.

Rows are slots of a running batch. The engine keeps running sequences in rows 0..n-1 so that a
step reads `kv[:, :n]` (a view) instead of gathering scattered rows; `move_row` fills the hole a
finished sequence leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class LatentCache:
    def __init__(
        self,
        num_layers: int,
        max_batch: int,
        max_seq_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.num_layers, self.max_batch, self.max_seq_len = num_layers, max_batch, max_seq_len
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        # zeros, not empty: garbage is never read (see the invariant), but NaN bit patterns in
        # masked-out keys would still poison `0 * NaN` in a matmul
        self.kv = torch.zeros(
            num_layers, max_batch, max_seq_len, kv_lora_rank + rope_dim, dtype=dtype, device=device
        )  # [L,B,S,C+R]
        self._lengths = [0] * max_batch  # valid positions per row (host ints: no device sync)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Valid positions per row (read-only: see the module docstring for who changes them)."""
        return tuple(self._lengths)

    # ------------------------------------------------------------------ views
    def layer(self, layer: int, row0: int, rows: int, seq: int) -> torch.Tensor:
        """[rows, seq, C+R] view of layer `layer`: rows row0.., positions 0..seq-1."""
        return self.kv[layer, row0 : row0 + rows, :seq]

    def c_kv(self, layer: int, row0: int, rows: int, seq: int) -> torch.Tensor:
        return self.layer(layer, row0, rows, seq)[..., : self.kv_lora_rank]  # [rows,seq,C]

    def k_rope(self, layer: int, row0: int, rows: int, seq: int) -> torch.Tensor:
        return self.layer(layer, row0, rows, seq)[..., self.kv_lora_rank :]  # [rows,seq,R]

    def row_address(self, layer: int, row: int) -> int:
        """The address of row `row` of layer `layer` ([S_max, C+R], contiguous): where a native
        decode kernel reads the row's entries and writes the new one."""
        per_row = self.row_stride() * self.kv.element_size()  # bytes
        return self.kv.data_ptr() + (layer * self.max_batch + row) * per_row

    def row_stride(self) -> int:
        """Elements between consecutive rows of a layer (S_max * (C+R))."""
        return self.kv.stride(1)

    # ------------------------------------------------------------------ writes
    def write(
        self,
        layer: int,
        row0: int,
        positions: torch.Tensor,
        c_kv: torch.Tensor,
        k_rope: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Store the latents of new tokens of rows row0..row0+B-1 at their own positions.

        positions [B,T] int64, c_kv [B,T,C], k_rope [B,T,R]; rows [B,T] the row of each entry
        (made here when not given: a step over several layers makes it once)."""
        if rows is None:
            rows = write_rows(row0, positions)
        entry = torch.cat((c_kv, k_rope), dim=-1)  # [B,T,C+R]
        if entry.dtype != self.kv.dtype:
            entry = entry.to(self.kv.dtype)
        self.kv[layer].index_put_((rows, positions), entry)

    def write_prefix(self, layer: int, row0: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Store positions 0..T-1 of rows row0..row0+B-1 (a prefill): two slice copies."""
        B, T, C = c_kv.shape
        self.kv[layer, row0 : row0 + B, :T, :C] = c_kv
        self.kv[layer, row0 : row0 + B, :T, C:] = k_rope

    # ------------------------------------------------------------------ bookkeeping
    def commit(self, row0: int, lengths: list[int]) -> None:
        """Rows row0.. now hold `lengths` valid positions (the end of a forward over them)."""
        self._lengths[row0 : row0 + len(lengths)] = lengths

    def rollback(self, row: int, length: int) -> None:
        """Forget positions >= length of `row` (rejected drafts, padding): entries past the
        length are garbage by the invariant, so only the length moves."""
        assert 0 <= length <= self._lengths[row], (row, length, self._lengths[row])
        self._lengths[row] = length

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s valid entries (all layers) into row `dst`; `src` becomes free."""
        n = self._lengths[src]
        if src != dst:
            self.kv[:, dst, :n] = self.kv[:, src, :n]
        self._lengths[dst], self._lengths[src] = n, 0

    def reset(self) -> None:
        """Every row empty (the buffer is kept: its entries are garbage by the invariant)."""
        self._lengths = [0] * self.max_batch

    def bytes_per_token(self) -> int:
        """Cache bytes one token costs over all cached layers."""
        return self.num_layers * (self.kv_lora_rank + self.rope_dim) * self.kv.element_size()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def write_rows(row0: int, positions: torch.Tensor) -> torch.Tensor:
    """[B,T] the cache row of each new entry of rows row0..row0+B-1 (positions [B,T])."""
    B, T = positions.shape
    return torch.arange(row0, row0 + B, device=positions.device)[:, None].expand(B, T)


@dataclass
class CacheStep:
    """One forward over rows row0..row0+B-1 of a cache: what the model's modules read from it
    (MLA.forward, DecoderLayer.forward, Backbone.forward take it as `cache`)."""

    cache: LatentCache
    row0: int
    positions: torch.Tensor  # [B,T] int64: the new tokens' positions
    seq: int  # key positions to read, S = max position + 1
    prefill: bool  # every row starts at 0: attend over the fresh latents (plain attention)
    weights: object  # what multiplies (nanoseek/model/weights.py)
    cos: torch.Tensor | None = None  # [B,T,1,R/2] fp32: the new tokens' rotary tables
    sin: torch.Tensor | None = None
    freqs: torch.Tensor | None = None  # decode: cos + i sin [B,T,1,R/2] complex64
    bias: torch.Tensor | None = None  # decode: [B,T*H|1,S] additive mask, 0 or -inf
    rows: torch.Tensor | None = None  # decode: [B,T] the cache row of each new entry
    start: list[int] | None = None  # decode: each row's first new position (host ints)
    # decode: makes (freqs, bias, rows) when a layer first reads them; a step whose layers all
    # run in native calls reads none of them (~10 operators a step)
    deferred: Callable[[], tuple] | None = None
    # decode: only each row's last position's output is wanted (the earlier positions' cache
    # entries are): a layer runs its FFN on the last position alone (DecoderLayer.decode)
    last_only: bool = False

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def made(self) -> CacheStep:
        """This step, with freqs, bias and rows made if they were deferred."""
        if self.deferred is not None:
            self.freqs, self.bias, self.rows = self.deferred()
            self.deferred = None
        return self


class LayerCache:
    """Layer i's view of a `CacheStep`: MLA writes the new latents through it."""

    __slots__ = ("step", "i", "prefill", "weights")

    def __init__(self, step: CacheStep, i: int):
        self.step, self.i = step, i
        self.prefill, self.weights = step.prefill, step.weights

    @property
    def freqs(self) -> torch.Tensor | None:
        return self.step.made().freqs

    @property
    def bias(self) -> torch.Tensor | None:
        return self.step.made().bias

    def write(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor | None:
        """Store the new tokens' latents c_kv [B,T,C], k_rope [B,T,R]. A decode step gets back
        the layer's [B,S,C+R] entries to attend over (the cached positions and the new ones)."""
        st = self.step
        if st.prefill:
            st.cache.write_prefix(self.i, st.row0, c_kv, k_rope)
            return None
        st.cache.write(self.i, st.row0, st.positions, c_kv, k_rope, st.made().rows)
        return st.cache.layer(self.i, st.row0, c_kv.shape[0], st.seq)
