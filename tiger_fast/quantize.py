"""Residual quantization, exact (docs/contracts.md), dispatching to the reference, C++ or Triton backend.

    codes = quantize(latents, codebooks)                       # int64 (N, L)
    codes, residual = quantize(latents, codebooks, return_residuals=True)

Every backend returns identical codes (``torch.equal``) and bit-identical residuals: the argmin
is the exact one over the float32 values (ties -> lowest index), certified by a float32 screen
plus `tiger_fast.reference.quantize.exact_argmin` for the rows the screen cannot decide.

Backends:
  "reference"  plain PyTorch, certified float64 + exact integers (tiger_fast/reference/quantize.py)
  "cpu"        C++ extension ``tiger_fast._quantize_ext`` (fused float32 screen, OpenMP)
  "triton"     ``tiger_fast.kernels.quantize.quantize_triton`` (GPU; CPU tensors only under
               TRITON_INTERPRET=1)
  "auto"       triton for CUDA latents when triton and a GPU are usable, else cpu when the
               extension is built, else reference.  `explain_backend` says what it picks and why.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch

from .backends import choose_backend, load_extension
from .reference.quantize import first_occurrence, quantize_levels

__all__ = ["quantize", "available_backends", "explain_backend", "BACKENDS"]

BACKENDS = ("auto", "reference", "cpu", "triton")
_log = logging.getLogger(__name__)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------- backends
def _load_ext():
    """The C++ module, or (None, reason)."""
    return load_extension("quantize")


def _load_triton():
    """``quantize_triton`` or (None, reason)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); pip install 'tiger_fast[triton]'"
    try:
        from tiger_fast.kernels import quantize as kq
        return kq.quantize_triton, ""
    except (ImportError, AttributeError) as exc:
        return None, f"the Triton quantize kernel could not be imported (tiger_fast.kernels.quantize: {exc})"


def _triton_usable(on_cuda: bool) -> tuple:
    fn, why = _load_triton()
    if fn is None:
        return False, why
    if on_cuda:
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        return True, "CPU tensors through the Triton interpreter (TRITON_INTERPRET=1)"
    return False, "the latents are not on a CUDA device (and TRITON_INTERPRET=1 is not set)"


def available_backends() -> list:
    """Backends that can run here for CPU tensors, plus "triton" if a GPU or the interpreter is usable."""
    out = ["reference"]
    if _load_ext()[0] is not None:
        out.append("cpu")
    if _triton_usable(torch.cuda.is_available())[0]:
        out.append("triton")
    return out


def explain_backend(latents=None, backend: str = "auto") -> tuple:
    """Return (backend name that `quantize` would run, reason) for these latents.

    latents: optional tensor/array (only its device matters).  Raises ValueError for an unknown
    backend, RuntimeError if an explicitly requested backend cannot run (with the reason); the rule
    is :func:`tiger_fast.backends.choose_backend`'s.
    """
    on_cuda = isinstance(latents, torch.Tensor) and latents.is_cuda

    def why_not(name):
        if name == "reference":
            return ""
        if name == "cpu":
            return _load_ext()[1]
        if backend == "auto" and not on_cuda:  # auto never sends CPU latents to the interpreter
            return "latents are not on a CUDA device"
        ok, why = _triton_usable(on_cuda)
        return "" if ok else why

    name, why = choose_backend(backend, BACKENDS, why_not, ("triton", "cpu", "reference"))
    if name == "triton" and not on_cuda:
        why += " (CPU tensors through the Triton interpreter, TRITON_INTERPRET=1)"
    return name, why


# --------------------------------------------------------------------------------- validation
def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f" or x.dtype.itemsize > 8:
            raise TypeError(f"{name}: expected a float16/float32/float64 array, got dtype {x.dtype}; "
                            "convert with .astype(np.float32)")
        # native byte order and C order, so that torch can wrap it
        return torch.from_numpy(np.ascontiguousarray(x.astype(x.dtype.newbyteorder("="), copy=False)))
    if isinstance(x, torch.Tensor):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating-point tensor (float16/bfloat16/float32/float64), "
                            f"got {x.dtype}; convert with .float()")
        return x.detach()
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _all_finite(t: torch.Tensor) -> bool:
    # Fast path: NaN/Inf propagate through a sum, so a finite sum proves all entries finite (one
    # reduction, no bool temporary); a non-finite sum (possibly just overflow) takes the full check.
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not _all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: contains {bad} NaN/Inf value(s); residual quantization needs finite inputs")


