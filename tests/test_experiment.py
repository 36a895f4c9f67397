"""The main job's machinery: the synthetic recipe end to end at tiny size, its report, and resumption."""
import json
import re
import time

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow      # the real pipeline end to end (a few minutes on 2 cores)

TINY = ["--set", "data.synth.users=300", "--set", "data.synth.items=120", "--set", "pretrain.train.max_steps=4",
        "--set", "finetune.train.max_steps=3", "--set", "methods=[none,full,lora]"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    # Two fine-tuning steps side by side (real processes, each its own log); the re-run below, one at
    # a time, reuses every step.
    out = tmp_path_factory.mktemp("exp")
    proc = run_cli("experiment", "--config", "launch/recipes/synthetic.yaml", "--out", out, *TINY, "--jobs", "2",
                   timeout=300)
    assert re.search(r"^\[run\] finetune d3 full \(beside 1 other; log logs/finetune/d3/full.log\)$", proc.stdout, re.M)
    assert "finetune full on d3" in (out / "logs" / "finetune" / "d3" / "full.log").read_text()
    return out


def test_report_numbers_come_from_metrics_files(experiment):
    res = json.loads((experiment / "results.json").read_text())
    report = (experiment / "report.md").read_text()
    for method in ("none", "full", "lora"):
        m = json.loads((experiment / "targets" / "d3" / method / "metrics.json").read_text())
        assert res["targets"]["d3"][method]["ndcg@10"] == m["test"]["ndcg@10"]
        row = next(line for line in report.splitlines() if line.startswith(f"| {method} |"))
        assert f"{m['test']['ndcg@10']:.4f}" in row and f"{m['params']['trainable']:,}" in row
    pre = json.loads((experiment / "pretrain" / "metrics.json").read_text())
    assert f"{pre['test']['ndcg@10']:.4f}" in report
    for png in ("ndcg_by_region.png", "quality_vs_params.png", "training_curves.png"):
        assert (experiment / png).stat().st_size > 5000 and f"]({png})" in report


def test_report_gives_intervals_paired_differences_and_the_selected_step(experiment):
    """Every method's test NDCG@10 comes with a bootstrap interval over the target's users, paired
    differences vs zero-shot and full on the same users, and the step validation selected."""
    import numpy as np
    from crossrec_dist.evaluation.bootstrap import ndcg_at
    res = json.loads((experiment / "results.json").read_text())["intervals"]["d3"]
    report = (experiment / "report.md").read_text()
    recs = {m: json.loads((experiment / "targets" / "d3" / m / "metrics.json").read_text()) for m in ("none", "full", "lora")}
    for m, rec in recs.items():
        ranks = rec["test_ranks"]
        assert len(ranks["rank"]) == rec["test"]["users"] == res[m]["ndcg@10"]["n"]
        assert np.isclose(np.mean(ndcg_at(ranks["rank"])), rec["test"]["ndcg@10"])
        iv = res[m]["ndcg@10"]
        assert iv["low"] <= iv["mean"] <= iv["high"] and np.isclose(iv["mean"], rec["test"]["ndcg@10"])
    lora = res["lora"]
    assert np.isclose(lora["vs_none"]["mean"], recs["lora"]["test"]["ndcg@10"] - recs["none"]["test"]["ndcg@10"])
    assert "vs_none" not in res["none"] and lora["best_step"] == recs["lora"]["train"]["best_step"]
    assert np.isclose(lora["of_full"], recs["lora"]["test"]["ndcg@10"] / recs["full"]["test"]["ndcg@10"])
    assert lora["trainable"] == recs["lora"]["params"]["trainable"] and "of_full" not in res["full"]
    row = next(line for line in report.splitlines() if line.startswith("| lora |") and "[" in line)
    assert f"| {lora['trainable']:,} |" in row and f"{lora['of_full']:.1%}" in row
    assert f"### Target d3: {recs['none']['test']['users']} test users" in report
    assert f"{lora['best_step']} of {lora['steps']}" in report


def test_rerun_skips_finished_steps(experiment):
    first = json.loads((experiment / "results.json").read_text())["timings"]
    records = {p: json.loads(p.read_text()) for p in (experiment / "steps").rglob("*.json")}
    assert len(records) == 6 and all(r["state"] == "complete" for r in records.values())
    t0 = time.perf_counter()
    proc = run_cli("experiment", "--config", "launch/recipes/synthetic.yaml", "--out", experiment, *TINY)
    assert time.perf_counter() - t0 < 60
    assert not re.search(r"^\[run\]", proc.stdout, re.M) and proc.stdout.count("[skip]") == 6
    # The settings hash of every real step is the same in a second process: nothing re-ran, no record changed.
    assert {p: json.loads(p.read_text()) for p in (experiment / "steps").rglob("*.json")} == records
    again = json.loads((experiment / "results.json").read_text())["timings"]
    assert json.loads((experiment / "timings.json").read_text())["pretrain"] == first["pretrain"]
    assert first["pretrain"] > 0 and again["pretrain"] == first["pretrain"]   # the skipped step keeps its time
    assert again["this run"] < first["this run"] and again["all steps"] == first["all steps"]
    assert f"| pretrain | {first['pretrain']} |" in (experiment / "report.md").read_text()


def test_a_changed_recipe_is_not_reported_with_old_results(experiment):
    """Checked before any step runs, so the finished folder is left as it was."""
    results = (experiment / "results.json").read_text()
    proc = run_cli("experiment", "--config", "launch/recipes/synthetic.yaml", "--out", experiment, *TINY,
                   "--set", "pretrain.train.lr=1e-3", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "step 'pretrain': pretrain.train.lr: null -> 0.001" in proc.stderr
    assert "step 'finetune d3 lora': upstream step 'pretrain' changed" in proc.stderr
    assert "--rerun-changed" in proc.stderr and "'prepare'" not in proc.stderr
    assert "[run]" not in proc.stdout and (experiment / "results.json").read_text() == results


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "launch" / "recipes").glob("*.yaml")))
def test_every_recipe_is_a_valid_study(recipe):
    """Recipes that cannot run here (MovieLens-1M, GPUs) are still checked when loaded: every stage
    config is typed, and presets, model options, methods, launch and DeepSpeed files must exist, so a
    typo fails before the first step, not hours in."""
    from crossrec_dist.config import load_config
    from crossrec_dist.experiment.recipe import Recipe, check_recipe

    path = REPO / "launch" / "recipes" / recipe
    check_recipe(load_config(Recipe, path), str(path), repo=REPO)


