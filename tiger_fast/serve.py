"""Online serving: an HTTP service (Starlette on uvicorn) that answers top-K requests by dynamic
micro-batching over ``tiger_fast.generate``, and adds or removes items without a restart.

    tiger-fast serve --data SPEC --ids ids.parquet --model retriever/ --rqvae rqvae/ --port 8000

Endpoints (JSON in and out; ids are the catalogue's own, ints or strings, never table rows):

    POST   /recommend        {"user_id", "history": [item ids, oldest first], "k": 10,
                              "temperature": null | T | [t0, t1, t2, t3], "seed": 0, "row_key": opt.}
                             -> {"items": [{"item_id", "semantic_id", "score"}], "model_version",
                                 "catalog_version"}
    POST   /recommend/batch  {"requests": [...]} -> {"results": [one answer, or {"error", "status"}]}
    POST   /items            {"items": [{"item_id", "text"} | {"item_id", "embedding": [...]}]}
                             -> {"added": [{"item_id", "semantic_id"}], "catalog_version", ...}
    DELETE /items/{id}       -> {"removed", "catalog_version", "num_items"}
    GET    /health           200 when loaded and serving, 503 while loading or shutting down
    GET    /metrics          Prometheus text: request / batch latency, batch sizes, queue depth,
                             errors by kind

Batching.  Admitted requests wait in one bounded queue (``max_queue``; full -> 503 with
Retry-After).  A single decode thread takes up to ``max_batch`` of them, waiting at most
``max_wait_ms`` after the oldest arrived, and decodes each group of requests that share
(k, temperature, seed) with one ``generate`` call over one catalogue snapshot.  Every request
carries its own sampling row key (``row_key``, default :func:`row_key_of` of its user id), so a
sample does not depend on its batch neighbours.  What batching does not make bit-identical:
scores (float32 sums) can differ from a batch-of-one ``generate`` call in the last bits because
the matrix products round differently for other batch shapes (MKL: a one-row product is a
matrix-vector kernel; padding changes the softmax reductions); measured below 1e-5 on the test
model, and IDs and order were identical in every test.  A request that fails in a batch (e.g. its
history item is no longer known) gets its own error; the others are answered.  /recommend/batch
refuses a malformed call whole (422 naming ``requests[i].field``); errors found while decoding
come back in that request's slot of ``results``.

Hot items.  The catalogue (IdTable, Trie, id codec) is an immutable snapshot; POST /items and
DELETE copy it, change the copy (RQ-VAE codes -> collision code -> trie, as
``tiger_fast.coldstart.assign_cold_ids``) and publish it with one reference swap, so a batch in
flight decodes entirely over the snapshot it started with and the next batch sees the change.
DELETE hides an item from recommendations (removes it from the trie); it stays in the table so
histories that contain it still work, and re-adding its id gives it a fresh semantic ID.
Copy-on-write costs O(catalogue) per change (a few ms for 10^4 items).

Why Starlette rather than FastAPI: the service has six routes and validates its JSON by hand so
that every 4xx names the exact field (``requests[3].temperature[2]``); FastAPI's pydantic layer
would add a dependency and a second error format for no gain here.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import inspect
import json
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from .checks import is_int

__all__ = ["ServeConfig", "RequestError", "IdCodec", "Catalogue", "Recommender", "Batcher", "Metrics",
           "row_key_of", "parse_query", "load_recommender", "create_app", "run_server"]

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


@dataclass
class ServeConfig:
    """Server knobs.

    max_batch: requests decoded together (1 = no batching); max_wait_ms: longest a request waits
    for others to join its batch; max_queue: admitted requests not yet decoding (beyond -> 503);
    max_k: largest k a request may ask for; max_history: items of a history the encoder sees
    (``generate``'s max_history); max_history_items: longest history accepted in a request;
    max_items_per_add: items per POST /items; max_body_bytes: request body limit (-> 413);
    backend / precision: ``generate``'s backend and numeric mode ("fp32"; other modes only when
    ``generate`` takes a ``precision`` argument); threads: torch intra-op threads (None: torch's
    default); embed_model: sentence-transformers model for items given as text (None: the packaged
    all-MiniLM-L6-v2; must be the one the RQ-VAE's inputs came from); shutdown_timeout_s: how long
    SIGTERM waits for in-flight requests."""
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_k: int = 100
    max_history: int = 20
    max_history_items: int = 1000
    max_items_per_add: int = 1000
    max_body_bytes: int = 16 * 2 ** 20
    backend: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    embed_model: str | None = None
    shutdown_timeout_s: float = 30.0

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_k", "max_history", "max_history_items", "max_items_per_add",
                     "max_body_bytes"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) \
                or not 0 <= self.max_wait_ms <= 60_000:
            raise ValueError(f"max_wait_ms must be a number in [0, 60000], got {self.max_wait_ms!r}")
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            raise ValueError(f"threads must be None or an int >= 1, got {self.threads!r}")


class RequestError(Exception):
    """A request the service refuses: HTTP ``status``, the offending ``field`` (a JSON path such as
    ``history[3]``; "body" for the whole body) and one message; ``headers`` for the response."""

    def __init__(self, status: int, field_: str, message: str, *, kind: str = "invalid_field", headers=None):
        super().__init__(f"{field_}: {message}")
        self.status, self.field, self.message, self.kind = int(status), field_, message, kind
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message, "kind": self.kind}}


def row_key_of(user_id) -> int:
    """The default sampling row key of a request: an int user id itself (int64), a string user id's
    blake2b-64 hash (signed little-endian), so a user's sample is the same in any batch."""
    if isinstance(user_id, str):
        return int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "little", signed=True)
    return int(user_id)


