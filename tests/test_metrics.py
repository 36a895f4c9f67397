import math

import numpy as np

import torch

from crossrec_dist.evaluation.metrics import metrics_from_ranks, target_ranks


def test_rank_counts_ties_against_target():
    scores = torch.tensor([[0.0, 0.5, 0.9, 0.5, 0.1]])
    # target item 1 scores 0.5; item 2 is higher, item 3 ties -> rank 2 (0-based)
    assert target_ranks(scores, torch.tensor([1])).item() == 2
    assert target_ranks(scores, torch.tensor([3])).item() == 2


def test_constant_scores_get_the_worst_rank():
    scores = torch.ones(3, 100)
    ranks = target_ranks(scores, torch.tensor([0, 50, 99]))
    assert ranks.tolist() == [99, 99, 99]
    m = metrics_from_ranks(ranks, ks=(10,))
    assert m == {"hr@10": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0}


def test_nan_scores_never_help():
    scores = torch.tensor([[float("nan"), 1.0, 2.0]])
    assert target_ranks(scores, torch.tensor([0])).item() == 2


def test_hand_computed_metrics():
    # ranks 0, 1, 4, 12 (0-based) with K = 5
    m = metrics_from_ranks(torch.tensor([0, 1, 4, 12]), ks=(5,))
    assert math.isclose(m["hr@5"], 3 / 4)
    assert math.isclose(m["ndcg@5"], (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert math.isclose(m["mrr@5"], (1 + 1 / 2 + 1 / 5) / 4)


def test_ranks_from_scores_end_to_end():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7], [0.4, 0.2, 0.8, 0.6]])
    ranks = target_ranks(scores, torch.tensor([3, 0]))  # 0.7 ranks 2nd; 0.4 ranks 3rd
    assert ranks.tolist() == [1, 2]
    m = metrics_from_ranks(ranks, ks=(2,))
    assert math.isclose(m["hr@2"], 0.5)
    assert math.isclose(m["ndcg@2"], (1 / math.log2(3)) / 2)


def test_bootstrap_interval_of_a_hand_computed_case():
    """Two users scoring 0 and 1: a resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so
    the 2.5% and 97.5% percentiles are 0 and 1; constant values have a zero-width interval."""
    import numpy as np
    from crossrec_dist.evaluation.bootstrap import bootstrap_mean, ndcg_at, paired_difference
    iv = bootstrap_mean([0.0, 1.0], resamples=4000)
    assert iv.mean == 0.5 and iv.low == 0.0 and iv.high == 1.0 and iv.n == 2
    assert not iv.excludes_zero                       # its lower end is 0 itself
    flat = bootstrap_mean([0.25] * 7)
    assert (flat.low, flat.mean, flat.high) == (0.25, 0.25, 0.25)
    # ranks 0, 1, 10 -> NDCG@10 1, 1/log2(3), 0
    assert np.allclose(ndcg_at([0, 1, 10]), [1.0, 1 / np.log2(3), 0.0])
    # Paired: b = a + 0.1 for every user -> the difference is exactly 0.1, excluding 0; a vs a is n.s.
    a = np.linspace(0, 1, 50)
    d = paired_difference(a + 0.1, a)
    assert np.isclose(d.low, 0.1) and np.isclose(d.high, 0.1) and d.excludes_zero
    same = paired_difference(a, a)
    assert not same.excludes_zero and same.diff_text().endswith("n.s.")
    # A noisy difference whose interval straddles 0 is reported as not significant.
    rng = np.random.default_rng(0)
    noisy = paired_difference(rng.normal(0, 1, 60), rng.normal(0, 1, 60))
    assert noisy.low < 0 < noisy.high and "n.s." in noisy.diff_text()


