"""Streaming semantic-ID assignment for catalogues larger than memory (docs/contracts.md, "What is atomic").

``assign_ids(model, source, output)`` reads item embeddings from a ``.npy`` file (memory-mapped)
or a Parquet file (a list / fixed-size-list float column, read row group by row group), runs the
RQ-VAE encoder and the exact residual quantizer chunk by chunk, resolves collisions exactly, and
writes an ID table Parquet file readable by ``IdTable.from_parquet``.

Pipeline (all intermediate files live in ``work_dir``):

1. **map** — for each chunk of ``chunk_size`` input rows: encode + quantize, then write the
   records ``(prefix key, item id)`` split into ``P`` partitions by prefix-key *range* (so every
   item of one prefix group lands in the same partition and partitions are ordered by ID), and the
   item ids split into ``P`` partitions by id *hash* (for the global duplicate-id check).  Each
   chunk's files are written into a temporary directory renamed into place when complete.
2. **reduce** — for each partition: gather its slices from every chunk, sort by
   (prefix, item id), give collision codes 0, 1, 2, ... (overflow -> ValueError naming the prefix),
   check that no item id repeats, and write the partition's rows (atomic rename).
3. **write** — concatenate the partitions (in order) into the output Parquet file, written to a
   temporary name and renamed only when complete; then the work directory is removed.

Output rows are in semantic-ID order ``(c0, c1, c2, c3)``: a layout that depends only on the set of
(item id, embedding) pairs, not on the chunking.

Determinism.  Codes come from ``tiger_fast.quantize`` (exact for given latents).  The encoder is a
float32 MLP whose GEMMs may round differently for different batch shapes, so it is always run on
blocks of ``encode_block`` rows aligned to the *global* row index (``chunk_size`` must be a
multiple of it): a row's latent is computed in the same block with the same neighbours whatever
the chunk size or resume point, so the output is identical (tested) across chunk sizes and restarts.

Resumability and ownership.  ``work_dir`` is created complete (``manifest.json`` with the run's
parameters: source size and mtime, model fingerprint, layout, chunking; a ``lock`` file; ``map/``,
``reduce/``) by renaming a finished temporary directory, so it never exists without its manifest.
Every run holds an fcntl lock on ``work_dir/lock`` while it works (exclusive for a final run, shared
for ``worker=`` runs; a conflicting run is refused at once, not queued).  A restart with the same
parameters skips finished chunks and partitions; one with different parameters, or a directory
without the lock file (not created by assign_ids), raises (use a fresh ``work_dir`` or
``restart=True``).  Each chunk / partition directory also records the run's fingerprint (a digest
of the manifest): a piece written by another model or input (a straggling process of an earlier
run) is rejected and recomputed, never adopted.  Chunk writes never recreate a removed work dir.
A piece is finished exactly when its directory exists (renamed atomically), so a kill at any
point loses at most the work in progress and never duplicates anything.

Workers.  ``worker=(i, W)`` lets W processes or machines sharing ``work_dir`` map disjoint chunks
concurrently (a chunk is owned by ``chunk % W``); a final call without ``worker`` maps anything
left, resolves and writes.  Measured: 2 concurrent workers + the final call on 500k items give a
file byte-identical to one process with another chunk size and partition count.

Memory bound (approximate, bytes)::

    chunk_size * (4*D + 4*(sum(hidden_dims) + latent_dim) + 64)      # one chunk in flight
  + row_group_rows * 4 * D                                             # Parquet: one row group cached
  + max_partition_rows * 48                                            # reduce: one partition

where ``max_partition_rows`` ~ N / P (``P = ceil(N / partition_rows)``, default partition_rows =
4,000,000; a single prefix holds at most ``collision_size`` items, so skew is bounded too).
Measured (384-d MiniLM-like vectors, Beauty RQ-VAE, 1 thread, chunk 65,536): peak anonymous RSS
462 MB at 500k items and 492 MB at 2M items (154 MB of it is the imports), 35-57k items/s; the
memory-mapped input adds file-backed, reclaimable pages only.  At 100M items (32-d latents, paper
RQ-VAE, benchmarks/bench_assign_stream.py) the peak anonymous RSS was 1.06 GB, reached while
resolving collisions and writing the 688 MB output.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .atomic import check_target, clean_stale_temps, fsync_dir, temp_name, temp_owner, write_atomic
from .checks import check_int
from .ids import IdRowGroupWriter, id_file_schema
from .provenance import id_file_provenance, rqvae_digest
from .layout import TokenLayout
from .rqvae import ENCODE_BLOCK, RQVAE, load_rqvae

__all__ = ["assign_ids", "EmbeddingSource", "ParquetSource", "open_source", "file_fingerprint",
           "check_block_multiple"]

_MANIFEST_FORMAT = "tiger_fast.assign/1"
_LOCK = "lock"  # work_dir/lock: fcntl lock held by every run using the work dir
_FINGERPRINT = "fingerprint"  # in every chunk / partition directory: the run that wrote it


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
class EmbeddingSource:
    """Random access to rows of an embedding file.  ``num_rows``, ``dim``, ``fingerprint`` (dict),
    ``read(start, stop) -> (item_ids int64 (n,), x float32 (n, dim))``."""

    num_rows: int
    dim: int

    def read(self, start: int, stop: int):  # pragma: no cover - interface
        raise NotImplementedError


def file_fingerprint(path: str) -> dict:
    """What identifies an input file in a run's manifest: absolute path, size, mtime (ns)."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_int64_ids(ids: np.ndarray, what: str) -> None:
    """Unsigned 64-bit ids beyond the int64 range would wrap around silently: refuse them."""
    if ids.dtype == np.uint64 and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
        bad = int(np.flatnonzero(np.asarray(ids) > np.uint64(np.iinfo(np.int64).max))[0])
        raise ValueError(f"{what}: id {int(ids[bad])} (row {bad}) is beyond the int64 range; item ids must be "
                         "int64 (map larger ids to a smaller id space first)")


