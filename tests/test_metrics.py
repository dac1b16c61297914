"""tiger_fast.metrics: hand-computed values, odd shapes, padding, empty and bad inputs."""
import math

import numpy as np
import pytest
import torch

from tiger_fast.metrics import (
    codebook_usage,
    coverage,
    entropy_at_k,
    invalid_rate,
    ndcg_at_k,
    recall_at_k,
)

# ---- Recall / NDCG ----------------------------------------------------------------------------


def test_recall_ndcg_hand_computed():
    pred = torch.tensor([[3, 1, 4, 1, 5],   # target 4 at rank 2
                         [9, 2, 6, 5, 3],   # target 7 absent
                         [7, 0, 0, 0, 0],   # target 7 at rank 0
                         [8, 8, 2, 8, 6]])  # target 6 at rank 4
    target = torch.tensor([4, 7, 7, 6])
    assert recall_at_k(pred, target, 5) == pytest.approx(3 / 4, abs=0)
    assert recall_at_k(pred, target, 2) == pytest.approx(1 / 4, abs=0)
    assert recall_at_k(pred, target, 3) == pytest.approx(2 / 4, abs=0)
    # Exact expectation computed the same way in float64 -> tolerance only for the averaging order.
    want5 = (1 / math.log2(4) + 0 + 1 / math.log2(2) + 1 / math.log2(6)) / 4
    assert ndcg_at_k(pred, target, 5) == pytest.approx(want5, rel=1e-15)
    assert ndcg_at_k(pred, target, 1) == pytest.approx(0.25, rel=1e-15)
    per_row = ndcg_at_k(pred, target, 5, reduction="none")
    assert per_row.dtype == torch.float64 and per_row.shape == (4,)
    assert per_row[1] == 0.0 and per_row[2] == 1.0
    assert torch.equal(recall_at_k(pred, target, 5, reduction="none"),
                       torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64))


def test_padding_never_matches_and_duplicates_use_first_rank():
    pred = torch.tensor([[-1, -1, -1], [5, 5, 2], [-1, 2, -1]])
    target = torch.tensor([0, 5, 2])
    assert torch.equal(recall_at_k(pred, target, 3, reduction="none"),
                       torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    nd = ndcg_at_k(pred, target, 3, reduction="none")
    assert nd[1] == 1.0  # the duplicate 5 counts once, at its first rank
    assert nd[2] == pytest.approx(1 / math.log2(3), rel=1e-15)


def test_odd_shapes_numpy_and_lists():
    rng = np.random.default_rng(7)
    for R, K in [(1, 1), (7, 13), (31, 3)]:
        pred = rng.integers(0, 11, size=(R, K))
        target = rng.integers(0, 11, size=R)
        r = recall_at_k(pred, target, K)
        brute = np.mean([target[i] in pred[i] for i in range(R)])
        assert r == pytest.approx(brute, abs=1e-15)
        nd = ndcg_at_k(pred.tolist(), target.tolist(), K, reduction="none")
        for i in range(R):
            hit = np.nonzero(pred[i] == target[i])[0]
            want = 1 / math.log2(hit[0] + 2) if len(hit) else 0.0
            assert float(nd[i]) == pytest.approx(want, rel=1e-15)


def test_empty_rows():
    pred = torch.zeros(0, 10, dtype=torch.long)
    target = torch.zeros(0, dtype=torch.long)
    assert recall_at_k(pred, target, 10, reduction="none").shape == (0,)
    with pytest.raises(ValueError, match="no rows"):
        recall_at_k(pred, target, 10)
    with pytest.raises(ValueError, match="no rows"):
        ndcg_at_k(pred, target, 5)
    assert coverage(pred, 4) == 0.0


@pytest.mark.parametrize(
    "pred,target,k,exc,msg",
    [
        (torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long), 6, ValueError, "k must be in"),
        (torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long), 0, ValueError, "k must be in"),
        (torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2.0, TypeError, "k must be an int"),
        (torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), 2, TypeError, "integer dtype"),
        (torch.zeros(3, 5, dtype=torch.bool), torch.zeros(3, dtype=torch.long), 2, TypeError, "integer dtype"),
        (torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), 2, ValueError, "2-D"),
        (torch.zeros(3, 5, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2, ValueError, "one target per"),
        (torch.zeros(3, 5, dtype=torch.long), torch.tensor([0, -1, 2]), 2, ValueError, "negative"),
        (torch.full((3, 5), -2), torch.zeros(3, dtype=torch.long), 2, ValueError, "ids < -1"),
    ],
)
def test_bad_inputs(pred, target, k, exc, msg):
    with pytest.raises(exc, match=msg):
        recall_at_k(pred, target, k)
    with pytest.raises(exc, match=msg):
        ndcg_at_k(pred, target, k)


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        recall_at_k([[1]], [1], 1, reduction="sum")


