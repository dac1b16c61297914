"""Exact residual quantization with a Triton kernel (docs/contracts.md, "Quantization").

Public API (``tiger_fast.kernels.quantize``):

    quantize_triton(latents, codebooks, *, precision="fp32", stats=None, ...)
        -> (codes int64 (N, L), residual float32 (N, D))
    prepare_codebooks(codebooks, device) -> PreparedCodebooks   (reuse across calls/chunks)
    screen_coefficients(dim, precision) -> ScreenCoefficients   (the certification bound)
    available(device=None) -> bool;  unavailable_reason(device=None) -> str | None
    PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16")

Results are identical (``torch.equal``, codes and residuals) to
``tiger_fast.reference.quantize.residual_quantize`` on every input; the kernel only decides what it
can certify and hands the rest to the reference routine:

1. One Triton pass does all L levels for a block of rows (kernel layout: ``tiger_fast/kernels/_rq_triton.py``):
   a float32 screen (or a tensor-core screen, ``precision``), a rigorous certification test per
   row and level, the fp32 residual update, and a per-row "flagged level" (the first level it
   could not certify, or -1).
2. precision != "fp32" only: rows flagged by the tensor-core screen are screened again by the
   fp32 kernel from their flagged level on (the fp32 bound is ~7x tighter than tf32x3's and
   ~900x tighter than tf32's at D=32).
3. Rows still flagged have their flagged level decided by a float64 screen on the same device
   (``torch.mm``; certified with the reference's ``fp64_screen_bound``) and, for the rows float64
   cannot certify either (exact or near-exact ties), by the reference's ``exact_argmin``
   (certified float64 + exact integers, CPU).  The fp32 kernel then resumes at the next level.
   The fp32 screen's bound is a worst case (~2 D u relative to ||c||^2 + 2||r|| ||c||), so on
   clustered synthetic data (D=32, K=256, L=3) it left 0.07-0.9 % of the rows to this float64
   step; float64 leaves only exact or near-exact ties to the exact routine.  The share grows
   with ||c|| / (gap between distances): latents far from the origin relative to their spread
   flag more rows (centre them).

Works on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before triton is imported).  Under the interpreter the reduced-precision screens are
*emulated* (operand mantissas truncated in fp32 registers, then an IEEE dot), which exercises
their wider bounds; only on a GPU do they run on tensor cores.

Triton is imported lazily: importing this module never needs triton.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..checks import check_int

__all__ = [
    "PRECISIONS",
    "PreparedCodebooks",
    "ScreenCoefficients",
    "available",
    "prepare_codebooks",
    "quantize_triton",
    "screen_coefficients",
    "screen_pass",
    "screen_threshold",
    "unavailable_reason",
]

PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16")
_PREC_CODE = {"fp32": 0, "tf32": 1, "tf32x3": 2, "bf16": 3}

_U32 = 2.0**-24
# Smallest positive normal float32.  GPU code may flush subnormal operands and results to zero,
# so the absolute error terms below use 2^-126 per affected operation (not the 2^-150 of IEEE
# gradual underflow assumed by the reference's CPU bound).
_MIN_NORMAL = 2.0**-126
# Screens whose values could approach float32 overflow are not certified: with
# max||c||^2 + 2 R max||c|| < 2^125 every screened value, bound and comparison stays finite.
_Q_MAX = 2.0**125
# Calls with fewer rows use a fixed tile instead of the autotuner (whose choice is cached per
# (D, K, L, precision) and should be made on a large input).
_AUTOTUNE_MIN_ROWS = 1 << 16


# ----------------------------------------------------------------------------- availability

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def unavailable_reason(device=None) -> Optional[str]:
    """Why the Triton backend cannot run for tensors on ``device`` (None: it can).

    device: a torch.device / string, or None for "the default place tensors would be"
    (CUDA if available).  CPU tensors need TRITON_INTERPRET=1 set before triton is imported.
    """
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install 'tiger_fast[triton]'"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA device requested but torch.cuda.is_available() is False"
        return None
    if dev.type == "cpu":
        if _interpreting():
            return None
        return ("tensors are on the CPU and TRITON_INTERPRET=1 is not set (set it before "
                "importing triton to run the kernel through the interpreter)")
    return f"device type {dev.type!r} is not supported by the Triton backend (use cuda)"


def available(device=None) -> bool:
    """True when ``quantize_triton`` can run for tensors on ``device`` (see unavailable_reason)."""
    return unavailable_reason(device) is None


# ----------------------------------------------------------------------------- the bound

@dataclass(frozen=True)
class ScreenCoefficients:
    """Float32 coefficients of the per-row, per-level certification test (kernel arguments).

    For a row with residual r and a level with live codewords c (duplicates removed), the kernel
    computes R >= ||r|| as  sqrt(fl(sum r_i^2) * sq_fac + sq_tiny) * sqrt_fac, then
        Q = max||c||^2 + 2 R max||c||,     E = rel * Q + a0 + a1 * (max||c|| + R)
    and certifies the level when Q < q_max and fl(second - E) > fl(best + E).
    All values are exactly representable float32 numbers, rounded up.
    """

    rel: float
    a0: float
    a1: float
    q_max: float
    sq_fac: float
    sq_tiny: float
    sqrt_fac: float


def _gamma(n: int, u: float) -> float:
    if n * u >= 0.5:
        raise ValueError(f"dim={n} is too large for a certified float32 screen")
    return n * u / (1.0 - n * u)


def _f32_up(x: float) -> float:
    """Smallest float32 >= x (x >= 0)."""
    import numpy as np

    y = np.float32(x)
    if float(y) < x:
        y = np.nextafter(y, np.float32(np.inf))
    return float(y)


def screen_coefficients(dim: int, precision: str = "fp32") -> ScreenCoefficients:
    """The certification bound of the screen (see ``ScreenCoefficients``), for D = dim.

    Model (helper A's, ``tiger_fast.reference.quantize.fp32_screen_bound``): the screen value is
    s(c) = fl(n'(c) - 2 p'(c)) with n' = ||c||^2 (float64, rounded to float32) and p' = r.c a
    D-term dot.  With dot_rel the dot's relative error w.r.t. sum_i |r_i c_i| <= ||r|| ||c||:
        |s - s*| <= u ||c||^2 + 2 dot_rel ||r|| ||c|| + u (||c||^2 + 2 ||r|| ||c||)(1 + dot_rel)
                 <= (dot_rel + 2u) (||c||^2 + 2 ||r|| ||c||)       (+ absolute terms below)
    i.e. A's intermediate bound gamma_{D+1} (||c||^2 + 2 sum|r_i c_i|) for fp32 (A's final form
    majorises it further by (||r|| + ||c||)^2).  We use rel = 2 (dot_rel + 4u): a 2x margin that
    also absorbs the float32 rounding of R, Q, E and of the two comparison operands
    (u (|s| + E) each, |s| <= Q (1 + rel)).  Since each side's error is bounded by E and
    fl is monotone, fl(second - E) > fl(best + E) implies second* > best* for every other
    codeword, so the screen's argmin is the exact, unique argmin.

    dot_rel per precision (operands truncated, the worst case of each conversion; tensor-core
    accumulation modelled as fp32 additions with u = 2^-22, i.e. 4 ulps each -- an assumption
    about the hardware (published measurements of NVIDIA tensor cores show exact products and
    truncating accumulation with at least fp32's 24 bits for TF32/bf16 inputs), not an IEEE
    guarantee; the default fp32 screen (IEEE FMA) needs no such assumption):
        fp32    gamma_D(2^-24)                              (IEEE FMA dot, any order)
        tf32    2*2^-10 + 2^-20 + gamma_D(2^-22)(1 + ...)   (10 stored mantissa bits)
        tf32x3  2^-17 + gamma_D(2^-22)                       (hi/lo split, lo*lo dropped)
        bf16    2*2^-7 + 2^-14 + gamma_D(2^-22)              (7 stored mantissa bits)
    Absolute terms (subnormals flushed to zero anywhere, per side): operand flushes cost at most
    2^-126 (|r_i| + |c_i|) per product, i.e. 2^-126 sqrt(D) (||r|| + ||c||) per dot, doubled:
    a1 = 4 sqrt(D) 2^-126 (2x margin); result flushes/underflows at most 2^-126 per operation
    (D + 2 of them), doubled, plus ||c||^2's: a0 = (4 D + 12) 2^-126.
    """
    dim = check_int(dim, "dim")
    if precision not in _PREC_CODE:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    u = _U32
    if precision == "fp32":
        dot_rel = _gamma(dim, u)
    else:
        acc = _gamma(dim, 2.0**-22)
        in_err = {"tf32": 2 * 2.0**-10 + 2.0**-20, "tf32x3": 2.0**-17,
                  "bf16": 2 * 2.0**-7 + 2.0**-14}[precision]
        dot_rel = in_err + acc * (1.0 + in_err)
    rel = 2.0 * (dot_rel + 4.0 * u)
    a0 = (4.0 * dim + 12.0) * _MIN_NORMAL
    a1 = 4.0 * math.sqrt(dim) * _MIN_NORMAL
    # sum of D squares in fp32: relative error <= gamma_{D}; 2x margin.  Squares that underflow
    # (or are flushed) lose < 2^-126 each: add D 2^-125.  sqrt may be an approximate
    # instruction on GPUs (rel. error ~2^-22): 2^-16 margin.
    sq_fac = 1.0 + 2.0 * _gamma(dim + 1, u)
    return ScreenCoefficients(
        rel=_f32_up(rel * (1 + 2.0**-20)),
        a0=_f32_up(a0),
        a1=_f32_up(a1),
        q_max=_Q_MAX,
        sq_fac=_f32_up(sq_fac),
        sq_tiny=_f32_up(dim * 2.0**-125),
        sqrt_fac=_f32_up(1.0 + 2.0**-16),
    )


def screen_threshold(r_norm, c_sqnorm_max: float, dim: int, precision: str = "fp32"):
    """Per-side bound E (float64) the kernel uses for rows of norm ``r_norm`` (for docs/tests).

    r_norm: float or float64 tensor (M,) = ||r||; c_sqnorm_max: max over live codewords of
    ||c||^2.  The kernel certifies when second - best > 2E (up to its own float32 rounding,
    which the margin in ``rel`` absorbs).  Compare with A's ``fp32_screen_bound`` = the
    two-sided threshold T: 2E >= T's intermediate form for fp32 (tests check it).
    """
    co = screen_coefficients(dim, precision)
    nmax = math.sqrt(c_sqnorm_max)
    q = c_sqnorm_max + 2.0 * r_norm * nmax
    return co.rel * q + co.a0 + co.a1 * (nmax + r_norm)


# ----------------------------------------------------------------------------- codebooks

@dataclass
class PreparedCodebooks:
    """Codebooks laid out for the kernel (all on one device).

    codebooks: list of L float32 (K_l, D) contiguous (the originals, for the exact finish);
    cat: float32 (sum K_l, D) all levels concatenated; cn2: float32 (sum K_l,) ||c||^2 (float64
    rounded to nearest float32), +inf for a codeword that exactly repeats a lower-index one in
    its level (it can never be the argmin, ties -> lowest index); k: int32 (L,) K_l;
    off: int32 (L,) row offset of level l in ``cat``; n2max / nmax: float32 (L,) max ||c||^2 and
    max ||c|| over the level's live codewords, rounded up (+inf when they overflow float32: such
    a level certifies nothing); live: list of L int64 tensors, the indices of each level's
    codewords that do not repeat a lower-index one.
    """

    codebooks: list
    cat: torch.Tensor
    cn2: torch.Tensor
    k: torch.Tensor
    off: torch.Tensor
    n2max: torch.Tensor
    nmax: torch.Tensor
    live: list

    @property
    def dim(self) -> int:
        return int(self.cat.shape[1])

    @property
    def levels(self) -> int:
        return len(self.codebooks)

    @property
    def device(self) -> torch.device:
        return self.cat.device

    def tail(self, start: int) -> "PreparedCodebooks":
        """The same tables for levels start..L-1 (``cat``/``cn2`` shared, offsets absolute)."""
        return PreparedCodebooks(self.codebooks[start:], self.cat, self.cn2, self.k[start:],
                                 self.off[start:], self.n2max[start:], self.nmax[start:],
                                 self.live[start:])


def _up32(x64: torch.Tensor) -> torch.Tensor:
    """float64 tensor (>= 0) -> smallest float32 >= each value."""
    y = x64.to(torch.float32)
    low = y.to(torch.float64) < x64
    return torch.where(low, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def _as_list(codebooks, name="codebooks") -> list:
    if isinstance(codebooks, torch.Tensor):
        if codebooks.dim() != 3:
            raise ValueError(f"{name}: expected a (L, K, D) tensor or a list of (K_l, D) tensors, "
                             f"got shape {tuple(codebooks.shape)}")
        return [codebooks[i] for i in range(codebooks.shape[0])]
    if isinstance(codebooks, (list, tuple)):
        return list(codebooks)
    raise TypeError(f"{name}: expected a (L, K, D) tensor or a list of (K_l, D) tensors, "
                    f"got {type(codebooks).__name__}")


def prepare_codebooks(codebooks, device=None) -> PreparedCodebooks:
    """Validate and lay out codebooks for the kernel (do it once when quantizing in chunks).

    codebooks: float (L, K, D) tensor or list of L float (K_l, D) tensors (converted to float32);
    device: where the kernel will run (default: the first codebook's device).
    Raises ValueError for an empty level, mismatched D or NaN/Inf values.
    """
    from tiger_fast.reference.quantize import first_occurrence

    cbs = _as_list(codebooks)
    if device is None:
        device = cbs[0].device if cbs else torch.device("cpu")
    out, cn2s, ks, n2max, nmax, lives = [], [], [], [], [], []
    dim = None
    for i, c in enumerate(cbs):
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or not c.is_floating_point():
            raise TypeError(f"codebooks[{i}]: expected a float tensor of shape (K, D)")
        if c.shape[0] == 0:
            raise ValueError(f"codebooks[{i}]: empty level (K=0); every level needs >= 1 codeword")
        if dim is None:
            dim = c.shape[1]
        elif c.shape[1] != dim:
            raise ValueError(f"codebooks[{i}]: D={c.shape[1]} but codebooks[0] has D={dim}")
        c = c.detach().to(device=device, dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"codebooks[{i}] contains NaN or Inf")
        c64 = c.to(torch.float64)
        sq = (c64 * c64).sum(1)  # exact squares, float64 sum: error ~1e-15 relative
        live_idx = first_occurrence(c).to(device)
        live = torch.zeros(c.shape[0], dtype=torch.bool, device=device)
        live[live_idx] = True
        lives.append(live_idx)
        cn2 = torch.where(live, sq.to(torch.float32), torch.full_like(sq, math.inf, dtype=torch.float32))
        m2 = sq[live].max() * (1.0 + 2.0**-40)
        out.append(c)
        cn2s.append(cn2)
        ks.append(c.shape[0])
        n2max.append(m2)
        nmax.append(torch.sqrt(m2) * (1.0 + 2.0**-40))
    if not out:
        return PreparedCodebooks([], torch.empty((0, 0), device=device), torch.empty(0, device=device),
                                 torch.empty(0, dtype=torch.int32, device=device),
                                 torch.empty(0, dtype=torch.int32, device=device),
                                 torch.empty(0, device=device), torch.empty(0, device=device), [])
    offs = [0]
    for k in ks[:-1]:
        offs.append(offs[-1] + k)
    return PreparedCodebooks(
        codebooks=out,
        cat=torch.cat(out, 0).contiguous(),
        cn2=torch.cat(cn2s, 0).contiguous(),
        k=torch.tensor(ks, dtype=torch.int32, device=device),
        off=torch.tensor(offs, dtype=torch.int32, device=device),
        n2max=_up32(torch.stack(n2max)),
        nmax=_up32(torch.stack(nmax)),
        live=lives,
    )


# ----------------------------------------------------------------------------- launch

def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def screen_pass(x: torch.Tensor, pc: PreparedCodebooks, precision: str, block_m=None, block_k=None,
                num_warps=None):
    """One kernel pass over rows of x (float32 (N, D), contiguous) for all levels of pc: the
    screen alone, without finishing flagged rows (quantize_triton does that; benchmarks time it).

    Returns codes int64 (N, L), residual float32 (N, D) (r_L for certified rows, r_f for a row
    flagged at level f), flag int32 (N,).
    """
    from . import _rq_triton as kt
    import triton

    n, dim = x.shape
    nl = pc.levels
    codes = torch.empty((n, nl), dtype=torch.int64, device=x.device)
    res = torch.empty((n, dim), dtype=torch.float32, device=x.device)
    flag = torch.empty((n,), dtype=torch.int32, device=x.device)
    if n == 0:
        return codes, res, flag
    co = screen_coefficients(dim, precision)
    kmax = int(pc.k.max()) if nl else 0
    block_d = max(16, _next_pow2(dim))
    emulate = _interpreting()
    args = (x, pc.cat, pc.cn2, pc.k, pc.off, pc.n2max, pc.nmax, codes, res, flag,
            n, dim, nl, nl, 0,
            co.rel, co.a0, co.a1, co.q_max, co.sq_fac, co.sq_tiny, co.sqrt_fac, kmax)
    fixed = block_m is not None or block_k is not None or num_warps is not None
    if not emulate and not fixed and n >= _AUTOTUNE_MIN_ROWS:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
        kt.rq_kernel_tuned[grid](*args, BLOCK_D=block_d, PREC=_PREC_CODE[precision], EMULATE=False)
    else:
        # Interpreter: one configuration, a whole small codebook per tile.  GPU calls with few
        # rows (e.g. re-screens of flagged rows) or a caller-fixed tile: no autotuning; the
        # default is a spill-free tile (see _rq_triton._gpu_configs).
        if emulate:
            bm = block_m or 64
            bk = block_k or min(256, max(16, _next_pow2(kmax)))
            kw = {}
        else:
            bm = block_m or 32
            bk = block_k or 128
            kw = {"num_warps": num_warps or 4, "num_stages": 2}
        kt.rq_kernel[(triton.cdiv(n, bm),)](*args, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=block_d,
                                             PREC=_PREC_CODE[precision], EMULATE=emulate, **kw)
    return codes, res, flag


def _decide_level(r: torch.Tensor, pc: PreparedCodebooks, level: int, st: dict) -> torch.Tensor:
    """Certified argmin for rows r (float32 (M, D), on pc's device) at ``level``; int64 (M,).

    float64 screen e(c) = ||c||^2 - 2 r.c on the device (exact products of float32 values,
    any summation order), certified by the reference's ``fp64_screen_bound``; rows it cannot
    certify (exact or near-exact ties) go to the reference's ``exact_argmin``.  Duplicated
    codewords are skipped (they can never win: ties -> lowest index).
    """
    from tiger_fast.reference.quantize import exact_argmin, fp64_screen_bound

    cb = pc.codebooks[level]
    live = pc.live[level]
    m, dim = r.shape
    st["fp64_levels"] += m
    if live.numel() == 1:
        return live.expand(m).clone()
    cb64 = cb[live].to(torch.float64)
    cn2 = (cb64 * cb64).sum(1)
    cnorm_max = math.sqrt(float(cn2.max()))
    cbt = cb64.t().contiguous()
    out = torch.empty(m, dtype=torch.int64, device=r.device)
    chunk = max(1, (1 << 22) // live.numel())
    for s0 in range(0, m, chunk):
        r32 = r[s0:s0 + chunk]
        r64 = r32.to(torch.float64)
        e = torch.mm(r64, cbt).mul_(-2.0).add_(cn2)  # fl(||c||^2 - 2 p): the product by -2 is exact
        best, bi = e.min(1)
        e.scatter_(1, bi[:, None], math.inf)
        second = e.min(1).values
        thr = fp64_screen_bound(torch.sqrt((r64 * r64).sum(1)), cnorm_max, dim)
        res = live[bi]
        # an exact tie in e gives second == best: never "sure", whichever index min() returned
        unsure = torch.nonzero(~((second - best) > thr), as_tuple=True)[0]
        if unsure.numel():
            st["exact_levels"] += int(unsure.numel())
            res[unsure] = exact_argmin(r32[unsure].contiguous(), cb).to(r.device)
        out[s0:s0 + chunk] = res
    return out


def _validate_latents(latents) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents: expected a torch tensor (N, D), got {type(latents).__name__}")
    if latents.dim() != 2:
        raise ValueError(f"latents: expected shape (N, D), got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise TypeError(f"latents: expected a float tensor, got {latents.dtype}")
    x = latents.detach().to(torch.float32).contiguous()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("latents contain NaN or Inf; the quantizer has no answer for them")
    return x


def quantize_triton(latents: torch.Tensor, codebooks, *, precision: str = "fp32",
                    stats: Optional[dict] = None, block_m: Optional[int] = None,
                    block_k: Optional[int] = None, num_warps: Optional[int] = None):
    """Exact residual quantization (docs/contracts.md) with the Triton kernel.

    latents: float (N, D) on a CUDA device, or on the CPU under TRITON_INTERPRET=1 (float16,
    bfloat16 and float64 are converted to float32 first).  codebooks: float (L, K, D) tensor, a
    list of L float (K_l, D) tensors, or a ``PreparedCodebooks`` (moved to latents' device).
    precision: the screen's dot product -- "fp32" (IEEE FMA, default), "tf32", "tf32x3" or
    "bf16" (tensor cores on a GPU, emulated under the interpreter); the result does not depend
    on it, only the share of rows that need re-checking does.
    stats: optional dict, filled with "rows", "precision", "screen_flagged" (rows the first pass
    could not certify at some level), "fp32_flagged" (rows the fp32 screen could not certify:
    for precision="fp32" the same rows; else those left after the fp32 re-screen),
    "fp64_levels" ((row, level) decisions made by the float64 screen) and "exact_levels" (of
    those, decisions float64 could not certify either, made by the reference's
    ``exact_argmin``).
    block_m / block_k / num_warps: fix the kernel's tile (GPU default: autotuned).

    Returns (codes int64 (N, L), residual float32 (N, D)) on latents' device, identical to
    ``tiger_fast.reference.quantize.residual_quantize``.  Raises ValueError/TypeError on bad
    input (NaN/Inf, shape or dtype), RuntimeError when the backend cannot run here, and the
    reference's ValueError if a residual overflows float32.
    """
    if precision not in _PREC_CODE:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    x = _validate_latents(latents)
    why = unavailable_reason(x.device)
    if why is not None:
        raise RuntimeError(f"quantize_triton cannot run: {why}")
    if isinstance(codebooks, PreparedCodebooks):
        pc = codebooks
        if pc.device != x.device:
            pc = prepare_codebooks(pc.codebooks, x.device)
    else:
        pc = prepare_codebooks(codebooks, x.device)
    n, dim = x.shape
    nl = pc.levels
    if nl and pc.dim != dim:
        raise ValueError(f"latents have D={dim} but the codebooks have D={pc.dim}")
    st = {"rows": n, "screen_flagged": 0, "fp32_flagged": 0, "fp64_levels": 0, "exact_levels": 0,
          "precision": precision}
    if n == 0 or nl == 0 or dim == 0:
        # D = 0: every distance is 0, so every level ties and picks index 0.
        if stats is not None:
            stats.update(st)
        return torch.zeros((n, nl), dtype=torch.int64, device=x.device), x.clone()

    codes, res, flag = screen_pass(x, pc, precision, block_m, block_k, num_warps)
    flagged = torch.nonzero(flag >= 0, as_tuple=True)[0]
    st["screen_flagged"] = int(flagged.numel())
    if flagged.numel() and precision != "fp32":
        # Second chance on the GPU: the fp32 kernel from each row's flagged level on.
        fl = flag[flagged]
        for f in torch.unique(fl).tolist():
            rows = flagged[fl == f]
            c2, r2, g2 = screen_pass(res[rows].contiguous(), pc.tail(f), "fp32", block_m, block_k, num_warps)
            codes[rows, f:] = c2
            res[rows] = r2
            flag[rows] = torch.where(g2 >= 0, g2 + f, torch.full_like(g2, -1))
        flagged = torch.nonzero(flag >= 0, as_tuple=True)[0]
    st["fp32_flagged"] = int(flagged.numel())
    # Rows the fp32 screen could not certify: decide their flagged level with the float64 screen
    # (on the tensors' device) and, for what float64 cannot decide either, the reference's exact
    # routine; then run the fp32 kernel again on the following levels.  Each round moves every
    # pending row at least one level on, so there are at most L rounds.
    while flagged.numel():
        fl = flag[flagged]
        for f in torch.unique(fl).tolist():
            rows = flagged[fl == f]
            k = _decide_level(res[rows], pc, f, st)
            codes[rows, f] = k
            r = res[rows] - pc.codebooks[f][k]  # one IEEE float32 subtraction per element
            if not bool(torch.isfinite(r).all()):
                raise ValueError(
                    f"latents/codebooks: the residual overflowed float32 at level {f} "
                    "(|r - c| > 3.4e38); rescale the inputs"
                )
            if f + 1 < nl:
                c2, r2, g2 = screen_pass(r.contiguous(), pc.tail(f + 1), "fp32", block_m, block_k, num_warps)
                codes[rows, f + 1:] = c2
                res[rows] = r2
                flag[rows] = torch.where(g2 >= 0, g2 + (f + 1), torch.full_like(g2, -1))
            else:
                res[rows] = r
                flag[rows] = -1
        flagged = torch.nonzero(flag >= 0, as_tuple=True)[0]
    if stats is not None:
        stats.update(st)
    return codes, res
