"""Reference residual quantization: the specification every fast backend must match exactly.

Contract (docs/contracts.md, "Quantization"), for float32 latents x (N, D) and float32 codebooks
C_l (K_l, D), l = 0..L-1:

    r_0 = x
    code_l = argmin_k ||r_l - C_l[k]||^2      exact, as if computed in exact arithmetic over the
                                             float32 values; ties -> lowest index k
    r_{l+1} = r_l - C_l[code_l]              one IEEE float32 subtraction per element

The argmin is *certified*: floating point alone cannot decide near-ties, so `exact_argmin`
evaluates distances in float64 with a rigorous error bound and decides the rows it cannot
certify with exact integer arithmetic (every float32 is a dyadic rational m * 2^e with
e >= -149, so 2^149 * x is an integer).

Fast backends (C++ and Triton) screen in float32 and must send every row whose best and
second-best screened values are within `fp32_screen_bound(...)` of each other to `exact_argmin`.

Error analysis notation: u = unit roundoff (2^-53 for float64, 2^-24 for float32),
gamma_n = n u / (1 - n u) (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1).
A sum of n terms in *any* order (pairwise, blocked, split, with or without FMA) has absolute
error <= gamma_{n-1} * sum |terms|, because every term passes through at most n - 1 roundings
of relative size <= u.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "residual_quantize",
    "quantize_levels",
    "exact_argmin",
    "fp32_screen_bound",
    "fp64_screen_bound",
    "first_occurrence",
    "gamma",
]

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff
# Smallest positive float32 (subnormal).  A float32 product or FMA whose result lands in the
# subnormal range is rounded to a multiple of 2^-149, i.e. with an *absolute* error <= 2^-150
# on top of the relative model; additions never add such an error (a sum that lands in the
# subnormal range is exact).
TINY32 = 2.0**-149
# 2^149 * x is an integer for every float32 x: the exact path works on these integers.
_EXACT_SCALE = 2.0**149
# Elements (rows x K) per chunk of the float64 screen: 8192 x 256 float64 = 16 MiB.  Smaller
# chunks are slightly faster single-threaded (cache) but each chunk runs ~10 multi-threaded torch
# ops, and on a loaded machine every parallel region pays a synchronisation cost: measured 6x
# slower at 2^18 than at 2^21 with 2 threads under load.
_CHUNK_ELEMS = 1 << 21


def gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): bound on the relative error of n chained roundings of size u."""
    if n * u >= 1.0:
        raise ValueError(f"gamma: n={n} too large for unit roundoff {u}")
    return n * u / (1.0 - n * u)


def fp64_screen_bound(r_norm, c_norm_max: float, dim: int):
    """Certification threshold T for the float64 screen used by `exact_argmin`.

    The screen computes, for a float32 row r and float32 codeword c (both exact in float64),
        e(c) = fl(||c||^2 - 2 fl(r . c))        (||r||^2 is common to every c and dropped)
    with ||c||^2 and r . c as float64 D-term sums (torch/BLAS, any order, FMA allowed).

    Error of e(c) against the exact e*(c) = ||c||^2 - 2 r.c:
      * products r_i c_i and c_i^2 of two float32 values are exact in float64 (24 + 24 <= 53
        significand bits; |product| lies in [2^-298, 2^256] or is 0, far inside the float64
        normal range, and every partial sum is a multiple of 2^-298, so no underflow can occur
        and there is NO absolute error term in float64);
      * the two D-term sums: |err| <= gamma_{D-1} * (||c||^2 + 2 sum_i |r_i c_i|);
      * the final subtraction: <= u |computed value| <= u (1 + gamma_{D-1}) (||c||^2 + 2 sum|r_i c_i|).
      Together |e - e*| <= gamma_D (||c||^2 + 2 sum_i |r_i c_i|) <= gamma_D (||r|| + ||c||)^2
      (Cauchy-Schwarz: sum |r_i c_i| <= ||r|| ||c||).
    Two candidates j, b: if fl(e_j - e_b) > T >= err_j + err_b then e*_j > e*_b, so j is not
    the argmin (fl is monotone and T is a float64 number, so fl(x) > T implies x > T).
    T = 2 gamma_D (||r|| + max||c||)^2, times (1 + 2^-20) to absorb the float64 rounding of the
    norms and of this formula itself (a few dozen roundings of 2^-53 each).

    r_norm: float64 tensor (M,) or float, the Euclidean norms ||r||; c_norm_max: float, max ||c||.
    Returns T with r_norm's shape (float64).
    """
    g = gamma(max(dim, 1), U64)
    return 2.0 * g * (r_norm + c_norm_max) ** 2 * (1.0 + 2.0**-20)


