"""The CI shell scripts themselves: traps that only show up on some runs.

`.ci/slurm_up.sh` once failed CI on a cluster it had built itself: `ip addr show | grep -q ADDR`
under `set -o pipefail` "failed" on a match, because grep -q exits at the first match and `ip`,
which writes one line per call, then dies of SIGPIPE (141). Whether it did depended on scheduling.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob(".ci/*.sh"), ROOT / ".ci/run", *ROOT.glob("slurm/*.sh"), *ROOT.glob("slurm/*.sbatch")])

# A writer that matches first and keeps writing after grep -q has exited: SIGPIPE every time.
WRITER = "printf 'inet 10.77.0.1/24\\n'; sleep 0.3; printf 'inet6 fe80::1/64\\n'"


def _prints_function() -> str:
    text = (ROOT / ".ci/slurm_up.sh").read_text()
    match = re.search(r"^prints\(\) \{.*\}$", text, re.M)
    assert match, "slurm_up.sh lost its prints() helper"
    return match.group(0)


def _bash(script: str) -> int:
    return subprocess.run(["bash", "-c", script], capture_output=True, timeout=30).returncode


def test_the_pipe_into_grep_q_really_fails_under_pipefail():
    """The trap itself, deterministic: so the next test cannot pass by luck."""
    assert _bash(f"set -o pipefail; ({WRITER}) | grep -q 'inet 10.77.0.1/24'") != 0


def test_prints_finds_a_match_in_a_writer_that_keeps_writing():
    helper = _prints_function()
    assert _bash(f"set -euo pipefail; {helper}\nprints 'inet 10.77.0.1/24' bash -c \"{WRITER}\"") == 0
    assert _bash(f"set -euo pipefail; {helper}\nprints 'inet 10.77.0.2/24' bash -c \"{WRITER}\"") != 0
    # A command that fails prints nothing that matches, and does not abort the script under set -e.
    assert _bash(f"set -euo pipefail; {helper}\nprints x false || echo ok") == 0


def test_no_pipefail_script_pipes_into_an_early_exiting_grep():
    offenders = []
    for script in SCRIPTS:
        text = script.read_text()
        if "pipefail" not in text:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\|\s*grep\s+-[a-zA-Z]*[qm]", code):
                offenders.append(f"{script.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "pipe into grep -q/-m under pipefail (SIGPIPE race):\n" + "\n".join(offenders)
