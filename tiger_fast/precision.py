"""Numeric precision of the retriever's forward in ``tiger_fast.generate``: check that a model can
run in a mode, and prepare it (the model to call and the context to call it in).

Modes (docs/generate_precision.md says what is exact in each):

* ``"fp32"`` (default, exact): float32 weights and arithmetic; the IDs, order and scores equal the
  reference and Hugging Face constrained ``generate``.
* ``"bf16"``: the model's matrix products and attention under ``torch.autocast`` in bfloat16
  (AVX512-BF16 / AMX on x86 CPUs, tensor cores on GPUs); norms, residual sums and the
  log_softmax stay float32.  Needs a float32 or bfloat16 model.
* ``"int8"``: every Linear as int8 weights (one scale per output channel) with dynamically
  quantized uint8 activations (fbgemm, VNNI) on the CPU; the tied lm head too.  A float32 model is
  quantized once (a cached copy, rebuilt when a parameter changes); a model already passed
  through ``torch.ao.quantization.quantize_dynamic`` runs as it is.

In every mode the selection kernels get float32 log-probabilities and are exact on them.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import warnings

import torch
from torch import nn

__all__ = ["PRECISIONS", "check_precision", "prepare_model", "int8_unavailable_reason"]

PRECISIONS = ("fp32", "bf16", "int8")
_LOCK = threading.Lock()  # one quantized copy per model even when generate runs in several threads


def _int8_linears(model) -> int:
    """Number of dynamically quantized Linear modules (their ``weight`` is a method)."""
    return sum(1 for m in model.modules() if callable(getattr(m, "weight", None)) and hasattr(m, "_packed_params"))


def _float_dtypes(model) -> set:
    return {p.dtype for p in model.parameters() if p.dtype.is_floating_point}


def int8_unavailable_reason(device: torch.device) -> str:
    """"" if int8 products can run on ``device`` here, else why not."""
    if device.type != "cpu":
        return (f"the model is on {device}; int8 runs on the CPU only (fbgemm dynamic quantization), "
                "use precision='bf16' on a GPU")
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        return f"this torch build has no x86/fbgemm quantized engine (supported: {engines})"
    return ""


def check_precision(model, precision, device: torch.device) -> None:
    """Raise one clear error if ``model`` (on ``device``) cannot run in ``precision``."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dtypes = _float_dtypes(model)
    quantized = _int8_linears(model) > 0
    names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes)) or "none"
    if precision == "fp32":
        if quantized:
            raise ValueError("precision='fp32' but the model holds int8 (dynamically quantized) Linear layers; "
                             "pass precision='int8' or the float32 model")
        if dtypes != {torch.float32}:
            raise ValueError(f"precision='fp32' needs a float32 model, got parameters of dtype {names}; "
                             "call model.float() or pass precision='bf16' for a bfloat16 model")
    elif precision == "bf16":
        if quantized:
            raise ValueError("precision='bf16' but the model holds int8 (dynamically quantized) Linear layers; "
                             "pass precision='int8'")
        if not dtypes or not dtypes <= {torch.float32, torch.bfloat16}:
            raise ValueError(f"precision='bf16' needs a float32 or bfloat16 model, got parameters of dtype {names}")
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("precision='bf16' cannot run: this GPU has no bfloat16 support")
    else:
        why = int8_unavailable_reason(device)
        if why:
            raise RuntimeError(f"precision='int8' cannot run: {why}")
        if not quantized and dtypes != {torch.float32}:
            raise ValueError(f"precision='int8' quantizes a float32 model, got parameters of dtype {names}; "
                             "call model.float() first")


def _param_key(model) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


def _quantized_copy(model):
    """An int8 copy of ``model`` (every nn.Linear dynamically quantized, per output channel),
    cached on the model and rebuilt when a parameter changes."""
    key = _param_key(model)
    with _LOCK:
        cached = model.__dict__.get("_tiger_fast_int8_copy")
        if cached is not None and cached[0] == key:
            return cached[1]
        src = copy.deepcopy(model).eval()
        src.__dict__.pop("_tiger_fast_int8_copy", None)
        src.__dict__.pop("_decode_weights_cache", None)
        with warnings.catch_warnings():  # torch deprecates the eager quantization API (still supported)
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(
                src, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True)
        model.__dict__["_tiger_fast_int8_copy"] = (key, q)
        return q


def prepare_model(model, precision: str, device: torch.device):
    """-> (model to run, context manager to run its forward in) for a checked ``precision``."""
    if precision == "fp32":
        return model, contextlib.nullcontext()
    if precision == "bf16":
        return model, torch.autocast(device.type, dtype=torch.bfloat16)
    if _int8_linears(model):
        return model, contextlib.nullcontext()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _quantized_copy(model), contextlib.nullcontext()
