"""``tiger-fast`` command line.  Every command has ``--help``.

    tiger-fast demo                                  whole pipeline on the embedded synthetic catalogue
    tiger-fast embed       --data SPEC --out emb.npy
    tiger-fast train-rqvae --embeddings emb.npy --out rqvae/
    tiger-fast assign-ids  --rqvae rqvae/ --embeddings emb.npy|emb.parquet --out ids.parquet
    tiger-fast id-report   --ids ids.parquet [--data SPEC]
    tiger-fast train       --data SPEC --ids ids.parquet --out retriever/
    tiger-fast evaluate    --data SPEC --ids ids.parquet --model retriever/
    tiger-fast recommend   --data SPEC --ids ids.parquet --model retriever/ --user U
    tiger-fast batch-recall --data SPEC --ids ids.parquet --model retriever/ --out recs.parquet [--redis URL]
    tiger-fast serve       --ids ids.parquet --model retriever/ [--data SPEC] [--rqvae rqvae/] [--port 8000]

Dataset SPECs: ``synthetic[:items=2000,users=3000,seed=0]``, ``beauty[:DIR]``, ``scientific``,
``lcrec:DIR:NAME``, ``amazon2014:REVIEWS:META``, ``tables:ITEMS:INTERACTIONS``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys


class CliError(Exception):
    """A bad argument: printed as one line ``error: ...`` with exit status 2."""


def _print_json(obj) -> None:
    from .atomic import jsonable

    print(json.dumps(obj, indent=2, default=jsonable))


def _temperature(text):
    """'none' | '1.5' | '2,2,0.5,0.5' -> None | float | tuple."""
    if text is None or text.lower() == "none":
        return None
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--temperature must be 'none', a number or a comma list, got {text!r}")
    if not all(0 < v < float("inf") for v in vals):
        raise argparse.ArgumentTypeError(f"--temperature values must be finite numbers > 0, got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def _temperatures(text):
    """'beam;1;2;2,2,0.5,0.5' -> [None, 1.0, 2.0, (2.0, 2.0, 0.5, 0.5)] (the --temperatures settings)."""
    out = []
    for part in text.split(";"):
        part = part.strip()
        try:
            t = None if part.lower() == "beam" else tuple(float(x) for x in part.split(","))
        except ValueError:
            t = ()
        if t is not None and (not t or not all(0 < x < float("inf") for x in t)):
            raise argparse.ArgumentTypeError(f"--temperatures: each ';'-separated setting must be 'beam', T > 0 or "
                                             f"T0,T1,... > 0, got {part!r} in {text!r}")
        out.append(t if t is None or len(t) > 1 else t[0])
    return out


def _plot_dir(text):
    """--plot DIR: created if missing; refused unless writable and matplotlib (the [plot] extra) imports."""
    from .plots import check_plot_dir, require_matplotlib

    try:
        require_matplotlib()
        return check_plot_dir(text)
    except (ImportError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e))


def _codebook_sizes(text):
    """'64,64,64' -> (64, 64, 64): one RQ-VAE codebook size per level."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"must be a comma list of positive ints, one per level (e.g. 64,64,64), "
                                         f"got {text!r}")
    return sizes


def _text_fields(text):
    """'title,brand' -> ('title', 'brand'); the names are checked by embed.fields_template."""
    return tuple(f.strip() for f in text.split(","))


#: ``embed --text-fields`` default: every item field, in DEFAULT_TEMPLATE's order (tests check it).
DEFAULT_TEXT_FIELDS = "title,brand,categories,price,description"


def _api_terms_to_cli(msg: str) -> str:
    """Rewrite the Python-API advice a library error carries into the CLI flag that does the same."""
    msg = re.sub(r"^load_tables(?: items| interactions)?: ", "", msg)
    msg = msg.replace("unknown_columns='ignore' (drop) / 'keep' (store in item dicts)", "--ignore-unknown-columns (drop)")
    msg = msg.replace("allow_other_catalogue=True (CLI: --allow-other-catalogue)", "--allow-other-catalogue")
    return msg.replace("unknown_columns='ignore'", "--ignore-unknown-columns")


def _load_data(a):
    """``--data SPEC`` (and ``--ignore-unknown-columns``) -> Dataset; errors name the flag and the spec."""
    unknown = "ignore" if getattr(a, "ignore_unknown_columns", False) else "error"
    try:
        return load_dataset_spec(a.data, unknown_columns=unknown)
    except (ValueError, TypeError, OSError) as e:
        raise CliError(f"--data {a.data}: {_api_terms_to_cli(str(e))}") from e


def _load_ids(path, *, what="--ids"):
    from .ids import IdTable

    if not os.path.isfile(path):
        raise CliError(f"{what}: no such file {path!r} (write one with `tiger-fast assign-ids`)")
    try:
        return IdTable.from_parquet(path)
    except (ValueError, TypeError, OSError) as e:
        raise CliError(f"{what} {path}: {e}") from e


def _check_ids_cover(ds, table, a):
    """Every item of ``--data`` needs a semantic ID in ``--ids`` (else training/decoding fail later, in API terms)."""
    import numpy as np

    have = table.contains(ds.item_ids).numpy()
    if not have.all():
        miss = np.flatnonzero(~have)
        keys = ds.item_keys if ds.item_keys is not None else ds.item_ids.tolist()
        raise CliError(f"--ids {a.ids} has no semantic ID for {miss.size} of the {ds.num_items} items of --data "
                       f"{a.data} (e.g. item_id {', '.join(str(keys[i]) for i in miss[:5])}); make the ID table "
                       f"from this catalogue: `tiger-fast embed --data ...`, then train-rqvae and assign-ids")


