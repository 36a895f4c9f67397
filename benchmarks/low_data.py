"""How much target data transfer needs (RESULTS §2.11): the main job at 1 / 5 / 25 / 100% of the target's
users, three seeds, and the tables RESULTS quotes, from one command.

1. Unless ``--skip-run``: ``crossrec experiment`` with the main job's recipe and the study's overrides (3
   seeds; fractions 1/5/25/100%; zero-shot, popularity, scratch, full, LoRA; no students) into ``--study``.
   Run into the `make demo` folder it reuses the finished steps there and adds the rest (about 3 h on 2 cores).
2. From the study folder: per method and fraction, the median test NDCG@10 over seeds and each seed's; the
   paired difference (95% bootstrap over users, seed-averaged per user) of full and LoRA against scratch and
   zero-shot; and for every trained run the step validation kept (``(base)``: the guard kept the base) and
   the number of training users. Printed as the Markdown tables of RESULTS §2.11, and recorded as JSON.

usage: python -m benchmarks.low_data --study runs/ml_cross_platform [--skip-run] [--target ml100k] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import record
from crossrec_dist.experiment.layout import run_folder
from crossrec_dist.experiment.recipe import load_recipe
from crossrec_dist.experiment.report import fraction_curve, fraction_pairs

RECIPE = "launch/recipes/ml_cross_platform.yaml"
OVERRIDES = ["seeds=[0,1,2]", "fractions=[0.01,0.05,0.25,1.0]", "methods=[none,popularity,scratch,full,lora]",
             "fraction_methods=[popularity,scratch,full,lora]", "distill=null"]
TRAINED = ("scratch", "full", "lora")


def _interval(iv: dict) -> str:
    text = f"{iv['diff']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]"
    return text + (" n.s." if iv["verdict"] == "no significant difference" else "")


def _record(study: Path, target: str, method: str, seeds: list[int], seed: int, fraction: float) -> dict:
    return json.loads((study / "targets" / target / run_folder(method, seeds, seed, fraction) / "metrics.json")
                      .read_text())


def tables(study: Path, recipe, target: str) -> tuple[str, dict]:
    curve, pairs = fraction_curve(study, recipe, target), fraction_pairs(study, recipe, target)
    seeds, fractions = list(recipe.seeds), sorted(recipe.fractions)
    keys = [f"{f:g}" for f in fractions]
    head = " | ".join(f"{f:.0%} users" for f in fractions)
    lines = [f"| method | {head} |", "| --- |" + " --- |" * len(fractions)]
    runs: dict = {}
    for m in recipe.methods:
        cells = []
        for f, key in zip(fractions, keys):
            point = curve.get(m, {}).get(key) or curve.get(m, {}).get("1")
            if point is None:
                cells.append("-")
                continue
            if m in curve and key in curve[m] and m in recipe.fraction_methods:
                per_seed = [_record(study, target, m, seeds, s, f)["test"]["ndcg@10"] for s in seeds]
                cells.append(f"{point['median']:.4f} ({', '.join(f'{v:.4f}' for v in per_seed)})")
            else:
                cells.append(f"{point['median']:.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"| method | vs | {head} |", "| --- | --- |" + " --- |" * len(fractions)]
    for m in [m for m in ("full", "lora") if m in pairs]:
        for ref in ("scratch", "none"):
            cells = [_interval(pairs[m][k][ref]) if ref in pairs[m].get(k, {}) else "-" for k in keys]
            lines.append(f"| {m} | {'zero-shot' if ref == 'none' else ref} | " + " | ".join(cells) + " |")
    lines += ["", f"| method | {head} |", "| --- |" + " --- |" * len(fractions)]
    for m in [m for m in TRAINED if m in recipe.methods]:
        cells = []
        for f in fractions:
            kept, users = [], "all"
            for s in seeds:
                rec = _record(study, target, m, seeds, s, f)
                sel = rec.get("selection", {})
                kept.append(f"{sel.get('kept_step')}{' (base)' if sel.get('kept') == 'base' else ''}")
                users = rec.get("train_users") or "all"
            runs.setdefault(m, {})[f"{f:g}"] = {"kept_steps": kept, "train_users": users}
            cells.append(f"{', '.join(kept)}; {users} users")
        lines.append(f"| {m} kept steps | " + " | ".join(cells) + " |")
    return "\n".join(lines), {"fractions": curve, "fraction_pairs": pairs, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="the experiment folder (e.g. the `make demo` one)")
    ap.add_argument("--target", default="ml100k")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--skip-run", action="store_true", help="tabulate a finished study only")
    a = ap.parse_args()
    study = Path(a.study)
    command = [sys.executable, "-m", "crossrec_dist", "experiment", "--config", RECIPE, "--out", str(study),
               "--jobs", str(a.jobs), *[x for o in OVERRIDES for x in ("--set", o)]]
    if not a.skip_run:
        subprocess.run(command, check=True)
    recipe = load_recipe(RECIPE, OVERRIDES)
    text, result = tables(study, recipe, a.target)
    print(text)
    record("low_data", {"command": " ".join(command[2:]), "study": str(study), "target": a.target, **result})


if __name__ == "__main__":
    main()
