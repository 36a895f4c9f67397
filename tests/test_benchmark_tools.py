"""The arithmetic that benchmark scripts' conclusions rest on (benchmarks/RESULTS.md §2.3.4-2.3.5), in
crossrec_dist.analysis; and the benchmark suite's runner (benchmarks/run_all.py: tiers, dated results)."""
import json

import pytest
import torch

from crossrec_dist.analysis.delta_rank import changes, low_rank, parse_cut
from crossrec_dist.analysis.paired import compare
from crossrec_dist.analysis.probes import BODY, method_variant, methods_order, scratch_runs_in, seedless
from crossrec_dist.errors import InputError


def test_low_rank_is_the_best_approximation_of_its_rank():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 3, generator=g))
    v, _ = torch.linalg.qr(torch.randn(5, 3, generator=g))
    m = u @ torch.diag(torch.tensor([3.0, 2.0, 0.5])) @ v.T        # singular values 3, 2, 0.5
    factors = torch.linalg.svd(m, full_matrices=False)
    assert torch.allclose(low_rank(factors, 3), m, atol=1e-5)
    assert torch.allclose(low_rank(factors, None), m, atol=1e-5)
    assert torch.count_nonzero(low_rank(factors, 0)) == 0
    one = low_rank(factors, 1)
    assert torch.linalg.matrix_rank(one) == 1
    # Eckart-Young: what rank 1 leaves out has exactly the dropped singular values' energy
    assert abs(float(torch.linalg.norm(m - one)) - (2.0 ** 2 + 0.5 ** 2) ** 0.5) < 1e-4


def test_cut_and_variant_parsing():
    assert parse_cut("full:8") == (None, 8) and parse_cut("0:full") == (0, None)
    assert method_variant("lora_r8") == ("lora", ["--set", "lora.r=8", "--set", "lora.alpha=16"])
    assert method_variant("full") == ("full", [])
    assert sorted(["lora_r8", "full", "lora", "none"], key=methods_order) == ["none", "full", "lora", "lora_r8"]


def test_seed_variants():
    assert method_variant("lora_r8.seed2") == ("lora", ["--set", "lora.r=8", "--set", "lora.alpha=16",
                                                        "--set", "train.seed=2"])
    assert method_variant("full.seed1") == ("full", ["--set", "train.seed=1"])
    assert seedless("lora_r8.seed1") == "lora_r8" and seedless("full") == "full"
    assert sorted(["full.seed1", "lora_r8", "full", "none"], key=methods_order) == ["none", "full", "full.seed1",
                                                                                     "lora_r8"]


def test_adalora_variant():
    assert method_variant("adalora_r8to4_top80") == ("adalora", [
        "--set", "adalora.init_r=8", "--set", "adalora.target_r=4", "--set", "lora.alpha=16",
        "--set", "train_top_items=80"])
    assert method_variant("adalora_r2to1")[1][-2:] == ["--set", "lora.alpha=4"]


def test_set_suffix_variants():
    assert method_variant("full+train.lr=0.0002") == ("full", ["--set", "train.lr=0.0002"])
    assert method_variant("adalora_r8to4_top86+train_new_items=true.seed1") == ("adalora", [
        "--set", "adalora.init_r=8", "--set", "adalora.target_r=4", "--set", "lora.alpha=16",
        "--set", "train_top_items=86", "--set", "train_new_items=true", "--set", "train.seed=1"])
    with pytest.raises(InputError, match="KEY=VALUE"):   # a folder name must not smuggle a path in
        method_variant("full+train.lr=../x")


def test_cuts_share_one_svd_and_refuse_other_models():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(7, 4, generator=g)
    factors = torch.linalg.svd(d, full_matrices=False)
    assert torch.allclose(low_rank(factors, None), d, atol=1e-5)
    assert torch.count_nonzero(low_rank(factors, 0)) == 0
    assert torch.linalg.matrix_rank(low_rank(factors, 2)) == 2
    base = {"w": torch.zeros(3, 2)}
    with pytest.raises(InputError, match="w is"):
        changes(base, {"w": torch.zeros(2, 3)})
    with pytest.raises(InputError, match="different weight names"):
        changes(base, {"v": torch.zeros(3, 2)})


