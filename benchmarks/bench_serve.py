"""Online serving under load: `tiger-fast serve` on loopback driven by an open-loop (Poisson) load
generator at rising offered rates, with dynamic batching on and off, in one run.

    python benchmarks/bench_serve.py --run DIR            # DIR from `tiger-fast demo --out DIR`
    python benchmarks/bench_serve.py --build DIR          # builds a demo-size run into DIR first
    python benchmarks/bench_serve.py --run DIR --small    # a short check (3 rates, 3 s each)

Per (mode, offered rate): achieved throughput (200 answers / s), p50 / p99 / p99.9 latency of the
answered requests (from the request's scheduled send time, so a slow server cannot hide queueing:
no coordinated omission; with fewer than 1,000 answers p99.9 is about the maximum), 503s, timeouts,
mean batch size and decode time per batch (from the server's /metrics), and the load average.  "Served" at a rate means p99 <= --slo-ms and >= 99 % of the requests answered 200.
Modes: "batching" (--max-batch, --max-wait-ms) and "no batching" (--max-batch 1: one request per
generate call); both servers run at once and take turns at each rate.  Each rate runs for at most
--seconds and --max-requests; a mode stops rising once a rate is not served and its throughput
falls below half the offered rate.  The load generator
runs on the same machine (it takes CPU from the server: the numbers are a lower bound for a
dedicated serving box).  Writes JSON (and a PNG of latency vs offered rate if matplotlib imports).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from tiger_fast.atomic import write_json

HERE = os.path.dirname(os.path.abspath(__file__))


def build_run(out_dir: str, train_seconds: float, items: int, users: int) -> None:
    """The demo's pipeline (synthetic catalogue, MiniLM embeddings, RQ-VAE, small T5 for
    ``train_seconds``) saved to ``out_dir`` unless it already holds one."""
    if all(os.path.exists(os.path.join(out_dir, p)) for p in ("ids.parquet", "retriever", "rqvae")):
        return
    from tiger_fast.pipeline import build_semantic_ids, demo_config, embeddings_for, save_run, train_tiger
    from tiger_fast.synthetic import synthetic_dataset

    cfg = demo_config(train_seconds)
    ds = synthetic_dataset(num_items=items, num_users=users, seed=cfg.seed)
    emb = embeddings_for(ds, cfg, progress=False)
    rq, table, _ = build_semantic_ids(ds, emb, cfg, progress=False)
    model, _ = train_tiger(ds, table, cfg, progress=False)
    save_run(out_dir, rqvae=rq, id_table=table, model=model)


def request_bodies(ids_path: str, n: int, k: int, seed: int) -> list[bytes]:
    """n raw HTTP POST /recommend requests: random user ids, histories of 3..20 random items of the
    ID table (the encoder's work depends on the history length, not on which items)."""
    from tiger_fast.ids import IdTable

    table = IdTable.from_parquet(ids_path)
    ids = table.item_ids.numpy()
    rng = np.random.default_rng(seed)
    bodies = []
    for i in range(n):
        length = int(rng.integers(3, 21))
        hist = rng.choice(ids, size=length).tolist()
        req = {"user_id": int(rng.integers(0, 1 << 30)), "history": hist, "k": k}
        raw = json.dumps(req).encode()
        bodies.append(b"POST /recommend HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                      b"Connection: close\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    return bodies


class Server:
    def __init__(self, run_dir: str, args: list[str]):
        model = os.path.join(run_dir, "retriever")
        cmd = [sys.executable, "-m", "tiger_fast.cli", "serve", "--ids", os.path.join(run_dir, "ids.parquet"),
               "--model", model, "--port", "0", *args]
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on http://([\d.]+):(\d+)", line)
        if not m:
            self.log.seek(0)
            raise RuntimeError(f"server did not start: {line!r} {self.log.read()[-2000:]}")
        self.host, self.port = m.group(1), int(m.group(2))
        deadline = time.monotonic() + 300
        while self.get("/health")[0] != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                self.log.seek(0)
                raise RuntimeError(f"server not ready: {self.log.read()[-2000:]}")
            time.sleep(0.2)

    def get(self, path: str):
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read().decode()
        except OSError:
            return 0, ""
        finally:
            conn.close()

    def metrics(self) -> dict:
        out = {}
        for line in self.get("/metrics")[1].splitlines():
            if line and not line.startswith("#"):
                name, _, v = line.rpartition(" ")
                out[name] = float(v)
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        return rc


async def _one(host, port, body: bytes, t_sched: float, timeout: float, out: list):
    delay = t_sched - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    try:
        async with asyncio.timeout(timeout - max(0.0, time.perf_counter() - t_sched)):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(body)
            await writer.drain()
            data = await reader.read()
            writer.close()
        status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else -1
        out.append((status, time.perf_counter() - t_sched))
    except TimeoutError:
        out.append(("timeout", None))
    except OSError:
        out.append(("connect_error", None))


async def open_loop(host, port, bodies: list[bytes], rate: float, seconds: float, max_requests: int,
                    timeout: float, seed: int) -> tuple[list, float, float]:
    """Poisson arrivals at ``rate`` for ``seconds`` (at most ``max_requests``) -> (results, wall
    from the first send to the last answer, the realised offered rate (n - 1) / schedule span)."""
    rng = np.random.default_rng(seed)
    n = int(min(max_requests, max(1, round(rate * seconds))))
    gaps = rng.exponential(1.0 / rate, size=n)
    t0 = time.perf_counter() + 0.05
    sched = t0 + np.cumsum(gaps) - gaps[0]
    out: list = []
    tasks = [asyncio.create_task(_one(host, port, bodies[i % len(bodies)], float(s), timeout, out))
             for i, s in enumerate(sched)]
    await asyncio.gather(*tasks)
    span = float(sched[-1] - sched[0])
    return out, time.perf_counter() - t0, (n - 1) / span if span > 0 else float(rate)


def summarize(results: list, wall: float, realised: float, rate: float, m0: dict, m1: dict) -> dict:
    ok = np.array([lat for st, lat in results if st == 200], dtype=np.float64)
    n = len(results)
    pct = (lambda q: float(np.percentile(ok, q) * 1000)) if ok.size else (lambda q: None)
    bs = m1.get("tiger_batch_size_count", 0) - m0.get("tiger_batch_size_count", 0)
    bsum = m1.get("tiger_batch_size_sum", 0) - m0.get("tiger_batch_size_sum", 0)
    bt = m1.get("tiger_batch_duration_seconds_sum", 0) - m0.get("tiger_batch_duration_seconds_sum", 0)
    return {"offered_rps": rate, "realised_offered_rps": realised, "requests": n, "ok": int(ok.size),
            "rejected_503": sum(1 for st, _ in results if st == 503),
            "timeouts": sum(1 for st, _ in results if st == "timeout"),
            "other_errors": sum(1 for st, _ in results if st not in (200, 503, "timeout")),
            "achieved_rps": float(ok.size / wall) if wall > 0 else 0.0,
            "p50_ms": pct(50), "p99_ms": pct(99), "p999_ms": pct(99.9), "max_ms": pct(100),
            "mean_batch_size": float(bsum / bs) if bs else None,
            "mean_batch_decode_ms": float(bt / bs * 1000) if bs else None,
            "loadavg_1m": os.getloadavg()[0]}


def served(r: dict, slo_ms: float) -> bool:
    return r["p99_ms"] is not None and r["p99_ms"] <= slo_ms and r["ok"] >= 0.99 * r["requests"]


def plot(results: dict, path: str, slo_ms: float, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"batching": ("tab:blue", "o"), "no batching": ("tab:red", "s")}
    for mode, rows in results.items():
        c, mk = styles.get(mode, ("k", "x"))
        x = [r["offered_rps"] for r in rows if r["p99_ms"] is not None]
        ax.plot(x, [r["p50_ms"] for r in rows if r["p99_ms"] is not None], ls="--", marker=mk, color=c, alpha=0.6,
                label=f"{mode}: p50")
        ax.plot(x, [r["p99_ms"] for r in rows if r["p99_ms"] is not None], ls="-", marker=mk, color=c,
                label=f"{mode}: p99")
    ax.axhline(slo_ms, color="gray", lw=0.8, ls=":", label=f"p99 target {slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests / s, Poisson)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default=None, help="directory with ids.parquet and retriever/ (a `tiger-fast demo --out`)")
    p.add_argument("--build", default=None, help="build a demo-size run into this directory first (if missing)")
    p.add_argument("--train-seconds", type=float, default=100.0, help="--build: retriever training time")
    p.add_argument("--rates", default="10,20,50,100,200,400,800", help="offered rates, requests/s")
    p.add_argument("--seconds", type=float, default=10.0, help="longest run per rate")
    p.add_argument("--max-requests", type=int, default=2000, help="most requests per rate")
    p.add_argument("--timeout", type=float, default=3.0, help="client timeout per request (s)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-batch", type=int, default=32, help="batching mode's --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="batching mode's --max-wait-ms")
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="server torch threads (1: the decode thread on one core, "
                   "the HTTP loop and this client on the other; 2 threads stalled under a shared machine's load)")
    p.add_argument("--slo-ms", type=float, default=50.0, help="p99 target")
    p.add_argument("--modes", default="batching,no batching")
    p.add_argument("--small", action="store_true", help="3 rates x 3 s (a quick check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "serve.json"))
    p.add_argument("--plot", default=os.path.join(HERE, "results", "serve.png"))
    a = p.parse_args(argv)
    run_dir = a.run or a.build
    if run_dir is None:
        p.error("give --run DIR or --build DIR")
    if a.build:
        build_run(a.build, a.train_seconds, 2000, 3000)
    rates = [float(r) for r in a.rates.split(",")]
    if a.small:
        rates, a.seconds = rates[:3], 3.0
    bodies = request_bodies(os.path.join(run_dir, "ids.parquet"), 512, a.k, a.seed)
    modes = {"batching": ["--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms)],
             "no batching": ["--max-batch", "1", "--max-wait-ms", "0"]}
    report = {"command": " ".join(sys.argv), "config": dict(vars(a)), "machine": {"cpus": os.cpu_count(),
              "loadavg_start": os.getloadavg()}, "results": {}}
    with open(os.path.join(run_dir, "retriever", "config.json")) as f:
        report["model"] = json.load(f)["t5_config"]
    t_start = time.perf_counter()
    # Both servers run side by side and take turns at each rate, so that both modes see the same
    # machine (load from other processes drifts over minutes).
    servers = {}
    try:
        for mode in [m.strip() for m in a.modes.split(",")]:
            servers[mode] = Server(run_dir, modes[mode] + ["--max-queue", str(a.max_queue), "--threads", str(a.threads)])
            asyncio.run(open_loop(servers[mode].host, servers[mode].port, bodies, 20.0, 2.0, 40, a.timeout,
                                  a.seed + 99))  # warm-up
            report["results"][mode] = []
        active = list(servers)
        for rate in rates:
            for mode in list(active):
                srv = servers[mode]
                m0 = srv.metrics()
                res, wall, realised = asyncio.run(open_loop(srv.host, srv.port, bodies, rate, a.seconds,
                                                            a.max_requests, a.timeout, a.seed + int(rate)))
                r = summarize(res, wall, realised, rate, m0, srv.metrics())
                report["results"][mode].append(r)
                print(f"{mode:>12} {rate:7.0f}/s ({realised:5.1f}): achieved {r['achieved_rps']:7.1f}/s  p50 {r['p50_ms'] or 0:7.1f}  "
                      f"p99 {r['p99_ms'] or 0:7.1f}  p99.9 {r['p999_ms'] or 0:7.1f} ms  503 {r['rejected_503']:4d}  "
                      f"timeouts {r['timeouts']:4d}  batch {r['mean_batch_size'] or 0:5.1f}  "
                      f"load {r['loadavg_1m']:.1f}", flush=True)
                if not served(r, a.slo_ms) and r["achieved_rps"] < 0.5 * rate:
                    active.remove(mode)  # saturated: higher rates only queue and time out
            if not active:
                break
    finally:
        report["server_exit_codes"] = {mode: srv.stop() for mode, srv in servers.items()}
    report["seconds"] = time.perf_counter() - t_start
    report["machine"]["loadavg_end"] = os.getloadavg()
    head = {}
    for mode, rows in report["results"].items():
        ok = [r["offered_rps"] for r in rows if served(r, a.slo_ms)]
        knee = next((r["offered_rps"] for r in rows if not served(r, a.slo_ms)), None)
        head[mode] = {"max_rate_served": max(ok) if ok else None, "first_rate_not_served": knee,
                      "best_achieved_rps": max(r["achieved_rps"] for r in rows) if rows else None}
    report["headline"] = head
    write_json(a.out, report)
    title = (f"tiger-fast serve, T5 d_model {report['model']['d_model']}, k={a.k}, {os.cpu_count()} CPUs "
             f"(load avg {report['machine']['loadavg_start'][0]:.1f} at start), client on the same machine")
    png = plot(report["results"], a.plot, a.slo_ms, title) if a.plot else None
    print(json.dumps(head, indent=2))
    print(f"wrote {a.out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
