"""Training loop of the retriever: schedule, periodic validation, best checkpoint, exact resume.

Schedule (TIGER §4, "learning rate 0.01 for the first 10k steps, then inverse square root decay"):
``lr(step) = lr * sqrt(warmup_steps / max(step, warmup_steps))`` for the update with 0-based index
``step`` - constant for ``warmup_steps`` updates, then ~1/sqrt(step).  This is exactly T5's default
"rsqrt" schedule 1/sqrt(max(step, 10k)) (= 0.01 during the first 10k steps).

Optimizer: the paper gives the schedule but not the optimizer.  Its schedule is the one T5/T5X pairs
with Adafactor; open TIGER re-implementations mostly train with AdamW.  Default here: AdamW
(betas 0.9/0.999, eps 1e-8, weight decay 0.01, gradient-norm clipping at 1.0);
``optimizer="adafactor"`` selects ``torch.optim.Adafactor`` instead.

Determinism and resume: nothing here reads hidden global randomness.  The example order is a
concatenation of per-epoch permutations drawn from generators seeded by (seed, epoch); batch ``s``
is positions [s*B, (s+1)*B) of that stream (so every batch is full and the order does not depend on
when training was interrupted).  Dropout uses the global torch RNG, which the loop re-seeds from
(seed, step) before every step inside ``torch.random.fork_rng`` (the caller's RNG state is restored
afterwards).  The whole random state is therefore a function of (seed, step): a checkpoint holds the
model, the optimizer state, the step (= scheduler state), the history and the config, and resuming
replays the remaining steps bit-for-bit on CPU (on GPU up to nondeterministic kernels).

Checkpoints (``checkpoint_dir``): ``ckpt-<step>.safetensors`` (model + optimizer tensors) then
``ckpt-<step>.json`` (everything else), each written to a temporary file and renamed; the JSON is
the commit marker, so an interrupted write is never picked up.  Older checkpoints are deleted after
a newer one is committed.  The best model by ``best_metric`` goes to ``best/`` (`save_t5` format when
a ``layout`` is given, else ``best/model.safetensors`` + ``best/t5_config.json``).

Multi-process data parallelism (DDP).  Launch the training script with ``torchrun
--nproc_per_node=N script.py`` and call ``init_distributed()`` before ``train_retriever``; when a
process group with more than one rank is initialised, ``train_retriever`` trains with
``torch.nn.parallel.DistributedDataParallel`` (gloo on CPU, NCCL on GPU, device ``cuda`` maps to
``cuda:LOCAL_RANK``).  Every rank holds the same ``train_examples`` and computes the same global
batch ``s`` (the order above); rank ``r`` takes the ``r``-th of ``world_size`` contiguous, disjoint
slices of it (uneven when the batch size is not a multiple of the world size).  Each rank's loss is
its token-mean cross-entropy scaled by ``world_size * tokens_r / tokens_global`` so that DDP's
gradient *average* equals the gradient of the global batch's token-mean loss — the same objective,
global batch and logged loss as a single-process run with the same ``batch_size``.  Rank 0 alone
writes checkpoints and runs ``eval_fn`` (its metrics are broadcast, so every rank keeps the same
history and best model); ``checkpoint_dir`` must be on a filesystem shared by all ranks.
Nondeterminism: the all-reduce sums the ranks' gradients in an order of its own and each rank's
batch shard is padded to its own longest row (different GEMM shapes), so gradients equal the
single-process ones only up to float32 rounding (measured ~1e-7 relative; tests/test_ddp.py),
and a run is not bit-reproducible across world sizes; dropout masks are drawn per rank from seeds derived from
(seed, step, rank, world size), so with dropout > 0 a DDP run is a statistically equivalent, not an
identical, run.  NCCL's all-reduce is additionally not bit-deterministic across runs.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .layout import TokenLayout
from .sequences import Examples
from .atomic import write_atomic
from .checks import check_int
from .t5 import T5, T5Config, save_t5
from .world import World, current_world, rank_device

__all__ = ["TrainConfig", "lr_at", "train_retriever", "latest_checkpoint", "load_checkpoint",
           "init_distributed", "ExampleOrder"]


@dataclass
class TrainConfig:
    """Training hyper-parameters (paper defaults for Amazon Beauty).

    batch_size 256, lr 0.01, warmup_steps 10k (constant phase), max_steps 200k.
    eval_every: run ``eval_fn`` every this many steps (and at the end); checkpoint_every: write a
    resumable checkpoint every this many steps (and at the end / on the time budget) when
    ``checkpoint_dir`` is set.  time_budget_s: stop (after checkpointing) once this much wall time
    has been spent in this call.  precision: "fp32" or "bf16" (autocast; meant for GPUs).
    length_buckets: 0 = uniform random batches (the paper); W > 0 = within each window of W
    consecutive batches of an epoch's random order, examples are sorted by encoder length and the
    window's batches are then taken in a seeded random order, so each batch pads to similar lengths
    (Beauty: most histories are a few items, a random batch pads to 81 tokens).  Every epoch still
    visits every example once.

    schedule: "rsqrt" (the paper: constant ``lr`` for ``warmup_steps``, then 1/sqrt decay) or
    "cosine" (linear warm-up from 0 over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps``).  total_steps: the cosine's length; None = max_steps,
    or, with a ``time_budget_s``, planned from the measured step rate after the first
    ``PLAN_AFTER_STEPS`` steps and re-planned after every validation (whose cost is then known)
    so the decay ends with the budget.  The plans are recorded in the history (``plans``) and in
    checkpoints; a time-budgeted run depends on the machine's speed, so to replay one exactly,
    pass its final plan as ``total_steps`` and its ``final_step`` as ``max_steps``.
    label_smoothing: cross-entropy label smoothing (0 = none).
    eval_every_s: also validate whenever this many wall seconds passed since the last validation
    (None = by steps only); patience: stop after this many validations without a new best
    (None = never).  A time budget always ends with a validation, so no training is discarded."""

    batch_size: int = 256
    lr: float = 0.01
    warmup_steps: int = 10_000
    max_steps: int = 200_000
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    eval_every: int = 5_000
    best_metric: str = "ndcg@10"
    best_mode: str = "max"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1_000
    keep_checkpoints: int = 1
    time_budget_s: float | None = None
    log_every: int = 100
    length_buckets: int = 0
    schedule: str = "rsqrt"
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    eval_every_s: float | None = None
    patience: int | None = None

    def __post_init__(self):
        def pos_int(name, allow_zero=False):
            setattr(self, name, check_int(getattr(self, name), f"TrainConfig.{name}", 0 if allow_zero else 1))
        for n in ("batch_size", "max_steps", "eval_every", "checkpoint_every", "log_every", "keep_checkpoints"):
            pos_int(n)
        pos_int("warmup_steps", allow_zero=True)
        pos_int("length_buckets", allow_zero=True)
        pos_int("seed", allow_zero=True)
        for n in ("lr", "adam_eps"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"TrainConfig.{n} must be a positive finite number, got {v!r}")
        if not isinstance(self.weight_decay, (int, float)) or not (0 <= self.weight_decay < 1):
            raise ValueError(f"TrainConfig.weight_decay must be in [0, 1), got {self.weight_decay!r}")
        b = tuple(self.betas)
        if len(b) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(b[0]), float(b[1]))
        if self.grad_clip is not None and (not isinstance(self.grad_clip, (int, float)) or self.grad_clip <= 0):
            raise ValueError(f"TrainConfig.grad_clip must be None or > 0, got {self.grad_clip!r}")
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'adafactor', got {self.optimizer!r}")
        if self.schedule not in ("rsqrt", "cosine"):
            raise ValueError(f"TrainConfig.schedule must be 'rsqrt' or 'cosine', got {self.schedule!r}")
        if self.total_steps is not None:
            pos_int("total_steps")
        if self.patience is not None:
            pos_int("patience")
        if not isinstance(self.min_lr_ratio, (int, float)) or not (0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not isinstance(self.label_smoothing, (int, float)) or not (0 <= self.label_smoothing < 1):
            raise ValueError(f"TrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.eval_every_s is not None and (not isinstance(self.eval_every_s, (int, float))
                                              or isinstance(self.eval_every_s, bool) or self.eval_every_s <= 0):
            raise ValueError(f"TrainConfig.eval_every_s must be None or > 0 seconds, got {self.eval_every_s!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"TrainConfig.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"TrainConfig.best_mode must be 'max' or 'min', got {self.best_mode!r}")
        if self.time_budget_s is not None and (not isinstance(self.time_budget_s, (int, float)) or self.time_budget_s <= 0):
            raise ValueError(f"TrainConfig.time_budget_s must be None or > 0 seconds, got {self.time_budget_s!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"TrainConfig.device {self.device!r} is not a torch device: {e}") from e

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# fields that must match when resuming (changing them would not continue the same run)
_RESUME_FIXED = ("batch_size", "lr", "warmup_steps", "optimizer", "weight_decay", "betas", "adam_eps",
                 "grad_clip", "seed", "precision", "length_buckets", "schedule", "min_lr_ratio",
                 "label_smoothing")
# checkpoints written before an option existed hold its default
_RESUME_DEFAULTS = {"length_buckets": 0, "schedule": "rsqrt", "min_lr_ratio": 0.0, "label_smoothing": 0.0}
# a time-budgeted cosine schedule is planned from the step rate measured over this many steps
PLAN_AFTER_STEPS = 30


def lr_at(step: int, config: TrainConfig, total_steps: int | None = None) -> float:
    """Learning rate of the update with 0-based index ``step``.

    rsqrt: lr * sqrt(warmup / max(step, warmup)) (constant while step < warmup; lr when warmup = 0
    and step = 0).  cosine: lr * (step + 1) / warmup during warm-up, then
    lr * (m + (1 - m) * (1 + cos(pi * p)) / 2) with p = (step - warmup) / (total - warmup) clipped
    to [0, 1] and m = min_lr_ratio; ``total_steps`` overrides ``config.total_steps`` / max_steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    w = config.warmup_steps
    if config.schedule == "cosine":
        if step < w:
            return config.lr * (step + 1) / w
        total = total_steps or config.total_steps or config.max_steps
        frac = min(1.0, (step - w) / max(total - w, 1))
        m = config.min_lr_ratio
        return config.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * frac)))
    if w == 0:
        return config.lr / math.sqrt(max(step, 1))
    return config.lr * math.sqrt(w / max(step, w))


