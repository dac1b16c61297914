"""Datasets: the in-memory :class:`Dataset` (item catalogue + chronological user sequences) and
the loaders of every source format the library accepts:

=====================  ===========================================================================
``load_beauty``         the TIGER-paper Amazon Beauty set (S3-Rec ``Beauty.txt`` + ``items.jsonl``)
``load_lcrec``          LC-Rec / LETTER JSON (``<name>.inter.json`` + ``<name>.item.json``)
``load_amazon2014``     the original public Amazon 2014 files (``reviews_<Cat>_5.json.gz`` +
                        ``meta_<Cat>.json.gz``), 5-core filtered here
``load_tables``         a generic items table + interactions table (Parquet / JSON lines / CSV)
=====================  ===========================================================================

Synthetic datasets live in :mod:`tiger_fast.synthetic`, file/table reading in
:mod:`tiger_fast.fileio`, the CLI's one-string dataset spec in :func:`tiger_fast.cli.load_dataset_spec`.

Conventions (every loader):

* Items have an *internal index* ``0..N-1`` (the position in ``Dataset.item_ids``/``items``) and an
  *external id* ``item_ids[i]`` (int64).  String ids (ASINs, ...) are kept in ``item_keys``.
* ``sequences[u]`` holds internal item indices of user ``u``, oldest first.
* Item metadata is a dict with keys among ``title`` (str), ``brand`` (str), ``categories``
  (list[str], path root -> leaf), ``price`` (float, or str when the source has a non-numeric price),
  ``description`` (str).  Missing or empty fields are absent, never ``""``/``None``.
* A missing/unreadable file raises an error naming the path; bad content raises ``ValueError``
  naming the file and what to fix.
"""
from __future__ import annotations

import ast
import html
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checks import check_int
from .fileio import EMBED_COLUMNS, check_file, embedding_column, find_file, id_column, read_json, read_lines, read_table

__all__ = [
    "Dataset",
    "ITEM_FIELDS",
    "default_data_dir",
    "load_beauty",
    "load_lcrec",
    "load_amazon2014",
    "load_tables",
]

#: The item text fields the library knows, in the order the default text template uses them.
ITEM_FIELDS = ("title", "brand", "categories", "price", "description")


