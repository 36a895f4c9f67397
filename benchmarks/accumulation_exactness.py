"""How exact is gradient accumulation? The same 4 updates of the same global batch (64 windows of
ML-100K, dropout off, clipping at 0.05 so it acts on every update) trained as 1 x 64, as 4 x 16
accumulated (plain, ZeRO-2, ZeRO-3), and as 2 processes x 32 under ZeRO-3 with zero.Init.
Records the largest weight difference and the largest relative loss / grad-norm difference against
1 x 64 (tests/test_launch.py asserts 2e-5 / 1e-5 / 1e-4).
usage: python -m benchmarks.accumulation_exactness
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from benchmarks.common import ml100k, record

SAME = ["--preset", "tiny", "--set", "train.max_steps=4", "--set", "train.log_every=1", "--set", "train.tensorboard=false",
        "--set", "model.embedding_dropout=0", "--set", "model.attention_dropout=0", "--set", "train.warmup_ratio=0",
        "--set", "train.max_grad_norm=0.05"]
RUNS = {
    "1x64": ([], ["--set", "train.micro_batch_size=64"]),
    "4x16 plain": ([], ["--set", "train.micro_batch_size=16", "--set", "train.grad_accum=4"]),
    "4x16 zero2": ([], ["--set", "train.micro_batch_size=16", "--set", "train.grad_accum=4", "--set", "train.deepspeed=zero2"]),
    "4x16 zero3": ([], ["--set", "train.micro_batch_size=16", "--set", "train.grad_accum=4", "--set", "train.deepspeed=zero3"]),
    "2 procs x 32 zero3 zero.Init": (["--num_processes", "2", "--use_deepspeed", "--zero_stage", "3",
                                      "--zero3_init_flag", "true"], ["--set", "train.micro_batch_size=32"]),
    "2 procs x 16 x 2 accum zero2": (["--num_processes", "2", "--use_deepspeed", "--zero_stage", "2",
                                      "--gradient_accumulation_steps", "2"], ["--set", "train.micro_batch_size=16"]),
}


def history(out: Path, key: str) -> list[float]:
    return [h[key] for h in json.loads((out / "metrics.json").read_text())["history"] if key in h]


def main() -> None:
    data = ml100k()
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (launcher, args) in RUNS.items():
            out = Path(tmp) / name.replace(" ", "_")
            prefix = ([str(Path(sys.executable).parent / "accelerate"), "launch", *launcher, "-m", "crossrec_dist"]
                      if launcher else [sys.executable, "-m", "crossrec_dist"])
            subprocess.run([*prefix, "pretrain", "--data", str(data), "--out", str(out), *SAME, *args], check=True,
                           env=env, stdout=subprocess.DEVNULL)
            results[name] = out
        ref = results["1x64"]
        a = load_file(ref / "model.safetensors")
        rows = {}
        for name, out in results.items():
            b = load_file(out / "model.safetensors")
            rel = lambda x, y: max(abs(p - q) / abs(p) for p, q in zip(x, y))  # noqa: E731
            rows[name] = {"max_abs_weight_diff": max((a[k] - b[k]).abs().max().item() for k in a),
                          "max_rel_loss_diff": rel(history(ref, "loss"), history(out, "loss")),
                          "max_rel_grad_norm_diff": rel(history(ref, "grad_norm"), history(out, "grad_norm")),
                          "grad_norms": history(out, "grad_norm")}
            print(f"{name:>30}: weights {rows[name]['max_abs_weight_diff']:.2e}, loss {rows[name]['max_rel_loss_diff']:.2e}, "
                  f"grad norm {rows[name]['max_rel_grad_norm_diff']:.2e}")
    record("accumulation_exactness", {"command": "python -m benchmarks.accumulation_exactness", "runs": rows})


if __name__ == "__main__":
    main()
