"""Artefacts of different catalogues never mix silently (issue 14, "Artefacts from different
catalogues"): every artefact records what it was built from (tiger_fast/provenance.py) and every
consumer refuses a mismatch with one error naming both inputs and the override flag.

Two synthetic catalogues with the same integer item ids 0..N-1 (seeds 0 and 1) play the two
catalogues: before fingerprints, each command below ran on the mixed inputs and exited 0."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

from tiger_fast.cli import load_dataset_spec, main
from tiger_fast.ids import IdTable
from tiger_fast.provenance import (catalogue_fingerprint, check_same, id_table_digest, read_sidecar,
                                   sidecar_path, write_sidecar)
from tiger_fast.rqvae import load_rqvae
from tiger_fast.t5 import load_t5
from tiger_fast.train import latest_checkpoint, load_checkpoint

A = "synthetic:items=240,users=300,seed=0"
B = "synthetic:items=240,users=300,seed=1"
SIZES = ["--codebook-sizes", "16,16,16"]


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def ok(argv):
    rc, out, err = run(argv)
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Each catalogue through embed -> train-rqvae -> assign-ids; catalogue A also through train."""
    d = tmp_path_factory.mktemp("prov")
    p = {k: str(d / k) for k in ("a.npy", "b.npy", "rqa", "rqb", "ida.parquet", "idb.parquet", "ra")}
    for spec, emb, rq, ids in ((A, "a.npy", "rqa", "ida.parquet"), (B, "b.npy", "rqb", "idb.parquet")):
        ok(["embed", "--data", spec, "--out", p[emb], "--quiet"])
        ok(["train-rqvae", "--embeddings", p[emb], "--out", p[rq], "--epochs", "3", "--quiet"] + SIZES)
        ok(["assign-ids", "--rqvae", p[rq], "--embeddings", p[emb], "--out", p[ids], "--quiet"])
    ok(["train", "--data", A, "--ids", p["ida.parquet"], "--out", p["ra"], "--steps", "2", "--layers", "1",
        "--batch-size", "16", "--eval-users", "0", "--quiet"])
    return p


def test_each_artefact_records_the_catalogue_it_came_from(two):
    fa = catalogue_fingerprint(load_dataset_spec(A))
    fb = catalogue_fingerprint(load_dataset_spec(B))
    assert fa["digest"] != fb["digest"] and fa["items"] == fb["items"] == 240  # same ids, other items
    side = read_sidecar(two["a.npy"])
    assert side["catalogue"] == fa and side["rows"] == 240
    assert load_rqvae(two["rqa"]).provenance["catalogue"] == fa
    ta = IdTable.from_parquet(two["ida.parquet"])
    assert ta.provenance["catalogue"] == fa and len(ta.provenance["rqvae"]) == 32
    model, _ = load_t5(os.path.join(two["ra"], "model"))
    assert model.provenance == {"id_table": id_table_digest(ta), "catalogue": fa}
    # the training checkpoints carry it too (a resume with another ID table is refused below)
    _, meta = load_checkpoint(latest_checkpoint(os.path.join(two["ra"], "checkpoints")))
    assert meta["provenance"] == model.provenance


def test_assign_ids_refuses_an_rqvae_of_another_catalogue(two, tmp_path):
    out = str(tmp_path / "x.parquet")
    rc, _, err = run(["assign-ids", "--rqvae", two["rqa"], "--embeddings", two["b.npy"], "--out", out, "--quiet"])
    assert rc == 2 and "--rqvae" in err and "--allow-other-catalogue" in err and not os.path.exists(out)
    ok(["assign-ids", "--rqvae", two["rqa"], "--embeddings", two["b.npy"], "--out", out, "--quiet",
        "--allow-other-catalogue"])
    # deliberate reuse: the table records the catalogue of its items (B) and the model it came from
    t = IdTable.from_parquet(out)
    assert t.provenance["catalogue"] == read_sidecar(two["b.npy"])["catalogue"]
    assert t.provenance["rqvae"] == IdTable.from_parquet(two["ida.parquet"]).provenance["rqvae"]


@pytest.mark.parametrize("cmd", ["train", "id-report", "evaluate", "recommend", "batch-recall"])
def test_an_id_table_of_another_catalogue_is_refused(two, tmp_path, cmd):
    extra = {"train": ["--out", str(tmp_path / "r"), "--steps", "1", "--layers", "1", "--eval-users", "0"],
             "id-report": [], "evaluate": ["--model", two["ra"], "--max-users", "5"],
             "recommend": ["--model", two["ra"], "--user", "3"],
             "batch-recall": ["--model", two["ra"], "--out", str(tmp_path / "r.parquet")]}[cmd]
    argv = [cmd, "--data", B, "--ids", two["ida.parquet"], "--quiet"] + extra
    if cmd == "recommend":
        argv.remove("--quiet")
    rc, out, err = run(argv)
    assert rc == 2, (out, err)
    assert f"--ids {two['ida.parquet']} vs --data {B}" in err and "--allow-other-catalogue" in err
    assert not os.path.exists(tmp_path / "r") and not os.path.exists(tmp_path / "r.parquet")


