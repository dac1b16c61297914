"""tiger_fast.evaluate: leave-one-out examples, baselines, retriever evaluation, unconstrained decoding."""
import hashlib
import itertools
import math

import numpy as np
import pytest
import torch

from tiger_fast import decoding as D
from tiger_fast import evaluate as E
from tiger_fast import metrics as M
from tiger_fast.data import Dataset
from tiger_fast.synthetic import synthetic_dataset
from tiger_fast.ids import IdTable
from tiger_fast.layout import TokenLayout
from tiger_fast.sequences import leave_one_out
from tiger_fast.t5 import T5, T5Config

LAYOUT = TokenLayout(codebook_sizes=(4, 3, 5), collision_size=6, num_user_tokens=7)


def tiny_t5(layout, seed=0):
    cfg = T5Config(vocab_size=layout.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                   num_encoder_layers=1, num_decoder_layers=1, dropout=0.0)
    return T5(cfg, seed=seed).eval()


@pytest.fixture(scope="module")
def setup():
    ds = synthetic_dataset(num_items=53, num_users=17, seed=3, min_len=2, max_len=7)
    rng = np.random.default_rng(0)
    table = IdTable.from_rq_codes(LAYOUT, ds.item_ids, rng.integers(0, [4, 3, 5], size=(53, 3)))
    return ds, table, tiny_t5(LAYOUT)


def small_dataset(item_ids=None):
    items = [{"categories": ["A", c]} for c in "xxyyz"]
    seqs = [np.array([0, 1, 2, 3]), np.array([1, 1, 4]), np.array([2, 0]), np.array([3, 3, 3, 0, 4])]
    return Dataset(name="t", item_ids=np.arange(5) if item_ids is None else np.asarray(item_ids),
                   items=items, user_ids=np.array([10, 11, 12, 13]), sequences=seqs)


# ---- examples, baselines, metric tables -------------------------------------------------------


def test_eval_examples_follow_leave_one_out():
    ds = small_dataset()
    ex = E.eval_examples(ds, "test")
    assert ex.users.tolist() == [0, 1, 3] and ex.num_users_skipped == 1  # user 2 has 2 items
    assert ex.targets.tolist() == [3, 4, 4]
    assert [h.tolist() for h in ex.histories] == [[0, 1, 2], [1, 1], [3, 3, 3, 0]]
    va = E.eval_examples(ds, "valid")
    assert va.targets.tolist() == [2, 1, 0] and [h.tolist() for h in va.histories] == [[0, 1], [1], [3, 3, 3]]
    loo = leave_one_out(ds).test
    assert ex.users.tolist() == loo.user_index.tolist()
    sub = E.eval_examples(ds, "test", users=[3, 2])
    assert sub.users.tolist() == [3] and sub.num_users_skipped == 1
    with pytest.raises(ValueError, match="split"):
        E.eval_examples(ds, "train")
    with pytest.raises(ValueError, match="user indices"):
        E.eval_examples(ds, "test", users=[4])


def test_popularity_baseline_counts_visible_interactions():
    ds = small_dataset()
    # test: counted = [0,1,2] + [1,1] + [2,0] (user 2: no example -> all) + [3,3,3,0]
    # counts: 0:3, 1:3, 2:2, 3:3, 4:0 -> order by count desc, index asc
    assert E.popularity_baseline(ds, "test").tolist() == [0, 1, 3, 2, 4]
    # valid: [0,1] + [1] + [2,0] + [3,3,3] -> 0:2, 1:2, 2:1, 3:3, 4:0
    assert E.popularity_baseline(ds, "valid", k=3).tolist() == [3, 0, 1]
    with pytest.raises(ValueError, match="k must be"):
        E.popularity_baseline(ds, "test", k=6)
    res = E.evaluate_popularity(ds, "test", ks=(1, 2))
    # targets 3, 4, 4 vs list [0, 1]: no hit; @1 too
    assert res["recall@2"] == 0.0 and res["num_examples"] == 3 and res["coverage@2"] == pytest.approx(0.4)
    assert res["entropy@2"] == 0.0  # items 0 and 1 share category x


