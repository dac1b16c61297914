"""tiger_fast._generate_ext (csrc/generate_*.cpp/.cu, csrc/philox.h) against the reference.

The spec is tiger_fast/reference/generate.py (beam_select_step, sample_select_step) and
tiger_fast/philox.py.  Integer outputs and float32 scores are compared exactly (torch.equal): the
deterministic step is one float32 add per candidate everywhere.  Sampling keys (float64) are compared
with a few-ulp tolerance only because log/exp/log1p/expm1 come from different math libraries
(torch/SLEEF vs glibc); the selection itself (parent, token, node) and the exact float values that
involve no transcendental function (score, phi) must agree exactly.
CI cost: about 25-40 s on 2 cores (the nvcc compile check is ~15-25 s of it and skips without nvcc).
"""
from __future__ import annotations

import glob
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiger_fast import philox
from tiger_fast.reference import generate as ref
from tiger_fast.trie import Trie

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD_HINT = "build it: TIGER_FAST_STEMS=generate python setup.py build_ext --inplace"


def _load_ext():
    try:
        from tiger_fast import _generate_ext
        return _generate_ext
    except ImportError as e:
        built = glob.glob(os.path.join(ROOT, "tiger_fast", "_generate_ext*.so")) + glob.glob(
            os.path.join(ROOT, "tiger_fast", "_generate_ext*.pyd"))
        if built:  # a build exists but does not import: that is a failure, not a skip
            pytest.fail(f"tiger_fast._generate_ext exists but does not import: {e}")
        pytest.skip(f"tiger_fast._generate_ext is not built ({BUILD_HINT})")


@pytest.fixture(scope="module")
def ext():
    return _load_ext()


def _np(t):
    return t.contiguous().numpy()


def _t(a):
    return torch.from_numpy(np.asarray(a))


# ---- Philox ------------------------------------------------------------------------------------------
# Random123 tests/kat_vectors, philox4x32 10: counter (4 words), key (2 words) -> 4 words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ext, ctr, key, want):
    assert tuple(ext.philox4x32_10(*ctr, *key)) == want
    # and F's torch implementation agrees with the same vectors
    got = philox.philox4x32_10(ctr, key)
    assert tuple(int(x) for x in got) == want


@pytest.mark.parametrize("seed,step", [(0, 0), (1, 3), (2 ** 32, 1), (2 ** 64 - 1, 2), (0xDEADBEEF12345678, 7)])
def test_philox_stream_matches_torch(ext, seed, step):
    row_keys = torch.tensor([0, 1, 5, -1, -(2 ** 63), 2 ** 63 - 1, 2 ** 32, 123456789012], dtype=torch.int64)
    B, S = 3, 37
    want = philox.philox_word0(seed, step, row_keys, B, S)
    got = ext.philox_word0(seed, step, _np(row_keys), B, S)
    assert got.dtype == np.uint32 and got.shape == (len(row_keys), B, S)
    assert torch.equal(_t(got.astype(np.int64)), want)
    # Gumbel noise: identical uniforms; the log comes from glibc vs torch, so allow a few ulps.
    g_ref = philox.gumbel_noise(seed, step, row_keys, B, S)
    g = _t(ext.gumbel_noise(seed, step, _np(row_keys), B, S))
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g_ref, rtol=4e-16, atol=4e-16)


# ---- random inputs -----------------------------------------------------------------------------------
def _random_children(gen, n_nodes, S, density, n_next):
    """int32 (n_nodes, S): child ids in [0, n_next) with probability `density`, else -1."""
    valid = torch.rand(n_nodes, S, generator=gen) < density
    ids = torch.randint(0, max(n_next, 1), (n_nodes, S), generator=gen, dtype=torch.int32)
    return torch.where(valid, ids, torch.full_like(ids, -1))


def _logprobs(gen, R, B, S, mode, temperature=None):
    """float32 (R, B, S): a level's block of a full-vocab log_softmax (vocab = S + 40)."""
    logits = torch.randn(R, B, S + 40, generator=gen) * 3
    if mode == "ties":  # exact ties: few distinct values
        logits = torch.round(logits)
    if mode == "near":  # values 1 ulp apart after the log_softmax shift
        logits = torch.round(logits * 2) / 2
    if mode == "neginf":
        logits[torch.rand(logits.shape, generator=gen) < 0.3] = -math.inf
    if temperature is not None:
        logits = logits / temperature
    lp = torch.log_softmax(logits, -1)[..., :S].contiguous()
    if mode == "near":
        # nudge a random half by one ulp so scores differ in the last bit only
        bump = torch.rand(lp.shape, generator=gen) < 0.5
        lp = torch.where(bump, torch.nextafter(lp, torch.tensor(0.0)), lp)
    return lp


