"""Report of an experiment folder: results.json, PNG plots and report.md, all read from metrics.json files."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..evaluation.bootstrap import Interval, aligned, bootstrap_mean, interval_record, paired_difference
from ..methods import ROLES, get_method, with_role
from ..paths import inside
from .layout import run_folder
from .records import write_atomic


def _pyplot():
    """matplotlib's pyplot on the file-only backend. Imported inside functions: the runner imports this
    module at start, and `crossrec --help` loads the runner; pyplot costs 1.1 s on the 2-core CI machine."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

METRICS = ("ndcg@10", "hr@10", "mrr@10")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _seed_records(out: Path, target: str, method: str, seeds: list[int], fraction: float = 1.0) -> list[dict]:
    """The method's metrics.json of every seed that has finished (zero-shot: one, it has no seed)."""
    if method in STUDENTS or not get_method(method).seeded:
        seeds, fraction = seeds[:1], 1.0
    recs = [_read(inside(out, "targets", target, run_folder(method, seeds, s, fraction)) / "metrics.json")
            for s in seeds]
    return [r for r in recs if r]


def fraction_curve(out: Path, recipe, target: str) -> dict:
    """method -> fraction -> median test NDCG@10 over seeds, with the interval over users of the
    seed-averaged per-user NDCG@10 (zero-shot is flat: it uses no target data)."""
    curve: dict = {}
    for m in [m for m in recipe.methods if not get_method(m).trains or m in recipe.fraction_methods]:
        for f in sorted(recipe.fractions):
            recs = _seed_records(out, target, m, list(recipe.seeds), f)
            got = aligned({str(k): r for k, r in enumerate(recs)}) if recs else None
            if not got:
                continue
            per_user = np.mean(list(got[1].values()), axis=0)
            curve.setdefault(m, {})[f"{f:g}"] = {
                "median": statistics.median(r["test"]["ndcg@10"] for r in recs), "seeds": len(recs),
                "train_users": recs[0].get("train_users"), "interval": bootstrap_mean(per_user).__dict__}
    return curve


def fraction_pairs(out: Path, recipe, target: str) -> dict:
    """method -> fraction -> reference -> paired difference in seed-averaged per-user test NDCG@10 (95%
    bootstrap over the users both have), against training on the target alone (scratch, at the same
    fraction and seeds) and zero-shot: where a method's transfer pays, fraction by fraction."""
    seeds, pairs = list(recipe.seeds), {}
    refs = [r for r in ("scratch", "none") if r in recipe.methods]
    for m in recipe.fraction_methods:
        if m in refs or m not in recipe.methods or not get_method(m).trains:
            continue
        for f in sorted(recipe.fractions):
            mine = _seed_records(out, target, m, seeds, f)
            for ref in refs:
                theirs = _seed_records(out, target, ref, seeds, f)
                got = aligned({**{f"a{k}": r for k, r in enumerate(mine)}, **{f"b{k}": r for k, r in enumerate(theirs)}}) \
                    if mine and theirs else None
                if not got:
                    continue
                a = np.mean([got[1][f"a{k}"] for k in range(len(mine))], axis=0)
                b = np.mean([got[1][f"b{k}"] for k in range(len(theirs))], axis=0)
                pairs.setdefault(m, {}).setdefault(f"{f:g}", {})[ref] = interval_record(paired_difference(a, b))
    return pairs


STUDENTS = ["student_kd", "student_ce"]
COHORTS = ("history<=5", "history6-20", "history>20", "new_items")   # evaluation/cohorts.py's names


def cohort_table(out: Path, target: str, methods: list[str], seeds: list[int]) -> dict:
    """method -> cohort -> the first seed's ``cohorts`` record (test NDCG@10 of users with short histories
    and of test items the base never saw, with the interval over those users), at 100% of the users."""
    table = {}
    for m in methods:
        recs = _seed_records(out, target, m, seeds[:1])
        if recs and recs[0].get("cohorts"):
            table[m] = recs[0]["cohorts"]
    return table


