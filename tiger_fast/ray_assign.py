"""Semantic-ID assignment on Ray Data (the scale-out twin of ``tiger_fast.assign.assign_ids``).

Ray is an optional extra (``pip install tiger_fast[ray]``); it is imported lazily, and every
entry point that needs it raises one ImportError saying how to install it.

ID assignment on Ray Data (``assign_ids_ray``)
==============================================

Gives the SAME ID table (same rows, same codes, same row order — in our tests the same bytes) as
the single-machine streaming path ``tiger_fast.assign.assign_ids`` run with the same
``encode_block`` on the same kind of device.

1. **plan (driver)** — the source is one Parquet file or a directory of Parquet shards (files
   ``*.parquet`` in name order; column ``embedding`` list<float>, column ``item_id`` integer).
   Only the shards' footers are read.  Rows get a *global* index (shard order, then row order) and
   are cut into work units of ``batch_rows`` rows, ``batch_rows`` a multiple of ``encode_block``.
2. **map (Ray Data actors)** — ``ray.data.from_items(work units).map_batches(<actor class>,
   concurrency=num_workers)``: each actor holds the RQ-VAE (on its GPU when the cluster has GPUs,
   else on CPU), reads its row range straight from the shards (only the row groups it needs),
   runs the encoder on blocks of ``encode_block`` rows aligned to the global row index — exactly
   the blocks ``assign_ids`` uses, so the float32 latents are bit-identical (a GEMM may round
   differently for a different batch shape, so this alignment is what makes the IDs identical) —
   then the exact quantizer ``tiger_fast.quantize.quantize`` (backend-independent codes).  It
   emits ``(key, item_id)`` with ``key`` = the RQ codes as one mixed-radix int64.  The result is
   materialised in the object store (Ray spills it to disk when it does not fit).
3. **checks + collisions** — duplicate item ids: a Ray Data sort of the ids plus a per-block
   summary (first id, last id, duplicates inside), checked across block boundaries on the driver.
   Collision tokens: a Ray Data sort by ``(key, item_id)``; the driver streams the sorted rows in
   order and gives each row its rank within its prefix group (carried across batch boundaries) —
   the rule of ``tiger_fast.ids.assign_collision_tokens`` (0, 1, 2, ... by item id; a group larger
   than ``collision_size`` -> ValueError naming the prefix).  The driver checks that the stream
   really is sorted (a broken ordering would raise, never write wrong IDs).
4. **write (driver)** — rows in semantic-ID order, row groups of exactly 2^20 rows, to a
   temporary file in the output directory, renamed over ``output`` only when complete.

Fault tolerance: a map actor that dies (process crash, node loss) is restarted by Ray and its
unfinished work units are re-run (``max_retries`` restarts/retries, default 3); each unit's output
is a pure function of (model, rows), so a retry yields the same records and nothing is lost or
duplicated (Ray keeps exactly one output per unit).  If the driver itself dies, re-running the
command recomputes everything and the atomic rename means ``output`` is either the old file or
the complete new one, never a partial one (an idempotent final write).  Unlike ``assign_ids``
there is no on-disk resume of a half-finished run: intermediate state lives in the object store.

Determinism caveats: codes are exact given the latents; latents are bit-identical to
``assign_ids``' when both run the encoder on the same device type (CPU vs CPU; the same GPU model
and library versions for CUDA).  A GPU run is therefore compared with ``assign_ids(...,
device="cuda")``, not with a CPU run.

Multi-process training (retriever and RQ-VAE) is not here: ``tiger_fast.train.train_retriever`` and
``tiger_fast.rqvae.train_rqvae(..., world=current_world())`` run on one rank or N
(tiger_fast/world.py).
"""
from __future__ import annotations

import glob
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .assign import EmbeddingSource, ParquetSource, check_block_multiple, file_fingerprint, layout_for_model
from .atomic import check_target, write_atomic
from .checks import check_int
from .ids import ID_ROW_GROUP, IdRowGroupWriter, id_file_schema
from .layout import TokenLayout
from .provenance import id_file_provenance
from .rqvae import ENCODE_BLOCK, RQVAE, RQVAEConfig, load_rqvae

__all__ = ["ParquetShards", "assign_ids_ray", "require_ray"]

