"""Recommendation quality under a wall-time budget, from nothing, on any dataset (not a test).

    python benchmarks/quality.py --data beauty --preset cpu --budget-min 120 --json beauty.json

One command: dataset -> MiniLM item embeddings -> RQ-VAE -> semantic IDs -> TIGER retriever and
SASRec trained side by side (one process and ``--threads`` threads each, the same training
budget, each validated every few minutes and keeping its best checkpoint) -> test evaluation of
TIGER, SASRec and popularity on all users over the full catalogue (leave-one-out, the paper's
protocol: trained on all items).  ``--budget-min`` is the wall time of the whole command; the
training budget is what is left after the IDs are built, minus ``--eval-reserve-min`` for the
final evaluation.

The JSON has top-level ``tiger``, ``sasrec``, ``popularity`` (each ``recall@5``, ``ndcg@5``,
``recall@10``, ``ndcg@10``, ``num_examples``), ``wall_s`` (the whole run), the recipe, the
learning curves (validation Recall@10 / NDCG@10 against wall minutes) and, with ``--plot``, a PNG
of them.

Recipe search (``--split valid --set FIELD=VALUE ...``): trains TIGER only (``--no-sasrec``) with
PipelineConfig overrides and reports validation metrics, never test ones; ``--ids`` reuses an ID
table so ablations of the retriever share the same semantic IDs.

Paper (Rajput et al. 2023, Table 2, Beauty): R@5 .0454, N@5 .0321, R@10 .0648, N@10 .0384.
"""
from __future__ import annotations

import argparse
import ast
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiger_fast.atomic import write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

PAPER_BEAUTY = {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384}
KEYS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "entropy@10", "coverage@10", "num_examples")


def _metrics(res: dict) -> dict:
    return {k: res[k] for k in KEYS if k in res}


def _sasrec_child(spec: str, budget_s: float, threads: int, seed: int, eval_every_s: float, split: str,
                  out_path: str) -> None:
    """SASRec in its own process (its own core): train within ``budget_s``, evaluate ``split``."""
    torch.set_num_threads(threads)
    from tiger_fast.cli import load_dataset_spec
    from tiger_fast.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec

    ds = load_dataset_spec(spec)
    t0 = time.perf_counter()
    model, hist = train_sasrec(ds, SASRecConfig(time_budget_s=budget_s, eval_every_s=eval_every_s, seed=seed),
                               progress=False)
    train_s = time.perf_counter() - t0
    res = evaluate_sasrec(model, ds, split=split)
    out = {"metrics": _metrics(res), "train_s": train_s, "history": hist}
    write_json(out_path, out, indent=None)


