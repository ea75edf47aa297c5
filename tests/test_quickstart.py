"""The README's main command, as a newcomer runs it: examples/quickstart.sh on this machine (the set-up
step only checks the existing environment), into a temporary root."""

from __future__ import annotations

import os
import subprocess

import mlflow
import pytest

from jobkit import REPO

pytestmark = pytest.mark.slow


def test_quickstart_runs_to_a_pulled_champion(tmp_path):
    env = {**os.environ, "QUICKSTART_ROOT": str(tmp_path / "sweeps"), "QUICKSTART_CHAMPION": str(tmp_path / "champ")}
    env.pop("CKD_CACHE_DIR", None)
    proc = subprocess.run(["bash", "examples/quickstart.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "champion: 'the kettle is not reliable at all.' -> {'label': " in proc.stdout
    assert (tmp_path / "champ" / "model.safetensors").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id],
                              filter_string="tags.`ckd.role` = 'trial'")
    assert len(runs) == 4
    version = client.get_model_version_by_alias("quickstart", "champion")
    assert version.run_id in {r.info.run_id for r in runs}