@pytest.mark.parametrize("override, key", [
    ("pretrain.train.epoch=3", "pretrain.train.epoch"),
    ("finetune.lora.rank=4", "finetune.lora.rank"),
    ("methods=[lora,lorra]", "methods"),
    ("method_overrides={lora: {train: {lr: fast}}}", "method_overrides.lora.train.lr"),
    ("method_overrides={lorra: {train: {lr: 0.1}}}", "method_overrides.lorra"),
    ("distill.model.hiden_size=8", "distill.model.hiden_size"),
    ("pretrain.preset=huge", "pretrain.preset"),
    ("finetune.train.deepspeed=zero9", "finetune.train.deepspeed"),
])
def test_a_recipe_typo_fails_before_any_step_runs(override, key, tmp_path):
    """(An override for a known method the run leaves out is checked too: method_overrides.lora below
    while methods names no lora would fail the same way; see the test after this one.)"""
    proc = run_cli("experiment", "--config", "launch/recipes/ml100k_regions.yaml", "--out", tmp_path / "x",
                   "--set", override, check=False)
    assert proc.returncode == 2 and key in proc.stderr and "ml100k_regions.yaml" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_narrowing_the_methods_keeps_the_other_methods_overrides_checked():
    """`--set methods=[none,lora]` on the main job's recipe, which tunes adalora too: a user narrowing a
    study is not told to edit the recipe's adalora section; a typo in an override they leave out is
    still an error."""
    from crossrec_dist.config import load_config
    from crossrec_dist.errors import InputError
    from crossrec_dist.experiment.recipe import Recipe, check_recipe

    path = REPO / "launch" / "recipes" / "ml_cross_platform.yaml"
    check_recipe(load_config(Recipe, path, ["methods=[none,lora]"]), str(path), repo=REPO)
    with pytest.raises(InputError, match="adalora.init_rr"):
        check_recipe(load_config(Recipe, path, ["methods=[none,lora]", "method_overrides.adalora.adalora.init_rr=3"]),
                     str(path), repo=REPO)
