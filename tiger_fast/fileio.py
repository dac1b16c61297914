"""File and table reading: the one I/O layer every loader shares.

* :func:`check_file`, :func:`find_file`: an input path exists and is readable (errors name it).
* :func:`open_text`, :func:`read_lines`, :func:`read_json`: plain or gzip text / JSON files.
* :func:`read_table`: Parquet / JSON lines / CSV (optionally .gz) -> ``pyarrow.Table``.
* :func:`id_column`: an item/user id column -> int64 ids, or codes plus string keys.
* :func:`embedding_column`: a list-of-floats column (JSON array strings in CSV) -> float32 (N, D).
* :func:`load_embeddings`: precomputed item embeddings from ``.npy`` or a table.

Every function raises an error naming the file (and the column/row) on bad input.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["EMBED_COLUMNS", "check_file", "find_file", "open_text", "read_lines", "read_json", "read_table",
           "id_column", "embedding_column", "load_embeddings", "read_checkpoint_meta"]

#: Column names an embedding column may have, in a items table or an embeddings table.
EMBED_COLUMNS = ("embedding", "embeddings", "vector")


def check_file(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: file not found: {p}")
    if not p.is_file():
        raise ValueError(f"{what}: {p} is not a regular file")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"{what}: file is not readable: {p}")
    return p


def find_file(directory: Path, names: Sequence[str], what: str) -> Path:
    """First existing ``directory/name`` among ``names`` (e.g. with and without .gz)."""
    for n in names:
        p = directory / n
        if p.is_file():
            return p
    raise FileNotFoundError(f"{what}: none of {list(names)} found in {directory}")


def open_text(path: Path):
    """Text handle for a plain or gzip file (decided by the magic bytes, not the suffix)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without newline) for non-blank lines; read errors name the path."""
    try:
        with open_text(path) as fh:
            for no, line in enumerate(fh, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield no, line
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise ValueError(f"{what}: cannot read {path}: {e}") from e


def read_json(path: Path, what: str):
    try:
        with open_text(path) as fh:
            return json.load(fh)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise ValueError(f"{what}: cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON: {e}") from e


def read_checkpoint_meta(path, config_name: str, weights_name: str, what: str) -> tuple[dict, str, str]:
    """(parsed JSON of ``path/config_name``, its path, the path of ``path/weights_name``) of a model
    directory.  FileNotFoundError naming ``what`` (e.g. "a save_t5 checkpoint") when either file is
    missing; ValueError when the JSON cannot be read (absurdly deep nesting included)."""
    cfg_path, w_path = os.path.join(path, config_name), os.path.join(path, weights_name)
    if not os.path.isfile(cfg_path) or not os.path.isfile(w_path):
        raise FileNotFoundError(f"{path!r} is not {what} (needs {config_name} and {weights_name})")
    try:
        with open(cfg_path) as f:
            return json.load(f), cfg_path, w_path
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ValueError(f"cannot read {cfg_path!r}: {type(e).__name__}: {str(e)[:200]}") from None


def read_table(path, what: str):
    """Parquet / JSON lines / CSV (optionally .gz) -> pyarrow.Table; format from the suffix."""
    import pyarrow as pa

    p = check_file(path, what)
    name = p.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    try:
        if base.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return pq.read_table(p)
        if base.endswith((".jsonl", ".ndjson", ".json")):
            rows = []
            for no, line in read_lines(p, what):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{what}: {p} line {no} is not JSON ({e}); expected one object a line") from e
                if not isinstance(r, dict):
                    raise ValueError(f"{what}: {p} line {no}: expected a JSON object, got {type(r).__name__}")
                rows.append(r)
            if not rows:
                return pa.table({})
            cols = list(dict.fromkeys(k for r in rows for k in r))
            return pa.table({c: pa.array([r.get(c) for r in rows], type=_json_column_type(c, rows)) for c in cols})
        if base.endswith((".csv", ".tsv")):
            import pyarrow.csv as pcsv

            opts = pcsv.ParseOptions(delimiter="\t" if base.endswith(".tsv") else ",")
            # item/user ids stay as parsed (int or string); everything else is read by type inference
            return pcsv.read_csv(p, parse_options=opts)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise ValueError(f"{what}: cannot read {p}: {e}") from e
    raise ValueError(f"{what}: unsupported file type {p.name!r}; use .parquet, .jsonl or .csv (optionally .gz)")


def _json_column_type(col: str, rows: list[dict]):
    """Let pyarrow infer, except mixed int/str id columns which become strings."""
    import pyarrow as pa

    vals = [r.get(col) for r in rows if r.get(col) is not None]
    kinds = {type(v) for v in vals}
    if len(kinds) > 1 and str in kinds and not (kinds - {str, int}):
        return pa.string()
    return None


def id_column(table, col: str, what: str, path) -> tuple[np.ndarray, list | None]:
    """An id column -> (int64 ids, None) for integer ids, or (codes, string keys) for strings."""
    import pyarrow as pa

    c = table.column(col)
    if c.null_count:
        raise ValueError(f"{what}: column {col!r} of {path} has {c.null_count} missing values")
    if pa.types.is_integer(c.type):
        return c.to_numpy().astype(np.int64), None
    if pa.types.is_floating(c.type):
        a = c.to_numpy()
        if np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            return a.astype(np.int64), None
        raise ValueError(f"{what}: column {col!r} of {path} has non-integer numbers; ids must be ints or strings")
    return np.arange(len(c)), [str(x) for x in c.to_pylist()]


def embedding_column(table, col: str, what: str, path) -> np.ndarray:
    """Column ``col`` of ``table`` holding one non-empty list of floats per row (a JSON array string
    in CSV) -> float32 (N, D).  Ragged rows, non-numbers and NaN/Inf raise naming the rows."""
    rows = []
    for r, v in enumerate(table.column(col).to_pylist()):
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"{what}: {path} column {col!r} row {r}: not a JSON array ({e})") from e
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(f"{what}: {path} column {col!r} row {r}: expected a non-empty list "
                             f"of floats, got {v!r:.60}")
        rows.append(v)
    dims = {len(v) for v in rows}
    if len(dims) > 1:
        raise ValueError(f"{what}: {path} column {col!r}: embeddings have different lengths {sorted(dims)[:5]}")
    try:
        arr = np.array(rows, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {path} column {col!r}: non-numeric values ({e})") from e
    if arr.ndim != 2:  # no rows at all
        arr = arr.reshape(len(rows), 0)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: {path} column {col!r}: NaN/Inf in rows {np.flatnonzero(bad)[:5].tolist()}")
    return arr


def load_embeddings(path, *, mmap: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """Precomputed item embeddings from a file -> ``(item_ids int64 (N,) or None, float32 (N, D))``.

    * ``.npy``: a 2-D float array (float16/float64 converted to float32; ``mmap=True`` keeps a
      float32 file memory-mapped, read-only); no ids (row i = item i).
    * ``.parquet`` / ``.jsonl`` / ``.csv``: an ``item_id`` column and an ``embedding`` column (see
      :func:`embedding_column`); string item ids are an error here (use
      :func:`tiger_fast.data.load_tables`).
    NaN/Inf rows are an error naming the first bad rows.
    """
    p = check_file(path, "load_embeddings")
    if p.name.lower().endswith(".npy"):
        try:
            arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"load_embeddings: cannot read {p} as .npy: {e}") from e
        if arr.ndim != 2 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"load_embeddings: {p} must hold a 2-D float array (N, D), got {arr.dtype} {arr.shape}")
        if not (mmap and arr.dtype == np.float32):
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        for s in range(0, arr.shape[0], 1 << 20):  # chunked: bounded memory for a memory map
            ok = np.isfinite(arr[s: s + (1 << 20)]).all(axis=1)
            if not ok.all():
                raise ValueError(f"load_embeddings: {p} has NaN/Inf in rows {(s + np.flatnonzero(~ok))[:5].tolist()}")
        return None, arr
    t = read_table(p, "load_embeddings")
    cols = t.column_names
    emb = [c for c in cols if c in EMBED_COLUMNS]
    if "item_id" not in cols or len(emb) != 1:
        raise ValueError(f"load_embeddings: {p} needs columns item_id and one of embedding/embeddings/vector, got {cols}")
    ids, keys = id_column(t, "item_id", "load_embeddings", p)
    if keys is not None:
        raise ValueError(f"load_embeddings: {p} has string item ids; use tiger_fast.data.load_tables for those")
    arr = embedding_column(t, emb[0], "load_embeddings", p)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"load_embeddings: {p} has duplicate item ids")
    return ids.astype(np.int64), arr
