"""Trie over semantic IDs: dense tables, in-place add/remove, validity masks, bad input."""
import itertools

import pytest
import torch

from tiger_fast.layout import TokenLayout
from tiger_fast.trie import Trie

SIZES = (3, 4, 5, 3)


def unique_codes(n, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, s, (4 * n,), generator=g) for s in sizes], 1)
    codes = torch.unique(codes, dim=0)
    return codes[torch.randperm(codes.shape[0], generator=g)][:n]


def walk_all(trie):
    """Every (codes, row) reachable in the trie, by a plain traversal of the tables."""
    out = {}
    L = trie.num_levels
    stack = [(0, 0, ())]
    ch = trie.children
    while stack:
        depth, node, prefix = stack.pop()
        for t in range(trie.level_sizes[depth]):
            v = int(ch[depth][node, t])
            if v < 0:
                continue
            if depth == L - 1:
                out[prefix + (t,)] = v
            else:
                stack.append((depth + 1, v, prefix + (t,)))
    return out


def check_consistent(trie, expected: dict):
    """expected: {codes tuple: row}. The tables hold exactly these, and no dead branches."""
    assert walk_all(trie) == expected
    assert len(trie) == len(expected)
    ch = trie.children
    # Every live non-root node has at least one child (pruning) and is referenced exactly once.
    for depth in range(1, trie.num_levels):
        refs = ch[depth - 1][ch[depth - 1] >= 0]
        assert refs.unique().numel() == refs.numel()
        live = set(refs.tolist())
        for n in range(ch[depth].shape[0]):
            assert (n in live) == bool((ch[depth][n] >= 0).any())


def test_tables_layout_and_lookup():
    codes = unique_codes(37)
    rows = torch.arange(100, 137)
    t = Trie.from_codes(codes, rows, level_sizes=SIZES)
    ch = t.children
    assert [c.dtype for c in ch] == [torch.int32] * 4
    assert ch[0].shape == (1, 3) and all(c.shape[1] == s for c, s in zip(ch, SIZES))
    check_consistent(t, {tuple(c): int(r) for c, r in zip(codes.tolist(), rows)})
    assert torch.equal(t.lookup(codes), rows)
    assert t.contains(codes).all()
    missing = [c for c in itertools.product(*map(range, SIZES)) if list(c) not in codes.tolist()][:10]
    assert not t.contains(torch.tensor(missing)).any()
    # out-of-range codes are simply absent
    assert t.lookup(torch.tensor([[3, 0, 0, 0], [-1, 0, 0, 0]])).tolist() == [-1, -1]
    assert torch.equal(t.codes_of_rows(rows), codes)
    assert t.max_row() == 136


def test_valid_mask():
    codes = torch.tensor([[0, 1, 2, 0], [0, 1, 3, 2], [2, 0, 0, 0]])
    t = Trie.from_codes(codes, level_sizes=SIZES)
    m0 = t.valid_mask(0, torch.tensor([0, -1]))
    assert m0.tolist() == [[True, False, True], [False, False, False]]
    n1 = int(t.children[0][0, 0])
    m1 = t.valid_mask(1, torch.tensor([[n1]]))
    assert m1.shape == (1, 1, 4) and m1[0, 0].tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="level"):
        t.valid_mask(4, torch.tensor([0]))
    with pytest.raises(ValueError, match="nodes out of range"):
        t.valid_mask(1, torch.tensor([99]))


def test_from_id_table():
    from tiger_fast.ids import IdTable

    layout = TokenLayout(codebook_sizes=SIZES[:3], collision_size=SIZES[3], num_user_tokens=3)
    codes = unique_codes(20)
    table = IdTable(layout, torch.arange(1000, 1020), codes)
    t = Trie.from_id_table(table)
    assert t.level_sizes == layout.level_sizes
    assert torch.equal(t.lookup(table.codes), torch.arange(20))
    with pytest.raises(TypeError, match="IdTable"):
        Trie.from_id_table(object())


def test_add_remove_in_place_random_churn():
    """Random add/remove rounds against a dict model: tables always equal the model, other items'
    node paths never move, freed node rows are reused (no growth under churn)."""
    allc = unique_codes(180, seed=3)
    g = torch.Generator().manual_seed(7)
    t = Trie(SIZES)
    model = {}
    present = torch.zeros(allc.shape[0], dtype=torch.bool)
    peak_bytes = 0
    for rnd in range(25):
        absent = (~present).nonzero()[:, 0]
        add = absent[torch.randperm(absent.numel(), generator=g)[: int(torch.randint(1, 30, (1,), generator=g))]]
        # Remember every other item's leaf-parent node: mutation must not move them.
        before = {tuple(allc[i].tolist()): _leaf_parent(t, allc[i]) for i in present.nonzero()[:, 0].tolist()}
        v0 = t.version
        t.add(add, allc[add])
        assert t.version == v0 + 1
        present[add] = True
        model.update({tuple(allc[i].tolist()): int(i) for i in add.tolist()})
        for c, n in before.items():
            assert _leaf_parent(t, torch.tensor(c)) == n
        check_consistent(t, model)
        pres = present.nonzero()[:, 0]
        rm = pres[torch.randperm(pres.numel(), generator=g)[: int(torch.randint(1, pres.numel() + 1, (1,), generator=g))]]
        keep = [i for i in pres.tolist() if i not in set(rm.tolist())]
        before = {i: _leaf_parent(t, allc[i]) for i in keep}
        t.remove(rm)
        present[rm] = False
        for i in rm.tolist():
            del model[tuple(allc[i].tolist())]
        for i, n in before.items():
            assert _leaf_parent(t, allc[i]) == n
        check_consistent(t, model)
        peak_bytes = max(peak_bytes, t.memory_bytes())
        if rnd == 5:
            bytes_after_warmup = t.memory_bytes()
    # Node rows are reused: the tables never exceed the nodes of the whole catalogue.
    full = Trie.from_codes(allc, level_sizes=SIZES)
    assert all(t.children[l].shape[0] <= max(1, 2 * full.children[l].shape[0]) for l in range(4))
    assert peak_bytes <= 4 * full.memory_bytes() and bytes_after_warmup <= peak_bytes