# ---- ids --------------------------------------------------------------------------------------------
class IdCodec:
    """External item ids <-> the IdTable's int64 ids.  Immutable (``with_new`` returns a new codec).

    kind "int": the catalogue's ids are the table's int64 ids (identity).  kind "str": string ids
    (``Dataset.item_keys``, e.g. ASINs) mapped to the table ids; items added later get fresh int64
    table ids above every id in use (internal, never returned)."""

    def __init__(self, kind: str, key_to_id: dict | None = None, next_id: int = 0):
        if kind not in ("int", "str"):
            raise ValueError(f"kind must be 'int' or 'str', got {kind!r}")
        self.kind = kind
        self._k2i = dict(key_to_id or {})
        self._i2k = {v: k for k, v in self._k2i.items()}
        self._next = int(next_id)

    @classmethod
    def for_table(cls, id_table, dataset=None) -> "IdCodec":
        """"str" when ``dataset`` has ``item_keys`` (every table id must be a dataset item), else "int"."""
        keys = getattr(dataset, "item_keys", None) if dataset is not None else None
        if keys is None:
            return cls("int")
        ds_ids = np.asarray(dataset.item_ids, dtype=np.int64)
        key_of = dict(zip(ds_ids.tolist(), keys))
        tids = id_table.item_ids.tolist()
        missing = [t for t in tids if t not in key_of]
        if missing:
            raise ValueError(f"--ids holds item ids that --data does not have, e.g. {missing[:5]}; "
                             "serve the ID table with the dataset it was built from")
        k2i = {str(key_of[t]): t for t in tids}
        return cls("str", k2i, next_id=max(tids + ds_ids.tolist()) + 1)

    def check(self, ext, where: str):
        """Raise RequestError unless ``ext`` has this catalogue's id type."""
        if self.kind == "int":
            if isinstance(ext, bool) or not isinstance(ext, int):
                raise RequestError(422, where, f"must be an integer item id (this catalogue's ids are ints), "
                                               f"got {json.dumps(ext)[:60]}")
            if not INT64_MIN <= ext <= INT64_MAX:
                raise RequestError(422, where, f"item id {ext} does not fit in int64")
        elif not isinstance(ext, str) or not ext:
            raise RequestError(422, where, f"must be a non-empty string item id (this catalogue's ids are "
                                           f"strings), got {json.dumps(ext)[:60]}")
        return ext

    def lookup(self, ext):
        """Table id of ``ext`` or None (no type check)."""
        return ext if self.kind == "int" else self._k2i.get(ext)

    def to_external(self, tid: int):
        return int(tid) if self.kind == "int" else self._i2k[int(tid)]

    def with_new(self, exts) -> tuple["IdCodec", list[int]]:
        """A codec that also knows ``exts`` (reusing the table id of one it knew) and their table ids."""
        if self.kind == "int":
            return self, [int(e) for e in exts]
        out = IdCodec("str", self._k2i, self._next)
        tids = []
        for e in exts:
            if e not in out._k2i:
                out._k2i[e] = out._next
                out._i2k[out._next] = e
                out._next += 1
            tids.append(out._k2i[e])
        return out, tids


@dataclass(frozen=True)
class Catalogue:
    """One immutable catalogue snapshot: never changed after it is published.

    id_table: IdTable (every item ever served, incl. removed ones: their histories still encode);
    trie: Trie over the recommendable rows; codec: IdCodec; version: int, +1 per change."""
    id_table: object
    trie: object
    codec: IdCodec
    version: int

    def history_ids(self, history, where: str = "history") -> list[int]:
        """External ids -> table ids (all of them must be in the table)."""
        tids = []
        for i, e in enumerate(history):
            self.codec.check(e, f"{where}[{i}]")
            tids.append(self.codec.lookup(e))
        if any(t is None for t in tids):
            i = tids.index(None)
            raise RequestError(422, f"{where}[{i}]", f"unknown item id {json.dumps(history[i])}", kind="unknown_item")
        known = self.id_table.contains(torch.tensor(tids, dtype=torch.int64))
        if not bool(known.all()):
            i = int((~known).nonzero()[0, 0])
            raise RequestError(422, f"{where}[{i}]", f"unknown item id {json.dumps(history[i])}", kind="unknown_item")
        return tids

    def is_live(self, tid: int) -> bool:
        """Whether the item can be recommended (is in the trie)."""
        row = self.id_table.rows_of(torch.tensor([tid], dtype=torch.int64))
        return bool(self.trie.codes_of_rows(row)[0, 0] >= 0)


# ---- requests ---------------------------------------------------------------------------------------
@dataclass
class Query:
    """One parsed /recommend request (external ids) and where its answer goes."""
    user_id: object
    history: list
    k: int
    temperature: tuple | None
    seed: int
    row_key: int
    t_admit: float = 0.0
    loop: object = field(default=None, repr=False)
    future: object = field(default=None, repr=False)

    @property
    def group(self) -> tuple:
        """Requests with equal groups are decoded by one ``generate`` call."""
        return (self.k, self.temperature, self.seed)

    def resolve(self, value) -> None:
        """Hand the answer (dict or RequestError) to the waiting handler (from any thread)."""
        if self.loop is None:
            self.future = value
            return

        def _set(fut=self.future):
            if not fut.done():
                fut.set_result(value)
        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the event loop is gone (process exiting): nobody is waiting
            pass


