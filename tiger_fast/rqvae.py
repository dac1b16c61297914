"""RQ-VAE: item content embeddings -> semantic codes (TIGER §3.1).

Model.  A DNN encoder (``input_dim -> 512 -> 256 -> 128 -> 32``, ReLU between layers) maps an
item embedding to a latent ``z``; a residual quantizer with ``L`` codebooks (default 3 x 256 x 32)
encodes ``z`` level by level (``r_0 = z``, ``c_l = argmin_k ||r_l - C_l[k]||^2``,
``r_{l+1} = r_l - C_l[c_l]``); a DNN decoder (the mirror of the encoder) reconstructs the input
from the summed codewords ``z_hat = sum_l C_l[c_l]``.  Gradients reach the encoder through the
straight-through estimator ``z + sg[z_hat - z]``.

Loss (per item, averaged over the batch)::

    ||x - decoder(z_hat)||^2 + sum_l ( ||sg[r_l] - e_l||^2 + beta * ||r_l - sg[e_l]||^2 ),  e_l = C_l[c_l]

Squared norms are summed over the feature dimension (the paper's notation), not averaged.

Training (``train_rqvae``): batch 1024; Adam lr 1e-3 by default (the paper's Adagrad lr 0.4 is
``RQVAETrainConfig.paper()``; see that class for why it is not the default).  Codebooks are
initialised by k-means (``kmeans``: deterministic, k-means++ seeding from a seeded generator) on the
latents / residuals of a sample of items at the start.  Collapse guard: a code that no item of an
epoch was assigned to is re-seeded from a random current residual at its level (dead-code reset),
and the per-level usage is reported every epoch.

Semantic codes of a trained model come from ``tiger_fast.quantize.quantize`` (the exact,
backend-independent residual quantizer), not from the training-time torch argmin.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .atomic import write_atomic, write_text
from .checks import check_int
from .world import World, gather_rows, rank_device

__all__ = ["RQVAEConfig", "RQVAETrainConfig", "RQVAE", "kmeans", "train_rqvae", "save_rqvae",
           "load_rqvae"]

_FORMAT = "tiger_fast.rqvae/1"
ENCODE_BLOCK = 4096  # rows per encoder call in encode() / semantic_codes() / tiger_fast.assign


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RQVAEConfig:
    """Architecture.  input_dim: embedding size (384 for MiniLM, 768 for Sentence-T5)."""
    input_dim: int
    hidden_dims: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    codebook_sizes: tuple[int, ...] = (256, 256, 256)
    beta: float = 0.25

    def __post_init__(self):
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        object.__setattr__(self, "codebook_sizes", tuple(int(k) for k in self.codebook_sizes))
        check_int(self.input_dim, "input_dim")
        check_int(self.latent_dim, "latent_dim")
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be positive, got {self.hidden_dims}")
        if not self.codebook_sizes or any(k < 1 for k in self.codebook_sizes):
            raise ValueError(f"codebook_sizes must be a non-empty tuple of positive ints, got {self.codebook_sizes}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RQVAEConfig":
        known = {"input_dim", "hidden_dims", "latent_dim", "codebook_sizes", "beta"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RQVAEConfig fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)


@dataclass
class RQVAETrainConfig:
    """Training schedule.

    Defaults are Adam, lr 1e-3, batch 1024, 50 epochs.  The paper's optimiser (Adagrad, lr 0.4,
    ~20k epochs; ``RQVAETrainConfig.paper()``) is available, but Adagrad's first steps move every
    weight by ~lr, which blows this MLP up: measured on Beauty / MiniLM (12,101 items, ||x|| = 1)
    after 20 epochs, recon loss 226 and 2,909 items on one (c0, c1, c2); it would need many of its
    20k epochs to recover.  The default (Adam 1e-3, 50 epochs, seed 0) on the same data: recon
    0.37, 100 % usage at every level, 11,861 distinct (c0, c1, c2), at most 8 items on one,
    in 41 s of CPU time (one thread).
    kmeans_sample: how many items' latents initialise the codebooks (k-means, ``kmeans_iters``
    Lloyd iterations); default = one batch, as in the paper ("the first batch").
    dead_code_reset: re-seed codes unused during an epoch from random residuals of the epoch's
    last batch (the collapse guard); ``reset_until`` stops resets for the last epochs (fraction
    of epochs) so the final codebooks settle.
    device: "cpu", "cuda", "cuda:1", ... or "auto" (cuda when available).
    precision: "fp32" or "bf16" (autocast around the encoder/decoder MLPs; the nearest-codeword
    search, residuals and losses stay fp32; the final codes always come from the exact quantizer).
    """
    epochs: int = 50
    batch_size: int = 1024
    lr: float = 1e-3
    optimizer: str = "adam"  # or "adagrad" (the paper's)
    weight_decay: float = 0.0
    seed: int = 0
    kmeans_sample: int = 1024
    kmeans_iters: int = 25
    dead_code_reset: bool = True
    reset_until: float = 0.9
    device: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self):
        check_int(self.epochs, "epochs", 0)
        check_int(self.batch_size, "batch_size")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.optimizer not in ("adagrad", "adam"):
            raise ValueError(f"optimizer must be 'adagrad' or 'adam', got {self.optimizer!r}")
        check_int(self.kmeans_sample, "kmeans_sample")
        check_int(self.kmeans_iters, "kmeans_iters", 0)
        if not 0.0 <= self.reset_until <= 1.0:
            raise ValueError(f"reset_until must be in [0, 1], got {self.reset_until}")
        if self.optimizer == "adam" and self.lr >= 0.05:
            # the paper's 0.4 is an Adagrad rate; with Adam it destroys the model in a few steps
            warnings.warn(f"RQVAETrainConfig: lr={self.lr} is very high for Adam (use ~1e-3); the paper's "
                          "lr 0.4 is for Adagrad: RQVAETrainConfig.paper() or optimizer='adagrad'",
                          stacklevel=3)

    @classmethod
    def paper(cls, **overrides) -> "RQVAETrainConfig":
        """The paper's schedule: Adagrad, lr 0.4, batch 1024, 20k epochs (see the class note)."""
        return cls(**{"optimizer": "adagrad", "lr": 0.4, "batch_size": 1024, "epochs": 20000, **overrides})


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------
def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x (N, D), c (K, D) -> (N, K) squared distances (expanded form; clamped at 0)."""
    return (x.pow(2).sum(1, keepdim=True) - 2.0 * x @ c.T + c.pow(2).sum(1)).clamp_min_(0.0)


def kmeans(x: torch.Tensor, k: int, *, iters: int = 25, generator: torch.Generator | None = None,
           seed: int | None = None) -> torch.Tensor:
    """Deterministic k-means (k-means++ seeding + Lloyd iterations).

    x: float (N, D); k >= 1; generator (or seed) drives the seeding.  Returns float32 (k, D) centres.
    When N < k (or x has fewer than k distinct points) the missing centres are copies of data
    points plus tiny seeded noise, so every centre is distinct and near the data.
    Empty clusters are re-seeded with the point farthest from its centre (deterministic).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be a non-empty 2-D tensor (N, D), got {getattr(x, 'shape', type(x))}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf")
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    x = x.detach().float()
    dev = x.device
    xc = x.cpu()
    n = xc.shape[0]
    # k-means++ seeding on the CPU with the CPU generator, so the result is device-independent
    centres = torch.empty(k, xc.shape[1])
    first = int(torch.randint(n, (1,), generator=generator))
    centres[0] = xc[first]
    d2 = _sq_dists(xc, centres[:1]).squeeze(1)
    for j in range(1, k):
        total = float(d2.sum())
        if total > 0:
            idx = int(torch.multinomial(d2 / total, 1, generator=generator))
            centres[j] = xc[idx]
        else:  # fewer distinct points than k: copy a point and jitter it slightly
            idx = int(torch.randint(n, (1,), generator=generator))
            scale = xc.abs().max().clamp_min(1e-6) * 1e-3
            centres[j] = xc[idx] + scale * torch.randn(xc.shape[1], generator=generator)
        d2 = torch.minimum(d2, _sq_dists(xc, centres[j: j + 1]).squeeze(1))
    c = centres.to(dev)
    for _ in range(iters):
        d = _sq_dists(x, c)
        a = d.argmin(1)
        counts = torch.bincount(a, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].float(), c)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            own = d.gather(1, a[:, None]).squeeze(1)
            far = own.argsort(descending=True, stable=True)[: empty.numel()]
            far = far[own[far] > 0]  # only points not already sitting on a centre
            new[empty[: far.numel()]] = x[far]
        if torch.equal(new, c):
            break
        c = new
    return c.float()


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _check_embeddings(x, input_dim: int, name: str = "x") -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a float tensor or numpy array (N, {input_dim}), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != input_dim:
        raise ValueError(f"{name} must have shape (N, {input_dim}) (the model's input_dim), got {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; clean the embeddings first")
    return x.float()


