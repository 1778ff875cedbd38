"""nanoseek/malloc.py: freed memory stays in the process, unless the user chose otherwise."""

import json
import os
import subprocess
import sys

import pytest

from nanoseek.malloc import user_chose_allocator


def test_user_choices_are_left_alone():
    assert not user_chose_allocator({})
    assert not user_chose_allocator({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2", "LD_PRELOAD": ""})
    assert user_chose_allocator({"NANOSEEK_MALLOC": "system"})
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert user_chose_allocator({"MALLOC_ARENA_MAX_": "2"})
    assert user_chose_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})


# Run in a fresh process: in the test session, threads left by earlier tests (trackers,
# servers) may share glibc's main arena and move its counters between two readings.
_CHECK = """
import ctypes, ctypes.util, json, torch
from nanoseek.malloc import keep_freed_memory

class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2 (glibc >= 2.33): all size_t
    _fields_ = [(k, ctypes.c_size_t) for k in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

try:
    mallinfo = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
except (OSError, AttributeError):
    print(json.dumps(None)); raise SystemExit
mallinfo.restype = Mallinfo2
applied = keep_freed_memory()
n = 64 << 20  # 64 MiB: glibc's defaults would mmap it (threshold <= 32 MiB) and unmap on free
read = lambda: {k: getattr(mallinfo(), k) for k in ("arena", "hblkhd", "uordblks", "fordblks")}
before = read()
x = torch.empty(n, dtype=torch.uint8)
x.fill_(1)
held = read()
del x
after = read()
# a little smaller: torch asks for 64-byte-aligned memory, which glibc serves from a free chunk
# only with room for the alignment; an exact-size chunk that is not the heap's top (a small
# allocation may land after it) would not do, and the heap would grow beside it
y = torch.empty(n - (1 << 20), dtype=torch.uint8)
again = read()
print(json.dumps(dict(applied=applied, n=n, before=before, held=held, after=after, again=again)))
"""


def _run_check(env_extra: dict) -> dict | None:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True,
                         env=env, check=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_freed_big_buffer_stays_in_the_heap():
    # checked through glibc's own counters rather than page faults, whose accounting differs
    # between kernels and sandboxes
    r = _run_check({"NANOSEEK_MALLOC": ""})
    if r is None or not r["applied"]:
        pytest.skip("not glibc >= 2.33")
    n, before, held, after, again = r["n"], r["before"], r["held"], r["after"], r["again"]
    # served by the heap: no new mmapped block, the heap's bytes in use grew by the buffer
    assert held["hblkhd"] - before["hblkhd"] < n, r
    assert held["uordblks"] - before["uordblks"] >= n, r
    # freed, the pages stay in the heap as free bytes for the next allocation
    assert after["arena"] >= held["arena"] and after["fordblks"] - held["fordblks"] >= n, r
    # served again from those free bytes: the heap does not grow
    assert again["arena"] == after["arena"], r


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_without_it_glibc_maps_and_unmaps_the_buffer():
    """The check above can fail: with the user's choice (NANOSEEK_MALLOC=system) glibc mmaps."""
    r = _run_check({"NANOSEEK_MALLOC": "system"})
    if r is None:
        pytest.skip("not glibc >= 2.33")
    assert not r["applied"]
    assert r["held"]["hblkhd"] - r["before"]["hblkhd"] >= r["n"], r
