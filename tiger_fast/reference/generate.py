"""Reference trie-constrained decoding: the specification of the C++/CUDA selection kernels.

Final signatures (the C++/CUDA backend ``tiger_fast._generate_ext`` implements the same semantics;
R rows, B_in beams in, B_out beams out, S = S_l codes of level l):

    beam_select_step(logprobs, beam_scores, beam_nodes, children, num_out)
        logprobs    float32 (R, B_in, S)  log_softmax over the FULL vocab, then the level's block
        beam_scores float32 (R, B_in)     running sums
        beam_nodes  int64   (R, B_in)     trie node at depth l, -1 = absent beam
        children    int32   (n_nodes_l, S)
        num_out     int                   B_out >= 1
      -> parent int64 (R, B_out), token int64 (R, B_out), score float32 (R, B_out),
         node int64 (R, B_out)            (node = children[beam_nodes[parent], token]; at the last
                                           level this is the item row)
         missing slots: parent = token = node = -1, score = -inf

    sample_select_step(logprobs, tempered, beam_scores, beam_phi, beam_keys, beam_nodes,
                       children, num_out, seed, step, row_keys, *, gumbel=None)
        tempered    float32 (R, B_in, S)  log_softmax(logits / T_l) over the full vocab, sliced to the
                                          level, then renormalised over each beam's valid codes
                                          (renormalize_over_valid; the driver does this, the step
                                          only adds it)
        beam_phi    float64 (R, B_in)     running sums of float64(tempered) = log q(prefix)
        beam_keys   float64 (R, B_in)     perturbed keys (0 for the root)
        seed int in [0, 2^64), step = level l, row_keys int64 (R,)
        gumbel      float64 (R, B_in, S)  optional explicit noise; default
                                          tiger_fast.philox.gumbel_noise(seed, step, row_keys, B_in, S)
                                          (Philox counter (e = b * S + t, step, key lo, key hi))
      -> parent, token, score (float32, untempered: beam_scores[b] + logprobs[b, t]), node,
         phi float64 (R, B_out), key float64 (R, B_out)   (missing: phi = key = -inf)

    eos_rerank(scores, eos_logprobs, valid, *, resort=True)
        scores float32 (R, B), eos_logprobs float32 (R, B) (log p(eos | full ID), full-vocab
        log_softmax), valid bool (R, B)
      -> order int64 (R, B) (beam index per output slot), new_scores float32 (R, B) in that order

Refinements of the plain contract (docs/contracts.md, "Sampling"): the sampling step's
``tempered`` input is renormalised over each beam's valid codes before the step (the kernels are
unchanged: they add what they are given), because Kool's conditioning on masked-but-not-renormalised
log-probs skews every draw after the first (measured: ~30 % off on the second draw); the sampling
step takes (seed, step, row_keys) and draws the Philox noise itself (``gumbel=`` overrides);
``eos_rerank`` is the shared end-token step.

Deterministic selection (docs/contracts.md): candidates are (b, t) with beam_nodes[b] >= 0 and
children[node, t] >= 0; score = beam_scores[b] + logprobs[b, t], ONE float32 add; the best B_out by
score descending, ties by flat index b * S + t ascending.  A valid candidate whose score is -inf is
still a valid ID (ranked after all finite ones); a masked candidate is never produced.  NaN scores
are an error (the driver rejects NaN logits first).

Sampling (Kool, van Hoof, Welling, "Stochastic Beams and Where to Find Them", ICML 2019): each
candidate's perturbed log-prob G' = phi_c + gumbel[b, t] with phi_c = beam_phi[b] +
float64(tempered_logprobs[b, t]); Z_b = max of G' over beam b's valid candidates; the key is G'
conditioned on max = the parent's key T_b (truncated Gumbel), in the numerically stable form of the
paper's appendix:
    v   = T_b - G' + log1mexp(G' - Z_b),      log1mexp(a) = log(1 - exp(a)) (a <= 0)
    key = T_b - max(v, 0) - log1p(exp(-|v|))
with key = -inf when G' = -inf or T_b = -inf (also when every valid child of the beam is -inf).
Top B_out by key descending, ties by flat index (keys compare numerically: -0.0 == +0.0).
Because ``tempered`` is renormalised over the valid codes (see renormalize_over_valid for why),
the keys of the last level are Gumbel(log q(y)) for q(y) = prod_l softmax(logits_l / T_l) over the
valid codes of the prefix, and the top-B keys, in order, are an exact sample without replacement
from q (Plackett-Luce order).
log1mexp(a) = log(-expm1(a)) for a > -ln 2, else log1p(-exp(a)).  All float64.

Bit-exactness: the Philox uint32 stream is bit-identical across backends; the float64 transforms
(log, expm1, log1p, exp) come from different math libraries (SLEEF/glibc/CUDA libdevice, <= 1-2 ulp
apart), so perturbed keys may differ in the last bits and the selection can only differ when two
keys are within a few ulp (probability ~1e-13 per pair).  The deterministic path is bit-exact.

End token: with the T5 convention (targets end with eos) ``eos_rerank`` adds log p(eos | ID) to
each finished beam (one float32 add) and, for beam search, re-sorts (desc, ties by beam index,
invalid beams last).  For sampling the keys are unchanged (eos is the only valid continuation, so
the truncated Gumbel equals the parent key): scores get the eos term but the order stays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..philox import gumbel_noise
from ..checks import check_int

_LN2 = math.log(2.0)


# ---- one selection step ----------------------------------------------------------------------------
def _candidates(beam_nodes: torch.Tensor, children: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> child int64 (R, B_in, S) (child node/row or -1) and valid bool (R, B_in, S)."""
    if children.dim() != 2:
        raise ValueError(f"children must be int32 (n_nodes, S), got shape {tuple(children.shape)}")
    n = children.shape[0]
    if beam_nodes.numel() and (bool((beam_nodes < -1).any()) or bool((beam_nodes >= n).any())):
        raise ValueError(f"beam_nodes must be -1 or in [0, {n})")
    child = children.to(beam_nodes.device).long()[beam_nodes.clamp(min=0)]
    child = torch.where((beam_nodes >= 0).unsqueeze(-1), child, torch.full_like(child, -1))
    return child, child >= 0


