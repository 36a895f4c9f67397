"""The out-of-core prepare (DuckDB, data/outofcore.py) writes exactly the in-memory prepare's dataset.

Inputs are read in small pieces (``block_size``) so every test crosses piece boundaries: a sequence,
a duplicate pair and equal timestamps that straddle two pieces still come out as one read would have.
"""
from __future__ import annotations

import gzip
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossrec_dist.commands import _auto_format
from crossrec_dist.data.outofcore import EngineSettings, _connect
from crossrec_dist.data.prepare import PrepareOptions, prepare
from crossrec_dist.data.readers import Columns
from crossrec_dist.data.synth import SynthOptions, write_synth
from crossrec_dist.errors import InputError

from conftest import run_cli

SMALL_PIECES = 1 << 16      # 64 KiB of input per piece: a few thousand rows


def _engines(tmp_path, inputs, opts: PrepareOptions, names=None, block=SMALL_PIECES):
    a, b = tmp_path / "memory", tmp_path / "duckdb"
    sa = prepare(inputs, a, opts, log=lambda *_: None, source_names=names, engine=EngineSettings("memory"))
    sb = prepare(inputs, b, opts, log=lambda *_: None, source_names=names,
                 engine=EngineSettings("duckdb", memory_limit="500MB", block_size=block, threads=2))
    assert sa == sb
    _same_dataset(a, b)
    return sa, a, b


def _same_dataset(a, b):
    for part in ("sequences", "items"):
        da, db = datasets.load_from_disk(str(a / part)), datasets.load_from_disk(str(b / part))
        assert da.features == db.features, part
        assert da.to_dict() == db.to_dict(), part
    for f in sorted((a / "arrays").iterdir()):
        x, y = np.load(f), np.load(b / "arrays" / f.name)
        assert x.dtype == y.dtype and np.array_equal(x, y), f.name
    assert json.loads((a / "stats.json").read_text()) == json.loads((b / "stats.json").read_text())
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    assert (ma.pop("engine"), mb.pop("engine")) == ("memory", "duckdb")
    mb.pop("parts")
    for m in (ma, mb):
        m.pop("seconds"), m.pop("rows_per_second")
    assert ma == mb