def _load_npy(path: str, what: str) -> np.ndarray:
    """``path`` memory-mapped (no pickle); ValueError naming ``what`` and the file when unreadable."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except EOFError:
        raise ValueError(f"cannot read {what} {path} as .npy: the file is empty") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read {what} {path} as .npy: {e}") from e


class _NpySource(EmbeddingSource):
    def __init__(self, path: str, ids_path: str | None):
        self.x = _load_npy(path, "embeddings")
        if self.x.ndim != 2 or not np.issubdtype(self.x.dtype, np.floating):
            raise ValueError(f"embeddings {path} must be a 2-D float array (N, D), got {self.x.dtype} {self.x.shape}")
        self.num_rows, self.dim = int(self.x.shape[0]), int(self.x.shape[1])
        self.ids = None
        self.fingerprint = {"kind": "npy", "embeddings": file_fingerprint(path)}
        if ids_path is not None:
            self.ids = _load_npy(ids_path, "item ids")
            if self.ids.shape != (self.num_rows,) or not np.issubdtype(self.ids.dtype, np.integer):
                raise ValueError(f"item ids {ids_path} must be an integer array ({self.num_rows},), "
                                 f"got {self.ids.dtype} {self.ids.shape}")
            check_int64_ids(self.ids, f"item ids {ids_path}")
            self.fingerprint["ids"] = file_fingerprint(ids_path)

    def read(self, start, stop):
        x = np.array(self.x[start:stop], dtype=np.float32)  # a writable in-memory copy of the slice
        ids = (np.arange(start, stop, dtype=np.int64) if self.ids is None
               else np.asarray(self.ids[start:stop], dtype=np.int64))
        return ids, x


class ParquetSource(EmbeddingSource):
    """Embeddings from one Parquet file (a list<float> column, an optional integer id column),
    read row group by row group."""

    def __init__(self, path: str, embedding_column: str, id_column: str | None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            self.pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"cannot read embeddings {path} as Parquet: {e}") from e
        schema = self.pf.schema_arrow
        cols = [embedding_column] + ([id_column] if id_column else [])
        missing = [c for c in cols if c not in schema.names]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing} (columns: {schema.names}); pass "
                             "embedding_column= / id_column=")
        et = schema.field(embedding_column).type
        if not (pa.types.is_list(et) or pa.types.is_large_list(et) or pa.types.is_fixed_size_list(et)) \
                or not pa.types.is_floating(et.value_type):
            raise ValueError(f"column {embedding_column!r} of {path} must be a list of floats, got {et}")
        if id_column and not pa.types.is_integer(schema.field(id_column).type):
            raise ValueError(f"column {id_column!r} of {path} must be integer item ids, got "
                             f"{schema.field(id_column).type}")
        self.cols, self.emb, self.idc, self.path = cols, embedding_column, id_column, path
        md = self.pf.metadata
        self.rg_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        self.rg_start = np.concatenate([[0], np.cumsum(self.rg_rows)]).astype(np.int64)
        self.num_rows = int(self.rg_start[-1])
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self.dim = int(et.list_size) if pa.types.is_fixed_size_list(et) else None
        if self.dim is None:
            self.dim = self._row_group(0)[1].shape[1] if self.num_rows else 0
        self.fingerprint = {"kind": "parquet", "embeddings": file_fingerprint(path),
                            "embedding_column": embedding_column, "id_column": id_column}

    def _row_group(self, g: int):
        if self._cache is not None and self._cache[0] == g:
            return self._cache[1], self._cache[2]
        t = self.pf.read_row_group(g, columns=self.cols)
        col = t.column(self.emb).combine_chunks()
        if col.null_count:
            raise ValueError(f"{self.path}: column {self.emb!r} has null embeddings (row group {g})")
        n = len(col)
        import pyarrow as pa
        if not pa.types.is_fixed_size_list(col.type):
            lens = col.value_lengths().to_numpy(zero_copy_only=False)
            want = self.dim if self.dim is not None else (int(lens[0]) if n else 0)
            if n and (lens != want).any():
                bad = int(np.flatnonzero(lens != want)[0])
                raise ValueError(f"{self.path}: embedding of row {int(self.rg_start[g]) + bad} has length "
                                 f"{int(lens[bad])}, expected {want}; all embeddings must have one size")
            d = want
        else:
            d = col.type.list_size
        vals = col.flatten().to_numpy(zero_copy_only=False)  # NaN/Inf rows are caught by the map phase
        x = np.asarray(vals, dtype=np.float32).reshape(n, d)
        if self.idc:
            idcol = t.column(self.idc)
            if idcol.null_count:
                raise ValueError(f"{self.path}: column {self.idc!r} has null item ids (row group {g})")
            ids = idcol.to_numpy()
            check_int64_ids(ids, f"{self.path}: column {self.idc!r}")
            ids = ids.astype(np.int64)
        else:
            ids = np.arange(self.rg_start[g], self.rg_start[g + 1], dtype=np.int64)
        self._cache = (g, ids, x)
        return ids, x

    def read(self, start, stop):
        g0 = int(np.searchsorted(self.rg_start, start, side="right") - 1)
        ids_parts, x_parts = [], []
        g = g0
        while g < len(self.rg_rows) and self.rg_start[g] < stop:
            ids, x = self._row_group(g)
            a = max(start - int(self.rg_start[g]), 0)
            b = min(stop - int(self.rg_start[g]), self.rg_rows[g])
            ids_parts.append(ids[a:b])
            x_parts.append(x[a:b])
            g += 1
        if not ids_parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(ids_parts), np.concatenate(x_parts)


def open_source(path, *, ids=None, embedding_column: str = "embedding",
                id_column: str | None = "item_id") -> EmbeddingSource:
    """Open an embedding file: ``.npy`` (item ids from the ``ids`` .npy file, else the row index)
    or Parquet (``embedding_column`` list<float>, ``id_column`` integer ids, or None = row index)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embeddings file not found: {path}")
    if path.endswith(".npy"):
        return _NpySource(path, None if ids is None else os.fspath(ids))
    if ids is not None:
        raise ValueError("ids= is only for .npy sources; a Parquet source names its id column (id_column=)")
    return ParquetSource(path, embedding_column, id_column)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _hash_ids(ids: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mix (splitmix64 finaliser) of int64 ids -> uint64; spreads consecutive ids."""
    z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _save_npy_atomic_dir(final_dir: str, arrays: dict, fingerprint: str) -> None:
    """Write arrays as .npy files plus a ``fingerprint`` file into ``final_dir``, which appears only
    when complete (a temporary directory renamed into place; not fsynced: intermediate files
    survive kill -9, after a power loss rerun with restart=True).  The parent directory must exist:
    it is never recreated, so a work dir removed by another run is not resurrected."""
    tmp = temp_name(final_dir)
    try:
        os.mkdir(tmp)
    except FileNotFoundError:
        raise ValueError(f"work directory {os.path.dirname(os.path.dirname(final_dir))!r} was removed while "
                         "this run was using it (another run finished or restarted it); rerun") from None
    try:
        for name, a in arrays.items():
            with open(os.path.join(tmp, name + ".npy"), "wb") as f:
                np.save(f, a, allow_pickle=False)
        with open(os.path.join(tmp, _FINGERPRINT), "w") as f:
            f.write(fingerprint)
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if not os.path.isdir(final_dir):
                raise
            shutil.rmtree(tmp)  # another worker finished the same piece first: same content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _piece_ok(d: str, fingerprint: str) -> bool | None:
    """None: ``d`` does not exist; True: a finished piece of this run; False: a foreign piece."""
    if not os.path.isdir(d):
        return None
    try:
        with open(os.path.join(d, _FINGERPRINT)) as f:
            return f.read() == fingerprint
    except OSError:
        return False


def _split(keys: np.ndarray, part: np.ndarray, P: int, *cols):
    """Stable-sort rows by partition; returns offsets int64 (P+1,) and the reordered columns."""
    order = np.argsort(part, kind="stable")
    offsets = np.zeros(P + 1, dtype=np.int64)
    np.cumsum(np.bincount(part, minlength=P), out=offsets[1:])
    return offsets, [c[order] for c in (keys, *cols)]


@dataclass
class _Plan:
    n: int
    chunk_size: int
    num_chunks: int
    P: int
    prefix_space: int
    encode_block: int


# ---------------------------------------------------------------------------------------------
# main entry point
# ---------------------------------------------------------------------------------------------
def check_block_multiple(rows, encode_block, name: str) -> tuple[int, int]:
    """``rows`` (``name``: chunk_size, batch_rows) must be a positive multiple of ``encode_block``:
    the encoder then always runs on the same blocks of rows, so its float32 output does not depend
    on how rows are grouped.  Returns ``(int(rows), int(encode_block))``; ValueError otherwise."""
    rows, encode_block = int(rows), int(encode_block)
    if encode_block < 1 or rows < encode_block or rows % encode_block:
        raise ValueError(f"{name} ({rows}) must be a positive multiple of encode_block ({encode_block}); "
                         "that keeps the encoder's output independent of how rows are grouped")
    return rows, encode_block


def layout_for_model(model: RQVAE, layout: TokenLayout | None = None) -> TokenLayout:
    """The TokenLayout to write IDs with: the given one (its codebook sizes must be the model's) or,
    when None, the default layout with the model's codebook sizes."""
    cfg = model.cfg
    if layout is None:
        return TokenLayout(codebook_sizes=cfg.codebook_sizes)
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if tuple(layout.codebook_sizes) != tuple(cfg.codebook_sizes):
        raise ValueError(f"layout.codebook_sizes {layout.codebook_sizes} != the model's codebook sizes "
                         f"{cfg.codebook_sizes}; build the layout from the model")
    return layout


def assign_ids(model, source, output, *, layout: TokenLayout | None = None, ids=None,
               embedding_column: str = "embedding", id_column: str | None = "item_id",
               chunk_size: int = 65536, encode_block: int = ENCODE_BLOCK, partition_rows: int = 4_000_000,
               work_dir=None, backend: str = "auto", device: str | None = None, restart: bool = False,
               keep_work: bool = False, progress: bool = True, worker: tuple[int, int] | None = None,
               callback: Callable[[str, int], None] | None = None, allow_other_catalogue: bool = False) -> dict:
    """Assign semantic IDs to every item of an embedding file, streaming, and write an ID table.

    model: RQVAE or a checkpoint directory (``save_rqvae``); source: ``.npy`` / Parquet path (see
    ``open_source``; ``ids``/``embedding_column``/``id_column`` are passed to it); output: the
    Parquet ID table to write (columns item_id, c0..c{L}; ``IdTable.from_parquet`` reads it).
    layout: TokenLayout (default: the model's codebook sizes, collision 256, 2000 user tokens);
    its codebook sizes must equal the model's.  chunk_size: rows per map chunk (a multiple of
    encode_block); partition_rows: target rows per reduce partition (bounds reduce memory).
    work_dir: intermediate files (default ``output + ".work"``), removed after success unless
    keep_work.  restart: discard a previous run's work_dir instead of resuming it.
    device: where the encoder runs; None = the model's device (a checkpoint loads to "cpu").
    worker: (index, count) — several processes or machines sharing ``work_dir`` (same arguments
    otherwise) each map the chunks with ``chunk % count == index`` and return without resolving
    collisions; one final call without ``worker`` maps whatever is left, resolves and writes.
    The output is the same as a single process's (the chunks are the same files either way).
    callback(stage, index): called after each finished chunk ("map", i) and partition
    ("reduce", p) — for monitoring (an exception raised there stops the run, which can resume).
    allow_other_catalogue: apply an RQ-VAE trained on another catalogue's embeddings (by default
    a known mismatch between the model's and the embeddings' recorded catalogues is refused; see
    tiger_fast.provenance).  The output records the embeddings' catalogue and the model's digest.
    Returns a report dict (IdTable.report() fields plus rows, seconds, items_per_second).
    Raises ValueError on collision overflow (naming the prefix), duplicate item ids, NaN/Inf
    embeddings (naming the row range), a wrong embedding size, or a work_dir from another run.
    """
    t_start = time.perf_counter()
    if not isinstance(model, RQVAE):
        model = load_rqvae(model, device=device or "cpu")
    if device is None:
        device = str(next(model.parameters()).device)
    elif torch.device(device) != next(model.parameters()).device:
        raise ValueError(f"device={device!r} but the model is on {next(model.parameters()).device}; move the "
                         "model (model.to(device)) or leave device=None")
    cfg = model.cfg
    layout = layout_for_model(model, layout)
    chunk_size, encode_block = check_block_multiple(chunk_size, encode_block, "chunk_size")
    partition_rows = check_int(partition_rows, "partition_rows")
    if worker is not None:
        if (not isinstance(worker, (tuple, list)) or len(worker) != 2 or int(worker[1]) < 1
                or not 0 <= int(worker[0]) < int(worker[1])):
            raise ValueError(f"worker must be (index, count) with 0 <= index < count, got {worker!r}")
        worker = (int(worker[0]), int(worker[1]))
    src = source if isinstance(source, EmbeddingSource) else open_source(
        source, ids=ids, embedding_column=embedding_column, id_column=id_column)
    if src.num_rows and src.dim != cfg.input_dim:
        raise ValueError(f"embeddings have dimension {src.dim} but the RQ-VAE expects input_dim "
                         f"{cfg.input_dim}; embed with the model the RQ-VAE was trained on")
    output = check_target(os.fspath(output), "output")
    model_digest = rqvae_digest(model)
    provenance = id_file_provenance(model, source, src.num_rows, allow_other_catalogue, model_digest)
    work_dir = os.fspath(work_dir) if work_dir is not None else output + ".work"
    prefix_space = 1
    for k in cfg.codebook_sizes:
        prefix_space *= k
    n = src.num_rows
    P = max(1, min(prefix_space, math.ceil(n / int(partition_rows))))
    plan = _Plan(n, chunk_size, math.ceil(n / chunk_size), P, prefix_space, encode_block)

    manifest = {"format": _MANIFEST_FORMAT, "source": src.fingerprint, "rows": n,
                "model": model_digest, "layout": layout.to_dict(),
                "chunk_size": chunk_size, "encode_block": encode_block, "partitions": P}
    lock_fd, fingerprint = _open_work_dir(work_dir, manifest, restart, exclusive=worker is None)
    try:
        return _run(model, src, layout, plan, work_dir, fingerprint, output, backend, device, progress,
                    callback, worker, keep_work, t_start, provenance)
    finally:
        os.close(lock_fd)  # releases the lock (after the work dir is removed, for a final run)


def _run(model, src, layout, plan, work_dir, fingerprint, output, backend, device, progress, callback,
         worker, keep_work, t_start, provenance) -> dict:
    n, chunk_size = plan.n, plan.chunk_size
    mine = [ci for ci in range(plan.num_chunks) if worker is None or ci % worker[1] == worker[0]]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        rows = sum(min((ci + 1) * chunk_size, n) - ci * chunk_size for ci in mine)
        bar = tqdm(total=rows, desc="assign ids" if worker is None else f"assign ids (worker {worker[0]})",
                   unit="item", unit_scale=True, smoothing=0.1)
    try:
        mapped, rejected = _map_phase(model, src, plan, work_dir, fingerprint, backend, device, bar, callback,
                                      mine)
    finally:
        if bar is not None:
            bar.close()
    if worker is not None:
        done = sum(bool(_piece_ok(os.path.join(work_dir, "map", f"c{ci:08d}"), fingerprint))
                   for ci in range(plan.num_chunks))
        secs = time.perf_counter() - t_start
        return {"worker": list(worker), "chunks_mapped": mapped, "rows_mapped": sum(
            min((ci + 1) * chunk_size, n) - ci * chunk_size for ci in mine), "chunks_finished": done,
            "chunks_total": plan.num_chunks, "chunks_rejected": rejected, "seconds": secs}
    stats = _reduce_phase(layout, plan, work_dir, fingerprint, callback, progress)
    _write_output(layout, plan, work_dir, output, provenance)
    if not keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    secs = time.perf_counter() - t_start
    stats.update(rows=n, seconds=secs, items_per_second=n / secs if secs > 0 else float("nan"),
                 output=output, chunks_rejected=rejected)
    return stats


def _lock_work_dir(work_dir: str, exclusive: bool) -> int:
    """Open and lock ``work_dir/lock`` (exclusive for a final run, shared for ``worker=`` runs,
    never waiting); returns the file descriptor, whose closing releases the lock."""
    import fcntl

    lpath = os.path.join(work_dir, _LOCK)
    try:
        fd = os.open(lpath, os.O_RDWR)
    except FileNotFoundError:
        raise ValueError(f"work_dir {work_dir} exists but was not created by assign_ids (no lock file): it "
                         "may be the leftover of a run that was removed while another one was writing. "
                         "Remove it, choose another work_dir, or pass restart=True (CLI: --restart)") from None
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(f"work_dir {work_dir} is in use by another assign_ids run (a final run excludes every "
                         "other run; worker= runs exclude final runs); wait for it to finish") from None
    return fd


def _create_work_dir(work_dir: str, manifest: dict) -> None:
    """Create ``work_dir`` complete (manifest, lock file, map/, reduce/) by renaming a finished
    temporary directory into place, so a work dir never exists without its manifest.  Losing the
    race to a concurrent creator is fine (its manifest is then compared like any other)."""
    parent = os.path.dirname(os.path.abspath(work_dir))
    os.makedirs(parent, exist_ok=True)
    clean_stale_temps(work_dir)
    tmp = temp_name(work_dir)
    os.mkdir(tmp)
    try:
        for sub in ("map", "reduce"):
            os.mkdir(os.path.join(tmp, sub))
        with open(os.path.join(tmp, _LOCK), "w"):
            pass
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, work_dir)
        except OSError:
            if not os.path.lexists(work_dir):
                raise
            shutil.rmtree(tmp)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_work_dir(work_dir: str, manifest: dict, restart: bool, exclusive: bool) -> tuple[int, str]:
    """Own ``work_dir`` for this run: create it (with its manifest) or resume it when its manifest
    equals ours, under the lock (see ``_lock_work_dir``).  Returns (lock fd, the run's fingerprint:
    a digest of the manifest, i.e. of the model, the input file and the chunking)."""
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as read back from the file
    fingerprint = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:32]
    if restart and os.path.lexists(work_dir):
        fd = (_lock_work_dir(work_dir, exclusive=True)
              if os.path.exists(os.path.join(work_dir, _LOCK)) else None)
        shutil.rmtree(work_dir)
        if fd is not None:
            os.close(fd)
    for _ in range(10):
        if not os.path.lexists(work_dir):
            _create_work_dir(work_dir, manifest)
        if not os.path.isdir(work_dir):
            raise ValueError(f"work_dir {work_dir} exists and is not a directory")
        fd = _lock_work_dir(work_dir, exclusive)
        try:  # the locked file must still be the directory's lock (not one removed meanwhile)
            same = os.path.samestat(os.fstat(fd), os.stat(os.path.join(work_dir, _LOCK)))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        try:
            with open(os.path.join(work_dir, "manifest.json")) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old != manifest:
            os.close(fd)
            diff = sorted(k for k in manifest if not isinstance(old, dict) or old.get(k) != manifest[k])
            raise ValueError(f"work_dir {work_dir} holds a run with different parameters ({diff}); "
                             "pass restart=True (CLI: --restart) to discard it, or use another work_dir")
        for sub in ("map", "reduce"):
            for e in os.listdir(os.path.join(work_dir, sub)):
                owner = temp_owner(e)
                if owner:
                    clean_stale_temps(os.path.join(work_dir, sub, owner))
        return fd, fingerprint
    raise ValueError(f"work_dir {work_dir} keeps being removed by another run; rerun when it has finished")