@pytest.mark.parametrize("cmd", ["evaluate", "recommend", "batch-recall"])
def test_a_retriever_of_another_id_table_is_refused(two, tmp_path, cmd):
    extra = {"evaluate": ["--max-users", "5", "--quiet"], "recommend": ["--user", "3"],
             "batch-recall": ["--out", str(tmp_path / "r.parquet"), "--quiet"]}[cmd]
    base = [cmd, "--data", B, "--ids", two["idb.parquet"], "--model", two["ra"]] + extra
    rc, _, err = run(base)
    assert rc == 2 and "--model" in err and "vs --ids" in err and "--allow-other-catalogue" in err
    assert not os.path.exists(tmp_path / "r.parquet")
    ok(base + ["--allow-other-catalogue"])  # deliberate: runs


def test_resuming_a_checkpoint_of_another_id_table_is_refused(two, tmp_path):
    out = str(tmp_path / "r")
    args = ["--out", out, "--steps", "2", "--layers", "1", "--batch-size", "16", "--eval-users", "0", "--quiet"]
    ok(["train", "--data", A, "--ids", two["ida.parquet"]] + args)
    # the same catalogue's items, other semantic IDs: the old optimizer state does not continue this run
    other = str(tmp_path / "ida2.parquet")
    ok(["assign-ids", "--rqvae", two["rqb"], "--embeddings", two["a.npy"], "--out", other, "--quiet",
        "--allow-other-catalogue"])
    rc, _, err = run(["train", "--data", A, "--ids", other, "--steps", "3"] + args)
    assert rc == 2 and "another ID table" in err and "checkpoint" in err


def test_serve_loader_refuses_mixed_artefacts(two):
    from tiger_fast.serve import load_recommender

    model = os.path.join(two["ra"], "model")
    with pytest.raises(ValueError, match="vs --ids"):
        load_recommender(model, two["idb.parquet"])
    with pytest.raises(ValueError, match="vs --data"):
        load_recommender(model, two["ida.parquet"], dataset=load_dataset_spec(B))
    with pytest.raises(ValueError, match="--rqvae"):
        load_recommender(model, two["ida.parquet"], rqvae_dir=two["rqb"])
    rec = load_recommender(model, two["ida.parquet"], rqvae_dir=two["rqa"], dataset=load_dataset_spec(A))
    assert rec is not None
    assert load_recommender(model, two["idb.parquet"], allow_other_catalogue=True) is not None


def test_assign_ids_takes_the_ids_file_embed_wrote(two, tmp_path):
    """Beauty's item ids are 1..N: with the row index as id every ID would shift by one item."""
    ds = load_dataset_spec(A)
    emb = np.load(two["a.npy"])
    shifted = tmp_path / "s.npy"
    np.save(shifted, emb)
    np.save(tmp_path / "s.ids.npy", np.asarray(ds.item_ids) + 1000)
    out = str(tmp_path / "s.parquet")
    rc, _, err = run(["assign-ids", "--rqvae", two["rqa"], "--embeddings", str(shifted), "--out", out, "--quiet"])
    assert rc == 0 and "s.ids.npy" in err
    t = IdTable.from_parquet(out)
    assert torch.equal(torch.sort(t.item_ids).values, torch.from_numpy(np.sort(ds.item_ids + 1000)))


def test_unknown_provenance_is_accepted_and_stale_sidecars_ignored(two, tmp_path):
    ta = IdTable.from_parquet(two["ida.parquet"])
    bare = IdTable(ta.layout, ta.item_ids, ta.codes)  # e.g. a table written before fingerprints
    bare.to_parquet(tmp_path / "bare.parquet")
    assert IdTable.from_parquet(tmp_path / "bare.parquet").provenance == {}
    ok(["id-report", "--data", B, "--ids", str(tmp_path / "bare.parquet"), "--quiet"])
    # a sidecar that records another row count describes other embeddings: ignored
    emb = tmp_path / "e.npy"
    np.save(emb, np.zeros((3, 4), np.float32))
    write_sidecar(str(emb), {"catalogue": {"digest": "x", "items": 9, "name": "n"}, "rows": 9})
    assert read_sidecar(str(emb), rows=3) is None and read_sidecar(str(emb), rows=9)["rows"] == 9
    with open(sidecar_path(str(emb)), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="provenance sidecar"):
        read_sidecar(str(emb))


def test_check_same_semantics():
    fa = {"digest": "a" * 32, "items": 5, "name": "x"}
    fb = {"digest": "b" * 32, "items": 5, "name": "x"}
    check_same("w", fa, dict(fa))            # equal
    check_same("w", None, fb)                 # unknown on one side: accepted
    check_same("w", fa, None)
    with pytest.raises(ValueError, match=r"^w: .*catalogue x \(5 items, aaaaaaaaaaaa\).*bbbbbbbbbbbb.*--flag"):
        check_same("w", fa, fb, "--flag")
    with pytest.raises(ValueError, match="ID table 111111111111"):
        check_same("w", "1" * 32, "2" * 32)
    # the catalogue digest covers metadata, not only ids; interactions do not count
    ds = load_dataset_spec(A)
    f0 = catalogue_fingerprint(ds)
    ds.sequences = ds.sequences[:10]
    assert catalogue_fingerprint(ds) == f0
    ds.items[0] = {**ds.items[0], "title": ds.items[0].get("title", "") + "!"}
    assert catalogue_fingerprint(ds)["digest"] != f0["digest"]
    assert json.loads(json.dumps(f0)) == f0