def _beam_state(gen, R, B, n_nodes, absent):
    scores = -torch.rand(R, B, generator=gen) * 5
    scores = torch.round(scores * 8) / 8  # make ties between beams likely
    nodes = torch.randint(0, n_nodes, (R, B), generator=gen)
    if absent:
        nodes[torch.rand(R, B, generator=gen) < absent] = -1
    return scores, nodes


def _assert_same(got, want, names):
    for g, w, n in zip(got, want, names):
        g = _t(g)
        assert g.dtype == w.dtype, n
        assert torch.equal(g, w), f"{n} differs: {(g != w).sum().item()} entries"


BEAM_NAMES = ("parent", "token", "score", "node")


@pytest.mark.parametrize("R,B_in,B_out,S,density,mode,absent", [
    (1, 1, 1, 5, 0.6, "plain", 0.0),
    (1, 1, 20, 256, 0.9, "plain", 0.0),
    (33, 7, 7, 13, 0.5, "ties", 0.2),
    (33, 20, 20, 61, 0.3, "near", 0.1),
    (33, 7, 64, 13, 0.3, "neginf", 0.3),     # B_out > valid continuations
    (256, 20, 20, 256, 0.05, "plain", 0.0),
    (256, 64, 64, 256, 0.02, "ties", 0.1),
    (7, 5, 3, 1, 1.0, "ties", 0.0),           # S = 1
    (5, 4, 9, 17, 0.0, "plain", 0.0),         # nothing valid: all sentinels
])
def test_beam_step_matches_reference(ext, R, B_in, B_out, S, density, mode, absent):
    gen = torch.Generator().manual_seed(R * 1000 + B_out * 10 + S)
    n_nodes = 50
    children = _random_children(gen, n_nodes, S, density, 10_000)
    lp = _logprobs(gen, R, B_in, S, mode)
    scores, nodes = _beam_state(gen, R, B_in, n_nodes, absent)
    want = ref.beam_select_step(lp, scores, nodes, children, B_out)
    for threads in (0, 1):
        got = ext.beam_select_step(_np(lp), _np(scores), _np(nodes), _np(children), B_out, num_threads=threads)
        _assert_same(got, want, BEAM_NAMES)


def test_beam_step_all_tied_and_neginf(ext):
    """Every candidate has the same score (0 and -inf): order = flat index."""
    children = torch.zeros(3, 8, dtype=torch.int32)
    children[1, ::2] = -1
    nodes = torch.tensor([[0, 1, -1, 2]])
    for fill in (0.0, -math.inf):
        lp = torch.full((1, 4, 8), fill)
        scores = torch.zeros(1, 4)
        want = ref.beam_select_step(lp, scores, nodes, children, 30)
        got = ext.beam_select_step(_np(lp), _np(scores), _np(nodes), _np(children), 30)
        _assert_same(got, want, BEAM_NAMES)
        assert _t(got[0])[0, :4].tolist() == [0, 0, 0, 0] and int((_t(got[0]) >= 0).sum()) == 20


