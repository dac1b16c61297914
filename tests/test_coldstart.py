"""tiger_fast.coldstart: the TIGER §4.3 protocol on small synthetic setups."""
import math

import numpy as np
import pytest
import torch

from tiger_fast import coldstart as C
from tiger_fast.data import Dataset
from tiger_fast.synthetic import synthetic_dataset
from tiger_fast.ids import IdTable
from tiger_fast.layout import TokenLayout
from tiger_fast.sequences import leave_one_out
from tiger_fast.t5 import T5, T5Config
from tiger_fast.trie import Trie

LAYOUT = TokenLayout(codebook_sizes=(3, 4, 3), collision_size=5, num_user_tokens=5)


def tiny_t5(layout, seed=0):
    cfg = T5Config(vocab_size=layout.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                   num_encoder_layers=1, num_decoder_layers=1, dropout=0.0)
    return T5(cfg, seed=seed).eval()


# ---- split ------------------------------------------------------------------------------------


def test_split_cold_items_protocol():
    ds = synthetic_dataset(num_items=80, num_users=60, seed=2, min_len=2, max_len=9)
    sp = C.split_cold_items(ds, fraction=0.2, seed=4)
    test = leave_one_out(ds).test
    pool = np.unique([ds.sequences[u][e] for u, e in zip(test.user_index, test.end)])
    assert sp.cold_items.size == round(0.2 * pool.size) and np.isin(sp.cold_items, pool).all()
    assert np.array_equal(np.sort(np.concatenate([sp.cold_items, sp.warm_items])), np.arange(80))
    cold = set(sp.cold_items.tolist())
    for u, (old, new) in enumerate(zip(ds.sequences, sp.dataset.sequences)):
        assert new[-1] == old[-1]  # the test target is kept
        assert not cold & set(new[:-1].tolist())  # no cold item anywhere else
        assert new[:-1].tolist() == [i for i in old[:-1].tolist() if i not in cold]  # order kept
    new_test = leave_one_out(sp.dataset).test
    tgt = {int(u): int(sp.dataset.sequences[u][e]) for u, e in zip(new_test.user_index, new_test.end)}
    assert sp.cold_test_users.size > 0
    assert all(tgt[int(u)] in cold for u in sp.cold_test_users)
    assert all(tgt[int(u)] not in cold for u in sp.warm_test_users)
    assert sp.cold_test_users.size + sp.warm_test_users.size == len(new_test)
    # the training split never sees a cold item
    tr = leave_one_out(sp.dataset).train
    seen = {int(sp.dataset.sequences[u][e]) for u, e in zip(tr.user_index, tr.end)}
    assert not seen & cold
    # seeded
    assert np.array_equal(C.split_cold_items(ds, 0.2, seed=4).cold_items, sp.cold_items)
    assert not np.array_equal(C.split_cold_items(ds, 0.2, seed=5).cold_items, sp.cold_items)
    allp = C.split_cold_items(ds, 0.1, seed=0, pool="all")
    assert allp.cold_items.size == 8


def test_split_filters_timestamps_and_rejects_bad_input():
    items = [{"categories": ["a"]}] * 4
    ds = Dataset(name="t", item_ids=np.arange(4), items=items, user_ids=np.arange(3),
                 sequences=[np.array([0, 1, 2]), np.array([1, 3, 0]), np.array([2, 3, 1])],
                 timestamps=[np.array([1, 2, 3]), np.array([4, 5, 6]), np.array([7, 8, 9])])
    sp = C.split_cold_items(ds, fraction=0.4, seed=0)  # pool {2, 0, 1} -> 1 cold item
    assert sp.cold_items.size == 1
    c = int(sp.cold_items[0])
    for s, t, (os_, ot) in zip(sp.dataset.sequences, sp.dataset.timestamps, zip(ds.sequences, ds.timestamps)):
        keep = [i for i in range(len(os_)) if os_[i] != c or i == len(os_) - 1]
        assert s.tolist() == os_[keep].tolist() and t.tolist() == ot[keep].tolist()
    for bad in (0.0, 1.0, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="fraction"):
            C.split_cold_items(ds, fraction=bad)
    with pytest.raises(ValueError, match="pool"):
        C.split_cold_items(ds, 0.5, pool="items")
    with pytest.raises(ValueError, match="seed"):
        C.split_cold_items(ds, 0.5, seed=-1)


# ---- the epsilon rule ------------------------------------------------------------------------