def _seed_of(seed: int, tag: str, n: int) -> int:
    """A 63-bit seed derived from (seed, tag, n) by a stable hash (independent streams per step/epoch)."""
    h = hashlib.blake2b(f"{seed}:{tag}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class ExampleOrder:
    """Infinite example order: per-epoch permutations seeded by (seed, epoch); with ``window`` > 0
    (TrainConfig.length_buckets) each window of ``window * batch_size`` positions is sorted by
    ``lengths`` and its batch-size blocks are shuffled (seeded by (seed, epoch, window))."""

    def __init__(self, n: int, seed: int, lengths: torch.Tensor | None = None, window: int = 0, batch_size: int = 1):
        self.n, self.seed, self._cache = n, seed, {}
        self.lengths, self.window, self.bs = lengths, int(window), int(batch_size)

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.clear()
            g = torch.Generator().manual_seed(_seed_of(self.seed, "epoch", epoch))
            p = torch.randperm(self.n, generator=g)
            if self.window > 0 and self.lengths is not None:
                p = self._bucket(p, epoch)
            self._cache[epoch] = p
        return self._cache[epoch]

    def _bucket(self, p: torch.Tensor, epoch: int) -> torch.Tensor:
        w = self.window * self.bs
        out = []
        for i, s in enumerate(range(0, self.n, w)):
            chunk = p[s:s + w]
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices]
            blocks = list(torch.split(chunk, self.bs))
            g = torch.Generator().manual_seed(_seed_of(self.seed, f"bucket{epoch}", i))
            out += [blocks[j] for j in torch.randperm(len(blocks), generator=g).tolist()]
        return torch.cat(out)

    def batch(self, step: int, bs: int) -> torch.Tensor:
        pos = torch.arange(step * bs, (step + 1) * bs)
        epochs = pos // self.n
        out = torch.empty(bs, dtype=torch.long)
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self.perm(e)[pos[sel] % self.n]
        return out