class RQVAE(nn.Module):
    """Residual-quantised VAE (see the module docstring).  ``cfg``: RQVAEConfig.

    ``provenance``: dict of what it was trained on (``{"catalogue": ...}``, tiger_fast.provenance;
    empty when unknown), saved with the checkpoint."""

    def __init__(self, cfg: RQVAEConfig):
        super().__init__()
        if not isinstance(cfg, RQVAEConfig):
            raise TypeError(f"cfg must be an RQVAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.provenance: dict = {}
        self.encoder = _mlp([cfg.input_dim, *cfg.hidden_dims, cfg.latent_dim])
        self.decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden_dims), cfg.input_dim])
        self.codebook = nn.ParameterList(
            [nn.Parameter(torch.randn(k, cfg.latent_dim) * 0.01) for k in cfg.codebook_sizes])

    @property
    def num_levels(self) -> int:
        return len(self.cfg.codebook_sizes)

    # ---- inference API ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x, batch_size: int = ENCODE_BLOCK) -> torch.Tensor:
        """x: float (N, input_dim) tensor or array -> float32 (N, latent_dim) latents (on the
        model's device), computed in blocks of ``batch_size`` rows.  A GEMM may round a row
        differently depending on the batch shape, so the default block is the same as
        ``tiger_fast.assign``'s ``encode_block``: the in-memory and the streaming paths then give
        bit-identical latents (hence identical codes) for the same row order."""
        x = _check_embeddings(x, self.cfg.input_dim)
        dev = next(self.parameters()).device
        outs = [self.encoder(x[i: i + batch_size].to(dev)) for i in range(0, x.shape[0], batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, self.cfg.latent_dim, device=dev)

    def codebooks(self):
        """float32 (L, K, latent_dim) detached codebooks; a list of L tensors (K_l, latent_dim)
        when the levels have different sizes."""
        cbs = [c.detach().float() for c in self.codebook]
        if len(set(self.cfg.codebook_sizes)) == 1:
            return torch.stack(cbs)
        return cbs

    @torch.no_grad()
    def semantic_codes(self, x, backend: str = "auto", batch_size: int = ENCODE_BLOCK) -> torch.Tensor:
        """x: float (N, input_dim) -> int64 (N, L) RQ-VAE codes, through the exact quantizer
        ``tiger_fast.quantize.quantize`` (identical codes whatever the backend)."""
        from .quantize import quantize

        z = self.encode(x, batch_size=batch_size)
        if z.device.type != "cpu" and backend in ("cpu", "reference"):
            z = z.cpu()
        cbs = self.codebooks()
        cbs = cbs.to(z.device) if isinstance(cbs, torch.Tensor) else [c.to(z.device) for c in cbs]
        return quantize(z, cbs, backend=backend).cpu()

    @torch.no_grad()
    def decode_codes(self, codes) -> torch.Tensor:
        """codes int64 (N, L) -> float32 (N, input_dim) reconstructions."""
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[1] != self.num_levels or codes.is_floating_point():
            raise ValueError(f"codes must be an integer tensor (N, {self.num_levels}), got {tuple(codes.shape)}")
        z = sum(self.codebook[l][codes[:, l].to(self.codebook[l].device)] for l in range(self.num_levels))
        return self.decoder(z)

    # ---- training forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict:
        """x float32 (B, input_dim) -> dict with loss (scalar), recon_loss, rq_loss (scalars),
        codes int64 (B, L), residuals list of L float32 (B, latent_dim) (detached r_l), x_hat.

        Training-time assignment is a plain torch argmin (fast, differentiable path); final codes
        come from ``semantic_codes`` (exact).
        """
        z = self.encoder(x).float()  # a no-op in fp32; under bf16 autocast the MLPs run in bf16
        # nearest codewords, residuals and the rq loss always in fp32 (also under autocast)
        with torch.autocast(device_type=z.device.type, enabled=False):
            r = z
            z_hat = torch.zeros_like(z)
            rq_loss = z.new_zeros(())
            codes, residuals = [], []
            for cb in self.codebook:
                with torch.no_grad():
                    c = _sq_dists(r.detach(), cb.detach()).argmin(1)
                e = cb[c]
                rq_loss = rq_loss + (r.detach() - e).pow(2).sum(1).mean() \
                    + self.cfg.beta * (r - e.detach()).pow(2).sum(1).mean()
                codes.append(c)
                residuals.append(r.detach())
                z_hat = z_hat + e.detach()
                r = r - e.detach()
            zq = z + (z_hat - z).detach()  # straight-through: forward = z_hat, gradient -> encoder
        x_hat = self.decoder(zq)
        recon = (x_hat.float() - x).pow(2).sum(1).mean()
        return {"loss": recon + rq_loss, "recon_loss": recon, "rq_loss": rq_loss,
                "codes": torch.stack(codes, 1), "residuals": residuals, "x_hat": x_hat}

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, iters: int = 25, generator: torch.Generator | None = None):
        """k-means initialisation, level by level: codebook l = k-means of the residuals r_l of
        ``x`` float32 (n, input_dim) (r_0 = encoder latents)."""
        r = self.encoder(x)
        for l, cb in enumerate(self.codebook):
            c = kmeans(r, cb.shape[0], iters=iters, generator=generator).to(cb.device)
            cb.data.copy_(c)
            r = r - c[_sq_dists(r, c).argmin(1)]


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return dev


