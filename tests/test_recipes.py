"""Training recipes (pipeline.RECIPES), the end-of-training sanity warnings, and the bad inputs of
the quality workflow: an unknown preset, a budget too small to validate once, an empty split."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tiger_fast.cli import main
from tiger_fast.evaluate import evaluate_popularity
from tiger_fast.pipeline import MODEL_PRESETS, RECIPES, PipelineConfig, model_preset, recipe, sanity_warnings
from tiger_fast.synthetic import synthetic_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_recipes_build_valid_configs():
    for name in RECIPES:
        cfg = recipe(name)
        assert isinstance(cfg, PipelineConfig)
    cpu = recipe("cpu", lr=0.5)
    assert cpu.lr == 0.5 and cpu.schedule == "cosine" and cpu.eval_every_s and cpu.patience
    assert cpu.t5 == MODEL_PRESETS["small"]
    cpu.t5["d_model"] = 7  # a copy: the recipe table is not changed by its users
    assert recipe("cpu").t5["d_model"] == 64
    assert model_preset("paper") == {}


def test_cpu_recipe_trains_without_dropout_whatever_the_model_shape(tmp_path):
    """The validation ablation's winner (dropout 0) is the cpu recipe's, also when --model-size or
    --layers replace the shape; --dropout sets it; the paper recipe keeps T5's 0.1."""
    import json

    assert recipe("cpu").dropout == 0.0 and recipe("paper").dropout is None
    args = ["train", "--data", "synthetic:items=60,users=80", "--steps", "2", "--eval-users", "0", "--quiet"]
    assert main(["embed", "--data", "synthetic:items=60,users=80", "--out", str(tmp_path / "e.npy"), "--quiet"]) == 0
    assert main(["train-rqvae", "--embeddings", str(tmp_path / "e.npy"), "--out", str(tmp_path / "rq"), "--epochs",
                 "2", "--codebook-sizes", "8,8,8", "--quiet"]) == 0
    assert main(["assign-ids", "--rqvae", str(tmp_path / "rq"), "--embeddings", str(tmp_path / "e.npy"), "--out",
                 str(tmp_path / "ids.parquet"), "--quiet"]) == 0
    args += ["--ids", str(tmp_path / "ids.parquet")]
    for extra, want in (([], 0.0), (["--model-size", "small", "--layers", "1"], 0.0), (["--dropout", "0.25"], 0.25),
                        (["--preset", "paper", "--layers", "1"], 0.1)):
        out = tmp_path / f"r{len(extra)}{want}"
        assert main(args + ["--out", str(out)] + extra) == 0
        with open(out / "model" / "config.json") as f:
            assert json.load(f)["t5_config"]["dropout"] == want, extra
    assert main(args + ["--out", str(tmp_path / "bad"), "--dropout", "1.0"]) == 2


@pytest.mark.parametrize("call", [lambda: recipe("fastest"), lambda: model_preset("huge")], ids=["recipe", "model"])
def test_unknown_preset_is_one_clear_error(call):
    with pytest.raises(ValueError, match="choose one of"):
        call()


def test_cli_train_refuses_unknown_preset_and_tiny_budget(tmp_path, capsys):
    base = ["train", "--data", "synthetic:items=40,users=30", "--ids", str(tmp_path / "none.parquet"),
            "--out", str(tmp_path / "r")]
    assert main(base + ["--preset", "fastest"]) == 2
    assert "--preset: unknown preset 'fastest'" in capsys.readouterr().err
    assert main(base + ["--time-budget", "5"]) == 2
    assert "too short to train and run one validation" in capsys.readouterr().err
    assert main(base + ["--time-budget", "-1"]) == 2
    assert "--time-budget must be > 0" in capsys.readouterr().err


def _history(recall, ndcg, coverage):
    return {"evals": [{"step": 10, "recall@10": recall, "ndcg@10": ndcg, "coverage@10": coverage}], "best_step": 10}


def test_sanity_warnings_popularity_and_collapse():
    ds = synthetic_dataset(num_items=97, num_users=131, seed=3)
    cfg = PipelineConfig(eval_users=131)
    pop = evaluate_popularity(ds, split="valid", max_users=131, seed=0)
    bad = sanity_warnings(_history(pop["recall@10"], pop["ndcg@10"] * 0.5, 0.005), ds, cfg)
    assert len(bad) == 2 and "does not beat popularity" in bad[0] and "collapsed" in bad[1]
    good = sanity_warnings(_history(pop["recall@10"] + 0.1, pop["ndcg@10"] + 0.1, 0.5), ds, cfg)
    assert good == []
    assert "no validation ran" in sanity_warnings({"evals": [], "best_step": None}, ds, cfg)[0]
    assert "eval_users = 0" in sanity_warnings({}, ds, PipelineConfig(eval_users=0))[0]


def test_empty_split_is_one_clear_error():
    ds = synthetic_dataset(num_items=31, num_users=17, seed=0)
    ds.sequences = [s[:0] for s in ds.sequences]  # nobody has a history
    with pytest.raises(ValueError):
        evaluate_popularity(ds, split="test")


@pytest.mark.parametrize("args,msg", [(["--budget-min", "1"], "too short"),
                                      (["--preset", "fastest"], "unknown preset")], ids=["budget", "preset"])
def test_quality_script_bad_input(tmp_path, args, msg):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--data",
                        "synthetic:items=40,users=30", "--json", str(tmp_path / "q.json"), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "q.json")