def _cohort_lines(cohorts: dict) -> list[str]:
    """New users and new items: a table per target (where any run recorded cohorts)."""
    lines = []
    for t, table in cohorts.items():
        if not table:
            continue
        first = next(iter(table.values()))
        names = [c for c in COHORTS if c in first]
        lines += [f"### Target {t}: new users and new items", "",
                  "Test NDCG@10 of the users whose history before the test item is short, and of those whose "
                  "test item the base never saw, with a 95% bootstrap interval over those users (seed "
                  "0; users per cohort in the header).", "",
                  "| method | " + " | ".join(f"{c} ({first[c]['users']} users)" for c in names) + " |",
                  "| --- | " + " | ".join("---" for _ in names) + " |"]
        for m, rec in table.items():
            cells = [f"{rec[c]['ndcg@10']:.4f} [{rec[c]['low']:.4f}, {rec[c]['high']:.4f}]" if rec.get(c, {}).get("users")
                     else "-" for c in names]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def collect(out: Path, methods: list[str], targets: list[str], seeds: list[int] | None = None,
            students: list[str] = STUDENTS) -> dict:
    """Per target and method, the test metrics (the median over seeds when there are several);
    ``students``: the distilled models to include (none when the recipe distils nothing, whatever
    an earlier run left in the folder)."""
    seeds = seeds or [0]
    res = {"pretrain": None, "targets": {}, "average": {}, "distill": {}}
    pre = _read(out / "pretrain" / "metrics.json")
    if pre:
        res["pretrain"] = {"test": {k: pre["test"][k] for k in METRICS}, "params": pre["params"],
                           "train": pre["train"], "per_domain": pre.get("per_domain", {})}
    for t in targets:
        row = {}
        for m in methods + students:
            recs = _seed_records(out, t, m, seeds)
            rec = recs[0] if recs else None
            if rec:
                row[m] = {**{k: statistics.median(r["test"][k] for r in recs) for k in METRICS},
                          "seed_ndcg@10": [r["test"]["ndcg@10"] for r in recs],
                          "users": rec["test"].get("users"),
                          "trainable": rec["params"]["trainable"], "total": rec["params"]["total"],
                          "steps": rec["train"]["steps"], "seconds": rec["train"]["seconds"],
                          **({"catalogue": rec["catalogue"]} if rec.get("catalogue") else {})}
                serving = _read(inside(out, "targets", t, m) / "serving.json")
                if serving:
                    row[m]["serving"] = serving
        res["targets"][t] = row
    for m in methods + students:
        vals = [res["targets"][t][m]["ndcg@10"] for t in targets if m in res["targets"][t]]
        if vals and len(vals) == len(targets):
            res["average"][m] = {"ndcg@10": statistics.mean(vals),
                                 "trainable": statistics.mean(res["targets"][t][m]["trainable"] for t in targets)}
    return res


def references() -> list[tuple[str, str]]:
    """(column label, method) of each reference -- zero-shot, target-only, full (methods.ROLES), as
    the registry's methods declare them -- in that order: the report's "vs ..." columns."""
    return [("zero-shot" if role == "zero-shot" else m, m) for role in ROLES for m in with_role(role)]


def _full_reference(methods) -> str | None:
    """The method whose mean is the 100% of 'share of full' (role full), if the recipe runs it."""
    return next((m for m in with_role("full") if m in methods), None)


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    _pyplot().close(fig)
    return name


def _plot_by_region(out: Path, res: dict, shown: list[str], targets: list[str]) -> str:
    fig, ax = _pyplot().subplots(figsize=(8, 4))
    width = 0.8 / len(shown)
    for i, m in enumerate(shown):
        ys = [res["targets"][t][m]["ndcg@10"] for t in targets]
        ax.bar([x + i * width for x in range(len(targets))], ys, width, label=m)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(targets))], [f"region {t}" for t in targets])
    ax.set_ylabel("test NDCG@10")
    ax.set_title("Per-region test NDCG@10 by adaptation method")
    ax.legend(fontsize=8, ncol=4)
    return _save(fig, out, "ndcg_by_region.png")