def test_max_cold_items():
    assert C.max_cold_items(10, 0.1) == 1
    assert C.max_cold_items(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert C.max_cold_items(10, 0.25) == 3
    assert C.max_cold_items(7, 0.0) == 0 and C.max_cold_items(7, 1.0) == 7
    assert C.max_cold_items(5, 0.01) == 1
    with pytest.raises(ValueError, match="epsilon"):
        C.max_cold_items(10, 1.5)


def test_merge_hand_example():
    # generated (warm) IDs, best first; codes (c0, c1, c2, c3)
    gen_ids = torch.tensor([[7, 8, 9, 10]])
    gen_codes = torch.tensor([[[0, 1, 2, 0], [1, 1, 1, 0], [0, 1, 2, 1], [2, 2, 2, 0]]])
    gen_sc = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    cold_ids = torch.tensor([50, 51, 52, 53])
    cold_codes = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 2], [2, 2, 2, 1], [3, 3, 3, 0]])
    r = C.merge_cold_items(gen_ids, gen_codes, gen_sc, cold_ids, cold_codes, k=4, epsilon=0.5)  # cap 2
    # 7 then its prefix group (0,1,2) in collision order: 51 (c3=2), 50 (c3=3); cap reached; then 8.
    assert r.item_ids.tolist() == [[7, 51, 50, 8]]
    assert r.scores.tolist() == [[-1.0, -1.0, -1.0, -2.0]]  # cold items inherit the score
    assert r.is_cold.tolist() == [[False, True, True, False]]
    r1 = C.merge_cold_items(gen_ids, gen_codes, gen_sc, cold_ids, cold_codes, k=4, epsilon=0.25)  # cap 1
    assert r1.item_ids.tolist() == [[7, 51, 8, 9]]
    r0 = C.merge_cold_items(gen_ids, gen_codes, gen_sc, cold_ids, cold_codes, k=4, epsilon=0.0)
    assert torch.equal(r0.item_ids, gen_ids) and torch.equal(r0.scores, gen_sc) and not r0.is_cold.any()
    # k longer than the generated list: all cold matches (within the cap) and padding
    r6 = C.merge_cold_items(gen_ids, gen_codes, gen_sc, cold_ids, cold_codes, k=8, epsilon=1.0)
    assert r6.item_ids.tolist() == [[7, 51, 50, 8, 9, 10, 52, -1]]
    assert r6.scores[0, -1] == float("-inf") and r6.scores[0, 6] == -4.0
    # a cold item that was itself generated comes first in its group and counts toward the cap
    g2 = torch.tensor([[50, 8]])
    c2 = torch.tensor([[[0, 1, 2, 3], [1, 1, 1, 0]]])
    r2 = C.merge_cold_items(g2, c2, gen_sc[:, :2], cold_ids, cold_codes, k=3, epsilon=0.34)  # cap 2
    assert r2.item_ids.tolist() == [[50, 51, 8]] and r2.is_cold.tolist() == [[True, True, False]]
    r3 = C.merge_cold_items(g2, c2, gen_sc[:, :2], cold_ids, cold_codes, k=3, epsilon=0.0)
    assert r3.item_ids.tolist() == [[8, -1, -1]]  # a generated cold item is dropped when the cap is 0


