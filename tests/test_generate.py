"""Trie-constrained decoding: reference steps vs brute force / plain-Python beam search / HF generate,
stochastic beam search statistics and RNG keys, in-place trie updates, bad input."""
import math

import numpy as np
import pytest
import torch

from tiger_fast.generate import GenerateResult, backend_status, generate
from tiger_fast.ids import IdTable
from tiger_fast.layout import TokenLayout
from tiger_fast.philox import gumbel_noise, philox4x32_10, philox_word0
from tiger_fast.reference.generate import (beam_select_step, constrained_decode, eos_rerank,
                                           sample_select_step, truncated_gumbel_keys)
from tiger_fast.trie import Trie

LAYOUT = TokenLayout(codebook_sizes=(3, 4, 5), collision_size=3, num_user_tokens=7)  # V = 24
L = LAYOUT.num_levels
OFFSETS = torch.tensor([LAYOUT.level_offset(l) for l in range(L)])


def unique_codes(n, sizes=LAYOUT.level_sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.unique(torch.stack([torch.randint(0, s, (6 * n,), generator=g) for s in sizes], 1), dim=0)
    codes = codes[torch.randperm(codes.shape[0], generator=g)][:n]
    assert codes.shape[0] == n
    return codes


def cpu_ext_available():
    return backend_status()["cpu"] == ""




STEP_BACKENDS = ["reference"] + (["cpu"] if cpu_ext_available() else [])


# ---- a toy decoder whose logits are an exact function of (row, prefix) --------------------------------
class ToyLM:
    """logits(row r, prefix t_0..t_p) = E[r] + sum_p W[p, t_p] (float32 adds in a fixed order), so a
    row's logits are bitwise the same whatever the batch, and brute force can recompute them.
    ``quant`` rounds the tables to multiples of 1/quant (exact ties)."""

    def __init__(self, E, seed=0, quant=None, scale=1.5):
        g = torch.Generator().manual_seed(seed)
        V = LAYOUT.vocab_size
        self.E = E
        W = torch.randn(L + 2, V, V, generator=g) * scale
        if quant is not None:
            W = torch.round(W * quant) / quant
            W = W * (torch.rand(W.shape, generator=g) < 0.5)  # many exact zeros -> ties across beams
        self.W = W
        self.prefix = None
        self.calls = 0

    @staticmethod
    def random_E(R, seed=0, quant=None):
        g = torch.Generator().manual_seed(seed + 1000)
        E = torch.randn(R, LAYOUT.vocab_size, generator=g) * 2
        return torch.round(E * quant) / quant if quant is not None else E

    def logits_of(self, rows, prefix):
        """rows int64 (N,), prefix int64 (N, t) -> float32 (N, V)."""
        h = self.E[rows].clone()
        for p in range(prefix.shape[1]):
            h = h + self.W[p, prefix[:, p]]
        return h

    def __call__(self, parent, tokens):
        R, B = tokens.shape
        if parent is None:
            self.prefix = tokens.unsqueeze(-1)
        else:
            prev = torch.gather(self.prefix, 1, parent.clamp(min=0).unsqueeze(-1).expand(R, B, self.prefix.shape[2]))
            self.prefix = torch.cat([prev, tokens.unsqueeze(-1)], 2)
        self.calls += 1
        rows = torch.arange(R).repeat_interleave(B)
        return self.logits_of(rows, self.prefix.reshape(R * B, -1)).view(R, B, -1)


def brute_force(lm, codes, R, use_eos):
    """Score every full ID by teacher forcing: float32 (R, N) sums of full-vocab log-probs
    (masked-not-renormalised), the eos term last when use_eos."""
    N = codes.shape[0]
    toks = torch.cat([torch.full((N, 1), LAYOUT.decoder_start_id), codes + OFFSETS], 1)
    out = torch.zeros(R, N, dtype=torch.float32)
    for r in range(R):
        rows = torch.full((N,), r)
        s = torch.zeros(N, dtype=torch.float32)
        for l in range(L):
            lp = torch.log_softmax(lm.logits_of(rows, toks[:, :l + 1]), -1)
            s = s + lp[torch.arange(N), toks[:, l + 1]]
        if use_eos:
            s = s + torch.log_softmax(lm.logits_of(rows, toks), -1)[:, LAYOUT.eos_id]
        out[r] = s
    return out


def py_beam_search(lm, trie, R, B, use_eos):
    """Plain-Python statement of the contract (docs/contracts.md): keep the B best valid prefixes by float32
    running score, ties by (parent beam, token); then eos re-rank, ties by beam index."""
    results = []
    for r in range(R):
        beams = [(np.float32(0.0), (), 0)]  # score, codes, node
        for l in range(L):
            cands = []
            for b, (s, pre, node) in enumerate(beams):
                toks = torch.tensor([[LAYOUT.decoder_start_id] + [int(c) + int(OFFSETS[i]) for i, c in enumerate(pre)]])
                lp = torch.log_softmax(lm.logits_of(torch.tensor([r]), toks), -1)[0]
                for t in range(LAYOUT.level_sizes[l]):
                    child = int(trie.children[l][node, t])
                    if child >= 0:
                        cands.append((np.float32(s + np.float32(lp[int(OFFSETS[l]) + t])), b, t, pre + (t,), child))
            cands.sort(key=lambda c: (-float(c[0]), c[1], c[2]))
            beams = [(c[0], c[3], c[4]) for c in cands[:B]]
        if use_eos:
            ranked = []
            for b, (s, pre, node) in enumerate(beams):
                toks = torch.tensor([[LAYOUT.decoder_start_id] + [int(c) + int(OFFSETS[i]) for i, c in enumerate(pre)]])
                lp = torch.log_softmax(lm.logits_of(torch.tensor([r]), toks), -1)[0]
                ranked.append((np.float32(s + np.float32(lp[LAYOUT.eos_id])), b, pre, node))
            ranked.sort(key=lambda c: (-float(c[0]), c[1]))
            beams = [(c[0], c[2], c[3]) for c in ranked]
        results.append(beams)
    return results


def selector(backend):
    if backend == "reference":
        return beam_select_step, sample_select_step
    from tiger_fast.generate import _selector
    b, s, _ = _selector("cpu", torch.device("cpu"))
    return b, s


# ---- (a) exhaustive decode == brute-force enumeration --------------------------------------------------
@pytest.mark.parametrize("use_eos", [True, False])
@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_exhaustive_decode_equals_brute_force(use_eos, backend):
    codes = unique_codes(23)
    trie = Trie.from_codes(codes, level_sizes=LAYOUT.level_sizes)
    R = 5
    lm = ToyLM(ToyLM.random_E(R, seed=1), seed=2)
    want = brute_force(lm, codes, R, use_eos)
    bstep, sstep = selector(backend)
    # Beams >= number of items: beam search is exhaustive, so it must rank every ID exactly.
    out = constrained_decode(lm, trie.tables(), LAYOUT, R, codes.shape[0], use_eos=use_eos,
                             beam_step=bstep, sample_step=sstep)
    order = torch.sort(want, dim=1, descending=True, stable=True)
    assert (order.values[:, :-1] > order.values[:, 1:]).all()  # no exact ties in this instance
    assert torch.equal(out.rows, order.indices)
    assert torch.equal(out.scores, order.values)  # same float32 adds in the same order: bit-exact
    assert torch.equal(out.codes, codes[order.indices])
    assert lm.calls == L + (1 if use_eos else 0)


@pytest.mark.parametrize("quant", [None, 1])
@pytest.mark.parametrize("use_eos", [True, False])
@pytest.mark.parametrize("B", [1, 2, 3, 7])
def test_narrow_beams_equal_python_spec(quant, use_eos, B):
    """Narrow beams (pruning matters) and exact ties (quantised logits): the reference (and the
    C++ step when built) equal a plain-Python statement of the contract, token for token."""
    codes = unique_codes(31, seed=4)
    trie = Trie.from_codes(codes, level_sizes=LAYOUT.level_sizes)
    R = 3
    E = ToyLM.random_E(R, seed=5, quant=quant)
    want = py_beam_search(ToyLM(E, seed=6, quant=quant), trie, R, B, use_eos)
    for backend in STEP_BACKENDS:
        bstep, sstep = selector(backend)
        out = constrained_decode(ToyLM(E, seed=6, quant=quant), trie.tables(), LAYOUT, R, B, use_eos=use_eos,
                                 beam_step=bstep, sample_step=sstep)
        for r in range(R):
            assert [tuple(c) for c in out.codes[r].tolist()] == [w[1] for w in want[r]], backend
            assert out.scores[r].tolist() == [float(w[0]) for w in want[r]], backend
            assert out.rows[r].tolist() == [w[2] for w in want[r]], backend
    if quant is not None:  # the instance really has exact ties between distinct prefixes
        assert _has_prefix_ties(ToyLM(E, seed=6, quant=quant), codes, R)


def _has_prefix_ties(lm, codes, R):
    toks = torch.cat([torch.zeros(codes.shape[0], 1, dtype=torch.long), codes + OFFSETS], 1)
    for r in range(R):
        s = torch.zeros(codes.shape[0])
        for l in range(L):
            s = s + torch.log_softmax(lm.logits_of(torch.full((codes.shape[0],), r), toks[:, :l + 1]), -1)[
                torch.arange(codes.shape[0]), toks[:, l + 1]]
            prefixes = {}
            for c, v in zip(codes[:, :l + 1].tolist(), s.tolist()):
                prefixes[tuple(c)] = v
            if len(set(prefixes.values())) < len(prefixes):
                return True
    return False


# ---- selection step edge cases --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_step_more_beams_than_candidates_pads(backend):
    bstep, sstep = selector(backend)
    children = torch.tensor([[-1, 4, -1, 7], [0, -1, -1, -1]], dtype=torch.int32)
    lp = torch.log_softmax(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)), -1)
    scores = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -math.inf]])
    nodes = torch.tensor([[0, -1, 1], [1, 1, -1]])
    parent, token, score, node = bstep(lp, scores, nodes, children, 5)
    # row 0: beam 0 -> tokens 1, 3; beam 2 -> token 0 (3 candidates); row 1: beams 0, 1 -> token 0
    assert parent[0, 3:].tolist() == [-1, -1] and token[0, 3:].tolist() == [-1, -1]
    assert node[0, 3:].tolist() == [-1, -1] and torch.isneginf(score[0, 3:]).all()
    assert sorted(zip(parent[0, :3].tolist(), token[0, :3].tolist())) == [(0, 1), (0, 3), (2, 0)]
    assert sorted(zip(parent[1, :2].tolist(), token[1, :2].tolist())) == [(0, 0), (1, 0)]
    assert (parent[1, 2:] == -1).all()
    exp = scores[0, 0] + lp[0, 0, 1]
    assert score[0][(parent[0] == 0) & (token[0] == 1)].item() == exp.item()
    # sampling pads the same way and never picks a masked candidate
    out = sstep(lp, lp, scores, scores.double(), torch.zeros(2, 3, dtype=torch.float64), nodes, children, 5,
                3, 0, torch.tensor([4, 9]))
    assert torch.equal(out[0] >= 0, parent >= 0) and torch.isneginf(out[5][parent < 0]).all()
    assert sorted(zip(out[0][0, :3].tolist(), out[1][0, :3].tolist())) == [(0, 1), (0, 3), (2, 0)]


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_step_ties_by_flat_index_and_neg_inf_valid(backend):
    bstep, _ = selector(backend)
    S = 5
    children = torch.arange(2 * S, dtype=torch.int32).view(2, S)
    children[1, 2] = -1
    lp = torch.full((1, 2, S), -1.0)
    lp[0, 0, 4] = -math.inf  # valid but impossible: ranked after every finite candidate
    scores = torch.tensor([[-0.5, -0.5]])
    parent, token, score, node = bstep(lp, scores, torch.tensor([[0, 1]]), children, 10)
    flat = torch.where(parent >= 0, parent * S + token, -1)[0].tolist()
    assert flat == [0, 1, 2, 3, 5, 6, 8, 9, 4, -1]
    assert torch.isneginf(score[0, 8]) and node[0, 8].item() == 4
    assert node[0, :3].tolist() == [0, 1, 2]