def _plot_quality_vs_params(out: Path, res: dict, shown: list[str]) -> str:
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for m in shown:
        a = res["average"][m]
        if a["trainable"] > 0:
            ax.scatter(a["trainable"], a["ndcg@10"], s=40)
            ax.annotate(m, (a["trainable"], a["ndcg@10"]), textcoords="offset points", xytext=(5, 3))
    for m in [m for m in with_role("zero-shot") if m in res["average"]]:
        ax.axhline(res["average"][m]["ndcg@10"], ls="--", c="gray", label="zero-shot (0 trained)")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("mean test NDCG@10 over targets")
    ax.set_title("Quality vs trainable parameters")
    return _save(fig, out, "quality_vs_params.png")


def _plot_training_curves(out: Path, pre: dict, methods: list[str], targets: list[str]) -> str:
    """Pretraining loss and validation, with the validation curves of the adapters and of full."""
    fig, (a1, a2) = _pyplot().subplots(1, 2, figsize=(10, 3.5))
    losses = [(h["step"], h["loss"]) for h in pre["history"] if "loss" in h]
    valids = [(h["step"], h["valid_ndcg@10"]) for h in pre["history"] if "valid_ndcg@10" in h]
    if losses:
        a1.plot(*zip(*losses), label="pretrain")
    if valids:
        a2.plot(*zip(*valids), marker="o", ms=3, label="pretrain")
    curves = [m for m in methods if get_method(m).output == "adapter" or m in with_role("full")]
    for t in targets:
        for m in curves:
            rec = _read(inside(out, "targets", t, m) / "metrics.json")
            v = [(h["step"], h["valid_ndcg@10"]) for h in (rec or {}).get("history") or [] if "valid_ndcg@10" in h]
            if v:
                a2.plot(*zip(*v), lw=1, alpha=0.7, label=f"{m} {t}")
    a1.set_xlabel("step"), a1.set_ylabel("training loss"), a1.set_title("Pretraining loss")
    a2.set_xlabel("step"), a2.set_ylabel("valid NDCG@10"), a2.set_title("Validation NDCG@10")
    a2.legend(fontsize=7)
    return _save(fig, out, "training_curves.png")


def _plot_distillation(out: Path, res: dict, kd: list[tuple[str, dict]]) -> str:
    fig, (a1, a2) = _pyplot().subplots(1, 2, figsize=(10, 3.5))
    teacher_key = res["distill_from"]
    xs = range(len(kd))
    a1.bar([x - 0.25 for x in xs], [r.get(teacher_key, {}).get("ndcg@10", 0) for _, r in kd], 0.25, label="teacher")
    a1.bar(list(xs), [r["student_kd"]["ndcg@10"] for _, r in kd], 0.25, label="student (KD)")
    a1.bar([x + 0.25 for x in xs], [r.get("student_ce", {}).get("ndcg@10", 0) for _, r in kd], 0.25,
           label="student (CE only)")
    a1.set_xticks(list(xs), [f"region {t}" for t, _ in kd]), a1.set_ylabel("test NDCG@10"), a1.legend(fontsize=8)
    a1.set_title("Teacher vs student quality")
    s = [r["student_kd"].get("serving") for _, r in kd]
    if all(s):
        a2.bar([x - 0.2 for x in xs], [v["teacher"]["p50_ms"] for v in s], 0.4, label="teacher p50")
        a2.bar([x + 0.2 for x in xs], [v["student"]["p50_ms"] for v in s], 0.4, label="student p50")
        a2.set_xticks(list(xs), [f"region {t}" for t, _ in kd]), a2.set_ylabel("ms / request (CPU)")
        a2.legend(fontsize=8)
        a2.set_title("Latency of one 50-item request")
    return _save(fig, out, "distillation.png")