def fp32_screen_bound(r_sqnorm, c_sqnorm_max: float, dim: int):
    """Certification threshold T a float32 screen must use (C++ and Triton backends).

    Screen model.  For a float32 row r and every codeword c of the level, the screen computes in
    float32
        s(c) = fl32(n'(c) - 2 p'(c))
    where p'(c) is r . c as any D-term float32 dot product (any summation order or blocking, FMA
    allowed, NOT TF32/bf16: on GPUs the dot must run in IEEE fp32) and n'(c) is ||c||^2 computed
    in float32 the same way (or in float64 and rounded to float32).  ||r||^2 is common to every c
    and dropped.  Equally covered: s(c) accumulated as one (D+1)-term float32 sum
    n'(c) + sum_d r_d (-2 c_d) (accumulator initialised with n'(c), -2c precomputed: an exact
    scaling), which is what the C++ backend does; its error is <= gamma_D (n + 2 sum|r_i c_i|)
    + D 2^-150 (1 + gamma_D) plus n's own error, inside the bound below.

    Error bound (u = 2^-24, gamma_n = n u / (1 - n u)).  Per float32 op the model is
    fl(a op b) = (a op b)(1 + d) + h with |d| <= u, and |h| <= 2^-150 only for a product/FMA
    whose result underflows (additions that underflow are exact).  Hence
      |p' - p| <= gamma_D sum_i |r_i c_i| + D 2^-150 (1 + gamma_D)
      |n' - n| <= gamma_D ||c||^2        + D 2^-150 (1 + gamma_D)
      |s - s*| <= |n' - n| + 2 |p' - p| + u |n' - 2p'|
              <= gamma_{D+1} (||c||^2 + 2 sum_i |r_i c_i|) + 4 D 2^-149
              <= gamma_{D+1} (||r|| + ||c||)^2 + 4 D 2^-149
    (the absolute term covers the underflowed products: 3 D 2^-150 (1 + gamma_D) < 4 D 2^-149
    with room to spare).  Overflow is not modelled: a screen value that is not finite must
    flag its row (any overflowed intermediate propagates to an inf or NaN result).

    Rule.  Let b be the screen's argmin and s2 the smallest screened value over the other
    codewords (the true second smallest, duplicates included).  If fl64(s2 - s_b) > T with
        T = 2 [gamma_{D+1} (||r|| + max_c ||c||)^2 + 4 D 2^-149] (1 + 2^-20)
    then b is the exact argmin (every other distance is strictly larger).  Otherwise the row is
    *flagged* and must be decided by `exact_argmin`.  The factor (1 + 2^-20) absorbs the
    float64 rounding of this formula and of the norms (computed in float64 from the float32
    values).  Codewords that exactly duplicate a lower-index codeword may be dropped from the
    screen beforehand (they can never win; see `first_occurrence`), which avoids flagging every
    row whose nearest codeword is duplicated.

    r_sqnorm: ||r||^2 as a float64 tensor (M,), numpy array or float; c_sqnorm_max: max_c ||c||^2
    (float); dim: D.  Returns T (float64, same shape as r_sqnorm).
    """
    g = gamma(dim + 1, U32)
    if isinstance(r_sqnorm, torch.Tensor):
        r_norm = torch.sqrt(r_sqnorm.to(torch.float64))
    elif isinstance(r_sqnorm, np.ndarray):
        r_norm = np.sqrt(r_sqnorm.astype(np.float64))
    else:
        r_norm = math.sqrt(float(r_sqnorm))
    c_norm = math.sqrt(float(c_sqnorm_max))
    return 2.0 * (g * (r_norm + c_norm) ** 2 + 4.0 * dim * TINY32) * (1.0 + 2.0**-20)


def first_occurrence(codebook: torch.Tensor) -> torch.Tensor:
    """Indices (int64, ascending) of the codewords that do not exactly repeat an earlier one.

    Exactly equal codewords have exactly equal distances to every point, so only the lowest
    index of each group can ever be the argmin (ties -> lowest index).  Rows are compared by
    value (so -0.0 == 0.0, which also have equal distances).  codebook: float32 (K, D).
    """
    k = codebook.shape[0]
    if k <= 1:
        return torch.arange(k, dtype=torch.int64)
    # +0.0 normalises -0.0 to 0.0 so that np.unique (which compares bytes for axis=0) groups them.
    arr = (codebook.detach().cpu().to(torch.float32) + 0.0).numpy()
    _, idx = np.unique(arr, axis=0, return_index=True)
    idx = np.sort(idx)
    return torch.from_numpy(idx.astype(np.int64))


