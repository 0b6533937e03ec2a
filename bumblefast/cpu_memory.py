"""Keep freed host memory in the process on CPU training, instead of handing it back to the OS.

A CPU training step allocates and frees gigabytes of tensors (activations, their gradients,
the weights' gradients). glibc's malloc serves each block above its mmap threshold (128 KiB,
rising with use to at most 32 MiB) with a fresh mmap, unmaps it on free, and trims a free heap
top above 128 KiB, so every step faults the same pages in again, each zeroed by the kernel: at
the 0.5B shape (4 of its layers, 1,024 tokens) ~520k minor faults per step (2 GB), and the step
7-11% slower than with the memory kept (docs/LOG.md, issue 29). With mmap and trimming off,
freed blocks are reused, as PyTorch's CUDA caching allocator does on the GPU and as the
jemalloc/tcmalloc that PyTorch's CPU tuning guide recommends do. The price: the resident set
keeps the heap's high-water mark between steps, above glibc's own peak when row lengths vary
(docs/LOG.md); `malloc_trim` (benchmarks' PeakMemory) still returns it.

Process-wide and glibc only. Left alone when the user chose: any MALLOC_* variable,
GLIBC_TUNABLES naming malloc, or an allocator in LD_PRELOAD; BUMBLEFAST_KEEP_FREED_MEMORY=0
turns it off."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_state: str | None = None


def user_choice(env: dict | os._Environ = os.environ) -> str | None:
    """Why the user's own allocator settings win, or None."""
    if env.get("BUMBLEFAST_KEEP_FREED_MEMORY", "1") == "0":
        return "BUMBLEFAST_KEEP_FREED_MEMORY=0"
    named = sorted(k for k in env if k.startswith("MALLOC_"))
    if named:
        return f"{named[0]} is set"
    if "malloc" in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    preload = env.get("LD_PRELOAD", "")
    for lib in ("jemalloc", "tcmalloc", "mimalloc"):
        if lib in preload:
            return f"LD_PRELOAD has {lib}"
    return None


@functools.cache
def _libc():
    """glibc, or None where there is none (musl, macOS: nothing to tune)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def return_freed_memory() -> None:
    """Hand the heap's free memory back to the OS now (malloc_trim), kept or not; a no-op
    without glibc. Benchmarks call it before measuring a side's resident-set growth."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_memory() -> str:
    """Turn glibc's mmap and heap trimming off for this process (once); returns what it did,
    for the run's log line."""
    global _state
    if _state is not None:
        return _state
    why = user_choice()
    if why:
        _state = f"malloc left as the user set it ({why})"
        return _state
    libc = _libc()
    if libc is None:
        _state = "malloc unchanged (no glibc mallopt)"
        return _state
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _state = "freed memory kept in the process (glibc mmap and trim off)" if ok else "malloc unchanged (refused)"
    return _state