def test_merge_random_properties():
    g = np.random.default_rng(1)
    for trial in range(30):
        R, Kp, L = int(g.integers(1, 5)), int(g.integers(1, 12)), 4
        k = int(g.integers(1, 12))
        eps = float(g.choice([0.0, 0.1, 0.2, 0.5, 1.0]))
        pool = torch.from_numpy(g.integers(0, 2, size=(40, L)))
        ids = torch.randperm(40, generator=torch.Generator().manual_seed(trial))
        warm_ids, cold_ids = ids[:25], ids[25:]
        gen_ids = torch.stack([warm_ids[torch.randperm(25, generator=torch.Generator().manual_seed(trial * 7 + r))[:Kp]]
                               for r in range(R)])
        pad = torch.from_numpy(g.random((R, 1)) < 0.3)  # some padding (rows may become all padding)
        gen_ids[:, Kp - 1:] = torch.where(pad, -1, gen_ids[:, Kp - 1:])
        codes_of = {int(i): pool[j] for j, i in enumerate(ids)}
        gen_codes = torch.stack([torch.stack([codes_of[int(i)] if i >= 0 else torch.full((L,), -1) for i in row])
                                 for row in gen_ids])
        gen_sc = -torch.sort(torch.from_numpy(g.random((R, Kp))).float(), dim=1).values
        cold_codes = torch.stack([codes_of[int(i)] for i in cold_ids])
        r = C.merge_cold_items(gen_ids, gen_codes, gen_sc, cold_ids, cold_codes, k, eps)
        cap = C.max_cold_items(k, eps)
        assert r.item_ids.shape == (R, k)
        for row in range(R):
            out = [int(x) for x in r.item_ids[row] if x >= 0]
            assert len(out) == len(set(out))
            cold_out = [x for x in out if x in set(cold_ids.tolist())]
            assert len(cold_out) <= cap and r.is_cold[row].sum() == len(cold_out)
            warm_gen = [int(x) for x in gen_ids[row] if x >= 0]
            warm_out = [x for x in out if x not in set(cold_ids.tolist())]
            assert warm_out == list(dict.fromkeys(warm_gen))[: len(warm_out)]  # warm order kept
            prefixes = {tuple(codes_of[w][:3].tolist()) for w in warm_gen}
            assert all(tuple(codes_of[c][:3].tolist()) in prefixes for c in cold_out)
            if eps == 0.0:
                assert cold_out == []
            n = len(out)
            assert bool((r.scores[row, 1:n] <= r.scores[row, :max(n - 1, 0)]).all())  # non-increasing


def test_merge_bad_inputs():
    gi, gc, gs = torch.tensor([[1, 2]]), torch.zeros(1, 2, 4, dtype=torch.long), torch.zeros(1, 2)
    ci, cc = torch.tensor([5]), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="gen_codes"):
        C.merge_cold_items(gi, gc[:, :1], gs, ci, cc, 2, 0.5)
    with pytest.raises(ValueError, match="cold_codes"):
        C.merge_cold_items(gi, gc, gs, ci, cc[:, :3], 2, 0.5)
    with pytest.raises(ValueError, match="distinct"):
        C.merge_cold_items(gi, gc, gs, torch.tensor([5, 5]), torch.zeros(2, 4, dtype=torch.long), 2, 0.5)
    with pytest.raises(ValueError, match="epsilon"):
        C.merge_cold_items(gi, gc, gs, ci, cc, 2, -0.1)
    with pytest.raises(ValueError, match="prefix_len"):
        C.merge_cold_items(gi, gc, gs, ci, cc, 2, 0.5, prefix_len=5)
    with pytest.raises(TypeError, match="gen_scores"):
        C.merge_cold_items(gi, gc, torch.zeros(1, 2, dtype=torch.long), ci, cc, 2, 0.5)
    with pytest.raises(TypeError, match="integer"):
        C.merge_cold_items(gi.float(), gc, gs, ci, cc, 2, 0.5)


# ---- Semantic KNN -----------------------------------------------------------------------------


def test_semantic_knn_hand_computed():
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.1], [-1.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    ids, sc = C.semantic_knn_baseline(emb, [0, 1], cold_items=[5, 2, 3, 4], k=3)
    # query 0 = (1,0): cos with 5 -> 1, 3 -> 3/sqrt(9.01), 2 -> 1/sqrt2, 4 -> -1
    assert ids.tolist()[0] == [5, 3, 2]
    assert sc[0, 1].item() == pytest.approx(3 / math.sqrt(9.01), rel=1e-7)  # float32 inputs
    # query 1 = (0,2): 2 -> 1/sqrt2, 3 -> 0.1/sqrt(9.01), 4 and 5 -> 0 (tie: smaller id first)
    assert ids.tolist()[1] == [2, 3, 4]
    ids5, sc5 = C.semantic_knn_baseline(torch.from_numpy(emb), torch.tensor([1]), torch.tensor([4, 5]), k=5)
    assert ids5.tolist() == [[4, 5, -1, -1, -1]] and sc5[0, 2] == float("-inf")


def test_semantic_knn_bad_inputs():
    emb = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="all-zero"):
        C.semantic_knn_baseline(np.vstack([emb, np.zeros((1, 3), np.float32)]), [0], [3], 1)
    with pytest.raises(ValueError, match="query_items"):
        C.semantic_knn_baseline(emb, [3], [1], 1)
    with pytest.raises(ValueError, match="empty"):
        C.semantic_knn_baseline(emb, [0], np.zeros(0, np.int64), 1)
    with pytest.raises(ValueError, match="duplicates"):
        C.semantic_knn_baseline(emb, [0], [1, 1], 1)
    with pytest.raises(ValueError, match="float"):
        C.semantic_knn_baseline(np.eye(3, dtype=np.int64), [0], [1], 1)
    with pytest.raises(ValueError, match="NaN"):
        C.semantic_knn_baseline(np.array([[np.nan, 1.0], [1.0, 0.0]]), [0], [1], 1)


