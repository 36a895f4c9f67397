"""The main job's machinery: the synthetic recipe end to end at tiny size, its report, and resumption."""
import json
import re
import time

import pytest

from conftest import REPO, run_cli

TINY = ["--set", "data.synth.users=300", "--set", "data.synth.items=120", "--set", "pretrain.train.max_steps=4",
        "--set", "finetune.train.max_steps=3", "--set", "methods=[none,full,lora]"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    run_cli("experiment", "--config", "launch/recipes/synthetic.yaml", "--out", out, *TINY, timeout=300)
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


def test_rerun_skips_finished_steps(experiment):
    first = json.loads((experiment / "results.json").read_text())["timings"]
    t0 = time.perf_counter()
    proc = run_cli("experiment", "--config", "launch/recipes/synthetic.yaml", "--out", experiment, *TINY)
    assert time.perf_counter() - t0 < 60
    assert not re.search(r"^\[run\]", proc.stdout, re.M) and proc.stdout.count("[skip]") >= 6
    again = json.loads((experiment / "results.json").read_text())["timings"]
    assert json.loads((experiment / "timings.json").read_text())["pretrain"] == first["pretrain"]
    assert first["pretrain"] > 0 and again["pretrain"] == first["pretrain"]   # the skipped step keeps its time
    assert again["this run"] < first["this run"] and again["all steps"] == first["all steps"]
    assert f"| pretrain | {first['pretrain']} |" in (experiment / "report.md").read_text()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "launch" / "recipes").glob("*.yaml")))
def test_every_recipe_is_a_valid_study(recipe):
    """Recipes that cannot run here (MovieLens-1M, GPUs) are still checked: every stage config, preset,
    model option, launch and DeepSpeed file they name must exist, so a typo fails here, not hours in."""
    from crossrec_dist.config import load_config
    from crossrec_dist.experiment.recipe import Recipe
    from crossrec_dist.models.config import CrossRecConfig
    from crossrec_dist.models.presets import PRESETS
    from crossrec_dist.stages.distill import DistillConfig
    from crossrec_dist.stages.finetune import METHODS, FinetuneConfig
    from crossrec_dist.stages.pretrain import PretrainConfig

    r = load_config(Recipe, REPO / "launch" / "recipes" / recipe)
    assert r.targets and set(r.methods) <= set(METHODS)
    stages = [load_config(PretrainConfig, base=r.pretrain), load_config(FinetuneConfig, base=r.finetune)]
    if r.distill:
        stages.append(load_config(DistillConfig, base=r.distill))
    model_keys = set(CrossRecConfig().to_dict())
    for cfg in stages:
        if hasattr(cfg, "preset"):
            assert cfg.preset in PRESETS and set(cfg.model) <= model_keys, (recipe, cfg.preset, cfg.model)
        if cfg.train.deepspeed:
            assert (REPO / cfg.train.deepspeed).is_file(), cfg.train.deepspeed
    if r.launch:
        assert (REPO / r.launch).is_file(), r.launch
