"""Item texts and sentence embeddings (tiger_fast.embed)."""
import numpy as np
import pytest

import tiger_fast.embed as E
from tiger_fast.data import Dataset
from tiger_fast.synthetic import synthetic_dataset
from tiger_fast.embed import DEFAULT_TEMPLATE, embed_dataset, embed_texts, item_text, item_texts, template_id


# ---------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------
def test_item_text_default_template():
    it = {"title": " OPI  Nail\nLacquer ", "brand": "OPI", "categories": ["Makeup", "Nails", "Nail Polish"],
          "price": 7.5, "description": "Glossy."}
    assert item_text(it) == ("Title: OPI Nail Lacquer; Brand: OPI; Categories: Makeup > Nails > Nail Polish; "
                             "Price: 7.50; Description: Glossy.")
    # missing / empty fields are left out with their label
    assert item_text({"title": "A", "brand": "", "categories": [], "price": float("nan")}) == "Title: A"
    assert item_text({"categories": ["X"], "description": "d"}) == "Categories: X; Description: d"
    assert item_text({}) == ""
    assert item_text({"title": "A", "price": "$5 or less"}) == "Title: A; Price: $5 or less"


def test_item_text_custom_templates():
    it = {"title": "Tent", "brand": "Acme", "colour": "red"}
    assert item_text(it, "{title} by {brand}; colour {colour}; {price} USD") == "Tent by Acme; colour red"
    assert item_text(it, ["{title} ({brand})", "{description}"]) == "Tent (Acme)"
    assert item_text(it, lambda x: x["title"].upper()) == "TENT"
    with pytest.raises(ValueError, match="placeholders"):
        item_text(it, "{title.upper}")
    with pytest.raises(TypeError, match="template"):
        item_text(it, 42)
    with pytest.raises(TypeError, match="item must be a dict"):
        item_text(["Tent"])
    assert template_id(None) == template_id(DEFAULT_TEMPLATE) != template_id("{title}")


def test_dataset_texts_use_template():
    d = Dataset("t", np.array([1, 2]), [{"title": "a", "categories": ["x", "y"]}, {}], np.array([0]),
                [np.array([0, 1])])
    assert item_texts(d) == ["Title: a; Categories: x > y", ""]
    assert item_texts(d, "{title}") == ["a", ""]


# ---------------------------------------------------------------------------------------------
# A fake encoder: fast tests of batching, ordering and caching
# ---------------------------------------------------------------------------------------------
class FakeEncoder:
    """Deterministic 'embedding': (len, number of 'a's, 1); records batch sizes."""

    def __init__(self):
        self.batches = []

    def encode(self, texts, batch_size, convert_to_numpy, normalize_embeddings, show_progress_bar):
        self.batches.append(len(texts))
        e = np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float64)
        if normalize_embeddings:
            e /= np.linalg.norm(e, axis=1, keepdims=True)
        return e

    def get_sentence_embedding_dimension(self):
        return 3


def test_embed_texts_order_batches_and_validation():
    texts = ["a", "bbbbbbb", "aaa", "", "ab"] * 3  # 15 texts, batch 4 -> 4, 4, 4, 3 (longest first)
    enc = FakeEncoder()
    e = embed_texts(texts, enc, batch_size=4, progress=False, normalize=False)
    assert e.dtype == np.float32 and e.shape == (15, 3) and enc.batches == [4, 4, 4, 3]
    assert e[:, 0].tolist() == [len(t) for t in texts] and e[:, 1].tolist() == [t.count("a") for t in texts]
    n = embed_texts(texts, enc, batch_size=4, progress=False)
    assert np.allclose(np.linalg.norm(n, axis=1), 1, atol=1e-6)
    assert embed_texts([], enc, progress=False).shape == (0, 3)
    with pytest.raises(TypeError, match="sequence of str"):
        embed_texts("just one string", enc)
    with pytest.raises(TypeError, match=r"entries \[1\]"):
        embed_texts(["a", None], enc)
    with pytest.raises(ValueError, match="batch_size"):
        embed_texts(["a"], enc, batch_size=0)
    with pytest.raises(ValueError, match="model_id"):
        embed_texts(["a"], enc, cache_dir="/tmp/never_written")


