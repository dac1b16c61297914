"""Residual quantization throughput, side by side in one run (docs/contracts.md).

    python benchmarks/bench_quantize.py --n 1000000 --json out/bench_quantize.json

Data: clustered synthetic latents (D=32, 64 Gaussian clusters), codebooks K=256 per level, L=3,
built like an RQ-VAE's (each level's codewords sampled from the previous level's residuals of a
20k subset, plus a little noise).  Fixed seed, so every run sees the same data.

Implementations (all single process, all threads of this machine unless --threads):
  ours-cpu      tiger_fast.quantize(backend="cpu")  (C++ float32 screen + certified re-decision)
  reference     tiger_fast.quantize(backend="reference")  (float64 + exact, the specification)
  numpy         plain NumPy: per level s = ||c||^2 - 2 r C^T (float32 sgemm), argmin, r -= C[k]
  faiss-rq-b1   faiss.ResidualQuantizer with max_beam_size=1 (greedy RQ) and our codebooks
                (skipped with a message when faiss is not importable: pip install faiss-cpu)
For each: items/s (best of --repeat), and mismatches = rows whose codes differ from the reference.
The report also gives our throughput as a fraction of an estimated fp32 peak of this machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiger_fast.atomic import write_json  # noqa: E402

from tiger_fast.quantize import quantize  # noqa: E402
from tiger_fast.reference.quantize import exact_argmin  # noqa: E402

D, K, L = 32, 256, 3


def make_data(n: int, seed: int = 0, clusters: int = 64, spread: float = 0.2):
    """latents float32 (n, D), codebooks float32 (L, K, D)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, D, generator=g)
    lab = torch.randint(0, clusters, (n,), generator=g)
    x = centers[lab] + spread * torch.randn(n, D, generator=g)
    sub = x[torch.randperm(n, generator=g)[: min(n, 20_000)]].clone()
    cbs = []
    for _ in range(L):
        cb = sub[torch.randperm(len(sub), generator=g)[:K]].clone()
        if len(cb) < K:  # tiny n: pad with noise
            cb = torch.cat([cb, torch.randn(K - len(cb), D, generator=g)])
        cb += 1e-3 * cb.abs().mean() * torch.randn(cb.shape, generator=g)
        cbs.append(cb)
        sub = sub - cb[exact_argmin(sub, cb)]
    return x.contiguous(), torch.stack(cbs).contiguous()


def numpy_rq(x: np.ndarray, cbs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    codes = np.empty((len(x), len(cbs)), dtype=np.int64)
    norms = [(c * c).sum(1) for c in cbs]
    for s in range(0, len(x), chunk):
        r = x[s:s + chunk].copy()
        for lv, cb in enumerate(cbs):
            dist = norms[lv][None, :] - 2.0 * (r @ cb.T)
            k = dist.argmin(1)
            codes[s:s + chunk, lv] = k
            r -= cb[k]
    return codes


def faiss_rq(x: np.ndarray, cbs: np.ndarray):
    import faiss  # noqa: F401

    rq = faiss.ResidualQuantizer(D, L, 8)
    rq.max_beam_size = 1
    faiss.copy_array_to_vector(np.ascontiguousarray(cbs.reshape(-1), dtype=np.float32), rq.codebooks)
    rq.is_trained = True
    if hasattr(rq, "compute_codebook_tables"):
        rq.compute_codebook_tables()

    def run(xx):
        packed = rq.compute_codes(xx)  # (n, code_size) uint8; nbits=8 -> one byte per level
        return packed[:, :L].astype(np.int64)

    return run


def peak_gflops(threads: int, simd_lanes: int | None, ghz: float | None):
    """Estimated fp32 peak = cores x GHz x lanes x 2 (FMA) x 2 (FMA units); returns (value, text)."""
    flags, vendor, mhz = "", "", None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = line
                elif line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":")[1].strip()
                elif line.startswith("cpu MHz") and mhz is None:
                    mhz = float(line.split(":")[1])
    except OSError:
        pass
    if simd_lanes is None:
        # AMD Zen 4 executes 512-bit ops on 256-bit pipes: 8 fp32 lanes per FMA unit.
        simd_lanes = 16 if (" avx512f" in flags and vendor == "GenuineIntel") else 8
    if ghz is None:
        ghz = (mhz or 2500.0) / 1000.0
    peak = threads * ghz * simd_lanes * 2 * 2
    text = f"{threads} cores x {ghz:.2f} GHz x {simd_lanes} fp32 lanes x 2 (FMA) x 2 FMA units = {peak:.0f} GFLOP/s"
    return peak, text