# ================================================================================================
# Dataset
# ================================================================================================
@dataclass
class Dataset:
    """An item catalogue plus chronological user sequences.

    Attributes:
        name: short name ("beauty", "synthetic", a file stem, ...).
        item_ids: int64 (N,) external item ids, unique; index ``i`` is the internal item index.
        items: list of N dicts, item ``i``'s metadata (keys among :data:`ITEM_FIELDS`, plus any
            extra columns a table loader was asked to keep).
        user_ids: int64 (U,) external user ids (string user ids are kept in ``user_keys`` and
            ``user_ids`` is then ``0..U-1`` in first-appearance order).
        sequences: list of U int64 arrays, internal item indices per user, oldest first.
        item_keys: optional list of N strings (e.g. ASINs) when the source's item ids are strings.
        user_keys: optional list of U strings when the source's user ids are strings.
        embeddings: optional float32 (N, D) precomputed item embeddings (finite).
        timestamps: optional list of U arrays (same lengths as ``sequences``) with the
            interaction times when the source has them (int64 or float64, source units).
    """

    name: str
    item_ids: np.ndarray
    items: list
    user_ids: np.ndarray
    sequences: list
    item_keys: list | None = None
    user_keys: list | None = None
    embeddings: np.ndarray | None = None
    timestamps: list | None = None
    _index: dict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.item_ids = np.asarray(self.item_ids)
        if self.item_ids.ndim != 1 or not np.issubdtype(self.item_ids.dtype, np.integer):
            raise TypeError(f"Dataset.item_ids must be a 1-D integer array, got dtype {self.item_ids.dtype} "
                            f"shape {self.item_ids.shape}")
        self.item_ids = self.item_ids.astype(np.int64, copy=False)
        n = len(self.item_ids)
        if n == 0:
            raise ValueError(f"Dataset {self.name!r} has no items; a catalogue needs at least one item")
        uniq, counts = np.unique(self.item_ids, return_counts=True)
        if len(uniq) != n:
            dup = uniq[counts > 1][:5].tolist()
            raise ValueError(f"Dataset {self.name!r}: duplicate item ids {dup}; item ids must be unique")
        if not isinstance(self.items, list) or len(self.items) != n:
            raise ValueError(f"Dataset {self.name!r}: items must be a list of {n} dicts (one per item id), "
                             f"got {type(self.items).__name__} of length {len(self.items)}")
        self.user_ids = np.asarray(self.user_ids)
        if self.user_ids.ndim != 1 or (len(self.user_ids) and not np.issubdtype(self.user_ids.dtype, np.integer)):
            raise TypeError(f"Dataset.user_ids must be a 1-D integer array (keep string ids in user_keys), "
                            f"got dtype {self.user_ids.dtype}")
        self.user_ids = self.user_ids.astype(np.int64, copy=False)
        if len(self.sequences) != len(self.user_ids):
            raise ValueError(f"Dataset {self.name!r}: {len(self.sequences)} sequences for "
                             f"{len(self.user_ids)} user ids; need one sequence per user")
        seqs = []
        for u, s in enumerate(self.sequences):
            a = np.asarray(s)
            if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
                raise TypeError(f"Dataset {self.name!r}: sequence of user {u} must be a 1-D integer array")
            seqs.append(a.astype(np.int64, copy=False))
        self.sequences = seqs
        if seqs:
            flat = np.concatenate(seqs)
            if flat.size and (flat.min() < 0 or flat.max() >= n):
                raise ValueError(f"Dataset {self.name!r}: sequences contain internal item indices outside "
                                 f"[0, {n}); sequences hold positions into item_ids, not external ids")
        for attr, want in (("item_keys", n), ("user_keys", len(self.user_ids))):
            v = getattr(self, attr)
            if v is not None and len(v) != want:
                raise ValueError(f"Dataset {self.name!r}: {attr} has {len(v)} entries, expected {want}")
        if self.embeddings is not None:
            e = np.asarray(self.embeddings)
            if e.ndim != 2 or e.shape[0] != n:
                raise ValueError(f"Dataset {self.name!r}: embeddings must have shape ({n}, D), got {e.shape}")
            e = e.astype(np.float32, copy=False)
            if not np.isfinite(e).all():
                raise ValueError(f"Dataset {self.name!r}: embeddings contain NaN/Inf")
            self.embeddings = e
        if self.timestamps is not None:
            if len(self.timestamps) != len(seqs) or any(len(t) != len(s) for t, s in zip(self.timestamps, seqs)):
                raise ValueError(f"Dataset {self.name!r}: timestamps must match sequences in count and lengths")

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return int(len(self.item_ids))

    @property
    def num_users(self) -> int:
        return int(len(self.user_ids))

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    # ---- views -------------------------------------------------------------------------------
    def leaf_categories(self) -> list[str]:
        """(N,) the last element of each item's category path; ``""`` for an item without one."""
        out = []
        for it in self.items:
            cats = it.get("categories")
            out.append(cats[-1] if cats else "")
        return out

    def index_of(self, item_ids) -> np.ndarray:
        """External item ids (array-like of ints) -> int64 internal indices; unknown id -> ValueError."""
        ids = np.asarray(item_ids, dtype=np.int64)
        order = np.argsort(self.item_ids, kind="stable")
        sorted_ids = self.item_ids[order]
        pos = np.searchsorted(sorted_ids, ids)
        pos_c = np.minimum(pos, len(sorted_ids) - 1)
        bad = sorted_ids[pos_c] != ids
        if bad.any():
            raise ValueError(f"item_ids: unknown external item ids {ids[bad][:5].tolist()} (not in dataset "
                             f"{self.name!r})")
        return order[pos_c].astype(np.int64)

    def summary(self) -> dict:
        """Counts and coverage, JSON-serialisable."""
        lens = np.array([len(s) for s in self.sequences], dtype=np.int64)
        repeated = sum(1 for s in self.sequences if len(np.unique(s)) != len(s))
        out: dict[str, Any] = {
            "name": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": int(lens.sum()),
            "seq_len_mean": float(lens.mean()) if lens.size else 0.0,
            "seq_len_median": float(np.median(lens)) if lens.size else 0.0,
            "seq_len_min": int(lens.min()) if lens.size else 0,
            "seq_len_max": int(lens.max()) if lens.size else 0,
            "users_with_repeated_item": int(repeated),
            "items_without_interactions": int(self.num_items - len(np.unique(np.concatenate(self.sequences))))
            if self.sequences else self.num_items,
        }
        for f in ITEM_FIELDS:
            out[f"items_with_{f}"] = sum(1 for it in self.items if f in it)
        out["leaf_categories"] = len({c for c in self.leaf_categories() if c})
        out["embedding_dim"] = None if self.embeddings is None else int(self.embeddings.shape[1])
        return out