def test_step_rejects_bad_arguments():
    children = torch.zeros(1, 3, dtype=torch.int32)
    lp = torch.zeros(1, 1, 3)
    ok = (lp, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), children, 2)
    beam_select_step(*ok)
    bad = [((lp.double(),) + ok[1:], TypeError, "logprobs"),
           ((lp, torch.zeros(1, 2)) + ok[2:], TypeError, "beam_scores"),
           (ok[:2] + (torch.tensor([[3]]),) + ok[3:], ValueError, "beam_nodes"),
           (ok[:3] + (children.long(),) + ok[4:], TypeError, "children"),
           (ok[:4] + (0,), ValueError, "num_out"),
           ((torch.full((1, 1, 3), math.nan),) + ok[1:], ValueError, "NaN")]
    for args, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            beam_select_step(*args)


def test_eos_rerank():
    scores = torch.tensor([[-1.0, -2.0, -3.0, -math.inf]])
    eos = torch.tensor([[-3.0, -1.0, -1.0, 0.0]])
    valid = torch.tensor([[True, True, True, False]])
    order, new = eos_rerank(scores, eos, valid)
    assert order.tolist() == [[1, 0, 2, 3]] and new.tolist() == [[-3.0, -4.0, -4.0, -math.inf]]
    order, new = eos_rerank(scores, eos, valid, resort=False)
    assert order.tolist() == [[0, 1, 2, 3]]


