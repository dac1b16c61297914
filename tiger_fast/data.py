"""Datasets: item catalogues with text, and chronological user interaction sequences.

One in-memory type, :class:`Dataset`, and loaders for every input the library accepts:

=====================  ===========================================================================
``load_beauty``         the TIGER-paper Amazon Beauty set (S3-Rec ``Beauty.txt`` + ``items.jsonl``)
``load_lcrec``          LC-Rec / LETTER JSON (``<name>.inter.json`` + ``<name>.item.json``)
``load_amazon2014``     the original public Amazon 2014 files (``reviews_<Cat>_5.json.gz`` +
                        ``meta_<Cat>.json.gz``), 5-core filtered here
``load_tables``         a generic items table + interactions table (Parquet / JSON lines / CSV)
``synthetic_dataset``   a deterministic synthetic catalogue with sequential taste (demos, tests)
``synthetic_latents``   clustered float32 latents for scale benchmarks, chunkable to 100M+ rows
``load_dataset``        one string spec for all of the above (CLI)
=====================  ===========================================================================

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
import gzip
import html
import io
import json
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = [
    "Dataset",
    "ITEM_FIELDS",
    "default_data_dir",
    "load_beauty",
    "load_lcrec",
    "load_amazon2014",
    "load_tables",
    "SyntheticConfig",
    "synthetic_dataset",
    "synthetic_latents",
    "iter_synthetic_latents",
    "load_dataset",
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

    def texts(self, template=None) -> list[str]:
        """(N,) one text per item, rendered by :func:`tiger_fast.embed.item_text`.

        ``template`` None uses :data:`tiger_fast.embed.DEFAULT_TEMPLATE`; see there.
        """
        from .embed import item_text  # embed imports this module; import late to avoid a cycle

        return [item_text(it, template) for it in self.items]

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
# File helpers
# ================================================================================================
def default_data_dir() -> Path:
    """Where the development data lives: env ``TIGER_FAST_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("TIGER_FAST_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _check_file(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: file not found: {p}")
    if not p.is_file():
        raise ValueError(f"{what}: {p} is not a regular file")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"{what}: file is not readable: {p}")
    return p


def _find(directory: Path, names: Sequence[str], what: str) -> Path:
    """First existing ``directory/name`` among ``names`` (e.g. with and without .gz)."""
    for n in names:
        p = directory / n
        if p.is_file():
            return p
    raise FileNotFoundError(f"{what}: none of {list(names)} found in {directory}")


