"""How low-rank is the change full fine-tuning makes? The question behind "can LoRA match full?".

LoRA restricts each adapted matrix's change to rank r. Whether that can match full fine-tuning
depends on the change full fine-tuning actually needs. This script takes a base and the same base
fully fine-tuned on a target (``crossrec finetune --method full``), and for every weight matrix

1. prints how much of the change's energy (squared singular values of ``W_full - W_base``) the top
   1, 2 and 8 directions hold, and how many directions hold 50% and 90% of it;
2. evaluates on the target (test and validation NDCG@10, the target's own catalogue) the model whose
   deltas are cut to their best rank-r approximation (truncated SVD), separately for the body's
   linear layers and for the item table (vectors - norms, per-item offsets - are kept whole).

A cut model is not what LoRA trained at that rank would reach (training co-adapts the rest), but a
large loss at rank r says full fine-tuning's solution is not a rank-r one.

usage: python -m benchmarks.delta_rank --base B --full F --data D --domain ml100k
       [--cuts full:full 0:full full:0 2:full 8:full 16:full full:2 full:8 2:2 8:8]
       (each cut is BODY_RANK:TABLE_RANK, ``full`` = the whole change, 0 = none of it)
The arithmetic (changes, energy, low-rank cuts) lives in ``crossrec_dist.analysis.delta_rank``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from crossrec_dist.analysis.delta_rank import TABLE, changes, energy_rows, low_rank, parse_cut
from crossrec_dist.data.prepared import PreparedData
from crossrec_dist.errors import InputError
from crossrec_dist.evaluation.evaluator import EvalOptions, evaluate, model_scorer
from crossrec_dist.export.vocab import check_same_vocabulary
from crossrec_dist.models.loading import load_base_model

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the pretrained base (a crossrec model folder)")
    ap.add_argument("--full", required=True, help="the base fully fine-tuned on the target")
    ap.add_argument("--data", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--cuts", nargs="+", default=["full:full", "0:full", "full:0", "2:full", "8:full", "16:full",
                                                   "full:2", "full:8", "2:2", "8:8"])
    ap.add_argument("--out", type=Path, help="JSON file for the rows (default: FULL/delta_rank.json)")
    a = ap.parse_args()
    data = PreparedData(a.data)
    for folder in (a.base, a.full):    # rows of the item table must mean the data's items
        check_same_vocabulary(folder, data)
    base_sd = load_file(str(Path(a.base) / "model.safetensors"))
    full_sd = load_file(str(Path(a.full) / "model.safetensors"))
    deltas = changes(base_sd, full_sd)
    # One SVD per matrix, shared by the energy table and every cut.
    factors = {n: torch.linalg.svd(d, full_matrices=False) for n, d in deltas.items() if d.dim() == 2}
    energy = energy_rows(base_sd, deltas, factors)
    print("| weight | relative change | energy in top 1 / 2 / 8 | directions for 50% / 90% |")
    print("| --- | --- | --- | --- |")
    for r in energy:
        e = r["energy_top"]
        print(f"| {r['weight']} {tuple(r['shape'])} | {r['relative_change']:.3f} | "
              f"{e[1]:.2f} / {e[2]:.2f} / {e[8]:.2f} | {r['rank_50']} / {r['rank_90']} |")

    items = data.catalogue([a.domain])
    model = load_base_model(a.full).eval()
    cuts = []
    print("\n| body rank | table rank | valid NDCG@10 | test NDCG@10 |\n| --- | --- | --- | --- |")
    for text in a.cuts:
        body_rank, table_rank = parse_cut(text)
        cut = {}
        for name, d in deltas.items():
            if name in factors:
                d = low_rank(factors[name], table_rank if name == TABLE else body_rank)
            cut[name] = (base_sd[name].float() + d).to(full_sd[name].dtype)
        model.load_state_dict(cut, strict=True)
        with torch.no_grad():
            res = {split: evaluate(data, model_scorer(model), EvalOptions(split=split, domains=[a.domain],
                                                                          max_len=model.config.max_len,
                                                                          catalogue=items))["overall"]
                   for split in ("valid", "test")}
        row = {"body_rank": body_rank, "table_rank": table_rank, "valid_ndcg@10": res["valid"]["ndcg@10"],
               "test_ndcg@10": res["test"]["ndcg@10"], "users": res["test"]["users"]}
        cuts.append(row)
        show = lambda r: "all" if r is None else str(r)
        print(f"| {show(body_rank)} | {show(table_rank)} | {row['valid_ndcg@10']:.4f} | {row['test_ndcg@10']:.4f} |",
              flush=True)
    out = a.out or Path(a.full) / "delta_rank.json"
    out.write_text(json.dumps({"base": a.base, "full": a.full, "energy": energy, "cuts": cuts}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:     # a folder or data that does not fit: say which, as crossrec does
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