def _check_examples(ex: Examples, vocab: int) -> None:
    if not isinstance(ex, Examples):
        raise TypeError(f"train_examples must be tiger_fast.sequences.Examples (from tokenize_split), "
                        f"got {type(ex).__name__}")
    if len(ex) == 0:
        raise ValueError("train_examples is empty")
    ids, mask, lab = ex.input_ids, ex.attention_mask, ex.labels
    if ids.dtype != torch.long or lab.dtype != torch.long or mask.dtype != torch.bool:
        raise TypeError("train_examples must hold int64 input_ids/labels and a bool attention_mask")
    if ids.shape != mask.shape or ids.dim() != 2 or lab.dim() != 2 or lab.shape[0] != ids.shape[0]:
        raise ValueError(f"train_examples shapes disagree: input_ids {tuple(ids.shape)}, attention_mask "
                         f"{tuple(mask.shape)}, labels {tuple(lab.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"train_examples.input_ids outside the model vocabulary [0, {vocab})")
    ok = (lab == -100) | ((lab >= 0) & (lab < vocab))
    if not bool(ok.all()):
        raise ValueError(f"train_examples.labels must be in [0, {vocab}) or -100 (ignored)")
    if not bool(mask.any(1).all()):
        raise ValueError("train_examples has a row whose attention_mask is all False (empty history)")
    if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        # batches are trimmed to their longest row from the right
        raise ValueError("train_examples must be right-padded (attention_mask True then False in every row)")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """optimizer.state_dict() -> (tensors {name: tensor}, json-able rest)."""
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        meta = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().to("cpu").contiguous()
            else:
                meta[k] = v
        state_meta[str(pid)] = meta
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"state_meta": state_meta, "param_groups": groups}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for name, t in tensors.items():
        if not name.startswith("optim/"):
            continue
        _, pid, k = name.split("/", 2)
        state.setdefault(int(pid), {})[k] = t
    for pid, m in meta["state_meta"].items():
        state.setdefault(int(pid), {}).update(m)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _make_optimizer(model: T5, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """Path prefix (without extension) of the newest committed checkpoint in ``checkpoint_dir``."""
    best, best_step = None, -1
    for j in glob.glob(os.path.join(checkpoint_dir, "ckpt-*.json")):
        m = re.fullmatch(r"ckpt-(\d+)\.json", os.path.basename(j))
        if m and os.path.isfile(j[:-5] + ".safetensors") and int(m.group(1)) > best_step:
            best, best_step = j[:-5], int(m.group(1))
    return best


def _save_checkpoint(cfg: TrainConfig, model: T5, opt, step: int, history: dict) -> None:
    from safetensors.torch import save_file

    d = cfg.checkpoint_dir
    os.makedirs(d, exist_ok=True)
    prefix = os.path.join(d, f"ckpt-{step:09d}")
    tensors = {f"model/{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    otensors, ometa = _flatten_optimizer(opt)
    tensors.update(otensors)
    write_atomic(prefix + ".safetensors", lambda p: save_file(tensors, p, metadata={"step": str(step)}))
    meta = {"format": "tiger_fast.train/1", "step": step, "train_config": cfg.to_dict(),
            "t5_config": model.config.to_dict(), "optimizer": ometa, "history": history,
            "provenance": dict(getattr(model, "provenance", {}) or {})}

    def _w(p):
        with open(p, "w") as f:
            json.dump(meta, f)
    write_atomic(prefix + ".json", _w)  # commit marker
    # drop older checkpoints (json first, so a half-deleted one is never picked up)
    olds = sorted(glob.glob(os.path.join(d, "ckpt-*.json")))
    for j in olds[:-cfg.keep_checkpoints]:
        if j[:-5] != prefix:
            for p in (j, j[:-5] + ".safetensors"):
                if os.path.exists(p):
                    os.remove(p)


def load_checkpoint(prefix: str) -> tuple[dict, dict]:
    """Read a training checkpoint -> (tensors, meta).  Raises ValueError if unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(prefix + ".json") as f:
            meta = json.load(f)
        tensors = load_file(prefix + ".safetensors")
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"cannot read training checkpoint {prefix!r}: {e}") from e
    if meta.get("format") != "tiger_fast.train/1":
        raise ValueError(f"{prefix}.json is not a tiger_fast training checkpoint")
    return tensors, meta


def _save_best(cfg: TrainConfig, model: T5, layout: TokenLayout | None) -> None:
    from safetensors.torch import save_file

    d = os.path.join(cfg.checkpoint_dir, "best")
    if layout is not None:
        save_t5(model, layout, d)
        return
    os.makedirs(d, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomic(os.path.join(d, "model.safetensors"), lambda p: save_file(tensors, p))

    def _w(p):
        with open(p, "w") as f:
            json.dump(model.config.to_dict(), f, indent=2)
    write_atomic(os.path.join(d, "t5_config.json"), _w)


def _better(v: float, best: float | None, mode: str) -> bool:
    if v is None or not math.isfinite(v):
        return False
    if best is None:
        return True
    return v > best if mode == "max" else v < best


def train_retriever(model: T5, train_examples: Examples, *, config: TrainConfig,
                    eval_fn: Callable[[T5], dict] | None = None, progress: bool = True,
                    layout: TokenLayout | None = None) -> dict:
    """Train ``model`` (in place) on ``train_examples`` with teacher forcing (mean token
    cross-entropy over the ID tokens + eos).

    eval_fn(model) -> {metric: float}, called in eval mode under no_grad every
    ``config.eval_every`` steps and at the end; the best model by ``config.best_metric`` is
    written to ``<checkpoint_dir>/best`` and its weights are loaded back into ``model`` at the end.
    With ``config.checkpoint_dir`` set, training resumes from the newest checkpoint there.

    Returns the history dict: ``loss`` [[step, mean loss since last log, wall_s]], ``lr`` [[step, lr]],
    ``evals`` [{"step": s, **metrics}], ``best_step``, ``best_value``, ``best_metric``,
    ``stopped`` ("max_steps" | "time_budget" | "early_stopping" | "schedule_end"), ``final_step``,
    ``resumed_from`` (step or None), ``steps_per_s`` (this call), ``planned_steps`` (the cosine
    schedule's length, None for rsqrt), ``wall_s`` (training wall time, all calls); every
    ``evals`` entry also has ``wall_s`` (wall time when it ran)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, T5):
        raise TypeError(f"model must be a tiger_fast.t5.T5, got {type(model).__name__}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError("eval_fn must be a callable eval_fn(model) -> dict of metrics")
    if layout is not None:
        if not isinstance(layout, TokenLayout):
            raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
        if layout.vocab_size != model.config.vocab_size:
            raise ValueError(f"layout.vocab_size {layout.vocab_size} != model vocab_size {model.config.vocab_size}")
    _check_examples(train_examples, model.config.vocab_size)
    cfg = config
    dist, ws, rank = _dist_state()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device is 'cuda' but CUDA is not available; use device='cpu'")
    if dist is not None:
        if cfg.batch_size < ws:
            raise ValueError(f"TrainConfig.batch_size ({cfg.batch_size}) must be >= the world size ({ws}): "
                             "every rank needs a non-empty shard of each global batch")
        device = rank_device(device, World(dist, ws, rank))  # the check train_rqvae makes too
    model.to(device)
    opt = _make_optimizer(model, cfg)

    history = {"loss": [], "lr": [], "evals": [], "best_step": None, "best_value": None,
               "best_metric": cfg.best_metric, "stopped": None, "final_step": 0, "resumed_from": None,
               "planned_steps": None, "wall_s": 0.0}
    start = 0
    if cfg.checkpoint_dir is not None:
        prefix = latest_checkpoint(cfg.checkpoint_dir)
        if prefix is not None:
            tensors, meta = load_checkpoint(prefix)
            old = meta["train_config"]
            old = {**_RESUME_DEFAULTS, **old}
            diff = [k for k in _RESUME_FIXED if (list(old[k]) if k == "betas" else old[k]) !=
                    (list(getattr(cfg, k)) if k == "betas" else getattr(cfg, k))]
            if diff:
                raise ValueError(f"checkpoint {prefix!r} was written with a different TrainConfig "
                                 f"({', '.join(f'{k}: {old[k]!r} != {getattr(cfg, k)!r}' for k in diff)}); "
                                 "use the same config or a new checkpoint_dir")
            if T5Config.from_dict(meta["t5_config"]) != model.config:
                raise ValueError(f"checkpoint {prefix!r} holds a model with config {meta['t5_config']}, "
                                 f"not {model.config.to_dict()}; use a new checkpoint_dir")
            # a checkpoint of a model trained with another ID table does not continue this run
            was = (meta.get("provenance") or {}).get("id_table")
            now = (getattr(model, "provenance", {}) or {}).get("id_table")
            if was is not None and now is not None and was != now:
                raise ValueError(f"checkpoint {prefix!r} was trained with another ID table ({was[:12]}, this one is "
                                 f"{now[:12]}); use a new checkpoint_dir (--out) for this ID table")
            msd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
            model.load_state_dict(msd, strict=True)
            opt.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
            start = int(meta["step"])
            history = {"planned_steps": None, "wall_s": 0.0, **meta["history"]}
            history["resumed_from"] = start
    if dist is not None:
        # every rank must resume from the same step (checkpoint_dir on a shared filesystem)
        st = torch.tensor([start, -start], dtype=torch.long, device=device)
        dist.all_reduce(st, op=dist.ReduceOp.MAX)
        if int(st[0]) != start or int(-st[1]) != start:
            raise ValueError(f"ranks found different checkpoints in {cfg.checkpoint_dir!r} (steps {int(-st[1])}.."
                             f"{int(st[0])}); checkpoint_dir must be on a filesystem shared by all ranks")
        # construction broadcasts rank 0's weights (and buffers; T5 has none): every rank starts equal
        ddp = torch.nn.parallel.DistributedDataParallel(
            _ShardLoss(model), device_ids=[device.index] if device.type == "cuda" else None)

    n = len(train_examples)
    order = ExampleOrder(n, cfg.seed, lengths=train_examples.attention_mask.sum(1).cpu(), window=cfg.length_buckets,
                   batch_size=cfg.batch_size)
    ex = train_examples
    # keep the examples on the training device when they are small (avoids a copy per step)
    if device.type != "cpu" and ex.input_ids.numel() * 8 < 2 ** 31:
        ex = Examples(ex.input_ids.to(device), ex.attention_mask.to(device), ex.labels.to(device),
                      ex.target_item_ids)
    decoder_start = 0  # TokenLayout.decoder_start_id (= pad) for every layout
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else _NullCtx())

    def run_eval(step):
        if eval_fn is None:
            return
        eval_clock[0] = time.monotonic()
        try:
            _run_eval(step)
        finally:
            last_eval_s[0] = time.monotonic() - eval_clock[0]
            eval_total_s[0] += last_eval_s[0]

    def _run_eval(step):
        res = None
        if rank == 0:
            model.eval()
            with torch.no_grad():
                res = eval_fn(model)
            model.train()
            if not isinstance(res, dict):
                raise TypeError(f"eval_fn must return a dict of metrics, got {type(res).__name__}")
            res = {k: float(v) for k, v in res.items()}
        if dist is not None:  # rank 0 evaluates; every rank keeps the same history / best model
            box = [res]
            dist.broadcast_object_list(box, src=0)
            res = box[0]
        if cfg.best_metric not in res:
            raise ValueError(f"eval_fn returned {sorted(res)} but TrainConfig.best_metric is "
                             f"{cfg.best_metric!r}; set best_metric to one of them")
        history["evals"].append({"step": step, "wall_s": wall0 + time.monotonic() - t0, **res})
        if _better(res[cfg.best_metric], history["best_value"], cfg.best_mode):
            history["best_value"], history["best_step"] = res[cfg.best_metric], step
            if cfg.checkpoint_dir is not None and rank == 0:
                _save_best(cfg, model, layout)
            best_state[0] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    best_state: list = [None]
    t0 = time.monotonic()
    eval_clock = [t0]
    last_eval_s, eval_total_s = [0.0], [0.0]  # wall time of the last validation, of all of them
    wall0 = float(history.get("wall_s") or 0.0)  # wall time of earlier calls (resumed runs)
    step = start
    stopped = "max_steps"
    cuda_devs = [device.index or 0] if device.type == "cuda" else []
    # the cosine schedule's length: fixed, or planned from the step rate under a time budget
    plan_needed = (cfg.schedule == "cosine" and cfg.total_steps is None and cfg.time_budget_s is not None
                   and history.get("planned_steps") is None)
    if cfg.schedule == "cosine" and not plan_needed:
        fixed = cfg.total_steps or cfg.max_steps
        if history.get("planned_steps") is None:
            history["planned_steps"] = fixed
        elif cfg.time_budget_s is None and history["planned_steps"] != fixed:
            # resumed with another step count: the cosine follows the new length from here on
            # (else a longer run would stop where the old schedule ended)
            history.setdefault("plans", []).append([start, fixed])
            history["planned_steps"] = fixed
    plan_t0 = [None]
    # a budget-sized plan may grow when it runs out early; also in a resumed run, whose plan (from
    # the checkpoint) may have been capped by a smaller max_steps than this call's
    replan = plan_needed or (cfg.schedule == "cosine" and cfg.total_steps is None and cfg.time_budget_s is not None
                             and start > 0)
    bar = None
    bar_clock = [0.0]
    if progress and rank == 0:
        from tqdm.auto import tqdm
        if cfg.time_budget_s is not None:  # progress against the budget, not a step count it never reaches
            bar = tqdm(total=round(cfg.time_budget_s), desc="train", unit="s", dynamic_ncols=True,
                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of budget{postfix}")  # tqdm puts ", " before it
        else:
            bar = tqdm(total=cfg.max_steps, initial=start, desc="train", dynamic_ncols=True)
    run_loss = torch.zeros((), device=device)
    run_n = 0
    last_eval = None
    model.train()
    try:
        with torch.random.fork_rng(devices=cuda_devs):
            while step < cfg.max_steps:
                if cfg.time_budget_s is not None:
                    over = time.monotonic() - t0 >= cfg.time_budget_s
                    if dist is not None:  # rank 0's clock decides, so all ranks stop at the same step
                        flag = torch.tensor([int(over)], device=device)
                        dist.broadcast(flag, src=0)
                        over = bool(flag.item())
                    if over:
                        stopped = "time_budget"
                        break
                torch.manual_seed(_seed_of(cfg.seed, "step", step) if dist is None
                                  else _seed_of(cfg.seed, f"step/rank{rank}/of{ws}", step))
                if plan_needed and step == start + PLAN_AFTER_STEPS // 2:
                    plan_t0[0] = time.monotonic()  # after warm-up of the allocator / caches
                if plan_needed and step == start + PLAN_AFTER_STEPS:
                    history["planned_steps"] = _plan_steps(cfg, step, PLAN_AFTER_STEPS - PLAN_AFTER_STEPS // 2,
                                                           time.monotonic() - plan_t0[0],
                                                           time.monotonic() - t0, dist)
                    plan_needed = False
                lr = lr_at(step, cfg, history.get("planned_steps"))
                for g in opt.param_groups:
                    g["lr"] = lr
                idx = order.batch(step, cfg.batch_size).to(ex.input_ids.device)
                if dist is None:
                    ids, mask, labels = ex.batch(idx)
                    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
                    with autocast:
                        loss = model.loss(ids, mask, labels, decoder_start, cfg.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                else:
                    opt.zero_grad(set_to_none=True)
                    loss = _ddp_backward(ddp, ex, idx, ws, rank, device, decoder_start, autocast,
                                         cfg.label_smoothing)
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                run_loss += loss.detach()
                run_n += 1
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    if dist is not None:
                        dist.all_reduce(run_loss)  # the sum of the ranks' shares = the global mean
                    mean = float(run_loss) / run_n
                    if not math.isfinite(mean):
                        raise FloatingPointError(f"training loss became {mean} before step {step}; "
                                                 "lower TrainConfig.lr or enable grad_clip")
                    history["loss"].append([step, mean, wall0 + time.monotonic() - t0])  # [step, loss, wall_s]
                    history["lr"].append([step, lr])
                    run_loss.zero_()
                    run_n = 0
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                if bar is not None:
                    if cfg.time_budget_s is not None:
                        now = time.monotonic()
                        if now - bar_clock[0] >= 1.0:  # redraw at most once a second (logs stay short)
                            bar_clock[0] = now
                            bar.n = min(now - t0, cfg.time_budget_s)
                            bar.set_postfix_str(f"step {step}" + (f"/{history['planned_steps']}"
                                                                  if history.get("planned_steps") else ""),
                                                refresh=False)
                            bar.refresh()
                    else:
                        bar.update(1)
                if step % cfg.eval_every == 0 or _eval_due(cfg, eval_clock[0], dist):
                    run_eval(step)
                    last_eval = step
                    if replan:  # now that validation's cost is known, fit the decay to what is left
                        history["planned_steps"] = _replan_steps(cfg, step, step - start, time.monotonic() - t0,
                                                                 eval_total_s[0], last_eval_s[0], dist)
                        history.setdefault("plans", []).append([step, history["planned_steps"]])
                    if cfg.patience is not None and history["best_step"] is not None and \
                            _evals_since_best(history) >= cfg.patience:
                        stopped = "early_stopping"
                        break
                if history.get("planned_steps") and step >= history["planned_steps"] and \
                        cfg.schedule == "cosine":
                    if replan:  # the plan ran out early (a slow start): extend it if the budget allows
                        more = _replan_steps(cfg, step, step - start, time.monotonic() - t0, eval_total_s[0],
                                             last_eval_s[0], dist)
                        if more > step * 1.05 + 1:
                            history["planned_steps"] = more
                            history.setdefault("plans", []).append([step, more])
                    if step >= history["planned_steps"]:
                        stopped = "schedule_end"
                        break
                if cfg.checkpoint_dir is not None and step % cfg.checkpoint_every == 0:
                    history["final_step"] = step
                    history["wall_s"] = wall0 + time.monotonic() - t0
                    if rank == 0:
                        _save_checkpoint(cfg, model, opt, step, history)
                    if dist is not None:
                        dist.barrier()
    finally:
        if bar is not None:
            bar.close()
    if run_n:
        if dist is not None:
            dist.all_reduce(run_loss)
        history["loss"].append([step, float(run_loss) / run_n, wall0 + time.monotonic() - t0])
        history["lr"].append([step, lr_at(max(step - 1, 0), cfg)])
    if last_eval != step and step > start:
        run_eval(step)  # also at the end of a time budget: the last steps are never thrown away
    history["stopped"] = stopped
    history["final_step"] = step
    elapsed = time.monotonic() - t0
    history["wall_s"] = wall0 + elapsed
    history["steps_per_s"] = (step - start) / elapsed if elapsed > 0 else None
    if cfg.checkpoint_dir is not None and step > start:
        if rank == 0:
            _save_checkpoint(cfg, model, opt, step, history)
        if dist is not None:
            dist.barrier()
    if best_state[0] is not None:
        model.load_state_dict(best_state[0])
    elif eval_fn is not None and history["best_step"] is not None and cfg.checkpoint_dir is not None:
        # the best model was found before a resume: reload it from disk
        _load_best_into(model, cfg.checkpoint_dir, layout)
    model.eval()
    return history


def _plan_steps(cfg: TrainConfig, step: int, timed_steps: int, timed_s: float, spent_s: float, dist) -> int:
    """Total steps of a time-budgeted cosine schedule: the steps that fit in what is left of the
    budget at the rate measured over the last ``timed_steps`` steps, leaving 10 % of it for
    validation, capped by max_steps.  Rank 0's estimate is used by every rank."""
    rate = timed_steps / max(timed_s, 1e-9)
    left = max(cfg.time_budget_s - spent_s, 0.0)
    planned = min(cfg.max_steps, step + max(int(0.9 * left * rate), 1))
    if dist is not None:
        box = [planned]
        dist.broadcast_object_list(box, src=0)
        planned = box[0]
    return max(planned, cfg.warmup_steps + 1)


def _replan_steps(cfg: TrainConfig, step: int, steps_done: int, spent_s: float, eval_s: float, last_eval_s: float,
                  dist) -> int:
    """Re-plan a time-budgeted cosine schedule after a validation: the training step rate so far
    (validation time excluded) times what is left of the budget once the remaining validations
    (at the last one's cost, plus the final one) are paid for; capped by max_steps, never before
    the current step."""
    rate = steps_done / max(spent_s - eval_s, 1e-9)
    left = max(cfg.time_budget_s - spent_s, 0.0)
    if cfg.eval_every_s is not None:
        n_evals = left / (cfg.eval_every_s + last_eval_s)
    else:
        n_evals = left * rate / cfg.eval_every
    planned = min(cfg.max_steps, step + max(int(rate * max(left - (n_evals + 1) * last_eval_s, 0.0)), 1))
    if dist is not None:
        box = [planned]
        dist.broadcast_object_list(box, src=0)
        planned = box[0]
    return max(planned, cfg.warmup_steps + 1, step + 1)


def _eval_due(cfg: TrainConfig, last_eval_clock: float, dist) -> bool:
    """True when ``eval_every_s`` wall seconds passed since the last validation (rank 0's clock)."""
    if cfg.eval_every_s is None:
        return False
    due = time.monotonic() - last_eval_clock >= cfg.eval_every_s
    if dist is not None:
        flag = torch.tensor([int(due)])
        dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


def _evals_since_best(history: dict) -> int:
    """Validations run after the one that gave the best value."""
    steps = [e["step"] for e in history["evals"]]
    return len(steps) - 1 - max(i for i, s in enumerate(steps) if s == history["best_step"])


def _load_best_into(model: T5, checkpoint_dir: str, layout) -> None:
    from safetensors.torch import load_file

    p = os.path.join(checkpoint_dir, "best", "model.safetensors")
    if os.path.isfile(p):
        model.load_state_dict(load_file(p, device=str(model.shared.weight.device)), strict=True)


def init_distributed(backend: str | None = None, timeout_s: float = 1800) -> tuple[int, int, str]:
    """Initialise ``torch.distributed`` from the environment ``torchrun`` sets (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT).  backend: None = "nccl" when CUDA is available, else
    "gloo".  On CUDA, selects device ``cuda:LOCAL_RANK``.  Returns (rank, world_size, device) with
    device "cpu" or "cuda:<local rank>" — pass it as ``TrainConfig.device`` (or "cuda").
    A no-op returning (0, 1, "cpu"/"cuda") when WORLD_SIZE is unset or 1 and no group exists."""
    import datetime

    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if backend is None:
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend()  # an existing group decides
        else:
            backend = "nccl" if cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (auto), got {backend!r}")
    if backend == "nccl" and not cuda:
        raise ValueError("backend 'nccl' needs CUDA; use backend='gloo' on CPU")
    if dist.is_available() and dist.is_initialized():
        rank, ws = dist.get_rank(), dist.get_world_size()
    elif int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, "cuda" if backend == "nccl" else "cpu"
    else:
        for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if k not in os.environ:
                raise ValueError(f"WORLD_SIZE is set but {k} is not; launch with torchrun")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        rank, ws = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        return rank, ws, f"cuda:{local}"
    return rank, ws, "cpu"


def _dist_state():
    """(torch.distributed module, world size, rank) when a group of > 1 ranks is initialised, else (None, 1, 0)."""
    w = current_world()
    return (None, 1, 0) if w is None else (w.dist, w.size, w.rank)


class _ShardLoss(torch.nn.Module):
    """What DDP wraps: forward = the model's token-mean loss on this rank's shard times ``scale``
    (DDP hooks ``forward``, not ``T5.loss``)."""

    def __init__(self, model: T5):
        super().__init__()
        self.model = model

    def forward(self, ids, mask, labels, decoder_start: int, scale: float, label_smoothing: float = 0.0):
        if scale == 0:  # no target token in this shard: a finite stand-in loss (a mean over no
            labels = labels.clamp(min=0)  # token is NaN), times 0 -> zero gradients, DDP still syncs
        return self.model.loss(ids, mask, labels, decoder_start, label_smoothing) * scale


def _ddp_backward(ddp, ex: Examples, idx: torch.Tensor, ws: int, rank: int, device, decoder_start: int,
                  autocast=None, label_smoothing: float = 0.0) -> torch.Tensor:
    """One data-parallel forward/backward of the global batch ``idx`` int64 (B,) (the same on every
    rank): this rank takes the ``rank``-th of ``ws`` contiguous slices, its token-mean loss is
    scaled by ``ws * tokens_rank / tokens_global`` so that DDP's gradient average (all-reduce /
    ws) is the gradient of the global batch's token-mean loss.  Leaves the gradients in the
    parameters; returns this rank's share of the global mean loss (float32 scalar, detached:
    the sum over ranks is the global mean)."""
    n_glob = int((ex.labels[idx] != -100).sum())  # every rank knows the whole batch: no communication
    part = torch.tensor_split(idx, ws)[rank]
    ids, mask, labels = ex.batch(part)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    w = int((labels != -100).sum()) / max(n_glob, 1)
    with (autocast if autocast is not None else _NullCtx()):
        local = ddp(ids, mask, labels, decoder_start, w * ws, label_smoothing)
    local.backward()  # DDP all-reduces (averages) the gradients over ranks here
    return local.detach() / ws


class _NullCtx:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
