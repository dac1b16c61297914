"""GPU benchmark of trie-constrained decoding (ready for an H200; `--dry-run` runs the CPU parts).

On a CUDA device:
  1. agreement: the CUDA selection kernels (tiger_fast._generate_ext.cuda_*_select_step) against
     the C++ CPU step on the same inputs: beam search must be identical (parent, token, node, score);
     sampling identical selection (keys within a few ulp: libdevice vs glibc transcendental functions);
     plus the out-of-range-node error flag.
  2. per-step constraint + selection overhead: batch 256, beam 20, the 4 levels of a Beauty-size
     trie, random log-probs on the device: (a) the kernel alone per level (CUDA events), (b) the 4
     steps (log_softmax slice + selection) captured in one CUDA graph and replayed; anchor:
     0.033 ms/step (arXiv 2602.22647).
  3. end to end: the whole decode of the paper-size T5 (random weights; encoder + 5 decoder steps +
     4 selections + eos re-rank, batch 256, beam 20) eager and captured in one CUDA graph (when the
     model's decode_step / select_beams make no host synchronisation; otherwise the capture error
     is reported and the eager number kept); then tiger_fast.generate(backend="cuda" and "cpu"),
     batch 256 and 1, beam 20, temperature None / per-level, in each --precisions mode (fp32 exact,
     bf16 on tensor cores; int8 is CPU-only): latency p50/p99, requests/s, bf16's identical-list
     share vs fp32.

    python benchmarks/gpu_generate.py --json results/gpu_generate.json
    python benchmarks/gpu_generate.py --dry-run        # no GPU: builds inputs, runs the CPU step
"""
from __future__ import annotations

import os

# OpenMP threads spin-wait after parallel regions by default; on a shared or oversubscribed machine
# that stalls every matrix product (see tiger_fast/__init__.py for measurements).  Must be set
# before torch/numpy start their thread pools; an explicit setting by the caller wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiger_fast.atomic import write_json  # noqa: E402
from tiger_fast.generate import selection_out_buffers  # noqa: E402

from bench_generate import make_catalogue  # noqa: E402
from tiger_fast.precision import int8_unavailable_reason  # noqa: E402

ANCHOR_MS_PER_STEP = 0.033  # arXiv 2602.22647: per-step constraint + selection overhead


class CudaSteps:
    """Device buffers + calls of the extension's CUDA launchers (raw pointers, current stream)."""

    def __init__(self, ext, device, R, B_max, S_max):
        self.ext, self.dev = ext, device
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.ws = torch.empty(int(ext.cuda_workspace_bytes(R, B_max, S_max)), dtype=torch.uint8, device=device)

    def outs(self, R, B_out, sample=False):
        return selection_out_buffers(R, B_out, sample, self.dev)

    def beam(self, lp, scores, nodes, children, B_out, out=None):
        R, B, S = lp.shape
        o = out if out is not None else self.outs(R, B_out)
        self.ext.cuda_beam_select_step(lp.data_ptr(), scores.data_ptr(), nodes.data_ptr(), children.data_ptr(),
                                       R, B, S, children.shape[0], B_out, *(t.data_ptr() for t in o),
                                       self.flag.data_ptr(), self.ws.data_ptr(),
                                       torch.cuda.current_stream(self.dev).cuda_stream)
        return o

    def sample(self, lp, tlp, scores, phi, keys, nodes, children, B_out, seed, step, row_keys, gumbel=None):
        R, B, S = lp.shape
        o = self.outs(R, B_out, True)
        self.ext.cuda_sample_select_step(lp.data_ptr(), tlp.data_ptr(), scores.data_ptr(), phi.data_ptr(),
                                         keys.data_ptr(), nodes.data_ptr(), children.data_ptr(),
                                         row_keys.data_ptr(), R, B, S, children.shape[0], B_out, seed, step,
                                         *(t.data_ptr() for t in o), self.flag.data_ptr(), self.ws.data_ptr(),
                                         torch.cuda.current_stream(self.dev).cuda_stream,
                                         gumbel=0 if gumbel is None else gumbel.data_ptr())
        return o


def _inputs(gen, R, B, S, children, mode="plain", T=1.0):
    logits = torch.randn(R, B, S + 40, generator=gen) * 3
    if mode == "ties":
        logits = torch.round(logits)
    if mode == "neginf":
        logits[torch.rand(logits.shape, generator=gen) < 0.3] = -math.inf
    lp = torch.log_softmax(logits, -1)[..., :S].contiguous()
    tlp = torch.log_softmax(logits / T, -1)[..., :S].contiguous()
    live = torch.nonzero((children >= 0).any(1)).flatten()
    nodes = live[torch.randint(0, len(live), (R, B), generator=gen)]
    nodes[torch.rand(R, B, generator=gen) < 0.1] = -1
    scores = torch.round(-torch.rand(R, B, generator=gen) * 32) / 8
    phi = -torch.rand(R, B, generator=gen, dtype=torch.float64) * 6
    keys = phi + torch.rand(R, B, generator=gen, dtype=torch.float64)
    return lp, tlp, scores, phi, keys, nodes