def _plots(out: Path, res: dict, methods: list[str], targets: list[str]) -> list[str]:
    """The report's PNG files (names), each drawn when its data is there."""
    files = []
    shown = [m for m in methods if m in res["average"]]
    if shown:
        files += [_plot_by_region(out, res, shown, targets), _plot_quality_vs_params(out, res, shown)]
    pre = _read(out / "pretrain" / "metrics.json")
    if pre and pre.get("history"):
        files.append(_plot_training_curves(out, pre, methods, targets))
    kd = [(t, res["targets"][t]) for t in targets if "student_kd" in res["targets"][t]]
    if kd:
        files.append(_plot_distillation(out, res, kd))
    return files


def intervals(out: Path, target: str, methods: list[str], seeds: list[int] | None = None) -> dict:
    """Per method on one target: test NDCG@10 with a 95% bootstrap interval over the target's test
    users, paired bootstrap differences vs zero-shot (``none``), ``scratch`` and ``full`` on the same users,
    and the mean as a share of full's;
    plus the step each run selected. With several seeds, each user's NDCG@10 is first averaged over
    the method's seeds (the interval is then over users of the seed-averaged method). Empty when the
    records carry no per-user ranks."""
    seeds = seeds or [0]
    per_method = {m: _seed_records(out, target, m, seeds) for m in methods}
    recs = {f"{m}#{k}": r for m, rs in per_method.items() for k, r in enumerate(rs)}
    got = aligned(recs)
    if got is None:
        return {}
    _, by_run = got
    ndcg = {m: np.mean([by_run[f"{m}#{k}"] for k in range(len(rs))], axis=0)
            for m, rs in per_method.items() if rs}
    table = {}
    for m, values in ndcg.items():
        steps = [(r.get("train", {}).get("best_step"), r.get("train", {}).get("steps")) for r in per_method[m]]
        row = {"ndcg@10": bootstrap_mean(values).__dict__, "best_step": steps[0][0], "steps": steps[0][1],
               "seed_steps": steps, "seeds": len(per_method[m]),
               "trainable": per_method[m][0].get("params", {}).get("trainable")}
        for _, ref in references():
            if ref in ndcg and ref != m:
                row[f"vs_{ref}"] = paired_difference(values, ndcg[ref]).__dict__
        full = _full_reference(list(ndcg))
        if full is not None and m != full and ndcg[full].mean() > 0:
            row["of_full"] = float(values.mean() / ndcg[full].mean())
        table[m] = row
    return table


