import itertools
import json

import numpy as np
import pytest
import torch

from tiger_fast.ids import IdTable, assign_collision_tokens, code_branching, semantic_id_report
from tiger_fast.layout import TokenLayout


def _brute_collisions(codes, ids):
    """Spec written the slow way: for each item, count items with the same prefix and smaller id."""
    out = []
    for i in range(len(ids)):
        same = [j for j in range(len(ids)) if tuple(codes[j]) == tuple(codes[i]) and ids[j] < ids[i]]
        out.append(list(codes[i]) + [len(same)])
    return torch.tensor(out, dtype=torch.long).reshape(len(ids), codes.shape[1] + 1)


@pytest.mark.parametrize("n,L,K", [(1, 3, 4), (7, 3, 2), (97, 2, 3), (200, 3, 5), (31, 1, 3)])
def test_collision_tokens_match_spec_and_ignore_order(n, L, K):
    g = np.random.default_rng(n * 10 + L)
    codes = g.integers(0, K, size=(n, L))
    ids = g.choice(10 * n + 5, size=n, replace=False) - 3 * n  # negatives are fine as ids
    out = assign_collision_tokens(codes, ids, collision_size=n + 1)
    assert out.dtype == torch.int64 and out.shape == (n, L + 1)
    assert torch.equal(out, _brute_collisions(codes, ids))
    perm = g.permutation(n)
    out_p = assign_collision_tokens(torch.from_numpy(codes[perm]), torch.from_numpy(ids[perm]), n + 1)
    assert torch.equal(out_p, out[perm])
    # every full ID unique
    assert torch.unique(out, dim=0).shape[0] == n


def test_collision_overflow_names_prefix_and_size():
    codes = np.array([[1, 2, 3]] * 4 + [[0, 0, 0]] * 2)
    ids = np.arange(6)
    assign_collision_tokens(codes, ids, 4)  # exactly fits
    with pytest.raises(ValueError, match=r"prefix \(1, 2, 3\) is shared by 5 items"):
        assign_collision_tokens(np.vstack([codes, [[1, 2, 3]]]), np.arange(7), 4)


def test_collision_bad_inputs():
    with pytest.raises(ValueError, match="duplicate item ids"):
        assign_collision_tokens(np.zeros((3, 2), int), np.array([1, 2, 1]), 8)
    with pytest.raises(ValueError, match="aligned"):
        assign_collision_tokens(np.zeros((3, 2), int), np.array([1, 2]), 8)
    with pytest.raises(TypeError, match="codes must be an integer"):
        assign_collision_tokens(torch.zeros(3, 2), torch.arange(3), 8)
    with pytest.raises(ValueError, match="codes must have shape"):
        assign_collision_tokens(np.zeros(3, int), np.arange(3), 8)
    with pytest.raises(ValueError, match=">= 0"):
        assign_collision_tokens(np.array([[0, -1]]), np.arange(1), 8)
    with pytest.raises(ValueError, match="collision_size"):
        assign_collision_tokens(np.zeros((1, 2), int), np.arange(1), 0)
    empty = assign_collision_tokens(np.zeros((0, 3), int), np.zeros(0, int), 4)
    assert empty.shape == (0, 4)


def _small_table(n=60, seed=0):
    layout = TokenLayout(codebook_sizes=(3, 5, 2), collision_size=16, num_user_tokens=10)
    g = np.random.default_rng(seed)
    rq = g.integers(0, [3, 5, 2], size=(n, 3))
    ids = g.choice(1000, size=n, replace=False)
    return layout, ids, rq, IdTable.from_rq_codes(layout, ids, rq)


def test_idtable_lookups():
    layout, ids, rq, t = _small_table()
    assert len(t) == 60
    q = ids[[5, 0, 59, 5]]
    codes = t.codes_of(q)
    assert torch.equal(codes[:, :3], torch.from_numpy(rq[[5, 0, 59, 5]]))
    assert torch.equal(t.tokens_of(q), layout.codes_to_tokens(codes))
    assert torch.equal(t.items_of_codes(codes), torch.from_numpy(q))
    assert torch.equal(t.rows_of(q), torch.tensor([5, 0, 59, 5]))
    # unknown / out-of-range IDs -> -1, not an error (an unconstrained decoder can produce them)
    bad = torch.tensor([[2, 4, 1, 15], [3, 0, 0, 0], [-1, 0, 0, 0]])
    known = t.rows_of_codes(bad)
    assert known[1:].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="not in the IdTable"):
        t.codes_of([12345])
    # prefixes: compare with a brute-force scan, in ID order
    all_codes = t.codes.numpy()
    for pre in [(), (1,), (2, 3), (0, 4, 1), tuple(all_codes[7])]:
        got = t.items_with_prefix(list(pre)).numpy()
        mask = (all_codes[:, : len(pre)] == np.array(pre, dtype=np.int64)).all(axis=1)
        rows = np.flatnonzero(mask)
        rows = rows[np.lexsort(all_codes[rows].T[::-1])]
        assert got.tolist() == ids[rows].tolist()
    assert t.items_with_prefix([9]).numel() == 0
    with pytest.raises(ValueError, match="prefix has 5 codes"):
        t.items_with_prefix([0, 0, 0, 0, 0])