def test_truncated_gumbel_keys_condition_on_parent():
    """The max child key equals the parent key exactly; keys are monotone in the perturbed value;
    -inf children / parents give -inf; no NaN."""
    g = torch.Generator().manual_seed(0)
    pert = torch.randn(4, 3, 6, generator=g, dtype=torch.float64) * 5
    pert[0, 0, 2] = -math.inf
    valid = torch.rand(4, 3, 6, generator=g) < 0.7
    valid[:, :, 0] = True
    parent = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
    parent[1, 1] = -math.inf
    keys = truncated_gumbel_keys(pert, valid, parent)
    assert not torch.isnan(keys).any()
    mx = torch.where(valid, keys, torch.tensor(-math.inf, dtype=torch.float64)).amax(-1)
    ok = torch.isfinite(parent)
    assert torch.equal(mx[ok], parent[ok]) and torch.isneginf(keys[1, 1]).all()
    assert torch.isneginf(keys[0, 0, 2])
    for i, j in [(0, 1), (2, 2), (3, 0)]:
        v = valid[i, j]
        o = torch.argsort(pert[i, j][v])
        assert (torch.diff(keys[i, j][v][o]) >= 0).all()
        assert (keys[i, j][v] <= parent[i, j]).all()
    # exp(-key) = exp(-T) - exp(-Z) + exp(-G') (Kool et al. eq. 23), checked where well conditioned
    T, Z = parent[2, 2].item(), pert[2, 2][valid[2, 2]].max().item()
    for t in valid[2, 2].nonzero()[:, 0].tolist():
        want = -math.log(math.exp(-T) - math.exp(-Z) + math.exp(-pert[2, 2, t].item()))
        assert abs(keys[2, 2, t].item() - want) < 1e-9 * max(1.0, abs(want))


