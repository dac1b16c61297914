"""GPU benchmark of the exact Triton residual quantizer (tiger_fast/kernels/quantize.py), in one go.

    python benchmarks/gpu_quantize.py --n 1e9 --json out/gpu_quantize.json      # on a GPU (H200)
    python benchmarks/gpu_quantize.py --dry-run --json /tmp/gq.json             # CPU, interpreter

Workload (the paper's RQ-VAE shape): D = 32, K = 256, L = 3, clustered latents generated on the
device in chunks (so 1e9 latents never need to exist at once), codebooks fitted by a few Lloyd
iterations per level on a sample (realistic spacing, hence realistic near-tie rates).

Measured, per screen precision (fp32 = exact IEEE FMA screen; tf32 / tf32x3 = tensor-core
screens with wider bounds, repaired by the fp32 re-screen; results identical by construction):
  * items/s of the first kernel pass alone ("kernel") and of the full exact call ("exact":
    kernel + re-screens + float64/exact decisions of the flagged rows), CUDA-event timed per
    chunk, data generation excluded;
  * flagged shares (rows the screen could not certify, (row, level) pairs left to float64 and to
    the exact integer routine);
  * agreement on a sample against the reference (tiger_fast.reference.quantize.residual_quantize
    on the CPU): rows whose codes or residual differ -- must be 0 -- and the reference's items/s
    on that sample;
  * for context, a plain float32 torch GPU quantizer (matmul + argmin, NOT exact) and its
    disagreements with the reference.

Kernel layout (details in tiger_fast/kernels/_rq_triton.py): one program owns BLOCK_M rows and keeps their
residual tile in registers through all L levels (latents read once, residual written once); per
level it streams the codebook in BLOCK_K x D tiles (L1/L2 resident, 32 KiB per level), computes
s = ||c||^2 - 2 r.c with one tl.dot per tile, and tracks per row only three values -- best,
its index (lowest index on equal values) and second best -- so the epilogue stays a few ops per
(row, codeword) against D FMAs.  A row/level is certified when second - best > 2E (rigorous
rounding bound), else flagged and finished outside the kernel.  fp32 non-tensor floor on an H200:
~67 TFLOP/s / (2 * 3 * 256 * 32 flop per item) ~ 1.3e9 items/s; the target is >= 0.6e9 exact.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=float, default=1e9, help="total latents (default 1e9)")
    p.add_argument("--chunk", type=int, default=1 << 26, help="latents generated/quantized per chunk")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--precisions", default="fp32,tf32x3,tf32", help="comma list of screens to time")
    p.add_argument("--check", type=int, default=1 << 18, help="rows checked against the reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here (JSON)")
    p.add_argument("--dry-run", action="store_true",
                   help="small N on the CPU through the Triton interpreter (checks the script runs)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.n = min(args.n, 1500)
        args.chunk = min(args.chunk, 1024)
        args.check = min(args.check, 3000)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        # must precede the first `import triton` anywhere
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, ROOT)
    import torch

    from tiger_fast.kernels import quantize as kq
    from tiger_fast.reference.quantize import residual_quantize

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_quantize: no CUDA device (use --dry-run to check the script on a CPU)")
    why = kq.unavailable_reason(device)
    if why:
        sys.exit(f"gpu_quantize: Triton backend unavailable: {why}")
    precisions = [p for p in args.precisions.split(",") if p]
    n_total = int(args.n)
    chunk = min(args.chunk, n_total)
    d, k, nl = args.dim, args.k, args.levels

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # ---- data: fixed cluster centres; chunk c is generated from seed (seed, c) on the device
    g = torch.Generator(device=device).manual_seed(args.seed)
    n_centres = 4096
    centres = torch.randn(n_centres, d, generator=g, device=device) * 2.0
    spread = torch.rand(n_centres, 1, generator=g, device=device) * 0.5 + 0.1

    def make_chunk(c: int, rows: int) -> torch.Tensor:
        gc = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + c + 1)
        idx = torch.randint(0, n_centres, (rows,), generator=gc, device=device)
        return centres[idx] + spread[idx] * torch.randn(rows, d, generator=gc, device=device)

    # ---- codebooks: Lloyd iterations per level on a sample (plain fp32 argmin is fine here)
    t0 = time.time()
    sample = make_chunk(-1, min(1 << 20, max(4 * k, n_total)))
    r = sample.clone()
    codebooks = []
    iters = 2 if args.dry_run else 15
    for _ in range(nl):
        cb = r[torch.randperm(r.shape[0], generator=g, device=device)[:k]].clone()
        for _ in range(iters):
            a = torch.argmin((cb * cb).sum(1)[None, :] - 2.0 * r @ cb.t(), dim=1)
            sums = torch.zeros_like(cb).index_add_(0, a, r)
            cnt = torch.bincount(a, minlength=k).to(r.dtype)[:, None]
            cb = torch.where(cnt > 0, sums / cnt.clamp(min=1), cb)
        a = torch.argmin((cb * cb).sum(1)[None, :] - 2.0 * r @ cb.t(), dim=1)
        r = r - cb[a]
        codebooks.append(cb.contiguous())
    del sample, r
    sync()
    setup_s = time.time() - t0
    pc = kq.prepare_codebooks(codebooks, device)

    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (Triton interpreter)",
        "dry_run": bool(args.dry_run),
        "n": n_total, "chunk": chunk, "dim": d, "k": k, "levels": nl, "seed": args.seed,
        "codebook_fit_s": round(setup_s, 3),
        "torch": torch.__version__,
        "precisions": {},
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        pass

    # ---- reference on a sample (CPU), also the agreement target
    check_n = min(args.check, chunk)
    xs = make_chunk(0, chunk)[:check_n].contiguous()
    t0 = time.time()
    ref_codes, ref_res = residual_quantize(xs.cpu(), [c.cpu() for c in codebooks])
    ref_s = time.time() - t0
    result["reference"] = {"rows": check_n, "seconds": round(ref_s, 3),
                           "items_per_s": check_n / ref_s if ref_s > 0 else None}
    print(f"reference: {check_n} rows in {ref_s:.2f}s ({check_n / ref_s:.3g} items/s, CPU)", flush=True)

    def events():
        if device.type == "cuda":
            return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        return None

    def timed(fn):
        ev = events()
        if ev:
            ev[0].record()
            out = fn()
            ev[1].record()
            torch.cuda.synchronize()
            return out, ev[0].elapsed_time(ev[1]) / 1e3
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    # ---- plain float32 torch quantizer (context only: not exact)
    def torch_naive(x):
        rr = x
        codes = []
        for cb in codebooks:
            a = torch.argmin((cb * cb).sum(1)[None, :] - 2.0 * rr @ cb.t(), dim=1)
            codes.append(a)
            rr = rr - cb[a]
        return torch.stack(codes, 1), rr

    (nc, nr), _ = timed(lambda: torch_naive(xs))
    bad = ((nc.cpu() != ref_codes).any(1) | (nr.cpu() != ref_res).any(1)).sum().item()
    x0 = make_chunk(0, chunk)
    # at most 2^22 rows: the (rows, K) distance matrix would not fit for a whole 2^26-row chunk
    xn = x0[: min(chunk, 1 << 22)]
    torch_naive(xn)
    _, tn = timed(lambda: torch_naive(xn))
    result["torch_fp32_naive"] = {"items_per_s": xn.shape[0] / tn, "disagreeing_rows_in_sample": int(bad),
                                  "note": "plain fp32 matmul+argmin, not exact; context only"}
    print(f"torch fp32 naive: {xn.shape[0] / tn:.3g} items/s, {bad} rows disagree in the sample", flush=True)

    for prec in precisions:
        # warm-up: compiles and autotunes (key: D, K, L, precision) on the first chunk
        t0 = time.time()
        kq.quantize_triton(x0[: min(chunk, 1 << 22)], pc, precision=prec)
        sync()
        warm_s = time.time() - t0
        # agreement on the sample
        codes, res = kq.quantize_triton(xs, pc, precision=prec)
        mism = ((codes.cpu() != ref_codes).any(1) | (res.cpu() != ref_res).any(1)).sum().item()
        agg = {"screen_flagged": 0, "fp32_flagged": 0, "fp64_levels": 0, "exact_levels": 0}
        t_kernel = t_exact = 0.0
        done = 0
        c = 0
        while done < n_total:
            rows = min(chunk, n_total - done)
            x = x0[:rows] if c == 0 else make_chunk(c, rows)
            sync()
            _, tk = timed(lambda: kq.screen_pass(x, pc, prec))
            st = {}
            _, te = timed(lambda: kq.quantize_triton(x, pc, precision=prec, stats=st))
            for key in agg:
                agg[key] += st[key]
            t_kernel += tk
            t_exact += te
            done += rows
            c += 1
            del x
        entry = {
            "items_per_s_kernel": n_total / t_kernel,
            "items_per_s_exact": n_total / t_exact,
            "seconds_kernel": round(t_kernel, 4),
            "seconds_exact": round(t_exact, 4),
            "warmup_compile_autotune_s": round(warm_s, 2),
            "sample_rows": check_n,
            "sample_mismatching_rows": int(mism),
            "screen_flagged_rows_frac": agg["screen_flagged"] / n_total,
            "fp32_flagged_rows_frac": agg["fp32_flagged"] / n_total,
            "fp64_levels": agg["fp64_levels"],
            "exact_levels": agg["exact_levels"],
        }
        if device.type == "cuda" and not args.dry_run:
            from tiger_fast.kernels import _rq_triton as kt  # noqa: F401
            best = getattr(kt.rq_kernel_tuned, "best_config", None)
            entry["best_config"] = str(best) if best is not None else None
        result["precisions"][prec] = entry
        print(f"{prec}: kernel {entry['items_per_s_kernel']:.3g} items/s, exact {entry['items_per_s_exact']:.3g} "
              f"items/s, screen-flagged {entry['screen_flagged_rows_frac']:.2e}, fp64 levels "
              f"{agg['fp64_levels']}, exact levels {agg['exact_levels']}, sample mismatches {mism}",
              flush=True)
    result["ok"] = all(v["sample_mismatching_rows"] == 0 for v in result["precisions"].values())
    if args.json:
        from tiger_fast.atomic import write_json  # after the sys.path set-up above

        write_json(args.json, result)
        print(f"wrote {args.json}")
    if not result["ok"]:
        sys.exit("gpu_quantize: MISMATCH against the reference")
    return result


if __name__ == "__main__":
    main()