def _interval_lines(target: str, table: dict, methods: list[str], summary: dict) -> list[str]:
    """The per-target table of intervals; ``summary`` is the target's row of ``results.json``
    ``targets`` (median over seeds and each seed's value), shown beside the seed-averaged interval."""
    if not table:
        return []
    n = next(iter(table.values()))["ndcg@10"]["n"]
    # With several seeds the interval's centre is the seed-averaged mean, not the median the other
    # tables give: both are shown, so neither is read as the other.
    seeded = any(r.get("seeds", 1) > 1 for r in table.values())
    refs = references()
    note = ("Test NDCG@10 with a 95% bootstrap interval over users; differences are paired (same users), "
            "`n.s.` = the interval holds 0 (no significant difference). Selected step: the checkpoint that "
            "validation chose, of the steps run (0 = the starting weights).")
    if seeded:
        note += (" With several seeds: the median over seeds (each seed's value in brackets), then the mean "
                 "of each user's seed-averaged NDCG@10 with its interval; differences and `of full` are of "
                 "those seed-averaged values.")
    lines = [f"### Target {target}: {n} test users", "", note, ""]
    lines += ["| method | trainable params | " + ("median over seeds (per seed) | seed-averaged " if seeded else "")
              + "test NDCG@10 [95% CI] | " + "".join(f"vs {label} | " for label, _ in refs)
              + "of full | selected step |",
              "| --- | --- | --- | " + "--- | " * len(refs) + "--- | --- |" + (" --- |" if seeded else "")]
    for m in methods:
        if m not in table:
            continue
        r = table[m]
        cells = [f"{r['trainable']:,}" if r.get("trainable") is not None else "-"]
        if seeded:
            per_seed = summary.get(m, {}).get("seed_ndcg@10") or []
            cells.append("-" if m not in summary else f"{summary[m]['ndcg@10']:.4f}" + (
                f" ({', '.join(f'{v:.4f}' for v in per_seed)})" if len(per_seed) > 1 else ""))
        cells.append(Interval(**r["ndcg@10"]).text())
        for _, ref in refs:
            cells.append(Interval(**r[f"vs_{ref}"]).diff_text() if f"vs_{ref}" in r else "-")
        cells.append(f"{r['of_full']:.1%}" if "of_full" in r else "-")
        runs = r.get("seed_steps") or [(r.get("best_step"), r.get("steps"))]
        step = ", ".join("-" if n in (None, 0) else f"{b} of {n}" for b, n in runs)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {step} |")
    return lines + [""]


def _diff_cell(iv: dict) -> str:
    text = f"{iv['diff']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]"
    return text + (" n.s." if iv["verdict"] == "no significant difference" else "")


def _fraction_section(out: Path, curves: dict, targets: list[str], pairs: dict | None = None) -> list[str]:
    """How much target data is needed: a table and ``data_fraction.png`` (NDCG@10 vs share of users)."""
    lines = ["## How much target data do you need?", "",
             "The target's training users subsampled (a seeded sample, nested across fractions, the same for "
             "every method); test users unchanged. Median test NDCG@10 over seeds [95% interval over users].", ""]
    for t in targets:
        curve = curves.get(t) or {}
        fracs = sorted({f for c in curve.values() for f in c}, key=float)
        if not fracs:
            continue
        lines += [f"Target {t}:", "", "| method | " + " | ".join(f"{float(f):.0%} users" for f in fracs) + " |",
                  "| --- | " + " | ".join("---" for _ in fracs) + " |"]
        for m, c in curve.items():
            cells = [(f"{c[f]['median']:.4f} [{Interval(**c[f]['interval']).low:.4f}, "
                      f"{Interval(**c[f]['interval']).high:.4f}]") if f in c else "-" for f in fracs]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        tp = (pairs or {}).get(t) or {}
        if tp:
            lines += ["Paired, seed-averaged per user (method - reference) [95% bootstrap over users]; n.s. = "
                      "no significant difference:", "",
                      "| method | vs | " + " | ".join(f"{float(f):.0%} users" for f in fracs) + " |",
                      "| --- | --- | " + " | ".join("---" for _ in fracs) + " |"]
            for m, by_f in tp.items():
                for ref in sorted({r for v in by_f.values() for r in v}, reverse=True):
                    cells = [_diff_cell(by_f[f][ref]) if ref in by_f.get(f, {}) else "-" for f in fracs]
                    lines.append(f"| {m} | {'zero-shot' if ref == 'none' else ref} | " + " | ".join(cells) + " |")
            lines.append("")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for m, c in (curves.get(t) or {}).items():
            fs = sorted(c, key=float)
            xs = [float(f) for f in fs]
            if not get_method(m).seeded:       # zero-shot: no target data, a flat line (popularity
                v = next(iter(c.values()))      # counts the sampled users: a curve like the rest)
                ax.axhline(v["median"], ls="--", c="gray", label=m if m != "none" else "zero-shot")
                continue
            ys = [c[f]["median"] for f in fs]
            lo = [c[f]["interval"]["low"] for f in fs]
            hi = [c[f]["interval"]["high"] for f in fs]
            ax.plot(xs, ys, marker="o", label=m)
            ax.fill_between(xs, lo, hi, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("share of the target's training users")
        ax.set_ylabel("test NDCG@10")
        ax.set_title(f"Target {t}: quality vs target data")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "data_fraction.png", dpi=120)
    plt.close(fig)
    return lines + ["![data_fraction.png](data_fraction.png)", ""]