def _check_catalogue(ds, table, a):
    """``--ids`` must come from the catalogue of ``--data`` (recorded fingerprints; see
    tiger_fast.provenance) unless ``--allow-other-catalogue``."""
    from .provenance import catalogue_fingerprint, check_same

    if getattr(a, "allow_other_catalogue", False):
        return
    try:
        check_same(f"--ids {a.ids} vs --data {a.data}", table.provenance.get("catalogue"),
                   catalogue_fingerprint(ds), "--allow-other-catalogue")
    except ValueError as e:
        raise CliError(str(e)) from None


def _load_data_and_ids(a):
    """(Dataset, IdTable) for ``--data`` and ``--ids``, checked to fit each other."""
    ds = _load_data(a)
    table = _load_ids(a.ids)
    _check_catalogue(ds, table, a)
    _check_ids_cover(ds, table, a)
    return ds, table


def _npy_header(path, flag):
    """(shape, dtype) of a .npy file, read from its header alone.  A missing, foreign or truncated
    file is one CliError naming ``flag`` and ``path``."""
    import numpy as np

    if not os.path.isfile(path):
        raise CliError(f"{flag}: no such file {path!r}")
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fh)
            offset = fh.tell()
    except (ValueError, OSError, EOFError) as e:
        raise CliError(f"{flag} {path}: not a .npy array file ({e})") from e
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = os.path.getsize(path) - offset
    if have < need:
        raise CliError(f"{flag} {path}: truncated .npy file: its header promises {shape} {dtype} ({need:,} bytes) "
                       f"but {have:,} bytes follow; write the file again")
    return shape, dtype


