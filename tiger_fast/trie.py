"""Trie of valid semantic IDs with dense per-level child tables, for constrained decoding.

Layout (docs/contracts.md, "Beam search"; the C++/CUDA selection kernels read exactly these tables):

    children[l]   int32 (n_nodes_l, S_l), S_l = level_sizes[l]
                  entry [n, t] = id of the child node at depth l+1 reached from node n (depth l)
                  by code t, or -1 when absent.  Depth 0 has one node, the root (id 0).
                  At the last level L-1 the entry is the item *row* (index into the IdTable, i.e.
                  the caller's row numbering) instead of a node id.

A node's whole row is one contiguous block, so the validity mask of a beam at level l is one row
read: ``children[l][node] >= 0``.

Memory: 4 * S_l bytes per node at depth l (int32 entries).  Depth 0 has 1 node, depth 1 at most
S_0, depth l one node per distinct l-prefix of the catalogue.  With the default 256-way levels
that is 1 KiB per distinct (c0, c1) prefix (at most 65,536 of them: <= 64 MiB) plus 1 KiB per
distinct (c0, c1, c2) prefix (at most one per item): measured 24.4 MB for 12,099 items with random
codes (11,024 + 12,099 nodes), ~1 KiB per item at scale: 10M items ~ 10 GB.  That is the limit of
the dense design: beyond ~10^7 distinct prefixes (or with much larger codebooks) a sparse/CSR trie
is needed.  The tables grow by doubling (amortised O(1) per added node) and freed node rows are reused
through a per-depth free list, so add/remove churn does not grow memory.

Mutation (cold start) is in place and touches only the path of the items added or removed: no
other item's node ids or entries change, so results for other items are unaffected.  Every
mutation bumps ``version`` so cached device copies (``tables(device)``) know to refresh.
"""
from __future__ import annotations

from typing import Sequence

import torch