def train_rqvae(embeddings, cfg: RQVAEConfig | None = None, train_cfg: RQVAETrainConfig | None = None,
                progress: bool = True, log: Callable[[dict], None] | None = None, *, world: World | None = None):
    """Train an RQ-VAE on item embeddings, in this process or over the ranks of a process group.

    embeddings: float (N, input_dim) numpy array or tensor (N >= 1, finite).
    cfg: RQVAEConfig (default: paper architecture with input_dim from the embeddings);
    train_cfg: RQVAETrainConfig.  progress: tqdm bar over epochs; log: called with each epoch's
    record.  Returns (model in eval mode, history: list of per-epoch dicts with keys epoch, loss,
    recon_loss, rq_loss, usage (list of L fractions of codes used during the epoch), dead_reset
    (list of L counts of re-seeded codes), seconds); the last record also has final_usage,
    final_unique_prefixes and final_max_group for all items under the final weights.
    Deterministic for a given seed on CPU.

    world: None trains in this process.  A :class:`tiger_fast.world.World` (under ``torchrun``:
    ``tiger_fast.train.init_distributed()`` then ``world=current_world()``) trains with DDP (gloo
    on CPU, NCCL on GPU; ``train_cfg.device`` "cuda" means ``cuda:LOCAL_RANK``).  Every rank passes
    the SAME ``embeddings`` (e.g. a memory-mapped .npy) and draws the same seeded permutations, so
    all ranks see the same global batches of ``batch_size`` items; rank r trains on the r-th of
    ``world.size`` contiguous slices of each batch, its mean loss weighted by
    ``size * rows_r / rows_batch`` so that DDP's gradient average is the global batch's gradient.
    The k-means init runs on every rank on the same sample (DDP then broadcasts rank 0's
    codebooks); code usage is OR-ed over ranks; the dead-code reset uses the residuals of the
    epoch's last full batch gathered from all ranks in batch order (every rank makes the same reset
    with the same generator); epoch losses are summed over ranks; only rank 0 logs and shows
    progress.  Every rank returns the same replica.  Results equal the one-process run's up to
    float32 rounding (the all-reduce sums in its own order and each rank's encoder sees a smaller
    batch; tests/test_ddp.py: losses within 1e-5 relative, weights within 1e-4); a latent within
    rounding of a tie between two codewords could take the other code, after which runs differ more.
    """
    if world is not None and not isinstance(world, World):
        raise TypeError(f"world must be None or a tiger_fast.world.World (current_world()), got {type(world).__name__}")
    x = embeddings
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if cfg is None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError("embeddings must be a 2-D float array (N, input_dim)")
        cfg = RQVAEConfig(input_dim=int(x.shape[1]))
    train_cfg = train_cfg or RQVAETrainConfig()
    x = _check_embeddings(x, cfg.input_dim, "embeddings")
    n = x.shape[0]
    if n == 0:
        raise ValueError("embeddings is empty; need at least one item to train the RQ-VAE")
    dev = _resolve_device(train_cfg.device)
    ws, rank = (1, 0) if world is None else (world.size, world.rank)
    if world is not None:
        dev = rank_device(dev, world)
    gen = torch.Generator(device="cpu").manual_seed(int(train_cfg.seed))
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(int(train_cfg.seed))  # only for nn.Linear's default init; restored below
    try:
        model = RQVAE(cfg).to(dev)
    finally:
        torch.random.set_rng_state(torch_state)
    x = x.to(dev)
    bs = min(int(train_cfg.batch_size), n)

    sample = torch.randperm(n, generator=gen)[: min(int(train_cfg.kmeans_sample), n)].to(dev)
    model.init_codebooks(x[sample], iters=int(train_cfg.kmeans_iters), generator=gen)
    step_model = model
    if world is not None:  # DDP's constructor broadcasts rank 0's parameters (codebooks included)
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    if train_cfg.optimizer == "adagrad":
        opt = torch.optim.Adagrad(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)

    history: list[dict] = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=int(train_cfg.epochs), desc="rqvae" if world is None else "rqvae (ddp)", unit="epoch")
    reset_stop = int(math.floor(train_cfg.reset_until * train_cfg.epochs))
    bf16 = train_cfg.precision == "bf16"  # autocast: fp32 master weights, codes and losses in fp32
    L = model.num_levels
    model.train()
    for epoch in range(int(train_cfg.epochs)):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(dev)
        used = [torch.zeros(k, dtype=torch.bool, device=dev) for k in cfg.codebook_sizes]
        tot = torch.zeros(3, dtype=torch.float64, device=dev)  # loss, recon_loss, rq_loss
        last, last_rows = None, 0
        for i in range(0, n, bs):
            rows = perm[i: i + bs]
            part = rows if world is None else torch.tensor_split(rows, ws)[rank]  # this rank's slice
            m = int(part.numel())
            xb = x[part] if m else x[rows[:1]]  # an empty slice: a stand-in row with weight 0
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = step_model(xb)
            loss = out["loss"]
            if world is not None:  # DDP averages over ranks -> the global batch's gradient
                loss = loss * (ws * m / rows.numel())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += torch.stack([out[k].detach().double() for k in ("loss", "recon_loss", "rq_loss")]) * (m / n)
            if m:
                for l in range(L):
                    used[l][out["codes"][:, l]] = True
            if last is None or rows.numel() >= last_rows:  # the epoch's last full batch: the reset pool
                last, last_rows = [r[:m] for r in out["residuals"]], rows.numel()
        if world is not None:
            world.dist.all_reduce(tot)
            used_t = torch.cat([u.to(torch.uint8) for u in used])
            world.dist.all_reduce(used_t, op=world.dist.ReduceOp.MAX)
            used = list(torch.split(used_t.bool(), list(cfg.codebook_sizes)))
        resets = [0] * L
        if train_cfg.dead_code_reset and epoch < reset_stop:
            pool = last if world is None else [gather_rows(world, r) for r in last]  # whole batch, in order
            resets = _reset_dead_codes(model, used, pool, gen)
        vals = [float(v) for v in tot.cpu()]
        rec = {"epoch": epoch + 1, "loss": vals[0], "recon_loss": vals[1], "rq_loss": vals[2],
               "usage": [float(u.float().mean()) for u in used], "dead_reset": resets,
               "seconds": time.perf_counter() - t0}
        if not all(math.isfinite(v) for v in vals):
            raise FloatingPointError(f"RQ-VAE training diverged at epoch {epoch + 1} (loss {vals[0]}); "
                                     "lower the learning rate")
        history.append(rec)
        if log is not None and rank == 0:
            log(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{vals[0]:.4f}", recon=f"{vals[1]:.4f}",
                            usage="/".join(f"{u:.2f}" for u in rec["usage"]))
    if bar is not None:
        bar.close()
    model.eval()
    if history:
        history[-1].update(_final_stats(model, x, bs))
    return model, history


