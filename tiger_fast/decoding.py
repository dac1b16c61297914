"""The decoding adapter: how a model is driven one decoder step at a time, and how a batch of
requests becomes encoder input.  Used by generate, evaluate, coldstart and the benchmarks.

* :func:`is_hf_t5` / :func:`is_tiger_t5` / :func:`check_model`: the one place that decides which
  kind of model it is (tiger_fast.t5.T5 or Hugging Face T5ForConditionalGeneration).
* :class:`T5Stepper`, :class:`HFStepper`, :func:`make_stepper`: encoder once, then
  ``stepper(parent, tokens) -> logits (R, B, V)`` with the KV cache following the beams.
* :func:`encoder_batch`: R histories (+ user ids) -> padded ``input_ids`` / ``attention_mask``.

The selection rule (scores, ties) is not here: it lives in tiger_fast/reference/generate.py.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from .checks import check_int
from .sequences import collate, encoder_input

__all__ = ["is_hf_t5", "is_tiger_t5", "check_model", "model_device", "T5Stepper", "HFStepper", "make_stepper",
           "encoder_batch"]


# ---- which model ---------------------------------------------------------------------------------
def is_hf_t5(model) -> bool:
    """A Hugging Face encoder-decoder (``T5ForConditionalGeneration``)."""
    return hasattr(model, "get_encoder") and hasattr(model, "config") and getattr(model.config, "is_encoder_decoder", False)


def is_tiger_t5(model) -> bool:
    """A :class:`tiger_fast.t5.T5` or a model with its decoding interface."""
    return all(callable(getattr(model, a, None)) for a in ("encode", "init_cache", "decode_step", "reorder_cache"))


def check_model(model) -> None:
    """TypeError unless ``model`` is one of the two kinds a stepper adapts."""
    if not (is_hf_t5(model) or is_tiger_t5(model)):
        raise TypeError(f"model must be a tiger_fast.t5.T5 (encode/init_cache/decode_step/reorder_cache) or a "
                        f"Hugging Face T5ForConditionalGeneration, got {type(model).__name__}")


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


# ---- steppers ------------------------------------------------------------------------------------
class T5Stepper:
    """tiger_fast.t5.T5: encode once, then decode_step with its T5Cache; beams move with
    ``select_beams`` (cross-attention K/V stay one copy per request).  Duck-typed models without
    ``select_beams`` get ``reorder_cache`` with the equivalent row index.

    Call ``stepper(parent, tokens)``: parent None (first step) or int64 (R, B) the beam each new
    beam extends (index into the previous step's B_prev beams of its request); tokens int64 (R, B)
    the tokens to feed -> logits (R, B, V)."""

    def __init__(self, model, input_ids, mask, num_levels):
        self.model = model
        enc = model.encode(input_ids, mask)
        from .t5 import T5  # duck-typed models may not take max_length (it only pre-sizes buffers)

        self.cache = (model.init_cache(enc, mask, max_length=num_levels + 1) if isinstance(model, T5)
                      else model.init_cache(enc, mask))
        self.device = input_ids.device
        self.cur_b = 1  # beams per request held by the cache

    def __call__(self, parent, tokens):
        R, B = tokens.shape
        tokens = tokens.to(self.device)
        if parent is not None:
            parent = parent.to(self.device)
            if hasattr(self.model, "select_beams"):
                self.cache = self.model.select_beams(self.cache, parent, reuse=True)
            else:
                idx = (torch.arange(R, device=parent.device).unsqueeze(1) * self.cur_b
                       + parent.clamp(min=0)).reshape(-1)
                self.cache = self.model.reorder_cache(self.cache, idx)
        self.cur_b = B
        logits = self.model.decode_step(tokens.reshape(-1), self.cache)
        return logits.view(R, B, -1)


class HFStepper:
    """HF T5ForConditionalGeneration: the encoder once, then the model with the KV cache.

    Same call contract as :class:`T5Stepper`."""

    def __init__(self, model, input_ids, mask):
        self.model = model
        self.enc = model.get_encoder()(input_ids=input_ids, attention_mask=mask.long(), return_dict=True)
        self.enc_h = self.enc.last_hidden_state
        self.mask = mask.long()
        self.cache = None
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.device = input_ids.device
        self.cur_b = 1
        self.expanded = None  # (B, encoder states (R*B, S, d), mask (R*B, S)) for the current beam width

    def __call__(self, parent, tokens):
        from transformers.modeling_outputs import BaseModelOutput

        R, B = tokens.shape
        tokens = tokens.to(self.device)
        if parent is not None:
            parent = parent.to(self.device)
            prev_b = self.cur_b
            idx = (torch.arange(R, device=parent.device).unsqueeze(1) * prev_b + parent.clamp(min=0)).reshape(-1)
            if prev_b == B and hasattr(self.cache, "self_attention_cache"):
                self.cache.self_attention_cache.reorder_cache(idx)  # cross K/V: as in T5Stepper
            else:
                self.cache.reorder_cache(idx)
        self.cur_b = B
        if self.expanded is None or self.expanded[0] != B:  # every row's encoder output, once per beam width
            rows = torch.arange(R, device=tokens.device).repeat_interleave(B)
            self.expanded = (B, self.enc_h.index_select(0, rows), self.mask.index_select(0, rows))
        enc = BaseModelOutput(last_hidden_state=self.expanded[1])
        out = self.model(encoder_outputs=enc, attention_mask=self.expanded[2],
                         decoder_input_ids=tokens.reshape(-1, 1), use_cache=True,
                         **{self.cache_kw: self.cache})
        self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1, :].view(R, B, -1)


def make_stepper(model, input_ids, mask, num_levels: int):
    """The stepper for ``model`` (HF T5 or tiger_fast T5): runs the encoder on ``input_ids`` int64
    (R, S) / ``mask`` bool (R, S) once; KV buffers sized for ``num_levels`` + 1 decoder steps."""
    check_model(model)
    return HFStepper(model, input_ids, mask) if is_hf_t5(model) else T5Stepper(model, input_ids, mask, num_levels)


# ---- encoder batches -----------------------------------------------------------------------------
def _history_tokens(id_table, history, max_items):
    """The num_levels tokens of each of the last <= max_items items, oldest first (no user token)."""
    return id_table.tokens_of(torch.as_tensor(history[-max_items:], dtype=torch.int64)).reshape(-1).tolist()


def encoder_batch(layout, id_table, histories, user_ids, max_history: int = 20, device=None,
                  fixed_length: bool = False):
    """Right-padded encoder inputs of a batch of requests (pad_id, attention mask).

    histories: R non-empty 1-D sequences of external item ids (oldest first; every id must be in
    ``id_table``); user_ids: None (no user token) or R user ids (int/str, hashed to the layout's
    user tokens); the last ``max_history`` items are used.  Returns input_ids int64 (R, S) and
    attention_mask bool (R, S) on ``device`` (default CPU), S = the longest input, or with
    ``fixed_length`` the longest any request can be (``max_history * num_levels``, + 1 with user
    tokens): then a request's encoder input does not depend on the other requests of the batch
    (``generate(batch_invariant=True)``).  Bad input raises ValueError naming the argument.
    """
    if isinstance(histories, torch.Tensor) and histories.dim() == 2:
        histories = list(histories)
    if not isinstance(histories, (list, tuple)) or len(histories) == 0:
        raise ValueError("histories must be a non-empty list of item-id sequences (one per request)")
    R = len(histories)
    if user_ids is not None and len(user_ids) != R:
        raise ValueError(f"user_ids has {len(user_ids)} entries but histories has {R}; give one per request")
    max_history = check_int(max_history, "max_history")
    hists = []
    for i, h in enumerate(histories):
        h = torch.as_tensor(np.asarray(h.cpu() if isinstance(h, torch.Tensor) else h))
        if h.dim() != 1 or (h.numel() and (h.dtype.is_floating_point or h.dtype == torch.bool)):
            raise ValueError(f"histories[{i}] must be a 1-D sequence of integer item ids")
        if h.numel() == 0:
            raise ValueError(f"histories[{i}] is empty; every request needs at least one past item "
                             "(serve users without history with a popularity fallback)")
        hists.append(h.long())  # all checked below; the encoder input keeps the last max_history
    # One membership query for the whole batch (the table's sorted-id search, O(M log N)).
    allh = torch.cat(hists)
    known = id_table.contains(allh) if hasattr(id_table, "contains") else torch.isin(allh, id_table.item_ids)
    if not bool(known.all()):
        lens = torch.tensor([h.numel() for h in hists])
        first = int((~known).nonzero()[0, 0])
        i = int((torch.cumsum(lens, 0) <= first).sum())
        raise ValueError(f"histories[{i}] contains item ids not in the id_table, e.g. {allh[~known][:5].tolist()} "
                         "(add new items with IdTable.add_items first)")
    seqs = []
    for i, h in enumerate(hists):
        u = None if user_ids is None else user_ids[i]
        if u is not None:
            seqs.append(encoder_input(layout, id_table, u, h, max_items=max_history))
        else:
            seqs.append(_history_tokens(id_table, h.tolist(), max_history))
    ids, mask = collate(seqs, pad_id=layout.pad_id)
    if fixed_length:
        extra = max_history * layout.num_levels + (user_ids is not None) - ids.shape[1]
        if extra > 0:  # masked pad columns: the same width for every batch
            ids = torch.cat([ids, torch.full((R, extra), layout.pad_id, dtype=ids.dtype)], dim=1)
            mask = torch.cat([mask, torch.zeros((R, extra), dtype=mask.dtype)], dim=1)
    if device is None:
        return ids, mask
    return ids.to(device), mask.to(device)
