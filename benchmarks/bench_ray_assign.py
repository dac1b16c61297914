"""Throughput of the Ray Data ID assignment (``tiger_fast.ray_assign.assign_ids_ray``) with 1 vs
2 map workers on a local Ray instance, next to the single-machine streaming path
(``tiger_fast.assign.assign_ids``) on the same data; checks that every output is identical.

Data: ``--items`` synthetic item embeddings (``tiger_fast.synthetic.synthetic_latents``, clustered)
written as ``--shards`` Parquet shards (column embedding fixed_size_list<float32>, item_id int64).
Model: a random RQ-VAE (``--input-dim`` -> hidden -> latent, k-means-initialised codebooks) —
the throughput of assignment does not depend on how well the model was trained.

Output: one JSON document (stdout and ``--out``): per run items/s, wall seconds and Ray's phase
times (map = encoder + quantizer on the actors; dup_check = the distributed sort of ids;
sort_write = the distributed sort by (prefix, id) + the driver's streaming collision pass and
Parquet write).  Per-worker map throughput = items / map_s / workers.

Example (the numbers in the report)::

    python benchmarks/bench_ray_assign.py --items 1000000 --shards 8 --workers 1 2 --out bench_ray.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tiger_fast.atomic import write_text  # noqa: E402


def make_data(d: str, n: int, shards: int, dim: int, seed: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiger_fast.synthetic import synthetic_latents

    x = synthetic_latents(n, dim=dim, clusters=256, seed=seed)
    ids = np.random.default_rng(seed).permutation(n * 7)[:n].astype(np.int64)  # sparse, unordered ids
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    os.makedirs(os.path.join(d, "shards"), exist_ok=True)
    for i in range(shards):
        a, b = int(bounds[i]), int(bounds[i + 1])
        t = pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[a:b].reshape(-1)), dim),
                      "item_id": pa.array(ids[a:b])})
        pq.write_table(t, os.path.join(d, "shards", f"part-{i:05d}.parquet"), row_group_size=65536)
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--input-dim", type=int, default=16)
    ap.add_argument("--codebook", type=int, default=64, help="codebook size per level (3 levels)")
    ap.add_argument("--collision-size", type=int, default=1024)
    ap.add_argument("--batch-rows", type=int, default=65536)
    ap.add_argument("--encode-block", type=int, default=4096)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--object-store-mb", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # shared machine: no OOM-killer heuristics
    import torch

    import ray
    from tiger_fast.assign import assign_ids
    from tiger_fast.ray_assign import assign_ids_ray
    from tiger_fast.layout import TokenLayout
    from tiger_fast.rqvae import RQVAE, RQVAEConfig

    torch.set_num_threads(1)
    k = args.codebook
    cfg = RQVAEConfig(input_dim=args.input_dim, hidden_dims=(32,), latent_dim=8, codebook_sizes=(k, k, k))
    layout = TokenLayout(codebook_sizes=(k, k, k), collision_size=args.collision_size)
    res = {"benchmark": "ray_assign", "items": args.items, "shards": args.shards, "model": cfg.to_dict(),
           "batch_rows": args.batch_rows, "encode_block": args.encode_block, "ray": ray.__version__,
           "torch": torch.__version__, "machine": platform.machine(), "cpus_visible": os.cpu_count(),
           "ray_num_cpus": args.num_cpus, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as d:
        t = time.perf_counter()
        x = make_data(d, args.items, args.shards, args.input_dim, args.seed)
        res["make_data_s"] = time.perf_counter() - t
        g = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        model = RQVAE(cfg)
        with torch.no_grad():
            model.init_codebooks(torch.from_numpy(x[:20000]), iters=5, generator=g)
        del x
        from tiger_fast.ray_assign import ParquetShards

        single = os.path.join(d, "single.parquet")
        rep = assign_ids(model, ParquetShards(os.path.join(d, "shards")), single, layout=layout,
                         chunk_size=args.batch_rows, encode_block=args.encode_block, progress=False)
        ref = open(single, "rb").read()
        res["runs"].append({"engine": "assign_ids (single process, torch threads=1)", "workers": 1,
                            "seconds": rep["seconds"], "items_per_second": rep["items_per_second"],
                            "identical": True})
        t = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=args.object_store_mb * 2 ** 20,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT, "RAY_memory_monitor_refresh_ms": "0"}})
        res["ray_init_s"] = time.perf_counter() - t
        try:
            for w in args.workers:
                out = os.path.join(d, f"ray_{w}.parquet")
                rep = assign_ids_ray(model, os.path.join(d, "shards"), out, layout=layout, num_workers=w,
                                     batch_rows=args.batch_rows, encode_block=args.encode_block)
                tm = rep["timing"]
                res["runs"].append({"engine": "assign_ids_ray", "workers": w, "seconds": rep["seconds"],
                                    "items_per_second": rep["items_per_second"], **tm,
                                    "map_items_per_second_per_worker": args.items / tm["map_s"] / w,
                                    "identical": open(out, "rb").read() == ref})
                print(json.dumps(res["runs"][-1]), file=sys.stderr)
        finally:
            ray.shutdown()
    s = json.dumps(res, indent=1)
    print(s)
    if args.out:
        write_text(args.out, s + "\n")
    return res


if __name__ == "__main__":
    main()
