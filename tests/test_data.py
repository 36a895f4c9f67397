"""Fetch, ingestion, splits and bad input, on real ML-100K and on small hand-made logs."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from crossrec_dist.data.prepared import PreparedData


def test_ml100k_stats_and_regions(ml100k):
    stats = json.loads((ml100k / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    doms = stats["domains"]
    assert sum(d["users"] for d in doms.values()) == 943
    assert sum(d["interactions"] for d in doms.values()) == 100000
    assert "other" in doms  # non-numeric (Canadian) zip codes go to the named bucket
    assert set(doms) - {"other"} == set("0123456789")


def test_ml100k_leave_one_out(ml100k):
    data = PreparedData(ml100k)
    assert (data.valid_end - data.train_end == 1).all()
    assert (data.lengths - data.valid_end == 1).all()
    for split in ("valid", "test"):
        ev = data.eval_set(split)
        assert len(ev.targets) == 943 and len(np.unique(ev.seq_index)) == 943


def test_second_fetch_is_instant_and_verified(ml100k_raw, tmp_path):
    proc = run_cli("data", "fetch", "movielens-100k", "--out", ml100k_raw)
    assert "already in" in proc.stdout
    manifest = json.loads((ml100k_raw / "fetch.json").read_text())
    assert manifest["format"] in ("recbole", "movielens") and len(manifest["files"]) == 3
    # A corrupted file is noticed: the folder no longer counts as fetched.
    victim = ml100k_raw / "ml-100k.user" if (ml100k_raw / "ml-100k.user").exists() else ml100k_raw / "u.user"
    copy = tmp_path / "copy"
    run_cli("data", "fetch", "movielens-100k", "--out", copy, "--from", ml100k_raw)
    (copy / victim.name).write_text("garbage")
    proc = run_cli("data", "fetch", "movielens-100k", "--out", copy)
    assert "already in" not in proc.stdout and (copy / victim.name).read_text() != "garbage"


def _write_csv(path, rows, header="user_id,item_id,timestamp"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_equal_timestamps_keep_file_order_and_string_ids(tmp_path):
    rows = ["alice,b,5", "alice,a,5", "alice,c,5", "bob,x,1", "alice,z,1", "bob,a,2", "bob,c,2"]
    csv = _write_csv(tmp_path / "log.csv", rows)
    run_cli("prepare", "--input", csv, "--format", "csv", "--out", tmp_path / "p")
    data = PreparedData(tmp_path / "p")
    vocab = [r for r in __import__("datasets").load_from_disk(str(tmp_path / "p" / "items"))["item_id"]]
    seqs = {data.user_ids[i].as_py(): [vocab[j - 1] for j in data.history(i, data.lengths[i])]
            for i in range(data.num_sequences)}
    assert seqs == {"alice": ["z", "b", "a", "c"], "bob": ["x", "a", "c"]}
    # Running twice gives identical data (deterministic order).
    run_cli("prepare", "--input", csv, "--format", "csv", "--out", tmp_path / "q")
    assert (PreparedData(tmp_path / "q").items == data.items).all()


@pytest.mark.parametrize("fmt", ["tsv", "parquet", "jsonl"])
def test_generic_formats_with_column_mapping(tmp_path, fmt):
    table = pa.table({"u": [1, 1, 1, 2, 2, 2], "i": [10, 11, 12, 10, 12, 13], "t": [1, 2, 3, 1, 2, 3],
                      "market": ["de", "de", "de", "fr", "fr", "fr"]})
    path = tmp_path / f"log.{fmt}"
    if fmt == "tsv":
        path.write_text("u\ti\tt\tmarket\n" + "\n".join("\t".join(str(table[c][r]) for c in table.column_names)
                                                        for r in range(6)) + "\n")
    elif fmt == "parquet":
        pq.write_table(table, path)
    else:
        path.write_text("\n".join(json.dumps({c: table[c][r].as_py() for c in table.column_names})
                                  for r in range(6)) + "\n")
    run_cli("prepare", "--input", path, "--format", fmt, "--out", tmp_path / "p", "--user-col", "u",
            "--item-col", "i", "--time-col", "t", "--domain-col", "market")
    stats = json.loads((tmp_path / "p" / "stats.json").read_text())
    assert stats["items"] == 4 and stats["interactions"] == 6
    both = {"users": 1, "interactions": 3, "items": 3, "shared_items": 2, "private_items": 1}   # 10, 12 shared
    assert stats["domains"] == {"de": both, "fr": both}


def test_movielens_raw_format_and_min_counts(tmp_path):
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t5\t{100 + k}\n" for k, (u, i) in enumerate(
        [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1), (3, 9)])))
    (tmp_path / "u.user").write_text("1|20|M|x|10001\n2|30|F|y|20002\n3|40|M|z|K1A0B\n")
    run_cli("prepare", "--input", tmp_path, "--format", "movielens", "--out", tmp_path / "p",
            "--domain-from", "user.zip_code:prefix1", "--min-item", "2", "--min-user", "3")
    stats = json.loads((tmp_path / "p" / "stats.json").read_text())
    # item 9 has one interaction -> dropped; then user 3 has one left -> dropped (iterated k-core)
    assert stats["users"] == 2 and stats["items"] == 3 and stats["filtered_out_interactions"] == 2
    assert set(stats["domains"]) == {"1", "2"}


def test_temporal_split(tmp_path):
    rows = [f"u{u},i{k},{k}" for u in range(3) for k in range(10)]
    csv = _write_csv(tmp_path / "log.csv", rows)
    run_cli("prepare", "--input", csv, "--format", "csv", "--out", tmp_path / "p", "--split", "temporal",
            "--temporal-valid", "7", "--temporal-test", "9")
    data = PreparedData(tmp_path / "p")
    assert data.train_end.tolist() == [7, 7, 7] and data.valid_end.tolist() == [9, 9, 9]
    assert len(data.eval_set("test").targets) == 3


def test_synthetic_domains_share_and_differ(synth_data):
    stats = json.loads((synth_data / "stats.json").read_text())
    assert set(stats["domains"]) == {"d0", "d1", "d2"}
    data = PreparedData(synth_data)
    # Private items: some items occur in exactly one domain, most occur in several.
    seq, _ = data.row_positions()
    dom_of_row = data.seq_domain[seq]
    per_item = [set(dom_of_row[data.items == i]) for i in range(1, data.num_items + 1)]
    n_dom = np.array([len(s) for s in per_item])
    assert (n_dom == 1).sum() > 0 and (n_dom >= 2).sum() > data.num_items / 2


# ---- bad input: exit code 2 and a message naming file, line and field ----

def test_missing_column(tmp_path):
    csv = _write_csv(tmp_path / "log.csv", ["1,2,3"], header="user,item_id,timestamp")
    proc = run_cli("prepare", "--input", csv, "--format", "csv", "--out", tmp_path / "p", check=False)
    assert proc.returncode == 2 and "log.csv" in proc.stderr and "'user_id'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_rows_error_then_skip(tmp_path):
    csv = _write_csv(tmp_path / "log.csv", ["1,2,3", "1,3", "1,4,5", "2,5,notatime", "2,6,7", "2,7,8"])
    proc = run_cli("prepare", "--input", csv, "--format", "csv", "--out", tmp_path / "p", check=False)
    assert proc.returncode == 2 and "log.csv:3" in proc.stderr, proc.stderr
    (tmp_path / "ok.csv").write_text("user_id,item_id,timestamp\n1,2,3\n1,4,5\n2,5,notatime\n2,6,7\n")
    proc = run_cli("prepare", "--input", tmp_path / "ok.csv", "--format", "csv", "--out", tmp_path / "p",
                   check=False)
    assert proc.returncode == 2 and "ok.csv:4" in proc.stderr and "'timestamp'" in proc.stderr, proc.stderr
    proc = run_cli("prepare", "--input", csv, "--format", "csv", "--out", tmp_path / "p", "--on-bad-rows", "skip")
    assert "skipped 2 bad row(s)" in proc.stdout
    assert json.loads((tmp_path / "p" / "stats.json").read_text())["interactions"] == 4


def test_unknown_format_and_missing_attribute(tmp_path, ml100k_raw):
    proc = run_cli("prepare", "--input", ml100k_raw, "--format", "xml", "--out", tmp_path / "p", check=False)
    assert proc.returncode == 2 and "--format" in proc.stderr
    proc = run_cli("prepare", "--input", ml100k_raw, "--format", "auto", "--out", tmp_path / "p",
                   "--domain-from", "user.country:prefix1", check=False)
    assert proc.returncode == 2 and "'country'" in proc.stderr and "user" in proc.stderr


def test_empty_domain_and_user_without_attributes(tmp_path):
    csv = _write_csv(tmp_path / "log.csv", ["1,2,3", "9,4,5"])
    (tmp_path / "users.csv").write_text("user_id,zip\n1,12345\n")
    proc = run_cli("prepare", "--input", csv, "--format", "csv", "--out", tmp_path / "p", "--user-attrs",
                   tmp_path / "users.csv", "--domain-from", "user.zip:prefix1", check=False)
    assert proc.returncode == 2 and "log.csv:3" in proc.stderr and "'9'" in proc.stderr, proc.stderr
    (tmp_path / "users.csv").write_text("user_id,zip\n1,12345\n9,23456\n")
    proc = run_cli("prepare", "--input", csv, "--format", "csv", "--out", tmp_path / "p", "--user-attrs",
                   tmp_path / "users.csv", "--domain-from", "user.zip:prefix1", "--domains", "1,7", check=False)
    assert proc.returncode == 2 and "['7']" in proc.stderr and "--domains" in proc.stderr


def test_popularity_baseline_cli(ml100k, tmp_path):
    run_cli("evaluate", "--model", "popularity", "--data", ml100k, "--out", tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["stage"] == "evaluate" and set(m["per_domain"]) >= {"0", "9", "other"}
    # Exact-count popularity on ML-100K (RecBole 1.2.1 reports test NDCG@10 0.0435, HR@10 0.0838)
    assert 0.035 < m["test"]["ndcg@10"] < 0.05 and 0.07 < m["test"]["hr@10"] < 0.10
    total = sum(d["users"] for d in m["per_domain"].values())
    assert total == 943


def test_several_validation_targets_per_user_never_overlap_training(tmp_path):
    """valid_targets=K: the last K items before the test item are validation targets, each predicted
    from its own prefix, and exactly those K - 1 extra items leave the training part."""
    from crossrec_dist.cli import main
    rows = "".join(f"u{u},i{u}_{k},{k}\n" for u in range(3) for k in range(10 + u))
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n" + rows)
    assert main(["prepare", "--input", str(tmp_path / "log.csv"), "--format", "csv", "--out", str(tmp_path / "p")]) == 0
    data = PreparedData(tmp_path / "p")
    one = data.eval_set("valid")
    three = data.eval_set("valid", targets_per_user=3)
    assert len(three.targets) == 3 * len(one.targets)
    for s, end in zip(one.seq_index, one.hist_end):          # end = train_end: the usual validation target
        mine = three.hist_end[three.seq_index == s]
        assert sorted(mine.tolist()) == [end - 2, end - 1, end]
        assert (three.targets[three.seq_index == s] == data.items[data.offsets[s] + mine]).all()
    seq, usable = data.train_sequences(holdout=2)
    for s, u in zip(seq, usable):
        # training predicts positions 1..usable-1: all before the first validation target
        assert u - 1 < three.hist_end[three.seq_index == s].min()
    test = data.eval_set("test")          # the test split is untouched by extra validation targets
    assert (test.targets == data.items[data.offsets[test.seq_index] + data.valid_end[test.seq_index]]).all()
    assert (test.hist_end == data.valid_end[test.seq_index]).all()
    with pytest.raises(ValueError):
        data.eval_set("test", targets_per_user=2)


def test_train_fraction_samples_users_nested_and_seeded(synth_data):
    """train_fraction: a seeded sample of the target's users trains and validates; a larger fraction at
    the same seed contains the smaller one, so a data-fraction curve compares like with like."""
    from crossrec_dist.stages.common import training_batches
    from crossrec_dist.stages.finetune import sample_users
    data = PreparedData(synth_data)
    domain = data.domain_names[0]
    everyone = np.flatnonzero(data.sequence_mask([domain]))
    assert sample_users(data, domain, 1.0, 0) is None
    small, large = sample_users(data, domain, 0.1, 3), sample_users(data, domain, 0.5, 3)
    assert len(small) == round(0.1 * len(everyone)) and set(small) <= set(large) <= set(everyone)
    assert (sample_users(data, domain, 0.1, 3) == small).all() and not (sample_users(data, domain, 0.1, 4) == small).all()
    batches = training_batches(data, [domain], 20, 8, 0, only=small)
    assert set(np.unique(batches.windows.seq)) == set(small)
    valid = data.eval_set("valid", [domain]).only(small)
    assert set(valid.seq_index) <= set(small) and len(valid.seq_index) > 0
    assert len(data.eval_set("test", [domain]).seq_index) > len(small)      # test users: all of them


# ---------------------------------------------------------------------------------------------------
# memory-mapped arrays (prepare writes arrays/; PreparedData maps them) vs the Arrow loader
def test_memory_mapped_dataset_is_shared_and_32_bit(synth_data):
    data = PreparedData(synth_data)
    assert data.memory_mapped
    assert isinstance(data.items, np.memmap) and data.items.dtype == np.int32, type(data.items)
    assert isinstance(data.offsets, np.memmap) and data.offsets.dtype == np.int64
    assert not data.items.flags.writeable, "the shared pages must be read-only"
    assert (synth_data / "arrays" / "items.npy").stat().st_size < 4 * len(data.items) + 200


def test_memory_mapped_dataset_gives_the_arrow_loaders_batches(synth_data):
    """The same windows, micro-batches (every rank of 2), evaluation sets, counts and catalogue as
    the loader that reads every column into memory from Arrow (folders prepared before arrays/)."""
    import torch

    from crossrec_dist.data.batches import SequenceBatches, make_windows
    from crossrec_dist.evaluation.evaluator import history_mask_index, left_padded
    mapped, arrow = PreparedData(synth_data), PreparedData(synth_data, memory_map=False)
    assert mapped.memory_mapped and not arrow.memory_mapped
    assert arrow.items.dtype == np.int64 and (np.asarray(mapped.items) == arrow.items).all()
    for name in ("offsets", "train_end", "valid_end", "seq_domain"):
        assert (np.asarray(getattr(mapped, name)) == getattr(arrow, name)).all(), name
    assert mapped.user_ids.to_pylist() == arrow.user_ids.to_pylist()
    for domains in (None, ["d1", "d2"]):
        wins = [make_windows(*d.train_sequences(domains, holdout=1), max_len=20) for d in (mapped, arrow)]
        assert (wins[0].seq == wins[1].seq).all() and (wins[0].end == wins[1].end).all()
        for rank in (0, 1):
            a = list(SequenceBatches(mapped, wins[0], 20, 16, seed=3).epoch(1, rank, 2))
            b = list(SequenceBatches(arrow, wins[1], 20, 16, seed=3).epoch(1, rank, 2))
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                assert x.weight == y.weight and x.samples == y.samples
                for key in y.inputs:
                    assert x.inputs[key].dtype == y.inputs[key].dtype == torch.int64, key
                    assert torch.equal(x.inputs[key], y.inputs[key]), key
        for split, k in (("valid", 3), ("test", 1)):
            ea, eb = mapped.eval_set(split, domains, k), arrow.eval_set(split, domains, k)
            for field in ("seq_index", "hist_end", "targets", "domains"):
                assert getattr(ea, field).dtype == getattr(eb, field).dtype, field
                assert (getattr(ea, field) == getattr(eb, field)).all(), field
            assert (left_padded(mapped, ea.seq_index, ea.hist_end, 20) == left_padded(arrow, eb.seq_index, eb.hist_end, 20)).all()
            ra, rb = history_mask_index(mapped, ea.seq_index, ea.hist_end), history_mask_index(arrow, eb.seq_index, eb.hist_end)
            assert all((u == v).all() and u.dtype == v.dtype for u, v in zip(ra, rb))
        assert (mapped.catalogue(domains) == arrow.catalogue(domains)).all()
        only = np.arange(0, arrow.num_sequences, 3)
        assert (mapped.item_counts(domains) == arrow.item_counts(domains)).all()
        assert (mapped.item_counts(domains, only=only) == arrow.item_counts(domains, only=only)).all()


def test_item_counts_and_catalogue_match_their_definition(synth_data):
    """The one-byte-per-interaction masks against the per-interaction positions they replace."""
    data = PreparedData(synth_data)
    seq, pos = data.row_positions()
    items = np.asarray(data.items)
    keep = data.sequence_mask(["d0"])[seq] & (pos < np.asarray(data.train_end)[seq])
    assert (data.item_counts(["d0"]) == np.bincount(items[keep], minlength=data.num_items + 1)).all()
    expected = np.zeros(data.num_items + 1, dtype=bool)
    expected[items[data.sequence_mask(["d1"])[seq]]] = True
    expected[0] = False
    assert (data.catalogue(["d1"]) == expected).all()


class _ReadRecorder:
    """Stands in for ``PreparedData.items``: records which stored interactions are read."""

    def __init__(self, items):
        self.items, self.read = items, np.zeros(len(items), dtype=bool)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        self.read[index] = True
        return self.items[index]


def test_a_rank_reads_only_the_rows_of_its_own_windows(synth_data):
    """Sharding by rank touches only that rank's rows: over an epoch, rank 0 of 2 reads exactly the
    interactions inside the windows it was given (and rank 1 those of its own)."""
    from crossrec_dist.data.batches import SequenceBatches, make_windows
    data = PreparedData(synth_data)
    wins = make_windows(*data.train_sequences(), max_len=10)
    mine = {}
    for rank in (0, 1):
        data.items = recorder = _ReadRecorder(np.asarray(PreparedData(synth_data).items))
        taken = np.concatenate([mb.sample_ids.numpy() for mb in SequenceBatches(data, wins, 10, 8, seed=0).epoch(0, rank, 2)])
        expected = np.zeros(len(recorder), dtype=bool)
        for w in taken:
            start = data.offsets[wins.seq[w]]
            expected[max(start, start + wins.end[w] - 11):start + wins.end[w]] = True
        assert (recorder.read == expected).all(), (rank, int(recorder.read.sum()), int(expected.sum()))
        mine[rank] = recorder.read
    # Windows of one sequence share their boundary item (a window's first input is the previous
    # one's last label), so two ranks may both read that one row, and no other.
    assert (mine[0] & mine[1]).sum() < 0.15 * mine[0].sum()
    assert 0.3 < mine[0].sum() / len(mine[0]) < 0.7


def test_synth_streams_chunks_that_are_reproducible(tmp_path, monkeypatch):
    """A log larger than one chunk is written one row group per chunk of users; the file equals the
    concatenated chunks, users are numbered across chunks, and the same seed gives the same log."""
    from crossrec_dist.data import synth
    opts = synth.SynthOptions(users=250, items=200, domains=2, mean_length=8, seed=4)
    monkeypatch.setattr(synth, "CHUNK_USERS", 100)
    whole = pa.concat_tables(list(synth.synthesize_chunks(opts, chunk_users=100)))
    path = synth.write_synth(tmp_path / "s", opts, log=lambda *_: None)
    written = pq.read_table(path)
    assert pq.ParquetFile(path).num_row_groups == 3
    assert written.equals(whole) and written.equals(pa.concat_tables(synth.synthesize_chunks(opts, 100)))
    assert np.unique(written["user_id"].to_numpy()).tolist() == list(range(250))
    assert not list((tmp_path / "s").glob("*.tmp"))
    first = pa.concat_tables(synth.synthesize_chunks(synth.SynthOptions(users=100, items=200, domains=2,
                                                                       mean_length=8, seed=4), 100))
    assert whole.slice(0, first.num_rows).equals(first), "chunk 0 is what a one-chunk log always was"


def test_item_counts_and_catalogue_read_the_log_in_pieces_and_match_a_plain_count(synth_data):
    """``item_counts`` and ``catalogue`` walk the log in bounded pieces (a whole-log mask and gather
    cost rank 0 ~2 GiB at 250M interactions): any piece size, one sequence per piece included, gives
    the counts of a plain per-sequence loop."""
    data = PreparedData(synth_data)
    items, offsets = np.asarray(data.items), np.asarray(data.offsets)
    domain = int(data.seq_domain[0])
    seqs = np.flatnonzero(np.asarray(data.seq_domain) == domain)
    expected = np.zeros(data.num_items + 1, dtype=np.int64)
    for s in seqs:
        np.add.at(expected, items[offsets[s]:offsets[s] + data.train_end[s]], 1)
    name = data.domain_names[domain]
    assert (data.item_counts([name]) == expected).all() and expected.sum() == data.train_end[seqs].sum() > 0
    for piece in (1, 37, 10**9):
        pieces = list(data._item_pieces(seqs, np.asarray(data.train_end), piece=piece))
        assert (np.bincount(np.concatenate(pieces), minlength=data.num_items + 1) == expected).all()
        assert {1: len(pieces) == len(seqs), 37: 1 < len(pieces) < len(seqs), 10**9: len(pieces) == 1}[piece]
    whole = np.zeros(data.num_items + 1, dtype=bool)
    for s in seqs:
        whole[items[offsets[s]:offsets[s + 1]]] = True
    whole[0] = False
    assert (data.catalogue([name]) == whole).all()