def require_ray():
    """Import and return ``ray`` (with ``ray.data``); ImportError with the install command when
    the optional extra is missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError("Ray Data is not installed; the distributed ID assignment needs the optional "
                          "extra: pip install 'tiger_fast[ray]' (or pip install 'ray[data]>=2.9')") from e
    return ray


# ---------------------------------------------------------------------------------------------
# sharded Parquet source
# ---------------------------------------------------------------------------------------------
def _list_shards(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"embeddings source not found: {path} (a Parquet file or a directory of shards)")
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
                   if not any(part.startswith((".", "_")) for part in os.path.relpath(f, path).split(os.sep)))
    if not files:
        raise ValueError(f"directory {path} holds no *.parquet shards (hidden/_-prefixed files are ignored)")
    return files


class ParquetShards(EmbeddingSource):
    """One Parquet file or a directory of Parquet shards seen as one table, rows in shard order
    (file paths sorted by name, recursively; names starting with ``.``/``_`` ignored).

    ``num_rows``, ``dim``, ``fingerprint``, ``files`` (list of paths), ``offsets`` int64
    (num_files + 1,) global index of each shard's first row, ``read(start, stop) -> (item_ids
    int64 (n,), x float32 (n, dim))``.  Item ids come from ``id_column`` or, when it is None, the
    global row index.  Usable by ``tiger_fast.assign.assign_ids`` too (it takes an EmbeddingSource).
    Only footers are read when it is built (plus one row group of the first shard when the
    embedding column is a variable-size list, to learn the dimension).
    """

    def __init__(self, path, embedding_column: str = "embedding", id_column: str | None = "item_id"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = os.fspath(path)
        self.files = _list_shards(path)
        self.emb, self.idc = embedding_column, id_column
        counts = []
        first = None
        for f in self.files:
            try:
                md = pq.read_metadata(f)
                schema = md.schema.to_arrow_schema()
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"cannot read shard {f} as Parquet: {e}") from e
            if first is None:
                first = (f, schema)
            else:
                for c in [embedding_column] + ([id_column] if id_column else []):
                    if c not in schema.names or schema.field(c).type != first[1].field(c).type:
                        raise ValueError(f"shard {f} does not match {first[0]}: column {c!r} missing or of a "
                                         "different type; all shards need the same schema")
            counts.append(md.num_rows)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_rows = int(self.offsets[-1])
        self._open: dict[int, ParquetSource] = {}
        nonempty = [i for i, c in enumerate(counts) if c]
        self.dim = self._shard(nonempty[0] if nonempty else 0).dim or 0
        self.fingerprint = {"kind": "parquet_shards", "files": [file_fingerprint(f) for f in self.files],
                            "embedding_column": embedding_column, "id_column": id_column}

    def _shard(self, i: int) -> ParquetSource:
        src = self._open.get(i)
        if src is None:
            if len(self._open) >= 4:  # bounded: one cached row group per open shard
                self._open.clear()
            src = self._open[i] = ParquetSource(self.files[i], self.emb, self.idc)
            if self.num_rows and hasattr(self, "dim") and src.num_rows and src.dim != self.dim:
                raise ValueError(f"shard {self.files[i]} has embeddings of size {src.dim}, expected {self.dim}")
        return src

    def __getstate__(self):  # shipped to Ray workers without open file handles
        d = dict(self.__dict__)
        d["_open"] = {}
        return d

    def read(self, start: int, stop: int):
        start, stop = max(int(start), 0), min(int(stop), self.num_rows)
        ids_parts, x_parts = [], []
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while start < stop and i < len(self.files):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            if b > start:
                lo, hi = start - a, min(stop, b) - a
                ids, x = self._shard(i).read(lo, hi)
                if self.idc is None:
                    ids = ids + a  # the shard's local row index -> the global one
                ids_parts.append(ids)
                x_parts.append(x)
                start = a + hi
            i += 1
        if not ids_parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(ids_parts), np.concatenate(x_parts)


# ---------------------------------------------------------------------------------------------
# the map actor
# ---------------------------------------------------------------------------------------------
def _radix(sizes) -> np.ndarray:
    r = np.ones(len(sizes), dtype=np.int64)
    for l in range(len(sizes) - 2, -1, -1):
        r[l] = r[l + 1] * sizes[l + 1]
    return r


class _EncodeQuantize:
    """Ray Data actor: work units {start, stop} -> {key int64, item_id int64} for those rows."""

    def __init__(self, cfg: dict, state: dict, source: ParquetShards, encode_block: int, backend: str,
                 device: str, threads: int | None, inject_failure=None):
        if threads:
            torch.set_num_threads(int(threads))
        if device == "cuda" and not torch.cuda.is_available():
            # never fall back to the CPU silently: CPU latents may round differently from GPU ones
            raise RuntimeError("this Ray worker was given a GPU but torch sees no CUDA device; "
                               "install a CUDA build of torch on the workers or pass use_gpu=False")
        self.device = torch.device(device)
        self.model = RQVAE(RQVAEConfig.from_dict(cfg))
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        self.model.to(self.device).eval()
        self.cbs = self.model.codebooks()
        self.radix = _radix(self.model.cfg.codebook_sizes)
        self.src, self.blk, self.backend = source, int(encode_block), backend
        self.inject_failure = inject_failure

    def __call__(self, batch: dict) -> dict:
        from .quantize import quantize

        keys, ids_out = [], []
        for unit, a, b in zip(batch["unit"], batch["start"], batch["stop"]):
            a, b = int(a), int(b)
            if self.inject_failure is not None:  # test hook: the first attempt of one unit dies
                marker, bad_unit = self.inject_failure
                if int(unit) == int(bad_unit) and not os.path.exists(marker):
                    with open(marker, "w") as f:
                        f.write(str(os.getpid()))
                    os._exit(1)  # a hard crash of the worker process, not a Python exception
            ids, x = self.src.read(a, b)
            if ids.shape[0] != b - a:
                raise ValueError(f"source returned {ids.shape[0]} rows for rows [{a}, {b})")
            fin = np.isfinite(x).all(axis=1)
            if not fin.all():
                bad = int(np.flatnonzero(~fin)[0])
                raise ValueError(f"embedding of row {a + bad} (item id {int(ids[bad])}) contains NaN or Inf")
            with torch.no_grad():
                # encoder blocks aligned to the global row index (a % blk == 0), as in assign_ids
                z = torch.cat([self.model.encoder(torch.from_numpy(x[s: s + self.blk]).to(self.device))
                               for s in range(0, b - a, self.blk)])
                codes = quantize(z, self.cbs.to(z.device) if isinstance(self.cbs, torch.Tensor)
                                 else [c.to(z.device) for c in self.cbs], backend=self.backend)
            keys.append(codes.cpu().numpy() @ self.radix)
            ids_out.append(ids)
        return {"key": np.concatenate(keys).astype(np.int64), "item_id": np.concatenate(ids_out).astype(np.int64)}


def _dup_summary(batch: dict) -> dict:
    """Sorted item ids of one block -> (first, last, number of repeats, one repeated id or -1)."""
    ids = np.asarray(batch["item_id"], dtype=np.int64)
    if ids.size == 0:
        return {"first": np.zeros(0, np.int64), "last": np.zeros(0, np.int64),
                "dups": np.zeros(0, np.int64), "example": np.zeros(0, np.int64)}
    rep = ids[1:][ids[1:] == ids[:-1]]
    return {"first": ids[:1], "last": ids[-1:], "dups": np.array([rep.size], np.int64),
            "example": np.array([rep[0] if rep.size else -1], np.int64)}


# ---------------------------------------------------------------------------------------------
# driver-side streaming collision resolution + writer
# ---------------------------------------------------------------------------------------------
@dataclass
class _Stream:
    """State carried across sorted batches."""
    prev_key: int = -1
    prev_id: int = 0
    prev_rank: int = -1
    rows: int = 0
    overflow_key: int | None = None
    overflow_size: int = 0


def _ranks(keys: np.ndarray, ids: np.ndarray, st: _Stream) -> np.ndarray:
    """Collision ranks of one batch of rows sorted by (key, id), continuing the previous batch."""
    n = keys.size
    if n == 0:
        return np.zeros(0, np.int64)
    # the stream must be sorted by (key, item id) with distinct ids inside a key
    ok_k = np.empty(n, dtype=bool)
    ok_k[0] = keys[0] > st.prev_key or (keys[0] == st.prev_key and ids[0] > st.prev_id) or st.rows == 0
    ok_k[1:] = (keys[1:] > keys[:-1]) | ((keys[1:] == keys[:-1]) & (ids[1:] > ids[:-1]))
    if not ok_k.all():
        j = int(np.flatnonzero(~ok_k)[0])
        raise RuntimeError(f"internal error: the Ray sort returned rows out of (key, item_id) order at "
                           f"row {st.rows + j}; no output was written")
    start = np.empty(n, dtype=bool)
    start[0] = st.rows == 0 or keys[0] != st.prev_key
    start[1:] = keys[1:] != keys[:-1]
    idx = np.arange(n, dtype=np.int64)
    last_start = np.maximum.accumulate(np.where(start, idx, -1))
    rank = np.where(last_start >= 0, idx - last_start, idx + st.prev_rank + 1)
    st.prev_key, st.prev_id, st.prev_rank = int(keys[-1]), int(ids[-1]), int(rank[-1])
    st.rows += n
    return rank


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
def assign_ids_ray(model_or_path, source, output, *, layout: TokenLayout | None = None,
                   ray_address: str | None = None, num_workers: int | None = None,
                   batch_rows: int = 65536, encode_block: int = ENCODE_BLOCK, partition_rows: int = 4_000_000,
                   embedding_column: str = "embedding", id_column: str | None = "item_id",
                   backend: str = "auto", use_gpu: bool | None = None, cpus_per_worker: float = 1,
                   max_retries: int = 3, progress: bool = False, allow_other_catalogue: bool = False,
                   _inject_failure=None) -> dict:
    """Assign semantic IDs to a Parquet embedding dataset with Ray Data; write an ID table.

    model_or_path: RQVAE or a ``save_rqvae`` directory (read on the driver, shipped to the
    workers); source: a Parquet file or a directory of Parquet shards (see ``ParquetShards``);
    output: the Parquet ID table to write (``IdTable.from_parquet`` reads it; identical to
    ``tiger_fast.assign.assign_ids`` with the same ``encode_block``).
    layout: TokenLayout (default: the model's codebook sizes, collision 256, 2000 user tokens).
    ray_address: ``ray.init(address=...)`` when Ray is not initialised yet (None: start a local
    instance, shut down at the end); an already initialised Ray is used as is.
    num_workers: map actors (default: the cluster's GPUs when ``use_gpu``, else its CPUs divided
    by ``cpus_per_worker``).  batch_rows: rows per work unit (a multiple of encode_block; the unit
    of retry).  partition_rows: target rows per block of the two distributed sorts (their cost
    grows with the square of the block count; each sort task holds about this many rows).
    use_gpu: one GPU per actor (default: when the cluster has GPUs).  max_retries:
    actor restarts / task retries after a worker dies.  ``_inject_failure=(marker_path, unit)``
    is a test hook: the first attempt of work unit ``unit`` kills its worker process.
    allow_other_catalogue: as in ``assign_ids`` (the output records the same provenance).
    Returns a report dict (the fields of ``assign_ids``' report plus ``workers``, ``units`` and
    ``timing``: seconds of the map, the duplicate-id check and the sort + collision pass + write).
    Raises ValueError on collision overflow, duplicate item ids, NaN/Inf embeddings, a wrong
    embedding size; ImportError when Ray is not installed.
    """
    ray = require_ray()
    t_start = time.perf_counter()
    if isinstance(model_or_path, RQVAE):
        model = model_or_path
    else:
        model = load_rqvae(model_or_path)
    cfg = model.cfg
    layout = layout_for_model(model, layout)
    batch_rows, encode_block = check_block_multiple(batch_rows, encode_block, "batch_rows")
    check_int(num_workers, "num_workers", none_ok=True)
    check_int(partition_rows, "partition_rows")
    if int(max_retries) < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    prefix_space = math.prod(cfg.codebook_sizes)
    if prefix_space >= 2 ** 62:
        raise ValueError(f"codebook sizes {cfg.codebook_sizes} give {prefix_space} prefixes; the packed "
                         "int64 key needs fewer than 2^62")
    src = ParquetShards(source, embedding_column=embedding_column, id_column=id_column)
    if src.num_rows and src.dim != cfg.input_dim:
        raise ValueError(f"embeddings have dimension {src.dim} but the RQ-VAE expects input_dim "
                         f"{cfg.input_dim}; embed with the model the RQ-VAE was trained on")
    output = check_target(os.fspath(output), "output")
    provenance = id_file_provenance(model, source, src.num_rows, allow_other_catalogue)
    n = src.num_rows
    units = [{"unit": u, "start": a, "stop": min(a + batch_rows, n)}
             for u, a in enumerate(range(0, n, batch_rows))]

    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=progress)
        started = True
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        if use_gpu is None:
            use_gpu = gpus > 0
        if use_gpu and gpus == 0:
            raise ValueError("use_gpu=True but the Ray cluster has no GPUs")
        if num_workers is None:
            num_workers = gpus if use_gpu else max(1, int(res.get("CPU", 1) // cpus_per_worker))
        num_workers = max(1, min(int(num_workers), max(len(units), 1)))
        report = _run(ray, model, layout, src, units, output, provenance, num_workers=num_workers,
                      encode_block=encode_block, partition_rows=int(partition_rows), backend=backend,
                      use_gpu=bool(use_gpu),
                      cpus_per_worker=cpus_per_worker, max_retries=int(max_retries), progress=progress,
                      inject_failure=_inject_failure)
    finally:
        if started:
            ray.shutdown()
    secs = time.perf_counter() - t_start
    report.update(rows=n, seconds=secs, items_per_second=n / secs if secs > 0 else float("nan"),
                  output=output, workers=num_workers, units=len(units))
    return report


def _user_error(e: BaseException) -> BaseException | None:
    """The ValueError a worker raised, found in the chain of Ray's wrapper exceptions."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ValueError) and type(x).__module__ == "builtins":
            return x
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    # Ray Data re-raises a worker's exception as UserCodeException whose original cause did not
    # survive pickling; the worker's traceback text (part of the message) still names it.
    import re

    m = re.search(r"^ValueError: (.*)$", str(e), flags=re.M)
    return ValueError(m.group(1)) if m else None


def _run(ray, model: RQVAE, layout: TokenLayout, src: ParquetShards, units, output, provenance, *, num_workers,
         encode_block, partition_rows, backend, use_gpu, cpus_per_worker, max_retries, progress,
         inject_failure) -> dict:
    import pyarrow.parquet as pq
    from ray.data import DataContext

    ctx = DataContext.get_current()
    timing: dict = {}
    old_order, old_prog = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # the driver checks the order anyway
    ctx.enable_progress_bars = bool(progress)
    L1 = layout.num_levels
    sizes = tuple(layout.codebook_sizes)
    cs = layout.collision_size
    try:
        if units:
            state = {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
            ds = ray.data.from_items(units, override_num_blocks=len(units))
            kw = dict(batch_size=1, batch_format="numpy",
                      compute=ray.data.ActorPoolStrategy(size=num_workers),
                      num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0,
                      fn_constructor_kwargs={"cfg": model.cfg.to_dict(), "state": state, "source": src,
                                             "encode_block": encode_block, "backend": backend,
                                             "device": "cuda" if use_gpu else "cpu",
                                             "threads": max(1, int(cpus_per_worker)),
                                             "inject_failure": inject_failure})
            # Bounded restarts of a dead actor and retries of its unfinished work units (Ray Data's
            # default is unbounded, which would loop forever on a deterministic crash such as OOM).
            # Passed as ray_remote_args: deprecated from Ray 2.60 (a warning), hence the fallback.
            remote = {"max_restarts": max_retries, "max_task_retries": max_retries}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    mapped = ds.map_batches(_EncodeQuantize, **kw, **remote)
                except TypeError:
                    mapped = ds.map_batches(_EncodeQuantize, **kw)
            try:
                t0 = time.perf_counter()
                # few, large blocks for the two sorts: a Ray sort splits every input block into one
                # piece per output block, so the map's many small blocks would cost blocks^2 pieces
                mapped = mapped.repartition(max(1, math.ceil(src.num_rows / partition_rows))).materialize()
                timing["map_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                # 1) duplicate item ids, globally
                summ = (mapped.select_columns(["item_id"]).sort("item_id")
                        .map_batches(_dup_summary, batch_size=None, batch_format="numpy").take_all())
            except Exception as e:  # noqa: BLE001 - unwrap a worker's ValueError
                ue = _user_error(e)
                if ue is not None:
                    raise ValueError(str(ue)) from e
                raise
            summ.sort(key=lambda r: (int(r["first"]), int(r["last"])))
            dups = [int(r["example"]) for r in summ if int(r["dups"])]
            dups += [int(summ[i]["first"]) for i in range(1, len(summ))
                     if int(summ[i]["first"]) <= int(summ[i - 1]["last"])]
            if dups:
                raise ValueError(f"the source contains duplicate item ids, e.g. {sorted(set(dups))[:5]}; "
                                 "every item needs exactly one id")
            timing["dup_check_s"] = time.perf_counter() - t0
            sorted_ds = mapped.sort(["key", "item_id"])
        schema = id_file_schema(layout, provenance)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        used = [np.zeros(k, dtype=bool) for k in sizes]
        rank_count = np.zeros(cs + 1, dtype=np.int64)  # rank_count[r] = groups with > r members
        st = _Stream()
        t0 = time.perf_counter()

        def write(tmp):
            nonlocal rank_count
            with pq.ParquetWriter(tmp, schema) as w:
                out = IdRowGroupWriter(w, layout)  # the writer assign_ids uses: identical bytes
                if units:
                    for b in sorted_ds.iter_batches(batch_size=ID_ROW_GROUP, batch_format="numpy",
                                                    prefetch_batches=1):
                        keys = np.asarray(b["key"], dtype=np.int64)
                        ids = np.asarray(b["item_id"], dtype=np.int64)
                        if st.overflow_key is not None:  # finish counting the overflowing group
                            st.overflow_size += int(np.sum(keys == st.overflow_key))
                            if keys.size and keys[-1] != st.overflow_key:
                                break
                            continue
                        rank = _ranks(keys, ids, st)
                        if rank.size and rank.max() >= cs:
                            j = int(np.argmax(rank >= cs))
                            st.overflow_key = int(keys[j])
                            # rank[j] == cs: the group has cs + 1 rows so far, plus the rest of the batch
                            st.overflow_size = cs + 1 + int(np.sum(keys[j + 1:] == keys[j]))
                            if keys[-1] != st.overflow_key:
                                break
                            continue
                        codes = np.stack(np.unravel_index(keys, sizes), axis=1)
                        rows = np.empty((keys.size, L1 + 1), dtype=np.int64)
                        rows[:, 0] = ids
                        rows[:, 1:L1] = codes
                        rows[:, L1] = rank
                        for l in range(L1 - 1):
                            used[l][codes[:, l]] = True
                        rank_count += np.bincount(rank, minlength=cs + 1)[: cs + 1]
                        out.add(rows)
                if st.overflow_key is not None:
                    prefix = tuple(int(v) for v in np.unravel_index(st.overflow_key, sizes))
                    raise ValueError(f"semantic-ID prefix {prefix} is shared by {st.overflow_size} items but "
                                     f"collision_size is {cs}. Use a larger TokenLayout.collision_size, "
                                     "more/larger RQ-VAE codebooks, or retrain the RQ-VAE (codebook collapse?)")
                if st.rows != src.num_rows:
                    raise RuntimeError(f"internal error: {st.rows} rows came back from Ray for "
                                       f"{src.num_rows} input rows; no output was written")
                out.close()
        # all-or-nothing: output is the old file or the complete new one (atomic.write_atomic)
        write_atomic(output, write, what="output")
        timing["sort_write_s"] = time.perf_counter() - t0
    finally:
        ctx.execution_options.preserve_order = old_order
        ctx.enable_progress_bars = old_prog
    # group-size statistics from the rank counts: groups of size exactly s = c[s-1] - c[s]
    c = rank_count
    hist = {s: int(c[s - 1] - c[s]) for s in range(1, cs + 1) if c[s - 1] - c[s] > 0}
    used_c = c[:cs] > 0
    return {"num_items": src.num_rows, "level_sizes": list(layout.level_sizes),
            "unique_prefixes": int(c[0]), "colliding_items": int(src.num_rows - hist.get(1, 0)),
            "max_group_size": max(hist) if hist else 0, "collision_histogram": hist,
            "codebook_usage": [float(u.mean()) for u in used], "collision_usage": float(used_c.mean()),
            "timing": timing}
