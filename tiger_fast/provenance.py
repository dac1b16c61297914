"""Fingerprints of what each artefact was built from, and the one check every consumer runs.

The chain is catalogue -> embeddings -> RQ-VAE -> ID table -> retriever.  Each artefact records
the fingerprint of the catalogue it came from (and the retriever that of its ID table), so that a
consumer handed artefacts of two different catalogues refuses with one clear error instead of
silently recommending the wrong items (integer item ids of two catalogues often overlap).

    catalogue_fingerprint(dataset) -> {"digest": str, "items": int, "name": str}
    id_table_digest(table) -> str                      (item ids and semantic IDs)
    check_same(what, built_from, given, override)      ValueError on a mismatch

A fingerprint is a SHA-256 (first 32 hex digits) over a canonical encoding: for a catalogue, its
item ids (and string keys) in row order plus every item's metadata as sorted-key JSON; for an ID
table, its int64 item ids and codes.  An artefact without a recorded fingerprint (written before
fingerprints existed, or made outside tiger_fast) is accepted unchecked: only a known mismatch is
refused.  Where embeddings are written (``embed``) the fingerprint goes into a JSON sidecar
``STEM.provenance.json``; the RQ-VAE, the ID table and the retriever carry it in their own metadata.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

__all__ = ["catalogue_fingerprint", "id_table_digest", "rqvae_digest", "check_same", "describe",
           "sidecar_path", "write_sidecar", "read_sidecar", "id_file_provenance", "retriever_provenance"]

_DIGITS = 32


def catalogue_fingerprint(dataset) -> dict:
    """{"digest", "items", "name"} of a Dataset's item catalogue (ids + metadata, not interactions:
    new interactions with the same items are the same catalogue)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(dataset.item_ids, dtype=np.int64).tobytes())
    if dataset.item_keys is not None:
        h.update(json.dumps(list(map(str, dataset.item_keys))).encode())
    for item in dataset.items:
        # default=str: numpy scalars / lists of categories encode the same on every run
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return {"digest": h.hexdigest()[:_DIGITS], "items": int(len(dataset.item_ids)), "name": str(dataset.name)}


def id_table_digest(table) -> str:
    """Digest of an IdTable's content: item ids int64 (N,) and codes int64 (N, L+1), row order."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(table.item_ids.numpy(), dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(table.codes.numpy(), dtype=np.int64).tobytes())
    return h.hexdigest()[:_DIGITS]


def rqvae_digest(model) -> str:
    """Full SHA-256 hex of an RQ-VAE: its config (sorted JSON) and every weight's bytes."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def id_file_provenance(model, source, rows: int, allow_other_catalogue: bool, model_digest: str | None = None) -> dict:
    """The provenance an ID file made by ``model`` (RQVAE) from ``source`` (embeddings path or an
    EmbeddingSource object) records: ``{"rqvae": digest, "catalogue": ...}`` (the catalogue when
    the embeddings' sidecar names one).  Refuses (ValueError) a model trained on another catalogue's
    embeddings unless ``allow_other_catalogue``.  ``model_digest``: ``rqvae_digest(model)`` when the
    caller has it already (hashing every weight is not free)."""
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    catalogue = ((read_sidecar(path, rows=rows) if path else None) or {}).get("catalogue")
    if not allow_other_catalogue:
        check_same(f"the RQ-VAE vs the embeddings {path or ''}".rstrip(),
                   (getattr(model, "provenance", None) or {}).get("catalogue"), catalogue,
                   "allow_other_catalogue=True (CLI: --allow-other-catalogue)")
    digest = model_digest or rqvae_digest(model)
    return {"rqvae": digest[:_DIGITS], **({"catalogue": catalogue} if catalogue else {})}


def retriever_provenance(table) -> dict:
    """What a retriever trained on IdTable ``table`` records: its digest and its catalogue."""
    cat = (table.provenance or {}).get("catalogue")
    return {"id_table": id_table_digest(table), **({"catalogue": cat} if cat else {})}


def describe(fp) -> str:
    """'catalogue beauty (12,101 items, 0123abcd...)' for a catalogue fingerprint dict."""
    if isinstance(fp, dict):
        return f"catalogue {fp.get('name', '?')} ({fp.get('items', 0):,} items, {str(fp.get('digest'))[:12]})"
    return f"ID table {str(fp)[:12]}"


def _key(fp):
    return fp.get("digest") if isinstance(fp, dict) else fp


def check_same(what: str, built_from, given, override: str | None = None) -> None:
    """Raise ValueError when two fingerprints are both known and differ.

    what: sentence naming the artefact and its input, e.g. "--ids x.parquet vs --data beauty";
    built_from: the fingerprint the artefact recorded (dict or digest string; None = unknown);
    given: the fingerprint of what it is being used with; override: the flag / argument that
    accepts a deliberate mismatch, named in the message."""
    if built_from is None or given is None or _key(built_from) == _key(given):
        return
    hint = f"; pass {override} to use it deliberately" if override else ""
    raise ValueError(f"{what}: the artefact was built from {describe(built_from)}, but it is given "
                     f"{describe(given)}; rebuild it from this input{hint}")


def sidecar_path(npy_path: str) -> str:
    """``emb.npy`` -> ``emb.provenance.json`` (the fingerprint file next to an embeddings file)."""
    return os.path.splitext(os.fspath(npy_path))[0] + ".provenance.json"


def write_sidecar(npy_path: str, record: dict) -> str:
    """Write ``record`` (JSON-able) as the provenance sidecar of ``npy_path``, atomically."""
    from .atomic import write_text

    return write_text(sidecar_path(npy_path), json.dumps(record, indent=2, sort_keys=True),
                      what="provenance sidecar")


def read_sidecar(npy_path: str, rows: int | None = None) -> dict | None:
    """The sidecar of ``npy_path`` (None when absent).  A sidecar recording a different row count
    than ``rows`` is stale (the .npy was replaced by other means) and is ignored."""
    p = sidecar_path(npy_path)
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            rec = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{p}: unreadable provenance sidecar ({e}); delete it or write the embeddings again") from e
    if not isinstance(rec, dict):
        raise ValueError(f"{p}: provenance sidecar must be a JSON object")
    if rows is not None and rec.get("rows") not in (None, rows):
        return None
    return rec
