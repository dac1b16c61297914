"""Synthetic data: a catalogue with sequential taste (demos, tests) and clustered latents (scale).

* :func:`synthetic_dataset` / :class:`SyntheticConfig`: a deterministic item catalogue (3-level
  categories, brands, prices, descriptions) and user sequences a next-item model can learn.
* :func:`synthetic_latents` / :func:`iter_synthetic_latents`: float32 (n, dim) rows of an endless
  clustered stream, chunkable to 100M+ rows with identical output for any chunking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .checks import check_int
from .cpu_memory import available_memory
from .data import Dataset

__all__ = ["SyntheticConfig", "synthetic_dataset", "synthetic_latents", "iter_synthetic_latents"]


# ================================================================================================
# Synthetic catalogue with sequential taste
# ================================================================================================
# 8 departments x 6 product types, each with words that make the item texts of a type similar to
# each other (and to their department) for a sentence encoder.
_SYN_TAXONOMY = (
    ("Kitchen", (("Coffee Makers", "espresso brewing beans"), ("Cookware", "nonstick pan skillet"),
                 ("Knives", "sharp chef blade"), ("Bakeware", "oven baking cake"),
                 ("Blenders", "smoothie juice blending"), ("Food Storage", "airtight container lid"))),
    ("Garden", (("Lawn Mowers", "grass cutting lawn"), ("Planters", "soil flower pot"),
                ("Garden Hoses", "watering nozzle hose"), ("Seeds", "vegetable herb sprouting"),
                ("Pruning Tools", "shears branch trimming"), ("Bird Feeders", "birds seed feeder"))),
    ("Outdoor", (("Tents", "camping shelter waterproof"), ("Sleeping Bags", "insulated warm night"),
                 ("Backpacks", "hiking trail straps"), ("Camp Stoves", "fuel burner outdoor cooking"),
                 ("Headlamps", "lumens beam battery"), ("Water Filters", "purify drinking water"))),
    ("Music", (("Guitars", "acoustic strings chords"), ("Keyboards", "piano keys synth"),
               ("Drums", "percussion snare rhythm"), ("Microphones", "vocals recording studio"),
               ("Headphones", "audio bass sound"), ("Violins", "bow orchestra classical"))),
    ("Office", (("Notebooks", "ruled paper journal"), ("Pens", "ink ballpoint writing"),
                ("Desk Chairs", "ergonomic lumbar seat"), ("Staplers", "staples binding documents"),
                ("Printers", "toner printing pages"), ("Desk Lamps", "LED desk lighting"))),
    ("Pets", (("Dog Food", "dog kibble nutrition"), ("Cat Toys", "cat feather play"),
              ("Aquariums", "fish tank filter"), ("Bird Cages", "parrot perch cage"),
              ("Pet Beds", "pet cushion sleep"), ("Leashes", "collar walking leash"))),
    ("Toys", (("Building Blocks", "bricks construction build"), ("Puzzles", "jigsaw pieces puzzle"),
              ("Dolls", "doll dress-up pretend"), ("Board Games", "dice family strategy"),
              ("Remote Control Cars", "racing remote car"), ("Plush Animals", "soft cuddly stuffed"))),
    ("Beauty", (("Lipsticks", "matte lip color"), ("Shampoos", "hair scalp wash"),
                ("Face Creams", "hydrating skin moisturizer"), ("Perfumes", "floral scent fragrance"),
                ("Nail Polish", "nail lacquer manicure"), ("Sunscreens", "SPF sun protection"))),
)
_SYN_LEAF_STYLES = ("Compact", "Professional", "Travel", "Kids", "Premium", "Eco-Friendly", "Vintage",
                    "Heavy-Duty", "Mini", "Deluxe", "Wireless", "Classic")
_SYN_ADJ = ("reliable", "durable", "lightweight", "stylish", "affordable", "powerful", "elegant", "sturdy")
_SYN_SYLL = ("ka", "lo", "mi", "ra", "zen", "to", "vi", "nor", "ex", "sol", "pa", "qua", "ri", "on", "ta", "vel")


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of :func:`synthetic_dataset` (all have sensible defaults).

    Taxonomy ``num_top x num_mid x num_leaf`` leaf categories.  Each user's sequence: length
    ``min_len + Geometric`` with mean ``mean_len``, capped at ``max_len``; the first item is drawn by
    popularity from a leaf of the user's home department; each next item is, with probability
    ``p_series``, the *series successor* of the previous item (items of a leaf form a fixed cycle,
    so item j is usually followed by one specific related item), otherwise drawn by popularity
    from a leaf chosen by a Markov step: same leaf ``p_stay``, a sibling leaf (same product type)
    ``p_sibling``, another type of the same department ``p_department``, else any leaf.
    Items already in the sequence are not repeated.
    """

    num_top: int = 8
    num_mid: int = 6
    num_leaf: int = 5
    min_len: int = 5
    max_len: int = 20
    mean_len: float = 9.0
    p_series: float = 0.5
    p_stay: float = 0.35
    p_sibling: float = 0.35
    p_department: float = 0.2
    zipf: float = 0.8


