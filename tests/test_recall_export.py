"""Batch recall to Parquet and the all-or-nothing, idempotent Redis load (real redis-server)."""
import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

redis = pytest.importorskip("redis", reason="the redis client package is not installed")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """TIGER_FAST_REDIS_URL (CI starts a server) or a private redis-server on a free loopback port."""
    url = os.environ.get("TIGER_FAST_REDIS_URL")
    proc = None
    if not url:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("no redis-server binary and TIGER_FAST_REDIS_URL unset (apt-get install redis-server)")
        port = _free_port()
        d = tmp_path_factory.mktemp("redis")
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
    c = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            c.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield c
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


def _write_table(path, users, lists):
    pq.write_table(pa.table({"user_id": users, "item_ids": pa.array(lists, type=pa.list_(pa.int64())),
                             "scores": pa.array([[0.0] * len(x) for x in lists], type=pa.list_(pa.float32()))}),
                   path)


def _live(client, prefix, users):
    return {u: [int(x) for x in client.lrange(f"{prefix}{u}", 0, -1)] for u in users}


def test_load_is_idempotent_and_exact(client, tmp_path):
    prefix = "t1:rec:"
    path = str(tmp_path / "recs.parquet")
    users = [0, 7, 13, 101]
    lists = [[5, 3, 9], [1], [], [2, 2, 4, 8]]  # an empty list and a repeated id are kept as given
    _write_table(path, users, lists)
    from tiger_fast.recall_export import load_to_redis

    r1 = load_to_redis(path, client, prefix=prefix)
    assert r1 == {"users": 4, "skipped": False, "digest": r1["digest"]}
    assert _live(client, prefix, users) == dict(zip(users, lists))
    r2 = load_to_redis(path, client, prefix=prefix)
    assert r2["skipped"] and r2["digest"] == r1["digest"]
    assert _live(client, prefix, users) == dict(zip(users, lists))
    assert not list(client.scan_iter(f"{prefix}__staging__*"))


def test_failed_load_leaves_live_keys_untouched(client, tmp_path):
    prefix = "t2:rec:"
    from tiger_fast.recall_export import load_to_redis

    old = str(tmp_path / "old.parquet")
    users = list(range(50))
    _write_table(old, users, [[u, u + 1] for u in users])
    load_to_redis(old, client, prefix=prefix)
    new = str(tmp_path / "new.parquet")
    _write_table(new, users, [[1000 + u] for u in users])
    with pytest.raises(RuntimeError, match="injected"):
        load_to_redis(new, client, prefix=prefix, fail_after=17)
    assert _live(client, prefix, users) == {u: [u, u + 1] for u in users}
    assert not list(client.scan_iter(f"{prefix}__staging__*"))
    load_to_redis(new, client, prefix=prefix)
    assert _live(client, prefix, users) == {u: [1000 + u] for u in users}


def test_bad_inputs(client, tmp_path):
    from tiger_fast.recall_export import load_to_redis

    with pytest.raises(ValueError, match="path"):
        load_to_redis(str(tmp_path / "missing.parquet"), client)
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"x": [1]}), bad)
    with pytest.raises(ValueError, match="not a recall table"):
        load_to_redis(bad, client)
    good = str(tmp_path / "good.parquet")
    _write_table(good, [1], [[1]])
    with pytest.raises(ValueError, match="prefix"):
        load_to_redis(good, client, prefix="")


def test_batch_recall_matches_generate(tmp_path):
    """Every user's exported list equals generate() on the same history (a tiny random model)."""
    from tiger_fast.synthetic import synthetic_dataset
    from tiger_fast.generate import generate
    from tiger_fast.ids import IdTable
    from tiger_fast.layout import TokenLayout
    from tiger_fast.recall_export import batch_recall
    from tiger_fast.t5 import T5, T5Config

    layout = TokenLayout(codebook_sizes=(5, 6, 7), collision_size=4, num_user_tokens=11)
    ds = synthetic_dataset(num_items=97, num_users=37, seed=1)
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, s, 97) for s in layout.codebook_sizes], 1)
    table = IdTable.from_rq_codes(layout, ds.item_ids, codes)
    model = T5(T5Config(vocab_size=layout.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                        num_encoder_layers=1, num_decoder_layers=1, dropout=0.0), seed=0).eval()
    path = str(tmp_path / "recs.parquet")
    rep = batch_recall(model, ds, table, path, k=6, batch_size=10, progress=False)
    assert rep["users"] == 37
    t = pq.read_table(path)
    assert t.column("user_id").to_pylist() == ds.user_ids.tolist()
    hist = [ds.item_ids[s] for s in ds.sequences]
    ref = generate(model, hist, table, user_ids=list(ds.user_ids), k=6)
    assert t.column("item_ids").to_pylist() == ref.item_ids.tolist()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
