"""SASRec baseline: it learns (beats popularity on validation), is deterministic, ranks and scores
exactly like the shared evaluation code, saves/loads, and rejects bad input with one clear error."""
import json
import math
import os

import numpy as np
import pytest
import torch

from tiger_fast.data import Dataset
from tiger_fast.evaluate import eval_examples, evaluate_popularity
from tiger_fast.sasrec import (SASRec, SASRecConfig, evaluate_sasrec, load_sasrec, save_sasrec, score_histories,
                               top_k_items, train_sasrec, training_windows)
from tiger_fast.sequences import leave_one_out
from tiger_fast.synthetic import synthetic_dataset

SMALL = dict(hidden=32, num_heads=2, batch_size=32, time_budget_s=None, lr=3e-3)


@pytest.fixture(scope="module")
def syn():
    return synthetic_dataset(num_items=120, num_users=250, seed=1)


@pytest.fixture(scope="module")
def trained(syn):
    cfg = SASRecConfig(**SMALL, max_steps=120, eval_every_steps=40)
    return train_sasrec(syn, cfg, progress=False)


def hand_dataset():
    items = [{"categories": ["A", c]} for c in "xxyyzzw"]
    seqs = [np.array([0, 1, 2, 3, 4]), np.array([5, 5, 6]), np.array([2, 0]), np.array([3, 3, 3, 0, 4, 6]),
            np.array([1, 2, 6, 0])]
    return Dataset(name="hand", item_ids=np.arange(7) * 10 + 3, items=items,
                   user_ids=np.arange(5) + 100, sequences=seqs)


# ---- learning ---------------------------------------------------------------------------------
def test_beats_popularity_on_validation(syn, trained):
    model, hist = trained
    pop = evaluate_popularity(syn, "valid")
    val = evaluate_sasrec(model, syn, "valid")
    assert val["num_examples"] == pop["num_examples"] == len(leave_one_out(syn).valid)
    assert val["recall@10"] > 2 * pop["recall@10"] and val["ndcg@10"] > 2 * pop["ndcg@10"]
    steps = [e["step"] for e in hist["evals"]]
    assert steps == [40, 80, 120] and hist["stopped"] == "max_steps" and hist["steps"] == 120
    best = max(hist["evals"], key=lambda e: e["ndcg@10"])
    assert hist["best_step"] == best["step"] and hist["best_ndcg@10"] == best["ndcg@10"]
    # the returned model is the best state: its validation NDCG@10 is the best one logged
    assert val["ndcg@10"] == best["ndcg@10"]
    assert all(e["train_loss"] is not None and math.isfinite(e["train_loss"]) for e in hist["evals"])


def test_training_windows_cover_each_train_target_once(syn):
    for max_len in (1, 3, 20):
        X, Y = training_windows(syn, max_len)
        assert X.shape == Y.shape == (X.shape[0], max_len)
        assert torch.equal(X > 0, Y >= 0)  # a target exactly where there is an input
        tr = leave_one_out(syn).train
        want = sorted(int(syn.sequences[u][e]) for u, e in zip(tr.user_index, tr.end))
        assert sorted(Y[Y >= 0].tolist()) == want
        # within a window, the item after input j is target j (shifted sequence)
        assert torch.equal(X[:, 1:][X[:, :-1] > 0] - 1, Y[:, :-1][X[:, :-1] > 0])


def test_bce_loss_option_trains(syn):
    cfg = SASRecConfig(**{**SMALL, "loss": "bce"}, max_steps=30, eval_every_steps=30)
    model, hist = train_sasrec(syn, cfg, progress=False)
    assert hist["steps"] == 30 and math.isfinite(hist["evals"][-1]["train_loss"])
    assert evaluate_sasrec(model, syn, "valid")["recall@10"] > evaluate_popularity(syn, "valid")["recall@10"]


# ---- determinism ------------------------------------------------------------------------------
def test_same_seed_same_weights_and_metrics(syn):
    cfg = SASRecConfig(**SMALL, max_steps=12, eval_every_steps=6, dropout=0.3, seed=5)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, ha = train_sasrec(syn, cfg, progress=False)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    b, hb = train_sasrec(syn, cfg, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = [{k: v for k, v in e.items() if k not in ("wall_s", "eval_s")} for e in ha["evals"]]
    assert strip == [{k: v for k, v in e.items() if k not in ("wall_s", "eval_s")} for e in hb["evals"]]
    ra, rb = evaluate_sasrec(a, syn), evaluate_sasrec(b, syn)
    for d in (ra, rb):
        d.pop("seconds"), d.pop("users_per_second")
    assert ra == rb
    c, _ = train_sasrec(syn, SASRecConfig(**{**SMALL, "seed": 6}, max_steps=12, eval_every_steps=6, dropout=0.3),
                        progress=False)
    assert not torch.equal(c.state_dict()["item_emb.weight"], sa["item_emb.weight"])


# ---- ranking and metrics ----------------------------------------------------------------------
def _ref_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    rows = []
    for r in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: (-float(scores[r, j]), j))[:k]
        rows.append(order + [-1] * (k - len(order)))
    return torch.tensor(rows, dtype=torch.long).reshape(scores.shape[0], k)