def test_target_catalogue_ranks_only_the_domains_items(tmp_path):
    """Domain a uses items i0-i5, domain b items i4-i9. Ranked over b's catalogue, a scorer that
    prefers a's private items loses them as competitors: each b user's rank drops by exactly the
    number of a-only items it scored above its target, and no target is ever hidden."""
    from crossrec_dist.cli import main
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.evaluation.evaluator import EvalOptions, rank_eval_set

    rows = []
    for u in range(6):
        dom, lo = ("a", 0) if u < 3 else ("b", 4)
        rows += [f"u{u},i{lo + (u + k) % 6},{100 + k},{dom}" for k in range(5)]
    (tmp_path / "in.csv").write_text("user_id,item_id,timestamp,region\n" + "\n".join(rows) + "\n")
    assert main(["prepare", "--format", "csv", "--input", str(tmp_path / "in.csv"), "--out", str(tmp_path / "d"),
                 "--domain-col", "region", "--split", "loo"]) == 0
    data = PreparedData(tmp_path / "d")
    cat = data.catalogue(["b"])
    assert not cat[0] and cat.sum() == 6                 # i4..i9: six items, padding never
    a_only = data.catalogue(["a"]) & ~cat
    assert a_only.sum() == 4                             # i0..i3

    scores = torch.arange(data.num_items + 1, dtype=torch.float32)
    scores[torch.from_numpy(a_only)] += 100.0            # a's private items on top
    scorer = lambda hist, doms: scores.expand(len(hist), -1).clone()   # noqa: E731
    ev = data.eval_set("test", ["b"])
    plain = rank_eval_set(data, ev, scorer, EvalOptions(domains=["b"]), show_progress=False)
    within = rank_eval_set(data, ev, scorer, EvalOptions(domains=["b"], catalogue=cat), show_progress=False)
    assert cat[ev.targets].all()
    assert (plain - within).tolist() == [4] * len(ev.targets)