def test_idtable_rejects_bad_tables():
    layout = TokenLayout(codebook_sizes=(4, 4), collision_size=2)
    with pytest.raises(ValueError, match="same semantic ID"):
        IdTable(layout, [1, 2], [[0, 1, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="outside level 2"):
        IdTable(layout, [1], [[0, 1, 2]])
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        IdTable(layout, [1], [[0, 1]])
    with pytest.raises(ValueError, match="duplicate"):
        IdTable(layout, [1, 1], [[0, 1, 0], [0, 1, 1]])
    with pytest.raises(TypeError, match="TokenLayout"):
        IdTable({"codebook_sizes": (4, 4)}, [1], [[0, 1, 0]])
    with pytest.raises(ValueError, match="collision"):
        IdTable.from_rq_codes(layout, [1, 2, 3], [[0, 0]] * 3)


def test_add_items_continues_collisions_deterministically():
    layout, ids, rq, t = _small_table()
    before = t.codes.clone()
    new_ids = np.array([5000, 4000, 4500, 6000])
    new_rq = np.vstack([rq[3], rq[3], [2, 2, 1], rq[3]])
    # expected: continue after the largest existing collision code of rq[3]'s group, by item id
    grp = (t.codes.numpy()[:, :3] == rq[3]).all(axis=1)
    nxt = int(t.codes.numpy()[grp, 3].max()) + 1
    t2 = IdTable(layout, t.item_ids.clone(), t.codes.clone())
    rows, full = t.add_items(new_ids, new_rq)
    assert rows.tolist() == [60, 61, 62, 63]
    assert full[[1, 0, 3], 3].tolist() == [nxt, nxt + 1, nxt + 2]  # 4000 < 5000 < 6000
    assert torch.equal(t.codes[:60], before)  # existing IDs unchanged
    # input order does not matter
    perm = [2, 3, 0, 1]
    _, full_p = t2.add_items(new_ids[perm], new_rq[perm])
    assert torch.equal(full_p, full[perm])
    assert torch.equal(t.codes_of(new_ids), full)
    # errors leave the table unchanged
    n = len(t)
    with pytest.raises(ValueError, match="already in the IdTable"):
        t.add_items([4000], [[0, 0, 0]])
    with pytest.raises(ValueError, match="outside level 1"):
        t.add_items([9999], [[0, 5, 0]])
    with pytest.raises(ValueError, match="collision_size"):
        t.add_items(np.arange(10000, 10017), np.zeros((17, 3), int))
    with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
        t.add_items([9999], [[0, 0, 0, 0]])
    assert len(t) == n


def test_remove_items_then_add():
    layout, ids, rq, t = _small_table()
    victim = ids[[3, 10]]
    keep_codes = t.codes_of(ids[[0, 59]]).clone()
    m = t.remove_items(victim)
    assert len(t) == 58 and m.shape == (60,)
    assert m[3] == -1 and m[10] == -1 and m[59] == 57 and m[0] == 0
    assert torch.equal(t.codes_of(ids[[0, 59]]), keep_codes)
    assert not t.contains(victim).any()
    with pytest.raises(ValueError, match="not in the IdTable"):
        t.remove_items(victim)
    t.add_items(victim, rq[[3, 10]])
    assert len(t) == 60


def test_report():
    layout = TokenLayout(codebook_sizes=(4, 4), collision_size=4)
    t = IdTable.from_rq_codes(layout, [10, 11, 12, 13, 14], [[0, 0], [0, 0], [0, 0], [1, 2], [3, 2]])
    r = t.report()
    assert r["num_items"] == 5 and r["unique_prefixes"] == 3 and r["colliding_items"] == 3
    assert r["max_group_size"] == 3 and r["collision_histogram"] == {1: 2, 3: 1}
    assert r["codebook_usage"] == [0.75, 0.5] and r["collision_usage"] == 0.75
    json.dumps(r)  # serialisable for the CLI
    assert IdTable(layout, np.zeros(0, int), np.zeros((0, 3), int)).report()["num_items"] == 0


def test_parquet_roundtrip_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout, ids, rq, t = _small_table()
    p = tmp_path / "ids.parquet"
    t.to_parquet(p)
    assert [f.name for f in tmp_path.iterdir()] == ["ids.parquet"]  # no temp file left
    u = IdTable.from_parquet(p)
    assert u.layout == layout and torch.equal(u.item_ids, t.item_ids) and torch.equal(u.codes, t.codes)
    IdTable.from_parquet(p, layout=layout)
    with pytest.raises(ValueError, match="mismatch"):
        IdTable.from_parquet(p, layout=TokenLayout())
    tab = pq.read_table(p)
    pq.write_table(tab.drop(["c2"]), tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['c2'\]"):
        IdTable.from_parquet(tmp_path / "missing.parquet")
    pq.write_table(pa.table({"item_id": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="no tiger_fast layout metadata"):
        IdTable.from_parquet(tmp_path / "plain.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="cannot read"):
        IdTable.from_parquet(tmp_path / "junk.parquet")
    with pytest.raises(FileNotFoundError):
        IdTable.from_parquet(tmp_path / "nope.parquet")


def test_semantic_id_report_exact_counts():
    layout = TokenLayout(codebook_sizes=(4, 4), collision_size=4)
    t = IdTable.from_rq_codes(layout, np.arange(6), [[0, 0], [0, 0], [0, 1], [1, 1], [1, 1], [2, 0]])
    cats = ["a", "a", "b", "b", "c", ""]  # "" = unknown, left out
    r = semantic_id_report(t, cats)
    assert r["items_with_category"] == 5 and r["num_categories"] == 3
    # all pairs of the 5 known items: 10; same category: (0,1), (2,3) -> 0.2
    assert r["random_pairs"] == pytest.approx(0.2)
    # sharing c0: {0,1,2}: 3 pairs, 1 same; {3,4}: 1 pair, 0 same -> 1/4
    assert r["share_prefix"][1] == pytest.approx(0.25) and r["pairs_sharing_prefix"][1] == 4
    # sharing (c0, c1): {0,1}: same; {3,4}: differ -> 1/2
    assert r["share_prefix"][2] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one category per row"):
        semantic_id_report(t, cats[:-1])


@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "numpy"])
def test_code_branching_counts_choices_per_level(as_tensor):
    # prefixes: level 0 one empty prefix -> codes {0, 1}; level 1: (0,) -> {0, 2}, (1,) -> {5};
    # level 2: (0,0) -> {1}, (0,2) -> {1, 3}, (1,5) -> {0} (a duplicate row changes nothing)
    codes = np.array([[0, 0, 1], [0, 2, 1], [0, 2, 3], [1, 5, 0], [1, 5, 0]])
    got = code_branching(torch.from_numpy(codes) if as_tensor else codes)
    assert got == [
        {"level": 0, "prefixes": 1, "mean_choices": 2.0, "share_single_choice": 0.0},
        {"level": 1, "prefixes": 2, "mean_choices": 1.5, "share_single_choice": 0.5},
        {"level": 2, "prefixes": 3, "mean_choices": 4 / 3, "share_single_choice": 2 / 3},
    ]
    assert code_branching(np.zeros((0, 3), dtype=np.int64)) == []


@pytest.mark.parametrize("n", [1, 7, 20, 23], ids=lambda n: f"rows{n}")
def test_id_row_group_writer_bytes_independent_of_chunking(tmp_path, monkeypatch, n):
    import pyarrow.parquet as pq

    import tiger_fast.ids as ids_mod
    from tiger_fast.ids import IdRowGroupWriter, id_file_schema

    monkeypatch.setattr(ids_mod, "ID_ROW_GROUP", 7)  # small groups: several boundaries in a few rows
    layout = TokenLayout(codebook_sizes=(4, 4), collision_size=3)
    rng = np.random.default_rng(n)
    ids = np.array(list(itertools.product(range(4), range(4), range(3))))[rng.permutation(48)[:n]]  # distinct
    rows = np.concatenate([np.arange(n)[:, None] * 11, ids], axis=1).astype(np.int64)
    cuts = {"whole": [n], "ones": [1] * n, "odd": [3, 5, 2, 11, 1, 9]}
    files = {}
    for name, sizes in cuts.items():
        path = tmp_path / f"{name}.parquet"
        with pq.ParquetWriter(path, id_file_schema(layout)) as w:
            out, k = IdRowGroupWriter(w, layout), 0
            for s in sizes:
                if k < n:
                    out.add(rows[k: k + s])
                    k += s
            out.add(rows[k:k])  # an empty piece changes nothing
            out.close()
        files[name] = path.read_bytes()
        md = pq.ParquetFile(path).metadata
        assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == \
            [7] * (n // 7) + ([n % 7] if n % 7 else [])
    assert files["whole"] == files["ones"] == files["odd"]
    table = IdTable.from_parquet(tmp_path / "whole.parquet")
    assert table.layout == layout and np.array_equal(table.item_ids.numpy(), rows[:, 0])
    assert np.array_equal(table.codes.numpy(), rows[:, 1:])
