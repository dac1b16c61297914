"""The `tiger-fast` CLI end to end on a tiny synthetic catalogue, plus its bad-input errors."""
import json
import os
import sys

import numpy as np
import pytest

from tiger_fast.cli import build_parser, main

COMMANDS = ["demo", "embed", "train-rqvae", "assign-ids", "id-report", "train", "evaluate", "recommend",
            "batch-recall"]




@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: tiger-fast " + cmd in capsys.readouterr().out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


def test_missing_files_give_one_clear_error(tmp_path, capsys):
    assert main(["id-report", "--ids", str(tmp_path / "nope.parquet")]) == 2
    assert "error: --ids: no such file" in capsys.readouterr().err
    assert main(["train-rqvae", "--embeddings", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "rq")]) == 2
    assert "error: --embeddings" in capsys.readouterr().err
    assert main(["embed", "--data", "nonsense:spec", "--out", str(tmp_path / "e.npy")]) == 2
    assert "unknown dataset spec" in capsys.readouterr().err


def test_bad_temperature_is_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--data", "synthetic", "--ids", "x", "--model", "y",
                                   "--temperature", "hot"])


def test_pipeline_commands_end_to_end(tmp_path, capsys):
    """embed -> train-rqvae -> assign-ids -> id-report -> train -> evaluate -> recommend -> batch-recall."""
    data = "synthetic:items=300,users=120,seed=3"
    emb = str(tmp_path / "emb.npy")
    assert main(["embed", "--data", data, "--out", emb, "--quiet"]) == 0
    assert np.load(emb).shape == (300, 384)
    rq = str(tmp_path / "rq")
    assert main(["train-rqvae", "--embeddings", emb, "--out", rq, "--epochs", "20", "--quiet"]) == 0
    ids = str(tmp_path / "ids.parquet")
    assert main(["assign-ids", "--rqvae", rq, "--embeddings", emb, "--item-ids", str(tmp_path / "emb.ids.npy"),
                 "--out", ids, "--chunk-size", "4096", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["id-report", "--ids", ids, "--data", data]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["num_items"] == 300 and "share_prefix" in rep
    out = str(tmp_path / "retriever")
    assert main(["train", "--data", data, "--ids", ids, "--out", out, "--steps", "3", "--layers", "1",
                 "--batch-size", "16", "--warmup", "1", "--eval-every", "3", "--eval-users", "10",
                 "--length-buckets", "4", "--quiet"]) == 0
    assert os.path.isdir(os.path.join(out, "model"))
    ck = sorted(f for f in os.listdir(os.path.join(out, "checkpoints")) if f.endswith(".json"))
    with open(os.path.join(out, "checkpoints", ck[-1])) as f:
        assert json.load(f)["train_config"]["length_buckets"] == 4
    capsys.readouterr()
    assert main(["evaluate", "--data", data, "--ids", ids, "--model", out, "--max-users", "20", "--popularity",
                 "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    # the CLI's numbers are the Python API's on the same 20 users (seed 0), to the last bit
    from tiger_fast.cli import load_dataset_spec
    from tiger_fast.evaluate import evaluate_popularity, evaluate_retriever
    from tiger_fast.ids import IdTable
    from tiger_fast.t5 import load_t5

    ds, table = load_dataset_spec(data), IdTable.from_parquet(ids)
    api = evaluate_retriever(load_t5(os.path.join(out, "model"))[0], ds, table, split="test", k=10, max_users=20, seed=0)
    assert res["tiger"]["num_examples"] == api["num_examples"] == 20
    assert res["tiger"]["recall@10"] == api["recall@10"] and res["tiger"]["ndcg@10"] == api["ndcg@10"]
    assert res["popularity"]["recall@10"] == evaluate_popularity(ds, split="test", max_users=20, seed=0)["recall@10"]
    assert main(["recommend", "--data", data, "--ids", ids, "--model", out, "--user", "0", "--k", "5",
                 "--temperature", "2,2,0.5,0.5"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith(("1.", "5."))]
    assert len(lines) == 2
    recs = str(tmp_path / "recs.parquet")
    assert main(["batch-recall", "--data", data, "--ids", ids, "--model", out, "--out", recs, "--k", "4",
                 "--quiet"]) == 0
    import pyarrow.parquet as pq

    t = pq.read_table(recs)
    assert t.num_rows == 120 and all(len(x) == 4 for x in t.column("item_ids").to_pylist())
    # unknown user: a clear error, not a traceback
    assert main(["recommend", "--data", data, "--ids", ids, "--model", out, "--user", "99999"]) == 2
    assert "error: --user 99999" in capsys.readouterr().err


# Not in test_plots.py, which is skipped without matplotlib: this must run exactly there.
def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as e:
        main(["id-report", "--ids", "x.parquet", "--plot", str(tmp_path / "p")])
    assert e.value.code == 2
    assert "tiger_fast[plot]" in capsys.readouterr().err
    from tiger_fast.plots import plot_learning_curves

    with pytest.raises(ImportError, match=r"tiger_fast\[plot\]"):
        plot_learning_curves({"a": [(1, 0.1)]}, tmp_path / "x.png")