def _syn_names(cfg: SyntheticConfig):
    tops, mids, kws = [], [], []
    for t in range(cfg.num_top):
        if t < len(_SYN_TAXONOMY) and cfg.num_mid <= len(_SYN_TAXONOMY[t][1]):
            tname, tmids = _SYN_TAXONOMY[t]
        else:  # beyond the word lists: plain numbered names (still distinct, less semantic)
            tname = _SYN_TAXONOMY[t % len(_SYN_TAXONOMY)][0] + f" Line {t // len(_SYN_TAXONOMY) + 1}"
            base = _SYN_TAXONOMY[t % len(_SYN_TAXONOMY)][1]
            tmids = tuple((f"{base[m % len(base)][0]} Type {m // len(base) + 1}", base[m % len(base)][1])
                          for m in range(cfg.num_mid))
        tops.append(tname)
        mids.append([m for m, _ in tmids[: cfg.num_mid]])
        kws.append([k for _, k in tmids[: cfg.num_mid]])
    leaves = []
    for s in range(cfg.num_leaf):
        style = _SYN_LEAF_STYLES[s % len(_SYN_LEAF_STYLES)]
        leaves.append(style if s < len(_SYN_LEAF_STYLES) else f"{style} {s // len(_SYN_LEAF_STYLES) + 1}")
    return tops, mids, kws, leaves


SYNTHETIC_BYTES_PER_ROW = 1200  # memory per item + user of synthetic_dataset (measured 1,092 B)


