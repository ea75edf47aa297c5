"""How a sweep's driver is started: its command line and environment, built here and nowhere else.

`driver_launch` turns a sweep (its directory and validated grid) and the backend it goes to into a
`cluster.base.DriverLaunch`, the plain value every backend's `submit` receives:

    argv  <backend's python> -m orchestrator.driver <sweep dir as the backend sees it>
          [--bootstrap-env CKD_SWEEP_RECORD]      (a backend whose machines do not share the sweep directory)
    env   MLFLOW_TRACKING_URI, CKD_CACHE_DIR, and for such a backend the sweep's record (CKD_SWEEP_RECORD)
          and RAY_OVERRIDE_JOB_RUNTIME_ENV

The sweep record (sweep.json + grid.yaml) is how a driver on another file system creates the sweep
directory: `sweep_record` packs it, `bootstrap_sweep` (called by the driver's `--bootstrap-env`) unpacks it.
`plan_launch` builds the same launch for a sweep id placeholder, so `plan` shows what `submit` would send.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from cluster.base import Backend, DriverLaunch, SweepStatus
from jobs.storage import require_connectable, write_json_atomic
from orchestrator.state import SweepDir

__all__ = [
    "DRIVER_MODULE", "MAX_RECORD_CHARS", "PACKAGES", "PLACEHOLDER_RECORD", "PLACEHOLDER_SWEEP_ID", "RECORD_ENV",
    "bootstrap_sweep", "driver_launch", "plan_launch", "sweep_record",
]  # fmt: skip

# The driver's module: `python -m orchestrator.driver SWEEP_DIR [--bootstrap-env NAME]`.
DRIVER_MODULE = "orchestrator.driver"
# The project's top-level packages: what the driver and the trials import (a backend without the project
# installed ships them, e.g. Ray's py_modules).
PACKAGES = ("ckd", "jobs", "orchestrator", "cluster")
# The environment variable that carries a sweep's record (sweep.json + grid.yaml) to a driver on a cluster
# that does not share the submitting machine's file system (Ray Jobs API, KubeRay).
RECORD_ENV = "CKD_SWEEP_RECORD"
# Linux caps one environment string at 128 KiB (MAX_ARG_STRLEN); stay well below it.
MAX_RECORD_CHARS = 100_000
# What `plan` shows in place of the values only a submitted sweep has.
PLACEHOLDER_SWEEP_ID = "<sweep-id>"
PLACEHOLDER_RECORD = "<sweep.json and grid.yaml of the sweep, as JSON>"


def driver_launch(sweep: SweepDir, grid: Any, backend: Backend) -> DriverLaunch:
    """The launch of `sweep`'s driver (its grid `grid`, already validated) on `backend`.

    Raises:
        ValueError: the sweep's record is too large to ship (only for a backend that needs it shipped).
    """
    record = None if backend.shares_sweep_dir else sweep_record(sweep)
    return _launch(sweep.sweep_id, sweep.path, grid, backend, record)


def plan_launch(grid: Any, backend: Backend) -> DriverLaunch:
    """What `driver_launch` gives for a sweep of `grid` on `backend`, with placeholders for the sweep id and
    its record (`plan` prints what `submit` would send, before any sweep exists)."""
    local_dir = Path(grid.sweep_root) / PLACEHOLDER_SWEEP_ID
    record = None if backend.shares_sweep_dir else PLACEHOLDER_RECORD
    return _launch(PLACEHOLDER_SWEEP_ID, local_dir, grid, backend, record)


def _launch(sweep_id: str, local_dir: Path, grid: Any, backend: Backend, record: str | None) -> DriverLaunch:
    sweep_dir = backend.sweep_dir_for(sweep_id, str(local_dir))
    argv = [backend.interpreter(), "-m", DRIVER_MODULE, sweep_dir]
    # In memory and the driver's environment only: what is stored or printed is `redact_uri` of it.
    tracking_uri = require_connectable(grid.tracking_uri())
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "CKD_CACHE_DIR": f"{sweep_dir.rstrip('/')}/cache"}
    if record is not None:
        argv += ["--bootstrap-env", RECORD_ENV]
        env[RECORD_ENV] = record
        # Such a driver runs as a Ray job (Ray Jobs API, KubeRay): init_ray passes its own env_vars to
        # ray.init, and Ray refuses to merge them with the job's unless told.
        env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return DriverLaunch(sweep_id=sweep_id, sweep_dir=sweep_dir, local_dir=str(local_dir), argv=tuple(argv),
                        env=env, tracking_uri=tracking_uri, tracking_uri_set=grid.mlflow.tracking_uri is not None,
                        packages=PACKAGES)


def sweep_record(sweep: SweepDir) -> str:
    """The sweep's record as one string: what a remote driver needs to create the sweep directory.

    Base64 of the JSON: Ray expands `$NAME` in a runtime environment's variables, which would rewrite a
    grid whose comments or values hold a `$` (seen with a `$RAY_AUTH_TOKEN_PATH` in a comment).

    Raises:
        ValueError: the record is too large for an environment variable.
    """
    text = json.dumps({"sweep": sweep.record(), "grid_yaml": (sweep.path / "grid.yaml").read_text()},
                      separators=(",", ":"))
    encoded = base64.b64encode(text.encode()).decode("ascii")
    if len(encoded) > MAX_RECORD_CHARS:
        raise ValueError(f"the sweep record of {sweep.path} is {len(encoded):,} characters, more than the "
                         f"{MAX_RECORD_CHARS:,} an environment variable can carry; shorten the grid")
    return encoded


def bootstrap_sweep(sweep: SweepDir, record_text: str) -> bool:
    """Create the sweep directory from a shipped record when it is missing; keep an existing one, which
    the driver then continues from its Tune state (a KubeRay retry on a PVC, a shared file system).

    Returns:
        True when the directory was created here.

    Raises:
        ValueError: the record is not a sweep record, or belongs to another sweep id.
    """
    try:
        record = json.loads(base64.b64decode(record_text, validate=True))
        meta, grid_yaml = record["sweep"], record["grid_yaml"]
        shipped_id = meta["sweep_id"]
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        raise ValueError(f"${RECORD_ENV}: expected the base64 JSON record of a sweep ({{sweep, grid_yaml}}): "
                         f"{type(err).__name__}: {err}") from None
    if shipped_id != sweep.sweep_id:
        raise ValueError(f"the shipped record is of sweep {shipped_id!r}, but the driver was started on {sweep.path}")
    if sweep.exists():
        return False
    (sweep.path / "logs").mkdir(parents=True, exist_ok=True)
    (sweep.path / "grid.yaml").write_text(grid_yaml)
    write_json_atomic(sweep.path / "sweep.json", meta)
    sweep.set_status(SweepStatus.PENDING)
    return True