# ================================================================================================
# Data location, item metadata cleaning
# ================================================================================================
def default_data_dir() -> Path:
    """Where the development data lives: env ``TIGER_FAST_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("TIGER_FAST_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _clean_str(v) -> str | None:
    """Strip, unescape HTML entities; '' / None / non-str-like -> None."""
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    s = html.unescape(str(v)).strip()
    return s or None


def _parse_price(v):
    """Price as float when numeric (``12.5``, ``"$12.50"``, ``"1,299.00"``), else the stripped string."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    s = str(v).strip()
    if not s:
        return None
    m = re.fullmatch(r"\$?\s*([0-9][0-9,]*(?:\.[0-9]+)?)", s)
    if m:
        return float(m.group(1).replace(",", ""))
    return s


def _parse_categories(v) -> list[str] | None:
    """Category path root -> leaf from a list, a list of lists (first path), or a string.

    Strings: ``"a > b > c"`` (split on ``>``) when they contain ``>``, else comma-separated
    (LC-Rec style ``"a,b,c"``).  Empty elements are dropped.
    """
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, str):
        parts = v.split(">") if ">" in v else v.split(",")
    elif isinstance(v, (list, tuple)):
        if v and all(isinstance(x, (list, tuple, np.ndarray)) for x in v):
            v = next((list(x) for x in v if len(x)), [])  # Amazon meta: list of paths; take the first
        parts = [str(x) for x in v if x is not None]
    else:
        raise ValueError(f"categories must be a list or a string, got {type(v).__name__}: {v!r}")
    out = [p for p in (_clean_str(x) for x in parts) if p]
    return out or None


def _make_item(title=None, brand=None, categories=None, price=None, description=None) -> dict:
    it = {}
    for k, v in (("title", _clean_str(title)), ("brand", _clean_str(brand)),
                 ("categories", _parse_categories(categories)), ("price", _parse_price(price)),
                 ("description", _clean_str(description))):
        if v is not None:
            it[k] = v
    return it


# ================================================================================================
# Amazon Beauty (TIGER paper), S3-Rec files
# ================================================================================================
def _resolve_beauty_dir(directory) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"load_beauty: directory not found: {d}")
    if not any((d / n).is_file() for n in ("Beauty.txt", "Beauty.txt.gz")) and (d / "amazon-beauty-2014").is_dir():
        d = d / "amazon-beauty-2014"  # the data root was given
    return d


def _split_brand(lists: list[list[str]]) -> list[tuple[str | None, list[str]]]:
    """Separate the unmarked brand from the category path in S3-Rec attribute lists.

    ``items.jsonl``'s ``brand_and_categories`` is ``[brand?] + category path`` where the brand is
    present only when it occurs on >= 5 items, and nothing marks it.  Heuristic (data-driven, no
    hard-coded names):

    1. *Certain brands*: a first element that never occurs at any later position of any list is a
       brand (category names recur along paths; brands only ever lead).
    2. *Top-level categories* = the elements that directly follow a certain brand.
    3. An item's first element is its brand iff it is a certain brand, or the second element is a
       top-level category (catches brands that share a name with a category, e.g. "Scissors").
       Otherwise the whole list is the category path.

    An empty-string brand (18 Beauty items carry one) counts as no brand.  On Beauty this yields
    7,478 items with a brand and the six top-level categories (Skin Care, Hair Care, Makeup, Tools &
    Accessories, Bath & Body, Fragrance) and every category path starts with one of them.
    """
    later: set[str] = set()
    for lst in lists:
        later.update(lst[1:])
    certain = {lst[0] for lst in lists if lst and lst[0] not in later}
    tops = {lst[1] for lst in lists if len(lst) > 1 and lst[0] in certain}
    out = []
    for lst in lists:
        if lst and (lst[0] in certain or (len(lst) > 1 and lst[1] in tops)):
            out.append((lst[0], lst[1:]))
        else:
            out.append((None, list(lst)))
    return out


