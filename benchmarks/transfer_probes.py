"""Does the cross-platform verdict depend on the base? Re-run the main job's adaptation with other bases.

The main job (`make demo`, launch/recipes/ml_cross_platform.yaml) varies fine-tuning seeds on *one*
pretrained base. This script asks what a different base changes, with the study's own configs
(``STUDY/configs/*.yaml``) and the real commands (``crossrec pretrain`` / ``crossrec finetune``):

- ``base_seedN``: the same base recipe pretrained with ``train.seed=N`` (same data, same users, so
  the study's own scratch runs are the paired reference);
- ``body_lL_fF[_hH]``: a bigger body, the base recipe with ``model.num_layers=L`` and
  ``model.intermediate_size=F`` (and ``model.hidden_size=H``, one head per 64 dimensions: a wider
  item table too); scratch is trained in the same shape;
- ``body_lL_fF[_hH]_sN``: that body pretrained with ``train.seed=N``; its reference is the scratch
  runs of the probe without ``_sN`` (scratch does not depend on the base);
- ``shared_source``: the source (ML-1M) restricted to the titles the target (ML-100K) also has, so the
  base never learns from films the target platform never saw (1998-2000 releases among them). Its data
  differs from the study's, so it trains its own scratch model as the reference.

Each probe writes ``OUT/<probe>/{data,pretrain,ft/<method>}``; finished steps (a ``metrics.json``) are
reused, so a second run only prints the table. Output: a markdown table per probe (test NDCG@10 with a
95% bootstrap interval over the 943 test users, the selected step, trainable parameters, and paired
differences vs zero-shot, scratch and full) and ``OUT/summary.json``.

usage: python -m benchmarks.transfer_probes --study runs/ml_cross_platform
       [--probes base_seed1 base_seed2 shared_source] [--methods none full head lora lora_r8 lora_r8.seed1 full+train.lr=0.0002 ...]
       [--out benchmarks/out/transfer_probes]
Probe and method-variant names are read by ``crossrec_dist.analysis.probes``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from crossrec_dist.analysis.probes import BODY, method_variant, methods_order, scratch_runs_in, seedless
from crossrec_dist.errors import InputError
from crossrec_dist.evaluation.bootstrap import aligned, bootstrap_mean, paired_difference

TARGET, SOURCE = "ml100k", "ml1m"


def run(cmd: list[str], log: Path) -> float:
    """Run one crossrec command, its output to ``log``; stop with the log's tail if it fails."""
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}\n" + "".join(log.read_text().splitlines(True)[-15:]))
    return time.time() - t0


def crossrec(*args: str) -> list[str]:
    return [sys.executable, "-m", "crossrec_dist", *args]


def shared_source_data(study: Path, out: Path) -> Path:
    """The study's two fetched logs, the source's rows kept only where the title is also the target's."""
    import pandas as pd

    data = out / "data"
    if (data / "meta.json").exists():
        return data
    raw = out / "raw"
    for name in (SOURCE, TARGET):
        shutil.copytree(study / "raw" / name, raw / name, dirs_exist_ok=True)
    target_inter = next((raw / TARGET).glob("*.inter"))
    source_inter = next((raw / SOURCE).glob("*.inter"))
    titles = set(pd.read_csv(target_inter, sep="\t", dtype=str)["item_id:token"])
    src = pd.read_csv(source_inter, sep="\t", dtype=str)
    kept = src[src["item_id:token"].isin(titles)]
    print(f"shared_source: {SOURCE} rows kept {len(kept):,} of {len(src):,} "
          f"({kept['user_id:token'].nunique():,} users)")
    kept.to_csv(source_inter, sep="\t", index=False)
    # The copied fetch.json (prepare reads its format) must not vouch for the fetched file's hash:
    # record the filtered file's and say where it came from.
    manifest_path = raw / SOURCE / "fetch.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["origin"] = f"{manifest.get('origin')}, rows kept where the title is also {TARGET}'s (benchmarks.transfer_probes)"
    manifest["files"][source_inter.name] = hashlib.sha256(source_inter.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2))
    run(crossrec("prepare", "--input", str(raw / SOURCE), "--input", str(raw / TARGET), "--format", "auto",
                 "--source-name", SOURCE, "--source-name", TARGET, "--domain-from", "source",
                 "--min-user", "0", "--min-item", "0", "--out", str(data)), out / "prepare.log")
    return data