_QUERY_FIELDS = ("user_id", "history", "k", "temperature", "seed", "row_key")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_query(obj, where: str, codec: IdCodec, num_levels: int, cfg: ServeConfig) -> Query:
    """Validate one /recommend body (a parsed JSON value) -> Query; RequestError(422) naming the
    field (prefixed with ``where``, e.g. "requests[2]") otherwise.  History ids are type-checked
    here and looked up in the catalogue by the caller."""
    p = f"{where}." if where else ""
    if not isinstance(obj, dict):
        raise RequestError(422, where or "body", "must be a JSON object with user_id, history, k, ...")
    unknown = [key for key in obj if key not in _QUERY_FIELDS]
    if unknown:
        raise RequestError(422, p + str(unknown[0]), f"unknown field; the fields are {', '.join(_QUERY_FIELDS)}")
    if "user_id" not in obj or obj["user_id"] is None:
        raise RequestError(422, p + "user_id", "is required (an int or a string)")
    user = obj["user_id"]
    if is_int(user):
        if not INT64_MIN <= user <= INT64_MAX:
            raise RequestError(422, p + "user_id", f"{user} does not fit in int64")
    elif not isinstance(user, str) or not user or len(user) > 1024:
        raise RequestError(422, p + "user_id", f"must be an int or a non-empty string (<= 1024 chars), "
                                               f"got {json.dumps(user)[:60]}")
    hist = obj.get("history")
    if not isinstance(hist, list):
        raise RequestError(422, p + "history", "is required: a list of item ids, oldest first")
    if not hist:
        raise RequestError(422, p + "history", "is empty; a request needs at least one past item")
    if len(hist) > cfg.max_history_items:
        raise RequestError(422, p + "history", f"has {len(hist)} items; send at most {cfg.max_history_items} "
                                               f"(the model reads the last {cfg.max_history})")
    for i, e in enumerate(hist):
        codec.check(e, f"{p}history[{i}]")
    k = obj.get("k", 10)
    if not is_int(k) or not 1 <= k <= cfg.max_k:
        raise RequestError(422, p + "k", f"must be an int in [1, {cfg.max_k}], got {json.dumps(k)[:60]}")
    temp = obj.get("temperature")
    if temp is not None:
        if _is_num(temp):
            temp = [temp] * num_levels
        if not isinstance(temp, list) or len(temp) != num_levels:
            raise RequestError(422, p + "temperature", f"must be null, a number or a list of {num_levels} numbers "
                                                       f"(one per ID level), got {json.dumps(temp)[:80]}")
        for i, t in enumerate(temp):
            if not _is_num(t) or not 1e-3 <= t <= 1e3:
                raise RequestError(422, f"{p}temperature[{i}]", f"must be a number in [0.001, 1000], "
                                                                f"got {json.dumps(t)[:60]}")
        temp = tuple(float(t) for t in temp)
    seed = obj.get("seed", 0)
    if not is_int(seed) or not 0 <= seed < 2 ** 64:
        raise RequestError(422, p + "seed", f"must be an int in [0, 2^64), got {json.dumps(seed)[:60]}")
    rk = obj.get("row_key")
    if rk is None:
        rk = row_key_of(user)
    elif not is_int(rk) or not INT64_MIN <= rk <= INT64_MAX:
        raise RequestError(422, p + "row_key", f"must be an int64, got {json.dumps(rk)[:60]}")
    return Query(user_id=user, history=hist, k=int(k), temperature=temp, seed=int(seed), row_key=int(rk))


