"""The TIGER pipeline end to end, as plain functions the CLI, the demo and the benchmarks share:

    dataset -> item embeddings -> RQ-VAE -> semantic IDs (IdTable) -> retriever (T5) -> evaluation

Every step takes its inputs explicitly (seeds included) and returns what it built, so a caller can
stop anywhere, save the artefacts (``save_run``/``load_run``) and continue later.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from .atomic import jsonable, write_text
from .layout import TokenLayout
from .provenance import catalogue_fingerprint, retriever_provenance, rqvae_digest


# T5 shapes the CLI (`tiger-fast train --model-size`) and the benchmarks name; overrides of
# t5.paper_config.  "paper": the TIGER paper's 4 + 4 layers, d_model 128, 6 heads x 64, MLP 1024.
MODEL_PRESETS = {
    "paper": {},
    "small": {"d_model": 64, "num_heads": 4, "d_kv": 16, "d_ff": 256, "num_encoder_layers": 2,
              "num_decoder_layers": 2},
    "6x6": {"num_encoder_layers": 6, "num_decoder_layers": 6},
}


def model_preset(name: str) -> dict:
    """The T5 overrides of preset ``name`` (a key of MODEL_PRESETS), as a new dict."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return dict(MODEL_PRESETS[name])


@dataclass
class PipelineConfig:
    """Knobs of one end-to-end run (defaults: the paper's architecture, CPU-sized schedules).

    rq_epochs / rq_lr: RQ-VAE schedule with Adam (the paper's Adagrad lr 0.4 diverged on Beauty here;
    see RQVAETrainConfig.paper()); t5: overrides of the paper's T5 config
    (e.g. ``{"num_encoder_layers": 2}``); steps / time_budget_s: retriever training length;
    warmup_steps: constant-lr phase before inverse-sqrt decay (paper: 10k of 200k steps);
    eval_users: users sampled for validation during training (0 = no validation);
    length_buckets: TrainConfig.length_buckets (0 = uniform random batches);
    device: where the retriever trains ("cpu", "cuda", "cuda:1");
    schedule / weight_decay / label_smoothing / precision / eval_every_s / patience: the
    TrainConfig fields of the same names (see tiger_fast.train); dropout: the T5's dropout
    (None = ``t5``'s, else T5Config's 0.1), kept when the model shape changes."""
    seed: int = 0
    rq_epochs: int = 50
    rq_lr: float = 1e-3
    t5: dict = field(default_factory=dict)
    steps: int = 2000
    time_budget_s: float | None = None
    batch_size: int = 256
    lr: float = 0.01
    warmup_steps: int = 10_000
    eval_every: int = 500
    eval_users: int = 500
    backend: str = "auto"
    device: str = "cpu"
    embed_model: str | None = None
    cache_dir: str | None = None
    length_buckets: int = 0
    schedule: str = "rsqrt"
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    precision: str = "fp32"
    eval_every_s: float | None = None
    patience: int | None = None
    dropout: float | None = None


# Training recipes by name (`tiger-fast train --preset`, benchmarks/quality.py --preset): fields
# of PipelineConfig.  "paper": the TIGER paper's schedule (batch 256, lr 0.01 constant for 10k
# steps then 1/sqrt, 200k steps).  "cpu": what validation on Beauty chose for a CPU budget
# (benchmarks/quality.py; README "Quality"): the small T5, cosine decay sized to the time
# budget, validation every few minutes with early stopping.
RECIPES = {
    "paper": {"t5": {}, "batch_size": 256, "lr": 0.01, "warmup_steps": 10_000, "steps": 200_000,
              "schedule": "rsqrt", "weight_decay": 0.01, "length_buckets": 0},
    "cpu": {"t5": MODEL_PRESETS["small"], "batch_size": 128, "lr": 0.003, "warmup_steps": 500,
            "steps": 10_000_000, "schedule": "cosine", "weight_decay": 0.035, "length_buckets": 64,
            # no dropout: at equal wall time on Beauty validation 0.0 / 0.1 / 0.2 gave Recall@10
            # 0.047 / 0.035 / 0.019 (benchmarks/results/ablations_beauty_valid_quiet.json)
            "dropout": 0.0,
            # patience 6 x 5 min and 4,000 users: with 2,000 users and patience 4 the Beauty run
            # stopped at 85 of 103 minutes on validation noise (SE of Recall@10 ~0.005)
            "eval_every": 10_000_000, "eval_every_s": 300.0, "patience": 6, "eval_users": 4000},
}


