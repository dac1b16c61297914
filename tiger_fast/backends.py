"""Backend choice for the ops that dispatch (``quantize``, ``generate``): the one rule and the one
compiled-extension loader.

The rule (docs/contracts.md, "Backends"):

* every backend of an op returns the same answer, so the choice only changes speed;
* ``"auto"`` takes the first usable backend in the op's preference order, quietly; the reasons the
  others were skipped come back with the choice (``explain_backend`` / ``backend_status``);
* an explicitly named backend that cannot run raises ``RuntimeError`` with the reason;
* a name the op does not know raises ``ValueError`` listing the known ones.

An op describes its backends by one function ``why_not(name) -> ""`` (usable here) or the reason
it is not.
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

__all__ = ["load_extension", "choose_backend"]


def load_extension(stem: str):
    """Import the compiled extension ``tiger_fast._<stem>_ext`` -> ``(module, "")``, or
    ``(None, reason)`` when it is not built (the reason says how to build it)."""
    name = f"tiger_fast._{stem}_ext"
    try:
        return importlib.import_module(name), ""
    except ImportError as exc:  # not built
        return None, (f"C++ extension {name} is not built ({exc}); build it with "
                      f"`TIGER_FAST_STEMS={stem} python setup.py build_ext --inplace`")


def choose_backend(backend, known: Sequence[str], why_not: Callable[[str], str],
                   preference: Sequence[str]) -> tuple[str, str]:
    """Apply the rule: ``backend`` ("auto" or a name in ``known``) -> ``(name that runs, why)``.

    why_not: ``name -> ""`` if that backend can run here, else the reason it cannot (called only
    for the names this choice needs, so probing stays lazy); preference: the order "auto" tries
    (its last entry is the always-usable reference).
    """
    if not isinstance(backend, str) or backend not in known:
        raise ValueError(f"backend: expected one of {tuple(known)}, got {backend!r}")
    if backend != "auto":
        reason = why_not(backend)
        if reason:
            raise RuntimeError(f"backend={backend!r} cannot run: {reason}")
        return backend, "requested"
    skipped = []
    for name in preference:
        reason = why_not(name)
        if not reason:
            return name, "; ".join(skipped + [f"{name} usable"])
        skipped.append(f"{name}: {reason}")
    raise RuntimeError("no backend can run: " + "; ".join(skipped))
