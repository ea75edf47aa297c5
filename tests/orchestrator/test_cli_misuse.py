"""`ckd-orchestrate` misused: every case ends with one `error: ...` line naming what is wrong and a non-zero
exit (2 for bad input, as argparse does; 1 where the environment failed), never a traceback, and a refused
command writes nothing. Most cases run in this process (`orchestrator.cli.main`); three through the
installed entry point. Sweep directories are built by hand (no Ray, no training); the sweep index lives in
a temporary CKD_CACHE_DIR.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.cli import main

REPO = Path(__file__).resolve().parents[2]
ID = "q-20260101-000000-abcd"


def sweep_dir(root: Path, name: str = ID, *, cluster: dict | None = None, state: dict | None = None,
              mode: str = "max") -> Path:
    """A sweep directory as `submit` leaves it before its driver started (as tests/test_architecture.py)."""
    sweep = root / name
    (sweep / "logs").mkdir(parents=True)
    (sweep / "logs" / "driver.log").write_text("".join(f"line {i}\n" for i in range(1, 8)))
    (sweep / "grid.yaml").write_text("job: job.yaml\n")
    grid = {"job": {}, "cluster": cluster or {"backend": "local", "num_cpus": 2, "num_gpus": 0},
            "sweep": {"metric": "eval/accuracy", "mode": mode},
            "mlflow": {"experiment": "light", "registered_model": "light-student", "alias": "champion",
                       "tracking_uri": None},
            "root": str(root)}
    (sweep / "sweep.json").write_text(json.dumps({"sweep_id": name, "grid_file": str(sweep / "grid.yaml"),
                                                  "grid": grid, "created": "now", "git_commit": None}))
    (sweep / "state.json").write_text(json.dumps(state or {"status": "pending"}))
    return sweep


def index(cache: Path, *lines: str | dict) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "sweeps.jsonl", "a") as handle:
        for line in lines:
            handle.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """(tmp root, the index's cache dir); no MLflow URI from the user's environment."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CKD_CACHE_DIR", str(cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path, cache


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`main(argv)`'s exit code (argparse's SystemExit included), stdout and stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# --- the cases: (setup(tmp, cache) -> argv, expected exit code, words the error line holds)

def _corrupt(name: str, content: bytes) -> Callable[[Path, Path], list[str]]:
    def setup(tmp: Path, cache: Path) -> list[str]:
        sweep = sweep_dir(tmp / "sweeps")
        (sweep / name).write_bytes(content)
        return ["status", str(sweep)]
    return setup


def _store(tmp: Path) -> str:
    """A path for a SQLite store that exists (empty: only the URI's shape is under test)."""
    (tmp / "mlflow.db").write_bytes(b"")
    return f"sqlite:///{tmp / 'mlflow.db'}"


def _started(tmp: Path, mode: str = "max", **state) -> Path:
    return sweep_dir(tmp / "sweeps", mode=mode, state={"status": "running", "parent_run_id": "r1",
                                            "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", **state})


CASES: dict[str, tuple[Callable[[Path, Path], list[str]], int, tuple[str, ...]]] = {
    # not a sweep
    "resume-plain-dir": (lambda t, c: ["resume", str(t)], 2, ("not a sweep directory", "no sweep.json")),
    "report-plain-dir": (lambda t, c: ["report", str(t)], 2, ("not a sweep directory",)),
    "ui-plain-dir": (lambda t, c: ["ui", str(t)], 2, ("not a sweep directory",)),
    "best-plain-dir": (lambda t, c: ["best", str(t)], 2, ("not a sweep directory",)),
    "status-a-file": (lambda t, c: ["status", str(Path(_store(t)[10:]))], 2, ("not a sweep directory",)),
    "status-missing-path": (lambda t, c: ["status", str(t / "nowhere" / "x")], 2, ("no sweep", "not in the index")),
    # broken sweep files: the file is named
    "sweep-json-not-json": (_corrupt("sweep.json", b"{bad"), 2, ("sweep.json:1", "not valid JSON")),
    "sweep-json-latin1": (_corrupt("sweep.json", '{"sweep_id": "é"}'.encode("latin-1")), 2,
                          ("sweep.json", "not UTF-8")),
    "sweep-json-a-list": (_corrupt("sweep.json", b"[]"), 2, ("sweep.json", "must be a JSON object")),
    "sweep-json-no-grid": (_corrupt("sweep.json", b'{"sweep_id": "x"}'), 2, ("sweep.json", "not a sweep record")),
    "sweep-json-cluster-not-object": (
        _corrupt("sweep.json", json.dumps({"grid": {"cluster": 3}, "grid_file": "g.yaml"}).encode()), 2,
        ("sweep.json", "grid.cluster must be an object")),
    "state-json-latin1": (_corrupt("state.json", '{"status": "pending", "error": "é"}'.encode("latin-1")), 2,
                          ("state.json", "not UTF-8")),
    "state-json-truncated": (_corrupt("state.json", b'{"status": "runn'), 2, ("state.json", "not valid JSON")),
    "state-json-unknown-status": (_corrupt("state.json", b'{"status": "bogus"}'), 2,
                                  ("state.json", "unknown status 'bogus'")),
    "state-json-backend-not-object": (_corrupt("state.json", b'{"status": "running", "backend": "local"}'), 2,
                                      ("state.json", "backend must be an object")),
    # another backend's sweep, or files that disagree on the backend
    "unknown-backend": (lambda t, c: ["status", str(sweep_dir(t / "s", cluster={"backend": "nosuch"}))], 2,
                        ("sweep.json", "unknown backend 'nosuch'")),
    "cluster-block-invalid": (lambda t, c: ["cancel", str(sweep_dir(t / "s", cluster={"backend": "slurm"}))], 2,
                              ("sweep.json", "cluster block is not valid")),
    "job-of-another-backend": (
        lambda t, c: ["cancel", str(sweep_dir(t / "s", state={"status": "running",
                                                              "backend": {"backend": "slurm", "job_id": "12"}}))],
        2, ("state.json", "holds a slurm job", "local backend")),
    "ray-job-reference-incomplete": (
        lambda t, c: ["status", str(sweep_dir(t / "s", cluster={"backend": "ray", "address": "http://127.0.0.1:9"},
                                              state={"status": "running",
                                                     "backend": {"backend": "ray", "job_id": "raysubmit_x"}}))],
        2, ("(ray)", "no Ray job recorded")),
    # a sweep whose recorded grid does not validate (resume and report need the whole grid)
    "resume-invalid-recorded-grid": (lambda t, c: ["resume", str(sweep_dir(t / "s", mode="sideways"))], 2,
                                     ("sweep.json", "recorded grid is not valid", "sweep.mode")),
    "report-invalid-recorded-grid": (lambda t, c: ["report", str(_started(t, mode="sideways"))], 2,
                                     ("recorded grid is not valid",)),
    "report-not-started": (lambda t, c: ["report", str(sweep_dir(t / "s"))], 2, ("has not started yet",)),
    "report-out-a-directory": (lambda t, c: ["report", str(_started(t)), "--out", str(t)], 2,
                               ("--out", "expected the path of a .png file")),
    "ui-not-started": (lambda t, c: ["ui", str(sweep_dir(t / "s"))], 2, ("no MLflow store yet",)),
    # the sweep index
    "no-sweep-yet": (lambda t, c: ["status"], 2, ("no sweep submitted yet",)),
    "empty-index": (lambda t, c: (index(c), ["best"])[1], 2, ("no sweep submitted yet",)),
    "unknown-id-corrupt-index-line": (
        lambda t, c: (index(c, '{"sweep_id": "cut short', {"sweep_id": "other-1", "path": str(t)}),
                      ["status", "nope"])[1], 2, ("no sweep 'nope'", "unreadable line", "[1]")),
    "index-is-a-directory": (lambda t, c: ((c / "sweeps.jsonl").mkdir(parents=True), ["status", "x"])[1], 2,
                             ("sweeps.jsonl", "cannot read the sweep index")),
    "indexed-dir-gone": (lambda t, c: (index(c, {"sweep_id": ID, "path": str(t / "gone")}), ["status", ID])[1],
                         2, ("in the index", "is gone")),
    "ambiguous-prefix": (
        lambda t, c: (index(c, {"sweep_id": ID, "path": str(sweep_dir(t / "s"))},
                            {"sweep_id": ID + "x", "path": str(sweep_dir(t / "s", ID + "x"))}), ["status", "q"])[1],
        2, ("ambiguous", ID)),
    # logs
    "logs-tail-negative": (lambda t, c: ["logs", str(sweep_dir(t / "s")), "--tail", "-3"], 2,
                           ("--tail", "positive integer", "'-3'")),
    "logs-tail-zero": (lambda t, c: ["logs", str(sweep_dir(t / "s")), "--tail", "0"], 2, ("positive integer",)),
    "logs-tail-text": (lambda t, c: ["logs", str(sweep_dir(t / "s")), "--tail", "ten"], 2, ("positive integer",)),
    "logs-trial-path": (lambda t, c: ["logs", str(sweep_dir(t / "s")), "../../etc"], 2, ("not a trial id",)),
    "logs-unknown-trial": (lambda t, c: ["logs", str(sweep_dir(t / "s")), "t0"], 2, ("no log at", "job.log")),
    # ui
    "ui-port-too-big": (lambda t, c: ["ui", str(_started(t)), "--port", "70000"], 2, ("--port", "between 1 and 65535")),
    "ui-port-text": (lambda t, c: ["ui", str(_started(t)), "--port", "http"], 2, ("--port",)),
    # job and grid files
    "run-missing-file": (lambda t, c: ["run", str(t / "job.yaml")], 2, ("job.yaml", "not found")),
    "run-a-directory": (lambda t, c: ["run", str(t)], 2, ("invalid job spec", "directory")),
    "run-nproc-zero": (lambda t, c: ["run", str(t / "job.yaml"), "--nproc", "0"], 2, ("--nproc must be >= 1",)),
    "plan-missing-file": (lambda t, c: ["plan", str(t / "grid.yaml")], 2, ("grid.yaml", "not found")),
    "plan-a-directory": (lambda t, c: ["plan", str(t)], 2, ("invalid grid", "directory")),
    "submit-missing-file": (lambda t, c: ["submit", str(t / "grid.yaml")], 2, ("grid.yaml", "not found")),
    "submit-bad-set": (lambda t, c: ((t / "grid.yaml").write_text("job: job.yaml\n"),
                                     ["submit", str(t / "grid.yaml"), "--set", "novalue"])[1], 2, ("novalue",)),
    "run-bad-set": (lambda t, c: ((t / "job.yaml").write_text("teacher: {}\n"),
                                  ["run", str(t / "job.yaml"), "--set", "=3"])[1], 2, ("invalid job spec",)),
    # pull
    "pull-random-string": (lambda t, c: ["pull", "gimme", "--dest", str(t / "d"), "--tracking-uri", _store(t)], 2,
                           ("unsupported model URI 'gimme'",)),
    "pull-models-no-slash": (lambda t, c: ["pull", "models:x@a", "--dest", str(t / "d"), "--tracking-uri", _store(t)],
                             2, ("malformed model URI",)),
    "pull-runs-empty": (lambda t, c: ["pull", "runs:/", "--dest", str(t / "d"), "--tracking-uri", _store(t)], 2,
                        ("unsupported model URI",)),
    "pull-dest-not-empty": (
        lambda t, c: ((t / "d").mkdir(), (t / "d" / "keep").write_text("x"),
                      ["pull", "models:/m@champion", "--dest", str(t / "d"), "--tracking-uri", _store(t)])[2],
        2, ("not empty",)),
    "pull-dest-a-file": (
        lambda t, c: ((t / "d").write_text("x"),
                      ["pull", "models:/m@champion", "--dest", str(t / "d"), "--tracking-uri", _store(t)])[1],
        2, ("not a directory",)),
    "pull-store-missing": (lambda t, c: ["pull", "models:/m@champion", "--dest", str(t / "d"),
                                         "--tracking-uri", f"sqlite:///{t / 'none.db'}"], 2, ("no MLflow store",)),
    "pull-bad-tracking-uri": (lambda t, c: ["pull", "models:/m@champion", "--dest", str(t / "d"),
                                            "--tracking-uri", "foo://bar"], 1, ("cannot use the MLflow store",)),
    "pull-no-store-no-sweep": (lambda t, c: ["pull", "models:/m@champion", "--dest", str(t / "d")], 2,
                               ("no sweep submitted yet",)),
    "pull-sweep-not-started": (lambda t, c: ["pull", "models:/m@champion", "--dest", str(t / "d"),
                                             "--sweep", str(sweep_dir(t / "s"))], 2, ("no MLflow store yet",)),
    "pull-no-dest": (lambda t, c: ["pull", "models:/m@champion"], 2, ("--dest",)),
    # the command line itself
    "unknown-command": (lambda t, c: ["frobnicate"], 2, ("invalid choice",)),
    "cancel-no-sweep-arg": (lambda t, c: ["cancel"], 2, ("sweep",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_misuse_ends_with_one_clear_error(case, env, capsys):
    tmp, cache = env
    setup, code, words = CASES[case]
    argv = setup(tmp, cache)
    got, out, err = run_cli(argv, capsys)
    text = out + err
    assert got == code, text
    assert "Traceback" not in text
    error_lines = [line for line in text.splitlines() if "error:" in line]
    assert error_lines, text
    for word in words:
        assert word in text, (word, text)


def test_cancel_refuses_a_corrupt_sweep_and_writes_nothing(env, capsys):
    tmp, _ = env
    sweep = sweep_dir(tmp / "sweeps")
    (sweep / "state.json").unlink()
    (sweep / "sweep.json").write_text('{"sweep_id": ')
    before = files_of(sweep)
    code, out, err = run_cli(["cancel", str(sweep)], capsys)
    assert code == 2 and "sweep.json" in err and "cancelled" not in out
    assert files_of(sweep) == before  # no state.json, no lock file

    (sweep / "sweep.json").write_text(json.dumps({"sweep_id": ID}))  # valid JSON, not a sweep record
    code, out, err = run_cli(["cancel", str(sweep)], capsys)
    assert code == 2 and "not a sweep record" in err and not (sweep / "state.json").exists()


def test_a_corrupt_state_is_not_overwritten(env, capsys):
    tmp, _ = env
    sweep = sweep_dir(tmp / "sweeps", state={"status": "running"})
    (sweep / "state.json").write_bytes(b'{"status": "running", "note": "\xe9"}')
    before = files_of(sweep)
    code, _, err = run_cli(["cancel", str(sweep)], capsys)
    assert code == 2 and "state.json" in err and "not UTF-8" in err
    assert files_of(sweep) == before


def test_cancel_needs_the_exact_id(env, capsys):
    """`cancel q` never stops whichever sweep starts with q; the full id (or the directory) does."""
    tmp, cache = env
    sweep = sweep_dir(tmp / "sweeps")
    index(cache, {"sweep_id": ID, "path": str(sweep)})
    code, out, err = run_cli(["cancel", "q"], capsys)
    assert code == 2 and "not a full sweep id" in err and ID in err and "cancelled" not in out
    assert json.loads((sweep / "state.json").read_text())["status"] == "pending"
    code, out, _ = run_cli(["cancel", ID], capsys)
    assert code == 0 and f"sweep {ID} cancelled" in out
    assert json.loads((sweep / "state.json").read_text())["status"] == "cancelled"


def test_a_unique_prefix_names_its_match_before_acting(env, capsys):
    tmp, cache = env
    sweep = sweep_dir(tmp / "sweeps")
    other = sweep_dir(tmp / "sweeps", "other-20260101-000000-abcd")
    index(cache, '{"sweep_id": "q-cut', {"sweep_id": ID, "path": str(sweep)},
          {"sweep_id": other.name, "path": str(other)})  # a corrupt line is skipped
    code, out, err = run_cli(["status", "q-2026"], capsys)
    assert code == 0, out + err
    assert f"'q-2026' matches sweep {ID}" in err and f"{ID}: pending" in out
    # an exact id wins over a longer id it is the prefix of
    longer = sweep_dir(tmp / "sweeps", ID + "-2")
    index(cache, {"sweep_id": longer.name, "path": str(longer)})
    code, out, err = run_cli(["status", ID], capsys)
    assert code == 0 and "matches" not in err and f"{ID}: pending" in out
    # the latest sweep despite a corrupt last line
    index(cache, "\xff garbage")
    code, out, err = run_cli(["status"], capsys)
    assert code == 0 and f"{longer.name}: pending" in out


def test_logs_tail_keeps_the_last_lines(env, capsys):
    tmp, _ = env
    sweep = sweep_dir(tmp / "sweeps")
    code, out, _ = run_cli(["logs", str(sweep), "--tail", "3"], capsys)
    assert code == 0 and out.splitlines() == ["line 5", "line 6", "line 7"]
    code, out, _ = run_cli(["logs", str(sweep), "--tail", "100"], capsys)
    assert code == 0 and len(out.splitlines()) == 7


def test_ui_refuses_a_busy_port(env, capsys):
    tmp, _ = env
    sweep = _started(tmp)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_cli(["ui", str(sweep), "--port", str(port)], capsys)
    assert code == 2 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in out + err


def test_pull_of_a_model_without_version_names_it(env, capsys):
    """`models:/x` against a real (empty) store: what is registered is listed, no traceback."""
    from mlflow import MlflowClient

    tmp, _ = env
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()  # creates the store
    code, out, err = run_cli(["pull", "models:/x", "--dest", str(tmp / "d"), "--tracking-uri", uri], capsys)
    assert code == 2 and "no registered model named 'x'" in err and "Traceback" not in out + err
    assert not (tmp / "d").exists()


# --- through the installed entry point: the exit code and stderr a shell sees

@pytest.mark.parametrize("argv, code, words", [
    (["cancel", "{sweep}"], 2, ("sweep.json", "not valid JSON")),
    (["logs", "{sweep}", "--tail", "-3"], 2, ("--tail", "positive integer")),
    (["ui", "{sweep}", "--port", "70000"], 2, ("--port", "between 1 and 65535")),
])
def test_the_entry_point_exits_with_one_error_line(tmp_path, argv, code, words):
    sweep = sweep_dir(tmp_path / "sweeps")
    (sweep / "sweep.json").write_text("{not json")
    exe = Path(sys.executable).parent / "ckd-orchestrate"
    command = [str(exe)] if exe.is_file() else [sys.executable, "-m", "orchestrator.cli"]
    proc = subprocess.run([*command, *(a.format(sweep=sweep) for a in argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CKD_CACHE_DIR": str(tmp_path / "c")})
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line], proc.stderr
    for word in words:
        assert word in proc.stderr
    assert not (sweep / ".state.lock").exists()
    assert json.loads((sweep / "state.json").read_text()) == {"status": "pending"}


@pytest.mark.parametrize("uri, words", [("foo://bar", "cannot read them from foo://bar"),
                                        ("sqlite:///{tmp}/none/mlflow.db", "no MLflow store at")])
def test_status_with_an_unreadable_store_shows_the_sweep_and_says_why(env, capsys, uri, words):
    """The sweep's own status is still shown; the trial table is replaced by one line; no store is created."""
    tmp, _ = env
    sweep = sweep_dir(tmp / "sweeps", state={"status": "failed", "parent_run_id": "r1",
                                             "tracking_uri": uri.format(tmp=tmp)})
    code, out, err = run_cli(["status", str(sweep)], capsys)
    assert code == 0 and f"{ID}: failed" in out and "trials: not shown" in out and words in out
    assert "Traceback" not in out + err and not (tmp / "none").exists()
