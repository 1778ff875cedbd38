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

Rows are slots of a running batch. The engine keeps running sequences in rows 0..n-1 so that a
step reads `kv[:, :n]` (a view) instead of gathering scattered rows; `move_row` fills the hole a
finished sequence leaves.
"""

from __future__ import annotations

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
        self.lengths = [0] * max_batch  # valid positions per row (host ints: no device sync)

    # ------------------------------------------------------------------ views
    def layer(self, layer: int, row0: int, rows: int, seq: int) -> torch.Tensor:
        """[rows, seq, C+R] view of layer `layer`: rows row0.., positions 0..seq-1."""
        return self.kv[layer, row0 : row0 + rows, :seq]

    def c_kv(self, layer: int, row0: int, rows: int, seq: int) -> torch.Tensor:
        return self.layer(layer, row0, rows, seq)[..., : self.kv_lora_rank]  # [rows,seq,C]

    def k_rope(self, layer: int, row0: int, rows: int, seq: int) -> torch.Tensor:
        return self.layer(layer, row0, rows, seq)[..., self.kv_lora_rank :]  # [rows,seq,R]

    # ------------------------------------------------------------------ writes
    def write(
        self,
        layer: int,
        row0: int,
        positions: torch.Tensor,
        c_kv: torch.Tensor,
        k_rope: torch.Tensor,
    ) -> None:
        """Store the latents of new tokens of rows row0..row0+B-1 at their own positions.

        positions [B,T] int64, c_kv [B,T,C], k_rope [B,T,R]."""
        B, T = positions.shape
        rows = torch.arange(row0, row0 + B, device=positions.device)[:, None].expand(B, T)
        entry = torch.cat((c_kv, k_rope), dim=-1)  # [B,T,C+R]
        self.kv[layer].index_put_((rows, positions), entry.to(self.kv.dtype))

    def write_prefix(self, layer: int, row0: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Store positions 0..T-1 of rows row0..row0+B-1 (a prefill): two slice copies."""
        B, T, C = c_kv.shape
        self.kv[layer, row0 : row0 + B, :T, :C] = c_kv
        self.kv[layer, row0 : row0 + B, :T, C:] = k_rope

    # ------------------------------------------------------------------ bookkeeping
    def rollback(self, row: int, length: int) -> None:
        """Forget positions >= length of `row` (rejected drafts): entries past the length are
        garbage by the invariant, so only the length moves."""
        assert 0 <= length <= self.lengths[row], (row, length, self.lengths[row])
        self.lengths[row] = length

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s valid entries (all layers) into row `dst`; `src` becomes free."""
        n = self.lengths[src]
        if src != dst:
            self.kv[:, dst, :n] = self.kv[:, src, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def bytes_per_token(self) -> int:
        """Cache bytes one token costs over all cached layers."""
        return self.num_layers * (self.kv_lora_rank + self.rope_dim) * self.kv.element_size()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
