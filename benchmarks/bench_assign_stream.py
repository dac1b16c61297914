"""End-to-end streaming ID assignment at catalogue scale (issue 4): N synthetic 32-d latents on disk
-> ``tiger-fast assign-ids`` (``tiger_fast.assign.assign_ids``) -> ID table Parquet, with
throughput, peak RSS, a kill/resume test and an output check.

Steps:

1. ``DIR/latents.npy``: N x 32 float32 latents from ``tiger_fast.synthetic.iter_synthetic_latents``
   (deterministic by global row; one Gaussian blob, ``clusters=1`` — see ``DATA`` for why),
   written chunk by chunk through ``np.lib.format.open_memmap`` (bounded memory).
   ``DIR/latents.npy.done`` (JSON) marks a complete file; a rerun with the same parameters reuses it.
2. ``DIR/rqvae``: a deterministic RQ-VAE (input 32, the paper's hidden dims 512/256/128, latent 32,
   3 x 256 codebooks), seeded weights, codebooks k-means-initialised (``RQVAE.init_codebooks``) on a
   strided sample of the file's rows — no training: assignment throughput does not depend on how
   well the model was trained, and k-means codebooks spread the codes like a trained model's.
3. ``python -m tiger_fast.cli assign-ids ... --quiet`` as a child process; wall time, its peak
   RSS = the kernel's high-water mark ``VmHWM`` of the child (memory-mapped input pages included,
   which are file-backed and reclaimable) and the peak anonymous (heap) part ``RssAnon``, both
   read from ``/proc`` every 0.2 s.  The map phase ends when the last chunk directory
   ``DIR/<run>/ids.parquet.work/map/cXXXXXXXX`` appears (polled every 0.2 s).
   With ``--kill-after-chunks K`` the child is SIGKILLed as soon as K map chunks are finished, then
   the same command is rerun; it resumes from the work directory, and the reported totals add the
   two runs.
4. The output is checked in bounded memory, one row group at a time: row count == N, every item id
   0..N-1 present exactly once (a bitmap of N bytes), and the rows strictly increasing in
   (c0, c1, c2, c3) — the file is in semantic-ID order, so that proves every full ID unique.
   ``--identity`` also runs the same assignment uninterrupted into a second directory and compares
   the two Parquet files byte for byte.
5. Everything is printed and written to ``--json``.

Examples (the numbers in the README)::

    python benchmarks/bench_assign_stream.py --n 2000000 --dir /work/cache/stream2m \\
        --kill-after-chunks 12 --identity --json stream2m.json
    nice -n 5 python benchmarks/bench_assign_stream.py --n 100000000 --dir /work/cache/stream100m \\
        --kill-after-chunks 610 --json stream100m.json
    # the same assignment uninterrupted (reuses latents and model); compare the two "sha256" fields
    nice -n 5 python benchmarks/bench_assign_stream.py --n 100000000 --dir /work/cache/stream100m \\
        --json stream100m_uninterrupted.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tiger_fast.atomic import write_json  # noqa: E402

DIM = 32
# One Gaussian blob (clusters=1) of unit noise: with an *untrained* RQ-VAE, 256 tight clusters give
# a heavy tail of prefix-group sizes (the 2M-item histogram grows ~x1.15-1.4 per extra item, which
# extrapolates past the 256 collision codes at 100M items); a smooth density gives a geometric tail
# (ratio ~0.08 per extra item at 2M -> largest group ~100 at 100M).
DATA = {"dim": DIM, "clusters": 1, "noise": 1.0, "spread": 0.5, "seed": 0}
GEN_CHUNK = 1 << 20


def write_latents(path: str, n: int) -> dict:
    """DIR/latents.npy (n, 32) float32, chunk by chunk; returns timing info."""
    from tiger_fast.synthetic import iter_synthetic_latents

    marker = path + ".done"
    want = {"n": n, **DATA}
    if os.path.exists(marker) and os.path.exists(path):
        with open(marker) as f:
            have = json.load(f)
        x = np.load(path, mmap_mode="r")
        if have == want and x.shape == (n, DIM) and x.dtype == np.float32:
            return {"reused": True, "seconds": 0.0}
    if os.path.exists(marker):
        os.unlink(marker)
    t = time.perf_counter()
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for start, block in iter_synthetic_latents(n, DATA["dim"], DATA["clusters"], DATA["seed"],
                                               chunk_size=GEN_CHUNK, noise=DATA["noise"],
                                               spread=DATA["spread"]):
        x[start: start + block.shape[0]] = block
        if (start // GEN_CHUNK) % 16 == 15:
            x.flush()  # keeps the dirty page cache bounded
    x.flush()
    del x
    with open(marker, "w") as f:
        json.dump(want, f)
    return {"reused": False, "seconds": time.perf_counter() - t}


def build_rqvae(path: str, latents: str, sample: int, iters: int) -> dict:
    """A seeded RQ-VAE with k-means-initialised codebooks, saved to ``path``."""
    import torch

    from tiger_fast.rqvae import RQVAE, RQVAEConfig, save_rqvae

    marker = os.path.join(path, "bench.done")
    want = {"sample": sample, "iters": iters, "data": DATA}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == want:
                return {"reused": True, "seconds": 0.0}
    t = time.perf_counter()
    torch.manual_seed(0)  # weight init of this one module; nothing else in this process is random
    model = RQVAE(RQVAEConfig(input_dim=DIM, hidden_dims=(512, 256, 128), latent_dim=32,
                              codebook_sizes=(256, 256, 256)))
    x = np.load(latents, mmap_mode="r")
    rows = np.linspace(0, x.shape[0] - 1, min(sample, x.shape[0])).astype(np.int64)
    xs = torch.from_numpy(np.array(x[rows], dtype=np.float32))
    model.init_codebooks(xs, iters=iters, generator=torch.Generator().manual_seed(0))
    save_rqvae(model, path)
    with open(marker, "w") as f:
        json.dump(want, f)
    return {"reused": False, "seconds": time.perf_counter() - t}


def _finished_chunks(map_dir: str) -> int:
    try:
        return sum(1 for e in os.listdir(map_dir) if e.startswith("c") and ".tmp" not in e)
    except FileNotFoundError:
        return 0


def _proc_mem(pid: int) -> dict:
    """VmHWM (peak RSS so far) and current RssAnon / RssFile of a process in MiB (Linux /proc);
    {} when unavailable."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "RssAnon:", "RssFile:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) / 1024.0
    except OSError:
        pass
    return out