def measured_sgemm_gflops(repeat: int = 3, n: int = 2048) -> float:
    """Large square float32 matmul (NumPy/BLAS, same threads): an 'achievable peak' sanity check."""
    g = np.random.default_rng(0)
    a = g.standard_normal((n, n), dtype=np.float32)
    b = g.standard_normal((n, n), dtype=np.float32)
    t, _ = timed(lambda: a @ b, repeat)
    return 2.0 * n**3 / t / 1e9


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="rows (latents)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs (reference: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--simd-lanes", type=int, default=None, help="fp32 lanes per FMA unit for the peak estimate")
    ap.add_argument("--ghz", type=float, default=None, help="clock for the peak estimate (default /proc/cpuinfo)")
    ap.add_argument("--skip", default="", help="comma list of implementations to skip (cpu,numpy,faiss)")
    ap.add_argument("--sgemm-n", type=int, default=2048, help="size of the square sgemm sanity measurement")
    args = ap.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    skip = set(filter(None, args.skip.split(",")))

    x, cbs = make_data(args.n, args.seed)
    xn, cbn = x.numpy(), cbs.numpy()
    t_ref, ref = timed(lambda: quantize(x, cbs, backend="reference"), 1)
    ref_np = ref.numpy()
    results = {"reference": {"items_per_s": args.n / t_ref, "mismatches": 0, "seconds": t_ref}}

    impls = {}
    if "cpu" not in skip:
        impls["ours-cpu"] = lambda: quantize(x, cbs, backend="cpu").numpy()
    if "numpy" not in skip:
        impls["numpy"] = lambda: numpy_rq(xn, cbn)
    notes = []
    if "faiss" not in skip:
        try:
            impls["faiss-rq-b1"] = (lambda run: (lambda: run(xn)))(faiss_rq(xn, cbn))
        except ImportError as exc:
            notes.append(f"faiss not importable ({exc}); skipped (pip install faiss-cpu)")
    for name, fn in impls.items():
        try:
            t, codes = timed(fn, args.repeat)
        except RuntimeError as exc:
            notes.append(f"{name}: {exc}")
            continue
        mism = int((codes != ref_np).any(1).sum())
        results[name] = {"items_per_s": args.n / t, "mismatches": mism, "seconds": t}

    flops_per_item = 2.0 * L * K * D
    peak, peak_text = peak_gflops(threads, args.simd_lanes, args.ghz)
    sgemm = measured_sgemm_gflops(n=args.sgemm_n)
    report = {
        "n": args.n, "D": D, "K": K, "L": L, "threads": threads, "seed": args.seed,
        "machine": platform.processor() or platform.machine(),
        "results": results,
        "peak_estimate": peak_text,
        "flops_per_item": flops_per_item,
        "measured_sgemm_gflops": sgemm,
        "measured_sgemm_n": args.sgemm_n,
        "notes": notes,
    }
    if "ours-cpu" in results:
        ours = results["ours-cpu"]["items_per_s"]
        report["ours_fraction_of_peak"] = ours * flops_per_item / (peak * 1e9)
        report["ours_fraction_of_measured_sgemm"] = ours * flops_per_item / (sgemm * 1e9)
        others = [results[k]["items_per_s"] for k in ("numpy", "faiss-rq-b1") if k in results]
        if others:
            report["ours_speedup_vs_best_baseline"] = ours / max(others)
    print(f"n={args.n} D={D} K={K} L={L} threads={threads}")
    for name, r in results.items():
        print(f"  {name:12s} {r['items_per_s'] / 1e6:8.3f} M items/s   mismatches vs reference: {r['mismatches']}")
    print("  peak (estimate): " + peak_text)
    print(f"  measured {args.sgemm_n}^3 sgemm (NumPy BLAS): {sgemm:.0f} GFLOP/s")
    if "ours_fraction_of_peak" in report:
        print(f"  ours-cpu: {100 * report['ours_fraction_of_peak']:.1f} % of estimated peak, "
              f"{100 * report['ours_fraction_of_measured_sgemm']:.1f} % of measured sgemm "
              f"({flops_per_item:.0f} flop/item)")
    if "ours_speedup_vs_best_baseline" in report:
        print(f"  ours-cpu / best(numpy, faiss): {report['ours_speedup_vs_best_baseline']:.2f}x")
    for n in notes:
        print("  note: " + n)
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
