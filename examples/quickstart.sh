#!/usr/bin/env bash
# The README's main command: set up this machine, generate the quickstart task, run the sweep on the
# embedded default (local Ray, MLflow on SQLite under examples/sweeps/quickstart), then pull the
# champion from the Model Registry and classify one sentence with it.
set -euo pipefail
cd "$(dirname "$0")/.."
./dev/setup.sh
# Where the sweep and the pulled champion go (the defaults keep them beside the example).
ROOT=${QUICKSTART_ROOT:-$PWD/examples/sweeps/quickstart}
CHAMPION=${QUICKSTART_CHAMPION:-$PWD/examples/champion}
export CKD_CACHE_DIR=${CKD_CACHE_DIR:-$ROOT/cache}
.venv/bin/python examples/quickstart_data.py
.venv/bin/ckd-orchestrate submit examples/quickstart.yaml --set "root=$ROOT"
rm -rf "$CHAMPION"
.venv/bin/ckd-orchestrate pull models:/quickstart@champion --dest "$CHAMPION" --tracking-uri "sqlite:///$ROOT/mlflow.db"
CHAMPION="$CHAMPION" .venv/bin/python - <<'PY'
import os

from transformers import pipeline

champion = os.environ["CHAMPION"]
classify = pipeline("text-classification", model=champion, tokenizer=champion)
for text in ["the kettle is not reliable at all.", "honestly, this laptop feels superb."]:
    print(f"champion: {text!r} -> {classify(text)[0]}")
PY
