"""Is the gain from the teacher real or seed noise, and how much faster is the student really?
Re-distil the students of a finished ``crossrec experiment`` run (default: the distillation study,
launch/recipes/ml100k_distill.yaml) with more seeds, KD and CE-only alike, same teacher, same configs,
and record per-seed and median test NDCG@10; then repeat ``crossrec bench-serve --onnx`` for each
region's KD student ``--serving-repeats`` times and record the medians of the p50 speed-ups.
Run it on a quiet machine: the serving figures are timings.
usage: python -m benchmarks.distill_seeds [--run runs/ml100k_distill] [--seeds 1 2] [--serving-repeats 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.common import crossrec, record


def student(run: Path, target: str, kind: str, seed: int) -> float:
    """Test NDCG@10 of the ``kind`` student for ``target`` trained with ``seed`` (seed 0 = the run's own)."""
    if seed == 0:
        dest = run / "targets" / target / kind
    else:
        dest = run / "seeds" / f"{target}_{kind}_seed{seed}"
        if not (dest / "metrics.json").is_file():
            distill_from = json.loads((run / "results.json").read_text())["distill_from"]
            crossrec("distill", "--config", run / "configs" / f"{kind}.yaml", *teacher_args(run, target, distill_from),
                     "--data", run / "data", "--domain", target, "--out", dest, "--set", f"train.seed={seed}",
                     "--resume", "auto")
    return json.loads((dest / "metrics.json").read_text())["test"]["ndcg@10"]


def teacher_args(run: Path, target: str, distill_from: str) -> list:
    teacher = run / "targets" / target / distill_from
    if (teacher / "adapter_config.json").is_file():
        return ["--teacher", run / "pretrain", "--adapter", teacher]
    return ["--teacher", teacher]


def serving(run: Path, target: str, distill_from: str, repeat: int) -> dict:
    out = run / "seeds" / f"serving_{target}_rep{repeat}.json"
    if not out.is_file():
        crossrec("bench-serve", "--student", run / "targets" / target / "student_kd",
                 *teacher_args(run, target, distill_from), "--onnx", "--out", out)
    r = json.loads(out.read_text())
    return {"p50": r["speedup_p50"], "throughput": r["speedup_throughput"],
            "ort_p50": r["onnxruntime"]["speedup_p50"], "ort_throughput": r["onnxruntime"]["speedup_throughput"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/ml100k_distill")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--serving-repeats", type=int, default=4)
    a = ap.parse_args()
    run = Path(a.run)
    res = json.loads((run / "results.json").read_text())
    seeds = [0, *a.seeds]
    table = {}
    for target in res["recipe"]["targets"]:
        row = {"teacher": res["targets"][target][res["distill_from"]]["ndcg@10"]}
        for kind in ("student_kd", "student_ce"):
            row[kind] = {s: student(run, target, kind, s) for s in seeds}
            row[f"{kind}_median"] = statistics.median(row[kind].values())
        row["kd_minus_ce_per_seed"] = {s: row["student_kd"][s] - row["student_ce"][s] for s in seeds}
        row["kept_median"] = row["student_kd_median"] / row["teacher"]
        table[target] = row
    mean = {k: statistics.mean(table[t][k] for t in table)
            for k in ("teacher", "student_kd_median", "student_ce_median")}
    mean["kept"] = mean["student_kd_median"] / mean["teacher"]
    wins = sum(d > 0 for t in table for d in table[t]["kd_minus_ce_per_seed"].values())
    speed = [serving(run, t, res["distill_from"], i) for t in table for i in range(a.serving_repeats)]
    speed_summary = {k: {"median": statistics.median(x[k] for x in speed), "min": min(x[k] for x in speed),
                         "max": max(x[k] for x in speed)} for k in speed[0]}
    record("distill_seeds", {"command": f"python -m benchmarks.distill_seeds --run {a.run} --seeds "
                                        f"{' '.join(map(str, a.seeds))} --serving-repeats {a.serving_repeats}",
                             "seeds": seeds, "per_target": table, "mean_of_medians": mean,
                             "kd_beats_ce": f"{wins} of {sum(len(table[t]['kd_minus_ce_per_seed']) for t in table)}",
                             "serving_speedups": speed_summary, "serving_measurements": len(speed)})


if __name__ == "__main__":
    main()
