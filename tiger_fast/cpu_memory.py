"""Memory of this machine: opt-in glibc malloc tuning for CPU serving, and the free memory that
upfront request bounds compare with (``available_memory``).

PyTorch's CPU allocator asks malloc for every tensor; glibc serves blocks above its mmap threshold
(at most 32 MB) with fresh ``mmap`` pages and returns them to the OS on free, so every large
temporary is page-faulted in again on the next call.  Batch-256 x 20-beam decoding makes dozens of
such temporaries (logits 62 MB, encoder FFN 85 MB, the self-attention K/V 300 MB) per call; on the
2-core development machine that page faulting was a third of ``tiger_fast.generate``'s time
(measured: 6.4 s -> 4.4 s per batch, one thread, benchmarks/bench_generate.py records both).

``retain_freed_memory()`` makes glibc serve everything from its heap (``M_MMAP_MAX = 0``) and keep
freed memory (``M_TRIM_THRESHOLD`` huge), the same effect as the jemalloc/tcmalloc preload that
PyTorch's CPU performance guide recommends, without a preload.  It is process-wide and the process
then keeps its peak heap, which is what a long-lived serving process wants and a notebook may not,
so the library never calls it implicitly: the ``tiger-fast batch-recall`` command and the
benchmarks do.
"""
from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["retain_freed_memory", "available_memory"]

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Tune glibc malloc to keep freed memory for reuse (process-wide, irreversible).

    Returns True when applied, False when the C library is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok_mmap = mallopt(_M_MMAP_MAX, 0) == 1
    ok_trim = mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    return ok_mmap and ok_trim


def available_memory(device) -> int | None:
    """Bytes free for a request on ``device``: CUDA's free memory, or Linux's MemAvailable for the
    CPU; None when unknown (no check then)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
