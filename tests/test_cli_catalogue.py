"""A user's own catalogue through the CLI (issue 17): the README's "Your own catalogue" section run
as written on two generated tables, and each knob and error message it promises."""
import argparse
import contextlib
import io
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from tiger_fast.cli import DEFAULT_TEXT_FIELDS, build_parser, load_dataset_spec, main
from tiger_fast.data import ITEM_FIELDS
from tiger_fast.embed import DEFAULT_TEMPLATE, embed_texts, fields_template, item_text, template_id
from tiger_fast.ids import IdTable
from tiger_fast.layout import TokenLayout

README = Path(__file__).resolve().parent.parent / "README.md"
SPEC = "tables:items.jsonl:interactions.csv"

# Appended to the README's lines: argparse keeps the last value, so these shrink the run to seconds.
TINY = {
    "embed": ["--quiet"],
    "train-rqvae": ["--epochs", "30", "--quiet"],
    "assign-ids": ["--quiet"],
    "train": ["--steps", "4", "--layers", "1", "--batch-size", "16", "--warmup", "1", "--eval-every", "4",
              "--eval-users", "10", "--quiet"],
    "evaluate": ["--max-users", "20", "--quiet"],
    "recommend": ["--k", "5"],
}

# 4 departments x 3 leaves x 4 items; each user stays in one department.
TAXONOMY = {"Kitchen": {"Coffee Makers": "espresso brewing beans", "Knives": "sharp chef blade",
                        "Bakeware": "oven baking cake"},
            "Garden": {"Seeds": "vegetable herb sprouting", "Garden Hoses": "watering nozzle hose",
                       "Planters": "soil flower pot"},
            "Music": {"Guitars": "acoustic strings chords", "Drums": "percussion snare rhythm",
                      "Microphones": "vocals recording studio"},
            "Office": {"Pens": "ink ballpoint writing", "Notebooks": "ruled paper journal",
                       "Desk Lamps": "LED desk lighting"}}


def readme_section() -> str:
    text = README.read_text()
    start = text.index("## Your own catalogue")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def readme_blocks():
    """The fenced blocks of the section, in order: (language, body)."""
    return re.findall(r"```(\w*)\n(.*?)```", readme_section(), flags=re.S)


def readme_commands():
    cmds = [shlex.split(ln) for lang, body in readme_blocks() if lang == "bash" for ln in body.splitlines()
            if ln.startswith("tiger-fast ")]
    return [c[1:] for c in cmds]


def catalogue(int_ids=False, extra_columns=False):
    """(items rows, interaction rows) of a 48-item, 60-user catalogue; user 3 is 'alice'.

    int_ids: item ids = row index and user ids = first-appearance rank, i.e. the numbers the
    string-id version is given internally (README), so both versions share one ID table and model.
    """
    rng = np.random.default_rng(0)
    items = []
    for dep, leaves in TAXONOMY.items():
        for leaf, words in leaves.items():
            for j in range(4):
                n = len(items)
                it = {"item_id": n if int_ids else f"sku-{n:03d}",
                      "title": f"{words.split()[j % 3].title()} {leaf[:-1]} model {j}", "brand": f"{dep[:3]}co",
                      "categories": [dep, leaf], "price": round(5 + 3.5 * n, 2)}
                if extra_columns:
                    it["stock"] = n % 7
                items.append(it)
    rows = []
    for u in range(60):
        user = u if int_ids else ("alice" if u == 3 else f"user-{u:02d}")
        seq = rng.choice(np.arange(12) + 12 * (u % 4), size=5 + u % 3, replace=False)
        for t, i in enumerate(seq):
            rows.append((user, items[i]["item_id"], f"2024-01-{1 + t:02d}") + ((1 + t % 5,) if extra_columns else ()))
    return items, rows


