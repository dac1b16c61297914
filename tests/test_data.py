"""Loaders of tiger_fast.data, the synthetic generators of tiger_fast.synthetic, the CLI dataset spec."""
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tiger_fast.cli import load_dataset_spec as load_dataset
from tiger_fast.data import Dataset, default_data_dir, load_amazon2014, load_beauty, load_lcrec, load_tables
from tiger_fast.synthetic import iter_synthetic_latents, synthetic_dataset, synthetic_latents

HERE = Path(__file__).resolve().parent
FIX = HERE / "data"
DATA = default_data_dir()
BEAUTY = DATA / "amazon-beauty-2014"
SCI = DATA / "amazon-scientific-2018"
needs_beauty = pytest.mark.skipif(not (BEAUTY / "Beauty.txt.gz").is_file(), reason=f"Beauty data not at {BEAUTY}")
needs_sci = pytest.mark.skipif(not (SCI / "Scientific.inter.json.gz").is_file(), reason=f"Scientific data not at {SCI}")


def seqs_as_lists(d):
    return [s.tolist() for s in d.sequences]


# ---------------------------------------------------------------------------------------------
# Real data (skipped when absent)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def beauty():
    return load_beauty(BEAUTY)


@needs_beauty
def test_beauty_counts_match_paper(beauty):
    s = beauty.summary()
    assert (s["users"], s["items"], s["interactions"]) == (22363, 12101, 198502)
    assert (s["seq_len_min"], s["seq_len_max"], s["seq_len_median"]) == (5, 204, 6.0)
    assert s["users_with_repeated_item"] == 0
    assert s["items_with_title"] == 12094  # 7 empty titles (SOURCE.md) are absent, not ""
    assert beauty.item_ids.tolist() == list(range(1, 12102))
    assert beauty.user_ids[:3].tolist() == [1, 2, 3]
    # line 1 of Beauty.txt: "1 1 2 3 4 5" -> internal indices 0..4
    assert beauty.sequences[0].tolist() == [0, 1, 2, 3, 4]
    assert beauty.item_keys[0] == "B004756YJA"


@needs_beauty
def test_beauty_brand_and_category_split(beauty):
    it = beauty.items
    assert it[0] == {"title": "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce", "brand": "OPI",
                     "categories": ["Makeup", "Nails", "Nail Polish"]}
    assert "brand" not in it[3] and it[3]["categories"][0] == "Makeup"  # item 4: brand dropped upstream
    assert it[96]["brand"] == "Scissors" and it[96]["categories"] == ["Hair Care", "Styling Tools", "Scissors"]
    tops = {x["categories"][0] for x in it}
    assert tops == {"Skin Care", "Hair Care", "Makeup", "Tools & Accessories", "Bath & Body", "Fragrance"}
    leaves = beauty.leaf_categories()
    assert len(leaves) == 12101 and leaves[0] == "Nail Polish" and all(leaves)


@needs_sci
def test_lcrec_scientific_counts():
    d = load_lcrec(SCI, "Scientific")
    s = d.summary()
    assert (s["users"], s["items"], s["interactions"]) == (8317, 4344, 58492)
    assert (s["seq_len_min"], s["seq_len_max"]) == (5, 78)
    assert s["items_with_brand"] == 4332 and s["items_with_categories"] == 4213
    assert d.items[0]["categories"] == ["Industrial & Scientific", "Industrial Electrical", "Passive Components",
                                        "Capacitors"]
    assert d.sequences[0].tolist() == list(range(9)) and d.user_ids[0] == 0
    # LETTER's "." placeholder descriptions are missing, not "."
    assert all(it.get("description") not in (".", " .", "") for it in d.items)
    assert load_dataset(f"lcrec:{SCI}:Scientific").num_interactions == 58492


