"""Run a tier of the benchmark suite, one script after another (never two at once: on a small machine
concurrent runs time each other), and file each script's result as dated JSON.

Tiers (benchmarks/README.md lists every script, what it measures, its time and what it needs):

  quick    runs from a fresh clone with no prior artefacts, at small sizes: <= 15 min on 2 cores
  full     the quick tier's scripts at the sizes benchmarks/RESULTS.md quotes (about 1.5 h on 2 cores)
  study    needs a finished study folder (`make demo`: runs/ml_cross_platform), given by --study
  scale    long, or more memory than a laptop: distillation seeds, 100M interactions, the 1b preset
  cluster  needs root and the two-node Slurm test cluster (sudo bash .ci/slurm_up.sh)
  gpu      needs one CUDA GPU (H100/H200): the 1b preset's tokens/s and MFU, ML-1M epochs, serving (~4 min)

Each script writes its raw output under benchmarks/out/ (not committed; the quick tier under
benchmarks/out/quick/, so that its small artefacts are never reused by a full-size run). This runner
adds, per script, benchmarks/results/<name>/<YYYY-MM-DD>-<tier>.json: the command, exit code, wall time,
the machine (CPU model, cores, memory, load, library versions, commit) and every record the script made
(or its output's last lines if it makes none); and benchmarks/results/run_all/<YYYY-MM-DD>-<tier>.json,
the tier's total.

usage: python -m benchmarks.run_all [--tier quick|full|study|scale|cluster|gpu] [--only NAME ...] [--list]
       [--study runs/ml_cross_platform] [--note TEXT] [--no-results]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import BENCH, OUT, RESULTS, machine_info

REPO = BENCH.parent
TIERS = ("quick", "full", "study", "scale", "cluster", "gpu")
PY = ["python", "-m"]
ACCELERATE_2PROC = ["accelerate", "launch", "--config_file", "launch/cpu_zero3_2proc.yaml",
                    "--main_process_port", "29620", "-m"]


@dataclass(frozen=True)
class Bench:
    """One entry of the suite. ``command``: the sizes RESULTS.md quotes (tiers full, study, scale, cluster);
    ``quick``: the small sizes the quick tier runs (quick-tier scripts only). ``{study}`` and ``{start}``
    are filled in by the runner (the --study folder; the tier's start, ISO minutes)."""
    name: str
    tier: str
    command: list[str]
    quick: list[str] | None = None

    def argv(self, tier: str) -> list[str]:
        return self.quick if tier == "quick" else self.command


# In the order they run. Tier "quick" = the quick commands of every entry whose tier is "quick";
# tier "full" = the same entries' full commands.
SUITE: list[Bench] = [
    # --- quick: from a fresh clone (ML-100K is fetched and prepared by the script itself) ---
    Bench("engine_overhead", "quick",
          PY + ["benchmarks.engine_overhead", "--repeats", "3", "--steps", "40"],
          PY + ["benchmarks.engine_overhead", "--presets", "tiny", "small", "--steps", "20", "--repeats", "1"]),
    Bench("profile_pretrain", "quick",
          PY + ["benchmarks.profile_pretrain", "--preset", "small", "--steps", "40"],
          PY + ["benchmarks.profile_pretrain", "--preset", "small", "--steps", "10", "--warmup", "2"]),
    Bench("pretrain_ml100k", "quick",
          PY + ["benchmarks.pretrain_ml100k", "--preset", "small", "--seeds", "0", "1", "2"],
          PY + ["benchmarks.pretrain_ml100k", "--preset", "tiny", "--seeds", "0", "--set", "train.epochs=15"]),
    Bench("data_eval_throughput", "quick",
          PY + ["benchmarks.data_eval_throughput"],
          PY + ["benchmarks.data_eval_throughput", "--users", "20000", "--repeats", "1"]),
    Bench("accumulation_exactness", "quick",
          PY + ["benchmarks.accumulation_exactness"],
          PY + ["benchmarks.accumulation_exactness"]),
    # one launch per measurement (see engine_overhead_dist's docstring); RESULTS §5.2 quotes 3 launches each
    Bench("engine_overhead_zero2", "quick",
          ACCELERATE_2PROC + ["benchmarks.engine_overhead_dist", "--zero", "2", "--steps", "30", "--repeats", "1"],
          ACCELERATE_2PROC + ["benchmarks.engine_overhead_dist", "--zero", "2", "--preset", "tiny", "--steps", "10"]),
    Bench("engine_overhead_zero3", "quick",
          ACCELERATE_2PROC + ["benchmarks.engine_overhead_dist", "--zero", "3", "--steps", "30", "--repeats", "1"],
          ACCELERATE_2PROC + ["benchmarks.engine_overhead_dist", "--zero", "3", "--preset", "tiny", "--steps", "10"]),
    Bench("memory_scaling", "quick",
          PY + ["benchmarks.memory_scaling"],
          PY + ["benchmarks.memory_scaling", "--preset", "tiny", "--items", "5000", "--stages", "0", "3",
                "--worlds", "1", "2"]),
    Bench("zero3_init_memory", "quick",
          PY + ["benchmarks.zero3_init_memory", "--mmap-threshold", "1048576"],
          PY + ["benchmarks.zero3_init_memory", "--hidden", "256", "--layers", "2", "--mmap-threshold", "1048576"]),
    Bench("large_catalogue", "quick",
          PY + ["benchmarks.large_catalogue"],
          PY + ["benchmarks.large_catalogue", "--items", "100000", "--users", "10000", "--eval-users", "200",
                "--steps", "10", "--no-probe", "--skip-small"]),
    # --- study: a finished `make demo` folder ---
    Bench("paired_runs", "study",
          PY + ["benchmarks.paired_runs", "--a", "{study}/targets/ml100k/adalora", "--b", "{study}/targets/ml100k/lora"]),
    Bench("validation_passes", "study",
          PY + ["benchmarks.validation_passes", "--model", "{study}/pretrain", "--data", "{study}/data",
                "--domain", "ml100k"]),
    Bench("precision_rate", "study",
          PY + ["benchmarks.precision_rate", "--data", "{study}/data", "--domains", "ml1m", "--steps", "60",
                "--repeats", "3"]),
    Bench("parallel_jobs", "study",
          PY + ["benchmarks.parallel_jobs", "--study", "{study}", "--domain", "ml100k", "--steps", "150"]),
    Bench("delta_rank", "study",
          PY + ["benchmarks.delta_rank", "--base", "{study}/pretrain", "--full", "{study}/targets/ml100k/full",
                "--data", "{study}/data", "--domain", "ml100k", "--out", "benchmarks/out/delta_rank_study.json"]),
    Bench("transfer_probes", "study",
          PY + ["benchmarks.transfer_probes", "--study", "{study}"]),
    Bench("small_target_defaults", "study",
          PY + ["benchmarks.small_target_defaults", "--base", "{study}/pretrain", "--data", "{study}/data",
                "--target", "ml100k", "--fractions", "0.05", "0.25", "--jobs", "2"]),
    Bench("readaptation", "study",
          PY + ["benchmarks.readaptation", "--base", "{study}/pretrain", "--raw", "{study}/raw/ml100k",
                "--seeds", "0", "1", "--jobs", "2"]),
    Bench("short_histories", "study",  # readaptation's period-2 adapter, and its data
          PY + ["benchmarks.short_histories", "--base", "{study}/pretrain",
                "--adapter", "benchmarks/out/readaptation/fresh.seed0", "--data", "benchmarks/out/readaptation/p2",
                "--domain", "ml100k"]),
    Bench("late_region", "study",      # readaptation's "fresh" runs are the joint-vocabulary side
          PY + ["benchmarks.late_region", "--base", "{study}/pretrain", "--raw", "{study}/raw/ml100k",
                "--joint", "benchmarks/out/readaptation", "--seeds", "0", "1", "--jobs", "2"]),
    Bench("low_data", "study",         # the main job's folder grows to 3 seeds x 4 fractions: ~3 h
          PY + ["benchmarks.low_data", "--study", "{study}", "--jobs", "2"]),
    Bench("zip_regions", "study",      # its own experiment (ML-1M, two-digit zip regions): ~70 min
          PY + ["benchmarks.zip_regions", "benchmarks/out/ml1m_zip_regions", "--jobs", "2"]),
    Bench("base_seed_noise", "study",   # the study's base against transfer_probes' base_seed1/2
          PY + ["benchmarks.base_seed_noise", "--data", "{study}/data", "--domains", "ml100k", "--reference", "s0",
                "--bases", "s0={study}/pretrain", "s1=benchmarks/out/transfer_probes/base_seed1/pretrain",
                "s2=benchmarks/out/transfer_probes/base_seed2/pretrain"]),
    # --- scale: long, or more memory than a laptop ---
    Bench("distill_ml100k", "scale",
          ["crossrec", "experiment", "--config", "launch/recipes/ml100k_distill.yaml",
           "--out", "benchmarks/out/ml100k_distill"]),
    Bench("distill_seeds", "scale",
          PY + ["benchmarks.distill_seeds", "--run", "benchmarks/out/ml100k_distill"]),
    Bench("data_scale", "scale", PY + ["benchmarks.data_scale"]),
    Bench("parquet_read_memory", "scale", PY + ["benchmarks.parquet_read_memory"]),
    Bench("prepare_scale", "scale", PY + ["benchmarks.prepare_scale", "--keep-last"]),
    Bench("train_at_scale", "scale", PY + ["benchmarks.train_at_scale"]),
    Bench("train_1b_cpu", "scale", PY + ["benchmarks.train_1b_cpu"]),
    Bench("teardown_stress", "scale", PY + ["benchmarks.teardown_stress", "--repeats", "15", "--launches", "16"]),
    Bench("serve_load", "scale", PY + ["benchmarks.serve_load", "--soak-seconds", "600"]),
    Bench("ann_recall", "scale", PY + ["benchmarks.ann_recall"]),
    # --- cluster: root and the two-node Slurm test cluster ---
    Bench("gloo_loopback_hostname", "cluster", PY + ["benchmarks.gloo_loopback_hostname"]),
    Bench("slurm_tests", "cluster", PY + ["pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_slurm.py"]),
    Bench("slurm_job_times", "cluster", PY + ["benchmarks.slurm_job_times", "--since", "{start}"]),
    # --- gpu: one CUDA GPU ---
    Bench("gpu_suite", "gpu", PY + ["benchmarks.gpu_suite"]),
]
BY_NAME = {b.name: b for b in SUITE}


def selected(tier: str) -> list[Bench]:
    return [b for b in SUITE if b.tier == ("quick" if tier == "full" else tier)]


def resolve(argv: list[str], study: str, start: str) -> list[str]:
    """Fill the placeholders; ``python`` and console scripts from this interpreter's environment."""
    argv = [x.replace("{study}", study).replace("{start}", start) for x in argv]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] in ("crossrec", "accelerate"):
        return [str(Path(sys.executable).parent / argv[0]), *argv[1:]]
    return argv


