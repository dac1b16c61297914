"""Pictures (PNG) of ID reports, training curves and temperature trade-offs.

Needs the optional extra ``pip install 'tiger_fast[plot]'`` (matplotlib); matplotlib is imported
only when a picture is drawn (:func:`require_matplotlib`), never at import of this module.
Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``, no pyplot),
so nothing needs a display and no global backend is changed.  Every picture has a fixed size
``SIZES[name]`` inches at ``DPI`` dots per inch and is written atomically (temporary file in the
same directory, then renamed).

    plot_id_report(id_table, out_dir, leaf_categories=None)  -> the ID-report pictures
    plot_training(history, path)                             -> loss / validation metrics vs step and wall minutes
    plot_learning_curves(curves, path)                       -> Recall@10 vs wall minutes, several models
    plot_temperature_tradeoff(points, path)                  -> Recall@10 vs Entropy@10 per decoding setting

The data behind the ID pictures comes from :func:`id_report_data` (codes per level, collision
groups, trie branching) and :func:`tiger_fast.ids.semantic_id_report`; the temperature points
from :func:`temperature_points` (over :func:`tiger_fast.evaluate.entropy_vs_temperature`).
"""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np

from .atomic import write_atomic

__all__ = ["DPI", "SIZES", "PLOT_EXTRA_HINT", "require_matplotlib", "check_plot_dir", "id_report_data",
           "plot_id_report", "training_series", "plot_training", "plot_learning_curves", "temperature_points",
           "plot_temperature_tradeoff"]

DPI = 100
#: picture name -> (width, height) in inches; the PNG is width*DPI x height*DPI pixels.
SIZES = {
    "codes_per_level": (12.0, 3.4),
    "collision_groups": (6.0, 4.0),
    "trie_branching": (12.0, 3.4),
    "category_agreement": (6.0, 4.0),
    "training": (11.0, 7.0),
    "learning_curves": (7.0, 4.5),
    "temperature_tradeoff": (7.0, 5.0),
}
PLOT_EXTRA_HINT = "pip install 'tiger_fast[plot]'"


