"""Top-K retrieval with a trained TIGER retriever: trie-constrained beam search or per-level
temperature sampling, dispatching the per-level selection to a backend.

    from tiger_fast import generate
    res = generate(model, histories, id_table, user_ids=users, k=10)
    res.item_ids   # int64 (R, 10), best first, -1 = padding
    res.codes      # int64 (R, 10, 4) semantic IDs
    res.scores     # float32 (R, 10) log-probabilities (full-vocab log_softmax, masked, summed)

Pipeline: the encoder runs once per request row; then ``layout.num_levels`` decoder steps with the
KV cache (beams batched as R * num_beams rows; the cross-attention K/V stay one copy per request,
and ``T5.select_beams`` moves beams within their request), each: full-vocabulary float32 log_softmax -> the
level's block -> selection step (``backend``); then, with the T5 end-token convention (``eos=True``,
the default, matching targets that end with eos), one more decoder step adds log p(eos | ID) and
re-ranks (docs/contracts.md).  For a Hugging Face ``T5ForConditionalGeneration`` on the same layout the
returned IDs and order equal HF ``generate(num_beams=num_beams, num_return_sequences=k,
prefix_allowed_tokens_fn=<trie>, length_penalty=0.0, early_stopping=True,
max_new_tokens=num_levels + 1)`` (``max_new_tokens=num_levels`` and ``eos=False`` without the end
token).

Backends: "reference" (tiger_fast.reference.generate, plain torch), "cpu" (C++/OpenMP
``tiger_fast._generate_ext``), "cuda" (the extension's CUDA kernels, model on a CUDA device), "auto"
(cuda if the model is on a GPU and the kernels are usable, else cpu, else reference; see
``backend_status()`` for why one is skipped).  All return identical IDs, order and scores for beam
search; for sampling they use the identical Philox stream (see tiger_fast/reference/generate.py
for the one caveat about float64 transcendental functions).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from .backends import choose_backend, load_extension
from .checks import check_int, is_int
from .cpu_memory import available_memory
from .decoding import check_model, encoder_batch, make_stepper, model_device
from .layout import TokenLayout
from .precision import check_precision, prepare_model
from .reference import generate as ref
from .trie import Trie

BACKENDS = ("auto", "reference", "cpu", "cuda")


def selection_out_buffers(R: int, num_out: int, sample: bool, device) -> list[torch.Tensor]:
    """Output buffers of one selection-kernel call (beam or sampling step), each (R, num_out):
    parent beam int64, token int64, score float32, trie node int64; ``sample`` adds the two float64
    per-beam values the sampling step carries to the next one (``phi`` and ``keys``, as the kernel's
    ``beam_phi`` / ``beam_keys`` inputs; docs/contracts.md "Sampling")."""
    shapes = [torch.int64, torch.int64, torch.float32, torch.int64] + ([torch.float64] * 2 if sample else [])
    return [torch.empty(R, num_out, dtype=dt, device=device) for dt in shapes]


@dataclass
class GenerateResult:
    """Top-K per request row, best first (sampling: in sample order).

    item_ids int64 (R, k): external item ids, -1 = padding (never happens when k <= items in trie);
    codes    int64 (R, k, L): semantic IDs (-1 rows for padding);
    scores   float32 (R, k): summed log-probabilities (untempered, incl. the eos term when eos=True),
             -inf for padding;
    rows     int64 (R, k): rows of the IdTable (-1 = padding);
    backend  str: the selection backend that ran;
    precision str: the model forward's precision ("fp32" exact, "bf16", "int8")."""
    item_ids: torch.Tensor
    codes: torch.Tensor
    scores: torch.Tensor
    rows: torch.Tensor
    backend: str = "reference"
    precision: str = "fp32"


# ---- backends --------------------------------------------------------------------------------------
def _load_ext():
    """The C++/CUDA module, or (None, reason)."""
    return load_extension("generate")


