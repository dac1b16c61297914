"""Beam width of the constrained beam search, tuned on the VALIDATION split and then reported on test.

Recall@10 / NDCG@10 are taken from the top 10 of a beam of width W >= 10: a wider beam keeps IDs
whose first code scored lower but whose whole ID ends up in the top 10.  The width is a decoding
knob, so it is chosen like a recipe: every width is scored on validation (all users, paired
differences ± 1 SE against the first width), the widest gain only counts when it is beyond 2 SE,
and the chosen width is then evaluated once on test beside the first width.

    python benchmarks/beam_width.py --data beauty --ids ids.parquet --model retriever --widths 10 20 40 \\
        --json beam_width.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tiger_fast.atomic import write_json  # noqa: E402


def per_user(model, ds, table, split: str, width: int) -> dict:
    """Recall@10 / NDCG@10 per user (float (R,)) of beam width ``width`` on ``split``, plus the
    means and the decoding wall time."""
    from tiger_fast.evaluate import evaluate_retriever
    from tiger_fast.metrics import ndcg_at_k, recall_at_k

    t = time.perf_counter()
    res = evaluate_retriever(model, ds, table, split=split, k=width, return_rankings=True)
    top = res["rankings"][:, :10]
    r10 = recall_at_k(top, res["targets"], 10, reduction="none")
    n10 = ndcg_at_k(top, res["targets"], 10, reduction="none")
    return {"width": width, "recall@10": float(r10.mean()), "ndcg@10": float(n10.mean()),
            "num_examples": int(r10.numel()), "seconds": time.perf_counter() - t, "_r10": r10, "_n10": n10}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="beauty", help="dataset SPEC, as the CLI's")
    p.add_argument("--ids", required=True, help="ID table Parquet the model was trained on")
    p.add_argument("--model", required=True, help="retriever directory (save_t5 / tiger-fast train)")
    p.add_argument("--widths", type=int, nargs="+", default=[10, 20, 40], help="beam widths, first = baseline")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    if min(a.widths) < 10:
        raise SystemExit(f"--widths: every width must be >= 10 (Recall@10 needs 10 items), got {a.widths}")
    import torch

    from tiger_fast.cli import load_dataset_spec
    from tiger_fast.ids import IdTable
    from tiger_fast.metrics import paired_difference
    from tiger_fast.t5 import load_t5

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    ds, table = load_dataset_spec(a.data), IdTable.from_parquet(a.ids)
    model_dir = os.path.join(a.model, "model") if os.path.isdir(os.path.join(a.model, "model")) else a.model
    model, _ = load_t5(model_dir)
    out = {"benchmark": "beam_width", "data": a.data, "ids": a.ids, "model": a.model, "threads": a.threads,
           "loadavg_start": os.getloadavg(), "valid": []}

    def strip(r):
        return {k: v for k, v in r.items() if not k.startswith("_")}

    base = None
    for w in a.widths:
        r = per_user(model, ds, table, "valid", w)
        if base is None:
            base = r
        else:
            r["recall@10_vs_first"] = paired_difference(r["_r10"], base["_r10"])
            r["ndcg@10_vs_first"] = paired_difference(r["_n10"], base["_n10"])
        out["valid"].append(strip(r))
        print(f"valid W={w}: R@10 {r['recall@10']:.4f} N@10 {r['ndcg@10']:.4f} ({r['seconds']:.0f} s)"
              + (f"  dR@10 {r['recall@10_vs_first']['mean']:+.4f} ± {r['recall@10_vs_first']['se']:.4f}"
                 if "recall@10_vs_first" in r else ""), flush=True)
    # the first width unless another beats it on validation Recall@10 by more than 2 SE
    chosen = a.widths[0]
    best = max(out["valid"][1:], key=lambda r: r["recall@10"], default=None)
    if best is not None and best["recall@10_vs_first"]["mean"] > 2 * best["recall@10_vs_first"]["se"]:
        chosen = best["width"]
    out["chosen_on_valid"] = chosen
    test_base = per_user(model, ds, table, "test", a.widths[0])
    out["test"] = [strip(test_base)]
    if chosen != a.widths[0]:
        tc = per_user(model, ds, table, "test", chosen)
        tc["recall@10_vs_first"] = paired_difference(tc["_r10"], test_base["_r10"])
        tc["ndcg@10_vs_first"] = paired_difference(tc["_n10"], test_base["_n10"])
        out["test"].append(strip(tc))
    for r in out["test"]:
        print(f"test W={r['width']}: R@10 {r['recall@10']:.4f} N@10 {r['ndcg@10']:.4f} ({r['seconds']:.0f} s)", flush=True)
    out["wall_s"] = time.perf_counter() - t0
    out["loadavg_end"] = os.getloadavg()
    write_json(a.json, out)
    print(f"chosen on validation: W={chosen}; wrote {a.json}")
    return out


if __name__ == "__main__":
    main()