# ---- (c) sampling -------------------------------------------------------------------------------------
def test_sampling_reproducible_and_row_keys_independent_of_batch():
    codes = unique_codes(29, seed=8)
    trie = Trie.from_codes(codes, level_sizes=LAYOUT.level_sizes)
    R = 7
    E = ToyLM.random_E(R, seed=9)
    keys = torch.tensor([11, -5, 2 ** 40 + 3, 0, 7, 123456789, 3], dtype=torch.int64)
    temps = [0.7, 2.0, 1.0, 1.3]
    run = lambda E_, rk, seed: constrained_decode(ToyLM(E_, seed=10), trie.tables(), LAYOUT, E_.shape[0], 4,
                                                  temperature=temps, seed=seed, row_keys=rk)
    a = run(E, keys, 17)
    b = run(E, keys, 17)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scores, b.scores)
    perm = torch.tensor([4, 1, 6, 0])  # a subset, in another order
    c = run(E[perm], keys[perm], 17)
    assert torch.equal(c.codes, a.codes[perm]) and torch.equal(c.scores, a.scores[perm])
    assert torch.equal(c.rows, a.rows[perm])
    d = run(E, keys, 18)
    assert not torch.equal(d.codes, a.codes)  # another seed, another sample
    # extra beams change nothing: the top-k keys' ancestors always rank within the first k slots
    wide = constrained_decode(ToyLM(E, seed=10), trie.tables(), LAYOUT, R, 9, temperature=temps, seed=17,
                              row_keys=keys)
    assert torch.equal(wide.codes[:, :4], a.codes) and torch.equal(wide.scores[:, :4], a.scores)
    # every sample is a valid, distinct ID; the score is the untempered log-prob sum (+ eos)
    assert (a.rows >= 0).all() and torch.equal(codes[a.rows], a.codes)
    assert all(len(set(r.tolist())) == 4 for r in a.rows)
    bf = brute_force(ToyLM(E, seed=10), codes, R, True)
    assert torch.equal(a.scores, torch.gather(bf, 1, a.rows))


def _bernstein_halfwidth(n, p, log_term):
    """t with P(|X - n p| >= t) <= 2 exp(-t^2 / (2 (n p (1 - p) + t / 3))) = exp(-log_term) * 2."""
    v = n * p * (1 - p)
    a = 2 * log_term
    return (a / 3 + math.sqrt((a / 3) ** 2 + 4 * a * v)) / 2


def test_sampling_frequencies_match_tempered_masked_distribution():
    """Stochastic beam search with k = 3: slot 0 is a sample from q (the per-level tempered softmax
    renormalised over valid codes), slot 1 the second draw without replacement (Plackett-Luce).
    Bernstein bound per (slot, ID), union bound: false-failure probability < 1e-6 (ideal RNG)."""
    codes = unique_codes(14, seed=12)
    trie = Trie.from_codes(codes, level_sizes=LAYOUT.level_sizes)
    N, n = codes.shape[0], 12000
    temps = [0.6, 2.5, 1.0, 0.8]
    E1 = ToyLM.random_E(1, seed=13) * 0.5
    lm = ToyLM(E1.expand(n, -1), seed=14, scale=0.7)
    out = constrained_decode(lm, trie.tables(), LAYOUT, n, 3, temperature=temps, seed=99,
                             row_keys=torch.arange(n, dtype=torch.int64) * 7919)
    assert (out.rows >= 0).all() and all(out.rows[:, 0] != out.rows[:, 1])
    # q(y) = prod_l softmax(logits_l / T_l) over the valid children of the prefix
    q = torch.ones(N, dtype=torch.float64)
    toks = torch.cat([torch.zeros(N, 1, dtype=torch.long), codes + OFFSETS], 1)
    for l in range(L):
        logits = lm.logits_of(torch.zeros(N, dtype=torch.long), toks[:, :l + 1]).double() / temps[l]
        node = torch.zeros(N, dtype=torch.long)
        for j in range(l):
            node = trie.children[j][node, codes[:, j]].long()
        valid = trie.children[l][node] >= 0
        block = logits[:, OFFSETS[l]:OFFSETS[l] + LAYOUT.level_sizes[l]].masked_fill(~valid, -math.inf)
        q *= torch.softmax(block, -1)[torch.arange(N), codes[:, l]]
    assert abs(q.sum().item() - 1) < 1e-9
    q2 = torch.zeros(N, dtype=torch.float64)  # P(second draw = y) = sum_x q(x) q(y) / (1 - q(x))
    for x in range(N):
        w = q * q[x] / (1 - q[x])
        w[x] = 0
        q2 += w
    log_term = math.log(2 * 2 * N / 1e-6)
    for slot, p in ((0, q), (1, q2)):
        counts = torch.bincount(out.rows[:, slot], minlength=N).double()
        for y in range(N):
            assert abs(counts[y] - n * p[y]) <= _bernstein_halfwidth(n, p[y].item(), log_term), (slot, y)
    # power check: the untempered distribution is rejected by the same bound
    q_untempered = torch.ones(N, dtype=torch.float64)
    for l in range(L):
        logits = lm.logits_of(torch.zeros(N, dtype=torch.long), toks[:, :l + 1]).double()
        node = torch.zeros(N, dtype=torch.long)
        for j in range(l):
            node = trie.children[j][node, codes[:, j]].long()
        block = logits[:, OFFSETS[l]:OFFSETS[l] + LAYOUT.level_sizes[l]].masked_fill(~(trie.children[l][node] >= 0), -math.inf)
        q_untempered *= torch.softmax(block, -1)[torch.arange(N), codes[:, l]]
    counts = torch.bincount(out.rows[:, 0], minlength=N).double()
    assert any(abs(counts[y] - n * q_untempered[y]) > _bernstein_halfwidth(n, q_untempered[y].item(), log_term)
               for y in range(N))


def test_sampling_all_items_when_beams_cover_catalogue():
    codes = unique_codes(11, seed=15)
    trie = Trie.from_codes(codes, level_sizes=LAYOUT.level_sizes)
    out = constrained_decode(ToyLM(ToyLM.random_E(2, seed=16), seed=17), trie.tables(), LAYOUT, 2, 13,
                             temperature=1.0, seed=1, use_eos=False)
    for r in range(2):
        assert sorted(out.rows[r, :11].tolist()) == list(range(11)) and (out.rows[r, 11:] == -1).all()