# ---- a Beauty-size trie ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def beauty_trie():
    """12,101 items, random distinct 3-code prefixes drawn from a skewed distribution so that many
    collide (collision code 0, 1, 2, ... per prefix), 256-wide levels."""
    g = torch.Generator().manual_seed(7)
    n = 12_101
    c0 = torch.multinomial(torch.rand(256, generator=g) ** 3, n, replacement=True, generator=g)
    c1 = torch.randint(0, 64, (n,), generator=g)
    c2 = torch.randint(0, 32, (n,), generator=g)
    prefix = torch.stack([c0, c1, c2], 1)
    order = torch.argsort(prefix[:, 0] * 65536 + prefix[:, 1] * 256 + prefix[:, 2], stable=True)
    prefix = prefix[order]
    key = prefix[:, 0] * 65536 + prefix[:, 1] * 256 + prefix[:, 2]
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    start = torch.cummax(torch.where(first, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    c3 = torch.arange(n) - start
    codes = torch.cat([prefix, c3.unsqueeze(1)], 1)
    assert int(c3.max()) < 256 and int((c3 > 0).sum()) > 0
    return Trie.from_codes(codes, level_sizes=(256, 256, 256, 256))


def _live_nodes(table):
    return torch.nonzero((table >= 0).any(1)).flatten()


@pytest.mark.parametrize("level,R,B_in,B_out", [(0, 256, 1, 20), (1, 33, 20, 20), (2, 256, 20, 20),
                                                (3, 33, 20, 64), (1, 1, 64, 7), (2, 1, 7, 1)])
def test_beam_step_full_size_trie(ext, beauty_trie, level, R, B_in, B_out):
    gen = torch.Generator().manual_seed(level * 100 + B_out)
    children = beauty_trie.tables()[level]
    live = _live_nodes(children)
    lp = _logprobs(gen, R, B_in, 256, "plain")
    scores = -torch.rand(R, B_in, generator=gen) * 4
    nodes = live[torch.randint(0, len(live), (R, B_in), generator=gen)]
    want = ref.beam_select_step(lp, scores, nodes, children, B_out)
    got = ext.beam_select_step(_np(lp), _np(scores), _np(nodes), _np(children), B_out)
    _assert_same(got, want, BEAM_NAMES)


# ---- sampling ----------------------------------------------------------------------------------------
SAMPLE_NAMES = ("parent", "token", "score", "node", "phi")


def _sample_case(gen, R, B_in, S, density, mode, absent, T):
    n_nodes = 40
    children = _random_children(gen, n_nodes, S, density, 10_000)
    logits_lp = _logprobs(gen, R, B_in, S, mode)
    tlp = _logprobs(gen, R, B_in, S, mode, temperature=T)
    scores, nodes = _beam_state(gen, R, B_in, n_nodes, absent)
    phi = (-torch.rand(R, B_in, generator=gen, dtype=torch.float64) * 6)
    keys = phi + torch.rand(R, B_in, generator=gen, dtype=torch.float64)
    if mode == "neginf":
        keys[0, 0] = -math.inf
    return logits_lp, tlp, scores, phi, keys, nodes, children


def _check_sample(got, want):
    _assert_same(got[:5], want[:5], SAMPLE_NAMES)
    k_got, k_want = _t(got[5]), want[5]
    assert torch.equal(torch.isinf(k_got), torch.isinf(k_want))
    fin = torch.isfinite(k_want)
    # Keys: float64 transcendental functions of glibc vs torch differ by <= a few ulp.
    torch.testing.assert_close(k_got[fin], k_want[fin], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("R,B_in,B_out,S,density,mode,absent,T", [
    (1, 1, 20, 256, 0.9, "plain", 0.0, 1.0),
    (33, 7, 7, 13, 0.5, "ties", 0.2, 2.0),
    (33, 20, 20, 61, 0.3, "near", 0.1, 0.5),
    (33, 7, 64, 13, 0.3, "neginf", 0.3, 1.5),   # B_out > valid continuations, -inf logits/keys
    (48, 20, 20, 256, 0.05, "plain", 0.0, 1.0),
    (8, 64, 64, 256, 0.03, "plain", 0.1, 3.0),
])
def test_sample_step_matches_reference(ext, R, B_in, B_out, S, density, mode, absent, T):
    gen = torch.Generator().manual_seed(R + B_out + S)
    lp, tlp, scores, phi, keys, nodes, children = _sample_case(gen, R, B_in, S, density, mode, absent, T)
    seed, step = 2 ** 63 + 12345, 2
    row_keys = torch.arange(R, dtype=torch.int64) * 7919 - 5
    want = ref.sample_select_step(lp, tlp, scores, phi, keys, nodes, children, B_out, seed, step, row_keys)
    args = [_np(x) for x in (lp, tlp, scores, phi, keys, nodes, children)]
    # noise made inside the extension (only for valid candidates)
    got = ext.sample_select_step(*args, B_out, seed, step, _np(row_keys))
    _check_sample(got, want)
    # explicit noise: the same Gumbel tensor as the reference
    g = philox.gumbel_noise(seed, step, row_keys, B_in, S)
    got2 = ext.sample_select_step(*args, B_out, seed, step, _np(row_keys), gumbel=_np(g), num_threads=1)
    _check_sample(got2, want)


def test_sample_row_keys_make_rows_independent(ext):
    """The same row key gives the same sample whatever the batch position (counter-based RNG)."""
    gen = torch.Generator().manual_seed(3)
    lp, tlp, scores, phi, keys, nodes, children = _sample_case(gen, 1, 4, 32, 0.5, "plain", 0.0, 1.0)
    rep = lambda x: x.expand(5, *x.shape[1:]).contiguous()
    args = [_np(rep(x)) for x in (lp, tlp, scores, phi, keys, nodes)] + [_np(children)]
    out = ext.sample_select_step(*args, 8, 99, 1, np.array([4, 9, 4, 4, 9], dtype=np.int64))
    p = _t(out[1])
    assert torch.equal(p[0], p[2]) and torch.equal(p[0], p[3]) and torch.equal(p[1], p[4])
    assert not torch.equal(p[0], p[1])


# ---- end to end through the reference decoding loop --------------------------------------------------
class _FakeModel:
    """Deterministic logits from the decoded prefix: logits = sum_i W[i, token_i] @ U + bias.
    step_fn(parent, tokens) follows the reference's calling convention (parent reorders the rows)."""

    def __init__(self, R, V, seed):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(6, V, 16, generator=g)
        self.U = torch.randn(16, V, generator=g) * 2
        self.base = torch.randn(R, 1, 16, generator=g)
        self.h = None
        self.pos = 0

    def __call__(self, parent, tokens):
        R, B = tokens.shape
        if parent is None:
            self.h = self.base.expand(R, B, 16).clone()
        else:
            self.h = torch.gather(self.h, 1, parent.clamp(min=0).unsqueeze(-1).expand(R, B, 16))
        self.h = self.h + self.W[self.pos][tokens]
        self.pos += 1
        return self.h @ self.U


class _ExtSteps:
    def __init__(self, ext):
        self.ext = ext

    def beam(self, lp, scores, nodes, children, num_out):
        return tuple(_t(o) for o in self.ext.beam_select_step(_np(lp), _np(scores), _np(nodes), _np(children), num_out))

    def sample(self, lp, tlp, scores, phi, keys, nodes, children, num_out, seed, step, row_keys):
        return tuple(_t(o) for o in self.ext.sample_select_step(
            _np(lp), _np(tlp), _np(scores), _np(phi), _np(keys), _np(nodes), _np(children), num_out, seed,
            step, _np(row_keys)))


@pytest.mark.parametrize("R,B,temperature", [(1, 20, None), (33, 7, None), (96, 20, None),
                                             (5, 20, 1.0), (9, 7, (2.0, 1.5, 0.5, 0.3)), (1, 64, None)])
def test_decode_end_to_end(ext, beauty_trie, R, B, temperature):
    from tiger_fast.layout import TokenLayout
    layout = TokenLayout()
    children = beauty_trie.tables()
    steps = _ExtSteps(ext)
    outs = []
    for beam_step, sample_step in ((ref.beam_select_step, ref.sample_select_step), (steps.beam, steps.sample)):
        model = _FakeModel(R, layout.vocab_size, seed=R + B)
        outs.append(ref.constrained_decode(model, children, layout, R, B, temperature=temperature, seed=5,
                                           beam_step=beam_step, sample_step=sample_step))
    a, b = outs
    assert torch.equal(a.codes, b.codes) and torch.equal(a.rows, b.rows) and torch.equal(a.scores, b.scores)
    assert bool((a.rows >= 0).all())  # the catalogue has far more than B items


# ---- bad input ---------------------------------------------------------------------------------------
def _good(R=2, B=3, S=5, n=4):
    lp = torch.log_softmax(torch.randn(R, B, S), -1)
    return dict(logprobs=_np(lp), beam_scores=np.zeros((R, B), np.float32),
                beam_nodes=np.zeros((R, B), np.int64), children=np.zeros((n, S), np.int32))


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(logprobs=a["logprobs"].astype(np.float64)), TypeError, "logprobs must have dtype float32"),
    (lambda a: a.update(beam_nodes=a["beam_nodes"].astype(np.int32)), TypeError, "beam_nodes must have dtype int64"),
    (lambda a: a.update(children=a["children"].astype(np.int64)), TypeError, "children must have dtype int32"),
    (lambda a: a.update(logprobs=a["logprobs"].tolist()), TypeError, "logprobs must be a numpy array"),
    (lambda a: a.update(logprobs=np.ascontiguousarray(a["logprobs"][:, :, ::2])), ValueError, "children must have shape"),
    (lambda a: a.update(logprobs=np.asfortranarray(a["logprobs"])), ValueError, "C-contiguous"),
    (lambda a: a.update(logprobs=a["logprobs"][0]), ValueError, "logprobs must have 3 dimensions"),
    (lambda a: a.update(beam_scores=np.zeros((2, 4), np.float32)), ValueError, "beam_scores must have shape"),
    (lambda a: a.update(beam_nodes=np.zeros((3, 3), np.int64)), ValueError, "beam_nodes must have shape"),
    (lambda a: a["beam_nodes"].__setitem__((1, 2), 4), ValueError, r"beam_nodes\[1, 2\] = 4"),
    (lambda a: a["beam_nodes"].__setitem__((0, 1), -2), ValueError, r"beam_nodes\[0, 1\] = -2"),
    (lambda a: a["beam_nodes"].__setitem__((0, 0), 2 ** 62), ValueError, "is not a node"),
    (lambda a: a["logprobs"].__setitem__((1, 0, 3), np.nan), ValueError, "NaN"),
    (lambda a: a["beam_scores"].__setitem__((0, 2), np.nan), ValueError, "NaN"),
    (lambda a: a.update(num_out=0), ValueError, "num_out must be >= 1"),
    (lambda a: a.update(num_out=-3), ValueError, "num_out must be >= 1"),
])
def test_beam_step_bad_input(ext, change, exc, match):
    a = _good()
    a["num_out"] = 4
    change(a)
    with pytest.raises(exc, match=match):
        ext.beam_select_step(a["logprobs"], a["beam_scores"], a["beam_nodes"], a["children"], a["num_out"])


