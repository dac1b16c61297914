import os

import numpy as np
import pytest
import torch

from tiger_fast.assign import assign_ids
from tiger_fast.ids import IdTable
from tiger_fast.layout import TokenLayout
from tiger_fast.rqvae import RQVAE, RQVAEConfig, save_rqvae



CFG = RQVAEConfig(input_dim=12, hidden_dims=(16,), latent_dim=4, codebook_sizes=(5, 3, 2))
LAYOUT = TokenLayout(codebook_sizes=(5, 3, 2), collision_size=64, num_user_tokens=7)
N = 1009  # prime: the last chunk / block is partial


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("assign")
    torch.manual_seed(0)
    model = RQVAE(CFG)
    g = np.random.default_rng(0)
    x = g.normal(size=(N, 12)).astype(np.float32)
    ids = g.choice(10**12, size=N, replace=False).astype(np.int64)
    with torch.no_grad():
        model.init_codebooks(torch.from_numpy(x[:200]), iters=5, generator=torch.Generator().manual_seed(1))
    np.save(d / "x.npy", x)
    np.save(d / "ids.npy", ids)
    # in-memory expectation: the same encoder blocks, the exact quantizer, IdTable collisions
    z = torch.cat([model.encoder(torch.from_numpy(x[s: s + 16])) for s in range(0, N, 16)]).detach()
    from tiger_fast.quantize import quantize

    rq = quantize(z, model.codebooks(), backend="reference")
    expect = IdTable.from_rq_codes(LAYOUT, ids, rq)
    return d, model, x, ids, expect


def _sorted(t: IdTable):
    c = t.codes.numpy()
    order = np.lexsort(tuple(c[:, l] for l in range(c.shape[1] - 1, -1, -1)))
    return t.item_ids.numpy()[order], c[order]


def test_npy_matches_in_memory_and_any_chunking(setup, tmp_path):
    d, model, x, ids, expect = setup
    outs = []
    for cs, pr in [(48, 97), (1024, 10**9), (2048, 1)]:
        out = tmp_path / f"ids_{cs}_{pr}.parquet"
        rep = assign_ids(model, d / "x.npy", out, ids=d / "ids.npy", layout=LAYOUT, chunk_size=cs,
                         encode_block=16, partition_rows=pr, backend="auto", progress=False)
        assert rep["rows"] == N and not os.path.exists(str(out) + ".work")
        outs.append(out.read_bytes())
        t = IdTable.from_parquet(out, layout=LAYOUT)
        # rows come out in semantic-ID order, matching the in-memory assignment exactly
        e_ids, e_codes = _sorted(expect)
        assert np.array_equal(t.item_ids.numpy(), e_ids) and np.array_equal(t.codes.numpy(), e_codes)
        r = expect.report()
        for k in ("num_items", "unique_prefixes", "colliding_items", "max_group_size",
                  "collision_histogram", "codebook_usage", "collision_usage"):
            assert rep[k] == r[k], k
    assert all(o == outs[0] for o in outs[1:])  # byte-identical files


def test_resume_after_kill(setup, tmp_path):
    d, model, x, ids, expect = setup
    ref = tmp_path / "ref.parquet"
    assign_ids(model, d / "x.npy", ref, ids=d / "ids.npy", layout=LAYOUT, chunk_size=128, encode_block=16,
               partition_rows=200, backend="auto", progress=False)
    out = tmp_path / "out.parquet"
    calls = []

    class Killed(Exception):
        pass

    def die_at(stage, index):
        def cb(s, i):
            calls.append((s, i))
            if (s, i) == (stage, index):
                raise Killed()
        return cb

    kw = dict(ids=d / "ids.npy", layout=LAYOUT, chunk_size=128, encode_block=16, partition_rows=200,
              backend="auto", progress=False)
    with pytest.raises(Killed):
        assign_ids(model, d / "x.npy", out, callback=die_at("map", 3), **kw)
    assert not out.exists()  # nothing that looks complete
    calls.clear()
    with pytest.raises(Killed):
        assign_ids(model, d / "x.npy", out, callback=die_at("reduce", 2), **kw)
    assert calls[0] == ("map", 4)  # chunks 0..3 were not redone
    assert not out.exists()
    calls.clear()
    rep = assign_ids(model, d / "x.npy", out, callback=die_at("never", 0), **kw)
    assert calls[0] == ("reduce", 3) and not any(s == "map" for s, _ in calls)
    assert out.read_bytes() == ref.read_bytes()
    assert rep["rows"] == N
    # a leftover temp directory of an interrupted chunk write does not confuse a resume
    out2 = tmp_path / "out2.parquet"
    with pytest.raises(Killed):
        assign_ids(model, d / "x.npy", out2, callback=die_at("map", 0), **kw)
    os.makedirs(str(out2) + ".work/map/c00000001.tmp123")
    assign_ids(model, d / "x.npy", out2, **kw)
    assert out2.read_bytes() == ref.read_bytes()


