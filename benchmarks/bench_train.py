"""Retriever training throughput on Amazon Beauty: uniform random batches (the paper) vs
length-bucketed batches (TrainConfig.length_buckets), side by side in one run (not a test).

Beauty's training histories average 28 encoder tokens but a random batch pads to its longest (81),
so most encoder work is padding.  This times ``--steps`` optimizer steps of the chosen T5 for each
setting on the same examples and reports steps/s, examples/s, the padded-to-real token ratio, and
the wall time the paper's schedule (200k steps x 256) would take at that rate.

    python benchmarks/bench_train.py --json train.json                 # paper-size T5, batch 256
    python benchmarks/bench_train.py --model small --batch-size 64 --steps 200
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SMALL = {"d_model": 64, "num_heads": 4, "d_kv": 16, "d_ff": 256, "num_encoder_layers": 2, "num_decoder_layers": 2}


def padded_ratio(lengths: torch.Tensor, order, batch_size: int) -> float:
    """Encoder tokens computed (each batch padded to its longest) / real tokens, one epoch."""
    p = order.perm(0)
    padded = sum(int(lengths[b].max()) * len(b) for b in torch.split(p, batch_size))
    return padded / int(lengths.sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="Beauty directory (default: $TIGER_FAST_DATA or ../shared/data)")
    p.add_argument("--model", default="paper", choices=["paper", "small"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting (after 2 warm-up steps)")
    p.add_argument("--buckets", type=int, nargs="+", default=[0, 64], help="length_buckets settings to compare")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from tiger_fast.data import default_data_dir, load_beauty
    from tiger_fast.ids import IdTable
    from tiger_fast.layout import TokenLayout
    from tiger_fast.sequences import leave_one_out, tokenize_split
    from tiger_fast.t5 import T5, paper_config
    from tiger_fast.train import TrainConfig, _Order, train_retriever

    ds = load_beauty(a.data or default_data_dir() / "amazon-beauty-2014")
    layout = TokenLayout()
    # Throughput does not depend on which IDs the items have: random (unique) codes will do.
    rng = np.random.default_rng(0)
    table = IdTable.from_rq_codes(layout, ds.item_ids, rng.integers(0, 256, size=(len(ds.item_ids), 3)))
    ex = tokenize_split(leave_one_out(ds).train, ds, layout, table)
    lengths = ex.attention_mask.sum(1)
    cfg_t5 = paper_config(layout, **({} if a.model == "paper" else SMALL))
    out = {"benchmark": "train", "model": a.model, "parameters": None, "batch_size": a.batch_size,
           "threads": a.threads, "examples": len(lengths), "mean_encoder_tokens": float(lengths.float().mean()),
           "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None, "runs": []}
    for w in a.buckets:
        model = T5(cfg_t5, seed=0)
        out["parameters"] = model.num_parameters()
        ratio = padded_ratio(lengths, _Order(len(lengths), 0, lengths=lengths, window=w, batch_size=a.batch_size),
                             a.batch_size)
        train_retriever(model, ex, config=TrainConfig(batch_size=a.batch_size, max_steps=2, length_buckets=w,
                                                      eval_every=10 ** 9), progress=False)  # warm-up
        model = T5(cfg_t5, seed=0)
        t0 = time.perf_counter()
        train_retriever(model, ex, config=TrainConfig(batch_size=a.batch_size, max_steps=a.steps, length_buckets=w,
                                                      eval_every=10 ** 9), progress=False)
        dt = time.perf_counter() - t0
        sps = a.steps / dt
        run = {"length_buckets": w, "steps": a.steps, "seconds": dt, "steps_per_s": sps,
               "examples_per_s": sps * a.batch_size, "padded_to_real_encoder_tokens": ratio,
               "paper_schedule_hours": 200_000 * 256 / (sps * a.batch_size) / 3600}
        out["runs"].append(run)
        print(json.dumps(run), flush=True)
    if len(out["runs"]) > 1:
        out["speedup_vs_first"] = [r["steps_per_s"] / out["runs"][0]["steps_per_s"] for r in out["runs"]]
        print("speed-up vs", a.buckets[0], ":", out["speedup_vs_first"])
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