def test_nan_at_masked_position_does_not_change_the_result(ext):
    """Documented difference: the C++ step raises for NaN only where the trie allows a continuation
    (a masked NaN cannot influence the result; reading every entry would double the step's memory
    traffic).  The reference raises for any NaN; tiger_fast.generate rejects NaN logits first."""
    a = _good()
    a["children"][:, 1] = -1
    clean = ext.beam_select_step(a["logprobs"], a["beam_scores"], a["beam_nodes"], a["children"], 4)
    a["logprobs"][:, :, 1] = np.nan
    dirty = ext.beam_select_step(a["logprobs"], a["beam_scores"], a["beam_nodes"], a["children"], 4)
    for c, d in zip(clean, dirty):
        assert np.array_equal(c, d)
    a["beam_nodes"][1, 1] = -1
    a["beam_scores"][1, 1] = np.nan  # an absent beam's score is never read
    ext.beam_select_step(a["logprobs"], a["beam_scores"], a["beam_nodes"], a["children"], 4)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(seed=-1), ValueError, "seed must be an int in"),
    (dict(seed=2 ** 64), ValueError, "seed must be an int in"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(step=-1), ValueError, "step must be in"),
    (dict(step=2 ** 32), ValueError, "step must be in"),
    (dict(row_keys=np.zeros(3, np.int64)), ValueError, "row_keys must have shape"),
    (dict(row_keys=np.zeros(2, np.int32)), TypeError, "row_keys must have dtype int64"),
    (dict(gumbel=np.zeros((2, 3, 4))), ValueError, "gumbel must have the shape"),
    (dict(gumbel=np.zeros((2, 3, 5), np.float32)), TypeError, "gumbel must have dtype float64"),
    (dict(gumbel=np.full((2, 3, 5), np.nan)), ValueError, "NaN"),
    (dict(beam_phi=np.zeros((2, 3), np.float32)), TypeError, "beam_phi must have dtype float64"),
    (dict(beam_keys=np.zeros((2, 2))), ValueError, "beam_keys must have shape"),
    (dict(tempered=np.zeros((2, 3, 4), np.float32)), ValueError, "tempered must have the shape"),
    (dict(tempered=np.full((2, 3, 5), np.nan, np.float32)), ValueError, "NaN"),
    (dict(num_threads=-1), ValueError, "num_threads"),
])
def test_sample_step_bad_input(ext, kw, exc, match):
    a = _good()
    args = dict(logprobs=a["logprobs"], tempered=a["logprobs"].copy(), beam_scores=a["beam_scores"],
                beam_phi=np.zeros((2, 3)), beam_keys=np.zeros((2, 3)), beam_nodes=a["beam_nodes"],
                children=a["children"], num_out=4, seed=1, step=0, row_keys=np.arange(2, dtype=np.int64))
    args.update(kw)
    with pytest.raises(exc, match=match):
        ext.sample_select_step(**args)


