"""Recipe search on the VALIDATION split at equal wall time (not a test): one retriever per
setting, each trained for ``--budget-min`` minutes by ``benchmarks/quality.py --split valid`` on the
same semantic IDs, then validation Recall@10 / NDCG@10 on all users with paired differences
(± 1 standard error, over users) against the first setting.  Test metrics are never computed.

    python benchmarks/ablations.py --data beauty --ids ids.parquet --budget-min 10 --json abl.json \\
        --setting base: --setting "rsqrt:schedule='rsqrt'; warmup_steps=2000" --setting "big:t5={}; precision='bf16'"

Each ``--setting`` is ``NAME:FIELD=VALUE; FIELD=VALUE ...`` (PipelineConfig overrides as Python
literals, separated by ``;``, applied on top of ``--preset``).  Settings run one after another in one process each, so they see the same
machine; the load average is recorded beside each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiger_fast.atomic import write_json  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="beauty")
    p.add_argument("--ids", required=True, help="ID table shared by every setting")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--budget-min", type=float, default=10.0, help="wall minutes per setting (training + validation)")
    p.add_argument("--setting", action="append", required=True, help="NAME:FIELD=VALUE; ... (first = baseline)")
    p.add_argument("--eval-reserve-min", type=float, default=1.5, help="part of the budget kept for validation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default="ablations")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    from tiger_fast.metrics import paired_difference

    os.makedirs(a.out_dir, exist_ok=True)
    rows = []
    for spec in a.setting:
        name, _, sets = spec.partition(":")
        js = os.path.join(a.out_dir, f"{name}.json")
        npz = os.path.join(a.out_dir, f"{name}.npz")
        if not os.path.exists(npz):  # finished settings are kept: a rerun resumes the search
            cmd = [sys.executable, os.path.join(HERE, "quality.py"), "--data", a.data, "--preset", a.preset,
                   "--ids", a.ids, "--split", "valid", "--no-sasrec", "--budget-min", str(a.budget_min),
                   "--eval-reserve-min", str(a.eval_reserve_min), "--threads", str(a.threads), "--json", js, "--per-user", npz]
            if sets.strip():
                cmd += ["--set", *[x.strip() for x in sets.split(";") if x.strip()]]
            t = time.perf_counter()
            print(f"== {name}: {sets or '(preset)'}", flush=True)
            subprocess.run(cmd, check=True)
            print(f"   {time.perf_counter() - t:.0f} s", flush=True)
        with open(js) as f:
            res = json.load(f)
        per = np.load(npz)
        rows.append({"name": name, "overrides": res["overrides"], "recall@10": res["tiger"]["recall@10"],
                     "ndcg@10": res["tiger"]["ndcg@10"], "coverage@10": res["tiger"].get("coverage@10"),
                     "steps": res["tiger_training"]["steps"], "epochs": res["tiger_training"]["epochs"],
                     "train_s": res["tiger_training"]["seconds"], "wall_s": res["wall_s"],
                     "loadavg": res.get("loadavg_end"), "_per": per})
    base = rows[0]["_per"]
    for r in rows:
        per = r.pop("_per")
        if not np.array_equal(per["users"], base["users"]):
            raise SystemExit(f"{r['name']}: evaluated on other users than {rows[0]['name']}")
        r["recall@10_vs_base"] = paired_difference(per["recall10"], base["recall10"])
        r["ndcg@10_vs_base"] = paired_difference(per["ndcg10"], base["ndcg10"])
    print(f"{'setting':<16}{'val R@10':>9}{'val N@10':>9}{'dR@10 ± SE':>20}{'dN@10 ± SE':>20}{'epochs':>8}")
    for r in rows:
        dr, dn = r["recall@10_vs_base"], r["ndcg@10_vs_base"]
        print(f"{r['name']:<16}{r['recall@10']:>9.4f}{r['ndcg@10']:>9.4f}"
              f"{dr['mean']:>+12.4f} ± {dr['se']:.4f}{dn['mean']:>+12.4f} ± {dn['se']:.4f}{r['epochs']:>8.1f}")
    write_json(a.json, {"benchmark": "ablations", "data": a.data, "preset": a.preset, "budget_min": a.budget_min,
                        "split": "valid", "rows": rows})


if __name__ == "__main__":
    main()
