"""nanoseek/malloc.py: freed memory stays in the process, unless the user chose otherwise."""

import resource
import sys

import pytest
import torch

from nanoseek.malloc import keep_freed_memory, user_chose_allocator


def test_user_choices_are_left_alone():
    assert not user_chose_allocator({})
    assert not user_chose_allocator({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2", "LD_PRELOAD": ""})
    assert user_chose_allocator({"NANOSEEK_MALLOC": "system"})
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert user_chose_allocator({"MALLOC_ARENA_MAX_": "2"})
    assert user_chose_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})


def _minor_faults() -> int:
    # this thread's faults only: background threads of earlier tests (trackers, servers) fault
    # pages of their own; the test runs torch on this one thread so that its work counts here
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_big_buffer_allocated_again_does_not_fault_its_pages_again(monkeypatch):
    for key in ("NANOSEEK_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(key, raising=False)
    if not keep_freed_memory():
        pytest.skip("not glibc")
    n = 64 << 20  # 64 MiB: glibc would mmap it (threshold <= 32 MiB) and unmap it on free
    faults = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(6):
            before = _minor_faults()
            torch.ones(n, dtype=torch.uint8).sum()
            faults.append(_minor_faults() - before)
    finally:
        torch.set_num_threads(threads)
    # with glibc's defaults every round maps 16,384 fresh 4-KiB pages; kept, a round reuses
    # freed pages (a round may still touch heap pages never used before, in a long-lived
    # process whose heap has grown and fragmented: hence the best round, not every round)
    assert min(faults[2:]) < (n >> 12) // 8, faults
