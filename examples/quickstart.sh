#!/usr/bin/env bash
# The README's main command: set up this machine, generate the quickstart task, run the sweep on the
# embedded default (local Ray, MLflow on SQLite under examples/sweeps/quickstart), then pull the
# champion from the Model Registry and classify one sentence with it.
set -euo pipefail
cd "$(dirname "$0")/.."
./dev/setup.sh
export CKD_CACHE_DIR=${CKD_CACHE_DIR:-$PWD/examples/sweeps/cache}
.venv/bin/python examples/quickstart_data.py
.venv/bin/ckd-orchestrate submit examples/quickstart.yaml
rm -rf examples/champion
.venv/bin/ckd-orchestrate pull models:/quickstart@champion --dest examples/champion
.venv/bin/python - <<'PY'
from transformers import pipeline

classify = pipeline("text-classification", model="examples/champion", tokenizer="examples/champion")
for text in ["the kettle is not reliable at all.", "honestly, this laptop feels superb."]:
    print(f"champion: {text!r} -> {classify(text)[0]}")
PY
