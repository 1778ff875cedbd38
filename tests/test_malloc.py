"""nanoseek/malloc.py: freed memory stays in the process, unless the user chose otherwise."""

import ctypes
import ctypes.util
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


class _Mallinfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (<malloc.h>, glibc >= 2.33): every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo():
    """glibc's own account of the main arena (the calling thread's, on the main thread); None
    where the C library has no mallinfo2."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_freed_big_buffer_stays_in_the_heap(monkeypatch):
    # checked through glibc's own counters rather than page faults, whose accounting differs
    # between kernels and sandboxes
    for key in ("NANOSEEK_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(key, raising=False)
    mallinfo = _mallinfo()
    if mallinfo is None or not keep_freed_memory():
        pytest.skip("not glibc >= 2.33")
    n = 64 << 20  # 64 MiB: glibc's defaults would mmap it (threshold <= 32 MiB) and unmap on free
    before = mallinfo()
    x = torch.empty(n, dtype=torch.uint8)
    x.fill_(1)
    held = mallinfo()
    # served by the heap: no new mmapped block, the heap's bytes in use grew by the buffer
    assert held.hblkhd - before.hblkhd < n, (before.hblkhd, held.hblkhd)
    assert held.uordblks - before.uordblks >= n, (before.uordblks, held.uordblks)
    del x
    after = mallinfo()
    # freed, the pages stay in the heap as free bytes for the next allocation
    assert after.arena >= held.arena and after.fordblks - held.fordblks >= n, (held, after)
    y = torch.empty(n, dtype=torch.uint8)
    # served again from those free bytes: the heap does not grow
    assert mallinfo().arena == after.arena
    del y
