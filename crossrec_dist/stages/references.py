"""What every fine-tuning run is measured against, on the same users: the base as it is (zero-shot)
and the region's own popularity list -- paired per-user differences with 95% bootstrap intervals, in
metrics.json (``vs``) and said in plain words in the log.

On a small region the two can go wrong without a word: an adapter can select a step on one noisy
validation item per user and end below the base on test, and a model can rank the region below its
own popularity list. A user should learn that from the run, not by evaluating the baselines by hand.
"""
from __future__ import annotations

import numpy as np

from ..data.prepared import PreparedData
from ..evaluation.bootstrap import interval_record, paired_on_users, per_user_ndcg
from ..evaluation.evaluator import EvalOptions, evaluate
from ..evaluation.popularity import popularity_scorer
from ..methods._training import load_base
from .common import evaluate_model

# What the log calls each reference.
LABELS = {"zero-shot": "zero-shot (the base as it is)", "popularity": "the region's popularity list"}


def reference_evaluations(base_dir: str, data: PreparedData, domain: str, batch_size: int,
                          catalogue: np.ndarray | None, users: np.ndarray | None, device="cpu",
                          eval_users: int = 0, seed: int = 0) -> dict[str, dict]:
    """``{"zero-shot": ev, "popularity": ev}``, each ``{"valid": ..., "test": ...}`` as
    :func:`evaluate_model` returns them. Popularity counts the training histories of ``users`` (the
    sampled training users; None: all of the domain's) -- what the region's data says, nothing more."""
    base = load_base(base_dir, data.num_items)     # items new to the base (--vocab-from) as average ones
    refs = {"zero-shot": evaluate_model(base, data, [domain], base.config.max_len, batch_size, catalogue=catalogue,
                                        device=device, users=eval_users, seed=seed)}
    counts_scorer = popularity_scorer(data, [domain], only=users)
    refs["popularity"] = {split: evaluate(data, counts_scorer, EvalOptions(
        split=split, domains=[domain], batch_size=batch_size, max_len=base.config.max_len, catalogue=catalogue,
        users=eval_users, seed=seed))
        for split in ("valid", "test")}
    return refs


def paired_vs(ev: dict, refs: dict[str, dict]) -> dict:
    """``{ref: {"valid": interval, "test": interval}}``: per-user NDCG@10 of ``ev`` minus the
    reference's, on the users both ranked (interval_record: diff, low, high, users, verdict)."""
    out = {}
    for name, ref in refs.items():
        out[name] = {}
        for split in ("valid", "test"):
            a, b = ev[split]["examples"], ref[split]["examples"]
            out[name][split] = interval_record(paired_on_users(*per_user_ndcg(a["seq_index"], a["rank"]),
                                                               *per_user_ndcg(b["seq_index"], b["rank"])))
    return out


def _text(iv: dict) -> str:
    if iv["diff"] is None:
        return "no users in common"
    s = f"{iv['diff']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}] over {iv['users']} users"
    return s if iv["verdict"] != "no significant difference" else s + ", no significant difference"


def verdict_lines(method: str, domain: str, vs: dict) -> list[str]:
    """One line per reference, then a WARNING line for each split where the run ends significantly below it."""
    lines = [f"{method} on {domain} vs {LABELS.get(name, name)}: test NDCG@10 {_text(c['test'])}; "
             f"valid {_text(c['valid'])}" for name, c in vs.items()]
    for name, c in vs.items():
        worse = [split for split in ("test", "valid") if c[split]["verdict"] == "worse"]
        if worse:
            lines.append(f"WARNING: {method} on {domain} ranks significantly BELOW {LABELS.get(name, name)} "
                         f"on {' and '.join(worse)} (test {_text(c['test'])}); "
                         + ("the region's own counts beat it: more target data, a popularity prior "
                            "(train_item_bias) or the popularity list itself may serve it better"
                            if name == "popularity" else "the base alone serves this region better"))
    return lines


def selection_record(result, must_beat_base: bool) -> dict:
    """Which step was kept and why: under ``must_beat_base`` the best validation seen (by mean) and its
    paired difference to the base, and whether any step beat the base by a paired interval."""
    valid = [h for h in result.history if h.get("kind") == "valid"]
    record = {"must_beat_base": must_beat_base, "kept_step": result.best_step}
    judged = [h for h in valid if "valid_vs_start" in h]
    if must_beat_base and judged:
        best_seen = max(judged, key=lambda h: h["valid_ndcg@10"])
        record["best_seen"] = {"step": best_seen["step"], "valid_ndcg@10": best_seen["valid_ndcg@10"],
                               "vs_base": {"diff": best_seen["valid_vs_start"], "low": best_seen["valid_vs_start_low"],
                                           "high": best_seen["valid_vs_start_high"]}}
        record["kept"] = "base" if result.best_step == 0 else "adapted"
    return record


def selection_line(method: str, domain: str, selection: dict, output: str) -> str | None:
    """The plain words when the base was kept (None otherwise)."""
    if selection.get("kept") != "base":
        return None
    seen = selection["best_seen"]
    vs = seen["vs_base"]
    if selection.get("start") == "init_adapter":
        start, what = "the adapter it started from (init_adapter)", "the exported adapter is that adapter, unchanged"
    else:
        start = "the base"
        what = {"adapter": "the exported adapter is the untrained one: it scores exactly as the base does",
                "model": "the exported model is the base's weights"}.get(output, "")
    return (f"WARNING: {method} on {domain} did not beat {start} on validation by a paired 95% interval at any "
            f"step (best seen: step {seen['step']}, {vs['diff']:+.4f} [{vs['low']:+.4f}, {vs['high']:+.4f}]); "
            f"kept step 0, {start} -- {what}. (must_beat_base: false keeps the best mean instead.)")