def _check_pair(residuals: torch.Tensor, codebook: torch.Tensor) -> None:
    if not isinstance(residuals, torch.Tensor) or residuals.dtype != torch.float32 or residuals.dim() != 2:
        raise TypeError("exact_argmin: residuals must be a float32 torch tensor of shape (M, D)")
    if not isinstance(codebook, torch.Tensor) or codebook.dtype != torch.float32 or codebook.dim() != 2:
        raise TypeError("exact_argmin: codebook must be a float32 torch tensor of shape (K, D)")
    if residuals.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"exact_argmin: residuals have D={residuals.shape[1]} but codebook has D={codebook.shape[1]}"
        )
    if codebook.shape[0] == 0:
        raise ValueError("exact_argmin: codebook is empty (K=0); every level needs >= 1 codeword")
    if not bool(torch.isfinite(codebook).all()):
        raise ValueError("exact_argmin: codebook contains NaN or Inf")
    if residuals.numel() and not bool(torch.isfinite(residuals).all()):
        raise ValueError("exact_argmin: residuals contain NaN or Inf")


def _exact_int(values: np.ndarray) -> list:
    """float32 values -> exact Python ints 2^149 * x (float64 scaling by a power of two is exact)."""
    return [int(v * _EXACT_SCALE) for v in values.astype(np.float64).tolist()]


def _decide_exact(r: np.ndarray, cands: list, cb: np.ndarray) -> int:
    """Exact argmin over candidate codeword rows `cands` (ascending) of sum_i (r_i - c_i)^2.

    All arithmetic is on Python integers (2^149-scaled float32 values), so it is exact; ties
    keep the earliest (lowest-index) candidate.
    """
    ri = _exact_int(r)
    best, best_d = -1, None
    for k in cands:
        ci = _exact_int(cb[k])
        d = 0
        for a, b in zip(ri, ci):
            t = a - b
            d += t * t
        if best_d is None or d < best_d:
            best, best_d = k, d
    return best


