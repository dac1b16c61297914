"""tiger_fast.train: learning, schedule, exact resume, best checkpoint, budgets, bad config."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiger_fast.ids import IdTable
from tiger_fast.layout import TokenLayout
from tiger_fast.sequences import leave_one_out, tokenize_split
from tiger_fast.t5 import T5, T5Config, load_t5
from tiger_fast.train import TrainConfig, latest_checkpoint, lr_at, train_retriever

LAYOUT = TokenLayout(codebook_sizes=(4, 4, 4), collision_size=2, num_user_tokens=3)


def _task(num_users=40, seed=0):
    """Synthetic catalogue of 12 items; each user walks the catalogue in order (next = item + 1
    mod 12) from a random start, so the next item is a function of the last one."""
    n = 12
    rng = np.random.default_rng(seed)
    codes = np.stack([np.arange(n) % 4, (np.arange(n) // 4) % 4, (np.arange(n) * 3) % 4, np.zeros(n, int)], 1)
    item_ids = np.arange(100, 100 + n)
    table = IdTable(LAYOUT, item_ids, codes)
    seqs = [((rng.integers(0, n) + np.arange(rng.integers(4, 9))) % n).astype(np.int64) for _ in range(num_users)]
    ds = SimpleNamespace(item_ids=item_ids, user_ids=np.arange(num_users), sequences=seqs)
    split = leave_one_out(ds)
    return tokenize_split(split.train, ds, LAYOUT, table, max_items=3)


def _model(seed=0, dropout=0.1):
    return T5(T5Config(vocab_size=LAYOUT.vocab_size, d_model=32, num_heads=2, d_kv=16, d_ff=64,
                       num_encoder_layers=1, num_decoder_layers=1, dropout=dropout), seed=seed)


def _cfg(**kw):
    base = dict(batch_size=16, lr=0.01, warmup_steps=10, max_steps=60, log_every=10, eval_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_learns_tiny_task():
    ex = _task()
    m = _model(dropout=0.0)
    h = train_retriever(m, ex, config=_cfg(max_steps=60), progress=False)
    first, last = h["loss"][0][1], h["loss"][-1][1]
    # chance level is log(vocab) ~ 2.9 nats per token; the task is deterministic given the input
    assert first > 1.0 and last < 0.25 * first, h["loss"]
    assert h["stopped"] == "max_steps" and h["final_step"] == 60
    assert not m.training  # returned in eval mode


def test_deterministic_and_seeded():
    ex = _task()
    runs = []
    state = torch.get_rng_state()
    for seed in (0, 0, 1):
        m = _model()
        train_retriever(m, ex, config=_cfg(max_steps=8, seed=seed), progress=False)
        runs.append(m)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched
    assert _same_weights(runs[0], runs[1])
    assert not _same_weights(runs[0], runs[2])


def test_resume_after_interruption_is_exact(tmp_path):
    ex = _task()
    metric = lambda m: {"ndcg@10": float(m.shared.weight[5, 0])}  # any deterministic function of the model
    cfg_a = _cfg(max_steps=25, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=10, eval_every=7)
    a = _model()
    ha = train_retriever(a, ex, config=cfg_a, eval_fn=metric, progress=False)

    calls = {"n": 0}

    def crashing(m):
        calls["n"] += 1
        if calls["n"] == 2:  # step 14: after the step-10 checkpoint, before the step-20 one
            raise KeyboardInterrupt("injected")
        return metric(m)

    cfg_b = _cfg(max_steps=25, checkpoint_dir=str(tmp_path / "b"), checkpoint_every=10, eval_every=7)
    b = _model()
    with pytest.raises(KeyboardInterrupt):
        train_retriever(b, ex, config=cfg_b, eval_fn=crashing, progress=False)
    assert os.path.basename(latest_checkpoint(cfg_b.checkpoint_dir)) == "ckpt-000000010"
    b2 = _model(seed=123)  # a fresh process would build the model from scratch
    hb = train_retriever(b2, ex, config=cfg_b, eval_fn=metric, progress=False)
    assert hb["resumed_from"] == 10
    assert _same_weights(a, b2)
    no_clock = lambda evals: [{k: v for k, v in e.items() if k != "wall_s"} for e in evals]  # wall time differs
    no_wall = lambda loss: [e[:2] for e in loss]  # [step, loss, wall_s]: the wall time differs
    assert no_wall(ha["loss"]) == no_wall(hb["loss"]) and no_clock(ha["evals"]) == no_clock(hb["evals"])
    assert all(len(e) == 3 and e[2] > 0 for e in hb["loss"])
    assert ha["best_step"] == hb["best_step"]
    # a finished run resumes to a no-op and can be extended
    hc = train_retriever(b2, ex, config=_cfg(max_steps=30, checkpoint_dir=str(tmp_path / "b"),
                                             checkpoint_every=10, eval_every=7), eval_fn=metric, progress=False)
    assert hc["resumed_from"] == 25 and hc["final_step"] == 30


@pytest.mark.parametrize("n,bs,window", [(1, 1, 1), (97, 8, 3), (256, 16, 4), (50, 7, 100)])
def test_length_bucketed_order_is_a_permutation_with_homogeneous_batches(n, bs, window):
    from tiger_fast.train import ExampleOrder

    g = torch.Generator().manual_seed(n)
    lengths = torch.randint(1, 82, (n,), generator=g)
    lengths[: n // 3] = 5  # many ties
    plain, bucketed = ExampleOrder(n, 3), ExampleOrder(n, 3, lengths=lengths, window=window, batch_size=bs)
    spread = {"plain": [], "bucketed": []}
    for epoch in range(2):
        p = bucketed.perm(epoch)
        assert torch.equal(torch.sort(p).values, torch.arange(n))  # every example once per epoch
        assert torch.equal(p, ExampleOrder(n, 3, lengths=lengths, window=window, batch_size=bs).perm(epoch))  # seeded
        for name, q in (("plain", plain.perm(epoch)), ("bucketed", p)):
            for blk in torch.split(q, bs):
                spread[name].append(int(lengths[blk].max() - lengths[blk].min()))
    assert torch.equal(ExampleOrder(n, 3, lengths=lengths, window=0, batch_size=bs).perm(0), plain.perm(0))  # 0 = off
    if n > bs:
        assert sum(spread["bucketed"]) < sum(spread["plain"])


def test_length_buckets_train_and_resume(tmp_path):
    ex = _task(num_users=60)
    a = _model()
    ha = train_retriever(a, ex, config=_cfg(max_steps=20, length_buckets=2), progress=False)
    assert ha["final_step"] == 20 and math.isfinite(ha["loss"][-1][1])
    b = _model()
    cfg = _cfg(max_steps=20, length_buckets=2, checkpoint_dir=str(tmp_path), checkpoint_every=10)
    train_retriever(b, ex, config=_cfg(max_steps=10, length_buckets=2, checkpoint_dir=str(tmp_path),
                                       checkpoint_every=10), progress=False)
    b2 = _model(seed=9)
    train_retriever(b2, ex, config=cfg, progress=False)
    assert _same_weights(a, b2)
    with pytest.raises(ValueError, match="length_buckets"):
        train_retriever(_model(), ex, config=_cfg(max_steps=30, checkpoint_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="length_buckets"):
        TrainConfig(length_buckets=-1)


def test_best_checkpoint_is_kept_and_restored(tmp_path):
    ex = _task()
    values = iter([0.1, 0.5, 0.3, 0.2])
    snapshots = {}

    def eval_fn(m):
        v = next(values)
        snapshots[v] = {k: t.clone() for k, t in m.state_dict().items()}
        return {"recall@10": v, "ndcg@10": -v}

    cfg = _cfg(max_steps=20, eval_every=5, checkpoint_dir=str(tmp_path), best_metric="recall@10")
    m = _model()
    h = train_retriever(m, ex, config=cfg, eval_fn=eval_fn, progress=False, layout=LAYOUT)
    assert [e["step"] for e in h["evals"]] == [5, 10, 15, 20]
    assert h["best_step"] == 10 and h["best_value"] == 0.5
    best, layout = load_t5(str(tmp_path / "best"))
    assert layout == LAYOUT
    for k, v in best.state_dict().items():
        assert torch.equal(v, snapshots[0.5][k])
        assert torch.equal(m.state_dict()[k], snapshots[0.5][k])  # model ends with the best weights


def test_time_budget_stops_and_checkpoints(tmp_path):
    ex = _task()
    cfg = _cfg(max_steps=10_000, time_budget_s=0.5, checkpoint_dir=str(tmp_path))
    h = train_retriever(_model(), ex, config=cfg, progress=False)
    assert h["stopped"] == "time_budget" and 0 < h["final_step"] < 10_000
    assert latest_checkpoint(str(tmp_path)).endswith(f"ckpt-{h['final_step']:09d}")


def test_schedule_values():
    cfg = TrainConfig()
    assert cfg.batch_size == 256 and cfg.max_steps == 200_000 and cfg.warmup_steps == 10_000
    for step, want in [(0, 0.01), (1, 0.01), (9_999, 0.01), (10_000, 0.01), (40_000, 0.005),
                       (160_000, 0.0025), (199_999, 0.01 * math.sqrt(10_000 / 199_999))]:
        assert lr_at(step, cfg) == pytest.approx(want, rel=1e-12)
    # identical to T5's rsqrt schedule 1/sqrt(max(step, 10k)) for lr 0.01
    for step in (0, 5_000, 12_345, 99_999):
        assert lr_at(step, cfg) == pytest.approx(1 / math.sqrt(max(step, 10_000)), rel=1e-12)
    c0 = TrainConfig(warmup_steps=0, lr=1.0)
    assert lr_at(0, c0) == 1.0 and lr_at(4, c0) == 0.5
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, cfg)


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=0), "batch_size"), (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(max_steps=1.5), "max_steps"), (dict(optimizer="sgd"), "optimizer"), (dict(precision="fp8"), "precision"),
    (dict(best_mode="up"), "best_mode"), (dict(betas=(0.9,)), "betas"), (dict(grad_clip=0), "grad_clip"),
    (dict(time_budget_s=-1), "time_budget_s"), (dict(device="gpu0"), "device"), (dict(seed=-1), "seed"),
    (dict(warmup_steps=-5), "warmup_steps"), (dict(weight_decay=2.0), "weight_decay"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_bad_calls(tmp_path):
    ex = _task()
    m = _model()
    with pytest.raises(TypeError, match="TrainConfig"):
        train_retriever(m, ex, config={"lr": 0.1})
    with pytest.raises(TypeError, match="Examples"):
        train_retriever(m, (ex.input_ids, ex.labels), config=_cfg())
    with pytest.raises(ValueError, match="best_metric"):
        train_retriever(m, ex, config=_cfg(max_steps=2, eval_every=1), eval_fn=lambda m: {"recall@5": 0.0},
                        progress=False)
    from tiger_fast.sequences import Examples
    left = Examples(ex.input_ids.flip(1), ex.attention_mask.flip(1), ex.labels, ex.target_item_ids)
    with pytest.raises(ValueError, match="right-padded"):
        train_retriever(m, left, config=_cfg(), progress=False)
    small = T5(T5Config(vocab_size=8, d_model=8, num_heads=1, d_kv=8, d_ff=8, num_encoder_layers=1,
                        num_decoder_layers=1))
    with pytest.raises(ValueError, match="vocabulary"):
        train_retriever(small, ex, config=_cfg(), progress=False)
    # resuming with a different config is refused
    train_retriever(_model(), ex, config=_cfg(max_steps=3, checkpoint_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="different TrainConfig"):
        train_retriever(_model(), ex, config=_cfg(max_steps=6, lr=0.02, checkpoint_dir=str(tmp_path)),
                        progress=False)
    with pytest.raises(ValueError, match="holds a model"):
        train_retriever(T5(T5Config(vocab_size=LAYOUT.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=8,
                                    num_encoder_layers=1, num_decoder_layers=1)),
                        ex, config=_cfg(max_steps=6, checkpoint_dir=str(tmp_path)), progress=False)




# ---- schedules sized to a budget, validation, early stopping, precision ---------------------------
def test_cosine_schedule_shape():
    cfg = _cfg(schedule="cosine", lr=0.01, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)  # linear warm-up from lr / warmup
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # strictly decreasing after the warm-up
    assert lrs[-1] == pytest.approx(0.001, rel=0.01)  # ends at min_lr_ratio * lr
    assert lr_at(60, cfg) == pytest.approx(0.001 + 0.009 * 0.5)  # half-way: the cosine's midpoint
    assert lr_at(60, cfg, total_steps=210) > lr_at(60, cfg)  # a longer plan decays more slowly


@pytest.mark.parametrize("bad", [dict(schedule="linear"), dict(total_steps=0), dict(patience=0),
                                 dict(label_smoothing=1.0), dict(min_lr_ratio=-0.1), dict(eval_every_s=0),
                                 dict(eval_every_s=True), dict(precision="fp16")],
                         ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_bad_schedule_config(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _cfg(**bad)


def test_time_budget_plans_cosine_and_validates_at_the_end():
    """Under a time budget the cosine decay is planned from the measured rate, the run stops within
    the budget, and the last steps are validated (never silently thrown away)."""
    ex = _task()
    m = _model()
    metric = lambda mm: {"ndcg@10": float(mm.shared.weight[5, 0])}
    cfg = _cfg(schedule="cosine", max_steps=10 ** 6, warmup_steps=5, time_budget_s=3.0, eval_every=10 ** 6,
               eval_every_s=1.0)
    h = train_retriever(m, ex, config=cfg, eval_fn=metric, progress=False)
    assert h["stopped"] in ("time_budget", "schedule_end")
    assert h["planned_steps"] is not None and h["planned_steps"] > cfg.warmup_steps
    assert h["evals"][-1]["step"] == h["final_step"]  # the final state was validated
    assert all(e["wall_s"] <= h["wall_s"] + 1e-6 for e in h["evals"])
    assert [e["wall_s"] for e in h["evals"]] == sorted(e["wall_s"] for e in h["evals"])
    assert h["wall_s"] < 3.0 + 2.0  # stops at the budget (plus the final validation)


def test_early_stopping_on_plateau_keeps_the_best():
    ex = _task()
    m = _model()
    vals = iter([0.1, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05] + [0.0] * 100)
    cfg = _cfg(max_steps=1000, eval_every=5, patience=3)
    h = train_retriever(m, ex, config=cfg, eval_fn=lambda mm: {"ndcg@10": next(vals)}, progress=False)
    assert h["stopped"] == "early_stopping"
    assert h["best_step"] == 10 and h["best_value"] == 0.5
    assert h["final_step"] == 25  # three validations (15, 20, 25) without a new best


def test_bf16_resume_is_exact_and_close_to_fp32(tmp_path):
    """bf16 autocast trains the same objective: resume reproduces the bf16 run bit for bit, and
    after the same steps on the same batches its loss is close to fp32's (bf16 products round
    to 8 mantissa bits, so the trajectories differ by a little, not bit for bit)."""
    ex = _task()
    fp = train_retriever(_model(), ex, config=_cfg(max_steps=40), progress=False)
    full = _model()
    hb = train_retriever(full, ex, config=_cfg(max_steps=40, precision="bf16"), progress=False)
    assert abs(hb["loss"][-1][1] - fp["loss"][-1][1]) < 0.1 * fp["loss"][-1][1]
    part_cfg = _cfg(max_steps=20, precision="bf16", checkpoint_dir=str(tmp_path), checkpoint_every=10)
    train_retriever(_model(), ex, config=part_cfg, progress=False)
    resumed = _model(seed=7)
    train_retriever(resumed, ex, config=_cfg(max_steps=40, precision="bf16", checkpoint_dir=str(tmp_path),
                                            checkpoint_every=10), progress=False)
    assert _same_weights(full, resumed)
    with pytest.raises(ValueError, match="precision"):  # a bf16 checkpoint is not continued in fp32
        train_retriever(_model(), ex, config=_cfg(max_steps=60, checkpoint_dir=str(tmp_path)), progress=False)


def test_label_smoothing_changes_the_loss_not_the_data():
    ex = _task()
    a = train_retriever(_model(), ex, config=_cfg(max_steps=10), progress=False)
    b = train_retriever(_model(), ex, config=_cfg(max_steps=10, label_smoothing=0.2), progress=False)
    assert b["loss"][-1][1] > a["loss"][-1][1]  # smoothed targets: higher cross-entropy on the same batches


def test_progress_bar_counts_the_budget_not_the_step_cap(capsys):
    """Under a time budget the bar shows seconds of the budget (a 200k-step cap would promise an
    ETA of hours for a run that stops in seconds)."""
    ex = _task()
    train_retriever(_model(), ex, config=_cfg(max_steps=200_000, time_budget_s=1.0, log_every=5), progress=True)
    err = capsys.readouterr().err
    assert "s of budget" in err and "/200000" not in err
    assert "s of budget, step " in err and "[," not in err  # "…/1 s of budget, step 37/120"
