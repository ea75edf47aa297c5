"""Issue 14's security part: tracking URIs stored, logged and printed without credentials (and the real one
back from the environment where a process connects), RNG state loaded with weights_only=True, the checkpoint
tag from `latest` checked, the single-node rendezvous on loopback only. (The Slurm temp dir:
tests/cluster/test_slurm.py.) Fast: no model is trained; the job spec uses the packaged MiniLM's config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jobkit import GLUE_DIR, REPO
from jobs.storage import (is_redacted, redact_text, redact_tracking_uris, redact_uri, require_connectable,
                          unredact_uri)

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(("uri", "redacted"), [
    (f"postgresql://user:{SECRET}@db.example:5432/mlflow", "postgresql://***@db.example:5432/mlflow"),
    (f"http://user:{SECRET}@host:5000", "http://***@host:5000"),
    (f"https://host/?token={SECRET}", "https://host/?token=***"),
    (f"https://alice@host/p?x=1&access_token={SECRET}&y=2#frag", "https://***@host/p?x=1&access_token=***&y=2#frag"),
    (f"https://h/s?X-Amz-Signature={SECRET}&api_key={SECRET}&Password={SECRET}&sig={SECRET}",
     "https://h/s?X-Amz-Signature=***&api_key=***&Password=***&sig=***"),
    (f"mysql+pymysql://u:p@ss{SECRET}@h/db", "mysql+pymysql://***@h/db"),
])
def test_every_uri_form_is_redacted(uri, redacted):
    assert redact_uri(uri) == redacted and SECRET not in redacted
    assert is_redacted(redacted) and not is_redacted(uri)
    assert redact_uri(redacted) == redacted  # idempotent
    assert SECRET not in redact_text(f"error: cannot reach {uri}: refused\nother: '{uri}'")


@pytest.mark.parametrize("uri", ["sqlite:////tmp/x/mlflow.db", "http://127.0.0.1:5000", "databricks",
                                 "https://host/p?experiment=3&page=2", "file:///tmp/mlruns"])
def test_uris_without_credentials_are_kept(uri):
    assert redact_uri(uri) == uri and not is_redacted(uri)
    assert unredact_uri(uri, {}) == uri and require_connectable(uri) == uri


def test_the_real_uri_comes_back_from_the_environment_only_when_it_matches():
    real = f"postgresql://user:{SECRET}@db/mlflow"
    stored = redact_uri(real)
    assert unredact_uri(stored, {"MLFLOW_TRACKING_URI": real}) == real
    assert unredact_uri(stored, {"MLFLOW_TRACKING_URI": f"postgresql://user:{SECRET}@other/mlflow"}) == stored
    assert unredact_uri(stored, {}) == stored and unredact_uri(None, {}) is None
    with pytest.raises(ValueError, match="export MLFLOW_TRACKING_URI"):
        require_connectable(stored)
    from jobs import tracking

    with pytest.raises(ValueError, match="export MLFLOW_TRACKING_URI"):  # never connects with a stored copy
        tracking.prepare_store(stored)


def test_nested_tracking_uris_are_redacted():
    data = {"mlflow": {"tracking_uri": f"http://u:{SECRET}@h"},
            "job": {"output": {"mlflow": {"tracking_uri": f"http://h/?token={SECRET}"}}},
            "list": [{"tracking_uri": f"http://u:{SECRET}@h"}], "other": f"http://u:{SECRET}@h"}
    out = redact_tracking_uris(data)
    assert SECRET not in json.dumps({k: v for k, v in out.items() if k != "other"})
    assert out["other"] == data["other"] and SECRET in json.dumps(data)  # only tracking_uri keys; no mutation


def _job_spec(tmp_path: Path, uri: str):
    from jobs.spec import JobSpec

    job = {"task": {"glue": "rte", "glue_dir": str(GLUE_DIR), "max_train_examples": 64},
           "teacher": {"source": "package:all-MiniLM-L6-v2"}, "student": {"from_teacher": {"layers": [0, 5]}},
           "objective": {"preset": "ckd-paper"}, "training": {"max_steps": 2, "batch_size": 8},
           "output": {"dir": str(tmp_path / "out")}}
    return JobSpec.from_mapping(job, base_dir=tmp_path, env={"MLFLOW_TRACKING_URI": uri})


@pytest.mark.usefixtures("glue_dir")
def test_job_params_and_job_json_hold_no_password(tmp_path):
    real = f"postgresql://user:{SECRET}@db/mlflow"
    spec = _job_spec(tmp_path, real)
    assert spec.output.tracking_uri() == real  # in memory: what connects
    assert SECRET not in json.dumps(spec.to_dict(redact=True))  # job.json, job.resolved.json
    params = spec.flat_params()  # MLflow params
    assert params["output.mlflow.tracking_uri"] == "postgresql://***@db/mlflow"
    assert SECRET not in json.dumps(params)
    assert spec.to_dict()["output"]["mlflow"]["tracking_uri"] == real  # Ray Train's in-memory config


@pytest.mark.usefixtures("glue_dir")
def test_sweep_records_hold_no_password_and_the_driver_gets_the_real_uri(tmp_path, monkeypatch, capsys):
    from orchestrator import records
    from orchestrator.grid import GridSpec, load_grid
    from orchestrator.plan import print_plan
    from orchestrator.state import SweepDir

    real = f"http://user:{SECRET}@127.0.0.1:9/"
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(textwrap.dedent(f"""\
        job:
          task: {{glue: rte, glue_dir: {GLUE_DIR}, max_train_examples: 64}}
          teacher: {{source: "package:all-MiniLM-L6-v2"}}
          student: {{from_teacher: {{layers: [0, 5]}}}}
          objective: {{preset: ckd-paper}}
          training: {{epochs: 1, batch_size: 8}}
        sweep:
          space: {{training.seed: {{grid: [1, 2]}}}}
        cluster: {{backend: local}}
        mlflow: {{tracking_uri: "{real}"}}
        root: {tmp_path / "sweeps"}
        """))
    grid = load_grid(grid_file)
    sweep = SweepDir(tmp_path / "sweeps" / "s1")
    sweep.create(grid_file, grid.to_dict(), None)
    stored = (sweep.path / "sweep.json").read_text() + (sweep.path / "grid.yaml").read_text()
    assert SECRET not in stored and "http://***@127.0.0.1:9/" in stored
    from orchestrator.control import _record_job
    from cluster.local import LocalBackend

    backend = LocalBackend(grid.cluster)
    monkeypatch.setattr(type(backend), "shares_sweep_dir", False, raising=False)
    _record_job(sweep, backend, {"pid": 1}, real, "exp")
    assert SECRET not in (sweep.path / "state.json").read_text()

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert GridSpec.from_record(sweep.record()).mlflow.tracking_uri == "http://***@127.0.0.1:9/"
    with pytest.raises(ValueError, match="export MLFLOW_TRACKING_URI"):
        records.stored_tracking_uri(sweep.state())
    from orchestrator.launch import driver_launch

    with pytest.raises(ValueError, match="export MLFLOW_TRACKING_URI"):  # resume without the real URI
        driver_launch(sweep, GridSpec.from_record(sweep.record()), backend)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", real)
    driver_grid = GridSpec.from_record(sweep.record())
    assert driver_grid.tracking_uri() == real
    assert records.stored_tracking_uri(sweep.state()) == real
    assert driver_launch(sweep, driver_grid, backend).env["MLFLOW_TRACKING_URI"] == real

    print_plan(grid, [f"mlflow.tracking_uri: the MLflow server {redact_uri(real)} is not reachable"])
    assert SECRET not in capsys.readouterr().out


def test_rng_state_round_trip_with_weights_only(tmp_path):
    from jobs.distill import checkpoint_tag_ok

    torch.manual_seed(3)
    state = {"torch": torch.get_rng_state(), "cuda": None}
    torch.save(state, tmp_path / "rng-rank0.pt")
    expected = torch.rand(4)
    torch.manual_seed(99)
    loaded = torch.load(tmp_path / "rng-rank0.pt", weights_only=True)
    torch.set_rng_state(loaded["torch"])
    assert torch.equal(torch.rand(4), expected)
    source = (REPO / "jobs" / "distill.py").read_text()
    assert "weights_only=False" not in source
    for path in (REPO / "jobs").rglob("*.py"):
        assert "weights_only=False" not in path.read_text(), path
    assert checkpoint_tag_ok("step-00000010")
    for bad in ("..", "../x", "a/b", "/etc", ".x", "x..y", "", "a\\b", "step 1"):
        assert not checkpoint_tag_ok(bad), bad


def test_a_latest_file_naming_a_path_is_refused(tmp_path):
    from jobs.distill import _latest_tag

    (tmp_path / "latest").write_text("../../elsewhere")
    with pytest.raises(RuntimeError, match="not a checkpoint tag"):
        _latest_tag(tmp_path)
    (tmp_path / "latest").write_text("step-00000004")
    (tmp_path / "step-00000004").mkdir()
    assert _latest_tag(tmp_path) == "step-00000004"


_RANK = """
import os, sys, psutil
sys.path.insert(0, {repo!r})
from jobs.distributed import init_distributed
import torch.distributed as dist
env = init_distributed(timeout_s=60)
dist.barrier()
listening = {{c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN}}
print("LISTEN", sorted(listening), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_single_node_rendezvous_listens_on_loopback_only(tmp_path):
    from jobs.distributed import free_port

    script = tmp_path / "rank.py"
    script.write_text(_RANK.format(repo=str(REPO)))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    for out in outputs:
        line = next(x for x in out.splitlines() if x.startswith("LISTEN"))
        addresses = eval(line.removeprefix("LISTEN "))  # a list of strings, printed by the rank
        assert addresses and all(a.startswith("127.") for a in addresses), line
