"""Offline batch recall: top-K for every user to Parquet, and an idempotent, all-or-nothing load of
that table into Redis (key -> list of item ids).

The Parquet table has one row per user: ``user_id`` (the catalogue's own id: the string key when
the dataset has ``user_keys``, else the int64 ``user_ids``), ``item_ids`` (list of the catalogue's
item ids, best first: strings when the dataset has ``item_keys``, else int64), ``scores``
(list<float32>).  It is written with ``tiger_fast.atomic.write_atomic``, so a file at the final
path is always whole.

Redis layout: ``<prefix><user_id>`` -> Redis list of item ids (best first); ``<prefix>__meta__``
-> hash {digest, users}; ``<prefix>__users__`` -> hash {user_id: list length} of the live users.
A load stages every list under ``<prefix>__staging__:<run>:<user_id>`` (no TTL: nothing the
loader relies on can expire or be evicted under a ``volatile-*`` policy), then one Lua script
(atomic in Redis) first checks that every staged list exists with its expected length and only
then renames all of them onto the live keys, deletes the users absent from the new table, and
writes the metadata: readers see the old lists or the new ones, never a mix.  If a check fails the
script writes nothing and the load raises.  After the flip every live list's length is verified
against the table.  Re-loading the same table is a no-op (``skipped=True``) only if that
verification passes, so a damaged load is repaired by rerunning it.  Each run registers itself in
``<prefix>__loads__`` (run -> heartbeat time); staging keys of runs whose heartbeat is older than
``stale_after_s`` (killed loaders) are deleted by the next load.
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .atomic import check_target, write_atomic
from .checks import check_int

STALE_AFTER_S = 600.0  # a load that has not staged anything for this long is considered dead

# KEYS: meta, users hash (live), staged lengths hash.  ARGV: live prefix, staging prefix, digest.
# Checks first (no write before all checks pass), then flips.
_FLIP = """
local lens = redis.call('HGETALL', KEYS[3])
local n = 0
for i = 1, #lens, 2 do
  local want = tonumber(lens[i + 1])
  if want > 0 then
    local got = redis.call('LLEN', ARGV[2] .. lens[i])
    if got ~= want then
      return redis.error_reply('staged list of user ' .. lens[i] .. ' has ' .. got .. ' items, expected ' .. want)
    end
  end
  n = n + 1
end
local new = {}
for i = 1, #lens, 2 do
  new[lens[i]] = true
  if tonumber(lens[i + 1]) > 0 then
    redis.call('RENAME', ARGV[2] .. lens[i], ARGV[1] .. lens[i])
  else
    redis.call('DEL', ARGV[1] .. lens[i])
  end
end
local old = redis.call('HKEYS', KEYS[2])
local removed = 0
for i = 1, #old do
  if not new[old[i]] then
    redis.call('DEL', ARGV[1] .. old[i])
    removed = removed + 1
  end
