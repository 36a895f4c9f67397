"""Wall times of Slurm jobs, from slurmctld's log: submitted, each start (allocation), a requeue or a
kill request, and the end with its exit status. The test cluster keeps no accounting database, so
this is where `tests/test_slurm.py`'s job timings (benchmarks/RESULTS.md §5.6) come from:

    DS_ACCELERATOR=cpu .venv/bin/python -m pytest -q -s tests/test_slurm.py
    python -m benchmarks.slurm_job_times --since 2026-11-24T06:17   # the minute the tests started

usage: python -m benchmarks.slurm_job_times [--log /var/log/slurm/slurmctld.log] [--since ISO-TIME]
"""
from __future__ import annotations

import argparse
import re
from datetime import datetime
from pathlib import Path

from benchmarks.common import record

EVENTS = (("submit", re.compile(r"_slurm_rpc_submit_batch_job: JobId=(\d+)")),
          ("start", re.compile(r"(?:sched: Allocate|_start_job: Started) JobId=(\d+)")),
          ("kill_request", re.compile(r"REQUEST_KILL_JOB JobId=(\d+)")),
          ("requeue", re.compile(r"Requeuing JobId=(\d+)")),
          ("exit", re.compile(r"_job_complete: JobId=(\d+)\S* WEXITSTATUS (\d+)")),
          ("done", re.compile(r"_job_complete: JobId=(\d+)\S* done")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default="/var/log/slurm/slurmctld.log")
    ap.add_argument("--since", default="", help="ignore lines before this time (ISO, e.g. 2026-11-24T06:17)")
    a = ap.parse_args()
    jobs: dict[str, dict] = {}
    for line in Path(a.log).read_text(errors="replace").splitlines():
        m = re.match(r"\[(\S+?)\] (.*)", line)
        if not m or m.group(1) < a.since:
            continue
        when = datetime.fromisoformat(m.group(1))
        for kind, pattern in EVENTS:
            e = pattern.search(m.group(2))
            if e:
                job = jobs.setdefault(e.group(1), {"events": []})
                job["events"].append((kind, when))
                if kind == "exit":
                    job["exit_status"] = int(e.group(2))
    out = {}
    for job_id, job in sorted(jobs.items(), key=lambda kv: int(kv[0])):
        ev = job["events"]
        first = ev[0][1]
        out[job_id] = {"events": [f"{kind} +{(t - first).total_seconds():.1f}s" for kind, t in ev],
                       "wall_s": round((ev[-1][1] - first).total_seconds(), 1),
                       "exit_status": job.get("exit_status")}
        print(job_id, out[job_id]["wall_s"], "s:", ", ".join(out[job_id]["events"]))
    record("slurm_job_times", {"log": a.log, "since": a.since, "jobs": out})


if __name__ == "__main__":
    main()
