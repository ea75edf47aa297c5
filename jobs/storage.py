"""Small, dependency-free helpers for where results go: crash-safe file writes, the cache root shared by
jobs and sweeps, the MLflow store a job or sweep uses when none is named, and the one redaction of tracking
URIs (`redact_uri`: what is stored, logged or printed; `unredact_uri`: the real one back from the environment)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
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


# --------------------------------------------------------------------------------------------- credentials

REDACTED = "***"
# Query parameters whose values are credentials (matched case-insensitively, as a whole name or a part of it
# split on "_" / "-": "access_token", "X-Amz-Signature", "sig", "api_key", "password").
_SECRET_QUERY_WORDS = frozenset({"token", "password", "passwd", "pwd", "pass", "secret", "key", "apikey", "sig",
                                 "signature", "credential", "credentials", "auth", "authorization", "session"})
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#]*)@")


def _secret_query_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_QUERY_WORDS or any(part in _SECRET_QUERY_WORDS for part in re.split(r"[_\-.]", lowered))


def redact_uri(uri: str) -> str:
    """`uri` without credentials, for anything stored, logged or printed: the userinfo (`user:password@`)
    becomes `***@` and the value of each token-like query parameter (token, access_token, password, secret,
    key, sig, ...) becomes `***`. Anything else (scheme, host, port, path, other parameters) is kept as
    written, so the same URI always redacts to the same text (`unredact_uri` relies on it)."""
    if not isinstance(uri, str) or not uri:
        return uri
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", uri, count=1)
    head, sep, rest = text.partition("?")
    if not sep:
        return text
    query, hash_sep, fragment = rest.partition("#")
    parts = []
    for item in query.split("&"):
        name, eq, _value = item.partition("=")
        parts.append(f"{name}={REDACTED}" if eq and _secret_query_name(name) else item)
    return f"{head}?{'&'.join(parts)}{hash_sep}{fragment}"


def is_redacted(uri: str | None) -> bool:
    """Whether `uri` had credentials removed by `redact_uri` (it cannot be connected to as it is)."""
    return bool(uri) and redact_uri(uri) == uri and REDACTED in uri  # type: ignore[arg-type]


def unredact_uri(stored: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The URI to connect to for a `stored` (possibly redacted) tracking URI: $MLFLOW_TRACKING_URI of `env`
    (default os.environ) when its redacted form is the stored one, else `stored` unchanged (see
    `require_connectable`)."""
    if not stored or not is_redacted(stored):
        return stored
    env = os.environ if env is None else env
    candidate = env.get("MLFLOW_TRACKING_URI")
    if candidate and redact_uri(candidate) == stored:
        return candidate
    return stored


def require_connectable(uri: str) -> str:
    """`uri` itself, or a ValueError saying what to export when it is a redacted stored copy."""
    if is_redacted(uri):
        raise ValueError(f"the MLflow tracking URI {uri} was stored without its credentials; export "
                         f"MLFLOW_TRACKING_URI with the full URI (the one whose credentials read {REDACTED} here) "
                         "and run the command again")
    return uri


def redact_tracking_uris(data: Any) -> Any:
    """A copy of `data` (nested mappings and lists) with the value of every `tracking_uri` key redacted."""
    if isinstance(data, Mapping):
        return {key: redact_uri(value) if key == "tracking_uri" and isinstance(value, str)
                else redact_tracking_uris(value) for key, value in data.items()}
    if isinstance(data, list):
        return [redact_tracking_uris(item) for item in data]
    return data


_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")


def redact_text(text: str) -> str:
    """`text` (a file's content, an error message) with `redact_uri` applied to every URI in it."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
