"""Sampled softmax on a 5,000,000-item catalogue, on CPU, within memory; full vs sampled on ML-100K.

Part 1 (large): a synthetic log in which every one of ``--items`` items occurs (numpy, written as
Parquet, then ``crossrec prepare --split temporal``; ``crossrec data synth`` draws items by a
within-cluster popularity with no coverage guarantee, so at ~2 interactions per item a sizeable share
of a 5M catalogue would never occur and ``prepare``, which keeps only items that occur, would drop it). Then
``crossrec pretrain --set model.loss=sampled`` runs ``--steps`` optimizer steps of the real CLI in a
child process; its peak RSS (``wait4`` ru_maxrss, plus a psutil sampler that splits training from
evaluation), steps/s and the item-table bytes are recorded. Full softmax is not run at this size: the
logits alone would need batch x seq x (N+1) x 4 bytes (printed), and one probe step under an address-
space limit shows the allocation failing at the toolkit's 4,096-token chunk.
Only ``--eval-users`` sequences have events after the temporal cuts, so full-ranking evaluation
(users x 5M scores, ``--eval-batch`` users at a time) stays around a minute per pass.

Part 2 (small): the same preset on MovieLens-100K with ``model.loss=full`` vs ``sampled``, the same
budget (``--small-steps`` optimizer steps, same micro-batch, validation every epoch, best valid
checkpoint, no early stop), test NDCG@10 over several seeds.

usage: DS_ACCELERATOR=cpu python -m benchmarks.large_catalogue [--items 5000000] [--steps 200]
       [--preset tiny] [--small-preset tiny] [--small-steps 300] [--seeds 0 1 2] [--skip-large] [--skip-small]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import OUT, ml100k, record

T_VALID = 1_700_000_000      # every interaction of a non-evaluation user is before this time
T_TEST = 1_700_100_000


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def write_catalogue_log(out: Path, items: int, users: int, mean_length: float, eval_users: int,
                        seed: int = 0, skew: float = 3.0, walk: float = 0.5) -> Path:
    """A log over ``items`` items in which every item occurs at least once.

    Sequences are random walks over a popularity ranking: with probability ``walk`` the next item is
    1-3 ranks after the previous one, otherwise a fresh popularity draw (rank = items * U**skew).
    ``items`` randomly chosen positions are then overwritten with a permutation of all items, so
    ``prepare`` keeps the whole catalogue. The last two events of ``eval_users`` users are placed
    after T_VALID and T_TEST (valid and test targets of a temporal split); everyone else is training only.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.geometric(1.0 / mean_length, users), 5, int(8 * mean_length)).astype(np.int64)
    total = int(lengths.sum())
    if total < 1.5 * items:
        raise ValueError(f"{total:,} interactions cannot cover {items:,} items with room for structure; "
                         f"raise --users or --mean-length")
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    fresh = np.minimum((items * rng.random(total) ** skew).astype(np.int64), items - 1)
    step = rng.integers(1, 4, total)
    reset = rng.random(total) >= walk
    reset[starts] = True
    # rank_t = fresh rank at the last reset + steps taken since it (a segmented cumulative sum)
    last_reset = np.maximum.accumulate(np.where(reset, np.arange(total), 0))
    csum = np.cumsum(np.where(reset, 0, step))
    rank = (fresh[last_reset] + csum - csum[last_reset]) % items
    del fresh, step, reset, last_reset, csum
    order = rng.permutation(items)               # popularity rank -> item id
    item = order[rank]
    del rank
    cover = rng.choice(total, size=items, replace=False)
    item[cover] = rng.permutation(items)
    del cover
    user = np.repeat(np.arange(users, dtype=np.int64), lengths)
    pos = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    base = 1_600_000_000 + rng.integers(0, 50_000_000, users)
    ts = base[user] + 60 * pos
    ev = rng.choice(users, size=min(eval_users, users), replace=False)
    last = starts[ev] + lengths[ev] - 1
    ts[last - 1] = T_VALID + np.arange(len(ev))
    ts[last] = T_TEST + np.arange(len(ev))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "interactions.parquet"
    pq.write_table(pa.table({"user_id": user, "item_id": item + 1, "timestamp": ts}), path,
                   row_group_size=1 << 20)
    (out / "synth.json").write_text(json.dumps({"items": items, "users": users, "interactions": total,
                                                "eval_users": len(ev), "seed": seed, "skew": skew, "walk": walk}))
    return path


