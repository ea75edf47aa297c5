"""The `cluster:` block of the Ray backend: an existing Ray cluster reached through its Jobs API.

Only pydantic and the strict-config kernel: validating a grid never imports Ray.
"""

from __future__ import annotations

import posixpath
import re
from typing import Literal

from pydantic import Field, field_validator

from cluster.base import ClusterSpec

__all__ = ["RAY_TOKEN_ENV", "RayClusterSpec"]

_ADDRESS = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})/?$")


# Variables a Ray token travels in: never a plain value in a grid (they would be logged with the job).
RAY_TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class RayClusterSpec(ClusterSpec):
    """An existing Ray cluster, reached through its Jobs API (the dashboard address).

    The sweep driver runs there as a Ray job; the project's packages travel in the job's runtime
    environment, the sweep's record in its environment variables.
    """

    backend: Literal["ray"] = "ray"
    address: str = Field(description="http(s)://host:port of the Ray dashboard (Jobs API), e.g. http://head:8265")
    sweep_root: str | None = Field(None, description="absolute directory where the driver keeps the sweep on the "
                                                     "cluster (Tune state, trials); default: the grid's root, "
                                                     "which suits a file system shared with the cluster")
    env_vars: dict[str, str] = Field(default_factory=dict, description="extra environment for the driver and "
                                                                       "the trials (e.g. HF_HOME)")
    excludes: list[str] = Field(default_factory=list, description="more gitignore-style patterns left out of "
                                                                  "the uploaded project")

    @field_validator("sweep_root")
    @classmethod
    def _check_sweep_root(cls, value: str | None) -> str | None:
        if value is not None and not posixpath.isabs(value):
            raise ValueError(f"expected an absolute path on the cluster's machines, got {value!r}")
        return None if value is None else posixpath.normpath(value)

    @field_validator("env_vars")
    @classmethod
    def _check_env_vars(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if bad:
            raise ValueError(f"not an environment variable name: {', '.join(map(repr, bad))}")
        tokens = [k for k in value if k in RAY_TOKEN_ENV]
        if tokens:
            raise ValueError(f"{tokens[0]} must not be written in a grid: the submitting machine's token is read "
                             "from its own environment or ~/.ray/auth_token, and the cluster has its own")
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        match = _ADDRESS.match(value.strip())
        if not match or not 1 <= int(match.group(3)) <= 65535:
            raise ValueError(f"expected http(s)://host:port of the Ray dashboard, e.g. http://head:8265; got {value!r}")
        return value.strip().rstrip("/")
