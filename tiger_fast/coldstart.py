"""Cold-start retrieval, following TIGER §4.3 ("Cold-start recommendation").

Protocol.

1. :func:`split_cold_items` holds out a random ``fraction`` (paper: 5 %) of the items that are
   test targets (``pool="test_targets"``, the paper's "5 % of test items"; ``pool="all"`` draws from
   the whole catalogue).  Held-out ("cold") items are removed from every position of every user
   sequence except the final (test) position, so training (``s[:-2]``), validation (``s[-2]``) and
   every history never contain them; test examples whose target is cold form the cold-start test
   set.  The returned dataset keeps all N items in its catalogue (cold items simply have no
   training interactions), so internal indices are unchanged.
2. Train the RQ-VAE and the retriever on the warm items only (the caller's job: build the IdTable
   from ``split.warm_items``).  :func:`assign_cold_ids` then gives each cold item its semantic ID
   from the trained RQ-VAE (``rqvae.semantic_codes`` of its content embedding) and appends it to
   the IdTable (``IdTable.add_items``: collision code after the ones in use, existing IDs unchanged)
   and, if given, to a Trie in place — no retraining.
3. :func:`cold_start_retrieve` decodes with the retriever over the trie of **all** items (warm and
   the cold ones just added: ``decode_over="all"``, the default, so the model can generate a cold
   item's own prefix even when no warm item shares it — with RQ-VAE IDs most prefixes are unique,
   measured 98 % on Beauty) or of the **warm** items only (``decode_over="warm"``), then merges in
   the cold items whose first ``prefix_len`` (default: the RQ-VAE levels, 3) codes equal a
   generated ID's, at most ``ceil(epsilon * k)`` cold items per list (the paper's ε; generated cold
   items count too, and those beyond the cap are dropped).
   Exact merging rule (:func:`merge_cold_items`): walk the generated IDs best first; emit the
   generated (warm) item, then the cold items sharing its prefix in semantic-ID order (collision
   code, then item id) while the list has fewer than ``ceil(epsilon * k)`` cold items; an item
   already emitted is skipped; stop at k items.  A cold item inherits the score of the generated ID
   that brought it in.  So cold items displace the lowest-ranked warm items, and with epsilon = 0
   the result equals plain ``generate`` over the warm trie.
4. :func:`semantic_knn_baseline` (the paper's Semantic_KNN): rank the cold items by cosine
   similarity between the content embedding of the user's last history item and each cold item.
5. :func:`evaluate_cold_start` reports Recall@k (and NDCG@k) of both on the cold-target test set.

Ids: everything here takes and returns item ids in the IdTable's id space, except the dataset-level
functions (split / evaluate) which use internal indices like ``Dataset.sequences`` and convert
(see tiger_fast.evaluate, ``id_space``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import metrics as M
from .checks import check_int

__all__ = [
    "ColdStartSplit",
    "split_cold_items",
    "assign_cold_ids",
    "max_cold_items",
    "ColdStartResult",
    "merge_cold_items",
    "cold_start_retrieve",
    "semantic_knn_baseline",
    "evaluate_cold_start",
]


# ---- splitting ----------------------------------------------------------------------------------
@dataclass
class ColdStartSplit:
    """Result of :func:`split_cold_items`.

    dataset: copy of the input Dataset whose sequences no longer contain cold items except as a
    user's last (test) item; cold_items / warm_items: int64 sorted internal item indices;
    cold_test_users / warm_test_users: int64 user indices with a leave-one-out test example (on
    the new dataset) whose target is cold / warm; fraction, seed, pool: the arguments."""

    dataset: object
    cold_items: np.ndarray
    warm_items: np.ndarray
    cold_test_users: np.ndarray
    warm_test_users: np.ndarray
    fraction: float
    seed: int
    pool: str


def _replace_sequences(dataset, sequences, keep_masks):
    """Copy of ``dataset`` with new sequences (and timestamps filtered by the same masks)."""
    changes = {"sequences": sequences}
    ts = getattr(dataset, "timestamps", None)
    if ts is not None:
        changes["timestamps"] = [np.asarray(t)[m] for t, m in zip(ts, keep_masks)]
    if dataclasses.is_dataclass(dataset):
        return dataclasses.replace(dataset, **changes)
    out = copy.copy(dataset)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def split_cold_items(dataset, fraction: float = 0.05, seed: int = 0, *, pool: str = "test_targets") -> ColdStartSplit:
    """Hold out ``round(fraction * |pool|)`` items (at least 1, at most |pool| - 1) drawn uniformly
    with ``numpy.random.default_rng(seed)`` (module docstring, step 1).  The pool "test_targets" is
    the distinct last items of the users that have a test example (>= 3 items)."""
    from .sequences import leave_one_out

    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be a float in (0, 1), got {fraction!r}")
    if pool not in ("test_targets", "all"):
        raise ValueError(f"pool must be 'test_targets' or 'all', got {pool!r}")
    check_int(seed, "seed", 0)
    n = len(dataset.item_ids)
    seqs = [np.asarray(s, dtype=np.int64) for s in dataset.sequences]
    if pool == "all":
        candidates = np.arange(n, dtype=np.int64)
    else:
        test = leave_one_out(dataset).test
        candidates = np.unique(np.asarray([seqs[u][e] for u, e in zip(test.user_index, test.end)], dtype=np.int64))
    if candidates.size < 2:
        raise ValueError(f"only {candidates.size} candidate item(s) in pool={pool!r}; need at least 2 to "
                         "hold some out and keep some warm")
    m = min(candidates.size - 1, max(1, int(round(fraction * candidates.size))))
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(candidates, size=m, replace=False)).astype(np.int64)
    is_cold = np.zeros(n, dtype=bool)
    is_cold[cold] = True
    new_seqs, masks = [], []
    for s in seqs:
        keep = ~is_cold[s]
        if s.shape[0]:
            keep[-1] = True  # the test target stays, cold or not
        new_seqs.append(s[keep])
        masks.append(keep)
    ds = _replace_sequences(dataset, new_seqs, masks)
    test = leave_one_out(ds).test
    tgt_cold = np.asarray([is_cold[new_seqs[u][e]] for u, e in zip(test.user_index, test.end)], dtype=bool)
    users = np.asarray(test.user_index, dtype=np.int64)
    return ColdStartSplit(ds, cold, np.flatnonzero(~is_cold).astype(np.int64), users[tgt_cold], users[~tgt_cold],
                          float(fraction), int(seed), pool)


def assign_cold_ids(rqvae, embeddings, cold_item_ids, id_table, *, trie=None, backend: str = "auto"):
    """Give cold items semantic IDs from a trained RQ-VAE and add them to ``id_table`` (in place)
    and to ``trie`` (in place, if given; its rows must be the table's rows).

    embeddings: float (M, D) content embeddings of the cold items, aligned with ``cold_item_ids``
    (int64 (M,), ids in the table's id space, not yet in the table).
    Returns (rows int64 (M,), codes int64 (M, L+1)) as ``IdTable.add_items``."""
    emb = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
    ids = torch.as_tensor(np.asarray(cold_item_ids, dtype=np.int64)).reshape(-1)
    if emb.dim() != 2 or emb.shape[0] != ids.shape[0]:
        raise ValueError(f"embeddings must be (M, D) aligned with cold_item_ids (M = {ids.shape[0]}), "
                         f"got shape {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise TypeError(f"embeddings must be floating point, got {emb.dtype}")
    if emb.numel() and not bool(torch.isfinite(emb).all()):
        raise ValueError("embeddings contain NaN/Inf")
    rq = rqvae.semantic_codes(emb.float(), backend=backend)
    rows, codes = id_table.add_items(ids, rq)
    if trie is not None:
        trie.add(rows, codes)
    return rows, codes


# ---- merging ------------------------------------------------------------------------------------
def max_cold_items(k: int, epsilon: float) -> int:
    """The paper's cap on cold items in a top-k list: ceil(epsilon * k), epsilon in [0, 1].
    (Computed as ceil(eps*k - 1e-9) so that e.g. 0.3 * 10 = 3.0000000000000004 gives 3.)"""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be a float in [0, 1], got {epsilon!r}")
    return int(min(k, max(0, math.ceil(float(epsilon) * k - 1e-9))))


@dataclass
class ColdStartResult:
    """item_ids int64 (R, k) (-1 padding), scores float32 (R, k) (-inf padding), is_cold bool (R, k),
    rows int64 (R, k) IdTable rows (-1 padding; None from :func:`merge_cold_items`)."""

    item_ids: torch.Tensor
    scores: torch.Tensor
    is_cold: torch.Tensor
    rows: torch.Tensor | None = None


def merge_cold_items(gen_item_ids, gen_codes, gen_scores, cold_item_ids, cold_codes, k: int,
                     epsilon: float, *, prefix_len: int | None = None) -> ColdStartResult:
    """Merge cold items into generated top lists (module docstring, step 3).

    gen_item_ids int64 (R, K'), gen_codes int64 (R, K', L), gen_scores float (R, K'): generated
    lists best first (-1 item = padding); cold_item_ids int64 (C,), cold_codes int64 (C, L) full
    semantic IDs of the cold items.  Ids are any non-negative keys shared by both sides (item ids,
    or IdTable rows as :func:`cold_start_retrieve` passes); k: output length (need not be <= K');
    epsilon in [0, 1];
    prefix_len: codes that must match (default L - 1, i.e. all RQ-VAE levels, not the collision code).
    """
    items = M.as_int_tensor(gen_item_ids, "gen_item_ids", 2)
    codes = M.as_int_tensor(gen_codes, "gen_codes", 3)
    scores = torch.as_tensor(gen_scores).detach().cpu()
    R, Kp = items.shape
    if codes.shape[:2] != (R, Kp) or scores.shape != (R, Kp):
        raise ValueError(f"gen_codes must be (R, K', L) and gen_scores (R, K') with (R, K') = {(R, Kp)}; "
                         f"got {tuple(codes.shape)} and {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"gen_scores must be floating point, got {scores.dtype}")
    L = codes.shape[2]
    cids = M.as_int_tensor(cold_item_ids, "cold_item_ids", 1)
    ccodes = M.as_int_tensor(cold_codes, "cold_codes", 2)
    if ccodes.shape != (cids.shape[0], L):
        raise ValueError(f"cold_codes must be (C, {L}) aligned with cold_item_ids (C = {cids.shape[0]}), "
                         f"got {tuple(ccodes.shape)}")
    if cids.numel() and (bool((cids < 0).any()) or torch.unique(cids).numel() != cids.numel()):
        raise ValueError("cold_item_ids must be distinct non-negative item ids")
    check_int(k, "k")
    p = L - 1 if prefix_len is None else int(prefix_len)
    if not 1 <= p <= L:
        raise ValueError(f"prefix_len must be in [1, {L}], got {prefix_len!r}")
    cap = max_cold_items(int(k), epsilon)

    # prefix -> cold items in semantic-ID order (full code, then item id)
    by_prefix: dict[tuple, list[int]] = {}
    if cids.numel():
        order = np.lexsort((cids.numpy(),) + tuple(ccodes[:, l].numpy() for l in range(L - 1, -1, -1)))
        for i in order:
            by_prefix.setdefault(tuple(ccodes[i, :p].tolist()), []).append(int(cids[i]))
    cold_set = set(cids.tolist())

    out_ids = torch.full((R, k), -1, dtype=torch.long)
    out_sc = torch.full((R, k), float("-inf"), dtype=torch.float32)
    out_cold = torch.zeros((R, k), dtype=torch.bool)
    it, cd, sc = items.tolist(), codes[:, :, :p].tolist(), scores.float().tolist()
    for r in range(R):
        row: list[tuple[int, float, bool]] = []
        seen: set[int] = set()
        n_cold = 0
        for j in range(Kp):
            if len(row) >= k:
                break
            item = it[r][j]
            if item < 0:
                continue
            s = sc[r][j]
            if item not in seen and item not in cold_set:
                row.append((item, s, False))
                seen.add(item)
            # A generated cold item (only if the caller decoded over a trie with cold items) comes
            # first among its prefix group; all of them count toward the cap.
            group = by_prefix.get(tuple(cd[r][j]), [])
            if item in cold_set:
                group = [item] + [c for c in group if c != item]
            for c in group:
                if n_cold >= cap or len(row) >= k:
                    break
                if c in seen:
                    continue
                row.append((c, s, True))
                seen.add(c)
                n_cold += 1
        row = row[:k]
        if row:
            out_ids[r, : len(row)] = torch.tensor([x[0] for x in row], dtype=torch.long)
            out_sc[r, : len(row)] = torch.tensor([x[1] for x in row], dtype=torch.float32)
            out_cold[r, : len(row)] = torch.tensor([x[2] for x in row], dtype=torch.bool)
    return ColdStartResult(out_ids, out_sc, out_cold)


def cold_start_retrieve(model, histories, id_table, cold_item_ids, *, user_ids=None, k: int = 10,
                        epsilon: float = 0.1, num_candidates: int | None = None, prefix_len: int | None = None,
                        temperature=None, seed: int = 0, row_keys=None, backend: str = "auto",
                        max_history: int = 20, decode_over: str = "all") -> ColdStartResult:
    """Top-k with cold items (module docstring, step 3).

    histories: R sequences of item ids (table id space); id_table: IdTable holding warm AND cold
    items (after :func:`assign_cold_ids`); cold_item_ids int64 (C,) ids of the cold items (all in
    the table); decode_over: "all" (trie of warm + cold items) or "warm"; num_candidates: IDs
    decoded (default: k for "warm", 2k for "all", so that dropping cold items beyond the cap still
    leaves k); other arguments as ``tiger_fast.generate``.  Returns ColdStartResult (R, k) with item ids and rows.  Merging works
    on IdTable rows, so any item ids (even negative ones) are fine."""
    from .generate import generate
    from .trie import Trie

    cids = M.as_int_tensor(cold_item_ids, "cold_item_ids", 1)
    cold_rows = id_table.rows_of(cids)  # raises on ids not in the table
    warm = torch.ones(len(id_table), dtype=torch.bool)
    warm[cold_rows] = False
    warm_rows = torch.nonzero(warm).reshape(-1)
    if warm_rows.numel() == 0:
        raise ValueError("every item of id_table is cold; the retriever needs warm items to decode")
    if decode_over not in ("all", "warm"):
        raise ValueError(f"decode_over must be 'all' or 'warm', got {decode_over!r}")
    rows = warm_rows if decode_over == "warm" else torch.arange(len(id_table))
    trie = Trie.from_codes(id_table.codes[rows], rows, level_sizes=id_table.layout.level_sizes)
    if num_candidates is None:
        kc = min(int(k) * (1 if decode_over == "warm" else 2), len(trie))
    else:
        kc = int(num_candidates)
    if kc < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates!r}")
    res = generate(model, histories, id_table, user_ids=user_ids, k=kc, temperature=temperature, seed=seed,
                   row_keys=row_keys, backend=backend, trie=trie, max_history=max_history)
    merged = merge_cold_items(res.rows, res.codes, res.scores, cold_rows, id_table.codes[cold_rows], k, epsilon,
                              prefix_len=prefix_len)
    rows = merged.item_ids
    item_ids = torch.where(rows >= 0, id_table.item_ids[rows.clamp(min=0)], torch.full_like(rows, -1))
    return ColdStartResult(item_ids, merged.scores, merged.is_cold, rows=rows)


# ---- Semantic KNN baseline ----------------------------------------------------------------------
def semantic_knn_baseline(embeddings, query_items, cold_items, k: int = 10, *, batch_size: int = 4096):
    """Rank cold items by cosine similarity to each query item's content embedding.

    embeddings: float (N, D) content embeddings indexed by item index; query_items int64 (R,) the
    user's last history item per example; cold_items int64 (C,) candidate indices.  Similarities in
    float64 (ties -> smaller item index first).  Zero-norm embeddings -> ValueError.
    Returns (item_ids int64 (R, k) indices into ``embeddings`` with -1 padding when C < k,
    scores float64 (R, k) cosine similarities, -inf padding)."""
    emb = embeddings if isinstance(embeddings, torch.Tensor) else torch.from_numpy(np.asarray(embeddings))
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"embeddings must be a float (N, D) array, got {emb.dtype} {tuple(emb.shape)}")
    emb = emb.detach().cpu().double()
    N = emb.shape[0]
    q = M.as_int_tensor(query_items, "query_items", 1)
    c = M.as_int_tensor(cold_items, "cold_items", 1)
    for name, t in (("query_items", q), ("cold_items", c)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= N):
            raise ValueError(f"{name} must be item indices in [0, {N}) (rows of embeddings)")
    if c.numel() == 0:
        raise ValueError("cold_items is empty; nothing to rank")
    check_int(k, "k")
    c = torch.sort(c).values  # ascending ids so a stable sort breaks ties by item index
    if torch.unique(c).numel() != c.numel():
        raise ValueError("cold_items has duplicates")
    used = torch.cat([q, c])
    sub = emb[used]
    if not bool(torch.isfinite(sub).all()):
        raise ValueError("embeddings of the query/cold items contain NaN/Inf")
    norms = sub.norm(dim=1)
    if bool((norms == 0).any()):
        bad = used[norms == 0][:5].tolist()
        raise ValueError(f"items {bad} have all-zero embeddings; cosine similarity is undefined")
    cn = emb[c] / emb[c].norm(dim=1, keepdim=True)
    kk = min(int(k), c.numel())
    R = q.numel()
    ids = torch.full((R, int(k)), -1, dtype=torch.long)
    scs = torch.full((R, int(k)), float("-inf"), dtype=torch.float64)
    for s in range(0, R, batch_size):
        qe = emb[q[s:s + batch_size]]
        sim = (qe / qe.norm(dim=1, keepdim=True)) @ cn.T  # (r, C) float64
        val, idx = torch.sort(sim, dim=1, descending=True, stable=True)
        ids[s:s + batch_size, :kk] = c[idx[:, :kk]]
        scs[s:s + batch_size, :kk] = val[:, :kk]
    return ids, scs


# ---- evaluation ---------------------------------------------------------------------------------
def evaluate_cold_start(model, split: ColdStartSplit, id_table, embeddings, *, ks=(5, 10), epsilon: float = 0.1,
                        num_candidates: int | None = None, batch_size: int = 256, backend: str = "auto",
                        max_history: int = 20, id_space: str = "external", decode_over: str = "all") -> dict:
    """Recall@k / NDCG@k on the cold-target test examples for TIGER with the ε rule and for
    Semantic_KNN.

    split: from :func:`split_cold_items`; id_table: warm + cold items (after :func:`assign_cold_ids`);
    embeddings: float (N, D) content embeddings by internal item index; decode_over: as
    :func:`cold_start_retrieve`.
    Returns {"tiger": {"recall@k", "ndcg@k"...}, "semantic_knn": {...}, "num_examples",
    "num_cold_items", "epsilon", "max_cold_per_list", "mean_cold_per_list" (cold items TIGER put in
    its lists, on average)}."""
    from .evaluate import IdMap, check_ks, eval_examples, resolve_id_space

    ks = check_ks(ks)
    batch_size = check_int(batch_size, "batch_size")
    K = max(ks)
    ds = split.dataset
    idmap = IdMap(ds, resolve_id_space(ds, id_table, id_space))
    ex = eval_examples(ds, "test", users=split.cold_test_users)
    if len(ex.targets) == 0:
        raise ValueError("the split has no cold-target test example; use a larger fraction or dataset")
    cold_table_ids = idmap.to_table(split.cold_items)
    preds, n_cold = [], []
    for s in range(0, len(ex.targets), int(batch_size)):
        e = min(len(ex.targets), s + int(batch_size))
        hist = [torch.from_numpy(idmap.to_table(h)) for h in ex.histories[s:e]]
        users = [ds.user_ids[u] for u in ex.users[s:e]]
        r = cold_start_retrieve(model, hist, id_table, cold_table_ids, user_ids=users, k=K, epsilon=epsilon,
                                num_candidates=num_candidates, backend=backend, max_history=max_history,
                                decode_over=decode_over, row_keys=torch.from_numpy(ex.users[s:e].copy()))
        preds.append(idmap.to_internal(r.item_ids))
        n_cold.append(r.is_cold.sum(dim=1))
    pred = torch.cat(preds)
    last = np.asarray([h[-1] for h in ex.histories], dtype=np.int64)
    knn, _ = semantic_knn_baseline(embeddings, last, split.cold_items, K)
    out = {"num_examples": len(ex.targets), "num_cold_items": int(split.cold_items.size), "decode_over": decode_over,
           "epsilon": float(epsilon), "max_cold_per_list": max_cold_items(K, epsilon),
           "mean_cold_per_list": float(torch.cat(n_cold).double().mean())}
    for name, p in (("tiger", pred), ("semantic_knn", knn)):
        out[name] = {f"{m}@{k}": f(p, ex.targets, k) for k in ks for m, f in
                     (("recall", M.recall_at_k), ("ndcg", M.ndcg_at_k))}
    return out