def _open_text(path: Path):
    """Text handle for a plain or gzip file (decided by the magic bytes, not the suffix)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without newline) for non-blank lines; read errors name the path."""
    try:
        with _open_text(path) as fh:
            for no, line in enumerate(fh, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield no, line
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise ValueError(f"{what}: cannot read {path}: {e}") from e


def _read_json(path: Path, what: str):
    try:
        with _open_text(path) as fh:
            return json.load(fh)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise ValueError(f"{what}: cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON: {e}") from e


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
    seq_path = _find(d, ("Beauty.txt", "Beauty.txt.gz"), "load_beauty")
    items_path = _find(d, ("items.jsonl", "items.jsonl.gz"), "load_beauty")

    rows = []
    for no, line in _read_lines(items_path, "load_beauty"):
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
    for no, line in _read_lines(seq_path, "load_beauty"):
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
    inter_path = _find(d, (f"{name}.inter.json", f"{name}.inter.json.gz"), "load_lcrec")
    item_path = _find(d, (f"{name}.item.json", f"{name}.item.json.gz"), "load_lcrec")
    inter = _read_json(inter_path, "load_lcrec")
    meta = _read_json(item_path, "load_lcrec")
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
    rp = _check_file(reviews_path, "load_amazon2014 reviews")
    mp = _check_file(meta_path, "load_amazon2014 meta")
    if not isinstance(core, int) or core < 1:
        raise ValueError(f"load_amazon2014: core must be a positive int, got {core!r}")
    user_code: dict[str, int] = {}
    item_code: dict[str, int] = {}
    us, its, ts = [], [], []
    for no, line in _read_lines(rp, "load_amazon2014 reviews"):
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
    for no, line in _read_lines(mp, "load_amazon2014 meta"):
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


# ================================================================================================
# Generic tables
# ================================================================================================
_EMBED_COLUMNS = ("embedding", "embeddings", "vector")


def _read_table(path, what: str):
    """Parquet / JSON lines / CSV (optionally .gz) -> pyarrow.Table; format from the suffix."""
    import pyarrow as pa

    p = _check_file(path, what)
    name = p.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    try:
        if base.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return pq.read_table(p)
        if base.endswith((".jsonl", ".ndjson", ".json")):
            rows = []
            for no, line in _read_lines(p, what):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{what}: {p} line {no} is not JSON ({e}); expected one object a line") from e
                if not isinstance(r, dict):
                    raise ValueError(f"{what}: {p} line {no}: expected a JSON object, got {type(r).__name__}")
                rows.append(r)
            if not rows:
                return pa.table({})
            cols = list(dict.fromkeys(k for r in rows for k in r))
            return pa.table({c: pa.array([r.get(c) for r in rows], type=_json_column_type(c, rows)) for c in cols})
        if base.endswith((".csv", ".tsv")):
            import pyarrow.csv as pcsv

            opts = pcsv.ParseOptions(delimiter="\t" if base.endswith(".tsv") else ",")
            # item/user ids stay as parsed (int or string); everything else is read by type inference
            return pcsv.read_csv(p, parse_options=opts)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise ValueError(f"{what}: cannot read {p}: {e}") from e
    raise ValueError(f"{what}: unsupported file type {p.name!r}; use .parquet, .jsonl or .csv (optionally .gz)")


def _json_column_type(col: str, rows: list[dict]):
    """Let pyarrow infer, except mixed int/str id columns which become strings."""
    import pyarrow as pa

    vals = [r.get(col) for r in rows if r.get(col) is not None]
    kinds = {type(v) for v in vals}
    if len(kinds) > 1 and str in kinds and not (kinds - {str, int}):
        return pa.string()
    return None


def _id_column(table, col: str, what: str, path) -> tuple[np.ndarray, list | None]:
    """An id column -> (int64 ids, None) for integer ids, or (codes, string keys) for strings."""
    import pyarrow as pa

    c = table.column(col)
    if c.null_count:
        raise ValueError(f"{what}: column {col!r} of {path} has {c.null_count} missing values")
    if pa.types.is_integer(c.type):
        return c.to_numpy().astype(np.int64), None
    if pa.types.is_floating(c.type):
        a = c.to_numpy()
        if np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            return a.astype(np.int64), None
        raise ValueError(f"{what}: column {col!r} of {path} has non-integer numbers; ids must be ints or strings")
    return np.arange(len(c)), [str(x) for x in c.to_pylist()]


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
    itab = _read_table(items_path, "load_tables items")
    if itab.num_rows == 0:
        raise ValueError(f"load_tables: items table {items_path} is empty")
    cols = itab.column_names
    if "item_id" not in cols:
        raise ValueError(f"load_tables: items table {items_path} has no 'item_id' column (columns: {cols})")
    emb_cols = [c for c in cols if c in _EMBED_COLUMNS]
    if len(emb_cols) > 1:
        raise ValueError(f"load_tables: items table {items_path} has several embedding columns {emb_cols}; keep one")
    known = {"item_id", *ITEM_FIELDS, *emb_cols}
    extra = [c for c in cols if c not in known]
    if extra and unknown_columns == "error":
        raise ValueError(f"load_tables: items table {items_path} has unknown columns {extra}; known: "
                         f"item_id, {', '.join(ITEM_FIELDS)}, embedding. Rename them, or pass "
                         f"unknown_columns='ignore' (drop) / 'keep' (store in item dicts)")
    ids, item_keys = _id_column(itab, "item_id", "load_tables items", items_path)
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
        ecol = emb_cols[0]
        vals = itab.column(ecol).to_pylist()
        rows = []
        for r, v in enumerate(vals):
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError as e:
                    raise ValueError(f"load_tables: {items_path} column {ecol!r} row {r}: not a JSON array ({e})") from e
            if not isinstance(v, (list, tuple)) or not v:
                raise ValueError(f"load_tables: {items_path} column {ecol!r} row {r}: expected a non-empty list "
                                 f"of floats, got {v!r:.60}")
            rows.append(v)
        dims = {len(v) for v in rows}
        if len(dims) != 1:
            raise ValueError(f"load_tables: {items_path} column {ecol!r}: embeddings have different lengths {sorted(dims)[:5]}")
        try:
            embeddings = np.array(rows, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"load_tables: {items_path} column {ecol!r}: non-numeric values ({e})") from e
        bad = ~np.isfinite(embeddings).all(axis=1)
        if bad.any():
            raise ValueError(f"load_tables: {items_path} column {ecol!r}: NaN/Inf in rows {np.flatnonzero(bad)[:5].tolist()}")

    xtab = _read_table(interactions_path, "load_tables interactions")
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
        xi, _ = _id_column(xtab, "item_id", "load_tables interactions", interactions_path)
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
    ucodes, user_keys = _id_column(xtab, "user_id", "load_tables interactions", interactions_path)
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


# ================================================================================================
# Synthetic catalogue with sequential taste
# ================================================================================================
# 8 departments x 6 product types, each with words that make the item texts of a type similar to
# each other (and to their department) for a sentence encoder.
_SYN_TAXONOMY = (
    ("Kitchen", (("Coffee Makers", "espresso brewing beans"), ("Cookware", "nonstick pan skillet"),
                 ("Knives", "sharp chef blade"), ("Bakeware", "oven baking cake"),
                 ("Blenders", "smoothie juice blending"), ("Food Storage", "airtight container lid"))),
    ("Garden", (("Lawn Mowers", "grass cutting lawn"), ("Planters", "soil flower pot"),
                ("Garden Hoses", "watering nozzle hose"), ("Seeds", "vegetable herb sprouting"),
                ("Pruning Tools", "shears branch trimming"), ("Bird Feeders", "birds seed feeder"))),
    ("Outdoor", (("Tents", "camping shelter waterproof"), ("Sleeping Bags", "insulated warm night"),
                 ("Backpacks", "hiking trail straps"), ("Camp Stoves", "fuel burner outdoor cooking"),
                 ("Headlamps", "lumens beam battery"), ("Water Filters", "purify drinking water"))),
    ("Music", (("Guitars", "acoustic strings chords"), ("Keyboards", "piano keys synth"),
               ("Drums", "percussion snare rhythm"), ("Microphones", "vocals recording studio"),
               ("Headphones", "audio bass sound"), ("Violins", "bow orchestra classical"))),
    ("Office", (("Notebooks", "ruled paper journal"), ("Pens", "ink ballpoint writing"),
                ("Desk Chairs", "ergonomic lumbar seat"), ("Staplers", "staples binding documents"),
                ("Printers", "toner printing pages"), ("Desk Lamps", "LED desk lighting"))),
    ("Pets", (("Dog Food", "dog kibble nutrition"), ("Cat Toys", "cat feather play"),
              ("Aquariums", "fish tank filter"), ("Bird Cages", "parrot perch cage"),
              ("Pet Beds", "pet cushion sleep"), ("Leashes", "collar walking leash"))),
    ("Toys", (("Building Blocks", "bricks construction build"), ("Puzzles", "jigsaw pieces puzzle"),
              ("Dolls", "doll dress-up pretend"), ("Board Games", "dice family strategy"),
              ("Remote Control Cars", "racing remote car"), ("Plush Animals", "soft cuddly stuffed"))),
    ("Beauty", (("Lipsticks", "matte lip color"), ("Shampoos", "hair scalp wash"),
                ("Face Creams", "hydrating skin moisturizer"), ("Perfumes", "floral scent fragrance"),
                ("Nail Polish", "nail lacquer manicure"), ("Sunscreens", "SPF sun protection"))),
)
_SYN_LEAF_STYLES = ("Compact", "Professional", "Travel", "Kids", "Premium", "Eco-Friendly", "Vintage",
                    "Heavy-Duty", "Mini", "Deluxe", "Wireless", "Classic")
_SYN_ADJ = ("reliable", "durable", "lightweight", "stylish", "affordable", "powerful", "elegant", "sturdy")
_SYN_SYLL = ("ka", "lo", "mi", "ra", "zen", "to", "vi", "nor", "ex", "sol", "pa", "qua", "ri", "on", "ta", "vel")


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of :func:`synthetic_dataset` (all have sensible defaults).

    Taxonomy ``num_top x num_mid x num_leaf`` leaf categories.  Each user's sequence: length
    ``min_len + Geometric`` with mean ``mean_len``, capped at ``max_len``; the first item is drawn by
    popularity from a leaf of the user's home department; each next item is, with probability
    ``p_series``, the *series successor* of the previous item (items of a leaf form a fixed cycle,
    so item j is usually followed by one specific related item), otherwise drawn by popularity
    from a leaf chosen by a Markov step: same leaf ``p_stay``, a sibling leaf (same product type)
    ``p_sibling``, another type of the same department ``p_department``, else any leaf.
    Items already in the sequence are not repeated.
    """

    num_top: int = 8
    num_mid: int = 6
    num_leaf: int = 5
    min_len: int = 5
    max_len: int = 20
    mean_len: float = 9.0
    p_series: float = 0.5
    p_stay: float = 0.35
    p_sibling: float = 0.35
    p_department: float = 0.2
    zipf: float = 0.8


def _syn_names(cfg: SyntheticConfig):
    tops, mids, kws = [], [], []
    for t in range(cfg.num_top):
        if t < len(_SYN_TAXONOMY) and cfg.num_mid <= len(_SYN_TAXONOMY[t][1]):
            tname, tmids = _SYN_TAXONOMY[t]
        else:  # beyond the word lists: plain numbered names (still distinct, less semantic)
            tname = _SYN_TAXONOMY[t % len(_SYN_TAXONOMY)][0] + f" Line {t // len(_SYN_TAXONOMY) + 1}"
            base = _SYN_TAXONOMY[t % len(_SYN_TAXONOMY)][1]
            tmids = tuple((f"{base[m % len(base)][0]} Type {m // len(base) + 1}", base[m % len(base)][1])
                          for m in range(cfg.num_mid))
        tops.append(tname)
        mids.append([m for m, _ in tmids[: cfg.num_mid]])
        kws.append([k for _, k in tmids[: cfg.num_mid]])
    leaves = []
    for s in range(cfg.num_leaf):
        style = _SYN_LEAF_STYLES[s % len(_SYN_LEAF_STYLES)]
        leaves.append(style if s < len(_SYN_LEAF_STYLES) else f"{style} {s // len(_SYN_LEAF_STYLES) + 1}")
    return tops, mids, kws, leaves


def synthetic_dataset(num_items: int = 2000, num_users: int = 3000, seed: int = 0,
                      config: SyntheticConfig | None = None, **overrides) -> Dataset:
    """A deterministic synthetic catalogue and user sequences (same arguments -> same dataset).

    Items: a 3-level category hierarchy (department > product type > style + type, e.g.
    ``["Kitchen", "Coffee Makers", "Travel Coffee Makers"]``), a brand per department, a title,
    price (log-normal per product type) and a description built from the type's words, so a sentence
    encoder clusters items by category.  Users: sequential taste as described in
    :class:`SyntheticConfig` (override any field by keyword, e.g. ``p_series=0.7``): a
    next-item model can beat popularity clearly, because the next item is often the previous item's
    series successor and otherwise usually from the same or a sibling leaf category.

    Item ids ``0..N-1`` are shuffled across categories (ids carry no category information); user
    ids ``0..U-1``.  Every leaf has at least one item when ``num_items >= leaves``.
    """
    cfg = config or SyntheticConfig()
    if overrides:
        known = set(SyntheticConfig.__dataclass_fields__)
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"synthetic_dataset: unknown options {bad}; known: {sorted(known)}")
        cfg = SyntheticConfig(**{**cfg.__dict__, **overrides})
    for k, v in (("num_items", num_items), ("num_users", num_users)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"synthetic_dataset: {k} must be a positive int, got {v!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"synthetic_dataset: seed must be a non-negative int, got {seed!r}")
    if min(cfg.num_top, cfg.num_mid, cfg.num_leaf) < 1:
        raise ValueError("synthetic_dataset: num_top, num_mid, num_leaf must be >= 1")
    if not 1 <= cfg.min_len <= cfg.max_len:
        raise ValueError(f"synthetic_dataset: need 1 <= min_len <= max_len, got {cfg.min_len}, {cfg.max_len}")
    if cfg.max_len > num_items:
        raise ValueError(f"synthetic_dataset: max_len={cfg.max_len} exceeds num_items={num_items}; items do not repeat")
    probs = (cfg.p_series, cfg.p_stay, cfg.p_sibling, cfg.p_department)
    if any(not 0 <= p <= 1 for p in probs) or cfg.p_stay + cfg.p_sibling + cfg.p_department > 1:
        raise ValueError("synthetic_dataset: probabilities must be in [0, 1] and p_stay + p_sibling + "
                         "p_department <= 1")
    rng = np.random.default_rng([int(seed), 0x7167])
    tops, mids, kws, styles = _syn_names(cfg)
    T, M, S = cfg.num_top, cfg.num_mid, cfg.num_leaf
    n_leaves = T * M * S
    # leaf of each item: balanced, shuffled so item ids carry no category information
    leaf_of = rng.permutation(np.arange(num_items) % n_leaves)
    brands = [["".join(rng.choice(_SYN_SYLL, size=rng.integers(2, 4))).capitalize() for _ in range(4)]
              for _ in range(T)]
    mid_price = np.exp(rng.normal(3.2, 0.8, size=(T, M)))
    items = []
    pop = np.empty(num_items)
    pop[rng.permutation(num_items)] = 1.0 / np.arange(1, num_items + 1) ** cfg.zipf  # Zipf popularity
    for j in range(num_items):
        lf = int(leaf_of[j])
        t, m, s = lf // (M * S), (lf // S) % M, lf % S
        leaf_name = f"{styles[s]} {mids[t][m]}"
        words = kws[t][m].split()
        brand = brands[t][int(rng.integers(len(brands[t])))]
        adj = _SYN_ADJ[int(rng.integers(len(_SYN_ADJ)))]
        model = f"{chr(65 + int(rng.integers(26)))}{int(rng.integers(100, 1000))}"
        singular = mids[t][m].lower()[:-1] if mids[t][m].endswith("s") else mids[t][m].lower()
        items.append({
            "title": f"{brand} {leaf_name} {model}",
            "brand": brand,
            "categories": [tops[t], mids[t][m], leaf_name],
            "price": round(float(mid_price[t, m] * np.exp(rng.normal(0.0, 0.25))), 2),
            "description": (f"{'An' if adj[0] in 'aeiou' else 'A'} {adj} {styles[s].lower()} {singular} for "
                            f"{words[0]} and {words[1]}. Part of the {tops[t].lower()} range, made for "
                            f"{' '.join(words)}."),
        })
    # per-leaf item lists (the fixed series cycle order) with popularity cumulative weights
    leaf_items = [[] for _ in range(n_leaves)]
    for j in rng.permutation(num_items):
        leaf_items[int(leaf_of[j])].append(int(j))
    succ = np.empty(num_items, dtype=np.int64)
    for lst in leaf_items:
        for a, b in zip(lst, lst[1:] + lst[:1]):
            succ[a] = b
    leaf_cum = [np.cumsum(pop[lst]) for lst in leaf_items]
    nonempty = np.array([lf for lf in range(n_leaves) if leaf_items[lf]], dtype=np.int64)
    leaf_w = np.array([pop[leaf_items[lf]].sum() for lf in nonempty])
    leaf_w_cum = np.cumsum(leaf_w)

    def siblings(lf, level):  # non-empty leaves sharing the product type (level 1) / department (2)
        span = S if level == 1 else M * S
        base = lf - lf % span
        return [x for x in range(base, base + span) if x != lf and leaf_items[x]]

    sib_cache: dict = {}

    def draw_in_leaf(lf, seen):
        lst, cum = leaf_items[lf], leaf_cum[lf]
        for _ in range(8):
            j = lst[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(lst) - 1)]
            if j not in seen:
                return j
        free = [j for j in lst if j not in seen]
        return free[int(rng.integers(len(free)))] if free else None

    p_geo = 1.0 / max(1.0, cfg.mean_len - cfg.min_len + 1)
    seqs = []
    for _u in range(num_users):
        length = min(cfg.max_len, cfg.min_len + int(rng.geometric(p_geo)) - 1)
        lf = int(nonempty[min(int(np.searchsorted(leaf_w_cum, rng.random() * leaf_w_cum[-1], side="right")),
                              len(nonempty) - 1)])
        seq: list[int] = []
        seen: set[int] = set()
        while len(seq) < length:
            j = None
            if seq and rng.random() < cfg.p_series and int(succ[seq[-1]]) not in seen:
                j = int(succ[seq[-1]])
            elif seq:
                r = rng.random()
                if r >= cfg.p_stay:
                    level = 1 if r < cfg.p_stay + cfg.p_sibling else (
                        2 if r < cfg.p_stay + cfg.p_sibling + cfg.p_department else 3)
                    if level == 3:
                        cand = nonempty
                    else:
                        key = (lf, level)
                        if key not in sib_cache:
                            sib_cache[key] = siblings(lf, level)
                        cand = sib_cache[key]
                    if len(cand):
                        lf = int(cand[int(rng.integers(len(cand)))])
            if j is None:
                j = draw_in_leaf(lf, seen)
            if j is None:  # the leaf is exhausted for this user: any unseen item
                j = int(rng.integers(num_items))
                while j in seen:
                    j = int(rng.integers(num_items))
            lf = int(leaf_of[j])
            seq.append(j)
            seen.add(j)
        seqs.append(np.array(seq, dtype=np.int64))
    return Dataset("synthetic", np.arange(num_items, dtype=np.int64), items,
                   np.arange(num_users, dtype=np.int64), seqs)


# ================================================================================================
# Synthetic latents for scale benchmarks
# ================================================================================================
_LATENT_BLOCK = 1 << 16  # rows per independently seeded block: output never depends on chunking


def _latent_centers(dim: int, clusters: int, seed: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng([int(seed), 0, 0])
    coarse_n = max(1, int(round(math.sqrt(clusters))))
    coarse = rng.standard_normal((coarse_n, dim))
    fine = coarse[np.arange(clusters) % coarse_n] + spread * rng.standard_normal((clusters, dim))
    return fine.astype(np.float32)


def _latent_block(b: int, centers: np.ndarray, seed: int, noise: float) -> np.ndarray:
    rng = np.random.default_rng([int(seed), 1, int(b)])
    c = rng.integers(len(centers), size=_LATENT_BLOCK)
    x = rng.standard_normal((_LATENT_BLOCK, centers.shape[1]), dtype=np.float32)
    x *= np.float32(noise)
    x += centers[c]
    return x


def _check_latent_args(n, dim, clusters, seed, offset, noise):
    for k, v, lo in (("n", n, 0), ("dim", dim, 1), ("clusters", clusters, 1), ("seed", seed, 0), ("offset", offset, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"synthetic_latents: {k} must be an int >= {lo}, got {v!r}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"synthetic_latents: noise must be a finite float >= 0, got {noise!r}")


def synthetic_latents(n: int, dim: int = 32, clusters: int = 256, seed: int = 0, *, offset: int = 0,
                      noise: float = 0.3, spread: float = 0.5) -> np.ndarray:
    """Rows ``offset .. offset+n-1`` of an endless clustered latent stream: float32 (n, dim).

    Two-level Gaussian mixture (``round(sqrt(clusters))`` coarse centres ~ N(0, 1); ``clusters``
    fine centres = coarse + ``spread``·N(0, 1); row = a uniformly chosen fine centre +
    ``noise``·N(0, 1)) — the kind of structure a residual quantizer sees.  Row ``r`` depends only on
    ``(seed, r, dim, clusters, noise, spread)``: generated in fixed blocks of 65,536 rows, each
    from its own seeded generator, so any chunking of the stream gives identical rows.
    """
    _check_latent_args(n, dim, clusters, seed, offset, noise)
    centers = _latent_centers(dim, clusters, seed, spread)
    out = np.empty((n, dim), dtype=np.float32)
    r = offset
    while r < offset + n:
        b = r // _LATENT_BLOCK
        lo = r - b * _LATENT_BLOCK
        take = min(_LATENT_BLOCK - lo, offset + n - r)
        out[r - offset: r - offset + take] = _latent_block(b, centers, seed, noise)[lo: lo + take]
        r += take
    return out


def iter_synthetic_latents(n: int, dim: int = 32, clusters: int = 256, seed: int = 0, *,
                           chunk_size: int = 1 << 20, noise: float = 0.3,
                           spread: float = 0.5) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, float32 (rows, dim))`` chunks covering rows ``0..n-1`` of
    :func:`synthetic_latents` in bounded memory (one chunk at a time; for 100M+ rows)."""
    _check_latent_args(n, dim, clusters, seed, 0, noise)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"iter_synthetic_latents: chunk_size must be a positive int, got {chunk_size!r}")
    for start in range(0, n, chunk_size):
        yield start, synthetic_latents(min(chunk_size, n - start), dim, clusters, seed, offset=start,
                                       noise=noise, spread=spread)


