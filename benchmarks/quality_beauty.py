"""TIGER quality on Amazon Beauty under a compute budget (not a test).

    python benchmarks/quality_beauty.py --budget-min 60 --json results/quality_beauty.json

Pipeline: Beauty (TIGER-paper split) -> MiniLM item embeddings -> RQ-VAE (trained on the warm
items) -> semantic IDs -> paper-size T5 retriever trained for the time/step budget -> evaluation
on the leave-one-out test split: Recall@5/10, NDCG@5/10 (full catalogue), Entropy@10 (bits, leaf
categories) at beam search, uniform T = 1 / 1.5 / 2 / 3 and per-level T = (2, 2, .5, .5),
(3, 3, .5, .5), (2, 2, 1, 1), invalid-ID rate of unconstrained beam search, cold-start Recall@K with
the ε cap (decoding over the trie with the cold items, and over the warm trie) vs Semantic-KNN, and
the popularity baseline.  Writes everything to one JSON.  ``--save-model DIR`` keeps the retriever
and its IDs; ``--load-model DIR --sections ...`` re-evaluates a saved retriever without training;
``--init-model DIR`` keeps training a saved retriever (warm start: fresh optimizer, the --lr/--warmup
schedule) for another --budget-min.

Cold start shares the training run (to fit one budget): 5 % of the test-target items are held out
of every training sequence (paper protocol, tiger_fast.coldstart); the RQ-VAE and retriever never
see them; they get IDs from the trained RQ-VAE afterwards and join the trie without retraining.
The main metrics are computed on all test users with that same model and trie (cold items
included), so they are a little pessimistic compared with training on every item (~3.5 % of the
interactions are held out).

Paper (Rajput et al. 2023, Table 2, Beauty): R@5 .0454, N@5 .0321, R@10 .0648, N@10 .0384 after
200k steps at batch 256 on accelerators.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiger_fast.atomic import write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

PAPER = {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="Beauty directory (default: $TIGER_FAST_DATA or ../shared/data)")
    p.add_argument("--budget-min", type=float, default=60.0, help="retriever training wall-time budget, minutes")
    p.add_argument("--steps", type=int, default=200_000, help="retriever training step cap (paper: 200k)")
    p.add_argument("--rq-epochs", type=int, default=50)
    p.add_argument("--eval-users", type=int, default=None, help="test users to evaluate (default: all)")
    p.add_argument("--aux-users", type=int, default=1000, help="users for the temperature / invalid-rate tables")
    p.add_argument("--warmup", type=int, default=10_000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--length-buckets", type=int, default=0,
                   help="TrainConfig.length_buckets: 0 = uniform random batches (paper), W = sort windows of W batches by length")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tiger_fast/embeddings"))
    p.add_argument("--checkpoint-dir", default=None, help="resumable training checkpoints (default: none)")
    p.add_argument("--model", default="paper", choices=["paper", "small"],
                   help="paper: 4+4 layers, d_model 128 (TIGER); small: 2+2 layers, d_model 64, d_ff 256 (CPU budgets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="torch threads")
    p.add_argument("--save-model", default=None, help="also save the trained retriever here (save_t5)")
    p.add_argument("--sample-seeds", type=int, nargs="+", default=None,
                   help="sampling seeds averaged in the temperature table (several need --aux-users >= all users)")
    p.add_argument("--temperatures", default=None,
                   help="temperature settings for the table, ';'-separated, each 'beam', T or T0,T1,T2,T3")
    p.add_argument("--sections", default="tiger,temperature,invalid,coldstart",
                   help="evaluations to run after training (comma list of tiger, temperature, invalid, coldstart)")
    p.add_argument("--load-model", default=None,
                   help="skip training: evaluate this save_t5 retriever (the IDs are rebuilt with the same "
                        "seed and --threads, which reproduces them; checked against the saved IDs if present)")
    p.add_argument("--codebook-sizes", default="256,256,256",
                   help="codes per RQ-VAE level (paper: 256,256,256); smaller levels leave choices at c2/c3")
    p.add_argument("--init-model", default=None,
                   help="warm start: keep training this save_t5 retriever (its weights, a fresh optimizer, the "
                        "schedule of --lr/--warmup) for --budget-min; IDs rebuilt and checked as for --load-model")
    a = p.parse_args(argv)
    if a.load_model and a.init_model:
        raise SystemExit("--load-model (no training) and --init-model (more training) exclude each other")
    torch.set_num_threads(a.threads)

    from tiger_fast.coldstart import assign_cold_ids, evaluate_cold_start, split_cold_items
    from tiger_fast.data import default_data_dir, load_beauty
    from tiger_fast.embed import embed_dataset
    from tiger_fast.evaluate import (evaluate_popularity, evaluate_retriever, invalid_rate_unconstrained,
                                     temperature_table)
    from tiger_fast.ids import IdTable, code_branching, semantic_id_report
    from tiger_fast.layout import TokenLayout
    from tiger_fast.pipeline import PipelineConfig, leaf_categories_by_row, train_tiger
    from tiger_fast.rqvae import RQVAEConfig, RQVAETrainConfig, train_rqvae

    t0 = time.perf_counter()
    out: dict = {"args": vars(a), "paper": PAPER}

    def save():
        out["wall_s"] = time.perf_counter() - t0
        write_json(a.json, out)

    def say(msg):
        print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", flush=True)

    full = load_beauty(a.data or default_data_dir() / "amazon-beauty-2014")
    emb = embed_dataset(full, cache_dir=a.cache_dir)
    say(f"Beauty {full.summary()['users']} users / {full.num_items} items; embeddings {emb.shape}")

    split = split_cold_items(full, fraction=0.05, seed=a.seed)
    ds = split.dataset
    warm = np.asarray(split.warm_items)
    cold = np.asarray(split.cold_items)
    out["cold_split"] = {"cold_items": int(cold.size), "cold_test_users": int(len(split.cold_test_users))}

    layout = TokenLayout(codebook_sizes=tuple(int(x) for x in a.codebook_sizes.split(",")))
    t = time.perf_counter()
    rq, rq_hist = train_rqvae(emb[warm], RQVAEConfig(input_dim=emb.shape[1], codebook_sizes=layout.codebook_sizes),
                              RQVAETrainConfig(epochs=a.rq_epochs, seed=a.seed), progress=False)
    table = IdTable.from_rq_codes(layout, full.item_ids[warm], rq.semantic_codes(emb[warm]))
    assign_cold_ids(rq, emb[cold], full.item_ids[cold], table)
    out["rqvae"] = {"seconds": time.perf_counter() - t, "final": rq_hist[-1] if rq_hist else None}
    out["semantic_ids"] = {**table.report(), **semantic_id_report(table, leaf_categories_by_row(full, table))}
    # choices per trie level: where a level has one valid code, its temperature cannot matter
    out["trie_branching"] = code_branching(table.codes)
    say(f"semantic IDs: {json.dumps(out['semantic_ids'], default=str)[:400]}")
    save()

    if a.save_model:
        os.makedirs(a.save_model, exist_ok=True)
        table.to_parquet(os.path.join(a.save_model, "ids.parquet"))
    t5 = {} if a.model == "paper" else {"d_model": 64, "num_heads": 4, "d_kv": 16, "d_ff": 256,
                                        "num_encoder_layers": 2, "num_decoder_layers": 2}
    cfg = PipelineConfig(seed=a.seed, t5=t5, steps=a.steps, time_budget_s=a.budget_min * 60, batch_size=a.batch_size,
                         lr=a.lr, warmup_steps=a.warmup, eval_every=max(a.steps, 1), eval_users=0,
                         length_buckets=a.length_buckets)
    t = time.perf_counter()
    def load_saved(path):
        from tiger_fast.t5 import load_t5
        m, _ = load_t5(path)
        saved = os.path.join(path, "ids.parquet")
        if os.path.exists(saved):
            s = IdTable.from_parquet(saved)
            if not (torch.equal(s.codes, table.codes) and torch.equal(s.item_ids, table.item_ids)):
                raise SystemExit(f"the rebuilt IDs differ from {saved}; use the --threads and --seed of that run")
        return m

    if a.load_model:
        model = load_saved(a.load_model)
        out["training"] = {"loaded": a.load_model}
        hist = {}
    else:
        init = load_saved(a.init_model) if a.init_model else None
        model, hist = train_tiger(ds, table, cfg, checkpoint_dir=a.checkpoint_dir, progress=False, init_model=init)
    out["training"] = out.get("training") or {"seconds": time.perf_counter() - t, "steps": hist.get("final_step"),
                       "stopped": hist.get("stopped"), "steps_per_s": hist.get("steps_per_s"),
                       "examples_seen": (hist.get("final_step") or 0) * a.batch_size,
                       "last_loss": hist["loss"][-1] if hist.get("loss") else None,
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "init_model": a.init_model}
    say(f"training: {out['training']}")
    save()

    if a.save_model and not a.load_model:
        from tiger_fast.t5 import save_t5
        save_t5(model, layout, a.save_model)
    sections = {x.strip() for x in a.sections.split(",") if x.strip()}
    unknown = sections - {"tiger", "temperature", "invalid", "coldstart"}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}")
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "entropy@10", "coverage@10")
    t = time.perf_counter()
    if "tiger" in sections:
        res = evaluate_retriever(model, full, table, split="test", k=10, max_users=a.eval_users, seed=a.seed)
        out["tiger"] = {k: res[k] for k in keys} | {"num_examples": res["num_examples"],
                                                    "seconds": time.perf_counter() - t}
        pop = evaluate_popularity(full, split="test", max_users=a.eval_users, seed=a.seed)
        out["popularity"] = {k: pop[k] for k in keys if k in pop}
        say(f"TIGER {out['tiger']}\npopularity {out['popularity']}")
        save()

    # uniform temperatures and per-level ones (high on c0/c1 for category diversity, low on c2/c3
    # to keep the item choice inside a prefix precise)
    temps = (None, 1.0, 1.5, 2.0, 3.0, (2.0, 2.0, 0.5, 0.5), (3.0, 3.0, 0.5, 0.5), (2.0, 2.0, 1.0, 1.0))
    if a.temperatures:
        temps = tuple(None if x.strip() == "beam" else (float(x) if "," not in x else tuple(float(v) for v in x.split(",")))
                      for x in a.temperatures.split(";"))
    if "temperature" in sections:
        rows, claims = temperature_table(model, full, table, temps, max_users=a.aux_users,
                                         sample_seeds=tuple(a.sample_seeds or [a.seed]))
        out["entropy_vs_temperature"] = rows
        out["per_level_temperature_claims"] = claims
        say(f"entropy vs temperature: {rows}\nclaims: {claims}")
        save()

    if "invalid" in sections:
        inv = invalid_rate_unconstrained(model, full, table, k=10, max_users=a.aux_users, seed=a.seed)
        out["invalid_rate_unconstrained"] = inv
        say(f"invalid rate: {inv}")
        save()

    if "coldstart" in sections:
        # the paper protocol (decode over the trie with the cold items added) and the warm-trie variant
        cs = {mode: evaluate_cold_start(model, split, table, emb, ks=(5, 10), epsilon=0.1, decode_over=mode)
              for mode in ("all", "warm")}
        out["cold_start"] = cs
        say(f"cold start: {cs}")
        save()
    say(f"done; wrote {a.json}")


if __name__ == "__main__":
    main()