def test_lcrec_errors(tmp_path):
    (tmp_path / "X.item.json").write_text(json.dumps({"0": {"title": "a", "description": ".", "categories": "A,B"}}))
    (tmp_path / "X.inter.json").write_text(json.dumps({"0": [0, 0], "1": [0]}))
    d = load_lcrec(tmp_path, "X")
    assert d.items == [{"title": "a", "categories": ["A", "B"]}] and seqs_as_lists(d) == [[0, 0], [0]]
    (tmp_path / "X.inter.json").write_text(json.dumps({"0": [0, 7]}))
    with pytest.raises(ValueError, match=r"item id 7 .*X\.item\.json"):
        load_lcrec(tmp_path, "X")
    (tmp_path / "X.inter.json").write_text("{not json")
    with pytest.raises(ValueError, match="X.inter.json is not valid JSON"):
        load_lcrec(tmp_path, "X")
    with pytest.raises(FileNotFoundError, match="Y.inter.json"):
        load_lcrec(tmp_path, "Y")


# ---------------------------------------------------------------------------------------------
# Amazon 2014 original files (tiny fixture, see tests/data)
# ---------------------------------------------------------------------------------------------
EXPECTED_KEYS = ["P3", "P5", "P1", "P2", "P4"]
EXPECTED_SEQS = [[0, 1, 2, 3, 4],  # U2: by time
                 [2, 3, 4, 0, 1],  # U1: P1(100) P2(200) P4(200, later line) P3(300) P5(500)
                 [2, 3, 0, 4, 1],  # U3
                 [3, 2, 0, 4, 1],  # U4: all at t=1000 -> file order
                 [2, 3, 0, 4, 1]]  # U5


def _check_tiny(d):
    # 5-core needs 3 rounds: P6 (4 reviews) goes, then U6 (4 left), then P7 (4 left); U0 (2) at once
    assert d.user_keys == ["U2", "U1", "U3", "U4", "U5"]  # first appearance in the review file
    assert d.item_keys == EXPECTED_KEYS and d.item_ids.tolist() == [0, 1, 2, 3, 4]
    assert seqs_as_lists(d) == EXPECTED_SEQS
    assert d.timestamps[1].tolist() == [100, 200, 200, 300, 500]
    p1, p2, p3, p4 = (d.items[EXPECTED_KEYS.index(k)] for k in ("P1", "P2", "P3", "P4"))
    assert p1 == {"title": "Lip & Cheek Tint", "brand": "Acme", "categories": ["Beauty", "Makeup", "Lips"],
                  "price": 12.5}
    assert p2["description"] == "Gentle   shampoo\nwith rose oil." and "brand" not in p2
    assert p3 == {"title": "Night Cream", "categories": ["Beauty", "Skin Care", "Face", "Creams"],
                  "description": "It's rich; use at night."}
    assert p4 == {"title": "Nail File"}
    assert d.items[EXPECTED_KEYS.index("P5")] == {}


def test_amazon2014_fixture():
    with pytest.warns(UserWarning, match="1 of 5 items have no line"):
        d = load_amazon2014(FIX / "reviews_Tiny_5.json", FIX / "meta_Tiny.json")
    assert d.name == "tiny"
    _check_tiny(d)


