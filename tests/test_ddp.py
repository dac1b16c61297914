"""Retriever and RQ-VAE training with torch.distributed (DDP, gloo, 2 processes) == the
single-process runs (train_retriever / train_rqvae).

Tolerances: DDP averages the ranks' gradients with an all-reduce whose summation order differs
from the single process's (one batched GEMM / one reduction over the whole batch), and each rank
pads its shard to its own longest row, so the float32 results agree only up to rounding:
gradients within rtol 1e-4 / atol 1e-6 of the largest gradient entry (measured: ~1e-7 relative),
the logged losses within 1e-5 relative (measured ~1e-7), weights after 5 AdamW steps within
1e-4 (measured 1.2e-7); RQ-VAE: epoch losses within 1e-5 relative (measured 8e-8), weights
within 1e-4 (measured 6e-8), code usage / dead-code resets / final stats exactly equal.
Replicas on the two ranks stay bit-identical (same all-reduced gradients, same optimizer),
which is checked exactly.
CI cost: ~10 s (two spawned processes import torch once).
"""
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tiger_fast.ids import IdTable
from tiger_fast.layout import TokenLayout
from tiger_fast.sequences import Examples, leave_one_out, tokenize_split
from tiger_fast.t5 import T5, T5Config
from tiger_fast.rqvae import RQVAEConfig, RQVAETrainConfig, train_rqvae
from tiger_fast.train import TrainConfig, _ddp_backward, _ShardLoss, init_distributed, train_retriever
from tiger_fast.world import current_world

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

LAYOUT = TokenLayout(codebook_sizes=(4, 4, 4), collision_size=2, num_user_tokens=3)
WS = 2
BATCH = 13  # odd: shards of 7 and 6 rows


