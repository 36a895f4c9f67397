"""The ``1b`` preset, actually trained on this CPU machine: 2 processes, DeepSpeed ZeRO-3, built
partitioned (zero.Init), gradient checkpointing, ML-100K region "other".

The run is the one a user would do: ``accelerate launch ... crossrec pretrain --preset 1b`` with a
checkpoint every few updates; it is sent USR1 (what Slurm sends before a time limit) once it has
logged ``--preempt-after`` updates, checkpoints and exits; the same command again resumes from the
checkpoint and finishes ``--steps`` updates, writes the consolidated model and evaluates it; then one
plain process loads that model with ``from_pretrained`` (``crossrec evaluate``) and evaluates it again.

Recorded: parameters; DeepSpeed's own estimate of model-state memory
(``estimate_zero3_model_states_mem_needs``, the function behind
``estimate_zero3_model_states_mem_needs_all_live``) for 2 processes on one node, and what one process
would need; each rank's peak RSS (sampled from /proc every 0.5 s, and VmHWM) in both runs; seconds
per update; the loss curve; checkpoint size; the one-process load's peak RSS and its metrics.

usage: python -m benchmarks.train_1b_cpu [--steps 16] [--preempt-after 8] [--checkpoint-every 4]
       [--ds-config ds_configs/zero3_bf16_lowmem.json] [--preset 1b] [--micro-batch 2]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import OUT, RankMemory, ml100k, record

REPO = Path(__file__).resolve().parent.parent
# ML-100K's smallest region (18 users, ~45 training windows): an epoch is ~11 updates, so the second
# epoch revisits the first one's windows and a falling loss is visible through 4-sequence batches; its
# evaluation by a 1.2B model on 2 cores takes seconds, not minutes.
DOMAIN = "other"


def estimates(preset: str, num_items: int, max_len: int, layers: int = 0) -> dict:
    """DeepSpeed's estimate for this model (meta device: nothing is allocated)."""
    import torch
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.models.presets import preset_config
    with torch.device("meta"):
        model = CrossRecModel(preset_config(preset, num_items=num_items, max_len=max_len,
                                            **({"num_layers": layers} if layers else {})))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    out = {"parameters": total, "largest_layer_parameters": largest}
    for world in (1, 2):
        for offload_opt, offload_params in ((False, False), (True, False), (True, True)):
            cpu, dev, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=world,
                                                                cpu_offload=offload_opt,
                                                                cpu_offload_params=offload_params, zero_init=True)
            # The CPU accelerator's "device" memory is this machine's RAM too: per rank = device share,
            # per node = world x device + host part.
            key = f"world{world}_offload_opt{int(offload_opt)}_params{int(offload_params)}"
            out[key] = {"host_gib": round(cpu / 2**30, 2), "per_rank_device_gib": round(dev / 2**30, 2),
                        "node_total_gib": round((cpu + world * dev) / 2**30, 2)}
    return out


def launch_cmd(a, data: Path, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
            "--use_deepspeed", "--deepspeed_config_file", a.ds_config, "--zero3_init_flag", "true",
            "--main_process_port", str(a.port), "-m", "crossrec_dist", "pretrain", "--data", str(data),
            "--out", str(out), "--preset", a.preset, "--domains", DOMAIN, "--resume", "auto",
            "--set", f"model.max_len={a.max_len}", "--set", f"train.micro_batch_size={a.micro_batch}",
            "--set", "train.gradient_checkpointing=true", "--set", f"train.max_steps={a.steps}",
            "--set", f"train.checkpoint_every={a.checkpoint_every}", "--set", "train.log_every=1",
            "--set", f"train.eval_batch_size={a.eval_batch}", "--set", "train.rank_report=true",
            "--set", "train.tensorboard=false", "--set", f"train.lr={a.lr}", "--set", "train.warmup_steps=2",
            *(["--set", f"model.num_layers={a.layers}"] if a.layers else [])]