def _parse_set(items) -> dict:
    """['lr=0.003', 't5={"dropout": 0.0}'] -> {'lr': 0.003, 't5': {...}} (Python literals)."""
    out = {}
    for it in items or ():
        if "=" not in it:
            raise SystemExit(f"--set expects FIELD=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="beauty", help="dataset SPEC, as the CLI's (beauty, scientific, tables:I:J, ...)")
    p.add_argument("--preset", default="cpu", help="training recipe (tiger_fast.pipeline.RECIPES)")
    p.add_argument("--budget-min", type=float, default=120.0, help="wall-time budget of the whole command, minutes")
    p.add_argument("--eval-reserve-min", type=float, default=6.0, help="budget kept for the final evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each of the two trainings")
    p.add_argument("--split", default="test", choices=["test", "valid"], help="valid: recipe search, no test numbers")
    p.add_argument("--set", nargs="*", default=None, metavar="FIELD=VALUE", help="PipelineConfig overrides")
    p.add_argument("--ids", default=None, help="reuse this ID table (Parquet) instead of training an RQ-VAE")
    p.add_argument("--save-ids", default=None, help="write the ID table here")
    p.add_argument("--save-model", default=None, help="write the trained retriever here")
    p.add_argument("--no-sasrec", action="store_true")
    p.add_argument("--checkpoint-dir", default=None, help="resumable retriever checkpoints")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tiger_fast/embeddings"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="PNG of the learning curves")
    p.add_argument("--plot-training", default=None, metavar="PNG",
                   help="PNG of TIGER's training loss and validation metrics (tiger-fast train --plot's picture)")
    p.add_argument("--per-user", default=None, metavar="NPZ",
                   help="save TIGER's per-user Recall@10 / NDCG@10 (for paired comparisons, benchmarks/ablations.py)")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)

    from tiger_fast.cli import load_dataset_spec
    from tiger_fast.embed import embed_dataset
    from tiger_fast.evaluate import evaluate_popularity, evaluate_retriever
    from tiger_fast.ids import IdTable, semantic_id_report
    from tiger_fast.pipeline import build_semantic_ids, leaf_categories_by_row, recipe, train_tiger

    if a.budget_min * 60 - a.eval_reserve_min * 60 < 120:
        raise SystemExit(f"--budget-min {a.budget_min:g} leaves under 2 minutes after the {a.eval_reserve_min:g} min "
                         "evaluation reserve: too short to build IDs, train and validate once; raise it")
    if a.plot or a.plot_training:  # refuse now, not after the whole run
        from tiger_fast.plots import require_matplotlib
        try:
            require_matplotlib()
        except ImportError as e:
            raise SystemExit(f"--plot: {e}") from None
    overrides = _parse_set(a.set)
    try:
        cfg = recipe(a.preset, seed=a.seed, cache_dir=a.cache_dir, **overrides)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--preset/--set: {e}") from None
    out: dict = {"benchmark": "quality", "data": a.data, "preset": a.preset, "overrides": overrides,
                 "config": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},  # what actually ran
                 "budget_min": a.budget_min, "threads_per_model": a.threads, "split": a.split,
                 "loadavg_start": os.getloadavg()}

    def say(msg):
        print(f"[{time.perf_counter() - t_start:7.0f} s] {msg}", flush=True)

    def save():
        out["wall_s"] = time.perf_counter() - t_start
        write_json(a.json, out)

    ds = load_dataset_spec(a.data)
    out["dataset"] = ds.summary()
    say(f"{a.data}: {json.dumps(out['dataset'])}")
    if a.ids:
        table = IdTable.from_parquet(a.ids)
        out["ids_from"] = a.ids
    else:
        t = time.perf_counter()
        emb = embed_dataset(ds, cfg.embed_model, cache_dir=cfg.cache_dir, progress=False)
        out["embed_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _, table, rq_hist = build_semantic_ids(ds, emb, cfg, progress=False)
        out["rqvae_s"] = time.perf_counter() - t
        out["semantic_ids"] = {**table.report(), **semantic_id_report(table, leaf_categories_by_row(ds, table))}
        say(f"embeddings {emb.shape} in {out['embed_s']:.0f} s; IDs in {out['rqvae_s']:.0f} s: "
            f"{json.dumps(out['semantic_ids'], default=str)[:300]}")
    if a.save_ids:
        table.to_parquet(a.save_ids)

    train_s = a.budget_min * 60 - (time.perf_counter() - t_start) - a.eval_reserve_min * 60
    if train_s < 60:
        raise SystemExit(f"--budget-min {a.budget_min}: only {train_s:.0f} s would be left for training after "
                         f"building the IDs and reserving {a.eval_reserve_min} min for evaluation; raise it")
    out["train_budget_s"] = train_s
    cfg.time_budget_s = train_s
    if cfg.eval_every_s is not None and cfg.eval_every_s > train_s:
        raise SystemExit(f"the training budget ({train_s:.0f} s) is shorter than one validation interval "
                         f"(eval_every_s = {cfg.eval_every_s:.0f} s): raise --budget-min or --set eval_every_s=...")
    save()

    child = None
    sas_path = a.json + ".sasrec.json"
    if not a.no_sasrec:
        if os.path.exists(sas_path):
            os.remove(sas_path)
        child = mp.get_context("spawn").Process(
            target=_sasrec_child, args=(a.data, train_s, a.threads, a.seed, cfg.eval_every_s or 300.0, a.split,
                                        sas_path))
        child.start()
        say(f"SASRec started in process {child.pid} with the same {train_s / 60:.1f} min budget")

    t = time.perf_counter()
    model, hist = train_tiger(ds, table, cfg, checkpoint_dir=a.checkpoint_dir, progress=False)
    out["tiger_training"] = {"seconds": time.perf_counter() - t, "steps": hist.get("final_step"),
                             "stopped": hist.get("stopped"), "planned_steps": hist.get("planned_steps"),
                             "steps_per_s": hist.get("steps_per_s"), "best_step": hist.get("best_step"),
                             "epochs": (hist.get("final_step") or 0) * cfg.batch_size / max(1, _num_train(ds)),
                             "parameters": sum(p.numel() for p in model.parameters()),
                             "warnings": hist.get("warnings")}
    out["curves"] = {"tiger": [[e["wall_s"] / 60, e.get("recall@10"), e.get("ndcg@10")] for e in hist["evals"]]}
    out["tiger_history"] = {"loss": hist["loss"], "evals": hist["evals"]}
    say(f"TIGER trained: {out['tiger_training']}")
    save()
    if a.save_model:
        from tiger_fast.t5 import save_t5
        save_t5(model, table.layout, a.save_model)

    t = time.perf_counter()
    res = evaluate_retriever(model, ds, table, split=a.split, k=10, seed=a.seed, return_rankings=True)
    out["tiger"] = {**_metrics(res), "eval_s": time.perf_counter() - t}
    if a.per_user:  # per-user hits, for paired comparisons between runs on the same split
        from tiger_fast.metrics import ndcg_at_k, recall_at_k
        np.savez_compressed(a.per_user, users=res["users"].numpy(),
                            recall10=recall_at_k(res["rankings"], res["targets"], 10, reduction="none").numpy(),
                            ndcg10=ndcg_at_k(res["rankings"], res["targets"], 10, reduction="none").numpy())
    out["popularity"] = _metrics(evaluate_popularity(ds, split=a.split))
    say(f"TIGER {a.split}: {out['tiger']}\npopularity: {out['popularity']}")
    save()

    if child is not None:
        child.join()
        if child.exitcode != 0 or not os.path.exists(sas_path):
            out["sasrec"] = {"error": f"SASRec process exited with {child.exitcode}"}
        else:
            with open(sas_path) as f:
                sas = json.load(f)
            os.remove(sas_path)
            out["sasrec"] = {**sas["metrics"], "train_s": sas["train_s"]}
            out["curves"]["sasrec"] = [[e["wall_s"] / 60, e.get("recall@10"), e.get("ndcg@10")]
                                       for e in sas["history"].get("evals", [])]
        say(f"SASRec {a.split}: {out['sasrec']}")
    if a.data.startswith("beauty") and a.split == "test":
        out["paper"] = PAPER_BEAUTY
    out["loadavg_end"] = os.getloadavg()
    save()
    if a.plot:
        from tiger_fast.plots import plot_learning_curves
        plot_learning_curves({name: [(m, r) for m, r, _ in pts] for name, pts in out["curves"].items()}, a.plot)
        say(f"learning curves -> {a.plot}")
    if a.plot_training:
        from tiger_fast.plots import plot_training
        hist_all = {**hist, "final_step": out["tiger_training"]["steps"]}
        plot_training(hist_all, a.plot_training, title=f"{a.data}, {a.preset} preset (benchmarks/quality.py)")
        say(f"training curves -> {a.plot_training}")
    say(f"done in {out['wall_s'] / 60:.1f} min; wrote {a.json}")


def _num_train(ds) -> int:
    from tiger_fast.sequences import leave_one_out

    return len(leave_one_out(ds).train)


if __name__ == "__main__":
    main()
