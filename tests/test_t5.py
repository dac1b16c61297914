"""tiger_fast.t5: HF weight compatibility, incremental decoding, cache reordering, checkpoints, bad input."""
import json
import os

import pytest
import torch

from tiger_fast.layout import TokenLayout
from tiger_fast.t5 import T5, T5Cache, T5Config, load_t5, paper_config, relative_position_bucket, save_t5

transformers = pytest.importorskip("transformers")

# Float tolerance: our model and HF run the same float32 math but through different kernels
# (fused SDPA vs HF's attention path, different summation order), so logits may differ by a few
# ulps of their magnitude (|logit| <~ 10 here).  1e-4 absolute is ~100 ulps at that scale.
ATOL = 1e-4

CONFIGS = [
    # tied head with v1.0 output scaling (the default); odd sizes, d_kv * heads != d_model
    dict(vocab_size=53, d_model=24, num_heads=3, d_kv=7, d_ff=40, num_encoder_layers=2, num_decoder_layers=3),
    # untied head (v1.1-style, no scaling); few buckets / short max distance so that the
    # log-spaced buckets and the "beyond max distance" bucket are exercised by length-37 inputs
    dict(vocab_size=31, d_model=16, num_heads=2, d_kv=8, d_ff=24, num_encoder_layers=1, num_decoder_layers=2,
         relative_attention_num_buckets=8, relative_attention_max_distance=11, tie_word_embeddings=False),
    # tied head without scaling (what transformers 5 builds for tie_word_embeddings=False)
    dict(vocab_size=17, d_model=8, num_heads=1, d_kv=5, d_ff=11, num_encoder_layers=3, num_decoder_layers=1,
         relative_attention_num_buckets=6, relative_attention_max_distance=9, scale_decoder_outputs=False),
]


def _inputs(vocab, b, s, t, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    lens = torch.randint(1, s + 1, (b,), generator=g)
    lens[0] = s  # one full row
    for i in range(b):
        mask[i, lens[i]:] = False
    if b > 2:  # one left-padded row: T5's relative positions allow padding on either side
        mask[2] = False
        mask[2, s - int(lens[2]):] = True
    dec = torch.randint(0, vocab, (b, t), generator=g)
    return ids, mask, dec


def _hf_logits(hf, ids, mask, dec):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 13, 5), (5, 37, 7)])
def test_to_hf_logits_match(ci, shape):
    cfg = T5Config(dropout=0.0, **CONFIGS[ci])
    ours = T5(cfg, seed=ci).eval()
    hf = ours.to_hf()
    ids, mask, dec = _inputs(cfg.vocab_size, *shape, seed=ci)
    with torch.no_grad():
        a = ours(ids, mask, dec)
    b = _hf_logits(hf, ids, mask, dec)
    assert a.dtype == torch.float32 and a.shape == (shape[0], shape[2], cfg.vocab_size)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_from_hf_logits_match(ci):
    c = CONFIGS[ci]
    tie = c.get("tie_word_embeddings", True) and c.get("scale_decoder_outputs", True)
    hc = transformers.T5Config(vocab_size=c["vocab_size"], d_model=c["d_model"], num_heads=c["num_heads"],
                               d_kv=c["d_kv"], d_ff=c["d_ff"], num_layers=c["num_encoder_layers"],
                               num_decoder_layers=c["num_decoder_layers"], dropout_rate=0.0,
                               relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
                               relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
                               feed_forward_proj="relu", tie_word_embeddings=tie)
    with torch.random.fork_rng():  # HF initialises from the global RNG; keep it out of other tests
        torch.manual_seed(100 + ci)
        hf = transformers.T5ForConditionalGeneration(hc).eval()
        if not c.get("tie_word_embeddings", True):
            hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight))  # truly untied
    ours = T5.from_hf(hf).eval()
    assert ours.config.tie_word_embeddings == c.get("tie_word_embeddings", True)
    ids, mask, dec = _inputs(c["vocab_size"], 4, 19, 6, seed=ci)
    with torch.no_grad():
        a = ours(ids, mask, dec)
    torch.testing.assert_close(a, _hf_logits(hf, ids, mask, dec), atol=ATOL, rtol=0)
    # and back again: the round trip keeps every weight exactly
    back = T5.from_hf(ours.to_hf())
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_gradients_match_hf():
    """Training parity: the loss gradients equal HF's (dropout off)."""
    cfg = T5Config(dropout=0.0, **CONFIGS[0])
    ours = T5(cfg, seed=3).train()
    hf = ours.to_hf().train()
    ids, mask, _ = _inputs(cfg.vocab_size, 3, 11, 1, seed=9)
    labels = torch.randint(0, cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    labels[1, 4] = -100
    loss = ours.loss(ids, mask, labels)
    hf_loss = hf(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=0)
    loss.backward()
    hf_loss.backward()
    hf_params = dict(hf.named_parameters())
    for ours_name, hf_name in ours._name_map().items():
        g = dict(ours.named_parameters())[ours_name].grad
        hg = hf_params[hf_name].grad
        # tolerance: same float32 math, different kernels / accumulation order
        torch.testing.assert_close(g, hg, atol=1e-5, rtol=1e-4, msg=ours_name)


def test_relative_position_bucket_matches_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)[None, :]
    for bidir in (True, False):
        for nb, md in ((32, 128), (8, 11), (6, 9)):
            a = relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=md)
            b = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=md)
            assert torch.equal(a, b)


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_decode_step_equals_forward(ci):
    cfg = T5Config(dropout=0.0, **CONFIGS[ci])
    m = T5(cfg, seed=5).eval()
    ids, mask, dec = _inputs(cfg.vocab_size, 4, 23, 7, seed=ci + 10)
    with torch.no_grad():
        full = m(ids, mask, dec)
        cache = m.init_cache(m.encode(ids, mask), mask, max_length=2)  # forces buffer growth
        for t in range(dec.shape[1]):
            step = m.decode_step(dec[:, t], cache)
            assert step.dtype == torch.float32 and step.shape == (4, cfg.vocab_size)
            # tolerance: the cached path attends one query at a time (different kernel shapes)
            torch.testing.assert_close(step, full[:, t], atol=ATOL, rtol=0)
    assert cache.length == dec.shape[1]