def _ranked_items(res: dict, targets: list[str]) -> str:
    """Which items were ranked, from the records' ``catalogue`` (finetune.catalogue: all | target)."""
    kinds = {(t, c["kind"], c["items"]) for t in targets for row in res["targets"][t].values()
             if (c := row.get("catalogue"))}
    if not kinds or all(kind == "all" for _, kind, _ in kinds):
        return "full ranking over all items"
    sizes = sorted({(t, n) for t, kind, n in kinds if kind == "target"})
    return ("full ranking over each target's own catalogue (the items of its log: "
            + ", ".join(f"{t} {n:,}" for t, n in sizes) + ")")


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def _header_lines(recipe, res: dict, stats: dict, sources: list[str], targets: list[str]) -> list[str]:
    lines = [f"# Experiment `{recipe.name}`", "",
             f"Generated {res['generated']} from the metrics.json files under this folder.", "",
             f"Data: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions, "
             f"{len(stats['domains'])} domains. Sources: {', '.join(sources)}. Targets: {', '.join(targets)}.",
             "Protocol: leave-one-out by time, " + _ranked_items(res, targets) + " (history excluded), test split.", ""]
    inputs = stats.get("sources") or {}
    if len(inputs) > 1:      # several data sources, one item vocabulary joined on the raw item id
        lines[-1:-1] = ["Data sources (items shared with another source / private): " + "; ".join(
            f"{name}: {s['interactions']:,} interactions, {s['items']:,} items "
            f"({s['shared_items']:,} / {s['private_items']:,})" for name, s in inputs.items()) + "."]
    if res["pretrain"]:
        p = res["pretrain"]
        lines += ["## Pretrained base (source domains)", "",
                  f"{p['params']['total']:,} parameters; test NDCG@10 {_fmt(p['test']['ndcg@10'])}, "
                  f"HR@10 {_fmt(p['test']['hr@10'])}; {p['train']['steps']} steps in {p['train']['seconds']:.0f} s.", ""]
    return lines


def _ndcg_table_lines(res: dict, shown: list[str], targets: list[str]) -> list[str]:
    lines = ["## Test NDCG@10 per target", "",
             "| method | trainable params | " + " | ".join(f"{t}" for t in targets) + " | mean |",
             "| --- | --- | " + " | ".join("---" for _ in targets) + " | --- |"]
    for m in shown:
        cells = [_fmt(res["targets"][t][m]["ndcg@10"]) if m in res["targets"][t] else "-" for t in targets]
        tr = [res["targets"][t][m]["trainable"] for t in targets if m in res["targets"][t]]
        mean = _fmt(res["average"][m]["ndcg@10"]) if m in res["average"] else "-"
        lines.append(f"| {m} | {_fmt(int(statistics.mean(tr)))} | " + " | ".join(cells) + f" | {mean} |")
    users = [res["targets"][t][shown[0]].get("users") for t in targets] if shown else []
    return lines + ["", f"Test users per target: {', '.join(f'{t}: {u}' for t, u in zip(targets, users))}.", ""]