def load_beauty(directory) -> Dataset:
    """Amazon Beauty 2014 as in the TIGER paper: 22,363 users / 12,101 items / 198,502 interactions.

    Reads ``Beauty.txt(.gz)`` (one user a line: ``user item item ...``, 1-based ids, chronological)
    and ``items.jsonl(.gz)`` (``item_id, asin, title, brand_and_categories``).  ``directory`` is the
    ``amazon-beauty-2014`` folder or the data root containing it.

    External ids are the files' 1-based ids (``item_ids = 1..12101``, ``user_ids = 1..22363``);
    ``item_keys`` are the ASINs.  Brand vs categories: see :func:`_split_brand`.  The category path
    excludes the root "Beauty" (S3-Rec drops it); the leaf category is its last element.  The source
    has no price or description.
    """
    d = _resolve_beauty_dir(directory)
    seq_path = find_file(d, ("Beauty.txt", "Beauty.txt.gz"), "load_beauty")
    items_path = find_file(d, ("items.jsonl", "items.jsonl.gz"), "load_beauty")

    rows = []
    for no, line in read_lines(items_path, "load_beauty"):
        try:
            r = json.loads(line)
            rows.append((int(r["item_id"]), r.get("asin"), r.get("title"), list(r.get("brand_and_categories") or [])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"load_beauty: {items_path} line {no}: expected a JSON object with item_id, "
                             f"asin, title, brand_and_categories ({e})") from e
    if not rows:
        raise ValueError(f"load_beauty: {items_path} has no items")
    rows.sort(key=lambda r: r[0])
    item_ids = np.array([r[0] for r in rows], dtype=np.int64)
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError(f"load_beauty: duplicate item_id in {items_path}")
    split = _split_brand([[str(x) for x in r[3]] for r in rows])
    items = [_make_item(title=r[2], brand=b, categories=c) for r, (b, c) in zip(rows, split)]
    keys = [str(r[1]) if r[1] is not None else "" for r in rows]
    index = {int(i): k for k, i in enumerate(item_ids)}

    user_ids, seqs = [], []
    for no, line in read_lines(seq_path, "load_beauty"):
        parts = line.split()
        try:
            ids = [int(x) for x in parts]
        except ValueError as e:
            raise ValueError(f"load_beauty: {seq_path} line {no}: expected integers 'user item item ...'") from e
        if len(ids) < 2:
            raise ValueError(f"load_beauty: {seq_path} line {no}: user {ids[0] if ids else '?'} has no items")
        try:
            seqs.append(np.array([index[i] for i in ids[1:]], dtype=np.int64))
        except KeyError as e:
            raise ValueError(f"load_beauty: {seq_path} line {no}: item id {e.args[0]} is not in {items_path}") from e
        user_ids.append(ids[0])
    if not seqs:
        raise ValueError(f"load_beauty: {seq_path} has no users")
    return Dataset("beauty", item_ids, items, np.array(user_ids, dtype=np.int64), seqs, item_keys=keys)


# ================================================================================================
# LC-Rec / LETTER JSON
# ================================================================================================
def load_lcrec(directory, name: str) -> Dataset:
    """LC-Rec / LETTER format: ``<name>.inter.json(.gz)`` + ``<name>.item.json(.gz)`` in ``directory``.

    ``inter.json``: ``{"user_id": [item_id, ...]}`` (chronological, 0-based ints);
    ``item.json``: ``{"item_id": {"title", "description", "brand", "categories"}}`` with
    ``categories`` a comma-joined path string.  External ids are the JSON keys as ints; users keep
    the file's order.  LETTER's cleaner leaves ``"."`` for an empty description: such
    punctuation-only texts are treated as missing.  Items that no user interacted with are kept.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"load_lcrec: directory not found: {d}")
    if not name or not isinstance(name, str):
        raise ValueError("load_lcrec: name must be the file prefix, e.g. 'Scientific' for Scientific.inter.json")
    inter_path = find_file(d, (f"{name}.inter.json", f"{name}.inter.json.gz"), "load_lcrec")
    item_path = find_file(d, (f"{name}.item.json", f"{name}.item.json.gz"), "load_lcrec")
    inter = read_json(inter_path, "load_lcrec")
    meta = read_json(item_path, "load_lcrec")
    if not isinstance(inter, dict) or not isinstance(meta, dict):
        raise ValueError(f"load_lcrec: {inter_path} and {item_path} must each hold one JSON object")
    if not meta:
        raise ValueError(f"load_lcrec: {item_path} has no items")
    if not inter:
        raise ValueError(f"load_lcrec: {inter_path} has no users")
    try:
        item_ids = np.array(sorted(int(k) for k in meta), dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"load_lcrec: {item_path}: item ids (keys) must be integers ({e})") from e
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError(f"load_lcrec: {item_path}: duplicate item ids (e.g. '1' and '01')")
    by_id = {int(k): v for k, v in meta.items()}
    items = []
    for i in item_ids.tolist():
        m = by_id[i]
        if not isinstance(m, dict):
            raise ValueError(f"load_lcrec: {item_path}: item {i} must be an object, got {type(m).__name__}")
        desc = m.get("description")
        if isinstance(desc, str) and not re.search(r"\w", desc):
            desc = None  # LETTER writes "." for an empty description
        items.append(_make_item(title=m.get("title"), brand=m.get("brand"), categories=m.get("categories"),
                                price=m.get("price"), description=desc))
    index = {i: k for k, i in enumerate(item_ids.tolist())}
    try:
        user_ids = np.array([int(u) for u in inter], dtype=np.int64)
        user_keys = None
    except ValueError:
        user_ids, user_keys = np.arange(len(inter), dtype=np.int64), [str(u) for u in inter]
    seqs = []
    for u, lst in inter.items():
        if not isinstance(lst, list) or not lst:
            raise ValueError(f"load_lcrec: {inter_path}: user {u!r} must map to a non-empty list of item ids")
        try:
            seqs.append(np.array([index[int(i)] for i in lst], dtype=np.int64))
        except KeyError as e:
            raise ValueError(f"load_lcrec: {inter_path}: user {u!r} has item id {e.args[0]} that is not in "
                             f"{item_path}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"load_lcrec: {inter_path}: user {u!r} has a non-integer item id ({e})") from e
    return Dataset(name.lower(), item_ids, items, user_ids, seqs, user_keys=user_keys)


# ================================================================================================
# Original Amazon 2014 files
# ================================================================================================
_ASIN_RE = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def _kcore(u: np.ndarray, i: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of interactions surviving the iterative k-core filter.

    Each round removes, simultaneously, every user and every item with fewer than ``k`` remaining
    interactions (interactions are counted, so a repeated review counts twice), until stable.
    """
    keep = np.ones(len(u), dtype=bool)
    while True:
        cu = np.bincount(u[keep], minlength=u.max() + 1 if len(u) else 0)
        ci = np.bincount(i[keep], minlength=i.max() + 1 if len(i) else 0)
        new = keep & (cu[u] >= k) & (ci[i] >= k)
        if new.sum() == keep.sum():
            return keep
        keep = new


def load_amazon2014(reviews_path, meta_path, *, core: int = 5, name: str | None = None) -> Dataset:
    """Original Amazon 2014 product data: ``reviews_<Cat>_5.json.gz`` + ``meta_<Cat>.json.gz``.

    Reviews: strict JSON lines with ``reviewerID``, ``asin``, ``unixReviewTime``.  Metadata: one
    Python-literal dict a line (parsed with :func:`ast.literal_eval`; strict JSON lines also work)
    with ``asin`` and optionally ``title``, ``brand``, ``categories`` (list of paths; the first path
    is used, root included), ``price``, ``description``.

    Processing (the S3-Rec/P5/TIGER convention): iterative ``core``-core filter on users and items
    (:func:`_kcore`); users ordered by first appearance in the review file; each user's reviews
    sorted by time, stably (ties keep file order); internal item indices and ``item_ids`` assigned
    ``0, 1, ...`` in order of first appearance while scanning users in that order.  ``item_keys``
    are ASINs, ``user_keys`` reviewerIDs, ``user_ids = 0..U-1``, ``timestamps`` the review times.
    Items without a metadata line get an empty metadata dict (a warning gives the count).
    """
    rp = check_file(reviews_path, "load_amazon2014 reviews")
    mp = check_file(meta_path, "load_amazon2014 meta")
    check_int(core, "load_amazon2014: core")
    user_code: dict[str, int] = {}
    item_code: dict[str, int] = {}
    us, its, ts = [], [], []
    for no, line in read_lines(rp, "load_amazon2014 reviews"):
        try:
            r = json.loads(line)
            u, a, t = r["reviewerID"], r["asin"], r["unixReviewTime"]
        except json.JSONDecodeError as e:
            raise ValueError(f"load_amazon2014: {rp} line {no} is not JSON ({e}); reviews files are strict "
                             f"JSON lines") from e
        except (KeyError, TypeError) as e:
            raise ValueError(f"load_amazon2014: {rp} line {no}: missing field {e}; each review needs "
                             f"reviewerID, asin, unixReviewTime") from e
        us.append(user_code.setdefault(str(u), len(user_code)))
        its.append(item_code.setdefault(str(a), len(item_code)))
        ts.append(int(t))
    if not us:
        raise ValueError(f"load_amazon2014: {rp} has no reviews")
    u = np.array(us, dtype=np.int64)
    i = np.array(its, dtype=np.int64)
    t = np.array(ts, dtype=np.int64)
    keep = _kcore(u, i, core)
    if not keep.any():
        raise ValueError(f"load_amazon2014: no interactions survive the {core}-core filter of {rp}")
    line_idx = np.nonzero(keep)[0]
    u, i, t = u[keep], i[keep], t[keep]
    # user codes were assigned in first-appearance order, so sorting by code orders users that way
    order = np.lexsort((line_idx, t, u))  # by user, then time, then file line (stable ties)
    u, i, t = u[order], i[order], t[order]
    bounds = np.flatnonzero(np.diff(u)) + 1
    starts = np.concatenate([[0], bounds])
    # item ids in first-appearance order over the user-ordered, time-sorted stream
    _, first_pos = np.unique(i, return_index=True)
    items_in_order = i[np.sort(first_pos)]
    remap = np.full(len(item_code), -1, dtype=np.int64)
    remap[items_in_order] = np.arange(len(items_in_order))
    internal = remap[i]
    seqs = np.split(internal, bounds)
    tss = np.split(t, bounds)
    user_names = list(user_code)
    item_names = list(item_code)
    user_keys = [user_names[c] for c in u[starts].tolist()]
    item_keys = [item_names[c] for c in items_in_order.tolist()]

    wanted = {a: k for k, a in enumerate(item_keys)}
    items: list[dict | None] = [None] * len(item_keys)
    for no, line in read_lines(mp, "load_amazon2014 meta"):
        m = _ASIN_RE.search(line)
        if m is None or m.group(1) not in wanted:
            continue  # cheap skip: only parse the lines of items that survived the filter
        try:
            rec = json.loads(line) if line.lstrip().startswith('{"') else ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise ValueError(f"load_amazon2014: {mp} line {no} is neither a Python dict literal nor JSON ({e})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"load_amazon2014: {mp} line {no}: expected a dict, got {type(rec).__name__}")
        k = wanted.get(str(rec.get("asin")))
        if k is None or items[k] is not None:
            continue
        items[k] = _make_item(title=rec.get("title"), brand=rec.get("brand"), categories=rec.get("categories"),
                              price=rec.get("price"), description=rec.get("description"))
    missing = sum(1 for it in items if it is None)
    if missing:
        warnings.warn(f"load_amazon2014: {missing} of {len(items)} items have no line in {mp}; their "
                      f"metadata is empty", stacklevel=2)
    items = [it if it is not None else {} for it in items]
    if name is None:
        m = re.match(r"reviews_(.+?)(?:_\d+)?\.json", rp.name)
        name = m.group(1).lower() if m else rp.stem
    return Dataset(name, np.arange(len(item_keys), dtype=np.int64), items,
                   np.arange(len(seqs), dtype=np.int64), seqs, item_keys=item_keys, user_keys=user_keys,
                   timestamps=tss)


def _timestamps(col, path) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if col.null_count:
        raise ValueError(f"load_tables: column 'timestamp' of {path} has {col.null_count} missing values")
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return pc.cast(col, pa.int64()).to_numpy() if pa.types.is_timestamp(t) else \
            pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64()).to_numpy()
    if pa.types.is_integer(t):
        return col.to_numpy().astype(np.int64)
    if pa.types.is_floating(t):
        a = col.to_numpy().astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"load_tables: column 'timestamp' of {path} has NaN/Inf")
        return a
    try:  # ISO date strings
        return np.array(col.to_pylist(), dtype="datetime64[ns]").astype(np.int64)
    except ValueError as e:
        raise ValueError(f"load_tables: column 'timestamp' of {path} must be numbers, timestamps or ISO "
                         f"date strings ({e})") from e