# ---- Entropy ----------------------------------------------------------------------------------


def test_entropy_seed_example_bits():
    # The seed's example: top-5 with category shares 0.6 / 0.2 / 0.2 -> 1.371 bits.
    cats = ["a", "a", "a", "b", "c"]
    pred = torch.tensor([[0, 3, 1, 4, 2]])
    e = entropy_at_k(pred, cats, 5)
    want = -(0.6 * math.log2(0.6) + 2 * 0.2 * math.log2(0.2))
    assert e == pytest.approx(want, rel=1e-12)  # float64 sums in a different order
    assert round(e, 3) == 1.371


def test_entropy_extremes_and_mean():
    cats = np.array([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])  # ids 0..2 share category 0
    same = torch.tensor([[0, 1, 2]])
    assert entropy_at_k(same, cats, 3) == 0.0
    for K in (1, 2, 7):
        distinct = torch.arange(2, 2 + K)[None]  # categories 0,1,..: all distinct
        assert entropy_at_k(distinct, cats, K) == pytest.approx(math.log2(K), rel=1e-12, abs=0)
    both = torch.tensor([[0, 1, 2], [3, 4, 5]])  # 0 bits and log2(3) bits
    assert entropy_at_k(both, cats, 3) == pytest.approx(math.log2(3) / 2, rel=1e-12)
    # Prefix k only: the first two of [3, 4, 0] are distinct -> 1 bit.
    assert entropy_at_k(torch.tensor([[3, 4, 0]]), cats, 2) == pytest.approx(1.0, rel=1e-15)


def test_entropy_padding_and_category_forms():
    cats = ["x", "y", "x"]
    pred = torch.tensor([[0, 1, -1, -1], [-1, -1, -1, -1], [0, 2, -1, 1]])
    per = entropy_at_k(pred, cats, 4, reduction="none")
    assert per[0] == pytest.approx(1.0, rel=1e-15)  # padding ignored: {x, y}
    assert per[1] == 0.0  # no valid item
    assert per[2] == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3), rel=1e-12)
    # Category paths (root -> leaf) use the leaf; int tensors work too.
    paths = [["Beauty", "Skin"], ["Beauty", "Hair"], ["Other", "Skin"]]
    assert entropy_at_k(pred, paths, 4, reduction="none")[0] == pytest.approx(1.0, rel=1e-15)
    assert entropy_at_k(pred, torch.tensor([5, 9, 5]), 4) == pytest.approx(float(per.mean()), rel=1e-15)


def test_entropy_large_k_chunked():
    # Rows x k^2 above the chunk size; compare with a direct per-row computation.
    rng = np.random.default_rng(0)
    cats = rng.integers(0, 6, size=50)
    pred = torch.from_numpy(rng.integers(-1, 50, size=(9, 700)))
    per = entropy_at_k(pred, cats, 700, reduction="none")
    for r in range(9):
        v = pred[r][pred[r] >= 0].numpy()
        _, cnt = np.unique(cats[v], return_counts=True)
        p = cnt / cnt.sum()
        assert float(per[r]) == pytest.approx(float(-(p * np.log2(p)).sum()), rel=1e-12)