class Trie:
    """Dense trie over semantic IDs (``len(level_sizes)`` codes each) mapping each ID to an item row.

    Attributes:
        level_sizes: tuple[int, ...] (L,) codes per level.
        version: int, incremented by every successful ``add``/``remove``.
    """

    def __init__(self, level_sizes: Sequence[int]):
        sizes = tuple(int(s) for s in level_sizes)
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"level_sizes must be a non-empty sequence of positive ints, got {level_sizes}")
        if any(s > 2 ** 31 - 1 for s in sizes):
            raise ValueError("level sizes must fit in int32")
        self.level_sizes = sizes
        self.version = 0
        L = len(sizes)
        # _buf[l]: int32 (capacity_l, S_l); rows >= _n[l] are unused (all -1).
        self._buf = [torch.full((1, sizes[l]), -1, dtype=torch.int32) for l in range(L)]
        # Node counts per depth 0..L-1 (high-water marks; freed rows stay in range, all -1).
        self._n = [1] + [0] * (L - 1)
        # Free node ids per depth 1..L-1 (depth 0 is the root and never freed).
        self._free = [torch.zeros(0, dtype=torch.int64) for _ in range(L)]
        # Live children per node, to prune nodes that become empty: int32 (capacity_l,).
        self._nchild = [torch.zeros(1, dtype=torch.int32) for _ in range(L)]
        # Row -> its codes, to remove by row; -1 = absent. int64 (capacity_rows, L).
        self._row_codes = torch.full((0, L), -1, dtype=torch.int64)
        self._num_items = 0
        self._cache: dict = {}

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes, rows=None, *, level_sizes: Sequence[int] | None = None) -> "Trie":
        """codes: int64 (N, L) semantic IDs; rows: int64 (N,) item rows (default 0..N-1);
        level_sizes: (L,) codes per level (default: max code + 1 per level)."""
        codes = _as_codes(codes, None)
        if level_sizes is None:
            if codes.shape[0] == 0:
                raise ValueError("level_sizes is required when codes is empty")
            level_sizes = [int(x) + 1 for x in codes.max(0).values]
        trie = cls(level_sizes)
        if rows is None:
            rows = torch.arange(codes.shape[0], dtype=torch.int64)
        trie.add(rows, codes)
        return trie

    @classmethod
    def from_id_table(cls, id_table) -> "Trie":
        """Trie of every item of an IdTable (helper D's ``tiger_fast.ids.IdTable``): row i = the
        table's i-th item (item_ids[i]), level sizes from ``id_table.layout.level_sizes``."""
        layout = getattr(id_table, "layout", None)
        codes = getattr(id_table, "codes", None)
        if layout is None or codes is None:
            raise TypeError("id_table must be a tiger_fast.ids.IdTable (with .layout and .codes)")
        codes = torch.as_tensor(codes)
        return cls.from_codes(codes, torch.arange(codes.shape[0], dtype=torch.int64),
                              level_sizes=layout.level_sizes)

    # ---- views ----------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def children(self) -> list[torch.Tensor]:
        """children[l]: int32 (n_nodes_l, S_l) views of the tables (see the module docstring).
        Views: valid until the next add/remove."""
        return [self._buf[l][: self._n[l]] for l in range(self.num_levels)]

    def tables(self, device=None) -> list[torch.Tensor]:
        """``children`` as contiguous int32 tensors on ``device``, cached per (device, version)."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        key = (str(dev), self.version)
        hit = self._cache.get(str(dev))
        if hit is not None and hit[0] == key:
            return hit[1]
        t = [c.contiguous().to(dev) for c in self.children]
        self._cache[str(dev)] = (key, t)
        return t

    def __len__(self) -> int:
        """Number of items (full IDs) in the trie."""
        return self._num_items

    def max_row(self) -> int:
        """Largest item row in the trie, -1 when empty."""
        present = (self._row_codes[:, 0] >= 0).nonzero()
        return int(present[-1, 0]) if present.numel() else -1

    def num_nodes(self) -> list[int]:
        """Live nodes per depth 0..L-1 (excluding freed rows)."""
        return [self._n[l] - len(self._free[l]) for l in range(self.num_levels)]

    def memory_bytes(self) -> int:
        """Bytes held by the tables (allocated capacity, incl. the row->codes map)."""
        total = sum(b.numel() * b.element_size() for b in self._buf)
        total += sum(b.numel() * b.element_size() for b in self._nchild)
        return total + self._row_codes.numel() * 8

    # ---- queries --------------------------------------------------------------------------------
    def valid_mask(self, level: int, nodes) -> torch.Tensor:
        """nodes: int64 (...) node ids at depth ``level`` (-1 = no node) -> bool (..., S_level):
        which codes continue to a valid prefix."""
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must be in [0, {self.num_levels}), got {level}")
        nodes = torch.as_tensor(nodes, dtype=torch.int64)
        table = self.children[level]
        if nodes.numel() and (bool((nodes >= table.shape[0]).any()) or bool((nodes < -1).any())):
            raise ValueError(f"nodes out of range for depth {level} (0..{table.shape[0] - 1} or -1)")
        rows = table.to(nodes.device)[nodes.clamp(min=0)]
        return (rows >= 0) & (nodes >= 0).unsqueeze(-1)

    def lookup(self, codes) -> torch.Tensor:
        """codes: int64 (M, L) -> int64 (M,) item row of each full ID, -1 when absent (codes out of
        a level's range count as absent)."""
        codes = torch.as_tensor(codes, dtype=torch.int64)
        if codes.dim() != 2 or codes.shape[1] != self.num_levels:
            raise ValueError(f"codes must be int64 (M, {self.num_levels}), got shape {tuple(codes.shape)}")
        node = torch.zeros(codes.shape[0], dtype=torch.int64)
        for l in range(self.num_levels):
            c = codes[:, l]
            ok = (node >= 0) & (c >= 0) & (c < self.level_sizes[l])
            nxt = torch.full_like(node, -1)
            if bool(ok.any()):
                nxt[ok] = self._buf[l][node[ok], c[ok]].long()
            node = nxt
        return node

    def contains(self, codes) -> torch.Tensor:
        """codes: int64 (M, L) -> bool (M,) whether each full ID is in the trie."""
        return self.lookup(codes) >= 0

    def codes_of_rows(self, rows) -> torch.Tensor:
        """rows: int64 (M,) -> int64 (M, L) codes stored for each row (-1 rows if absent)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        out = torch.full((rows.shape[0], self.num_levels), -1, dtype=torch.int64)
        ok = (rows >= 0) & (rows < self._row_codes.shape[0])
        out[ok] = self._row_codes[rows[ok]]
        return out

    # ---- mutation -------------------------------------------------------------------------------
    def add(self, rows, codes) -> None:
        """Insert items in place. rows: int64 (M,) distinct item rows not already present;
        codes: int64 (M, L) distinct semantic IDs not already present, each code in its level's
        range.  All checks run before any change (no partial insert)."""
        codes = _as_codes(codes, self.level_sizes)
        rows = torch.as_tensor(rows)
        if rows.dtype not in (torch.int64, torch.int32) or rows.dim() != 1 or rows.shape[0] != codes.shape[0]:
            raise ValueError(f"rows must be an int64 (M,) tensor with M = {codes.shape[0]}, "
                             f"got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.long()
        M = rows.shape[0]
        if M == 0:
            return
        if bool((rows < 0).any()) or bool((rows > 2 ** 31 - 1).any()):
            raise ValueError("rows must be in [0, 2^31) (stored as int32 in the last level)")
        if torch.unique(rows).numel() != M:
            raise ValueError("rows contains duplicates; each item row can be added once")
        if torch.unique(codes, dim=0).shape[0] != M:
            raise ValueError("codes contains duplicate semantic IDs; each ID must map to one item")
        present = self.codes_of_rows(rows)[:, 0] >= 0
        if bool(present.any()):
            raise ValueError(f"rows already in the trie: {rows[present][:5].tolist()}; remove them first")
        taken = self.lookup(codes) >= 0
        if bool(taken.any()):
            raise ValueError(f"semantic IDs already in the trie: {codes[taken][:3].tolist()}")
        L = self.num_levels
        # Level by level, vectorised: items that reach a missing child create one new node per
        # distinct (parent node, code) pair.
        node = torch.zeros(M, dtype=torch.int64)
        for l in range(L - 1):
            c = codes[:, l]
            child = self._buf[l][node, c].long()
            miss = child < 0
            if bool(miss.any()):
                S = self.level_sizes[l]
                pairs, inv = torch.unique(node[miss] * S + c[miss], return_inverse=True)
                new_ids = self._new_nodes(l + 1, pairs.shape[0])
                pn, pc = pairs // S, pairs % S
                self._buf[l][pn, pc] = new_ids.to(torch.int32)
                self._nchild[l].index_add_(0, pn, torch.ones_like(pn, dtype=torch.int32))
                child[miss] = new_ids[inv]
            node = child
        self._buf[L - 1][node, codes[:, L - 1]] = rows.to(torch.int32)
        self._nchild[L - 1].index_add_(0, node, torch.ones_like(node, dtype=torch.int32))
        need = int(rows.max()) + 1
        if need > self._row_codes.shape[0]:
            cap = max(need, 2 * self._row_codes.shape[0], 16)
            grown = torch.full((cap, L), -1, dtype=torch.int64)
            grown[: self._row_codes.shape[0]] = self._row_codes
            self._row_codes = grown
        self._row_codes[rows] = codes
        self._num_items += M
        self.version += 1

    def remove(self, rows) -> None:
        """Remove items by row, in place; nodes left without children are pruned and their rows
        reused later.  rows: int64 (M,) distinct rows present in the trie (checked first)."""
        rows = torch.as_tensor(rows)
        if rows.dtype not in (torch.int64, torch.int32) or rows.dim() != 1:
            raise ValueError(f"rows must be an int64 (M,) tensor, got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.long()
        if rows.numel() == 0:
            return
        if torch.unique(rows).numel() != rows.numel():
            raise ValueError("rows contains duplicates")
        codes = self.codes_of_rows(rows)
        absent = codes[:, 0] < 0
        if bool(absent.any()):
            raise ValueError(f"rows not in the trie: {rows[absent][:5].tolist()}")
        L = self.num_levels
        M = rows.shape[0]
        path = torch.zeros(M, L, dtype=torch.int64)  # path[:, l] = node at depth l
        for l in range(L - 1):
            path[:, l + 1] = self._buf[l][path[:, l], codes[:, l]].long()
        # Clear the leaf entries, then walk up: a node left with no children is unlinked from its
        # parent and its id goes to the free list (its row is already all -1).
        leaf = path[:, L - 1]
        self._buf[L - 1][leaf, codes[:, L - 1]] = -1
        self._nchild[L - 1].index_add_(0, leaf, torch.full_like(leaf, -1, dtype=torch.int32))
        for l in range(L - 1, 0, -1):
            nodes, first = _unique_first(path[:, l])
            empty = self._nchild[l][nodes] == 0
            if not bool(empty.any()):
                break
            dead, idx = nodes[empty], first[empty]
            parent, code = path[idx, l - 1], codes[idx, l - 1]
            self._buf[l - 1][parent, code] = -1
            self._nchild[l - 1].index_add_(0, parent, torch.full_like(parent, -1, dtype=torch.int32))
            self._free[l] = torch.cat([self._free[l], dead]).sort().values
        self._row_codes[rows] = -1
        self._num_items -= rows.shape[0]
        self.version += 1

    def apply_row_map(self, mapping) -> None:
        """Renumber item rows in place after the IdTable compacted its rows
        (``mapping = id_table.remove_items(ids)``: int64 (N_old,) old row -> new row, -1 = removed).
        Items whose row maps to -1 are removed (pruning as ``remove``); the others keep their
        semantic IDs and node paths, only the leaf entries change.  mapping must cover every row in
        the trie and be injective on the rows that stay."""
        mapping = torch.as_tensor(mapping)
        if mapping.dtype != torch.int64 or mapping.dim() != 1:
            raise ValueError(f"mapping must be an int64 (N_old,) tensor, got {mapping.dtype} {tuple(mapping.shape)}")
        present = (self._row_codes[:, 0] >= 0).nonzero()[:, 0]
        if present.numel() and int(present[-1]) >= mapping.shape[0]:
            raise ValueError(f"mapping has {mapping.shape[0]} entries but the trie holds row {int(present[-1])}")
        new = mapping[present]
        if bool((new < -1).any()):
            raise ValueError("mapping values must be -1 (removed) or a new row >= 0")
        keep = new >= 0
        if torch.unique(new[keep]).numel() != int(keep.sum()):
            raise ValueError("mapping sends two kept rows to the same new row")
        if bool((new[keep] > 2 ** 31 - 1).any()):
            raise ValueError("new rows must be < 2^31")
        if bool((~keep).any()):
            self.remove(present[~keep])
        L = self.num_levels
        old_rows, new_rows = present[keep], new[keep]
        codes = self._row_codes[old_rows]
        node = torch.zeros(old_rows.shape[0], dtype=torch.int64)
        for l in range(L - 1):
            node = self._buf[l][node, codes[:, l]].long()
        self._buf[L - 1][node, codes[:, L - 1]] = new_rows.to(torch.int32)
        cap = max(int(new_rows.max()) + 1 if new_rows.numel() else 0, 16)
        row_codes = torch.full((cap, L), -1, dtype=torch.int64)
        row_codes[new_rows] = codes
        self._row_codes = row_codes
        self.version += 1

    def _new_nodes(self, depth: int, k: int) -> torch.Tensor:
        """Allocate k node ids at ``depth``: the lowest freed ids first (deterministic reuse), then
        fresh rows at the end (capacity doubles). Returns int64 (k,)."""
        free = self._free[depth]
        take = min(k, free.shape[0])
        reused, self._free[depth] = free[:take], free[take:]
        n = self._n[depth]
        fresh = k - take
        if n + fresh > 2 ** 31 - 1:
            raise ValueError(f"trie depth {depth} would exceed 2^31 - 1 nodes (int32 ids)")
        if n + fresh > self._buf[depth].shape[0]:
            cap = max(n + fresh, 2 * self._buf[depth].shape[0], 4)
            grown = torch.full((cap, self.level_sizes[depth]), -1, dtype=torch.int32)
            grown[:n] = self._buf[depth][:n]
            self._buf[depth] = grown
            nc = torch.zeros(cap, dtype=torch.int32)
            nc[:n] = self._nchild[depth][:n]
            self._nchild[depth] = nc
        self._n[depth] = n + fresh
        return torch.cat([reused, torch.arange(n, n + fresh, dtype=torch.int64)])

    def __repr__(self) -> str:
        return (f"Trie(level_sizes={self.level_sizes}, items={len(self)}, nodes={self.num_nodes()}, "
                f"bytes={self.memory_bytes()}, version={self.version})")


def _as_codes(codes, level_sizes) -> torch.Tensor:
    codes = torch.as_tensor(codes)
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or codes.dim() != 2:
        raise ValueError(f"codes must be an integer (N, L) tensor, got {codes.dtype} {tuple(codes.shape)}")
    codes = codes.long()
    if level_sizes is not None:
        if codes.shape[1] != len(level_sizes):
            raise ValueError(f"codes must have {len(level_sizes)} columns (one per level), got {codes.shape[1]}")
        sizes = torch.tensor(level_sizes, dtype=torch.int64)
        if codes.numel() and (bool((codes < 0).any()) or bool((codes >= sizes).any())):
            bad = ((codes < 0) | (codes >= sizes)).any(1).nonzero()[0, 0]
            raise ValueError(f"codes out of range for level sizes {tuple(level_sizes)}: row {int(bad)} = "
                             f"{codes[bad].tolist()}")
    elif codes.numel() and bool((codes < 0).any()):
        raise ValueError("codes must be non-negative")
    return codes


def _unique_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: int64 (M,) -> (unique values (U,), index of one occurrence of each (U,))."""
    vals, inv = torch.unique(x, return_inverse=True)
    first = torch.full((vals.shape[0],), x.shape[0], dtype=torch.int64)
    first.scatter_reduce_(0, inv, torch.arange(x.shape[0]), reduce="amin")
    return vals, first