def test_amazon2014_gzip_and_spec(tmp_path):
    for name in ("reviews_Tiny_5.json", "meta_Tiny.json"):
        with open(FIX / name, "rb") as src, gzip.open(tmp_path / (name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    with pytest.warns(UserWarning):
        d = load_dataset(f"amazon2014:{tmp_path / 'reviews_Tiny_5.json.gz'}:{tmp_path / 'meta_Tiny.json.gz'}")
    _check_tiny(d)
    with pytest.warns(UserWarning):  # core=1 keeps everything: 7 users
        assert load_amazon2014(tmp_path / "reviews_Tiny_5.json.gz", FIX / "meta_Tiny.json", core=1).num_users == 7


def test_amazon2014_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json.gz"):
        load_amazon2014(tmp_path / "nope.json.gz", FIX / "meta_Tiny.json")
    bad = tmp_path / "r.json"
    bad.write_text('{"reviewerID": "a", "asin": "b"}\n')
    with pytest.raises(ValueError, match="line 1: missing field 'unixReviewTime'"):
        load_amazon2014(bad, FIX / "meta_Tiny.json")
    bad.write_text('{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n')
    with pytest.raises(ValueError, match="no interactions survive the 5-core"):
        load_amazon2014(bad, FIX / "meta_Tiny.json")
    gz = tmp_path / "r.json.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00garbage, not deflate data")  # corrupt gzip
    with pytest.raises(ValueError, match="cannot read .*r.json.gz"):
        load_amazon2014(gz, FIX / "meta_Tiny.json")


# ---------------------------------------------------------------------------------------------
# Generic tables
# ---------------------------------------------------------------------------------------------
def _write(path, rows):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist only looks at row 0's keys
        t = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
        (pq.write_table if path.suffix == ".parquet" else pcsv.write_csv)(t, path)
    return path


ITEMS = [{"item_id": 30, "title": "Tent", "categories": ["Outdoor", "Tents"], "price": 99.0},
         {"item_id": 10, "title": "Stove", "brand": "Acme", "categories": ["Outdoor", "Stoves"]},
         {"item_id": 20, "title": "Lamp", "description": "bright", "categories": ["Outdoor", "Lights"]}]
INTER = [{"user_id": 7, "item_id": 10, "timestamp": 5}, {"user_id": 3, "item_id": 30, "timestamp": 2},
         {"user_id": 7, "item_id": 20, "timestamp": 1}, {"user_id": 7, "item_id": 30, "timestamp": 5},
         {"user_id": 3, "item_id": 10, "timestamp": 1}]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_tables_formats(tmp_path, fmt):
    items = ITEMS
    if fmt == "csv":  # CSV has no lists: categories as "a > b" strings
        items = [{**r, "categories": " > ".join(r["categories"])} for r in ITEMS]
        items = [{k: r.get(k) for k in ("item_id", "title", "brand", "categories", "price", "description")}
                 for r in items]
    d = load_tables(_write(tmp_path / f"items.{fmt}", items), _write(tmp_path / f"inter.{fmt}", INTER))
    assert d.item_ids.tolist() == [30, 10, 20]
    assert d.user_ids.tolist() == [7, 3]  # first appearance
    # user 7: t=1 (20), t=5 (10, then 30: tie keeps file order)
    assert seqs_as_lists(d) == [[2, 1, 0], [1, 0]]
    assert d.timestamps[0].tolist() == [1, 5, 5]
    assert d.items[0] == {"title": "Tent", "categories": ["Outdoor", "Tents"], "price": 99.0}
    assert d.items[1] == {"title": "Stove", "brand": "Acme", "categories": ["Outdoor", "Stoves"]}
    assert d.leaf_categories() == ["Tents", "Stoves", "Lights"]
    assert d.embeddings is None


def test_tables_string_ids_embeddings_no_timestamp(tmp_path):
    items = [{"item_id": "b", "embedding": [1.0, 0.0]}, {"item_id": "a", "embedding": [0.0, 1.0]},
             {"item_id": "c", "embedding": [0.5, 0.5]}]
    inter = [{"user_id": "zed", "item_id": "c"}, {"user_id": "amy", "item_id": "a"}, {"user_id": "zed", "item_id": "b"}]
    d = load_tables(_write(tmp_path / "i.parquet", items), _write(tmp_path / "x.jsonl", inter))
    assert d.item_keys == ["b", "a", "c"] and d.item_ids.tolist() == [0, 1, 2]
    assert d.user_keys == ["zed", "amy"] and d.user_ids.tolist() == [0, 1]
    assert seqs_as_lists(d) == [[2, 0], [1]] and d.timestamps is None
    assert d.embeddings.dtype == np.float32 and d.embeddings.tolist() == [[1, 0], [0, 1], [0.5, 0.5]]
    assert d.items == [{}, {}, {}]
    # CSV embeddings as JSON array strings
    (tmp_path / "i.csv").write_text('item_id,title,embedding\n1,x,"[1, 2]"\n2,y,"[3, 4]"\n')
    (tmp_path / "x.csv").write_text("user_id,item_id,timestamp\n1,2,2020-01-02\n1,1,2020-01-01\n")
    d = load_tables(tmp_path / "i.csv", tmp_path / "x.csv")
    assert d.embeddings.tolist() == [[1, 2], [3, 4]] and seqs_as_lists(d) == [[0, 1]]


def test_tables_bad_input(tmp_path):
    items = _write(tmp_path / "items.jsonl", ITEMS)
    inter = _write(tmp_path / "inter.jsonl", INTER + [{"user_id": 1, "item_id": 99, "timestamp": 0}])
    with pytest.raises(ValueError, match=r"column 'item_id' of .*inter.jsonl has 1 rows .*not in the items table.*\[99\]"):
        load_tables(items, inter)
    dup = _write(tmp_path / "dup.jsonl", ITEMS + [{"item_id": 10, "title": "again"}])
    with pytest.raises(ValueError, match=r"duplicate item_id values \[10\]"):
        load_tables(dup, tmp_path / "inter.jsonl")
    extra = _write(tmp_path / "extra.jsonl", [{**r, "colour": "red"} for r in ITEMS])
    ok = _write(tmp_path / "ok.jsonl", INTER)
    with pytest.raises(ValueError, match=r"unknown columns \['colour'\].*unknown_columns='ignore'"):
        load_tables(extra, ok)
    assert "colour" not in load_tables(extra, ok, unknown_columns="ignore").items[0]
    assert load_tables(extra, ok, unknown_columns="keep").items[0]["colour"] == "red"
    noid = _write(tmp_path / "noid.jsonl", [{"title": "x"}])
    with pytest.raises(ValueError, match="no 'item_id' column"):
        load_tables(noid, ok)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        load_tables(tmp_path / "missing.parquet", ok)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_tables(tmp_path / "empty.jsonl", ok)
    with pytest.raises(ValueError, match="empty"):
        load_tables(items, tmp_path / "empty.jsonl")
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"item_id": 1, "embedding": [1.0, NaN]}\n')  # Python's json reads NaN
    with pytest.raises(ValueError, match=r"NaN/Inf in rows \[0\]"):
        load_tables(nan, _write(tmp_path / "i1.jsonl", [{"user_id": 1, "item_id": 1}]))
    ragged = _write(tmp_path / "rag.jsonl", [{"item_id": 1, "embedding": [1.0]}, {"item_id": 2, "embedding": [1.0, 2.0]}])
    with pytest.raises(ValueError, match="different lengths"):
        load_tables(ragged, tmp_path / "i1.jsonl")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_tables(tmp_path / "x.txt", ok)