@torch.no_grad()
def _final_stats(model: RQVAE, x: torch.Tensor, bs: int) -> dict:
    """Codes of every item under the final weights (training-time torch argmin): final_usage
    (per level, fraction of codes used), final_unique_prefixes, final_max_group (most items
    sharing one full RQ code tuple, i.e. the collision depth before collision tokens)."""
    codes = torch.cat([model(x[i: i + bs])["codes"] for i in range(0, x.shape[0], bs)]).cpu()
    _, counts = torch.unique(codes, dim=0, return_counts=True)
    return {"final_usage": [float(torch.unique(codes[:, l]).numel() / k)
                            for l, k in enumerate(model.cfg.codebook_sizes)],
            "final_unique_prefixes": int(counts.numel()), "final_max_group": int(counts.max())}


@torch.no_grad()
def _reset_dead_codes(model: RQVAE, used: list[torch.Tensor], residuals: list[torch.Tensor],
                      gen: torch.Generator) -> list[int]:
    """Re-seed codes unused during the epoch with random residuals r_l at their level (detached,
    from the epoch's last full batch), distinct rows while the batch has enough of them.
    Returns the number of codes reset per level."""
    counts = []
    for l, cb in enumerate(model.codebook):
        dead = torch.nonzero(~used[l]).flatten()
        r = residuals[l]
        if dead.numel() and r.shape[0]:
            reps = -(-dead.numel() // r.shape[0])  # more dead codes than rows: cycle through them
            pick = torch.cat([torch.randperm(r.shape[0], generator=gen) for _ in range(reps)])[: dead.numel()]
            cb.data[dead] = r[pick.to(r.device)]
        counts.append(int(dead.numel()))
    return counts


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
_WEIGHTS = "rqvae.safetensors"
_CONFIG = "rqvae_config.json"


def save_rqvae(model: RQVAE, path) -> None:
    """Write ``path/rqvae.safetensors`` (weights) and ``path/rqvae_config.json`` (architecture);
    ``path`` is a directory (created if needed).  Each file is written to a temporary name and
    renamed; the config is written last."""
    from safetensors.torch import save_file

    if not isinstance(model, RQVAE):
        raise TypeError(f"model must be an RQVAE, got {type(model).__name__}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(os.path.join(path, _WEIGHTS), lambda tmp: save_file(
        state, tmp, metadata={"format": _FORMAT, "config": json.dumps(model.cfg.to_dict())}))
    write_text(os.path.join(path, _CONFIG), json.dumps({"format": _FORMAT, "config": model.cfg.to_dict(),
                                                        "provenance": model.provenance}, indent=2))


