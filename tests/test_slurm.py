"""The sbatch scripts in slurm/, run as real jobs on a real Slurm cluster (one node is enough:
``sudo bash .ci/slurm_up.sh`` brings one up on this machine). Skipped where there is no Slurm.

Four jobs, each as short as still proves its point:

* one ``pretrain.sbatch`` job (tiny preset, 2 CPU processes, ZeRO-3) that is sent USR1 as soon as it
  trains, as Slurm does before a time limit: it must checkpoint, requeue itself, resume from the
  checkpoint and finish. Two tests read that one job: it finished with world 2 / ZeRO-3, and it went
  through preemption, requeue and resume;
* a 2-task ``finetune_regions.sbatch`` array (one LoRA adapter per region, 2 steps each) on the base
  model that job wrote (the README's pipeline: no other base model is built here);
* a ``distill.sbatch`` job (2 steps) from that base and one of the adapters.

Jobs run as the submitting user on the cluster's node(s), so the temporary folders used here must
be visible there (true for the one-node cluster; on a real cluster point TMPDIR / --basetemp at a
shared filesystem)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, child_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="Slurm is not installed (no sbatch on PATH); "
                              "`sudo bash .ci/slurm_up.sh` sets up a one-node cluster"),
]

PRETRAIN_DOMAINS = "1,2,4,5,6,7,9,other"
# Optimizer steps of the preempted pretraining: 7 per epoch here, so ~3 epochs. USR1 goes out at the
# first logged step; the margin is what lets the signal land before the run would end by itself.
PRETRAIN_STEPS = 20
FINETUNE_REGIONS = ("0", "3")
SHORT = "--set train.max_steps=2 --set train.tensorboard=false"
# States a job leaves only through a requeue (or never).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}
# The scripts' parameters (and what they derive themselves): never inherited from the caller's shell.
SCRIPT_PARAMS = {"REPO", "VENV", "DATA", "OUT", "PRESET", "DOMAINS", "DS_CONFIG", "LAUNCH_CONFIG", "NPROC_PER_NODE",
                 "CPU_PROCS_PER_NODE", "MASTER_PORT", "PREEMPT_RESEND", "EXTRA_ARGS", "BASE", "REGIONS", "REGIONS_FILE",
                 "METHOD", "OUT_ROOT", "TEACHER", "DOMAIN", "ADAPTER", "STUDENT_PRESET", "DS_ACCELERATOR",
                 "OMP_NUM_THREADS"}
# Generous: they bound a broken run, not a passing one (jobs may queue behind other users' jobs).
JOB_TIMEOUT = 420
POLL = 1.0
_submitted: list[str] = []


# ---------------------------------------------------------------------------------------------------
# helpers
def _sh(*cmd: str, check: bool = True, timeout: int = 30) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        if check:
            raise AssertionError(f"{' '.join(cmd)}: {e}") from e
        return subprocess.CompletedProcess(list(cmd), 255, "", str(e))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def _job_env(**params: str) -> dict:
    """The environment sbatch exports to the job (--export=ALL): the scripts' parameters. Lists go
    through the environment, not --export=VAR=a,b (which would split at the commas)."""
    env = {k: v for k, v in child_env().items() if k not in SCRIPT_PARAMS}
    env.update(REPO=str(REPO), VENV=sys.prefix, **{k: str(v) for k, v in params.items()})
    return env


def submit(script: str, logdir: Path, *sbatch_args: str, **params: str) -> str:
    """sbatch slurm/<script> with the given parameters; returns the job id (array: the array's id)."""
    logdir.mkdir(parents=True, exist_ok=True)
    pattern = "slurm-%A_%a.out" if any(a.startswith("--array") for a in sbatch_args) else "slurm-%j.out"
    proc = subprocess.run(["sbatch", "--parsable", "--export=ALL", f"--output={logdir / pattern}",
                           *sbatch_args, str(REPO / "slurm" / script)],
                          capture_output=True, text=True, cwd=REPO, env=_job_env(**params), timeout=60)
    assert proc.returncode == 0, f"sbatch {script} failed: {proc.stdout}{proc.stderr}"
    job_id = proc.stdout.strip().split(";")[0]
    _submitted.append(job_id)
    return job_id


def jobs(job_id: str) -> list[dict]:
    """scontrol's records of a job (one per array task), as dicts; [] when the controller does not
    answer (a restart) or has forgotten the job."""
    proc = _sh("scontrol", "show", "job", "-o", job_id, check=False)
    if proc.returncode != 0:
        return []
    recs = []
    for line in proc.stdout.splitlines():
        if line.strip():
            recs.append(dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line)))
    return recs


