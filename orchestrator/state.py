"""A sweep's directory: what was submitted, where it stands, and an index so the CLI finds it by id.

    <root>/<sweep_id>/grid.yaml     the grid as submitted
                      sweep.json    {"sweep_id", "grid_file", "grid": <resolved GridSpec>, "created", "git_commit"}
                      state.json    {"status", "backend": {...}, "parent_run_id", "champion", "updated", ...}
                      tune/         Ray Tune's experiment (restored by `resume` and after a requeue)
                      trials/<id>/  each trial's job output (student, DeepSpeed checkpoints, metrics)
                      cache/        the sweep's fine-tuned teacher(s) and tokenised data
                      logs/         driver.log

`SweepDir.update_state` is the one writer of state.json (the driver, the CLI and the orchestrator's
MLflow sync all go through it), and the only place a sweep's status changes: a move the sweep's life
does not allow (a finished sweep running again) is refused there, whoever asks.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cluster.base import SweepStatus
from jobs.storage import cache_root, file_lock, write_json_atomic

__all__ = ["StatusMoveError", "SweepDir", "SweepStatus", "find_sweep", "latest_sweep", "new_sweep_id", "register"]

_P, _R, _F, _X, _C = (SweepStatus.PENDING, SweepStatus.RUNNING, SweepStatus.FINISHED, SweepStatus.FAILED,
                      SweepStatus.CANCELLED)
# status -> the statuses it may move to. A sweep starts pending; its driver runs it (pending -> running) and
# ends it (finished, failed, cancelled), or stops it for a Slurm requeue (running -> pending). `resume` starts
# a failed or cancelled sweep again; `cancel` marks a sweep whose driver failed while stopping cancelled.
# A finished sweep is final. Writing the status it has already is always allowed (the driver and `cancel`
# both record a cancel; the MLflow sync repeats what it found).
ALLOWED_MOVES: dict[SweepStatus, frozenset[SweepStatus]] = {
    _P: frozenset({_P, _R, _F, _X, _C}),
    _R: frozenset({_P, _R, _F, _X, _C}),
    _X: frozenset({_P, _R, _X, _C}),
    _C: frozenset({_P, _R, _C}),
    _F: frozenset({_F}),
}


class StatusMoveError(ValueError):
    """A status change the sweep's life does not allow (e.g. finished -> running)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_sweep_id(stem: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)[:40]
    return f"{safe}-{stamp}-{secrets.token_hex(2)}"


class SweepDir:
    """The files of one sweep (see the module docstring); `path` is resolved once."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()

    @property
    def sweep_id(self) -> str:
        return self.path.name

    # --- files
    @property
    def tune_dir(self) -> Path:
        return self.path / "tune"

    def trial_dir(self, trial_id: str) -> Path:
        return self.path / "trials" / trial_id

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    @property
    def log_file(self) -> Path:
        return self.path / "logs" / "driver.log"

    def exists(self) -> bool:
        return (self.path / "sweep.json").is_file()

    def record(self) -> dict[str, Any]:
        """sweep.json: what was submitted (the sweep id, the grid file, the resolved grid, the commit)."""
        return json.loads((self.path / "sweep.json").read_text())

    def state(self) -> dict[str, Any]:
        path = self.path / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {"status": SweepStatus.PENDING.value}

    def status(self) -> SweepStatus:
        """The sweep's status as state.json has it."""
        return SweepStatus(self.state().get("status", SweepStatus.PENDING))

    def set_status(self, new: SweepStatus | str, **why: Any) -> dict[str, Any]:
        """Move the sweep to status `new`, writing `why` (error, champion, ...) in the same update.

        Raises:
            StatusMoveError: the move is not allowed from the status the sweep has (see ALLOWED_MOVES).
        """
        return self.update_state(status=SweepStatus(new), **why)

    def update_state(self, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into state.json under a lock: the one writer of the file. Mappings are merged key
        by key (the backend's job reference); a "status" change must be an allowed move.

        Raises:
            StatusMoveError: `changes` moves the status where ALLOWED_MOVES does not let it go.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path / ".state.lock"):
            state = self.state()
            if "status" in changes:
                old, new = SweepStatus(state.get("status", SweepStatus.PENDING)), SweepStatus(changes["status"])
                if new not in ALLOWED_MOVES[old]:
                    raise StatusMoveError(f"sweep {self.sweep_id} is {old}: it cannot become {new}")
                changes = {**changes, "status": new.value}
            for key, value in changes.items():
                if isinstance(value, Mapping) and isinstance(state.get(key), Mapping):
                    state[key] = {**state[key], **value}
                else:
                    state[key] = value
            state["updated"] = _now()
            write_json_atomic(self.path / "state.json", state)
        return state

    def create(self, grid_file: Path, grid: Mapping[str, Any], git_commit: str | None) -> None:
        self.path.mkdir(parents=True, exist_ok=False)
        (self.path / "logs").mkdir()
        (self.path / "grid.yaml").write_text(Path(grid_file).read_text())
        write_json_atomic(self.path / "sweep.json", {"sweep_id": self.sweep_id, "grid_file": str(Path(grid_file).resolve()),
                                                     "grid": dict(grid), "created": _now(), "git_commit": git_commit})
        self.set_status(SweepStatus.PENDING)
        register(self)


# --- an index of sweeps so `status SWEEP` works from anywhere with just the id

def _index_file() -> Path:
    return cache_root() / "sweeps.jsonl"


def register(sweep: SweepDir) -> None:
    index = _index_file()
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(index, "a") as handle:
        handle.write(json.dumps({"sweep_id": sweep.sweep_id, "path": str(sweep.path)}) + "\n")


def find_sweep(ref: str) -> SweepDir:
    """A sweep by directory path or by id (the index of sweeps submitted from this account)."""
    path = Path(ref).expanduser()
    if (path / "sweep.json").is_file():
        return SweepDir(path)
    index = _index_file()
    matches: dict[str, str] = {}
    if index.is_file():
        for line in index.read_text().splitlines():
            entry = json.loads(line)
            if entry["sweep_id"] == ref or entry["sweep_id"].startswith(ref):
                matches[entry["sweep_id"]] = entry["path"]
    if len(matches) == 1:
        return SweepDir(next(iter(matches.values())))
    if len(matches) > 1:
        raise LookupError(f"sweep id {ref!r} is ambiguous: {', '.join(sorted(matches))}")
    raise LookupError(f"no sweep {ref!r}: not a sweep directory and not in the index {index}; "
                      "pass the sweep directory instead")


def latest_sweep() -> SweepDir | None:
    index = _index_file()
    if not index.is_file():
        return None
    lines = index.read_text().splitlines()
    for line in reversed(lines):
        sweep = SweepDir(json.loads(line)["path"])
        if sweep.exists():
            return sweep
    return None