# ---- setup --------------------------------------------------------------------------------------
def require_matplotlib():
    """Import matplotlib (Agg canvas) or raise ImportError naming the ``[plot]`` extra.
    Returns the ``matplotlib.figure.Figure`` class."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (the Agg canvas)
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"pictures need matplotlib, which is not installed ({e}): {PLOT_EXTRA_HINT}") from None
    del matplotlib
    return Figure


def check_plot_dir(path) -> str:
    """Check a file can be written in directory ``path`` (made for the check and removed again when
    it did not exist; the picture's save creates it); returns the path.
    Raises ValueError with the reason (not a directory, permission, read-only filesystem)."""
    path = os.fspath(path)
    if not path:
        raise ValueError("the picture directory is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} exists and is not a directory")
    created, d = [], os.path.abspath(path)  # the directories this check makes, deepest first
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-plot-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write pictures to {path!r}: {e.strerror or e}") from None
    for d in created:  # checked, not kept: a command refused later leaves no empty directory (saving makes it)
        os.rmdir(d)
    return path


def _figure(name: str):
    Figure = require_matplotlib()
    return Figure(figsize=SIZES[name], dpi=DPI)


def _save(fig, path) -> str:
    """Write ``fig`` as PNG to ``path`` all-or-nothing (atomic.write_atomic); returns the path."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI), what="picture")


def _level_names(num_levels: int) -> list[str]:
    return [f"c{l}" + (" (collision)" if l == num_levels - 1 else "") for l in range(num_levels)]


# ---- ID report ----------------------------------------------------------------------------------
def id_report_data(id_table) -> dict:
    """Numbers behind the ID-report pictures, from a :class:`tiger_fast.ids.IdTable` of N items with
    ``L+1`` codes each (L RQ-VAE levels + the collision level).

    Returns {"level_sizes": [S_0..S_L],
    "items_per_code": per level l, int64 (S_l,) items using each code, sorted descending
    (unused codes are the trailing zeros),
    "group_sizes": {size: number of groups} of the items sharing all L RQ-VAE codes (the collision groups),
    "branching": per depth d = 0..L, int64 (n_d,) valid children of each trie node at depth d
    (the number of distinct codes at level d after each distinct d-code prefix; depth 0 = the root)}.
    """
    codes = id_table.codes.numpy()
    sizes = [int(s) for s in id_table.layout.level_sizes]
    L1 = len(sizes)
    n = codes.shape[0]
    per_code = [np.sort(np.bincount(codes[:, l], minlength=sizes[l]).astype(np.int64))[::-1].copy()
                for l in range(L1)]
    # prefix keys packed level by level (IdTable guarantees prod(level_sizes) < 2**62)
    keys = [np.zeros(n, dtype=np.int64)]
    for l in range(L1):
        keys.append(keys[-1] * sizes[l] + codes[:, l])
    branching = []
    for d in range(L1):
        child = np.unique(keys[d + 1])
        _, counts = np.unique(child // sizes[d], return_counts=True)
        branching.append(counts.astype(np.int64))
    groups = {}
    if n:
        _, gc = np.unique(keys[L1 - 1], return_counts=True)
        s, c = np.unique(gc, return_counts=True)
        groups = {int(a): int(b) for a, b in zip(s, c)}
    return {"level_sizes": sizes, "items_per_code": per_code, "group_sizes": groups, "branching": branching}


def plot_id_report(id_table, out_dir, leaf_categories=None, *, semantic: dict | None = None,
                   title: str | None = None) -> list[str]:
    """Write the ID-report pictures into ``out_dir`` (created if missing); returns their paths.

    codes_per_level.png   items per code, codes sorted by use, one panel per level (log y)
    collision_groups.png  number of collision groups of each size (log y)
    trie_branching.png    valid children per trie node, one panel per depth
    category_agreement.png (only with ``leaf_categories`` or ``semantic``) P(same leaf category)
                          for item pairs sharing their first 1 / 2 / ... codes vs random pairs

    leaf_categories: sequence of str (N,) aligned with the table's rows (see
    :func:`tiger_fast.ids.semantic_id_report`); semantic: that function's result, if already computed.
    """
    require_matplotlib()
    out_dir = check_plot_dir(out_dir)
    data = id_report_data(id_table)
    sizes = data["level_sizes"]
    names = _level_names(len(sizes))
    n = len(id_table)
    head = (title + ": " if title else "") + f"{n} items"
    paths = []

    fig = _figure("codes_per_level")
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    for ax, counts, nm, s in zip(axes, data["items_per_code"], names, sizes):
        used = int((counts > 0).sum())
        shown = s if used > s // 4 else min(s, max(8, int(used * 1.5) + 1))  # a few used codes: zoom in
        if shown > 40:  # one filled step outline, not hundreds of bar patches (much faster to draw)
            ax.stairs(counts[:shown], np.arange(shown + 1) - 0.5, fill=True, baseline=0.5, color="tab:blue")
        else:
            ax.bar(np.arange(shown), counts[:shown], width=0.8, color="tab:blue", linewidth=0)
        if counts.max(initial=0) > 0:
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.5)
        ax.set_xlim(-0.5, shown - 0.5)
        ax.set_title(f"{nm}: {used}/{s} codes used" + ("" if shown == s else f",\nfirst {shown} shown"), fontsize=9)
        ax.set_xlabel("code, by use (sorted)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("items per code")
    fig.suptitle(f"{head}: items per code, each level", fontsize=10)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out_dir, "codes_per_level.png")))

    fig = _figure("collision_groups")
    ax = fig.subplots()
    g = data["group_sizes"]
    if g:
        ax.bar(list(g), list(g.values()), width=0.8, color="tab:orange")
        ax.set_yscale("log")
        if len(g) <= 12:
            for k_, v in g.items():
                ax.text(k_, v, f"{v:,}", ha="center", va="bottom", fontsize=8)
            ax.set_ylim(top=max(g.values()) * 3)
        if len(g) <= 20:
            ax.set_xticks(list(g))
    else:
        ax.text(0.5, 0.5, "no items", ha="center", va="center", transform=ax.transAxes)
    colliding = sum(k * v for k, v in g.items() if k > 1)
    ax.set_xlabel(f"items sharing all {len(sizes) - 1} RQ-VAE codes (group size)")
    ax.set_ylabel("groups")
    ax.set_title(f"{head}: collision groups ({colliding} colliding items, max {max(g, default=0)})", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out_dir, "collision_groups.png")))

    fig = _figure("trie_branching")
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    for d, (ax, b) in enumerate(zip(axes, data["branching"])):
        if b.size == 1:  # the root (or a one-node level): a number, not a histogram
            ax.text(0.5, 0.5, f"{int(b[0])}\nvalid {names[d].split()[0]} codes", ha="center", va="center",
                    fontsize=14, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"depth {d}: 1 node", fontsize=9)
        elif b.size:
            vals, cnt = np.unique(b, return_counts=True)
            if vals.max() - vals.min() <= 40:
                ax.bar(vals, cnt, width=0.8, color="tab:green", linewidth=0)
            else:
                cnt = ax.hist(b, bins=40, color="tab:green")[0]
            ax.set_title(f"depth {d}: {b.size} nodes, mean {b.mean():.2f},\n"
                         f"{(b == 1).mean():.0%} with one child", fontsize=9)
            if cnt.max() > 10 * max(cnt[cnt > 0].min(), 1):
                ax.set_yscale("log")
        ax.set_xlabel(f"valid {names[d].split()[0]} codes per node", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("nodes")
    fig.suptitle(f"{head}: trie branching (choices left at each level)", fontsize=10)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out_dir, "trie_branching.png")))

    if semantic is None and leaf_categories is not None:
        from .ids import semantic_id_report

        semantic = semantic_id_report(id_table, leaf_categories)
    if semantic is not None:
        fig = _figure("category_agreement")
        ax = fig.subplots()
        share = {int(p): v for p, v in semantic["share_prefix"].items()}
        pairs = {int(p): v for p, v in semantic.get("pairs_sharing_prefix", {}).items()}
        labels = ["random\npairs"] + [f"share\n{'-'.join(f'c{i}' for i in range(p))}" for p in sorted(share)]
        vals = [semantic["random_pairs"]] + [share[p] for p in sorted(share)]
        counts = [None] + [pairs.get(p) for p in sorted(share)]
        x = np.arange(len(vals))
        ax.bar(x, [0 if not math.isfinite(v) else v for v in vals],
               color=["tab:gray"] + ["tab:purple"] * (len(vals) - 1))
        for xi, v, c in zip(x, vals, counts):
            txt = "no pairs" if not math.isfinite(v) else f"{v:.3f}" + ("" if c is None else f"\n{c:,} pairs")
            ax.text(xi, (v if math.isfinite(v) else 0) + 0.01, txt, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("P(same leaf category)")
        ax.set_title(f"{head}: category agreement of item pairs "
                     f"({semantic.get('num_categories', '?')} leaf categories)", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(out_dir, "category_agreement.png")))
    return paths


