"""Offline batch recall: top-K for every user to Parquet, and an idempotent, all-or-nothing load of
that table into Redis (key -> list of item ids).

The Parquet table has one row per user: ``user_id`` (as in the dataset), ``item_ids`` (list<int64>,
best first), ``scores`` (list<float32>).  It is written to a temporary name and renamed when
complete, so a file at the final path is always whole.

Redis layout: ``<prefix><user_id>`` -> Redis list of item ids (best first), plus
``<prefix>__meta__`` -> a hash with the table's content digest and the number of users.
Loading writes every list under a staging key, then renames all staging keys onto the live keys in
one MULTI/EXEC transaction, so readers see either the old lists or the new ones, never a mix; a
load that fails before the transaction leaves the live keys untouched and its staging keys are
deleted (and carry a TTL, so even a killed loader leaves nothing behind for long).  Re-loading the
same table is a no-op that reports ``skipped=True``.
"""
from __future__ import annotations

import hashlib
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

STAGING_TTL_S = 3600


def batch_recall(model, dataset, id_table, path, *, k: int = 10, batch_size: int = 256,
                 max_history: int = 20, backend: str = "auto", temperature=None, seed: int = 0,
                 progress: bool = True) -> dict:
    """Top-k items for every user of ``dataset`` from their full history; writes Parquet at ``path``.

    Histories are each user's whole sequence (the next item is what we recommend).  Returns a dict
    with ``path``, ``users`` and ``seconds``."""
    import time

    from tqdm.auto import tqdm

    from .generate import generate

    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    path = os.fspath(path)
    user_ids = np.asarray(dataset.user_ids)
    t0 = time.perf_counter()
    all_items, all_scores = [], []
    bar = tqdm(total=len(user_ids), desc="batch recall", unit="user", disable=not progress)
    for s in range(0, len(user_ids), batch_size):
        users = user_ids[s:s + batch_size]
        hist = [dataset.item_ids[seq] for seq in dataset.sequences[s:s + batch_size]]
        res = generate(model, hist, id_table, user_ids=list(users), k=k, backend=backend,
                       temperature=temperature, seed=seed, max_history=max_history,
                       row_keys=torch.arange(s, s + len(users)))
        all_items.append(res.item_ids.numpy())
        all_scores.append(res.scores.numpy())
        bar.update(len(users))
    bar.close()
    items = np.concatenate(all_items) if all_items else np.zeros((0, k), np.int64)
    scores = np.concatenate(all_scores) if all_scores else np.zeros((0, k), np.float32)
    # -1 padding (fewer valid IDs than k) is dropped from the lists rather than exported.
    item_lists = [row[row >= 0].tolist() for row in items]
    score_lists = [srow[row >= 0].tolist() for row, srow in zip(items, scores)]
    table = pa.table({
        "user_id": pa.array(user_ids.tolist()),
        "item_ids": pa.array(item_lists, type=pa.list_(pa.int64())),
        "scores": pa.array(score_lists, type=pa.list_(pa.float32())),
    })
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
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


def load_to_redis(path, client, *, prefix: str = "tiger:rec:", fail_after: int | None = None) -> dict:
    """Load a recall table into Redis atomically (see the module docstring).

    client: a ``redis.Redis`` instance (or URL string).  ``fail_after`` is for tests: raise after
    staging that many users, to check that a failed load leaves no live key changed.
    Returns ``{"users", "skipped", "digest"}``."""
    if isinstance(client, str):
        try:
            import redis
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("loading into Redis needs the 'redis' package: pip install redis") from e
        client = redis.Redis.from_url(client)
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    table = _read_recall_table(path)
    digest = _digest(table)
    meta_key = f"{prefix}__meta__"
    current = client.hget(meta_key, "digest")
    if current is not None and current.decode() == digest:
        return {"users": table.num_rows, "skipped": True, "digest": digest}

    run = uuid.uuid4().hex[:12]
    staging = f"{prefix}__staging__:{run}:"
    users = table.column("user_id").to_pylist()
    lists = table.column("item_ids").to_pylist()
    staged = []
    try:
        pipe = client.pipeline(transaction=False)
        for n, (u, items) in enumerate(zip(users, lists)):
            if fail_after is not None and n >= fail_after:
                raise RuntimeError(f"injected failure after staging {n} users")
            key = f"{staging}{u}"
            staged.append((key, f"{prefix}{u}", bool(items)))
            if items:  # Redis has no empty lists: an empty list is an absent key
                pipe.rpush(key, *items)
                pipe.expire(key, STAGING_TTL_S)
            if len(pipe) >= 2000:
                pipe.execute()
        pipe.execute()
        # One transaction: every live key flips to its new list at once.
        tx = client.pipeline(transaction=True)
        for key, live, nonempty in staged:
            if nonempty:
                tx.rename(key, live)
                tx.persist(live)
            else:
                tx.delete(live)
        tx.hset(meta_key, mapping={"digest": digest, "users": table.num_rows})
        tx.execute()
    except BaseException:
        keys = [k for k, _, ne in staged if ne]
        for s in range(0, len(keys), 1000):
            client.delete(*keys[s:s + 1000])
        raise
    return {"users": table.num_rows, "skipped": False, "digest": digest}
