"""What every fine-tuning run is compared against (stages/references.py) and the guard that keeps the
base unless an adapted step beats it (stages/common.RecommenderTask.must_beat_start), on hand-made
ranks whose answers can be checked on paper."""
import math

import numpy as np
import pytest

from crossrec_dist.evaluation.bootstrap import interval_record, paired_on_users, per_user_ndcg
from crossrec_dist.stages.common import RecommenderTask
from crossrec_dist.stages.references import paired_vs, selection_line, selection_record, verdict_lines


def test_per_user_ndcg_averages_a_users_targets():
    # user 7: ranks 0 and 1 -> (1 + 1/log2(3)) / 2; user 3: rank 12 -> 0 (outside the top 10)
    users, values = per_user_ndcg([7, 7, 3], [0, 1, 12])
    assert users.tolist() == [3, 7]
    assert values[0] == 0.0 and values[1] == pytest.approx((1 + 1 / math.log2(3)) / 2)


def test_a_constant_difference_has_a_zero_width_interval_and_a_verdict():
    # every user: rank 1 (1/log2(3) = 0.6309) vs rank 0 (1.0): -0.3691 for each of them
    a = per_user_ndcg(np.arange(50), np.ones(50, dtype=int))
    b = per_user_ndcg(np.arange(50), np.zeros(50, dtype=int))
    rec = interval_record(paired_on_users(*a, *b))
    assert rec == {"diff": pytest.approx(1 / math.log2(3) - 1, abs=1e-6), "low": rec["diff"], "high": rec["diff"],
                   "users": 50, "verdict": "worse"}
    # only the users both sides ranked are paired
    rec = interval_record(paired_on_users(*b, *per_user_ndcg(np.arange(40, 60), np.zeros(20, dtype=int))))
    assert (rec["users"], rec["diff"], rec["verdict"]) == (10, 0.0, "no significant difference")


def test_paired_vs_gives_each_reference_both_splits():
    def ev(valid_ranks, test_ranks):
        return {split: {"examples": {"seq_index": np.arange(len(r)), "rank": np.asarray(r)}}
                for split, r in (("valid", valid_ranks), ("test", test_ranks))}
    run = ev([0] * 30, [0] * 30)
    vs = paired_vs(run, {"zero-shot": ev([0] * 30, [20] * 30), "popularity": ev([0] * 30, [0] * 29 + [20])})
    assert vs["zero-shot"]["test"]["verdict"] == "better" and vs["zero-shot"]["test"]["diff"] == 1.0
    assert vs["zero-shot"]["valid"]["verdict"] == "no significant difference"
    # one user of 30 better: mean +1/30, but a resample without that user is as likely as not to be found
    assert vs["popularity"]["test"]["diff"] == pytest.approx(1 / 30, abs=1e-6)
    assert vs["popularity"]["test"]["verdict"] == "no significant difference"
    lines = verdict_lines("lora", "r1", paired_vs(ev([20] * 30, [20] * 30), {"popularity": ev([0] * 30, [0] * 30)}))
    assert any(line.startswith("WARNING") and "BELOW the region's popularity list on test and valid" in line
               for line in lines), lines


class _Guarded(RecommenderTask):
    must_beat_start = True


def _examples(ranks):
    return {"seq_index": np.repeat(np.arange(len(ranks) // 2), 2), "rank": np.asarray(ranks)}


def test_one_lucky_user_is_not_evidence_but_every_user_improving_is():
    """96 users, 2 validation targets each. Step 0 is remembered. A step where one user's targets move
    from ranks 50 to 0 raises the mean NDCG@10 by 1/96, but a quarter of resamples miss that user
    entirely: not kept. A step where every user moves from rank 5 to 4 is kept."""
    task = _Guarded()
    start = [50, 50] + [5, 5] * 95
    assert task._against_start(0, _examples(start), {}, {}) == (True, "")
    lucky = [0, 0] + [5, 5] * 95
    details, tracked = {}, {}
    eligible, note = task._against_start(3, _examples(lucky), details, tracked)
    assert not eligible and "n.s." in note and "over 96 users" in note
    assert details["vs_start"]["diff"] == pytest.approx(1 / 96, abs=1e-6) and details["vs_start"]["low"] <= 0
    better = [50, 50] + [4, 4] * 95
    eligible, _ = task._against_start(6, _examples(better), {}, tracked)
    assert eligible and tracked["valid_vs_start_low"] > 0
    # resumed: the start comes back from the checkpoint state, and the verdict is the same
    resumed = _Guarded()
    resumed.restore_checkpoint_state(None, task.checkpoint_state(None))
    assert resumed._against_start(6, _examples(better), {}, {})[0]
    assert not resumed._against_start(6, _examples(lucky), {}, {})[0]


def test_without_the_guard_every_validation_is_eligible():
    task = RecommenderTask()
    assert task._against_start(5, _examples([0, 0]), {}, {}) == (True, "")


def test_the_selection_record_and_the_plain_words_when_the_base_is_kept():
    class Result:
        best_step = 0
        history = [{"kind": "valid", "step": 0, "valid_ndcg@10": 0.10},
                   {"kind": "valid", "step": 7, "valid_ndcg@10": 0.12, "valid_vs_start": 0.02,
                    "valid_vs_start_low": -0.01, "valid_vs_start_high": 0.05, "not_kept": "n.s."},
                   {"kind": "valid", "step": 14, "valid_ndcg@10": 0.11, "valid_vs_start": 0.01,
                    "valid_vs_start_low": -0.02, "valid_vs_start_high": 0.04, "not_kept": "n.s."}]
    sel = selection_record(Result, True)
    assert sel["kept"] == "base" and sel["best_seen"]["step"] == 7
    line = selection_line("lora", "r1", sel, "adapter")
    assert line.startswith("WARNING") and "step 7, +0.0200 [-0.0100, +0.0500]" in line and "kept step 0" in line
    Result.best_step = 14
    assert selection_line("lora", "r1", selection_record(Result, True), "adapter") is None
