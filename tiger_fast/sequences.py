"""User histories -> retriever examples (TIGER §3.2 / §4): leave-one-out splits and tokenisation.

Encoder input of one example (``encoder_input``)::

    [user token] + tokens(item_1) + ... + tokens(item_k)      k = min(len(history), max_items)

with the last ``max_items`` (default 20, the paper's) items of the history, oldest first, each item
contributing its ``layout.num_levels`` semantic-ID tokens (``IdTable.tokens_of``).  The target is
the next item's ID tokens followed by ``eos`` (``target_tokens``).  Batches are right-padded with
``layout.pad_id`` and carry a bool mask (True = real token).

Splits (``leave_one_out``), per user sequence ``s`` of length n (chronological, internal item
indices as in ``tiger_fast.data.Dataset.sequences``):

* test:       history ``s[:n-1]``, target ``s[n-1]`` (the last item);
* validation: history ``s[:n-2]``, target ``s[n-2]``;
* train:      one example per prefix of ``s[:n-2]`` - history ``s[:e]``, target ``s[e]`` for
  e = 1 .. n-3 - the sliding window used by TIGER/P5-style reproductions.  Validation and test
  targets are never training targets.
* users with fewer than 3 items cannot give all three splits.  ``short_users="train"`` (default)
  puts their transitions into train (n = 2: one example ``s[0] -> s[1]``); ``"drop"`` drops them.
  Users with 0 or 1 items have no transition and are always dropped.  Both are counted in
  ``LeaveOneOut.dropped_users``.

Examples reference the dataset (user row + end position) rather than copying histories, so a
split of millions of examples stays two int64 arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import check_int
from .layout import TokenLayout

__all__ = ["encoder_input", "target_tokens", "collate", "Split", "LeaveOneOut", "leave_one_out",
           "Examples", "tokenize_split"]


# ------------------------------------------------------------------------------------------------
# one example
# ------------------------------------------------------------------------------------------------
def _check_table(layout: TokenLayout, id_table) -> None:
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if not hasattr(id_table, "tokens_of"):
        raise TypeError(f"id_table must be a tiger_fast.ids.IdTable, got {type(id_table).__name__}")
    table_layout = getattr(id_table, "layout", None)
    if isinstance(table_layout, TokenLayout):
        layout.check_compatible(table_layout, "layout vs id_table.layout")


def _check_max_items(max_items) -> int:
    return check_int(max_items, "max_items")


def _item_array(item_ids, name: str) -> np.ndarray:
    if isinstance(item_ids, torch.Tensor):
        item_ids = item_ids.detach().cpu().numpy()
    arr = np.asarray(item_ids)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of item ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer item ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _tokens_of(id_table, item_ids: np.ndarray, name: str) -> np.ndarray:
    """item_ids int64 (M,) -> int64 (M, L) tokens; unknown ids -> ValueError naming ``name``."""
    try:
        return np.asarray(id_table.tokens_of(torch.from_numpy(np.ascontiguousarray(item_ids))), dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"{name}: {e} (every item must have a semantic ID in the IdTable; "
                         "add new items with IdTable.add_items)") from e


def encoder_input(layout: TokenLayout, id_table, user_id, history_item_ids, max_items: int = 20) -> list[int]:
    """One encoder input: [layout.user_token(user_id)] + the ID tokens of the last ``max_items``
    items of ``history_item_ids`` (external item ids, oldest first) -> list of
    1 + num_levels * min(len(history), max_items) token ids."""
    _check_table(layout, id_table)
    max_items = _check_max_items(max_items)
    hist = _item_array(history_item_ids, "history_item_ids")
    if hist.size == 0:
        raise ValueError("history_item_ids is empty; a user needs at least one past item "
                         "(serve users without history with a popularity fallback)")
    toks = _tokens_of(id_table, hist[-max_items:], "history_item_ids")
    return [layout.user_token(user_id)] + toks.reshape(-1).tolist()


def target_tokens(layout: TokenLayout, id_table, item_ids) -> torch.Tensor:
    """item_ids int64 (M,) external ids -> int64 (M, num_levels + 1): ID tokens then eos."""
    _check_table(layout, id_table)
    ids = _item_array(item_ids, "item_ids")
    toks = _tokens_of(id_table, ids, "item_ids").reshape(ids.shape[0], layout.num_levels)
    eos = np.full((ids.shape[0], 1), layout.eos_id, dtype=np.int64)
    return torch.from_numpy(np.concatenate([toks, eos], axis=1))


def collate(inputs: list, targets: list | None = None, *, pad_id: int = 0):
    """Right-pad token lists into a batch.

    inputs: list of B non-empty token lists -> input_ids int64 (B, S_max), attention_mask bool
    (B, S_max); with ``targets`` (list of B equal-length token lists) also labels int64 (B, T)."""
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ValueError("inputs must be a non-empty list of token lists")
    lens = [len(x) for x in inputs]
    if min(lens) == 0:
        raise ValueError(f"inputs[{lens.index(0)}] is empty; every example needs at least one token")
    ids = torch.full((len(inputs), max(lens)), int(pad_id), dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, x in enumerate(inputs):
        ids[i, :lens[i]] = torch.as_tensor(x, dtype=torch.long)
        mask[i, :lens[i]] = True
    if targets is None:
        return ids, mask
    if len(targets) != len(inputs):
        raise ValueError(f"targets has {len(targets)} rows but inputs has {len(inputs)}")
    tl = {len(t) for t in targets}
    if len(tl) != 1 or 0 in tl:
        raise ValueError(f"targets must all have the same non-zero length, got lengths {sorted(tl)}")
    return ids, mask, torch.as_tensor([list(t) for t in targets], dtype=torch.long)


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Examples of one split, as references into a dataset.

    user_index int64 (E,): row of the user in ``dataset.user_ids`` / ``dataset.sequences``;
    end int64 (E,): the example's history is ``sequences[u][:end]`` and its target ``sequences[u][end]``."""

    name: str
    user_index: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return int(self.user_index.shape[0])

    def user_ids(self, dataset) -> np.ndarray:
        """(E,) external user ids."""
        return np.asarray(dataset.user_ids)[self.user_index]

    def targets(self, dataset) -> np.ndarray:
        """int64 (E,) external item id of each target."""
        seqs = dataset.sequences
        internal = np.fromiter((seqs[u][e] for u, e in zip(self.user_index, self.end)),
                               dtype=np.int64, count=len(self))
        return np.asarray(dataset.item_ids, dtype=np.int64)[internal]

    def histories(self, dataset, max_items: int | None = None) -> list[np.ndarray]:
        """list of E int64 arrays: external item ids of each history, oldest first (the last
        ``max_items`` only, when given)."""
        ids = np.asarray(dataset.item_ids, dtype=np.int64)
        seqs = dataset.sequences
        lo = (lambda e: 0) if max_items is None else (lambda e: max(0, e - _check_max_items(max_items)))
        return [ids[np.asarray(seqs[u][lo(e):e], dtype=np.int64)] for u, e in zip(self.user_index, self.end)]