def backend_status(device=None) -> dict[str, str]:
    """{backend: "" if usable on ``device`` else the reason it is not}."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    ext, why = _load_ext()
    out = {"reference": ""}
    out["cpu"] = why if ext is None else ""
    if ext is None:
        out["cuda"] = why
    elif dev.type != "cuda":
        out["cuda"] = f"the model is on {dev}, the cuda backend needs it on a CUDA device"
    elif not ext.cuda_available():
        out["cuda"] = f"CUDA kernels unavailable: {ext.cuda_unavailable_reason()}"
    else:
        out["cuda"] = ""
    return out


def _resolve_backend(backend: str, device: torch.device) -> str:
    """The rule of :func:`tiger_fast.backends.choose_backend` over :func:`backend_status`."""
    status: dict = {}

    def why_not(name):
        if not status:
            status.update(backend_status(device))
        return status[name]

    return choose_backend(backend, BACKENDS, why_not, ("cuda", "cpu", "reference"))[0]


class _CpuSelect:
    """Adapts the extension's numpy CPU entry points to the reference step signatures."""

    def __init__(self, ext):
        self.ext = ext

    def beam(self, lp, scores, nodes, children, num_out):
        dev = lp.device
        out = self.ext.beam_select_step(_np(lp), _np(scores), _np(nodes), _np(children), int(num_out))
        return tuple(torch.from_numpy(np.asarray(o)).to(dev) for o in out)

    def sample(self, lp, tlp, scores, phi, keys, nodes, children, num_out, seed, step, row_keys):
        dev = lp.device
        out = self.ext.sample_select_step(_np(lp), _np(tlp), _np(scores), _np(phi), _np(keys), _np(nodes),
                                          _np(children), int(num_out), int(seed), int(step), _np(row_keys))
        return tuple(torch.from_numpy(np.asarray(o)).to(dev) for o in out)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class _CudaSelect:
    """Adapts the extension's CUDA launchers (raw device pointers, current stream) to the reference
    step signatures.  Errors flagged by the kernels are checked once, at the end (``check``)."""

    def __init__(self, ext, device):
        self.ext = ext
        self.device = device
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._ws = torch.zeros(0, dtype=torch.uint8, device=device)

    def _workspace(self, R, B, S):
        n = int(self.ext.cuda_workspace_bytes(R, B, S))
        if self._ws.numel() < n:
            self._ws = torch.empty(n, dtype=torch.uint8, device=self.device)
        return self._ws.data_ptr()

    def _outs(self, R, num_out, sample):
        return selection_out_buffers(R, num_out, sample, self.device)

    @staticmethod
    def _check_rc(rc):
        # The bindings raise on launch errors and return 0; a non-zero return is still an error.
        if rc not in (0, None):
            raise RuntimeError(f"CUDA selection step failed with code {rc}")

    def beam(self, lp, scores, nodes, children, num_out):
        lp, scores, nodes, children = (t.contiguous() for t in (lp, scores, nodes, children))
        R, B, S = lp.shape
        o = self._outs(R, num_out, False)
        rc = self.ext.cuda_beam_select_step(lp.data_ptr(), scores.data_ptr(), nodes.data_ptr(), children.data_ptr(),
                                            R, B, S, children.shape[0], int(num_out),
                                            *(t.data_ptr() for t in o), self.flag.data_ptr(),
                                            self._workspace(R, B, S), torch.cuda.current_stream(self.device).cuda_stream)
        self._check_rc(rc)
        return tuple(o)

    def sample(self, lp, tlp, scores, phi, keys, nodes, children, num_out, seed, step, row_keys):
        lp, tlp, scores, phi, keys, nodes, children = (t.contiguous() for t in (lp, tlp, scores, phi, keys, nodes, children))
        rk = row_keys.to(self.device).contiguous()
        R, B, S = lp.shape
        o = self._outs(R, num_out, True)
        rc = self.ext.cuda_sample_select_step(lp.data_ptr(), tlp.data_ptr(), scores.data_ptr(), phi.data_ptr(),
                                              keys.data_ptr(), nodes.data_ptr(), children.data_ptr(), rk.data_ptr(),
                                              R, B, S, children.shape[0], int(num_out), int(seed), int(step),
                                              *(t.data_ptr() for t in o), self.flag.data_ptr(),
                                              self._workspace(R, B, S),
                                              torch.cuda.current_stream(self.device).cuda_stream)
        self._check_rc(rc)
        return tuple(o)

    def check(self):
        f = int(self.flag.item())
        if f:
            raise ValueError(f"CUDA selection step reported error bits {f} (1: beam node out of range, "
                             "2: NaN score/key); the model produced NaN logits or the trie is inconsistent")


