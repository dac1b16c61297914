"""The one token layout every component uses: how semantic IDs become a vocabulary.

A semantic ID is ``num_levels`` codes: ``len(codebook_sizes)`` RQ-VAE codes (c0, c1, c2) followed
by the collision code (c3).  All tokens live in one flat space::

    [ special tokens | level-0 block | level-1 block | level-2 block | collision block | user tokens ]
      pad=0, eos=1     256 tokens      256 tokens      256 tokens      256 tokens        2,000 tokens

Level ``l``'s code ``c`` is token ``level_offset(l) + c`` (with the default sizes, ``2 + 256*l + c``).
User ids are hashed into ``num_user_tokens`` buckets (TIGER §3.2) and prepended to the encoder input.
The decoder starts from ``decoder_start_id`` (= pad, the T5 convention) and targets are the
``num_levels`` ID tokens followed by ``eos``.  Nothing else in the package computes offsets.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    codebook_sizes: tuple[int, ...] = (256, 256, 256)
    collision_size: int = 256
    num_user_tokens: int = 2000
    special_tokens: tuple[str, ...] = ("pad", "eos")

    def __post_init__(self):
        object.__setattr__(self, "codebook_sizes", tuple(int(s) for s in self.codebook_sizes))
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))
        if not self.codebook_sizes or any(s < 1 for s in self.codebook_sizes):
            raise ValueError(f"codebook_sizes must be a non-empty tuple of positive ints, got {self.codebook_sizes}")
        if self.collision_size < 1:
            raise ValueError(f"collision_size must be >= 1, got {self.collision_size}")
        if self.num_user_tokens < 1:
            raise ValueError(f"num_user_tokens must be >= 1, got {self.num_user_tokens}")
        if self.special_tokens[:2] != ("pad", "eos"):
            raise ValueError(f"special_tokens must start with ('pad', 'eos'), got {self.special_tokens}")

    # ---- sizes and offsets -------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def decoder_start_id(self) -> int:
        return self.pad_id

    @property
    def num_levels(self) -> int:
        """Tokens per semantic ID: the RQ-VAE levels plus the collision level."""
        return len(self.codebook_sizes) + 1

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return self.codebook_sizes + (self.collision_size,)

    def level_offset(self, level: int) -> int:
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must be in [0, {self.num_levels}), got {level}")
        return len(self.special_tokens) + sum(self.level_sizes[:level])

    @property
    def user_offset(self) -> int:
        return len(self.special_tokens) + sum(self.level_sizes)

    @property
    def vocab_size(self) -> int:
        return self.user_offset + self.num_user_tokens

    # ---- conversions -------------------------------------------------------------------------
    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: int64 (..., num_levels) semantic IDs -> int64 (..., num_levels) token ids."""
        codes = torch.as_tensor(codes)
        if codes.shape[-1:] != (self.num_levels,):
            raise ValueError(f"codes must have last dim {self.num_levels}, got shape {tuple(codes.shape)}")
        sizes = torch.tensor(self.level_sizes, dtype=torch.long)
        if codes.numel() and (bool((codes < 0).any()) or bool((codes >= sizes).any())):
            raise ValueError(f"codes out of range for level sizes {self.level_sizes}")
        offsets = torch.tensor([self.level_offset(l) for l in range(self.num_levels)], dtype=torch.long)
        return codes.long() + offsets

    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 (..., num_levels) -> int64 (..., num_levels) codes; raises if a token is
        not in its level's block."""
        tokens = torch.as_tensor(tokens).long()
        if tokens.shape[-1:] != (self.num_levels,):
            raise ValueError(f"tokens must have last dim {self.num_levels}, got shape {tuple(tokens.shape)}")
        offsets = torch.tensor([self.level_offset(l) for l in range(self.num_levels)], dtype=torch.long)
        sizes = torch.tensor(self.level_sizes, dtype=torch.long)
        codes = tokens - offsets
        if codes.numel() and (bool((codes < 0).any()) or bool((codes >= sizes).any())):
            raise ValueError("tokens are outside their level's block of the layout")
        return codes

    def user_token(self, user_id) -> int:
        """Hash a user id (int or str) into one of the ``num_user_tokens`` user tokens.

        A stable hash (blake2b of the id's text), so the bucket does not depend on the process,
        the platform or Python's hash seed."""
        h = hashlib.blake2b(str(user_id).encode(), digest_size=8).digest()
        return self.user_offset + int.from_bytes(h, "little") % self.num_user_tokens

    def user_tokens(self, user_ids) -> torch.Tensor:
        """user_ids: sequence of ints/strs -> int64 (len,) user token ids."""
        return torch.tensor([self.user_token(u) for u in user_ids], dtype=torch.long)

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        known = {"codebook_sizes", "collision_size", "num_user_tokens", "special_tokens"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TokenLayout fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)

    def check_compatible(self, other: "TokenLayout", what: str = "layout") -> None:
        if self != other:
            raise ValueError(f"{what} mismatch: {self.to_dict()} != {other.to_dict()}; "
                             "the model and the ID table must be built with the same TokenLayout")