def agreement(ext, steps, trie, device) -> dict:
    """CUDA kernels vs the C++ CPU step on identical inputs."""
    tables = trie.tables()
    gen = torch.Generator().manual_seed(0)
    res = {"beam_cases": 0, "beam_identical": 0, "sample_cases": 0, "sample_identical_selection": 0,
           "sample_max_key_abs_diff": 0.0}
    cases = [(l, R, B, Bo, mode) for l in range(4) for (R, B, Bo) in ((256, 20, 20), (33, 7, 64), (1, 1, 1))
             for mode in ("plain", "ties", "neginf")]
    for l, R, B, Bo, mode in cases:
        ch = tables[l]
        B = 1 if l == 0 else B
        lp, tlp, scores, phi, keys, nodes = _inputs(gen, R, B, ch.shape[1], ch, mode)
        want = ext.beam_select_step(lp.numpy(), scores.numpy(), nodes.numpy(), ch.numpy(), Bo)
        d = lambda t: t.to(device)
        got = steps.beam(d(lp), d(scores), d(nodes), d(ch), Bo)
        torch.cuda.synchronize()
        res["beam_cases"] += 1
        res["beam_identical"] += int(all(torch.equal(g.cpu(), torch.from_numpy(w)) for g, w in zip(got, want)))
        rk = torch.arange(R, dtype=torch.int64) * 31 + 7
        want = ext.sample_select_step(lp.numpy(), tlp.numpy(), scores.numpy(), phi.numpy(), keys.numpy(),
                                      nodes.numpy(), ch.numpy(), Bo, 12345, l, rk.numpy())
        got = steps.sample(d(lp), d(tlp), d(scores), d(phi), d(keys), d(nodes), d(ch), Bo, 12345, l, d(rk))
        torch.cuda.synchronize()
        res["sample_cases"] += 1
        same = all(torch.equal(g.cpu(), torch.from_numpy(w)) for g, w in zip(got[:5], want[:5]))
        res["sample_identical_selection"] += int(same)
        kw, kg = torch.from_numpy(want[5]), got[5].cpu()
        fin = torch.isfinite(kw)
        if fin.any():
            res["sample_max_key_abs_diff"] = max(res["sample_max_key_abs_diff"],
                                                 float((kw[fin] - kg[fin]).abs().max()))
    # the error flag: an out-of-range node is reported, not read
    steps.flag.zero_()
    ch = tables[1]
    lp, tlp, scores, phi, keys, nodes = _inputs(gen, 4, 3, ch.shape[1], ch)
    nodes[2, 1] = ch.shape[0] + 5
    steps.beam(lp.to(device), scores.to(device), nodes.to(device), ch.to(device), 5)
    torch.cuda.synchronize()
    res["error_flag_for_bad_node"] = int(steps.flag.item())
    steps.flag.zero_()
    return res


def per_step_overhead(ext, steps, trie, layout, device, R=256, B=20, reps=200) -> dict:
    tables = [t.to(device) for t in trie.tables()]
    V = layout.vocab_size
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(R, 1 if l == 0 else B, V, generator=gen).to(device) for l in range(layout.num_levels)]
    out = {"rows": R, "beams": B, "anchor_ms_per_step": ANCHOR_MS_PER_STEP}
    # (a) kernel alone, per level (inputs = the level's slice of a log_softmax)
    nodes = torch.zeros(R, 1, dtype=torch.int64, device=device)
    scores = torch.zeros(R, 1, device=device)
    per_level = []
    for l in range(layout.num_levels):
        off, S = layout.level_offset(l), layout.level_sizes[l]
        lp = torch.log_softmax(logits[l], -1)[..., off:off + S].contiguous()
        o = steps.outs(R, B)
        for _ in range(10):
            steps.beam(lp, scores, nodes, tables[l], B, out=o)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            steps.beam(lp, scores, nodes, tables[l], B, out=o)
        e1.record()
        torch.cuda.synchronize()
        per_level.append(e0.elapsed_time(e1) / reps)
        scores, nodes = o[2].clone(), o[3].clone()
    out["kernel_ms_per_level"] = per_level
    out["kernel_ms_per_step_mean"] = float(np.mean(per_level))

    # (b) the 4 steps (log_softmax + slice + selection) in one CUDA graph
    static_logits = [x.clone() for x in logits]
    outs = [steps.outs(R, B) for _ in range(layout.num_levels)]

    def four_steps():
        sc = torch.zeros(R, 1, device=device)
        nd = torch.zeros(R, 1, dtype=torch.int64, device=device)
        for l in range(layout.num_levels):
            off, S = layout.level_offset(l), layout.level_sizes[l]
            lp = torch.log_softmax(static_logits[l], -1)[..., off:off + S].contiguous()
            steps.beam(lp, sc, nd, tables[l], B, out=outs[l])
            sc, nd = outs[l][2], outs[l][3]
        return nd

    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            four_steps()
    torch.cuda.current_stream(device).wait_stream(s)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            four_steps()
        for _ in range(10):
            g.replay()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        ms = e0.elapsed_time(e1) / reps
        out["graph_ms_4_steps_with_log_softmax"] = ms
        out["graph_ms_per_step"] = ms / layout.num_levels
        out["graph_vs_anchor"] = (ms / layout.num_levels) / ANCHOR_MS_PER_STEP
    except Exception as e:  # report, keep the eager numbers
        out["graph_error"] = f"{type(e).__name__}: {e}"
    return out