def probe_steps(name: str, study: Path, out: Path, methods: list[str]) -> dict[str, dict]:
    """Pretrain and fine-tune one probe (reusing finished steps); its fine-tuning records by method."""
    out.mkdir(parents=True, exist_ok=True)
    configs = study / "configs"
    overrides: list[str] = []
    if name == "shared_source":
        data = shared_source_data(study, out)
        methods = sorted(set(methods) | {"scratch"}, key=methods_order)
    elif m := re.fullmatch(r"base_seed(\d+)", name):
        data = study / "data"
        overrides = ["--set", f"train.seed={m.group(1)}"]
    elif m := BODY.fullmatch(name):
        data = study / "data"
        overrides = ["--set", f"model.num_layers={m.group(1)}", "--set", f"model.intermediate_size={m.group(2)}"]
        if m.group(3):   # a wider body too: one attention head per 64 dimensions, as the presets do
            hidden = int(m.group(3))
            overrides += ["--set", f"model.hidden_size={hidden}", "--set", f"model.num_heads={max(hidden // 64, 1)}"]
        if m.group(4):   # another pretraining seed: scratch does not depend on the base, the unseeded probe's is used
            overrides += ["--set", f"train.seed={m.group(4)}"]
        else:
            methods = sorted(set(methods) | {"scratch"}, key=methods_order)
    else:
        sys.exit(f"unknown probe {name!r} (base_seedN | body_lL_fF[_hH][_sN] | shared_source)")
    base = out / "pretrain"
    if not (base / "metrics.json").exists():
        s = run(crossrec("pretrain", "--config", str(configs / "pretrain.yaml"), "--data", str(data),
                         "--out", str(base), "--domains", SOURCE, *overrides), out / "pretrain.log")
        print(f"{name}: pretrain {s:.0f} s")
    records = {}
    for method in methods:
        ft = out / "ft" / method
        if not (ft / "metrics.json").exists():
            kind, extra = method_variant(method)
            s = run(crossrec("finetune", "--config", str(configs / f"finetune_{kind}.yaml"), "--base", str(base),
                             "--data", str(data), "--domain", TARGET, "--method", kind, "--out", str(ft), *extra),
                    out / f"ft_{method}.log")
            print(f"{name}: {method} {s:.0f} s")
        records[method] = json.loads((ft / "metrics.json").read_text())
    return records


def study_scratch(study: Path) -> dict[str, dict]:
    """The study's own scratch runs on all the target's users (every seed it has)."""
    return scratch_runs_in(study / "targets" / TARGET)