def load_tables(items_path, interactions_path, *, unknown_columns: str = "error", name: str | None = None) -> Dataset:
    """Generic items table + interactions table (each Parquet, JSON lines or CSV, optionally .gz).

    Items table: ``item_id`` (int or string, unique) and any of ``title, brand, categories, price,
    description`` (``categories`` as a list or a ``"a > b > c"`` / ``"a,b,c"`` string) and/or an
    ``embedding`` column (list of floats per item, also ``embeddings``/``vector``; a JSON array
    string in CSV) which becomes ``Dataset.embeddings`` float32 (N, D).  Other columns:
    ``unknown_columns="error"`` (default) raises naming them, ``"ignore"`` drops them, ``"keep"``
    stores them in the item dicts.

    Interactions table: ``user_id``, ``item_id``, optional ``timestamp`` (number, timestamp type or
    ISO string).  Each user's items are sorted by timestamp, stably (ties and a missing timestamp
    column keep file order); users are ordered by first appearance.  An ``item_id`` absent from the
    items table is an error.  Items without interactions stay in the catalogue (cold start).

    Ids: integer item ids are kept as ``item_ids``; string ids become ``item_keys`` with
    ``item_ids = 0..N-1`` in items-table order (same for users).
    """
    import pyarrow as pa

    if unknown_columns not in ("error", "ignore", "keep"):
        raise ValueError(f"load_tables: unknown_columns must be 'error', 'ignore' or 'keep', got {unknown_columns!r}")
    itab = read_table(items_path, "load_tables items")
    if itab.num_rows == 0:
        raise ValueError(f"load_tables: items table {items_path} is empty")
    cols = itab.column_names
    if "item_id" not in cols:
        raise ValueError(f"load_tables: items table {items_path} has no 'item_id' column (columns: {cols})")
    emb_cols = [c for c in cols if c in EMBED_COLUMNS]
    if len(emb_cols) > 1:
        raise ValueError(f"load_tables: items table {items_path} has several embedding columns {emb_cols}; keep one")
    known = {"item_id", *ITEM_FIELDS, *emb_cols}
    extra = [c for c in cols if c not in known]
    if extra and unknown_columns == "error":
        raise ValueError(f"load_tables: items table {items_path} has unknown columns {extra}; known: "
                         f"item_id, {', '.join(ITEM_FIELDS)}, embedding. Rename them, or pass "
                         f"unknown_columns='ignore' (drop) / 'keep' (store in item dicts)")
    ids, item_keys = id_column(itab, "item_id", "load_tables items", items_path)
    if item_keys is None:
        u, c = np.unique(ids, return_counts=True)
    else:
        u, c = np.unique(np.array(item_keys, dtype=object), return_counts=True)
    if (c > 1).any():
        raise ValueError(f"load_tables: items table {items_path} has duplicate item_id values {u[c > 1][:5].tolist()}")
    n = itab.num_rows
    pycols = {f: itab.column(f).to_pylist() for f in ITEM_FIELDS if f in cols}
    items = []
    for r in range(n):
        try:
            it = _make_item(**{f: v[r] for f, v in pycols.items()})
        except ValueError as e:
            raise ValueError(f"load_tables: items table {items_path} row {r}: {e}") from e
        items.append(it)
    if unknown_columns == "keep":
        for c in extra:
            for it, v in zip(items, itab.column(c).to_pylist()):
                if v is not None:
                    it[c] = v
    embeddings = None
    if emb_cols:
        embeddings = embedding_column(itab, emb_cols[0], "load_tables", items_path)

    xtab = read_table(interactions_path, "load_tables interactions")
    xcols = xtab.column_names
    for c in ("user_id", "item_id"):
        if c not in xcols:
            raise ValueError(f"load_tables: interactions table {interactions_path} has no {c!r} column "
                             f"(columns: {xcols}); need user_id, item_id and optionally timestamp")
    xextra = [c for c in xcols if c not in ("user_id", "item_id", "timestamp")]
    if xextra and unknown_columns == "error":
        raise ValueError(f"load_tables: interactions table {interactions_path} has unknown columns {xextra}; known: "
                         f"user_id, item_id, timestamp. Pass unknown_columns='ignore' to drop them")
    if xtab.num_rows == 0:
        raise ValueError(f"load_tables: interactions table {interactions_path} is empty")
    # map interaction item ids onto internal indices
    xcol = xtab.column("item_id")
    if xcol.null_count:
        raise ValueError(f"load_tables: column 'item_id' of {interactions_path} has {xcol.null_count} missing values")
    if item_keys is None:
        if not (pa.types.is_integer(xcol.type) or pa.types.is_floating(xcol.type)):
            raise ValueError(f"load_tables: column 'item_id' of {interactions_path} holds {xcol.type} values but the "
                             f"items table {items_path} has integer item ids")
        xi, _ = id_column(xtab, "item_id", "load_tables interactions", interactions_path)
        order = np.argsort(ids, kind="stable")
        pos = np.minimum(np.searchsorted(ids[order], xi), n - 1)
        found = ids[order][pos] == xi
        internal = order[pos]
        unknown = xi[~found]
    else:
        lookup = {k: r for r, k in enumerate(item_keys)}
        xs = [str(v) for v in xcol.to_pylist()]
        internal = np.array([lookup.get(v, -1) for v in xs], dtype=np.int64)
        found = internal >= 0
        unknown = np.array(xs, dtype=object)[~found]
    if not found.all():
        raise ValueError(f"load_tables: column 'item_id' of {interactions_path} has {int((~found).sum())} rows with "
                         f"item ids not in the items table {items_path}, e.g. {unknown[:5].tolist()}")
    ucodes, user_keys = id_column(xtab, "user_id", "load_tables interactions", interactions_path)
    if user_keys is not None:
        _, ucodes = np.unique(np.array(user_keys, dtype=object), return_inverse=True)
    ts = _timestamps(xtab.column("timestamp"), interactions_path) if "timestamp" in xcols else None
    # users in first-appearance order: rank each user by its first row
    uniq_u, first_row, inv = np.unique(ucodes, return_index=True, return_inverse=True)
    rank_of_uniq = np.empty(len(uniq_u), dtype=np.int64)
    rank_of_uniq[np.argsort(first_row, kind="stable")] = np.arange(len(uniq_u))
    urank = rank_of_uniq[inv.reshape(-1)]
    rows = np.arange(len(urank))
    order = np.lexsort((rows, ts, urank)) if ts is not None else np.lexsort((rows, urank))
    urank_s = urank[order]
    bounds = np.flatnonzero(np.diff(urank_s)) + 1
    seqs = np.split(internal[order].astype(np.int64), bounds)
    tss = np.split(ts[order], bounds) if ts is not None else None
    first_rows = order[np.concatenate([[0], bounds])]
    if user_keys is None:
        user_ids = ucodes[first_rows].astype(np.int64)
        ukeys = None
    else:
        ukeys = [user_keys[r] for r in first_rows.tolist()]
        user_ids = np.arange(len(ukeys), dtype=np.int64)
    if name is None:
        name = Path(items_path).name.split(".")[0]
    return Dataset(name, ids.astype(np.int64), items, user_ids, seqs, item_keys=item_keys, user_keys=ukeys,
                   embeddings=embeddings, timestamps=tss)