def _map_phase(model, src, plan: _Plan, work_dir, fingerprint, backend, device, bar, callback,
               chunks) -> tuple[int, int]:
    """Encode + quantize the given chunks that are not finished yet; returns (how many it did, how
    many finished-looking chunks it rejected and redid because another run had written them)."""
    from .quantize import quantize

    radix = np.ones(len(model.cfg.codebook_sizes), dtype=np.int64)
    sizes = model.cfg.codebook_sizes
    for l in range(len(sizes) - 2, -1, -1):
        radix[l] = radix[l + 1] * sizes[l + 1]
    cbs = model.codebooks()
    blk = plan.encode_block
    did = rejected = 0
    for ci in chunks:
        cdir = os.path.join(work_dir, "map", f"c{ci:08d}")
        a, b = ci * plan.chunk_size, min((ci + 1) * plan.chunk_size, plan.n)
        ok = _piece_ok(cdir, fingerprint)
        if ok:  # finished by this run (or a worker of it) before a restart
            if bar is not None:
                bar.update(b - a)
            continue
        if ok is False:  # written by another model / input / chunking: never adopted
            shutil.rmtree(cdir)
            rejected += 1
        ids, x = src.read(a, b)
        if ids.shape[0] != b - a:
            raise ValueError(f"source returned {ids.shape[0]} rows for rows [{a}, {b})")
        if not np.isfinite(x).all():
            bad = a + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise ValueError(f"embedding of row {bad} (item id {int(ids[bad - a])}) contains NaN or Inf")
        lat = []
        with torch.no_grad():
            for s in range(0, b - a, blk):  # blocks aligned to the global row index (a % blk == 0)
                lat.append(model.encoder(torch.from_numpy(x[s: s + blk]).to(device)))
        z = torch.cat(lat)
        codes = quantize(z, cbs if z.device.type == "cpu" else
                         (cbs.to(z.device) if isinstance(cbs, torch.Tensor) else [c.to(z.device) for c in cbs]),
                         backend=backend).cpu().numpy()
        keys = codes @ radix
        part = (keys * plan.P // plan.prefix_space).astype(np.int64)
        off_k, (keys_s, ids_s) = _split(keys, part, plan.P, ids)
        hpart = (_hash_ids(ids) % np.uint64(plan.P)).astype(np.int64)
        off_h, (hid_s,) = _split(ids, hpart, plan.P)
        _save_npy_atomic_dir(cdir, {"keys": keys_s, "ids": ids_s, "offsets": off_k,
                                    "hids": hid_s, "hoffsets": off_h}, fingerprint)
        did += 1
        if bar is not None:
            bar.update(b - a)
        if callback is not None:
            callback("map", ci)
    return did, rejected


def _reduce_phase(layout: TokenLayout, plan: _Plan, work_dir, fingerprint, callback, progress) -> dict:
    L = len(layout.codebook_sizes)
    cs = layout.collision_size
    used = [np.zeros(k, dtype=bool) for k in layout.codebook_sizes]
    used_c = np.zeros(cs, dtype=bool)
    unique_prefixes = colliding = max_group = 0
    hist: dict[int, int] = {}
    chunk_dirs = [os.path.join(work_dir, "map", f"c{ci:08d}") for ci in range(plan.num_chunks)]
    for cdir in chunk_dirs:  # the map phase just checked them; this catches a change since
        if not _piece_ok(cdir, fingerprint):
            raise ValueError(f"{cdir} is missing or was written by another run; rerun to redo it")
    it = range(plan.P)
    if progress and plan.P > 1:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="resolve collisions", unit="partition")
    for p in it:
        pdir = os.path.join(work_dir, "reduce", f"p{p:06d}")
        ok = _piece_ok(pdir, fingerprint)
        if ok is False:
            shutil.rmtree(pdir)
        if not ok:
            keys, ids, hids = [], [], []
            for cdir in chunk_dirs:
                off = np.load(os.path.join(cdir, "offsets.npy"))
                hoff = np.load(os.path.join(cdir, "hoffsets.npy"))
                keys.append(np.load(os.path.join(cdir, "keys.npy"), mmap_mode="r")[off[p]: off[p + 1]])
                ids.append(np.load(os.path.join(cdir, "ids.npy"), mmap_mode="r")[off[p]: off[p + 1]])
                hids.append(np.load(os.path.join(cdir, "hids.npy"), mmap_mode="r")[hoff[p]: hoff[p + 1]])
            keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
            ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
            hids = np.sort(np.concatenate(hids)) if hids else np.zeros(0, np.int64)
            if hids.size > 1 and (hids[1:] == hids[:-1]).any():
                dup = np.unique(hids[1:][hids[1:] == hids[:-1]])
                raise ValueError(f"the source contains duplicate item ids, e.g. {dup[:5].tolist()}; "
                                 "every item needs exactly one id")
            order = np.lexsort((ids, keys))
            keys, ids = keys[order], ids[order]
            start = np.ones(keys.size, dtype=bool)
            start[1:] = keys[1:] != keys[:-1]
            idx = np.arange(keys.size, dtype=np.int64)
            cc = idx - np.maximum.accumulate(np.where(start, idx, 0))
            if cc.size and cc.max() >= cs:
                j = int(np.argmax(cc))
                prefix = tuple(int(v) for v in np.unravel_index(keys[j], layout.codebook_sizes))
                size = int(np.sum(keys == keys[j]))
                raise ValueError(f"semantic-ID prefix {prefix} is shared by {size} items but collision_size "
                                 f"is {cs}. Use a larger TokenLayout.collision_size, more/larger RQ-VAE "
                                 "codebooks, or retrain the RQ-VAE (codebook collapse?)")
            _save_npy_atomic_dir(pdir, {"keys": keys, "ids": ids, "cc": cc}, fingerprint)
            if callback is not None:
                callback("reduce", p)
        keys = np.load(os.path.join(pdir, "keys.npy"))
        cc = np.load(os.path.join(pdir, "cc.npy"))
        if keys.size:
            codes = np.stack(np.unravel_index(keys, layout.codebook_sizes), axis=1)
            for l in range(L):
                used[l][codes[:, l]] = True
            used_c[cc] = True
            gs = np.diff(np.append(np.flatnonzero(cc == 0), keys.size))
            unique_prefixes += int(gs.size)
            colliding += int(gs[gs > 1].sum())
            max_group = max(max_group, int(gs.max()))
            for g, c in zip(*np.unique(gs, return_counts=True)):
                hist[int(g)] = hist.get(int(g), 0) + int(c)
    return {"num_items": plan.n, "level_sizes": list(layout.level_sizes),
            "unique_prefixes": unique_prefixes, "colliding_items": colliding, "max_group_size": max_group,
            "collision_histogram": dict(sorted(hist.items())),
            "codebook_usage": [float(u.mean()) for u in used], "collision_usage": float(used_c.mean())}


def _write_output(layout: TokenLayout, plan: _Plan, work_dir, output, provenance: dict) -> None:
    import pyarrow.parquet as pq

    L1 = layout.num_levels

    def write(tmp):
        with pq.ParquetWriter(tmp, id_file_schema(layout, provenance)) as w:
            out = IdRowGroupWriter(w, layout)  # fixed row groups: bytes independent of partitioning
            for p in range(plan.P):
                pdir = os.path.join(work_dir, "reduce", f"p{p:06d}")
                keys = np.load(os.path.join(pdir, "keys.npy"))
                if keys.size == 0:
                    continue
                ids = np.load(os.path.join(pdir, "ids.npy"))
                cc = np.load(os.path.join(pdir, "cc.npy"))
                rows = np.empty((keys.size, L1 + 1), dtype=np.int64)
                rows[:, 0] = ids
                rows[:, 1:L1] = np.stack(np.unravel_index(keys, layout.codebook_sizes), axis=1)
                rows[:, L1] = cc
                out.add(rows)
            out.close()

    write_atomic(output, write, what="output")
