"""Quality parity of generate's fast precision modes (bf16, int8) against the exact fp32 mode on a
trained retriever: per test user (leave-one-out), paired differences of hit@10 (= Recall@10 with
one target) and NDCG@10, mean +- 1 standard error; the share of top-10 lists identical to fp32
(IDs and order) and the mean overlap@10.  A mode whose Recall@10 drops by more than 1 SE is flagged
(``offer_as_default: false``).

    # a trained checkpoint (tiger-fast train) and its data / ID table:
    python benchmarks/generate_parity.py --data beauty --ids ids.parquet --model retriever/ --json FILE
    # no checkpoint at hand: train the demo-size synthetic model in-process first (tiger_fast.pipeline)
    python benchmarks/generate_parity.py --demo-budget 150 --json FILE
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_generate.py

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiger_fast.atomic import write_json  # noqa: E402


def per_user_metrics(rankings: torch.Tensor, targets: torch.Tensor, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """rankings int64 (R, >=k) internal item indices, targets int64 (R,) -> (hit@k, ndcg@k) float64 (R,)."""
    top = rankings[:, :k]
    match = top == targets[:, None]
    hit = match.any(1).double()
    pos = torch.where(match.any(1), match.double().argmax(1), torch.zeros_like(targets))
    ndcg = torch.where(match.any(1), 1.0 / torch.log2(pos.double() + 2.0), torch.zeros_like(hit))
    return hit.numpy(), ndcg.numpy()


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """mean(a - b) and its standard error over users."""
    d = a - b
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se}


def parity(model, dataset, table, precisions, *, max_users=None, batch_size=256, seed=0) -> dict:
    from tiger_fast.evaluate import evaluate_retriever

    out = {"users": None, "modes": {}}
    runs = {}
    for p in precisions:
        t0 = time.perf_counter()
        r = evaluate_retriever(model, dataset, table, split="test", k=10, batch_size=batch_size, max_users=max_users,
                               seed=seed, backend="cpu", return_rankings=True, precision=p)
        runs[p] = r
        out["modes"][p] = {"recall@10": r["recall@10"], "ndcg@10": r["ndcg@10"], "seconds": time.perf_counter() - t0}
        print(p, json.dumps(out["modes"][p]), flush=True)
    base = runs["fp32"]
    out["users"] = int(len(base["targets"]))
    h0, n0 = per_user_metrics(base["rankings"], base["targets"])
    for p in precisions:
        if p == "fp32":
            continue
        r = runs[p]
        assert torch.equal(r["targets"], base["targets"]) and torch.equal(r["users"], base["users"])
        h, n = per_user_metrics(r["rankings"], r["targets"])
        m = out["modes"][p]
        m["recall@10_vs_fp32"] = paired(h, h0)
        m["ndcg@10_vs_fp32"] = paired(n, n0)
        m["identical_lists"] = float((r["rankings"][:, :10] == base["rankings"][:, :10]).all(1).double().mean())
        m["mean_overlap@10"] = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10
                                              for a, b in zip(r["rankings"][:, :10], base["rankings"][:, :10])]))
        m["offer_as_default"] = bool(m["recall@10_vs_fp32"]["diff"] >= -m["recall@10_vs_fp32"]["se"])
    return out


def demo_model(budget_s: float, seed: int = 0):
    """The demo-size synthetic retriever (tiger_fast.pipeline.demo_config) trained for budget_s s."""
    from tiger_fast.pipeline import build_semantic_ids, demo_config, embeddings_for, train_tiger
    from tiger_fast.synthetic import synthetic_dataset

    cfg = demo_config(time_budget_s=budget_s)
    ds = synthetic_dataset(num_items=2000, num_users=3000, seed=cfg.seed)
    emb = embeddings_for(ds, cfg, progress=False)
    _, table, _ = build_semantic_ids(ds, emb, cfg, progress=False)
    model, hist = train_tiger(ds, table, cfg, progress=False)
    return model.eval(), ds, table, {"source": "demo-size synthetic (tiger_fast.pipeline.demo_config)",
                                      "items": 2000, "users": 3000, "train_seconds": budget_s,
                                      "final_step": hist.get("final_step"), "t5": cfg.t5}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset SPEC as for tiger-fast (with --ids and --model)")
    p.add_argument("--ids", help="ID table Parquet")
    p.add_argument("--model", help="retriever checkpoint directory (save_t5 / tiger-fast train --out .../model)")
    p.add_argument("--demo-budget", type=float, default=None,
                   help="instead: train the demo-size synthetic retriever for this many seconds")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    p.add_argument("--max-users", type=int, default=None, help="a random subset of test users (default: all)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if "fp32" not in a.precisions:
        p.error("--precisions must include fp32 (the reference of the paired comparison)")
    torch.set_num_threads(a.threads)
    if a.demo_budget is not None:
        model, ds, table, src = demo_model(a.demo_budget)
    else:
        if not (a.data and a.ids and a.model):
            p.error("give --data, --ids and --model, or --demo-budget")
        from tiger_fast.cli import load_dataset_spec
        from tiger_fast.ids import IdTable
        from tiger_fast.t5 import load_t5

        ds = load_dataset_spec(a.data)
        table = IdTable.from_parquet(a.ids)
        path = os.path.join(a.model, "model") if os.path.isdir(os.path.join(a.model, "model")) else a.model
        model, layout = load_t5(path)
        layout.check_compatible(table.layout, "--model layout vs --ids layout")
        src = {"source": "checkpoint", "data": a.data, "ids": a.ids, "model": path}
    res = {"benchmark": "generate_parity", "model": src, "threads": a.threads,
           "loadavg": list(os.getloadavg()), **parity(model, ds, table, a.precisions, max_users=a.max_users)}
    print(json.dumps(res, indent=2))
    if a.json:
        write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
