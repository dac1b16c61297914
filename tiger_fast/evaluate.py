"""Offline evaluation of a TIGER retriever (TIGER §4.1; docs/contracts.md, "Metrics").

Protocol (leave-one-out, the TIGER/SASRec/P5 convention):

* The examples are those of ``tiger_fast.sequences.leave_one_out`` (one definition for training
  and evaluation): for each user with chronological item sequence ``s`` (internal item indices)
  and at least 3 items, the **test** example is history ``s[:-1]`` -> target ``s[-1]`` and the
  **valid** example is ``s[:-2]`` -> ``s[-2]``; training uses ``s[:-2]``.  Users with fewer than 3
  items have no test/valid example and are counted in ``num_users_skipped``.  The encoder sees the
  last ``max_history`` (default 20) items.
* Rankings are over the **full catalogue** and nothing is excluded: items already in the user's
  history may be retrieved and count as misses unless they are the target (TIGER's setting —
  a generative retriever has no exclusion step; SASRec-style full-ranking evaluation of TIGER
  baselines does the same).  The popularity baseline follows the same rule.
* Metrics (tiger_fast.metrics): Recall@k and NDCG@k for k in ``ks``, Entropy@K of the leaf
  categories in bits and catalogue coverage@K at K = max(ks).

Item ids.  ``Dataset.sequences`` hold internal item indices (0..N-1); the project's IdTables are
keyed by the dataset's external ids (``dataset.item_ids``, what ``tiger_fast.sequences`` feeds
``IdTable.tokens_of``).  ``id_space`` says how the given table is keyed: "external" (default),
"internal", or "auto" (detected, see :func:`resolve_id_space`).  Histories are converted into the
table's id space before decoding and results back to internal indices before scoring, so metrics
are always computed on internal indices.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import metrics as M
from .checks import check_int, is_int
from .decoding import encoder_batch, make_stepper, model_device
from .reference.generate import eos_rerank, temperatures, top_by_key

__all__ = [
    "EvalExamples",
    "eval_examples",
    "sample_users",
    "resolve_id_space",
    "popularity_baseline",
    "evaluate_popularity",
    "evaluate_rankings",
    "evaluate_retriever",
    "unconstrained_beam_search",
    "invalid_rate_unconstrained",
    "entropy_vs_temperature",
    "temperature_table",
]


# ---- examples -----------------------------------------------------------------------------------
@dataclass
class EvalExamples:
    """Leave-one-out evaluation examples of one split.

    users: int64 (R,) user indices (rows of ``dataset.user_ids``); histories: R int64 arrays of
    internal item indices, oldest first (full history, not truncated); targets: int64 (R,)
    internal item indices; num_users_skipped: users (of those asked for) without an example.
    """

    users: np.ndarray
    histories: list
    targets: np.ndarray
    num_users_skipped: int


def eval_examples(dataset, split: str = "test", *, users=None) -> EvalExamples:
    """Leave-one-out examples of ``split`` in {"test", "valid"}, exactly the examples of
    ``tiger_fast.sequences.leave_one_out(dataset)`` (users with >= 3 items; history ``s[:end]``,
    target ``s[end]``), in user order.

    users: optional int (M,) user indices to restrict to."""
    from .sequences import leave_one_out

    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    sp = getattr(leave_one_out(dataset), split)
    uidx, end = np.asarray(sp.user_index, dtype=np.int64), np.asarray(sp.end, dtype=np.int64)
    if users is not None:
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        if users.size and (int(users.min()) < 0 or int(users.max()) >= len(dataset.sequences)):
            raise ValueError(f"users must be user indices in [0, {len(dataset.sequences)})")
        keep = np.isin(uidx, users)
        skipped = int(np.unique(users).size - keep.sum())
        uidx, end = uidx[keep], end[keep]
    else:
        skipped = len(dataset.sequences) - uidx.size
    seqs = dataset.sequences
    hs = [np.asarray(seqs[u][:e], dtype=np.int64) for u, e in zip(uidx, end)]
    ts = np.asarray([int(seqs[u][e]) for u, e in zip(uidx, end)], dtype=np.int64)
    return EvalExamples(uidx, hs, ts, skipped)


def sample_users(num_users: int, max_users, seed: int) -> np.ndarray | None:
    """int64 (max_users,) sorted indices of a seeded random subset of users, or None for all (also
    when max_users >= num_users): the one draw behind every ``max_users`` (TIGER, SASRec, popularity)."""
    if max_users is None:
        return None
    check_int(max_users, "max_users", none_ok=True)
    if max_users >= num_users:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_users, size=int(max_users), replace=False)).astype(np.int64)


# ---- id spaces ----------------------------------------------------------------------------------
def resolve_id_space(dataset, id_table, id_space: str = "auto") -> str:
    """Which ids ``id_table`` is keyed by: "internal" (0..N-1) or "external" (``dataset.item_ids``).

    "auto": "internal" if ``dataset.item_ids`` is exactly 0..N-1 (both coincide) or the table's ids
    are all internal indices but not all external ids; "external" in the opposite case; an error
    when both readings fit (pass ``id_space`` explicitly) or neither does."""
    if id_space in ("internal", "external"):
        return id_space
    if id_space != "auto":
        raise ValueError(f"id_space must be 'auto', 'internal' or 'external', got {id_space!r}")
    ext = np.asarray(dataset.item_ids, dtype=np.int64)
    n = ext.shape[0]
    if np.array_equal(ext, np.arange(n, dtype=np.int64)):
        return "internal"
    ids = id_table.item_ids.numpy() if isinstance(id_table.item_ids, torch.Tensor) else np.asarray(id_table.item_ids)
    fits_int = bool(((ids >= 0) & (ids < n)).all())
    fits_ext = bool(np.isin(ids, ext).all())
    if fits_int and not fits_ext:
        return "internal"
    if fits_ext and not fits_int:
        return "external"
    if fits_int and fits_ext:
        raise ValueError("cannot tell whether the IdTable is keyed by internal item indices or by "
                         "dataset.item_ids (both fit); pass id_space='internal' or 'external'")
    raise ValueError("the IdTable's item ids are neither internal item indices (0..N-1) nor "
                     "dataset.item_ids; build the table from this dataset")


class IdMap:
    """Converts between internal indices and the table's id space."""

    def __init__(self, dataset, space: str):
        self.space = space
        self.ext = np.asarray(dataset.item_ids, dtype=np.int64)
        if space == "external":
            self.order = np.argsort(self.ext, kind="stable")
            self.sorted = self.ext[self.order]

    def to_table(self, internal: np.ndarray) -> np.ndarray:
        return internal if self.space == "internal" else self.ext[internal]

    def to_internal(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 (...) table ids (-1 padding kept) -> internal indices."""
        if self.space == "internal":
            return ids
        a = ids.cpu().numpy()
        pos = np.clip(np.searchsorted(self.sorted, a), 0, len(self.sorted) - 1)
        ok = (a >= 0) & (self.sorted[pos] == a)
        if bool(((a >= 0) & ~ok).any()):
            raise ValueError("decoded item ids are not in dataset.item_ids; the IdTable does not belong "
                             "to this dataset")
        return torch.from_numpy(np.where(ok, self.order[pos], -1).astype(np.int64))


# ---- baselines and metric tables ----------------------------------------------------------------
def popularity_baseline(dataset, split: str = "test", k: int | None = None) -> torch.Tensor:
    """Items ranked by their number of interactions visible when scoring ``split``.

    Counts every interaction except the targets of ``split`` and what follows them: for each user
    with a ``split`` example (``leave_one_out``), the items before the target (``s[:-1]`` for
    "test", ``s[:-2]`` for "valid"); users without an example contribute their whole sequence
    (it is training data).  Ties -> smaller internal index first.  Nothing is excluded per user
    (module docstring).  Returns int64 (k,) internal item indices (all N items when k is None).
    """
    from .sequences import leave_one_out

    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    n = len(dataset.item_ids)
    sp = getattr(leave_one_out(dataset), split)
    end = np.asarray([len(s) for s in dataset.sequences], dtype=np.int64)
    end[np.asarray(sp.user_index, dtype=np.int64)] = np.asarray(sp.end, dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    for s, e in zip(dataset.sequences, end):
        np.add.at(counts, np.asarray(s[:e], dtype=np.int64), 1)
    order = np.lexsort((np.arange(n), -counts))  # count desc, index asc
    if k is not None:
        if not is_int(k) or not 1 <= k <= n:
            raise ValueError(f"k must be an int in [1, {n}], got {k!r}")
        order = order[:k]
    return torch.from_numpy(order.astype(np.int64))


def evaluate_rankings(pred, targets, item_categories, ks=(5, 10), *, num_items: int | None = None) -> dict:
    """Metric table for rankings over internal item indices.

    pred: int64 (R, K) with K >= max(ks), -1 padding; targets: int64 (R,); item_categories: one
    label per item (e.g. ``dataset.leaf_categories()``); num_items: catalogue size for coverage
    (default len(item_categories)).  Returns {"recall@k", "ndcg@k" for k in ks, "entropy@K",
    "coverage@K" with K = max(ks), "num_examples"} (floats, num_examples an int)."""
    ks = check_ks(ks)
    p = M.check_pred(pred)
    K = max(ks)
    if p.shape[1] < K:
        raise ValueError(f"pred has {p.shape[1]} columns but ks asks for @{K}; decode at least {K} items")
    out: dict = {"num_examples": int(p.shape[0])}
    for k in ks:
        out[f"recall@{k}"] = M.recall_at_k(p, targets, k)
        out[f"ndcg@{k}"] = M.ndcg_at_k(p, targets, k)
    out[f"entropy@{K}"] = M.entropy_at_k(p, item_categories, K)
    out[f"coverage@{K}"] = M.coverage(p, int(num_items if num_items is not None else len(item_categories)), k=K)
    return out


def check_ks(ks) -> tuple[int, ...]:
    """ks: one positive int or a non-empty sequence of them -> sorted distinct tuple (ValueError otherwise)."""
    ks = tuple(ks) if not isinstance(ks, int) else (ks,)
    if not ks or not all(is_int(k) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def evaluate_popularity(dataset, split: str = "test", ks=(5, 10), *, max_users=None, seed: int = 0) -> dict:
    """Metrics of :func:`popularity_baseline` (the same list for every user) on ``split``."""
    ks = check_ks(ks)
    ex = eval_examples(dataset, split, users=sample_users(len(dataset.sequences), max_users, seed))
    top = popularity_baseline(dataset, split, k=min(max(ks), len(dataset.item_ids)))
    if top.shape[0] < max(ks):
        top = torch.cat([top, torch.full((max(ks) - top.shape[0],), -1, dtype=torch.long)])
    pred = top[None].expand(len(ex.targets), -1)
    res = evaluate_rankings(pred, ex.targets, dataset.leaf_categories(), ks, num_items=len(dataset.item_ids))
    res.update(split=split, num_users_skipped=ex.num_users_skipped, method="popularity")
    return res


# ---- retriever evaluation -----------------------------------------------------------------------
def _per_level_temperature(temperature, num_levels: int):
    """None | float | sequence of num_levels floats -> None | tuple of num_levels floats > 0."""
    t = temperatures(temperature, num_levels)  # generate's check
    return None if t is None else tuple(t)


def _decode_rankings(model, dataset, id_table, ex: EvalExamples, idmap: IdMap, *, k, temperature, seed,
                     batch_size, backend, max_history, progress, precision="fp32"):
    """Run tiger_fast.generate over the examples in batches -> (pred int64 (R, k) internal, scores)."""
    from .generate import generate  # imported here: decoding pulls in the compiled extensions
    from .trie import Trie

    trie = Trie.from_id_table(id_table)  # once, not per batch
    preds, scores = [], []
    R = len(ex.targets)
    it = range(0, R, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=(R + batch_size - 1) // batch_size, desc="evaluate", unit="batch")
    for s in it:
        e = min(R, s + batch_size)
        hist = [torch.from_numpy(idmap.to_table(h)) for h in ex.histories[s:e]]
        users = [dataset.user_ids[u] for u in ex.users[s:e]]
        # Row key = the user index: sampled lists do not depend on batching or on max_users.
        res = generate(model, hist, id_table, user_ids=users, k=k, temperature=temperature, seed=seed,
                       row_keys=torch.from_numpy(ex.users[s:e].copy()), backend=backend, trie=trie,
                       max_history=max_history, precision=precision)
        preds.append(idmap.to_internal(res.item_ids))
        scores.append(res.scores.cpu())
    if not preds:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(preds), torch.cat(scores)


def evaluate_retriever(model, dataset, id_table, split: str = "test", ks=(5, 10), k: int = 10,
                       temperature=None, batch_size: int = 256, max_users: int | None = None, seed: int = 0,
                       backend: str = "auto", *, max_history: int = 20, id_space: str = "external",
                       progress: bool = False, return_rankings: bool = False, precision: str = "fp32") -> dict:
    """Recall/NDCG@ks, Entropy@K and coverage@K of a retriever on the leave-one-out ``split``.

    model: tiger_fast.t5.T5 or an HF T5ForConditionalGeneration on ``id_table.layout``;
    dataset: tiger_fast.data.Dataset; id_table: tiger_fast.ids.IdTable (the trie is built from it);
    k: items decoded per user (beam width; >= max(ks)); temperature: None (beam search), one float
    or one float per level (Gumbel-top-k sampling, seeded by ``seed`` with row key = user index);
    max_users: evaluate a random subset of this many users drawn with ``seed`` (None = all);
    return_rankings: also return "rankings" int64 (R, k) internal indices, "targets", "users";
    precision: generate's numeric mode ("fp32" exact, "bf16", "int8"; docs/generate_precision.md).
    Returns the :func:`evaluate_rankings` dict plus split, k, temperature, num_users_skipped,
    seconds (wall time of decoding) and users_per_second.
    """
    ks = check_ks(ks)
    if not is_int(k) or k < max(ks):
        raise ValueError(f"k (items decoded per user) must be an int >= max(ks) = {max(ks)}, got {k!r}")
    batch_size = check_int(batch_size, "batch_size")
    temperature = _per_level_temperature(temperature, id_table.layout.num_levels)
    idmap = IdMap(dataset, resolve_id_space(dataset, id_table, id_space))
    ex = eval_examples(dataset, split, users=sample_users(len(dataset.sequences), max_users, seed))
    if len(ex.targets) == 0:
        raise ValueError(f"no user has a non-empty history for split={split!r}; nothing to evaluate")
    t0 = time.perf_counter()
    pred, _ = _decode_rankings(model, dataset, id_table, ex, idmap, k=int(k), temperature=temperature,
                               seed=seed, batch_size=batch_size, backend=backend, max_history=max_history,
                               progress=progress, precision=precision)
    secs = time.perf_counter() - t0
    res = evaluate_rankings(pred, ex.targets, dataset.leaf_categories(), ks, num_items=len(dataset.item_ids))
    res.update(split=split, k=int(k), temperature=None if temperature is None else list(temperature),
               num_users_skipped=ex.num_users_skipped, seconds=secs,
               users_per_second=len(ex.targets) / secs if secs > 0 else float("inf"))
    if return_rankings:
        res.update(rankings=pred, targets=torch.from_numpy(ex.targets), users=torch.from_numpy(ex.users))
    return res


def entropy_vs_temperature(model, dataset, id_table, temperatures=(None, 1.0, 1.5, 2.0, (2.0, 2.0, 0.5, 0.5)),
                           *, split: str = "test", k: int = 10, batch_size: int = 256, max_users=None,
                           seed: int = 0, backend: str = "auto", max_history: int = 20,
                           id_space: str = "external", progress: bool = False) -> list[dict]:
    """Recall@k and Entropy@k (bits) of the same users for each temperature setting (TIGER Table 5
    style).  Each entry of ``temperatures`` is None (beam search), one float (all levels) or one
    float per level.  Returns one dict per setting: temperature, recall@k, ndcg@k, entropy@k,
    coverage@k, num_examples."""
    rows = []
    for t in temperatures:
        r = evaluate_retriever(model, dataset, id_table, split, ks=(k,), k=k, temperature=t,
                               batch_size=batch_size, max_users=max_users, seed=seed, backend=backend,
                               max_history=max_history, id_space=id_space, progress=progress)
        rows.append({"temperature": r["temperature"], f"recall@{k}": r[f"recall@{k}"],
                     f"ndcg@{k}": r[f"ndcg@{k}"], f"entropy@{k}": r[f"entropy@{k}"],
                     f"coverage@{k}": r[f"coverage@{k}"], "num_examples": r["num_examples"]})
    return rows


# ---- unconstrained decoding (invalid-ID rate) ---------------------------------------------------
def temperature_table(model, dataset, id_table, temps, *, max_users, sample_seeds=(0,)):
    """Recall@10 / Entropy@10 per temperature setting on the same users, with the paired
    comparisons behind the per-level claim: each per-level setting (h, h, l, l) against T = 1
    (entropy) and against uniform T = h (Recall@10 loss), as mean per-user differences with their
    standard errors (paired over users; the Philox noise is keyed by (seed, user), so every setting
    sees the same noise).  ``sample_seeds``: sampling seeds whose per-user Recall/Entropy are
    averaged (more seeds, less sampling noise in the comparisons).

    ``temps``: settings as :func:`evaluate_retriever` takes them (None = beam search); ``id_table``: the
    IdTable.  Returns ``(rows, claims)``: one dict per setting (recall@10, ndcg@10, entropy@10,
    coverage@10, num_examples) and one dict per per-level setting with the paired differences
    (``mean``, ``se``) and the two booleans of the claim.
    """
    if max_users is not None and max_users < len(dataset.sequences) and len(sample_seeds) > 1:
        raise ValueError("sample_seeds: several seeds need all users (max_users None or >= the number of "
                         "users): the seed also draws the user sample")
    cats = dataset.leaf_categories()
    per, rows = {}, []
    for t in temps:
        recs, ents, ndcgs, covs = [], [], [], []
        for s in ((sample_seeds[0],) if t is None else sample_seeds):
            r = evaluate_retriever(model, dataset, id_table, "test", ks=(10,), k=10, temperature=t,
                                   max_users=max_users, seed=s, return_rankings=True)
            recs.append(M.recall_at_k(r["rankings"], r["targets"], 10, reduction="none"))
            ents.append(M.entropy_at_k(r["rankings"], cats, 10, reduction="none"))
            ndcgs.append(M.ndcg_at_k(r["rankings"], r["targets"], 10))
            covs.append(r["coverage@10"])
        rec, ent = torch.stack(recs).mean(0), torch.stack(ents).mean(0)
        name = "beam" if t is None else "/".join(f"{x:g}" for x in r["temperature"])
        per[name] = (rec, ent, r["temperature"])
        rows.append({"temperature": r["temperature"], "recall@10": float(rec.mean()),
                     "ndcg@10": float(np.mean(ndcgs)), "entropy@10": float(ent.mean()),
                     "coverage@10": float(np.mean(covs)), "num_examples": int(rec.numel()),
                     "sample_seeds": 1 if t is None else len(sample_seeds)})

    def paired(a, b):
        d = (a - b).double()
        return {"mean": float(d.mean()), "se": float(d.std() / d.numel() ** 0.5)}

    claims = []
    for name, (rec, ent, t) in per.items():
        if t is None or len(set(t)) == 1 or "1/1/1/1" not in per:
            continue
        uni = "/".join(f"{t[0]:g}" for _ in t)
        if uni not in per:
            continue
        c = {"per_level": name, "uniform_high": uni,
             "entropy_minus_T1": paired(ent, per["1/1/1/1"][1]),
             "recall_minus_uniform_high": paired(rec, per[uni][0]),
             "recall_minus_T1": paired(rec, per["1/1/1/1"][0])}
        # the claim: more entropy than T = 1, and a smaller recall loss than the uniform high T
        # (both by more than two standard errors)
        c["more_entropy_than_T1"] = c["entropy_minus_T1"]["mean"] > 2 * c["entropy_minus_T1"]["se"]
        c["less_recall_loss_than_uniform_high"] = (c["recall_minus_uniform_high"]["mean"]
                                                   > 2 * c["recall_minus_uniform_high"]["se"])
        claims.append(c)
    return rows, claims


@torch.no_grad()
def unconstrained_beam_search(model, input_ids, attention_mask, layout, num_beams: int = 10, *,
                              use_eos: bool = True):
    """Plain beam search over the ``layout.num_levels`` ID tokens, restricted at each step to the
    level's token block but NOT to the trie (TIGER's decoding; invalid IDs can come out).

    model: tiger_fast.t5.T5 or HF T5ForConditionalGeneration on ``layout``; input_ids int64 (R, S),
    attention_mask bool (R, S) on the model's device.
    Scores follow the trie search's conventions (docs/contracts.md): log_softmax over the full vocabulary,
    the level's block sliced out (not renormalised), float32 running sums, top ``num_beams`` by score
    with ties to the smaller flat index (parent beam * S_l + code); with ``use_eos`` a final step
    adds log p(eos | ID) and re-sorts (ties by beam index).
    Returns (codes int64 (R, B, L), scores float32 (R, B)), B = min(num_beams, #possible IDs), best first.
    """
    check_int(num_beams, "num_beams")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty int64 tensor (R, S), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}")
    V = int(getattr(getattr(model, "config", None), "vocab_size", layout.vocab_size))
    if V != layout.vocab_size:
        raise ValueError(f"the model's vocab_size ({V}) does not match layout.vocab_size ({layout.vocab_size})")
    R = input_ids.shape[0]
    L = layout.num_levels
    dev = input_ids.device
    step = make_stepper(model, input_ids, attention_mask, L)
    rows = torch.arange(R, device=dev)[:, None]
    lp = torch.log_softmax(step(None, torch.full((R, 1), layout.decoder_start_id, dtype=torch.long,
                                                 device=dev)).float(), dim=-1)  # (R, B_in, V)
    scores = torch.zeros(R, 1, dtype=torch.float32, device=dev)
    codes = torch.zeros(R, 1, 0, dtype=torch.long, device=dev)
    for l in range(L):
        S = layout.level_sizes[l]
        off = layout.level_offset(l)
        B_in = scores.shape[1]
        cand = (scores[:, :, None] + lp[:, :, off:off + S]).reshape(R, B_in * S)
        B_out = min(int(num_beams), B_in * S)
        # the trie search's selection rule, every candidate valid: score descending, ties by flat
        # index (parent beam * S + code) ascending
        idx, _ = top_by_key(cand, torch.ones_like(cand, dtype=torch.bool), B_out)
        top = torch.gather(cand, 1, idx)
        parent, tok = idx // S, idx % S
        codes = torch.cat([codes[rows, parent], tok[:, :, None]], dim=2)
        scores = top
        if l < L - 1 or use_eos:
            lp = torch.log_softmax(step(parent, tok + off).float(), dim=-1)
    if use_eos:  # the trie search's end step: one float32 add, re-sorted, ties by beam index
        order, scores = eos_rerank(scores, lp[:, :, layout.eos_id], torch.ones_like(scores, dtype=torch.bool))
        codes = codes[rows, order]
    return codes, scores


def invalid_rate_unconstrained(model, dataset, id_table, split: str = "test", k: int = 10, *,
                               batch_size: int = 256, max_users=None, seed: int = 0, max_history: int = 20,
                               use_eos: bool = True, id_space: str = "external", progress: bool = False) -> dict:
    """Share of invalid IDs in the top-k of unconstrained beam search (TIGER §4.3 reports 0.1–1.6 %
    for top-10), measured on the leave-one-out ``split``.

    Returns {"invalid_rate": fraction of the R*k decoded IDs that are no item's ID,
    "rows_with_invalid": fraction of users with at least one invalid ID in their top-k,
    "recall@k_filtered": Recall@k of the lists with invalid IDs dropped (the paper's
    decode-then-filter), "num_examples", "k", "seconds"}.  ``max_users``/``seed`` pick a seeded
    random subset of users.
    """
    check_int(k, "k")
    batch_size = check_int(batch_size, "batch_size")
    layout = id_table.layout
    idmap = IdMap(dataset, resolve_id_space(dataset, id_table, id_space))
    ex = eval_examples(dataset, split, users=sample_users(len(dataset.sequences), max_users, seed))
    if len(ex.targets) == 0:
        raise ValueError(f"no user has a non-empty history for split={split!r}; nothing to evaluate")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    dev = model_device(model)
    all_codes = []
    t0 = time.perf_counter()
    R = len(ex.targets)
    it = range(0, R, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=(R + batch_size - 1) // batch_size, desc="unconstrained", unit="batch")
    try:
        for s in it:
            e = min(R, s + batch_size)
            hist = [torch.from_numpy(idmap.to_table(h)) for h in ex.histories[s:e]]
            users = [dataset.user_ids[u] for u in ex.users[s:e]]
            ids, mask = encoder_batch(layout, id_table, hist, users, max_history)
            codes, _ = unconstrained_beam_search(model, ids.to(dev), mask.to(dev), layout, k, use_eos=use_eos)
            all_codes.append(codes.cpu())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    secs = time.perf_counter() - t0
    codes = torch.cat(all_codes)  # (R, B, L), B = min(k, #IDs)
    B = codes.shape[1]
    items = id_table.items_of_codes(codes.reshape(-1, layout.num_levels)).reshape(R, B)
    bad = items < 0
    # Decode-then-filter: valid IDs keep their order, invalid ones are dropped (padded with -1).
    key = torch.where(bad, torch.full_like(items, B), torch.arange(B).expand(R, B))
    order = torch.sort(key, dim=1, stable=True).indices
    filtered = torch.where(bad, torch.full_like(items, -1), items).gather(1, order)
    filtered = idmap.to_internal(filtered)
    return {
        "invalid_rate": M.invalid_rate(codes, id_table.codes),
        "rows_with_invalid": float(bad.any(dim=1).double().mean()),
        f"recall@{k}_filtered": M.recall_at_k(filtered, ex.targets, B),
        "num_examples": R,
        "k": int(k),
        "split": split,
        "seconds": secs,
    }