def run(cmd: list[str], env: dict, log: Path, preempt_after: int = 0) -> tuple[int, float, RankMemory, str]:
    t0 = time.perf_counter()
    with RankMemory(interval=0.5) as sampler, open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        sent = False
        while proc.poll() is None:
            time.sleep(1)
            if preempt_after and not sent and re.search(rf"^step {preempt_after}/\d+ ", log.read_text(errors="replace"),
                                                        re.M):
                sampler.signal(signal.SIGUSR1)
                sent = True
        rc = proc.wait()
    return rc, time.perf_counter() - t0, sampler, log.read_text(errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--layers", type=int, default=0, help="override the preset's number of layers (size probes)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--preempt-after", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--ds-config", default="ds_configs/zero3_bf16_lowmem.json")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--port", type=int, default=29733)
    ap.add_argument("--out", default=str(OUT / "train_1b_cpu_run"))
    ap.add_argument("--name", default="train_1b_cpu")
    a = ap.parse_args()
    data = ml100k()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    num_items = json.loads((data / "meta.json").read_text())["num_items"]
    est = estimates(a.preset, num_items, a.max_len, a.layers)
    print(json.dumps(est, indent=2), flush=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576",
           "PYTHONUNBUFFERED": "1"}
    cmd = launch_cmd(a, data, out / "model")
    result = {"command": " ".join(cmd), "estimate": est, "ds_config": json.loads((REPO / a.ds_config).read_text())}

    rc1, s1, samp1, log1 = run(cmd, env, out / "run1.log", preempt_after=a.preempt_after)
    stopped = re.search(r"preempted by signal at step (\d+): checkpoint saved to (\S+?);", log1)
    result["run1"] = {"rc": rc1, "seconds": round(s1, 1), "rank_peak_rss_mib": [r["VmHWM"] for r in samp1.ranks()],
                      "stopped_at": int(stopped.group(1)) if stopped else None}
    print(json.dumps(result["run1"]), flush=True)
    if a.preempt_after and not stopped:
        print(log1[-4000:])
        record(a.name, result)
        sys.exit("the first run was not preempted as planned")
    if stopped:
        ckpt = Path(stopped.group(2))
        result["checkpoint_gib"] = round(sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**30, 2)
        rc2, s2, samp2, log2 = run(cmd, env, out / "run2.log")
    else:                      # --preempt-after 0: one run start to end (size probes)
        rc2, s2, samp2, log2 = rc1, s1, samp1, log1
    resumed = re.search(r"resumed from (\S+) at step (\d+)", log2)
    result["run2"] = {"rc": rc2, "seconds": round(s2, 1), "rank_peak_rss_mib": [r["VmHWM"] for r in samp2.ranks()],
                      "resumed_at": int(resumed.group(2)) if resumed else None}
    print(json.dumps(result["run2"]), flush=True)
    if rc2 != 0:
        print(log2[-4000:])
        record(a.name, result)
        sys.exit("the resumed run failed")
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    steps = [h for h in metrics["history"] if h.get("kind") == "train"]
    per_update = [a.micro_batch * 2 / h["samples_per_second"] for h in steps]
    result["losses"] = [round(h["loss"], 4) for h in steps]
    result["seconds_per_update_median"] = round(statistics.median(per_update), 1)
    result["seconds_per_update"] = [round(x, 1) for x in per_update]
    result["test"] = metrics["test"]
    result["params"] = metrics["params"]
    result["ranks"] = [json.loads((out / "model" / "ranks" / f"rank{r}.json").read_text())["memory"] for r in (0, 1)]
    result["model_file_gib"] = round((out / "model" / "model.safetensors").stat().st_size / 2**30, 2)

    # One plain process: from_pretrained on the consolidated model, evaluated on the same users.
    ev_cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "crossrec_dist", "evaluate", "--model", str(out / "model"),
              "--data", str(data), "--domain", DOMAIN, "--out", str(out / "evaluate.json"), "--batch-size", "32"]
    t0 = time.perf_counter()
    proc = subprocess.run(ev_cmd, capture_output=True, text=True, cwd=REPO, env=env)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    result["one_process_load"] = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                                  "peak_rss_mib": round(int(peak.group(1)) / 1024, 1) if peak else None,
                                  "command": " ".join(ev_cmd[2:])}
    if proc.returncode == 0 and (out / "evaluate.json").is_file():
        result["one_process_load"]["metrics"] = json.loads((out / "evaluate.json").read_text())
    else:
        result["one_process_load"]["stderr"] = proc.stderr[-3000:]
    record(a.name, result)


if __name__ == "__main__":
    main()
