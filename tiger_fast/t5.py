"""T5-style encoder-decoder retriever (TIGER §3.2), plain PyTorch, weight-compatible with Hugging Face.

Architecture = T5 v1.0 as implemented by ``transformers.T5ForConditionalGeneration`` with
``feed_forward_proj="relu"``:

* pre-norm residual blocks; "T5 LayerNorm" = RMS norm with a weight and no bias/mean subtraction
  (eps 1e-6), computed in float32;
* attention without the 1/sqrt(d_kv) scaling (T5 folds it into the initialisation), no bias terms
  anywhere; ``num_heads * d_kv`` need not equal ``d_model`` (the paper: 6 heads x 64 with d_model 128);
* relative position bias: 32 log-spaced buckets up to distance 128, one (buckets, heads) table per
  stack, owned by the stack's first layer and shared by all its layers; bidirectional buckets in the
  encoder, causal ones in the decoder self-attention, none in cross-attention;
* ReLU FFN d_model -> d_ff -> d_model; dropout after the embeddings, inside the FFN, on attention
  probabilities, on each sub-layer output and after each stack's final norm (all off in ``eval()``);
* one shared token embedding for encoder and decoder; the lm head is tied to it by default and the
  decoder output is multiplied by ``d_model ** -0.5`` before a tied head (the v1.0 convention HF
  calls ``scale_decoder_outputs``).

Weights map 1:1 to and from HF (`T5.from_hf`, `T5.to_hf`).  Incremental decoding for beam search:
`init_cache` projects the encoder output to cross-attention K/V once per request; `decode_step`
feeds one token per row and appends its self-attention K/V; `select_beams` moves beams within their
request (cross K/V shared, not copied); `reorder_cache` selects / expands arbitrary rows.
Checkpoints: `save_t5` / `load_t5` (safetensors + JSON with the T5Config and the TokenLayout).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import write_atomic
from .checks import check_int, config_from_dict
from .fileio import read_checkpoint_meta
from .layout import TokenLayout

__all__ = ["T5Config", "T5", "T5Cache", "relative_position_bucket", "save_t5", "load_t5",
           "paper_config"]


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
@dataclass
class T5Config:
    """Hyper-parameters.  Defaults are the TIGER paper's retriever (4 + 4 layers, d_model 128,
    6 heads x 64, MLP 1024, dropout 0.1); ``vocab_size`` comes from the TokenLayout.

    ``scale_decoder_outputs``: multiply the final decoder states by ``d_model ** -0.5`` before the
    lm head.  ``None`` (default) means "= tie_word_embeddings", the HF v1.0/v1.1 convention."""

    vocab_size: int
    d_model: int = 128
    num_heads: int = 6
    d_kv: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dropout: float = 0.1
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_encoder_layers",
                     "num_decoder_layers", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            setattr(self, name, check_int(getattr(self, name), f"T5Config.{name}"))
        if self.relative_attention_num_buckets < 4:
            # bidirectional buckets split in two halves, each with exact and log-spaced parts
            raise ValueError("T5Config.relative_attention_num_buckets must be >= 4, "
                             f"got {self.relative_attention_num_buckets}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"T5Config.dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"T5Config.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        self.dropout = float(self.dropout)
        self.layer_norm_eps = float(self.layer_norm_eps)
        self.tie_word_embeddings = bool(self.tie_word_embeddings)
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        self.scale_decoder_outputs = bool(self.scale_decoder_outputs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        return config_from_dict(cls, d)


def paper_config(layout: TokenLayout, **overrides) -> T5Config:
    """The TIGER paper's retriever for ``layout`` (vocab = layout.vocab_size)."""
    return T5Config(vocab_size=layout.vocab_size, **overrides)


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------
def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucketing of ``relative_position`` = key position - query position (int64, any shape)
    -> bucket ids int64 (same shape) in [0, num_buckets).

    Half of the buckets (per direction when bidirectional) are exact small distances, the other half
    log-spaced up to ``max_distance``; beyond it everything shares the last bucket.  In the causal
    case positive (future) distances map to bucket 0 (they are masked anyway)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 log exactly as in the HF/mesh-tf code, so bucket boundaries agree bit-for-bit
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class _RMSNorm(nn.Module):
    """T5 LayerNorm: x * rsqrt(mean(x^2) + eps) * weight, statistics in float32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * y.to(self.weight.dtype))


class _Attention(nn.Module):
    """Multi-head attention, q/k/v/o without bias, unscaled dot products, additive bias."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.h, self.dk = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.p = cfg.dropout

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, h*dk) -> (B, h, T, dk)"""
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.dk).transpose(1, 2)

    def attend(self, q, k, v, bias):
        """q (B,h,Tq,dk), k/v (B,h,Tk,dk), bias broadcastable to (B,h,Tq,Tk) -> (B,Tq,d_model)."""
        if bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0,
                                             dropout_p=self.p if self.training else 0.0)
        b, _, tq, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, tq, self.h * self.dk))


class _FF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.wo(self.drop(F.relu(self.wi(x), inplace=True)))  # in place: no second (rows, d_ff) buffer


class _Block(nn.Module):
    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        self.self_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.self_attn = _Attention(cfg)
        if decoder:
            self.cross_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_eps)
            self.cross_attn = _Attention(cfg)
        self.ff_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.ff = _FF(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, enc: torch.Tensor | None = None,
                cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        """One pre-norm layer over a whole sequence: x float (B, T, d_model), bias additive
        (broadcastable to (B, h, T, T)); a decoder layer also attends to enc (B, S, d_model) with
        cross_bias (B, 1, 1, S).  ``T5.decode_step`` runs the same layer for one new token per row
        against a KV cache, with fused weight matrices (see there)."""
        a = self.self_attn
        h = self.self_norm(x)
        x = x + self.drop(a.attend(a.heads(a.q(h)), a.heads(a.k(h)), a.heads(a.v(h)), bias))
        if enc is not None:
            c = self.cross_attn
            h = self.cross_norm(x)
            x = x + self.drop(c.attend(c.heads(c.q(h)), c.heads(c.k(enc)), c.heads(c.v(enc)), cross_bias))
        return x + self.drop(self.ff(self.ff_norm(x)))


class _Stack(nn.Module):
    def __init__(self, cfg: T5Config, num_layers: int, decoder: bool):
        super().__init__()
        self.decoder = decoder
        self.layers = nn.ModuleList(_Block(cfg, decoder) for _ in range(num_layers))
        # the first layer's relative-position table, shared by every layer of the stack
        self.rel_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.final_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance

    def position_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos int64 (Tq,), k_pos int64 (Tk,) -> float (1, h, Tq, Tk)"""
        rel = k_pos[None, :] - q_pos[:, None]
        b = relative_position_bucket(rel, bidirectional=not self.decoder,
                                     num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.rel_bias(b).permute(2, 0, 1).unsqueeze(0)


def _capturing(x: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on x's device: value checks (host syncs) are
    skipped then; the captured inputs come from the decode loop itself."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype when autocast is on, else x's dtype.
    Attention biases are built in it once per forward (with that dtype's finfo.min as the mask
    value, so bf16/fp16 masks stay finite instead of rounding to -inf)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (B, S) key mask -> additive (B, 1, 1, S): 0 where attended, finfo.min where padded
    (finfo.min rather than -inf, as HF does, so sums with biases stay finite)."""
    z = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return z.masked_fill(~mask, torch.finfo(dtype).min)[:, None, None, :]


def _is_int8_linear(m) -> bool:
    """True for a dynamically quantized Linear (``torch.ao.quantization.quantize_dynamic``): its
    ``weight`` is a method returning a qint8 tensor, not a Parameter."""
    return callable(getattr(m, "weight", None))


class _Int8Matrix:
    """``x @ W`` for a weight held as int8 with one scale per output channel, prepacked for
    fbgemm (VNNI): ``x`` (..., in) float32 is quantized per call to uint8 with one scale for the
    whole tensor (the batch), the product accumulates in int32 -> float32 (..., out).

    Built from nn.Linear-like modules whose outputs are concatenated (fused products): a quantized
    module keeps its own int8 values and scales exactly; a float one (or a bare (out, in) weight,
    e.g. the tied embedding head) is quantized symmetrically per output row."""

    def __init__(self, sources):
        ints, scales = [], []
        for m in sources:
            if isinstance(m, torch.Tensor) or not _is_int8_linear(m):
                w = (m if isinstance(m, torch.Tensor) else m.weight).detach().float()
                sc = (w.abs().amax(1) / 127.0).clamp(min=1e-30).double()
                ints.append(torch.round(w / sc[:, None].float()).clamp(-127, 127).to(torch.int8))
                scales.append(sc)
                continue
            qw = m.weight()
            ints.append(qw.int_repr())
            if qw.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                if qw.q_zero_point() != 0:
                    raise ValueError("int8 decode needs symmetric weight quantization (zero point 0)")
                scales.append(torch.full((qw.shape[0],), qw.q_scale(), dtype=torch.float64))
            else:
                if bool((qw.q_per_channel_zero_points() != 0).any()) or qw.q_per_channel_axis() != 0:
                    raise ValueError("int8 decode needs symmetric per-output-channel weight quantization")
                scales.append(qw.q_per_channel_scales().double())
        q = torch._make_per_channel_quantized_tensor(torch.cat(ints), torch.cat(scales),
                                                     torch.zeros(sum(i.shape[0] for i in ints), dtype=torch.int64), 0)
        self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.shape = (q.shape[1], q.shape[0])  # (in, out), as the float matrices
        self.dtype = torch.qint8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed)


# Short products round differently from the same rows inside a larger product: measured on the
# development CPU (MKL sgemm), 1-3 rows on one thread and 1-3, 5-7, 9-11 rows on two (the threads
# split the rows, leaving short row tails) differ in the last bits, while every row count that is
# a multiple of 8, and every count from 12 to 2,600, agrees bit for bit.  So products of fewer than
# 4 * GEMM_ROW_TILE rows are zero-padded to a multiple of GEMM_ROW_TILE: a request's decode then
# does not depend on how many other requests share the batch (generate(batch_invariant=True),
# tests/test_generate.py::test_generate_is_batch_invariant).
GEMM_ROW_TILE = 8


def _mm(x: torch.Tensor, w) -> torch.Tensor:
    """x (..., in) @ w (in, out): a float matrix or an `_Int8Matrix`; short products padded to
    whole row tiles (see GEMM_ROW_TILE; the result is sliced back)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows % GEMM_ROW_TILE and rows < 4 * GEMM_ROW_TILE:
        flat = x.reshape(rows, x.shape[-1])
        pad = GEMM_ROW_TILE - rows % GEMM_ROW_TILE
        out = _mm(torch.cat([flat, flat.new_zeros(pad, x.shape[-1])]), w)[:rows]
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return w(x) if isinstance(w, _Int8Matrix) else torch.matmul(x, w)


def _cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + bias) v for q (R, h, G, dk) against one request's k/v (R, h, S, dk).  With
    fewer than GEMM_ROW_TILE queries (the first decoder step has one) CPU SDPA on two threads
    rounds a request's result differently for other batch sizes (measured; from 8 queries on it
    agrees): the queries are zero-padded to GEMM_ROW_TILE and the extra rows dropped."""
    g = q.shape[2]
    if g < GEMM_ROW_TILE:
        q = torch.cat([q, q.new_zeros(q.shape[0], q.shape[1], GEMM_ROW_TILE - g, q.shape[3])], dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)[:, :, :g]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


# ------------------------------------------------------------------------------------------------
# incremental decoding state
# ------------------------------------------------------------------------------------------------
@dataclass
class T5Cache:
    """Decoder state for incremental decoding.  Decoder rows are grouped by request: ``group``
    consecutive rows (a request's beams) share one encoder output, so the cross-attention K/V are
    stored once per request, never copied per beam (beam search attends a request's beams as
    ``group`` queries against the same K/V).

    cross_kv: float (L_dec, 2, R, h, S, d_kv) cross-attention keys/values of the encoder output;
    enc_bias: float (R, 1, 1, S) additive encoder padding mask;
    self_kv:  float (T_max, L_dec, 2, R * group, h, d_kv) self-attention keys/values by position,
              valid in [:length] (decoder row n belongs to request n // group; position-major so
              that moving beams is one contiguous gather);
    length:   number of decoder tokens fed so far (the position of the next token);
    group:    decoder rows per request (1 after init_cache, the beam width after select_beams);
    weights:  the decoder weights taken by init_cache (a snapshot: to decode with changed weights,
              start a new cache)."""

    cross_kv: torch.Tensor
    enc_bias: torch.Tensor
    self_kv: torch.Tensor
    length: int = 0
    group: int = 1
    spare: torch.Tensor | None = None  # a free buffer select_beams may gather into (avoids re-allocating)
    weights: dict | None = None  # the decoder weights init_cache used (T5._decode_weights); decode_step reuses them

    @property
    def batch_size(self) -> int:
        """Decoder rows (R * group)."""
        return self.self_kv.shape[3]

    @property
    def num_requests(self) -> int:
        return self.cross_kv.shape[2]


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
class T5(nn.Module):
    """Encoder-decoder retriever.  ``T5(config, seed=0)``: weights drawn from a private generator
    seeded with ``seed`` (HF's initialisation scheme), never from the global RNG."""

    def __init__(self, config: T5Config, *, seed: int = 0):
        super().__init__()
        if not isinstance(config, T5Config):
            raise TypeError(f"config must be a T5Config, got {type(config).__name__}")
        self.config = config
        # torch's module constructors draw default inits from the global RNG; fork it so that
        # building a model never changes the caller's random state (our init is seeded below)
        with torch.random.fork_rng(devices=[]):
            self.shared = nn.Embedding(config.vocab_size, config.d_model)
            self.encoder = _Stack(config, config.num_encoder_layers, decoder=False)
            self.decoder = _Stack(config, config.num_decoder_layers, decoder=True)
            self.lm_head = (None if config.tie_word_embeddings
                            else nn.Linear(config.d_model, config.vocab_size, bias=False))
        self._init_weights(seed)

    # ---- init ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self, seed: int):
        c = self.config
        g = torch.Generator().manual_seed(int(seed))
        nn.init.normal_(self.shared.weight, 0.0, 1.0, generator=g)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, 1.0, generator=g)
        for stack in (self.encoder, self.decoder):
            nn.init.normal_(stack.rel_bias.weight, 0.0, c.d_model ** -0.5, generator=g)
            for blk in stack.layers:
                for att in [blk.self_attn] + ([blk.cross_attn] if stack.decoder else []):
                    nn.init.normal_(att.q.weight, 0.0, (c.d_model * c.d_kv) ** -0.5, generator=g)
                    nn.init.normal_(att.k.weight, 0.0, c.d_model ** -0.5, generator=g)
                    nn.init.normal_(att.v.weight, 0.0, c.d_model ** -0.5, generator=g)
                    nn.init.normal_(att.o.weight, 0.0, (c.num_heads * c.d_kv) ** -0.5, generator=g)
                nn.init.normal_(blk.ff.wi.weight, 0.0, c.d_model ** -0.5, generator=g)
                nn.init.normal_(blk.ff.wo.weight, 0.0, c.d_ff ** -0.5, generator=g)

    # ---- input checks -------------------------------------------------------------------------
    def _check_ids(self, x, name: str, ndim: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of int64 token ids, got {type(x).__name__}")
        if x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must hold integer token ids (int64), got {x.dtype}")
        if x.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one token per row")
        dev = self.shared.weight.device
        if x.device != dev:
            raise ValueError(f"{name} is on {x.device} but the model is on {dev}; move it with .to({str(dev)!r})")
        if _capturing(x):  # value checks need a host sync, which a CUDA graph capture forbids
            return x.long()
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"{name} has token ids in [{lo}, {hi}], outside the vocabulary "
                             f"[0, {self.config.vocab_size}); build inputs with the model's TokenLayout")
        return x.long()

    def _check_mask(self, mask, ids: torch.Tensor, name: str) -> torch.Tensor:
        if mask is None:
            return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a bool torch.Tensor, got {type(mask).__name__}")
        if mask.shape != ids.shape:
            raise ValueError(f"{name} shape {tuple(mask.shape)} != input shape {tuple(ids.shape)}")
        if mask.device != ids.device:
            raise ValueError(f"{name} is on {mask.device} but the inputs are on {ids.device}")
        if mask.dtype != torch.bool:
            if mask.dtype.is_floating_point or mask.dtype.is_complex:
                raise TypeError(f"{name} must be bool (or 0/1 integers), got {mask.dtype}")
            if not _capturing(mask) and bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(f"{name} integer values must be 0 or 1")
            mask = mask.bool()
        if not _capturing(mask) and not bool(mask.any(dim=-1).all()):
            bad = int((~mask.any(dim=-1)).nonzero()[0, 0])
            raise ValueError(f"{name} row {bad} masks every position; each row needs at least one "
                             "real token (an empty history cannot be encoded)")
        return mask

    # ---- encoder ------------------------------------------------------------------------------
    def _encode(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device)
        x = self.shared(input_ids)
        cd = _compute_dtype(x)
        # position bias + padding mask, computed once and shared by every layer
        bias = (enc.position_bias(pos, pos).float() + _mask_bias(mask, cd).float()).to(cd)
        x = enc.drop(x)
        for blk in enc.layers:
            x = blk(x, bias)
        return enc.drop(enc.final_norm(x))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids int64 (B, S), attention_mask bool (B, S) (True = real token; None = all real)
        -> encoder states float32 (B, S, d_model) (padded positions hold finite junk)."""
        input_ids = self._check_ids(input_ids, "input_ids", 2)
        mask = self._check_mask(attention_mask, input_ids, "attention_mask")
        return self._encode(input_ids, mask)

    # ---- decoder (teacher forcing) ------------------------------------------------------------
    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.scale_decoder_outputs:
            x = x * (self.config.d_model ** -0.5)
        w = self.shared.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, w)

    def _decode(self, dec_ids: torch.Tensor, enc: torch.Tensor, enc_mask: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        t = dec_ids.shape[1]
        pos = torch.arange(t, device=dec_ids.device)
        x = self.shared(dec_ids)
        cd = _compute_dtype(x)
        causal = pos[None, :] <= pos[:, None]  # (T, T) key <= query
        bias = dec.position_bias(pos, pos).to(cd).masked_fill(~causal, torch.finfo(cd).min)
        cross_bias = _mask_bias(enc_mask, cd)
        x = dec.drop(x)
        for blk in dec.layers:
            x = blk(x, bias, enc, cross_bias)
        return self._head(dec.drop(dec.final_norm(x)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits.

        input_ids int64 (B, S), attention_mask bool (B, S) or None, decoder_input_ids int64 (B, T)
        (start token then the target shifted right) -> logits float32 (B, T, vocab_size)."""
        input_ids = self._check_ids(input_ids, "input_ids", 2)
        mask = self._check_mask(attention_mask, input_ids, "attention_mask")
        dec_ids = self._check_ids(decoder_input_ids, "decoder_input_ids", 2)
        if dec_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"decoder_input_ids batch {dec_ids.shape[0]} != input_ids batch {input_ids.shape[0]}")
        return self._decode(dec_ids, self._encode(input_ids, mask), mask).float()

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             decoder_start_id: int = 0, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean token cross-entropy (float32 scalar) of ``labels`` int64 (B, T) (-100 = ignored)
        given the encoder input; decoder input = [decoder_start_id] + labels[:, :-1] (T5's
        shift-right with -100 replaced by pad).  The softmax and loss run in float32 also under
        autocast.  No input checks: the training loop validates its data once up front."""
        dec_in = torch.empty_like(labels)
        dec_in[:, 0] = decoder_start_id
        dec_in[:, 1:] = labels[:, :-1].clamp(min=0)  # -100 -> pad (0)
        logits = self._decode(dec_in, self._encode(input_ids, attention_mask), attention_mask)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, label_smoothing=label_smoothing)

    # ---- incremental decoding -----------------------------------------------------------------
    def _build_decode_weights(self) -> dict:
        """The decoder's weights as (in, out) matrices for ``x @ W``: per layer the self-attention
        q|k|v fused (d, 3 * h * dk), o, cross q and o, FFN wi and wo; the cross k|v of all layers
        fused (d, L * 2 * h * dk); the lm head (d, V).  Why: a decode step multiplies few rows
        (batch 1: the 20 beams) by weights that are no longer in cache, and in this layout with
        fewer, larger products it ran ~10 % faster end to end (batch 1, benchmarks/bench_generate.py)."""
        if any(_is_int8_linear(m) for m in self._decode_linears()):
            return self._build_int8_decode_weights()
        t = lambda w: w.t().contiguous()
        layers = []
        for blk in self.decoder.layers:
            a, c, ff = blk.self_attn, blk.cross_attn, blk.ff
            layers.append({"qkv": t(torch.cat([a.q.weight, a.k.weight, a.v.weight])), "o": t(a.o.weight),
                           "cross_q": t(c.q.weight), "cross_o": t(c.o.weight),
                           "wi": t(ff.wi.weight), "wo": t(ff.wo.weight)})
        cross_kv = t(torch.cat([torch.cat([b.cross_attn.k.weight, b.cross_attn.v.weight])
                                for b in self.decoder.layers]))
        head = t(self.shared.weight if self.lm_head is None else self.lm_head.weight)
        return {"layers": layers, "cross_kv": cross_kv, "head": head}

    def _build_int8_decode_weights(self) -> dict:
        """`_build_decode_weights` for a model whose Linear layers were dynamically quantized
        (``torch.ao.quantization.quantize_dynamic``): the same fused products as `_Int8Matrix`
        (the modules' own int8 values and scales; a tied head, an embedding, is quantized per
        vocabulary row)."""
        P = _Int8Matrix
        layers = []
        for blk in self.decoder.layers:
            a, c, ff = blk.self_attn, blk.cross_attn, blk.ff
            layers.append({"qkv": P([a.q, a.k, a.v]), "o": P([a.o]), "cross_q": P([c.q]), "cross_o": P([c.o]),
                           "wi": P([ff.wi]), "wo": P([ff.wo])})
        cross_kv = P([m for b in self.decoder.layers for m in (b.cross_attn.k, b.cross_attn.v)])
        head = P([self.shared.weight if self.lm_head is None else self.lm_head])
        return {"layers": layers, "cross_kv": cross_kv, "head": head}

    def _decode_linears(self) -> list:
        """The modules `_build_decode_weights` reads (looked up each time: .to(),
        load_state_dict(assign=True) or quantize_dynamic may replace them)."""
        mods = [m for blk in self.decoder.layers for a in (blk.self_attn, blk.cross_attn) for m in (a.q, a.k, a.v, a.o)]
        mods += [m for blk in self.decoder.layers for m in (blk.ff.wi, blk.ff.wo)]
        if self.lm_head is not None:
            mods.append(self.lm_head)
        return mods

    def _decode_weights(self) -> dict:
        """`_build_decode_weights`, kept between calls while no parameter changes (keyed by every
        parameter's storage and version counter: optimizer steps, load_state_dict and .to() all
        change it).  With autograd on they are rebuilt each time so that gradients flow.
        Under CPU/CUDA autocast the float matrices are kept in the autocast dtype (cast once, not
        on every product)."""
        if torch.is_grad_enabled():
            return self._build_decode_weights()
        dev = self.shared.weight.device
        cast = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        # (a dtype or device change allocates new storage, but check them too: addresses get reused)
        key = [cast, self.shared.weight.dtype, dev, self.shared.weight.data_ptr(), self.shared.weight._version]
        for m in self._decode_linears():
            key.append(("int8", id(m), id(m._packed_params)) if _is_int8_linear(m)
                       else (m.weight.data_ptr(), m.weight._version))
        key = tuple(key)
        cached = self.__dict__.get("_decode_weights_cache")
        if cached is None or cached[0] != key:
            w = self._build_decode_weights()
            if cast is not None and cast != self.shared.weight.dtype:
                c = lambda t: t.to(cast) if isinstance(t, torch.Tensor) else t
                w = {"layers": [{k: c(v) for k, v in lw.items()} for lw in w["layers"]],
                     "cross_kv": c(w["cross_kv"]), "head": c(w["head"])}
            cached = (key, w)
            self.__dict__["_decode_weights_cache"] = cached
        return cached[1]

    def init_cache(self, enc: torch.Tensor, enc_mask: torch.Tensor | None = None, *,
                   max_length: int = 8) -> T5Cache:
        """enc float (B, S, d_model) from `encode`, enc_mask bool (B, S) -> an empty T5Cache
        with the cross-attention K/V of every decoder layer computed once.  ``max_length`` only
        pre-sizes the self-attention buffers (they grow when needed)."""
        if not isinstance(enc, torch.Tensor) or enc.dim() != 3 or enc.shape[-1] != self.config.d_model:
            raise ValueError(f"enc must be a float tensor (B, S, {self.config.d_model}) from encode(), "
                             f"got {getattr(enc, 'shape', type(enc).__name__)}")
        if not enc.dtype.is_floating_point:
            raise TypeError(f"enc must be floating point, got {enc.dtype}")
        if enc.shape[0] == 0 or enc.shape[1] == 0:
            raise ValueError(f"enc is empty (shape {tuple(enc.shape)})")
        w = self.shared.weight
        if enc.device != w.device:
            raise ValueError(f"enc is on {enc.device} but the model is on {w.device}")
        mask = self._check_mask(enc_mask, enc[..., 0], "enc_mask")
        max_length = check_int(max_length, "max_length")
        enc = enc.to(w.dtype)
        b, s, _ = enc.shape
        c = self.config
        L = c.num_decoder_layers
        weights = self._decode_weights()
        # every layer's cross K/V in one product: (B*S, d) @ (d, L*2*h*dk)
        kv = _mm(enc.reshape(b * s, -1), weights["cross_kv"]).view(b, s, L, 2, c.num_heads, c.d_kv)
        cross = kv.permute(2, 3, 0, 4, 1, 5).contiguous()  # (L, 2, B, h, S, dk)
        self_kv = torch.zeros(int(max_length), L, 2, b, c.num_heads, c.d_kv, dtype=cross.dtype, device=w.device)
        return T5Cache(cross_kv=cross, enc_bias=_mask_bias(mask, cross.dtype), self_kv=self_kv, length=0,
                       weights=weights)

    def decode_step(self, tokens: torch.Tensor, cache: T5Cache) -> torch.Tensor:
        """Feed one decoder token per row (the first call feeds the start token,
        layout.decoder_start_id) and append its K/V to ``cache`` (in place).

        tokens int64 (B,) with B = cache.batch_size -> next-token logits float32 (B, vocab_size),
        equal (to float rounding) to `forward` on the whole prefix."""
        if not isinstance(cache, T5Cache):
            raise TypeError(f"cache must be a T5Cache from init_cache, got {type(cache).__name__}")
        tokens = self._check_ids(tokens, "tokens", 1)
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"tokens has {tokens.shape[0]} rows but the cache has {cache.batch_size}; "
                             "use reorder_cache to select/expand rows first")
        t = cache.length
        if t >= cache.self_kv.shape[0]:  # grow the self-attention buffers (amortised doubling)
            extra = torch.zeros_like(cache.self_kv)
            cache.self_kv = torch.cat([cache.self_kv, extra], dim=0)
        dec = self.decoder
        weights = cache.weights if cache.weights is not None else self._decode_weights()
        x = self.shared(tokens)  # (N, d)
        dev = x.device
        # positions built on the device (no host->device copy: the step can be graph-captured)
        bias = dec.position_bias(torch.arange(t, t + 1, device=dev), torch.arange(t + 1, device=dev))
        R, G, n = cache.num_requests, cache.group, tokens.shape[0]
        kv = cache.self_kv
        for i, blk in enumerate(dec.layers):
            w = weights["layers"][i]
            a = blk.self_attn
            qkv = _mm(blk.self_norm(x), w["qkv"]).view(n, 3, a.h, a.dk)
            kv[t, i] = qkv[:, 1:].transpose(0, 1)  # this token's K and V: (2, N, h, dk)
            # (t+1, N, h, dk) -> (N, h, t+1, dk) views
            out = F.scaled_dot_product_attention(qkv[:, 0].unsqueeze(2), kv[:t + 1, i, 0].permute(1, 2, 0, 3),
                                                 kv[:t + 1, i, 1].permute(1, 2, 0, 3),
                                                 attn_mask=bias.to(qkv.dtype), scale=1.0)
            x = x + _mm(out.reshape(n, -1), w["o"])
            c = blk.cross_attn
            # a request's G rows are G queries against its one copy of the encoder K/V
            q = _mm(blk.cross_norm(x), w["cross_q"]).view(R, G, c.h, c.dk).transpose(1, 2)  # (R, h, G, dk)
            out = _cross_attention(q, cache.cross_kv[i, 0], cache.cross_kv[i, 1], cache.enc_bias.to(q.dtype))
            x = x + _mm(out.transpose(1, 2).reshape(n, -1), w["cross_o"])
            x = x + _mm(torch.relu_(_mm(blk.ff_norm(x), w["wi"])), w["wo"])
        cache.length = t + 1
        y = dec.final_norm(x)
        if self.config.scale_decoder_outputs:
            y = y * (self.config.d_model ** -0.5)
        return _mm(y, weights["head"]).float()

    def select_beams(self, cache: T5Cache, parent: torch.Tensor, *, reuse: bool = False) -> T5Cache:
        """Beam step: row ``r * B + j`` of the result continues row ``r * cache.group + parent[r, j]``
        of ``cache`` (beams never leave their request, so the cross-attention K/V are shared, not
        copied; only the filled self-attention K/V are gathered).

        parent int64 (R, B) with values in [0, cache.group) (-1 = absent beam: continues beam 0; its
        output is ignored by the caller) -> new T5Cache with group B (the input is not modified).
        ``reuse=True`` hands the input over: its buffer becomes the result's spare, and the next
        ``select_beams(..., reuse=True)`` gathers into it (so the cache before that is overwritten;
        a decode loop keeps only the newest cache, as ``tiger_fast.generate`` does).
        No host synchronisation on CUDA (values are clamped there instead of checked), so a decode
        loop using it can be captured in a CUDA graph."""
        if not isinstance(cache, T5Cache):
            raise TypeError(f"cache must be a T5Cache, got {type(cache).__name__}")
        R = cache.num_requests
        if (not isinstance(parent, torch.Tensor) or parent.dim() != 2 or parent.shape[0] != R
                or parent.dtype != torch.int64 or parent.shape[1] < 1):
            raise ValueError(f"parent must be int64 ({R}, B) with B >= 1 (one row per request), got "
                             f"{getattr(parent, 'dtype', type(parent).__name__)} {tuple(getattr(parent, 'shape', ()))}")
        G = cache.group
        parent = parent.to(cache.self_kv.device)
        if parent.device.type == "cpu":
            lo, hi = int(parent.min()), int(parent.max())
            if lo < -1 or hi >= G:
                raise ValueError(f"parent values in [{lo}, {hi}] outside [-1, {G}) (the cache has {G} rows per request)")
        B = parent.shape[1]
        idx = (torch.arange(R, device=parent.device).unsqueeze(1) * G + parent.clamp(0, G - 1)).reshape(-1)
        n = cache.length
        kv = cache.self_kv
        T, Ld, _, N, h, dk = kv.shape
        shape = (T, Ld, 2, R * B, h, dk)
        # Gather into the spare buffer of the previous step when it fits: at batch 256 x 20 beams a
        # fresh 300 MB buffer per step costs more in page faults than the gather itself.
        buf = cache.spare if reuse else None
        if buf is None or tuple(buf.shape) != shape or buf.dtype != kv.dtype or buf.device != kv.device:
            buf = kv.new_empty(shape)
        if n:  # one contiguous 3-D gather over the filled positions
            torch.index_select(kv[:n].reshape(n * Ld * 2, N, h * dk), 1, idx,
                               out=buf[:n].view(n * Ld * 2, R * B, h * dk))
        return T5Cache(cross_kv=cache.cross_kv, enc_bias=cache.enc_bias, self_kv=buf, length=n, group=B,
                       spare=kv if reuse else None, weights=cache.weights)

    @staticmethod
    def reorder_cache(cache: T5Cache, index: torch.Tensor) -> T5Cache:
        """Select / repeat rows: row r of the result is row ``index[r]`` of ``cache``.

        index int64 (B',) with values in [0, B) (repeats allowed: beam expansion) -> new T5Cache
        with B' rows (the input cache is not modified)."""
        if not isinstance(cache, T5Cache):
            raise TypeError(f"cache must be a T5Cache, got {type(cache).__name__}")
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            raise TypeError("index must be a 1-D int64 tensor of row numbers")
        if index.numel() == 0:
            raise ValueError("index is empty; a cache needs at least one row")
        b = cache.batch_size
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= b:
            raise ValueError(f"index values in [{lo}, {hi}] outside the cache's rows [0, {b})")
        index = index.to(device=cache.self_kv.device, dtype=torch.long)
        n = cache.length  # only the filled part of the self-attention buffers needs copying
        kv = cache.self_kv
        self_kv = kv.new_zeros(kv.shape[:3] + (index.numel(),) + kv.shape[4:])
        self_kv[:n] = kv[:n].index_select(3, index)
        # arbitrary rows may mix requests: the result holds one cross K/V copy per row (group 1)
        req = index // cache.group
        return T5Cache(cross_kv=cache.cross_kv.index_select(2, req), enc_bias=cache.enc_bias.index_select(0, req),
                       self_kv=self_kv, length=n, group=1, weights=cache.weights)

    # ---- misc ---------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- Hugging Face conversion --------------------------------------------------------------
    def _name_map(self) -> dict[str, str]:
        """our parameter name -> HF T5ForConditionalGeneration state-dict name"""
        m = {"shared.weight": "shared.weight"}
        if self.lm_head is not None:
            m["lm_head.weight"] = "lm_head.weight"
        for sname, stack in (("encoder", self.encoder), ("decoder", self.decoder)):
            m[f"{sname}.rel_bias.weight"] = f"{sname}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            m[f"{sname}.final_norm.weight"] = f"{sname}.final_layer_norm.weight"
            for i, _ in enumerate(stack.layers):
                ours, hf = f"{sname}.layers.{i}", f"{sname}.block.{i}.layer"
                for p in "qkvo":
                    m[f"{ours}.self_attn.{p}.weight"] = f"{hf}.0.SelfAttention.{p}.weight"
                m[f"{ours}.self_norm.weight"] = f"{hf}.0.layer_norm.weight"
                ff = 1
                if stack.decoder:
                    for p in "qkvo":
                        m[f"{ours}.cross_attn.{p}.weight"] = f"{hf}.1.EncDecAttention.{p}.weight"
                    m[f"{ours}.cross_norm.weight"] = f"{hf}.1.layer_norm.weight"
                    ff = 2
                m[f"{ours}.ff.wi.weight"] = f"{hf}.{ff}.DenseReluDense.wi.weight"
                m[f"{ours}.ff.wo.weight"] = f"{hf}.{ff}.DenseReluDense.wo.weight"
                m[f"{ours}.ff_norm.weight"] = f"{hf}.{ff}.layer_norm.weight"
        return m

    @classmethod
    def from_hf(cls, hf_model) -> "T5":
        """Copy a ``transformers.T5ForConditionalGeneration`` (ReLU FFN, i.e. T5 v1.0-style;
        tied or untied head) into a new T5 with identical weights (float32, CPU)."""
        _require_transformers()
        if not (hasattr(hf_model, "config") and hasattr(hf_model, "encoder") and hasattr(hf_model, "lm_head")):
            raise TypeError(f"hf_model must be a transformers.T5ForConditionalGeneration, got {type(hf_model).__name__}")
        hc = hf_model.config
        if getattr(hc, "model_type", None) != "t5":
            raise ValueError(f"hf_model.config.model_type must be 't5', got {getattr(hc, 'model_type', None)!r}")
        if getattr(hc, "is_gated_act", False) or getattr(hc, "dense_act_fn", "relu") != "relu":
            raise ValueError(f"only feed_forward_proj='relu' (T5 v1.0 FFN) is supported, got {hc.feed_forward_proj!r}")
        sd = hf_model.state_dict()
        tied = hf_model.lm_head.weight.data_ptr() == hf_model.shared.weight.data_ptr() or \
            torch.equal(hf_model.lm_head.weight, hf_model.shared.weight)
        scale = getattr(hc, "scale_decoder_outputs", None)  # transformers >= 5
        if scale is None:
            scale = bool(hc.tie_word_embeddings)             # transformers 4.x
        cfg = T5Config(vocab_size=hc.vocab_size, d_model=hc.d_model, num_heads=hc.num_heads, d_kv=hc.d_kv,
                       d_ff=hc.d_ff, num_encoder_layers=hc.num_layers,
                       num_decoder_layers=hc.num_decoder_layers, dropout=float(hc.dropout_rate),
                       relative_attention_num_buckets=hc.relative_attention_num_buckets,
                       relative_attention_max_distance=hc.relative_attention_max_distance,
                       layer_norm_eps=float(hc.layer_norm_epsilon), tie_word_embeddings=bool(tied),
                       scale_decoder_outputs=bool(scale))
        model = cls(cfg)
        ours = {}
        for k, hk in model._name_map().items():
            if hk not in sd:
                raise ValueError(f"hf_model has no weight {hk!r}; is it a T5ForConditionalGeneration?")
            ours[k] = sd[hk].detach().to("cpu", torch.float32)
        model.load_state_dict(ours, strict=True)
        return model

    def to_hf(self):
        """A ``transformers.T5ForConditionalGeneration`` (float32, CPU, eval mode) with these
        weights; its logits equal ours to float rounding."""
        tf = _require_transformers()
        c = self.config
        # HF's ``tie_word_embeddings`` flag decides the output scaling (v4 and v5); tying itself
        # is fixed up below because transformers 5 always ties the head.
        hc = tf.T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
                         num_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers,
                         num_heads=c.num_heads, relative_attention_num_buckets=c.relative_attention_num_buckets,
                         relative_attention_max_distance=c.relative_attention_max_distance,
                         dropout_rate=c.dropout, layer_norm_epsilon=c.layer_norm_eps,
                         feed_forward_proj="relu", tie_word_embeddings=c.scale_decoder_outputs,
                         pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        hf = tf.T5ForConditionalGeneration(hc)
        sd = self.state_dict()
        hf_sd = {hk: sd[k].detach().to("cpu", torch.float32) for k, hk in self._name_map().items()}
        head = (self.shared.weight if self.lm_head is None else self.lm_head.weight).detach().to("cpu", torch.float32)
        hf_sd.pop("lm_head.weight", None)
        missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
        if unexpected:
            raise RuntimeError(f"internal error: unexpected HF keys {unexpected}")
        still = [k for k in missing if k not in ("lm_head.weight", "encoder.embed_tokens.weight",
                                                   "decoder.embed_tokens.weight")]
        if still:
            raise RuntimeError(f"internal error: HF keys not set {still}")
        hf_tied = hf.lm_head.weight.data_ptr() == hf.shared.weight.data_ptr()
        if self.lm_head is None:
            if not hf_tied:
                with torch.no_grad():
                    hf.lm_head.weight.copy_(head)
        else:
            hf.lm_head.weight = nn.Parameter(head.clone())  # untie (transformers 5 ties by default)
        for emb in (hf.encoder.embed_tokens, hf.decoder.embed_tokens):
            if emb.weight.data_ptr() != hf.shared.weight.data_ptr():
                with torch.no_grad():
                    emb.weight.copy_(hf.shared.weight)
        return hf.eval()


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Hugging Face conversion needs the optional dependency 'transformers': "
                          "pip install 'tiger_fast[hf]' (or pip install transformers)") from e
    return transformers


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
_FORMAT = "tiger_fast.t5/1"
# Upper bounds load_t5 puts on a checkpoint's config before anything is built (far above any
# retriever this package trains; the weights' header is checked against the config as well).
CHECKPOINT_LIMITS = {"vocab_size": 1 << 24, "d_model": 1 << 15, "num_heads": 1 << 10, "d_kv": 1 << 14,
                     "d_ff": 1 << 17, "num_encoder_layers": 1 << 8, "num_decoder_layers": 1 << 8,
                     "relative_attention_num_buckets": 1 << 12, "relative_attention_max_distance": 1 << 20}