def write_tables(directory, items, rows, items_name="items.jsonl", inter_name="interactions.csv"):
    d = Path(directory)
    with open(d / items_name, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    header = "user_id,item_id,timestamp" + (",rating" if rows and len(rows[0]) == 4 else "")
    with open(d / inter_name, "w") as f:
        f.write(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return f"tables:{d / items_name}:{d / inter_name}"


def run(argv):
    """main(argv) in process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The README's command lines, run as written (plus TINY) in a directory holding the two tables."""
    d = tmp_path_factory.mktemp("catalogue")
    write_tables(d, *catalogue())
    outputs = {}
    cwd = os.getcwd()
    os.chdir(d)
    try:
        for argv in readme_commands():
            rc, out, err = run(argv + TINY.get(argv[0], []))
            assert rc == 0, (argv, err)
            outputs[argv[0]] = out
    finally:
        os.chdir(cwd)
    return d, outputs


# ---- the README section ------------------------------------------------------------------------
def test_readme_runs_the_whole_pipeline_on_an_own_catalogue(pipeline):
    d, out = pipeline
    assert [c[0] for c in readme_commands()] == ["embed", "train-rqvae", "assign-ids", "id-report", "train",
                                                 "evaluate", "recommend"]
    assert np.load(d / "emb.npy").shape == (48, 384)
    rep = json.loads(out["id-report"])
    assert rep["num_items"] == 48 and rep["level_sizes"] == [64, 64, 64, 256]
    assert rep["num_categories"] == 12 and "share_prefix" in rep  # the leaf check ran on the tables
    ev = json.loads(out["evaluate"])
    assert ev["tiger"]["num_examples"] == 20 and "entropy@10" in ev["tiger"] and "popularity" in ev
    lines = out["recommend"].splitlines()
    assert lines[0].startswith("user alice, last items: ")
    assert "beam search, best first" in lines[1]
    recs = [re.match(r"\s*(\d+)\. item (\S+) ", ln) for ln in lines[2:]]
    assert [int(m.group(1)) for m in recs] == [1, 2, 3, 4, 5]
    keys = {f"sku-{n:03d}" for n in range(48)}
    assert all(m.group(2) in keys for m in recs) and len({m.group(2) for m in recs}) == 5
    scores = [float(re.search(r"log-prob (-?[\d.]+)", ln).group(1)) for ln in lines[2:]]
    assert scores == sorted(scores, reverse=True)  # a ranking, best first


def test_readme_example_tables_read_as_documented(tmp_path):
    blocks = readme_blocks()
    items = next(body for lang, body in blocks if lang == "json")
    inter = next(body for lang, body in blocks if body.startswith("user_id,"))
    (tmp_path / "items.jsonl").write_text(items)
    (tmp_path / "interactions.csv").write_text(inter)
    ds = load_dataset_spec(f"tables:{tmp_path / 'items.jsonl'}:{tmp_path / 'interactions.csv'}")
    assert ds.item_keys == ["B001", "B002"]
    assert ds.leaf_categories() == ["Stovetop", "Grinders"]
    assert ds.items[0]["price"] == 34.9 and "brand" not in ds.items[1]
    assert ds.user_keys == ["alice", "bob"]
    assert [s.tolist() for s in ds.sequences] == [[0, 1], [1]]
    # as the README says, the default text reads "Title: ...; Brand: ...; Categories: a > b > c"
    assert item_text(ds.items[0]).startswith("Title: Moka pot, 6 cups; Brand: Bialetti; "
                                             "Categories: Kitchen > Coffee > Stovetop")


@pytest.mark.parametrize("cats, leaf", [(["Action", "Comedy"], "Comedy"), ("Action|Comedy", "Action|Comedy"),
                                        ("Drama", "Drama"), ("Comedy,Action", "Action"),
                                        ("Kitchen > Coffee > Grinders", "Grinders")])
def test_multi_label_categories_are_one_path(tmp_path, cats, leaf):
    spec = write_tables(tmp_path, [{"item_id": 7, "title": "A film", "categories": cats}], [("u", 7, 1)])
    assert load_dataset_spec(spec).leaf_categories() == [leaf]


# ---- --ignore-unknown-columns ----------------------------------------------------------------
DATA_COMMANDS = {  # every command that takes --data, with the other arguments it needs
    "embed": ["--out", "emb.npy"],
    "id-report": ["--ids", "ids.parquet"],
    "train": ["--ids", "ids.parquet", "--out", "ret"],
    "evaluate": ["--ids", "ids.parquet", "--model", "ret"],
    "recommend": ["--ids", "ids.parquet", "--model", "ret", "--user", "alice"],
    "batch-recall": ["--ids", "ids.parquet", "--model", "ret", "--out", "recs.parquet"],
    "serve": ["--ids", "ids.parquet", "--model", "ret", "--port", "0"],  # refused before the port opens
}


def write_ids(path, n, layout=TokenLayout(codebook_sizes=(4, 4))):
    codes = np.stack([np.arange(n) % 4, (np.arange(n) // 4) % 4], axis=1)
    IdTable.from_rq_codes(layout, np.arange(n), codes).to_parquet(path)


@pytest.mark.parametrize("cmd", sorted(DATA_COMMANDS))
def test_unknown_columns_are_refused_naming_the_column_the_file_and_the_flag(tmp_path, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    write_tables(tmp_path, *catalogue(extra_columns=True))
    write_ids("ids.parquet", 48)
    rc, _, err = run([cmd, "--data", SPEC] + DATA_COMMANDS[cmd])
    assert rc == 2
    assert "'stock'" in err and "items.jsonl" in err and "--ignore-unknown-columns" in err
    assert "unknown_columns=" not in err and "load_tables" not in err
    assert build_parser().parse_args([cmd, "--data", SPEC, "--ignore-unknown-columns"]
                                     + DATA_COMMANDS[cmd]).ignore_unknown_columns


def test_ignore_unknown_columns_drops_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tables(tmp_path, *catalogue(extra_columns=True))
    write_ids("ids.parquet", 48)
    rc, out, err = run(["id-report", "--ids", "ids.parquet", "--data", SPEC, "--ignore-unknown-columns"])
    assert rc == 0, err
    assert json.loads(out)["num_categories"] == 12
    # the interactions' extra column alone is refused too, naming that file
    items, rows = catalogue(extra_columns=True)
    write_tables(tmp_path, [{k: v for k, v in it.items() if k != "stock"} for it in items], rows)
    rc, _, err = run(["id-report", "--ids", "ids.parquet", "--data", SPEC])
    assert rc == 2 and "'rating'" in err and "interactions.csv" in err and "--ignore-unknown-columns" in err
    rc, _, err = run(["id-report", "--ids", "ids.parquet", "--data", "synthetic:items=48", "--ignore-unknown-columns"])
    assert rc == 2 and "--ignore-unknown-columns applies to tables:" in err


# ---- embed --text-fields -------------------------------------------------------------------------
def test_text_fields_choose_what_is_embedded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items, rows = catalogue()
    items = items[:11]  # prime count: no batch lines up
    items[4].pop("brand")
    write_tables(tmp_path, items, [r for r in rows if int(r[1][4:]) < 11])
    rc, _, err = run(["embed", "--data", SPEC, "--out", "tb.npy", "--text-fields", "categories,title", "--quiet"])
    assert rc == 0, err
    want = embed_texts([f"Categories: {it['categories'][0]} > {it['categories'][1]}; Title: {it['title']}"
                        for it in items], progress=False)
    # same encoder, same texts, same batch composition: identical rows
    np.testing.assert_array_equal(np.load("tb.npy"), want)
    rc, _, err = run(["embed", "--data", SPEC, "--out", "all.npy", "--quiet"])
    assert rc == 0 and not np.array_equal(np.load("all.npy"), np.load("tb.npy"))
    rc, _, err = run(["embed", "--data", SPEC, "--out", "b.npy", "--text-fields", "brand", "--quiet"])
    assert rc == 0 and "1 of 11 items" in err and "empty text" in err
    for bad in ("title,colour", "title,title", ""):
        rc, _, err = run(["embed", "--data", SPEC, "--out", "x.npy", "--text-fields", bad])
        assert rc == 2 and "--text-fields" in err and not os.path.exists("x.npy")
    rc, _, err = run(["embed", "--data", SPEC, "--out", "x.npy", "--text-fields", "description"])
    assert rc == 2 and "no item" in err and not os.path.exists("x.npy")


def test_fields_template_is_the_default_templates_segments():
    assert DEFAULT_TEXT_FIELDS.split(",") == list(ITEM_FIELDS)
    full = fields_template(ITEM_FIELDS)
    assert template_id(full) == template_id(DEFAULT_TEMPLATE)  # same cache key as the default
    it = {"title": "T", "brand": "B", "categories": ["a", "b"], "price": 3.0, "description": "D"}
    assert item_text(it, full) == item_text(it)
    assert item_text(it, fields_template(["price", "title"])) == "Price: 3.00; Title: T"
    with pytest.raises(ValueError, match="distinct names among"):
        fields_template(["title", "rating"])


def test_precomputed_embedding_column_with_text_fields_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items = [{"item_id": i, "title": f"t{i}", "embedding": [float(i), 1.0, -2.0]} for i in range(5)]
    write_tables(tmp_path, items, [("u", i, i) for i in range(5)])
    rc, _, err = run(["embed", "--data", SPEC, "--out", "e.npy", "--quiet"])
    assert rc == 0 and "writing it as is" in err
    assert np.load("e.npy").tolist() == [[float(i), 1.0, -2.0] for i in range(5)]
    rc, _, err = run(["embed", "--data", SPEC, "--out", "e2.npy", "--text-fields", "title"])
    assert rc == 2 and "--text-fields" in err and "embedding column" in err


# ---- train-rqvae --codebook-sizes and its .npy input ---------------------------------------------
def test_codebook_sizes_reach_the_id_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    np.save("e.npy", rng.normal(size=(37, 16)).astype(np.float32))
    rc, _, err = run(["train-rqvae", "--embeddings", "e.npy", "--out", "rq", "--codebook-sizes", "5,3",
                      "--epochs", "2", "--quiet"])
    assert rc == 0, err
    rc, _, err = run(["assign-ids", "--rqvae", "rq", "--embeddings", "e.npy", "--out", "ids.parquet", "--quiet"])
    assert rc == 0, err
    t = IdTable.from_parquet("ids.parquet")
    assert t.layout.codebook_sizes == (5, 3) and len(t) == 37
    assert int(t.codes[:, 0].max()) < 5 and int(t.codes[:, 1].max()) < 3


@pytest.mark.parametrize("bad", ["64,0", "64,x", "", "-4"])
def test_bad_codebook_sizes_name_the_flag(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-rqvae", "--embeddings", "e.npy", "--out", "rq", f"--codebook-sizes={bad}"])
    assert e.value.code == 2 and "argument --codebook-sizes" in capsys.readouterr().err


def bad_npys(d):
    d = Path(d)
    good = np.random.default_rng(2).normal(size=(13, 8)).astype(np.float32)
    np.save(d / "good.npy", good)
    raw = (d / "good.npy").read_bytes()
    (d / "trunc.npy").write_bytes(raw[:len(raw) - 40])
    (d / "header_only.npy").write_bytes(raw[:50])
    np.save(d / "empty.npy", np.zeros((0, 8), np.float32))
    np.save(d / "ints.npy", np.zeros((13, 8), np.int64))
    np.save(d / "flat.npy", np.zeros(13, np.float32))
    nan = good.copy()
    nan[5, 3] = np.nan
    np.save(d / "nan.npy", nan)
    (d / "text.npy").write_text("item_id,embedding\n")
    return {"trunc": "truncated", "header_only": "not a .npy", "empty": "holds no embeddings",
            "ints": "2-D float", "flat": "2-D float", "nan": "NaN/Inf", "text": "not a .npy"}


def test_bad_npy_to_train_rqvae_names_the_file_and_flag(tmp_path):
    for name, what in bad_npys(tmp_path).items():
        path = str(tmp_path / f"{name}.npy")
        rc, _, err = run(["train-rqvae", "--embeddings", path, "--out", str(tmp_path / "rq"), "--quiet"])
        assert rc == 2 and err.startswith(f"error: --embeddings {path}") and what in err, (name, err)
        assert "mmap" not in err and err.count("\n") == 1
    assert not (tmp_path / "rq").exists()


def test_bad_npy_to_assign_ids_names_the_file_and_flag(tmp_path):
    bad_npys(tmp_path)
    rq = str(tmp_path / "rq")
    assert run(["train-rqvae", "--embeddings", str(tmp_path / "good.npy"), "--out", rq, "--codebook-sizes", "4,4",
                "--epochs", "1", "--quiet"])[0] == 0
    out = str(tmp_path / "ids.parquet")
    for name in ("trunc", "empty"):
        path = str(tmp_path / f"{name}.npy")
        rc, _, err = run(["assign-ids", "--rqvae", rq, "--embeddings", path, "--out", out, "--quiet"])
        assert rc == 2 and err.startswith(f"error: --embeddings {path}"), err
    np.save(tmp_path / "ids12.npy", np.arange(12))
    raw = (tmp_path / "ids12.npy").read_bytes()
    (tmp_path / "ids_trunc.npy").write_bytes(raw[:-8])
    for name, what in (("ids12", "13 rows"), ("ids_trunc", "truncated")):
        path = str(tmp_path / f"{name}.npy")
        rc, _, err = run(["assign-ids", "--rqvae", rq, "--embeddings", str(tmp_path / "good.npy"), "--item-ids", path,
                          "--out", out, "--quiet"])
        assert rc == 2 and err.startswith(f"error: --item-ids {path}") and what in err, err
    assert not os.path.exists(out)


# ---- recommend: the catalogue's own user ids, and what the order means ------------------------------
def rec_lines(out):
    return [ln for ln in out.splitlines() if re.match(r"\s*\d+\. item ", ln)]


def test_recommend_takes_string_user_ids_and_int_ids_alike(pipeline, tmp_path):
    d, _ = pipeline
    spec_str = f"tables:{d / 'items.jsonl'}:{d / 'interactions.csv'}"
    spec_int = write_tables(tmp_path, *catalogue(int_ids=True))
    common = ["--ids", str(d / "ids.parquet"), "--model", str(d / "retriever"), "--k", "6"]
    for user, rank in (("alice", 3), ("user-00", 0), ("user-59", 59)):
        rc, out_s, err = run(["recommend", "--data", spec_str, "--user", user] + common)
        assert rc == 0, err
        # other item ids = another catalogue by its fingerprint: refused unless asked for deliberately
        rc, _, err = run(["recommend", "--data", spec_int, "--user", str(rank)] + common)
        assert rc == 2 and "--allow-other-catalogue" in err and "--ids" in err
        rc, out_i, err = run(["recommend", "--data", spec_int, "--user", str(rank), "--allow-other-catalogue"] + common)
        assert rc == 0, err
        # the same catalogue under its internal numbers: the same IDs, scores and titles, keys aside
        s, i = rec_lines(out_s), rec_lines(out_i)
        assert len(s) == 6 and [re.sub(r"item sku-0*(\d)", r"item \1", ln) for ln in s] == i
    rc, _, err = run(["recommend", "--data", spec_str, "--user", "bob"] + common)
    assert rc == 2 and f"--user bob is not a user of --data {spec_str}" in err
    rc, _, err = run(["recommend", "--data", spec_int, "--user", "alice", "--allow-other-catalogue"] + common)
    assert rc == 2 and "integer ids" in err and "--user" in err


def test_recommend_with_temperature_says_it_is_in_sample_order(pipeline):
    d, _ = pipeline
    argv = ["recommend", "--data", f"tables:{d / 'items.jsonl'}:{d / 'interactions.csv'}", "--ids",
            str(d / "ids.parquet"), "--model", str(d / "retriever"), "--user", "alice", "--k", "8"]
    rc, out, err = run(argv + ["--temperature", "2,2,0.5,0.5", "--seed", "3"])
    assert rc == 0, err
    assert "sampled at --temperature 2.0,2.0,0.5,0.5" in out and "NOT a ranking" in out
    sampled = rec_lines(out)
    assert len(sampled) == 8 and len({ln.split()[2] for ln in sampled}) == 8  # distinct items
    rc, out2, _ = run(argv + ["--temperature", "2,2,0.5,0.5", "--seed", "3"])
    assert rec_lines(out2) == sampled  # seeded
    rc, _, err = run(argv + ["--temperature", "2,2"])
    assert rc == 2 and "--temperature" in err and "4 levels" in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv + ["--temperature", "0"])
    helptext = subparsers()["recommend"].format_help()
    assert "draw order (not a ranking)" in " ".join(helptext.split())


# ---- errors name the flag and the file, not the Python API -----------------------------------------
def test_an_id_table_of_another_catalogue_names_both_files(pipeline, tmp_path):
    d, _ = pipeline
    spec = f"tables:{d / 'items.jsonl'}:{d / 'interactions.csv'}"
    table = IdTable.from_parquet(d / "ids.parquet")
    half = str(tmp_path / "half.parquet")
    keep = table.item_ids < 24
    IdTable(table.layout, table.item_ids[keep], table.codes[keep]).to_parquet(half)
    model = str(d / "retriever")
    for argv in (["recommend", "--model", model, "--user", "alice"], ["evaluate", "--model", model],
                 ["train", "--out", str(tmp_path / "r")], ["id-report"],
                 ["batch-recall", "--model", model, "--out", str(tmp_path / "recs.parquet")]):
        rc, _, err = run(argv + ["--data", spec, "--ids", half, "--quiet"])
        assert rc == 2, argv
        assert f"--ids {half} has no semantic ID for 24 of the 48 items of --data {spec}" in err
        assert "e.g. item_id sku-024" in err
        assert "histories[" not in err and "add_items" not in err and "IdTable" not in err
    other = str(tmp_path / "other.parquet")
    write_ids(other, 48)  # every item, but another layout than the model's
    rc, _, err = run(["recommend", "--data", spec, "--ids", other, "--model", model, "--user", "alice"])
    assert rc == 2 and f"--model {model}" in err and f"--ids {other}" in err
    rc, _, err = run(["recommend", "--data", spec, "--ids", str(d / "ids.parquet"), "--model", model,
                      "--user", "alice", "--k", "49"])
    assert rc == 2 and "--k 49" in err and "48 items" in err
    rc, _, err = run(["recommend", "--data", spec, "--ids", str(d / "emb.npy"), "--model", model, "--user", "alice"])
    assert rc == 2 and f"--ids {d / 'emb.npy'}" in err


# ---- defaults in --help on every command -------------------------------------------------------------
def subparsers():
    p = build_parser()
    return p._subparsers._group_actions[0].choices  # argparse keeps no public handle on its subparsers


@pytest.mark.parametrize("cmd", sorted(subparsers()))
def test_every_option_shows_its_default_in_help(cmd):
    sp = subparsers()[cmd]
    text = " ".join(sp.format_help().split())
    options = [a for a in sp._actions if a.option_strings and a.dest != "help"]  # argparse: no public list
    for a in options:
        if a.required:
            assert a.help and a.default is argparse.SUPPRESS, a.option_strings  # no "(default: None)"
        else:
            assert f"(default: {a.default})" in text, a.option_strings
            # the formatter appends the default: a help text stating it in words would say it twice
            assert "(default" not in (a.help or "") or "%(default)" in a.help, (a.option_strings, a.help)


def test_top_level_help_keeps_its_layout(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "tables:ITEMS:INTERACTIONS" in out and "COMMAND" in out


# ---- train: flags, the final validation, a catalogue too small to validate ---------------------
def test_train_threads_model_size_and_the_final_validation_also_after_resume(pipeline, monkeypatch):
    import torch

    d, _ = pipeline
    monkeypatch.chdir(d)
    threads = torch.get_num_threads()
    base = ["train", "--data", SPEC, "--ids", "ids.parquet", "--out", "ret_flags", "--model-size", "small",
            "--threads", "1", "--batch-size", "8", "--warmup", "1", "--eval-every", "4", "--eval-users", "10"]
    try:
        rc, out, err = run(base + ["--steps", "6"])
        assert rc == 0, err
        assert torch.get_num_threads() == 1  # --threads reached torch
    finally:
        torch.set_num_threads(threads)
    with open(d / "ret_flags" / "model" / "config.json") as f:
        cfg = json.load(f)["t5_config"]
    assert (cfg["d_model"], cfg["num_encoder_layers"], cfg["d_ff"]) == (64, 2, 256)  # the "small" preset
    first = json.loads(out.splitlines()[0])
    assert first["final_step"] == 6
    kept = [ln for ln in out.splitlines() if ln.startswith("kept ")]
    assert len(kept) == 1  # which checkpoint was kept is always said
    assert (f"step {first['best_step']} of 6" in kept[0]) == (first["best_step"] != 6)
    # resumed with a longer run: validated at the end again, so steps 7-9 are never thrown away
    try:
        rc, out, err = run(base + ["--steps", "9"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err
    ck = sorted((d / "ret_flags" / "checkpoints").glob("*.json"))
    with open(ck[-1]) as f:
        evals = [e["step"] for e in json.load(f)["history"]["evals"]]
    assert evals[:2] == [4, 6] and evals[-1] == 9
    assert json.loads(out.splitlines()[0])["final_step"] == 9


def test_train_without_a_validation_split_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = readme_blocks()  # the README's own two-item example tables: no user has 3 interactions
    (tmp_path / "items.jsonl").write_text(next(body for lang, body in blocks if lang == "json"))
    (tmp_path / "interactions.csv").write_text(next(body for lang, body in blocks if body.startswith("user_id,")))
    write_ids("ids.parquet", 2)
    spec = "tables:items.jsonl:interactions.csv"
    rc, _, err = run(["train", "--data", spec, "--ids", "ids.parquet", "--out", "ret", "--time-budget", "1200"])
    assert rc == 2
    assert f"--data {spec}" in err and "--eval-users 0" in err and "split=" not in err
    assert not (tmp_path / "ret").exists()  # refused before any training
