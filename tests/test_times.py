"""Real-world timestamps (data/times.py): every form a log writes becomes one UTC order of epoch seconds.

Each expected value below is computed by hand from the calendar, not by the code under test.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossrec_dist.cli import main

NEW_YEAR_UTC = 1735689600          # 2025-01-01T00:00:00Z


def _prepare(tmp_path: Path, name: str, write, *extra: str) -> tuple[int, Path]:
    src = tmp_path / name
    write(src) if callable(write) else src.write_text(write)
    fmt = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}[src.suffix]
    out = tmp_path / "out"
    return main(["prepare", "--format", fmt, "--input", str(src), "--out", str(out), *extra]), out


def _times(out: Path) -> dict[str, list[float]]:
    seqs = datasets.load_from_disk(str(out / "sequences"))
    items = datasets.load_from_disk(str(out / "items"))["item_id"]
    return {u: [(items[i - 1], t) for i, t in zip(ids, ts)]
            for u, ids, ts in zip(seqs["user_id"], seqs["item_ids"], seqs["timestamps"])}


CSV = """user_id,item_id,timestamp
a,offset,2025-01-01T00:00:00+01:00
a,zulu,2025-01-01T00:30:00Z
a,naive,2025-01-01 00:45:00
a,epoch,1735689660
a,fraction,2025-01-01T01:00:00.250Z
a,date,2025-01-02
"""


def test_iso_offsets_z_naive_dates_and_epoch_numbers_are_one_utc_order(tmp_path):
    rc, out = _prepare(tmp_path, "in.csv", CSV)
    assert rc == 0
    assert _times(out)["a"] == [("offset", NEW_YEAR_UTC - 3600), ("epoch", NEW_YEAR_UTC + 60),
                                ("zulu", NEW_YEAR_UTC + 1800), ("naive", NEW_YEAR_UTC + 2700),
                                ("fraction", NEW_YEAR_UTC + 3600.25), ("date", NEW_YEAR_UTC + 86400)]


def test_naive_times_are_read_in_the_given_time_zone(tmp_path):
    text = ("user_id,item_id,timestamp\n"
            "a,winter,2025-01-01 00:00:00\n"          # CET, UTC+1
            "a,summer,2025-07-01 00:00:00\n"          # CEST, UTC+2
            "a,gap,2025-03-30 02:30:00\n"             # does not exist in Berlin: moved to 03:00 CEST
            "a,repeated,2025-10-26 02:30:00\n"        # happens twice: read as standard time (CET)
            "a,zoned,2025-01-01T00:00:00Z\n")         # an explicit zone is never reinterpreted
    rc, out = _prepare(tmp_path, "in.csv", text, "--timezone", "Europe/Berlin")
    assert rc == 0
    got = dict(_times(out)["a"])
    assert got["winter"] == NEW_YEAR_UTC - 3600
    assert got["summer"] == 1751328000 - 7200            # 2025-07-01T00:00:00Z is 1751328000
    assert got["gap"] == 1743296400                      # 2025-03-30T01:00:00Z
    assert got["repeated"] == 1761442200                 # 2025-10-26T01:30:00Z
    assert got["zoned"] == NEW_YEAR_UTC
    assert json.loads((out / "meta.json").read_text())["options"]["timezone"] == "Europe/Berlin"


def test_epoch_milliseconds_with_time_unit_and_a_warning_without(tmp_path, capsys):
    text = "user_id,item_id,timestamp\n" + "".join(f"a,i{k},{(NEW_YEAR_UTC + k) * 1000}\n" for k in range(3))
    rc, out = _prepare(tmp_path, "in.csv", text, "--time-unit", "ms")
    assert rc == 0 and [t for _, t in _times(out)["a"]] == [NEW_YEAR_UTC, NEW_YEAR_UTC + 1, NEW_YEAR_UTC + 2]
    rc, _ = _prepare(tmp_path, "in.csv", text, "--force")
    assert rc == 0 and "--time-unit ms" in capsys.readouterr().out


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("zone", [None, "UTC", "Asia/Tokyo"])
def test_parquet_timestamp_columns_of_any_unit_and_zone(tmp_path, unit, zone):
    per_s = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    raw = [NEW_YEAR_UTC * per_s, (NEW_YEAR_UTC + 90) * per_s]
    ts = pa.array(raw, pa.int64()).cast(pa.timestamp(unit, tz=zone))   # stored instants, UTC-based

    def write(path):
        pq.write_table(pa.table({"user_id": ["a", "a"], "item_id": ["x", "y"], "timestamp": ts}), path)
    rc, out = _prepare(tmp_path, "in.parquet", write)
    assert rc == 0 and [t for _, t in _times(out)["a"]] == [NEW_YEAR_UTC, NEW_YEAR_UTC + 90]


def test_parquet_naive_timestamps_and_dates_follow_the_time_zone(tmp_path):
    def write(path):
        pq.write_table(pa.table({
            "user_id": ["a", "a"], "item_id": ["x", "y"],
            "timestamp": pa.array([NEW_YEAR_UTC, NEW_YEAR_UTC + 86400], pa.timestamp("s"))}), path)
    rc, out = _prepare(tmp_path, "in.parquet", write, "--timezone", "America/New_York")
    assert rc == 0 and [t for _, t in _times(out)["a"]] == [NEW_YEAR_UTC + 5 * 3600, NEW_YEAR_UTC + 86400 + 5 * 3600]

    def write_dates(path):
        pq.write_table(pa.table({"user_id": ["a", "a"], "item_id": ["x", "y"],
                                 "timestamp": pa.array([20089, 20090], pa.date32())}), path)   # 2025-01-01, -02
    rc, out = _prepare(tmp_path, "d.parquet", write_dates, "--force")
    assert rc == 0 and [t for _, t in _times(out)["a"]] == [NEW_YEAR_UTC, NEW_YEAR_UTC + 86400]


def test_parquet_iso_strings_are_read_like_csv(tmp_path):
    def write(path):
        pq.write_table(pa.table({"user_id": ["a", "a"], "item_id": ["x", "y"],
                                 "timestamp": ["2025-01-01T01:00:00+01:00", "2025-01-01T00:00:01Z"]}), path)
    rc, out = _prepare(tmp_path, "in.parquet", write)
    assert rc == 0 and _times(out)["a"] == [("x", NEW_YEAR_UTC), ("y", NEW_YEAR_UTC + 1)]


def test_an_unreadable_time_is_named_by_file_line_and_value(tmp_path, capsys):
    text = CSV + "a,slashes,01/02/2025\n"
    rc, out = _prepare(tmp_path, "in.csv", text)
    err = capsys.readouterr().err
    assert rc == 2 and "in.csv:8" in err and "'01/02/2025'" in err and "field 'timestamp'" in err
    assert "--on-bad-rows skip" in err and not out.exists()


def test_no_hint_that_would_drop_every_row_and_no_empty_output(tmp_path, capsys):
    text = "user_id,item_id,when\n" + "".join(f"a,i{k},31.12.2024 10:0{k}\n" for k in range(3))
    rc, out = _prepare(tmp_path, "in.csv", text, "--time-col", "when")
    err = capsys.readouterr().err
    assert rc == 2 and "in.csv:2" in err and "would drop every row" in err
    assert "use --on-bad-rows skip" not in err
    assert not out.exists()
    rc, out = _prepare(tmp_path, "in.csv", text, "--time-col", "when", "--on-bad-rows", "skip")
    assert rc == 2 and "would drop every row" in capsys.readouterr().err and not out.exists()


def test_until_and_temporal_cuts_take_iso_times(tmp_path):
    text = "user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{k},2025-01-0{k + 1}T12:00:00Z\n" for u in range(4) for k in range(5))
    rc, out = _prepare(tmp_path, "in.csv", text, "--until", "2025-01-04")
    assert rc == 0 and all(len(v) == 3 for v in _times(out).values())
    rc, out = _prepare(tmp_path, "in.csv", text, "--force", "--split", "temporal",
                       "--temporal-valid", "2025-01-03", "--temporal-test", "2025-01-04T00:00:00+00:00")
    meta = json.loads((out / "meta.json").read_text())
    assert rc == 0 and meta["valid_time"] == NEW_YEAR_UTC + 2 * 86400
    assert meta["test_time"] == NEW_YEAR_UTC + 3 * 86400


@pytest.mark.parametrize("flag,value,field", [("--timezone", "Mars/Olympus", "--timezone"),
                                              ("--until", "next tuesday", "--until")])
def test_bad_time_options_are_refused_by_name(tmp_path, capsys, flag, value, field):
    rc, out = _prepare(tmp_path, "in.csv", CSV, flag, value)
    err = capsys.readouterr().err
    assert rc == 2 and field in err and value in err
    assert not out.exists()