def save_t5(model: T5, layout: TokenLayout, path: str, provenance: dict | None = None) -> None:
    """Save to the directory ``path``: ``model.safetensors`` (weights) and ``config.json``
    (format tag, T5Config, TokenLayout, provenance).  The layout must match the model's vocabulary.
    ``provenance``: what it was trained with (``{"id_table": digest, "catalogue": ...}``,
    tiger_fast.provenance); default: the model's own ``provenance`` attribute, if any."""
    from safetensors.torch import save_file

    if not isinstance(model, T5):
        raise TypeError(f"model must be a tiger_fast.t5.T5, got {type(model).__name__}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if layout.vocab_size != model.config.vocab_size:
        raise ValueError(f"layout.vocab_size {layout.vocab_size} != model vocab_size {model.config.vocab_size}; "
                         "the model was built for another TokenLayout")
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomic(os.path.join(path, "model.safetensors"), lambda p: save_file(tensors, p))
    meta = {"format": _FORMAT, "t5_config": model.config.to_dict(), "layout": layout.to_dict(),
            "provenance": dict(provenance if provenance is not None else getattr(model, "provenance", {}) or {})}

    def _w(p):
        with open(p, "w") as f:
            json.dump(meta, f, indent=2)
    # config last: a directory with a config.json always has complete weights next to it
    write_atomic(os.path.join(path, "config.json"), _w)


def load_t5(path: str, *, device: str | torch.device = "cpu") -> tuple[T5, TokenLayout]:
    """Load a `save_t5` directory -> (model in eval mode, layout); ``model.layout`` is that layout,
    which ``generate`` compares with the ID table's.  No pickle is involved.  The config is checked
    (CHECKPOINT_LIMITS, the weights' header) before anything is built; ValueError otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta, cfg_path, w_path = read_checkpoint_meta(path, "config.json", "model.safetensors", "a save_t5 checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{cfg_path!r} is not a {_FORMAT} config (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    missing = [k for k in ("t5_config", "layout") if not isinstance(meta.get(k), dict)]
    if missing:
        raise ValueError(f"{cfg_path!r} lacks the object(s) {missing}")
    try:
        cfg = T5Config.from_dict(meta["t5_config"])
        layout = TokenLayout.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in meta["layout"].items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path!r}: invalid config: {e}") from None
    if layout.vocab_size != cfg.vocab_size:
        raise ValueError(f"checkpoint {path!r}: layout vocab {layout.vocab_size} != model vocab {cfg.vocab_size}")
    # Check the config against the weights' header before building anything: a config.json that
    # is wrong (d_ff = 10**9, 10**6 layers) must not allocate what it describes.
    for name, top in CHECKPOINT_LIMITS.items():
        if getattr(cfg, name) > top:
            raise ValueError(f"{cfg_path!r}: t5_config.{name} = {getattr(cfg, name)} is beyond the loader's bound "
                             f"{top} (CHECKPOINT_LIMITS)")
    try:
        from safetensors import safe_open

        with safe_open(w_path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read weights {w_path!r}: {e}") from None
    for side, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        got = len({k.split(".")[2] for k in shapes if k.startswith(f"{side}.layers.")})
        if got != n:
            raise ValueError(f"checkpoint {path!r} weights do not match its config: config.json says {n} {side} "
                             f"layers, the weights hold {got}")
    with torch.device("meta"):  # shapes only: no memory
        expected = {k: tuple(v.shape) for k, v in T5(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ValueError(f"checkpoint {path!r} weights do not match its config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for k, shp in shapes.items():
        if shp != expected[k]:
            raise ValueError(f"checkpoint {path!r}: weight {k} has shape {shp}, config implies {expected[k]}")
    try:
        sd = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read weights {w_path!r}: {e}") from None
    model = T5(cfg)
    model.load_state_dict(sd, strict=True)
    model.layout = layout  # generate() compares the whole layout with the ID table's, not only sizes
    model.provenance = meta["provenance"] if isinstance(meta.get("provenance"), dict) else {}
    return model.to(device).eval(), layout
