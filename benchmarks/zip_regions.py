"""Small regions: does adapting a base to each small zip-code region beat the base as it is and training
on the region alone? Counts the regions where it does, and names every region where it loses.

It first runs (or finishes: the runner reuses done steps) ``crossrec experiment --config
launch/recipes/ml1m_zip_regions.yaml --out RUN --jobs N`` (MovieLens-1M
split by the first two zip digits; 14 target regions of 74-378 users; base on the other 3,897 users;
``none``, ``popularity``, ``scratch`` and ``lora`` with ``crossrec finetune``'s defaults). This script
reads each target's metrics.json: LoRA's and scratch's paired per-user NDCG@10 differences (95%
bootstrap over the region's test users) to zero-shot and the region's popularity list (the ``vs`` record
every run carries), LoRA vs scratch (paired here, from both runs' test ranks), and which step each kept.

    python -m benchmarks.zip_regions RUN --jobs 2            # the run, the table and the counts
    python -m benchmarks.zip_regions --choose USER_FILE      # the recipe's target list, from the zip codes
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

from benchmarks.common import BENCH, crossrec, record
from crossrec_dist.evaluation.bootstrap import interval_record, paired_on_users, per_user_ndcg


def choose(user_file: Path, low: int = 50, high: int = 400, first_digits: str = "56789") -> list[str]:
    """Two-digit zip regions with ``low``..``high`` users whose zip starts with one of ``first_digits``."""
    lines = user_file.read_text().splitlines()
    zip_col = [i for i, h in enumerate(lines[0].split("\t")) if h.startswith("zip")][0]
    counts = collections.Counter(row.split("\t")[zip_col][:2] for row in lines[1:])
    return sorted(z for z, n in counts.items() if re.fullmatch(r"\d\d", z) and low <= n <= high and z[0] in first_digits)


def per_user(metrics: dict):
    ranks = metrics["test_ranks"]
    return per_user_ndcg(ranks["seq_index"], ranks["rank"])


def region_row(folder: Path) -> dict:
    m = {name: json.loads((folder / name / "metrics.json").read_text()) for name in ("none", "popularity", "scratch", "lora")}
    lora_users, lora = per_user(m["lora"])
    scratch_users, scratch = per_user(m["scratch"])
    return {
        "users": m["none"]["test"]["users"],
        "test_ndcg@10": {k: round(v["test"]["ndcg@10"], 4) for k, v in m.items()},
        "lora_vs_zero_shot": m["lora"]["vs"]["zero-shot"]["test"],
        "lora_vs_popularity": m["lora"]["vs"]["popularity"]["test"],
        "lora_vs_scratch": interval_record(paired_on_users(lora_users, lora, scratch_users, scratch)),
        "scratch_vs_zero_shot": m["scratch"]["vs"]["zero-shot"]["test"],
        "lora_kept": m["lora"]["selection"]["kept"], "lora_kept_step": m["lora"]["selection"]["kept_step"],
        # the best validation LoRA reached, against the base's (what must_beat_base judged)
        "lora_best_seen": m["lora"]["selection"].get("best_seen"),
        "scratch_best_step": m["scratch"]["train"]["best_step"],
    }


def _cell(iv: dict) -> str:
    text = f"{iv['diff']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]"
    return text + (" n.s." if iv["verdict"] == "no significant difference" else "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, nargs="?", help="the experiment's --out folder")
    ap.add_argument("--choose", type=Path, help="print the target regions chosen from this user file and stop")
    ap.add_argument("--jobs", type=int, default=2, help="fine-tuning steps side by side (crossrec experiment --jobs)")
    a = ap.parse_args(argv)
    if a.choose:
        print(json.dumps(choose(a.choose)))
        return
    if a.run is None:
        ap.error("give the experiment's folder (or --choose USER_FILE)")
    crossrec("experiment", "--config", BENCH.parent / "launch" / "recipes" / "ml1m_zip_regions.yaml", "--out", a.run, "--jobs", str(a.jobs))
    rows = {t.name: region_row(t) for t in sorted((a.run / "targets").iterdir())
            if all((t / n / "metrics.json").is_file() for n in ("none", "popularity", "scratch", "lora"))}
    print("| region | users | zero-shot | popularity | scratch | LoRA (kept) | LoRA vs zero-shot | LoRA vs scratch |"
          " scratch vs zero-shot |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        n = r["test_ndcg@10"]
        print(f"| {name} | {r['users']} | {n['none']:.4f} | {n['popularity']:.4f} | {n['scratch']:.4f} | "
              f"{n['lora']:.4f} ({r['lora_kept']}, step {r['lora_kept_step']}) | {_cell(r['lora_vs_zero_shot'])} | "
              f"{_cell(r['lora_vs_scratch'])} | {_cell(r['scratch_vs_zero_shot'])} |")
    counts = {f"{key} {verdict}": sum(r[key]["verdict"] == verdict for r in rows.values())
              for key in ("lora_vs_zero_shot", "lora_vs_scratch", "scratch_vs_zero_shot", "lora_vs_popularity")
              for verdict in ("better", "worse", "no significant difference")}
    counts["lora kept the base"] = sum(r["lora_kept"] == "base" for r in rows.values())
    losses = sorted(name for name, r in rows.items()
                    if "worse" in (r["lora_vs_zero_shot"]["verdict"], r["lora_vs_scratch"]["verdict"]))
    print(f"\n{len(rows)} regions: " + "; ".join(f"{k}: {v}" for k, v in counts.items()))
    print("regions where LoRA loses to zero-shot or scratch: " + (", ".join(losses) or "none"))
    record("zip_regions", {"command": "python -m benchmarks.zip_regions " + " ".join(argv or sys.argv[1:]),
                           "regions": rows, "counts": counts, "losses": losses})


if __name__ == "__main__":
    main()