# ---- IDs and retrieval with a model -----------------------------------------------------------


class FixedRQ:
    """Stands in for a trained RQ-VAE: returns preset codes for the embeddings it is given."""

    def __init__(self, codes):
        self.codes = torch.as_tensor(codes)
        self.calls = []

    def semantic_codes(self, x, backend="auto"):
        self.calls.append((tuple(x.shape), x.dtype, backend))
        return self.codes[: x.shape[0]]


def test_assign_cold_ids_extends_table_and_trie():
    table = IdTable.from_rq_codes(LAYOUT, [10, 11, 12], [[0, 1, 2], [0, 1, 2], [2, 3, 0]])
    trie = Trie.from_id_table(table)
    rq = FixedRQ([[0, 1, 2], [1, 1, 1]])
    rows, codes = C.assign_cold_ids(rq, np.ones((2, 6), np.float64), [20, 21], table, trie=trie, backend="cpu")
    assert rq.calls == [((2, 6), torch.float32, "cpu")]
    assert rows.tolist() == [3, 4] and codes.tolist() == [[0, 1, 2, 2], [1, 1, 1, 0]]
    assert len(table) == 5 and len(trie) == 5
    assert trie.lookup(torch.tensor([[0, 1, 2, 2]])).tolist() == [3]
    with pytest.raises(ValueError, match="aligned"):
        C.assign_cold_ids(rq, np.ones((3, 6)), [30, 31], table)
    with pytest.raises(ValueError, match="NaN"):
        C.assign_cold_ids(rq, np.full((2, 6), np.nan), [30, 31], table)


@pytest.fixture(scope="module")
def cold_setup():
    ds = synthetic_dataset(num_items=45, num_users=23, seed=7, min_len=3, max_len=7)
    sp = C.split_cold_items(ds, fraction=0.25, seed=1)
    g = np.random.default_rng(3)
    rq = g.integers(0, [3, 4, 3], size=(45, 3))
    # Warm table first (what training would have), then cold IDs appended "from the RQ-VAE".
    table = IdTable.from_rq_codes(LAYOUT, ds.item_ids[sp.warm_items], rq[sp.warm_items])
    C.assign_cold_ids(FixedRQ(rq[sp.cold_items]), np.ones((sp.cold_items.size, 2), np.float32),
                      ds.item_ids[sp.cold_items], table)
    return ds, sp, table, tiny_t5(LAYOUT, seed=2)


def test_cold_start_retrieve(cold_setup):
    from tiger_fast.generate import generate

    ds, sp, table, model = cold_setup
    hist = [ds.item_ids[sp.dataset.sequences[u][:-1]] for u in sp.cold_test_users[:5]]
    users = [int(u) for u in sp.cold_test_users[:5]]
    cold_ids = ds.item_ids[sp.cold_items]
    # epsilon = 0: exactly generate over the warm items
    warm_rows = torch.from_numpy(np.flatnonzero(~np.isin(table.item_ids.numpy(), cold_ids)))
    warm_trie = Trie.from_codes(table.codes[warm_rows], warm_rows, level_sizes=LAYOUT.level_sizes)
    g = generate(model, hist, table, user_ids=users, k=6, trie=warm_trie, backend="reference")
    r0 = C.cold_start_retrieve(model, hist, table, cold_ids, user_ids=users, k=6, epsilon=0.0, backend="reference",
                               decode_over="warm")
    assert torch.equal(r0.item_ids, g.item_ids) and torch.equal(r0.scores, g.scores)
    assert not np.isin(g.item_ids.numpy(), cold_ids).any()
    # epsilon = 0.5: cold items sharing a generated prefix come in, at most 3 per list
    r = C.cold_start_retrieve(model, hist, table, cold_ids, user_ids=users, k=6, epsilon=0.5, backend="reference",
                              decode_over="warm")
    want = C.merge_cold_items(g.item_ids, g.codes, g.scores, torch.from_numpy(cold_ids),
                              table.codes_of(cold_ids), 6, 0.5)
    assert torch.equal(r.item_ids, want.item_ids) and torch.equal(r.is_cold, want.is_cold)
    assert torch.equal(r.rows[r.rows >= 0], table.rows_of(r.item_ids[r.rows >= 0]))
    assert int(r.is_cold.sum(1).max()) <= 3
    assert torch.equal(r.is_cold, torch.from_numpy(np.isin(r.item_ids.numpy(), cold_ids)))
    # a cold item whose first three codes equal the top generated ID's is returned right after it
    top_prefix = g.codes[0, 0, :3]
    has = [c for c in cold_ids if torch.equal(table.codes_of([c])[0, :3], top_prefix)]
    if not has:  # make one: add a new cold item with that prefix
        table2 = IdTable(LAYOUT, table.item_ids.clone(), table.codes.clone())
        table2.add_items([999], top_prefix[None])
        r2 = C.cold_start_retrieve(model, hist, table2, np.append(cold_ids, 999), user_ids=users, k=6,
                                   epsilon=0.2, backend="reference", decode_over="warm")
        assert r2.item_ids[0, :2].tolist() == [int(g.item_ids[0, 0]), 999]
        assert r2.scores[0, 1] == g.scores[0, 0]
    else:
        assert r.item_ids[0, 1] == min(has, key=lambda c: int(table.codes_of([c])[0, 3]))
    with pytest.raises(ValueError, match="not in the IdTable"):
        C.cold_start_retrieve(model, hist, table, [12345], user_ids=users, k=6, backend="reference")