def test_evaluate_rankings_matches_metrics():
    pred = torch.tensor([[4, 3, 1], [2, -1, -1]])
    tgt = torch.tensor([3, 0])
    cats = ["x", "x", "y", "y", "z"]
    r = E.evaluate_rankings(pred, tgt, cats, ks=(3, 1))
    assert set(r) == {"num_examples", "recall@1", "ndcg@1", "recall@3", "ndcg@3", "entropy@3", "coverage@3"}
    assert r["recall@3"] == 0.5 and r["recall@1"] == 0.0
    assert r["ndcg@3"] == pytest.approx(0.5 / math.log2(3), rel=1e-15)
    assert r["entropy@3"] == pytest.approx(M.entropy_at_k(pred, cats, 3), rel=0)
    assert r["coverage@3"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="decode at least"):
        E.evaluate_rankings(pred, tgt, cats, ks=(5,))
    with pytest.raises(ValueError, match="ks must"):
        E.evaluate_rankings(pred, tgt, cats, ks=())


def test_resolve_id_space():
    ds = small_dataset(item_ids=[100, 101, 102, 103, 104])
    codes = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [0, 1, 0]])
    ext = IdTable.from_rq_codes(LAYOUT, ds.item_ids, codes)
    inn = IdTable.from_rq_codes(LAYOUT, np.arange(5), codes)
    assert E.resolve_id_space(ds, ext) == "external"
    assert E.resolve_id_space(ds, inn) == "internal"
    assert E.resolve_id_space(ds, ext, "internal") == "internal"
    with pytest.raises(ValueError, match="neither"):
        E.resolve_id_space(ds, IdTable.from_rq_codes(LAYOUT, np.arange(5) + 7, codes))
    amb = small_dataset(item_ids=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="both fit"):
        E.resolve_id_space(amb, IdTable.from_rq_codes(LAYOUT, [1, 2, 3, 4], codes[:4]))
    with pytest.raises(ValueError, match="id_space"):
        E.resolve_id_space(ds, ext, "rows")


# ---- unconstrained beam search ----------------------------------------------------------------


class FakeModel:
    """Deterministic logits = f(encoder input, decoded prefix), with the T5 decoding interface."""

    def __init__(self, vocab):
        self.V = vocab

    def encode(self, ids, mask):
        return torch.where(mask, ids, 0).float()[..., None]

    def init_cache(self, enc, mask):
        return {"ctx": enc[..., 0].long().sum(1), "prefix": torch.zeros(enc.shape[0], 0, dtype=torch.long)}

    @staticmethod
    def reorder_cache(cache, index):
        return {"ctx": cache["ctx"][index], "prefix": cache["prefix"][index]}

    def row_logits(self, ctx, prefix):
        h = hashlib.blake2b(repr((int(ctx), tuple(int(t) for t in prefix))).encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(h, "little") >> 1)
        return 3 * torch.randn(self.V, generator=g)

    def decode_step(self, tokens, cache):
        cache["prefix"] = torch.cat([cache["prefix"], tokens[:, None]], dim=1)
        return torch.stack([self.row_logits(c, p) for c, p in zip(cache["ctx"], cache["prefix"])])


def brute_force(model, ctx, layout, use_eos):
    """Score every possible ID (float32 running sums in the same order) -> sorted codes, scores."""
    allc, alls = [], []
    start = layout.decoder_start_id
    for codes in itertools.product(*[range(s) for s in layout.level_sizes]):
        toks = [layout.level_offset(l) + c for l, c in enumerate(codes)]
        s = torch.zeros((), dtype=torch.float32)
        for l in range(layout.num_levels):
            lp = torch.log_softmax(model.row_logits(ctx, [start] + toks[:l]), dim=-1)
            s = s + lp[toks[l]]
        if use_eos:
            s = s + torch.log_softmax(model.row_logits(ctx, [start] + toks), dim=-1)[layout.eos_id]
        allc.append(codes)
        alls.append(float(s))
    order = sorted(range(len(allc)), key=lambda i: -alls[i])
    return torch.tensor([allc[i] for i in order]), torch.tensor([alls[i] for i in order])