def test_resume_with_other_parameters_is_refused(setup, tmp_path):
    d, model, *_ = setup
    out = tmp_path / "o.parquet"
    kw = dict(ids=d / "ids.npy", layout=LAYOUT, encode_block=16, backend="auto", progress=False)

    def boom(s, i):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError):
        assign_ids(model, d / "x.npy", out, chunk_size=128, callback=boom, **kw)
    with pytest.raises(ValueError, match="different parameters.*chunk_size"):
        assign_ids(model, d / "x.npy", out, chunk_size=256, **kw)
    assign_ids(model, d / "x.npy", out, chunk_size=256, restart=True, **kw)
    assert out.exists()


def test_parquet_source_and_row_groups(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, model, x, ids, expect = setup
    for fixed in (True, False):
        vals = pa.array(x.reshape(-1))
        emb = (pa.FixedSizeListArray.from_arrays(vals, 12) if fixed
               else pa.ListArray.from_arrays(pa.array(np.arange(0, 12 * N + 1, 12, dtype=np.int32)), vals))
        src = tmp_path / f"emb_{fixed}.parquet"
        pq.write_table(pa.table({"item_id": ids, "embedding": emb}), src, row_group_size=101)
        out = tmp_path / f"out_{fixed}.parquet"
        assign_ids(model, src, out, layout=LAYOUT, chunk_size=160, encode_block=16, partition_rows=300,
                   backend="auto", progress=False)
        t = IdTable.from_parquet(out)
        e_ids, e_codes = _sorted(expect)
        assert np.array_equal(t.item_ids.numpy(), e_ids) and np.array_equal(t.codes.numpy(), e_codes)


def test_model_from_checkpoint_default_layout_and_row_ids(setup, tmp_path):
    d, model, x, ids, expect = setup
    save_rqvae(model, tmp_path / "ck")
    out = tmp_path / "o.parquet"
    rep = assign_ids(tmp_path / "ck", d / "x.npy", out, chunk_size=512, encode_block=16, backend="auto",
                     progress=False)
    t = IdTable.from_parquet(out)
    assert t.layout == TokenLayout(codebook_sizes=(5, 3, 2))
    assert sorted(t.item_ids.tolist()) == list(range(N))  # no ids file: the row index
    assert rep["num_items"] == N


def test_errors(setup, tmp_path):
    d, model, x, ids, _ = setup
    kw = dict(layout=LAYOUT, encode_block=16, chunk_size=256, backend="auto", progress=False)
    # collision overflow names the prefix
    small = TokenLayout(codebook_sizes=(5, 3, 2), collision_size=2)
    with pytest.raises(ValueError, match=r"prefix \(\d, \d, \d\) is shared by \d+ items"):
        assign_ids(model, d / "x.npy", tmp_path / "a.parquet", ids=d / "ids.npy",
                   **{**kw, "layout": small})
    assert not (tmp_path / "a.parquet").exists()
    # duplicate ids across chunks and partitions
    dup = ids.copy()
    dup[-1] = dup[0]
    np.save(tmp_path / "dup.npy", dup)
    with pytest.raises(ValueError, match="duplicate item ids"):
        assign_ids(model, d / "x.npy", tmp_path / "b.parquet", ids=tmp_path / "dup.npy", **kw)
    # NaN embedding names the row
    bad = x.copy()
    bad[500, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="row 500"):
        assign_ids(model, tmp_path / "nan.npy", tmp_path / "c.parquet", **kw)
    # wrong dimension, wrong chunking, wrong layout, missing file, missing column
    np.save(tmp_path / "wide.npy", np.zeros((4, 13), np.float32))
    with pytest.raises(ValueError, match="dimension 13"):
        assign_ids(model, tmp_path / "wide.npy", tmp_path / "d.parquet", **kw)
    with pytest.raises(ValueError, match="multiple of encode_block"):
        assign_ids(model, d / "x.npy", tmp_path / "e.parquet", **{**kw, "chunk_size": 40})
    with pytest.raises(ValueError, match="codebook sizes"):
        assign_ids(model, d / "x.npy", tmp_path / "f.parquet", **{**kw, "layout": TokenLayout()})
    with pytest.raises(FileNotFoundError):
        assign_ids(model, tmp_path / "none.npy", tmp_path / "g.parquet", **kw)
    with pytest.raises(ValueError, match="the model is on cpu"):
        assign_ids(model, d / "x.npy", tmp_path / "g.parquet", device="cuda:0", **kw)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"item_id": [1, 2]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match="no column"):
        assign_ids(model, tmp_path / "nocol.parquet", tmp_path / "h.parquet", **kw)
    ragged = pa.table({"item_id": [1, 2], "embedding": pa.array([[0.0] * 12, [0.0] * 11])})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="row 1 has length 11"):
        assign_ids(model, tmp_path / "ragged.parquet", tmp_path / "i.parquet", **kw)


