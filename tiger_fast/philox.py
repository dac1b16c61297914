"""Philox4x32-10 counter-based RNG in plain PyTorch, and the Gumbel noise of the sampler.

Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
maps a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to four uint32 words.  It is a
pure function of (counter, key): no state, so every backend (this file, csrc/philox.h on the CPU
and on CUDA) produces the same stream for the same inputs, whatever the batch size or order.

Torch has no usable uint32 arithmetic, so the words are held in int64 tensors with values in
[0, 2^32).  The one operation that needs more than 64 bits, the 32x32 -> 64-bit product of a round,
is split into two 32x16-bit products (each < 2^48), see ``_mulhilo``.

tiger_fast's use (docs/contracts.md, "Sampling"):
    key     = (seed & 0xffffffff, seed >> 32)                  seed: int in [0, 2^64)
    counter = (e, step, row_key & 0xffffffff, (row_key >> 32) & 0xffffffff)
              e = b * S_l + t (beam slot b, code t of level l), step = level l,
              row_key: int64 per row (two's complement for negative keys, i.e. the uint64 cast)
    word 0 -> u = (x0 + 0.5) * 2^-32   (float64; exact, x0 < 2^32 needs 33 mantissa bits)
    gumbel  = -log(-log(u))            (float64; u in (0, 1) so the noise is always finite)
"""
from __future__ import annotations

import torch

from .checks import is_int

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product m * x; m a uint32 constant, x int64 in [0, 2^32).

    m * x can reach 2^64 and overflow int64, so x = xh * 2^16 + xl and
    m * x = m * xl + (m * xh) * 2^16, where both partial products are < 2^48.  Writing
    m * xh = bh * 2^16 + bl (bl < 2^16, bh < 2^32): m * x = (m * xl + bl * 2^16) + bh * 2^32, and the
    first term t < 2^48 + 2^32 fits, so lo = t mod 2^32 and hi = (t >> 32) + bh (< 2^32 since the
    full product is < 2^64)."""
    xl = x & 0xFFFF
    xh = x >> 16
    a = m * xl
    b = m * xh
    t = a + ((b & 0xFFFF) << 16)
    lo = t & _MASK32
    hi = ((t >> 32) + (b >> 16)) & _MASK32
    return hi, lo


def philox4x32_10(counter, key, *, check: bool = True) -> torch.Tensor:
    """Philox4x32-10 block function.

    counter: 4 int64 tensors (or ints) with values in [0, 2^32), broadcastable to one shape S;
    key: 2 int64 tensors or ints in [0, 2^32), broadcastable to S.
    Returns int64 (4, *S): the four output words, each in [0, 2^32).
    ``check=False`` skips the range check (for callers that build the words themselves).
    Ten rounds; the key is bumped by the Weyl constants between rounds (nine bumps)."""
    c = [torch.as_tensor(v, dtype=torch.int64) for v in counter]
    k = [torch.as_tensor(v, dtype=torch.int64) for v in key]
    if len(c) != 4 or len(k) != 2:
        raise ValueError("philox4x32_10 needs a 4-word counter and a 2-word key")
    c = list(torch.broadcast_tensors(*c, *k))
    k0, k1 = c[4], c[5]
    c0, c1, c2, c3 = c[:4]
    for w in (c0, c1, c2, c3, k0, k1) if check else ():
        if w.numel() and (bool((w < 0).any()) or bool((w > _MASK32).any())):
            raise ValueError("philox4x32_10: counter and key words must be in [0, 2^32)")
    for r in range(10):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3])


def split_u64(value, name: str = "value") -> tuple[torch.Tensor, torch.Tensor]:
    """int64 tensor (two's complement) or Python int -> (lo, hi) uint32 words as int64 tensors."""
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 64):
            raise ValueError(f"{name} must fit in 64 bits, got {value}")
        value &= (1 << 64) - 1
        return torch.tensor(value & _MASK32), torch.tensor(value >> 32)
    v = torch.as_tensor(value)
    if v.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {v.dtype}")
    # Arithmetic shift then mask == the high word of the uint64 reinterpretation.
    return v & _MASK32, (v >> 32) & _MASK32


def philox_word0(seed: int, step: int, row_keys: torch.Tensor, num_beams: int, num_codes: int) -> torch.Tensor:
    """Word 0 of Philox4x32-10 for every (row, beam slot b, code t) of one decoding step.

    seed: int in [0, 2^64); step: level index (>= 0, < 2^32); row_keys: int64 (R,);
    returns int64 (R, num_beams, num_codes) with values in [0, 2^32): counter
    (b * num_codes + t, step, row_key lo, row_key hi), key (seed lo, seed hi)."""
    if not is_int(seed) or not 0 <= seed < (1 << 64):
        raise ValueError(f"seed must be an int in [0, 2^64), got {seed!r}")
    if not 0 <= step <= _MASK32:
        raise ValueError(f"step must be in [0, 2^32), got {step}")
    if num_beams * num_codes > _MASK32 + 1:
        raise ValueError("num_beams * level size must be <= 2^32 (the counter word e)")
    row_keys = torch.as_tensor(row_keys).cpu()
    lo, hi = split_u64(row_keys, "row_keys")
    e = torch.arange(num_beams * num_codes, dtype=torch.int64).view(1, num_beams, num_codes)
    out = philox4x32_10((e, step, lo.view(-1, 1, 1), hi.view(-1, 1, 1)), (seed & _MASK32, seed >> 32), check=False)
    return out[0]


def uniform_from_word(x: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> float64 u = (x + 0.5) * 2^-32 in (0, 1), exact."""
    return (x.to(torch.float64) + 0.5) * (2.0 ** -32)


def gumbel_noise(seed: int, step: int, row_keys: torch.Tensor, num_beams: int, num_codes: int,
                 device=None) -> torch.Tensor:
    """Standard Gumbel noise float64 (R, num_beams, num_codes) = -log(-log(u)) of word 0.

    Computed on the CPU (the stream is the contract; this is the reference) and moved to device."""
    u = uniform_from_word(philox_word0(seed, step, row_keys, num_beams, num_codes))
    g = -torch.log(-torch.log(u))
    return g if device is None else g.to(device)
