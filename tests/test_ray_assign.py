"""Ray Data ID assignment (tiger_fast.ray_assign) == the single-machine streaming path.

CI size: TIGER_FAST_RAY_ITEMS (default 200,000 items in 9 shards, one of them empty); the
1,000,000-item run was done by hand with TIGER_FAST_RAY_ITEMS=1000000 (see the report / README).
The Ray tests skip with a reason when ray is not installed (optional extra tiger_fast[ray]).
"""
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tiger_fast.assign import assign_ids
from tiger_fast.synthetic import synthetic_latents
from tiger_fast.ray_assign import ParquetShards, assign_ids_ray, require_ray
from tiger_fast.ids import IdTable
from tiger_fast.layout import TokenLayout
from tiger_fast.rqvae import RQVAE, RQVAEConfig, save_rqvae

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="ray[data] not installed (optional extra tiger_fast[ray])")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(os.environ.get("TIGER_FAST_RAY_ITEMS", "200000"))
DIM = 16
CFG = RQVAEConfig(input_dim=DIM, hidden_dims=(32,), latent_dim=8, codebook_sizes=(64, 64, 64))
LAYOUT = TokenLayout(codebook_sizes=(64, 64, 64), collision_size=1024)
BLOCK = 4096




def _write(path, x, ids, row_group):
    cols = {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])}
    if ids is not None:
        cols["item_id"] = pa.array(ids)
    pq.write_table(pa.table(cols), path, row_group_size=row_group)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    x = synthetic_latents(N, dim=DIM, clusters=256, seed=3)
    ids = np.random.default_rng(0).permutation(N * 7)[:N].astype(np.int64)  # sparse, unordered ids
    # 9 shards of uneven sizes (one empty, one of a single row), odd row-group sizes
    cuts = sorted({0, 1, N // 7, N // 7, N // 5 + 3, N // 3, N // 2 + 11, 2 * N // 3, 5 * N // 6, N})
    cuts = [0, 1, 1] + [c for c in cuts if c > 1]
    os.makedirs(d / "shards")
    for i in range(len(cuts) - 1):
        a, b = cuts[i], cuts[i + 1]
        _write(d / "shards" / f"part-{i:03d}.parquet", x[a:b], ids[a:b], row_group=7919)
    assert len(cuts) - 1 >= 8
    _write(d / "all.parquet", x, ids, row_group=65536)
    torch.manual_seed(0)
    model = RQVAE(CFG)
    with torch.no_grad():
        model.init_codebooks(torch.from_numpy(x[:20000]), iters=5, generator=torch.Generator().manual_seed(1))
    single = d / "single.parquet"
    rep = assign_ids(model, d / "all.parquet", single, layout=LAYOUT, chunk_size=65536, encode_block=BLOCK,
                     progress=False)
    return d, x, ids, model, single, rep


def test_parquet_shards_source_matches_single_file(data, tmp_path):
    """No Ray needed: the sharded source read by assign_ids gives the same table as one file."""
    d, x, ids, model, single, _ = data
    src = ParquetShards(d / "shards")
    assert src.num_rows == N and src.dim == DIM and len(src.files) >= 8
    got_ids, got_x = src.read(N // 7 - 5, N // 3 + 5)  # spans shard boundaries
    assert np.array_equal(got_ids, ids[N // 7 - 5: N // 3 + 5]) and np.array_equal(got_x, x[N // 7 - 5: N // 3 + 5])
    out = tmp_path / "shards_single.parquet"
    assign_ids(model, src, out, layout=LAYOUT, chunk_size=3 * BLOCK, encode_block=BLOCK, progress=False)
    assert out.read_bytes() == single.read_bytes()


def test_parquet_shards_row_index_ids(small, tmp_path):
    """No id column: item id = the global row index across shards, as assign_ids on one file."""
    d, x, ids, model = small
    lay = TokenLayout(codebook_sizes=(3, 2, 2), collision_size=2048)
    os.makedirs(tmp_path / "noid")
    _write(tmp_path / "noid" / "a.parquet", x[:1000], None, 333)
    _write(tmp_path / "noid" / "b.parquet", x[1000:], None, 333)
    _write(tmp_path / "noid_all.parquet", x, None, 1000)
    src = ParquetShards(tmp_path / "noid", id_column=None)
    got_ids, _ = src.read(990, 1010)
    assert np.array_equal(got_ids, np.arange(990, 1010))
    ref, out = tmp_path / "ref.parquet", tmp_path / "out.parquet"
    assign_ids(model, tmp_path / "noid_all.parquet", ref, layout=lay, id_column=None, chunk_size=256,
               encode_block=64, progress=False)
    assign_ids(model, src, out, layout=lay, chunk_size=128, encode_block=64, progress=False)
    assert out.read_bytes() == ref.read_bytes()


def test_parquet_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ParquetShards(tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no \\*.parquet"):
        ParquetShards(tmp_path / "empty")
    os.makedirs(tmp_path / "mixed")
    _write(tmp_path / "mixed" / "a.parquet", np.zeros((3, 4), np.float32), np.arange(3), 2)
    pq.write_table(pa.table({"embedding": pa.array([[0.0] * 4]), "item_id": pa.array([1.5])}),
                   tmp_path / "mixed" / "b.parquet")
    with pytest.raises(ValueError, match="same schema"):
        ParquetShards(tmp_path / "mixed")


def test_require_ray_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"tiger_fast\[ray\]"):
        require_ray()


@pytest.fixture(scope="module")
def ray_local():
    if ray is None:
        pytest.skip("ray[data] not installed (optional extra tiger_fast[ray])")
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # shared CI box: no OOM-killer heuristics
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "RAY_memory_monitor_refresh_ms": "0",
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=400 * 2 ** 20,
             runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def _sorted_content(t: IdTable):
    c = t.codes.numpy()
    order = np.lexsort((t.item_ids.numpy(),) + tuple(c[:, l] for l in range(c.shape[1] - 1, -1, -1)))
    return t.item_ids.numpy()[order], c[order]


@needs_ray
def test_ray_ids_identical_to_single_machine(data, ray_local, tmp_path):
    d, x, ids, model, single, rep1 = data
    out = tmp_path / "ray.parquet"
    rep = assign_ids_ray(model, d / "shards", out, layout=LAYOUT, num_workers=2, batch_rows=3 * BLOCK,
                         encode_block=BLOCK, partition_rows=N // 2 + 1)  # 2 blocks per distributed sort
    t_ray, t_one = IdTable.from_parquet(out, layout=LAYOUT), IdTable.from_parquet(single, layout=LAYOUT)
    assert torch.equal(t_ray.item_ids, t_one.item_ids) and torch.equal(t_ray.codes, t_one.codes)
    assert out.read_bytes() == single.read_bytes()  # even the file bytes
    for k in ("num_items", "unique_prefixes", "colliding_items", "max_group_size", "collision_histogram",
              "codebook_usage", "collision_usage"):
        assert rep[k] == rep1[k], k
    assert rep["max_group_size"] > 1  # the collision token is really exercised
    # and the in-memory rule (RQVAE.semantic_codes + assign_collision_tokens), content-wise
    exp = IdTable.from_rq_codes(LAYOUT, ids, model.semantic_codes(x))
    a, b = _sorted_content(t_ray), _sorted_content(exp)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@needs_ray
def test_ray_worker_death_is_retried_identically(data, ray_local, tmp_path):
    d, x, ids, model, single, _ = data
    marker = tmp_path / "died"
    out = tmp_path / "ray_fail.parquet"
    units = -(-N // (4 * BLOCK))
    save_rqvae(model, tmp_path / "rqvae")  # this run takes the model as a checkpoint path
    assign_ids_ray(str(tmp_path / "rqvae"), d / "shards", out, layout=LAYOUT, num_workers=2, batch_rows=4 * BLOCK,
                   encode_block=BLOCK, _inject_failure=(str(marker), units // 2))
    assert marker.exists()  # a worker process really died (os._exit) on that unit's first attempt
    assert out.read_bytes() == single.read_bytes()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # no temporary file left


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_small")
    n = 3001
    g = np.random.default_rng(5)
    x = g.normal(size=(n, DIM)).astype(np.float32)
    ids = g.choice(10 ** 12, size=n, replace=False).astype(np.int64)
    torch.manual_seed(1)
    model = RQVAE(RQVAEConfig(input_dim=DIM, hidden_dims=(8,), latent_dim=4, codebook_sizes=(3, 2, 2)))
    return d, x, ids, model


@needs_ray
def test_ray_errors(small, ray_local, tmp_path):
    d, x, ids, model = small
    lay = TokenLayout(codebook_sizes=(3, 2, 2), collision_size=2048)
    # shards without an id column (ids = global row index; see test_parquet_shards_row_index_ids)
    os.makedirs(tmp_path / "noid")
    _write(tmp_path / "noid" / "a.parquet", x[:1000], None, 333)
    _write(tmp_path / "noid" / "b.parquet", x[1000:], None, 333)
    _write(tmp_path / "noid_all.parquet", x, None, 1000)

    # collision overflow: the same prefix and group size as the single-machine path
    tight = TokenLayout(codebook_sizes=(3, 2, 2), collision_size=300)
    with pytest.raises(ValueError) as e1:
        assign_ids(model, tmp_path / "noid_all.parquet", tmp_path / "o1.parquet", layout=tight, id_column=None,
                   chunk_size=256, encode_block=64, progress=False, work_dir=tmp_path / "w1")
    with pytest.raises(ValueError, match="collision_size is 300") as e2:
        assign_ids_ray(model, tmp_path / "noid", tmp_path / "o2.parquet", layout=tight, id_column=None,
                       num_workers=1, batch_rows=128, encode_block=64)
    pre = lambda m: str(m.value).split(" but ")[0]  # noqa: E731 - "semantic-ID prefix (...) is shared by k items"
    assert pre(e2) in str(e1.value) or pre(e2) == pre(e1)
    assert not os.path.exists(tmp_path / "o2.parquet")

    # duplicate ids across two shards; NaN embedding in a shard
    os.makedirs(tmp_path / "dup")
    _write(tmp_path / "dup" / "a.parquet", x[:10], ids[:10], 4)
    _write(tmp_path / "dup" / "b.parquet", x[10:20], np.r_[ids[10:19], ids[3]], 4)
    with pytest.raises(ValueError, match=f"duplicate item ids, e.g. \\[{ids[3]}\\]"):
        assign_ids_ray(model, tmp_path / "dup", tmp_path / "o3.parquet", layout=lay, batch_rows=64, encode_block=64,
                       num_workers=1)
    os.makedirs(tmp_path / "nan")
    xn = x[:20].copy()
    xn[13, 2] = np.nan
    _write(tmp_path / "nan" / "a.parquet", xn[:10], ids[:10], 4)
    _write(tmp_path / "nan" / "b.parquet", xn[10:], ids[10:20], 4)
    with pytest.raises(ValueError, match=f"row 13 \\(item id {ids[13]}\\) contains NaN"):
        assign_ids_ray(model, tmp_path / "nan", tmp_path / "o4.parquet", layout=lay, batch_rows=64, encode_block=64,
                       num_workers=1)
    with pytest.raises(ValueError, match="multiple of encode_block"):
        assign_ids_ray(model, tmp_path / "nan", tmp_path / "o5.parquet", layout=lay, batch_rows=100, encode_block=64)
    with pytest.raises(ValueError, match="input_dim"):
        assign_ids_ray(RQVAE(RQVAEConfig(input_dim=5, hidden_dims=(4,), latent_dim=2, codebook_sizes=(3, 2, 2))),
                       tmp_path / "nan", tmp_path / "o6.parquet", layout=lay, batch_rows=64, encode_block=64)