def _validate(latents, codebooks):
    """Returns (latents float32 (N, D), list of float32 (K_l, D) on latents' device)."""
    x = _as_tensor(latents, "latents")
    if x.dim() != 2:
        raise ValueError(f"latents: expected shape (N, D), got {tuple(x.shape)}")
    if isinstance(codebooks, (torch.Tensor, np.ndarray)):
        cb = _as_tensor(codebooks, "codebooks")
        if cb.dim() != 3:
            raise ValueError(f"codebooks: expected a (L, K, D) tensor or a list of (K_l, D), got shape {tuple(cb.shape)}")
        cbs = [cb[i] for i in range(cb.shape[0])]
    elif isinstance(codebooks, Sequence) and not isinstance(codebooks, (str, bytes)):
        cbs = [_as_tensor(c, f"codebooks[{i}]") for i, c in enumerate(codebooks)]
    else:
        raise TypeError(f"codebooks: expected a (L, K, D) tensor or a list of (K_l, D) tensors, got {type(codebooks).__name__}")
    if len(cbs) == 0:
        raise ValueError("codebooks: empty (L=0); give at least one level")
    d = x.shape[1]
    if d == 0:
        raise ValueError("latents: D=0; latents need at least one dimension")
    out = []
    for i, c in enumerate(cbs):
        if c.dim() != 2:
            raise ValueError(f"codebooks[{i}]: expected shape (K, D), got {tuple(c.shape)}")
        if c.shape[0] == 0:
            raise ValueError(f"codebooks[{i}]: has K=0 codewords; every level needs at least one")
        if c.shape[1] != d:
            raise ValueError(f"codebooks[{i}]: has D={c.shape[1]} but latents have D={d}")
        c = c.to(device=x.device, dtype=torch.float32).contiguous()
        _check_finite(c, f"codebooks[{i}]")
        out.append(c)
    x = x.to(torch.float32).contiguous()
    _check_finite(x, "latents")
    return x, out


# ----------------------------------------------------------------------------------- cpu path
def _quantize_cpu(x: torch.Tensor, cbs: list, num_threads: int | None = None, stats: dict | None = None):
    """C++ float32 screen + reference finish of flagged rows.

    x: float32 (N, D) CPU; cbs: list of float32 (K_l, D) CPU; num_threads: OpenMP threads
    (default torch.get_num_threads()).  Returns (codes int64 (N, L),
    residual float32 (N, D)).  If `stats` is a dict it receives "refined_in_cpp" (row-levels the
    C++ float64 re-check decided) and "finished_in_python" (rows sent to the reference path).
    """
    ext, why = _load_ext()
    if ext is None:
        raise RuntimeError(why)
    n, d = x.shape
    # Drop codewords that exactly repeat a lower-index one: they can never win (ties -> lowest),
    # and keeping them would flag every row whose nearest codeword is duplicated.
    uniq = [first_occurrence(c) for c in cbs]
    cat = torch.cat([c[u] for c, u in zip(cbs, uniq)]).contiguous()
    offsets = np.zeros(len(cbs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(u) for u in uniq])
    index_map = torch.cat(uniq).numpy().astype(np.int64)
    codes, resid, flag, refined = ext.quantize_screen(
        # default: follow torch.set_num_threads, so one knob controls every CPU backend
        x.numpy(), cat.numpy(), offsets, index_map, torch.get_num_threads() if num_threads is None else int(num_threads)
    )
    codes = torch.from_numpy(codes)
    resid = torch.from_numpy(resid)
    flag = torch.from_numpy(flag)
    flagged = torch.nonzero(flag >= 0, as_tuple=True)[0]
    if stats is not None:
        stats["refined_in_cpp"] = int(refined)
        stats["finished_in_python"] = int(flagged.numel())
    if flagged.numel():
        _log.debug("quantize(cpu): %d of %d rows flagged for exact re-decision", flagged.numel(), n)
        lv = flag[flagged]
        for level in torch.unique(lv).tolist():
            rows = flagged[lv == level]
            # The C++ pass stopped these rows *before* deciding `level`: resid holds r_level.
            c2, r2 = quantize_levels(resid[rows], cbs[level:])
            codes[rows, level:] = c2
            resid[rows] = r2
    return codes, resid


# ------------------------------------------------------------------------------------- public
def quantize(latents, codebooks, *, backend: str = "auto", return_residuals: bool = False):
    """Exact residual quantization (docs/contracts.md).

    latents: float (N, D) torch tensor or numpy array; float16/bfloat16/float64 are converted to
        float32 first (integer dtypes are rejected).  N = 0 is allowed.
    codebooks: float (L, K, D) tensor/array or a list of L tensors/arrays (K_l, D), L >= 1, K_l >= 1.
    backend: "auto" | "reference" | "cpu" | "triton" (see the module docstring).
    return_residuals: also return the final residual r_L.

    Returns codes int64 (N, L) [, residual float32 (N, D)], torch tensors on latents' device
    (CPU for numpy input).  Raises TypeError/ValueError naming the bad argument (NaN/Inf,
    shape or dtype), ValueError if a residual overflows float32, RuntimeError if an explicitly
    requested backend cannot run here.
    """
    x, cbs = _validate(latents, codebooks)
    name, why = explain_backend(x, backend)
    _log.debug("quantize: backend=%s (%s)", name, why)
    device = x.device
    n, d = x.shape
    if n == 0:
        codes = torch.empty((0, len(cbs)), dtype=torch.int64, device=device)
        resid = torch.empty((0, d), dtype=torch.float32, device=device)
    elif name == "reference":
        codes, resid = quantize_levels(x.cpu(), [c.cpu() for c in cbs])
    elif name == "cpu":
        codes, resid = _quantize_cpu(x.cpu(), [c.cpu() for c in cbs])
    else:
        fn, _ = _load_triton()
        codes, resid = fn(x, cbs)
    if n and not _all_finite(resid):
        raise ValueError(
            "latents/codebooks: the residual overflowed float32 (|r - c| > 3.4e38); rescale the inputs"
        )
    codes = codes.to(device=device, dtype=torch.int64)
    resid = resid.to(device)
    return (codes, resid) if return_residuals else codes