def logs(logdir: Path) -> str:
    return "\n".join(f"=== {p.name}\n{p.read_text(errors='replace')}" for p in sorted(logdir.glob("slurm-*.out")))


def _tail(text: str, n: int = 6000) -> str:
    lines = [ln for ln in text.splitlines() if "Warning" not in ln and "return func(" not in ln]
    return "\n".join(lines)[-n:]


def _describe(recs: list[dict]) -> list[tuple]:
    return [(r.get("JobId"), r.get("ArrayTaskId"), r.get("JobState"), r.get("Reason"), r.get("ExitCode"))
            for r in recs]


def wait_for(job_id: str, logdir: Path, timeout: float = JOB_TIMEOUT, what: str = "finish") -> list[dict]:
    """Poll until every task of the job is in a terminal state (seen twice in a row: a requeue passes
    through short-lived states). On timeout cancel it and fail with the logs."""
    deadline, last, prev = time.monotonic() + timeout, [], None
    while time.monotonic() < deadline:
        last = jobs(job_id)
        states = tuple(r.get("JobState") for r in last)
        if last and all(s in TERMINAL for s in states):
            if states == prev:
                return last
            prev = states
        else:
            prev = None
        time.sleep(POLL)
    _sh("scancel", job_id, check=False)
    pytest.fail(f"job {job_id} did not {what} within {timeout:.0f}s; state {_describe(last)}\n{_tail(logs(logdir))}")


def assert_completed(recs: list[dict], logdir: Path) -> None:
    bad = [d for d in _describe(recs) if d[2] != "COMPLETED"]
    assert recs and not bad, f"jobs not COMPLETED: {bad}\n{_tail(logs(logdir))}"


# ---------------------------------------------------------------------------------------------------
# fixtures
@pytest.fixture(scope="session")
def slurm_cluster():
    """A cluster that answers, with a node that can run jobs; skips (never errors) otherwise. Every
    fixture and test below asks for it first, so that nothing is built for nothing."""
    proc = _sh("sinfo", "-h", "-o", "%T", check=False, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"Slurm installed but the controller does not answer ({(proc.stderr or proc.stdout).strip()}); "
                    f"run `sudo bash .ci/slurm_up.sh`")
    states = proc.stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        pytest.skip(f"no usable Slurm node (states {states}); run `sudo bash .ci/slurm_up.sh`")
    yield
    active = [j for j in _submitted if any(r.get("JobState") not in TERMINAL for r in jobs(j))]
    if active:
        _sh("scancel", *active, check=False)


@pytest.fixture(scope="session")
def preempted_pretrain(slurm_cluster, ml100k, tmp_path_factory):
    """One pretrain.sbatch job, sent USR1 (`scancel --signal=USR1 --batch`, what --signal=B:USR1@N
    does before the time limit) as soon as it logs its first optimizer step, then left to requeue,
    resume and finish: (OUT, logdir, scontrol records, log text)."""
    root = tmp_path_factory.mktemp("slurm_pretrain")
    out, logdir = root / "pretrain", root / "logs"
    job = submit("pretrain.sbatch", logdir, DATA=ml100k, OUT=out, PRESET="tiny", DOMAINS=PRETRAIN_DOMAINS,
                 EXTRA_ARGS=f"--set train.max_steps={PRETRAIN_STEPS} --set train.log_every=1 "
                            f"--set train.tensorboard=false")
    training = re.compile(r"^step \d+/\d+ epoch", re.M)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not training.search(logs(logdir)):
        recs = jobs(job)
        if recs and recs[0].get("JobState") in TERMINAL:
            pytest.fail(f"pretrain job ended before its first step: {_describe(recs)}\n{_tail(logs(logdir))}")
        if time.monotonic() > deadline:
            _sh("scancel", job, check=False)
            pytest.fail(f"pretrain job logged no step within {JOB_TIMEOUT}s: {_describe(recs)}\n{_tail(logs(logdir))}")
        time.sleep(0.5)
    _sh("scancel", "--signal=USR1", "--batch", job, check=False)
    recs = wait_for(job, logdir)
    return out, logdir, recs, logs(logdir)


@pytest.fixture(scope="session")
def slurm_base(preempted_pretrain) -> Path:
    """The base model for the fine-tuning and distillation jobs: what the pretrain job wrote."""
    out, logdir, recs, text = preempted_pretrain
    if not (out / "model.safetensors").is_file():
        pytest.fail(f"no base model: the pretrain job did not finish ({_describe(recs)}); "
                    f"see test_pretrain_zero3_two_cpu_processes\n{_tail(text, 3000)}")
    return out