# ---- training curves ----------------------------------------------------------------------------
def _wall(entry):
    w = entry.get("wall_s") if isinstance(entry, dict) else (entry[2] if len(entry) > 2 else None)
    return None if w is None else float(w)


def training_series(history: dict) -> dict:
    """Series from a :func:`tiger_fast.train.train_retriever` history.

    ``history["loss"]`` entries are ``[step, loss]``, ``[step, loss, wall_s]`` or dicts with
    step / loss / wall_s; ``history["evals"]`` entries dicts with step, metrics and optionally wall_s.
    Returns {"loss": float64 (n, 3) [step, loss, wall_s or NaN], "evals": {metric: float64 (m, 3)
    [step, value, wall_s or NaN]} for recall@10 and ndcg@10 when present, "loss_wall_interpolated":
    bool}.  Loss entries without a wall time get one interpolated linearly in the step between the
    known (step, wall_s) points: step 0 at 0 s, the evals' wall_s and (final_step, history wall_s);
    NaN outside them or when there are none."""
    if not isinstance(history, dict):
        raise TypeError(f"history must be the dict returned by train_retriever, got {type(history).__name__}")
    rows = []
    for e in history.get("loss") or []:
        step, loss = (e["step"], e["loss"]) if isinstance(e, dict) else (e[0], e[1])
        w = _wall(e)
        rows.append((float(step), float(loss), math.nan if w is None else w))
    loss = np.array(rows, dtype=np.float64).reshape(-1, 3)
    evals = {}
    for m in ("recall@10", "ndcg@10"):
        r = [(float(e["step"]), float(e[m]), math.nan if _wall(e) is None else _wall(e))
             for e in history.get("evals") or [] if m in e]
        if r:
            evals[m] = np.array(r, dtype=np.float64)
    interpolated = False
    missing = np.isnan(loss[:, 2])
    if missing.any():
        known = {0.0: 0.0}
        pts = [(e["step"], _wall(e)) for e in history.get("evals") or [] if isinstance(e, dict) and "step" in e]
        if history.get("final_step") and history.get("wall_s"):
            pts.append((history["final_step"], float(history["wall_s"])))
        for st, w in pts:
            if w is not None and math.isfinite(w):
                known[float(st)] = min(w, known.get(float(st), math.inf))
        xs = np.array(sorted(known), dtype=np.float64)
        ys = np.array([known[x] for x in xs], dtype=np.float64)
        if xs.size > 1 and (np.diff(ys) >= 0).all():  # a clock that never runs backwards
            st = loss[missing, 0]
            loss[missing, 2] = np.where((st >= xs[0]) & (st <= xs[-1]), np.interp(st, xs, ys), math.nan)
            interpolated = bool(np.isfinite(loss[missing, 2]).any())
    return {"loss": loss, "evals": evals, "loss_wall_interpolated": interpolated}