@pytest.mark.parametrize("n", [1, 2, 7, 13])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_top_k_items_breaks_ties_by_index(n, k):
    g = torch.Generator().manual_seed(n * 31 + k)
    for levels in (2, 3, 1000):  # few levels = many ties, 1000 = almost none
        scores = torch.randint(0, levels, (9, n), generator=g).float()
        scores[0] = 0.0  # a row that is all ties
        assert torch.equal(top_k_items(scores, k), _ref_top_k(scores, k))


def test_top_k_items_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        top_k_items(torch.tensor([[0.0, float("nan")]]), 1)


def test_metrics_equal_hand_computed_full_catalogue_ranking():
    ds = hand_dataset()
    torch.manual_seed(0)
    model = SASRec(7, SASRecConfig(hidden=8, max_len=3, time_budget_s=1.0)).eval()
    model.item_fingerprint = None
    for split in ("valid", "test"):
        ex = eval_examples(ds, split)
        res = evaluate_sasrec(model, ds, split, ks=(1, 3))
        rec = {1: [], 3: []}
        ndcg = {1: [], 3: []}
        with torch.no_grad():
            for h, t in zip(ex.histories, ex.targets):
                x = torch.as_tensor(h[-3:] + 1)[None]  # one unpadded history at a time
                sc = model.item_scores(model(x)[0, -1])
                ranking = sorted(range(7), key=lambda j: (-float(sc[j]), j))  # all items, history included
                rank = ranking.index(int(t))
                for k in (1, 3):
                    rec[k].append(1.0 if rank < k else 0.0)
                    ndcg[k].append(1.0 / math.log2(rank + 2) if rank < k else 0.0)
        assert res["num_examples"] == len(ex.targets) == 4 and res["num_users_skipped"] == 1
        for k in (1, 3):
            # float tolerance: python sums in another order than the torch mean
            assert res[f"recall@{k}"] == pytest.approx(sum(rec[k]) / 4, abs=1e-12)
            assert res[f"ndcg@{k}"] == pytest.approx(sum(ndcg[k]) / 4, abs=1e-12)
        assert set(res) >= set(evaluate_popularity(ds, split, ks=(1, 3)))


def test_padded_batches_score_like_single_histories(syn, trained):
    model, _ = trained
    ex = eval_examples(syn, "test")
    batched = score_histories(model, ex.histories[:40], batch_size=16)
    with torch.no_grad():
        single = torch.cat([model.item_scores(model(torch.as_tensor(h[-20:] + 1)[None])[:, -1])
                            for h in ex.histories[:40]])
    # float tolerance: padded and unpadded batches run different GEMM shapes
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


# ---- save / load ------------------------------------------------------------------------------
def test_save_load_roundtrip(syn, trained, tmp_path):
    model, _ = trained
    d = str(tmp_path / "sas")
    save_sasrec(model, d)
    back = load_sasrec(d)
    assert back.config == model.config and not back.training
    sa, sb = model.state_dict(), back.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ra, rb = evaluate_sasrec(model, syn, "test"), evaluate_sasrec(back, syn, "test")
    assert {k: v for k, v in ra.items() if k not in ("seconds", "users_per_second")} == \
           {k: v for k, v in rb.items() if k not in ("seconds", "users_per_second")}
    other = synthetic_dataset(num_items=120, num_users=250, seed=2)
    other.item_ids = other.item_ids[::-1].copy()  # same size, other ids
    with pytest.raises(ValueError, match="fingerprint"):
        evaluate_sasrec(back, other)
    with pytest.raises(ValueError, match="120 items but the dataset has"):
        evaluate_sasrec(back, synthetic_dataset(num_items=60, num_users=50, seed=1))


