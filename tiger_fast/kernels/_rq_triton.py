"""Triton kernel of the residual quantizer (imported lazily by ``kernels/quantize.py``).

This module imports triton at the top, so it is only imported once triton is known to be
installed; ``TRITON_INTERPRET=1`` must already be set at that point when the kernel is to run on
CPU tensors (tests/conftest.py sets it when there is no GPU).

Layout of the kernel (one program = BLOCK_M consecutive rows, all L levels in one pass)
---------------------------------------------------------------------------------------
* The program loads its BLOCK_M x D residual tile once (D padded to BLOCK_D >= 16 with masked
  zeros, which change no dot product) and keeps it in registers for all L levels: the latents
  are read once and the final residual is written once, so global traffic is ~(2 D + L) words
  per row whatever L is.  Codes are written per level (int64, the public dtype).
* Per level the codebook (K_l x D, concatenated for all levels, located by offset) is streamed
  in BLOCK_K-codeword tiles, each loaded as a BLOCK_D x BLOCK_K operand (transposed view, so the
  tile is a plain ``tl.dot`` right operand).  K x D x 4 bytes = 32 KiB for K=256, D=32: every
  program re-reads the same tiles, which stay in L1/L2; no codebook traffic reaches HBM.
* Screen value per (row, codeword): s = ||c||^2 - 2 r.c, where r.c is one ``tl.dot`` of the
  tile (IEEE fp32 FMA by default, or a TF32 / 3xTF32 / bf16 tensor-core dot) and ||c||^2 comes
  precomputed (float64 on the host, rounded to float32; +inf for codewords that duplicate an
  earlier one, which can never win).  ||r||^2 is common to the row and dropped.
* Best and second-best are tracked as three BLOCK_M vectors (best value, best index, second
  value).  Inside a tile: best = min over the tile, its index = the smallest column index
  holding that value (so ties inside the tile resolve to the lowest index), tile-second = min
  over the other columns.  Merging a tile into the running state, tiles come in increasing
  index order, so a strictly smaller tile best replaces the running best (the old best falls
  to second) and an equal one does not (the earlier index wins; the equal value becomes the
  second, so the row cannot be certified -- exactly what an exact tie needs).  Tracking only
  values (no per-column bounds) keeps the epilogue at a handful of ops per (row, codeword)
  against D FMAs for the dot.
* Certification: the row's level decision is certified when
      fl(second - E) > fl(best + E),   E = rel * (max||c||^2 + 2 R max||c||) + a0 + a1 (max||c|| + R)
  where R >= ||r|| is a rigorous upper bound of the row norm and rel / a0 / a1 come from
  ``kernels.quantize.screen_coefficients`` (derivation there: it is helper A's fp32 screen model
  -- ``tiger_fast.reference.quantize.fp32_screen_bound`` -- with a 2x margin, per-side instead of
  A's (||r|| + ||c||)^2 majorant, plus flush-to-zero and tensor-core terms).  Rows with
  max||c||^2 + 2 R max||c|| >= 2^125 (overflow danger) are never certified.
* Residual update r -= C[code] is one fp32 subtraction per element (gathered codeword row, same
  op as the reference).  Triton 3.7.1 emits a plain IEEE ``sub.f32`` for it on sm_90 (checked by
  tests/test_quantize_triton.py with an ahead-of-time compile), but GPU code may flush
  subnormals to zero in other versions/ops (``tl.sqrt`` is ``sqrt.approx.ftz.f32``), so an update
  that reads a subnormal operand, or returns 0 for two different operands (a flushed subnormal
  result), is not trusted: the row is flagged at this level.  Cost: a few integer ops per
  element per level.
* flag[row] = first level whose decision (or update) was not certified, else -1.  From that
  level on the program keeps computing (branch-free) but the host overwrites the row: the
  residual stored for a flagged row is r at its flagged level (a masked store at that level),
  which the host finishes with the reference routine.
"""
import triton
import triton.language as tl

# PREC codes (constexpr): the screen's dot product precision.
PREC_FP32 = 0
PREC_TF32 = 1
PREC_TF32X3 = 2
PREC_BF16 = 3