def recipe(name: str, **overrides) -> PipelineConfig:
    """PipelineConfig of recipe ``name`` (a key of RECIPES) with ``overrides`` applied."""
    if name not in RECIPES:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(RECIPES)}")
    kw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in RECIPES[name].items()}
    kw.update(overrides)
    return PipelineConfig(**kw)


def embeddings_for(dataset, cfg: PipelineConfig, progress: bool = True) -> np.ndarray:
    """float32 (N, D) item embeddings (precomputed ones when the dataset carries them)."""
    from .embed import embed_dataset

    return embed_dataset(dataset, cfg.embed_model, cache_dir=cfg.cache_dir, progress=progress)


def build_semantic_ids(dataset, embeddings, cfg: PipelineConfig, *, layout: TokenLayout | None = None,
                       progress: bool = True, log=None):
    """Train the RQ-VAE on ``embeddings`` (float32 (N, D)) and give every item a unique 4-token ID.

    Returns (rqvae, id_table, history)."""
    from .ids import IdTable
    from .rqvae import RQVAEConfig, RQVAETrainConfig, train_rqvae

    layout = layout or TokenLayout()
    rq_cfg = RQVAEConfig(input_dim=int(embeddings.shape[1]), codebook_sizes=layout.codebook_sizes)
    rq_train = RQVAETrainConfig(epochs=cfg.rq_epochs, lr=cfg.rq_lr, seed=cfg.seed, precision=cfg.precision)
    rqvae, history = train_rqvae(embeddings, rq_cfg, rq_train, progress=progress, log=log)
    codes = rqvae.semantic_codes(embeddings, backend=cfg.backend if cfg.backend in ("auto", "reference") else "auto")
    table = IdTable.from_rq_codes(layout, dataset.item_ids, codes)
    catalogue = catalogue_fingerprint(dataset)
    rqvae.provenance = {"catalogue": catalogue}
    table.provenance = {"catalogue": catalogue, "rqvae": rqvae_digest(rqvae)[:32]}
    return rqvae, table, history


def train_tiger(dataset, id_table, cfg: PipelineConfig, *, checkpoint_dir: str | None = None,
                progress: bool = True, init_model=None):
    """Train the T5 retriever on the leave-one-out training split; validation Recall/NDCG on
    ``cfg.eval_users`` sampled users.  Returns (model, history).

    ``init_model``: a T5 to keep training (warm start: its weights, a fresh optimizer and the
    schedule of ``cfg``) instead of a new one built from ``cfg.t5``; trained in place."""
    from .evaluate import evaluate_retriever
    from .sequences import leave_one_out, tokenize_split
    from .t5 import T5, paper_config
    from .train import TrainConfig, train_retriever

    layout = id_table.layout
    if init_model is None:
        shape = {**cfg.t5, **({} if cfg.dropout is None else {"dropout": cfg.dropout})}
        model = T5(paper_config(layout, **shape), seed=cfg.seed)
    elif not isinstance(init_model, T5):
        raise TypeError(f"init_model must be a tiger_fast.t5.T5, got {type(init_model).__name__}")
    elif init_model.config.vocab_size != layout.vocab_size:
        raise ValueError(f"init_model has vocab_size {init_model.config.vocab_size} but the id_table's layout "
                         f"has {layout.vocab_size}; it was trained for another TokenLayout")
    else:
        model = init_model
    model.provenance = retriever_provenance(id_table)  # saved with every checkpoint of it
    splits = leave_one_out(dataset)
    examples = tokenize_split(splits.train, dataset, layout, id_table)

    def eval_fn(m):  # validation Recall/NDCG on a seeded sample of users
        r = evaluate_retriever(m, dataset, id_table, split="valid", k=10, max_users=cfg.eval_users,
                               seed=cfg.seed, backend=cfg.backend)
        return {k: v for k, v in r.items() if isinstance(v, float)}

    tcfg = TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                       max_steps=cfg.steps, seed=cfg.seed, eval_every=cfg.eval_every,
                       time_budget_s=cfg.time_budget_s, checkpoint_dir=checkpoint_dir,
                       checkpoint_every=min(max(cfg.eval_every, 100), 2000), device=cfg.device,
                       length_buckets=cfg.length_buckets, schedule=cfg.schedule,
                       weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing,
                       precision=cfg.precision, eval_every_s=cfg.eval_every_s, patience=cfg.patience)
    history = train_retriever(model, examples, config=tcfg, eval_fn=eval_fn if cfg.eval_users else None,
                              progress=progress, layout=layout)
    model.eval()
    history["warnings"] = sanity_warnings(history, dataset, cfg)
    for w in history["warnings"]:
        warnings.warn(w, stacklevel=2)
    return model, history


