"""When ``crossrec experiment`` reuses a step's output: only when the step's settings, and those of every
step upstream of it, are what they were when the output was made. Fast: the steps' commands are
replaced by a fake that writes the files each command would (the real pipeline is in test_experiment.py)."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from crossrec_dist.errors import InputError
from crossrec_dist.experiment import report, runner
from crossrec_dist.experiment.runner import run_experiment

RECIPE = {
    "name": "reuse",
    "data": {"source": "synth", "synth": {"users": 50, "items": 20, "domains": 4, "seed": 0},
             "domain_from": None, "domain_col": "domain"},
    "targets": ["d3"],
    "methods": ["none", "full", "lora"],
    "pretrain": {"preset": "tiny", "train": {"lr": 0.0005, "epochs": 2}},
    "finetune": {"train": {"epochs": 2}},
    "distill_from": "lora",
    "distill": {"preset": "tiny", "train": {"epochs": 2}},
}
ALL = ["synth", "prepare", "pretrain", "finetune d3 none", "finetune d3 full", "finetune d3 lora",
       "distill d3 student_kd", "serving benchmark d3 student_kd", "distill d3 student_ce",
       "serving benchmark d3 student_ce"]
DOWNSTREAM_OF_PRETRAIN = ALL[2:]
TEACHER_AND_DOWNSTREAM = ALL[5:]


class FakeCli:
    """Stands in for ``Runner._cli``: writes what the real command writes that the runner and report read."""

    def __init__(self, domains):
        self.domains, self.calls = domains, []

    def __call__(self, runner_self, *args, train=False):
        args = [str(a) for a in args]
        opts = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
        config = yaml.safe_load(Path(opts["--config"]).read_text()) if "--config" in opts else None
        self.calls.append((args, config))
        out = Path(opts["--out"])
        seed = ((config or {}).get("train") or {}).get("seed", 0)
        fraction = (config or {}).get("train_fraction", 1.0)
        metrics = {"test": {"ndcg@10": 0.1 + 0.01 * seed, "hr@10": 0.2, "mrr@10": 0.05, "users": 7},
                   "test_ranks": {"seq_index": list(range(7)), "rank": [int(r) for r in
                                  [0, 1, 2, 3, 5, 8, 20]][:int(7 * fraction) or 1] + [50] * (7 - (int(7 * fraction) or 1))},
                   "params": {"total": 1000, "trainable": 100}, "train": {"steps": 3, "seconds": 0.5},
                   "cohorts": {"history<=5": {"users": 2, "ndcg@10": 0.25 + 0.01 * seed, "low": 0.1, "high": 0.4},
                               "history6-20": {"users": 0}}}
        if args[:2] == ["data", "synth"]:
            out.mkdir(parents=True, exist_ok=True)
            (out / "interactions.parquet").write_bytes(b"")
        elif args[:2] == ["data", "fetch"]:
            out.mkdir(parents=True, exist_ok=True)
            (out / "fetch.json").write_text(json.dumps({"name": args[2], "format": "recbole"}))
        elif args[0] == "prepare":
            out.mkdir(parents=True, exist_ok=True)
            names = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--source-name"]
            sources = {n: {"interactions": 250, "items": 15, "shared_items": 10, "private_items": 5} for n in names}
            (out / "stats.json").write_text(json.dumps({"users": 50, "items": 20, "interactions": 500,
                                                        "domains": self.domains, "sources": sources}))
        elif args[0] in ("pretrain", "finetune", "distill"):
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics))
            if opts.get("--method") == "lora":
                (out / "adapter_config.json").write_text("{}")
        elif args[0] == "bench-serve":
            side = {"p50_ms": 1.0, "params": 100}
            out.write_text(json.dumps({"teacher": side, "student": side, "speedup_p50": 1.0,
                                       "onnxruntime": {"teacher": side, "student": side, "speedup_p50": 1.0}}))
        else:
            raise AssertionError(f"unexpected command {args}")


@pytest.fixture
def fake(monkeypatch):
    cli = FakeCli(["d0", "d1", "d2", "d3"])
    monkeypatch.setattr(runner.Runner, "_cli", lambda self, *args, train=False: cli(self, *args, train=train))
    monkeypatch.setattr(report, "_plots", lambda *a, **k: [])   # matplotlib is not what these tests are about
    return cli


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def experiment(recipe, out, capsys, *sets, rerun_changed=False, force=False) -> list[str]:
    """Run the experiment; the steps that ran, in order."""
    run_experiment(str(recipe), str(out), force=force, overrides=list(sets), rerun_changed=rerun_changed)
    return re.findall(r"^\[run\] (.*)$", capsys.readouterr().out, re.M)


def changed(recipe, out, capsys, *sets) -> str:
    """Run the experiment expecting it to stop because the recipe changed; its message."""
    with pytest.raises(InputError) as e:
        experiment(recipe, out, capsys, *sets)
    assert "[run]" not in capsys.readouterr().out
    return str(e.value)


def hashes(out: Path) -> dict[str, str]:
    return {json.loads(p.read_text())["step"]: json.loads(p.read_text())["hash"]
            for p in sorted((out / "steps").rglob("*.json"))}


def test_an_unchanged_rerun_reuses_every_step(fake, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert experiment(recipe, out, capsys) == ALL
    first = hashes(out)
    assert sorted(first) == sorted(ALL)
    for path in (out / "steps").rglob("*.json"):
        rec = json.loads(path.read_text())
        assert rec["state"] == "complete" and "<out>/" in json.dumps(rec["settings"])
        assert str(out) not in path.read_text()
    assert json.loads((out / "steps" / "pretrain.json").read_text())["settings"]["pretrain"]["train"]["lr"] == 0.0005

    run_experiment(str(recipe), str(out))
    log = capsys.readouterr().out
    assert "[run]" not in log and log.count("[skip]") == len(ALL), log
    assert hashes(out) == first

    # The hash is the settings', not the folder's: the same recipe elsewhere gives the same hashes.
    assert experiment(recipe, tmp_path / "elsewhere", capsys) == ALL
    assert hashes(tmp_path / "elsewhere") == first


def test_a_changed_setting_stops_with_exit_2_naming_it(fake, recipe, tmp_path, capsys):
    from crossrec_dist.cli import main

    out = tmp_path / "out"
    experiment(recipe, out, capsys)
    before = hashes(out), (out / "pretrain" / "metrics.json").stat().st_mtime_ns
    rc = main(["experiment", "--config", str(recipe), "--out", str(out), "--set", "pretrain.train.lr=1e-3"])
    std = capsys.readouterr()
    assert rc == 2, std.err
    assert "step 'pretrain': pretrain.train.lr: 0.0005 -> 0.001" in std.err
    assert "step 'finetune d3 lora': upstream step 'pretrain' changed" in std.err
    assert "step 'serving benchmark d3 student_ce': upstream step 'distill d3 student_ce' changed" in std.err
    assert "'prepare'" not in std.err and "'synth'" not in std.err
    assert "--rerun-changed" in std.err and "--force" in std.err and "Traceback" not in std.err
    assert "[run]" not in std.out and len(fake.calls) == len(ALL)      # nothing ran, nothing was touched
    assert (hashes(out), (out / "pretrain" / "metrics.json").stat().st_mtime_ns) == before


def test_rerun_changed_reruns_the_changed_step_and_everything_downstream(fake, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    experiment(recipe, out, capsys)
    (out / "pretrain" / "left_over.bin").write_text("from the old run")
    del fake.calls[:]
    assert experiment(recipe, out, capsys, "pretrain.train.lr=1e-3",
                      rerun_changed=True) == DOWNSTREAM_OF_PRETRAIN
    assert not (out / "pretrain" / "left_over.bin").exists()          # the old output was deleted first
    pre = next(config for args, config in fake.calls if args[0] == "pretrain")
    assert pre["train"]["lr"] == 0.001
    # Re-running the new recipe now reuses everything; the old one is a change again.
    assert experiment(recipe, out, capsys, "pretrain.train.lr=1e-3") == []
    assert "pretrain.train.lr: 0.001 -> 0.0005" in changed(recipe, out, capsys)


def test_one_methods_override_reruns_only_that_method_and_what_reads_it(fake, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    experiment(recipe, out, capsys)
    msg = changed(recipe, out, capsys, "method_overrides={full: {train: {lr: 0.01}}}")
    assert "step 'finetune d3 full': finetune.train.lr: null -> 0.01" in msg
    assert "lora" not in msg and "'pretrain'" not in msg and "distill" not in msg
    assert experiment(recipe, out, capsys, "method_overrides={full: {train: {lr: 0.01}}}",
                      rerun_changed=True) == ["finetune d3 full"]

    # The distillation teacher: its students and their serving benchmarks follow it.
    sets = ("method_overrides={full: {train: {lr: 0.01}}, lora: {lora: {r: 4}}}",)
    msg = changed(recipe, out, capsys, *sets)
    assert "step 'finetune d3 lora': finetune.lora.r: 8 -> 4" in msg
    assert "step 'distill d3 student_kd': upstream step 'finetune d3 lora' changed" in msg
    assert "finetune d3 full" not in msg and "finetune d3 none" not in msg
    assert experiment(recipe, out, capsys, *sets, rerun_changed=True) == TEACHER_AND_DOWNSTREAM


def test_a_changed_data_option_reruns_everything_after_the_data(fake, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    experiment(recipe, out, capsys)
    msg = changed(recipe, out, capsys, "data.synth.seed=1")
    assert "step 'synth': --seed: 0 -> 1" in msg and "step 'prepare': upstream step 'synth' changed" in msg
    assert experiment(recipe, out, capsys, "data.synth.seed=1", rerun_changed=True) == ALL
    msg = changed(recipe, out, capsys, "data.synth.seed=1", "data.min_user=3")
    assert "step 'prepare': --min-user: 0 -> 3" in msg and "'synth'" not in msg


def test_changes_are_found_before_any_step_runs(fake, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    experiment(recipe, out, capsys)
    (out / "targets" / "d3" / "none" / "metrics.json").unlink()    # a step that would run (resume) first
    del fake.calls[:]
    msg = changed(recipe, out, capsys, "method_overrides={lora: {lora: {r: 4}}}")
    assert "step 'finetune d3 lora': finetune.lora.r: 8 -> 4" in msg and "finetune d3 none" not in msg
    assert fake.calls == []
    assert experiment(recipe, out, capsys, "method_overrides={lora: {lora: {r: 4}}}", rerun_changed=True) == [
        "finetune d3 none", *TEACHER_AND_DOWNSTREAM]


def test_output_without_a_record_counts_as_changed(fake, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    experiment(recipe, out, capsys)
    (out / "steps" / "pretrain.json").unlink()       # as an older crossrec left it: metrics.json, no record
    msg = changed(recipe, out, capsys)
    assert "step 'pretrain': pretrain/metrics.json exists but has no step record" in msg
    assert "step 'finetune d3 none': upstream step 'pretrain' runs again" in msg
    assert experiment(recipe, out, capsys, rerun_changed=True) == DOWNSTREAM_OF_PRETRAIN
    assert experiment(recipe, out, capsys) == []


def test_a_step_that_died_is_never_reused(fake, recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    experiment(recipe, out, capsys)

    def dies_after_writing(self, *args, train=False):
        fake(self, *args, train=train)                   # metrics.json is there ...
        raise runner.StepFailed("killed")                # ... but the command did not succeed

    monkeypatch.setattr(runner.Runner, "_cli", dies_after_writing)
    with pytest.raises(runner.StepFailed):
        experiment(recipe, out, capsys, "finetune.train.epochs=3", rerun_changed=True)
    assert re.findall(r"^\[run\] (.*)$", capsys.readouterr().out, re.M) == ["finetune d3 none"]
    rec = json.loads((out / "steps" / "finetune" / "d3" / "none.json").read_text())
    assert rec["state"] == "started" and (out / "targets" / "d3" / "none" / "metrics.json").is_file()
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(runner.Runner, "_cli", lambda self, *args, train=False: fake(self, *args, train=train))
    # Same settings: the unfinished step runs again (resuming its own output), then the rest.
    assert experiment(recipe, out, capsys, "finetune.train.epochs=3", rerun_changed=True) == [
        "finetune d3 none", "finetune d3 full", "finetune d3 lora", *TEACHER_AND_DOWNSTREAM[1:]]
    # Other settings than the unfinished output was started with: never resumed, a change.
    (out / "steps" / "finetune" / "d3" / "none.json").write_text(json.dumps(rec))
    msg = changed(recipe, out, capsys, "finetune.train.epochs=4")
    assert "step 'finetune d3 none':" in msg and "finetune.train.epochs: 3 -> 4" in msg and "unfinished" in msg
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == set(ALL)


@pytest.mark.parametrize("target", ["../evil", "/etc", "a/../../b"])
def test_a_target_named_like_a_path_stays_inside_out(fake, recipe, tmp_path, capsys, target):
    fake.domains = ["d0", "d1", target]
    out = tmp_path / "sandbox" / "out"
    experiment(recipe, out, capsys, f"targets=['{target}']")
    made = [p for p in tmp_path.rglob("*") if p.name != "recipe.yaml"]
    outside = [p for p in made if not p.resolve().is_relative_to(out.resolve())]
    assert outside == [tmp_path / "sandbox"], outside
    finetuned = [Path(o["--out"]) for args, _ in fake.calls if args[0] == "finetune"
                 for o in [{a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}]]
    assert len(finetuned) == 3 and all(p.parent.parent == out / "targets" for p in finetuned)
    res = json.loads((out / "results.json").read_text())
    assert res["targets"][target]["lora"]["ndcg@10"] == 0.1      # the report reads the same folders
    assert experiment(recipe, out, capsys, f"targets=['{target}']") == []


@pytest.mark.parametrize("targets", ["['']", "['  ']", "[d3, d3]"])
def test_an_empty_or_repeated_target_name_is_refused(fake, recipe, tmp_path, capsys, targets):
    with pytest.raises(InputError) as e:
        experiment(recipe, tmp_path / "out", capsys, f"targets={targets}")
    assert e.value.field == "targets" and not (tmp_path / "out").exists()



# -- several data sources ---------------------------------------------------------------------------

MULTI = {
    "name": "cross",
    "data": {"sources": [{"name": "ml1m", "fetch": "movielens-1m-titles"},
                         {"name": "ml100k", "fetch": "movielens-100k-titles"}],
             "domain_from": "source", "min_user": 2},
    "targets": ["ml100k"],
    "sources": ["ml1m"],
    "methods": ["none", "lora"],
    "pretrain": {"preset": "tiny", "train": {"epochs": 2}},
    "finetune": {"train": {"epochs": 2}},
}
MULTI_ALL = ["fetch ml1m", "fetch ml100k", "prepare", "pretrain", "finetune ml100k none", "finetune ml100k lora"]


@pytest.fixture
def multi(tmp_path, fake):
    fake.domains = ["ml100k", "ml1m"]
    path = tmp_path / "cross.yaml"
    path.write_text(yaml.safe_dump(MULTI, sort_keys=False))
    return path


def _opts(args):
    return {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}


def test_several_sources_fetch_each_and_prepare_reads_all_in_order(fake, multi, tmp_path, capsys):
    out = tmp_path / "out"
    assert experiment(multi, out, capsys) == MULTI_ALL
    fetches = [args for args, _ in fake.calls if args[:2] == ["data", "fetch"]]
    assert fetches == [["data", "fetch", "movielens-1m-titles", "--out", str(out / "raw" / "ml1m")],
                       ["data", "fetch", "movielens-100k-titles", "--out", str(out / "raw" / "ml100k")]]
    prep = next(args for args, _ in fake.calls if args[0] == "prepare")
    pairs = lambda flag: [prep[i + 1] for i, a in enumerate(prep[:-1]) if a == flag]   # noqa: E731
    assert pairs("--input") == [str(out / "raw" / "ml1m"), str(out / "raw" / "ml100k")]
    assert pairs("--source-name") == ["ml1m", "ml100k"] and pairs("--format") == ["auto"]
    assert _opts(prep)["--domain-from"] == "source" and _opts(prep)["--min-user"] == "2"
    pre = next(args for args, _ in fake.calls if args[0] == "pretrain")
    assert _opts(pre)["--domains"] == "ml1m"

    rec = json.loads((out / "steps" / "prepare.json").read_text())
    assert rec["settings"]["options"]["--input"] == ["<out>/raw/ml1m", "<out>/raw/ml100k"]
    assert rec["settings"]["options"]["--source-name"] == ["ml1m", "ml100k"]
    assert sorted(rec["upstream"]) == ["fetch ml100k", "fetch ml1m"]
    assert (out / "steps" / "fetch" / "ml1m.json").is_file() and (out / "steps" / "fetch" / "ml100k.json").is_file()
    assert "Data sources (items shared with another source / private): ml1m: 250 interactions" in (
        out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["recipe"]["data"]["sources"][1]["name"] == "ml100k"
    # Unchanged: everything reused; the same recipe elsewhere gives the same hashes.
    assert experiment(multi, out, capsys) == []
    assert experiment(multi, tmp_path / "elsewhere", capsys) == MULTI_ALL
    assert hashes(tmp_path / "elsewhere") == hashes(out)


def test_a_changed_source_reruns_its_fetch_and_everything_after_the_data(fake, multi, tmp_path, capsys):
    out = tmp_path / "out"
    experiment(multi, out, capsys)
    other = "data.sources=[{name: ml1m, fetch: movielens-1m}, {name: ml100k, fetch: movielens-100k-titles}]"
    msg = changed(multi, out, capsys, other)
    assert "step 'fetch ml1m': command: data fetch movielens-1m-titles -> data fetch movielens-1m" in msg
    assert "step 'prepare': upstream step 'fetch ml1m' changed" in msg
    assert "step 'finetune ml100k lora':\n    upstream step 'pretrain' changed" in msg
    assert "'fetch ml100k'" not in msg
    del fake.calls[:]
    assert experiment(multi, out, capsys, other, rerun_changed=True) == [s for s in MULTI_ALL if s != "fetch ml100k"]
    assert [a[2] for a, _ in fake.calls if a[:2] == ["data", "fetch"]] == ["movielens-1m"]
    assert experiment(multi, out, capsys, other) == []

    # The order of the sources is the order prepare reads them in: a change of prepare, not of the fetches.
    swapped = "data.sources=[{name: ml100k, fetch: movielens-100k-titles}, {name: ml1m, fetch: movielens-1m}]"
    msg = changed(multi, out, capsys, swapped)
    assert "step 'prepare':\n" in msg and "'fetch" not in msg
    assert '    --input: ["<out>/raw/ml1m", "<out>/raw/ml100k"] -> ["<out>/raw/ml100k", "<out>/raw/ml1m"]\n' in msg
    assert '    --source-name: ["ml1m", "ml100k"] -> ["ml100k", "ml1m"]\n' in msg


# Step hashes of the single-source form, pinned: a crossrec that computes other hashes for the same
# recipe cannot reuse the folders this one wrote, so changing them means bumping records.VERSION
# (folders of another version are then refused as a whole; see test_a_folder_of_an_older_version...).
SYNTH_HASHES = {"synth": "d622bbf6969abb78c1ee6e7f036bbad075dec66b0e5fe6ca8daf162a95fccf05",
                "prepare": "dc70b931efa260b044db645e7c9ce77fe8a7cd793c94659a0fca704da4c27fa0"}
ML100K_HASHES = {"fetch": "be31711107f6ffc1819827e8695b8a7fb35d8cf2ff5d0ebf25bd06d49c4cf949",
                 "prepare": "56cb5455123798de97a85aec5b5299cd11f227dcf60e7e5ed43560cf6bdadf12"}


@pytest.mark.parametrize("data, pinned", [
    (None, SYNTH_HASHES),
    ({"source": "movielens-100k", "domain_from": "user.zip_code:prefix1"}, ML100K_HASHES),
    ({"domain_from": "user.zip_code:prefix1"}, ML100K_HASHES),              # movielens-100k by default
], ids=["synth", "movielens-100k", "default-source"])
def test_the_single_source_form_keeps_its_step_hashes(fake, tmp_path, capsys, data, pinned):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "data": data} if data else RECIPE))
    out = tmp_path / "out"
    ran = experiment(path, out, capsys)
    assert ran[:3] == [*pinned, "pretrain"]
    got = hashes(out)
    assert {k: got[k] for k in pinned} == pinned
    assert json.loads((out / "steps" / "pretrain.json").read_text())["upstream"] == {"prepare": pinned["prepare"]}
    assert not (out / "steps" / "fetch").exists()
    assert "Data sources" not in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["recipe"]["data"]["source"] == (
        "synth" if data is None else "movielens-100k")


def test_a_source_named_like_a_path_stays_inside_out(fake, multi, tmp_path, capsys):
    fake.domains = ["../up", "ml1m"]
    out = tmp_path / "sandbox" / "out"
    sets = ("data.sources=[{name: ml1m, fetch: movielens-1m-titles}, {name: ../up, fetch: movielens-100k-titles}]",
            "targets=['../up']")
    experiment(multi, out, capsys, *sets)
    dest = Path(next(_opts(a)["--out"] for a, _ in fake.calls if a[:3] == ["data", "fetch", "movielens-100k-titles"]))
    assert dest.parent == out / "raw" and dest.name != ".." and (dest / "fetch.json").is_file()
    made = [p for p in tmp_path.rglob("*") if p.suffix != ".yaml"]
    assert [p for p in made if not p.resolve().is_relative_to(out.resolve())] == [tmp_path / "sandbox"]


@pytest.mark.parametrize("override, key, words", [
    ("data.sources=[]", "data.sources", "empty"),
    ("data.source=movielens-1m", "data.sources", "not both"),
    ("data.sources=[{name: a, fetch: movielens-1m-titles}, {name: a, fetch: movielens-100k-titles}]",
     "data.sources[1].name", "both called 'a'"),
    ("data.sources=[{name: a, fetch: movielens-2m}]", "data.sources[0].fetch", "movielens-1m-titles"),
    ("data.sources=[{name: a}]", "data.sources[0].fetch", "missing"),
    ("data.sources=[{name: a, fecth: movielens-1m-titles}]", "data.sources[0].fecth", "unknown key"),
    ("data.sources=[{name: a, fetch: movielens-1m-titles, synth: {users: 5}}]", "data.sources[0].synth",
     "unknown key"),
    ("data.sources=[{name: 'a:b', fetch: movielens-1m-titles}]", "data.sources[0].name", "':'"),
    ("data.sources=[{name: '', fetch: movielens-1m-titles}]", "data.sources[0].name", "non-empty"),
    ("data.sources=[ml1m]", "data.sources[0]", "mapping"),
    ("data.sources=ml1m", "data.sources", "list"),
    ("data.synth={users: 5}", "data.synth", "source: synth"),
])
def test_a_bad_sources_section_is_refused_naming_the_key(fake, multi, tmp_path, capsys, override, key, words):
    with pytest.raises(InputError) as e:
        experiment(multi, tmp_path / "out", capsys, override)
    assert (e.value.field, e.value.path) == (key, str(multi)), str(e.value)
    assert words in e.value.message and f"field '{key}'" in str(e.value)
    assert fake.calls == [] and not (tmp_path / "out").exists()


def test_a_bad_sources_section_exits_2_from_the_command_line(fake, multi, tmp_path, capsys):
    from crossrec_dist.cli import main

    rc = main(["experiment", "--config", str(multi), "--out", str(tmp_path / "out"),
               "--set", "data.sources=[{name: a, fetch: movielens-2m}]"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{multi}, field 'data.sources[0].fetch'" in err and "Traceback" not in err, err


def test_seeds_run_each_trained_method_once_per_seed_and_report_the_median(fake, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    ran = experiment(recipe, out, capsys, "seeds=[0,1,2]", "distill=null")
    finetunes = [r for r in ran if r.startswith("finetune")]
    assert finetunes == ["finetune d3 none", "finetune d3 full", "finetune d3 full seed 1", "finetune d3 full seed 2",
                         "finetune d3 lora", "finetune d3 lora seed 1", "finetune d3 lora seed 2"]
    seeds_seen = {c[1]["train"]["seed"] for c in fake.calls if c[0][0] == "finetune" and "--method" in c[0]
                  and c[0][c[0].index("--method") + 1] == "lora"}
    assert seeds_seen == {0, 1, 2}
    assert (out / "targets" / "d3" / "lora.seed2" / "metrics.json").is_file()
    res = json.loads((out / "results.json").read_text())["targets"]["d3"]
    assert res["lora"]["seed_ndcg@10"] == pytest.approx([0.10, 0.11, 0.12])
    assert res["lora"]["ndcg@10"] == pytest.approx(0.11) and res["none"]["ndcg@10"] == pytest.approx(0.10)
    # The interval table names both figures: the median over seeds (and each seed's), and the
    # seed-averaged per-user mean that its interval and paired differences are about.
    text = (out / "report.md").read_text()
    assert "| median over seeds (per seed) | seed-averaged test NDCG@10 [95% CI] |" in text
    row = next(line for line in text.splitlines() if line.startswith("| lora |") and "[" in line)
    assert "| 0.1100 (0.1000, 0.1100, 0.1200) |" in row
    # One seed (the default) keeps the folders and step hashes of recipes written before seeds existed.
    one = tmp_path / "one"
    experiment(recipe, one, capsys, "distill=null")
    assert hashes(one)["finetune d3 lora"] == hashes(out)["finetune d3 lora"]


def test_a_recipe_without_distillation_reports_no_students_left_by_an_earlier_run(fake, recipe, tmp_path, capsys):
    """The 3-seed re-run of a study in the main job's folder (`--set distill=null`) found the seed-0
    students there and reported them, with their teacher missing: 'nan' kept. Students belong to a
    report only when its recipe distils."""
    out = tmp_path / "out"
    experiment(recipe, out, capsys)
    assert (out / "targets" / "d3" / "student_kd" / "metrics.json").is_file()
    assert "student_kd" in json.loads((out / "results.json").read_text())["targets"]["d3"]
    experiment(recipe, out, capsys, "methods=[none,full]", "distill=null")
    res = json.loads((out / "results.json").read_text())
    assert set(res["targets"]["d3"]) == {"none", "full"} and "student_kd" not in res["intervals"]["d3"]
    text = (out / "report.md").read_text()
    assert "| student" not in text and "Distillation" not in text and "nan" not in text   # (timings keep its steps)


def test_fractions_run_the_chosen_methods_on_user_shares_and_plot_the_curve(fake, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    ran = experiment(recipe, out, capsys, "fractions=[0.1,1.0]", "seeds=[0,1]", "fraction_methods=[full]",
                     "distill=null", "methods=[none,scratch,full,lora]")
    assert [r for r in ran if r.startswith("finetune d3 full")] == [
        "finetune d3 full", "finetune d3 full seed 1", "finetune d3 full fraction 0.1",
        "finetune d3 full fraction 0.1 seed 1"]
    assert not [r for r in ran if "lora fraction" in r]                  # lora is not a fraction method here
    fractions = {c[1]["train_fraction"] for c in fake.calls if c[1] and "train_fraction" in c[1]}
    assert fractions == {0.1, 1.0}
    assert (out / "targets" / "d3" / "full.frac0.1.seed1" / "metrics.json").is_file()
    curve = json.loads((out / "results.json").read_text())["fractions"]["d3"]
    assert set(curve) == {"none", "full"} and set(curve["full"]) == {"0.1", "1"}
    assert curve["full"]["1"]["interval"]["mean"] > curve["full"]["0.1"]["interval"]["mean"]
    report_md = (out / "report.md").read_text()
    assert "## How much target data do you need?" in report_md and "| full |" in report_md
    # paired against zero-shot at each fraction and against scratch where scratch ran (here: 100% only),
    # by hand: full at 10% ranks one of the 7 users first and the rest at 50 (NDCG 0); zero-shot ranks them
    # 0, 1, 2, 3, 5, 8, 20
    pairs = json.loads((out / "results.json").read_text())["fraction_pairs"]["d3"]["full"]
    none = [1 / math.log2(r + 2) if r < 10 else 0.0 for r in (0, 1, 2, 3, 5, 8, 20)]
    assert pairs["0.1"]["none"]["diff"] == pytest.approx((1 - sum(none)) / 7, abs=1e-6)
    assert pairs["0.1"]["none"]["verdict"] == "worse" and "scratch" not in pairs["0.1"]
    assert pairs["1"]["scratch"] == {"diff": 0.0, "low": 0.0, "high": 0.0, "users": 7,
                                     "verdict": "no significant difference"}
    assert "| full | zero-shot |" in report_md and "| full | scratch |" in report_md
    # new users and new items: each method's cohorts as its first seed's metrics.json records them
    assert "new users and new items" in report_md and "history<=5 (2 users)" in report_md
    assert "| full | 0.2500 [0.1000, 0.4000] | - |" in report_md


def test_a_folder_of_an_older_version_is_refused_naming_force(fake, recipe, tmp_path, capsys):
    """Records of another format, or outputs with no records at all, were written by an older crossrec:
    the run stops before running anything, with one message that names --force (or another --out)."""
    out = tmp_path / "out"
    experiment(recipe, out, capsys)
    path = out / "steps" / "pretrain.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 1}))
    del fake.calls[:]
    for flags in ({}, {"rerun_changed": True}):
        with pytest.raises(InputError, match=r"written by another version of crossrec \(step records of format 1; "
                                             r"this one writes 2\).*re-run with --force.*another --out"):
            experiment(recipe, out, capsys, **flags)
    assert fake.calls == [] and "[run]" not in capsys.readouterr().out
    assert experiment(recipe, out, capsys, force=True) == ALL
    assert experiment(recipe, out, capsys) == []

    shutil.rmtree(out / "steps")                   # outputs and no records: before step records existed
    del fake.calls[:]
    with pytest.raises(InputError, match=r"crossrec \(step outputs without step records\).*--force"):
        experiment(recipe, out, capsys)
    assert fake.calls == []
    assert experiment(recipe, out, capsys, force=True) == ALL


class _Done:
    """What ``Runner._spawn`` returns, for a fake command that already ran (or failed)."""

    def __init__(self, code: int):
        self.code = code

    def poll(self):
        return self.code


def test_jobs_run_fine_tuning_steps_side_by_side_with_the_same_records(fake, recipe, tmp_path, capsys, monkeypatch):
    """--jobs 2: the fine-tuning steps and the two students are queued and started together (two at a
    time, each with its own log), serving benchmarks run alone after both students; the records and
    hashes are those of a one-at-a-time run, so either reuses the other's steps; a failed queued step
    stops the run naming it, with the end of its log, and counts as unfinished."""
    started = []

    def spawn(self, args, train, log):
        started.append(args[0] if args[0] != "finetune" else f"finetune {args[args.index('--method') + 1]}")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"log of {args[0]}\n")
        fake(self, *args, train=train)
        return _Done(0)

    monkeypatch.setattr(runner.Runner, "_spawn", spawn)
    out = tmp_path / "out"
    run_experiment(str(recipe), str(out), jobs=2)
    log = capsys.readouterr().out
    assert started == ["finetune none", "finetune full", "finetune lora", "distill", "distill"]
    assert re.findall(r"^\[done\] (.*) in", log, re.M) == ["finetune d3 none", "finetune d3 full", "finetune d3 lora",
                                                           "distill d3 student_kd", "distill d3 student_ce"]
    assert "beside 1 other; log logs/finetune/d3/full.log" in log
    assert (out / "logs" / "distill" / "d3" / "student_ce.log").read_text() == "log of distill\n"
    ran = re.findall(r"^\[run\] (\S.*?)(?: \(beside.*)?$", log, re.M)
    assert ran[-2:] == ["serving benchmark d3 student_kd", "serving benchmark d3 student_ce"] and sorted(ran) == sorted(ALL)
    first = hashes(out)
    run_experiment(str(recipe), str(out))                       # one at a time: every step reused
    assert capsys.readouterr().out.count("[skip]") == len(ALL)
    assert experiment(recipe, tmp_path / "serial", capsys) == ALL and hashes(tmp_path / "serial") == first

    def fails_full(self, args, train, log):
        proc = spawn(self, args, train, log)
        return _Done(3) if "full" in args else proc

    monkeypatch.setattr(runner.Runner, "_spawn", fails_full)
    with pytest.raises(runner.StepFailed, match=r"(?s)step 'finetune d3 full' failed with status 3.*log of finetune"
                                                r".*1 queued step\(s\) did not start"):
        run_experiment(str(recipe), str(out), overrides=["finetune.train.epochs=3"], rerun_changed=True, jobs=2)
    assert json.loads((out / "steps" / "finetune" / "d3" / "full.json").read_text())["state"] == "started"
    assert not (out / "steps" / "finetune" / "d3" / "lora.json").exists()     # queued, never started
    capsys.readouterr()
    assert experiment(recipe, out, capsys, "finetune.train.epochs=3", rerun_changed=True) == [
        "finetune d3 full", "finetune d3 lora", *TEACHER_AND_DOWNSTREAM[1:]]
    with pytest.raises(InputError, match="--jobs"):
        runner.Runner(runner.load_recipe(str(recipe), ["launch=launch/cpu_ddp_2proc.yaml"]), out, jobs=2)


def test_a_step_that_runs_alone_keeps_every_core_and_side_by_side_steps_share_them(tmp_path, monkeypatch):
    """Before: with --jobs 2 pretraining (which runs alone) got OMP_NUM_THREADS=1 on a 2-core machine too."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner, "available_cores", lambda: 4)
    repo = Path(__file__).resolve().parents[1]
    r = runner.Runner(runner.load_recipe(str(repo / "launch" / "recipes" / "ml_cross_platform.yaml"), []),
                      tmp_path / "out", jobs=2)
    assert "OMP_NUM_THREADS" not in r._env(alone=True)
    assert r._env()["OMP_NUM_THREADS"] == "2"