@triton.jit
def _trunc_mantissa(x, KEEP_MASK: tl.constexpr):
    # Truncate float32 mantissa bits (emulates TF32 / bf16 operand conversion under the
    # interpreter, with truncation = the worst case the screen bound assumes).
    b = x.to(tl.int32, bitcast=True) & KEEP_MASK
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _screen_dot(r, c, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """(BLOCK_M, BLOCK_D) x (BLOCK_D, BLOCK_K) -> float32 (BLOCK_M, BLOCK_K)."""
    if PREC == 0:
        d = tl.dot(r, c, input_precision="ieee")
    elif PREC == 1:
        if EMULATE:
            d = tl.dot(_trunc_mantissa(r, -8192), _trunc_mantissa(c, -8192), input_precision="ieee")
        else:
            d = tl.dot(r, c, input_precision="tf32")
    elif PREC == 2:
        if EMULATE:
            rh = _trunc_mantissa(r, -8192)
            ch = _trunc_mantissa(c, -8192)
            rl = _trunc_mantissa(r - rh, -8192)
            cl = _trunc_mantissa(c - ch, -8192)
            d = tl.dot(rh, ch, input_precision="ieee")
            d += tl.dot(rh, cl, input_precision="ieee")
            d += tl.dot(rl, ch, input_precision="ieee")
        else:
            d = tl.dot(r, c, input_precision="tf32x3")
    else:
        if EMULATE:
            d = tl.dot(_trunc_mantissa(r, -65536), _trunc_mantissa(c, -65536), input_precision="ieee")
        else:
            d = tl.dot(r.to(tl.bfloat16), c.to(tl.bfloat16), out_dtype=tl.float32)
    return d


@triton.jit
def _is_subnormal(x):
    b = x.to(tl.int32, bitcast=True)
    return ((b & 0x7F800000) == 0) & ((b & 0x007FFFFF) != 0)


@triton.jit
def rq_kernel(
    x_ptr, cb_ptr, cn2_ptr, lvl_k_ptr, lvl_off_ptr, lvl_n2max_ptr, lvl_nmax_ptr,
    codes_ptr, res_ptr, flag_ptr,
    N, D, L, CODE_STRIDE, CODE_COL0,
    rel, a0, a1, q_max, sq_fac, sq_tiny, sqrt_fac,
    KMAX,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    xm = rmask[:, None] & dmask[None, :]
    r = tl.load(x_ptr + rows[:, None] * D + offs_d[None, :], mask=xm, other=0.0)
    flag = tl.full((BLOCK_M,), -1, tl.int32)
    offs_k0 = tl.arange(0, BLOCK_K)
    for lvl in range(L):
        K = tl.load(lvl_k_ptr + lvl)
        koff = tl.load(lvl_off_ptr + lvl).to(tl.int64)
        n2max = tl.load(lvl_n2max_ptr + lvl)
        nmax = tl.load(lvl_nmax_ptr + lvl)
        # R >= ||r||: fp32 sum of squares inflated for its rounding, plus D * 2^-125 for squares
        # that underflowed (or were flushed), then the sqrt's own error.
        sumsq = tl.sum(r * r, axis=1)
        R = tl.sqrt(sumsq * sq_fac + sq_tiny) * sqrt_fac
        best = tl.full((BLOCK_M,), float("inf"), tl.float32)
        second = tl.full((BLOCK_M,), float("inf"), tl.float32)
        best_i = tl.zeros((BLOCK_M,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            kmask = offs_k < K
            c = tl.load(cb_ptr + (koff + offs_k)[None, :] * D + offs_d[:, None],
                        mask=kmask[None, :] & dmask[:, None], other=0.0)
            cn2 = tl.load(cn2_ptr + koff + offs_k, mask=kmask, other=float("inf"))
            dot = _screen_dot(r, c, PREC, EMULATE)
            s = cn2[None, :] - 2.0 * dot
            tb = tl.min(s, axis=1)
            ti = tl.min(tl.where(s == tb[:, None], offs_k[None, :], 2147483647), axis=1)
            ts = tl.min(tl.where(offs_k[None, :] == ti[:, None], float("inf"), s), axis=1)
            better = tb < best
            second = tl.where(better, tl.minimum(best, ts), tl.minimum(second, tb))
            best_i = tl.where(better, ti, best_i)
            best = tl.where(better, tb, best)
        q = n2max + 2.0 * R * nmax
        E = rel * q + a0 + a1 * (nmax + R)
        ok = (q < q_max) & ((second - E) > (best + E))
        # An out-of-range index can only come from non-finite screen values (rows that are
        # flagged anyway); clamp so the gather below stays inside the codebook.
        code = tl.minimum(tl.maximum(best_i, 0), K - 1)
        cw = tl.load(cb_ptr + (koff + code.to(tl.int64))[:, None] * D + offs_d[None, :],
                     mask=xm, other=0.0)
        r_new = r - cw
        bad = _is_subnormal(r) | _is_subnormal(cw) | ((r_new == 0.0) & (r != cw))
        bad_row = tl.max(tl.where(xm & bad, 1, 0), axis=1) > 0
        ok = ok & (bad_row == 0)
        newly = (flag < 0) & (ok == 0)
        tl.store(res_ptr + rows[:, None] * D + offs_d[None, :], r, mask=xm & newly[:, None])
        flag = tl.where(newly, lvl, flag)
        tl.store(codes_ptr + rows * CODE_STRIDE + CODE_COL0 + lvl, code.to(tl.int64), mask=rmask)
        r = r_new
    tl.store(res_ptr + rows[:, None] * D + offs_d[None, :], r, mask=xm & (flag < 0)[:, None])
    tl.store(flag_ptr + rows, flag, mask=rmask)


def _gpu_configs():
    # Few configurations: every one costs a compile (seconds) per precision on first use.
    # Chosen from ptxas -v on sm_90a (triton 3.7.1, D=32): all spill-free for the fp32 screen
    # (152-254 registers/thread); 128-row and 64x64 tiles spilled and were dropped.
    cfgs = []
    for bm, bk, w, st in ((32, 128, 4, 2), (64, 128, 8, 2), (32, 64, 4, 2), (64, 256, 8, 2),
                          (32, 256, 4, 2)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st))
    return cfgs


# GPU entry point: autotuned over block shapes.  The kernel is pure (outputs are overwritten
# from inputs only), so the autotuner's repeated launches are harmless.
# kernels/quantize.py only uses it for N >= 2^16 rows (small calls, such as the re-screens of
# flagged rows, take a fixed tile), so the choice is made on a large input.
rq_kernel_tuned = triton.autotune(configs=_gpu_configs(), key=["D", "KMAX", "L", "PREC"])(rq_kernel)