def _messy_log(rng, n=12_000):
    """user, item, time and domain columns with every row rule at work: padded ids, equal times,
    exact duplicates (some across piece boundaries), ISO-8601 and epoch times mixed, a skippable bad row."""
    users = [f" u{u}" if u % 7 == 0 else f"u{u}" for u in rng.integers(0, 400, n)]
    items = [f"i{i}" for i in rng.zipf(1.3, n) % 900]
    times = rng.integers(1_600_000_000, 1_600_050_000, n) // 100 * 100       # many equal times
    doms = [("a", "b", "c ")[d] for d in rng.integers(0, 3, n)]
    lines = []
    for k in range(n):
        t = str(int(times[k])) if k % 5 else f"2020-09-13T{(int(times[k]) // 3600) % 24:02d}:00:00Z"
        lines.append(f"{users[k]},{items[k]},{t},{doms[k]}")
        if k % 97 == 0:
            lines.append(lines[-1])                         # an exact duplicate right after
        if k % 1013 == 0 and k:
            lines.append(lines[k // 2])                     # an exact duplicate far from its first
    return lines


def test_every_input_rule_gives_the_same_dataset(tmp_path):
    rng = np.random.default_rng(0)
    lines = _messy_log(rng)
    lines.insert(5000, "u1,,1600000000,a")                 # an empty item id: a bad row (skipped)
    csv = tmp_path / "log.csv.gz"
    with gzip.open(csv, "wt", encoding="utf-8") as f:
        f.write("\ufeffuser_id,item_id,timestamp,region\n" + "\n".join(lines) + "\n")
    cols = Columns(domain="region")
    base = PrepareOptions(format="csv", columns=cols, on_bad_rows="skip")
    stats, _, _ = _engines(tmp_path / "plain", str(csv), base)
    assert stats["skipped_bad_rows"] == 1 and stats["input_rules"]["duplicate_rows"] > 100
    assert stats["input_rules"]["stripped_whitespace_ids"] > 0
    variants = {
        "kcore_domains_until": PrepareOptions(format="csv", columns=cols, on_bad_rows="skip", min_user_interactions=5,
                                              min_item_interactions=4, domains=["a", "c"], until=1_600_040_000),
        "temporal_keep": PrepareOptions(format="csv", columns=cols, on_bad_rows="skip", split="temporal",
                                        temporal_valid=0.7, temporal_test=0.85, duplicates="keep"),
        "vocab_from": PrepareOptions(format="csv", columns=cols, on_bad_rows="skip",
                                     vocab_from=["i3", "not-in-log", "i1", "i2"]),
    }
    for name, opts in variants.items():
        _engines(tmp_path / name, str(csv), opts)


def test_attribute_rules_and_several_sources_give_the_same_dataset(tmp_path):
    rng = np.random.default_rng(1)
    n = 8000
    zips = {f"u{u}": (f"{rng.integers(0, 99999):05d}" if u % 9 else "K1A 0B1") for u in range(300)}
    log = pa.table({"user_id": [f"u{u}" for u in rng.integers(0, 300, n)],
                    "item_id": rng.integers(0, 500, n), "timestamp": rng.integers(0, 10_000, n)})
    pq.write_table(log, tmp_path / "a.parquet", row_group_size=1000)
    (tmp_path / "users.csv").write_text("user_id,zip\n" + "\n".join(f"{u},{z}" for u, z in zips.items()) + "\n")
    opts = PrepareOptions(format="parquet", domain_from="user.zip:prefix1", user_attrs=str(tmp_path / "users.csv"))
    stats, _, _ = _engines(tmp_path / "zip", str(tmp_path / "a.parquet"), opts)
    assert "other" in stats["domains"]
    # Two sources (Parquet + JSON lines), items joined on the raw id, users kept apart.
    with open(tmp_path / "b.jsonl", "w") as f:
        for u, i, t in zip(rng.integers(0, 200, n), rng.integers(250, 700, n), rng.integers(0, 10_000, n)):
            f.write(json.dumps({"user_id": f"u{u}", "item_id": int(i), "timestamp": int(t)}) + "\n")
    opts = PrepareOptions(format=["parquet", "jsonl"], domain_from="source")
    stats, _, _ = _engines(tmp_path / "two", [str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")], opts,
                           names=["web", "app"])
    assert stats["sources"]["web"]["shared_items"] > 0 and set(stats["domains"]) == {"web", "app"}


def test_recbole_and_movielens_folders_give_the_same_dataset(tmp_path, ml100k_raw):
    fmt = _auto_format(str(ml100k_raw))         # what `data fetch` gave: MovieLens files or RecBole atomic files
    _engines(tmp_path / "ml", str(ml100k_raw), PrepareOptions(format=fmt, domain_from="user.zip_code:prefix1"),
             block=1 << 18)


def test_synthetic_log_at_a_million_rows(tmp_path):
    """1e6 rows (the issue's smaller equality size; 1e7 is in benchmarks/prepare_scale.py)."""
    write_synth(tmp_path / "raw", SynthOptions(users=20_000, items=5000, mean_length=50, seed=3), log=lambda *_: None)
    stats, _, b = _engines(tmp_path, str(tmp_path / "raw" / "interactions.parquet"),
                           PrepareOptions(format="parquet", domain_from="column:domain",
                                          columns=Columns(domain="domain")), block=4 << 20)
    assert stats["interactions"] > 900_000
    assert json.loads((b / "meta.json").read_text())["rows_per_second"] > 0


def _multi_file_input(tmp_path, bad_line: int):
    lines = [f"u{k % 50},i{k % 70},{1000 + k}" for k in range(20_000)]
    first = tmp_path / "jan.csv"
    first.write_text("user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    lines[bad_line - 2] = f"u1,i1,not-a-time-{bad_line}"        # file line = list index + 2 (header)
    second = tmp_path / "feb.csv"
    second.write_text("user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    return [str(first), str(second)]


def test_a_bad_row_deep_in_the_second_file_is_named_by_file_and_line(tmp_path, capsys):
    inputs = _multi_file_input(tmp_path, bad_line=15_321)
    opts = PrepareOptions(format="csv", domain_from="source")
    with pytest.raises(InputError) as e:
        prepare(inputs, tmp_path / "out", opts, log=lambda *_: None,
                engine=EngineSettings("duckdb", block_size=SMALL_PIECES))
    assert e.value.path.endswith("feb.csv") and e.value.line == 15_321 and "not-a-time-15321" in str(e.value)
    assert not (tmp_path / "out").exists()
    # The CLI: exit 2 and file:line, no traceback; no work files are left beside --out.
    r = run_cli("prepare", "--input", inputs[0], "--input", inputs[1], "--format", "csv", "--domain-from", "source",
                "--out", str(tmp_path / "out"), "--engine", "duckdb", "--block-size", str(SMALL_PIECES), check=False)
    assert r.returncode == 2 and "feb.csv:15321" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feb.csv", "jan.csv"]


def test_duplicate_error_names_both_lines_across_pieces(tmp_path):
    lines = [f"u{k % 50},i{k},{1000 + k}" for k in range(20_000)]
    lines.append(lines[300])                                  # line 20002 repeats line 302
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    for engine in ("memory", "duckdb"):
        with pytest.raises(InputError) as e:
            prepare(str(path), tmp_path / engine, PrepareOptions(format="csv", duplicates="error"),
                    log=lambda *_: None, engine=EngineSettings(engine, block_size=SMALL_PIECES))
        assert e.value.line == 20_002 and f"{path}:302" in str(e.value), engine


def test_cli_engine_auto_and_a_second_run(tmp_path):
    """``--engine duckdb`` from the command line; the second run of the same command is refused as
    before (the dataset exists), and ``--force`` replaces it with the same bytes of data."""
    write_synth(tmp_path / "raw", SynthOptions(users=500, items=300, seed=0), log=lambda *_: None)
    args = ("prepare", "--input", str(tmp_path / "raw" / "interactions.parquet"), "--format", "parquet",
            "--domain-col", "domain", "--out", str(tmp_path / "d"), "--engine", "duckdb", "--memory-limit", "400MB")
    r = run_cli(*args)
    assert "rows/s" in r.stdout
    assert run_cli(*args, check=False).returncode == 2
    before = np.load(tmp_path / "d" / "arrays" / "items.npy")
    run_cli(*args, "--force")
    assert np.array_equal(before, np.load(tmp_path / "d" / "arrays" / "items.npy"))
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["engine"] == "duckdb"
    r = run_cli(*args[:-4], "--out", str(tmp_path / "e"), "--memory-limit", "lots", "--engine", "duckdb", check=False)
    assert r.returncode == 2 and "--memory-limit" in r.stderr


def test_steps_in_parts_give_the_one_process_dataset(tmp_path):
    """plan, then the parts in any order (as a job array runs them), then finish: the dataset of a
    one-process prepare, whatever the number of parts. Each step refuses what does not fit the plan."""
    rng = np.random.default_rng(2)
    lines = _messy_log(rng, n=6000)
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp,region\n" + "\n".join(lines) + "\n")
    opts = PrepareOptions(format="csv", columns=Columns(domain="region"), min_item_interactions=2)
    prepare(str(csv), tmp_path / "memory", opts, log=lambda *_: None, engine=EngineSettings("memory"))
    work = tmp_path / "plan"

    def step(name, part=None, parts=3, out="stepped", options=opts):
        return prepare(str(csv), tmp_path / out, options, log=lambda *_: None,
                       engine=EngineSettings("duckdb", work_dir=str(work), step=name, parts=parts, part=part,
                                             block_size=SMALL_PIECES))
    step("plan")
    with pytest.raises(InputError, match="already holds a plan"):
        step("plan")
    with pytest.raises(InputError, match=r"part\(s\) \[0, 1, 2\] of 3 have not finished"):
        step("finish")
    with pytest.raises(InputError, match="other inputs or options"):
        step("part", part=0, options=PrepareOptions(format="csv", columns=Columns(domain="region")))
    with pytest.raises(InputError, match="other inputs or options"):
        step("part", part=0, parts=2)
    with pytest.raises(InputError, match=r"0\.\.2, not 3"):
        step("part", part=3)
    for part in (2, 0, 1):
        step("part", part=part)
    step("finish")
    assert not work.exists()
    _same_parts(tmp_path / "memory", tmp_path / "stepped")
    # The same in one process with 4 parts, and with 1.
    for parts in (4, 1):
        prepare(str(csv), tmp_path / f"all{parts}", opts, log=lambda *_: None,
                engine=EngineSettings("duckdb", parts=parts, block_size=SMALL_PIECES))
        _same_parts(tmp_path / "memory", tmp_path / f"all{parts}")


def _same_parts(a, b):
    meta = json.loads((b / "meta.json").read_text())
    assert meta["engine"] == "duckdb" and meta["parts"] >= 1
    _same_dataset(a, b)


def test_step_options_are_checked_before_any_work(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\nu1,i1,1\n")
    for settings, field in ((EngineSettings(step="part"), "--work-dir"),
                            (EngineSettings(step="part", work_dir=str(tmp_path / "w")), "--part"),
                            (EngineSettings(step="plan", engine="memory", work_dir=str(tmp_path / "w")), "--step"),
                            (EngineSettings(engine="memory", parts=2), "--parts")):
        with pytest.raises(InputError) as e:
            prepare(str(csv), tmp_path / "out", PrepareOptions(format="csv"), log=lambda *_: None, engine=settings)
        assert e.value.field == field
    with pytest.raises(InputError, match="holds no plan"):
        prepare(str(csv), tmp_path / "out", PrepareOptions(format="csv"), log=lambda *_: None,
                engine=EngineSettings(step="finish", work_dir=str(tmp_path / "none")))
    assert not (tmp_path / "out").exists()


def test_duckdb_runs_under_its_limit_with_a_temp_directory_and_no_insertion_order(tmp_path):
    """PITFALLS 17: DuckDB holds far more than expected unless memory_limit, temp_directory and
    preserve_insertion_order=false are set; every connection of the out-of-core prepare sets them."""
    con = _connect(tmp_path, EngineSettings("duckdb", memory_limit="300MB", threads=1))
    try:
        limit, temp, order, threads = con.sql(
            "SELECT current_setting('memory_limit'), current_setting('temp_directory'), "
            "current_setting('preserve_insertion_order'), current_setting('threads')").fetchall()[0]
    finally:
        con.close()
    assert limit.replace(" ", "").upper() in ("300.0MB", "286.1MIB") and temp == str(tmp_path / "duckdb-temp")
    assert order is False and threads == 1


def test_duckdb_out_of_memory_is_a_clear_error_naming_the_limit(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "\n".join(f"user-{k % 5000},item-{k},{k}" for k in range(60_000)) + "\n")
    with pytest.raises(InputError) as e:
        prepare(str(csv), tmp_path / "out", PrepareOptions(format="csv"), log=lambda *_: None,
                engine=EngineSettings("duckdb", memory_limit="2MB", threads=1))
    assert e.value.field == "--memory-limit" and "ran out of memory" in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [csv]


def test_a_parquet_input_is_read_without_keeping_the_pieces_already_read(tmp_path):
    """A pre-buffered Parquet reader keeps every row group it has read until it is closed
    (apache/arrow#39808): ~11 B per row, 10.4 GiB of a 1e9-row prepare. Arrow's allocations between
    pieces must stay those of a few pieces, not grow towards the file's size."""
    from crossrec_dist.data.readers import _stream_parquet
    rng = np.random.default_rng(0)
    path = tmp_path / "log.parquet"
    with pq.ParquetWriter(path, pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                                           ("timestamp", pa.int64())])) as w:
        for _ in range(60):   # 60 row groups of 20k random rows: ~29 MB that does not compress
            w.write_table(pa.table({c: rng.integers(0, 2**62, 20_000) for c in ("user_id", "item_id", "timestamp")}))
    held = []
    for piece in _stream_parquet(path, block_size=20_000 * 24):
        del piece
        held.append(pa.total_allocated_bytes())
    assert len(held) >= 50
    assert max(held) < path.stat().st_size / 4, (max(held), path.stat().st_size)


def test_a_full_disk_is_a_clear_error_naming_the_work_folder(tmp_path, monkeypatch):
    """At 1e9 rows the part step's write ran out of disk and numpy said only "... requested and ...
    written": the free space decides that it was the disk, and the user gets --work-dir, not a traceback.
    Any other OSError with the disk not full still propagates."""
    import shutil
    from collections import namedtuple

    from crossrec_dist.data import outofcore
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "\n".join(f"u{k % 50},i{k % 70},{k}" for k in range(2_000)) + "\n")
    usage = namedtuple("usage", "total used free")

    def fails(*_a, **_k):
        raise OSError("122880 requested and 98304 written")
    monkeypatch.setattr(outofcore, "run_part", fails)
    settings = EngineSettings("duckdb", memory_limit="500MB", threads=1)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10 << 30, 10 << 30, 200 << 20))
    with pytest.raises(InputError) as e:
        prepare(str(csv), tmp_path / "out", PrepareOptions(format="csv"), log=lambda *_: None, engine=settings)
    assert e.value.field == "--work-dir" and "disk is full" in str(e.value) and "0.2 GiB free" in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [csv]
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10 << 30, 0, 10 << 30))
    with pytest.raises(OSError, match="requested"):
        prepare(str(csv), tmp_path / "out", PrepareOptions(format="csv"), log=lambda *_: None, engine=settings)
