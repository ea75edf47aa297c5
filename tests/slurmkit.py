"""Helpers for tests against the real test Slurm (cluster/slurm/testbed.sh), importable as `slurmkit` (tests/
is on sys.path): the session fixture that starts it, and small waits on Slurm's view of a job.

Tests that need Slurm are skipped only when it cannot be started (not root, no apt, ...; the reason is
printed), and fail instead when CKD_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "cluster" / "slurm" / "testbed.sh"


def _sinfo_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30)
    return sorted(set(out.stdout.split()))


def _sinfo_has_gpus() -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%G"], capture_output=True, text=True, timeout=30)
    return "gpu:" in out.stdout


@pytest.fixture(scope="session")
def slurm() -> dict[str, Any]:
    """A running Slurm from cluster/slurm/testbed.sh (started here if needed; idempotent): its node names and
    whether the nodes have (fake) GPUs."""
    required = os.environ.get("CKD_REQUIRE_SLURM") == "1"

    def unavailable(why: str) -> None:
        message = f"Slurm cannot be started here: {why}"
        print(message, file=sys.stderr)
        if required:
            pytest.fail(message + " (CKD_REQUIRE_SLURM=1)")
        pytest.skip(message)

    if os.geteuid() != 0:
        unavailable("cluster/slurm/testbed.sh needs root")
    started = time.monotonic()
    try:
        out = subprocess.run([str(TESTBED), "start"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        unavailable(f"testbed.sh start: {err}")
    if out.returncode != 0:
        unavailable(f"testbed.sh start exited {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}")
    nodes = _sinfo_nodes()
    if not nodes:
        unavailable("sinfo lists no nodes after testbed.sh start")
    return {"nodes": nodes, "gpus": _sinfo_has_gpus(), "start_s": time.monotonic() - started}


def wait_until(what: str, check, timeout: float, interval: float = 0.5, on_timeout=None):
    """Poll `check()` until it returns something true (returned); AssertionError naming `what` (and
    `on_timeout()`'s text, e.g. logs) after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            extra = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{extra}")
        time.sleep(interval)


def sacct_state(job_id: str) -> str:
    """The job's state in Slurm's accounting (its last run's), "" while sacct does not know it."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True,
                         timeout=30)
    return out.stdout.strip().splitlines()[-1].split()[0] if out.stdout.strip() else ""


def queued_job_ids() -> set[str]:
    """Jobs squeue lists by default (pending, running, completing)."""
    out = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, timeout=30, check=True)
    return set(out.stdout.split())


def release_now(job_id: str) -> None:
    """Let a requeued job start now: Slurm gives it a begin time about two minutes ahead (needs root)."""
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)


def processes_with(marker: str) -> list[str]:
    """Processes whose environment mentions `marker` (every Ray process and driver of a job inherits
    RAY_AUTH_TOKEN_PATH, which lies under its sweep directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
                found.append(f"{proc.name}: {cmdline!r}")
        except OSError:
            continue
    return found
