"""Retriever training throughput on Amazon Beauty, side by side in one run (not a test): numeric
precision (fp32 / bf16 autocast), length-bucketed batches and the other speed options of
``TrainConfig``, each trained for the same steps on the same batches from the same initial weights.

For every setting it reports steps/s (median over ``--repeat`` alternated rounds, so machine load
hits every setting alike), ``final_loss`` (mean training loss over the last ``--steps // 4``
steps: the same batches for every setting with the same ``length_buckets``), ``heldout_loss_fp32``
(the trained model's fp32 loss on a fixed batch of 1,024 training examples: what was learned,
measured the same way for every setting), and the padded-to-real encoder token ratio.

    python benchmarks/bench_train.py --precisions fp32 bf16 --json train.json          # paper-size T5
    python benchmarks/bench_train.py --model small --batch-size 64 --steps 200 --precisions fp32 bf16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiger_fast.atomic import write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def padded_ratio(lengths: torch.Tensor, batches: list[torch.Tensor]) -> float:
    """Encoder tokens computed (each batch padded to its longest) / real tokens."""
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    real = sum(int(lengths[b].sum()) for b in batches)
    return padded / real


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="Beauty directory (default: $TIGER_FAST_DATA or ../shared/data)")
    p.add_argument("--model", default="paper", help="model preset (tiger_fast.pipeline.MODEL_PRESETS)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=16, help="timed steps per setting and round (after 2 warm-up steps)")
    p.add_argument("--repeat", type=int, default=2, help="alternated rounds; steps/s is the median")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--buckets", type=int, nargs="+", default=[64], help="length_buckets settings to compare")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--rqvae-epochs", type=int, default=0,
                   help="also time this many RQ-VAE epochs per precision (12,101 x 384 unit vectors, batch 1024)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from tiger_fast.data import default_data_dir, load_beauty
    from tiger_fast.ids import IdTable
    from tiger_fast.layout import TokenLayout
    from tiger_fast.pipeline import model_preset
    from tiger_fast.sequences import leave_one_out, tokenize_split
    from tiger_fast.t5 import T5, paper_config
    from tiger_fast.train import ExampleOrder, TrainConfig, train_retriever

    ds = load_beauty(a.data or default_data_dir() / "amazon-beauty-2014")
    layout = TokenLayout()
    # Throughput does not depend on which IDs the items have: random (unique) codes will do.
    rng = np.random.default_rng(0)
    table = IdTable.from_rq_codes(layout, ds.item_ids, rng.integers(0, 256, size=(len(ds.item_ids), 3)))
    ex = tokenize_split(leave_one_out(ds).train, ds, layout, table)
    lengths = ex.attention_mask.sum(1)
    cfg_t5 = paper_config(layout, **model_preset(a.model))
    held = torch.randperm(len(ex), generator=torch.Generator().manual_seed(123))[:1024]
    held_batch = ex.batch(held)
    out = {"benchmark": "train", "model": a.model, "t5": cfg_t5.to_dict(), "parameters": None,
           "batch_size": a.batch_size, "threads": a.threads, "examples": len(lengths),
           "mean_encoder_tokens": float(lengths.float().mean()),
           "loadavg_start": os.getloadavg(), "runs": []}
    settings = [(pr, w) for w in a.buckets for pr in a.precisions]
    times = {s: [] for s in settings}
    result = {}
    for rnd in range(a.repeat):
        for pr, w in settings:
            base = dict(batch_size=a.batch_size, length_buckets=w, eval_every=10 ** 9, precision=pr,
                        log_every=max(1, a.steps // 4), warmup_steps=100, lr=1e-3)
            train_retriever(T5(cfg_t5, seed=0), ex, config=TrainConfig(max_steps=2, **base), progress=False)
            model = T5(cfg_t5, seed=0)
            out["parameters"] = model.num_parameters()
            t0 = time.perf_counter()
            hist = train_retriever(model, ex, config=TrainConfig(max_steps=a.steps, **base), progress=False)
            times[(pr, w)].append(time.perf_counter() - t0)
            if rnd == 0:  # every round trains the same steps on the same batches
                model.eval()
                with torch.no_grad():
                    held_loss = float(model.loss(*held_batch, 0))
                order = ExampleOrder(len(ex), 0, lengths=lengths, window=w, batch_size=a.batch_size)
                batches = [order.batch(s, a.batch_size) for s in range(a.steps)]
                result[(pr, w)] = {"final_loss": hist["loss"][-1][1], "heldout_loss_fp32": held_loss,
                                   "padded_to_real_encoder_tokens": padded_ratio(lengths, batches)}
    for pr, w in settings:
        dt = statistics.median(times[(pr, w)])
        sps = a.steps / dt
        run = {"precision": pr, "length_buckets": w, "steps": a.steps, "seconds": times[(pr, w)],
               "steps_per_s": sps, "examples_per_s": sps * a.batch_size, **result[(pr, w)],
               "paper_schedule_hours": 200_000 * 256 / (sps * a.batch_size) / 3600}
        out["runs"].append(run)
        print(json.dumps(run), flush=True)
    if a.rqvae_epochs:
        out["rqvae_runs"] = rqvae_runs(a.precisions, a.rqvae_epochs, a.repeat)
    out["loadavg_end"] = os.getloadavg()
    first = out["runs"][0]["steps_per_s"]
    out["speedup_vs_first"] = [r["steps_per_s"] / first for r in out["runs"]]
    print("speed-up vs", settings[0], ":", [f"{x:.2f}" for x in out["speedup_vs_first"]],
          "loadavg", out["loadavg_start"], out["loadavg_end"])
    if a.json:
        write_json(a.json, out)


def rqvae_runs(precisions, epochs: int, repeat: int) -> list[dict]:
    """RQ-VAE (paper architecture 384 -> 512/256/128 -> 32, 3 x 256 codes) epochs/s per precision,
    alternated over ``repeat`` rounds, and the final reconstruction loss / code usage (same seed,
    same batches)."""
    from tiger_fast.rqvae import RQVAEConfig, RQVAETrainConfig, train_rqvae

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(12_101, 384, generator=g), dim=1)
    times = {pr: [] for pr in precisions}
    last = {}
    for _ in range(repeat):
        for pr in precisions:
            t0 = time.perf_counter()
            _, hist = train_rqvae(x, RQVAEConfig(input_dim=384), RQVAETrainConfig(epochs=epochs, precision=pr),
                                  progress=False)
            times[pr].append(time.perf_counter() - t0)
            last[pr] = hist[-1]
    runs = []
    for pr in precisions:
        dt = statistics.median(times[pr])
        runs.append({"precision": pr, "epochs": epochs, "seconds": times[pr], "epochs_per_s": epochs / dt,
                     "final_recon_loss": last[pr]["recon_loss"], "final_loss": last[pr]["loss"],
                     "final_usage": last[pr].get("final_usage")})
        print(json.dumps(runs[-1]), flush=True)
    return runs


if __name__ == "__main__":
    main()
