"""tiger_fast.sequences: encoder inputs, leave-one-out splits, vectorised tokenisation, collation."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiger_fast.ids import IdTable
from tiger_fast.layout import TokenLayout
from tiger_fast.sequences import (Examples, Split, collate, encoder_input, leave_one_out, target_tokens,
                                  tokenize_split)

LAYOUT = TokenLayout(codebook_sizes=(5, 3, 7), collision_size=2, num_user_tokens=11)


def _table(n=13, seed=0):
    """n items with external ids 1000 + 7 i (not 0..n-1, to catch internal/external mixups)."""
    rng = np.random.default_rng(seed)
    codes = set()
    while len(codes) < n:
        codes.add((int(rng.integers(5)), int(rng.integers(3)), int(rng.integers(7)), int(rng.integers(2))))
    item_ids = 1000 + 7 * np.arange(n)
    return IdTable(LAYOUT, item_ids, np.array(sorted(codes), dtype=np.int64)), item_ids


def _dataset(item_ids, lengths, seed=1):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, len(item_ids), size=k).astype(np.int64) for k in lengths]
    return SimpleNamespace(item_ids=item_ids, user_ids=np.array([f"u{i}" for i in range(len(lengths))]),
                           sequences=seqs)


def test_encoder_input_layout_and_truncation():
    table, ids = _table()
    hist = [ids[3], ids[1], ids[3], ids[7]]  # duplicates are fine (repeat purchases)
    toks = encoder_input(LAYOUT, table, "alice", hist, max_items=3)
    assert toks[0] == LAYOUT.user_token("alice")
    assert len(toks) == 1 + 3 * LAYOUT.num_levels
    expect = table.tokens_of(torch.tensor(hist[-3:])).reshape(-1).tolist()  # oldest first
    assert toks[1:] == expect
    assert encoder_input(LAYOUT, table, 5, np.array([ids[0]]))[1:] == table.tokens_of(torch.tensor([ids[0]]))[0].tolist()


def test_encoder_input_errors():
    table, ids = _table()
    with pytest.raises(ValueError, match="empty"):
        encoder_input(LAYOUT, table, 1, [])
    with pytest.raises(ValueError, match="history_item_ids"):
        encoder_input(LAYOUT, table, 1, [ids[0], 3])  # 3 is an internal index, not an item id
    with pytest.raises(ValueError, match="max_items"):
        encoder_input(LAYOUT, table, 1, [ids[0]], max_items=0)
    with pytest.raises(TypeError, match="integer"):
        encoder_input(LAYOUT, table, 1, [1.5])
    with pytest.raises(ValueError, match="mismatch"):
        encoder_input(TokenLayout(), table, 1, [ids[0]])


def test_target_tokens_end_with_eos():
    table, ids = _table()
    t = target_tokens(LAYOUT, table, [ids[2], ids[5]])
    assert t.dtype == torch.int64 and t.shape == (2, LAYOUT.num_levels + 1)
    assert torch.equal(t[:, :-1], table.tokens_of(torch.tensor([ids[2], ids[5]])))
    assert (t[:, -1] == LAYOUT.eos_id).all()


def test_leave_one_out_exact():
    _, ids = _table()
    ds = _dataset(ids, [0, 1, 2, 3, 5, 4])
    s = leave_one_out(ds)
    # train: user 2 (n=2, short -> train: end 1), user 3 (n=3: none), user 4 (n=5: ends 1,2), user 5 (n=4: end 1)
    assert s.train.user_index.tolist() == [2, 4, 4, 5]
    assert s.train.end.tolist() == [1, 1, 2, 1]
    assert s.valid.user_index.tolist() == [3, 4, 5] and s.valid.end.tolist() == [1, 3, 2]
    assert s.test.user_index.tolist() == [3, 4, 5] and s.test.end.tolist() == [2, 4, 3]
    assert s.dropped_users.tolist() == [0, 1]
    s2 = leave_one_out(ds, short_users="drop")
    assert s2.train.user_index.tolist() == [4, 4, 5] and s2.dropped_users.tolist() == [0, 1, 2]
    # no validation/test target is ever a training target position
    for u, e in zip(s.train.user_index, s.train.end):
        n = len(ds.sequences[u])
        assert e <= n - 3 or n == 2
    # targets / histories use external ids
    assert s.test.targets(ds).tolist() == [int(ids[ds.sequences[u][-1]]) for u in (3, 4, 5)]
    h = s.valid.histories(ds, max_items=2)
    assert [x.tolist() for x in h] == [ids[ds.sequences[u][:n - 2][-2:]].tolist() for u, n in ((3, 3), (4, 5), (5, 4))]
    assert s.summary() == {"train": 4, "valid": 3, "test": 3, "dropped_users": 2}


def test_leave_one_out_errors():
    _, ids = _table()
    with pytest.raises(TypeError, match="Dataset"):
        leave_one_out(object())
    ds = _dataset(ids, [4])
    ds.sequences[0][1] = len(ids)  # out of range internal index
    with pytest.raises(ValueError, match="outside"):
        leave_one_out(ds)
    with pytest.raises(ValueError, match="short_users"):
        leave_one_out(_dataset(ids, [4]), short_users="keep")


@pytest.mark.parametrize("max_items", [1, 2, 3, 20])
def test_tokenize_split_equals_single_example_path(max_items):
    table, ids = _table()
    ds = _dataset(ids, [2, 3, 5, 9, 4, 7, 3], seed=4)
    s = leave_one_out(ds)
    for split in (s.train, s.valid, s.test):
        ex = tokenize_split(split, ds, LAYOUT, table, max_items=max_items)
        hists = split.histories(ds)
        users = split.user_ids(ds)
        inputs = [encoder_input(LAYOUT, table, u, h, max_items=max_items) for u, h in zip(users, hists)]
        targets = target_tokens(LAYOUT, table, split.targets(ds)).tolist()
        ref_ids, ref_mask, ref_lab = collate(inputs, targets, pad_id=LAYOUT.pad_id)
        assert torch.equal(ex.input_ids, ref_ids)
        assert torch.equal(ex.attention_mask, ref_mask)
        assert torch.equal(ex.labels, ref_lab)
        assert torch.equal(ex.target_item_ids, torch.from_numpy(split.targets(ds)))
        # batches trim the all-padding columns
        b_ids, b_mask, b_lab = ex.batch(torch.tensor([0]))
        assert b_ids.shape[1] == len(inputs[0]) and bool(b_mask.all())


def test_tokenize_split_errors():
    table, ids = _table()
    ds = _dataset(ids, [5])
    s = leave_one_out(ds)
    with pytest.raises(ValueError, match="no examples"):
        tokenize_split(Split("x", np.zeros(0, np.int64), np.zeros(0, np.int64)), ds, LAYOUT, table)
    with pytest.raises(ValueError, match="empty history"):
        tokenize_split(Split("x", np.zeros(1, np.int64), np.zeros(1, np.int64)), ds, LAYOUT, table)
    small, _ = _table(n=4)  # items 4.. have no semantic ID there
    ds.sequences[0][:] = [0, 1, 9, 2, 3]
    with pytest.raises(ValueError, match="IdTable"):
        tokenize_split(s.train, ds, LAYOUT, small)
    assert isinstance(tokenize_split(s.train, ds, LAYOUT, table), Examples)


def test_collate():
    ids, mask = collate([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    with pytest.raises(ValueError, match="empty"):
        collate([[1], []])
    with pytest.raises(ValueError, match="non-empty"):
        collate([])
    with pytest.raises(ValueError, match="same non-zero length"):
        collate([[1], [2]], [[1, 1], [1]])