def _examples():
    """Next-item task over 12 items (as in test_train); a few targets partly ignored (-100) so the
    two shards hold different numbers of target tokens (the loss weighting is exercised)."""
    n = 12
    rng = np.random.default_rng(0)
    codes = np.stack([np.arange(n) % 4, (np.arange(n) // 4) % 4, (np.arange(n) * 3) % 4, np.zeros(n, int)], 1)
    item_ids = np.arange(100, 100 + n)
    table = IdTable(LAYOUT, item_ids, codes)
    seqs = [((rng.integers(0, n) + np.arange(rng.integers(2, 9))) % n).astype(np.int64) for _ in range(40)]
    ds = SimpleNamespace(item_ids=item_ids, user_ids=np.arange(40), sequences=seqs)
    ex = tokenize_split(leave_one_out(ds).train, ds, LAYOUT, table, max_items=3)
    labels = ex.labels.clone()
    labels[::3, -2:] = -100
    return Examples(ex.input_ids, ex.attention_mask, labels, ex.target_item_ids)


def _model():
    return T5(T5Config(vocab_size=LAYOUT.vocab_size, d_model=32, num_heads=2, d_kv=16, d_ff=64,
                       num_encoder_layers=1, num_decoder_layers=1, dropout=0.0), seed=0)


def _cfg(ckpt=None):
    return TrainConfig(batch_size=BATCH, lr=3e-3, warmup_steps=2, max_steps=5, log_every=1, eval_every=2,
                       checkpoint_dir=ckpt, checkpoint_every=2, seed=0)


def _eval(model):
    return {"ndcg@10": float(model.shared.weight.float().abs().mean())}


RQ_CFG = RQVAEConfig(input_dim=12, hidden_dims=(16,), latent_dim=4, codebook_sizes=(64, 8))  # dead codes occur
# 257 items, batch 64: four full batches and a last one of ONE row (rank 1's shard is empty)
RQ_TRAIN = RQVAETrainConfig(epochs=4, batch_size=64, lr=2e-3, kmeans_sample=128, kmeans_iters=3,
                            reset_until=1.0, seed=3)


def _rq_data():
    g = np.random.default_rng(7)
    return (g.normal(size=(257, 12)) * np.r_[np.ones(6), 0.1 * np.ones(6)]).astype(np.float32)


def _worker(rank, port, out):
    # the environment torchrun sets; init_distributed reads it (gloo: no GPU here)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WS))
    torch.set_num_threads(1)
    assert init_distributed(backend="gloo") == (rank, WS, "cpu")
    try:
        ex = _examples()
        # 1) gradients of one global batch: DDP shards vs the full batch on one process
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(_ShardLoss(model))
        idx = torch.arange(5, 5 + BATCH)
        share = _ddp_backward(ddp, ex, idx, WS, rank, torch.device("cpu"), 0)
        tot = share.clone()
        dist.all_reduce(tot)
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        torch.save({"loss": float(tot), "grads": grads}, os.path.join(out, f"grads{rank}.pt"))
        # 2) train_retriever end to end (eval on rank 0 + broadcast, checkpoints by rank 0)
        model = _model()
        hist = train_retriever(model, ex, config=_cfg(os.path.join(out, "ckpt")), eval_fn=_eval, progress=False)
        torch.save({"history": hist, "state": model.state_dict()}, os.path.join(out, f"train{rank}.pt"))
        # 3) RQ-VAE training with DDP
        rq, rq_hist = train_rqvae(_rq_data(), RQ_CFG, RQ_TRAIN, progress=False, world=current_world())
        torch.save({"history": rq_hist, "state": rq.state_dict()}, os.path.join(out, f"rqvae{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WS, join=True)
    return out


def test_ddp_gradients_equal_single_process(ddp_run):
    torch.set_num_threads(1)
    ex = _examples()
    model = _model()
    ids, mask, labels = ex.batch(torch.arange(5, 5 + BATCH))
    loss = model.loss(ids, mask, labels, 0)
    loss.backward()
    r = [torch.load(os.path.join(ddp_run, f"grads{k}.pt")) for k in range(WS)]
    assert r[0]["loss"] == r[1]["loss"]
    loss = float(loss.detach())
    assert abs(r[0]["loss"] - loss) <= 1e-5 * abs(loss)
    gmax = max(float(p.grad.abs().max()) for p in model.parameters())
    for k, p in model.named_parameters():
        assert torch.equal(r[0]["grads"][k], r[1]["grads"][k]), k  # all-reduced: identical on every rank
        torch.testing.assert_close(r[0]["grads"][k], p.grad, rtol=1e-4, atol=1e-6 * gmax, msg=k)


def test_ddp_training_matches_single_process(ddp_run, tmp_path):
    torch.set_num_threads(1)
    ex = _examples()
    model = _model()
    hist = train_retriever(model, ex, config=_cfg(str(tmp_path / "ckpt")), eval_fn=_eval, progress=False)
    r = [torch.load(os.path.join(ddp_run, f"train{k}.pt"), weights_only=False) for k in range(WS)]
    for k in r[0]["state"]:
        assert torch.equal(r[0]["state"][k], r[1]["state"][k]), k  # replicas never drift apart
    no_clock = lambda evals: [{k: v for k, v in e.items() if k != "wall_s"} for e in evals]  # wall time differs
    assert [e[:2] for e in r[0]["history"]["loss"]] == [e[:2] for e in r[1]["history"]["loss"]]  # [:2]: not the clock
    assert no_clock(r[0]["history"]["evals"]) == no_clock(r[1]["history"]["evals"])
    got, want = np.array(r[0]["history"]["loss"]), np.array(hist["loss"])
    assert got.shape == want.shape == (5, 3) and np.array_equal(got[:, 0], want[:, 0])  # [step, loss, wall_s]
    np.testing.assert_allclose(got[:, 1], want[:, 1], rtol=1e-5)
    assert r[0]["history"]["best_step"] == hist["best_step"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(r[0]["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # rank 0 wrote the checkpoint + best model; a resume from it is a no-op at max_steps
    assert os.path.isdir(os.path.join(ddp_run, "ckpt", "best"))


def test_ddp_config_errors():
    # no process group: the single-process path; init_distributed without torchrun env is a no-op
    assert init_distributed(backend="gloo") == (0, 1, "cpu")
    with pytest.raises(ValueError, match="backend"):
        init_distributed(backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            init_distributed(backend="nccl")


def test_ddp_rqvae_matches_train_rqvae(ddp_run):
    torch.set_num_threads(1)
    model, hist = train_rqvae(_rq_data(), RQ_CFG, RQ_TRAIN, progress=False)
    r = [torch.load(os.path.join(ddp_run, f"rqvae{k}.pt"), weights_only=False) for k in range(WS)]
    for k in r[0]["state"]:
        assert torch.equal(r[0]["state"][k], r[1]["state"][k]), k
    got = r[0]["history"]
    assert len(got) == len(hist) == RQ_TRAIN.epochs
    assert sum(sum(h["dead_reset"]) for h in hist) > 0  # the reset path is exercised
    for a, b in zip(got, hist):
        assert a["usage"] == b["usage"] and a["dead_reset"] == b["dead_reset"], (a, b)
        for k in ("loss", "recon_loss", "rq_loss"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(b[k]), (k, a[k], b[k])
    for k in ("final_usage", "final_unique_prefixes", "final_max_group"):
        assert got[-1][k] == hist[-1][k], k
    for k, v in model.state_dict().items():
        torch.testing.assert_close(r[0]["state"][k], v, rtol=1e-4, atol=1e-4, msg=k)