# ---- metrics ----------------------------------------------------------------------------------------
class Metrics:
    """Counters, gauges and histograms, rendered in the Prometheus text format (version 0.0.4).
    Thread-safe (one lock)."""

    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, max_batch: int):
        self._lock = threading.Lock()
        self._counters: dict = {}   # (name, labels) -> value
        self._gauges: dict = {}     # name -> callable or value
        sizes, b = [], 1
        while b < max_batch:
            sizes.append(b)
            b *= 2
        self._hist_buckets = {"tiger_request_duration_seconds": self.LATENCY_BUCKETS,
                              "tiger_batch_duration_seconds": self.LATENCY_BUCKETS,
                              "tiger_batch_size": tuple(sizes + [max_batch])}
        self._hists: dict = {}      # (name, labels) -> [bucket counts, sum, count]
        self._help = {
            "tiger_requests_total": ("counter", "HTTP requests by route and status code"),
            "tiger_errors_total": ("counter", "refused or failed requests by kind"),
            "tiger_items_added_total": ("counter", "items added through POST /items"),
            "tiger_items_removed_total": ("counter", "items removed through DELETE /items/{id}"),
            "tiger_request_duration_seconds": ("histogram", "time from admission to answer, per /recommend query"),
            "tiger_batch_duration_seconds": ("histogram", "decode time of one batch (all its generate calls)"),
            "tiger_batch_size": ("histogram", "queries decoded together"),
            "tiger_queue_depth": ("gauge", "admitted queries waiting to be decoded"),
            "tiger_queue_capacity": ("gauge", "queue bound (max_queue)"),
            "tiger_catalog_items": ("gauge", "items that can be recommended"),
            "tiger_catalog_version": ("gauge", "catalogue snapshot version"),
            "tiger_ready": ("gauge", "1 when loaded and serving"),
        }

    def inc(self, name: str, labels: tuple = (), value: float = 1.0) -> None:
        with self._lock:
            self._counters[(name, labels)] = self._counters.get((name, labels), 0.0) + value

    def observe(self, name: str, value: float, labels: tuple = ()) -> None:
        buckets = self._hist_buckets[name]
        with self._lock:
            h = self._hists.setdefault((name, labels), [[0] * len(buckets), 0.0, 0])
            for i, b in enumerate(buckets):
                if value <= b:
                    h[0][i] += 1
            h[1] += value
            h[2] += 1

    def gauge(self, name: str, fn) -> None:
        """Register a gauge read at render time (``fn() -> number``)."""
        self._gauges[name] = fn

    @staticmethod
    def _labels(labels: tuple, extra: str = "") -> str:
        parts = [f'{k}="{v}"' for k, v in labels] + ([extra] if extra else [])
        return "{" + ",".join(parts) + "}" if parts else ""

    def render(self) -> str:
        lines = []
        with self._lock:
            counters = dict(self._counters)
            hists = {k: ([*v[0]], v[1], v[2]) for k, v in self._hists.items()}
        for name, (kind, text) in self._help.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "counter":
                rows = sorted((lab, v) for (n, lab), v in counters.items() if n == name)
                lines += [f"{name}{self._labels(lab)} {v:g}" for lab, v in rows] or [f"{name} 0"]
            elif kind == "gauge":
                fn = self._gauges.get(name)
                lines.append(f"{name} {float(fn() if callable(fn) else (fn or 0)):g}")
            else:
                buckets = self._hist_buckets[name]
                rows = sorted((lab, v) for (n, lab), v in hists.items() if n == name) or [((), ([0] * len(buckets), 0.0, 0))]
                for lab, (counts, total, n) in rows:
                    for b, c in zip(buckets, counts):
                        le = 'le="%g"' % b
                        lines.append(f"{name}_bucket{self._labels(lab, le)} {c}")
                    le = 'le="+Inf"'
                    lines.append(f"{name}_bucket{self._labels(lab, le)} {n}")
                    lines.append(f"{name}_sum{self._labels(lab)} {total:.9g}")
                    lines.append(f"{name}_count{self._labels(lab)} {n}")
        return "\n".join(lines) + "\n"