def sanity_warnings(history: dict, dataset, cfg: PipelineConfig) -> list[str]:
    """Plain-language warnings about a finished training run: no validation ran, the best model
    does not beat the popularity list on the same validation users, or its validation
    coverage@10 is below 1 % (it collapsed to recommending the same few items to everyone)."""
    from .evaluate import evaluate_popularity

    if not cfg.eval_users:
        return ["no validation ran (eval_users = 0): nothing checked that the model beats popularity"]
    best = [e for e in history.get("evals", []) if e["step"] == history.get("best_step")]
    if not best:
        return ["no validation ran before training stopped: raise the time budget or lower eval_every(_s)"]
    best = best[0]
    pop = evaluate_popularity(dataset, split="valid", max_users=cfg.eval_users, seed=cfg.seed)
    out = []
    if best.get("ndcg@10", 0.0) <= pop["ndcg@10"] or best.get("recall@10", 0.0) <= pop["recall@10"]:
        out.append(f"the trained model does not beat popularity on validation (Recall@10 "
                   f"{best.get('recall@10', float('nan')):.4f} vs {pop['recall@10']:.4f}, NDCG@10 "
                   f"{best.get('ndcg@10', float('nan')):.4f} vs {pop['ndcg@10']:.4f}): train longer "
                   "(--time-budget) or use the 'cpu' preset")
    if best.get("coverage@10", 1.0) < 0.01:
        out.append(f"validation coverage@10 is {best['coverage@10']:.2%}: the model recommends the same few "
                   "items to everyone (collapsed to a popularity list); train longer or lower the lr")
    return out


def save_run(out_dir, *, rqvae=None, id_table=None, model=None, report: dict | None = None) -> None:
    """Write what was built under ``out_dir``: rqvae/, ids.parquet, retriever/, report.json."""
    from .rqvae import save_rqvae
    from .t5 import save_t5

    os.makedirs(out_dir, exist_ok=True)
    if rqvae is not None:
        save_rqvae(rqvae, os.path.join(out_dir, "rqvae"))
    if id_table is not None:
        id_table.to_parquet(os.path.join(out_dir, "ids.parquet"))
    if model is not None:
        save_t5(model, id_table.layout, os.path.join(out_dir, "retriever"))
    if report is not None:
        write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2, default=jsonable))


def demo_config(time_budget_s: float = 100.0) -> PipelineConfig:
    """The demo's schedule: a small T5 (d_model 64, 2+2 layers, batch 64, length-bucketed batches:
    ~3x the steps of uniform batches in the same time) trained for a fixed wall time, so the whole
    demo fits in a few minutes on 2 CPU cores (the paper-size model needs ~3 s per batch-256 step
    there)."""
    return PipelineConfig(rq_epochs=50, t5={"d_model": 64, "num_heads": 4, "d_kv": 16, "d_ff": 256,
                                            "num_encoder_layers": 2, "num_decoder_layers": 2},
                          steps=1_000_000, time_budget_s=time_budget_s, batch_size=64, warmup_steps=200,
                          lr=0.003, eval_every=1_000_000, eval_users=0, length_buckets=64)


