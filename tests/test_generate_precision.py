"""generate(precision=...): the fp32 default is the exact mode; bf16 / int8 change the model's
logits only (the selection stays exact on them: every backend returns identical IDs and scores for
the same mode), int8 keeps a quantized model's own int8 weights, and bad input gets one clear error.
Fast: tiny models, 1 torch thread (about 10 s on 2 cores)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from tiger_fast.generate import backend_status, generate
from tiger_fast.ids import IdTable
from tiger_fast.layout import TokenLayout
from tiger_fast.precision import check_precision, int8_unavailable_reason
from tiger_fast.t5 import T5, T5Config
from tiger_fast.trie import Trie

LAYOUT = TokenLayout(codebook_sizes=(5, 7, 6), collision_size=3, num_user_tokens=11)
BACKENDS = ["reference"] + (["cpu"] if backend_status()["cpu"] == "" else [])


def catalogue(n=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = LAYOUT.level_sizes
    codes = torch.unique(torch.stack([torch.randint(0, s, (8 * n,), generator=g) for s in sizes], 1), dim=0)
    codes = codes[torch.randperm(codes.shape[0], generator=g)][:n]
    return IdTable(LAYOUT, torch.arange(n) * 7 + 100, codes)


def model(seed=1, tied=True):
    cfg = T5Config(vocab_size=LAYOUT.vocab_size, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=2,
                   num_decoder_layers=2, dropout=0.0, tie_word_embeddings=tied)
    m = T5(cfg, seed=seed).eval()
    with torch.no_grad():  # spread the log-probs out (random init is nearly uniform)
        for p in m.parameters():
            p.mul_(3.0)
    return m


TABLE = catalogue()
TRIE = Trie.from_id_table(TABLE)
HIST = [[100, 107], [114], [121, 100, 128, 135], [142, 149, 156], [163], [170, 177], [184, 191, 198]]


def run(m, precision, backend="reference", **kw):
    return generate(m, HIST, TABLE, user_ids=list(range(len(HIST))), k=5, num_beams=7, trie=TRIE, backend=backend,
                    precision=precision, **kw)


def test_fp32_is_the_default_and_exact():
    m = model()
    a, b = run(m, "fp32"), generate(m, HIST, TABLE, user_ids=list(range(len(HIST))), k=5, num_beams=7, trie=TRIE,
                                   backend="reference")
    assert a.precision == b.precision == "fp32"
    assert torch.equal(a.item_ids, b.item_ids) and torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("temperature", [None, (2.0, 1.0, 0.5, 1.0)])
@pytest.mark.parametrize("tied", [True, False])
def test_fast_modes_select_exactly_on_their_logits(precision, temperature, tied):
    """Same mode, every backend: identical IDs, order and scores (the selection is exact on the
    logits it is given); and the mode really changed the logits (scores differ from fp32)."""
    m = model(tied=tied)
    outs = [run(m, precision, b, temperature=temperature, seed=5) for b in BACKENDS]
    for o in outs[1:]:
        assert torch.equal(o.item_ids, outs[0].item_ids) and torch.equal(o.scores, outs[0].scores)
    o = outs[0]
    assert o.precision == precision
    valid = o.rows >= 0
    assert bool(valid.all())
    assert torch.equal(TABLE.codes[o.rows], o.codes)  # every returned ID is a real item
    exact = run(m, "fp32", temperature=temperature, seed=5)
    assert not torch.equal(o.scores, exact.scores)
    assert bool(torch.isfinite(o.scores).all())


def test_int8_keeps_a_quantized_models_own_weights():
    """quantize_dynamic(model) (per channel) run as it is == the float model with precision='int8'
    (which makes the same per-channel copy): the decode path keeps the modules' int8 values and
    scales exactly (before the fix it failed reading .weight)."""
    m = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(m), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})
    a, b = run(q, "int8"), run(m, "int8")
    assert torch.equal(a.item_ids, b.item_ids) and torch.equal(a.scores, b.scores)
    # per-tensor quantization (quantize_dynamic's default) runs too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qt = torch.ao.quantization.quantize_dynamic(copy.deepcopy(m), {nn.Linear}, dtype=torch.qint8)
    assert bool((run(qt, "int8").rows >= 0).all())


def test_int8_copy_follows_parameter_changes():
    m = model()
    a = run(m, "int8")
    with torch.no_grad():
        m.decoder.layers[0].ff.wi.weight.mul_(-1.0)
    b, c = run(m, "int8"), run(m, "int8")
    assert not torch.equal(a.scores, b.scores)
    assert torch.equal(b.scores, c.scores)


def test_bf16_model_runs_in_bf16_and_train_mode_is_restored():
    m = model()
    m.train()
    a = run(m, "int8")
    assert m.training
    mb = copy.deepcopy(m).eval().to(torch.bfloat16)
    o = run(mb, "bf16")
    assert o.precision == "bf16" and bool((o.rows >= 0).all())
    assert torch.equal(a.item_ids, run(m.eval(), "int8").item_ids)


def test_hf_model_in_every_mode():
    transformers = pytest.importorskip("transformers")
    m = model()
    hf = m.to_hf()
    assert isinstance(hf, transformers.T5ForConditionalGeneration)
    for p in ("fp32", "bf16", "int8"):
        outs = [run(hf, p, b) for b in BACKENDS]
        for o in outs[1:]:
            assert torch.equal(o.item_ids, outs[0].item_ids) and torch.equal(o.scores, outs[0].scores)
        assert bool((outs[0].rows >= 0).all())


@pytest.mark.parametrize("bad", ["fp16", "FP32", "", None, 8, "float32"])
def test_unknown_precision(bad):
    with pytest.raises(ValueError, match="precision must be one of"):
        run(model(), bad)


def test_model_dtype_must_match_precision():
    m = model()
    with pytest.raises(ValueError, match="precision='fp32' needs a float32 model.*bfloat16"):
        run(copy.deepcopy(m).to(torch.bfloat16), "fp32")
    with pytest.raises(ValueError, match="precision='bf16' needs a float32 or bfloat16 model.*float64"):
        run(copy.deepcopy(m).double(), "bf16")
    with pytest.raises(ValueError, match="precision='int8' quantizes a float32 model.*float16"):
        run(copy.deepcopy(m).half(), "int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(m), {nn.Linear}, dtype=torch.qint8)
    for p in ("fp32", "bf16"):
        with pytest.raises(ValueError, match=f"precision='{p}' but the model holds int8"):
            run(q, p)


def test_int8_where_it_cannot_run():
    reason = int8_unavailable_reason(torch.device("cuda"))
    assert "CPU only" in reason
    with pytest.raises(RuntimeError, match="precision='int8' cannot run: .*CPU only"):
        check_precision(model(), "int8", torch.device("cuda"))
    assert int8_unavailable_reason(torch.device("cpu")) == ""