def synthetic_dataset(num_items: int = 2000, num_users: int = 3000, seed: int = 0,
                      config: SyntheticConfig | None = None, **overrides) -> Dataset:
    """A deterministic synthetic catalogue and user sequences (same arguments -> same dataset).

    Items: a 3-level category hierarchy (department > product type > style + type, e.g.
    ``["Kitchen", "Coffee Makers", "Travel Coffee Makers"]``), a brand per department, a title,
    price (log-normal per product type) and a description built from the type's words, so a sentence
    encoder clusters items by category.  Users: sequential taste as described in
    :class:`SyntheticConfig` (override any field by keyword, e.g. ``p_series=0.7``): a
    next-item model can beat popularity clearly, because the next item is often the previous item's
    series successor and otherwise usually from the same or a sibling leaf category.

    Item ids ``0..N-1`` are shuffled across categories (ids carry no category information); user
    ids ``0..U-1``.  Every leaf has at least one item when ``num_items >= leaves``.
    """
    cfg = config or SyntheticConfig()
    if overrides:
        known = set(SyntheticConfig.__dataclass_fields__)
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"synthetic_dataset: unknown options {bad}; known: {sorted(known)}")
        cfg = SyntheticConfig(**{**cfg.__dict__, **overrides})
    for k, v in (("num_items", num_items), ("num_users", num_users)):
        check_int(v, f"synthetic_dataset: {k}")
    check_int(seed, "synthetic_dataset: seed", 0)
    # Every item and user is a Python object (~1.1 KB per item + user, measured at 200k each): a
    # billion items would need ~1 TB and hours; refuse up front instead of exhausting memory.
    need = SYNTHETIC_BYTES_PER_ROW * (int(num_items) + int(num_users))
    have = available_memory("cpu")
    if have is not None and need > have // 2:
        raise ValueError(f"synthetic_dataset: num_items={num_items:,} and num_users={num_users:,} need about "
                         f"{need / 2**30:,.1f} GiB in memory, more than half of the {have / 2**30:,.1f} GiB available; "
                         "use fewer items, or synthetic_latents / iter_synthetic_latents for billion-row "
                         "quantization tests (benchmarks/bench_assign_stream.py)")
    if min(cfg.num_top, cfg.num_mid, cfg.num_leaf) < 1:
        raise ValueError("synthetic_dataset: num_top, num_mid, num_leaf must be >= 1")
    if not 1 <= cfg.min_len <= cfg.max_len:
        raise ValueError(f"synthetic_dataset: need 1 <= min_len <= max_len, got {cfg.min_len}, {cfg.max_len}")
    if cfg.max_len > num_items:
        raise ValueError(f"synthetic_dataset: max_len={cfg.max_len} exceeds num_items={num_items}; items do not repeat")
    probs = (cfg.p_series, cfg.p_stay, cfg.p_sibling, cfg.p_department)
    if any(not 0 <= p <= 1 for p in probs) or cfg.p_stay + cfg.p_sibling + cfg.p_department > 1:
        raise ValueError("synthetic_dataset: probabilities must be in [0, 1] and p_stay + p_sibling + "
                         "p_department <= 1")
    rng = np.random.default_rng([int(seed), 0x7167])
    tops, mids, kws, styles = _syn_names(cfg)
    T, M, S = cfg.num_top, cfg.num_mid, cfg.num_leaf
    n_leaves = T * M * S
    # leaf of each item: balanced, shuffled so item ids carry no category information
    leaf_of = rng.permutation(np.arange(num_items) % n_leaves)
    brands = [["".join(rng.choice(_SYN_SYLL, size=rng.integers(2, 4))).capitalize() for _ in range(4)]
              for _ in range(T)]
    mid_price = np.exp(rng.normal(3.2, 0.8, size=(T, M)))
    items = []
    pop = np.empty(num_items)
    pop[rng.permutation(num_items)] = 1.0 / np.arange(1, num_items + 1) ** cfg.zipf  # Zipf popularity
    for j in range(num_items):
        lf = int(leaf_of[j])
        t, m, s = lf // (M * S), (lf // S) % M, lf % S
        leaf_name = f"{styles[s]} {mids[t][m]}"
        words = kws[t][m].split()
        brand = brands[t][int(rng.integers(len(brands[t])))]
        adj = _SYN_ADJ[int(rng.integers(len(_SYN_ADJ)))]
        model = f"{chr(65 + int(rng.integers(26)))}{int(rng.integers(100, 1000))}"
        singular = mids[t][m].lower()[:-1] if mids[t][m].endswith("s") else mids[t][m].lower()
        items.append({
            "title": f"{brand} {leaf_name} {model}",
            "brand": brand,
            "categories": [tops[t], mids[t][m], leaf_name],
            "price": round(float(mid_price[t, m] * np.exp(rng.normal(0.0, 0.25))), 2),
            "description": (f"{'An' if adj[0] in 'aeiou' else 'A'} {adj} {styles[s].lower()} {singular} for "
                            f"{words[0]} and {words[1]}. Part of the {tops[t].lower()} range, made for "
                            f"{' '.join(words)}."),
        })
    # per-leaf item lists (the fixed series cycle order) with popularity cumulative weights
    leaf_items = [[] for _ in range(n_leaves)]
    for j in rng.permutation(num_items):
        leaf_items[int(leaf_of[j])].append(int(j))
    succ = np.empty(num_items, dtype=np.int64)
    for lst in leaf_items:
        for a, b in zip(lst, lst[1:] + lst[:1]):
            succ[a] = b
    leaf_cum = [np.cumsum(pop[lst]) for lst in leaf_items]
    nonempty = np.array([lf for lf in range(n_leaves) if leaf_items[lf]], dtype=np.int64)
    leaf_w = np.array([pop[leaf_items[lf]].sum() for lf in nonempty])
    leaf_w_cum = np.cumsum(leaf_w)

    def siblings(lf, level):  # non-empty leaves sharing the product type (level 1) / department (2)
        span = S if level == 1 else M * S
        base = lf - lf % span
        return [x for x in range(base, base + span) if x != lf and leaf_items[x]]

    sib_cache: dict = {}

    def draw_in_leaf(lf, seen):
        lst, cum = leaf_items[lf], leaf_cum[lf]
        for _ in range(8):
            j = lst[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(lst) - 1)]
            if j not in seen:
                return j
        free = [j for j in lst if j not in seen]
        return free[int(rng.integers(len(free)))] if free else None

    p_geo = 1.0 / max(1.0, cfg.mean_len - cfg.min_len + 1)
    seqs = []
    for _u in range(num_users):
        length = min(cfg.max_len, cfg.min_len + int(rng.geometric(p_geo)) - 1)
        lf = int(nonempty[min(int(np.searchsorted(leaf_w_cum, rng.random() * leaf_w_cum[-1], side="right")),
                              len(nonempty) - 1)])
        seq: list[int] = []
        seen: set[int] = set()
        while len(seq) < length:
            j = None
            if seq and rng.random() < cfg.p_series and int(succ[seq[-1]]) not in seen:
                j = int(succ[seq[-1]])
            elif seq:
                r = rng.random()
                if r >= cfg.p_stay:
                    level = 1 if r < cfg.p_stay + cfg.p_sibling else (
                        2 if r < cfg.p_stay + cfg.p_sibling + cfg.p_department else 3)
                    if level == 3:
                        cand = nonempty
                    else:
                        key = (lf, level)
                        if key not in sib_cache:
                            sib_cache[key] = siblings(lf, level)
                        cand = sib_cache[key]
                    if len(cand):
                        lf = int(cand[int(rng.integers(len(cand)))])
            if j is None:
                j = draw_in_leaf(lf, seen)
            if j is None:  # the leaf is exhausted for this user: any unseen item
                j = int(rng.integers(num_items))
                while j in seen:
                    j = int(rng.integers(num_items))
            lf = int(leaf_of[j])
            seq.append(j)
            seen.add(j)
        seqs.append(np.array(seq, dtype=np.int64))
    return Dataset("synthetic", np.arange(num_items, dtype=np.int64), items,
                   np.arange(num_users, dtype=np.int64), seqs)


