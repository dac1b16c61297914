"""Ranking and semantic-ID metrics for TIGER evaluation (docs/contracts.md, "Metrics").

Conventions shared by every function here:

* A *ranking* ``pred`` is an integer tensor (R, K): row r is the top-K list for example r, best
  first, holding item ids (the dataset's internal item indices, 0..N-1).  ``-1`` is the padding
  sentinel (fewer than K valid items were produced) and never matches anything.
* Full-catalogue semantics (TIGER §4.1): every metric is computed on the ranking as given over the
  whole catalogue; nothing is sampled and nothing (e.g. the user's history) is excluded here.
* Each example has exactly one relevant item ``target[r]`` (leave-one-out), so Recall@K is the hit
  rate and the ideal DCG is 1.
* If an item appears more than once in a row (it never does for trie-constrained output), its first
  occurrence is its rank; later copies are ignored by Recall/NDCG.
* ``reduction="mean"`` (default) returns a Python float averaged over the R rows; ``"none"`` returns
  the per-row values as a float64 tensor (R,).  A mean over zero rows is undefined and raises.
* Inputs may be torch tensors, NumPy arrays or nested lists, on any device; results are computed on
  the CPU (metrics are cheap next to decoding).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .checks import check_int, is_int

__all__ = [
    "recall_at_k",
    "ndcg_at_k",
    "entropy_at_k",
    "coverage",
    "invalid_rate",
    "codebook_usage",
]

PAD = -1  # padding sentinel in rankings and generated codes


# ---- input validation ---------------------------------------------------------------------------
def as_int_tensor(x, name: str, ndim: int) -> torch.Tensor:
    """Convert ``x`` to a CPU int64 tensor with ``ndim`` dims; TypeError/ValueError otherwise."""
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} must be an integer array, got dtype object")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be an integer tensor/array, got {type(x).__name__}: {e}") from None
        if t.numel() == 0:  # torch.as_tensor([]) is float32: an empty list is fine as an int list
            t = t.long()
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must have an integer dtype (item ids / codes), got {t.dtype}; "
                        "convert with .long() after rounding if the values really are integers")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.int64)


def _check_k(k, K: int, name: str = "k") -> int:
    if not is_int(k):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= K:
        raise ValueError(f"{name} must be in [1, K={K}] (K = the ranking's width), got {k}")
    return k


def check_pred(pred, name: str = "pred") -> torch.Tensor:
    """A ranked list batch: int64 (R, K) CPU tensor of item ids, -1 = padding (ValueError otherwise)."""
    p = as_int_tensor(pred, name, 2)
    if p.numel() and bool((p < PAD).any()):
        raise ValueError(f"{name} holds ids < -1; valid entries are item ids >= 0 and -1 is padding")
    return p


def _reduce(values: torch.Tensor, reduction: str, what: str):
    if reduction == "none":
        return values
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if values.numel() == 0:
        raise ValueError(f"{what}: no rows to average (R = 0); pass at least one example "
                         "or use reduction='none'")
    return float(values.mean())


def _first_hit_rank(pred: torch.Tensor, target, k: int) -> torch.Tensor:
    """int64 (R,) 0-based rank of target within pred[:, :k], or k when it is absent."""
    t = as_int_tensor(target, "target", 1)
    if t.shape[0] != pred.shape[0]:
        raise ValueError(f"target has {t.shape[0]} rows but pred has {pred.shape[0]}; "
                         "pass one target per ranking row")
    if t.numel() and bool((t < 0).any()):
        raise ValueError("target holds negative ids; every example needs a real target item id (>= 0)")
    hits = pred[:, :k] == t[:, None]  # -1 padding never equals a target >= 0
    pos = torch.arange(k, dtype=torch.int64).expand_as(hits)
    return torch.where(hits, pos, torch.full_like(pos, k)).amin(dim=1)


# ---- ranking metrics ----------------------------------------------------------------------------
def recall_at_k(pred, target, k: int, *, reduction: str = "mean"):
    """Recall@k with a single relevant item per example (= hit rate).

    pred: int (R, K) ranked item ids, -1 padding; target: int (R,) the held-out item of each row;
    k: 1 <= k <= K.  Returns float (mean over rows) or float64 (R,) with ``reduction="none"``.
    """
    p = check_pred(pred)
    k = _check_k(k, p.shape[1])
    rank = _first_hit_rank(p, target, k)
    return _reduce((rank < k).double(), reduction, "recall_at_k")


def ndcg_at_k(pred, target, k: int, *, reduction: str = "mean"):
    """NDCG@k with a single relevant item: 1 / log2(rank + 2) if it is at 0-based rank < k, else 0
    (the ideal DCG is 1).  Shapes and reduction as :func:`recall_at_k`."""
    p = check_pred(pred)
    k = _check_k(k, p.shape[1])
    rank = _first_hit_rank(p, target, k)
    gain = 1.0 / torch.log2(rank.double() + 2.0)
    return _reduce(torch.where(rank < k, gain, torch.zeros_like(gain)), reduction, "ndcg_at_k")


# ---- diversity / catalogue metrics --------------------------------------------------------------
def _category_codes(item_categories) -> torch.Tensor:
    """Map per-item category labels (any hashable; one per item id 0..N-1) to int64 (N,) codes."""
    if isinstance(item_categories, Mapping):
        raise TypeError("item_categories must be a sequence with one label per item id 0..N-1 "
                        "(e.g. dataset.leaf_categories()), not a mapping")
    if isinstance(item_categories, torch.Tensor):
        if item_categories.dim() != 1:
            raise ValueError(f"item_categories must be 1-D (N,), got shape {tuple(item_categories.shape)}")
        if item_categories.is_floating_point() or item_categories.dtype == torch.bool:
            raise TypeError(f"item_categories tensor must be integer labels, got {item_categories.dtype}")
        _, inv = torch.unique(item_categories.detach().cpu().long(), return_inverse=True)
        return inv.long()
    if isinstance(item_categories, np.ndarray) and item_categories.ndim != 1:
        raise ValueError(f"item_categories must be 1-D (N,), got shape {item_categories.shape}")
    if not isinstance(item_categories, (Sequence, np.ndarray)) or isinstance(item_categories, (str, bytes)):
        raise TypeError("item_categories must be a sequence of per-item category labels, "
                        f"got {type(item_categories).__name__}")
    index: dict = {}
    out = np.empty(len(item_categories), dtype=np.int64)
    for i, c in enumerate(item_categories):
        if isinstance(c, list):  # a category path: the leaf is the category (docs/contracts.md, "Metrics")
            c = c[-1] if c else None
        try:
            out[i] = index.setdefault(c, len(index))
        except TypeError:
            raise TypeError(f"item_categories[{i}] is not hashable ({type(c).__name__})") from None
    return torch.from_numpy(out)


def entropy_at_k(pred, item_categories, k: int, *, reduction: str = "mean"):
    """Entropy@k in bits: per top-k list, the Shannon entropy (log base 2) of the distribution of
    item categories within the list, averaged over lists.

    pred: int (R, K) item ids (-1 padding); item_categories: one hashable label per item id 0..N-1
    (a list of str such as ``Dataset.leaf_categories()``, a NumPy array or an int tensor; a label
    that is a list is taken as a category path and its last element is the category; ``None`` is
    a label like any other).  Padded slots are ignored: a list's distribution is over its valid
    items, and a list with no valid item has entropy 0.  A list of k items spans 0 (one category)
    to log2(k) bits (all distinct).  Example: top-5 with category shares 0.6/0.2/0.2 -> 1.371 bits.
    """
    p = check_pred(pred)
    k = _check_k(k, p.shape[1])
    cats = _category_codes(item_categories)
    top = p[:, :k]
    if top.numel() and int(top.max()) >= cats.shape[0]:
        raise ValueError(f"pred holds item id {int(top.max())} but item_categories covers only "
                         f"{cats.shape[0]} items (ids 0..{cats.shape[0] - 1})")
    valid = top >= 0
    c = torch.where(valid, cats[top.clamp_min(0)], torch.full_like(top, -1))
    n = valid.sum(dim=1).double()  # (R,)
    # H = -sum_cat (n_c/n) log2(n_c/n) = -sum_positions (1/n) log2(n_{cat(pos)}/n): count, for each
    # valid position, how many valid positions share its category (pairwise compare, chunked rows
    # so memory stays bounded for large k).
    ent = torch.zeros(top.shape[0], dtype=torch.float64)
    chunk = max(1, (1 << 22) // (k * k))
    for s in range(0, top.shape[0], chunk):
        cc, vv, nn = c[s:s + chunk], valid[s:s + chunk], n[s:s + chunk]
        same = (cc[:, :, None] == cc[:, None, :]) & vv[:, None, :]
        cnt = same.sum(dim=2).double()  # (r, k); >= 1 at valid positions
        frac = torch.where(vv, cnt / nn.clamp_min(1.0)[:, None], torch.ones_like(cnt))
        ent[s:s + chunk] = -(torch.log2(frac) / nn.clamp_min(1.0)[:, None]).sum(dim=1)
    ent = ent.clamp_min(0.0)  # -0.0 -> 0.0 for single-category lists
    return _reduce(ent, reduction, "entropy_at_k")


def coverage(pred, num_items: int, k: int | None = None) -> float:
    """Catalogue coverage: the fraction of the catalogue's ``num_items`` items that appear in at
    least one of the top-k lists (k = all K columns when None).  pred: int (R, K), -1 padding.
    Returns 0.0 for R = 0 (no lists cover nothing)."""
    p = check_pred(pred)
    check_int(num_items, "num_items (the catalogue size)")
    if k is not None:
        p = p[:, :_check_k(k, p.shape[1])]
    ids = p[p >= 0]
    if ids.numel() and int(ids.max()) >= num_items:
        raise ValueError(f"pred holds item id {int(ids.max())} >= num_items={num_items}; "
                         "ids must be internal item indices 0..num_items-1")
    return float(torch.unique(ids).numel()) / float(num_items)


# ---- semantic-ID metrics ------------------------------------------------------------------------
def _code_keys(codes: torch.Tensor, radix: list[int]) -> torch.Tensor:
    """Mixed-radix key int64 (M,) of each code row (M, L); all entries must be in [0, radix)."""
    key = torch.zeros(codes.shape[0], dtype=torch.int64)
    for l, r in enumerate(radix):
        key = key * r + codes[:, l]
    return key


def _valid_code_tensor(valid_codes, L: int) -> torch.Tensor:
    """Accept an (N, L) int tensor/array, an iterable of L-tuples, or an object exposing ``codes``
    (e.g. :class:`tiger_fast.ids.IdTable`)."""
    obj = valid_codes
    if not isinstance(obj, (torch.Tensor, np.ndarray, set, frozenset, list, tuple)) and hasattr(obj, "codes"):
        obj = obj.codes
        if callable(obj):
            obj = obj()
    if isinstance(obj, (set, frozenset)):
        obj = sorted(obj)
        if not obj:
            return torch.zeros(0, L, dtype=torch.int64)
    if isinstance(obj, (list, tuple)) and not obj:
        return torch.zeros(0, L, dtype=torch.int64)
    t = as_int_tensor(obj, "valid_codes", 2)
    if t.shape[1] != L:
        raise ValueError(f"valid_codes have {t.shape[1]} levels but generated_codes have {L}; "
                         "compare full semantic IDs (with the collision token) on both sides")
    if t.numel() and bool((t < 0).any()):
        raise ValueError("valid_codes hold negative codes")
    return t


def invalid_rate(generated_codes, valid_codes, *, reduction: str = "mean"):
    """Share of generated semantic IDs that are not the ID of any real item.

    generated_codes: int (R, K, L) codes from unconstrained decoding (rows of -1 = slot not
    produced; such slots are excluded from the count); valid_codes: the catalogue's IDs, an int
    (N, L) tensor/array, a set of L-tuples, or an IdTable (its ``codes``).
    Returns the fraction over all produced IDs (float; raises if none were produced), or with
    ``reduction="none"`` the per-row fraction float64 (R,) (NaN for a row with no produced ID).
    """
    g = as_int_tensor(generated_codes, "generated_codes", 3)
    R, K, L = g.shape
    if L < 1:
        raise ValueError("generated_codes must have at least one level (last dim L >= 1)")
    v = _valid_code_tensor(valid_codes, L)
    flat = g.reshape(-1, L)
    absent = (flat == PAD).all(dim=1)
    if bool(((flat < 0) & ~absent[:, None]).any()):
        raise ValueError("generated_codes hold negative codes inside a produced ID; "
                         "only a whole row of -1 marks an absent slot")
    present = flat[~absent]
    # One mixed-radix key per ID; codes >= the catalogue's radix on a level are invalid anyway, so
    # the radix is the max over both sides + 1 (checked not to overflow int64).
    radix = [int(max(int(present[:, l].max()) if present.numel() else 0,
                     int(v[:, l].max()) if v.numel() else 0)) + 1 for l in range(L)]
    if sum(math.log2(r) for r in radix) >= 62:
        raise ValueError("codes too large to key in int64; check generated_codes/valid_codes ranges")
    ok = torch.isin(_code_keys(present, radix), _code_keys(v, radix))
    bad = torch.zeros(flat.shape[0], dtype=torch.float64)
    bad[~absent] = (~ok).double()
    if reduction == "none":
        produced = (~absent).reshape(R, K).sum(dim=1).double()
        return bad.reshape(R, K).sum(dim=1) / produced  # 0/0 -> NaN for empty rows, documented
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if present.shape[0] == 0:
        raise ValueError("invalid_rate: generated_codes contain no produced ID to rate")
    return float(bad.sum()) / float(present.shape[0])


def codebook_usage(codes, sizes) -> list[float]:
    """Per level, the fraction of the codebook's entries used by at least one item.

    codes: int (N, L) semantic codes (RQ-VAE levels, optionally with the collision level);
    sizes: L ints, the size of each level's codebook.  Returns L floats in [0, 1] (0 when N = 0).
    """
    c = as_int_tensor(codes, "codes", 2)
    sizes = [int(s) for s in sizes]
    if len(sizes) != c.shape[1]:
        raise ValueError(f"sizes has {len(sizes)} entries but codes have {c.shape[1]} levels; "
                         "pass one codebook size per column of codes")
    if any(s < 1 for s in sizes):
        raise ValueError(f"sizes must be positive, got {sizes}")
    out = []
    for l, s in enumerate(sizes):
        col = c[:, l]
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= s):
            raise ValueError(f"codes[:, {l}] has values outside [0, {s}) (sizes[{l}] = {s})")
        out.append(float(torch.unique(col).numel()) / float(s))
    return out


# ---- comparing two settings on the same examples -------------------------------------------------
def paired_difference(a, b) -> dict:
    """Mean per-example difference ``a - b`` of two settings evaluated on the same examples in the
    same order (e.g. per-user Recall@10 from ``recall_at_k(..., reduction="none")``) with its
    standard error (std of the differences / sqrt(n)): pairing removes the between-user variance,
    so small real differences become visible.  a, b: float (R,) (tensors or arrays), R >= 2.
    Returns {"mean": float, "se": float, "n": int}."""
    x = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired_difference needs the same examples on both sides, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        raise ValueError("paired_difference needs at least 2 examples")
    d = x - y
    return {"mean": float(d.mean()), "se": float(d.std() / d.numel() ** 0.5), "n": int(d.numel())}
