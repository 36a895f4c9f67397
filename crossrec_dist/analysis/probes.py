"""Names of transfer-probe runs (``benchmarks.transfer_probes``) and what they mean.

A probe's fine-tuning runs are named by method variant: ``lora_rN``, ``adalora_rNtoM[_topK]``, any
method with ``+KEY=VALUE`` suffixes (``--set`` overrides) and a ``.seedN`` suffix (fine-tuning seed).
:func:`method_variant` turns a name into the method and its ``--set`` arguments; a body probe's name
(``body_lL_fF[_hH][_sN]``) is matched by :data:`BODY`; :func:`scratch_runs_in` finds the scratch runs
that are a probe's reference.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from crossrec_dist.errors import InputError

BODY = re.compile(r"body_l(\d+)_f(\d+)(?:_h(\d+))?(?:_s(\d+))?")
METHODS_ORDER = ["none", "scratch", "full", "head", "l2sp", "lora", "adalora"]


def method_variant(method: str) -> tuple[str, list[str]]:
    """``lora_rN``: the study's LoRA config at rank N (alpha 2N, the study's ratio); ``adalora_rNtoM[_topK]``:
    its AdaLoRA config from rank N to M (alpha 2N), with whole rows for the K most frequent titles; a ``.seedN`` suffix:
    fine-tuning seed N (``train.seed``); ``+KEY=VALUE`` suffixes: any other ``--set`` of the fine-tuning config
    (``full+train.lr=0.0002``); else the method as is."""
    if m := re.fullmatch(r"(.+)\.seed(\d+)", method):
        kind, extra = method_variant(m.group(1))
        return kind, [*extra, "--set", f"train.seed={m.group(2)}"]
    if "+" in method:
        head, *sets = method.split("+")
        if not all(re.fullmatch(r"[a-z_][a-z0-9_.]*=[A-Za-z0-9_.\-]+", x) for x in sets):
            raise InputError(f"method variant {method!r}: each +suffix is KEY=VALUE (letters, digits, . _ -)",
                             field="--methods")
        kind, extra = method_variant(head)
        return kind, [*extra, *(a for x in sets for a in ("--set", x))]
    if m := re.fullmatch(r"lora_r(\d+)", method):
        r = int(m.group(1))
        return "lora", ["--set", f"lora.r={r}", "--set", f"lora.alpha={2 * r}"]
    if m := re.fullmatch(r"adalora_r(\d+)to(\d+)(?:_top(\d+))?", method):
        r = int(m.group(1))
        extra = ["--set", f"adalora.init_r={r}", "--set", f"adalora.target_r={m.group(2)}", "--set", f"lora.alpha={2 * r}"]
        return "adalora", extra + (["--set", f"train_top_items={m.group(3)}"] if m.group(3) else [])
    return method, []


def seedless(method: str) -> str:
    """The method a run belongs to, its seed suffix dropped (``lora_r8.seed1`` -> ``lora_r8``)."""
    return re.sub(r"\.seed\d+$", "", method)


def methods_order(m: str) -> tuple:
    """Sort key: zero-shot, scratch, full, head, l2sp, lora, adalora, others; seeds after their method."""
    kind = method_variant(m)[0]
    return (METHODS_ORDER.index(kind) if kind in METHODS_ORDER else len(METHODS_ORDER), seedless(m), m)


def scratch_runs_in(folder: Path) -> dict[str, dict]:
    """Finished scratch runs (every seed) in a folder of fine-tuning runs, data fractions left out."""
    runs = {}
    for run_dir in sorted(Path(folder).glob("scratch*")):
        if "frac" in run_dir.name or not (run_dir / "metrics.json").exists():
            continue
        runs[run_dir.name] = json.loads((run_dir / "metrics.json").read_text())
    return runs