# ================================================================================================
# Synthetic latents for scale benchmarks
# ================================================================================================
_LATENT_BLOCK = 1 << 16  # rows per independently seeded block: output never depends on chunking


def _latent_centers(dim: int, clusters: int, seed: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng([int(seed), 0, 0])
    coarse_n = max(1, int(round(math.sqrt(clusters))))
    coarse = rng.standard_normal((coarse_n, dim))
    fine = coarse[np.arange(clusters) % coarse_n] + spread * rng.standard_normal((clusters, dim))
    return fine.astype(np.float32)


def _latent_block(b: int, centers: np.ndarray, seed: int, noise: float) -> np.ndarray:
    rng = np.random.default_rng([int(seed), 1, int(b)])
    c = rng.integers(len(centers), size=_LATENT_BLOCK)
    x = rng.standard_normal((_LATENT_BLOCK, centers.shape[1]), dtype=np.float32)
    x *= np.float32(noise)
    x += centers[c]
    return x


def _check_latent_args(n, dim, clusters, seed, offset, noise):
    for k, v, lo in (("n", n, 0), ("dim", dim, 1), ("clusters", clusters, 1), ("seed", seed, 0), ("offset", offset, 0)):
        check_int(v, f"synthetic_latents: {k}", lo)
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"synthetic_latents: noise must be a finite float >= 0, got {noise!r}")


def synthetic_latents(n: int, dim: int = 32, clusters: int = 256, seed: int = 0, *, offset: int = 0,
                      noise: float = 0.3, spread: float = 0.5) -> np.ndarray:
    """Rows ``offset .. offset+n-1`` of an endless clustered latent stream: float32 (n, dim).

    Two-level Gaussian mixture (``round(sqrt(clusters))`` coarse centres ~ N(0, 1); ``clusters``
    fine centres = coarse + ``spread``·N(0, 1); row = a uniformly chosen fine centre +
    ``noise``·N(0, 1)) — the kind of structure a residual quantizer sees.  Row ``r`` depends only on
    ``(seed, r, dim, clusters, noise, spread)``: generated in fixed blocks of 65,536 rows, each
    from its own seeded generator, so any chunking of the stream gives identical rows.
    """
    _check_latent_args(n, dim, clusters, seed, offset, noise)
    centers = _latent_centers(dim, clusters, seed, spread)
    out = np.empty((n, dim), dtype=np.float32)
    r = offset
    while r < offset + n:
        b = r // _LATENT_BLOCK
        lo = r - b * _LATENT_BLOCK
        take = min(_LATENT_BLOCK - lo, offset + n - r)
        out[r - offset: r - offset + take] = _latent_block(b, centers, seed, noise)[lo: lo + take]
        r += take
    return out


def iter_synthetic_latents(n: int, dim: int = 32, clusters: int = 256, seed: int = 0, *,
                           chunk_size: int = 1 << 20, noise: float = 0.3,
                           spread: float = 0.5) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, float32 (rows, dim))`` chunks covering rows ``0..n-1`` of
    :func:`synthetic_latents` in bounded memory (one chunk at a time; for 100M+ rows)."""
    _check_latent_args(n, dim, clusters, seed, 0, noise)
    check_int(chunk_size, "iter_synthetic_latents: chunk_size")
    for start in range(0, n, chunk_size):
        yield start, synthetic_latents(min(chunk_size, n - start), dim, clusters, seed, offset=start,
                                       noise=noise, spread=spread)