end
redis.call('DEL', KEYS[2])
if n > 0 then redis.call('RENAME', KEYS[3], KEYS[2]) end
redis.call('HSET', KEYS[1], 'digest', ARGV[3], 'users', n)
return removed
"""


def _export_ids(dataset):
    """(user ids as exported: list, item id -> exported id function)."""
    users = (list(dataset.user_keys) if getattr(dataset, "user_keys", None) is not None
             else np.asarray(dataset.user_ids).tolist())
    keys = getattr(dataset, "item_keys", None)
    if keys is None:
        return users, None
    keys = np.asarray(list(keys), dtype=object)
    return users, keys


def batch_recall(model, dataset, id_table, path, *, k: int = 10, batch_size: int = 256,
                 max_history: int = 20, backend: str = "auto", temperature=None, seed: int = 0,
                 progress: bool = True, precision: str = "fp32") -> dict:
    """Top-k items for every user of ``dataset`` from their full history; writes Parquet at ``path``
    with the catalogue's own user and item ids (see the module docstring).

    Histories are each user's whole sequence (the next item is what we recommend).  Returns a dict
    with ``path``, ``users`` and ``seconds``.  precision: generate's numeric mode ("fp32" exact)."""
    from tqdm.auto import tqdm

    from .generate import generate

    k = check_int(k, "k")
    batch_size = check_int(batch_size, "batch_size")
    path = check_target(os.fspath(path), "path")
    user_ids = np.asarray(dataset.user_ids)
    out_users, item_keys = _export_ids(dataset)
    t0 = time.perf_counter()
    all_items, all_scores = [], []
    bar = tqdm(total=len(user_ids), desc="batch recall", unit="user", disable=not progress)
    for s in range(0, len(user_ids), batch_size):
        users = user_ids[s:s + batch_size]
        hist = [dataset.item_ids[seq] for seq in dataset.sequences[s:s + batch_size]]
        res = generate(model, hist, id_table, user_ids=list(users), k=k, backend=backend,
                       temperature=temperature, seed=seed, max_history=max_history,
                       row_keys=torch.arange(s, s + len(users)), precision=precision)
        all_items.append(res.item_ids.numpy())
        all_scores.append(res.scores.numpy())
        bar.update(len(users))
    bar.close()
    items = np.concatenate(all_items) if all_items else np.zeros((0, k), np.int64)
    scores = np.concatenate(all_scores) if all_scores else np.zeros((0, k), np.float32)
    # -1 padding (fewer valid IDs than k) is dropped from the lists rather than exported.
    valid = items >= 0
    if item_keys is None:
        item_lists = [row[ok].tolist() for row, ok in zip(items, valid)]
        item_type = pa.list_(pa.int64())
    else:  # external int id -> catalogue position -> the catalogue's string id
        pos = dataset.index_of(np.where(valid, items, dataset.item_ids[0]).reshape(-1)).reshape(items.shape)
        item_lists = [item_keys[prow[ok]].tolist() for prow, ok in zip(pos, valid)]
        item_type = pa.list_(pa.string())
    score_lists = [srow[ok].tolist() for ok, srow in zip(valid, scores)]
    table = pa.table({
        "user_id": pa.array(out_users, type=pa.string() if getattr(dataset, "user_keys", None) is not None
                            else pa.int64()),
        "item_ids": pa.array(item_lists, type=item_type),
        "scores": pa.array(score_lists, type=pa.list_(pa.float32())),
    })
    write_atomic(path, lambda tmp: pq.write_table(table, tmp), what="path")
    return {"path": path, "users": len(user_ids), "seconds": time.perf_counter() - t0}


def _read_recall_table(path) -> pa.Table:
    try:
        table = pq.read_table(os.fspath(path))
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"path: cannot read recall table {path!r}: {e}") from e
    missing = {"user_id", "item_ids"} - set(table.column_names)
    if missing:
        raise ValueError(f"path: {path!r} is not a recall table (missing columns {sorted(missing)})")
    return table


def _digest(table: pa.Table) -> str:
    h = hashlib.sha256()
    for u, items in zip(table.column("user_id").to_pylist(), table.column("item_ids").to_pylist()):
        h.update(f"{u}:{','.join(map(str, items))};".encode())
    return h.hexdigest()


def _redacted(url: str) -> str:
    """``url`` without its password (for messages)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        u = urlsplit(url)
        if u.password is None:
            return url
        netloc = f"{u.username or ''}:***@" + (u.hostname or "") + (f":{u.port}" if u.port else "")
        return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))
    except ValueError:
        return "<unparseable URL>"


def _client(client):
    if not isinstance(client, str):
        return client, None
    try:
        import redis
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading into Redis needs the 'redis' package: pip install redis") from e
    try:
        return redis.Redis.from_url(client), _redacted(client)
    except ValueError as e:
        raise ValueError(f"redis: bad URL {_redacted(client)!r} (want redis://[:password@]host:port/db): "
                         f"{str(e).replace(client, _redacted(client))}") from None


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def _delete_keys(client, keys) -> None:
    keys = list(keys)
    for s in range(0, len(keys), 1000):
        client.delete(*keys[s:s + 1000])


def _delete_run(client, prefix: str, run: str) -> int:
    """Delete every staging key of load ``run`` (found by SCAN); returns how many."""
    base = f"{prefix}__staging__:{run}"
    keys = list(client.scan_iter(match=_glob_escape(base + ":") + "*", count=1000))
    _delete_keys(client, keys + [base])
    return len(keys)


def _clean_stale(client, prefix: str, stale_after_s: float) -> int:
    """Remove staging keys of loads whose heartbeat is older than ``stale_after_s`` (killed loaders)."""
    loads_key = f"{prefix}__loads__"
    now = time.time()
    n = 0
    for run, beat in client.hgetall(loads_key).items():
        run = run.decode()
        try:
            age = now - float(beat)
        except ValueError:
            age = float("inf")
        if age > stale_after_s:
            n += _delete_run(client, prefix, run)
            client.hdel(loads_key, run)
    return n


def _verify(client, prefix: str, users: list[str], lists: list, digest: str) -> str | None:
    """None when the live keys hold exactly the table's list lengths and metadata, else what differs."""
    meta = client.hgetall(f"{prefix}__meta__")
    if meta.get(b"digest", b"").decode() != digest:
        return "the metadata digest differs"
    if int(meta.get(b"users", -1)) != len(users) or client.hlen(f"{prefix}__users__") != sum(1 for _ in users):
        return "the user count differs"
    for s in range(0, len(users), 10000):
        pipe = client.pipeline(transaction=False)
        for u in users[s:s + 10000]:
            pipe.llen(f"{prefix}{u}")
        for u, got, items in zip(users[s:s + 10000], pipe.execute(), lists[s:s + 10000]):
            if got != len(items):
                return f"user {u}: live list has {got} items, the table {len(items)}"
    return None