def run_demo(out_dir: str | None = None, *, num_items: int = 2000, num_users: int = 3000,
             cfg: PipelineConfig | None = None, progress: bool = True, echo=print) -> dict:
    """The whole pipeline on the embedded synthetic catalogue; prints a short report and returns it.

    Sized to finish in a few minutes on 2 CPU cores (see :func:`demo_config`)."""
    from .synthetic import synthetic_dataset
    from .evaluate import entropy_vs_temperature, evaluate_popularity, evaluate_retriever
    from .generate import generate
    from .ids import semantic_id_report

    cfg = cfg or demo_config()
    t_start = time.perf_counter()
    report: dict = {"config": asdict(cfg)}

    def stage(name):
        echo(f"\n== {name}  (t = {time.perf_counter() - t_start:.0f} s)")

    stage("1/6 synthetic catalogue")
    ds = synthetic_dataset(num_items=num_items, num_users=num_users, seed=cfg.seed)
    report["dataset"] = ds.summary()
    echo(json.dumps(report["dataset"]))

    stage("2/6 item text embeddings (all-MiniLM-L6-v2, offline)")
    emb = embeddings_for(ds, cfg, progress=progress)
    echo(f"embeddings: {emb.shape[0]} x {emb.shape[1]} float32")

    stage("3/6 RQ-VAE -> semantic IDs")
    rqvae, table, rq_hist = build_semantic_ids(ds, emb, cfg, progress=progress)
    rep = semantic_id_report(table, leaf_categories_by_row(ds, table))
    report["semantic_ids"] = {**table.report(), **rep, "rq_final": rq_hist[-1] if rq_hist else None}
    echo(json.dumps({k: v for k, v in report["semantic_ids"].items() if k != "rq_final"}, default=jsonable))

    stage(f"4/6 retriever training (time budget {cfg.time_budget_s} s)")
    model, hist = train_tiger(ds, table, cfg, progress=progress)
    report["training"] = {k: hist.get(k) for k in ("final_step", "stopped", "steps_per_s")}
    echo(json.dumps(report["training"]))

    stage("5/6 evaluation (test split, all users)")
    ours = evaluate_retriever(model, ds, table, split="test", k=10, backend=cfg.backend)
    pop = evaluate_popularity(ds, split="test")
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "entropy@10", "coverage@10")
    report["evaluation"] = {"tiger": {k: ours[k] for k in keys if k in ours},
                            "popularity": {k: pop[k] for k in keys if k in pop},
                            "users_per_second": ours.get("users_per_second")}
    echo(f"{'metric':<12}{'TIGER':>10}{'popularity':>12}")
    for k in keys:
        if k in ours and k in pop:
            echo(f"{k:<12}{ours[k]:>10.4f}{pop[k]:>12.4f}")
    report["beats_popularity"] = bool(ours["recall@10"] > pop["recall@10"] and ours["ndcg@10"] > pop["ndcg@10"])
    echo(f"beats popularity on Recall@10 and NDCG@10: {report['beats_popularity']}")

    rows = entropy_vs_temperature(model, ds, table, max_users=1000, seed=cfg.seed, backend=cfg.backend)
    report["entropy_vs_temperature"] = rows
    echo(f"\n{'temperature':<24}{'Recall@10':>10}{'Entropy@10':>12}")
    for r in rows:
        t = r["temperature"]
        name = "beam search" if t is None else ("T=" + "/".join(f"{x:g}" for x in t))
        echo(f"{name:<24}{r['recall@10']:>10.4f}{r['entropy@10']:>12.3f}")

    stage("6/6 example recommendations")
    users = [0, 1, 2]
    hist_ids = [ds.item_ids[ds.sequences[u]] for u in users]
    res = generate(model, hist_ids, table, user_ids=[int(ds.user_ids[u]) for u in users], k=5, backend=cfg.backend)
    titles = {int(i): it.get("title", "") for i, it in zip(ds.item_ids, ds.items)}
    report["examples"] = []
    for n, u in enumerate(users):
        last = [titles[int(i)] for i in hist_ids[n][-3:]]
        recs = [(int(i), titles.get(int(i), "?"), [int(c) for c in code])
                for i, code in zip(res.item_ids[n], res.codes[n]) if int(i) >= 0]
        report["examples"].append({"user": int(ds.user_ids[u]), "last_items": last, "recommended": recs})
        echo(f"user {int(ds.user_ids[u])}: last items {last}")
        for i, title, code in recs:
            echo(f"    -> item {i} {code}: {title}")
    report["seconds"] = time.perf_counter() - t_start
    echo(f"\ndone in {report['seconds']:.0f} s")
    if out_dir:
        save_run(out_dir, rqvae=rqvae, id_table=table, model=model, report=report)
        echo(f"artefacts written to {out_dir}")
    return report


def leaf_categories_by_row(dataset, id_table) -> list:
    """Leaf category of each IdTable row (the table may hold a subset, in another order)."""
    rows = dataset.index_of(id_table.item_ids.numpy())
    leaves = dataset.leaf_categories()
    return [leaves[r] for r in rows]