@pytest.fixture(scope="session")
def slurm_adapters(slurm_cluster, slurm_base, ml100k, tmp_path_factory):
    """One array job, one LoRA adapter per region: (OUT_ROOT, logdir, scontrol records)."""
    root = tmp_path_factory.mktemp("slurm_adapters")
    regions = root / "regions.txt"
    regions.write_text("# one region per line\n" + "\n".join(FINETUNE_REGIONS) + "\n")
    logdir = root / "logs"
    job = submit("finetune_regions.sbatch", logdir, f"--array=0-{len(FINETUNE_REGIONS) - 1}",
                 DATA=ml100k, BASE=slurm_base, REGIONS_FILE=regions, OUT_ROOT=root / "adapters", METHOD="lora",
                 EXTRA_ARGS=SHORT)
    return root / "adapters", logdir, wait_for(job, logdir)


# ---------------------------------------------------------------------------------------------------
# tests
def test_pretrain_zero3_two_cpu_processes(preempted_pretrain):
    out, logdir, recs, text = preempted_pretrain
    assert_completed(recs, logdir)
    assert (out / "model.safetensors").is_file(), _tail(text)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2, metrics.get("world_size")
    assert metrics["zero_stage"] == 3, metrics.get("zero_stage")
    assert metrics["train"]["steps"] == PRETRAIN_STEPS, metrics["train"]
    assert metrics["domains"] == PRETRAIN_DOMAINS.split(","), "DOMAINS (a list with commas) reached the job"
    assert "SLURM_NODEID=0" in text and "--machine_rank 0" not in text, "machine rank must expand on the node"
    assert "DS_ACCELERATOR=cpu" in text and "world 2" in text


def test_preempted_job_checkpoints_requeues_and_finishes(preempted_pretrain):
    """USR1 to the batch script: the training processes checkpoint and exit, the script requeues the
    job, the rerun (same job id, log appended) resumes from the checkpoint and finishes."""
    out, logdir, recs, text = preempted_pretrain
    assert "caught USR1" in text, _tail(text)
    stopped = re.search(r"preempted by signal at step (\d+): checkpoint saved to (\S+?);", text)
    assert stopped, f"the trainer did not checkpoint-and-exit on USR1\n{_tail(text)}"
    assert "preempted: requeueing job" in text, _tail(text)
    assert_completed(recs, logdir)
    assert int(recs[0].get("Restarts", 0)) >= 1, f"job was not requeued\n{_tail(text)}"
    resumed = re.search(r"resumed from (\S+) at step (\d+)", text)
    assert resumed, f"the requeued run did not resume\n{_tail(text)}"
    assert 0 < int(resumed.group(2)) == int(stopped.group(1)) < PRETRAIN_STEPS, (stopped.group(0), resumed.group(0))
    assert Path(resumed.group(1)).resolve() == Path(stopped.group(2)).resolve()
    assert text.index("caught USR1") < text.index("(restart 1)") < resumed.start(), "log order"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == PRETRAIN_STEPS and metrics["world_size"] == 2 and metrics["zero_stage"] == 3


def test_finetune_array_exports_one_adapter_per_region(slurm_adapters):
    adapters, logdir, recs = slurm_adapters
    assert_completed(recs, logdir)
    assert sorted(r.get("ArrayTaskId") for r in recs) == [str(i) for i in range(len(FINETUNE_REGIONS))]
    for region in FINETUNE_REGIONS:
        folder = adapters / region
        assert (folder / "adapter_model.safetensors").is_file(), f"no adapter for region {region}\n{_tail(logs(logdir))}"
        assert (folder / "adapter_config.json").is_file()
        assert json.loads((folder / "metrics.json").read_text())["domain"] == region


def test_distill_job(slurm_cluster, slurm_adapters, slurm_base, ml100k, tmp_path):
    adapters, *_ = slurm_adapters
    out, logdir = tmp_path / "student", tmp_path / "logs"
    job = submit("distill.sbatch", logdir, DATA=ml100k, TEACHER=slurm_base, ADAPTER=adapters / "3", DOMAIN="3",
                 OUT=out, EXTRA_ARGS=SHORT)
    assert_completed(wait_for(job, logdir), logdir)
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file(), _tail(logs(logdir))
    assert json.loads((out / "metrics.json").read_text())["domain"] == "3"