def test_load_rejects_bad_directories(trained, tmp_path):
    model, _ = trained
    with pytest.raises(FileNotFoundError, match="not a SASRec directory"):
        load_sasrec(str(tmp_path))
    d = str(tmp_path / "sas")
    save_sasrec(model, d)
    meta = json.load(open(os.path.join(d, "sasrec.json")))
    for bad, match in ((dict(meta, config={**meta["config"], "num_heads": 5}), "num_heads"),
                       (dict(meta, config={**meta["config"], "colour": 1}), "unknown SASRecConfig"),
                       (dict(meta, format="other"), "not a tiger_fast.sasrec"),
                       (dict(meta, num_items=7), "do not match")):
        json.dump(bad, open(os.path.join(d, "sasrec.json"), "w"))
        with pytest.raises(ValueError, match=match):
            load_sasrec(d)
    json.dump(meta, open(os.path.join(d, "sasrec.json"), "w"))
    open(os.path.join(d, "model.safetensors"), "wb").write(b"garbage")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_sasrec(d)


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(hidden=0), "hidden"), (dict(hidden=10, num_heads=3), "num_heads"), (dict(dropout=1.0), "dropout"),
    (dict(loss="mse"), "loss"), (dict(lr=float("nan")), "lr"), (dict(time_budget_s=None), "stopping rule"),
    (dict(time_budget_s=10, eval_every_s=10), "eval_every_s"), (dict(eval_users=0), "eval_users"),
    (dict(seed=-1), "seed"), (dict(max_len=True), "max_len"), (dict(weight_decay=-1), "weight_decay"),
])
def test_bad_config_is_one_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        SASRecConfig(**kw)


def test_empty_splits_are_clear_errors():
    ones = Dataset(name="ones", item_ids=np.arange(3), items=[{}] * 3, user_ids=np.arange(2),
                   sequences=[np.array([0]), np.array([2])])
    with pytest.raises(ValueError, match="no training examples"):
        train_sasrec(ones, SASRecConfig(max_steps=1), progress=False)
    twos = Dataset(name="twos", item_ids=np.arange(3), items=[{}] * 3, user_ids=np.arange(2),
                   sequences=[np.array([0, 1]), np.array([2, 0])])
    with pytest.raises(ValueError, match="empty validation split"):
        train_sasrec(twos, SASRecConfig(max_steps=1), progress=False)
    model = SASRec(3, SASRecConfig(hidden=8, time_budget_s=1.0))
    with pytest.raises(ValueError, match="no examples"):
        evaluate_sasrec(model, twos)
    with pytest.raises(ValueError, match="split must be"):
        evaluate_sasrec(model, twos, split="train")


def test_budget_too_small_for_one_validation(syn):
    with pytest.raises(RuntimeError, match="time_budget_s=1e-06"):
        train_sasrec(syn, SASRecConfig(time_budget_s=1e-6), progress=False)
    # the first validation starts at >= 0.499 s and cannot end within the 0.5 s budget
    with pytest.raises(RuntimeError, match="time_budget_s=0.5 s is too small to finish one validation"):
        train_sasrec(syn, SASRecConfig(time_budget_s=0.5, eval_every_s=0.499), progress=False)


# ---- CLI --------------------------------------------------------------------------------------
def test_cli_evaluate_baselines(tmp_path, capsys):
    from tiger_fast.cli import build_parser, main
    from tiger_fast.ids import IdTable
    from tiger_fast.layout import TokenLayout
    from tiger_fast.t5 import T5, T5Config, save_t5

    spec = "synthetic:items=60,users=80,seed=4"
    ds = synthetic_dataset(num_items=60, num_users=80, seed=4)
    layout = TokenLayout(codebook_sizes=(4, 4, 4), collision_size=8, num_user_tokens=7)
    table = IdTable.from_rq_codes(layout, ds.item_ids, np.random.default_rng(0).integers(0, 4, (60, 3)))
    ids = str(tmp_path / "ids.parquet")
    table.to_parquet(ids)
    t5 = T5(T5Config(vocab_size=layout.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                     num_encoder_layers=1, num_decoder_layers=1, dropout=0.0), seed=0)
    save_t5(t5, layout, str(tmp_path / "tiger"))
    sas = str(tmp_path / "sas")
    args = ["evaluate", "--data", spec, "--ids", ids, "--model", str(tmp_path / "tiger"), "--quiet",
            "--baselines", "popularity,sasrec", "--sasrec-budget", "2", "--sasrec-model", sas]
    capsys.readouterr()
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    keys = {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "num_examples"}
    assert keys <= set(first["sasrec"]) and keys <= set(first["popularity"])
    assert first["sasrec"]["num_examples"] == first["popularity"]["num_examples"] == first["tiger"]["num_examples"]
    assert first["sasrec"]["stopped"] in ("time_budget", "early_stopping")
    assert main(args) == 0  # now loads the saved model: same metrics, no training
    second = json.loads(capsys.readouterr().out)["sasrec"]
    assert "train_steps" not in second
    assert all(second[k] == first["sasrec"][k] for k in keys)
    assert main(args[:-6] + ["--popularity"]) == 0 and "popularity" in json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        build_parser().parse_args(args[:-4] + ["--baselines", "popularity,bpr"])
