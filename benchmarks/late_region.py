"""A region that arrives after pretraining, with titles the base never had: ``prepare --vocab-from``.

The main job prepares ML-1M and ML-100K together before pretraining, so the base's vocabulary already
lists ML-100K's 125 titles of its own (their rows untrained: ``untrained_items.json``). Here the base is
cut to the vocabulary a base pretrained on ML-1M alone has: the rows of the items its pretraining never
saw are removed (the rest of the model unchanged; a base trained without them differs only in that
their rows never took part in its softmax). ML-100K is then prepared against that base
(``crossrec prepare --vocab-from``): its own titles are appended as new items, and ``crossrec finetune``
(defaults, LoRA) gives them trainable rows grown from the mean row. Compared, per seed and paired over
ML-100K's 943 test users (matched by user id), with the same fine-tuning on ML-100K prepared against
the joint vocabulary (benchmarks/readaptation.py's "fresh" runs: the same seeds and settings) -- all
users, and the users whose test item is one of the late titles.

    python -m benchmarks.late_region --base runs/ml_cross_platform/pretrain \\
        --raw runs/ml_cross_platform/raw/ml100k --joint benchmarks/out/readaptation --seeds 0 1 --jobs 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from benchmarks.common import crossrec_logged as crossrec, record
from crossrec_dist.data.prepared import PreparedData
from crossrec_dist.evaluation.bootstrap import bootstrap_mean, paired_on_users, per_user_ndcg

DOMAIN = "ml100k"
QUIET = ["--set", "train.tensorboard=false", "--set", "train.log_every=1000"]


def cut_base(base: Path, out: Path) -> int:
    """``out``: ``base`` without the item rows its pretraining never trained. Returns the items removed."""
    if (out / "items.json").is_file():
        return len(json.loads((base / "items.json").read_text())) - len(json.loads((out / "items.json").read_text()))
    out.mkdir(parents=True, exist_ok=True)
    ids = json.loads((base / "items.json").read_text())
    untrained = set(json.loads((base / "untrained_items.json").read_text()))
    keep = [0] + [i for i in range(1, len(ids) + 1) if i not in untrained]
    weights = load_file(base / "model.safetensors")
    for name in ("item_embeddings.weight", "item_bias.weight"):
        if name in weights:
            weights[name] = weights[name][keep].contiguous()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_items"] = len(keep) - 1
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "items.json").write_text(json.dumps([ids[i - 1] for i in keep[1:]]))
    (out / "untrained_items.json").write_text("[]")
    return len(untrained)


def by_user(metrics: Path, data: PreparedData) -> dict:
    ranks = json.loads(metrics.read_text())["test_ranks"]
    seqs, ndcg = per_user_ndcg(ranks["seq_index"], ranks["rank"])
    ids = data.user_ids.to_pylist()
    return {str(ids[int(s)]): float(v) for s, v in zip(seqs, ndcg)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="a base pretrained on data that listed ML-100K's titles")
    ap.add_argument("--raw", type=Path, required=True, help="ML-100K's fetched log (crossrec data fetch)")
    ap.add_argument("--joint", type=Path, required=True, help="benchmarks.readaptation's --out (its fresh.seedS and p2)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/late_region"))
    a = ap.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    removed = cut_base(a.base, out / "base")
    if not (out / "data" / "stats.json").is_file():
        shutil.rmtree(out / "data", ignore_errors=True)
        crossrec(["prepare", "--input", a.raw, "--format", "auto", "--source-name", DOMAIN, "--domain-from", "source",
                  "--vocab-from", out / "base", "--out", out / "data"], out / "prepare.log", threads)

    def finetune(seed: int) -> Path:
        dest = out / f"late.seed{seed}"
        if not (dest / "metrics.json").is_file():
            crossrec(["finetune", "--base", out / "base", "--data", out / "data", "--domain", DOMAIN, "--method", "lora",
                      "--out", dest, "--set", f"train.seed={seed}", *QUIET], out / f"{dest.name}.log", threads)
        return dest / "metrics.json"

    with ThreadPoolExecutor(a.jobs) as pool:
        late_files = list(pool.map(finetune, a.seeds))
    late_data, joint_data = PreparedData(out / "data"), PreparedData(a.joint / "p2")
    base_items = len(json.loads((out / "base" / "items.json").read_text()))
    new_titles = int(late_data.num_items - base_items)
    # users whose test item is one of the late titles (past the cut base's vocabulary)
    ev = late_data.eval_set("test", [DOMAIN])
    ids = late_data.user_ids.to_pylist()
    on_new = {str(ids[int(s)]) for s, t in zip(ev.seq_index, ev.targets) if t > base_items}
    rows, per_seed = {}, []
    for seed, late_file in zip(a.seeds, late_files):
        late = by_user(late_file, late_data)
        joint = by_user(a.joint / f"fresh.seed{seed}" / "metrics.json", joint_data)
        users = sorted(set(late) & set(joint))
        for name, subset in (("all", users), ("test item late", [u for u in users if u in on_new])):
            la, jo = np.array([late[u] for u in subset]), np.array([joint[u] for u in subset])
            idx = np.arange(len(subset))
            rows[f"seed {seed}, {name}"] = {"users": len(subset), "late": bootstrap_mean(la).text(),
                                            "joint": bootstrap_mean(jo).text(),
                                            "late - joint": paired_on_users(idx, la, idx, jo).diff_text()}
        m = json.loads(late_file.read_text())
        per_seed.append({"seed": seed, "kept": m["selection"]["kept"], "best_step": m["train"]["best_step"],
                         "new_items": m["new_items"], "trainable_rows": m["trainable_rows"],
                         "test_ndcg@10": m["test"]["ndcg@10"]})
    for k, v in rows.items():
        print(k, v)
    record("late_region", {"command": "python -m benchmarks.late_region " + " ".join(argv or sys.argv[1:]),
                           "rows_removed_from_base": removed, "late_titles": new_titles,
                           "users_with_late_test_item": len(on_new), "runs": per_seed, "rows": rows})


if __name__ == "__main__":
    main()