def test_sample_step_uses_documented_philox_noise():
    g = torch.Generator().manual_seed(0)
    R, B, S = 3, 2, 5
    lp = torch.log_softmax(torch.randn(R, B, S, generator=g), -1)
    children = torch.arange(2 * S, dtype=torch.int32).view(2, S)
    nodes = torch.tensor([[0, 1], [1, -1], [0, 0]])
    args = (lp, lp, torch.zeros(R, B), torch.zeros(R, B, dtype=torch.float64), torch.zeros(R, B, dtype=torch.float64),
            nodes, children, 4, 2 ** 33 + 5, 2, torch.tensor([5, 6, -7]))
    a = sample_select_step(*args)
    noise = gumbel_noise(2 ** 33 + 5, 2, torch.tensor([5, 6, -7]), B, S)
    b = sample_select_step(*args, gumbel=noise)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the noise is -log(-log((x0 + 0.5) 2^-32)) of Philox word 0 at counter (b*S+t, step, key lo, hi)
    x0 = philox4x32_10((1 * S + 1, 2, (-7) & 0xFFFFFFFF, ((-7) >> 32) & 0xFFFFFFFF),
                       ((2 ** 33 + 5) & 0xFFFFFFFF, (2 ** 33 + 5) >> 32))[0]
    assert int(philox_word0(2 ** 33 + 5, 2, torch.tensor([-7]), B, S)[0, 1, 1]) == int(x0)
    assert noise[2, 1, 1].item() == -math.log(-math.log((int(x0) + 0.5) / 2 ** 32))


# ---- real models: our T5 and Hugging Face ---------------------------------------------------------------
def tiny_catalogue(n=40, seed=0):
    codes = unique_codes(n, seed=seed)
    item_ids = torch.arange(1000, 1000 + n) * 3  # external ids are not row numbers
    return IdTable(LAYOUT, item_ids, codes)


def tiny_t5(seed=1):
    from tiger_fast.t5 import T5, T5Config

    cfg = T5Config(vocab_size=LAYOUT.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                   num_encoder_layers=1, num_decoder_layers=2, dropout=0.0)
    return T5(cfg, seed=seed)


def tiny_hf(seed=3):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=LAYOUT.vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                num_decoder_layers=2, num_heads=2, feed_forward_proj="relu", dropout_rate=0.0,
                                decoder_start_token_id=LAYOUT.decoder_start_id, pad_token_id=LAYOUT.pad_id,
                                eos_token_id=LAYOUT.eos_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # HF initialises from the global RNG; keep that local to this test
        model = transformers.T5ForConditionalGeneration(cfg)
        # larger-than-default weights so the log-probs are spread out (no near-ties)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(4.0)
    return model.eval()


HISTORIES = [[3000, 3003, 3006], [3030], [3051, 3000, 3060, 3006]]
USERS = [5, "u-17", 9]


def t5_brute_force(model, table, histories, users, use_eos):
    """Teacher-forced (T5.forward on whole sequences, not the incremental path) log-probs of every ID."""
    from tiger_fast.decoding import encoder_batch

    ids, mask = encoder_batch(LAYOUT, table, histories, users, 20, torch.device("cpu"))
    N = len(table)
    tgt = LAYOUT.codes_to_tokens(table.codes)
    dec = torch.cat([torch.zeros(N, 1, dtype=torch.long), tgt], 1)
    labels = torch.cat([tgt, torch.full((N, 1), LAYOUT.eos_id)], 1)
    T = L + (1 if use_eos else 0)
    out = []
    with torch.no_grad():
        for r in range(ids.shape[0]):
            logits = model(ids[r:r + 1].expand(N, -1), mask[r:r + 1].expand(N, -1), dec[:, :T])
            lp = torch.log_softmax(logits.float(), -1)
            tok = torch.gather(lp, 2, labels[:, :T, None])[..., 0]
            s = torch.zeros(N)
            for t in range(T):
                s = s + tok[:, t]
            out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("use_eos", [True, False])
def test_generate_t5_equals_brute_force(use_eos):
    table = tiny_catalogue()
    model = tiny_t5()
    want = t5_brute_force(model, table, HISTORIES, USERS, use_eos)
    k = 10
    res = generate(model, HISTORIES, table, user_ids=USERS, k=k, num_beams=len(table), backend="reference", eos=use_eos)
    assert isinstance(res, GenerateResult)
    assert res.item_ids.dtype == torch.int64 and res.codes.shape == (3, k, L) and res.scores.dtype == torch.float32
    top = torch.sort(want, dim=1, descending=True, stable=True)
    # forward() and the incremental KV-cache path round differently (~1e-6); this instance has gaps
    # far above that, so the ranking must be identical and the scores equal to 1e-4.
    gaps = top.values[:, :k] - top.values[:, 1:k + 1]
    assert gaps.min() > 1e-4
    assert torch.equal(res.rows, top.indices[:, :k])
    assert torch.equal(res.item_ids, table.item_ids[top.indices[:, :k]])
    assert torch.equal(res.codes, table.codes[top.indices[:, :k]])
    torch.testing.assert_close(res.scores, top.values[:, :k], rtol=0, atol=1e-4)


def hf_prefix_fn(trie):
    def allowed(batch_id, input_ids):
        t = input_ids.tolist()[1:]
        if len(t) >= L:
            return [LAYOUT.eos_id]
        node = 0
        for l, tok in enumerate(t):
            node = int(trie.children[l][node, tok - LAYOUT.level_offset(l)])
        return ((trie.children[len(t)][node] >= 0).nonzero()[:, 0] + LAYOUT.level_offset(len(t))).tolist()
    return allowed