def test_same_output_with_two_threads(setup, tmp_path):
    d, model, *_ = setup
    kw = dict(ids=d / "ids.npy", layout=LAYOUT, chunk_size=512, encode_block=16, backend="auto", progress=False)
    assign_ids(model, d / "x.npy", tmp_path / "a.parquet", **kw)
    try:
        torch.set_num_threads(2)
        assign_ids(model, d / "x.npy", tmp_path / "b.parquet", **kw)
    finally:
        torch.set_num_threads(1)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_workers_then_finish(setup, tmp_path):
    d, model, *_ = setup
    kw = dict(ids=d / "ids.npy", layout=LAYOUT, chunk_size=128, encode_block=16, partition_rows=300,
              backend="auto", progress=False)
    assign_ids(model, d / "x.npy", tmp_path / "ref.parquet", **kw)
    out = tmp_path / "w.parquet"
    reps = [assign_ids(model, d / "x.npy", out, worker=(i, 3), **kw) for i in (2, 0)]
    assert [r["chunks_mapped"] for r in reps] == [2, 3] and reps[-1]["chunks_total"] == 8
    assert not out.exists()
    calls = []
    assign_ids(model, d / "x.npy", out, callback=lambda s, i: calls.append((s, i)), **kw)
    assert [i for s, i in calls if s == "map"] == [1, 4, 7]  # only worker 1's share was left
    assert out.read_bytes() == (tmp_path / "ref.parquet").read_bytes()
    with pytest.raises(ValueError, match="worker must be"):
        assign_ids(model, d / "x.npy", out, worker=(3, 3), **kw)


# --- work-dir ownership (issue 14, item 1): another model's chunks are never adopted -------------
WIDE = TokenLayout(codebook_sizes=(5, 3, 2), collision_size=1024, num_user_tokens=7)


@pytest.fixture(scope="module")
def other_model(setup):
    d, model, x, ids, _ = setup
    torch.manual_seed(1)
    m = RQVAE(CFG)
    with torch.no_grad():
        m.init_codebooks(torch.from_numpy(x[300:500]), iters=5, generator=torch.Generator().manual_seed(2))
    return m


def _kw(d, **extra):
    return dict(ids=d / "ids.npy", layout=WIDE, chunk_size=128, encode_block=16, partition_rows=300,
                backend="auto", progress=False, **extra)


class _Stop(Exception):
    pass


def _stop_at(stage, index, action=None):
    def cb(s, i):
        if (s, i) == (stage, index):
            if action is not None:
                action()
            raise _Stop()
    return cb


def test_removed_work_dir_is_not_recreated(setup, tmp_path):
    """Run A finishing removes OUT.work while run B is still mapping: B's next chunk write must fail
    clearly instead of recreating OUT.work/map/... without a manifest (which a third run adopted)."""
    import shutil

    d, model, *_ = setup
    out = tmp_path / "o.parquet"
    work = str(out) + ".work"
    calls = []

    def cb(s, i):
        calls.append(i)
        if (s, i) == ("map", 2):
            shutil.rmtree(work)  # what the other run's cleanup does
    with pytest.raises(ValueError, match="was removed while this run was using it"):
        assign_ids(model, d / "x.npy", out, callback=cb, **_kw(d))
    assert calls == [0, 1, 2] and not os.path.exists(work) and not out.exists()


def test_unowned_work_dir_is_never_adopted(setup, other_model, tmp_path):
    """A work dir holding model A's chunks but no manifest (the straggler's leftover) must not be
    taken as fresh by a run with model B."""
    d, model, *_ = setup
    ref_b = tmp_path / "ref_b.parquet"
    assign_ids(other_model, d / "x.npy", ref_b, **_kw(d))
    out = tmp_path / "o.parquet"
    with pytest.raises(_Stop):
        assign_ids(model, d / "x.npy", out, callback=_stop_at("map", 5), **_kw(d))
    work = str(out) + ".work"
    for f in ("manifest.json", "lock"):
        if os.path.exists(os.path.join(work, f)):
            os.unlink(os.path.join(work, f))
    with pytest.raises(ValueError, match="not created by assign_ids"):
        assign_ids(other_model, d / "x.npy", out, **_kw(d))
    assert not out.exists()
    assign_ids(other_model, d / "x.npy", out, restart=True, **_kw(d))
    assert out.read_bytes() == ref_b.read_bytes()


