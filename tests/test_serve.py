"""`tiger-fast serve` end to end: the real server in a subprocess on a free loopback port, spoken
to over HTTP with the standard library; answers checked against direct `tiger_fast.generate`
calls for each request alone."""
import copy
import dataclasses
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tiger_fast.coldstart import assign_cold_ids  # noqa: E402
from tiger_fast.embed import embed_dataset, embed_texts  # noqa: E402
from tiger_fast.generate import generate  # noqa: E402
from tiger_fast.ids import IdTable  # noqa: E402
from tiger_fast.pipeline import PipelineConfig, build_semantic_ids, save_run, train_tiger  # noqa: E402
from tiger_fast.rqvae import load_rqvae  # noqa: E402
from tiger_fast.serve import Query, Recommender, RequestError, ServeConfig, row_key_of  # noqa: E402
from tiger_fast.synthetic import synthetic_dataset  # noqa: E402
from tiger_fast.t5 import load_t5  # noqa: E402
from tiger_fast.trie import Trie  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:no validation ran")  # the tiny model skips validation

TEMPS = [2.0, 1.5, 1.0, 0.5]


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained pipeline saved to disk (as `tiger-fast demo --out` does) and reloaded."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("serve_run")
    ds = synthetic_dataset(num_items=150, num_users=120, seed=5)
    emb = embed_dataset(ds, progress=False)
    cfg = PipelineConfig(rq_epochs=10, t5={"d_model": 32, "num_heads": 2, "d_kv": 16, "d_ff": 64,
                                           "num_encoder_layers": 1, "num_decoder_layers": 1},
                         steps=40, batch_size=32, warmup_steps=5, lr=0.003, eval_every=1000, eval_users=0)
    rq, table, _ = build_semantic_ids(ds, emb, cfg, progress=False)
    model, _ = train_tiger(ds, table, cfg, progress=False)
    save_run(str(out), rqvae=rq, id_table=table, model=model)
    model, _ = load_t5(str(out / "retriever"))
    return {"dir": out, "ds": ds, "emb": emb, "model": model.eval(),
            "table": IdTable.from_parquet(str(out / "ids.parquet")), "rqvae": load_rqvae(str(out / "rqvae"))}


