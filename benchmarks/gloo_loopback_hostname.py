"""The loopback-hostname trap of multi-node CPU jobs, reproduced on the two-node test cluster.

Debian/Ubuntu map a machine's hostname to 127.0.1.1 in /etc/hosts. gloo listens on the address of its
hostname and tells the other ranks to connect there, i.e. to their own loopback. Two processes, one in
each node namespace of ``.ci/slurm_up.sh`` (crossrec-n1, crossrec-n2), each with a hostname that
resolves to 127.0.1.1 (a marked line added to /etc/hosts for the run and removed after), rendezvous on
crossrec-n1's real address and run one gloo all-reduce: once as they are, once with
``GLOO_SOCKET_IFNAME=eth0``. Records, per case and rank: ok / failed / hung (killed after ``--wall``
seconds), when it ended, and its error line.

Needs root and the test cluster's namespaces (``sudo bash .ci/slurm_up.sh``).
usage: sudo python -m benchmarks.gloo_loopback_hostname [--timeout 20] [--wall 90]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import record

NODES = (("crossrec-n1", "crossrec-lo-a"), ("crossrec-n2", "crossrec-lo-b"))
HEAD_ADDR = "10.77.0.11"
MARK = "# crossrec benchmark: gloo_loopback_hostname"
WORKER = """
import datetime, socket, torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds={timeout}))
t = torch.ones(1) * (dist.get_rank() + 1)
dist.all_reduce(t)
print("sum", int(t.item()), socket.gethostname(), flush=True)
"""


def one_case(ifname: str | None, timeout: int, port: int, wall: int) -> dict:
    procs = []
    t0 = time.perf_counter()
    for rank, (ns, host) in enumerate(NODES):
        env = {**os.environ, "MASTER_ADDR": HEAD_ADDR, "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"}
        env.pop("GLOO_SOCKET_IFNAME", None)
        if ifname:
            env["GLOO_SOCKET_IFNAME"] = ifname
        code = WORKER.format(timeout=timeout)
        cmd = ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--", "sh", "-c",
               f'hostname {host} && exec "$0" -c "$1"', sys.executable, code]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    ranks = []
    for rank, p in enumerate(procs):
        left = max(1.0, wall - (time.perf_counter() - t0))
        try:
            out = p.communicate(timeout=left)[0]
            state = "ok" if p.returncode == 0 and "sum 3" in out else f"failed (exit {p.returncode})"
        except subprocess.TimeoutExpired:
            p.kill()
            out = p.communicate()[0]
            state = f"hung: killed after {wall} s"
        error = next((ln.strip() for ln in reversed(out.splitlines()) if "Error" in ln), None)
        ranks.append({"rank": rank, "state": state, "seconds": round(time.perf_counter() - t0, 1), "error": error})
    return {"GLOO_SOCKET_IFNAME": ifname, "all_reduce_ok": all(r["state"] == "ok" for r in ranks), "ranks": ranks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=int, default=20, help="gloo's timeout, seconds")
    ap.add_argument("--wall", type=int, default=90, help="a rank still running after this many seconds is killed")
    a = ap.parse_args()
    if os.geteuid() != 0 or not all(Path(f"/run/netns/{ns}").exists() for ns, _ in NODES):
        sys.exit("needs root and the two-node test cluster: sudo bash .ci/slurm_up.sh")
    hosts = Path("/etc/hosts")
    original = hosts.read_text()
    hosts.write_text(original.rstrip("\n") + f"\n127.0.1.1 {' '.join(h for _, h in NODES)} {MARK}\n")
    try:
        cases = [one_case(None, a.timeout, 29911, a.wall), one_case("eth0", a.timeout, 29912, a.wall)]
    finally:
        hosts.write_text("".join(ln for ln in hosts.read_text().splitlines(keepends=True) if MARK not in ln))
    record("gloo_loopback_hostname", {"hosts_line": f"127.0.1.1 {' '.join(h for _, h in NODES)}",
                                      "rendezvous": HEAD_ADDR, "gloo_timeout_s": a.timeout, "cases": cases})


if __name__ == "__main__":
    main()