def run_assign(cmd: list[str], work: str, num_chunks: int, kill_after: int | None) -> dict:
    """Run ``cmd`` as a child; poll the work dir; SIGKILL after ``kill_after`` finished chunks."""
    map_dir = os.path.join(work, "map")
    c0 = _finished_chunks(map_dir)
    t0 = time.perf_counter()
    out_path = os.path.join(work + ".stdout")
    with open(out_path, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    t_map_end = None
    killed = False
    status = rusage = None
    peak_anon = peak_file = hwm = 0.0
    while True:
        pid, status, rusage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        m = _proc_mem(p.pid)
        peak_anon = max(peak_anon, m.get("RssAnon", 0.0))
        peak_file = max(peak_file, m.get("RssFile", 0.0))
        hwm = max(hwm, m.get("VmHWM", 0.0))
        done = _finished_chunks(map_dir)
        if t_map_end is None and done >= num_chunks:
            t_map_end = time.perf_counter()
        if kill_after is not None and not killed and done >= kill_after:
            os.killpg(p.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)  # polling interval (map-phase end, kill point, memory samples)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if t_map_end is None and _finished_chunks(map_dir) >= num_chunks:
        t_map_end = time.perf_counter()  # finished between two polls (or the work dir is gone)
    with open(out_path) as f:
        text = f.read()
    rep = {"returncode": p.returncode, "killed": killed, "wall_s": wall,
           # VmHWM: the kernel's high-water mark of this process's resident set (anonymous +
           # file-backed, i.e. mmapped input pages too), read every 0.2 s.  Not wait4's ru_maxrss:
           # Linux carries the parent's peak over fork+exec, so that reports max(parent, child).
           "peak_rss_mb": hwm, "ru_maxrss_mb": rusage.ru_maxrss / 1024.0,
           # sampled every 0.2 s: anonymous memory (heap) vs file-backed (mmapped input, libraries)
           "peak_rss_anon_mb_sampled": peak_anon, "peak_rss_file_mb_sampled": peak_file,
           "chunks_before": c0, "chunks_after": _finished_chunks(map_dir) if killed else num_chunks,
           "map_s": (t_map_end - t0) if t_map_end is not None else None}
    if not killed:
        if p.returncode != 0:
            raise RuntimeError(f"assign-ids failed (exit {p.returncode}):\n{text[-4000:]}")
        rep["report"] = json.loads(text[text.index("{"):])
    return rep


def verify(path: str, n: int) -> dict:
    """Row count, item ids = 0..n-1 each once, rows strictly increasing in (c0..c3)."""
    import pyarrow.parquet as pq

    t = time.perf_counter()
    pf = pq.ParquetFile(path)
    seen = np.zeros(n, dtype=bool)
    rows = 0
    prev = None
    ids_ok = order_ok = True
    max_c3 = 0
    for g in range(pf.num_row_groups):
        tb = pf.read_row_group(g)
        ids = tb.column("item_id").to_numpy()
        c = np.stack([tb.column(f"c{l}").to_numpy() for l in range(4)], axis=1)
        rows += ids.size
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            ids_ok = False
            break
        if seen[ids].any() or np.unique(ids).size != ids.size:
            ids_ok = False
        seen[ids] = True
        if prev is not None:
            c = np.concatenate([prev, c])
        # strictly increasing rows <=> every consecutive pair differs and the first difference is > 0
        d = np.diff(c, axis=0)
        nz = d != 0
        first = np.argmax(nz, axis=1)
        if d.shape[0] and not (nz.any(axis=1) & (d[np.arange(d.shape[0]), first] > 0)).all():
            order_ok = False
        max_c3 = max(max_c3, int(c[:, 3].max()) if c.size else 0)
        prev = c[-1:]
    return {"rows": rows, "rows_ok": rows == n, "item_ids_unique_and_complete": bool(ids_ok and seen.all()),
            "full_ids_unique_and_sorted": order_ok, "max_collision_code": max_c3,
            "seconds": time.perf_counter() - t}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 24), b""):
            h.update(b)
    return h.hexdigest()