class Server:
    """`python -m tiger_fast.cli serve` in a subprocess; HTTP via http.client."""

    def __init__(self, run, *extra):
        d = run["dir"]
        cmd = [sys.executable, "-m", "tiger_fast.cli", "serve", "--ids", str(d / "ids.parquet"),
               "--model", str(d / "retriever"), "--rqvae", str(d / "rqvae"), "--port", "0", "--threads", "1",
               "--max-k", "1000", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on http://([\d.]+):(\d+)", line)
        if not m:
            self.proc.kill()
            self.log.seek(0)
            raise RuntimeError(f"server did not start: {line!r} {self.log.read()[-2000:]}")
        self.host, self.port = m.group(1), int(m.group(2))
        try:
            deadline = time.monotonic() + 300
            while True:  # ready only once loaded: 503 until then
                status, _, body = self.call("GET", "/health")
                if status == 200:
                    break
                assert status == 503 and body["status"] == "loading", body
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"server not ready: {body}")
                time.sleep(0.1)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def call(self, method, path, body=None, *, raw=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            text = r.read().decode()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            return r.status, hdrs, (json.loads(text) if "json" in hdrs.get("content-type", "") else text)
        finally:
            conn.close()

    def metrics(self) -> dict:
        status, hdrs, text = self.call("GET", "/metrics")
        assert status == 200 and hdrs["content-type"].startswith("text/plain")
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or not line:
                continue
            m = re.fullmatch(r'([a-z_]+)(\{[^}]*\})? (-?[0-9.e+-]+|\+Inf)', line)
            assert m, f"not Prometheus text: {line!r}"
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture(scope="module")
def server(run):
    s = Server(run, "--max-batch", "8", "--max-wait-ms", "20")
    yield s
    s.stop()


def history(run, u):
    ds = run["ds"]
    return [int(i) for i in ds.item_ids[ds.sequences[u]]]


def direct(run, req, table=None, trie=None):
    """The reference: generate() for this request alone, with its own row key."""
    temp = req.get("temperature")
    u = req["user_id"]
    table = run["table"] if table is None else table
    return generate(run["model"], [torch.tensor(req["history"])], table, user_ids=[u],
                    k=req.get("k", 10), temperature=temp, seed=req.get("seed", 0),
                    row_keys=torch.tensor([req.get("row_key", row_key_of(u))]), trie=trie)


def assert_same(answer, res):
    ids = [it["item_id"] for it in answer["items"]]
    assert ids == res.item_ids[0].tolist()
    assert [it["semantic_id"] for it in answer["items"]] == res.codes[0].tolist()
    # bit-identical: generate is batch-invariant (docs/contracts.md), and a float32 score survives
    # JSON exactly (float32 -> double -> shortest repr -> double)
    assert [it["score"] for it in answer["items"]] == res.scores[0].tolist()


# ---- tests ------------------------------------------------------------------------------------------
def test_health_and_metrics(server, run):
    status, _, body = server.call("GET", "/health")
    assert status == 200 and body["status"] == "ready" and body["items"] == 150
    assert body["model_version"].startswith("sha256:") and body["catalog_version"] == 0
    before = server.metrics()
    req = {"user_id": 3, "history": history(run, 3), "k": 5}
    assert server.call("POST", "/recommend", req)[0] == 200
    assert server.call("POST", "/recommend", {**req, "k": 0})[0] == 422
    after = server.metrics()
    ok, bad = 'tiger_requests_total{route="/recommend",code="200"}', 'tiger_requests_total{route="/recommend",code="422"}'
    assert after[ok] - before.get(ok, 0) == 1 and after[bad] - before.get(bad, 0) == 1
    assert after['tiger_errors_total{kind="invalid_field"}'] >= 1
    assert after["tiger_request_duration_seconds_count"] - before["tiger_request_duration_seconds_count"] == 2
    for h in ("tiger_request_duration_seconds", "tiger_batch_duration_seconds", "tiger_batch_size"):
        buckets = [v for k, v in after.items() if k.startswith(h + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == after[h + "_count"]  # cumulative, +Inf = count
    assert after["tiger_queue_depth"] == 0 and after["tiger_queue_capacity"] == 256
    assert after["tiger_catalog_items"] == 150 and after["tiger_ready"] == 1


def _requests(run):
    """Mixed requests: beam and sampling, k 1 / 5 / 7, histories of 1 .. 30 items (truncated to 20),
    repeated items, the same user twice, a string user id, an explicit row key."""
    reqs = []
    for n, u in enumerate([0, 1, 2, 5, 8, 13, 21, 34, 55, 89, 0]):
        h = history(run, u)
        reqs.append({"user_id": u, "history": h[:1 + n * 3], "k": (5, 7, 1)[n % 3],
                     "temperature": TEMPS if n % 2 else None, "seed": n % 4})
    reqs.append({"user_id": "alice", "history": history(run, 7) * 3, "k": 5, "temperature": TEMPS, "seed": 1})
    reqs.append({"user_id": 9, "history": [history(run, 9)[0]] * 4, "k": 5, "temperature": 1.3, "row_key": -77})
    return reqs


def test_batched_answers_equal_direct_generate(server, run):
    reqs = _requests(run)
    before = server.metrics()
    status, _, body = server.call("POST", "/recommend/batch", {"requests": reqs})
    assert status == 200 and len(body["results"]) == len(reqs)
    after = server.metrics()
    batches = after["tiger_batch_size_count"] - before["tiger_batch_size_count"]
    assert (after["tiger_batch_size_sum"] - before["tiger_batch_size_sum"]) == len(reqs)
    assert batches <= 3  # 13 queries, max batch 8: really decoded together
    for req, ans in zip(reqs, body["results"]):
        assert_same(ans, direct(run, req))
        assert ans["catalog_version"] == 0
    # the same request (user 0 twice, other histories) in another batch gives the same answer
    again = server.call("POST", "/recommend", reqs[0])[2]
    assert [i["item_id"] for i in again["items"]] == [i["item_id"] for i in body["results"][0]["items"]]


def test_concurrent_clients(server, run):
    reqs = _requests(run)
    answers, errors = {}, []

    def client(t):
        try:
            for j in range(len(reqs)):
                n = (t * 5 + j) % len(reqs)
                status, _, body = server.call("POST", "/recommend", reqs[n])
                assert status == 200, body
                answers.setdefault(n, []).append(body)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sum(len(v) for v in answers.values()) == 4 * len(reqs)
    for n, got in answers.items():
        ref = direct(run, reqs[n])
        for ans in got:
            assert_same(ans, ref)


BAD = [
    (b"{bad", 400, "body"),
    (b'{"user_id": NaN, "history": [1]}', 400, "body"),
    (b"[1, 2]", 422, "body"),
    ({"history": [0]}, 422, "user_id"),
    ({"user_id": {"a": 1}, "history": [0]}, 422, "user_id"),
    ({"user_id": 2 ** 70, "history": [0]}, 422, "user_id"),
    ({"user_id": 1}, 422, "history"),
    ({"user_id": 1, "history": []}, 422, "history"),
    ({"user_id": 1, "history": [0, "x"]}, 422, "history[1]"),
    ({"user_id": 1, "history": [0, 1.5]}, 422, "history[1]"),
    ({"user_id": 1, "history": [True]}, 422, "history[0]"),
    ({"user_id": 1, "history": [0, 10 ** 9]}, 422, "history[1]"),
    ({"user_id": 1, "history": [0], "k": 0}, 422, "k"),
    ({"user_id": 1, "history": [0], "k": 1001}, 422, "k"),
    ({"user_id": 1, "history": [0], "k": "5"}, 422, "k"),
    ({"user_id": 1, "history": [0], "k": 151}, 422, "k"),  # more than the catalogue's items
    ({"user_id": 1, "history": [0], "temperature": [1, 1, 1]}, 422, "temperature"),
    ({"user_id": 1, "history": [0], "temperature": "hot"}, 422, "temperature"),
    ({"user_id": 1, "history": [0], "temperature": [1, 0, 1, 1]}, 422, "temperature[1]"),
    ({"user_id": 1, "history": [0], "temperature": [1, 1, 1, 1e9]}, 422, "temperature[3]"),
    ({"user_id": 1, "history": [0], "seed": -1}, 422, "seed"),
    ({"user_id": 1, "history": [0], "seed": 2 ** 64}, 422, "seed"),
    ({"user_id": 1, "history": [0], "row_key": "a"}, 422, "row_key"),
    ({"user_id": 1, "history": [0], "kk": 3}, 422, "kk"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_name_the_field(server, run, body, status, field):
    ids = run["table"].item_ids
    if isinstance(body, dict) and "history" in body:
        body = {**body, "history": [int(ids[h]) if type(h) is int and h < 150 else h for h in body["history"]]}
    raw = body if isinstance(body, bytes) else None
    got, _, ans = server.call("POST", "/recommend", None if raw else body, raw=raw)
    assert got == status, ans
    assert ans["error"]["field"] == field and ans["error"]["message"]


def test_bad_batch_and_body_limits(server, run):
    good = {"user_id": 1, "history": history(run, 1), "k": 3}
    status, _, ans = server.call("POST", "/recommend/batch", {"requests": [good, {**good, "k": 0}]})
    assert status == 422 and ans["error"]["field"] == "requests[1].k"
    status, _, ans = server.call("POST", "/recommend/batch", {"requests": []})
    assert status == 422 and ans["error"]["field"] == "requests"
    # an unknown item found while decoding fails that request only
    status, _, ans = server.call("POST", "/recommend/batch", {"requests": [good, {**good, "history": [10 ** 9]}]})
    assert status == 200 and ans["results"][1]["status"] == 422
    assert ans["results"][1]["error"]["field"] == "requests[1].history[0]"
    assert_same(ans["results"][0], direct(run, good))
    status, _, ans = server.call("POST", "/recommend", raw=b"{}", headers={"Content-Length": str(10 ** 9)})
    assert status == 413 and ans["error"]["field"] == "body"
    assert server.call("GET", "/health")[0] == 200  # still serving


def _expected_snapshots(run, ops):
    """Replay the catalogue changes the server made -> {version: (IdTable, Trie)}."""
    table = copy.deepcopy(run["table"])
    trie = Trie.from_id_table(table)
    snaps = {0: (copy.deepcopy(table), copy.deepcopy(trie))}
    for v, (op, ids, emb) in enumerate(ops, 1):
        if op in ("add", "readd"):
            if op == "readd":  # a removed item comes back: its old row goes, it gets a fresh ID
                trie.apply_row_map(table.remove_items(torch.tensor(ids)))
            assign_cold_ids(run["rqvae"], emb, np.asarray(ids), table, trie=trie)
        else:
            trie.remove(table.rows_of(torch.tensor(ids)))
        snaps[v] = (copy.deepcopy(table), copy.deepcopy(trie))
    return snaps


def test_hot_items_add_remove_atomic(server, run):
    """Runs last on the shared server (changes its catalogue)."""
    emb = run["emb"]
    ids = run["table"].item_ids
    twin = int(ids[17])  # a new item with an existing item's embedding: same prefix, next collision code
    status, _, ans = server.call("POST", "/items", {"items": [{"item_id": 9001, "embedding": emb[60].tolist()},
                                                              {"item_id": 9002, "embedding": emb[17].tolist()}]})
    assert status == 200, ans
    new_emb = np.stack([emb[60], emb[17]])
    ops = [("add", [9001, 9002], new_emb)]
    snaps = _expected_snapshots(run, ops)
    t1, r1 = snaps[1]
    assert ans["catalog_version"] == 1 and ans["num_items"] == 152
    assert [a["semantic_id"] for a in ans["added"]] == t1.codes_of(torch.tensor([9001, 9002])).tolist()
    assert ans["added"][1]["semantic_id"][:3] == run["table"].codes_of(torch.tensor([twin]))[0, :3].tolist()
    # the next request can get them: k = every item
    req = {"user_id": 4, "history": history(run, 4), "k": 152}
    got = server.call("POST", "/recommend", req)[2]
    assert {9001, 9002} <= {it["item_id"] for it in got["items"]} and got["catalog_version"] == 1
    assert_same(got, direct(run, req, t1, r1))

    # refused changes change nothing
    bad_adds = [
        ({"items": [{"item_id": 9001, "embedding": emb[3].tolist()}]}, 409, "items[0].item_id"),
        ({"items": [{"item_id": 9100, "embedding": emb[3].tolist()[:5]}]}, 422, "items[0].embedding"),
        ({"items": [{"item_id": 9100, "embedding": emb[3].tolist()[:-1] + ["x"]}]}, 422, "items[0].embedding[383]"),
        ({"items": [{"item_id": 9100, "text": "a", "embedding": emb[3].tolist()}]}, 422, "items[0]"),
        ({"items": [{"item_id": "sku", "text": "a"}]}, 422, "items[0].item_id"),
        ({"items": [{"item_id": 9100, "text": "a"}, {"item_id": 9100, "text": "b"}]}, 422, "items[1].item_id"),
        ({"items": []}, 422, "items"),
        ({"things": []}, 422, "items"),
    ]
    for body, code, fld in bad_adds:
        status, _, a = server.call("POST", "/items", body)
        assert (status, a["error"]["field"]) == (code, fld), a
    assert server.call("DELETE", "/items/123456789")[0] == 404
    assert server.call("DELETE", "/items/abc")[2]["error"]["field"] == "item_id"
    assert server.call("GET", "/health")[2]["catalog_version"] == 1

    # changes while requests are in flight: every answer is the one of the snapshot it names
    reqs = [{"user_id": u, "history": history(run, u), "k": 10, "temperature": TEMPS if u % 2 else None}
            for u in range(30, 42)]
    seen, errors, stop = [], [], threading.Event()

    def client(t):
        n = t
        while not stop.is_set():
            status, _, body = server.call("POST", "/recommend", reqs[n % len(reqs)])
            (seen if status == 200 else errors).append((n % len(reqs), body))
            n += 3

    def wait_for(pred):
        deadline = time.monotonic() + 120
        while not pred():
            assert time.monotonic() < deadline and not errors, errors[:3]
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(seen) >= 3)  # answers from before the changes
    changes = [("remove", [9001], None), ("add", [9003], emb[40:41]), ("remove", [9002], None)]
    for op, who, e in changes:
        time.sleep(0.2)
        if op == "add":
            status, _, a = server.call("POST", "/items", {"items": [{"item_id": who[0], "embedding": e[0].tolist()}]})
        else:
            status, _, a = server.call("DELETE", f"/items/{who[0]}")
        assert status == 200, a
    wait_for(lambda: any(body["catalog_version"] == 4 for _, body in seen[-6:]))  # and from after them
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    snaps = _expected_snapshots(run, ops + changes)
    versions = {body["catalog_version"] for _, body in seen}
    assert {1, 4} <= versions  # answers from before and after the changes
    for n, body in seen:
        table, trie = snaps[body["catalog_version"]]
        assert_same(body, direct(run, reqs[n], table, trie))
    # a removed item is not recommended any more, but histories that contain it still work
    req = {"user_id": 4, "history": history(run, 4) + [9001], "k": 151}
    status, _, got = server.call("POST", "/recommend", req)
    assert status == 200 and 9001 not in {it["item_id"] for it in got["items"]}
    assert_same(got, direct(run, req, *snaps[4]))
    # and it can come back, with a fresh semantic ID
    status, _, a = server.call("POST", "/items", {"items": [{"item_id": 9001, "embedding": emb[90].tolist()}]})
    assert status == 200 and a["catalog_version"] == 5
    snaps = _expected_snapshots(run, ops + changes + [("readd", [9001], emb[90:91])])
    assert a["added"][0]["semantic_id"] == snaps[5][0].codes_of(torch.tensor([9001]))[0].tolist()
    req = {"user_id": 4, "history": history(run, 4) + [9001], "k": 152}
    got = server.call("POST", "/recommend", req)[2]
    assert 9001 in {it["item_id"] for it in got["items"]}
    assert_same(got, direct(run, req, *snaps[5]))


def test_overload_503_then_sigterm_finishes_in_flight(run):
    """Queue of 3, batches wait 8 s to fill: the 4th request is refused with Retry-After; SIGTERM
    while 3 are queued answers them at once (not when the batch would fill), then the process exits 0."""
    s = Server(run, "--max-batch", "8", "--max-wait-ms", "8000", "--max-queue", "3")
    try:
        reqs = [{"user_id": u, "history": history(run, u), "k": 4} for u in range(3)]
        results = [None] * 3

        def client(i):
            results[i] = s.call("POST", "/recommend", reqs[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while s.metrics()["tiger_queue_depth"] < 3:
            assert time.monotonic() < deadline, "requests were not queued"
            time.sleep(0.02)
        status, hdrs, body = s.call("POST", "/recommend", reqs[0])
        assert status == 503 and int(hdrs["retry-after"]) >= 1 and body["error"]["kind"] == "overloaded"
        status, _, body = s.call("POST", "/recommend/batch", {"requests": reqs[:1]})
        assert status == 503
        assert s.metrics()['tiger_errors_total{kind="overloaded"}'] == 2
        t_term = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert s.proc.wait(30) == 0
        assert time.monotonic() - t_term < 6.0  # the queued batch did not wait out its 8 s
        for req, (status, _, body) in zip(reqs, results):
            assert status == 200
            assert_same(body, direct(run, req))
    finally:
        s.stop()


def test_string_ids_in_and_out(run):
    """A catalogue with string item and user keys (as Dataset.item_keys / user_keys): requests and
    answers use the keys; the model sees the training user ids."""
    ds = run["ds"]
    keyed = dataclasses.replace(ds, item_keys=[f"sku-{i}" for i in ds.item_ids.tolist()],
                                user_keys=[f"user-{u}" for u in ds.user_ids.tolist()])
    rec = Recommender(run["model"], run["table"], rqvae=run["rqvae"], dataset=keyed, cfg=ServeConfig())
    key = {int(i): f"sku-{i}" for i in ds.item_ids.tolist()}
    h = history(run, 6)
    q = Query(user_id="user-6", history=[key[i] for i in h], k=5, temperature=None, seed=0, row_key=11)
    (ans,) = rec.decode([q])
    ref = generate(run["model"], [torch.tensor(h)], run["table"], user_ids=[int(ds.user_ids[6])], k=5,
                   row_keys=torch.tensor([11]))
    assert [it["item_id"] for it in ans["items"]] == [key[i] for i in ref.item_ids[0].tolist()]
    bad = Query(user_id="user-6", history=[h[0]], k=5, temperature=None, seed=0, row_key=0)
    (err,) = rec.decode([bad])
    assert err.status == 422 and err.field == "history[0]"
    # new items given as text: the packaged sentence encoder, then the RQ-VAE (as assign_cold_ids)
    text = "Garden Hoses watering nozzle hose, 50 ft, brass fittings"
    out = rec.add_items([{"item_id": "sku-new", "text": text}])
    assert out["added"][0]["item_id"] == "sku-new" and rec.catalogue.version == 1
    table = copy.deepcopy(run["table"])
    _, codes = assign_cold_ids(run["rqvae"], embed_texts([text], progress=False), [max(ds.item_ids) + 1], table)
    assert out["added"][0]["semantic_id"] == codes[0].tolist()
    with pytest.raises(RequestError) as e:
        rec.add_items([{"item_id": key[h[0]], "text": "x"}])  # an existing key
    assert e.value.status == 409 and e.value.field == "items[0].item_id"
    assert rec.remove_item("sku-new")["num_items"] == 150 and rec.catalogue.version == 2


def test_cli_flag_errors_and_help(run, tmp_path, capsys):
    from tiger_fast.cli import main

    d = run["dir"]
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0 and "--max-wait-ms" in capsys.readouterr().out
    assert main(["serve", "--ids", str(tmp_path / "no.parquet"), "--model", str(d / "retriever")]) == 2
    assert "error: --ids: no such file" in capsys.readouterr().err
    assert main(["serve", "--ids", str(d / "ids.parquet"), "--model", str(d / "retriever"), "--max-batch", "0"]) == 2
    assert "error: --max-batch must be an int >= 1" in capsys.readouterr().err
    assert main(["serve", "--ids", str(d / "ids.parquet"), "--model", str(d / "retriever"),
                 "--max-wait-ms", "-1"]) == 2
    assert "error: --max-wait-ms must be" in capsys.readouterr().err


def test_failed_load_stops_the_server_with_the_reason():
    from tiger_fast.serve import run_server

    def loader():
        raise FileNotFoundError("ids.parquet is gone")

    lines = []
    with pytest.raises(ValueError, match="loading failed: FileNotFoundError: ids.parquet is gone"):
        run_server(loader, ServeConfig(), port=0, echo=lines.append)
    assert lines and lines[0].startswith("listening on http://127.0.0.1:")
