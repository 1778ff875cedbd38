"""Keep freed memory in the process: big CPU tensors reuse pages instead of page-faulting.

glibc's malloc serves every request above its mmap threshold (dynamic, at most 32 MiB) with a
fresh `mmap` and gives the pages back on `free`. A training step allocates the same big buffers
every time (the [tokens, vocab] logits and their gradient are 32 MiB each in bf16 on the bench
model), so every step the kernel zero-fills and maps them again, page by page: on this project's
machine a [2048,256] x [256,8192] bf16 matmul takes 31 ms into a fresh output and 21 ms into a
reused one. Turning mmap off (the heap serves everything) and never trimming the heap's top makes
freed pages stay in the process for the next step: `bench/train_step.py --malloc keep` measures
it (both implementations speed up; transformers, with more big fp32 buffers, more).

The price: resident memory stays at its peak instead of shrinking between steps, which is what a
training or serving process does anyway. It is a process-wide switch, so the `nanoseek` CLI turns
it on for its own process (opt out with NANOSEEK_MALLOC=system); library users call
`keep_freed_memory()` themselves. Other allocators (jemalloc or tcmalloc via LD_PRELOAD, the
usual advice for PyTorch on CPU) or glibc settings of the user's own are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def user_chose_allocator(env: dict[str, str] | None = None) -> bool:
    """True when the environment already configures malloc: NANOSEEK_MALLOC=system, glibc
    tunables or MALLOC_* variables, or an allocator preloaded in place of glibc's."""
    env = os.environ if env is None else env
    if env.get("NANOSEEK_MALLOC", "").lower() == "system":
        return True
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return True
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in env):
        return True
    return any(name in env.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve big blocks from its heap and keep freed memory (see the
    module docstring). Returns True when applied; False off Linux/glibc or when the user
    configured the allocator (`user_chose_allocator`). Safe to call more than once."""
    if not sys.platform.startswith("linux") or user_chose_allocator():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # order matters: with the trim threshold set first, nothing freed in between is returned
    return bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX)) and bool(mallopt(_M_MMAP_MAX, 0))