def test_several_validation_targets_per_user_rank_as_one_history_each(tmp_path):
    """A user's K validation targets are ranked from one forward pass (model_scorer's last_k): while
    histories fit in max_len the ranks equal those of one pass per history, users with fewer than K
    usable targets included; beyond max_len only the earlier targets' views differ; the sharded path
    agrees; a run of targets longer than max_len is cut into windows."""
    from crossrec_dist.cli import main
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.evaluation.evaluator import EvalOptions, eval_batches, model_scorer, rank_eval_set
    from crossrec_dist.evaluation.sharded import sharded_evaluate
    from crossrec_dist.models.config import CrossRecConfig
    from crossrec_dist.models.model import CrossRecModel

    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        n = 4 + u % 13                                    # 4..16 items: some validation targets have short prefixes
        rows += [f"u{u},i{int(i)},{100 + t}" for t, i in enumerate(rng.integers(0, 30, n))]
    (tmp_path / "in.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    assert main(["prepare", "--format", "csv", "--input", str(tmp_path / "in.csv"), "--out", str(tmp_path / "d"),
                 "--split", "loo"]) == 0
    data = PreparedData(tmp_path / "d")
    torch.manual_seed(0)
    model = CrossRecModel(CrossRecConfig(num_items=data.num_items, hidden_size=16, num_layers=2, num_heads=2,
                                         max_len=16, item_bias=True)).eval()
    grouped = model_scorer(model)
    plain = lambda hist, doms: grouped(hist, doms)        # noqa: E731  (no last_k: one history per row)
    ev = data.eval_set("valid", targets_per_user=3)
    opts = EvalOptions(split="valid", max_len=16, batch_size=16)     # every history fits
    batches = eval_batches(ev, opts.batch_size, True, opts.max_len)
    rows = sum(len(ex) // k for k, ex in batches)                    # forward-pass rows: one per user
    assert rows == len(np.unique(ev.seq_index)) < len(ev.targets)
    assert all(len(ex) <= opts.batch_size for _, ex in batches)
    assert {k for k, _ in batches} >= {3} and sorted(np.concatenate([ex for _, ex in batches])) == list(range(len(ev.targets)))
    want = rank_eval_set(data, ev, plain, opts, show_progress=False)
    got = rank_eval_set(data, ev, grouped, opts, show_progress=False)
    assert torch.equal(got, want)
    sharded = sharded_evaluate(data, ev, grouped, opts, "cpu")["examples"]["rank"]
    assert sharded.tolist() == want.tolist()
    short = EvalOptions(split="valid", max_len=5, batch_size=16)      # histories of up to 15 items
    latest = np.r_[ev.seq_index[1:] != ev.seq_index[:-1], True]      # each user's latest target: its own window
    assert torch.equal(rank_eval_set(data, ev, grouped, short, show_progress=False)[latest],
                       rank_eval_set(data, ev, plain, short, show_progress=False)[latest])
    many = data.eval_set("valid", targets_per_user=8)
    cut = eval_batches(many, 64, True, 5)
    assert max(k for k, _ in cut) == 5 and sum(len(ex) for _, ex in cut) == len(many.targets)
    assert rank_eval_set(data, many, grouped, short, show_progress=False).shape == (len(many.targets),)


def test_eval_users_sample_is_seeded_and_the_score_memory_is_capped(tmp_path, monkeypatch):
    """``train.eval_users``: a seeded sample of users (the same one every time and for valid and test),
    all of them at 0 or when asked for more; passes over a big catalogue take fewer users each, and the
    ranks are the same as with one pass for everyone."""
    from crossrec_dist.cli import main
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.evaluation import evaluator
    from crossrec_dist.evaluation.evaluator import EvalOptions, evaluate, sample_users, score_batch_size

    rng = np.random.default_rng(1)
    rows = [f"u{u},i{int(i)},{100 + t}" for u in range(60) for t, i in enumerate(rng.integers(0, 40, 6))]
    (tmp_path / "in.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    assert main(["prepare", "--format", "csv", "--input", str(tmp_path / "in.csv"), "--out", str(tmp_path / "d")]) == 0
    data = PreparedData(tmp_path / "d")
    test, valid = data.eval_set("test"), data.eval_set("valid")
    a, b = sample_users(test, 20, seed=3), sample_users(test, 20, seed=3)
    assert len(np.unique(a.seq_index)) == 20 and (a.seq_index == b.seq_index).all()
    assert (sample_users(valid, 20, seed=3).seq_index == a.seq_index).all()        # valid and test: the same users
    assert set(sample_users(test, 20, seed=4).seq_index) != set(a.seq_index)
    assert len(sample_users(test, 0, seed=3).targets) == len(sample_users(test, 10_000, seed=3).targets) == 60

    assert score_batch_size(1024, 3_706) == 1024 and score_batch_size(1024, 1_000_000) == 67
    assert score_batch_size(1024, 10**9) == 1
    scores = torch.from_numpy(rng.normal(size=(1, data.num_items + 1)).astype(np.float32))
    rows_per_pass = []

    def scorer(hist, doms):
        rows_per_pass.append(len(hist))
        return scores.expand(len(hist), -1) + hist[:, -1:].float() * 1e-3

    whole = evaluate(data, scorer, EvalOptions(batch_size=1024, users=20, seed=3))
    assert rows_per_pass == [20]
    monkeypatch.setattr(evaluator, "SCORE_BUDGET", 3 * (data.num_items + 1))       # 3 users per pass
    rows_per_pass.clear()
    capped = evaluate(data, scorer, EvalOptions(batch_size=1024, users=20, seed=3))
    assert max(rows_per_pass) == 3 and sum(rows_per_pass) == 20
    assert whole["overall"]["users"] == 20
    assert (whole["examples"]["rank"] == capped["examples"]["rank"]).all()
    assert (whole["examples"]["seq_index"] == a.seq_index).all()


def test_eval_users_reaches_metrics_json(synth_data, tmp_path):
    import json
    from conftest import run_cli

    out = tmp_path / "run"
    run_cli("pretrain", "--preset", "tiny", "--data", synth_data, "--out", out, "--set", "train.max_steps=2",
            "--set", "train.eval_users=25", "--set", "train.tensorboard=false")
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["eval_users"] == {"sampled": True, "requested": 25, "seed": 0, "of": rec["eval_users"]["of"],
                                 "valid": 25, "test": 25}
    assert rec["eval_users"]["of"] > 25
    assert len(rec["test_ranks"]["seq_index"]) == 25
    bad = run_cli("pretrain", "--preset", "tiny", "--data", synth_data, "--out", tmp_path / "bad",
                  "--set", "train.eval_users=-1", check=False)
    assert bad.returncode == 2 and "train.eval_users" in bad.stderr and "Traceback" not in bad.stderr