def test_philox_bad_input(ext):
    with pytest.raises(ValueError, match="seed"):
        ext.philox_word0(-5, 0, np.zeros(1, np.int64), 1, 1)
    with pytest.raises(TypeError, match="row_keys"):
        ext.philox_word0(0, 0, [1, 2], 1, 1)


# ---- CUDA: availability and the sources compile ------------------------------------------------------
def test_cuda_availability_is_reported(ext):
    avail = ext.cuda_available()
    reason = ext.cuda_unavailable_reason()
    assert isinstance(avail, bool) and isinstance(reason, str)
    assert avail == (reason == "")
    if not avail:
        with pytest.raises(RuntimeError, match="CUDA backend unavailable"):
            ext.cuda_beam_select_step(1, 1, 1, 1, 1, 1, 4, 1, 1, 1, 1, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="sizes"):
        ext.cuda_beam_select_step(1, 1, 1, 1, -1, 1, 4, 1, 1, 1, 1, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="num_out <= 1024"):
        ext.cuda_beam_select_step(1, 1, 1, 1, 1, 1, 4, 1, 2000, 1, 1, 1, 1, 1, 1, 0)


def _nvcc():
    for c in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), shutil.which("nvcc") or "",
              "/usr/local/cuda/bin/nvcc"):
        if c and os.path.exists(c):
            return c
    return None