# Upper bounds load_rqvae puts on a checkpoint's config before anything is built.
CHECKPOINT_LIMITS = {"input_dim": 1 << 17, "hidden_dim": 1 << 17, "hidden_layers": 64, "latent_dim": 1 << 15,
                     "levels": 16, "codebook_size": 1 << 20}


def _check_limits(cfg: RQVAEConfig, where: str) -> None:
    for name, v in (("input_dim", cfg.input_dim), ("latent_dim", cfg.latent_dim),
                    ("hidden_layers", len(cfg.hidden_dims)), ("levels", len(cfg.codebook_sizes)),
                    ("hidden_dim", max(cfg.hidden_dims, default=0)),
                    ("codebook_size", max(cfg.codebook_sizes))):
        if int(v) > CHECKPOINT_LIMITS[name]:
            raise ValueError(f"{where}: config {name} = {v} is beyond the loader's bound {CHECKPOINT_LIMITS[name]} "
                             "(rqvae.CHECKPOINT_LIMITS)")


def load_rqvae(path, device: str = "cpu") -> RQVAE:
    """Load a model written by ``save_rqvae`` (no pickle).  Raises ValueError when the files are
    missing, unreadable, or the weights do not match the config (names or shapes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    cpath, wpath = os.path.join(path, _CONFIG), os.path.join(path, _WEIGHTS)
    for p in (cpath, wpath):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"RQ-VAE checkpoint file missing: {p} (expected a directory written by save_rqvae)")
    try:
        with open(cpath) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {_FORMAT!r}")
        if not isinstance(meta.get("config"), dict):
            raise ValueError("no 'config' object")
        cfg = RQVAEConfig.from_dict(meta["config"])
    except RecursionError:
        raise ValueError(f"{cpath}: not a valid RQ-VAE config: JSON nested too deeply") from None
    except (ValueError, KeyError, TypeError, OverflowError) as e:
        raise ValueError(f"{cpath}: not a valid RQ-VAE config: {str(e)[:200]}") from None
    _check_limits(cfg, cpath)
    # the weights' header against the config, before anything is allocated
    try:
        from safetensors import safe_open

        with safe_open(wpath, framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{wpath}: cannot read safetensors weights: {e}") from None
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in RQVAE(cfg).state_dict().items()}
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        shapes = [f"{k}: file {got[k]} vs config {want[k]}" for k in sorted(set(want) & set(got)) if want[k] != got[k]]
        raise ValueError(f"{wpath} does not match {cpath}: missing {missing}, unexpected {extra}, "
                         f"shape mismatches {shapes[:4]}")
    try:
        state = load_file(wpath)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{wpath}: cannot read safetensors weights: {e}") from None
    model = RQVAE(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    if isinstance(meta.get("provenance"), dict):
        model.provenance = meta["provenance"]
    model.eval()
    return model.to(_resolve_device(device))
