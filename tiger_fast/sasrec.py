"""SASRec baseline (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): train,
evaluate, save and load it on the same data, split, history length and metrics as TIGER.

Model.  Item embedding (row 0 = padding, row i + 1 = internal item i) plus a learned positional
embedding, ``num_blocks`` causal self-attention blocks (pre-LayerNorm, ``num_heads`` heads, a
two-layer ReLU feed-forward of width ``hidden``, dropout), a final LayerNorm; the score of item j
after a history is the dot product of the last position's output with item j's (input) embedding.
Histories are the last ``max_len`` items (TIGER's encoder sees the last 20), left-padded, so the
most recent item always sits at position ``max_len - 1`` (positions count back from "now").

Data.  Trained on ``tiger_fast.sequences.leave_one_out(dataset).train`` - exactly TIGER's training
targets: for each user the training prefix ``t = s[:e_max + 1]`` (``e_max`` = the user's largest
training end; validation and test targets are never in it) predicts ``t[i + 1]`` from ``t[:i + 1]``
at every position i.  A prefix longer than ``max_len + 1`` is cut, from the end, into windows of
``max_len`` inputs, so every training target is predicted exactly once per epoch (positions at the
start of an earlier window see fewer than ``max_len`` past items).

Loss (``loss``): "ce" - softmax cross-entropy over the whole catalogue at every position (cheap
for catalogues of ~10^4 items and much stronger than the original's objective); "bce" - the
original's binary cross-entropy with one uniformly drawn negative item per position (never the
target).

Evaluation follows ``tiger_fast.evaluate``: the leave-one-out valid/test examples
(``eval_examples``), scores over the full catalogue, nothing excluded (history items may be
retrieved, as for TIGER and popularity), the same metric dict (``evaluate_rankings``).  Equal
scores rank by smaller internal index (:func:`top_k_items`).

Determinism.  No hidden global randomness: the initial weights come from a seed derived from
``config.seed``; the example order is per-epoch permutations from generators seeded by
(seed, epoch); dropout uses the global torch RNG re-seeded from (seed, step) before each step
inside ``torch.random.fork_rng`` (the caller's RNG state is restored); BCE negatives come from a
generator seeded by (seed, step).  With ``max_steps`` and ``eval_every_steps`` (no wall-clock
triggers) a run is bit-reproducible on CPU for a fixed thread count.

Files (:func:`save_sasrec`): ``model.safetensors`` (weights) then ``sasrec.json`` (format tag,
config, catalogue size and a fingerprint of ``dataset.item_ids``), each written to a temporary file
and renamed; the JSON is written last, so a directory with a JSON has complete weights.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import write_atomic, write_text
from .checks import check_int, config_from_dict, is_int
from .fileio import read_checkpoint_meta

__all__ = ["SASRecConfig", "SASRec", "train_sasrec", "evaluate_sasrec", "score_histories", "top_k_items",
           "training_windows", "save_sasrec", "load_sasrec", "item_fingerprint"]

_FORMAT = "tiger_fast.sasrec/1"


# ---- configuration ------------------------------------------------------------------------------
@dataclass
class SASRecConfig:
    """Model and training settings of SASRec (validated on construction).

    Model: hidden (embedding/attention width; FFN width too, as in the paper), num_blocks,
    num_heads (must divide hidden), dropout, max_len (history items seen; TIGER's default 20).
    Training: loss "ce" | "bce", lr (Adam, betas 0.9/0.98 as the paper), weight_decay (AdamW when
    > 0), batch_size (training windows per step).
    Stopping: time_budget_s (wall seconds, data preparation and validations included) and/or
    max_steps - at least one; patience: stop after this many validations in a row without a better
    validation NDCG@10 (None = never).
    Validation (on the leave-one-out "valid" split, the best state by NDCG@10 is kept):
    eval_every_s (wall seconds between validations; None with a time budget = time_budget_s / 10)
    and/or eval_every_steps; eval_users: validate on a seeded sample of this many users (None =
    all).  A last validation always runs when training stops.
    seed: weights, example order, dropout and negatives all derive from it.
    """

    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    max_len: int = 20
    loss: str = "ce"
    # 1e-3: the rate of the README's Beauty/Scientific tables (100 min budgets); 3e-3 learned faster
    # over the first ~225 steps on Beauty validation but was not compared over a long budget
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    time_budget_s: float | None = 300.0
    max_steps: int | None = None
    eval_every_s: float | None = None
    eval_every_steps: int | None = None
    eval_users: int | None = None
    patience: int | None = 5
    seed: int = 0

    def __post_init__(self):
        def pos_int(name, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            setattr(self, name, check_int(v, f"SASRecConfig.{name}", none_ok=optional))

        def pos_float(name, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"SASRecConfig.{name} must be a finite number > 0{' or None' if optional else ''}, "
                                 f"got {v!r}")
            setattr(self, name, float(v))

        for n in ("hidden", "num_blocks", "num_heads", "max_len", "batch_size"):
            pos_int(n)
        for n in ("max_steps", "eval_every_steps", "eval_users", "patience"):
            pos_int(n, optional=True)
        pos_float("lr")
        for n in ("time_budget_s", "eval_every_s"):
            pos_float(n, optional=True)
        if self.hidden % self.num_heads:
            raise ValueError(f"SASRecConfig.num_heads ({self.num_heads}) must divide hidden ({self.hidden})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
            raise ValueError(f"SASRecConfig.weight_decay must be a finite number >= 0, got {wd!r}")
        self.weight_decay = float(wd)
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"SASRecConfig.loss must be 'ce' or 'bce', got {self.loss!r}")
        if self.time_budget_s is None and self.max_steps is None:
            raise ValueError("SASRecConfig: set time_budget_s and/or max_steps (training needs a stopping rule)")
        if (self.time_budget_s is not None and self.eval_every_s is not None
                and self.eval_every_s >= self.time_budget_s):
            raise ValueError(f"SASRecConfig.eval_every_s ({self.eval_every_s}) must be smaller than "
                             f"time_budget_s ({self.time_budget_s}): no validation would finish within the budget")
        self.seed = check_int(self.seed, "SASRecConfig.seed", 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SASRecConfig":
        return config_from_dict(cls, d)

    def eval_interval_s(self) -> float | None:
        """Wall seconds between validations (the default: a tenth of the time budget)."""
        if self.eval_every_s is not None:
            return self.eval_every_s
        if self.time_budget_s is not None and self.eval_every_steps is None:
            return self.time_budget_s / 10.0
        return None


def _seed_of(seed: int, tag: str, n: int) -> int:
    """A 63-bit seed derived from (seed, tag, n) by a stable hash (independent streams)."""
    h = hashlib.blake2b(f"sasrec:{seed}:{tag}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def item_fingerprint(dataset) -> str:
    """Hex digest of ``dataset.item_ids`` (order included): ties a saved model to its catalogue."""
    ids = np.ascontiguousarray(np.asarray(dataset.item_ids, dtype=np.int64))
    return hashlib.blake2b(ids.tobytes(), digest_size=16).hexdigest()


# ---- model --------------------------------------------------------------------------------------
class _Block(nn.Module):
    """Pre-LN causal self-attention + feed-forward, both residual."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, d), nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, W, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, W, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, W, d)))
        return x + self.drop(self.ff2(self.drop(F.relu(self.ff1(self.ln2(x))))))


class SASRec(nn.Module):
    """SASRec over ``num_items`` items (internal indices 0..N-1).

    forward(items): int64 (B, W) with W <= max_len, entries item + 1 and 0 = padding, left-padded
    (real items right-aligned) -> float32 (B, W, hidden), position i's output summarising items
    [.. i].  ``item_scores(h)``: float (..., hidden) -> (..., N) dot products with every item."""

    def __init__(self, num_items: int, config: SASRecConfig):
        super().__init__()
        check_int(num_items, "num_items")
        if not isinstance(config, SASRecConfig):
            raise TypeError(f"config must be a SASRecConfig, got {type(config).__name__}")
        self.num_items, self.config = int(num_items), config
        d = config.hidden
        self.item_emb = nn.Embedding(self.num_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(d, config.num_heads, config.dropout) for _ in range(config.num_blocks))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        B, W = items.shape
        L = self.config.max_len
        if W > L:
            raise ValueError(f"items has {W} positions but max_len is {L}")
        pos = torch.arange(L - W, L, device=items.device)
        real = items > 0
        x = self.item_emb(items) * math.sqrt(self.config.hidden) + self.pos_emb(pos)[None]
        x = self.emb_drop(x) * real[..., None]
        causal = torch.ones(W, W, dtype=torch.bool, device=items.device).tril()
        # attend to real past items; every position also sees itself so padded rows stay finite
        mask = (causal[None] & real[:, None, :]) | torch.eye(W, dtype=torch.bool, device=items.device)[None]
        mask = mask[:, None]  # (B, 1, W, W) broadcast over heads
        for blk in self.blocks:
            x = blk(x, mask)
        return self.ln(x)

    def item_scores(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_emb.weight[1:].T


# ---- data ---------------------------------------------------------------------------------------
def training_windows(dataset, max_len: int):
    """Training windows of the leave-one-out train split (module docstring) -> (inputs int64
    (M, max_len): item + 1, left-padded with 0; targets int64 (M, max_len): internal index of the item
    after each input, -1 at padding).  Empty train split -> ValueError."""
    from .sequences import leave_one_out

    tr = leave_one_out(dataset).train
    if len(tr) == 0:
        raise ValueError(f"dataset {getattr(dataset, 'name', '?')!r} has no training examples (the "
                         "leave-one-out train split is empty: every user needs at least 2 items)")
    uidx, end = np.asarray(tr.user_index, dtype=np.int64), np.asarray(tr.end, dtype=np.int64)
    e_max = np.zeros(len(dataset.sequences), dtype=np.int64)
    np.maximum.at(e_max, uidx, end)
    ins, tgs = [], []
    for u in np.flatnonzero(e_max):
        t = np.asarray(dataset.sequences[u][: e_max[u] + 1], dtype=np.int64)
        for hi in range(len(t) - 1, 0, -max_len):  # window: inputs t[lo:hi], targets t[lo+1:hi+1]
            lo = max(0, hi - max_len)
            a = np.zeros(max_len, dtype=np.int64)
            b = np.full(max_len, -1, dtype=np.int64)
            a[max_len - (hi - lo):] = t[lo:hi] + 1
            b[max_len - (hi - lo):] = t[lo + 1:hi + 1]
            ins.append(a)
            tgs.append(b)
    return torch.from_numpy(np.stack(ins)), torch.from_numpy(np.stack(tgs))


def _history_batch(histories, max_len: int) -> torch.Tensor:
    """list of R int arrays (internal indices, oldest first, non-empty) -> int64 (R, W) left-padded
    item + 1, W = the longest truncated history."""
    W = max(1, min(max_len, max(len(h) for h in histories)))
    out = np.zeros((len(histories), W), dtype=np.int64)
    for r, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-W:]
        if h.size:
            out[r, W - h.size:] = h + 1
    return torch.from_numpy(out)


# ---- ranking ------------------------------------------------------------------------------------
def top_k_items(scores: torch.Tensor, k: int) -> torch.Tensor:
    """float (R, N) scores -> int64 (R, k) item indices, best first; equal scores rank by smaller
    index (deterministic, unlike ``torch.topk``); rows are padded with -1 when k > N.  NaN scores
    raise ValueError."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (R, N), got shape {tuple(scores.shape)}")
    k = check_int(k, "k")
    R, N = scores.shape
    kk = min(int(k), N)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN (the model diverged); lower SASRecConfig.lr")
    vals, idx = torch.topk(scores, min(kk + 1, N), dim=1)
    thr = vals[:, kk - 1:kk]  # the k-th largest score per row
    # the top-k set is unique unless the (k+1)-th score ties the k-th: then topk may keep any of the tied
    slow = (vals[:, kk] == vals[:, kk - 1]).nonzero()[:, 0] if kk < N else torch.zeros(0, dtype=torch.long)
    idx = idx[:, :kk].contiguous()
    if slow.numel():
        sc, t = scores[slow], thr[slow]
        above, eq = sc > t, sc == t
        need = kk - above.sum(1, keepdim=True)  # tied items to take, smallest index first
        sel = above | (eq & (eq.cumsum(1) <= need))
        idx[slow] = sel.nonzero()[:, 1].view(-1, kk)
    # best first; equal scores by ascending index (sort the kept indices, then a stable sort by score)
    idx = torch.sort(idx, dim=1).values
    order = torch.sort(scores.gather(1, idx), dim=1, descending=True, stable=True).indices
    out = idx.gather(1, order)
    if kk < k:
        out = torch.cat([out, torch.full((R, int(k) - kk), -1, dtype=torch.long)], 1)
    return out


@torch.no_grad()
def score_histories(model: SASRec, histories, *, batch_size: int = 512, k: int | None = None):
    """Full-catalogue scores of each history (list of R non-empty int arrays of internal indices,
    oldest first; the last ``max_len`` are used).  Returns float32 (R, N) scores, or with ``k``
    int64 (R, k) top-k item indices (:func:`top_k_items`), computed batch by batch."""
    was = model.training
    model.eval()
    outs = []
    try:
        for s in range(0, len(histories), batch_size):
            x = _history_batch(histories[s:s + batch_size], model.config.max_len)
            sc = model.item_scores(model(x)[:, -1])
            outs.append(top_k_items(sc, k) if k is not None else sc)
    finally:
        model.train(was)
    if not outs:
        return torch.zeros(0, k if k is not None else model.num_items,
                           dtype=torch.long if k is not None else torch.float32)
    return torch.cat(outs)


def _check_model_dataset(model, dataset) -> None:
    if not isinstance(model, SASRec):
        raise TypeError(f"model must be a tiger_fast.sasrec.SASRec, got {type(model).__name__}")
    n = len(dataset.item_ids)
    if model.num_items != n:
        raise ValueError(f"the SASRec model scores {model.num_items} items but the dataset has {n}; "
                         "it was trained on another catalogue")
    fp = getattr(model, "item_fingerprint", None)
    if fp is not None and fp != item_fingerprint(dataset):
        raise ValueError("the SASRec model was trained on a catalogue with other item ids (fingerprint mismatch)")


def evaluate_sasrec(model: SASRec, dataset, split: str = "test", ks=(5, 10), max_users: int | None = None,
                    seed: int = 0, *, batch_size: int = 512) -> dict:
    """Recall/NDCG@ks, Entropy@K, coverage@K of ``model`` on the leave-one-out ``split`` ("test" or
    "valid"), full-catalogue ranking, nothing excluded - the dict of
    ``tiger_fast.evaluate.evaluate_rankings`` plus split, num_users_skipped, method, seconds,
    users_per_second.  max_users/seed: a seeded sample of users, the same as evaluate_popularity's."""
    from .evaluate import eval_examples, evaluate_rankings, sample_users

    _check_model_dataset(model, dataset)
    ks = tuple(ks) if not isinstance(ks, int) else (ks,)
    if not ks or any(not is_int(k) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    ex = eval_examples(dataset, split, users=sample_users(len(dataset.sequences), max_users, seed))
    if len(ex.targets) == 0:
        raise ValueError(f"split {split!r} of dataset {getattr(dataset, 'name', '?')!r} has no examples "
                         "(no user has >= 3 items); nothing to evaluate")
    t0 = time.perf_counter()
    pred = score_histories(model, ex.histories, batch_size=batch_size, k=max(ks))
    secs = time.perf_counter() - t0
    res = evaluate_rankings(pred, ex.targets, dataset.leaf_categories(), ks, num_items=len(dataset.item_ids))
    res.update(split=split, num_users_skipped=ex.num_users_skipped, method="sasrec", seconds=secs,
               users_per_second=len(ex.targets) / secs if secs > 0 else float("inf"))
    return res


# ---- training -----------------------------------------------------------------------------------
def _batch_index(step: int, bs: int, n: int, seed: int, cache: dict) -> torch.Tensor:
    """Positions [step*bs, (step+1)*bs) of the stream of per-epoch permutations seeded by (seed, epoch)."""
    pos = torch.arange(step * bs, (step + 1) * bs)
    epochs = pos // n
    out = torch.empty(bs, dtype=torch.long)
    for e in torch.unique(epochs).tolist():
        if e not in cache:
            cache.clear() if len(cache) > 2 else None
            cache[e] = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(seed, "epoch", e)))
        sel = epochs == e
        out[sel] = cache[e][pos[sel] % n]
    return out


