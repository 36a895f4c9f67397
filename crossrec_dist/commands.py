"""Parsers and handlers of the model verbs (pretrain, presets, ...): plain functions over the stages."""
from __future__ import annotations


def _overrides(a) -> list[str]:
    """``--set`` pairs, with ``--resume`` as the ``train.resume`` it stands for."""
    return list(a.set or []) + ([f"train.resume={a.resume}"] if a.resume else [])


def _check_out(a) -> None:
    """The output folder can be written, before any config is read or data is loaded."""
    from .paths import check_output_dir
    check_output_dir(a.out)


def _cmd_pretrain(a):
    from .stages.pretrain import load_pretrain_config, run_pretrain
    cfg = load_pretrain_config(a.config, a.preset, _overrides(a), a.domains)
    _check_out(a)
    run_pretrain(cfg, a.data, a.out)


def _cmd_finetune(a):
    from .stages.finetune import load_finetune_config, run_finetune
    cfg = load_finetune_config(a.config, a.method, _overrides(a))
    _check_out(a)
    if bool(a.domain) == bool(a.domains):
        from .errors import InputError
        raise InputError("give exactly one of --domain NAME or --domains all|A,B", field="--domain")
    if a.domain:
        run_finetune(cfg, a.base, a.data, a.domain, a.out)
        return
    from .stages.regions import finetune_regions
    finetune_regions(cfg, a.base, a.data, a.domains, a.out)


def _cmd_export(a):
    from .export.bundle import export_bundle
    export_bundle(a.base, a.adapters, a.out, merge=a.merge, onnx=a.onnx)


def _cmd_distill(a):
    from .stages.distill import load_distill_config, run_distill
    cfg = load_distill_config(a.config, a.preset, _overrides(a))
    _check_out(a)
    run_distill(cfg, a.teacher, a.adapter, a.data, a.domain, a.out,
                allow_unverified_adapter=a.allow_unverified_adapter)


def _cmd_bench_serve(a):
    from .export.bench import bench_serving, write_bench
    res = bench_serving(a.student, a.teacher, a.adapter, history=a.history, requests=a.requests, batch=a.batch,
                        onnx=a.onnx, allow_unverified_adapter=a.allow_unverified_adapter)
    write_bench(a.out, res)
    print(f"teacher p50 {res['teacher']['p50_ms']:.2f} ms, student p50 {res['student']['p50_ms']:.2f} ms "
          f"({res['speedup_p50']:.1f}x); batch {res['speedup_throughput']:.1f}x -> {a.out}")


def _cmd_experiment(a):
    from .experiment.runner import run_experiment
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
    p.add_argument("--resume", default=None, help="auto (latest checkpoint in --out) or a checkpoint folder")


def register_training_commands(sub) -> None:
    from .cli import at_least
    p = sub.add_parser("pretrain", help="train the base model on the source domains")
    _add_common_train(p)
    p.add_argument("--preset", default=None, help="tiny | small | base | 1b | 3b")
    p.add_argument("--data", required=True, help="prepared dataset DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--domains", default=None, help="source domains (comma-separated); default all")
    p.set_defaults(func=_cmd_pretrain)

    f = sub.add_parser("finetune", help="adapt the base to a target domain (lora, adalora, full, head, l2sp, none)")
    _add_common_train(f)
    f.add_argument("--base", required=True, help="pretrained model DIR")
    f.add_argument("--data", required=True, help="prepared dataset DIR (same vocabulary as the base)")
    f.add_argument("--domain", default=None, help="the target domain")
    f.add_argument("--domains", default=None,
                   help="several targets: 'all' (every domain the base was not pretrained on) or A,B; "
                        "writes OUT/<domain>/ and OUT/manifest.json")
    f.add_argument("--method", default=None, help="lora | adalora | full | head | l2sp | scratch | none")
    f.add_argument("--out", required=True)
    f.set_defaults(func=_cmd_finetune)

    e = sub.add_parser("export", help="deployable bundle: base + per-region adapters (+ merged models)")
    e.add_argument("--base", required=True)
    e.add_argument("--adapters", default=None, help="folder written by 'crossrec finetune --domains'")
    e.add_argument("--out", required=True)
    e.add_argument("--merge", action="store_true", help="also write one merged model per adapter region")
    e.add_argument("--onnx", action="store_true", help="also write model.onnx for the base and merged models "
                   "(checked against PyTorch with ONNX Runtime)")
    e.set_defaults(func=_cmd_export)

    d = sub.add_parser("distill", help="distil a teacher (base [+ adapter]) into a compact student")
    _add_common_train(d)
    d.add_argument("--preset", default=None, help="student preset (default tiny)")
    d.add_argument("--teacher", required=True, help="teacher model DIR (the base when --adapter is given)")
    d.add_argument("--adapter", default=None, help="the region's adapter DIR")
    d.add_argument("--allow-unverified-adapter", action="store_true",
                   help="apply an adapter that records no base fingerprint (made outside crossrec)")
    d.add_argument("--data", required=True)
    d.add_argument("--domain", required=True)
    d.add_argument("--out", required=True)
    d.set_defaults(func=_cmd_distill)

    b = sub.add_parser("bench-serve", help="CPU latency (p50/p99, one 50-item request) and batch throughput, "
                       "teacher vs student")
    b.add_argument("--student", required=True)
    b.add_argument("--teacher", required=True)
    b.add_argument("--adapter", default=None)
    b.add_argument("--allow-unverified-adapter", action="store_true",
                   help="apply an adapter that records no base fingerprint (made outside crossrec)")
    b.add_argument("--out", required=True, help="JSON file")
    b.add_argument("--history", type=at_least(1), default=50)
    b.add_argument("--requests", type=at_least(1), default=200)
    b.add_argument("--batch", type=at_least(1), default=256)
    b.add_argument("--onnx", action="store_true", help="also compare both exported to ONNX, in ONNX Runtime")
    b.set_defaults(func=_cmd_bench_serve)

    x = sub.add_parser("experiment", help="the whole pipeline from a recipe, with a report (the main job)")
    x.add_argument("--config", required=True, help="recipe YAML, e.g. launch/recipes/ml100k_regions.yaml")
    x.add_argument("--out", required=True)
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