def assignment(d: str, name: str, n: int, args, kill_after: int | None) -> dict:
    run_dir = os.path.join(d, name)
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    out = os.path.join(run_dir, "ids.parquet")
    work = out + ".work"
    cmd = [sys.executable, "-m", "tiger_fast.cli", "assign-ids", "--rqvae", os.path.join(d, "rqvae"),
           "--embeddings", os.path.join(d, "latents.npy"), "--out", out, "--chunk-size",
           str(args.chunk_size), "--quiet"]
    num_chunks = -(-n // args.chunk_size)
    runs = []
    if kill_after is not None:
        r = run_assign(cmd, work, num_chunks, kill_after)
        if not r["killed"]:
            raise RuntimeError("the run finished before it could be killed; use a smaller --kill-after-chunks")
        runs.append(r)
    runs.append(run_assign(cmd, work, num_chunks, None))
    res = {"command": " ".join(cmd), "runs": runs, "output": out,
           "wall_s": sum(r["wall_s"] for r in runs),
           "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
           "peak_rss_anon_mb_sampled": max(r["peak_rss_anon_mb_sampled"] for r in runs)}
    res["items_per_s"] = n / res["wall_s"]
    # map-phase throughput: rows mapped per second of map time, over the runs that mapped
    mapped_rows = map_s = 0.0
    for r in runs:
        end_chunks = r["chunks_after"]
        if r["killed"]:
            mapped_rows += (end_chunks - r["chunks_before"]) * args.chunk_size
            map_s += r["wall_s"]
        elif r["map_s"] is not None:
            mapped_rows += n - r["chunks_before"] * args.chunk_size
            map_s += r["map_s"]
    res["map_items_per_s"] = mapped_rows / map_s if map_s else None
    res["collisions"] = {k: runs[-1]["report"].get(k) for k in (
        "unique_prefixes", "colliding_items", "max_group_size", "codebook_usage", "collision_usage")}
    hist = runs[-1]["report"].get("collision_histogram", {})
    res["collisions"]["group_size_histogram_head"] = dict(list(hist.items())[:8])
    res["verify"] = verify(out, n)
    res["sha256"] = sha256(out)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, required=True, help="number of items (rows of latents)")
    ap.add_argument("--dir", required=True, help="working directory (latents, model, outputs)")
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--kill-after-chunks", type=int, default=None,
                    help="SIGKILL the first run after this many finished map chunks, then resume")
    ap.add_argument("--chunk-size", type=int, default=65536, help="map chunk rows (multiple of 4096)")
    ap.add_argument("--identity", action="store_true",
                    help="also run uninterrupted and compare the two output files byte for byte")
    ap.add_argument("--kmeans-sample", type=int, default=131072)
    ap.add_argument("--kmeans-iters", type=int, default=15)
    ap.add_argument("--cleanup", action="store_true", help="delete latents, model and outputs at the end")
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error("--n must be >= 1")
    if a.kill_after_chunks is not None and not 0 < a.kill_after_chunks < -(-a.n // a.chunk_size):
        ap.error("--kill-after-chunks must be between 1 and the number of chunks - 1")
    os.makedirs(a.dir, exist_ok=True)
    t_all = time.perf_counter()
    res = {"n": a.n, "dim": DIM, "data": DATA, "chunk_size": a.chunk_size,
           "kill_after_chunks": a.kill_after_chunks, "argv": sys.argv,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "niceness": os.nice(0)}}
    lat = os.path.join(a.dir, "latents.npy")
    res["write_latents"] = write_latents(lat, a.n)
    print(f"latents: {res['write_latents']}", flush=True)
    res["build_rqvae"] = build_rqvae(os.path.join(a.dir, "rqvae"), lat, a.kmeans_sample, a.kmeans_iters)
    print(f"rqvae: {res['build_rqvae']}", flush=True)
    res["assign"] = assignment(a.dir, "killed" if a.kill_after_chunks else "run", a.n, a, a.kill_after_chunks)
    r = res["assign"]
    print(f"assign: {r['items_per_s']:.0f} items/s overall, map {r['map_items_per_s']:.0f} items/s, "
          f"wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB (anonymous "
          f"{r['peak_rss_anon_mb_sampled']:.0f} MB), verify {r['verify']}", flush=True)
    if a.identity:
        res["uninterrupted"] = assignment(a.dir, "uninterrupted", a.n, a, None)
        u = res["uninterrupted"]
        res["identical"] = (u["sha256"] == r["sha256"])
        print(f"uninterrupted: {u['items_per_s']:.0f} items/s, wall {u['wall_s']:.1f} s, peak RSS "
              f"{u['peak_rss_mb']:.0f} MB; byte-identical to the killed+resumed output: {res['identical']}",
              flush=True)
    res["total_s"] = time.perf_counter() - t_all
    write_json(a.json, res, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k in ("n", "identical")}), flush=True)
    if a.cleanup:
        for name in ("latents.npy", "latents.npy.done", "rqvae", "killed", "run", "uninterrupted"):
            p = os.path.join(a.dir, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)
    ok = all(x["verify"]["rows_ok"] and x["verify"]["item_ids_unique_and_complete"]
             and x["verify"]["full_ids_unique_and_sorted"]
             for x in (res["assign"], res.get("uninterrupted", res["assign"])))
    return 0 if ok and res.get("identical", True) else 1


if __name__ == "__main__":
    sys.exit(main())