def plot_training(history: dict, path, *, title: str | None = None) -> str:
    """Training loss (top) and validation Recall@10 / NDCG@10 (bottom) against step (left) and
    wall minutes (right; a note instead where the history has no wall times).  Returns ``path``."""
    require_matplotlib()
    s = training_series(history)
    fig = _figure("training")
    axes = fig.subplots(2, 2)
    for col, (xi, xlabel) in enumerate(((0, "step"), (2, "wall minutes"))):
        scale = 1.0 if xi == 0 else 1 / 60.0
        ax = axes[0, col]
        lo = s["loss"]
        ok = lo[np.isfinite(lo[:, xi])] if lo.size else lo
        if ok.size:
            ax.plot(ok[:, xi] * scale, ok[:, 1], color="tab:blue", lw=1.2, marker="." if len(ok) < 40 else None)
        else:
            ax.text(0.5, 0.5, "no wall times in this history" if lo.size else "no loss logged",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_ylabel("training loss")
        ax.set_xlabel(xlabel + (" (interpolated between validations)" if xi == 2 and s["loss_wall_interpolated"]
                                else ""))
        ax = axes[1, col]
        drawn = False
        for m, c in (("recall@10", "tab:green"), ("ndcg@10", "tab:red")):
            ev = s["evals"].get(m)
            if ev is None:
                continue
            ev = ev[np.isfinite(ev[:, xi])]
            if ev.size:
                ax.plot(ev[:, xi] * scale, ev[:, 1], color=c, marker="o", ms=3, lw=1.2, label={"recall@10": "Recall@10", "ndcg@10": "NDCG@10"}[m])
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no wall times in this history" if s["evals"] else "no validation evals",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_ylabel("validation")
        ax.set_xlabel(xlabel)
    fig.suptitle((title + ": " if title else "") + f"training to step {history.get('final_step', '?')}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_learning_curves(curves: dict, path, *, metric: str = "Recall@10", title: str | None = None) -> str:
    """Several models' quality against training wall time on one axes.

    curves: {name: [(wall_minutes, value), ...]} (e.g. TIGER vs SASRec); each curve needs at least
    one point of finite numbers.  Returns ``path``."""
    if not isinstance(curves, dict) or not curves:
        raise ValueError("curves must be a non-empty dict {name: [(wall_minutes, value), ...]}")
    pts = {}
    for name, c in curves.items():
        a = np.asarray(c, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] == 0:
            raise ValueError(f"curves[{name!r}] must be a non-empty list of (wall_minutes, value) pairs, "
                             f"got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"curves[{name!r}] holds NaN or infinite values")
        pts[name] = a[np.argsort(a[:, 0], kind="stable")]
    require_matplotlib()
    fig = _figure("learning_curves")
    ax = fig.subplots()
    for name, a in pts.items():
        ax.plot(a[:, 0], a[:, 1], marker="o", ms=3, lw=1.4, label=str(name))
    ax.set_xlabel("training wall minutes")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} against training time", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ---- temperature trade-off ----------------------------------------------------------------------
def _setting(t) -> tuple[str, str]:
    """temperature (None | tuple of floats, one per level) -> (kind, label)."""
    if t is None:
        return "beam", "beam"
    if len(set(t)) == 1:
        return "uniform", f"T={t[0]:g}"
    return "per-level", "T=" + "/".join(f"{x:g}" for x in t)


def temperature_points(model, dataset, id_table, temperatures, *, sample_seeds=(0,), split: str = "test",
                       k: int = 10, max_users: int | None = None, backend: str = "auto",
                       progress: bool = False) -> list[dict]:
    """Recall@k and Entropy@k per decoding setting, mean and spread over sampling seeds.

    temperatures: entries None (beam search), one float (every level) or one float per level;
    sample_seeds: the seeds of the Gumbel noise (:func:`tiger_fast.evaluate.entropy_vs_temperature`
    is run once per seed).  Beam search is deterministic and runs once, except with ``max_users``,
    where the seed also draws the user sample: then every setting runs for every seed and the spread
    includes user sampling.  Returns one dict per setting: kind ("beam" | "uniform" | "per-level"),
    label, temperature (None | list), recall@k, ndcg@k, entropy@k, coverage@k (means over seeds),
    recall@k_sd, entropy@k_sd (sample standard deviation over seeds, 0 for one run), seeds,
    num_examples."""
    from .evaluate import entropy_vs_temperature

    temps = list(temperatures)
    seeds = [int(s) for s in sample_seeds]
    if not temps:
        raise ValueError("temperatures must list at least one setting")
    if not seeds:
        raise ValueError("sample_seeds must list at least one seed")
    runs: list[list[dict]] = [[] for _ in temps]
    for j, s in enumerate(seeds):
        todo = [i for i, t in enumerate(temps) if t is not None or j == 0 or max_users is not None]
        rows = entropy_vs_temperature(model, dataset, id_table, [temps[i] for i in todo], split=split, k=k,
                                      max_users=max_users, seed=s, backend=backend, progress=progress)
        for i, r in zip(todo, rows):
            runs[i].append(r)
    out = []
    for i, rs in enumerate(runs):
        t = rs[0]["temperature"]
        kind, label = _setting(None if t is None else tuple(t))
        p = {"kind": kind, "label": label, "temperature": t}
        for m in (f"recall@{k}", f"ndcg@{k}", f"entropy@{k}", f"coverage@{k}"):
            v = np.array([r[m] for r in rs], dtype=np.float64)
            p[m] = float(v.mean())
            if m.startswith(("recall", "entropy")):
                p[m + "_sd"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
        p["seeds"] = len(rs)
        p["num_examples"] = int(rs[0]["num_examples"])
        out.append(p)
    return out


def plot_temperature_tradeoff(points: list[dict], path, *, k: int = 10, title: str | None = None) -> str:
    """Recall@k against Entropy@k, one point per decoding setting with error bars (the ``_sd``
    fields: standard deviation over sampling seeds); points as returned by :func:`temperature_points`.
    Returns ``path``."""
    if not points:
        raise ValueError("points must hold at least one decoding setting")
    rk, ek = f"recall@{k}", f"entropy@{k}"
    for p in points:
        if rk not in p or ek not in p:
            raise ValueError(f"every point needs {rk!r} and {ek!r}; got keys {sorted(p)}")
    require_matplotlib()
    fig = _figure("temperature_tradeoff")
    ax = fig.subplots()
    colors = {"beam": "black", "uniform": "tab:blue", "per-level": "tab:red"}
    seen = set()
    xs, ys = [p[ek] for p in points], [p[rk] for p in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed = []  # (x, y) of labelled points: a label next to a nearby one goes left of its point
    for p in points:
        kind = p.get("kind") or _setting(p.get("temperature") and tuple(p["temperature"]))[0]
        ax.errorbar(p[ek], p[rk], xerr=p.get(ek + "_sd", 0.0), yerr=p.get(rk + "_sd", 0.0), fmt="o", ms=5,
                    capsize=3, color=colors.get(kind, "tab:gray"), label=None if kind in seen else kind)
        seen.add(kind)
        near = sum(abs(p[ek] - x) < 0.05 * span_x and abs(p[rk] - y) < 0.05 * span_y for x, y in placed)
        placed.append((p[ek], p[rk]))
        ax.annotate(p.get("label", ""), (p[ek], p[rk]), textcoords="offset points", fontsize=8,
                    xytext=(-5, 4 + 10 * (near - 1)) if near else (5, 4), ha="right" if near else "left")
    seeds = max(int(p.get("seeds", 1)) for p in points)
    ax.set_xlabel(f"Entropy@{k} (bits of leaf categories in the top {k})")
    ax.set_ylabel(f"Recall@{k}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=f"error bars: sd over {seeds} seed(s)" if seeds > 1 else None, title_fontsize=8)
    n = points[0].get("num_examples")
    ax.set_title((title + ": " if title else "") + "recall vs diversity per decoding setting"
                 + (f" ({n} users)" if n else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