@pytest.mark.parametrize("use_eos", [True, False])
def test_generate_hf_equals_hf_constrained_beam_search(use_eos):
    from tiger_fast.decoding import encoder_batch

    table = tiny_catalogue(60, seed=21)
    hf = tiny_hf()
    trie = Trie.from_id_table(table)
    k, B = 5, 7
    ids, mask = encoder_batch(LAYOUT, table, HISTORIES, USERS, 20, torch.device("cpu"))
    out = hf.generate(input_ids=ids, attention_mask=mask.long(), num_beams=B, num_return_sequences=k,
                      do_sample=False, prefix_allowed_tokens_fn=hf_prefix_fn(trie), length_penalty=0.0,
                      early_stopping=True, max_new_tokens=L + (1 if use_eos else 0), output_scores=True,
                      return_dict_in_generate=True)
    hf_codes = LAYOUT.tokens_to_codes(out.sequences[:, 1:L + 1]).view(3, k, L)
    if use_eos:
        assert (out.sequences[:, L + 1] == LAYOUT.eos_id).all()
    res = generate(hf, HISTORIES, table, user_ids=USERS, k=k, num_beams=B, backend="reference", eos=use_eos, trie=trie)
    assert torch.equal(res.codes, hf_codes)
    # HF's sequence scores are the same sums (length_penalty=0); its batches are laid out differently
    # (R * B rows from the first step), so its matmuls round differently: relative 1e-5 (float32).
    torch.testing.assert_close(res.scores, out.sequences_scores.view(3, k).float(), rtol=1e-5, atol=0)
    # and our T5 converted from the HF weights gives the same IDs
    from tiger_fast.t5 import T5

    ours = generate(T5.from_hf(hf), HISTORIES, table, user_ids=USERS, k=k, num_beams=B, eos=use_eos, trie=trie)
    assert torch.equal(ours.codes, hf_codes)


def test_generate_backends_agree_and_sampling_keys():
    table = tiny_catalogue(40, seed=2)
    model = tiny_t5(seed=4)
    backends = ["reference"] + (["cpu"] if cpu_ext_available() else [])
    for temp in (None, 1.5, [0.5, 2.0, 1.0, 1.0]):
        res = [generate(model, HISTORIES, table, user_ids=USERS, k=4, num_beams=6, temperature=temp, seed=3,
                        row_keys=torch.tensor([50, 51, 52]), backend=b) for b in backends]
        for r in res[1:]:
            assert torch.equal(r.item_ids, res[0].item_ids) and torch.equal(r.scores, res[0].scores)
            assert torch.equal(r.codes, res[0].codes)
    auto = generate(model, HISTORIES, table, user_ids=USERS, k=4)
    assert auto.backend == backends[-1]
    # sampling with row keys: a request's sample does not depend on its batch neighbours
    # (same-length histories so the encoder inputs carry no padding that could round differently)
    hs = [[3000, 3003], [3030, 3006], [3051, 3000], [3003, 3003]]
    us = [1, 2, 3, 4]
    rk = torch.tensor([101, 102, 103, 104])
    full = generate(model, hs, table, user_ids=us, k=3, temperature=1.2, seed=8, row_keys=rk, backend="reference")
    sub = generate(model, [hs[2], hs[0]], table, user_ids=[us[2], us[0]], k=3, temperature=1.2, seed=8,
                   row_keys=rk[[2, 0]], backend="reference")
    assert torch.equal(sub.item_ids, full.item_ids[[2, 0]])
    assert (full.rows >= 0).all()


@pytest.mark.parametrize("R", [1, 7])
def test_generate_k1_batch_sizes_and_padding_beams(R):
    table = tiny_catalogue(9, seed=6)  # fewer items than beams: the search pads internally
    model = tiny_t5(seed=7)
    hs = [[3000 + 3 * (i % 9)] for i in range(R)]
    res = generate(model, hs, table, k=1, num_beams=12, backend="reference")
    full = generate(model, hs, table, k=9, num_beams=12, backend="reference")
    assert res.item_ids.shape == (R, 1) and torch.equal(res.item_ids[:, 0], full.item_ids[:, 0])
    assert (full.rows >= 0).all() and all(len(set(r.tolist())) == 9 for r in full.rows)
    k1 = generate(model, hs, table, k=1, backend="reference")  # greedy constrained decoding
    assert (k1.rows >= 0).all()


# ---- (e) in-place trie updates --------------------------------------------------------------------------
def test_trie_add_remove_keeps_other_items_and_cold_items_retrievable():
    table = tiny_catalogue(30, seed=11)
    model = tiny_t5(seed=12)
    N = len(table)
    trie = Trie.from_id_table(table)
    full = generate(model, HISTORIES, table, user_ids=USERS, k=N, num_beams=N, trie=trie, backend="reference")
    cold = full.rows[0, :3]  # the current top-3 of user 0 become "cold" (not yet in the trie)
    trie.remove(cold)
    v = trie.version
    held = generate(model, HISTORIES, table, user_ids=USERS, k=N - 3, num_beams=N, trie=trie, backend="reference")
    for r in range(3):  # exhaustive beams: the others keep their order and bit-identical scores
        keep = ~torch.isin(full.rows[r], cold)
        assert torch.equal(held.rows[r], full.rows[r][keep])
        assert torch.equal(held.scores[r], full.scores[r][keep])
    assert not torch.isin(held.rows, cold).any()
    trie.add(cold, table.codes[cold])  # cold start: join the trie in place, no retraining
    assert trie.version == v + 1
    back = generate(model, HISTORIES, table, user_ids=USERS, k=3, num_beams=N, trie=trie, backend="reference")
    assert torch.equal(back.rows[0], cold)


