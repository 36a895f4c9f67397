"""Is the gain from the teacher real or seed noise? Re-distil the students of a finished
``crossrec experiment`` run (default: the distillation study, launch/recipes/ml100k_distill.yaml) with
more seeds, KD and CE-only alike, same teacher, same configs; record per-seed and median test NDCG@10.
usage: python -m benchmarks.distill_seeds [--run runs/ml100k_distill] [--seeds 1 2]
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
            teacher = run / "targets" / target / json.loads((run / "results.json").read_text())["distill_from"]
            adapter = ["--adapter", teacher] if (teacher / "adapter_config.json").is_file() else []
            crossrec("distill", "--config", run / "configs" / f"{kind}.yaml", "--teacher",
                     run / "pretrain" if adapter else teacher, *adapter, "--data", run / "data", "--domain", target,
                     "--out", dest, "--set", f"train.seed={seed}", "--resume", "auto")
    return json.loads((dest / "metrics.json").read_text())["test"]["ndcg@10"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/ml100k_distill")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
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
        table[target] = row
    mean = {k: statistics.mean(table[t][f"{k}_median"] for t in table) for k in ("student_kd", "student_ce")}
    record("distill_seeds", {"command": f"python -m benchmarks.distill_seeds --run {a.run} --seeds "
                                        f"{' '.join(map(str, a.seeds))}", "seeds": seeds, "per_target": table,
                             "mean_of_medians": mean})


if __name__ == "__main__":
    main()