def prepared_catalogue(items: int, users: int, mean_length: float, eval_users: int, tag: str) -> Path:
    raw, prep = OUT / f"{tag}_raw", OUT / tag
    want = {"items": items, "users": users, "eval_users": eval_users}
    meta = raw / "synth.json"
    if not (meta.is_file() and all(json.loads(meta.read_text()).get(k) == v for k, v in want.items())):
        t0 = time.perf_counter()
        write_catalogue_log(raw, items, users, mean_length, eval_users)
        print(f"wrote synthetic log ({time.perf_counter() - t0:.1f}s) -> {raw}", flush=True)
        if (prep / "stats.json").is_file():
            (prep / "stats.json").unlink()
    if not (prep / "stats.json").is_file():
        run_measured([sys.executable, "-m", "crossrec_dist", "prepare", "--input", raw / "interactions.parquet",
                      "--format", "parquet", "--out", prep, "--split", "temporal",
                      "--temporal-valid", str(T_VALID), "--temporal-test", str(T_TEST)])
    stats = json.loads((prep / "stats.json").read_text())
    if stats["items"] != items:
        raise RuntimeError(f"prepared catalogue has {stats['items']:,} items, expected {items:,}")
    return prep


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def run_measured(cmd, log_path: Path | None = None, env: dict | None = None, marker: str | None = None) -> dict:
    """Run ``cmd``; peak RSS of the child (wait4 ru_maxrss) and an RSS time line sampled every 0.5 s.
    With ``marker``, also the time at which that text first appears in the log (e.g. the first
    validation line, which ends the training phase of a run that validates only at its end)."""
    import psutil

    cmd = [str(c) for c in cmd]
    out = open(log_path, "w") if log_path else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out or None, stderr=subprocess.STDOUT if out else None,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})})
    samples: list[tuple[float, int]] = []
    marked: list[float] = []
    done = threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not done.is_set():
            if marker and log_path and not marked:
                try:
                    if marker in Path(log_path).read_text():
                        marked.append(time.perf_counter() - t0)
                except OSError:
                    pass
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                samples.append((time.perf_counter() - t0, rss))
            except psutil.Error:
                pass
            done.wait(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if out:
        out.close()
    if proc.returncode != 0:
        tail = Path(log_path).read_text()[-4000:] if log_path else ""
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode})\n{tail}")
    res = {"wall_seconds": round(time.perf_counter() - t0, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
           "rss_samples": samples}
    if marker:
        res["marker_seconds"] = marked[0] if marked else None
        before = [r for t, r in samples if marked and t < marked[0]]
        res["peak_rss_before_marker_bytes"] = max(before) if before else None
    return res


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def full_softmax_probe(items: int, hidden: int, tokens: int, limit_gib: int = 16) -> dict:
    """One full-softmax loss + backward over ``items`` rows in a child process whose address space is
    capped at ``limit_gib``: the first 4,096-token chunk's logits cannot be allocated."""
    code = f"""
import resource, torch, json, time
resource.setrlimit(resource.RLIMIT_AS, ({limit_gib} << 30, {limit_gib} << 30))
from crossrec_dist.models.losses import full_softmax
torch.manual_seed(0)
w = torch.randn({items} + 1, {hidden}, requires_grad=True)
h = torch.randn({tokens}, {hidden}, requires_grad=True)
y = torch.randint(1, {items} + 1, ({tokens},))
t0 = time.perf_counter()
try:
    full_softmax(h, w, y).backward()
    print(json.dumps({{"ok": True, "seconds": time.perf_counter() - t0}}))
except RuntimeError as e:
    print(json.dumps({{"ok": False, "error": str(e).splitlines()[0][:300]}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": f"child exited {p.returncode}: {p.stderr.strip()[-300:]}"}


def pretrain_cmd(preset: str, data: Path, out: Path, sets: dict) -> list:
    cmd = [sys.executable, "-m", "crossrec_dist", "pretrain", "--preset", preset, "--data", data, "--out", out]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


# ---------------------------------------------------------------------------------------------
# part 1: 5M items
# ---------------------------------------------------------------------------------------------
def large_part(a) -> dict:
    from crossrec_dist.models.presets import PRESETS
    from crossrec_dist.models.sizing import count_parameters, preset_config

    tag = f"catalogue_{a.items // 1_000_000}m" if a.items % 1_000_000 == 0 else f"catalogue_{a.items}"
    t0 = time.perf_counter()
    data = prepared_catalogue(a.items, a.users, a.mean_length, a.eval_users, tag)
    prep_seconds = time.perf_counter() - t0
    stats = json.loads((data / "stats.json").read_text())
    hidden, max_len = PRESETS[a.preset]["hidden_size"], PRESETS[a.preset]["max_len"]
    n_params = count_parameters(preset_config(a.preset, num_items=a.items))
    table = (a.items + 1) * hidden * 4
    tokens = a.micro_batch * max_len
    logits_bytes = tokens * (a.items + 1) * 4
    chunk_bytes = min(tokens, 4096) * (a.items + 1) * 4

    run_dir = OUT / f"large_catalogue_{a.preset}_sampled"
    sets = {"model.loss": "sampled", "model.num_negatives": a.negatives, "train.max_steps": a.steps,
            "train.micro_batch_size": a.micro_batch, "train.eval_batch_size": a.eval_batch,
            "train.log_every": math.gcd(a.steps, 20), "train.tensorboard": "false", "train.patience": 0,
            "train.seed": 0}
    print(f"[large] {a.items:,} items, {stats['interactions']:,} interactions; pretrain {a.steps} steps ...", flush=True)
    meas = run_measured(pretrain_cmd(a.preset, data, run_dir, sets), log_path=OUT / f"{run_dir.name}.log",
                        # the log line of the last step, written just before the (only) validation starts
                        marker=f"step {a.steps}/{a.steps} epoch")
    m = json.loads((run_dir / "metrics.json").read_text())
    train = m["train"]
    train_s = train["seconds"] - train["eval_seconds"]
    hist = [h for h in m.get("history", []) if "loss" in h]
    log = (OUT / f"{run_dir.name}.log").read_text()
    steps_per_s = train["steps"] / train_s if train_s > 0 else float("nan")
    probe = full_softmax_probe(a.items, hidden, tokens) if a.probe else None
    res = {
        "items": a.items, "interactions": stats["interactions"], "sequences": stats["sequences"],
        "eval_users": a.eval_users, "prepare_seconds_incl_synthesis": round(prep_seconds, 1),
        "preset": a.preset, "hidden_size": hidden, "max_len": max_len, "params_total": n_params,
        "item_table_bytes": table, "model_state_bytes_fp32_adam": 16 * n_params,
        "micro_batch": a.micro_batch, "num_negatives": a.negatives,
        "steps": train["steps"], "train_seconds": round(train_s, 1), "steps_per_second": round(steps_per_s, 3),
        "samples_per_second": train["samples_per_second"],
        "loss_first_logged": hist[0]["loss"] if hist else None, "loss_last_logged": hist[-1]["loss"] if hist else None,
        "loss_history": [(h["step"], round(h["loss"], 4)) for h in hist],
        "peak_rss_bytes": meas["peak_rss_bytes"], "wall_seconds": meas["wall_seconds"],
        "training_phase_seconds": meas.get("marker_seconds"),
        "peak_rss_training_sampled_bytes": meas.get("peak_rss_before_marker_bytes"),
        "rss_timeline_gib": [(round(t, 1), round(r / 2**30, 2)) for t, r in meas["rss_samples"][::4]],
        "test": {k: m["test"][k] for k in ("ndcg@10", "hr@10", "users") if k in m["test"]},
        "full_softmax_logits_bytes_at_same_batch": logits_bytes,
        "full_softmax_one_chunk_logits_bytes": chunk_bytes,
        "full_softmax_probe": probe,
        "command": " ".join(map(str, pretrain_cmd(a.preset, data, run_dir, sets)[1:])),
        "log_tail": log[-1500:],
    }
    return res


# ---------------------------------------------------------------------------------------------
# part 2: full vs sampled on ML-100K
# ---------------------------------------------------------------------------------------------
def small_part(a) -> dict:
    data = ml100k(domain_rule=None)
    runs = []
    for loss in ("full", "sampled"):
        for seed in a.seeds:
            out = OUT / f"large_catalogue_ml100k_{a.small_preset}_{loss}_seed{seed}"
            sets = {"model.loss": loss, "model.num_negatives": a.negatives, "train.max_steps": a.small_steps,
                    "train.seed": seed, "train.patience": 0, "train.tensorboard": "false", "train.log_every": 50}
            print(f"[ml100k] {a.small_preset} loss={loss} seed={seed} ...", flush=True)
            meas = run_measured(pretrain_cmd(a.small_preset, data, out, sets), log_path=OUT / f"{out.name}.log")
            m = json.loads((out / "metrics.json").read_text())
            runs.append({"loss": loss, "seed": seed, "test_ndcg@10": m["test"]["ndcg@10"], "test_hr@10": m["test"]["hr@10"],
                         "best_step": m["train"]["best_step"], "steps": m["train"]["steps"],
                         "train_seconds": round(m["train"]["seconds"] - m["train"]["eval_seconds"], 1),
                         "peak_rss_bytes": meas["peak_rss_bytes"]})
    summary = {}
    for loss in ("full", "sampled"):
        rs = [r for r in runs if r["loss"] == loss]
        summary[loss] = {"median_test_ndcg@10": statistics.median(r["test_ndcg@10"] for r in rs),
                         "median_test_hr@10": statistics.median(r["test_hr@10"] for r in rs),
                         "median_train_seconds": statistics.median(r["train_seconds"] for r in rs),
                         "median_peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in rs),
                         "per_seed_ndcg@10": [round(r["test_ndcg@10"], 4) for r in rs]}
    return {"preset": a.small_preset, "steps": a.small_steps, "seeds": a.seeds, "num_negatives": a.negatives,
            "items": 1682, "runs": runs, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=5_000_000)
    ap.add_argument("--users", type=int, default=250_000)
    ap.add_argument("--mean-length", type=float, default=40.0)
    ap.add_argument("--eval-users", type=int, default=1000)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--micro-batch", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=32, help="users per full-ranking batch (32 x 5M x 4 B = 640 MB)")
    ap.add_argument("--negatives", type=int, default=1024)
    ap.add_argument("--no-probe", dest="probe", action="store_false")
    ap.add_argument("--small-preset", default="tiny")
    ap.add_argument("--small-steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-small", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    large = None if a.skip_large else large_part(a)
    small = None if a.skip_small else small_part(a)
    result = {"command": "DS_ACCELERATOR=cpu python -m benchmarks.large_catalogue " + " ".join(sys.argv[1:]),
              "seconds": round(time.perf_counter() - t0, 1), "large": large, "small": small}
    path = record("large_catalogue", result)
    print()
    print(markdown(result))
    print(f"\nraw: {path}")


def _f(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(r: dict) -> str:
    lines = []
    L = r.get("large")
    if L:
        lines += [f"### Sampled softmax, {L['items']:,}-item catalogue ({L['preset']}, hidden {L['hidden_size']}, CPU, 1 process)", "",
                  "| quantity | value |", "| --- | --- |",
                  f"| interactions / sequences | {L['interactions']:,} / {L['sequences']:,} |",
                  f"| parameters (item table + body) | {L['params_total']:,} |",
                  f"| item table (N+1) x H x 4 B | {gib(L['item_table_bytes'])} |",
                  f"| model states, fp32 + AdamW (16 B/param) | {gib(L['model_state_bytes_fp32_adam'])} |",
                  f"| batch | {L['micro_batch']} windows x {L['max_len']} = {L['micro_batch'] * L['max_len']:,} tokens, "
                  f"{L['num_negatives']} random negatives + in-batch, logQ |",
                  f"| steps / train seconds / steps per s | {L['steps']} / {L['train_seconds']} / {L['steps_per_second']} |",
                  f"| loss first -> last logged | {_f(L['loss_first_logged'])} -> {_f(L['loss_last_logged'])} |",
                  f"| peak RSS while training (psutil, sampled every 0.5 s, up to the last step's log line) | "
                  f"{gib(L['peak_rss_training_sampled_bytes']) if L.get('peak_rss_training_sampled_bytes') else 'n/a'} |",
                  f"| peak RSS of the whole run (ru_maxrss; training + validation + final valid/test eval) | "
                  f"{gib(L['peak_rss_bytes'])} |",
                  f"| test NDCG@10 / HR@10 ({L['test'].get('users')} users, ranking all items) | "
                  f"{L['test'].get('ndcg@10', 0):.4f} / {L['test'].get('hr@10', 0):.4f} |",
                  f"| full-softmax logits at the same batch: {L['micro_batch'] * L['max_len']:,} x {L['items'] + 1:,} x 4 B | "
                  f"{gib(L['full_softmax_logits_bytes_at_same_batch'])} |",
                  f"| one 4,096-token chunk of them (the toolkit's checkpointed chunk) | {gib(L['full_softmax_one_chunk_logits_bytes'])} |"]
        p = L.get("full_softmax_probe")
        if p:
            lines.append(f"| full-softmax probe step (16 GiB address-space cap) | "
                         f"{'ran in %.1f s' % p['seconds'] if p.get('ok') else 'failed: ' + p.get('error', '')} |")
        lines.append("")
    S = r.get("small")
    if S:
        lines += [f"### Full vs sampled softmax on MovieLens-100K ({S['preset']}, {S['steps']} steps each, "
                  f"{S['num_negatives']} negatives, seeds {S['seeds']})", "",
                  "| loss | median test NDCG@10 | median test HR@10 | per-seed NDCG@10 | median train s (shared CPU, noisy) | median peak RSS |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for loss, s in S["summary"].items():
            lines.append(f"| {loss} | {s['median_test_ndcg@10']:.4f} | {s['median_test_hr@10']:.4f} | "
                         f"{', '.join(f'{x:.4f}' for x in s['per_seed_ndcg@10'])} | {s['median_train_seconds']} | "
                         f"{gib(s['median_peak_rss_bytes'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