# ---- (f) bad input --------------------------------------------------------------------------------------
def test_generate_bad_inputs():
    table = tiny_catalogue(12, seed=13)
    model = tiny_t5(seed=14)
    ok = dict(user_ids=None, k=3)
    cases = [
        (([], table), {}, ValueError, "histories must be a non-empty"),
        (([[3000], []], table), {}, ValueError, r"histories\[1\] is empty"),
        (([[3000, 7]], table), {}, ValueError, "not in the id_table"),
        (([[3000.5]], table), {}, ValueError, "integer item ids"),
        (([[3000]], table), {"k": 13}, ValueError, "larger than the number of items"),
        (([[3000]], table), {"k": 0}, ValueError, "k must be"),
        (([[3000]], table), {"num_beams": 2}, ValueError, "num_beams"),
        (([[3000]], table), {"temperature": 0.0}, ValueError, "temperature"),
        (([[3000]], table), {"temperature": -1.0}, ValueError, "temperature"),
        (([[3000]], table), {"temperature": [1.0, 1.0]}, ValueError, "one value per level"),
        (([[3000]], table), {"temperature": "hot"}, TypeError, "temperature"),
        (([[3000]], table), {"seed": -1}, ValueError, "seed"),
        (([[3000]], table), {"row_keys": torch.tensor([1, 2])}, ValueError, "row_keys"),
        (([[3000]], table), {"row_keys": torch.tensor([1.0])}, ValueError, "row_keys"),
        (([[3000]], table), {"user_ids": [1, 2]}, ValueError, "user_ids"),
        (([[3000]], table), {"backend": "tpu"}, ValueError, "backend"),
        (([[3000]], table), {"max_history": 0}, ValueError, "max_history"),
        (([[3000]], object()), {}, TypeError, "IdTable"),
        (([[3000]], table), {"trie": "trie"}, TypeError, "trie"),
        (([[3000]], table), {"trie": Trie((3, 4, 5, 4))}, ValueError, "level sizes"),
        (([[3000]], table), {"trie": Trie(LAYOUT.level_sizes)}, ValueError, "no items"),
    ]
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            generate(model, *args, **{**ok, **kw})
    with pytest.raises(TypeError, match="model must be"):
        generate(torch.nn.Linear(2, 2), [[3000]], table)
    other = TokenLayout(codebook_sizes=(3, 4, 5), collision_size=3, num_user_tokens=8)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[3000]], IdTable(other, table.item_ids, table.codes))
    big = Trie.from_codes(unique_codes(13, seed=13), torch.arange(13), level_sizes=LAYOUT.level_sizes)
    with pytest.raises(ValueError, match="refers to row"):
        generate(model, [[3000]], table, trie=big)
    other_codes = Trie.from_codes(unique_codes(12, seed=99), torch.arange(12), level_sizes=LAYOUT.level_sizes)
    with pytest.raises(ValueError, match="disagree"):
        generate(model, [[3000]], table, k=12, trie=other_codes)
    if backend_status()["cuda"]:
        with pytest.raises(RuntimeError, match="cuda"):
            generate(model, [[3000]], table, backend="cuda")


def test_generate_nan_logits_is_an_error():
    table = tiny_catalogue(12, seed=13)
    model = tiny_t5(seed=14)
    with torch.no_grad():
        model.shared.weight[LAYOUT.decoder_start_id] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        generate(model, [[3000]], table, k=2, backend="reference")


# ---- Philox4x32-10 --------------------------------------------------------------------------------------
M32 = 0xFFFFFFFF