def test_entropy_bad_inputs():
    with pytest.raises(ValueError, match="covers only"):
        entropy_at_k(torch.tensor([[0, 5]]), ["a", "b"], 2)
    with pytest.raises(TypeError, match="mapping"):
        entropy_at_k(torch.tensor([[0, 1]]), {0: "a", 1: "b"}, 2)
    with pytest.raises(TypeError, match="integer labels"):
        entropy_at_k(torch.tensor([[0, 1]]), torch.tensor([0.5, 1.0]), 2)
    with pytest.raises(ValueError, match="k must be in"):
        entropy_at_k(torch.tensor([[0, 1]]), ["a", "b"], 3)


# ---- Coverage ---------------------------------------------------------------------------------


def test_coverage():
    pred = torch.tensor([[0, 1, -1], [1, 4, 4]])
    assert coverage(pred, 10) == pytest.approx(0.3, abs=0)  # {0, 1, 4}
    assert coverage(pred, 10, k=1) == pytest.approx(0.2, abs=0)  # {0, 1}
    with pytest.raises(ValueError, match="num_items"):
        coverage(pred, 4)
    with pytest.raises(ValueError, match="num_items"):
        coverage(pred, 0)


# ---- Invalid rate ----------------------------------------------------------------------------


def test_invalid_rate_forms():
    valid = torch.tensor([[0, 1, 2, 0], [0, 1, 2, 1], [3, 3, 3, 0]])
    gen = torch.tensor([[[0, 1, 2, 0], [0, 1, 2, 2], [3, 3, 3, 0]],       # 1 of 3 invalid
                        [[9, 9, 9, 9], [-1, -1, -1, -1], [0, 1, 2, 1]]])  # 1 of 2 produced invalid
    assert invalid_rate(gen, valid) == pytest.approx(2 / 5, abs=0)
    per = invalid_rate(gen, valid, reduction="none")
    assert per[0] == pytest.approx(1 / 3, rel=1e-15) and per[1] == 0.5
    as_set = {tuple(r) for r in valid.tolist()}
    assert invalid_rate(gen, as_set) == pytest.approx(2 / 5, abs=0)

    class Table:  # IdTable-like: exposes .codes (N, L)
        codes = valid.numpy()

    assert invalid_rate(gen, Table()) == pytest.approx(2 / 5, abs=0)
    assert invalid_rate(gen, set()) == 1.0  # an empty catalogue makes everything invalid


def test_invalid_rate_bad_inputs():
    valid = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="3-D"):
        invalid_rate(torch.zeros(2, 4, dtype=torch.long), valid)
    with pytest.raises(ValueError, match="levels"):
        invalid_rate(torch.zeros(1, 2, 3, dtype=torch.long), valid)
    with pytest.raises(ValueError, match="negative codes inside"):
        invalid_rate(torch.tensor([[[0, -1, 0, 0]]]), valid)
    with pytest.raises(ValueError, match="no produced ID"):
        invalid_rate(torch.full((1, 2, 4), -1), valid)


# ---- Codebook usage ---------------------------------------------------------------------------


def test_codebook_usage():
    codes = torch.tensor([[0, 1, 2], [0, 3, 2], [4, 1, 0]])
    assert codebook_usage(codes, [5, 4, 3]) == [2 / 5, 2 / 4, 2 / 3]
    assert codebook_usage(torch.zeros(0, 2, dtype=torch.long), (7, 3)) == [0.0, 0.0]
    with pytest.raises(ValueError, match="outside"):
        codebook_usage(codes, [4, 4, 3])
    with pytest.raises(ValueError, match="one codebook size"):
        codebook_usage(codes, [5, 4])