@dataclass
class LeaveOneOut:
    """train / valid / test splits of one dataset; ``dropped_users`` int64: user rows without
    examples (see the module docstring for the policy)."""

    train: Split
    valid: Split
    test: Split
    dropped_users: np.ndarray

    def summary(self) -> dict:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test),
                "dropped_users": int(self.dropped_users.size)}


def _check_dataset(dataset) -> None:
    for attr in ("item_ids", "user_ids", "sequences"):
        if not hasattr(dataset, attr):
            raise TypeError(f"dataset must be a tiger_fast.data.Dataset (missing .{attr}), "
                            f"got {type(dataset).__name__}")
    if len(dataset.sequences) != len(dataset.user_ids):
        raise ValueError(f"dataset has {len(dataset.sequences)} sequences but {len(dataset.user_ids)} user_ids")


def leave_one_out(dataset, *, short_users: str = "train") -> LeaveOneOut:
    """Leave-one-out splits of ``dataset`` (see the module docstring).

    short_users: "train" (users with 2 items give one training example) or "drop"."""
    _check_dataset(dataset)
    if short_users not in ("train", "drop"):
        raise ValueError(f"short_users must be 'train' or 'drop', got {short_users!r}")
    n_items = len(dataset.item_ids)
    lengths = np.empty(len(dataset.sequences), dtype=np.int64)
    for u, s in enumerate(dataset.sequences):
        s = np.asarray(s)
        if s.ndim != 1 or (s.size and not np.issubdtype(s.dtype, np.integer)):
            raise ValueError(f"dataset.sequences[{u}] must be a 1-D int array of internal item indices")
        if s.size and (int(s.min()) < 0 or int(s.max()) >= n_items):
            raise ValueError(f"dataset.sequences[{u}] has item indices outside [0, {n_items}) "
                             "(sequences hold internal indices into dataset.item_ids)")
        lengths[u] = s.size
    users = np.arange(lengths.size, dtype=np.int64)
    full = lengths >= 3
    # train: ends 1 .. n-3 for full users; 1 .. n-1 (i.e. n == 2: end 1) for short ones kept in train
    n_train = np.where(full, np.maximum(lengths - 3, 0), 0)
    if short_users == "train":
        n_train = np.where(lengths == 2, 1, n_train)
    tr_user = np.repeat(users, n_train)
    # end = 1 + rank within the user's block
    starts = np.cumsum(n_train) - n_train
    tr_end = np.arange(tr_user.size, dtype=np.int64) - np.repeat(starts, n_train) + 1
    fu = users[full]
    kept = full | ((lengths == 2) & (short_users == "train"))
    return LeaveOneOut(train=Split("train", tr_user, tr_end),
                       valid=Split("valid", fu, lengths[full] - 2),
                       test=Split("test", fu.copy(), lengths[full] - 1),
                       dropped_users=users[~kept])


