"""The demo pipeline runs end to end (tiny sizes) and saves loadable artefacts."""
import json
import os

from tiger_fast.pipeline import PipelineConfig, run_demo


def test_demo_pipeline_tiny(tmp_path):
    cfg = PipelineConfig(rq_epochs=10, t5={"d_model": 32, "num_heads": 2, "d_kv": 16, "d_ff": 64,
                                           "num_encoder_layers": 1, "num_decoder_layers": 1},
                         steps=20, batch_size=32, warmup_steps=5, lr=0.003, eval_every=10, eval_users=20,
                         backend="reference")
    lines = []
    rep = run_demo(str(tmp_path / "out"), num_items=240, num_users=130, cfg=cfg, progress=False, echo=lines.append)
    assert rep["semantic_ids"]["num_items"] == 240
    assert rep["training"]["final_step"] == 20
    assert len(rep["entropy_vs_temperature"]) == 5
    assert len(rep["examples"]) == 3 and all(len(e["recommended"]) == 5 for e in rep["examples"])
    assert any("beats popularity" in ln for ln in lines)
    saved = json.load(open(tmp_path / "out" / "report.json"))
    assert saved["dataset"]["items"] == 240
    from tiger_fast.ids import IdTable
    from tiger_fast.rqvae import load_rqvae
    from tiger_fast.t5 import load_t5

    table = IdTable.from_parquet(os.path.join(tmp_path, "out", "ids.parquet"))
    assert len(table) == 240
    load_rqvae(os.path.join(tmp_path, "out", "rqvae"))
    model, layout = load_t5(os.path.join(tmp_path, "out", "retriever"))
    assert layout == table.layout
    # the reported Recall@10 values are the saved artefacts' (not just numbers in [0, 1])
    from collections import Counter

    from tiger_fast.evaluate import evaluate_retriever
    from tiger_fast.sequences import leave_one_out
    from tiger_fast.synthetic import synthetic_dataset

    ds = synthetic_dataset(num_items=240, num_users=130, seed=cfg.seed)
    test = leave_one_out(ds).test
    ends = dict(zip(test.user_index.tolist(), test.end.tolist()))
    counts = Counter()  # popularity oracle: interactions before each test target, ties by smaller index
    for u, s in enumerate(ds.sequences):
        counts.update(s[:ends.get(u, len(s))].tolist())
    top10 = sorted(range(240), key=lambda i: (-counts[i], i))[:10]
    hits = sum(int(ds.sequences[u][e]) in top10 for u, e in ends.items())
    assert rep["evaluation"]["popularity"]["recall@10"] == hits / len(ends)
    again = evaluate_retriever(model, ds, table, split="test", k=10, backend="reference")
    assert rep["evaluation"]["tiger"]["recall@10"] == again["recall@10"]


def _tiny_setup():
    import torch

    from tiger_fast.synthetic import synthetic_dataset
    from tiger_fast.ids import IdTable
    from tiger_fast.layout import TokenLayout

    ds = synthetic_dataset(num_items=61, num_users=37, seed=0)
    codes = torch.randint(0, 256, (61, 3), generator=torch.Generator().manual_seed(0))
    table = IdTable.from_rq_codes(TokenLayout(), ds.item_ids, codes)
    cfg = PipelineConfig(t5={"d_model": 16, "num_heads": 2, "d_kv": 8, "d_ff": 32,
                             "num_encoder_layers": 1, "num_decoder_layers": 1},
                         steps=3, batch_size=8, warmup_steps=1, lr=0.003, eval_every=100, eval_users=0,
                         backend="reference")
    return ds, table, cfg


def test_train_tiger_warm_start_keeps_training_the_given_model():
    import torch

    from tiger_fast.pipeline import train_tiger

    ds, table, cfg = _tiny_setup()
    first, _ = train_tiger(ds, table, cfg, progress=False)
    before = {k: v.clone() for k, v in first.state_dict().items()}
    again, hist = train_tiger(ds, table, cfg, progress=False, init_model=first)
    assert again is first and hist["final_step"] == 3
    changed = [k for k, v in again.state_dict().items() if not torch.equal(v, before[k])]
    assert "shared.weight" in changed
    # starting from the trained weights is not the same as starting from scratch
    fresh, _ = train_tiger(ds, table, cfg, progress=False)
    assert torch.equal(fresh.shared.weight, before["shared.weight"])  # scratch runs are reproducible
    assert not torch.equal(fresh.shared.weight, again.shared.weight)


def test_train_tiger_warm_start_rejects_a_mismatched_model():
    import pytest

    from tiger_fast.pipeline import train_tiger
    from tiger_fast.t5 import T5, T5Config

    ds, table, cfg = _tiny_setup()
    with pytest.raises(TypeError, match="init_model"):
        train_tiger(ds, table, cfg, progress=False, init_model="model/")
    other = T5(T5Config(vocab_size=table.layout.vocab_size + 1, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                        num_encoder_layers=1, num_decoder_layers=1))
    with pytest.raises(ValueError, match="init_model has vocab_size"):
        train_tiger(ds, table, cfg, progress=False, init_model=other)
