"""Reliability regressions of issue 14: all-or-nothing writes, refused targets, loader checks."""
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tiger_fast.atomic import check_target, write_atomic, write_bytes


def _temps(d):
    return sorted(e for e in os.listdir(d) if ".tmp" in e)


def test_write_atomic_replaces_whole_file_and_cleans_up_on_error(tmp_path):
    p = tmp_path / "f.bin"
    write_bytes(p, b"old")

    def half(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("writer failed")
    with pytest.raises(RuntimeError, match="writer failed"):
        write_atomic(p, half)
    assert p.read_bytes() == b"old" and _temps(tmp_path) == []
    write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and _temps(tmp_path) == []
    assert oct(os.stat(p).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_temp_left_by_kill_9_is_removed_by_the_next_write(tmp_path):
    """kill -9 in the middle of a write leaves the old file whole and a temp file behind; the next
    write of the same path removes it (its writer is gone)."""
    p = tmp_path / "ckpt.safetensors"
    write_bytes(p, b"old")
    code = textwrap.dedent(f"""
        import os, sys, time
        from tiger_fast.atomic import write_atomic
        def w(tmp):
            with open(tmp, "wb") as f:
                f.write(b"x" * 100000)
            print("writing", flush=True)
            time.sleep(60)
        write_atomic({str(p)!r}, w)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert p.read_bytes() == b"old"
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".ckpt.safetensors.tmp-")
    other = tmp_path / "other.bin"  # another file's write leaves it alone
    write_bytes(other, b"o")
    assert _temps(tmp_path) == left
    write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and _temps(tmp_path) == []


@pytest.mark.parametrize("kind", ["dir", "devnull", "fifo"])
def test_non_regular_target_is_refused(tmp_path, kind):
    if kind == "dir":
        t = tmp_path / "d"
        t.mkdir()
    elif kind == "devnull":
        t = os.devnull
    else:
        t = tmp_path / "fifo"
        os.mkfifo(t)
    st = os.stat(t)
    with pytest.raises(ValueError, match="--out: .* refusing to replace it"):
        write_bytes(t, b"x", what="--out")
    st2 = os.stat(t)
    assert (st.st_mode, st.st_ino, st.st_rdev) == (st2.st_mode, st2.st_ino, st2.st_rdev)


def test_symlink_target_keeps_the_link(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(b"a")
    link = tmp_path / "link.bin"
    os.symlink(real, link)
    write_bytes(link, b"b")
    assert os.path.islink(link) and real.read_bytes() == b"b"
    assert check_target(tmp_path / "new.bin") == str(tmp_path / "new.bin")


# --- checkpoint loaders check config.json against the weights before building (issue 14, 6) -----
def _tiny_t5(tmp_path):
    from tiger_fast.layout import TokenLayout
    from tiger_fast.t5 import T5, T5Config, save_t5

    layout = TokenLayout(codebook_sizes=(5, 3), collision_size=2, num_user_tokens=7)
    m = T5(T5Config(vocab_size=layout.vocab_size, d_model=8, num_heads=2, d_kv=4, d_ff=8,
                    num_encoder_layers=1, num_decoder_layers=2))
    p = tmp_path / "ck"
    save_t5(m, layout, str(p))
    return p, json.loads((p / "config.json").read_text())


@pytest.fixture
def real_builds(monkeypatch):
    """Devices on which T5 / RQVAE objects get built (meta = shapes only)."""
    from tiger_fast import rqvae, t5

    seen = []
    for cls in (t5.T5, rqvae.RQVAE):
        orig = cls.__init__

        def init(self, *a, _orig=orig, **k):
            seen.append(torch.empty(0).device.type)
            _orig(self, *a, **k)
        monkeypatch.setattr(cls, "__init__", init)
    return seen


@pytest.mark.parametrize("change, match", [
    ({"d_ff": 10**9}, "beyond the loader's bound"),
    ({"num_encoder_layers": 10**6}, "beyond the loader's bound"),
    ({"num_decoder_layers": 200}, "config.json says 200 decoder layers, the weights hold 2"),
    ({"d_ff": 4096}, "shape"),
    ({"num_heads": 3}, "shape"),
])
def test_t5_config_checked_against_weights_before_building(tmp_path, real_builds, change, match):
    from tiger_fast.t5 import load_t5

    p, meta = _tiny_t5(tmp_path)
    real_builds.clear()
    meta["t5_config"].update(change)
    (p / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        load_t5(str(p))
    assert "cpu" not in real_builds  # nothing was built for real


@pytest.mark.parametrize("text, match", [
    ('{"format": "tiger_fast.t5/1", "layout": {}}', r"lacks the object\(s\) \['t5_config'\]"),
    ('{"format": "tiger_fast.t5/1", "t5_config": {"d_model": 8}, "layout": {}}', "invalid config"),
    ('{"format": "tiger_fast.t5/1", "t5_config": ' + "[" * 100000 + "]" * 100000 + "}", "RecursionError"),
    ("[" * 100000, "cannot read"),
])
def test_t5_config_missing_keys_or_deep_json(tmp_path, text, match):
    from tiger_fast.t5 import load_t5

    p, _ = _tiny_t5(tmp_path)
    (p / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_t5(str(p))


def _tiny_rqvae(tmp_path):
    from tiger_fast.rqvae import RQVAE, RQVAEConfig, save_rqvae

    m = RQVAE(RQVAEConfig(input_dim=6, hidden_dims=(5,), latent_dim=3, codebook_sizes=(4, 2)))
    p = tmp_path / "rq"
    save_rqvae(m, p)
    return p, json.loads((p / "rqvae_config.json").read_text())


@pytest.mark.parametrize("change, match", [
    ({"hidden_dims": [10**9]}, "beyond the loader's bound"),
    ({"hidden_dims": [4] * 100000}, "beyond the loader's bound"),
    ({"codebook_sizes": [10**8, 2]}, "beyond the loader's bound"),
    ({"hidden_dims": [7]}, "shape mismatches"),
    ({"hidden_dims": [5, 5]}, "missing"),
])
def test_rqvae_config_checked_against_weights_before_building(tmp_path, real_builds, change, match):
    from tiger_fast.rqvae import load_rqvae

    p, meta = _tiny_rqvae(tmp_path)
    real_builds.clear()
    meta["config"].update(change)
    (p / "rqvae_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        load_rqvae(p)
    assert "cpu" not in real_builds


@pytest.mark.parametrize("text, match", [
    ('{"format": "tiger_fast.rqvae/1"}', "no 'config' object"),
    ('{"format": "tiger_fast.rqvae/1", "config": {"latent_dim": 3}}', "not a valid RQ-VAE config"),
    ('{"format": "tiger_fast.rqvae/1", "config": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
])
def test_rqvae_config_missing_keys_or_deep_json(tmp_path, text, match):
    from tiger_fast.rqvae import load_rqvae

    p, _ = _tiny_rqvae(tmp_path)
    (p / "rqvae_config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_rqvae(p)


# --- generate on a model left in train() mode, from several threads (issue 14, 4) ---------------
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_generate_train_mode_model_from_two_threads(backend):
    """Thread A switches a train()-mode model to eval for its call; thread B starts meanwhile and is
    held inside its decode until A has returned.  B must still decode in eval mode (before the fix,
    A's return switched the model back to train() under B: dropout changed B's result)."""
    import threading

    from tiger_fast.generate import generate
    from tiger_fast.ids import IdTable
    from tiger_fast.layout import TokenLayout
    from tiger_fast.t5 import T5, T5Config

    layout = TokenLayout(codebook_sizes=(7, 5, 3), collision_size=8, num_user_tokens=11)
    rng = np.random.default_rng(0)
    n = 101
    codes = np.stack([rng.integers(0, s, n) for s in layout.codebook_sizes], 1)
    table = IdTable.from_rq_codes(layout, np.arange(n), codes)
    model = T5(T5Config(vocab_size=layout.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                        num_encoder_layers=1, num_decoder_layers=1, dropout=0.5), seed=0)
    hist = [rng.integers(0, n, 9) for _ in range(5)]
    ref = generate(model.eval(), hist, table, k=6, backend=backend)
    model.train()
    out, a_done, b_inside = {}, threading.Event(), threading.Event()
    flags = {"started": False, "held": False}

    def b():
        out["B"] = generate(model, hist, table, k=6, backend=backend)

    tb = threading.Thread(target=b, name="B")

    def hook(mod, args):
        name = threading.current_thread().name
        if name == "A" and not flags["started"]:
            flags["started"] = True
            tb.start()
            b_inside.wait(10)  # B is inside its call before A goes on
        elif name == "B" and not flags["held"]:
            flags["held"] = True
            b_inside.set()
            a_done.wait(10)  # hold B mid-decode until A has returned
    h = model.shared.register_forward_pre_hook(hook)

    def a():
        out["A"] = generate(model, hist, table, k=6, backend=backend)
        a_done.set()
    ta = threading.Thread(target=a, name="A")
    ta.start()
    ta.join(30)
    tb.join(30)
    h.remove()
    assert flags == {"started": True, "held": True}
    for name in "AB":
        assert torch.equal(out[name].item_ids, ref.item_ids), name
        assert torch.equal(out[name].scores, ref.scores), name
    assert model.training  # the caller's mode is restored once both calls are done


@pytest.mark.parametrize("command", [
    ["assign-ids", "--rqvae", "RQ", "--embeddings", "E.npy"],
    ["batch-recall", "--data", "synthetic", "--ids", "I.parquet", "--model", "M"],
    ["embed", "--data", "synthetic"],
])
@pytest.mark.parametrize("kind", ["devnull", "dir", "fifo"])
def test_cli_refuses_non_regular_out(tmp_path, capsys, command, kind):
    """--out /dev/null (or a directory, a FIFO) is refused before any work, and left as it was."""
    from tiger_fast.cli import main

    if kind == "devnull":
        out = os.devnull
    elif kind == "dir":
        out = str(tmp_path / "d")
        os.mkdir(out)
    else:
        out = str(tmp_path / "f")
        os.mkfifo(out)
    st = os.stat(out)
    assert main(command + ["--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and "refusing to replace it" in err and "Traceback" not in err
    st2 = os.stat(out)
    assert (st.st_mode, st.st_ino, st.st_rdev) == (st2.st_mode, st2.st_ino, st2.st_rdev)


# --- requests far beyond memory are refused up front (issue 14, 8) --------------------------------
def _small_generate_setup():
    from tiger_fast.ids import IdTable
    from tiger_fast.layout import TokenLayout
    from tiger_fast.t5 import T5, T5Config

    layout = TokenLayout(codebook_sizes=(7, 5, 3), collision_size=8, num_user_tokens=11)
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, s, 101) for s in layout.codebook_sizes], 1)
    table = IdTable.from_rq_codes(layout, np.arange(101), codes)
    model = T5(T5Config(vocab_size=layout.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                        num_encoder_layers=1, num_decoder_layers=1, dropout=0.0), seed=0).eval()
    return model, table, rng


@pytest.mark.parametrize("case", ["beams", "history", "requests"])
def test_generate_refuses_requests_beyond_memory(case):
    gen_mod = importlib.import_module("tiger_fast.generate")  # the package binds the name to the function

    model, table, rng = _small_generate_setup()
    hist = [rng.integers(0, 101, 9)]
    kw = {}
    if case == "beams":  # beam 10^9: (10^9, vocab) logits alone are > 100 GB
        kw["num_beams"] = 10**9
    elif case == "history":  # 4 x 2 x 120k^2 attention scores: ~460 GB
        hist = [rng.integers(0, 101, 120_000) for _ in range(4)]
        kw["max_history"] = 120_000
    else:  # 5000 requests at once, with 10^6 beams each
        hist = [hist[0]] * 5000
        kw["num_beams"] = 10**6
    avail = gen_mod.available_memory("cpu")
    assert avail is not None  # Linux: MemAvailable
    with pytest.raises(ValueError, match=r"would need about .* GiB .* available on cpu; send fewer requests"):
        gen_mod.generate(model, hist, table, k=5, **kw)


def test_generate_memory_check_uses_available_memory(monkeypatch):
    """The same request passes with enough memory and is refused when little is available."""
    gen_mod = importlib.import_module("tiger_fast.generate")  # the package binds the name to the function

    model, table, rng = _small_generate_setup()
    hist = [rng.integers(0, 101, 9) for _ in range(7)]
    ref = gen_mod.generate(model, hist, table, k=5)
    monkeypatch.setattr(gen_mod, "available_memory", lambda device: 4096)
    with pytest.raises(ValueError, match="would need about"):
        gen_mod.generate(model, hist, table, k=5)
    monkeypatch.setattr(gen_mod, "available_memory", lambda device: 2**40)
    assert torch.equal(gen_mod.generate(model, hist, table, k=5).item_ids, ref.item_ids)


def test_generate_compares_the_whole_layout_of_a_loaded_model(tmp_path):
    """Same vocabulary size, different split into code / user tokens: refused by the Python API too."""
    from tiger_fast.generate import generate
    from tiger_fast.ids import IdTable
    from tiger_fast.layout import TokenLayout
    from tiger_fast.t5 import T5, T5Config, load_t5, save_t5

    a = TokenLayout(codebook_sizes=(7, 5), collision_size=8, num_user_tokens=11)
    b = TokenLayout(codebook_sizes=(7, 5), collision_size=9, num_user_tokens=10)
    assert a.vocab_size == b.vocab_size and a != b
    m = T5(T5Config(vocab_size=a.vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                    num_encoder_layers=1, num_decoder_layers=1, dropout=0.0))
    save_t5(m, a, str(tmp_path / "m"))
    model, layout = load_t5(str(tmp_path / "m"))
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, s, 40) for s in (7, 5)], 1)
    hist = [rng.integers(0, 40, 6)]
    generate(model, hist, IdTable.from_rq_codes(a, np.arange(40), codes), k=3)  # its own layout: fine
    with pytest.raises(ValueError, match="layout mismatch"):
        generate(model, hist, IdTable.from_rq_codes(b, np.arange(40), codes), k=3)


def test_id_table_to_parquet_is_all_or_nothing_and_cleans_kill_9_temps(tmp_path):
    """IdTable.to_parquet writes through atomic.write_atomic (it had its own temp-and-rename that
    left a temp file behind after kill -9 and refused nothing): the old table survives a failing
    write, a temp left by a killed writer is removed by the next write, /dev/null is refused."""
    from tiger_fast.ids import IdTable
    from tiger_fast.layout import TokenLayout

    layout = TokenLayout(codebook_sizes=(4, 4), collision_size=3)
    p = tmp_path / "ids.parquet"
    old = IdTable(layout, [7, 3, 11], [[0, 1, 0], [2, 3, 0], [0, 1, 1]])
    old.to_parquet(p)
    dead = tmp_path / ".ids.parquet.tmp-999999999-0123abcd"  # a temp whose writer (pid) is gone
    dead.write_bytes(b"half a parquet file")
    new = IdTable(layout, [5], [[1, 1, 0]])
    new.to_parquet(p)
    back = IdTable.from_parquet(p)
    assert torch.equal(back.item_ids, new.item_ids) and torch.equal(back.codes, new.codes)
    assert _temps(tmp_path) == []

    class Boom(Exception):
        pass

    import pyarrow.parquet as pq
    real = pq.write_table

    def failing(table, where, *a, **k):
        real(table, where, *a, **k)
        raise Boom("disk full")
    pq.write_table = failing
    try:
        with pytest.raises(Boom):
            old.to_parquet(p)
    finally:
        pq.write_table = real
    assert torch.equal(IdTable.from_parquet(p).item_ids, new.item_ids) and _temps(tmp_path) == []
    with pytest.raises(ValueError, match="character device"):
        new.to_parquet("/dev/null")


@pytest.mark.parametrize("spec", ["synthetic:items=1000000000", "synthetic:items=5,users=999999999999"])
def test_synthetic_beyond_memory_is_one_clear_error(spec, capsys):
    """``synthetic:items=1e9`` ran until memory was gone (~1 TB of Python objects); now refused
    up front with the estimate, in about a second."""
    import time

    from tiger_fast.cli import main

    t = time.perf_counter()
    assert main(["embed", "--data", spec, "--out", "/tmp/never-written.npy", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--data {spec}" in err and "GiB in memory" in err and "synthetic_latents" in err
    assert time.perf_counter() - t < 30 and not os.path.exists("/tmp/never-written.npy")
