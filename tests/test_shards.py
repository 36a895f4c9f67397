"""Sharded datasets (``prepare --shards N``): the item ids as N user-hash shards, read so that a rank
touches only its own shards' rows.

One small synthetic log is prepared three ways (unsharded; 3 shards in memory; 3 shards out of core);
the sharded folders must hold the same data, the loader must give exactly the unsharded windows, each
rank only its shards' ones, and a 2-process ZeRO-3 run must train and validate on a sharded folder.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_TRAIN, accelerate_launch
from crossrec_dist.data.batches import SequenceBatches, make_windows, window_tensors
from crossrec_dist.data.outofcore import EngineSettings
from crossrec_dist.data.prepare import PrepareOptions, prepare
from crossrec_dist.data.prepared import PreparedData, ShardedItems
from crossrec_dist.data.readers import Columns
from crossrec_dist.data.synth import SynthOptions, write_synth
from crossrec_dist.errors import InputError

SHARDS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synth(root / "raw", SynthOptions(users=600, items=300, domains=3, mean_length=20, seed=1), log=lambda *_: None)
    raw = str(root / "raw" / "interactions.parquet")
    base = dict(format="parquet", columns=Columns(domain="domain"))
    quiet = dict(log=lambda *_: None)
    prepare(raw, root / "plain", PrepareOptions(**base), engine=EngineSettings("memory"), **quiet)
    prepare(raw, root / "memory", PrepareOptions(**base, shards=SHARDS), engine=EngineSettings("memory"), **quiet)
    prepare(raw, root / "duckdb", PrepareOptions(**base, shards=SHARDS), engine=EngineSettings("duckdb"), **quiet)
    return root


def test_sharded_folders_hold_the_same_data(folders):
    plain = PreparedData(folders / "plain")
    for name in ("memory", "duckdb"):
        data = PreparedData(folders / name)
        assert data.shards == SHARDS and isinstance(data.items, ShardedItems)
        assert not (folders / name / "arrays" / "items.npy").exists()       # no file of every row
        files = sorted((folders / name / "arrays" / "shards").iterdir())
        assert [f.name for f in files] == [f"shard-{k:05d}-of-{SHARDS:05d}.npy" for k in range(SHARDS)]
        # Every row once, in a shard of its user; the shards together are the unsharded items.
        assert sum(len(np.load(f)) for f in files) == len(plain.items)
        assert np.array_equal(np.asarray(data.items), np.asarray(plain.items))
        users = plain.user_ids.to_pylist()
        by_user = {}
        for seq, shard in enumerate(data.seq_shard):
            assert by_user.setdefault(users[seq], shard) == shard              # a user's sequences share a shard
        assert len(set(by_user.values())) == SHARDS
        for field in ("offsets", "train_end", "valid_end", "seq_domain"):
            assert np.array_equal(getattr(data, field), getattr(plain, field)), field
        stats = [json.loads((folders / n / "stats.json").read_text()) for n in ("plain", name)]
        assert stats[0] == stats[1]
        # Slices within a sequence, single positions, masks: as items.npy answers them.
        s = int(np.argmax(plain.lengths))
        assert np.array_equal(data.history(s, 7), plain.history(s, 7))
        assert data.items[int(plain.offsets[s]) + 3] == plain.items[int(plain.offsets[s]) + 3]
        assert np.array_equal(data.item_counts(), plain.item_counts())
    for a, b in zip(sorted((folders / "memory" / "arrays").rglob("*.npy")), sorted((folders / "duckdb" / "arrays").rglob("*.npy"))):
        assert a.name == b.name and np.array_equal(np.load(a), np.load(b)), a.name


def test_the_sharded_loader_gives_exactly_the_unsharded_windows_and_each_rank_only_its_shards(folders):
    plain = PreparedData(folders / "plain")
    seq, usable = plain.train_sequences()
    windows = make_windows(seq, usable, 20)
    world, micro = 2, 8
    drawn = []
    for rank in range(world):
        data = PreparedData(folders / "duckdb")                    # a fresh process's view: nothing opened
        batches = SequenceBatches(data, windows, 20, micro, seed=0)
        for mb in batches.epoch(0, rank, world):
            ids = mb.sample_ids.numpy()
            expect = window_tensors(plain, windows.seq[ids], windows.end[ids], 20)
            for key in ("input_ids", "labels", "domain_ids"):
                assert mb.inputs[key].equal(expect[key]), key
            assert set(data.seq_shard[windows.seq[ids]] % world) == {rank}
            drawn.append(ids)
        assert set(data.items.opened) == {k for k in range(SHARDS) if k % world == rank}
    drawn = np.concatenate(drawn)
    assert len(np.unique(drawn)) == len(drawn)                          # no window twice in an epoch
    owners = data.seq_shard[windows.seq] % world
    per_rank = np.bincount(owners, minlength=world)
    assert len(drawn) == world * (per_rank.min() // micro) * micro     # the smallest share sets the count
    # One process draws from every shard, exactly as from the unsharded folder.
    one = [mb.sample_ids.numpy() for mb in SequenceBatches(PreparedData(folders / "duckdb"), windows, 20, micro, 0).epoch(0, 0, 1)]
    ref = [mb.sample_ids.numpy() for mb in SequenceBatches(plain, windows, 20, micro, 0).epoch(0, 0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(one, ref)) and len(one) == len(ref)
    with pytest.raises(InputError, match="fewer than a micro-batch"):
        SequenceBatches(PreparedData(folders / "duckdb"), windows, 20, 10_000, 0).num_batches(world)


def test_a_two_process_zero3_run_trains_and_validates_on_a_sharded_folder(folders, tmp_path):
    out = tmp_path / "pt"
    accelerate_launch("cpu_zero3_2proc.yaml", "pretrain", "--preset", "tiny", "--data", folders / "duckdb", "--out", out,
                      *TINY_TRAIN, "--set", "train.epochs=2", "--set", "train.eval_users=200")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_users"]["valid"] == 200 and 0 < metrics["test"]["ndcg@10"] < 1