def _selector(backend: str, device: torch.device):
    """-> (beam_step, sample_step, finish) callables for ``constrained_decode``."""
    if backend == "reference":
        return ref.beam_select_step, ref.sample_select_step, (lambda: None)
    ext, _ = _load_ext()
    if backend == "cpu":
        s = _CpuSelect(ext)
        return s.beam, s.sample, (lambda: None)
    s = _CudaSelect(ext, device)
    return s.beam, s.sample, s.check


# ---- public entry point ----------------------------------------------------------------------------
def generate(model, histories, id_table, *, user_ids=None, k: int = 10, num_beams: int | None = None,
             temperature=None, seed: int = 0, row_keys=None, backend: str = "auto", trie: Trie | None = None,
             max_history: int = 20, eos: bool = True, precision: str = "fp32",
             batch_invariant: bool = True) -> GenerateResult:
    """Top-k items per request with trie-constrained decoding.

    model: ``tiger_fast.t5.T5`` or HF ``T5ForConditionalGeneration`` whose vocabulary is
        ``id_table.layout`` (vocab_size must equal ``layout.vocab_size``).
    histories: list of R 1-D sequences of external item ids (oldest first, non-empty); the last
        ``max_history`` are used.
    id_table: ``tiger_fast.ids.IdTable`` (layout, item_ids, codes).
    user_ids: None (no user token) or R user ids (int/str), hashed to the layout's user tokens.
    k: results per row (1 <= k <= items in the trie).  num_beams: beam width (default k, >= k).
    temperature: None = deterministic beam search; a float > 0 (all levels) or a sequence of
        ``layout.num_levels`` floats > 0 = stochastic beam search (Gumbel-top-k, Kool et al. 2019)
        drawing k distinct IDs without replacement from q(ID) = prod_l softmax(logits_l / T_l)
        renormalised over the codes valid after the prefix; results in draw order (with
        num_beams = k the draw is exact; extra beams change nothing since the top-k keys of the
        last level always survive), scores untempered (log p, as for beam search).
    seed: int in [0, 2^64), the sampling key.  row_keys: int64 (R,) per-request keys for the RNG
        (e.g. user ids), default 0..R-1 (the row index: then a row's sample depends on its position
        in the batch; pass row_keys to make it independent of batch composition and order).
    backend: "auto" | "reference" | "cpu" | "cuda" (see the module docstring).
    precision: the model forward: "fp32" (default, exact: the reference's and HF's IDs, order and
        scores), "bf16" (matrix products under bfloat16 autocast) or "int8" (int8 weights, CPU);
        see tiger_fast/precision.py and docs/generate_precision.md.  The selection is exact on
        the float32 log-probabilities in every mode.
    trie: a prebuilt ``Trie`` over ``id_table`` rows (for serving: build once with
        ``Trie.from_id_table``, then keep it in sync in place: ``rows, codes =
        id_table.add_items(ids, rq_codes); trie.add(rows, codes)`` for cold-start items and
        ``trie.apply_row_map(id_table.remove_items(ids))`` for removals; ``trie.remove(rows)`` alone
        hides items without touching the table); default: built from ``id_table`` on every call.
    eos: whether the model's targets end with eos (the T5 convention, default): rank by
        log p(ID) + log p(eos | ID).
    batch_invariant: a request's IDs, order and scores do not depend on the other requests of the
        call, bit for bit (tiger_fast.t5.T5, fp32 / bf16, CPU; the contract in docs/contracts.md):
        the encoder input is padded to the longest any request can be and short products to
        whole ``t5.GEMM_ROW_TILE`` row tiles.  False pads to the batch's longest input only (a little less
        encoder work for short histories; scores then vary in the last bits with the batch).
    Returns GenerateResult (item_ids int64 (R, k), codes int64 (R, k, L), scores float32 (R, k),
    rows int64 (R, k)).
    """
    check_model(model)
    layout = getattr(id_table, "layout", None)
    if not isinstance(layout, TokenLayout) or not hasattr(id_table, "item_ids"):
        raise TypeError(f"id_table must be a tiger_fast.ids.IdTable, got {type(id_table).__name__}")
    model_layout = getattr(model, "layout", None)
    if isinstance(model_layout, TokenLayout):
        model_layout.check_compatible(layout, "model layout vs id_table.layout")
    V = int(model.config.vocab_size)
    if V != layout.vocab_size:
        raise ValueError(f"the model's vocab_size ({V}) does not match id_table.layout.vocab_size "
                         f"({layout.vocab_size}); the model and the ID table must use the same TokenLayout")
    k = check_int(k, "k")
    num_beams = k if num_beams is None else check_int(num_beams, "num_beams")
    if num_beams < k:
        raise ValueError(f"num_beams ({num_beams}) must be >= k ({k})")
    L = layout.num_levels
    temps = ref.temperatures(temperature, L)
    if not is_int(seed) or not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2^64), got {seed!r}")
    if not isinstance(eos, bool):
        raise TypeError(f"eos must be a bool, got {type(eos).__name__}")
    if not isinstance(batch_invariant, bool):
        raise TypeError(f"batch_invariant must be a bool, got {type(batch_invariant).__name__}")
    if trie is None:
        trie = Trie.from_id_table(id_table)
    elif not isinstance(trie, Trie):
        raise TypeError(f"trie must be a tiger_fast.trie.Trie, got {type(trie).__name__}")
    if tuple(trie.level_sizes) != tuple(layout.level_sizes):
        raise ValueError(f"trie level sizes {trie.level_sizes} do not match the layout's {layout.level_sizes}")
    if len(trie) == 0:
        raise ValueError("the trie holds no items; nothing can be retrieved")
    if k > len(trie):
        raise ValueError(f"k ({k}) is larger than the number of items in the trie ({len(trie)}); lower k")
    if trie.max_row() >= len(id_table):
        raise ValueError(f"the trie refers to row {trie.max_row()} but id_table has {len(id_table)} rows; "
                         "build the trie from this id_table (Trie.from_id_table) or add rows to both")

    device = model_device(model)
    check_precision(model, precision, device)
    run_model, precision_ctx = prepare_model(model, precision, device)
    ids, mask = encoder_batch(layout, id_table, histories, user_ids, max_history, device,
                              fixed_length=batch_invariant)
    R = ids.shape[0]
    check_request_memory(model, R, ids.shape[1], num_beams, L, device)
    if row_keys is None:
        rk = torch.arange(R, dtype=torch.int64)
    else:
        rk = torch.as_tensor(row_keys)
        if rk.dtype != torch.int64 or tuple(rk.shape) != (R,):
            raise ValueError(f"row_keys must be int64 ({R},) (one key per request), got {rk.dtype} {tuple(rk.shape)}")
        rk = rk.cpu()
    name = _resolve_backend(backend, device)
    beam_step, sample_step, finish = _selector(name, device)
    sel_device = torch.device("cpu") if name == "cpu" else device

    borrowed = _enter_eval(model)  # a train()-mode model: eval for this call, thread-safe
    try:
        with torch.inference_mode(), precision_ctx:
            stepper = make_stepper(run_model, ids, mask, L)
            out = ref.constrained_decode(stepper, trie.tables(sel_device), layout, R, num_beams, use_eos=eos,
                                         temperature=temps, seed=int(seed), row_keys=rk,
                                         beam_step=beam_step, sample_step=sample_step)
            finish()
    finally:
        _exit_eval(model, borrowed)
    rows = out.rows[:, :k].cpu()
    codes = out.codes[:, :k].cpu()
    ok = rows >= 0
    # The trie's leaves are rows of id_table: a trie built for another table would silently return
    # wrong items, so the (cheap) R x k check is always on.
    if not torch.equal(id_table.codes[rows[ok]], codes[ok]):
        raise ValueError("the trie and id_table disagree (a returned row's semantic ID differs from the "
                         "table's); build the trie from this id_table and keep both in sync on add/remove")
    item_ids = torch.where(ok, id_table.item_ids[rows.clamp(min=0)], torch.full_like(rows, -1))
    return GenerateResult(item_ids=item_ids, codes=codes, scores=out.scores[:, :k].cpu(), rows=rows, backend=name,
                          precision=precision)


