"""Per-level vs uniform temperatures, and how the semantic-ID design decides the outcome (not a test).

    python benchmarks/temperature_levels.py --json results/temperature_levels.json

The claim under test (issue 3): per-level temperatures, high for c0/c1 and low for c2/c3, give more
category entropy than T = 1 at a smaller Recall@10 loss than a uniform high temperature.  A low
temperature on a level can only change the result where that level offers a choice, so this
script measures the claim together with the trie's branching per level, for several codebook
layouts, on the embedded synthetic catalogue (2,000 items, 3,000 users, 240 leaf categories: the
demo's data, so it needs nothing downloaded).

For each layout: RQ-VAE IDs -> the demo's small T5 (tiger_fast.pipeline.demo_config) trained for
--budget-s -> beam search and sampled top-10 at uniform T = 1/2/3 and per-level (2, 2, .5, .5),
(3, 3, .5, .5) over all test users, averaged over --sample-seeds, with the paired per-user
comparisons of tiger_fast.evaluate.temperature_table (means and standard errors).  On Amazon Beauty
with the paper's 256-code levels, 82 % of the (c0, c1) prefixes have a single valid c2 and 99 % of
the (c0, c1, c2) prefixes a single valid c3 (README), which is why the claim could not show there.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiger_fast.atomic import write_json  # noqa: E402

import torch  # noqa: E402

TEMPERATURES = [None, 1.0, 2.0, 3.0, (2.0, 2.0, 0.5, 0.5), (3.0, 3.0, 0.5, 0.5)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", default="256,256,256;8,8,8",
                   help="';'-separated codebook layouts (codes per RQ-VAE level)")
    p.add_argument("--budget-s", type=float, default=240.0, help="retriever training wall time per layout")
    p.add_argument("--sample-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from tiger_fast.evaluate import evaluate_popularity, temperature_table
    from tiger_fast.ids import code_branching
    from tiger_fast.layout import TokenLayout
    from tiger_fast.pipeline import build_semantic_ids, demo_config, embeddings_for, train_tiger
    from tiger_fast.synthetic import synthetic_dataset

    cfg = demo_config(time_budget_s=a.budget_s)
    cfg.seed = a.seed
    ds = synthetic_dataset(seed=a.seed)
    emb = embeddings_for(ds, cfg, progress=False)
    pop = evaluate_popularity(ds, split="test")
    out = {"args": vars(a), "popularity_recall@10": pop["recall@10"], "layouts": []}
    t0 = time.perf_counter()
    for spec in a.layouts.split(";"):
        sizes = tuple(int(x) for x in spec.split(","))
        layout = TokenLayout(codebook_sizes=sizes)
        _, table, _ = build_semantic_ids(ds, emb, cfg, layout=layout, progress=False)
        model, hist = train_tiger(ds, table, cfg, progress=False)
        rows, claims = temperature_table(model, ds, table, TEMPERATURES, max_users=None,
                                         sample_seeds=tuple(a.sample_seeds))
        res = {"codebook_sizes": sizes, "branching": code_branching(table.codes),
               "training_steps": hist.get("final_step"), "table": rows, "claims": claims}
        out["layouts"].append(res)
        print(f"[{time.perf_counter() - t0:6.0f} s] codebooks {sizes}: {hist.get('final_step')} steps", flush=True)
        for b in res["branching"]:
            print(f"   level {b['level']}: {b['prefixes']:5d} prefixes, {b['mean_choices']:6.2f} choices, "
                  f"{100 * b['share_single_choice']:5.1f} % single", flush=True)
        for r in rows:
            t = "beam" if r["temperature"] is None else "/".join(f"{x:g}" for x in r["temperature"])
            print(f"   {t:>14}  Recall@10 {r['recall@10']:.4f}  Entropy@10 {r['entropy@10']:.3f}", flush=True)
        for c in claims:
            d, e = c["recall_minus_uniform_high"], c["entropy_minus_T1"]
            print(f"   {c['per_level']} vs {c['uniform_high']}: Recall@10 {d['mean']:+.4f} ± {d['se']:.4f}; "
                  f"entropy vs T=1 {e['mean']:+.3f} ± {e['se']:.3f}; claim holds: "
                  f"{c['more_entropy_than_T1'] and c['less_recall_loss_than_uniform_high']}", flush=True)
        write_json(a.json, out)
    print(f"popularity Recall@10 {pop['recall@10']:.4f}; wrote {a.json}")


if __name__ == "__main__":
    main()