def philox_python(c, k):
    """Scalar Philox4x32-10 on Python ints, straight from the algorithm's definition."""
    c, k = list(c), list(k)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & M32, (p0 >> 32) ^ c[3] ^ k[1], p0 & M32]
    return c


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32_10 (verified here against the scalar definition too)."""
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for c, k, want in kat:
        assert tuple(int(x) for x in philox4x32_10(c, k)) == want
        assert tuple(philox_python(c, k)) == want


def test_philox_vectorised_equals_scalar_and_extension():
    g = torch.Generator().manual_seed(5)
    c = torch.randint(0, 2 ** 32, (4, 257), generator=g)
    c[:, 0], c[:, 1] = 0, M32  # the extremes
    k = torch.randint(0, 2 ** 32, (2, 257), generator=g)
    out = philox4x32_10(tuple(c), tuple(k))
    assert out.shape == (4, 257) and out.dtype == torch.int64 and (out >= 0).all() and (out <= M32).all()
    for j in range(0, 257, 16):
        assert out[:, j].tolist() == philox_python(c[:, j].tolist(), k[:, j].tolist())
    if cpu_ext_available():
        from tiger_fast import _generate_ext as ext

        for j in range(0, 257, 32):
            assert list(ext.philox4x32_10(*c[:, j].tolist(), *k[:, j].tolist())) == out[:, j].tolist()
        rk = torch.tensor([0, -1, 2 ** 62 + 17, -(2 ** 63)])
        a = philox_word0(2 ** 64 - 1, 3, rk, 2, 5)
        assert torch.equal(torch.as_tensor(np.asarray(ext.philox_word0(2 ** 64 - 1, 3, rk.numpy(), 2, 5)), dtype=torch.int64), a)


def test_philox_word0_counter_layout_and_uniforms():
    rk = torch.tensor([5, -1, 2 ** 40 + 9])
    w = philox_word0(2 ** 63 + 11, 7, rk, 3, 4)
    assert w.shape == (3, 3, 4)
    for r, key in enumerate(rk.tolist()):
        u = key & (2 ** 64 - 1)  # row keys are the uint64 reinterpretation
        for b in range(3):
            for t in range(4):
                want = philox_python((b * 4 + t, 7, u & M32, u >> 32), ((2 ** 63 + 11) & M32, (2 ** 63 + 11) >> 32))[0]
                assert int(w[r, b, t]) == want
    from tiger_fast.philox import uniform_from_word

    u = uniform_from_word(torch.tensor([0, M32]))
    assert u.tolist() == [2.0 ** -33, 1 - 2.0 ** -33]  # exact, strictly inside (0, 1)
    gmb = gumbel_noise(1, 0, torch.tensor([0]), 2, 3)
    assert gmb.dtype == torch.float64 and torch.isfinite(gmb).all()
    for bad in (-1, 2 ** 64, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            philox_word0(bad, 0, rk, 1, 1)
    with pytest.raises(TypeError, match="row_keys"):
        philox_word0(0, 0, torch.tensor([1.0]), 1, 1)
    with pytest.raises(ValueError, match="counter and key"):
        philox4x32_10((0, 0, 0, 2 ** 32), (0, 0))


def test_public_entry_point_is_callable_as_tiger_fast_generate():
    """`tiger_fast.generate(...)` keeps working after the submodule of the same name is imported."""
    import importlib

    import tiger_fast
    mod = importlib.import_module("tiger_fast.generate")  # the submodule of the same name

    table = tiny_catalogue(12, seed=13)
    model = tiny_t5(seed=14)
    a = tiger_fast.generate(model, [[3000]], table, k=2)
    b = mod.generate(model, [[3000]], table, k=2)
    assert isinstance(a, GenerateResult) and torch.equal(a.item_ids, b.item_ids)


# ---- batch invariance: a request's answer does not depend on the rest of the batch ---------------
@pytest.fixture(scope="module")
def inv_world():
    from tiger_fast.t5 import T5, paper_config

    layout = TokenLayout(codebook_sizes=(32, 32, 32), collision_size=8, num_user_tokens=50)
    rng = np.random.default_rng(5)
    n = 700
    table = IdTable.from_rq_codes(layout, np.arange(n) * 3 + 11, rng.integers(0, 32, size=(n, 3)))
    model = T5(paper_config(layout, d_model=96, d_kv=24, d_ff=320), seed=3).eval()
    ids = table.item_ids.numpy()
    # history lengths 1 (the shortest), primes, exactly max_history (20) and beyond it (truncated),
    # a duplicated request, a history of one item repeated (near-tied beams)
    lens = [1, 2, 3, 5, 7, 13, 19, 20, 23, 4, 11, 17, 1]
    hists = [rng.choice(ids, size=l, replace=False) for l in lens]
    hists.append(hists[5].copy())
    hists.append(np.full(6, ids[0]))
    users = [int(u) for u in rng.integers(0, 10_000, size=len(hists))]
    return model, table, hists, users


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [None, 1.3, (2.0, 1.0, 0.7, 0.5)], ids=["beam", "T1.3", "per-level"])
def test_generate_is_batch_invariant(inv_world, threads, precision, temperature):
    """generate(batch_invariant=True), the default: each request of a 15-request batch (R prime
    batches of it too) gets bit-identical IDs, order and scores to a call with it alone -- what
    the server's micro-batching relies on.  Before: 0 of 24 requests had identical scores (the
    one-row GEMM and one-query SDPA take other kernels than the batched ones; the encoder padding
    followed the batch's longest history)."""
    model, table, hists, users = inv_world
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kw = dict(k=7, num_beams=11, temperature=temperature, seed=4, precision=precision)
        keys = torch.tensor(users, dtype=torch.int64)
        full = generate(model, hists, table, user_ids=users, row_keys=keys, **kw)
        part = generate(model, hists[3:10], table, user_ids=users[3:10], row_keys=keys[3:10], **kw)
        for r in range(len(hists)):
            one = generate(model, [hists[r]], table, user_ids=[users[r]], row_keys=keys[r:r + 1], **kw)
            assert torch.equal(one.item_ids[0], full.item_ids[r]) and torch.equal(one.codes[0], full.codes[r])
            assert torch.equal(one.scores[0], full.scores[r]), (r, (one.scores[0] - full.scores[r]).abs().max())
            if 3 <= r < 10:
                assert torch.equal(part.scores[r - 3], full.scores[r]) and torch.equal(part.item_ids[r - 3], full.item_ids[r])
    finally:
        torch.set_num_threads(old)


def test_batch_invariant_off_pads_to_the_batch_only(inv_world):
    """batch_invariant=False keeps the batch-shaped encoder input (shorter for short histories):
    same IDs here, scores equal to float rounding; a bool is required."""
    model, table, hists, users = inv_world
    a = generate(model, hists, table, user_ids=users, k=5)
    b = generate(model, hists, table, user_ids=users, k=5, batch_invariant=False)
    assert torch.equal(a.item_ids, b.item_ids)
    # float32 sums of 4-5 log-probs of a random model: rounding differences ~1e-6
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-4)
    with pytest.raises(TypeError, match="batch_invariant"):
        generate(model, hists, table, user_ids=users, k=5, batch_invariant=1)