# ================================================================================================
# One string spec
# ================================================================================================
_SPEC_HELP = ('dataset spec must be one of: "synthetic", "synthetic:items=2000,users=3000,seed=0", '
              '"beauty" (default data dir), "beauty:<dir>", "scientific" (default data dir), '
              '"lcrec:<dir>:<name>", "amazon2014:<reviews.json.gz>:<meta.json.gz>", '
              '"tables:<items>:<interactions>"')


def _parse_scalar(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def load_dataset(spec: str) -> Dataset:
    """Load a dataset from a one-string spec (used by the CLI); see ``_SPEC_HELP`` for the forms.

    ``synthetic`` options: ``items``, ``users``, ``seed`` and any :class:`SyntheticConfig` field.
    Two-path specs split at the last ``:``.  ``beauty``/``scientific`` alone use
    :func:`default_data_dir`.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(_SPEC_HELP)
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "synthetic":
        kwargs: dict[str, Any] = {}
        alias = {"items": "num_items", "users": "num_users"}
        for part in filter(None, rest.split(",")):
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"synthetic spec option {part!r} must be key=value; {_SPEC_HELP}")
            kwargs[alias.get(k.strip(), k.strip())] = _parse_scalar(v.strip())
        return synthetic_dataset(**kwargs)
    if kind == "beauty":
        return load_beauty(rest or default_data_dir() / "amazon-beauty-2014")
    if kind == "scientific" and not rest:
        return load_lcrec(default_data_dir() / "amazon-scientific-2018", "Scientific")
    if kind in ("lcrec", "amazon2014", "tables"):
        a, sep, b = rest.rpartition(":")
        if not sep or not a or not b:
            raise ValueError(f"{kind} spec needs two parts separated by ':'; {_SPEC_HELP}")
        if kind == "lcrec":
            return load_lcrec(a, b)
        if kind == "amazon2014":
            return load_amazon2014(a, b)
        return load_tables(a, b)
    raise ValueError(f"unknown dataset spec {spec!r}; {_SPEC_HELP}")
