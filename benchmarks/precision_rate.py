"""Pretraining rate in fp32 vs bf16 autocast on this machine's CPU, same steps, same loss.

``train.mixed_precision: bf16_if_native`` turns bf16 on where the CPU computes it natively
(AVX512-BF16 / AMX): the main job's `medium` base fits a CPU demo only because of it. This runs
``crossrec pretrain --preset medium`` for a fixed number of updates in each precision, alternated
(fp32, bf16, fp32, bf16, ...) so that a slower minute of the machine hits both, and records the
median training samples/s of each, their ratio, and the last logged training loss (the same data
order and seed, so the two losses must agree to a few digits if bf16 costs no accuracy).

usage: python -m benchmarks.precision_rate --data runs/ml_cross_platform/data [--domains ml1m]
           [--steps 60] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics

from benchmarks.common import OUT, crossrec, record
from crossrec_dist.engine.deepspeed_config import native_bf16


def one_run(data: str, domains: str, steps: int, precision: str, index: int) -> dict:
    out = OUT / f"precision_rate_{precision}_{index}"
    shutil.rmtree(out, ignore_errors=True)
    crossrec("pretrain", "--preset", "medium", "--data", data, "--domains", domains, "--out", out,
             "--set", f"train.max_steps={steps}", "--set", f"train.mixed_precision={precision}",
             "--set", "train.micro_batch_size=32", "--set", "train.log_every=20",
             "--set", "train.tensorboard=false", "--set", "model.item_bias=true")
    m = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in m["history"] if h.get("kind") == "train"]
    return {"precision": precision, "samples_per_second": m["train"]["samples_per_second"],
            "train_seconds": m["train"]["seconds"], "last_loss": losses[-1] if losses else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--domains", default="ml1m")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    runs = [one_run(a.data, a.domains, a.steps, p, i) for i in range(a.repeats) for p in ("no", "bf16")]
    med = {p: statistics.median(r["samples_per_second"] for r in runs if r["precision"] == p) for p in ("no", "bf16")}
    record("precision_rate", {
        "command": f"python -m benchmarks.precision_rate --data {a.data} --domains {a.domains} "
                   f"--steps {a.steps} --repeats {a.repeats}",
        "native_bf16": native_bf16(), "steps": a.steps,
        "median_samples_per_second": {"fp32": med["no"], "bf16": med["bf16"]},
        "bf16_over_fp32": round(med["bf16"] / med["no"], 3),
        "last_loss": {"fp32": runs[0]["last_loss"], "bf16": runs[1]["last_loss"]},
        "runs": runs,
    })


if __name__ == "__main__":
    main()