def test_cold_start_retrieve_over_all_items(cold_setup):
    """decode_over="all" (the default): beam search over the trie of warm + cold items (2k
    candidates), then the same ε merge; generated cold items beyond the cap are dropped."""
    from tiger_fast.generate import generate

    ds, sp, table, model = cold_setup
    users = [int(u) for u in sp.cold_test_users[:7]]
    hist = [ds.item_ids[sp.dataset.sequences[u][:-1]] for u in users]
    cold_ids = ds.item_ids[sp.cold_items]
    g = generate(model, hist, table, user_ids=users, k=12, backend="reference")  # full table trie
    assert np.isin(g.item_ids.numpy(), cold_ids).any()  # the model does generate cold IDs here
    for eps, cap in ((0.0, 0), (0.2, 2), (0.5, 3), (1.0, 6)):
        r = C.cold_start_retrieve(model, hist, table, cold_ids, user_ids=users, k=6, epsilon=eps,
                                  backend="reference")
        want = C.merge_cold_items(g.rows, g.codes, g.scores, table.rows_of(cold_ids), table.codes_of(cold_ids), 6, eps)
        assert torch.equal(r.rows, want.item_ids) and torch.equal(r.is_cold, want.is_cold)
        assert int(r.is_cold.sum(1).max()) <= cap
        if eps == 0.0:  # no cold item: the warm items of the 12 generated, in order
            for i in range(len(users)):
                warm = [x for x in g.item_ids[i].tolist() if x not in set(cold_ids.tolist())][:6]
                assert r.item_ids[i].tolist() == warm
    with pytest.raises(ValueError, match="decode_over"):
        C.cold_start_retrieve(model, hist, table, cold_ids, user_ids=users, k=6, decode_over="cold")


def test_evaluate_cold_start(cold_setup):
    ds, sp, table, model = cold_setup
    emb = np.random.default_rng(0).normal(size=(45, 8)).astype(np.float32)
    out = C.evaluate_cold_start(model, sp, table, emb, ks=(1, 5), epsilon=0.4, backend="reference")
    assert out["num_examples"] == sp.cold_test_users.size and out["max_cold_per_list"] == 2
    assert 0.0 <= out["mean_cold_per_list"] <= 2.0
    for name in ("tiger", "semantic_knn"):
        assert set(out[name]) == {"recall@1", "ndcg@1", "recall@5", "ndcg@5"}
        assert 0.0 <= out[name]["recall@1"] <= out[name]["recall@5"] <= 1.0
    # KNN by hand
    hits = []
    for u in sp.cold_test_users:
        s = sp.dataset.sequences[u]
        q = emb[s[-2]] / np.linalg.norm(emb[s[-2]])
        ce = emb[sp.cold_items] / np.linalg.norm(emb[sp.cold_items], axis=1, keepdims=True)
        top = sp.cold_items[np.argsort(-(ce @ q), kind="stable")[:5]]
        hits.append(s[-1] in top)
    assert out["semantic_knn"]["recall@5"] == pytest.approx(np.mean(hits), abs=1e-12)