def end_to_end(layout, table, trie, device, batches, reps, precisions=("fp32",)) -> dict:
    """generate() per backend and precision mode (names: backend, backend_bf16, ...); bf16 = tensor
    cores under autocast; int8 is CPU-only and is recorded as the error generate() raises."""
    from tiger_fast.generate import generate
    from tiger_fast.t5 import T5, paper_config

    model = T5(paper_config(layout), seed=0).to(device).eval()
    rng = np.random.default_rng(1)
    item_ids = table.item_ids.numpy()
    out = {"runs": []}
    for batch in batches:
        hist = [rng.choice(item_ids, 20, replace=False) for _ in range(batch)]
        users = rng.integers(0, 1_000_000, batch).tolist()
        for tname, T in (("beam", None), ("per_level", (2.0, 1.5, 1.0, 0.5))):
            ids_of = {}
            for backend, prec in [(b, p) for p in precisions for b in ("cuda", "cpu")]:
                name = backend if prec == "fp32" else f"{backend}_{prec}"
                lat = []
                try:
                    for i in range(reps + 2):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        r = generate(model, hist, table, user_ids=users, k=10, num_beams=20, temperature=T,
                                     seed=3, backend=backend, trie=trie, precision=prec)
                        torch.cuda.synchronize()
                        if i >= 2:
                            lat.append(time.perf_counter() - t0)
                    a = np.asarray(lat) * 1e3
                    ids_of[name] = r.item_ids
                    run = {"batch": batch, "temperature": tname, "backend": backend, "precision": prec, "name": name,
                           "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
                           "requests_per_s": batch * len(lat) / sum(lat)}
                    if prec != "fp32" and backend in ids_of:  # vs the exact mode of the same backend
                        run["identical_lists_vs_fp32"] = float((r.item_ids == ids_of[backend]).all(1).float().mean())
                    elif prec == "fp32" and backend == "cpu" and "cuda" in ids_of:
                        run["cpu_equals_cuda_ids"] = bool(torch.equal(r.item_ids, ids_of["cuda"]))
                    out["runs"].append(run)
                except Exception as e:
                    out["runs"].append({"batch": batch, "temperature": tname, "backend": backend, "precision": prec,
                                        "name": name, "error": f"{type(e).__name__}: {e}"})
                print(json.dumps(out["runs"][-1]), flush=True)
    return out


