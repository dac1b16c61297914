"""Benchmark trie-constrained decoding: the selection step alone and end-to-end retrieval.

Selection alone (one thread, batch 256, beam 20, the 4 levels of a Beauty-size trie, random
log-probs): the C++ step (tiger_fast._generate_ext.beam_select_step) vs the reference
(tiger_fast.reference.generate.beam_select_step), a dense-mask PyTorch loop (children[node] >= 0 ->
masked_fill -> topk) and an HF-style callback (one prefix_allowed_tokens_fn call per hypothesis
building a -inf mask, as HF's PrefixConstrainedLogitsProcessor does, then topk over beams).

End to end: the paper-size retriever (tiger_fast.t5.T5 default config, random weights unless
--checkpoint) on a Beauty-size catalogue (12,101 items, random semantic IDs with collisions,
histories of 20 items), beam 20, k 10, batch 1 and 256, temperature None and per-level.  Contenders,
alternated within every repetition so that load changes on a shared machine hit all alike:
tiger_fast.generate backend "cpu" in each --precisions mode (names cpu = exact fp32, cpu_bf16,
cpu_int8) and backend "reference"; HF generate(prefix_allowed_tokens_fn=...) on T5.to_hf() with
the same weights (beam search only: HF's sampling is a different algorithm); with --ct2,
CTranslate2 float32 and int8 (int8 weights, float32 activations) of the same weights converted by
ctranslate2.converters.TransformersConverter, unconstrained beam search (its Python API has no
per-step logits hook for beam search, so it cannot enforce the trie: its speed is a ceiling
without the constraint, and valid_id_fraction says how many of its IDs exist).  Per run: p50/p99
latency and requests/s per contender, how many top-k lists of exact "cpu" differ from HF's
(hf_mismatched_lists, IDs and order), the fast modes' identical-list share and mean overlap@k vs
fp32, and ratios (see _ratios).  The compute floor: the forward's FLOPs (forward_flops) at the
float32 sgemm rate measured in the same run (sgemm_gflops).  glibc malloc is set to keep freed
memory (tiger_fast.cpu_memory) for all contenders unless --no-retain-memory.

    python benchmarks/bench_generate.py --ct2 --precisions fp32 bf16 int8 --json FILE
    python benchmarks/bench_generate.py --json results/bench_generate.json
    python benchmarks/bench_generate.py --quick          # a smoke run (fewer repetitions)
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
from tiger_fast.atomic import write_json  # noqa: E402

from tiger_fast.layout import TokenLayout  # noqa: E402
from tiger_fast.reference import generate as ref  # noqa: E402
from tiger_fast.trie import Trie  # noqa: E402

NUM_ITEMS = 12_101  # Amazon Beauty


# ---- catalogue ---------------------------------------------------------------------------------------
def beauty_size_codes(num_items: int = NUM_ITEMS, seed: int = 0) -> np.ndarray:
    """int64 (N, 4): random RQ-VAE-like codes with a skewed first level (so prefixes collide), plus
    the collision code (0, 1, ... within each (c0, c1, c2) group, by item order)."""
    rng = np.random.default_rng(seed)
    p0 = rng.random(256) ** 3
    c0 = rng.choice(256, size=num_items, p=p0 / p0.sum())
    c1 = rng.integers(0, 96, num_items)
    c2 = rng.integers(0, 48, num_items)
    key = (c0 * 256 + c1) * 256 + c2
    order = np.argsort(key, kind="stable")
    c3 = np.zeros(num_items, np.int64)
    sk = key[order]
    start = np.r_[0, np.flatnonzero(sk[1:] != sk[:-1]) + 1]
    run = np.repeat(start, np.diff(np.r_[start, num_items]))
    c3[order] = np.arange(num_items) - run
    return np.stack([c0, c1, c2, c3], 1).astype(np.int64)


def make_catalogue(seed: int = 0):
    from tiger_fast.ids import IdTable

    layout = TokenLayout()
    codes = beauty_size_codes(seed=seed)
    item_ids = np.random.default_rng(seed + 1).permutation(10 * NUM_ITEMS)[:NUM_ITEMS].astype(np.int64) + 1
    table = IdTable(layout, item_ids, codes)
    return layout, table, Trie.from_id_table(table)


# ---- selection alone ---------------------------------------------------------------------------------
def _timeit(fn, reps: int, warmup: int = 1) -> tuple[list[float], list[float]]:
    """-> (wall seconds, CPU seconds of this thread) per repetition.  The CPU time is the robust
    number on a shared machine (single-threaded runs: it excludes time the thread was preempted)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return wall, cpu