def test_cuda_sources_compile(tmp_path):
    """A CUDA build break must not land even though CI has no GPU: compile for sm_90 with nvcc."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH); CUDA sources not compiled")
    srcs = sorted(glob.glob(os.path.join(ROOT, "csrc", "generate_*.cu")))
    assert srcs, "csrc/generate_cuda.cu is missing"
    for src in srcs:
        obj = tmp_path / (os.path.basename(src) + ".o")
        cmd = [nvcc, "-c", src, "-o", str(obj), "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
               "-I", os.path.join(ROOT, "csrc"), "-gencode", "arch=compute_90,code=sm_90"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"nvcc failed:\n{p.stderr[-4000:]}"
        assert obj.stat().st_size > 0


# ---- native faults (issue 14, item 5) ------------------------------------------------------------
# Zero-size arrays with a huge S made sample_select_step size a scratch buffer of S doubles inside
# its OpenMP region; the std::bad_alloc left the region and aborted the process (SIGABRT).  Run in a
# subprocess so that an abort is reported as a failure instead of killing pytest.
_ZERO_SIZE_HUGE_S = r"""
import sys
import numpy as np
from tiger_fast import _generate_ext as ext
R, B, S, K = 3, 0, 2 ** 40, 5
lp = np.zeros((R, B, S), np.float32)
z2 = lambda dt: np.zeros((R, B), dt)
kids = np.zeros((0, S), np.int32)
outs = [ext.sample_select_step(lp, lp, z2(np.float32), z2(np.float64), z2(np.float64), z2(np.int64), kids,
                               K, 0, 0, np.zeros(R, np.int64), num_threads=2),
        ext.beam_select_step(lp, z2(np.float32), z2(np.int64), kids, K, num_threads=2)]
for o in outs:
    assert o[0].shape == (R, K) and (o[0] == -1).all() and (o[1] == -1).all() and (o[3] == -1).all(), o
    assert np.isneginf(o[2]).all()
print("OK")
"""


def test_zero_size_arrays_with_huge_S_do_not_abort(ext):
    p = subprocess.run([sys.executable, "-c", _ZERO_SIZE_HUGE_S], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip() == "OK", (p.returncode, p.stderr[-2000:])


@pytest.mark.parametrize("R,B,S", [(1, 0, 1), (2, 1, 3), (7, 0, 2 ** 31)])
def test_outputs_beyond_memory_raise_memory_error(ext, R, B, S):
    """num_out so large that the (R, num_out) outputs cannot fit: MemoryError naming num_out, before
    anything is allocated (no lazily-committed buffer whose padding writes get the process killed)."""
    lp = np.zeros((R, B, S), np.float32)
    kids = np.full((1, S), -1, np.int32) if S < 2 ** 20 else np.zeros((0, S), np.int32)
    z2 = lambda dt: np.zeros((R, B), dt)
    huge = 2 ** 40
    with pytest.raises(MemoryError, match="num_out"):
        ext.beam_select_step(lp, z2(np.float32), z2(np.int64), kids, huge)
    with pytest.raises(MemoryError, match="num_out"):
        ext.sample_select_step(lp, lp, z2(np.float32), z2(np.float64), z2(np.float64), z2(np.int64), kids, huge,
                               0, 0, np.zeros(R, np.int64))
