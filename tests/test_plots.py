"""tiger_fast.plots and the CLI's --plot flags: the numbers behind the pictures, valid PNGs of the
documented size from tiny data (Agg, no display), and refusals of unwritable directories."""
import json
import os
import struct
import sys
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from tiger_fast import plots  # noqa: E402
from tiger_fast.cli import main  # noqa: E402
from tiger_fast.ids import IdTable, semantic_id_report  # noqa: E402
from tiger_fast.layout import TokenLayout  # noqa: E402
from tiger_fast.synthetic import synthetic_dataset  # noqa: E402
from tiger_fast.trie import Trie  # noqa: E402

DATA = "synthetic:items=300,users=120,seed=3"


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; asserts the PNG signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def check_png(path, name):
    """The picture has its documented pixel size, stays small, decodes and is not blank."""
    from matplotlib.image import imread

    w, h = plots.SIZES[name]
    assert png_size(path) == (round(w * plots.DPI), round(h * plots.DPI))
    assert os.path.getsize(path) < 150_000
    img = imread(path)
    assert img.shape[:2] == (round(h * plots.DPI), round(w * plots.DPI))
    assert float(img[..., :3].std()) > 0.02  # something drawn, not one flat colour
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]  # no leftovers


def category_table(ds, seed=0):
    """An IdTable whose codes follow the synthetic categories (like a semantic RQ-VAE): c0 from the
    department, c1 from the product type, c2 from 3 random codes (collisions), 10 % of items noisy."""
    rng = np.random.default_rng(seed)
    cats = [it["categories"] for it in ds.items]
    dep = {d: i for i, d in enumerate(sorted({c[0] for c in cats}))}
    typ = {t: i for i, t in enumerate(sorted({c[1] for c in cats}))}
    codes = np.stack([[dep[c[0]] for c in cats], [typ[c[1]] for c in cats], rng.integers(0, 3, len(cats))], 1)
    noisy = rng.random(len(cats)) < 0.1
    codes[noisy, 0] = rng.integers(0, 16, int(noisy.sum()))
    return IdTable.from_rq_codes(TokenLayout(codebook_sizes=(16, 64, 8), collision_size=64), ds.item_ids, codes)