def test_body_probe_names_and_scratch_references(tmp_path):
    """``body_l2_f1024_h256_s1``: the same shape pretrained with seed 1; its scratch reference is read from
    the unseeded probe's runs (every seed, data fractions left out)."""
    assert BODY.fullmatch("body_l2_f1024_h256_s1").groups() == ("2", "1024", "256", "1")
    assert BODY.fullmatch("body_l4_f1024").groups() == ("4", "1024", None, None)
    assert BODY.fullmatch("body_l4_f1024_x") is None
    for name in ("scratch", "scratch.seed1", "scratch.frac0.25", "scratch.seed2"):
        (tmp_path / name).mkdir()
        if name != "scratch.seed2":   # unfinished: no metrics.json
            (tmp_path / name / "metrics.json").write_text(json.dumps({"method": name}))
    assert sorted(scratch_runs_in(tmp_path)) == ["scratch", "scratch.seed1"]


def test_paired_runs_averages_seeds_per_user_and_pairs(tmp_path):
    """Two users. A: ranks 0 and 20 in one seed, 0 and 0 in the other (per-user mean NDCG 1.0, 0.5);
    B: ranks 1 and 0 (1/log2(3), 1.0). A - B per user: 1 - 0.6309 and 0.5 - 1.0 -> mean -0.0655."""

    def run(name, ranks):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"test_ranks": {"seq_index": [7, 3], "rank": ranks}}))
        return d

    line = compare([run("a0", [0, 20]), run("a1", [0, 0])], [run("b", [1, 0])])
    assert line.startswith("2 users; A 0.7500") and "(2 run(s))" in line and "B 0.8155" in line
    assert "A - B -0.0655" in line


def test_paired_runs_names_a_folder_that_is_not_a_finished_run(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text(json.dumps({"test_ranks": {"seq_index": [1], "rank": [0]}}))
    with pytest.raises(InputError, match="metrics.json"):
        compare([tmp_path / "done"], [tmp_path / "missing"])


def test_every_benchmark_script_is_in_a_tier_and_in_the_readme():
    """benchmarks/README.md documents every script and ``benchmarks.run_all`` runs each in one tier; the
    quick tier is what ``make bench`` runs."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    scripts = {p.stem for p in bench.glob("*.py")} - {"__init__", "common", "run_all"}
    listed: dict[str, set[str]] = {}
    for tier in ("quick", "full", "study", "scale", "cluster", "gpu"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--tier", tier, "--list"], cwd=bench.parent,
                             capture_output=True, text=True, check=True).stdout
        listed[tier] = set(re.findall(r"-m benchmarks\.(\w+)", out))
    assert listed["quick"] == listed["full"]
    in_tiers = set().union(*listed.values())
    assert scripts <= in_tiers, f"in no tier of run_all: {sorted(scripts - in_tiers)}"
    readme = (bench / "README.md").read_text()
    assert not [s for s in scripts if f"`{s}.py`" not in readme], "README.md misses a script"
    assert "--tier $(or $(TIER),quick)" in (bench.parent / "Makefile").read_text()


def test_gpu_suite_dry_run_takes_every_figure_on_the_cpu(tmp_path):
    """``benchmarks/gpu_suite.py --dry-run``: the GPU suite's parts (1b throughput, ML-1M epochs, serving)
    at toy sizes on the CPU, so that the command a GPU machine runs keeps working where none is."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_suite.json"
    env = {**os.environ, "CROSSREC_BENCH_OUT": str(tmp_path / "bench"), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--json", str(out)], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"1b_throughput", "ml1m_epoch_small", "ml1m_epoch_medium", "serving"}
    assert parts["1b_throughput"]["updates"] == 3 and parts["1b_throughput"]["tokens_per_second"] > 0
    assert parts["1b_throughput"]["mfu"] is None                 # no GPU peak on a CPU: no MFU, not a made-up one
    assert all(parts[p]["train_seconds"] > 0 and "ndcg@10" in parts[p]["test"] for p in ("ml1m_epoch_small",
                                                                                         "ml1m_epoch_medium"))
    assert parts["serving"]["batch1_ms"]["n"] == 20 and parts["serving"]["batch32_ms"]["p50"] > 0