# ------------------------------------------------------------------------------------------------
# tokenised examples
# ------------------------------------------------------------------------------------------------
@dataclass
class Examples:
    """Tokenised examples, ready to batch by row indexing.

    input_ids int64 (E, S) right-padded with pad; attention_mask bool (E, S); labels int64
    (E, num_levels + 1) = target ID tokens + eos; target_item_ids int64 (E,) external ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    target_item_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, index: torch.Tensor):
        """index int64 (B,) -> (input_ids (B, S'), attention_mask (B, S'), labels (B, T)) with the
        all-padding columns on the right trimmed (S' = longest input in the batch)."""
        ids, mask = self.input_ids[index], self.attention_mask[index]
        s = int(mask.sum(1).max())
        return ids[:, :s], mask[:, :s], self.labels[index]


def tokenize_split(split: Split, dataset, layout: TokenLayout, id_table, max_items: int = 20) -> Examples:
    """Vectorised `encoder_input` / `target_tokens` for every example of ``split``."""
    _check_dataset(dataset)
    _check_table(layout, id_table)
    max_items = _check_max_items(max_items)
    if not isinstance(split, Split):
        raise TypeError(f"split must be a Split from leave_one_out, got {type(split).__name__}")
    L = layout.num_levels
    E = len(split)
    if E == 0:
        raise ValueError(f"split {split.name!r} has no examples")
    if bool((split.end < 1).any()):
        raise ValueError(f"split {split.name!r} has examples with an empty history (end < 1)")
    seqs = dataset.sequences
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    if bool((split.end >= lens[split.user_index]).any()):
        raise ValueError(f"split {split.name!r} does not belong to this dataset (end past a sequence)")
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if lens.sum() else np.zeros(0, np.int64)
    offs = np.cumsum(lens) - lens
    # tokens of every item that occurs (only those need a semantic ID)
    used = np.unique(flat)
    item_ids = np.asarray(dataset.item_ids, dtype=np.int64)
    used_tok = _tokens_of(id_table, item_ids[used], "dataset items").reshape(-1, L)
    tok_of_internal = np.zeros((len(item_ids), L), dtype=np.int64)
    tok_of_internal[used] = used_tok
    k = np.minimum(split.end, max_items)                       # items in each history
    kmax = int(k.max())
    start = offs[split.user_index] + split.end - k             # flat index of the oldest kept item
    j = np.arange(kmax)
    valid = j[None, :] < k[:, None]                            # (E, kmax)
    items = flat[np.where(valid, start[:, None] + j[None, :], 0)]
    toks = tok_of_internal[items]                              # (E, kmax, L)
    toks[~valid] = layout.pad_id
    user_ids = np.asarray(dataset.user_ids)
    utok = np.array([layout.user_token(u) for u in user_ids], dtype=np.int64)[split.user_index]
    input_ids = np.concatenate([utok[:, None], toks.reshape(E, kmax * L)], axis=1)
    mask = np.concatenate([np.ones((E, 1), bool), np.repeat(valid, L, axis=1)], axis=1)
    tgt_internal = flat[offs[split.user_index] + split.end]
    labels = np.concatenate([tok_of_internal[tgt_internal], np.full((E, 1), layout.eos_id, np.int64)], axis=1)
    return Examples(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                    labels=torch.from_numpy(labels), target_item_ids=torch.from_numpy(item_ids[tgt_internal]))