# A model left in train() mode is switched to eval() for a call and back to train() when the last
# call using it returns, so concurrent calls never see a mode another call changed under them.
# (eval()/train() walk every submodule, ~2 ms on the paper model: a model already in eval mode
# skips them.)  Changing the mode yourself while calls are in flight is not supported.
_MODE_LOCK = threading.Lock()
_BORROWED: dict[int, list] = {}  # id(model) -> [calls in flight]


def _enter_eval(model) -> bool:
    with _MODE_LOCK:
        st = _BORROWED.get(id(model))
        if st is None:
            if not model.training:
                return False
            st = _BORROWED[id(model)] = [0]
            model.eval()
        st[0] += 1
        return True


def _exit_eval(model, borrowed: bool) -> None:
    if not borrowed:
        return
    with _MODE_LOCK:
        st = _BORROWED[id(model)]
        st[0] -= 1
        if st[0] == 0:
            del _BORROWED[id(model)]
            model.train(True)


def request_memory(model, R: int, S: int, num_beams: int, L: int) -> int:
    """A rough upper estimate (bytes, float32) of what one generate call allocates: the encoder's
    attention and activations for R x S inputs, the cross-attention K/V, and per decoding step the
    (R * num_beams, vocab) logits and the self-attention cache over L + 1 steps."""
    c = model.config
    d, dff, H = int(c.d_model), int(c.d_ff), int(c.num_heads)
    inner = H * int(getattr(c, "d_kv", d // max(H, 1)))
    Ld = int(getattr(c, "num_decoder_layers", None) or getattr(c, "num_layers", 1))
    V = int(c.vocab_size)
    enc = R * S * (dff + 4 * inner + 4 * d) + 2 * R * H * S * S + 2 * Ld * R * S * inner
    rows = R * num_beams
    dec = rows * (3 * V + dff + 4 * inner + 4 * d) + 2 * Ld * rows * (L + 2) * inner + rows * H * S
    return 4 * (enc + dec)


def check_request_memory(model, R: int, S: int, num_beams: int, L: int, device) -> None:
    """ValueError when ``request_memory`` exceeds ``available_memory(device)`` (before allocating)."""
    need = request_memory(model, R, S, num_beams, L)
    have = available_memory(device)
    if have is not None and need > have:
        raise ValueError(f"this generate call would need about {need / 2**30:.1f} GiB ({R} requests x num_beams "
                         f"{num_beams}, encoder input length {S}, vocab {int(model.config.vocab_size)}) but about "
                         f"{have / 2**30:.1f} GiB is available on {torch.device(device)}; send fewer requests per "
                         "call, or lower num_beams / max_history")
