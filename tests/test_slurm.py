"""The sbatch scripts in slurm/, run as real jobs on a real two-node Slurm cluster:
``sudo bash .ci/slurm_up.sh`` builds one on this machine (nodes crossrec-n1 and crossrec-n2, each a
network namespace with its own hostname, address and slurmd; see slurm/README.md). Skipped where there
is no Slurm; the two-node tests skip on a cluster with one usable node.

The jobs, each as short as still proves its point:

* ``pretrain.sbatch --nodes=2`` (tiny preset, one CPU process per node, ZeRO-3 across the nodes), sent
  USR1 as soon as it trains, as Slurm does before a time limit: both nodes checkpoint, the job
  requeues itself, resumes at the same step and finishes. Three tests read that one job: where it
  ran (two hostnames, each rank on its own node, the rendezvous on the head node's address), what
  each rank held (its share of every parameter), and the preemption sequence;
* the same pretraining on one node (two processes: the same global batch), which the two-node model
  must match (loss per step and final weights, tolerance below);
* a two-node job whose second node's processes are killed mid-run (everything slurmd started there):
  it must fail within a bounded time with a message naming its last checkpoint, and the same job
  resubmitted must resume from that checkpoint and finish (needs root, to find the node's processes);
* a 2-task ``finetune_regions.sbatch`` array (one LoRA adapter per region, 2 steps each) on the base
  model the two-node job wrote, and a ``distill.sbatch`` job (2 steps) from that base and an adapter;
* ``prepare.sbatch``: a plan job that submits a 3-task array (one user partition each, on both nodes)
  and a finish job; the dataset must equal a one-process prepare of the same arguments.

Jobs run as the submitting user on the cluster's nodes, so the temporary folders used here must be
visible there (true on the one-machine cluster; on a real cluster point TMPDIR / --basetemp at a shared
filesystem)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, child_env
from crossrec_dist.commands import _auto_format
from crossrec_dist.data.outofcore import EngineSettings
from crossrec_dist.data.prepare import PrepareOptions, prepare
from test_prepare_out_of_core import _same_dataset

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
PRETRAIN_ARGS = (f"--set train.max_steps={PRETRAIN_STEPS} --set train.log_every=1 --set train.tensorboard=false "
                 f"--set train.rank_report=true")
# Two nodes x 1 process and one node x 2 processes see the same global batch and sum the same two
# gradients: the losses and weights agree to float32 rounding (measured: identical, 0.0 difference).
# The tolerance allows a different summation order, not a different computation.
MATCH_RTOL = 1e-5
# The node-failure job: long enough that the kill lands mid-run, a checkpoint every 5 updates.
FAILURE_STEPS, FAILURE_EVERY = 100, 5
# A job whose node died must be FAILED within this many seconds of the kill (srun --kill-on-bad-exit
# stops the other node's task at once; without it rank 0 would wait in a collective).
FAILURE_BOUND = 60
FINETUNE_REGIONS = ("0", "3")
SHORT = "--set train.max_steps=2 --set train.tensorboard=false"
# States a job leaves only through a requeue (or never).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}
# The scripts' parameters (and what they derive themselves): never inherited from the caller's shell.
SCRIPT_PARAMS = {"REPO", "VENV", "DATA", "OUT", "PRESET", "DOMAINS", "DS_CONFIG", "LAUNCH_CONFIG", "NPROC_PER_NODE",
                 "CPU_PROCS_PER_NODE", "MASTER_PORT", "PREEMPT_RESEND", "EXTRA_ARGS", "BASE", "REGIONS", "REGIONS_FILE",
                 "METHOD", "OUT_ROOT", "TEACHER", "DOMAIN", "ADAPTER", "STUDENT_PRESET", "DS_ACCELERATOR",
                 "OMP_NUM_THREADS", "PREPARE_ARGS", "PARTS", "WORK_DIR", "MEMORY_LIMIT", "PART_ARGS", "STEP"}
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


def usable_nodes() -> list[str]:
    proc = _sh("sinfo", "-h", "-N", "-o", "%N %T", check=False)
    return sorted({n for n, st in (ln.split() for ln in proc.stdout.splitlines() if ln.strip())
                   if st.rstrip("*~#") in ("idle", "mixed", "allocated", "completing")})


def hostnames(nodelist: str) -> list[str]:
    return _sh("scontrol", "show", "hostnames", nodelist).stdout.split()


@pytest.fixture(scope="session")
def two_nodes(slurm_cluster) -> list[str]:
    nodes = usable_nodes()
    if len(nodes) < 2:
        pytest.skip(f"the two-node tests need two usable nodes, this cluster has {nodes}; "
                    f"`sudo bash .ci/slurm_up.sh` builds a two-node cluster on this machine")
    return nodes


def wait_for_log(job_id: str, logdir: Path, pattern: re.Pattern, what: str) -> re.Match:
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (m := pattern.search(logs(logdir))):
        recs = jobs(job_id)
        if recs and recs[0].get("JobState") in TERMINAL:
            pytest.fail(f"job ended before {what}: {_describe(recs)}\n{_tail(logs(logdir))}")
        if time.monotonic() > deadline:
            _sh("scancel", job_id, check=False)
            pytest.fail(f"job logged no {what} within {JOB_TIMEOUT}s: {_describe(recs)}\n{_tail(logs(logdir))}")
        time.sleep(0.5)
    return m


def pretrain_job(logdir: Path, out: Path, data: Path, *sbatch_args: str, extra: str = "", **params) -> str:
    return submit("pretrain.sbatch", logdir, *sbatch_args, DATA=data, OUT=out, PRESET="tiny",
                  DOMAINS=PRETRAIN_DOMAINS, EXTRA_ARGS=f"{PRETRAIN_ARGS} {extra}".strip(), **params)


@pytest.fixture(scope="session")
def one_node_pretrain(two_nodes, ml100k, tmp_path_factory):
    """The reference: the same pretraining on one node with two processes (the same global batch).
    Submitted first and not waited for here: it runs beside the two-node job (one CPU each)."""
    root = tmp_path_factory.mktemp("slurm_one_node")
    out, logdir = root / "pretrain", root / "logs"
    job = pretrain_job(logdir, out, ml100k, "--nodes=1", "--cpus-per-task=1", CPU_PROCS_PER_NODE="2")
    return job, out, logdir


@pytest.fixture(scope="session")
def preempted_pretrain(two_nodes, one_node_pretrain, ml100k, tmp_path_factory):
    """One ``pretrain.sbatch --nodes=2`` job (one process per node), sent USR1 (`scancel --signal=USR1
    --batch`, what --signal=B:USR1@N does before the time limit) as soon as it logs its first optimizer
    step, then left to requeue, resume and finish: (OUT, logdir, scontrol records, log text)."""
    root = tmp_path_factory.mktemp("slurm_pretrain")
    out, logdir = root / "pretrain", root / "logs"
    job = pretrain_job(logdir, out, ml100k, "--nodes=2", "--cpus-per-task=1", CPU_PROCS_PER_NODE="1")
    wait_for_log(job, logdir, re.compile(r"^step \d+/\d+ epoch", re.M), "optimizer step")
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
def _rank_reports(out: Path) -> list[dict]:
    reports = [json.loads(f.read_text()) for f in sorted((out / "ranks").glob("rank*.json"))]
    return sorted(reports, key=lambda r: r["rank"])


def test_pretrain_spans_two_nodes(preempted_pretrain):
    """Where the two-node job ran: two hostnames in its node list, one rank on each with its own
    address (two network namespaces: they share no loopback), the rendezvous on the head node."""
    out, logdir, recs, text = preempted_pretrain
    assert_completed(recs, logdir)
    assert (out / "model.safetensors").is_file(), _tail(text)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["zero_stage"], metrics["train"]["steps"]) == (2, 3, PRETRAIN_STEPS)
    assert metrics["domains"] == PRETRAIN_DOMAINS.split(","), "DOMAINS (a list with commas) reached the job"
    nodes = hostnames(recs[0]["NodeList"])
    assert len(nodes) == 2 and len(set(nodes)) == 2, recs[0]["NodeList"]
    ranks = _rank_reports(out)
    assert [r["rank"] for r in ranks] == [0, 1], ranks
    assert [r["host"] for r in ranks] == nodes, "rank r runs on the job's node r"
    assert [r["node_rank"] for r in ranks] == [0, 1] and [r["world"] for r in ranks] == [2, 2]
    addresses = [r["address"] for r in ranks]
    assert len(set(addresses)) == 2 and not any(a.startswith("127.") for a in addresses), addresses
    for r in ranks:   # the rendezvous: the head node's name, resolving to rank 0's own address
        assert r["rendezvous"]["addr"] == nodes[0] and r["backend"] == "gloo", r
        assert socket.gethostbyname(r["rendezvous"]["addr"]) == addresses[0]
    assert f"head {nodes[0]}:" in text
    for node_id, host in enumerate(nodes):   # the machine rank expanded on each node, not in the script
        assert f"{host}] node SLURM_NODEID={node_id}" in text, _tail(text)
    assert "--machine_rank 0" not in text and "DS_ACCELERATOR=cpu" in text and "world 2" in text


def test_each_node_holds_its_share_of_every_parameter(preempted_pretrain):
    """ZeRO-3 across the nodes: each rank stores half (rounded up) of every parameter, the two halves
    cover it, and after training neither holds a gathered copy of any but the few small parameters
    DeepSpeed keeps whole (stage3_param_persistence_threshold)."""
    out, *_ = preempted_pretrain
    ranks = _rank_reports(out)
    names = ranks[0]["params"].keys()
    assert names and names == ranks[1]["params"].keys()
    full_total = sum(v["full"] for v in ranks[0]["params"].values())
    for name in names:
        full = ranks[0]["params"][name]["full"]
        local = [r["params"][name]["local"] for r in ranks]
        assert local == [-(-full // 2)] * 2, (name, full, local)
    for r in ranks:
        held = sum(v["materialized"] for v in r["params"].values())
        assert held < 0.01 * full_total, (r["host"], held, full_total)


def test_preempted_job_checkpoints_on_both_nodes_requeues_and_finishes(preempted_pretrain):
    """USR1 to the batch script: it reaches the training processes on both nodes, which checkpoint
    together (each rank its own shard) and exit; the script requeues the job, the rerun (same job id,
    log appended) resumes from the checkpoint at the same step and finishes."""
    out, logdir, recs, text = preempted_pretrain
    nodes = hostnames(recs[0]["NodeList"])
    assert "caught USR1" in text, _tail(text)
    for host in nodes:
        assert f"{host}] USR1: forwarding to the training processes" in text, (host, _tail(text))
    stopped = re.search(r"preempted by signal at step (\d+): checkpoint saved to (\S+?);", text)
    assert stopped, f"the trainer did not checkpoint-and-exit on USR1\n{_tail(text)}"
    checkpoint = Path(stopped.group(2))
    for rank in (0, 1):   # every rank wrote its part: its RNG state and its ZeRO shard
        assert (checkpoint / f"rng_rank{rank}.safetensors").is_file(), sorted(checkpoint.rglob("*"))
        assert list(checkpoint.rglob(f"*zero_pp_rank_{rank}_*model_states.pt")), sorted(checkpoint.rglob("*"))
    assert "preempted: requeueing job" in text, _tail(text)
    assert_completed(recs, logdir)
    assert int(recs[0].get("Restarts", 0)) >= 1, f"job was not requeued\n{_tail(text)}"
    resumed = re.search(r"resumed from (\S+) at step (\d+)", text)
    assert resumed, f"the requeued run did not resume\n{_tail(text)}"
    assert 0 < int(resumed.group(2)) == int(stopped.group(1)) < PRETRAIN_STEPS, (stopped.group(0), resumed.group(0))
    assert Path(resumed.group(1)).resolve() == checkpoint.resolve()
    assert text.index("caught USR1") < text.index("(restart 1)") < resumed.start(), "log order"
    assert re.search(r"\(restart 1\) on 2 node\(s\)", text), "the rerun ran on two nodes again"


def test_two_nodes_match_one_node_of_the_same_global_batch(preempted_pretrain, one_node_pretrain):
    """The two-node model (preempted and resumed on the way) against one node with two processes:
    the same loss at every step and the same final weights, to MATCH_RTOL."""
    from safetensors.torch import load_file
    job, one_out, one_logs = one_node_pretrain
    assert_completed(wait_for(job, one_logs), one_logs)
    two_out = preempted_pretrain[0]
    one_ranks = _rank_reports(one_out)
    assert len({r["host"] for r in one_ranks}) == 1 and len(one_ranks) == 2, "the reference ran on one node"

    def losses(out: Path) -> dict[int, float]:
        history = json.loads((out / "metrics.json").read_text())["history"]
        return {h["step"]: h["loss"] for h in history if h.get("kind") == "train"}

    one, two = losses(one_out), losses(two_out)
    assert sorted(one) == list(range(1, PRETRAIN_STEPS + 1)) and sorted(two) == sorted(one), (sorted(one), sorted(two))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=MATCH_RTOL), (step, one[step], two[step])
    w1, w2 = load_file(str(one_out / "model.safetensors")), load_file(str(two_out / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        scale = max(float(w1[name].abs().max()), 1e-6)
        diff = float((w1[name] - w2[name]).abs().max())
        assert diff <= MATCH_RTOL * scale, (name, diff, scale)


def _node_processes(node: str) -> list[int]:
    """What slurmd started on a node of the test cluster: every process in its network namespace
    but slurmd and slurmstepd themselves."""
    proc = _sh("ip", "netns", "pids", node, check=False)
    pids = []
    for pid in proc.stdout.split():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm not in ("slurmd", "slurmstepd"):
            pids.append(int(pid))
    return pids


@pytest.fixture(scope="session")
def node_failure(two_nodes, ml100k, tmp_path_factory):
    """A two-node job whose second node's processes are all killed (SIGKILL: no handler, no goodbye)
    right after a checkpoint; then the same job resubmitted. Returns what each part left."""
    if os.geteuid() != 0 or not Path(f"/run/netns/{two_nodes[1]}").exists():
        pytest.skip("killing one node's processes needs root and the namespaced test cluster (.ci/slurm_up.sh)")
    root = tmp_path_factory.mktemp("slurm_node_failure")
    out, logdir = root / "pretrain", root / "logs"
    extra = f"--set train.max_steps={FAILURE_STEPS} --set train.checkpoint_every={FAILURE_EVERY}"
    job = pretrain_job(logdir, out, ml100k, "--nodes=2", "--cpus-per-task=1", extra=extra, CPU_PROCS_PER_NODE="1")
    wait_for_log(job, logdir, re.compile(r"^checkpoint at step \d+ saved to", re.M), "checkpoint")
    victim = hostnames(jobs(job)[0]["NodeList"])[1]
    killed = _node_processes(victim)
    assert killed, f"no processes of the job found on {victim}"
    t_kill = time.monotonic()
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    recs = wait_for(job, logdir, timeout=FAILURE_BOUND, what=f"end within {FAILURE_BOUND}s of its node's death")
    seconds = time.monotonic() - t_kill
    print(f"\nnode failure: killed {len(killed)} processes on {victim}; job {job} "
          f"{recs[0].get('JobState')} {seconds:.1f} s later")
    failed_text = logs(logdir)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    rerun_logs = root / "rerun_logs"
    rerun = pretrain_job(rerun_logs, out, ml100k, "--nodes=2", "--cpus-per-task=1", extra=extra,
                         CPU_PROCS_PER_NODE="1")
    rerun_recs = wait_for(rerun, rerun_logs)
    return dict(out=out, recs=recs, seconds=seconds, text=failed_text, victim=victim, latest=latest,
                rerun_recs=rerun_recs, rerun_logs=rerun_logs)


def test_a_dead_node_fails_the_job_quickly_with_its_last_checkpoint(node_failure):
    f = node_failure
    state = f["recs"][0]["JobState"]
    assert state == "FAILED", (state, _tail(f["text"]))
    assert f["seconds"] < FAILURE_BOUND
    assert re.search(rf"srun: error: {f['victim']}: task 1", f["text"]), _tail(f["text"])
    assert "step failed with status" in f["text"], _tail(f["text"])
    assert f"last checkpoint: {f['out'] / 'checkpoints' / f['latest']}; resubmit" in f["text"], _tail(f["text"])


def test_the_resubmitted_job_resumes_from_the_last_checkpoint(node_failure):
    f = node_failure
    assert_completed(f["rerun_recs"], f["rerun_logs"])
    text = logs(f["rerun_logs"])
    resumed = re.search(r"resumed from (\S+) at step (\d+)", text)
    assert resumed, _tail(text)
    assert Path(resumed.group(1)).name == f["latest"] and int(resumed.group(2)) == int(f["latest"].split("_")[1])
    assert int(resumed.group(2)) % FAILURE_EVERY == 0 and int(resumed.group(2)) > 0
    metrics = json.loads((f["out"] / "metrics.json").read_text())
    assert metrics["train"]["steps"] == FAILURE_STEPS and metrics["world_size"] == 2


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


def test_prepare_array_across_nodes_equals_one_process_prepare(two_nodes, ml100k_raw, tmp_path):
    """``prepare.sbatch``: the plan job submits a 3-task array (one user partition per task; --exclusive
    spreads the tasks over both nodes) and a finish job after it; the dataset equals the in-memory
    prepare of the same arguments, array by array."""
    fmt = _auto_format(str(ml100k_raw))
    logdir, out = tmp_path / "logs", tmp_path / "prepared"
    args = f"--input {ml100k_raw} --format {fmt} --domain-from user.zip_code:prefix1 --min-item 2 --out {out}"
    job = submit("prepare.sbatch", logdir, PREPARE_ARGS=args, PARTS="3", WORK_DIR=str(logdir / "plan"),
                 PART_ARGS="--exclusive", MEMORY_LIMIT="500MB")
    assert_completed(wait_for(job, logdir), logdir)
    m = re.search(r"submitted part array job (\d+) \(tasks 0-2\) and finish job (\d+)", logs(logdir))
    assert m, _tail(logs(logdir))
    _submitted.extend([m[1], m[2]])
    assert_completed(wait_for(m[1], logdir), logdir)
    assert_completed(wait_for(m[2], logdir), logdir)
    parts = re.findall(r"array job \d+_(\d) on (\S+): part", logs(logdir))
    assert sorted(p for p, _ in parts) == ["0", "1", "2"], _tail(logs(logdir))
    assert {h for _, h in parts} == set(two_nodes), parts
    assert not (logdir / "plan").exists()            # the finish removes the shared work folder
    one = tmp_path / "one_process"
    prepare(str(ml100k_raw), one, PrepareOptions(format=fmt, domain_from="user.zip_code:prefix1",
                                                  min_item_interactions=2),
            log=lambda *_: None, engine=EngineSettings("memory"))
    _same_dataset(one, out)