def _loss(model: SASRec, x: torch.Tensor, y: torch.Tensor, kind: str, step: int, seed: int) -> torch.Tensor:
    h = model(x)
    valid = y >= 0
    hv, t = h[valid], y[valid]  # (P, d), (P,)
    if kind == "ce":
        return F.cross_entropy(model.item_scores(hv), t)
    N = model.num_items
    if N < 2:
        raise ValueError("loss='bce' needs at least 2 items (a negative other than the target)")
    g = torch.Generator().manual_seed(_seed_of(seed, "neg", step))
    neg = (t + 1 + torch.randint(0, N - 1, t.shape, generator=g)) % N
    e = model.item_emb.weight
    pos_logit = (hv * e[t + 1]).sum(-1)
    neg_logit = (hv * e[neg + 1]).sum(-1)
    return F.softplus(-pos_logit).mean() + F.softplus(neg_logit).mean()


def train_sasrec(dataset, config: SASRecConfig | None = None, *, progress: bool = True):
    """Train SASRec on the leave-one-out training split of ``dataset`` (module docstring).

    Validates on the "valid" split (config.eval_users users, seeded by config.seed) every
    ``config.eval_interval_s()`` wall seconds and/or ``eval_every_steps`` steps and when training
    stops (budget, max_steps or early stopping); returns (model in eval mode holding the best state by
    validation NDCG@10, history).  history: {"evals": [{"step", "epoch", "wall_s", "eval_s",
    "train_loss", "recall@5", "ndcg@5", "recall@10", "ndcg@10", "entropy@10", "coverage@10",
    "num_examples"}], "best_step", "best_ndcg@10", "steps", "epochs", "wall_s", "steps_per_s",
    "stopped" ("time_budget" | "max_steps" | "early_stopping"), "num_windows", "config"}.

    Errors: empty training or validation split -> ValueError; a time budget that runs out before
    the first validation has finished -> RuntimeError naming time_budget_s."""
    from .evaluate import eval_examples, evaluate_rankings, sample_users

    cfg = SASRecConfig() if config is None else config
    if not isinstance(cfg, SASRecConfig):
        raise TypeError(f"config must be a SASRecConfig, got {type(cfg).__name__}")
    t0 = time.monotonic()
    X, Y = training_windows(dataset, cfg.max_len)
    vex = eval_examples(dataset, "valid", users=sample_users(len(dataset.sequences), cfg.eval_users, cfg.seed))
    if len(vex.targets) == 0:
        raise ValueError(f"dataset {getattr(dataset, 'name', '?')!r} has an empty validation split "
                         "(no user has >= 3 items); SASRec needs validation for model selection")
    cats = dataset.leaf_categories()
    N = len(dataset.item_ids)
    n = X.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_of(cfg.seed, "init", 0))
        model = SASRec(N, cfg)
    model.item_fingerprint = item_fingerprint(dataset)
    if cfg.weight_decay > 0:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    every_s = cfg.eval_interval_s()
    hist: dict = {"evals": [], "best_step": None, "best_ndcg@10": None, "num_windows": int(n),
                  "config": cfg.to_dict()}
    best_state, best, since_best = None, -1.0, 0
    cache: dict = {}
    step, stopped, run_loss, run_n = 0, None, 0.0, 0
    next_eval_t = every_s
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, desc="sasrec", dynamic_ncols=True)

    def validate():
        nonlocal best_state, best, since_best, run_loss, run_n
        te = time.monotonic()
        pred = score_histories(model, vex.histories, k=10)
        m = evaluate_rankings(pred, vex.targets, cats, (5, 10), num_items=N)
        now = time.monotonic()
        row = {"step": step, "epoch": step * cfg.batch_size / n, "wall_s": te - t0, "eval_s": now - te,
               "train_loss": run_loss / run_n if run_n else None, **m}
        hist["evals"].append(row)
        run_loss, run_n = 0.0, 0
        if row["ndcg@10"] > best:
            best, since_best = row["ndcg@10"], 0
            best_state = copy.deepcopy(model.state_dict())
            hist["best_step"], hist["best_ndcg@10"] = step, best
        else:
            since_best += 1
        if len(hist["evals"]) == 1 and cfg.time_budget_s is not None and now - t0 > cfg.time_budget_s:
            raise RuntimeError(f"SASRecConfig.time_budget_s={cfg.time_budget_s:g} s is too small to finish one "
                               f"validation (the first ended at {now - t0:.1f} s after {step} steps); raise "
                               "time_budget_s or validate on fewer users (eval_users)")
        if bar is not None:
            bar.set_postfix({"val_R@10": f"{row['recall@10']:.4f}", "val_N@10": f"{row['ndcg@10']:.4f}"})
        return now

    model.train()
    with torch.random.fork_rng(devices=[]):
        while True:
            el = time.monotonic() - t0
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stopped = "max_steps"
            elif cfg.time_budget_s is not None and el >= cfg.time_budget_s:
                stopped = "time_budget"
            due = step > 0 and ((every_s is not None and el >= next_eval_t)
                                or (cfg.eval_every_steps is not None and step % cfg.eval_every_steps == 0))
            if stopped and step == 0:
                raise RuntimeError(f"SASRecConfig.time_budget_s={cfg.time_budget_s:g} s ran out before the first "
                                   "training step (data preparation took longer); raise time_budget_s")
            if (due or stopped) and not (hist["evals"] and hist["evals"][-1]["step"] == step):
                end = validate()
                model.train()
                if every_s is not None:
                    next_eval_t = end - t0 + every_s
                if not stopped and cfg.patience is not None and since_best >= cfg.patience:
                    stopped = "early_stopping"
                if not stopped and cfg.time_budget_s is not None and end - t0 >= cfg.time_budget_s:
                    stopped = "time_budget"  # the budget ran out during this validation: it is the last
            if stopped:
                break
            torch.manual_seed(_seed_of(cfg.seed, "step", step))
            idx = _batch_index(step, cfg.batch_size, n, cfg.seed, cache)
            x, y = X[idx], Y[idx]
            w = int((x > 0).sum(1).max())
            loss = _loss(model, x[:, -w:], y[:, -w:], cfg.loss, step, cfg.seed)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"SASRec training loss is {float(loss)} at step {step}; lower "
                                         f"SASRecConfig.lr (now {cfg.lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.item()
            run_n += 1
            step += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    wall = time.monotonic() - t0
    model.load_state_dict(best_state)
    model.eval()
    hist.update(steps=step, epochs=step * cfg.batch_size / n, wall_s=wall, stopped=stopped,
                steps_per_s=step / wall if wall > 0 else float("inf"))
    return model, hist


