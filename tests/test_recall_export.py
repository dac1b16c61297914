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
    stale = list(c.scan_iter("t[0-9]*:rec:*"))  # this module's keys from an earlier run on the same server
    if stale:
        c.delete(*stale)
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
    assert r1 == {"users": 4, "skipped": False, "digest": r1["digest"], "removed_users": 0,
                  "stale_keys_deleted": 0}
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


def _staging(client, prefix):
    return list(client.scan_iter(f"{prefix}__staging__*"))


def test_missing_staged_list_changes_nothing_and_rerun_repairs(client, tmp_path):
    """A staged list that vanished before the switch (TTL expiry, eviction) used to leave 9 of 10
    users switched and the new digest written, so every rerun said skipped=True (issue 14, 3)."""
    from tiger_fast.recall_export import load_to_redis

    prefix = "t5:rec:"
    users = list(range(10))
    old, new = str(tmp_path / "old.parquet"), str(tmp_path / "new.parquet")
    _write_table(old, users, [[u] for u in users])
    _write_table(new, users, [[100 + u, u] for u in users])
    load_to_redis(old, client, prefix=prefix)
    old_digest = client.hget(f"{prefix}__meta__", "digest")

    class LosesOneKey(redis.Redis):
        def eval(self, *args):  # just before the switch: one staged list disappears
            victim = sorted(k for k in self.scan_iter(f"{prefix}__staging__:*:*"))[3]
            self.delete(victim)
            return super().eval(*args)
    lossy = LosesOneKey(connection_pool=client.connection_pool)
    with pytest.raises(RuntimeError, match="refused, nothing changed"):
        load_to_redis(new, lossy, prefix=prefix)
    assert _live(client, prefix, users) == {u: [u] for u in users}
    assert client.hget(f"{prefix}__meta__", "digest") == old_digest
    assert not _staging(client, prefix)
    rep = load_to_redis(new, client, prefix=prefix)
    assert not rep["skipped"] and _live(client, prefix, users) == {u: [100 + u, u] for u in users}


def test_damaged_live_list_is_not_reported_skipped(client, tmp_path):
    from tiger_fast.recall_export import load_to_redis

    prefix = "t6:rec:"
    path = str(tmp_path / "r.parquet")
    _write_table(path, [1, 2, 3], [[1, 2], [3], [4, 5, 6]])
    load_to_redis(path, client, prefix=prefix)
    client.delete(f"{prefix}2")  # the state a half-applied switch left behind
    rep = load_to_redis(path, client, prefix=prefix)
    assert not rep["skipped"] and _live(client, prefix, [1, 2, 3]) == {1: [1, 2], 2: [3], 3: [4, 5, 6]}
    assert load_to_redis(path, client, prefix=prefix)["skipped"]


def test_users_absent_from_the_new_export_are_removed(client, tmp_path):
    from tiger_fast.recall_export import load_to_redis

    prefix = "t7:rec:"
    old, new = str(tmp_path / "old.parquet"), str(tmp_path / "new.parquet")
    _write_table(old, list(range(10)), [[u] for u in range(10)])
    _write_table(new, [0, 2, 4, 11], [[7], [], [8], [9]])
    load_to_redis(old, client, prefix=prefix)
    rep = load_to_redis(new, client, prefix=prefix)
    assert rep["removed_users"] == 7  # 1, 3, 5..9
    live = {k.decode() for k in client.scan_iter(f"{prefix}*") if b"__" not in k}
    assert live == {f"{prefix}0", f"{prefix}4", f"{prefix}11"}  # user 2's list is empty: no key
    assert int(client.hget(f"{prefix}__meta__", "users")) == 4


