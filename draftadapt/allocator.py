"""Keep a CPU training process's memory linear in the batch: fix glibc's mmap threshold from inside.

glibc serves a malloc of >= M_MMAP_THRESHOLD bytes (128 KiB at start) with its own mmap, unmapped on free.
But its threshold is dynamic: each free of an mmapped block raises it to that block's size (up to 32 MiB),
so after the first few multi-MB tensors are freed, every later tensor below that size comes from the heap,
and freed heap blocks that are not at its top stay in RSS. A PyTorch CPU training step frees and reallocates
many such tensors; measured, one TTT-3 step at 8k tokens (hidden 1024, draft vocab 32k, fp32) added
+8.83 GB of RSS in a plain process and +0.81 GB with MALLOC_MMAP_THRESHOLD_=65536. mallopt(M_MMAP_THRESHOLD)
sets the same from inside the process: it fixes the threshold and turns the dynamic adjustment off.

`limit_heap_growth()` does that once per process; the TTT loss and the trainers call it. It does nothing
where the C library is not glibc (macOS, musl, Windows), nothing when the user already set
MALLOC_MMAP_THRESHOLD_ (glibc applied theirs at start), and nothing with DRAFTADAPT_MMAP_THRESHOLD=off
(the opt-out; an integer sets another threshold in bytes). It does not touch CUDA memory (PyTorch's
caching allocator) and is not needed there.
"""
from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 1 << 16  # 64 KiB: what the measurement above used
ENV = "DRAFTADAPT_MMAP_THRESHOLD"  # "off" / "0": leave glibc alone; an integer: that threshold in bytes

_applied: int | None = None  # the threshold this process set, 0 when it decided not to
_OFF = ("off", "0", "false", "no", "")


def _glibc() -> ctypes.CDLL | None:
    """The running process's C library if it is glibc, else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only; AttributeError elsewhere
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, TypeError, AttributeError):  # Windows: CDLL(None) is a TypeError
        return None


def limit_heap_growth() -> int:
    """Fix glibc's mmap threshold (once per process); returns the threshold set, 0 if none was.

    Cheap after the first call. Cost: every CPU tensor of >= 64 KiB is a fresh mmap (page faults on first
    touch); measured tokens/s of a TTT step are in benchmarks/ttt_scaling.py's results.
    """
    global _applied
    if _applied is not None:
        return _applied
    setting = os.environ.get(ENV, str(DEFAULT_THRESHOLD)).strip().lower()
    if setting not in _OFF and not setting.isdigit():
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use a threshold in bytes (e.g. 65536) or 'off'")
    _applied = 0
    if setting in _OFF or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return 0
    value = int(setting)
    libc = _glibc()
    if libc is not None and libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(value)) == 1:
        _applied = value
    return _applied