def table(name: str, records: dict[str, dict], references: dict[str, dict],
          references_from: str = "the study's") -> tuple[str, list[dict]]:
    """Markdown rows: NDCG@10 [95%], selected step, trainable params, paired differences."""
    both = {**{f"ref:{k}": v for k, v in references.items()}, **records}
    seqs, per_user = aligned(both)
    refs = [k for k in per_user if k.startswith("ref:")]
    # Scratch reference: this probe's own scratch run, else the mean over the study's scratch seeds
    # (per user), so the comparison is not against one lucky or unlucky seed.
    if "scratch" in per_user:
        scratch = per_user["scratch"]
    else:
        scratch = np.mean([per_user[k] for k in refs], axis=0) if refs else None
    lines = [f"#### {name} ({len(seqs)} test users)", "",
             "| method | test NDCG@10 [95%] | selected step | trainable | vs zero-shot | vs scratch | vs full |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for method in sorted(records, key=methods_order):
        rec, v = records[method], per_user[method]
        tr = rec.get("train") or {}
        step = f"{tr.get('best_step')} of {tr.get('steps')}" if tr.get("steps") else "-"
        diffs = {}
        for label, ref in (("none", per_user.get("none")), ("scratch", scratch), ("full", per_user.get("full"))):
            diffs[label] = None if ref is None or method == label else paired_difference(v, ref)
        iv = bootstrap_mean(v)
        lines.append(f"| {method} | {iv.text()} | {step} | {rec['params']['trainable']:,} | "
                     + " | ".join("-" if d is None else d.diff_text() for d in diffs.values()) + " |")
        rows.append({"probe": name, "method": method, "ndcg@10": iv.mean, "ci95": [iv.low, iv.high],
                     "users": iv.n, "best_step": tr.get("best_step"), "steps": tr.get("steps"),
                     "trainable": rec["params"]["trainable"],
                     **{f"vs_{k}": (None if d is None else [d.mean, d.low, d.high]) for k, d in diffs.items()}})
    groups: dict[str, list[str]] = {}
    for method in sorted(records, key=methods_order):
        groups.setdefault(seedless(method), []).append(method)
    if any(len(runs) > 1 for runs in groups.values()):
        lines += seed_median_lines(groups, records, per_user, scratch)
    if refs and "scratch" not in per_user:
        lines.append("")
        lines.append(f"scratch reference: the per-user mean of {references_from} scratch runs "
                     + ", ".join(f"{k[4:]} {per_user[k].mean():.4f}" for k in refs))
    return "\n".join(lines), rows


def seed_median_lines(groups: dict[str, list[str]], records: dict[str, dict], per_user: dict[str, np.ndarray],
                      scratch: np.ndarray | None) -> list[str]:
    """Over fine-tuning seeds: the median test NDCG@10, and intervals over users of each user's
    seed-averaged NDCG@10 (differences paired on the same users, against seed-averaged references)."""
    mean = {g: np.mean([per_user[m] for m in runs], axis=0) for g, runs in groups.items()}
    median = {g: float(np.median([records[m]["test"]["ndcg@10"] for m in runs])) for g, runs in groups.items()}
    refs = {"none": mean.get("none"), "scratch": mean.get("scratch", scratch), "full": mean.get("full")}
    lines = ["", "Over fine-tuning seeds (median; intervals over users of the seed-averaged NDCG@10):", "",
             "| method | seeds | median test NDCG@10 (per seed) | seed-averaged [95%] | vs zero-shot | vs scratch "
             "| vs full | of full |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g, runs in groups.items():
        diffs = ["-" if ref is None or g == label else paired_difference(mean[g], ref).diff_text()
                 for label, ref in refs.items()]
        share = f"{median[g] / median['full']:.1%}" if "full" in median and g != "full" else "-"
        per_seed = ", ".join(f"{records[m]['test']['ndcg@10']:.4f}" for m in runs)
        lines.append(f"| {g} | {len(runs)} | {median[g]:.4f} ({per_seed}) | {bootstrap_mean(mean[g]).text()} | "
                     + " | ".join(diffs) + f" | {share} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", type=Path, required=True, help="a finished `make demo` folder (runs/ml_cross_platform)")
    ap.add_argument("--probes", nargs="+", default=["base_seed1", "base_seed2", "shared_source"])
    ap.add_argument("--methods", nargs="+", default=["none", "full", "head", "lora"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/transfer_probes"))
    a = ap.parse_args()
    if not (a.study / "configs" / "pretrain.yaml").exists():
        sys.exit(f"{a.study}: no configs/pretrain.yaml (run `make demo` first)")
    scratch_runs = study_scratch(a.study)
    texts, rows = [], []
    for name in a.probes:
        records = probe_steps(name, a.study, a.out / name, list(a.methods))
        base_metrics = json.loads((a.out / name / "pretrain" / "metrics.json").read_text())
        body = BODY.fullmatch(name)
        if body and body.group(4):   # the same shape's scratch runs, from the probe without the seed suffix
            sibling = name[:name.rindex("_s")]
            refs, refs_from = scratch_runs_in(a.out / sibling / "ft"), f"{sibling}'s"
            if not refs:
                sys.exit(f"{name}: run the probe {sibling} first (its scratch runs are the reference)")
        else:
            refs, refs_from = ({} if name == "shared_source" or body else scratch_runs), "the study's"
        text, r = table(name, records, refs, refs_from)
        source_test = (base_metrics.get("test") or {}).get("ndcg@10")
        texts.append(text + (f"\n\nbase: {SOURCE} test NDCG@10 {source_test:.4f}" if source_test is not None else ""))
        rows += r
    print("\n\n".join(texts))
    # Keep the rows of probes not run this time: the summary covers every probe measured so far.
    summary = a.out / "summary.json"
    kept = [r for r in (json.loads(summary.read_text()) if summary.exists() else []) if r["probe"] not in a.probes]
    summary.write_text(json.dumps(kept + rows, indent=1))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:     # a method variant that does not parse: say which, as crossrec does
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
