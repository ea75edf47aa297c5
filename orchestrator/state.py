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
from jobs.storage import cache_root, file_lock, redact_text, write_json_atomic

__all__ = ["StatusMoveError", "SweepDir", "SweepFileError", "SweepStatus", "find_sweep", "latest_sweep", "new_sweep_id",
           "register"]

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


class SweepFileError(ValueError):
    """A sweep that cannot be used as one: not a sweep directory, an id that matches no sweep (or several),
    or a sweep file (sweep.json, state.json, the index) that cannot be read; the message names the file."""


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`, or a SweepFileError naming the file (not UTF-8, not JSON, not an object)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SweepFileError(f"{path}: the {what} is not UTF-8 ({err.reason} at byte {err.start}); "
                             "the file is corrupt") from None
    except OSError as err:
        raise SweepFileError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SweepFileError(f"{path}:{err.lineno}: the {what} is not valid JSON ({err.msg}); "
                             "the file is corrupt") from None
    if not isinstance(data, dict):
        raise SweepFileError(f"{path}: the {what} must be a JSON object, not {type(data).__name__}")
    return data


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
        """sweep.json: what was submitted (the sweep id, the grid file, the resolved grid, the commit).

        Raises:
            SweepFileError: no sweep.json, or one that is not a sweep record (the message names the file).
        """
        path = self.path / "sweep.json"
        if not path.is_file():
            raise SweepFileError(f"{self.path} is not a sweep directory (no sweep.json)")
        record = _read_json_object(path, "sweep record")
        grid = record.get("grid")
        if not isinstance(grid, dict) or not isinstance(record.get("grid_file"), str):
            raise SweepFileError(f"{path}: not a sweep record (expected the keys 'grid', an object, and "
                                 "'grid_file', a path)")
        for key in ("cluster", "sweep", "mlflow"):
            if not isinstance(grid.get(key), (dict, type(None))):
                raise SweepFileError(f"{path}: grid.{key} must be an object, not {type(grid[key]).__name__}")
        return record

    def state(self) -> dict[str, Any]:
        """state.json (a pending sweep's state before the file exists).

        Raises:
            SweepFileError: a state.json that cannot be read or holds no known status (naming the file).
        """
        path = self.path / "state.json"
        if not path.exists():
            return {"status": SweepStatus.PENDING.value}
        state = _read_json_object(path, "sweep state")
        status = state.get("status", SweepStatus.PENDING.value)
        if status not in {s.value for s in SweepStatus}:
            raise SweepFileError(f"{path}: unknown status {status!r}; expected one of "
                                 f"{', '.join(s.value for s in SweepStatus)}")
        for key in ("backend", "champion"):
            if not isinstance(state.get(key), (dict, type(None))):
                raise SweepFileError(f"{path}: {key} must be an object, not {type(state[key]).__name__}")
        return state

    def check(self) -> None:
        """Read sweep.json and state.json once, so a command refuses a broken sweep before it acts.

        Raises:
            SweepFileError: see `record` and `state`.
        """
        self.record()
        self.state()

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
        (self.path / "grid.yaml").write_text(redact_text(Path(grid_file).read_text()))  # no credentials kept
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


def _index_entries() -> tuple[list[tuple[str, str]], list[int]]:
    """(sweep id, path) of every readable line of the index, oldest first, and the numbers of the lines
    that are not (a line cut short by a crash, a hand edit): those are skipped, never fatal.

    Raises:
        SweepFileError: the index exists but cannot be read (a directory, no permission).
    """
    index = _index_file()
    if not index.exists():
        return [], []
    try:
        raw = index.read_bytes()
    except OSError as err:
        raise SweepFileError(f"{index}: cannot read the sweep index: {err.strerror or err}") from None
    entries, corrupt = [], []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line.decode("utf-8"))
            sweep_id, path = entry["sweep_id"], entry["path"]
            if not isinstance(sweep_id, str) or not isinstance(path, str) or not sweep_id:
                raise TypeError(sweep_id)
        except (UnicodeDecodeError, ValueError, TypeError, KeyError):
            corrupt.append(number)
            continue
        entries.append((sweep_id, path))
    return entries, corrupt


def find_sweep(ref: str, *, prefix: bool = True) -> SweepDir:
    """A sweep by directory path or by id (the index of sweeps submitted from this account).

    An id matches exactly, or, with `prefix`, as the unique prefix of one id (the caller says which sweep
    it picked: `SweepDir.sweep_id` differs from `ref`). Unreadable index lines are skipped.

    Raises:
        SweepFileError: no sweep or several match `ref`; a directory that is not a sweep; an unreadable index.
    """
    path = Path(ref).expanduser()
    if path.name == "sweep.json" and path.is_file():
        path = path.parent
    if (path / "sweep.json").is_file():
        return SweepDir(path)
    entries, corrupt = _index_entries()
    exact = [p for sweep_id, p in entries if sweep_id == ref]
    if exact:
        found = next((p for p in reversed(exact) if SweepDir(p).exists()), exact[-1])
        if not SweepDir(found).exists():
            raise SweepFileError(f"sweep {ref!r} is in the index, but its directory {found} is gone (no sweep.json)")
        return SweepDir(found)
    matches = {sweep_id: p for sweep_id, p in entries if ref and sweep_id.startswith(ref)}
    if matches and not prefix:
        raise SweepFileError(f"{ref!r} is not a full sweep id (it is a prefix of {', '.join(sorted(matches))}); "
                             "this command needs the exact id or the sweep directory")
    if len(matches) == 1:
        sweep_id, found = next(iter(matches.items()))
        if not SweepDir(found).exists():
            raise SweepFileError(f"sweep {sweep_id} is in the index, but its directory {found} is gone "
                                 "(no sweep.json)")
        return SweepDir(found)
    if len(matches) > 1:
        raise SweepFileError(f"sweep id {ref!r} is ambiguous: {', '.join(sorted(matches))}")
    skipped = f" ({len(corrupt)} unreadable line(s) of the index skipped: {corrupt[:5]})" if corrupt else ""
    if path.exists():
        raise SweepFileError(f"{path} is not a sweep directory (no sweep.json) and no sweep id matches it{skipped}")
    raise SweepFileError(f"no sweep {ref!r}: not a sweep directory and not in the index {_index_file()}{skipped}; "
                         "pass the sweep directory instead")


def latest_sweep() -> SweepDir | None:
    """The last submitted sweep whose directory still exists (None: none was submitted from here)."""
    entries, _ = _index_entries()
    for _, path in reversed(entries):
        sweep = SweepDir(path)
        if sweep.exists():
            return sweep
    return None