# ---- the retriever and its catalogue ----------------------------------------------------------------
def _model_version(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


class Recommender:
    """The loaded retriever plus the current catalogue snapshot; decodes groups of queries and
    applies item additions/removals (copy-on-write, serialised by a lock).

    model: tiger_fast.t5.T5 (put in eval mode here); id_table: IdTable; rqvae: trained RQVAE or
    None (then POST /items answers 501); dataset: the catalogue's Dataset or None (string item/user
    ids come from its ``item_keys`` / ``user_keys``)."""

    def __init__(self, model, id_table, *, rqvae=None, dataset=None, cfg: ServeConfig | None = None,
                 model_version: str | None = None):
        from .generate import generate
        from .trie import Trie

        self.cfg = cfg or ServeConfig()
        self.model = model.eval()  # once: generate() would otherwise toggle train/eval per call
        self.rqvae = rqvae.eval() if rqvae is not None else None
        self.layout = id_table.layout
        self._generate = generate
        self._gen_kwargs = {}
        if self.cfg.precision != "fp32":
            if "precision" not in inspect.signature(generate).parameters:
                raise ValueError(f"precision {self.cfg.precision!r}: this tiger_fast.generate has no precision "
                                 "argument (fp32 only)")
            self._gen_kwargs["precision"] = self.cfg.precision
        p = next(iter(model.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.model_version = model_version or _model_version(model)
        ukeys = getattr(dataset, "user_keys", None) if dataset is not None else None
        self._user_map = ({str(k): int(u) for k, u in zip(ukeys, np.asarray(dataset.user_ids).tolist())}
                          if ukeys is not None else {})
        table = copy.deepcopy(id_table)
        trie = Trie.from_id_table(table)
        self._prewarm(trie)
        self._snap = Catalogue(table, trie, IdCodec.for_table(table, dataset), 0)
        self._write = threading.Lock()

    @property
    def catalogue(self) -> Catalogue:
        return self._snap

    def user_token_id(self, user_id):
        """What ``generate(user_ids=...)`` gets for a request's user id: the training user id for a
        known string user key, else the id itself (hashed into the user tokens)."""
        return self._user_map.get(user_id, user_id) if isinstance(user_id, str) else user_id

    def _prewarm(self, trie) -> None:
        # generate() reads trie.tables(device), which caches per device: fill the cache before the
        # snapshot is published so that decoding never writes to a shared object.
        trie.tables(torch.device("cpu"))
        trie.tables(self.device)

    # ---- decoding -----------------------------------------------------------------------------
    def warm_up(self) -> None:
        """One decode before serving, so that lazy work (cached decode weights, precision
        preparation) happens now and a bad backend / precision fails the start, not a request."""
        snap = self._snap
        tid = int(snap.id_table.item_ids[0])
        q = Query(user_id=0, history=[snap.codec.to_external(tid)], k=min(10, len(snap.trie)), temperature=None,
                  seed=0, row_key=0)
        self._decode_group([q], [[tid]], snap)

    def decode(self, queries: list, snap: Catalogue | None = None) -> list:
        """Answer queries over one snapshot -> list of answer dicts or RequestError (same order).
        Each group of equal (k, temperature, seed) is one generate call; if that call fails, its
        queries are decoded one by one so that only the failing one gets the error."""
        snap = snap or self._snap
        out: list = [None] * len(queries)
        groups: dict = {}
        for i, q in enumerate(queries):
            try:
                hist = snap.history_ids(q.history)
                if q.k > len(snap.trie):
                    raise RequestError(422, "k", f"k ({q.k}) is larger than the {len(snap.trie)} items in the "
                                                 "catalogue")
            except RequestError as e:
                out[i] = e
                continue
            groups.setdefault(q.group, []).append((i, hist))
        for members in groups.values():
            try:
                answers = self._decode_group([queries[i] for i, _ in members], [h for _, h in members], snap)
            except Exception:
                answers = []
                for i, h in members:
                    try:
                        answers.extend(self._decode_group([queries[i]], [h], snap))
                    except Exception as e:  # noqa: BLE001 - reported to that request only
                        answers.append(RequestError(500, "request", f"decoding failed: {type(e).__name__}: {e}",
                                                    kind="internal"))
            for (i, _), a in zip(members, answers):
                out[i] = a
        return out

    def _decode_group(self, qs: list, hists: list, snap: Catalogue) -> list:
        q0 = qs[0]
        res = self._generate(self.model, [torch.tensor(h, dtype=torch.int64) for h in hists], snap.id_table,
                             user_ids=[self.user_token_id(q.user_id) for q in qs], k=q0.k,
                             temperature=None if q0.temperature is None else list(q0.temperature), seed=q0.seed,
                             row_keys=torch.tensor([q.row_key for q in qs], dtype=torch.int64),
                             backend=self.cfg.backend, trie=snap.trie, max_history=self.cfg.max_history,
                             **self._gen_kwargs)
        ids, codes, scores = res.item_ids.tolist(), res.codes.tolist(), res.scores.tolist()
        out = []
        for r in range(len(qs)):
            items = [{"item_id": snap.codec.to_external(i), "semantic_id": c, "score": s}
                     for i, c, s in zip(ids[r], codes[r], scores[r]) if i >= 0]
            out.append({"items": items, "model_version": self.model_version, "catalog_version": snap.version})
        return out

    # ---- catalogue changes --------------------------------------------------------------------
    def embed_items(self, texts: list) -> np.ndarray:
        """float32 (M, D) embeddings of item texts with ``cfg.embed_model`` (loaded once)."""
        from .embed import embed_texts

        return np.asarray(embed_texts(texts, model=self.cfg.embed_model, progress=False), dtype=np.float32)

    def add_items(self, items: list) -> dict:
        """items: list of dicts {"item_id", "text"} or {"item_id", "embedding"} (validated here).
        All or nothing: on any error nothing changes.  Returns the POST /items answer."""
        if self.rqvae is None:
            raise RequestError(501, "items", "this server was started without --rqvae; it cannot give new items "
                                             "semantic IDs", kind="not_supported")
        codec = self._snap.codec
        if not isinstance(items, list) or not items:
            raise RequestError(422, "items", "must be a non-empty list of {item_id, text | embedding}")
        if len(items) > self.cfg.max_items_per_add:
            raise RequestError(422, "items", f"has {len(items)} entries; at most {self.cfg.max_items_per_add} per call")
        dim = int(self.rqvae.cfg.input_dim)
        exts, vecs, texts = [], [None] * len(items), []
        for i, it in enumerate(items):
            w = f"items[{i}]"
            if not isinstance(it, dict):
                raise RequestError(422, w, "must be an object {item_id, text} or {item_id, embedding}")
            extra = [key for key in it if key not in ("item_id", "text", "embedding")]
            if extra:
                raise RequestError(422, f"{w}.{extra[0]}", "unknown field; the fields are item_id, text, embedding")
            if "item_id" not in it:
                raise RequestError(422, f"{w}.item_id", "is required")
            exts.append(codec.check(it["item_id"], f"{w}.item_id"))
            has_t, has_e = it.get("text") is not None, it.get("embedding") is not None
            if has_t == has_e:
                raise RequestError(422, w, "needs exactly one of text and embedding")
            if has_t:
                if not isinstance(it["text"], str) or not it["text"].strip():
                    raise RequestError(422, f"{w}.text", "must be a non-empty string")
                texts.append((i, it["text"]))
            else:
                e = it["embedding"]
                if not isinstance(e, list) or len(e) != dim:
                    raise RequestError(422, f"{w}.embedding", f"must be a list of {dim} numbers (the RQ-VAE's input "
                                                              f"dimension)")
                if not all(_is_num(x) and math.isfinite(x) for x in e):
                    j = next(j for j, x in enumerate(e) if not (_is_num(x) and math.isfinite(x)))
                    raise RequestError(422, f"{w}.embedding[{j}]", "must be a finite number")
                vecs[i] = np.asarray(e, dtype=np.float32)
        seen: dict = {}
        for i, e in enumerate(exts):
            if e in seen:
                raise RequestError(422, f"items[{i}].item_id", f"duplicates items[{seen[e]}].item_id")
            seen[e] = i
        if texts:
            emb = self.embed_items([t for _, t in texts])
            if emb.shape[1] != dim:
                raise RequestError(500, "items", f"the text encoder gives {emb.shape[1]}-d vectors but the RQ-VAE "
                                                 f"takes {dim}-d; start the server with the matching --embed-model",
                                   kind="internal")
            for (i, _), v in zip(texts, emb):
                vecs[i] = v
        emb = np.stack(vecs).astype(np.float32)
        with self._write:
            return self._publish_add(exts, emb)

    def _publish_add(self, exts: list, emb: np.ndarray) -> dict:
        from .coldstart import assign_cold_ids

        snap = self._snap
        for i, e in enumerate(exts):
            tid = snap.codec.lookup(e)
            if tid is not None and bool(snap.id_table.contains(torch.tensor([tid]))[0]) and snap.is_live(tid):
                raise RequestError(409, f"items[{i}].item_id", f"item {json.dumps(e)} is already in the catalogue; "
                                                               "DELETE it first to re-assign", kind="conflict")
        codec, tids = snap.codec.with_new(exts)
        table, trie = copy.deepcopy(snap.id_table), copy.deepcopy(snap.trie)
        hidden = torch.tensor(tids, dtype=torch.int64)
        hidden = hidden[table.contains(hidden)]
        if hidden.numel():  # removed earlier: drop the old row so the item gets a fresh ID
            trie.apply_row_map(table.remove_items(hidden))
        try:
            rows, codes = assign_cold_ids(self.rqvae, emb, np.asarray(tids, dtype=np.int64), table, trie=trie,
                                          backend="auto")
        except ValueError as e:  # e.g. a full collision group
            raise RequestError(422, "items", str(e), kind="invalid_field") from None
        self._prewarm(trie)
        self._snap = Catalogue(table, trie, codec, snap.version + 1)
        return {"added": [{"item_id": e, "semantic_id": c} for e, c in zip(exts, codes.tolist())],
                "catalog_version": snap.version + 1, "num_items": len(trie)}

    def remove_item(self, ext) -> dict:
        """Hide one item from recommendations (DELETE /items/{id})."""
        with self._write:
            snap = self._snap
            tid = snap.codec.lookup(ext)
            if tid is None or not bool(snap.id_table.contains(torch.tensor([tid]))[0]) or not snap.is_live(tid):
                raise RequestError(404, "item_id", f"item {json.dumps(ext)} is not in the catalogue", kind="not_found")
            if len(snap.trie) == 1:
                raise RequestError(409, "item_id", "cannot remove the last item of the catalogue", kind="conflict")
            trie = copy.deepcopy(snap.trie)
            trie.remove(snap.id_table.rows_of(torch.tensor([tid], dtype=torch.int64)))
            self._prewarm(trie)
            self._snap = Catalogue(snap.id_table, trie, snap.codec, snap.version + 1)
            return {"removed": ext, "catalog_version": snap.version + 1, "num_items": len(trie)}


def load_recommender(model_dir, ids_path, *, rqvae_dir=None, dataset=None, cfg: ServeConfig | None = None,
                     allow_other_catalogue: bool = False) -> Recommender:
    """Load a ``tiger-fast train`` retriever directory, an ID table Parquet and (optionally) an
    RQ-VAE directory -> Recommender.  model_version = sha256 of the checkpoint's files.
    The artefacts' recorded fingerprints (tiger_fast.provenance) must agree -- retriever vs ID
    table, ID table vs ``dataset``, RQ-VAE vs ID table -- unless ``allow_other_catalogue``."""
    from .ids import IdTable
    from .provenance import catalogue_fingerprint, check_same, id_table_digest
    from .rqvae import load_rqvae
    from .t5 import load_t5

    cfg = cfg or ServeConfig()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    table = IdTable.from_parquet(ids_path)
    model, layout = load_t5(model_dir)
    layout.check_compatible(table.layout, "--model layout vs --ids layout")
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(model_dir, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    rq = load_rqvae(rqvae_dir) if rqvae_dir else None
    if rq is not None and tuple(rq.cfg.codebook_sizes) != tuple(layout.codebook_sizes):
        raise ValueError(f"--rqvae codebook sizes {tuple(rq.cfg.codebook_sizes)} do not match the ID layout's "
                         f"{tuple(layout.codebook_sizes)}")
    if not allow_other_catalogue:
        flag = "--allow-other-catalogue"
        check_same(f"--model {model_dir} vs --ids {ids_path}", model.provenance.get("id_table"), id_table_digest(table), flag)
        if dataset is not None:
            check_same(f"--ids {ids_path} vs --data", table.provenance.get("catalogue"), catalogue_fingerprint(dataset), flag)
        if rq is not None:
            check_same(f"--rqvae {rqvae_dir} vs --ids {ids_path}", rq.provenance.get("catalogue"),
                       table.provenance.get("catalogue"), flag)
    return Recommender(model, table, rqvae=rq, dataset=dataset, cfg=cfg, model_version="sha256:" + h.hexdigest()[:16])


# ---- the batching queue -----------------------------------------------------------------------------
class Batcher:
    """Bounded queue + one decode thread.  ``submit`` admits all of a list of queries or none
    (RequestError 503 with Retry-After when they do not fit); the thread takes up to ``max_batch``
    queries, waiting at most ``max_wait_ms`` after the oldest one arrived, and calls
    ``run(batch)``.  ``close`` stops admitting, decodes what is queued, and joins the thread."""

    def __init__(self, run, cfg: ServeConfig, metrics: Metrics | None = None):
        self._run = run
        self._max_batch, self._max_queue = cfg.max_batch, cfg.max_queue
        self._max_wait = cfg.max_wait_ms / 1000.0
        self._metrics = metrics
        self._dq: deque = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._ewma_batch_s = 0.01
        self._thread = threading.Thread(target=self._loop, name="tiger-serve-decode", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        return len(self._dq)

    def submit(self, queries: list) -> None:
        with self._cv:
            if self._closing:
                raise RequestError(503, "request", "the server is shutting down", kind="shutting_down",
                                   headers={"Retry-After": "1"})
            if len(self._dq) + len(queries) > self._max_queue:
                wait = (len(self._dq) / self._max_batch + 1) * self._ewma_batch_s
                raise RequestError(503, "request", f"overloaded: {len(self._dq)} queries queued (limit "
                                                   f"{self._max_queue}); retry later", kind="overloaded",
                                   headers={"Retry-After": str(max(1, math.ceil(wait)))})
            now = time.monotonic()
            for q in queries:
                q.t_admit = now
            self._dq.extend(queries)
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._dq and not self._closing:
                    self._cv.wait()
                if not self._dq:
                    return
                deadline = self._dq[0].t_admit + self._max_wait
                while len(self._dq) < self._max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch = [self._dq.popleft() for _ in range(min(self._max_batch, len(self._dq)))]
            t0 = time.perf_counter()
            try:
                answers = self._run(batch)
            except Exception as e:  # noqa: BLE001 - never let the decode thread die
                answers = [RequestError(500, "request", f"decoding failed: {type(e).__name__}: {e}", kind="internal")
                           for _ in batch]
            dt = time.perf_counter() - t0
            self._ewma_batch_s = 0.8 * self._ewma_batch_s + 0.2 * dt
            if self._metrics is not None:
                self._metrics.observe("tiger_batch_duration_seconds", dt)
                self._metrics.observe("tiger_batch_size", len(batch))
            for q, a in zip(batch, answers):
                q.resolve(a)

    def stop_admitting(self) -> None:
        """Refuse new queries (503) and decode the queued ones without waiting for batches to fill."""
        with self._cv:  # (an RLock: safe from a signal handler that interrupts submit)
            self._closing = True
            self._cv.notify_all()

    def close(self, timeout: float | None = None) -> None:
        self.stop_admitting()
        self._thread.join(timeout)


# ---- the ASGI app -----------------------------------------------------------------------------------
class _State:
    """Loading / ready / draining / failed, the Recommender once loaded, and the Batcher."""

    def __init__(self, loader, cfg: ServeConfig, on_fail=None):
        self.loader, self.cfg, self.on_fail = loader, cfg, on_fail
        self.status = "loading"
        self.error: BaseException | None = None
        self.rec: Recommender | None = None
        self.batcher: Batcher | None = None
        self.metrics = Metrics(cfg.max_batch)
        self.metrics.gauge("tiger_queue_depth", lambda: self.batcher.depth() if self.batcher else 0)
        self.metrics.gauge("tiger_queue_capacity", lambda: cfg.max_queue)
        self.metrics.gauge("tiger_catalog_items", lambda: len(self.rec.catalogue.trie) if self.rec else 0)
        self.metrics.gauge("tiger_catalog_version", lambda: self.rec.catalogue.version if self.rec else 0)
        self.metrics.gauge("tiger_ready", lambda: 1 if self.status == "ready" else 0)

    def load(self) -> None:
        try:
            rec = self.loader()
            rec.warm_up()
            self.rec = rec
            self.batcher = Batcher(rec.decode, self.cfg, self.metrics)
            if self.status == "loading":
                self.status = "ready"
        except BaseException as e:  # noqa: BLE001 - reported by run_server / health
            self.error, self.status = e, "failed"
            if self.on_fail is not None:
                self.on_fail(e)

    def ready(self) -> Recommender:
        if self.status != "ready":
            raise RequestError(503, "request", f"the server is {self.status}", kind="not_ready",
                               headers={"Retry-After": "1"})
        return self.rec


def _json_response(obj, status: int = 200, headers=None):
    from starlette.responses import Response

    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, headers=headers,
                    media_type="application/json")


def _reject_constant(c):
    raise ValueError(f"{c} is not valid JSON")


async def _read_json(request, limit: int):
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise RequestError(413, "body", f"{cl} bytes; the limit is {limit}", kind="too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise RequestError(413, "body", f"larger than the limit of {limit} bytes", kind="too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise RequestError(400, "body", f"invalid JSON: {e}", kind="invalid_json") from None


def create_app(loader, cfg: ServeConfig | None = None, *, on_fail=None):
    """The Starlette app.  ``loader() -> Recommender`` runs in a background thread at startup
    (/health answers 503 until it returns); ``on_fail(exc)`` is called if it raises.
    ``app.state.serve`` is the _State (status, metrics, recommender)."""
    import contextlib

    from anyio import to_thread
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    cfg = cfg or ServeConfig()
    st = _State(loader, cfg, on_fail)
    m = st.metrics

    def endpoint(route: str):
        def wrap(fn):
            async def handler(request):
                t0 = time.perf_counter()
                try:
                    resp = await fn(request)
                except RequestError as e:
                    m.inc("tiger_errors_total", (("kind", e.kind),))
                    resp = _json_response(e.body(), e.status, e.headers)
                except Exception as e:  # noqa: BLE001 - one clear 500, the server keeps going
                    m.inc("tiger_errors_total", (("kind", "internal"),))
                    resp = _json_response({"error": {"field": "request", "message": f"{type(e).__name__}: {e}",
                                                     "kind": "internal"}}, 500)
                m.inc("tiger_requests_total", (("route", route), ("code", str(resp.status_code))))
                if route == "/recommend":
                    m.observe("tiger_request_duration_seconds", time.perf_counter() - t0)
                return resp
            return handler
        return wrap

    async def _answer(queries: list) -> list:
        loop = asyncio.get_running_loop()
        for q in queries:
            q.loop, q.future = loop, loop.create_future()
        st.batcher.submit(queries)
        return [await q.future for q in queries]

    @endpoint("/recommend")
    async def recommend(request):
        rec = st.ready()
        obj = await _read_json(request, cfg.max_body_bytes)
        snap = rec.catalogue
        q = parse_query(obj, "", snap.codec, rec.layout.num_levels, cfg)
        snap.history_ids(q.history)  # unknown items -> 422 before queueing (checked again when decoding)
        (a,) = await _answer([q])
        if isinstance(a, RequestError):
            raise a
        return _json_response(a)

    @endpoint("/recommend/batch")
    async def recommend_batch(request):
        rec = st.ready()
        obj = await _read_json(request, cfg.max_body_bytes)
        if not isinstance(obj, dict) or set(obj) != {"requests"} or not isinstance(obj["requests"], list):
            raise RequestError(422, "requests", 'the body must be {"requests": [request, ...]}')
        reqs = obj["requests"]
        if not reqs or len(reqs) > cfg.max_queue:
            raise RequestError(422, "requests", f"must hold 1 to {cfg.max_queue} requests, got {len(reqs)}")
        snap = rec.catalogue
        qs = [parse_query(r, f"requests[{i}]", snap.codec, rec.layout.num_levels, cfg) for i, r in enumerate(reqs)]
        results = []
        for i, a in enumerate(await _answer(qs)):
            if isinstance(a, RequestError):
                m.inc("tiger_errors_total", (("kind", a.kind),))
                a.field = f"requests[{i}].{a.field}"
                a = {**a.body(), "status": a.status}
            results.append(a)
        return _json_response({"results": results})

    @endpoint("/items")
    async def add_items(request):
        rec = st.ready()
        obj = await _read_json(request, cfg.max_body_bytes)
        if not isinstance(obj, dict) or set(obj) != {"items"}:
            raise RequestError(422, "items", 'the body must be {"items": [{item_id, text | embedding}, ...]}')
        out = await to_thread.run_sync(rec.add_items, obj["items"])
        m.inc("tiger_items_added_total", (), len(out["added"]))
        return _json_response(out)

    @endpoint("/items/{id}")
    async def remove_item(request):
        rec = st.ready()
        raw = request.path_params["item_id"]
        ext = raw
        if rec.catalogue.codec.kind == "int":
            try:
                ext = int(raw)
            except ValueError:
                raise RequestError(422, "item_id", f"must be an integer item id, got {raw!r}") from None
        out = await to_thread.run_sync(rec.remove_item, ext)
        m.inc("tiger_items_removed_total")
        return _json_response(out)

    @endpoint("/health")
    async def health(request):
        body = {"status": st.status}
        if st.rec is not None:
            snap = st.rec.catalogue
            body.update(model_version=st.rec.model_version, catalog_version=snap.version, items=len(snap.trie),
                        queue_depth=st.batcher.depth() if st.batcher else 0)
        if st.error is not None:
            body["error"] = f"{type(st.error).__name__}: {st.error}"
        return _json_response(body, 200 if st.status == "ready" else 503)

    @endpoint("/metrics")
    async def metrics(request):
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=st.load, name="tiger-serve-load", daemon=True).start()
        yield
        st.status = "draining" if st.status != "failed" else st.status
        if st.batcher is not None:  # decode what was admitted, then stop the thread
            await to_thread.run_sync(st.batcher.close, cfg.shutdown_timeout_s)

    app = Starlette(routes=[Route("/recommend", recommend, methods=["POST"]),
                            Route("/recommend/batch", recommend_batch, methods=["POST"]),
                            Route("/items", add_items, methods=["POST"]),
                            Route("/items/{item_id:str}", remove_item, methods=["DELETE"]),
                            Route("/health", health, methods=["GET"]),
                            Route("/metrics", metrics, methods=["GET"])],
                    lifespan=lifespan)
    app.state.serve = st
    return app


def run_server(loader, cfg: ServeConfig | None = None, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "warning", access_log: bool = False, echo=print) -> int:
    """Serve until SIGTERM/SIGINT (then finish in-flight requests).  port 0 = any free port; the
    actual address is printed as ``listening on http://HOST:PORT`` once the socket is bound
    (readiness: GET /health).  Returns 0 after a drained shutdown; raises ValueError when loading
    failed (the CLI prints it and exits 2)."""
    import signal
    import socket

    import uvicorn

    cfg = cfg or ServeConfig()
    holder: dict = {}

    def on_fail(e):
        srv = holder.get("server")
        if srv is not None:
            srv.should_exit = True

    app = create_app(loader, cfg, on_fail=on_fail)
    st = app.state.serve

    class _Server(uvicorn.Server):
        # uvicorn's own handler re-raises the signal after shutting down (exit status -15); here a
        # drained shutdown is a clean exit (status 0).  A second SIGINT still forces the exit.
        def handle_exit(self, sig, frame):
            if st.status in ("loading", "ready"):
                st.status = "draining"  # /health -> 503 at once, so load balancers stop sending
            if st.batcher is not None:
                st.batcher.stop_admitting()  # what is queued is decoded now, not when a batch fills
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host/--port: cannot listen on {host}:{port} ({e})") from None
    sock.listen(2048)  # connections queue from now on; uvicorn accepts them once started
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=cfg.shutdown_timeout_s)
    server = _Server(config)
    holder["server"] = server
    h, p = sock.getsockname()[:2]
    echo(f"listening on http://{h if family == socket.AF_INET else '[' + h + ']'}:{p}")
    sys.stdout.flush()
    server.run(sockets=[sock])
    if st.error is not None:
        raise ValueError(f"loading failed: {type(st.error).__name__}: {st.error}")
    return 0