def show(argv: list[str]) -> str:
    """The command as a reader would type it (no interpreter or virtualenv paths)."""
    return (shlex.join(argv).replace(str(Path(sys.executable).parent) + "/", "")
            .replace(sys.executable, "python"))


def run_one(bench: Bench, argv: list[str], shown: str, env: dict, log: Path) -> tuple[int, float, list[dict], list[str]]:
    """Run one script, its output to the terminal and ``log``; its exit code, wall seconds, the records
    it made (benchmarks.common.record) and its output's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=40)
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as rec:
        records_path = Path(rec.name)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shown}\n")
        proc = subprocess.Popen(argv, cwd=REPO, env={**env, "CROSSREC_BENCH_RECORDS": str(records_path)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
            tail.append(line.rstrip("\n"))
        rc = proc.wait()
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in records_path.read_text().splitlines() if x.strip()]
    records_path.unlink(missing_ok=True)
    return rc, wall, records, list(tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--tier", choices=TIERS, default="quick")
    ap.add_argument("--only", nargs="*", choices=sorted(BY_NAME), default=None, help="these scripts of the tier")
    ap.add_argument("--list", action="store_true", help="print the tier's commands and exit")
    ap.add_argument("--study", default="runs/ml_cross_platform", help="the finished study folder (tier study)")
    ap.add_argument("--note", default="", help="recorded with every result, e.g. 'machine shared with other jobs'")
    ap.add_argument("--no-results", action="store_true", help="do not write benchmarks/results/")
    ap.add_argument("--keep-going", action="store_true", help="run the rest of the tier after a failure")
    a = ap.parse_args()
    benches = selected(a.tier)
    if a.only:
        wrong = [n for n in a.only if BY_NAME[n] not in benches]
        if wrong:
            ap.error(f"not in tier {a.tier}: {', '.join(wrong)} (see --list of their tier)")
        benches = [b for b in benches if b.name in a.only]
    start = time.strftime("%Y-%m-%dT%H:%M")
    date = start[:10]
    for b in benches:
        if a.list:
            print(f"[{b.name}] {show(resolve(b.argv(a.tier), a.study, start))}")
    if a.list:
        return
    if a.tier == "study" and not (Path(a.study) / "configs" / "pretrain.yaml").exists():
        sys.exit(f"{a.study}: not a finished study folder (run `make demo` first, or pass --study)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if a.tier == "gpu":        # DeepSpeed finds the GPU itself (make bench sets DS_ACCELERATOR=cpu for the rest)
        env.pop("DS_ACCELERATOR", None)
    else:
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    out = OUT
    if a.tier == "quick" and not os.environ.get("CROSSREC_BENCH_OUT"):
        out = OUT / "quick"
        env["CROSSREC_BENCH_OUT"] = str(out)
    machine = machine_info()
    summary, failed = [], []
    t_tier = time.perf_counter()
    for b in benches:
        argv = resolve(b.argv(a.tier), a.study, start)
        shown = show(argv)
        print(f"[{b.name}] {shown}", flush=True)
        rc, wall, records, tail = run_one(b, argv, shown, env, out / "logs" / f"{b.name}.log")
        print(f"[{b.name}] exit {rc} after {wall:.0f} s", flush=True)
        summary.append({"benchmark": b.name, "exit_code": rc, "wall_seconds": round(wall, 1), "command": shown})
        if not a.no_results:
            result = {"benchmark": b.name, "tier": a.tier, "date": date, "started": start, "command": shown,
                      "exit_code": rc, "wall_seconds": round(wall, 1), "note": a.note, "machine": machine,
                      "records": records, **({} if records else {"output_tail": tail})}
            path = RESULTS / b.name / f"{date}-{a.tier}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
        if rc != 0:
            failed.append(b.name)
            if not a.keep_going:
                break
    total = time.perf_counter() - t_tier
    print(f"[run_all] tier {a.tier}: {len(summary)} script(s) in {total:.0f} s ({total / 60:.1f} min)"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if not a.no_results and summary:
        path = RESULTS / "run_all" / f"{date}-{a.tier}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"tier": a.tier, "date": date, "started": start, "note": a.note,
                                    "wall_seconds": round(total, 1), "failed": failed, "machine": machine,
                                    "benchmarks": summary}, indent=1) + "\n")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