def test_killed_loader_leaves_staging_keys_that_the_next_load_deletes(client, tmp_path):
    """kill -9 during staging (the old loader left 623k orphans after six kills)."""
    import signal
    import subprocess
    import sys
    import textwrap

    from tiger_fast.recall_export import load_to_redis

    prefix = "t8:rec:"
    users = list(range(5000))
    path = str(tmp_path / "r.parquet")
    _write_table(path, users, [[u, u + 1] for u in users])
    url = client.connection_pool.connection_kwargs
    code = textwrap.dedent(f"""
        import os, signal, redis
        import redis.client
        from tiger_fast.recall_export import load_to_redis
        real = redis.client.Pipeline.execute
        def execute(self, *a, **k):
            out = real(self, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)  # dies after the first staged batch
            return out
        redis.client.Pipeline.execute = execute
        load_to_redis({path!r}, redis.Redis(host={url.get('host', '127.0.0.1')!r}, port={url.get('port', 6379)},
                      db={url.get('db', 0)}), prefix={prefix!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    orphans = _staging(client, prefix)
    assert len(orphans) > 100 and all(client.ttl(k) == -1 for k in orphans[:5])  # no TTL to be evicted by
    rep = load_to_redis(path, client, prefix=prefix, stale_after_s=0.0)
    assert rep["stale_keys_deleted"] == len(orphans) - 1  # every staged list (the lengths hash aside)
    assert not _staging(client, prefix) and not client.hlen(f"{prefix}__loads__")
    assert _live(client, prefix, users[:3]) == {0: [0, 1], 1: [1, 2], 2: [2, 3]}


def test_redis_down_is_one_clear_error_without_the_password(tmp_path):
    from tiger_fast.recall_export import load_to_redis

    path = str(tmp_path / "r.parquet")
    _write_table(path, [1], [[1]])
    url = f"redis://:s3cret-pw@127.0.0.1:{_free_port()}/0"
    with pytest.raises(ConnectionError, match=r"redis: cannot reach redis://:\*\*\*@127.0.0.1") as e:
        load_to_redis(path, url)
    assert "s3cret" not in str(e.value)
    with pytest.raises(ValueError, match="bad URL") as e:
        load_to_redis(path, "http://:s3cret-pw@x/0")
    assert "s3cret" not in str(e.value)


def test_string_ids_leave_as_they_came(client, tmp_path):
    """A catalogue with string user and item ids exports those strings (Parquet and Redis), not the
    internal indices 0..N-1 (issue 14, 2)."""
    import dataclasses

    from tiger_fast.synthetic import synthetic_dataset
    from tiger_fast.generate import generate
    from tiger_fast.ids import IdTable
    from tiger_fast.layout import TokenLayout
    from tiger_fast.recall_export import batch_recall, load_to_redis
    from tiger_fast.t5 import T5, T5Config

    layout = TokenLayout(codebook_sizes=(5, 6, 7), collision_size=4, num_user_tokens=11)
    base = synthetic_dataset(num_items=53, num_users=19, seed=2)
    ds = dataclasses.replace(base, item_keys=[f"B0{i:04d}ASIN" for i in range(53)][::-1],
                             user_keys=[f"user-{u * 7}" for u in range(19)])
    rng = np.random.default_rng(3)
    codes = np.stack([rng.integers(0, s, 53) for s in layout.codebook_sizes], 1)
    table = IdTable.from_rq_codes(layout, ds.item_ids, codes)
    model = T5(T5Config(vocab_size=layout.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                        num_encoder_layers=1, num_decoder_layers=1, dropout=0.0), seed=0).eval()
    path = str(tmp_path / "recs.parquet")
    batch_recall(model, ds, table, path, k=5, batch_size=7, progress=False)
    t = pq.read_table(path)
    assert t.column("user_id").to_pylist() == ds.user_keys
    ref = generate(model, [ds.item_ids[s] for s in ds.sequences], table, user_ids=list(ds.user_ids), k=5)
    want = [[ds.item_keys[int(np.flatnonzero(ds.item_ids == i)[0])] for i in row if i >= 0]
            for row in ref.item_ids.tolist()]
    assert t.column("item_ids").to_pylist() == want
    prefix = "t9:rec:"
    load_to_redis(path, client, prefix=prefix)
    for u, items in zip(ds.user_keys, want):
        assert [x.decode() for x in client.lrange(f"{prefix}{u}", 0, -1)] == items
    assert not client.exists(f"{prefix}0")
