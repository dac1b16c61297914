"""The ranks a training loop runs on: this process alone, or a ``torch.distributed`` group (DDP).

* :func:`current_world`: the default process group when one of > 1 ranks is initialised (torchrun
  + ``tiger_fast.train.init_distributed``), else None (one process).
* :func:`rank_device`: the one device/backend check of every DDP loop (the retriever's in
  tiger_fast/train.py, the RQ-VAE's in tiger_fast/rqvae.py).
* :func:`gather_rows`: every rank's rows of a tensor, in rank order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["World", "current_world", "rank_device", "gather_rows"]


@dataclass(frozen=True)
class World:
    """An initialised process group: ``dist`` the torch.distributed module, ``size`` ranks (> 1),
    ``rank`` this process's rank."""

    dist: Any
    size: int
    rank: int


def current_world() -> World | None:
    """The default process group as a :class:`World` when it has > 1 ranks, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World(dist, dist.get_world_size(), dist.get_rank())
    return None


def rank_device(device: torch.device, world: World) -> torch.device:
    """This rank's device: ``cuda`` without an index becomes ``cuda:LOCAL_RANK``.  Raises ValueError
    when the group's backend does not fit the device (gloo on CPU, nccl on CUDA)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", world.rank % torch.cuda.device_count())))
    backend = world.dist.get_backend()
    if (device.type == "cuda") != (backend == "nccl"):
        raise ValueError(f"process group backend {backend!r} does not fit device {device}; use gloo with "
                         "device='cpu' and nccl with device='cuda' (tiger_fast.train.init_distributed picks it)")
    return device


def gather_rows(world: World, t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows of ``t`` float (m_r, d) in rank order (m_r may differ)."""
    dist, ws = world.dist, world.size
    m = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(m) for _ in range(ws)]
    dist.all_gather(sizes, m)
    sizes = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes), t.shape[1]), dtype=t.dtype, device=t.device)
    pad[: t.shape[0]] = t
    bufs = [torch.empty_like(pad) for _ in range(ws)]
    dist.all_gather(bufs, pad)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)])