# ---- the numbers behind the ID pictures ---------------------------------------------------------
def table_cases():
    lay = TokenLayout(codebook_sizes=(5, 3, 7), collision_size=13)
    rng = np.random.default_rng(1)
    yield "one item", IdTable.from_rq_codes(lay, [42], [[4, 2, 6]])
    yield "7 items, all one prefix", IdTable.from_rq_codes(lay, np.arange(7) * 3, np.tile([1, 0, 3], (7, 1)))
    yield "13 random items, ties", IdTable.from_rq_codes(lay, rng.permutation(100)[:13], rng.integers(0, 2, (13, 3)))
    yield "97 random items", IdTable.from_rq_codes(
        lay, np.arange(97), np.stack([rng.integers(0, s, 97) for s in (5, 3, 7)], 1) // np.array([1, 1, 2]))


@pytest.mark.parametrize("name,table", list(table_cases()), ids=[c[0] for c in table_cases()])
def test_id_report_data_agrees_with_trie_and_counting(name, table):
    d = plots.id_report_data(table)
    codes = table.codes.numpy()
    assert d["level_sizes"] == list(table.layout.level_sizes)
    for l, counts in enumerate(d["items_per_code"]):
        c = Counter(codes[:, l].tolist())
        want = sorted(list(c.values()) + [0] * (table.layout.level_sizes[l] - len(c)), reverse=True)
        assert counts.tolist() == want and counts.dtype == np.int64
    assert d["group_sizes"] == table.report()["collision_histogram"]
    trie = Trie.from_id_table(table)
    for depth, (b, ch) in enumerate(zip(d["branching"], trie.children)):
        live = (ch >= 0).sum(1)
        assert sorted(b.tolist()) == sorted(live[live > 0].tolist()), f"depth {depth}"
    assert int(d["branching"][-1].sum()) == len(table)  # every item is one leaf


def test_id_report_data_empty_table():
    t = IdTable(TokenLayout(codebook_sizes=(4, 4), collision_size=3), np.zeros(0, np.int64), np.zeros((0, 3), np.int64))
    d = plots.id_report_data(t)
    assert d["group_sizes"] == {} and all(b.size == 0 for b in d["branching"])
    assert [c.tolist() for c in d["items_per_code"]] == [[0] * 4, [0] * 4, [0] * 3]


# ---- training history --------------------------------------------------------------------------
HISTORIES = {
    "lists, no wall": {"loss": [[100, 5.0], [200, 4.0]], "evals": [{"step": 200, "recall@10": 0.1, "ndcg@10": 0.05}]},
    "lists + wall": {"loss": [[100, 5.0, 30.0], [200, 4.0, 61.0]],
                     "evals": [{"step": 200, "wall_s": 62.5, "recall@10": 0.1, "ndcg@10": 0.05, "seconds": 1.0}]},
    "dicts + wall": {"loss": [{"step": 100, "loss": 5.0, "wall_s": 30.0}, {"step": 200, "loss": 4.0, "wall_s": 61.0}],
                     "evals": [{"step": 200, "wall_s": 62.5, "recall@10": 0.1, "ndcg@10": 0.05}]},
    "no evals": {"loss": [[1, 9.0]], "evals": []},
}


def test_loss_wall_times_interpolated_from_eval_and_final_times():
    h = {"loss": [[100, 5.0], [200, 4.0], [300, 3.5], [400, 3.0]], "final_step": 300, "wall_s": 95.0,
         "evals": [{"step": 200, "wall_s": 60.0, "recall@10": 0.1, "ndcg@10": 0.05},
                   {"step": 200, "wall_s": 61.0, "recall@10": 0.1, "ndcg@10": 0.05}]}  # duplicate step: earliest
    s = plots.training_series(h)
    assert s["loss_wall_interpolated"]
    # (0, 0 s) -> (200, 60 s) -> (300, 95 s); step 400 lies beyond every known time: NaN
    assert s["loss"][:3, 2].tolist() == [30.0, 60.0, 95.0] and np.isnan(s["loss"][3, 2])
    assert not plots.training_series({"loss": [[1, 2.0]], "evals": []})["loss_wall_interpolated"]
    # a clock running backwards (a resumed run from before wall times) is not interpolated
    back = {"loss": [[100, 5.0]], "evals": [{"step": 50, "wall_s": 40.0, "recall@10": 0.0},
                                            {"step": 150, "wall_s": 10.0, "recall@10": 0.0}]}
    assert np.isnan(plots.training_series(back)["loss"][0, 2])


@pytest.mark.parametrize("name", list(HISTORIES))
def test_training_series_with_and_without_wall_times(name, tmp_path):
    h = HISTORIES[name]
    s = plots.training_series(h)
    assert s["loss"][:, :2].tolist() == [[e["step"], e["loss"]] if isinstance(e, dict) else e[:2] for e in h["loss"]]
    has_wall = "+ wall" in name
    assert np.isfinite(s["loss"][:, 2]).all() == has_wall and np.isnan(s["loss"][:, 2]).all() != has_wall
    assert not s["loss_wall_interpolated"]
    if h["evals"]:
        assert sorted(s["evals"]) == ["ndcg@10", "recall@10"]
        assert s["evals"]["recall@10"][:, :2].tolist() == [[200.0, 0.1]]
        assert (s["evals"]["ndcg@10"][0, 2] == 62.5) == has_wall
    else:
        assert s["evals"] == {}
    check_png(plots.plot_training(h, tmp_path / "t.png"), "training")


def test_training_series_rejects_non_history():
    with pytest.raises(TypeError, match="history"):
        plots.training_series([[1, 2.0]])


# ---- learning curves and temperature plots from given numbers ----------------------------------
def test_learning_curves(tmp_path):
    p = plots.plot_learning_curves({"TIGER": [(10, 0.02), (1, 0.01), (30, 0.04)], "SASRec": [(5, 0.03)]},
                                   tmp_path / "lc.png")
    check_png(p, "learning_curves")
    for bad in ({}, {"x": []}, {"x": [(1.0, float("nan"))]}, {"x": [(1, 2, 3)]}):
        with pytest.raises(ValueError, match="curves"):
            plots.plot_learning_curves(bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_temperature_tradeoff_rejects_bad_points(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_temperature_tradeoff([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="entropy@10"):
        plots.plot_temperature_tradeoff([{"recall@10": 0.1}], tmp_path / "x.png")


# ---- CLI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny synthetic catalogue, semantic-like IDs and a 1-layer retriever trained via `train --plot`."""
    d = tmp_path_factory.mktemp("plots")
    ds = synthetic_dataset(num_items=300, num_users=120, seed=3)
    table = category_table(ds)
    ids = str(d / "ids.parquet")
    table.to_parquet(ids)
    out, pics = str(d / "retriever"), str(d / "train_pics")
    torch.set_num_threads(1)
    rc = main(["train", "--data", DATA, "--ids", ids, "--out", out, "--steps", "4", "--layers", "1",
               "--batch-size", "16", "--warmup", "1", "--eval-every", "2", "--eval-users", "10", "--quiet",
               "--plot", pics])
    return {"dir": d, "ds": ds, "table": table, "ids": ids, "model": out, "rc": rc, "train_pics": pics}


def test_train_plot(run):
    assert run["rc"] == 0
    check_png(os.path.join(run["train_pics"], "training.png"), "training")


def test_id_report_plot(run, capsys):
    pics = str(run["dir"] / "id_pics" / "nested")  # created on demand
    assert main(["id-report", "--ids", run["ids"], "--data", DATA, "--plot", pics]) == 0
    rep = json.loads(capsys.readouterr().out)
    names = ["codes_per_level", "collision_groups", "trie_branching", "category_agreement"]
    assert rep["plots"] == [os.path.join(pics, n + ".png") for n in names]
    for n, p in zip(names, rep["plots"]):
        check_png(p, n)
    # the semantic numbers drawn are the library's, and the category-like IDs beat random pairs
    from tiger_fast.pipeline import leaf_categories_by_row

    sem = semantic_id_report(run["table"], leaf_categories_by_row(run["ds"], run["table"]))
    assert rep["random_pairs"] == sem["random_pairs"]
    assert sem["share_prefix"][2] > 3 * sem["random_pairs"]
    # without --data: no category picture
    pics2 = str(run["dir"] / "id_pics2")
    assert main(["id-report", "--ids", run["ids"], "--plot", pics2]) == 0
    assert sorted(os.listdir(pics2)) == sorted(n + ".png" for n in names[:3])


def test_evaluate_temperatures_plot(run, capsys):
    from tiger_fast.evaluate import entropy_vs_temperature
    from tiger_fast.t5 import load_t5

    pics = str(run["dir"] / "eval_pics")
    capsys.readouterr()
    assert main(["evaluate", "--data", DATA, "--ids", run["ids"], "--model", run["model"], "--quiet",
                 "--temperatures", "beam;2;2,2,0.5,0.5", "--sample-seeds", "0", "1", "--plot", pics]) == 0
    res = json.loads(capsys.readouterr().out)
    check_png(res["plot"], "temperature_tradeoff")
    pts = res["temperatures"]
    assert [(p["kind"], p["label"], p["seeds"]) for p in pts] == [
        ("beam", "beam", 1), ("uniform", "T=2", 2), ("per-level", "T=2/2/0.5/0.5", 2)]
    assert pts[0]["recall@10"] == res["tiger"]["recall@10"] and pts[0]["recall@10_sd"] == 0.0
    # means and spreads are those of the per-seed library results
    model, _ = load_t5(os.path.join(run["model"], "model"))
    per_seed = [entropy_vs_temperature(model.eval(), run["ds"], run["table"], [(2.0, 2.0, 0.5, 0.5)], seed=s)[0]
                for s in (0, 1)]
    for p in pts[2:]:
        for m in ("recall@10", "entropy@10"):
            v = np.array([per_seed[0][m], per_seed[1][m]])
            assert p[m] == v.mean()  # the same float computation: exact
            assert p[m + "_sd"] == v.std(ddof=1)
    assert pts[2]["entropy@10_sd"] > 0  # two seeds really sampled differently


@pytest.mark.parametrize("where", ["under a file", "is a file", "permission denied"])
@pytest.mark.parametrize("cmd", ["id-report", "train", "evaluate"])
def test_unwritable_plot_dir_is_refused(where, cmd, tmp_path, capsys, monkeypatch):
    f = tmp_path / "file.txt"
    f.write_text("x")
    bad = {"under a file": str(f / "pics"), "is a file": str(f), "permission denied": str(tmp_path / "ro")}[where]
    if where == "permission denied":  # root ignores chmod 0o555, so the write probe is made to fail as EACCES does
        (tmp_path / "ro").mkdir()

        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(plots.tempfile, "mkstemp", denied)
    argv = {"id-report": ["id-report", "--ids", "x.parquet"],
            "train": ["train", "--data", DATA, "--ids", "x.parquet", "--out", str(tmp_path / "out")],
            "evaluate": ["evaluate", "--data", DATA, "--ids", "x", "--model", "y", "--temperatures", "1"]}[cmd]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--plot", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --plot:" in err and repr(bad) in err
    if where == "permission denied":
        assert "Permission denied" in err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("temps,msg", [("hot", "--temperatures"), ("1;0", "--temperatures"), ("beam;;2", "--temperatures"),
                                       ("1;nan", "--temperatures")])
def test_bad_temperatures_rejected(temps, msg, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--data", DATA, "--ids", "x", "--model", "y", "--temperatures", temps])
    assert msg in capsys.readouterr().err


def test_evaluate_flag_combinations(run, tmp_path, capsys):
    base = ["evaluate", "--data", DATA, "--ids", run["ids"], "--model", run["model"], "--quiet"]
    assert main(base + ["--plot", str(tmp_path / "p")]) == 2
    assert "--plot: needs --temperatures" in capsys.readouterr().err
    assert main(base + ["--sample-seeds", "1", "2"]) == 2
    assert "--sample-seeds" in capsys.readouterr().err
    assert main(base + ["--temperatures", "beam;1,2"]) == 2  # 2 values for a 4-level layout
    assert "--temperatures: setting (1.0, 2.0) has 2 values" in capsys.readouterr().err


def test_a_refused_command_leaves_no_empty_picture_directory(tmp_path, capsys):
    """--plot DIR is checked while the arguments are parsed; DIR (and its missing parents) only
    appear when a picture is written."""
    pics = tmp_path / "new" / "pics"
    assert main(["evaluate", "--data", DATA, "--ids", "x", "--model", "y", "--plot", str(pics)]) == 2  # no --temperatures
    assert "--temperatures" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert plots.check_plot_dir(pics) == str(pics) and not (tmp_path / "new").exists()
