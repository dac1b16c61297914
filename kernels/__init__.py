"""GPU kernels of tiger_fast (Triton), installed as ``tiger_fast.kernels``.

Importing this package never imports triton; each kernel module imports it lazily.
``quantize``: exact residual quantization (``quantize_triton``, see kernels/quantize.py).
"""
