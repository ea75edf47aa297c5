"""A `JobSubmissionClient` for a Ray cluster's dashboard, authenticated with the user's Ray token.

The token is looked up the way Ray itself looks it up: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH,
else ~/.ray/auth_token; RAY_AUTH_MODE=disabled sends none. It goes into the request headers only: it is
never printed, logged, written to state.json, nor put into the job's runtime environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RayBackendError", "auth_headers", "connect", "read_token"]


class RayBackendError(RuntimeError):
    """The Ray cluster cannot be reached, refuses us, or refuses the request; the message says which."""


def read_token(env: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """The Ray authentication token of this machine's user, or None when there is none.

    Raises:
        RayBackendError: RAY_AUTH_TOKEN_PATH names a file that cannot be read (the path is named, never
            the token).
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            return path.read_text().strip() or None
        except OSError as err:
            raise RayBackendError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray token ({err.strerror})") from None
    default = (home or Path.home()) / ".ray" / "auth_token"
    try:
        return default.read_text().strip() or None
    except OSError:
        return None


def auth_headers(env: Mapping[str, str] | None = None, home: Path | None = None) -> dict[str, str]:
    """The HTTP headers that authenticate us to the dashboard ({} without a token)."""
    token = read_token(env, home)
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str) -> Any:
    """A `ray.job_submission.JobSubmissionClient` on `address` (the dashboard's http(s)://host:port).

    Raises:
        RayBackendError: the dashboard does not answer, or refuses our token.
    """
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:  # ConnectionError, an HTTP refusal, a version mismatch: all mean "not usable"
        raise RayBackendError(f"cluster.address: cannot use the Ray cluster at {address}: {explain(err)}") from None


def explain(err: BaseException) -> str:
    """A one-paragraph reason for a failed Jobs API call, with the fix for an authentication refusal."""
    text = " ".join(str(err).split()) or type(err).__name__
    # Ray appends a long guide about its own RAY_AUTH_MODE to an authentication refusal; ours is shorter.
    text = text.split(" Token authentication is enabled")[0]
    if any(code in text for code in ("401", "403", "Authentication", "Unauthorized", "Forbidden")):
        try:
            sent = read_token() is not None
        except RayBackendError:
            sent = False
        text += (" — the token sent (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is not "
                 "this cluster's" if sent else " — set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's "
                 "token (or put it in ~/.ray/auth_token)")
    return text[:1500]