# ---------------------------------------------------------------------------------------------
# Dataset validation, spec parsing
# ---------------------------------------------------------------------------------------------
def test_dataset_validation():
    ok = dict(name="t", item_ids=np.array([5, 3]), items=[{}, {}], user_ids=np.array([0]), sequences=[np.array([1, 0])])
    d = Dataset(**ok)
    assert (d.num_items, d.num_users, d.num_interactions) == (2, 1, 2)
    assert d.index_of([3, 5, 3]).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"unknown external item ids \[4\]"):
        d.index_of([4])
    with pytest.raises(ValueError, match=r"duplicate item ids \[3\]"):
        Dataset(**{**ok, "item_ids": np.array([3, 3])})
    with pytest.raises(ValueError, match="outside"):
        Dataset(**{**ok, "sequences": [np.array([2])]})
    with pytest.raises(ValueError, match="no items"):
        Dataset(**{**ok, "item_ids": np.array([], dtype=np.int64), "items": []})
    with pytest.raises(ValueError, match="one sequence per user"):
        Dataset(**{**ok, "sequences": []})
    with pytest.raises(ValueError, match="NaN"):
        Dataset(**ok, embeddings=np.array([[1.0], [np.nan]]))
    with pytest.raises(TypeError, match="item_ids"):
        Dataset(**{**ok, "item_ids": np.array([0.5, 1.5])})


def test_load_dataset_specs(tmp_path):
    d = load_dataset("synthetic:items=300,users=50,seed=3,p_series=0.9")
    assert (d.num_items, d.num_users) == (300, 50)
    for bad in ("", "nope:x", "synthetic:items", "tables:onlyone", "synthetic:colour=3"):
        with pytest.raises((ValueError, TypeError)):
            load_dataset(bad)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_dataset(f"beauty:{tmp_path / 'no_such_dir'}")


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def syn():
    return synthetic_dataset(num_items=2000, num_users=3000, seed=0)