def _leaf_parent(t, codes):
    node = 0
    for l in range(t.num_levels - 1):
        node = int(t.children[l][node, int(codes[l])])
    return node


def test_remove_all_then_readd_reuses_rows():
    codes = unique_codes(30)
    t = Trie.from_codes(codes, level_sizes=SIZES)
    shapes = [c.shape[0] for c in t.children]
    t.remove(torch.arange(30))
    assert len(t) == 0 and t.num_nodes() == [1, 0, 0, 0] and t.max_row() == -1
    assert (t.children[0] == -1).all()
    t.add(torch.arange(30), codes)
    assert [c.shape[0] for c in t.children] == shapes  # freed rows reused, nothing appended
    check_consistent(t, {tuple(c): i for i, c in enumerate(codes.tolist())})


def test_empty_and_single():
    t = Trie(SIZES)
    assert len(t) == 0 and t.lookup(torch.zeros(0, 4, dtype=torch.long)).numel() == 0
    t.add(torch.tensor([5]), torch.tensor([[2, 3, 4, 2]]))
    assert walk_all(t) == {(2, 3, 4, 2): 5}
    t.add(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long))  # no-op
    assert t.version == 1
    assert "items=1" in repr(t)


def test_bad_input_no_partial_change():
    codes = unique_codes(10)
    t = Trie.from_codes(codes, level_sizes=SIZES)
    snap = [c.clone() for c in t.children]
    other = unique_codes(40, seed=9)
    new = torch.stack([c for c in other if not t.contains(c[None])[0]][:2])
    cases = [
        ((torch.tensor([10, 10]), new), "duplicates"),
        ((torch.tensor([10, 11]), torch.stack([new[0], new[0]])), "duplicate semantic IDs"),
        ((torch.tensor([3]), new[:1]), "already in the trie"),
        ((torch.tensor([10]), codes[:1]), "already in the trie"),
        ((torch.tensor([10]), torch.tensor([[0, 0, 5, 0]])), "out of range"),
        ((torch.tensor([10]), torch.tensor([[0, 0, 0]])), "columns"),
        ((torch.tensor([-1]), new[:1]), "rows must be in"),
        ((torch.tensor([10.0]), new[:1]), "rows must be an int64"),
        ((torch.tensor([10, 11]), new[:1]), "rows must be an int64"),
    ]
    for (rows, c), msg in cases:
        with pytest.raises(ValueError, match=msg):
            t.add(rows, c)
    for rows, msg in [(torch.tensor([3, 3]), "duplicates"), (torch.tensor([77]), "not in the trie"),
                      (torch.tensor([[1]]), "int64")]:
        with pytest.raises(ValueError, match=msg):
            t.remove(rows)
    assert all(torch.equal(a, b) for a, b in zip(snap, t.children)) and t.version == 1
    with pytest.raises(ValueError, match="level_sizes"):
        Trie(())
    with pytest.raises(ValueError, match="level_sizes is required"):
        Trie.from_codes(torch.zeros(0, 4, dtype=torch.long))


def test_memory_footprint_formula():
    """4 * S_l bytes per node at depth l (plus bookkeeping), as documented."""
    codes = unique_codes(50)
    t = Trie.from_codes(codes, level_sizes=SIZES)
    nodes = t.num_nodes()
    table_bytes = sum(c.numel() * 4 for c in t.children)
    assert table_bytes == sum(4 * s * n for s, n in zip(SIZES, nodes))
    assert t.memory_bytes() >= table_bytes


def test_tables_device_cache_tracks_version():
    codes = unique_codes(12)
    t = Trie.from_codes(codes[:6], level_sizes=SIZES)
    a = t.tables("cpu")
    assert t.tables("cpu") is a
    t.add(torch.arange(6, 12), codes[6:])
    b = t.tables("cpu")
    assert b is not a and torch.equal(b[3], t.children[3])


def test_apply_row_map_follows_id_table_compaction():
    from tiger_fast.ids import IdTable

    layout = TokenLayout(codebook_sizes=SIZES[:3], collision_size=SIZES[3], num_user_tokens=3)
    codes = unique_codes(25, seed=4)
    table = IdTable(layout, torch.arange(500, 525), codes)
    t = Trie.from_id_table(table)
    gone = torch.tensor([503, 510, 524])
    mapping = table.remove_items(gone)  # rows are compacted: old row -> new row (-1 removed)
    t.apply_row_map(mapping)
    check_consistent(t, {tuple(c): i for i, c in enumerate(table.codes.tolist())})
    assert not t.contains(codes[[3, 10, 24]]).any() and len(t) == 22
    # cold start on top: the IdTable appends rows, the trie adds them in place
    used = {tuple(c) for c in table.codes[:, :3].tolist()}
    fresh = torch.tensor([c for c in itertools.product(*map(range, SIZES[:3])) if c not in used][:2])
    rows, full = table.add_items(torch.tensor([900, 901]), fresh)
    t.add(rows, full)
    check_consistent(t, {tuple(c): i for i, c in enumerate(table.codes.tolist())})
    with pytest.raises(ValueError, match="covers|entries"):
        t.apply_row_map(torch.arange(3))
    with pytest.raises(ValueError, match="same new row"):
        t.apply_row_map(torch.zeros(len(table), dtype=torch.long))
