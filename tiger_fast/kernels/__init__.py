"""GPU kernels of tiger_fast (Triton), ``tiger_fast.kernels``.

Importing this package never imports triton; each kernel module imports it lazily.
``quantize``: exact residual quantization (``quantize_triton``, see tiger_fast/kernels/quantize.py).
"""
