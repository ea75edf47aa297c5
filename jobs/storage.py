"""Small, dependency-free helpers for where results go: crash-safe file writes, the cache root shared by
jobs and sweeps, and the MLflow store a job or sweep uses when none is named."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (flock) on the file `path`, created when missing, held for the block;
    the kernel drops it when the process dies, so a crash never leaves it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a reader (or a crash) sees the old file or the whole new one:
    a flushed, fsynced sibling temp file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: Any, *, default: Callable[[Any], Any] = str) -> None:
    """`write_text_atomic` of `data` as indented JSON (`default` converts what JSON cannot hold)."""
    write_text_atomic(path, json.dumps(data, indent=1, default=default))


def cache_root() -> Path:
    """Where fine-tuned teachers, tokenised data and the sweep index are cached: $CKD_CACHE_DIR, else
    ~/.cache/ckd-orchestrate. A sweep points it at its own directory so that its trials share one teacher."""
    root = os.environ.get("CKD_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ckd-orchestrate"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The absolute database file of a ``sqlite:///`` tracking URI (its ``?query`` dropped); None for other
    stores and for an in-memory database."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(db).resolve() if db and db != ":memory:" else None


def tracking_uri_or_default(explicit: str | None, env: Mapping[str, str] | None, sqlite_path: Path) -> str:
    """The MLflow tracking URI: the configured one, else $MLFLOW_TRACKING_URI, else SQLite at `sqlite_path`."""
    if explicit:
        return explicit
    if env and env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{sqlite_path}"
