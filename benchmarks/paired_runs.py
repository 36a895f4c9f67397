"""Two groups of finished runs compared on the same test users: seed-averaged NDCG@10 of each group
with a bootstrap interval over users, and the paired interval of the difference (A - B).

The study reports (`crossrec experiment`, benchmarks.transfer_probes) compare each method with
zero-shot, scratch and full; this answers "A vs B" for any two methods, e.g. AdaLoRA vs LoRA:

    python -m benchmarks.paired_runs --a runs/ml_cross_platform/targets/ml100k/adalora \
        --b runs/ml_cross_platform/targets/ml100k/lora

A group of several folders (fine-tuning seeds) is averaged per user first, as the reports do.
The arithmetic lives in ``crossrec_dist.analysis.paired``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crossrec_dist.analysis.paired import compare
from crossrec_dist.errors import InputError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, nargs="+", required=True, help="run folders of A (several: seeds, averaged per user)")
    ap.add_argument("--b", type=Path, nargs="+", required=True, help="run folders of B")
    args = ap.parse_args()
    try:
        print(compare(args.a, args.b))
    except InputError as e:     # a folder that is not a finished run: say which, as crossrec does
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