def _embeddings_npy(path, flag="--embeddings"):
    """Check an embeddings .npy: complete, 2-D float, at least one row -> (rows, dim)."""
    import numpy as np

    shape, dtype = _npy_header(path, flag)
    if len(shape) != 2 or not np.issubdtype(dtype, np.floating):
        raise CliError(f"{flag} {path} must hold a 2-D float array (items, dim), got {dtype} {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise CliError(f"{flag} {path} holds no embeddings (shape {shape}); embed a non-empty catalogue")
    return shape


def _check_temperature(t, table, a):
    """A per-level --temperature needs one value per level of the --ids layout."""
    if isinstance(t, tuple) and len(t) != table.layout.num_levels:
        raise CliError(f"--temperature {','.join(map(str, t))}: {len(t)} values, but the IDs of --ids {a.ids} have "
                       f"{table.layout.num_levels} levels; give one T or {table.layout.num_levels}")


def _check_k(a, table):
    if not 1 <= a.k <= len(table):
        raise CliError(f"--k {a.k}: must be between 1 and the {len(table)} items of --ids {a.ids}")


def _user_row(ds, text, spec):
    """``--user`` (the catalogue's own user id, string or int) -> row in ds.user_ids."""
    if ds.user_keys is not None:
        rows = {k: n for n, k in enumerate(ds.user_keys)}
        known = ds.user_keys
        u = rows.get(text)
    else:
        rows = {int(v): n for n, v in enumerate(ds.user_ids)}
        known = ds.user_ids.tolist()
        try:
            u = rows.get(int(text))
        except ValueError:
            raise CliError(f"--user {text}: the users of --data {spec} have integer ids (e.g. "
                           f"{', '.join(map(str, known[:3]))})") from None
    if u is None:
        raise CliError(f"--user {text} is not a user of --data {spec} (its users are e.g. "
                       f"{', '.join(map(str, known[:3]))})")
    return u


def _load_model(path, id_table, ids_path="the ID table", allow_other=False):
    """``--model`` checkpoint, checked against ``--ids`` (layout; the ID table it was trained
    with, unless ``allow_other``)."""
    from .provenance import check_same, id_table_digest
    from .t5 import load_t5

    if not os.path.exists(path):
        raise CliError(f"--model: no such checkpoint {path!r} (train one with `tiger-fast train`)")
    try:
        model, layout = load_t5(path)
    except (ValueError, TypeError, OSError) as e:
        raise CliError(f"--model {path}: {e}") from e
    try:
        layout.check_compatible(id_table.layout, f"--model {path} layout vs --ids {ids_path} layout")
        if not allow_other:
            check_same(f"--model {path} vs --ids {ids_path}", model.provenance.get("id_table"),
                       id_table_digest(id_table), "--allow-other-catalogue")
    except ValueError as e:
        raise CliError(str(e)) from None
    return model.eval()


_SPEC_HELP = ('dataset spec must be one of: "synthetic", "synthetic:items=2000,users=3000,seed=0", '
              '"beauty" (default data dir), "beauty:<dir>", "scientific" (default data dir), '
              '"lcrec:<dir>:<name>", "amazon2014:<reviews.json.gz>:<meta.json.gz>", '
              '"tables:<items>:<interactions>"')


def _parse_scalar(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def load_dataset_spec(spec: str, *, unknown_columns: str = "error"):
    """A :class:`tiger_fast.data.Dataset` from a one-string spec (the CLI's ``--data``); forms in ``_SPEC_HELP``.

    ``unknown_columns`` is passed to :func:`tiger_fast.data.load_tables` for ``tables:`` specs
    (``--ignore-unknown-columns``); any other value than "error" is refused for the other forms.

    ``synthetic`` options: ``items``, ``users``, ``seed`` and any :class:`tiger_fast.synthetic.SyntheticConfig` field.
    Two-path specs split at the last ``:``.  ``beauty``/``scientific`` alone use
    :func:`tiger_fast.data.default_data_dir`.
    """
    from .data import default_data_dir, load_amazon2014, load_beauty, load_lcrec, load_tables
    from .synthetic import synthetic_dataset

    if not isinstance(spec, str) or not spec:
        raise ValueError(_SPEC_HELP)
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if unknown_columns != "error" and kind != "tables":
        raise ValueError("--ignore-unknown-columns applies to tables:ITEMS:INTERACTIONS specs only")
    if kind == "synthetic":
        kwargs: dict = {}
        alias = {"items": "num_items", "users": "num_users"}
        for part in filter(None, rest.split(",")):
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"synthetic spec option {part!r} must be key=value; {_SPEC_HELP}")
            kwargs[alias.get(k.strip(), k.strip())] = _parse_scalar(v.strip())
        return synthetic_dataset(**kwargs)
    if kind == "beauty":
        return load_beauty(rest or default_data_dir() / "amazon-beauty-2014")
    if kind == "scientific" and not rest:
        return load_lcrec(default_data_dir() / "amazon-scientific-2018", "Scientific")
    if kind in ("lcrec", "amazon2014", "tables"):
        a, sep, b = rest.rpartition(":")
        if not sep or not a or not b:
            raise ValueError(f"{kind} spec needs two parts separated by ':'; {_SPEC_HELP}")
        if kind == "lcrec":
            return load_lcrec(a, b)
        if kind == "amazon2014":
            return load_amazon2014(a, b)
        return load_tables(a, b, unknown_columns=unknown_columns)
    raise ValueError(f"unknown dataset spec {spec!r}; {_SPEC_HELP}")


def cmd_demo(a):
    from .pipeline import demo_config, run_demo

    cfg = demo_config(a.time_budget)
    rep = run_demo(a.out, num_items=a.items, num_users=a.users, cfg=cfg, progress=not a.quiet)
    return 0 if rep.get("beats_popularity") else 1


def cmd_embed(a):
    import numpy as np

    from .atomic import write_npy
    from .embed import embed_dataset, fields_template, item_texts
    from .provenance import catalogue_fingerprint, sidecar_path, write_sidecar

    ids_path = os.path.splitext(a.out)[0] + ".ids.npy"
    _check_out(a.out)
    _check_out(ids_path, "--out (its item ids file)")
    ds = _load_data(a)
    fields = ",".join(a.text_fields)
    try:
        template = fields_template(a.text_fields)
    except ValueError as e:
        raise CliError(f"--text-fields {fields}: {e}") from e
    if ds.embeddings is not None:
        if a.text_fields != _text_fields(DEFAULT_TEXT_FIELDS):
            raise CliError(f"--text-fields {fields}: the items table of --data {a.data} has an embedding column, "
                           f"which embed writes as is; drop that column to embed item text instead")
        print(f"--data {a.data} has an embedding column: writing it as is (no text embedded)", file=sys.stderr)
    else:
        empty = sum(1 for t in item_texts(ds, template) if not t)
        if empty == ds.num_items:
            raise CliError(f"--text-fields {fields}: no item of --data {a.data} has any of these fields")
        if empty:
            print(f"warning: {empty} of {ds.num_items} items of --data {a.data} have none of --text-fields "
                  f"{fields}; they are embedded from an empty text", file=sys.stderr)
    try:
        emb = embed_dataset(ds, a.model, template, batch_size=a.batch_size, cache_dir=a.cache_dir,
                            progress=not a.quiet)
    except (ValueError, OSError, ImportError) as e:
        raise CliError(f"--model {a.model or '(packaged all-MiniLM-L6-v2)'}: {e}") from e
    # ids first, embeddings, then the provenance sidecar: an --out file always has its ids file
    # next to it, and a sidecar never describes other embeddings (the old one goes first)
    sidecar = sidecar_path(a.out)
    _check_out(sidecar, "--out (its provenance file)")
    if os.path.exists(sidecar):
        os.unlink(sidecar)
    write_npy(ids_path, np.asarray(ds.item_ids, dtype=np.int64), what="--out (its item ids file)")
    write_npy(a.out, np.asarray(emb), what="--out")
    write_sidecar(a.out, {"artefact": "embeddings", "catalogue": catalogue_fingerprint(ds), "rows": int(emb.shape[0]),
                          "encoder": a.model or "all-MiniLM-L6-v2 (packaged)", "text_fields": list(a.text_fields)})
    print(f"wrote {a.out} ({emb.shape[0]} x {emb.shape[1]} float32), item ids {ids_path}, provenance {sidecar}")


def cmd_train_rqvae(a):
    import numpy as np

    from .provenance import read_sidecar
    from .rqvae import RQVAEConfig, RQVAETrainConfig, save_rqvae, train_rqvae

    _embeddings_npy(a.embeddings)
    emb = np.array(np.load(a.embeddings, mmap_mode="r", allow_pickle=False), dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise CliError(f"--embeddings {a.embeddings} has NaN/Inf in {bad.size} rows, e.g. {bad[:5].tolist()}")
    cfg = RQVAEConfig(input_dim=int(emb.shape[1]), codebook_sizes=a.codebook_sizes)
    if a.paper:
        tcfg = RQVAETrainConfig.paper()
        tcfg.seed, tcfg.device, tcfg.precision = a.seed, a.device, a.precision
    else:
        tcfg = RQVAETrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed, device=a.device,
                                precision=a.precision)

    def log(rec):
        if not a.quiet and (rec["epoch"] % max(1, a.epochs // 10) == 0 or rec["epoch"] == a.epochs - 1):
            usage = " ".join(f"{u:.0%}" for u in rec["usage"])
            print(f"epoch {rec['epoch']}: recon {rec['recon_loss']:.4f} rq {rec['rq_loss']:.4f} usage/level {usage}")

    try:
        prov = read_sidecar(a.embeddings, rows=int(emb.shape[0]))
    except ValueError as e:
        raise CliError(f"--embeddings {a.embeddings}: {e}") from None
    model, hist = train_rqvae(emb, cfg, tcfg, progress=not a.quiet, log=log)
    if prov and prov.get("catalogue"):
        model.provenance = {"catalogue": prov["catalogue"]}  # assign-ids checks it against the embeddings
    save_rqvae(model, a.out)
    print(f"wrote {a.out}")


def _check_out(path, flag="--out"):
    """Refuse an output path that is not a regular file (a directory, /dev/null, a FIFO) up front."""
    from .atomic import check_target

    check_target(path, flag)  # ValueError "--out: '/dev/null' is a character device; refusing ..."


def cmd_assign_ids(a):
    _check_out(a.out)
    if a.ray or a.ray_address:
        from .ray_assign import assign_ids_ray

        for flag, val in (("--item-ids", a.item_ids), ("--work-dir", a.work_dir), ("--restart", a.restart)):
            if val:
                raise CliError(f"{flag} does not apply with --ray (Parquet input; Ray re-runs failed work itself)")
        rep = assign_ids_ray(a.rqvae, a.embeddings, a.out, ray_address=a.ray_address, num_workers=a.ray_workers,
                             use_gpu={"auto": None, "yes": True, "no": False}[a.ray_gpu], batch_rows=a.chunk_size,
                             backend=a.backend, embedding_column=a.embedding_column, id_column=a.id_column,
                             progress=not a.quiet, allow_other_catalogue=a.allow_other_catalogue)
        _print_json(rep)
        return
    from .assign import assign_ids

    if a.embeddings.lower().endswith(".npy"):
        rows = _embeddings_npy(a.embeddings)[0]
        beside = os.path.splitext(a.embeddings)[0] + ".ids.npy"
        if a.item_ids is None and os.path.isfile(beside):
            # embed writes EMB.ids.npy; without it the row index would become the item id, which
            # silently shifts every ID of a catalogue whose ids are not 0..N-1
            a.item_ids = beside
            print(f"item ids from {beside} (written by embed beside --embeddings)", file=sys.stderr)
        if a.item_ids:
            shape, _ = _npy_header(a.item_ids, "--item-ids")
            if shape != (rows,):
                raise CliError(f"--item-ids {a.item_ids} holds shape {shape}, but --embeddings {a.embeddings} has "
                               f"{rows} rows; give one id per row (embed writes them as EMB.ids.npy)")
    try:
        rep = assign_ids(a.rqvae, a.embeddings, a.out, ids=a.item_ids, chunk_size=a.chunk_size,
                         backend=a.backend, work_dir=a.work_dir, restart=a.restart, progress=not a.quiet,
                         embedding_column=a.embedding_column, id_column=a.id_column,
                         allow_other_catalogue=a.allow_other_catalogue)
    except ValueError as e:
        raise CliError(f"--rqvae {a.rqvae}, --embeddings {a.embeddings}: {_api_terms_to_cli(str(e))}") from None
    _print_json(rep)


def cmd_id_report(a):
    from .ids import semantic_id_report
    from .pipeline import leaf_categories_by_row

    table = _load_ids(a.ids)
    rep = table.report()
    if a.data:
        ds = _load_data(a)
        _check_catalogue(ds, table, a)
        _check_ids_cover(ds, table, a)
        rep.update(semantic_id_report(table, leaf_categories_by_row(ds, table)))
    if a.plot:
        from .plots import plot_id_report

        rep["plots"] = plot_id_report(table, a.plot, semantic=rep if a.data else None,
                                      title=os.path.basename(a.data or a.ids))
    _print_json(rep)


def cmd_train(a):
    import torch

    from .pipeline import RECIPES, model_preset, recipe, train_tiger
    from .t5 import save_t5
    from .train import init_distributed

    if a.preset not in RECIPES:
        raise CliError(f"--preset: unknown preset {a.preset!r}; choose one of {', '.join(sorted(RECIPES))}")
    if a.dropout is not None and not 0.0 <= a.dropout < 1.0:
        raise CliError(f"--dropout must be in [0, 1), got {a.dropout}")
    if a.time_budget is not None and a.time_budget <= 0:
        raise CliError(f"--time-budget must be > 0 seconds, got {a.time_budget}")
    if a.threads is not None:
        if a.threads < 1:
            raise CliError(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    # Under torchrun (WORLD_SIZE > 1) this joins the process group (gloo on CPU, NCCL on GPU) and
    # train_retriever shards every global batch across ranks; otherwise it is a no-op.
    rank, _, device = init_distributed()
    # the preset's recipe, then every flag given explicitly
    given = {"steps": a.steps, "time_budget_s": a.time_budget, "batch_size": a.batch_size, "lr": a.lr,
             "warmup_steps": a.warmup, "eval_every": a.eval_every, "eval_users": a.eval_users,
             "length_buckets": a.length_buckets, "schedule": a.schedule, "weight_decay": a.weight_decay,
             "label_smoothing": a.label_smoothing, "precision": a.precision, "patience": a.patience,
             "dropout": a.dropout,
             "eval_every_s": None if a.eval_every_min is None else a.eval_every_min * 60}
    cfg = recipe(a.preset, seed=a.seed, backend=a.backend, device=device,
                 **{k: v for k, v in given.items() if v is not None})
    if a.model_size is not None:
        try:
            cfg.t5 = model_preset(a.model_size)
        except ValueError as e:
            raise CliError(f"--model-size: {e}") from None
    if a.layers:
        cfg.t5 = {**cfg.t5, "num_encoder_layers": a.layers, "num_decoder_layers": a.layers}
    if cfg.time_budget_s is not None and cfg.eval_users and cfg.time_budget_s < 30:
        raise CliError(f"--time-budget {cfg.time_budget_s:g} s is too short to train and run one validation; "
                       "give at least 30 s (or --eval-users 0 to train without validation)")
    ds, table = _load_data_and_ids(a)
    if cfg.eval_users:  # refuse now rather than after the whole budget, when the first validation runs
        from .sequences import leave_one_out

        if len(leave_one_out(ds).valid) == 0:
            raise CliError(f"--data {a.data}: no user has the 3 or more interactions a validation example needs "
                           "(leave-one-out: the last item is test, the one before it validation), so nothing "
                           "can be validated; add interactions or pass --eval-users 0 to train without validation")
    model, hist = train_tiger(ds, table, cfg, checkpoint_dir=os.path.join(a.out, "checkpoints"),
                              progress=not a.quiet and rank == 0)
    if rank != 0:
        return
    save_t5(model.cpu(), table.layout, os.path.join(a.out, "model"))
    keep = ("final_step", "planned_steps", "stopped", "best_step", "best_value", "steps_per_s", "wall_s")
    print(json.dumps({k: hist.get(k) for k in keep}))
    if hist.get("best_step") is not None and hist.get("best_step") != hist.get("final_step"):
        print(f"kept the best validation checkpoint (step {hist['best_step']} of {hist['final_step']})")
    elif hist.get("best_step") is not None:
        print(f"kept the final weights (step {hist['final_step']}): its validation at the end was the best")
    for w in hist.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {os.path.join(a.out, 'model')}")
    if a.plot:
        from .plots import plot_training
        print(f"wrote {plot_training(hist, os.path.join(a.plot, 'training.png'), title=a.data)}")


def _resolve_model_dir(path):
    inner = os.path.join(path, "model")
    return inner if os.path.isdir(inner) else path


def _baselines(text):
    """'popularity,sasrec' -> ('popularity', 'sasrec'); unknown names -> argparse error."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in ("popularity", "sasrec")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {bad}; choose from popularity, sasrec")
    return names


def _sasrec_baseline(a, ds) -> dict:
    """SASRec metrics for `evaluate --baselines sasrec`: load --sasrec-model DIR when it holds a saved
    model, else train for --sasrec-budget seconds (and save to DIR when given)."""
    from .sasrec import SASRecConfig, evaluate_sasrec, load_sasrec, save_sasrec, train_sasrec

    d, hist = a.sasrec_model, None
    if d and os.path.isfile(os.path.join(d, "sasrec.json")):
        try:
            model = load_sasrec(d)
        except (ValueError, FileNotFoundError) as e:
            raise CliError(f"--sasrec-model {d}: {e}") from e
    else:
        try:
            model, hist = train_sasrec(ds, SASRecConfig(time_budget_s=a.sasrec_budget, seed=a.seed),
                                       progress=not a.quiet)
        except (ValueError, RuntimeError) as e:
            raise CliError(f"--sasrec-budget {a.sasrec_budget:g} on --data {a.data}: {e}") from e
        if d:
            save_sasrec(model, d)
    try:
        res = evaluate_sasrec(model, ds, split=a.split, max_users=a.max_users, seed=a.seed)
    except ValueError as e:
        raise CliError(f"--sasrec-model {d}: {e}") from e
    if hist is not None:
        res.update(train_steps=hist["steps"], train_wall_s=hist["wall_s"], best_step=hist["best_step"],
                   stopped=hist["stopped"])
    return res


def cmd_evaluate(a):
    from .evaluate import evaluate_popularity, evaluate_retriever

    if a.plot and not a.temperatures:
        raise CliError("--plot: needs --temperatures (the decoding settings to plot)")
    if a.sample_seeds and not a.temperatures:
        raise CliError("--sample-seeds: applies to --temperatures only")
    ds, table = _load_data_and_ids(a)
    levels = table.layout.num_levels
    for t in a.temperatures or []:
        if isinstance(t, tuple) and len(t) != levels:
            raise CliError(f"--temperatures: setting {t} has {len(t)} values; give one T or {levels} (one per level)")
    model = _load_model(_resolve_model_dir(a.model), table, a.ids, a.allow_other_catalogue)
    _check_k(a, table)
    _check_temperature(a.temperature, table, a)
    res = evaluate_retriever(model, ds, table, split=a.split, k=a.k, temperature=a.temperature,
                             max_users=a.max_users, seed=a.seed, backend=a.backend, progress=not a.quiet,
                             precision=a.precision)
    out = {"tiger": {k: v for k, v in res.items() if isinstance(v, (int, float, str)) or v is None}}
    if a.popularity or "popularity" in a.baselines:
        out["popularity"] = evaluate_popularity(ds, split=a.split, max_users=a.max_users, seed=a.seed)
    if "sasrec" in a.baselines:
        out["sasrec"] = _sasrec_baseline(a, ds)
    if a.temperatures:
        from .plots import plot_temperature_tradeoff, temperature_points

        out["temperatures"] = temperature_points(model, ds, table, a.temperatures,
                                                 sample_seeds=a.sample_seeds or [a.seed], split=a.split, k=a.k,
                                                 max_users=a.max_users, backend=a.backend, progress=not a.quiet)
        if a.plot:
            out["plot"] = plot_temperature_tradeoff(out["temperatures"], os.path.join(a.plot, "temperature_tradeoff.png"),
                                                    k=a.k, title=a.data)
    _print_json(out)


def cmd_recommend(a):
    from .generate import generate

    ds, table = _load_data_and_ids(a)
    model = _load_model(_resolve_model_dir(a.model), table, a.ids, a.allow_other_catalogue)
    u = _user_row(ds, a.user, a.data)
    _check_k(a, table)
    _check_temperature(a.temperature, table, a)
    hist = ds.item_ids[ds.sequences[u]]
    res = generate(model, [hist], table, user_ids=[int(ds.user_ids[u])], k=a.k, temperature=a.temperature,
                   seed=a.seed, backend=a.backend, precision=a.precision)
    name = {int(i): str(ds.item_keys[n] if ds.item_keys is not None else i) for n, i in enumerate(ds.item_ids)}
    titles = {int(i): it.get("title", "") for i, it in zip(ds.item_ids, ds.items)}
    print(f"user {a.user}, last items: " + "; ".join(titles[int(i)] or name[int(i)] for i in hist[-3:]))
    if a.temperature is None:
        print(f"top {a.k} by beam search, best first; log-prob = the model's log-probability of the ID")
    else:
        t = a.temperature if isinstance(a.temperature, float) else ",".join(map(str, a.temperature))
        print(f"{a.k} distinct items sampled at --temperature {t} (--seed {a.seed}), in sample order: NOT a ranking; "
              f"log-prob = the model's untempered log-probability of the ID")
    for n, (i, code, s) in enumerate(zip(res.item_ids[0], res.codes[0], res.scores[0]), 1):
        if int(i) < 0:
            break
        print(f"{n:>3}. item {name[int(i)]}  id {code.tolist()}  log-prob {float(s):.3f}  {titles.get(int(i), '')}")


def cmd_batch_recall(a):
    from .cpu_memory import retain_freed_memory
    from .recall_export import batch_recall, load_to_redis

    retain_freed_memory()  # a long batch job: keep freed buffers instead of page-faulting them back in

    _check_out(a.out)
    ds, table = _load_data_and_ids(a)
    model = _load_model(_resolve_model_dir(a.model), table, a.ids, a.allow_other_catalogue)
    _check_k(a, table)
    _check_temperature(a.temperature, table, a)
    rep = batch_recall(model, ds, table, a.out, k=a.k, batch_size=a.batch_size, backend=a.backend,
                       temperature=a.temperature, seed=a.seed, progress=not a.quiet, precision=a.precision)
    if a.redis:
        rep["redis"] = load_to_redis(a.out, a.redis, prefix=a.redis_prefix)
    _print_json(rep)


def cmd_serve(a):
    """HTTP service (tiger_fast/serve.py): loads in the background, /health says when it is ready."""
    from .serve import ServeConfig, load_recommender, run_server

    # --data is read before the port opens: a bad spec or table is one CLI error at once, not a
    # failed background load (the model and ID table still load behind /health)
    ds = _load_data(a) if a.data else None
    paths = [("--ids", a.ids), ("--model", a.model)] + ([("--rqvae", a.rqvae)] if a.rqvae else [])
    for flag, path in paths:
        if not os.path.exists(path):
            raise CliError(f"{flag}: no such file or directory {path!r}")
    try:
        cfg = ServeConfig(max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_queue=a.max_queue, max_k=a.max_k,
                          max_history=a.max_history, backend=a.backend, precision=a.precision, threads=a.threads,
                          embed_model=a.embed_model, shutdown_timeout_s=a.shutdown_timeout)
    except ValueError as e:  # "max_batch must be ..." -> "--max-batch must be ..."
        name, _, rest = str(e).partition(" ")
        raise CliError(f"--{name.replace('_', '-')} {rest}") from None
    model_dir = _resolve_model_dir(a.model)

    def loader():
        return load_recommender(model_dir, a.ids, rqvae_dir=a.rqvae, dataset=ds, cfg=cfg,
                                allow_other_catalogue=a.allow_other_catalogue)

    return run_server(loader, cfg, host=a.host, port=a.port, log_level=a.log_level, access_log=a.access_log)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with every option's default (argparse's defaults formatter); descriptions keep their lines."""


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: every optional argument shows its default in --help (an option added
    without help text gets just its default), a required one shows none."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if kwargs.get("required"):
            kwargs.setdefault("default", argparse.SUPPRESS)
        elif kwargs.get("help") is None:
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)


_TEMPERATURE_HELP = ("none = beam search, a ranking best first; T > 0 (all levels) or T0,T1,T2,T3 (one per ID level) "
                     "= draw K distinct items by stochastic beam search, listed in draw order (not a ranking)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tiger-fast", description=__doc__.split("\n")[0],
                                formatter_class=_HelpFormatter,
                                epilog="Dataset SPECs: synthetic[:items=N,users=M,seed=S] | beauty[:DIR] | scientific | "
                                       "lcrec:DIR:NAME | amazon2014:REVIEWS:META | tables:ITEMS:INTERACTIONS")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        return sp

    def allow_other(sp):
        sp.add_argument("--allow-other-catalogue", action="store_true",
                        help="use artefacts built from another catalogue deliberately (by default a mismatch of "
                             "the recorded catalogue / ID-table fingerprints is refused; README, 'Guarantees')")

    def ignore_unknown(sp):
        sp.add_argument("--ignore-unknown-columns", action="store_true",
                        help="tables:ITEMS:INTERACTIONS: drop columns other than the known ones (README, 'Your own "
                             "catalogue'), e.g. a rating column, instead of refusing the tables")

    def data_ids_model(sp, model=True):
        sp.add_argument("--data", required=True, help="dataset SPEC (see `tiger-fast --help`)")
        ignore_unknown(sp)
        sp.add_argument("--ids", required=True, help="ID table Parquet from assign-ids")
        allow_other(sp)
        if model:
            sp.add_argument("--model", required=True, help="retriever directory from `tiger-fast train`")
        sp.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda"],
                        help="decoding backend")
        sp.add_argument("--seed", type=int, default=0, help="random seed (--temperature sampling; evaluate: the --max-users subset)")

    def precision_flag(sp):
        sp.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"],
                        help="the retriever's forward: fp32 exact; bf16 / int8 faster, lists may differ "
                             "(docs/generate_precision.md)")

    sp = add("demo", cmd_demo, "the whole pipeline on the embedded synthetic catalogue (a few minutes on 2 cores)")
    sp.add_argument("--out", default=None, help="directory to save the artefacts (rqvae, ids, retriever, report)")
    sp.add_argument("--items", type=int, default=2000, help="synthetic catalogue size")
    sp.add_argument("--users", type=int, default=3000, help="synthetic users")
    sp.add_argument("--time-budget", type=float, default=100.0, help="retriever training seconds")

    sp = add("embed", cmd_embed, "embed item text with a sentence encoder -> .npy (+ .ids.npy)")
    sp.add_argument("--data", required=True, help="dataset SPEC")
    ignore_unknown(sp)
    sp.add_argument("--out", required=True, help="output .npy")
    sp.add_argument("--text-fields", type=_text_fields, default=DEFAULT_TEXT_FIELDS,
                    help="item fields embedded, in this order, as 'Title: ...; Brand: ...' (a field an item lacks "
                         "is left out of its text); names among title,brand,categories,price,description")
    sp.add_argument("--model", default=None,
                    help="sentence-transformers name/path; None = the packaged all-MiniLM-L6-v2")
    sp.add_argument("--batch-size", type=int, default=128, help="texts per encoder batch")
    sp.add_argument("--cache-dir", default=None, help="embedding cache directory (None: no cache)")

    sp = add("train-rqvae", cmd_train_rqvae, "train the RQ-VAE on item embeddings")
    sp.add_argument("--embeddings", required=True, help=".npy float array (items, dim)")
    sp.add_argument("--out", required=True, help="output directory (safetensors + JSON)")
    sp.add_argument("--codebook-sizes", type=_codebook_sizes, default="256,256,256",
                    help="codes per RQ-VAE level, one per level (the semantic ID is these levels + a collision "
                         "code); a catalogue of a few thousand items wants smaller ones, e.g. 64,64,64")
    sp.add_argument("--epochs", type=int, default=50, help="passes over the embeddings")
    sp.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    sp.add_argument("--paper", action="store_true", help="the paper's schedule: Adagrad lr 0.4, 20k epochs")
    sp.add_argument("--batch-size", type=int, default=1024, help="embeddings per step")
    sp.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    sp.add_argument("--device", default="cpu", help="torch device")
    sp.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16 = autocast of the encoder/decoder MLPs (codes and losses stay fp32)")

    sp = add("assign-ids", cmd_assign_ids, "assign unique semantic IDs (streaming, resumable) -> ID table Parquet")
    allow_other(sp)
    sp.add_argument("--rqvae", required=True, help="RQ-VAE directory from train-rqvae")
    sp.add_argument("--embeddings", required=True, help=".npy (memory-mapped) or Parquet with an embedding column")
    sp.add_argument("--item-ids", default=None, help=".npy of item ids for a .npy source; None = EMB.ids.npy beside "
                                                     "--embeddings EMB.npy when it exists (embed writes it), else the row index")
    sp.add_argument("--embedding-column", default="embedding", help="embedding column of a Parquet source")
    sp.add_argument("--id-column", default="item_id", help="item id column of a Parquet source")
    sp.add_argument("--out", required=True, help="output ID table (.parquet)")
    sp.add_argument("--chunk-size", type=int, default=65536, help="rows per streamed chunk")
    sp.add_argument("--work-dir", default=None, help="intermediate files, a rerun resumes from them; None = OUT.work")
    sp.add_argument("--restart", action="store_true", help="discard a previous run's work dir")
    sp.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton"],
                    help="residual quantization backend")
    sp.add_argument("--ray", action="store_true", help="run on Ray Data (pip install 'tiger_fast[ray]'); Parquet input")
    sp.add_argument("--ray-address", default=None, help="Ray cluster address (e.g. auto, ray://head:10001); implies --ray")
    sp.add_argument("--ray-workers", type=int, default=None, help="map actors; None = one per CPU/GPU")
    sp.add_argument("--ray-gpu", default="auto", choices=["auto", "yes", "no"], help="GPU actors (auto: if the cluster has GPUs)")

    sp = add("id-report", cmd_id_report, "collisions, max collision depth, usage per level (+ semantic check with --data)")
    sp.add_argument("--ids", required=True, help="ID table Parquet from assign-ids")
    allow_other(sp)
    sp.add_argument("--data", default=None, help="dataset SPEC, for the leaf-category check (None: no check)")
    ignore_unknown(sp)
    sp.add_argument("--plot", type=_plot_dir, default=None, metavar="DIR",
                    help="also write PNG pictures into DIR (codes per level, collision groups, trie branching, "
                         "+ category agreement with --data; needs tiger_fast[plot])")

    sp = add("train", cmd_train, "train the T5 retriever (resumes from OUT/checkpoints)")
    sp.add_argument("--data", required=True, help="dataset SPEC (see `tiger-fast --help`)")
    ignore_unknown(sp)
    sp.add_argument("--ids", required=True, help="ID table Parquet from assign-ids")
    allow_other(sp)
    sp.add_argument("--out", required=True, help="output directory (OUT/model, OUT/checkpoints)")
    sp.add_argument("--preset", default="cpu",
                    help="training recipe: 'cpu' (chosen on Beauty's validation split for CPU budgets: small T5, "
                         "cosine decay fitted to --time-budget, validation every 5 min, early stopping) or "
                         "'paper' (the TIGER paper's schedule); the flags below override it")
    sp.add_argument("--time-budget", type=float, default=1800.0,
                    help="training wall seconds; the schedule is sized to it")
    sp.add_argument("--model-size", default=None, choices=["small", "paper", "6x6"],
                    help="T5 shape; None = the preset's (small = d_model 64, 2+2 layers; paper = 4+4, d_model 128)")
    sp.add_argument("--threads", type=int, default=None, help="torch threads; None = torch's choice")
    sp.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                    help="bf16 = autocast (fp32 master weights, fp32 loss and softmax); None = the preset's (fp32)")
    sp.add_argument("--steps", type=int, default=None, help="step cap; None = the preset's")
    sp.add_argument("--batch-size", type=int, default=None, help="None = the preset's")
    sp.add_argument("--lr", type=float, default=None, help="peak learning rate; None = the preset's")
    sp.add_argument("--warmup", type=int, default=None, help="warm-up steps; None = the preset's")
    sp.add_argument("--schedule", default=None, choices=["cosine", "rsqrt"], help="None = the preset's")
    sp.add_argument("--weight-decay", type=float, default=None, help="None = the preset's")
    sp.add_argument("--label-smoothing", type=float, default=None, help="None = the preset's (0)")
    sp.add_argument("--dropout", type=float, default=None, help="T5 dropout in [0, 1); None = the preset's "
                                                               "(cpu: 0, paper: 0.1)")
    sp.add_argument("--layers", type=int, default=None, help="encoder and decoder layers (paper: 4)")
    sp.add_argument("--eval-every", type=int, default=None, help="validate every N steps; None = the preset's")
    sp.add_argument("--eval-every-min", type=float, default=None,
                    help="validate every M wall minutes; None = the preset's (5 for cpu)")
    sp.add_argument("--eval-users", type=int, default=None, help="validation users (0 = no validation); None = the preset's")
    sp.add_argument("--patience", type=int, default=None,
                    help="stop after N validations without a new best; None = the preset's")
    sp.add_argument("--length-buckets", type=int, default=None,
                    help="sort windows of N batches by history length (less padding: ~3.6x faster on Beauty); "
                         "0 = uniform random batches, as in the paper")
    sp.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda"])
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--plot", type=_plot_dir, default=None, metavar="DIR",
                    help="also write DIR/training.png (loss, validation Recall/NDCG@10); needs tiger_fast[plot]")

    sp = add("evaluate", cmd_evaluate, "Recall/NDCG@5,10, Entropy@10, coverage on the leave-one-out split")
    data_ids_model(sp)
    precision_flag(sp)
    sp.add_argument("--split", default="test", choices=["test", "valid"])
    sp.add_argument("--k", type=int, default=10)
    sp.add_argument("--temperature", type=_temperature, default=None,
                    help="none = beam search; T > 0 (all levels) or T0,T1,T2,T3 (one per ID level) = evaluate the "
                         "K items drawn by stochastic beam search at that temperature")
    sp.add_argument("--max-users", type=int, default=None)
    sp.add_argument("--popularity", action="store_true", help="also evaluate the popularity baseline "
                    "(= --baselines popularity)")
    sp.add_argument("--baselines", type=_baselines, default=(), metavar="NAMES",
                    help="comma-separated baselines to evaluate beside TIGER: popularity, sasrec")
    sp.add_argument("--sasrec-budget", type=float, default=300.0, metavar="S",
                    help="wall seconds to train SASRec for --baselines sasrec (validation included)")
    sp.add_argument("--sasrec-model", default=None, metavar="DIR",
                    help="load SASRec from DIR if it holds one (tiger_fast.sasrec.save_sasrec), "
                         "else train it and save it there")
    sp.add_argument("--temperatures", type=_temperatures, default=None,
                    help="also Recall/Entropy@K per decoding setting, ';'-separated: beam | T | T0,T1,T2,T3 "
                         "(e.g. 'beam;1;2;2,2,0.5,0.5')")
    sp.add_argument("--sample-seeds", type=int, nargs="+", default=None,
                    help="sampling seeds for --temperatures (mean and spread over them; None: --seed alone)")
    sp.add_argument("--plot", type=_plot_dir, default=None, metavar="DIR",
                    help="write DIR/temperature_tradeoff.png from --temperatures; needs tiger_fast[plot]")

    sp = add("recommend", cmd_recommend, "top-K items for one user")
    data_ids_model(sp)
    precision_flag(sp)
    sp.add_argument("--user", required=True, help="the user's id as in --data (a string id such as alice, or an int)")
    sp.add_argument("--k", type=int, default=10, help="items to list")
    sp.add_argument("--temperature", type=_temperature, default=None, help=_TEMPERATURE_HELP)

    sp = add("batch-recall", cmd_batch_recall, "top-K for every user -> Parquet (and Redis)")
    data_ids_model(sp)
    precision_flag(sp)
    sp.add_argument("--out", required=True, help="output Parquet")
    sp.add_argument("--k", type=int, default=10, help="items per user")
    sp.add_argument("--batch-size", type=int, default=256, help="users per decoding batch")
    sp.add_argument("--temperature", type=_temperature, default=None, help=_TEMPERATURE_HELP)
    sp.add_argument("--redis", default=None, help="redis://host:port/db to load the lists into (atomic)")
    sp.add_argument("--redis-prefix", default="tiger:rec:", help="Redis key prefix: one list per user at PREFIX<user_id>")

    sp = add("serve", cmd_serve, "HTTP service: POST /recommend (dynamic micro-batching), POST/DELETE /items "
                                 "(hot items), GET /health, GET /metrics (README, 'Online serving')")
    if not issubclass(sp.formatter_class, argparse.ArgumentDefaultsHelpFormatter):
        sp.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    sp.add_argument("--ids", required=True, help="ID table Parquet from assign-ids")
    allow_other(sp)
    sp.add_argument("--model", required=True, help="retriever directory from `tiger-fast train`")
    sp.add_argument("--data", default=None, help="dataset SPEC: string item/user ids come from it (None: the "
                                                 "ID table's int ids)")
    ignore_unknown(sp)
    sp.add_argument("--rqvae", default=None, help="RQ-VAE directory; needed for POST /items (new items)")
    sp.add_argument("--embed-model", default=None, help="sentence-transformers model for items sent as text "
                                                        "(None: the packaged all-MiniLM-L6-v2)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sp.add_argument("--port", type=int, default=8000, help="port (0: any free one; printed at start)")
    sp.add_argument("--max-batch", type=int, default=32, help="requests decoded together (1: no batching)")
    sp.add_argument("--max-wait-ms", type=float, default=2.0, help="longest a request waits for a batch to fill")
    sp.add_argument("--max-queue", type=int, default=256, help="queued requests before 503 + Retry-After")
    sp.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for")
    sp.add_argument("--max-history", type=int, default=20, help="history items the encoder reads")
    sp.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda"], help="decoding backend")
    sp.add_argument("--precision", default="fp32", help="numeric mode (other than fp32 only where generate() "
                                                        "takes precision=)")
    sp.add_argument("--threads", type=int, default=None, help="torch intra-op threads (None: torch's default)")
    sp.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")
    sp.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn log level")
    sp.add_argument("--access-log", action="store_true", help="log every request")
    return p


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        rc = args.fn(args)
    except (CliError, ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
