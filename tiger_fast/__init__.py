"""tiger_fast: generative retrieval (TIGER, arXiv 2305.05065) with exact fast kernels.

Public API (imported lazily so ``import tiger_fast`` stays cheap):
    TokenLayout           the token layout shared by every component (layout.py)
    quantize              residual quantization, exact, dispatching to reference/cpu/triton
    generate              trie-constrained beam search / per-level temperature sampling
"""
from importlib import import_module

from .layout import TokenLayout

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
