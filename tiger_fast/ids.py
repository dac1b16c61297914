"""Semantic IDs of items: collision tokens and the item <-> ID table.

An item's semantic ID is ``L`` RQ-VAE codes ``(c0, ..., c_{L-1})`` plus one collision code
``c_L`` (TIGER §3.1): items that share all ``L`` RQ-VAE codes get ``c_L = 0, 1, 2, ...`` in the
order of their item ids, so every item has a unique ``L+1``-code ID.  ``IdTable`` holds the
mapping for a catalogue and is what the trie, the sequence builder, evaluation and cold start use.

Rows.  An ``IdTable`` stores its items in *rows* ``0..len-1``; the trie's leaves hold row numbers
and ``GenerateResult`` maps rows back to item ids through ``id_table.item_ids``.  ``add_items``
appends rows (existing rows never move, so a trie can be extended in place with ``Trie.add``);
``remove_items`` compacts the rows and returns the old -> new row map (a trie built before must
be rebuilt, or instead keep the table and use ``Trie.remove(rows)`` in place).

Lookups use sorted int64 keys (binary search), not Python dicts, so a table of tens of millions
of items stays compact: a full ID is packed into one mixed-radix int64
``key = ((c0 * S1 + c1) * S2 + c2) * S3 + c3`` (``S_l`` = the layout's level sizes).
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import torch

from .layout import TokenLayout
from .checks import check_int

__all__ = ["assign_collision_tokens", "IdTable", "semantic_id_report", "code_branching", "id_file_schema",
           "IdRowGroupWriter", "ID_ROW_GROUP"]

_FORMAT = "tiger_fast.id_table/1"

#: Rows per row group of the ID files the streaming writers produce (the last group is shorter).
ID_ROW_GROUP = 1 << 20


# ---------------------------------------------------------------------------------------------
# input checking
# ---------------------------------------------------------------------------------------------
def _int_array(x, name: str, ndim: int) -> np.ndarray:
    """torch / numpy / list of ints -> contiguous np.int64 array with ``ndim`` dims, or raise."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
        x = x.detach().cpu().numpy()
    else:
        x = np.asarray(x)
        if x.dtype == object or x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or x.size == 0):
            raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    if x.ndim != ndim:
        want = "(N,)" if ndim == 1 else "(N, L)"
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.int64)


def _check_unique_ids(item_ids: np.ndarray, name: str) -> None:
    if item_ids.size == 0:
        return
    s = np.sort(item_ids)
    dup = s[1:][s[1:] == s[:-1]]
    if dup.size:
        raise ValueError(f"{name} contains duplicate item ids, e.g. {np.unique(dup)[:5].tolist()}; "
                         "every item needs exactly one id")


def _group_starts(sorted_codes: np.ndarray) -> np.ndarray:
    """sorted_codes int64 (N, L) lexicographically sorted -> bool (N,) True where a new group starts."""
    n = sorted_codes.shape[0]
    start = np.ones(n, dtype=bool)
    if n > 1:
        start[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)
    return start


def _rank_in_group(start: np.ndarray) -> np.ndarray:
    """bool (N,) group starts (in sorted order) -> int64 (N,) position of each row in its group."""
    idx = np.arange(start.size, dtype=np.int64)
    first = np.maximum.accumulate(np.where(start, idx, 0))
    return idx - first