def test_synthetic_shape_and_determinism(syn):
    s = syn.summary()
    assert (s["items"], s["users"]) == (2000, 3000) and s["users_with_repeated_item"] == 0
    assert 5 <= s["seq_len_min"] and s["seq_len_max"] <= 20 and 7 < s["seq_len_mean"] < 11
    assert s["leaf_categories"] == 8 * 6 * 5 and s["items_without_interactions"] < 20
    assert all(len(it["categories"]) == 3 and it["title"] and it["brand"] and it["price"] > 0 for it in syn.items)
    again = synthetic_dataset(num_items=2000, num_users=3000, seed=0)
    assert again.items == syn.items and all(np.array_equal(a, b) for a, b in zip(again.sequences, syn.sequences))
    other = synthetic_dataset(num_items=2000, num_users=3000, seed=1)
    assert other.items != syn.items


def test_synthetic_small_and_odd_sizes():
    d = synthetic_dataset(num_items=7, num_users=3, seed=5, max_len=7, min_len=7)
    assert [len(s) for s in d.sequences] == [7, 7, 7]  # every item once: exhausting leaves must work
    assert all(sorted(s.tolist()) == list(range(7)) for s in d.sequences)
    with pytest.raises(ValueError, match="max_len"):
        synthetic_dataset(num_items=10, num_users=3, max_len=20)
    with pytest.raises(ValueError, match="num_items"):
        synthetic_dataset(num_items=0)


def test_synthetic_is_sequential_enough_to_beat_popularity(syn):
    """A last-item bigram model must clearly beat popularity on the held-out last item."""
    train = [s[:-1] for s in syn.sequences]
    pop = np.bincount(np.concatenate(train), minlength=syn.num_items)
    top_pop = np.argsort(-pop, kind="stable")[:10]
    follow: dict = {}
    for s in train:
        for a, b in zip(s[:-1].tolist(), s[1:].tolist()):
            follow.setdefault(a, {}).setdefault(b, 0)
            follow[a][b] += 1
    hit_pop = hit_bi = 0
    for s in syn.sequences:
        last, target = int(s[-2]), int(s[-1])
        hit_pop += target in top_pop
        f = follow.get(last, {})
        cand = sorted(f, key=lambda b: (-f[b], b))[:10]
        hit_bi += target in cand
    n = syn.num_users
    assert hit_bi / n > 0.3 and hit_bi > 5 * hit_pop, (hit_bi / n, hit_pop / n)
    # same-leaf structure: most transitions stay within the leaf's product type
    same_type = np.mean([syn.items[a]["categories"][1] == syn.items[b]["categories"][1]
                         for s in syn.sequences for a, b in zip(s[:-1], s[1:])])
    assert same_type > 0.6


def test_synthetic_latents_chunking_invariant():
    full = synthetic_latents(70_000, dim=5, clusters=17, seed=4)  # crosses the 65,536-row block edge
    assert full.dtype == np.float32 and full.shape == (70_000, 5) and np.isfinite(full).all()
    parts = [c for _, c in iter_synthetic_latents(70_000, dim=5, clusters=17, seed=4, chunk_size=9_973)]
    assert np.array_equal(np.concatenate(parts), full)
    assert np.array_equal(synthetic_latents(3, dim=5, clusters=17, seed=4, offset=65_535), full[65_535:65_538])
    assert not np.array_equal(synthetic_latents(10, dim=5, clusters=17, seed=5), full[:10])
    assert synthetic_latents(0, dim=5).shape == (0, 5)
    # clustered: points sit near their centres (noise 0.3 vs unit-scale centres)
    from tiger_fast.synthetic import _latent_centers
    c = _latent_centers(5, 17, 4, 0.5)
    d2 = ((full[:2000, None, :] - c[None]) ** 2).sum(-1).min(1)
    assert np.median(d2) < 5 * 0.3 ** 2 * 2
    for bad in (dict(n=-1), dict(n=3, dim=0), dict(n=3, noise=float("nan")), dict(n=3, seed=-2)):
        with pytest.raises(ValueError):
            synthetic_latents(**bad)
