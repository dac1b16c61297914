"""tiger_fast: generative retrieval (TIGER, arXiv 2305.05065) with exact fast kernels.

Public API (imported lazily so ``import tiger_fast`` stays cheap):
    TokenLayout           the token layout shared by every component (layout.py)
    quantize              residual quantization, exact, dispatching to reference/cpu/triton
    generate              trie-constrained beam search / per-level temperature sampling
"""
import os
from importlib import import_module

# torch's OpenMP runtime and the extensions' OpenMP runtime are two copies of libgomp; with the
# default (active) wait policy each spins on the cores after a parallel region and starves the
# other (measured: batch-1 generate 11-20 s instead of 65 ms on a busy 2-core machine).  Passive
# waiting costs nothing measurable here.  Only a default: must be set before torch is imported.
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