# ---------------------------------------------------------------------------------------------
# collision tokens
# ---------------------------------------------------------------------------------------------
def assign_collision_tokens(codes, item_ids, collision_size: int) -> torch.Tensor:
    """Append the collision code to RQ-VAE codes.

    codes: int64 (N, L) RQ-VAE codes; item_ids: int64 (N,) unique item ids; collision_size: the
    size of the collision level (the layout's ``collision_size``).
    Returns int64 (N, L+1), rows in the input order: ``[:, :L]`` = codes, ``[:, L]`` = the item's
    rank by item id among the items sharing its L codes (0 for the smallest id).  The result
    depends only on the set of (item id, codes) pairs, not on the input order.
    Raises ValueError if a group needs a collision code >= collision_size (names the prefix and
    the group size), on duplicate item ids, negative codes or mismatched lengths.
    """
    codes = _int_array(codes, "codes", 2)
    item_ids = _int_array(item_ids, "item_ids", 1)
    if codes.shape[0] != item_ids.shape[0]:
        raise ValueError(f"codes has {codes.shape[0]} rows but item_ids has {item_ids.shape[0]}; "
                         "they must be aligned (one row per item)")
    check_int(collision_size, "collision_size")
    if codes.size and codes.min() < 0:
        raise ValueError("codes must be >= 0 (RQ-VAE codes are codebook indices)")
    _check_unique_ids(item_ids, "item_ids")
    n, L = codes.shape
    out = np.empty((n, L + 1), dtype=np.int64)
    out[:, :L] = codes
    if n == 0:
        return torch.from_numpy(out)
    # lexsort: last key is primary -> sort by (c0, ..., c_{L-1}, item_id).
    order = np.lexsort((item_ids,) + tuple(codes[:, l] for l in range(L - 1, -1, -1)))
    sc = codes[order]
    start = _group_starts(sc)
    rank = _rank_in_group(start)
    if rank.max() >= collision_size:
        _raise_overflow(sc, start, collision_size)
    out[order, L] = rank
    return torch.from_numpy(out)


def _raise_overflow(sorted_codes: np.ndarray, start: np.ndarray, collision_size: int, extra: str = ""):
    starts = np.flatnonzero(start)
    sizes = np.diff(np.append(starts, start.size))
    bad = np.flatnonzero(sizes > collision_size)
    worst = bad[np.argmax(sizes[bad])]
    prefix = tuple(int(c) for c in sorted_codes[starts[worst]])
    raise ValueError(
        f"{bad.size} semantic-ID prefix group(s) exceed the collision level: prefix {prefix} is shared "
        f"by {int(sizes[worst])} items{extra} but collision_size is {collision_size}. Use a larger "
        "TokenLayout.collision_size, more/larger RQ-VAE codebooks, or retrain the RQ-VAE "
        "(codebook collapse?)")


