"""When ``crossrec experiment`` reuses a step's output: only when the step's settings, and those of every
step upstream of it, are what they were when the output was made. Fast: the steps' commands are
replaced by a fake that writes the files each command would (the real pipeline is in test_experiment.py)."""
import json
import re
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
        metrics = {"test": {"ndcg@10": 0.1, "hr@10": 0.2, "mrr@10": 0.05, "users": 7},
                   "params": {"total": 1000, "trainable": 100}, "train": {"steps": 3, "seconds": 0.5}}
        if args[:2] == ["data", "synth"]:
            out.mkdir(parents=True, exist_ok=True)
            (out / "interactions.parquet").write_bytes(b"")
        elif args[0] == "prepare":
            out.mkdir(parents=True, exist_ok=True)
            (out / "stats.json").write_text(json.dumps({"users": 50, "items": 20, "interactions": 500,
                                                        "domains": self.domains}))
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
