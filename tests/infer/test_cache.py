"""LatentCache: per-row writes at own positions, rollback, row moves, sizes."""

import pytest
import torch

from nanoseek.infer.cache import LatentCache

C, R = 6, 4


def make(rows=3, seq=10, layers=2):
    return LatentCache(layers, rows, seq, C, R, torch.float32)


def test_bytes_per_token_is_latent_plus_rope_per_layer():
    cache = LatentCache(61, 1, 4, 512, 64, torch.bfloat16)
    assert cache.bytes_per_token() == 70_272  # (512 + 64) * 2 bytes * 61 layers: V3, bf16
    assert make().bytes_per_token() == 2 * (C + R) * 4


def test_write_lands_at_each_rows_positions():
    cache = make()
    pos = torch.tensor([[2, 3], [5, 6]])
    c, r = torch.randn(2, 2, C), torch.randn(2, 2, R)
    cache.write(1, 1, pos, c, r)  # rows 1 and 2
    torch.testing.assert_close(cache.c_kv(1, 1, 2, 7)[0, 2:4], c[0])
    torch.testing.assert_close(cache.k_rope(1, 1, 2, 7)[1, 5:7], r[1])
    assert cache.kv[0].abs().sum() == 0 and cache.kv[1, 0].abs().sum() == 0  # nothing else


def test_write_prefix_equals_write_at_zero():
    a, b = make(), make()
    c, r = torch.randn(2, 5, C), torch.randn(2, 5, R)
    a.write_prefix(0, 1, c, r)
    b.write(0, 1, torch.arange(5).expand(2, 5), c, r)
    assert torch.equal(a.kv, b.kv)


def test_rollback_keeps_entries_and_moves_only_the_length():
    cache = make()
    cache.write(0, 0, torch.arange(6)[None], torch.randn(1, 6, C), torch.randn(1, 6, R))
    cache.commit(0, [6])
    before = cache.kv.clone()
    cache.rollback(0, 4)  # positions 4, 5 rejected: garbage from now on
    assert cache.lengths[0] == 4 and torch.equal(cache.kv, before)
    # the next write at the rolled-back length overwrites the rejected entries
    c = torch.randn(1, 1, C)
    cache.write(0, 0, torch.tensor([[4]]), c, torch.zeros(1, 1, R))
    torch.testing.assert_close(cache.c_kv(0, 0, 1, 5)[0, 4], c[0, 0])


def test_move_row_copies_valid_entries_of_all_layers():
    cache = make()
    cache.write(0, 2, torch.arange(3)[None], torch.randn(1, 3, C), torch.randn(1, 3, R))
    cache.write(1, 2, torch.arange(3)[None], torch.randn(1, 3, C), torch.randn(1, 3, R))
    cache.commit(2, [3])
    want = cache.kv[:, 2, :3].clone()
    cache.move_row(2, 0)
    assert cache.lengths[0] == 3 and cache.lengths[2] == 0
    assert torch.equal(cache.kv[:, 0, :3], want)


def test_lengths_change_only_through_the_cache():
    cache = make()
    cache.commit(0, [5, 2])
    assert cache.lengths[:2] == (5, 2)
    with pytest.raises(TypeError):
        cache.lengths[0] = 1  # read-only: commit, rollback, move_row, reset
    with pytest.raises(AssertionError):
        cache.rollback(1, 3)  # rollback never lengthens
    cache.reset()
    assert set(cache.lengths) == {0}