# ---------------------------------------------------------------------------------------------
# IdTable
# ---------------------------------------------------------------------------------------------
class IdTable:
    """Item <-> semantic ID table for one TokenLayout.

    layout: TokenLayout; item_ids: int64 (N,) unique external item ids; codes: int64 (N, L+1)
    full semantic IDs (RQ-VAE codes + collision code; ``L+1 == layout.num_levels``), unique per
    item and inside the layout's level sizes.  Use ``IdTable.from_rq_codes`` to build one from
    RQ-VAE codes (assigns the collision codes).

    Attributes (read-only views): ``item_ids`` int64 tensor (N,), ``codes`` int64 tensor (N, L+1);
    row ``i`` of both is item row ``i``.  ``provenance``: dict of what the table was built from
    (``{"catalogue": catalogue_fingerprint(...), "rqvae": digest}``, see tiger_fast.provenance;
    empty when unknown), kept in the Parquet metadata.
    """

    def __init__(self, layout: TokenLayout, item_ids, codes):
        if not isinstance(layout, TokenLayout):
            raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
        self.layout = layout
        item_ids = _int_array(item_ids, "item_ids", 1)
        codes = _int_array(codes, "codes", 2)
        self._radix = self._make_radix(layout)
        self._set(item_ids, codes)
        self.provenance: dict = {}

    # ---- construction helpers ----------------------------------------------------------------
    @classmethod
    def from_rq_codes(cls, layout: TokenLayout, item_ids, rq_codes) -> "IdTable":
        """rq_codes: int64 (N, L) RQ-VAE codes -> table with collision codes assigned by item id."""
        return cls(layout, item_ids, assign_collision_tokens(rq_codes, item_ids, layout.collision_size))

    @staticmethod
    def _make_radix(layout: TokenLayout) -> np.ndarray:
        sizes = layout.level_sizes
        total = 1
        for s in sizes:
            total *= s
        if total >= 2**62:
            raise ValueError(f"level sizes {sizes} give {total} possible IDs; IdTable packs an ID into "
                             "one int64 and needs the product of level sizes < 2**62")
        radix = np.ones(len(sizes), dtype=np.int64)
        for l in range(len(sizes) - 2, -1, -1):
            radix[l] = radix[l + 1] * sizes[l + 1]
        return radix

    def _validate_codes(self, codes: np.ndarray, name: str) -> None:
        L1 = self.layout.num_levels
        if codes.shape[1] != L1:
            raise ValueError(f"{name} must have shape (N, {L1}) (RQ-VAE codes + collision code for this "
                             f"layout), got {tuple(codes.shape)}")
        if codes.size:
            sizes = np.asarray(self.layout.level_sizes, dtype=np.int64)
            bad = (codes < 0) | (codes >= sizes)
            if bad.any():
                r, l = np.argwhere(bad)[0]
                raise ValueError(f"{name}[{r}, {l}] = {codes[r, l]} is outside level {l}'s range "
                                 f"[0, {sizes[l]}) of the layout {self.layout.level_sizes}")

    def _set(self, item_ids: np.ndarray, codes: np.ndarray) -> None:
        if codes.shape[0] != item_ids.shape[0]:
            raise ValueError(f"codes has {codes.shape[0]} rows but item_ids has {item_ids.shape[0]}; "
                             "they must be aligned (one row per item)")
        self._validate_codes(codes, "codes")
        _check_unique_ids(item_ids, "item_ids")
        keys = codes @ self._radix if codes.size else np.zeros(0, dtype=np.int64)
        key_order = np.argsort(keys, kind="stable")
        sk = keys[key_order]
        if sk.size > 1 and (sk[1:] == sk[:-1]).any():
            i = int(np.flatnonzero(sk[1:] == sk[:-1])[0])
            a, b = key_order[i], key_order[i + 1]
            raise ValueError(f"items {int(item_ids[a])} and {int(item_ids[b])} have the same semantic ID "
                             f"{codes[a].tolist()}; IDs must be unique (assign collision codes with "
                             "assign_collision_tokens / IdTable.from_rq_codes)")
        # owned copies: the sorted indexes below must not change behind the table's back
        self._item_ids = np.array(item_ids, dtype=np.int64)
        self._codes = np.array(codes, dtype=np.int64)
        self._item_ids_t = torch.from_numpy(self._item_ids)
        self._codes_t = torch.from_numpy(self._codes)
        self._keys = keys
        self._key_order = key_order
        self._sorted_keys = sk
        self._id_order = np.argsort(item_ids, kind="stable")
        self._sorted_ids = item_ids[self._id_order]

    # ---- basic access ------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._item_ids.shape[0])

    def __repr__(self) -> str:
        return f"IdTable({len(self)} items, level_sizes={self.layout.level_sizes})"

    @property
    def item_ids(self) -> torch.Tensor:
        """int64 (N,) item id of each row.  A view of the table's storage (no copy, so it is cheap
        for large tables): do not modify it; clone first."""
        return self._item_ids_t

    @property
    def codes(self) -> torch.Tensor:
        """int64 (N, L+1) semantic ID of each row (a view like ``item_ids``: do not modify)."""
        return self._codes_t

    @property
    def tokens(self) -> torch.Tensor:
        """int64 (N, L+1) token ids (layout.codes_to_tokens) of each row."""
        return self.layout.codes_to_tokens(self.codes)

    def rows_of(self, item_ids) -> torch.Tensor:
        """item_ids int64 (M,) -> int64 (M,) rows; unknown ids -> ValueError naming them."""
        ids = _int_array(item_ids, "item_ids", 1)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos_c = np.minimum(pos, max(len(self) - 1, 0))
        found = (pos < len(self)) & (self._sorted_ids[pos_c] == ids) if len(self) else np.zeros(ids.shape, bool)
        if not found.all():
            missing = ids[~found]
            raise ValueError(f"item_ids contains {missing.size} id(s) not in the IdTable, e.g. "
                             f"{missing[:5].tolist()}")
        return torch.from_numpy(self._id_order[pos_c].astype(np.int64))

    def contains(self, item_ids) -> torch.Tensor:
        """item_ids int64 (M,) -> bool (M,) whether each id is in the table."""
        ids = _int_array(item_ids, "item_ids", 1)
        if len(self) == 0:
            return torch.zeros(ids.shape, dtype=torch.bool)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self) - 1)
        return torch.from_numpy(self._sorted_ids[pos] == ids)

    def codes_of(self, item_ids) -> torch.Tensor:
        """item_ids int64 (M,) -> int64 (M, L+1) semantic IDs."""
        return torch.from_numpy(self._codes[self.rows_of(item_ids).numpy()])

    def tokens_of(self, item_ids) -> torch.Tensor:
        """item_ids int64 (M,) -> int64 (M, L+1) token ids of their semantic IDs (via the layout)."""
        return self.layout.codes_to_tokens(self.codes_of(item_ids))

    def _key_range(self, prefix: np.ndarray) -> tuple[int, int]:
        p = prefix.shape[0]
        lo = int(prefix @ self._radix[:p]) if p else 0
        width = int(self._radix[p - 1]) if p else int(self._radix[0]) * self.layout.level_sizes[0]
        a = int(np.searchsorted(self._sorted_keys, lo, side="left"))
        b = int(np.searchsorted(self._sorted_keys, lo + width, side="left"))
        return a, b

    def rows_of_codes(self, codes) -> torch.Tensor:
        """codes int64 (M, L+1) full IDs -> int64 (M,) rows, -1 where no item has that ID."""
        c = _int_array(codes, "codes", 2)
        if c.shape[1] != self.layout.num_levels:
            raise ValueError(f"codes must have shape (M, {self.layout.num_levels}), got {tuple(c.shape)}")
        sizes = np.asarray(self.layout.level_sizes, dtype=np.int64)
        inrange = ((c >= 0) & (c < sizes)).all(axis=1)
        keys = np.where(inrange, np.clip(c, 0, sizes - 1) @ self._radix, -1)
        out = np.full(c.shape[0], -1, dtype=np.int64)
        if len(self):
            pos = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self) - 1)
            hit = inrange & (self._sorted_keys[pos] == keys)
            out[hit] = self._key_order[pos[hit]]
        return torch.from_numpy(out)

    def items_of_codes(self, codes) -> torch.Tensor:
        """codes int64 (M, L+1) full IDs -> int64 (M,) item ids, -1 where no item has that ID
        (e.g. an invalid ID from unconstrained decoding)."""
        rows = self.rows_of_codes(codes).numpy()
        out = np.where(rows >= 0, self._item_ids[np.maximum(rows, 0)] if len(self) else -1, -1)
        return torch.from_numpy(out.astype(np.int64))

    def rows_with_prefix(self, prefix) -> torch.Tensor:
        """prefix: ints (p,), 0 <= p <= L+1 -> int64 rows of the items whose ID starts with it,
        in ID order."""
        pre = _int_array(prefix, "prefix", 1)
        if pre.shape[0] > self.layout.num_levels:
            raise ValueError(f"prefix has {pre.shape[0]} codes but IDs have {self.layout.num_levels}")
        sizes = np.asarray(self.layout.level_sizes[: pre.shape[0]], dtype=np.int64)
        if ((pre < 0) | (pre >= sizes)).any():
            return torch.zeros(0, dtype=torch.long)
        a, b = self._key_range(pre)
        return torch.from_numpy(self._key_order[a:b].copy())

    def items_with_prefix(self, prefix) -> torch.Tensor:
        """prefix: ints (p,) -> int64 item ids whose semantic ID starts with it, in ID order
        (so with p = L they come in collision-code order)."""
        return torch.from_numpy(self._item_ids[self.rows_with_prefix(prefix).numpy()])

    # ---- catalogue changes -------------------------------------------------------------------
    def add_items(self, item_ids, codes_without_collision) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (cold-start) items given their RQ-VAE codes; the table changes in place.

        item_ids: int64 (M,) new ids (not already in the table); codes_without_collision: int64
        (M, L).  A new item's collision code continues after the largest one already used in its
        group (so existing IDs never change), new items of one group in item-id order.
        Returns (rows int64 (M,) — appended, in the input order; codes int64 (M, L+1)).
        On any error (overflow, duplicate or existing id, bad code) the table is unchanged.
        """
        ids = _int_array(item_ids, "item_ids", 1)
        rq = _int_array(codes_without_collision, "codes_without_collision", 2)
        L = self.layout.num_levels - 1
        if rq.shape != (ids.shape[0], L):
            raise ValueError(f"codes_without_collision must have shape ({ids.shape[0]}, {L}) "
                             f"(RQ-VAE codes only, aligned with item_ids), got {tuple(rq.shape)}")
        _check_unique_ids(ids, "item_ids")
        present = self.contains(ids).numpy()
        if present.any():
            raise ValueError(f"item_ids {ids[present][:5].tolist()} are already in the IdTable; "
                             "remove them first to re-assign")
        sizes = np.asarray(self.layout.codebook_sizes, dtype=np.int64)
        if rq.size and ((rq < 0) | (rq >= sizes)).any():
            r, l = np.argwhere((rq < 0) | (rq >= sizes))[0]
            raise ValueError(f"codes_without_collision[{r}, {l}] = {rq[r, l]} is outside level {l}'s "
                             f"range [0, {sizes[l]})")
        M = ids.shape[0]
        full = np.empty((M, L + 1), dtype=np.int64)
        full[:, :L] = rq
        if M:
            # next free collision code per group = 1 + max existing one (or 0 for a new group)
            base = np.zeros(M, dtype=np.int64)
            prefix_keys = rq @ self._radix[:L]
            if len(self):
                stride = int(self._radix[L - 1])
                # the largest existing key in [pk, pk + collision_size) is the group's last item
                b = np.searchsorted(self._sorted_keys, prefix_keys + stride, side="left")
                has = b > 0
                last = self._sorted_keys[np.maximum(b - 1, 0)]
                same = has & (last >= prefix_keys) & (last < prefix_keys + stride)
                base[same] = last[same] - prefix_keys[same] + 1
            order = np.lexsort((ids,) + tuple(rq[:, l] for l in range(L - 1, -1, -1)))
            start = _group_starts(rq[order])
            cc = base[order] + _rank_in_group(start)
            if cc.max() >= self.layout.collision_size:
                k = int(np.argmax(cc))
                raise ValueError(
                    f"cannot add items: prefix {tuple(int(c) for c in rq[order][k])} would need collision "
                    f"code {int(cc[k])} but collision_size is {self.layout.collision_size} ({int(base[order][k])} "
                    "codes already used by the table). Use a larger TokenLayout.collision_size")
            full[order, L] = cc
        n0 = len(self)
        self._set(np.concatenate([self._item_ids, ids]), np.concatenate([self._codes, full]))
        return torch.arange(n0, n0 + M, dtype=torch.long), torch.from_numpy(full)

    def remove_items(self, item_ids) -> torch.Tensor:
        """Remove items (in place); unknown ids -> ValueError and no change.

        Returns int64 (N_old,) map old row -> new row (-1 for removed rows).  Remaining rows keep
        their relative order, and the remaining items keep their IDs (no collision code moves).
        """
        rows = self.rows_of(item_ids).numpy()
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        new_row = np.full(len(self), -1, dtype=np.int64)
        new_row[keep] = np.arange(int(keep.sum()), dtype=np.int64)
        self._set(self._item_ids[keep], self._codes[keep])
        return torch.from_numpy(new_row)

    # ---- statistics ---------------------------------------------------------------------------
    def report(self) -> dict:
        """Summary dict: num_items, unique_prefixes (distinct RQ-VAE code tuples), colliding_items
        (items whose prefix is shared), max_group_size (largest prefix group = 1 + largest
        collision code needed), collision_histogram {group size: number of groups},
        codebook_usage (list, per RQ level: distinct codes used / codebook size),
        collision_usage (distinct collision codes / collision_size)."""
        L = self.layout.num_levels - 1
        n = len(self)
        rep = {"num_items": n, "level_sizes": list(self.layout.level_sizes)}
        if n == 0:
            rep.update(unique_prefixes=0, colliding_items=0, max_group_size=0, collision_histogram={},
                       codebook_usage=[0.0] * L, collision_usage=0.0)
            return rep
        prefix_keys = self._sorted_keys // self._radix[L - 1]
        _, counts = np.unique(prefix_keys, return_counts=True)
        hist = Counter(counts.tolist())
        rep.update(
            unique_prefixes=int(counts.size),
            colliding_items=int(counts[counts > 1].sum()),
            max_group_size=int(counts.max()),
            collision_histogram={int(k): int(v) for k, v in sorted(hist.items())},
            codebook_usage=[float(np.unique(self._codes[:, l]).size / self.layout.codebook_sizes[l])
                            for l in range(L)],
            collision_usage=float(np.unique(self._codes[:, L]).size / self.layout.collision_size),
        )
        return rep

    # ---- Parquet --------------------------------------------------------------------------------
    def column_names(self) -> list[str]:
        return ["item_id"] + [f"c{l}" for l in range(self.layout.num_levels)]

    def to_parquet(self, path) -> None:
        """Write columns item_id, c0..c{L} (int64) with the layout and the provenance as JSON in the
        schema metadata.  All-or-nothing (``atomic.write_atomic``): a reader sees the old file or
        the whole new one."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .atomic import write_atomic

        path = os.fspath(path)
        schema = id_file_schema(self.layout, self.provenance)
        cols = [pa.array(self._item_ids)] + [pa.array(self._codes[:, l]) for l in range(self._codes.shape[1])]
        table = pa.Table.from_arrays(cols, schema=schema)
        write_atomic(path, lambda tmp: pq.write_table(table, tmp), what="ID table")

    @classmethod
    def from_parquet(cls, path, layout: TokenLayout | None = None) -> "IdTable":
        """Read a table written by ``to_parquet`` (or by ``tiger_fast.assign``).  If ``layout`` is
        given it must equal the file's layout (ValueError otherwise)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"ID table file not found: {path}")
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"cannot read {path} as Parquet: {e}") from e
        meta = schema.metadata or {}
        if b"tiger_fast.layout" not in meta:
            raise ValueError(f"{path} has no tiger_fast layout metadata; it was not written by "
                             "IdTable.to_parquet / tiger_fast.assign")
        try:
            file_layout = TokenLayout.from_dict(json.loads(meta[b"tiger_fast.layout"].decode()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: invalid layout metadata: {e}") from e
        if layout is not None:
            layout.check_compatible(file_layout, what=f"layout of {path}")
        names = ["item_id"] + [f"c{l}" for l in range(file_layout.num_levels)]
        missing = [c for c in names if c not in schema.names]
        if missing:
            raise ValueError(f"{path} is missing column(s) {missing}; expected {names}")
        t = pq.read_table(path, columns=names)
        cols = []
        for c in names:
            arr = t.column(c).to_numpy()
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{path}: column {c} must be int64, got {t.column(c).type}")
            cols.append(np.array(arr, dtype=np.int64))  # an owned, writable copy
        table = cls(file_layout, cols[0], np.stack(cols[1:], axis=1))
        if b"tiger_fast.provenance" in meta:
            try:
                prov = json.loads(meta[b"tiger_fast.provenance"].decode())
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}: invalid provenance metadata: {e}") from None
            if not isinstance(prov, dict):
                raise ValueError(f"{path}: provenance metadata must be a JSON object")
            table.provenance = prov
        return table


# ---------------------------------------------------------------------------------------------
# streaming ID files (tiger_fast.assign, tiger_fast.ray_assign)
# ---------------------------------------------------------------------------------------------
def id_file_schema(layout: TokenLayout, provenance: dict | None = None):
    """The pyarrow schema of an ID file: int64 columns item_id, c0..c{L}, the format, the layout
    and (when given) the provenance as JSON in the schema metadata (what
    :meth:`IdTable.from_parquet` reads back)."""
    import pyarrow as pa

    names = ["item_id"] + [f"c{l}" for l in range(layout.num_levels)]
    meta = {b"tiger_fast.format": _FORMAT.encode(), b"tiger_fast.layout": json.dumps(layout.to_dict()).encode()}
    if provenance:
        meta[b"tiger_fast.provenance"] = json.dumps(provenance, sort_keys=True).encode()
    return pa.schema([(c, pa.int64()) for c in names]).with_metadata(meta)


class IdRowGroupWriter:
    """Streams ID rows into an open ``pyarrow.parquet.ParquetWriter`` (schema
    :func:`id_file_schema`) in row groups of exactly :data:`ID_ROW_GROUP` rows, the last one shorter,
    so the file's bytes depend only on the rows and their order, never on how they arrived (the
    single-machine and the Ray assignment write byte-identical files through this one writer).

        with pq.ParquetWriter(tmp, id_file_schema(layout)) as w:
            rows = IdRowGroupWriter(w, layout)
            for part in parts:
                rows.add(part)      # int64 (n, L + 1): item_id, c0..c{L}, in file order
            rows.close()            # the last, shorter row group
    """

    def __init__(self, writer, layout: TokenLayout):
        self.writer = writer
        self.schema = writer.schema  # id_file_schema(layout, provenance) of the file being written
        self.width = layout.num_levels + 1
        self._buf: list[np.ndarray] = []
        self._n = 0

    def add(self, rows: np.ndarray) -> None:
        """Append int64 (n, L + 1) rows; whole row groups are written as soon as they are full."""
        self._buf.append(rows)
        self._n += rows.shape[0]
        if self._n >= ID_ROW_GROUP:
            self._flush(final=False)

    def close(self) -> None:
        """Write what is buffered (the last row group); the caller closes the ParquetWriter."""
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        import pyarrow as pa

        if not self._buf:
            return
        rows = np.concatenate(self._buf)
        k = 0
        while rows.shape[0] - k >= ID_ROW_GROUP or (final and k < rows.shape[0]):
            part = rows[k: k + ID_ROW_GROUP]
            self.writer.write_table(pa.Table.from_arrays([pa.array(part[:, j]) for j in range(self.width)],
                                                         schema=self.schema), row_group_size=ID_ROW_GROUP)
            k += part.shape[0]
        self._buf = [rows[k:]] if k < rows.shape[0] else []
        self._n = rows.shape[0] - k


# ---------------------------------------------------------------------------------------------
# semantic check
# ---------------------------------------------------------------------------------------------
def _same_label_pairs(groups: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """groups, labels int64 (n,) -> (pairs within a group, of those the pairs with equal label)."""
    if groups.size == 0:
        return 0, 0
    _, gc = np.unique(groups, return_counts=True)
    pairs = int((gc * (gc - 1) // 2).sum())
    gl = np.stack([groups, labels], axis=1)
    _, glc = np.unique(gl, axis=0, return_counts=True)
    same = int((glc * (glc - 1) // 2).sum())
    return pairs, same


def semantic_id_report(id_table: IdTable, leaf_categories) -> dict:
    """How semantic the IDs are: category agreement of items that share ID prefixes.

    leaf_categories: sequence of str (N,) aligned with the table's rows (e.g. the last category of
    each item); items with an empty/None category are left out.  Exact pair counts (no sampling):
    for p = 1..L, ``share_prefix[p]`` = fraction of item pairs sharing their first p codes that
    have the same leaf category; ``random_pairs`` = the same fraction over all item pairs (the
    chance level).  A semantic RQ-VAE gives share_prefix values far above random_pairs.
    """
    if not isinstance(id_table, IdTable):
        raise TypeError(f"id_table must be an IdTable, got {type(id_table).__name__}")
    cats = list(leaf_categories)
    if len(cats) != len(id_table):
        raise ValueError(f"leaf_categories has {len(cats)} entries but the IdTable has {len(id_table)} rows; "
                         "give one category per row, in row order")
    known = np.array([c is not None and str(c) != "" for c in cats], dtype=bool)
    _, labels = np.unique(np.array([str(c) if k else "" for c, k in zip(cats, known)], dtype=object),
                          return_inverse=True)
    labels = labels.astype(np.int64)[known]
    codes = id_table._codes[known]
    L = id_table.layout.num_levels - 1
    n = int(known.sum())
    out = {"items_with_category": n, "num_categories": int(np.unique(labels).size)}
    total_pairs, same_total = _same_label_pairs(np.zeros(n, dtype=np.int64), labels)
    out["random_pairs"] = same_total / total_pairs if total_pairs else float("nan")
    out["share_prefix"] = {}
    out["pairs_sharing_prefix"] = {}
    radix = id_table._radix
    for p in range(1, L + 1):
        g = codes[:, :p] @ (radix[:p] // radix[p - 1])
        pairs, same = _same_label_pairs(g, labels)
        out["share_prefix"][p] = same / pairs if pairs else float("nan")
        out["pairs_sharing_prefix"][p] = pairs
    return out


def code_branching(codes) -> list[dict]:
    """How much choice the ID trie leaves at each level.

    codes: int (N, L) tensor or array, one semantic ID per row.  Returns, per level l = 0..L-1,
    ``{"level": l, "prefixes": number of distinct prefixes of length l, "mean_choices": mean number
    of distinct codes that follow one such prefix, "share_single_choice": share of prefixes
    followed by exactly one code}``.
    """
    rows = np.asarray(codes).tolist()
    out = []
    for level in range(len(rows[0]) if rows else 0):
        children: dict = {}
        for row in rows:
            children.setdefault(tuple(row[:level]), set()).add(row[level])
        sizes = [len(v) for v in children.values()]
        out.append({"level": level, "prefixes": len(sizes), "mean_choices": sum(sizes) / len(sizes),
                    "share_single_choice": sum(s == 1 for s in sizes) / len(sizes)})
    return out
