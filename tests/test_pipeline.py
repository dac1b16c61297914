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
    for who in ("tiger", "popularity"):
        assert 0.0 <= rep["evaluation"][who]["recall@10"] <= 1.0
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
