"""Argument checks shared by the modules: one test and one wording for each kind of bad number.

``bool`` is rejected wherever an int is expected (``True`` is an ``int`` in Python, never a count).
"""
from __future__ import annotations

import numpy as np

__all__ = ["is_int", "check_int", "config_from_dict"]


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(value, name: str, lo: int = 1, *, none_ok: bool = False) -> int | None:
    """``value`` as a Python int if it is an integer (not bool) >= ``lo``; otherwise ValueError
    naming ``name``: "must be a positive int" (lo = 1), "a non-negative int" (lo = 0), "an int >=
    lo" otherwise.  ``none_ok``: None passes through (the message then says "or None")."""
    if value is None and none_ok:
        return None
    if not is_int(value) or value < lo:
        what = {1: "a positive int", 0: "a non-negative int"}.get(lo, f"an int >= {lo}")
        raise ValueError(f"{name} must be {what}{' or None' if none_ok else ''}, got {value!r}")
    return int(value)


def config_from_dict(cls, d):
    """``cls(**d)`` for a dataclass config read from disk; TypeError when ``d`` is not a dict,
    ValueError naming the unknown fields (a file from another version or another model)."""
    from dataclasses import fields

    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**d)