@pytest.mark.parametrize("use_eos", [True, False])
def test_unconstrained_full_width_equals_brute_force(use_eos):
    layout = TokenLayout(codebook_sizes=(3, 2), collision_size=2, num_user_tokens=3)  # 12 IDs
    model = FakeModel(layout.vocab_size)
    ids = torch.tensor([[1, 5, 7], [2, 3, 0], [9, 9, 9]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    codes, scores = E.unconstrained_beam_search(model, ids, mask, layout, num_beams=50, use_eos=use_eos)
    assert codes.shape == (3, 12, 3) and scores.shape == (3, 12) and scores.dtype == torch.float32
    ctx = torch.where(mask, ids, 0).sum(1)
    for r in range(3):
        bc, bs = brute_force(model, ctx[r], layout, use_eos)
        assert torch.equal(codes[r], bc)
        # same float32 additions; tolerance only for log_softmax vectorisation differences
        torch.testing.assert_close(scores[r], bs, rtol=1e-6, atol=1e-6)


def test_unconstrained_narrow_beam_matches_python_reference():
    layout = TokenLayout(codebook_sizes=(5, 3, 4), collision_size=3, num_user_tokens=2)
    model = FakeModel(layout.vocab_size)
    ids = torch.tensor([[4, 8], [6, 1]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    B = 3
    codes, scores = E.unconstrained_beam_search(model, ids, mask, layout, num_beams=B)
    for r, ctx in enumerate(ids.sum(1)):
        beams = [((), torch.zeros((), dtype=torch.float32))]
        for l in range(layout.num_levels):
            cand = []
            for bi, (c, s) in enumerate(beams):
                toks = [layout.level_offset(j) + x for j, x in enumerate(c)]
                lp = torch.log_softmax(model.row_logits(ctx, [0] + toks), dim=-1)
                for t in range(layout.level_sizes[l]):
                    ns = s + lp[layout.level_offset(l) + t]
                    cand.append((-ns.item(), bi, t, c + (t,), ns))
            cand.sort(key=lambda x: (x[0], x[1], x[2]))
            beams = [(x[3], x[4]) for x in cand[:B]]
        fin = []
        for bi, (c, s) in enumerate(beams):
            toks = [layout.level_offset(j) + x for j, x in enumerate(c)]
            fin.append((-(s + torch.log_softmax(model.row_logits(ctx, [0] + toks), -1)[1]).item(), bi, c))
        fin.sort()
        assert codes[r].tolist() == [list(x[2]) for x in fin]
        torch.testing.assert_close(scores[r], torch.tensor([-x[0] for x in fin]), rtol=1e-6, atol=1e-6)


def test_unconstrained_bad_inputs():
    model = FakeModel(LAYOUT.vocab_size)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="num_beams"):
        E.unconstrained_beam_search(model, ids, torch.ones(2, 3, dtype=torch.bool), LAYOUT, 0)
    with pytest.raises(ValueError, match="attention_mask"):
        E.unconstrained_beam_search(model, ids, torch.ones(2, 2, dtype=torch.bool), LAYOUT, 2)
    with pytest.raises(TypeError, match="model must be"):
        E.unconstrained_beam_search(object(), ids, torch.ones(2, 3, dtype=torch.bool), LAYOUT, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        E.unconstrained_beam_search(tiny_t5(TokenLayout()), ids, torch.ones(2, 3, dtype=torch.bool), LAYOUT, 2)


def test_unconstrained_equals_constrained_when_every_id_is_an_item():
    # A catalogue holding all 2*2*3*2 = 24 IDs: the trie constrains nothing, so TIGER's plain beam
    # search and the trie-constrained one must return the same IDs in the same order.
    from tiger_fast.generate import generate

    layout = TokenLayout(codebook_sizes=(2, 2, 3), collision_size=2, num_user_tokens=3)
    allc = torch.tensor(list(itertools.product(range(2), range(2), range(3), range(2))))
    table = IdTable(layout, torch.arange(24) + 100, allc)
    model = tiny_t5(layout, seed=5)
    hist = [[100, 101, 117], [123], [105, 105]]
    ids, mask = D.encoder_batch(layout, table, hist, [1, 2, 3])
    codes, scores = E.unconstrained_beam_search(model, ids, mask, layout, 7)
    res = generate(model, hist, table, user_ids=[1, 2, 3], k=7, backend="reference")
    assert torch.equal(codes, res.codes)
    torch.testing.assert_close(scores, res.scores, rtol=1e-5, atol=1e-5)  # same math, own loop


# ---- retriever evaluation ---------------------------------------------------------------------


def test_evaluate_retriever_matches_direct_generate(setup):
    from tiger_fast.generate import generate

    ds, table, model = setup
    r = E.evaluate_retriever(model, ds, table, ks=(1, 5, 10), k=10, batch_size=7, backend="reference",
                             return_rankings=True)
    ex = E.eval_examples(ds, "test")
    assert r["num_examples"] == len(ex.targets) and r["num_users_skipped"] == ex.num_users_skipped
    g = generate(model, [ds.item_ids[h] for h in ex.histories], table,
                 user_ids=[ds.user_ids[u] for u in ex.users], k=10, backend="reference")
    assert torch.equal(r["rankings"], g.item_ids)  # synthetic item ids are 0..N-1
    for k in (1, 5, 10):
        assert r[f"recall@{k}"] == M.recall_at_k(g.item_ids, ex.targets, k)
        assert r[f"ndcg@{k}"] == M.ndcg_at_k(g.item_ids, ex.targets, k)
    assert r["entropy@10"] == M.entropy_at_k(g.item_ids, ds.leaf_categories(), 10)
    assert r["coverage@10"] == M.coverage(g.item_ids, 53)
    # batch size does not change anything
    r2 = E.evaluate_retriever(model, ds, table, ks=(1, 5, 10), k=10, batch_size=64, backend="reference",
                              return_rankings=True)
    assert torch.equal(r["rankings"], r2["rankings"])


def test_sampling_is_independent_of_batching_and_subset(setup):
    ds, table, model = setup
    kw = dict(ks=(5,), k=5, temperature=(2.0, 2.0, 0.5, 0.5), seed=11, backend="reference", return_rankings=True)
    a = E.evaluate_retriever(model, ds, table, batch_size=4, **kw)
    b = E.evaluate_retriever(model, ds, table, batch_size=50, **kw)
    assert torch.equal(a["rankings"], b["rankings"])
    sub = E.evaluate_retriever(model, ds, table, batch_size=3, max_users=6, **kw)
    pos = {int(u): i for i, u in enumerate(a["users"])}
    assert torch.equal(sub["rankings"], a["rankings"][[pos[int(u)] for u in sub["users"]]])
    assert 0 < sub["num_examples"] <= 6
    c = E.evaluate_retriever(model, ds, table, batch_size=50, **{**kw, "seed": 12})
    assert not torch.equal(a["rankings"], c["rankings"])


def test_external_ids_equal_internal(setup):
    ds, table, model = setup
    shifted = Dataset(name="s", item_ids=ds.item_ids * 3 + 1000, items=ds.items, user_ids=ds.user_ids,
                      sequences=ds.sequences)
    t_ext = IdTable(LAYOUT, shifted.item_ids, table.codes)
    a = E.evaluate_retriever(model, ds, table, backend="reference", return_rankings=True)
    b = E.evaluate_retriever(model, shifted, t_ext, backend="reference", return_rankings=True)
    assert torch.equal(a["rankings"], b["rankings"]) and a["recall@10"] == b["recall@10"]
    with pytest.raises(ValueError):  # a table keyed by internal indices read as external ids
        E.evaluate_retriever(model, shifted, IdTable(LAYOUT, np.arange(53), table.codes), backend="reference")


def test_entropy_vs_temperature_rows(setup):
    ds, table, model = setup
    rows = E.entropy_vs_temperature(model, ds, table, temperatures=[None, 1.5], k=5, max_users=8,
                                    backend="reference")
    assert [r["temperature"] for r in rows] == [None, [1.5] * 4]
    base = E.evaluate_retriever(model, ds, table, ks=(5,), k=5, max_users=8, backend="reference")
    assert rows[0]["recall@5"] == base["recall@5"] and rows[0]["entropy@5"] == base["entropy@5"]
    assert all(0.0 <= r["entropy@5"] <= math.log2(5) + 1e-12 for r in rows)


def test_invalid_rate_unconstrained_matches_manual(setup):
    ds, table, model = setup
    r = E.invalid_rate_unconstrained(model, ds, table, k=10, batch_size=6)
    ex = E.eval_examples(ds, "test")
    ids, mask = D.encoder_batch(LAYOUT, table, [ds.item_ids[h] for h in ex.histories],
                                [ds.user_ids[u] for u in ex.users])
    codes, _ = E.unconstrained_beam_search(model, ids, mask, LAYOUT, 10)
    items = table.items_of_codes(codes.reshape(-1, 4)).reshape(codes.shape[:2])
    assert r["invalid_rate"] == pytest.approx(float((items < 0).double().mean()), abs=1e-15)
    assert r["num_examples"] == len(ex.targets)
    filt = [[i for i in row if i >= 0] for row in items.tolist()]
    hits = np.mean([t in f for t, f in zip(ex.targets.tolist(), filt)])
    assert r["recall@10_filtered"] == pytest.approx(hits, abs=1e-15)


def test_evaluate_bad_inputs(setup):
    ds, table, model = setup
    with pytest.raises(ValueError, match="k \\(items decoded"):
        E.evaluate_retriever(model, ds, table, ks=(5, 10), k=5)
    with pytest.raises(ValueError, match="batch_size"):
        E.evaluate_retriever(model, ds, table, batch_size=0)
    with pytest.raises(ValueError, match="temperature"):
        E.evaluate_retriever(model, ds, table, temperature=(1.0, 2.0))
    with pytest.raises(ValueError, match="temperatures must be"):
        E.evaluate_retriever(model, ds, table, temperature=-1.0)
    with pytest.raises(ValueError, match="max_users"):
        E.evaluate_retriever(model, ds, table, max_users=0)
    with pytest.raises(ValueError, match="split"):
        E.evaluate_retriever(model, ds, table, split="train")
    short = Dataset(name="s", item_ids=ds.item_ids, items=ds.items, user_ids=np.array([0]),
                    sequences=[np.array([1, 2])])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        E.evaluate_retriever(model, short, table)


def test_unconstrained_hf_model_equals_ours():
    pytest.importorskip("transformers")
    layout = TokenLayout(codebook_sizes=(3, 4, 3), collision_size=3, num_user_tokens=3)
    ours = tiny_t5(layout, seed=1)
    hf = ours.to_hf().eval()
    table = IdTable.from_rq_codes(layout, np.arange(20), np.random.default_rng(0).integers(0, 3, (20, 3)))
    ids, mask = D.encoder_batch(layout, table, [[1, 2, 3], [4]], [5, 6])
    a_codes, a_scores = E.unconstrained_beam_search(ours, ids, mask, layout, 8)
    b_codes, b_scores = E.unconstrained_beam_search(hf, ids, mask, layout, 8)
    assert torch.equal(a_codes, b_codes)
    torch.testing.assert_close(a_scores, b_scores, rtol=1e-5, atol=1e-5)  # two implementations of T5