def whole_decode_graph(layout, table, trie, device, ext, steps, R=256, B=20, reps=20) -> dict:
    """Encoder + 5 decoder steps + 4 selections + eos re-rank of the paper-size T5, eager and (if
    the model's decode_step / select_beams make no host synchronisation) as one CUDA graph."""
    from tiger_fast.t5 import T5, paper_config

    model = T5(paper_config(layout), seed=0).to(device).eval()
    L, V = layout.num_levels, layout.vocab_size
    tables = [t.to(device) for t in trie.tables()]
    rng = np.random.default_rng(2)
    hist = rng.choice(table.item_ids.numpy(), (R, 20))
    from tiger_fast.decoding import encoder_batch
    ids, mask = encoder_batch(layout, table, list(hist), list(range(R)), 20, device)
    outs = [steps.outs(R, B) for _ in range(L)]

    def decode():
        enc = model.encode(ids, mask)
        cache = model.init_cache(enc, mask, max_length=L + 2)
        tokens = torch.full((R,), layout.decoder_start_id, dtype=torch.int64, device=device)
        logits = model.decode_step(tokens, cache).view(R, 1, V)
        sc = torch.zeros(R, 1, device=device)
        nd = torch.zeros(R, 1, dtype=torch.int64, device=device)
        for l in range(L):
            off, S = layout.level_offset(l), layout.level_sizes[l]
            lp = torch.log_softmax(logits.float(), -1)[..., off:off + S].contiguous()
            parent, tok, sc, nd = steps.beam(lp, sc, nd, tables[l], B, out=outs[l])
            cache = model.select_beams(cache, parent, reuse=True)  # no host sync on CUDA
            tok_in = torch.where(parent >= 0, tok + off, torch.full_like(tok, layout.pad_id))
            logits = model.decode_step(tok_in.reshape(-1), cache).view(R, B, V)
        final = sc + torch.log_softmax(logits.float(), -1)[..., layout.eos_id]
        return torch.sort(final, dim=1, descending=True, stable=True)

    out = {"rows": R, "beams": B}
    with torch.inference_mode():
        for _ in range(3):
            decode()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            decode()
        torch.cuda.synchronize()
        out["eager_ms"] = (time.perf_counter() - t0) * 1e3 / reps
        try:
            s = torch.cuda.Stream(device)
            s.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(s):
                decode()
            torch.cuda.current_stream(device).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                decode()
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                g.replay()
            torch.cuda.synchronize()
            out["graph_ms"] = (time.perf_counter() - t0) * 1e3 / reps
            out["graph_requests_per_s"] = R * 1e3 / out["graph_ms"]
        except Exception as e:  # e.g. a host sync (int(tensor), torch.tensor(..., device=cuda)) in the model
            out["graph_error"] = f"{type(e).__name__}: {str(e)[:500]}"
    return out


def dry_run(ext, trie, layout) -> dict:
    """What runs without a GPU: inputs, the CPU step on the benchmark's shapes, the CUDA status."""
    tables = trie.tables()
    gen = torch.Generator().manual_seed(0)
    R, B = 256, 20
    nodes = np.zeros((R, 1), np.int64)
    scores = np.zeros((R, 1), np.float32)
    t0 = time.perf_counter()
    for l in range(layout.num_levels):
        S = layout.level_sizes[l]
        lp = torch.log_softmax(torch.randn(R, nodes.shape[1], S + 40, generator=gen), -1)[..., :S].contiguous()
        _, _, scores, nodes = ext.beam_select_step(lp.numpy(), scores, nodes, tables[l].numpy(), B)
    dt = time.perf_counter() - t0
    lp, tlp, sc, phi, keys, nd = _inputs(gen, 33, 7, 256, tables[2])
    ext.sample_select_step(lp.numpy(), tlp.numpy(), sc.numpy(), phi.numpy(), keys.numpy(), nd.numpy(),
                           tables[2].numpy(), 20, 1, 2, np.arange(33, dtype=np.int64))
    return {"cpu_step_4_levels_ms": dt * 1e3, "valid_items_found": int((nodes >= 0).sum()),
            "cuda_built": bool(ext.cuda_built()), "cuda_available": bool(ext.cuda_available()),
            "cuda_unavailable_reason": ext.cuda_unavailable_reason(),
            "workspace_bytes_256x20x256": int(ext.cuda_workspace_bytes(256, 20, 256)),
            "int8_on_gpu": int8_unavailable_reason(torch.device("cuda"))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: run the CPU parts only")
    p.add_argument("--reps", type=int, default=10, help="end-to-end repetitions")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1])
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "int8"],
                   help="generate() precision modes end to end (int8 is CPU-only: recorded as an error)")
    args = p.parse_args(argv)
    from tiger_fast import _generate_ext as ext

    layout, table, trie = make_catalogue()
    out = {"benchmark": "gpu_generate", "machine": {"platform": platform.platform(), "torch": torch.__version__},
           "catalogue": {"items": len(table), "trie_nodes": trie.num_nodes()}}
    if args.dry_run:
        out["dry_run"] = dry_run(ext, trie, layout)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device visible to torch; use --dry-run")
        if not ext.cuda_available():
            sys.exit(f"the extension's CUDA kernels are unavailable: {ext.cuda_unavailable_reason()}")
        device = torch.device("cuda")
        out["machine"]["gpu"] = torch.cuda.get_device_name(device)
        steps = CudaSteps(ext, device, 256, 64, 256)
        out["agreement"] = agreement(ext, steps, trie, device)
        print(json.dumps(out["agreement"]), flush=True)
        out["per_step"] = per_step_overhead(ext, steps, trie, layout, device)
        print(json.dumps(out["per_step"]), flush=True)
        if not args.skip_e2e:
            try:
                out["whole_decode"] = whole_decode_graph(layout, table, trie, device, ext, steps)
            except Exception as e:
                out["whole_decode"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            print(json.dumps(out["whole_decode"]), flush=True)
            out["end_to_end"] = end_to_end(layout, table, trie, device, args.batches, args.reps, args.precisions)
    print(json.dumps(out, indent=2, default=float))
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