def _refine(r32: torch.Tensor, cb32: torch.Tensor, rows: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """Decide uncertain rows among their candidate codewords (local indices into cb32).

    r32: float32 (m, D) the uncertain rows; cb32: float32 (Ku, D) unique codewords;
    cand_mask: bool (m, Ku) candidates that the float64 screen could not exclude.
    Returns int64 (m,) local codeword indices.

    Stage 2, float64 "difference" form: S~(c) = sum_i fl(fl(r_i - c_i)^2).  The difference of two
    float32 values is a nonzero multiple of 2^-149 or 0, so in float64 it has relative error
    <= u and never underflows; squares likewise; so |S~ - S| <= gamma_{D+2} S: a purely relative
    bound, much tighter than the screen's when r is close to both codewords.  Candidate j is
    excluded when S~_j > fl(S~_min * fl(1 + h)), h = 4 (D + 4) u >= 3 gamma_{D+2} + 2u (1 + h),
    which implies S_j > S_min-candidate.  Stage 3: exact integers for what is left.
    """
    m, d = r32.shape
    out = torch.empty(m, dtype=torch.int64)
    pr, pc = torch.nonzero(cand_mask, as_tuple=True)
    diff = r32[pr].to(torch.float64) - cb32[pc].to(torch.float64)
    s = (diff * diff).sum(1)
    smin = torch.full((m,), math.inf, dtype=torch.float64)
    smin.scatter_reduce_(0, pr, s, reduce="amin")
    h = 1.0 + 4.0 * (d + 4) * U64
    keep = s <= smin[pr] * h
    pr, pc = pr[keep], pc[keep]
    counts = torch.bincount(pr, minlength=m)
    single = counts == 1
    # rows with exactly one survivor are decided
    one = single[pr]
    out[pr[one]] = pc[one]
    multi = torch.nonzero(~single, as_tuple=True)[0]
    if multi.numel():
        r_np = r32.numpy()
        cb_np = cb32.numpy()
        pr_l, pc_l = pr.tolist(), pc.tolist()
        cand_of: dict = {}
        for a, b in zip(pr_l, pc_l):
            cand_of.setdefault(a, []).append(b)
        for i in multi.tolist():
            out[i] = _decide_exact(r_np[i], sorted(cand_of[i]), cb_np)
    return out


def exact_argmin(residuals: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Certified exact argmin_k ||residuals[m] - codebook[k]||^2, ties -> lowest k.

    residuals: float32 (M, D); codebook: float32 (K, D), K >= 1; any device (computed on the
    CPU, the result is returned on residuals' device).  Returns int64 (M,).

    Three stages, each exact in its conclusions:
      1. float64 screen e(c) = ||c||^2 - 2 r.c (BLAS) with the rigorous threshold
         `fp64_screen_bound`; a row whose second-best is more than T above its best is decided.
      2. uncertain rows: float64 difference form with a relative bound (see `_refine`).
      3. what stage 2 cannot separate (exact or near-exact ties): exact integer arithmetic.
    Exactly duplicated codewords are collapsed to their lowest index first (`first_occurrence`).
    Raises ValueError on NaN/Inf, shape mismatch or K = 0.
    """
    _check_pair(residuals, codebook)
    device = residuals.device
    r_all = residuals.detach().cpu().contiguous()
    m_total, dim = r_all.shape
    out = torch.empty(m_total, dtype=torch.int64)
    if m_total == 0:
        return out.to(device)
    cb_all = codebook.detach().cpu().contiguous()
    uniq = first_occurrence(cb_all)
    cb32 = cb_all[uniq].contiguous()
    if cb32.shape[0] == 1:
        out.fill_(int(uniq[0]))
        return out.to(device)
    cb64 = cb32.to(torch.float64)
    cnorm2 = (cb64 * cb64).sum(1)
    cnorm_max = math.sqrt(float(cnorm2.max()))
    cbT = cb64.t().contiguous()
    ku = cb32.shape[0]
    chunk = max(1, _CHUNK_ELEMS // ku)
    for start in range(0, m_total, chunk):
        r32 = r_all[start:start + chunk]
        r64 = r32.to(torch.float64)
        e = torch.mm(r64, cbT)
        e.mul_(-2.0).add_(cnorm2)  # fl(||c||^2 - 2 p): the product by -2 is exact
        best_val, best_idx = e.min(1)
        e.scatter_(1, best_idx[:, None], math.inf)
        second = e.min(1).values
        thr = fp64_screen_bound(torch.sqrt((r64 * r64).sum(1)), cnorm_max, dim)
        sure = (second - best_val) > thr
        res = best_idx.clone()
        unsure = torch.nonzero(~sure, as_tuple=True)[0]
        if unsure.numel():
            # recompute the screen for these rows to get their full candidate sets
            ru = r64[unsure]
            eu = torch.mm(ru, cbT).mul_(-2.0).add_(cnorm2)
            cand = (eu - eu.min(1, keepdim=True).values) <= thr[unsure, None]
            res[unsure] = _refine(r32[unsure], cb32, unsure, cand)
        out[start:start + chunk] = uniq[res]
    return out.to(device)


def _as_codebook_list(codebooks) -> list:
    if isinstance(codebooks, torch.Tensor):
        if codebooks.dim() != 3:
            raise ValueError("codebooks: expected a (L, K, D) tensor or a list of (K_l, D) tensors")
        return [codebooks[i] for i in range(codebooks.shape[0])]
    return list(codebooks)


def quantize_levels(residual: torch.Tensor, codebooks: Sequence[torch.Tensor]):
    """Run the contract's levels from a given residual.

    residual: float32 (N, D) (r at the first level to run); codebooks: list of float32 (K_l, D).
    Returns (codes int64 (N, len(codebooks)), final residual float32 (N, D)).  Used by the fast
    backends to finish rows they flagged, with exactly the reference semantics.
    Raises ValueError if a residual overflows float32 (the contract has no answer there).
    """
    r = residual.detach().cpu().to(torch.float32).contiguous()
    n = r.shape[0]
    codes = torch.empty((n, len(codebooks)), dtype=torch.int64)
    for level, cb in enumerate(codebooks):
        cb = cb.detach().cpu().to(torch.float32).contiguous()
        k = exact_argmin(r, cb)
        codes[:, level] = k
        r = r - cb[k]  # one IEEE float32 subtraction per element
        if n and not bool(torch.isfinite(r).all()):
            raise ValueError(
                f"latents/codebooks: the residual overflowed float32 at level {level} "
                "(|r - c| > 3.4e38); rescale the inputs"
            )
    return codes, r


def residual_quantize(latents: torch.Tensor, codebooks) -> tuple:
    """Reference residual quantization (docs/contracts.md).

    latents: float32 (N, D); codebooks: float32 (L, K, D) tensor or list of L float32 (K_l, D).
    Returns (codes int64 (N, L), residual float32 (N, D)) where residual is r_L.
    Only light validation here; `tiger_fast.quantize.quantize` is the validated public entry.
    """
    cbs = _as_codebook_list(codebooks)
    if latents.dtype != torch.float32 or any(c.dtype != torch.float32 for c in cbs):
        raise TypeError("residual_quantize: latents and codebooks must be float32")
    return quantize_levels(latents, cbs)