def test_cache_roundtrip_atomic_and_keyed(tmp_path):
    enc = FakeEncoder()
    texts = ["alpha", "beta", "gamma"]
    a = embed_texts(texts, enc, cache_dir=tmp_path, model_id="fake-v1", progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")  # no .tmp left
    calls = len(enc.batches)
    b = embed_texts(texts, enc, cache_dir=tmp_path, model_id="fake-v1", progress=False)
    assert np.array_equal(a, b) and len(enc.batches) == calls  # hit: encoder not called
    # a different model id, normalisation, template or text is a different key
    for kw in (dict(model_id="fake-v2"), dict(model_id="fake-v1", normalize=False),
               dict(model_id="fake-v1", template="{title}")):
        embed_texts(texts, enc, cache_dir=tmp_path, progress=False, **kw)
    embed_texts(texts[:2] + ["gamma "], enc, cache_dir=tmp_path, model_id="fake-v1", progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 5
    # a corrupt cache file is recomputed (with a warning), not trusted
    p = E.cache_path(tmp_path, texts, "fake-v1", True, None)
    p.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        c = embed_texts(texts, enc, cache_dir=tmp_path, model_id="fake-v1", progress=False)
    assert np.array_equal(a, c)


def test_embed_dataset_precomputed_and_text():
    d = Dataset("t", np.array([1, 2]), [{"title": "aa"}, {"title": "b"}], np.array([0]), [np.array([0, 1])],
                embeddings=np.ones((2, 4)))
    assert embed_dataset(d, FakeEncoder()).shape == (2, 4)
    e = embed_dataset(d, FakeEncoder(), use_precomputed=False, normalize=False, progress=False)
    assert e[:, 0].tolist() == [len("Title: aa"), len("Title: b")]


# ---------------------------------------------------------------------------------------------
# The real packaged model (one load for the module, ~10 s on 2 cores)
# ---------------------------------------------------------------------------------------------
def test_bad_model_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        embed_texts(["a"], str(tmp_path / "no_model_here"), progress=False)
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ValueError, match="not a sentence-transformers model directory"):
        embed_texts(["a"], tmp_path / "notamodel", progress=False)
    with pytest.raises(TypeError, match="model must be"):
        embed_texts(["a"], 3.5, progress=False)


def test_unknown_model_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load sentence-transformers model 'no-such-org/no-such-model-xyz'"):
        embed_texts(["a"], "no-such-org/no-such-model-xyz", progress=False, device="cpu")


@pytest.fixture(scope="module")
def minilm_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emb")


def test_minilm_semantics_and_cache_hit_without_model(minilm_cache, monkeypatch):
    texts = ["Title: OPI Nail Lacquer; Categories: Makeup > Nails > Nail Polish",
             "Title: Essie Gel Nail Color; Categories: Makeup > Nails > Nail Polish",
             "Title: Garden Hose 50 ft; Categories: Garden > Watering > Hoses",
             "Title: Heavy-duty Lawn Mower; Categories: Garden > Lawn > Mowers",
             ""]
    e = embed_texts(texts, cache_dir=minilm_cache, progress=False, device="cpu")
    assert e.shape == (5, 384) and e.dtype == np.float32 and np.isfinite(e).all()
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2  # nail polishes together
    assert sim[2, 3] > sim[2, 0] and sim[2, 3] > sim[2, 1]  # garden with garden
    # batch composition does not change the result beyond fp noise (padding is masked)
    e1 = embed_texts(texts[:2], progress=False, device="cpu", batch_size=1)
    assert np.allclose(e1, e[:2], atol=1e-5)  # fp32 matmul order differs with padding length
    # cache hit: the model must not be loaded again
    monkeypatch.setattr(E, "_MODELS", {})

    def no_load(*a, **k):
        raise AssertionError("model loaded on a cache hit")

    monkeypatch.setattr(E, "_load_sentence_transformer", no_load)
    again = embed_texts(texts, cache_dir=minilm_cache, progress=False, device="cpu")
    assert np.array_equal(again, e)
    with pytest.raises(ValueError, match="model loaded on a cache hit"):  # a miss does try to load
        embed_texts(texts[:1], cache_dir=minilm_cache, progress=False, device="cpu")


def test_minilm_synthetic_items_cluster_by_category():
    d = synthetic_dataset(num_items=40, num_users=5, seed=1, num_top=4, num_mid=2, num_leaf=1)
    e = embed_dataset(d, progress=False, device="cpu")
    top = np.array([it["categories"][0] for it in d.items])
    sim = e @ e.T
    same = sim[top[:, None] == top[None, :]].mean()
    diff = sim[top[:, None] != top[None, :]].mean()
    assert same > diff + 0.15, (same, diff)


def test_load_embeddings(tmp_path):
    from tiger_fast.fileio import load_embeddings

    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "e.npy", x)
    ids, e = load_embeddings(tmp_path / "e.npy")
    assert ids is None and e.dtype == np.float32 and np.array_equal(e, x)
    np.save(tmp_path / "f.npy", x.astype(np.float32))
    assert isinstance(load_embeddings(tmp_path / "f.npy", mmap=True)[1], np.memmap)
    x[2, 1] = np.inf
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(ValueError, match=r"NaN/Inf in rows \[2\]"):
        load_embeddings(tmp_path / "bad.npy")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="2-D float"):
        load_embeddings(tmp_path / "one.npy")
    (tmp_path / "t.jsonl").write_text('{"item_id": 9, "embedding": [1, 2]}\n{"item_id": 4, "embedding": [3, 4]}\n')
    ids, e = load_embeddings(tmp_path / "t.jsonl")
    assert ids.tolist() == [9, 4] and e.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(FileNotFoundError, match="nothing.npy"):
        load_embeddings(tmp_path / "nothing.npy")
