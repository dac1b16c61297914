"""tiger_fast: generative retrieval (TIGER, arXiv 2305.05065) with exact fast kernels.

Public API (imported lazily so ``import tiger_fast`` stays cheap):
    TokenLayout           the token layout shared by every component (layout.py)
    quantize              residual quantization, exact, dispatching to reference/cpu/triton
    generate              trie-constrained beam search / per-level temperature sampling
"""
import os
from importlib import import_module

# OpenMP threads spin-wait after each parallel region by default.  When another process holds one of
# the cores, a spinning or descheduled team member stalls every matrix product (batch-1 generate on
# 2 threads beside a 1-thread training job: 39 ms passive, 72 ms active, 68 ms with libgomp's
# default spin; on a quiet machine spinning wins: 22-27 ms against 37 ms; README).  libgomp reads
# the variable once, when torch loads it: this default only applies if tiger_fast is imported
# before torch.  One libgomp is loaded (the extensions resolve to torch's copy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .layout import TokenLayout  # noqa: E402  (after the environment default above)

__version__ = "0.1.0"

_LAZY = {
    "quantize": ("tiger_fast.quantize", "quantize"),
    "generate": ("tiger_fast.generate", "generate"),
}


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(import_module(mod), attr)
    raise AttributeError(f"module 'tiger_fast' has no attribute {name!r}")


__all__ = ["TokenLayout", "__version__", *_LAZY]
