"""Residual quantization: the reference against an independent exact oracle, and every available
backend against the reference (torch.equal on codes and residuals).

The oracle computes distances with fractions.Fraction over the float32 values (exact), takes the
lowest index on ties, and updates residuals with a numpy float32 subtraction; it shares no code
with tiger_fast.  It is slow, so oracle cases stay small; backend agreement also runs on larger
random/clustered data against the (certified) reference.
"""
from __future__ import annotations

import importlib
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from tiger_fast.quantize import available_backends, explain_backend, quantize
from tiger_fast.reference.quantize import (
    exact_argmin,
    first_occurrence,
    fp32_screen_bound,
    residual_quantize,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


# ------------------------------------------------------------------------------------ oracle
def oracle_argmin(r: np.ndarray, cb: np.ndarray) -> np.ndarray:
    cbf = [[Fraction(float(v)) for v in row] for row in cb]
    out = []
    for row in r:
        rf = [Fraction(float(v)) for v in row]
        best, best_d = -1, None
        for k, c in enumerate(cbf):
            d = sum((a - b) ** 2 for a, b in zip(rf, c))
            if best_d is None or d < best_d:  # strict: ties keep the lowest index
                best, best_d = k, d
        out.append(best)
    return np.array(out, dtype=np.int64)


def oracle_quantize(x: np.ndarray, cbs) -> tuple:
    r = x.astype(np.float32).copy()
    codes = np.zeros((len(r), len(cbs)), dtype=np.int64)
    for level, cb in enumerate(cbs):
        k = oracle_argmin(r, cb)
        codes[:, level] = k
        r = (r - cb[k]).astype(np.float32)  # float32 - float32 in numpy: one IEEE subtraction
    return codes, r


# ------------------------------------------------------------------------------ adversarial data
def _rng(seed):
    return np.random.default_rng(seed)


def case_random(seed=0, n=31, d=13, k=7, levels=3):
    g = _rng(seed)
    x = g.standard_normal((n, d)).astype(np.float32)
    cbs = [(g.standard_normal((k, d)) * 0.5**lv).astype(np.float32) for lv in range(levels)]
    return x, cbs


def case_duplicates(seed=1, n=37, d=32, k=64, levels=2):
    g = _rng(seed)
    x = g.standard_normal((n, d)).astype(np.float32)
    cbs = []
    for _ in range(levels):
        cb = g.standard_normal((k, d)).astype(np.float32)
        cb[10:20] = cb[3]          # a block of copies of codeword 3 after it
        cb[0] = cb[40]             # a copy *before* the original: index 0 must win
        cb[41] = -0.0 * cb[41]     # -0.0 row and a +0.0 row: equal distances
        cb[42] = 0.0
        cbs.append(cb)
    # some points exactly on duplicated codewords
    x[:5] = cbs[0][3]
    x[5:8] = cbs[0][40]
    x[8] = 0.0
    return x, cbs


def case_equidistant(seed=2, d=32, k=16):
    """Points exactly equidistant from two (or more) codewords: every row is an exact tie."""
    g = _rng(seed)
    # dyadic values with few bits so that midpoints and the sums are exact in float32
    cb = (g.integers(-64, 64, size=(k, d)) / 8.0).astype(np.float32)
    rows = []
    for i in range(0, k - 1, 2):
        rows.append((cb[i] + cb[i + 1]) / 2)        # midpoint of a pair
    rows.append(np.zeros(d, np.float32))
    x = np.stack(rows).astype(np.float32)
    # symmetric pairs c and -c around 0, permuted copies (same norm) with r = 0 and r = const
    cb2 = (g.integers(-64, 64, size=(k, d)) / 8.0).astype(np.float32)
    cb2[1] = -cb2[0]
    cb2[2] = cb2[0][::-1]
    cb2[5] = np.roll(cb2[4], 3)
    x = np.concatenate([x, np.full((2, d), 0.0, np.float32)])
    # midpoint +- one ulp: near-ties that fp32 cannot resolve but the exact path can
    m = (cb[0] + cb[1]) / 2
    j = int(np.argmax(np.abs(cb[0] - cb[1])))
    for direction in (np.inf, -np.inf):
        y = m.copy()
        y[j] = np.nextafter(y[j], np.float32(direction))
        x = np.concatenate([x, y[None]])
    return x.astype(np.float32), [cb, cb2]


def case_tiny(seed=3, n=23, d=32, k=32, scale=1e-20):
    """Squares underflow float32 (1e-40 is subnormal, 1e-44 rounds to 0 or a few ulps)."""
    g = _rng(seed)
    x = (g.standard_normal((n, d)) * scale).astype(np.float32)
    cb0 = (g.standard_normal((k, d)) * scale).astype(np.float32)
    cb1 = (g.standard_normal((k, d)) * scale * 0.1).astype(np.float32)
    return x, [cb0, cb1]


def case_subnormal(seed=4, n=19, d=13, k=20):
    g = _rng(seed)
    x = (g.standard_normal((n, d)) * 1e-39).astype(np.float32)  # subnormal float32 values
    cb = (g.standard_normal((k, d)) * 1e-39).astype(np.float32)
    cb[3, :] = 1e-45  # the smallest subnormal
    cb[4, :] = 0.0
    return x, [cb, (cb * 0.5).astype(np.float32)]


def case_huge(seed=5, n=17, d=32, k=24, scale=1e18):
    """Squares near/over the float32 range: 1e18^2 * 32 fits, 1e19^2 overflows float32."""
    g = _rng(seed)
    x = (g.standard_normal((n, d)) * scale).astype(np.float32)
    cb0 = (g.standard_normal((k, d)) * scale).astype(np.float32)
    cb1 = (g.standard_normal((k, d)) * scale * 0.3).astype(np.float32)
    return x, [cb0, cb1]


def case_mixed(seed=6, n=29, d=13, k=16):
    """Vectors mixing huge and tiny components (and a point equidistant in the huge part)."""
    g = _rng(seed)
    big = g.standard_normal((n, d)) * 1e18
    small = g.standard_normal((n, d)) * 1e-20
    mask = g.random((n, d)) < 0.5
    x = np.where(mask, big, small).astype(np.float32)
    cb = np.where(g.random((k, d)) < 0.5, g.standard_normal((k, d)) * 1e18,
                  g.standard_normal((k, d)) * 1e-20).astype(np.float32)
    cb[1] = cb[0]
    cb[1, 0] = cb[0, 0] + np.float32(1e-20)  # differs only in a tiny component from codeword 0
    x[0] = cb[0]
    x[1] = cb[1]
    cb2 = (g.standard_normal((k, d)) * 1e-20).astype(np.float32)
    return x, [cb, cb2]


def case_shapes(d, k, levels, n, seed=7):
    g = _rng(seed + 31 * d + k + levels + n)
    x = g.standard_normal((n, d)).astype(np.float32)
    cbs = [(g.standard_normal((k, d)) * 0.6**lv).astype(np.float32) for lv in range(levels)]
    return x, cbs


ORACLE_CASES = {
    "random": case_random,
    "duplicates": case_duplicates,
    "equidistant": case_equidistant,
    "tiny": case_tiny,
    "subnormal": case_subnormal,
    "huge": case_huge,
    "huge_overflow_fp32_squares": lambda: case_huge(scale=1e19, seed=8),
    "mixed": case_mixed,
    "D1_K256": lambda: case_shapes(1, 256, 2, 13),
    "D96_K1000": lambda: case_shapes(96, 1000, 1, 2),
    "D200_K37": lambda: case_shapes(200, 37, 2, 5),
    "K1": lambda: case_shapes(13, 1, 3, 5),
    "L4_prime_N": lambda: case_shapes(32, 11, 4, 23),
    "N1": lambda: case_shapes(32, 256, 3, 1),
    "N0": lambda: case_shapes(32, 256, 3, 0),
}


# ------------------------------------------------------------------------------------ oracle tests
@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_reference_matches_exact_oracle(name):
    x, cbs = ORACLE_CASES[name]()
    want_codes, want_r = oracle_quantize(x, cbs)
    codes, r = residual_quantize(torch.from_numpy(x), [torch.from_numpy(c) for c in cbs])
    assert torch.equal(codes, torch.from_numpy(want_codes))
    assert torch.equal(r, torch.from_numpy(want_r))


def test_exact_argmin_ties_lowest_index():
    cb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    r = torch.tensor([[0.0, 0.0], [0.5, 0.5], [-0.5, -0.5], [2.0, 0.0], [0.25, 0.25]])
    assert exact_argmin(r, cb).tolist() == [0, 0, 2, 0, 0]


def test_first_occurrence():
    cb = torch.tensor([[1.0, 2.0], [0.0, -0.0], [1.0, 2.0], [-0.0, 0.0], [3.0, 3.0]])
    assert first_occurrence(cb).tolist() == [0, 1, 4]


def test_fp32_screen_bound_holds_empirically():
    """The documented fp32 screen bound covers the actual fp32 screen error (vs exact), with
    tiny, huge and mixed magnitudes.  Bound per pair of codewords is T; per codeword T / 2."""
    for x, cbs in (case_random(n=40, d=32, k=64), case_tiny(), case_huge(), case_subnormal(), case_mixed()):
        r = torch.from_numpy(x)
        for cb_np in cbs:
            cb = torch.from_numpy(cb_np)
            s = (cb * cb).sum(1)[None, :] - 2.0 * (r @ cb.t())  # float32 screen
            finite = torch.isfinite(s)
            exact = np.array([[sum(Fraction(float(c)) ** 2 for c in crow)
                               - 2 * sum(Fraction(float(a)) * Fraction(float(c)) for a, c in zip(row, crow))
                               for crow in cb_np] for row in x[:8]], dtype=object)
            thr = fp32_screen_bound((r[:8].double() ** 2).sum(1), float((cb.double() ** 2).sum(1).max()), x.shape[1])
            for i in range(min(8, len(x))):
                for j in range(len(cb_np)):
                    if finite[i, j]:
                        err = abs(Fraction(float(s[i, j])) - exact[i, j])
                        assert err <= Fraction(float(thr[i])) / 2, (i, j)


# --------------------------------------------------------------------------- backend agreement
def _backend_or_skip(name):
    if name == "reference":
        return
    if name == "cpu" and "cpu" not in available_backends():
        pytest.skip("C++ extension not built (TIGER_FAST_STEMS=quantize python setup.py build_ext --inplace)")
    if name == "triton":
        try:
            explain_backend(torch.zeros(1, 1, device="cuda" if torch.cuda.is_available() else "cpu"), "triton")
        except RuntimeError as exc:
            pytest.skip(str(exc))


def _device_for(name):
    return "cuda" if (name == "triton" and torch.cuda.is_available()) else "cpu"


BACKENDS = ["reference", "cpu", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_backend_matches_reference_adversarial(backend, name):
    _backend_or_skip(backend)
    x, cbs = ORACLE_CASES[name]()
    if backend == "triton" and INTERPRET and x.shape[0] * sum(len(c) for c in cbs) > 50_000:
        x = x[:3]
    xt = torch.from_numpy(x)
    cbt = [torch.from_numpy(c) for c in cbs]
    want_c, want_r = residual_quantize(xt, cbt)
    dev = _device_for(backend)
    codes, r = quantize(xt.to(dev), [c.to(dev) for c in cbt], backend=backend, return_residuals=True)
    assert torch.equal(codes.cpu(), want_c)
    assert torch.equal(r.cpu(), want_r)


def clustered(n, d=32, k_clusters=64, seed=0, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k_clusters, d, generator=g)
    lab = torch.randint(0, k_clusters, (n,), generator=g)
    return centers[lab] + spread * torch.randn(n, d, generator=g)


def rq_codebooks(x, levels=3, k=256, seed=0):
    """Residual codebooks drawn from the data's own residuals (like a trained RQ: realistic near-ties)."""
    g = torch.Generator().manual_seed(seed + 1)
    cbs, r = [], x.clone()
    for _ in range(levels):
        cb = r[torch.randperm(len(r), generator=g)[:k]].clone()
        cb += 1e-3 * cb.abs().mean() * torch.randn(cb.shape, generator=g)
        cbs.append(cb)
        r = r - cb[exact_argmin(r, cb)]
    return cbs


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_clustered(backend):
    _backend_or_skip(backend)
    n = 300 if (backend == "triton" and INTERPRET) else 12_011
    x = clustered(n, seed=3)
    cbs = rq_codebooks(x[:2000], seed=3)
    want_c, want_r = residual_quantize(x, cbs)
    dev = _device_for(backend)
    codes, r = quantize(x.to(dev), [c.to(dev) for c in cbs], backend=backend, return_residuals=True)
    assert torch.equal(codes.cpu(), want_c)
    assert torch.equal(r.cpu(), want_r)


def near_tie_data(n_pairs=500, d=32, k=256, seed=11):
    """Points on the bisector of two codewords, then nudged by 0..3 ulps per component: many
    rows whose two best distances agree to ~1e-7 relative, i.e. inside the fp32 screen bound."""
    g = torch.Generator().manual_seed(seed)
    cb = torch.randn(k, d, generator=g)
    i = torch.randint(0, k, (n_pairs,), generator=g)
    j = (i + 1 + torch.randint(0, k - 1, (n_pairs,), generator=g)) % k
    mid = (cb[i] + cb[j]) / 2
    steps = torch.randint(-3, 4, mid.shape, generator=g)
    x = mid.clone()
    for s in range(1, 4):
        x = torch.where(steps >= s, torch.nextafter(x, torch.full_like(x, math.inf)), x)
        x = torch.where(steps <= -s, torch.nextafter(x, torch.full_like(x, -math.inf)), x)
    cbs = [cb, 0.1 * torch.randn(k, d, generator=g), 0.01 * torch.randn(k, d, generator=g)]
    # the exact midpoints too, and a level whose two best codewords tie again
    cbs[1][7] = -cbs[1][8]
    return torch.cat([x, mid]), cbs


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_near_ties(backend):
    _backend_or_skip(backend)
    n_pairs = 20 if (backend == "triton" and INTERPRET) else 500
    x, cbs = near_tie_data(n_pairs)
    want_c, want_r = residual_quantize(x, cbs)
    dev = _device_for(backend)
    codes, r = quantize(x.to(dev), [c.to(dev) for c in cbs], backend=backend, return_residuals=True)
    assert torch.equal(codes.cpu(), want_c)
    assert torch.equal(r.cpu(), want_r)


def test_cpu_exercises_both_recheck_paths():
    """Near-ties are decided by the C++ float64 re-check; exact ties and overflow-prone
    magnitudes go to the Python exact path -- and both agree with the reference."""
    _backend_or_skip("cpu")
    from tiger_fast.quantize import _quantize_cpu

    x, cbs = near_tie_data(200)
    st = {}
    codes, r = _quantize_cpu(x, cbs, stats=st)
    assert st["refined_in_cpp"] > 0
    want = residual_quantize(x, cbs)
    assert torch.equal(codes, want[0]) and torch.equal(r, want[1])
    for make in (case_equidistant, lambda: case_huge(scale=1e19, seed=8)):
        xn, cn = make()
        st = {}
        xt, ct = torch.from_numpy(xn), [torch.from_numpy(c) for c in cn]
        codes, r = _quantize_cpu(xt, ct, stats=st)
        assert st["finished_in_python"] > 0
        want = residual_quantize(xt, ct)
        assert torch.equal(codes, want[0]) and torch.equal(r, want[1])


def test_cpu_matches_reference_100k_clustered():
    _backend_or_skip("cpu")
    x = clustered(100_003, seed=5, spread=0.2)
    cbs = rq_codebooks(x[:5000], seed=5)
    want_c, want_r = residual_quantize(x, cbs)
    codes, r = quantize(x, cbs, backend="cpu", return_residuals=True)
    assert torch.equal(codes, want_c)
    assert torch.equal(r, want_r)


def test_cpu_threads_deterministic():
    _backend_or_skip("cpu")
    from tiger_fast.quantize import _quantize_cpu

    x = clustered(5003, seed=9)
    cbs = rq_codebooks(x[:1000], seed=9)
    a = _quantize_cpu(x, cbs, num_threads=1)
    b = _quantize_cpu(x, cbs, num_threads=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- public API checks
def test_public_default_and_shapes():
    x, cbs = case_random()
    codes = quantize(x, cbs)  # numpy input, auto backend
    assert codes.dtype == torch.int64 and codes.shape == (31, 3)
    codes2, r = quantize(torch.from_numpy(x), torch.from_numpy(np.stack(cbs)), return_residuals=True)
    assert torch.equal(codes, codes2)
    assert r.dtype == torch.float32 and r.shape == (31, 13)
    name, why = explain_backend(torch.from_numpy(x))
    assert name in available_backends() and why


def test_n_zero():
    codes, r = quantize(np.zeros((0, 5), np.float32), [np.ones((3, 5), np.float32)] * 2, return_residuals=True)
    assert codes.shape == (0, 2) and r.shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_conversion(dtype):
    x, cbs = case_random()
    xt = torch.from_numpy(x).to(dtype)
    cbt = [torch.from_numpy(c).to(dtype) for c in cbs]
    codes, r = quantize(xt, cbt, return_residuals=True, backend="reference")
    want_c, want_r = residual_quantize(xt.float(), [c.float() for c in cbt])
    assert torch.equal(codes, want_c) and torch.equal(r, want_r)
    # numpy float64 as well
    codes_np = quantize(x.astype(np.float64), [c.astype(np.float64) for c in cbs])
    assert torch.equal(codes_np, residual_quantize(torch.from_numpy(x), [torch.from_numpy(c) for c in cbs])[0])


@pytest.mark.parametrize(
    "latents, codebooks, exc, match",
    [
        (np.full((2, 3), np.nan, np.float32), [np.ones((2, 3), np.float32)], ValueError, "latents.*NaN"),
        (np.array([[1.0, np.inf, 0.0]], np.float32), [np.ones((2, 3), np.float32)], ValueError, "latents.*NaN/Inf"),
        (np.ones((2, 3), np.float32), [np.array([[np.nan, 0, 0]], np.float32)], ValueError, r"codebooks\[0\].*NaN"),
        (np.ones((2, 3), np.float32), [np.ones((2, 3), np.float32), np.full((2, 3), -np.inf, np.float32)],
         ValueError, r"codebooks\[1\]"),
        (np.ones((2, 3), np.int64), [np.ones((2, 3), np.float32)], TypeError, "latents.*float16/float32/float64"),
        (torch.ones(2, 3, dtype=torch.int32), [torch.ones(2, 3)], TypeError, "latents"),
        (np.ones((2, 3), np.float32), [np.ones((2, 3), np.int32)], TypeError, r"codebooks\[0\]"),
        (np.ones((2, 3), np.float32), [np.ones((2, 4), np.float32)], ValueError, "D=4"),
        (np.ones((2, 3), np.float32), [], ValueError, "L=0"),
        (np.ones((2, 3), np.float32), [np.ones((0, 3), np.float32)], ValueError, "K=0"),
        (np.ones((3,), np.float32), [np.ones((2, 3), np.float32)], ValueError, r"latents.*\(N, D\)"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), ValueError, r"\(L, K, D\)"),
        ([[1.0, 2.0]], [np.ones((2, 2), np.float32)], TypeError, "latents"),
    ],
)
def test_bad_inputs(latents, codebooks, exc, match):
    with pytest.raises(exc, match=match):
        quantize(latents, codebooks)


def test_bad_backend_and_overflow():
    with pytest.raises(ValueError, match="backend"):
        quantize(np.ones((1, 2), np.float32), [np.ones((1, 2), np.float32)], backend="gpu")
    big = np.full((1, 2), 3e38, np.float32)
    with pytest.raises(ValueError, match="overflow"):
        quantize(big, [-big], backend="reference")
    for b in available_backends():
        if b == "triton" and not torch.cuda.is_available() and not INTERPRET:
            continue
        with pytest.raises(ValueError, match="overflow"):
            quantize(big, [-big], backend=b)


def test_explicit_unavailable_backend_raises(monkeypatch):
    q = importlib.import_module("tiger_fast.quantize")  # the module (tiger_fast.quantize is the function)

    monkeypatch.setattr(q, "_load_ext", lambda: (None, "not built (test)"))
    with pytest.raises(RuntimeError, match="not built"):
        quantize(np.ones((1, 2), np.float32), [np.ones((1, 2), np.float32)], backend="cpu")
    name, why = explain_backend(torch.ones(1, 2))
    assert name in ("reference", "triton") and "not built" in why


def test_package_attribute_is_callable_in_any_import_order():
    import tiger_fast
    import tiger_fast.quantize as mod  # the package attribute: the function, in any import order

    x, cbs = case_random()
    want = quantize(x, cbs)
    assert torch.equal(tiger_fast.quantize(x, cbs), want)
    assert torch.equal(mod(x, cbs), want)


def test_bench_script_smoke(tmp_path):
    """benchmarks/bench_quantize.py runs end to end on a tiny input and our backend has 0 mismatches."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_quantize.py")
    spec = importlib.util.spec_from_file_location("bench_quantize", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    rep = bench.main(["--n", "2003", "--repeat", "1", "--skip", "faiss", "--sgemm-n", "256", "--json", str(out)])
    assert out.exists()
    assert rep["results"]["reference"]["mismatches"] == 0
    if "ours-cpu" in rep["results"]:
        assert rep["results"]["ours-cpu"]["mismatches"] == 0
    assert rep["results"]["numpy"]["items_per_s"] > 0