def test_foreign_chunk_is_rejected_and_redone(setup, other_model, tmp_path):
    """A chunk written into B's work dir by a straggler of model A's run is recomputed, not skipped."""
    import shutil

    d, model, *_ = setup
    ref_b = tmp_path / "ref_b.parquet"
    assign_ids(other_model, d / "x.npy", ref_b, **_kw(d))
    a_out = tmp_path / "a.parquet"
    assign_ids(model, d / "x.npy", a_out, keep_work=True, **_kw(d))
    out = tmp_path / "o.parquet"
    with pytest.raises(_Stop):
        assign_ids(other_model, d / "x.npy", out, callback=_stop_at("map", 1), **_kw(d))
    for c in ("c00000005", "c00000006"):
        shutil.copytree(f"{a_out}.work/map/{c}", f"{out}.work/map/{c}")
    rep = assign_ids(other_model, d / "x.npy", out, **_kw(d))
    assert out.read_bytes() == ref_b.read_bytes()
    assert out.read_bytes() != a_out.read_bytes()  # the models really give different IDs
    assert rep["chunks_rejected"] == 2


def test_work_dir_in_use_is_refused(setup, tmp_path):
    """Two runs on one --out at the same time: the second is refused while the first holds the lock."""
    import subprocess
    import sys

    d, model, *_ = setup
    out = tmp_path / "o.parquet"
    with pytest.raises(_Stop):
        assign_ids(model, d / "x.npy", out, callback=_stop_at("map", 0), **_kw(d))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); sys.stdin.read()"), f"{out}.work/lock"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="in use by another assign_ids run"):
            assign_ids(model, d / "x.npy", out, **_kw(d))
        with pytest.raises(ValueError, match="in use"):
            assign_ids(model, d / "x.npy", out, worker=(0, 2), **_kw(d))
        with pytest.raises(ValueError, match="in use"):
            assign_ids(model, d / "x.npy", out, restart=True, **_kw(d))
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    rep = assign_ids(model, d / "x.npy", out, **_kw(d))
    assert rep["rows"] == N


@pytest.mark.parametrize("kind", ["dir", "devnull", "fifo"])
def test_output_that_is_not_a_regular_file_is_refused(setup, tmp_path, kind):
    """--out naming a directory, a device node or a FIFO is refused and left as it was (issue 14, 7)."""
    d, model, *_ = setup
    if kind == "dir":
        out = tmp_path / "adir"
        out.mkdir()
    elif kind == "devnull":
        out = tmp_path / "null"
        os.symlink(os.devnull, out)  # the target /dev/null itself, reached through a link
    else:
        out = tmp_path / "fifo"
        os.mkfifo(out)
    before = os.stat(out)
    with pytest.raises(ValueError, match="refusing to replace it"):
        assign_ids(model, d / "x.npy", out, **_kw(d))
    after = os.stat(out)
    assert (before.st_mode, before.st_ino, before.st_dev) == (after.st_mode, after.st_ino, after.st_dev)
    assert not os.path.exists(str(out) + ".work")


def test_empty_npy_and_ids_beyond_int64_are_clear_errors(setup, tmp_path):
    """An empty .npy used to raise EOFError; uint64 ids above 2^63-1 used to wrap to negative ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, model, x, ids, _ = setup
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read embeddings .*empty.npy as .npy: the file is empty"):
        assign_ids(model, tmp_path / "empty.npy", tmp_path / "a.parquet", **_kw(d))
    with pytest.raises(ValueError, match="cannot read item ids .*empty.npy as .npy"):
        assign_ids(model, d / "x.npy", tmp_path / "a.parquet", **{**_kw(d), "ids": tmp_path / "empty.npy"})
    big = ids.astype(np.uint64)
    big[7] = np.uint64(2**63 + 5)
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(ValueError, match=r"id 9223372036854775813 \(row 7\) is beyond the int64 range"):
        assign_ids(model, d / "x.npy", tmp_path / "b.parquet", **{**_kw(d), "ids": tmp_path / "big.npy"})
    pq.write_table(pa.table({"item_id": pa.array(big, pa.uint64()),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 12)}),
                   tmp_path / "big.parquet")
    with pytest.raises(ValueError, match="beyond the int64 range"):
        assign_ids(model, tmp_path / "big.parquet", tmp_path / "c.parquet",
                   **{k: v for k, v in _kw(d).items() if k != "ids"})
    assert not any(p.suffix == ".parquet" and p.stem in "abc" for p in tmp_path.iterdir())