def load_to_redis(path, client, *, prefix: str = "tiger:rec:", fail_after: int | None = None,
                  stale_after_s: float = STALE_AFTER_S) -> dict:
    """Load a recall table into Redis atomically (see the module docstring).

    client: a ``redis.Redis`` instance (or URL string).  ``fail_after`` is for tests: raise after
    staging that many users, to check that a failed load leaves no live key changed.
    stale_after_s: staging keys of loads silent for longer than this are deleted first.
    Returns ``{"users", "skipped", "digest", "removed_users", "stale_keys_deleted"}``.
    Raises ValueError (bad table, duplicate users), ConnectionError (Redis unreachable; the
    message names the URL without its password), RuntimeError (the flip was refused or its
    verification failed; the live keys then hold the old lists, rerun the load)."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    table = _read_recall_table(path)
    users = [str(u) for u in table.column("user_id").to_pylist()]
    if len(set(users)) != len(users):
        dup = sorted({u for u in users if users.count(u) > 1})[:5] if len(users) < 10000 else "(several)"
        raise ValueError(f"path: {path!r} has duplicate user ids {dup}; one row per user")
    lists = [[str(i) for i in items] for items in table.column("item_ids").to_pylist()]
    digest = _digest(table)
    client, url = _client(client)
    import redis

    try:
        return _load(client, prefix, users, lists, digest, fail_after, stale_after_s)
    except redis.ConnectionError as e:
        where = url or "the given client"
        raise ConnectionError(f"redis: cannot reach {where}: {e}") from None


def _load(client, prefix, users, lists, digest, fail_after, stale_after_s) -> dict:
    import redis

    stale = _clean_stale(client, prefix, stale_after_s)
    if _verify(client, prefix, users, lists, digest) is None:
        return {"users": len(users), "skipped": True, "digest": digest, "removed_users": 0,
                "stale_keys_deleted": stale}
    meta_key, users_key, loads_key = f"{prefix}__meta__", f"{prefix}__users__", f"{prefix}__loads__"
    run = uuid.uuid4().hex[:12]
    lens_key = f"{prefix}__staging__:{run}"
    staging = lens_key + ":"
    client.hset(loads_key, run, time.time())  # registered before the first staged key
    staged: list[str] = []
    try:
        pipe = client.pipeline(transaction=False)
        for n, (u, items) in enumerate(zip(users, lists)):
            if fail_after is not None and n >= fail_after:
                raise RuntimeError(f"injected failure after staging {n} users")
            if items:  # Redis has no empty lists: an empty list is an absent key
                staged.append(staging + u)
                pipe.rpush(staging + u, *items)
            pipe.hset(lens_key, u, len(items))
            if len(pipe) >= 2000:
                pipe.hset(loads_key, run, time.time())  # heartbeat
                pipe.execute()
        pipe.execute()
        try:
            removed = int(client.eval(_FLIP, 3, meta_key, users_key, lens_key, prefix, staging, digest))
        except redis.ResponseError as e:
            raise RuntimeError(f"redis: the switch to the new lists was refused, nothing changed: {e}; "
                               "rerun the load") from None
    except BaseException:
        try:
            _delete_keys(client, staged + [lens_key])
            client.hdel(loads_key, run)
        except redis.RedisError:
            pass  # the next load deletes them (stale heartbeat)
        raise
    client.hdel(loads_key, run)
    bad = _verify(client, prefix, users, lists, digest)
    if bad is not None:
        client.hdel(meta_key, "digest")  # never reported as done: a rerun reloads
        raise RuntimeError(f"redis: verification after the switch failed ({bad}); rerun the load")
    return {"users": len(users), "skipped": False, "digest": digest, "removed_users": removed,
            "stale_keys_deleted": stale}