def selection_alone(trie: Trie, layout: TokenLayout, reps: int, R: int = 256, B: int = 20) -> dict:
    """4 levels of selection on random log-probs; beams follow each method's own choices."""
    from tiger_fast import _generate_ext as ext

    tables = trie.tables()
    gen = torch.Generator().manual_seed(0)
    V = layout.vocab_size
    lps = []
    for l in range(layout.num_levels):
        b_in = 1 if l == 0 else B
        logits = torch.randn(R, b_in, V, generator=gen) * 2
        lp = torch.log_softmax(logits, -1)
        lps.append((lp, lp[..., layout.level_offset(l):layout.level_offset(l) + layout.level_sizes[l]].contiguous()))

    def run_ext():
        scores = np.zeros((R, 1), np.float32)
        nodes = np.zeros((R, 1), np.int64)
        for l in range(layout.num_levels):
            _, sub = lps[l]
            parent, tok, scores, nodes = ext.beam_select_step(sub.numpy(), scores, nodes, tables[l].numpy(), B,
                                                              num_threads=1)
        return nodes

    def run_ref():
        scores = torch.zeros(R, 1)
        nodes = torch.zeros(R, 1, dtype=torch.int64)
        for l in range(layout.num_levels):
            _, sub = lps[l]
            parent, tok, scores, nodes = ref.beam_select_step(sub, scores, nodes, tables[l], B)
        return nodes

    def run_dense():
        # Dense masks from the trie tables: gather the children rows, mask, flatten beams, topk.
        scores = torch.zeros(R, 1)
        nodes = torch.zeros(R, 1, dtype=torch.int64)
        for l in range(layout.num_levels):
            _, sub = lps[l]
            S = sub.shape[-1]
            child = tables[l].long()[nodes.clamp(min=0)]
            valid = (child >= 0) & (nodes >= 0).unsqueeze(-1)
            cand = torch.where(valid, scores.unsqueeze(-1) + sub, torch.tensor(-math.inf))
            top = torch.topk(cand.reshape(R, -1), B, dim=1)
            par, tok = top.indices // S, top.indices % S
            nodes = torch.gather(child.reshape(R, -1), 1, top.indices)
            nodes = torch.where(torch.isfinite(top.values), nodes, -1)
            scores = top.values
        return nodes

    # HF-style: a Python callback per hypothesis returning the allowed tokens of its prefix, a full-
    # vocab -inf mask filled per hypothesis, then topk over (beams x vocab) like HF beam search.
    allowed = _prefix_table(trie, layout)

    def run_hf_callback():
        scores = torch.zeros(R, 1)
        prefixes = [[()] for _ in range(R)]
        for l in range(layout.num_levels):
            full, _ = lps[l]
            b_in = full.shape[1]
            mask = torch.full((R * b_in, V), -math.inf)
            for r in range(R):
                for b in range(b_in):
                    toks = allowed.get(prefixes[r][b], [])
                    if toks:
                        mask[r * b_in + b, toks] = 0
            cand = (full.reshape(R * b_in, V) + mask).reshape(R, b_in, V) + scores.unsqueeze(-1)
            top = torch.topk(cand.reshape(R, -1), 2 * B, dim=1)  # HF keeps 2 * num_beams candidates
            vals, idx = top.values[:, :B], top.indices[:, :B]
            par, tok = idx // V, idx % V
            prefixes = [[prefixes[r][int(par[r, j])] + (int(tok[r, j]),) for j in range(B)] for r in range(R)]
            scores = vals
        return scores

    torch.set_num_threads(1)
    out = {"rows": R, "beams": B, "levels": layout.num_levels, "threads": 1}
    for name, fn, n in (("cpp_ext", run_ext, reps), ("reference", run_ref, max(2, reps // 3)),
                        ("dense_mask_torch", run_dense, max(2, reps // 3)),
                        ("hf_style_callback", run_hf_callback, 2)):
        wall, cpu = _timeit(fn, n)
        out[name + "_ms"] = 1e3 * float(np.median(wall))
        out[name + "_cpu_ms"] = 1e3 * float(np.median(cpu))
    out["anchors_measured_before_ms"] = {"hf_style_callback": 243.0, "dense_mask_torch": 13.0}
    out["speedup_cpu_time_vs_dense_mask"] = out["dense_mask_torch_cpu_ms"] / out["cpp_ext_cpu_ms"]
    out["speedup_cpu_time_vs_hf_callback"] = out["hf_style_callback_cpu_ms"] / out["cpp_ext_cpu_ms"]
    # the ext and the reference must select the same nodes
    out["ext_equals_reference"] = bool(torch.equal(torch.from_numpy(run_ext()), run_ref()))
    return out


def _prefix_table(trie: Trie, layout: TokenLayout) -> dict:
    """{decoder prefix (tuple of generated tokens, without the start token): allowed next tokens}."""
    codes = trie.codes_of_rows(torch.arange(trie.max_row() + 1))
    codes = codes[(codes >= 0).all(1)]
    toks = layout.codes_to_tokens(codes).tolist()
    table: dict = {}
    for t in toks:
        for l in range(len(t)):
            table.setdefault(tuple(t[:l]), set()).add(t[l])
        table.setdefault(tuple(t), set()).add(layout.eos_id)
    return {k: sorted(v) for k, v in table.items()}


# ---- the compute floor -------------------------------------------------------------------------------
def forward_flops(cfg, rows: int, enc_len: int, beams: int, levels: int, eos: bool = True) -> float:
    """Floating-point operations (2 per multiply-add) of one generate call's model forward: the
    encoder on rows x enc_len tokens, the cross-attention K/V, one decoder step on ``rows`` (the
    start token) and ``levels`` (with eos; else levels - 1) steps on rows x beams, each with the
    full-vocabulary head.  Matmuls and attention products only (norms, softmax: O(d) per token)."""
    d, inner, dff, V = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    enc_tok = cfg.num_encoder_layers * (4 * d * inner + 2 * d * dff + 2 * enc_len * inner)
    cross_kv = cfg.num_decoder_layers * 2 * d * inner

    def dec_tok(t):  # one decoder token at position t
        return cfg.num_decoder_layers * (6 * d * inner + 2 * (t + 1) * inner + 2 * enc_len * inner
                                         + 2 * d * dff) + d * V
    steps = levels if eos else levels - 1
    macs = rows * enc_len * (enc_tok + cross_kv) + rows * dec_tok(0)
    macs += sum(rows * beams * dec_tok(t) for t in range(1, steps + 1))
    return 2.0 * macs


def sgemm_gflops(threads: int, reps: int = 5) -> float:
    """Measured float32 matmul throughput on the decoder's FFN shape (5120 x 128 x 1024), the best
    case for these layer sizes."""
    torch.set_num_threads(threads)
    a, b = torch.randn(5120, 128), torch.randn(128, 1024)
    a @ b
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 5120 * 128 * 1024 / best / 1e9


# ---- end to end --------------------------------------------------------------------------------------
def _percentiles(ts):
    a = np.asarray(ts) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": len(ts)}


def hf_generate(hf, table, layout, ids, mask, num_beams, k, allowed):
    """HF constrained beam search -> item rows int64 (R, k) (-1 when HF returned an invalid ID)."""
    L = layout.num_levels

    def prefix_fn(batch_id, input_ids):
        # input_ids: (t,) decoder tokens so far, starting with the decoder start token.
        return allowed.get(tuple(input_ids[1:].tolist()), [layout.pad_id])

    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask.long(), num_beams=num_beams,
                          num_return_sequences=k, prefix_allowed_tokens_fn=prefix_fn, length_penalty=0.0,
                          early_stopping=True, max_new_tokens=L + 1, do_sample=False)
    seqs = out[:, 1:1 + L]
    return _seqs_to_rows(seqs, table, layout).view(ids.shape[0], k)


def _seqs_to_rows(seqs: torch.Tensor, table, layout) -> torch.Tensor:
    """Generated ID tokens int64 (N, T) (T >= num_levels; the first num_levels are the ID) -> IdTable
    rows int64 (N,), -1 where the tokens are not a valid ID of the catalogue."""
    L = layout.num_levels
    rows = torch.full((seqs.shape[0],), -1, dtype=torch.int64)
    if seqs.shape[1] < L:
        return rows
    offs = torch.tensor([layout.level_offset(l) for l in range(L)])
    codes = seqs[:, :L] - offs
    ok = ((codes >= 0) & (codes < torch.tensor(layout.level_sizes))).all(1)
    if ok.any():
        rows[ok] = torch.as_tensor(table.rows_of_codes(codes[ok]), dtype=torch.int64)
    return rows


# ---- CTranslate2: the fastest engine a service could pick instead (it cannot constrain) ------------
def ct2_convert(model, layout, workdir: str) -> str:
    """Convert ``model`` (tiger_fast T5) with ``ctranslate2.converters.TransformersConverter`` via
    ``T5.to_hf()`` and a word-level tokenizer whose token i is the string "t<i>" (pad and eos get
    T5's names): -> the CTranslate2 model directory (float32 weights; int8 is chosen at load)."""
    import ctranslate2
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hf_dir = os.path.join(workdir, "hf")
    model.to_hf().save_pretrained(hf_dir)
    vocab = {_ct2_token(layout, i): i for i in range(layout.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<pad>").save_pretrained(hf_dir)
    out = os.path.join(workdir, "ct2")
    ctranslate2.converters.TransformersConverter(hf_dir).convert(out, force=True)
    return out


def _ct2_token(layout, i: int) -> str:
    return "<pad>" if i == layout.pad_id else "</s>" if i == layout.eos_id else f"t{i}"


def ct2_generate(translator, layout, table, ids, mask, num_beams, k) -> torch.Tensor:
    """CTranslate2 unconstrained beam search (its Python API has no per-step logits hook for beam
    search) with HF's settings (no length penalty, num_levels + 1 tokens) -> rows int64 (R, k), -1
    where the generated tokens are not a valid ID."""
    src = [[_ct2_token(layout, int(t)) for t, m in zip(r, mr) if m] for r, mr in zip(ids.tolist(), mask.tolist())]
    res = translator.translate_batch(src, beam_size=num_beams, num_hypotheses=k, length_penalty=0.0,
                                     max_decoding_length=layout.num_levels + 1, return_scores=True)
    L = layout.num_levels
    seqs = torch.full((len(src) * k, L), -1, dtype=torch.int64)
    for r, h in enumerate(res):
        for j, toks in enumerate(h.hypotheses[:k]):
            t = [int(x[1:]) if x.startswith("t") else -1 for x in toks[:L]]
            seqs[r * k + j, :len(t)] = torch.tensor(t, dtype=torch.int64)
    return _seqs_to_rows(seqs, table, layout).view(len(src), k)


# ---- end to end --------------------------------------------------------------------------------------
def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |top-k(a) & top-k(b)| / k over rows (item ids int64 (R, k))."""
    k = a.shape[1]
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)]))


def end_to_end(args, layout, table, trie) -> dict:
    """Every contender alternated within each repetition (so load changes hit all alike); the
    first repetition is a warm-up."""
    import tempfile

    from tiger_fast.decoding import encoder_batch
    from tiger_fast.generate import generate as tf_generate
    from tiger_fast.t5 import T5, load_t5, paper_config

    if args.checkpoint:
        model, ck_layout = load_t5(args.checkpoint)
        ck_layout.check_compatible(layout, "checkpoint layout")
    else:
        model = T5(paper_config(layout), seed=0)
    model.eval()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(1)
    item_ids = table.item_ids.numpy()
    results = {"threads": args.threads, "num_beams": args.beams, "k": args.k, "precisions": list(args.precisions),
               "model_parameters": int(model.num_parameters()), "runs": []}
    gf = sgemm_gflops(args.threads)
    results["sgemm_gflops"] = gf
    hf = None
    if not args.no_hf:
        hf = model.to_hf().eval()
        allowed = _prefix_table(trie, layout)
    translators = {}
    if args.ct2:
        import ctranslate2

        tmp = tempfile.mkdtemp(prefix="tiger_fast_ct2_")
        path = ct2_convert(model, layout, tmp)
        for ct in ("float32", "int8"):  # int8 = int8 weights, float32 activations (int8_float32)
            translators[f"ct2_{ct}"] = ctranslate2.Translator(path, device="cpu", compute_type=ct,
                                                              intra_threads=args.threads, inter_threads=1)
        results["ctranslate2"] = {"version": ctranslate2.__version__,
                                  "compute_types": {n: t.compute_type for n, t in translators.items()}}
    temps = {"beam": None, "per_level": (2.0, 1.5, 1.0, 0.5)}
    ours_name = {"fp32": "cpu", "bf16": "cpu_bf16", "int8": "cpu_int8"}
    for batch in args.batches:
        hist = [rng.choice(item_ids, 20, replace=False) for _ in range(batch)]
        users = rng.integers(0, 1_000_000, batch).tolist()
        ids, mask = encoder_batch(layout, table, hist, users, 20, torch.device("cpu"))
        reps = args.reps_small if batch <= 8 else args.reps_large
        for tname, T in temps.items():
            contenders = {}
            for prec in args.precisions:
                contenders[ours_name[prec]] = (lambda prec=prec: tf_generate(
                    model, hist, table, user_ids=users, k=args.k, num_beams=args.beams, temperature=T, seed=3,
                    backend="cpu", trie=trie, precision=prec).item_ids)
            if not args.no_reference:
                contenders["reference"] = lambda: tf_generate(model, hist, table, user_ids=users, k=args.k,
                                                              num_beams=args.beams, temperature=T, seed=3,
                                                              backend="reference", trie=trie).item_ids
            if hf is not None and T is None:
                contenders["hf_generate"] = lambda: _rows_to_items(
                    hf_generate(hf, table, layout, ids, mask, args.beams, args.k, allowed), table)
            if T is None:
                for name, tr in translators.items():
                    contenders[name] = (lambda tr=tr: _rows_to_items(
                        ct2_generate(tr, layout, table, ids, mask, args.beams, args.k), table))
            lat = {n: [] for n in contenders}
            cpu = {n: [] for n in contenders}  # process CPU seconds (all threads): robust to preemption
            out = {}
            for i in range(reps + 1):  # repetition 0 = warm-up
                for name, fn in contenders.items():
                    if i > 0 and name in ("hf_generate", "reference") and batch > 8 and i > max(1, reps // 2):
                        continue  # the slow baselines: half the repetitions at large batch
                    c0, t0 = time.process_time(), time.perf_counter()
                    out[name] = fn()
                    if i > 0:
                        lat[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.process_time() - c0)
            run = {"batch": batch, "temperature": tname, "loadavg_after": list(os.getloadavg()),
                   "backends": {n: {**_percentiles(v), "requests_per_s": batch * len(v) / sum(v),
                                    "cpu_ms_per_call": 1e3 * float(np.mean(cpu[n]))}
                                for n, v in lat.items()}}
            base = out.get("cpu")
            if base is not None and "reference" in out:
                run["cpu_equals_reference_ids"] = bool(torch.equal(base, out["reference"]))
            if base is not None:
                for prec in ("bf16", "int8"):
                    n = ours_name[prec]
                    if n in out:
                        run[f"{n}_identical_lists_vs_fp32"] = float((out[n] == base).all(1).float().mean())
                        run[f"{n}_mean_overlap_at_k_vs_fp32"] = _overlap(out[n], base)
            if "hf_generate" in out and base is not None:
                run["hf_mismatched_lists"] = int((base != out["hf_generate"]).any(1).sum())
                run["hf_mismatched_entries"] = int((base != out["hf_generate"]).sum())
                run["hf_invalid_ids"] = int((out["hf_generate"] < 0).sum())
            for name in translators:
                if name in out:
                    run[f"{name}_valid_id_fraction"] = float((out[name] >= 0).float().mean())
            # The floor: this batch's forward FLOPs at the measured best-case sgemm rate.
            fl = forward_flops(model.config, batch, 1 + layout.num_levels * 20, args.beams, layout.num_levels)
            run["forward_gflop"] = fl / 1e9
            run["forward_floor_ms"] = 1e3 * fl / (gf * 1e9)
            run["ratios"] = _ratios(run["backends"])
            results["runs"].append(run)
            print(json.dumps(run, indent=None, default=float), flush=True)
    return results


def _rows_to_items(rows: torch.Tensor, table) -> torch.Tensor:
    return torch.where(rows >= 0, table.item_ids[rows.clamp(min=0)], torch.full_like(rows, -1))


def _ratios(b: dict) -> dict:
    """The issue's comparisons.  *_requests_per_s: ours / the other's requests/s (> 1: ours is
    faster); *_p50: ours / the other's p50 latency (< 1: ours is faster); *_cpu_time: ours / the
    other's process CPU time per call (< 1: ours does less work; robust on a loaded machine).  "fastest" is our mode
    with the most requests/s in this run."""
    ours = [n for n in ("cpu", "cpu_bf16", "cpu_int8") if n in b]
    if not ours:
        return {}
    fastest = max(ours, key=lambda n: b[n]["requests_per_s"])
    out = {"fastest_mode": fastest}
    for key, mine, other in (("cpu_vs_ct2_float32", "cpu", "ct2_float32"), ("fastest_vs_ct2_int8", fastest, "ct2_int8"),
                             ("cpu_vs_hf_generate", "cpu", "hf_generate"), ("cpu_vs_reference", "cpu", "reference"),
                             ("fastest_vs_cpu", fastest, "cpu")):
        if mine in b and other in b:
            out[key + "_requests_per_s"] = b[mine]["requests_per_s"] / b[other]["requests_per_s"]
            out[key + "_p50"] = b[mine]["p50_ms"] / b[other]["p50_ms"]
            out[key + "_cpu_time"] = b[mine]["cpu_ms_per_call"] / b[other]["cpu_ms_per_call"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch/OpenMP threads end to end")
    p.add_argument("--checkpoint", help="a save_t5 checkpoint (default: random weights, paper config)")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "int8"],
                   help="tiger_fast.generate precision modes to time (names cpu, cpu_bf16, cpu_int8)")
    p.add_argument("--ct2", action="store_true",
                   help="add CTranslate2 float32 and int8 (unconstrained beam search) as outside anchors")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--no-reference", action="store_true", help="skip the plain-torch reference backend")
    p.add_argument("--reps-small", type=int, help="repetitions at batch <= 8 (default 30, --quick 5)")
    p.add_argument("--reps-large", type=int, help="repetitions at larger batches (default 5, --quick 1)")
    p.add_argument("--skip-e2e", action="store_true", help="selection-alone benchmark only")
    p.add_argument("--skip-selection", action="store_true")
    p.add_argument("--no-retain-memory", action="store_true",
                   help="leave glibc malloc as it is (default: tiger_fast.cpu_memory.retain_freed_memory(), "
                        "for every contender alike)")
    args = p.parse_args(argv)
    retained = False
    if not args.no_retain_memory:
        from tiger_fast.cpu_memory import retain_freed_memory
        retained = retain_freed_memory()
    args.reps_small = args.reps_small or (5 if args.quick else 30)
    args.reps_large = args.reps_large or (1 if args.quick else 5)

    layout, table, trie = make_catalogue()
    out = {"benchmark": "generate", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                "torch": torch.__version__,
                                                "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
                                                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                                                "malloc_retains_freed_memory": retained},
           "catalogue": {"items": len(table), "trie_nodes": trie.num_nodes()}}
    if not args.skip_selection:
        out["selection_alone"] = selection_alone(trie, layout, reps=5 if args.quick else 20)
        print(json.dumps(out["selection_alone"]), flush=True)
    if not args.skip_e2e:
        out["end_to_end"] = end_to_end(args, layout, table, trie)
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