def top_by_key(key: torch.Tensor, valid: torch.Tensor, num_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one selection rule of every decode (beam search, sampling, the end step, and the
    unconstrained search of tiger_fast.evaluate): key (R, C) float, valid bool (R, C) -> flat index
    int64 (R, num_out) of the best valid candidates by key descending, ties by flat index ascending
    (-1 where fewer exist), and ok bool (R, num_out)."""
    R, C = key.shape
    key = torch.where(valid, key, torch.full_like(key, -math.inf))
    # Stable sorts: by key descending keeps equal keys in flat-index order; then valid first.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    v = torch.gather(valid, 1, order)
    order = torch.gather(order, 1, torch.sort((~v).to(torch.int8), dim=1, stable=True).indices)
    k = min(num_out, C)
    idx = order[:, :k]
    ok = torch.gather(valid, 1, idx)
    if k < num_out:
        idx = torch.cat([idx, idx.new_zeros(R, num_out - k)], 1)
        ok = torch.cat([ok, ok.new_zeros(R, num_out - k)], 1)
    return torch.where(ok, idx, torch.full_like(idx, -1)), ok


def _check_step_inputs(logprobs, beam_scores, beam_nodes, children, num_out):
    if logprobs.dtype != torch.float32 or logprobs.dim() != 3:
        raise TypeError(f"logprobs must be float32 (R, B_in, S), got {logprobs.dtype} {tuple(logprobs.shape)}")
    R, B, S = logprobs.shape
    if beam_scores.dtype != torch.float32 or tuple(beam_scores.shape) != (R, B):
        raise TypeError(f"beam_scores must be float32 {(R, B)}, got {beam_scores.dtype} {tuple(beam_scores.shape)}")
    if beam_nodes.dtype != torch.int64 or tuple(beam_nodes.shape) != (R, B):
        raise TypeError(f"beam_nodes must be int64 {(R, B)}, got {beam_nodes.dtype} {tuple(beam_nodes.shape)}")
    if children.dtype != torch.int32 or children.dim() != 2 or children.shape[1] != S:
        raise TypeError(f"children must be int32 (n_nodes, {S}), got {children.dtype} {tuple(children.shape)}")
    num_out = check_int(num_out, "num_out")
    if torch.isnan(logprobs).any() or torch.isnan(beam_scores).any():
        raise ValueError("logprobs/beam_scores contain NaN (the model produced NaN/+inf logits)")


def beam_select_step(logprobs: torch.Tensor, beam_scores: torch.Tensor, beam_nodes: torch.Tensor,
                     children: torch.Tensor, num_out: int):
    """One level of deterministic trie-constrained beam search (see the module docstring).

    Returns (parent int64 (R, B_out), token int64 (R, B_out), score float32 (R, B_out),
    node int64 (R, B_out))."""
    _check_step_inputs(logprobs, beam_scores, beam_nodes, children, num_out)
    R, B, S = logprobs.shape
    child, valid = _candidates(beam_nodes, children)
    score = beam_scores.unsqueeze(-1) + logprobs  # one float32 add per candidate
    flat, ok = top_by_key(score.reshape(R, B * S), valid.reshape(R, B * S), num_out)
    safe = flat.clamp(min=0)
    parent = torch.where(ok, safe // S, -1)
    token = torch.where(ok, safe % S, -1)
    out_score = torch.where(ok, torch.gather(score.reshape(R, -1), 1, safe),
                            torch.full(flat.shape, -math.inf, dtype=torch.float32, device=flat.device))
    node = torch.where(ok, torch.gather(child.reshape(R, -1), 1, safe), -1)
    return parent, token, out_score, node


def renormalize_over_valid(tempered: torch.Tensor, beam_nodes: torch.Tensor, children: torch.Tensor) -> torch.Tensor:
    """Tempered log-probs renormalised over each beam's valid codes (the sampling model q).

    tempered float32 (R, B, S) = log_softmax(logits / T) over the full vocab, sliced to the level;
    beam_nodes int64 (R, B); children int32 (n_nodes, S) -> float32 (R, B, S) contiguous:
    tempered - logsumexp(tempered over the valid codes), -inf at invalid codes (and everywhere in a
    beam whose valid codes are all -inf or that is absent).

    Why: Kool's truncated-Gumbel conditioning is exact only when each parent's perturbed key has the
    distribution of the max of its children's, i.e. when the children's log-probs sum (in
    probability) to the parent's.  Masking without renormalising breaks that and skews every sample
    after the first; renormalising makes the top-k keys an exact sample without replacement from
    q(y) = prod_l softmax_T(valid codes of the prefix)."""
    _, valid = _candidates(beam_nodes, children)
    m = torch.where(valid, tempered, torch.full_like(tempered, -math.inf))
    lse = torch.logsumexp(m, dim=-1, keepdim=True)
    ok = valid & torch.isfinite(lse)
    return torch.where(ok, m - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)),
                       torch.full_like(m, -math.inf)).contiguous()


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0 (float64), accurate on both sides of -ln 2; -inf at a = 0."""
    return torch.where(a > -_LN2, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def truncated_gumbel_keys(perturbed: torch.Tensor, valid: torch.Tensor, parent_keys: torch.Tensor) -> torch.Tensor:
    """Kool et al. 2019 conditioning. perturbed float64 (R, B, S) = phi + Gumbel; valid bool
    (R, B, S); parent_keys float64 (R, B). -> keys float64 (R, B, S) whose max over each beam's valid
    candidates equals the parent key (invalid entries: -inf)."""
    neg_inf = torch.full_like(perturbed, -math.inf)
    z = torch.where(valid, perturbed, neg_inf).amax(-1, keepdim=True)
    T = parent_keys.unsqueeze(-1)
    # Where z = -inf (no finite candidate) or the candidate itself is -inf, the key is -inf; use
    # placeholder values there so no NaN is formed.
    finite = valid & (perturbed > -math.inf) & (T > -math.inf)
    gp = torch.where(finite, perturbed, torch.zeros_like(perturbed))
    zz = torch.where(finite, z.expand_as(perturbed), torch.zeros_like(perturbed))
    tt = torch.where(finite, T.expand_as(perturbed), torch.zeros_like(perturbed))
    v = tt - gp + log1mexp(gp - zz)
    key = tt - torch.clamp(v, min=0.0) - torch.log1p(torch.exp(-torch.abs(v)))
    return torch.where(finite, key, neg_inf)


def sample_select_step(logprobs: torch.Tensor, tempered: torch.Tensor, beam_scores: torch.Tensor,
                       beam_phi: torch.Tensor, beam_keys: torch.Tensor, beam_nodes: torch.Tensor,
                       children: torch.Tensor, num_out: int, seed: int, step: int,
                       row_keys: torch.Tensor, *, gumbel: torch.Tensor | None = None):
    """One level of Gumbel-top-k stochastic beam search (see the module docstring).

    The noise is ``tiger_fast.philox.gumbel_noise(seed, step, row_keys, B_in, S)`` unless
    ``gumbel`` float64 (R, B_in, S) is given (to compare backends on the same noise).
    Returns (parent int64, token int64, score float32 (untempered), node int64, phi float64,
    key float64), each (R, B_out)."""
    _check_step_inputs(logprobs, beam_scores, beam_nodes, children, num_out)
    R, B, S = logprobs.shape
    tempered_logprobs = tempered
    row_keys = torch.as_tensor(row_keys)
    if row_keys.dtype != torch.int64 or tuple(row_keys.shape) != (R,):
        raise TypeError(f"row_keys must be int64 ({R},), got {row_keys.dtype} {tuple(row_keys.shape)}")
    if gumbel is None:
        gumbel = gumbel_noise(seed, step, row_keys, B, S, device=logprobs.device)
    for name, t, dt, shp in (("tempered", tempered_logprobs, torch.float32, (R, B, S)),
                             ("beam_phi", beam_phi, torch.float64, (R, B)),
                             ("beam_keys", beam_keys, torch.float64, (R, B)),
                             ("gumbel", gumbel, torch.float64, (R, B, S))):
        if t.dtype != dt or tuple(t.shape) != shp:
            raise TypeError(f"{name} must be {dt} {shp}, got {t.dtype} {tuple(t.shape)}")
    if torch.isnan(tempered_logprobs).any():
        raise ValueError("tempered_logprobs contain NaN")
    child, valid = _candidates(beam_nodes, children)
    score = beam_scores.unsqueeze(-1) + logprobs
    phi = beam_phi.unsqueeze(-1) + tempered_logprobs.to(torch.float64)
    keys = truncated_gumbel_keys(phi + gumbel, valid, beam_keys)
    flat, ok = top_by_key(keys.reshape(R, B * S), valid.reshape(R, B * S), num_out)
    safe = flat.clamp(min=0)
    parent = torch.where(ok, safe // S, -1)
    token = torch.where(ok, safe % S, -1)
    ninf32 = torch.full(flat.shape, -math.inf, dtype=torch.float32, device=flat.device)
    ninf64 = torch.full(flat.shape, -math.inf, dtype=torch.float64, device=flat.device)
    out_score = torch.where(ok, torch.gather(score.reshape(R, -1), 1, safe), ninf32)
    node = torch.where(ok, torch.gather(child.reshape(R, -1), 1, safe), -1)
    out_phi = torch.where(ok, torch.gather(phi.reshape(R, -1), 1, safe), ninf64)
    out_key = torch.where(ok, torch.gather(keys.reshape(R, -1), 1, safe), ninf64)
    return parent, token, out_score, node, out_phi, out_key


def eos_rerank(scores: torch.Tensor, eos_logprobs: torch.Tensor, valid: torch.Tensor, *, resort: bool = True):
    """Final end-token step. scores float32 (R, B), eos_logprobs float32 (R, B), valid bool (R, B)
    -> (order int64 (R, B), new_scores float32 (R, B) listed in that order).

    new = scores + eos_logprobs (one float32 add) for valid beams, -inf for invalid ones.  With
    ``resort`` (beam search) the beams are re-sorted by new score descending, ties by beam index,
    invalid beams last; without it (sampling: keys unchanged) the order is kept."""
    new = torch.where(valid, scores + eos_logprobs, torch.full_like(scores, -math.inf))
    R, B = scores.shape
    if not resort:
        return torch.arange(B, device=scores.device).expand(R, B).clone(), new
    order, _ = top_by_key(new, valid, B)
    # Invalid beams (order -1) go last, in beam order.
    if not bool(valid.all()):
        rest = torch.sort((valid).to(torch.int8), dim=1, descending=True, stable=True).indices
        order = torch.where(order >= 0, order, rest)
    return order, torch.gather(new, 1, order)


# ---- the decoding loop -----------------------------------------------------------------------------
@dataclass
class DecodeOutput:
    """codes int64 (R, B, L) (-1 rows for missing beams); rows int64 (R, B) item rows (-1 missing);
    scores float32 (R, B) (-inf missing), best first."""
    codes: torch.Tensor
    rows: torch.Tensor
    scores: torch.Tensor


StepFn = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def temperatures(temperature, num_levels: int) -> list[float] | None:
    """The one check of a temperature argument: None (beam search) | one float > 0 | num_levels
    floats > 0 -> None | list of num_levels floats (TypeError / ValueError naming ``temperature``)."""
    if temperature is None:
        return None
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        temps = [float(temperature)] * num_levels
    else:
        try:
            if isinstance(temperature, (str, bytes)):
                raise TypeError
            temps = [float(t) for t in temperature]
        except (TypeError, ValueError):
            raise TypeError(f"temperature must be None, a float or a sequence of {num_levels} floats, "
                            f"got {type(temperature).__name__}") from None
        if len(temps) != num_levels:
            raise ValueError(f"temperature must have one value per level ({num_levels}), got {len(temps)}")
    if any(not (t > 0) or math.isinf(t) for t in temps):
        raise ValueError(f"temperatures must be finite and > 0, got {temps}")
    return temps


def constrained_decode(step_fn: StepFn, children: Sequence[torch.Tensor], layout, num_rows: int,
                       num_beams: int, *, use_eos: bool = True, temperature=None, seed: int = 0,
                       row_keys: torch.Tensor | None = None, beam_step=beam_select_step,
                       sample_step=sample_select_step) -> DecodeOutput:
    """Trie-constrained beam search / stochastic beam search over the ``layout.num_levels`` ID tokens.

    step_fn(parent, tokens) -> logits float (R, B, V): feeds ``tokens`` int64 (R, B) to the decoder
        after reordering its cache so that beam b of row r continues the previous step's beam
        ``parent[r, b]`` (int64 (R, B); entries -1 = absent beam, any cache row will do; ``parent`` is
        None on the first call, whose tokens are the decoder start token, B = 1).
    children: the trie tables (``Trie.tables(device)``), one per level.
    temperature: None (beam search) or a float / sequence of num_levels floats > 0 (sampling).
    row_keys: int64 (R,) per-row RNG keys (default: the row index 0..R-1).
    beam_step / sample_step: the selection backend, with the signatures of beam_select_step and
        sample_select_step (default: this reference).
    Returns DecodeOutput with B = num_beams beams per row, best first."""
    L = layout.num_levels
    if len(children) != L:
        raise ValueError(f"children must have {L} tables (one per level), got {len(children)}")
    temps = temperatures(temperature, L)
    R, B = int(num_rows), int(num_beams)
    if R < 1 or B < 1:
        raise ValueError(f"num_rows and num_beams must be >= 1, got {R}, {B}")
    dev = children[0].device
    if row_keys is None:
        row_keys = torch.arange(R, dtype=torch.int64)
    row_keys = torch.as_tensor(row_keys)
    if row_keys.dtype != torch.int64 or tuple(row_keys.shape) != (R,):
        raise TypeError(f"row_keys must be int64 ({R},), got {row_keys.dtype} {tuple(row_keys.shape)}")

    scores = torch.zeros(R, 1, dtype=torch.float32, device=dev)
    nodes = torch.zeros(R, 1, dtype=torch.int64, device=dev)
    phi = torch.zeros(R, 1, dtype=torch.float64, device=dev)
    keys = torch.zeros(R, 1, dtype=torch.float64, device=dev)
    codes = torch.zeros(R, 1, 0, dtype=torch.int64, device=dev)
    parent = None
    # NaN / +inf logits are checked once at the end (a per-step check would sync the device); the
    # reference step functions also reject NaN as soon as they see it.
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    tokens = torch.full((R, 1), layout.decoder_start_id, dtype=torch.int64, device=dev)
    for l in range(L):
        logits = step_fn(parent, tokens).to(dev)
        bad = bad | _bad_logits(logits)
        full = _log_softmax(logits)
        off, S = layout.level_offset(l), layout.level_sizes[l]
        lp = full[..., off:off + S].contiguous()
        if temps is None:
            parent, tok, scores, nodes = beam_step(lp, scores, nodes, children[l], B)
        else:
            tlp = _log_softmax(logits, temps[l])[..., off:off + S]
            tlp = renormalize_over_valid(tlp, nodes, children[l])
            parent, tok, scores, nodes, phi, keys = sample_step(lp, tlp, scores, phi, keys, nodes,
                                                                children[l], B, seed, l, row_keys)
        ok = parent >= 0
        codes = torch.cat([torch.gather(codes, 1, parent.clamp(min=0).unsqueeze(-1).expand(R, B, l)),
                           tok.unsqueeze(-1)], 2)
        codes = torch.where(ok.unsqueeze(-1), codes, torch.full_like(codes, -1))
        tokens = torch.where(ok, tok + off, torch.full_like(tok, layout.pad_id))
    valid = nodes >= 0
    if use_eos:
        logits = step_fn(parent, tokens).to(dev)
        bad = bad | _bad_logits(logits)
        eos_lp = _log_softmax(logits)[..., layout.eos_id].contiguous()
        order, scores = eos_rerank(scores, eos_lp, valid, resort=temps is None)
        codes = torch.gather(codes, 1, order.unsqueeze(-1).expand(R, B, L))
        nodes = torch.gather(nodes, 1, order)
        valid = torch.gather(valid, 1, order)
    if bool(bad):
        raise ValueError("the model produced NaN or +inf logits; check the checkpoint and its inputs")
    rows = torch.where(valid, nodes, -1)
    codes = torch.where(valid.unsqueeze(-1), codes, torch.full_like(codes, -1))
    return DecodeOutput(codes=codes, rows=rows, scores=scores)


def _log_softmax(logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """float32 log_softmax over the full vocabulary (HF semantics: computed before any masking).
    Tempered: log_softmax(logits / T) in float32."""
    x = logits.float()
    if temperature is not None:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _bad_logits(logits: torch.Tensor) -> torch.Tensor:
    """bool scalar tensor: any NaN or +inf in the logits (stays on the device)."""
    return (torch.isnan(logits) | torch.isposinf(logits)).any()