def test_decode_step_batch_one_and_hf_cache():
    """Batch 1, a single encoder token; HF's own cached greedy generation agrees with ours.
    (Equal layer counts: transformers 5.x generate() sizes its cache from the encoder's
    num_layers and fails when num_decoder_layers differs - an HF limitation, not ours.)"""
    cfg = T5Config(dropout=0.0, **dict(CONFIGS[0], num_decoder_layers=2))
    m = T5(cfg, seed=2).eval()
    hf = m.to_hf()
    ids = torch.tensor([[7]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False, num_beams=1, decoder_start_token_id=0, eos_token_id=None,
                          pad_token_id=0)
        cache = m.init_cache(m.encode(ids, mask), mask)
        tok = torch.tensor([0])
        ours = [0]
        for _ in range(6):
            tok = m.decode_step(tok, cache).argmax(-1)
            ours.append(int(tok))
    assert out[0].tolist() == ours


def test_reorder_cache_select_and_expand():
    cfg = T5Config(dropout=0.0, **CONFIGS[1])
    m = T5(cfg, seed=4).eval()
    ids, mask, dec = _inputs(cfg.vocab_size, 3, 17, 5, seed=21)
    index = torch.tensor([2, 0, 0, 1, 2, 2, 1])  # repeats = beam expansion, reordering
    with torch.no_grad():
        cache = m.init_cache(m.encode(ids, mask), mask)
        for t in range(2):
            m.decode_step(dec[:, t], cache)
        before = cache.self_kv.clone()
        new = T5.reorder_cache(cache, index)
        assert torch.equal(cache.self_kv, before)  # input cache untouched
        assert new.batch_size == 7 and new.length == 2
        # continue decoding different suffixes on the reordered rows
        g = torch.Generator().manual_seed(0)
        suffix = torch.randint(0, cfg.vocab_size, (7, 3), generator=g)
        steps = [m.decode_step(suffix[:, j], new) for j in range(3)]
        full = m(ids[index], mask[index], torch.cat([dec[index, :2], suffix], 1))
    for j in range(3):
        torch.testing.assert_close(steps[j], full[:, 2 + j], atol=ATOL, rtol=0)


@pytest.mark.parametrize("ci,R,B", [(0, 1, 1), (0, 3, 7), (1, 5, 2), (2, 2, 13)])
def test_select_beams_equals_forward_on_expanded_rows(ci, R, B):
    """Beam moves with the shared (per-request) cross K/V give the logits of a full forward on
    the expanded rows, for several rounds of select_beams with reuse (spare buffers) and absent
    beams (-1), and a second request-grouped round with a different beam count."""
    cfg = T5Config(dropout=0.0, **CONFIGS[ci])
    m = T5(cfg, seed=7).eval()
    ids, mask, _ = _inputs(cfg.vocab_size, R, 11, 1, seed=30 + ci)
    g = torch.Generator().manual_seed(ci)
    with torch.no_grad():
        cache = m.init_cache(m.encode(ids, mask), mask, max_length=2)  # forces buffer growth too
        start = torch.zeros(R, dtype=torch.long)
        m.decode_step(start, cache)
        rows = torch.arange(R).unsqueeze(1)                 # (R, 1) encoder row of each beam
        prefix = torch.zeros(R, 1, 1, dtype=torch.long)     # (R, beams, t) decoder inputs so far
        for step, nb in enumerate((B, B, max(1, B - 1))):
            parent = torch.randint(0, prefix.shape[1], (R, nb), generator=g)
            parent[0, -1] = -1 if nb > 1 else parent[0, -1]  # absent beam: continues beam 0
            cache = m.select_beams(cache, parent, reuse=True)
            assert cache.group == nb and cache.batch_size == R * nb and cache.num_requests == R
            prefix = torch.gather(prefix, 1, parent.clamp(min=0).unsqueeze(-1).expand(R, nb, prefix.shape[2]))
            tok = torch.randint(0, cfg.vocab_size, (R, nb), generator=g)
            got = m.decode_step(tok.reshape(-1), cache).view(R, nb, -1)
            prefix = torch.cat([prefix, tok.unsqueeze(-1)], 2)
            flat_rows = rows.expand(R, nb).reshape(-1)
            full = m(ids[flat_rows], mask[flat_rows], prefix.reshape(R * nb, -1))[:, -1].view(R, nb, -1)
            # tolerance: the cached path attends a request's beams as one query block (other kernel shapes)
            torch.testing.assert_close(got, full, atol=ATOL, rtol=0)


def test_select_beams_bad_input_and_input_untouched():
    cfg = T5Config(dropout=0.0, **CONFIGS[0])
    m = T5(cfg, seed=8).eval()
    ids, mask, _ = _inputs(cfg.vocab_size, 2, 5, 1, seed=3)
    with torch.no_grad():
        cache = m.init_cache(m.encode(ids, mask), mask)
        m.decode_step(torch.zeros(2, dtype=torch.long), cache)
        before = cache.self_kv.clone()
        new = m.select_beams(cache, torch.zeros(2, 3, dtype=torch.long))
        assert torch.equal(cache.self_kv, before) and new.self_kv.data_ptr() != cache.self_kv.data_ptr()
        with pytest.raises(ValueError, match="parent values"):
            m.select_beams(cache, torch.tensor([[0], [1]]))       # group is 1: only beam 0 exists
        with pytest.raises(ValueError, match="parent values"):
            m.select_beams(cache, torch.tensor([[-2], [0]]))
        with pytest.raises(ValueError, match="parent must be int64"):
            m.select_beams(cache, torch.zeros(3, 1, dtype=torch.long))  # 3 rows, 2 requests
        with pytest.raises(ValueError, match="parent must be int64"):
            m.select_beams(cache, torch.zeros(2, 1, dtype=torch.int32))
        with pytest.raises(TypeError, match="T5Cache"):
            m.select_beams("cache", torch.zeros(2, 1, dtype=torch.long))


def test_bf16_autocast_masks_stay_finite():
    """Under bf16 autocast the padding / causal mask value is bf16's finfo.min (fp32's would round
    to -inf); logits stay finite and close to fp32 (tolerance: bf16 has 8 mantissa bits)."""
    cfg = T5Config(dropout=0.0, **CONFIGS[0])
    m = T5(cfg, seed=6).eval()
    ids, mask, dec = _inputs(cfg.vocab_size, 4, 13, 5, seed=2)
    with torch.no_grad():
        ref = m(ids, mask, dec)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(ids, mask, dec)
            loss = m.loss(ids, mask, dec)
    assert torch.isfinite(got).all() and torch.isfinite(loss)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_init_is_seeded_and_leaves_global_rng_alone():
    cfg = T5Config(**CONFIGS[2])
    state = torch.get_rng_state()
    a, b, c = T5(cfg, seed=0), T5(cfg, seed=0), T5(cfg, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.shared.weight, c.shared.weight)


def test_paper_config_parameter_count():
    layout = TokenLayout()
    m = T5(paper_config(layout))
    assert layout.vocab_size == 3026
    d, v, inner, ff, L = 128, 3026, 6 * 64, 1024, 4
    attn = 4 * d * inner
    enc_layer = attn + 2 * d * ff + 2 * d
    dec_layer = 2 * attn + 2 * d * ff + 3 * d
    expected = v * d + L * enc_layer + L * dec_layer + 2 * (32 * 6 + d)
    assert m.num_parameters() == expected == 4_846_976
    hf = m.to_hf()
    assert sum(p.numel() for p in hf.parameters()) == expected


def test_save_load_roundtrip(tmp_path):
    layout = TokenLayout(codebook_sizes=(5, 3), collision_size=2, num_user_tokens=7)
    cfg = T5Config(vocab_size=layout.vocab_size, d_model=8, num_heads=2, d_kv=4, d_ff=8,
                   num_encoder_layers=1, num_decoder_layers=1, tie_word_embeddings=False)
    m = T5(cfg, seed=8)
    save_t5(m, layout, str(tmp_path / "ck"))
    m2, layout2 = load_t5(str(tmp_path / "ck"))
    assert layout2 == layout and m2.config == cfg and not m2.training
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_checkpoint_errors(tmp_path):
    layout = TokenLayout(codebook_sizes=(5, 3), collision_size=2, num_user_tokens=7)
    cfg = T5Config(vocab_size=layout.vocab_size, d_model=8, num_heads=2, d_kv=4, d_ff=8,
                   num_encoder_layers=1, num_decoder_layers=1)
    m = T5(cfg)
    with pytest.raises(ValueError, match="layout.vocab_size"):
        save_t5(m, TokenLayout(), str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError):
        load_t5(str(tmp_path / "nothing"))
    p = str(tmp_path / "ck")
    save_t5(m, layout, p)
    meta = json.load(open(os.path.join(p, "config.json")))
    # config says 2 layers but the weights have 1
    bad = dict(meta, t5_config=dict(meta["t5_config"], num_encoder_layers=2))
    json.dump(bad, open(os.path.join(p, "config.json"), "w"))
    with pytest.raises(ValueError, match="do not match"):
        load_t5(p)
    bad = dict(meta, t5_config=dict(meta["t5_config"], d_ff=9))
    json.dump(bad, open(os.path.join(p, "config.json"), "w"))
    with pytest.raises(ValueError, match="shape"):
        load_t5(p)
    bad = dict(meta, layout=dict(meta["layout"], num_user_tokens=8))
    json.dump(bad, open(os.path.join(p, "config.json"), "w"))
    with pytest.raises(ValueError, match="layout vocab"):
        load_t5(p)
    json.dump(dict(meta, format="other"), open(os.path.join(p, "config.json"), "w"))
    with pytest.raises(ValueError, match="format"):
        load_t5(p)
    json.dump(meta, open(os.path.join(p, "config.json"), "w"))
    with open(os.path.join(p, "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_t5(p)


def test_bad_inputs():
    cfg = T5Config(dropout=0.0, **CONFIGS[2])
    m = T5(cfg).eval()
    ids = torch.tensor([[1, 2, 3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    dec = torch.tensor([[0]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[1, 99]]), None, dec)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(ids, mask, torch.tensor([[-1]]))
    with pytest.raises(TypeError, match="integer"):
        m(ids.float(), mask, dec)
    with pytest.raises(ValueError, match="masks every position"):
        m(ids, torch.zeros(1, 3, dtype=torch.bool), dec)
    with pytest.raises(ValueError, match="shape"):
        m(ids, torch.ones(1, 4, dtype=torch.bool), dec)
    with pytest.raises(ValueError, match="empty"):
        m.encode(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        m(ids, mask, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="0 or 1"):
        m(ids, torch.tensor([[1, 2, 1]]), dec)
    # integer 0/1 masks are accepted (HF style)
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask.long(), dec), m(ids, mask, dec), atol=0, rtol=0)
    cache = m.init_cache(m.encode(ids, mask), mask)
    with pytest.raises(ValueError, match="rows"):
        m.decode_step(torch.tensor([0, 0]), cache)
    with pytest.raises(TypeError, match="T5Cache"):
        m.decode_step(torch.tensor([0]), "cache")
    with pytest.raises(ValueError, match="outside the cache"):
        T5.reorder_cache(cache, torch.tensor([1]))
    with pytest.raises(ValueError, match="empty"):
        T5.reorder_cache(cache, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="enc must be"):
        m.init_cache(torch.zeros(1, 3, 5), mask)
    with pytest.raises(ValueError, match="positive int"):
        T5Config(vocab_size=0)
    with pytest.raises(ValueError, match="dropout"):
        T5Config(vocab_size=5, dropout=1.5)
    with pytest.raises(ValueError, match="unknown T5Config"):
        T5Config.from_dict({"vocab_size": 5, "heads": 2})
    with pytest.raises(TypeError, match="T5ForConditionalGeneration"):
        T5.from_hf(object())
    assert isinstance(cache, T5Cache)




def _decode_all(m, ids, mask, dec):
    cache = m.init_cache(m.encode(ids, mask), mask)
    return torch.stack([m.decode_step(dec[:, t], cache) for t in range(dec.shape[1])], 1)


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_decode_weights_follow_parameter_updates(ci):
    # decode_step keeps transposed/fused copies of the decoder weights between calls; every way a
    # parameter changes must make the next cache use the new values, never stale ones.
    cfg = T5Config(dropout=0.0, **CONFIGS[ci])
    m = T5(cfg, seed=6).eval()
    ids, mask, dec = _inputs(cfg.vocab_size, 3, 11, 4, seed=ci + 20)
    with torch.no_grad():
        _decode_all(m, ids, mask, dec)
        first = m._decode_weights()
        assert m._decode_weights() is first  # unchanged parameters: reused
    # 1) an optimizer step (in-place updates of every parameter)
    m.train()
    m.loss(ids, mask, dec).backward()
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(_decode_all(m, ids, mask, dec), m(ids, mask, dec), atol=ATOL, rtol=0)
        assert m._decode_weights() is not first
        # 2) load_state_dict from another model; 3) an in-place edit of one decoder weight
        other = T5(cfg, seed=7).eval()
        m.load_state_dict(other.state_dict())
        torch.testing.assert_close(_decode_all(m, ids, mask, dec), other(ids, mask, dec), atol=ATOL, rtol=0)
        m.decoder.layers[-1].ff.wo.weight.mul_(-2.0)
        torch.testing.assert_close(_decode_all(m, ids, mask, dec), m(ids, mask, dec), atol=ATOL, rtol=0)
        assert not torch.allclose(m(ids, mask, dec), other(ids, mask, dec), atol=ATOL)
    # 4) a dtype change (new storage)
    m.double()
    with torch.no_grad():
        got = _decode_all(m, ids, mask, dec)
        torch.testing.assert_close(got, m(ids, mask, dec).float(), atol=ATOL, rtol=0)


def test_decode_step_with_autograd_on_after_inference_mode():
    # the kept weights are created under inference_mode by generate(); a later call with autograd
    # on must not feed those inference tensors into a graph (torch refuses to save them for backward)
    cfg = T5Config(dropout=0.0, **CONFIGS[0])
    m = T5(cfg, seed=8).eval()
    ids, mask, dec = _inputs(cfg.vocab_size, 2, 9, 3, seed=30)
    with torch.inference_mode():
        want = _decode_all(m, ids, mask, dec).clone()
    got = _decode_all(m, ids, mask, dec)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want, atol=ATOL, rtol=0)