# ---- save / load --------------------------------------------------------------------------------
def save_sasrec(model: SASRec, path: str) -> None:
    """Write ``path/model.safetensors`` then ``path/sasrec.json`` (format, config, num_items,
    item_fingerprint); each file is written to a temporary name and renamed."""
    from safetensors.torch import save_file

    if not isinstance(model, SASRec):
        raise TypeError(f"model must be a tiger_fast.sasrec.SASRec, got {type(model).__name__}")
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomic(os.path.join(path, "model.safetensors"), lambda p: save_file(tensors, p), what="SASRec weights")
    meta = {"format": _FORMAT, "config": model.config.to_dict(), "num_items": model.num_items,
            "item_fingerprint": getattr(model, "item_fingerprint", None)}

    write_text(os.path.join(path, "sasrec.json"), json.dumps(meta, indent=2), what="SASRec config")


def load_sasrec(path: str) -> SASRec:
    """Load a :func:`save_sasrec` directory -> SASRec in eval mode (config validated first; no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta, cfg_path, w_path = read_checkpoint_meta(path, "sasrec.json", "model.safetensors", "a SASRec directory")
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{cfg_path!r} is not a {_FORMAT} file")
    cfg = SASRecConfig.from_dict(meta.get("config"))
    model = SASRec(meta.get("num_items"), cfg)
    try:
        sd = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read weights {w_path!r}: {e}") from e
    exp = model.state_dict()
    if set(sd) != set(exp) or any(sd[k].shape != exp[k].shape for k in exp):
        raise ValueError(f"weights in {w_path!r} do not match the model described by {cfg_path!r}")
    model.load_state_dict(sd)
    model.item_fingerprint = meta.get("item_fingerprint")
    return model.eval()