def _distillation_lines(res: dict, kd: list[str], teacher_method: str) -> list[str]:
    lines = ["## Distillation", "",
             "One request = a 50-item history scored against every item, CPU. PyTorch: eager, as `Recommender` "
             "serves; ORT: both models exported to ONNX, in ONNX Runtime. Speed-ups are p50 ratios measured "
             "in one process, alternating teacher and student.", "",
             "| region | teacher NDCG@10 | student NDCG@10 | kept | student/teacher params "
             "| p50 teacher ms | p50 student ms | speed-up | ORT p50 teacher ms | ORT p50 student ms | ORT speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    nan = float("nan")
    for t in kd:
        row = res["targets"][t]
        teacher, student = row.get(teacher_method, {}), row["student_kd"]
        s = student.get("serving", {})
        o = s.get("onnxruntime", {})
        kept = student["ndcg@10"] / teacher["ndcg@10"] if teacher.get("ndcg@10") else nan
        ratio = s.get("student", {}).get("params", 0) / max(s.get("teacher", {}).get("params", 1), 1)
        lines.append(f"| {t} | {_fmt(teacher.get('ndcg@10', nan))} | {_fmt(student['ndcg@10'])} | "
                     f"{kept:.1%} | {ratio:.1%} | {_fmt(s.get('teacher', {}).get('p50_ms', nan))} | "
                     f"{_fmt(s.get('student', {}).get('p50_ms', nan))} | "
                     f"{s.get('speedup_p50', nan):.1f}x | "
                     f"{_fmt(o.get('teacher', {}).get('p50_ms', nan))} | "
                     f"{_fmt(o.get('student', {}).get('p50_ms', nan))} | "
                     f"{o.get('speedup_p50', nan):.1f}x |")
    return lines + [""]


def _timing_lines(timings: dict) -> list[str]:
    return (["## Timings (s)", "", "Wall seconds of each step when it last ran (a re-run skips finished steps and "
             "keeps their times); `this run` is the latest invocation.", "", "| step | seconds |", "| --- | --- |"]
            + [f"| {k} | {v} |" for k, v in timings.items()])


def write_report(out: Path, recipe, sources: list[str], timings: dict) -> Path:
    """results.json, the plots and report.md of an experiment folder, from its metrics.json files."""
    methods, targets = list(recipe.methods), list(recipe.targets)
    seeds = list(getattr(recipe, "seeds", [0]))
    students = STUDENTS if recipe.distill is not None else []
    res = collect(out, methods, targets, seeds, students)
    res.update(recipe=asdict(recipe), sources=sources, timings=timings, distill_from=recipe.distill_from,
               generated=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_atomic(out / "results.json", json.dumps(res, indent=2))
    plots = _plots(out, res, methods, targets)
    stats = json.loads((out / "data" / "stats.json").read_text())
    shown = [m for m in methods + students if any(m in res["targets"][t] for t in targets)]
    lines = _header_lines(recipe, res, stats, sources, targets) + _ndcg_table_lines(res, shown, targets)
    res["intervals"] = {t: intervals(out, t, methods + students, seeds) for t in targets}
    if any(f < 1 for f in recipe.fractions):
        res["fractions"] = {t: fraction_curve(out, recipe, t) for t in targets}
        res["fraction_pairs"] = {t: fraction_pairs(out, recipe, t) for t in targets}
        lines += _fraction_section(out, res["fractions"], targets, res["fraction_pairs"])
    if len(seeds) > 1:
        lines += [f"Fine-tuning seeds: {', '.join(map(str, seeds))}. The tables above give the median over "
                  "seeds; intervals are over users of each user's seed-averaged NDCG@10; selected steps are "
                  "listed per seed.", ""]
    for t in targets:
        lines += _interval_lines(t, res["intervals"][t], methods + students, res["targets"][t])
    res["cohorts"] = {t: cohort_table(out, t, methods, seeds) for t in targets}
    lines += _cohort_lines(res["cohorts"])
    write_atomic(out / "results.json", json.dumps(res, indent=2))
    kd = [t for t in targets if "student_kd" in res["targets"][t]]
    if kd:
        lines += _distillation_lines(res, kd, recipe.distill_from)
    for f in plots:
        lines += [f"![{f}]({f})", ""]
    lines += _timing_lines(timings)
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"
