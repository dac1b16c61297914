"""tiger_fast: generative retrieval (TIGER, arXiv 2305.05065) with exact fast kernels.

Public API:
    TokenLayout           the token layout shared by every component (layout.py)
    quantize              residual quantization, exact, dispatching to reference/cpu/triton (quantize.py)
    generate              trie-constrained beam search / per-level temperature sampling (generate.py)

``tiger_fast.quantize`` and ``tiger_fast.generate`` are the functions (the package binds them after
importing their modules, so ``import tiger_fast.quantize`` does not rebind the name); reach the
modules themselves with ``from tiger_fast.quantize import ...`` or ``importlib.import_module``.
"""
import os

# OpenMP threads spin-wait after each parallel region by default.  When another process holds one of
# the cores, a spinning or descheduled team member stalls every matrix product (batch-1 generate on
# 2 threads beside a 1-thread training job: 39 ms passive, 72 ms active, 68 ms with libgomp's
# default spin; on a quiet machine spinning wins: 22-27 ms against 37 ms; README).  libgomp reads
# the variable once, when torch loads it: this default only applies if tiger_fast is imported
# before torch.  One libgomp is loaded (the extensions resolve to torch's copy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .layout import TokenLayout  # noqa: E402  (after the environment default above)
from .quantize import quantize  # noqa: E402
from .generate import generate  # noqa: E402

__version__ = "0.1.0"

__all__ = ["TokenLayout", "__version__", "quantize", "generate"]
