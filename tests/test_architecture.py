"""The shape of the code: which package may import which, how long a module may be, and that the light
commands stay light. Fast: it reads source files and runs the CLI on a sweep directory made by hand.

    orchestrator -> cluster.base -> jobs.specbase, jobs.storage (the leaf modules: plain config and storage)
    jobs -> ckd;  ckd -> nothing of the project
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobkit import REPO

PACKAGES = ("ckd", "jobs", "orchestrator", "cluster")
MAX_LINES = 550
# What a light command must never load: each costs seconds, and none is needed to read a sweep's files.
HEAVY = ("torch", "transformers", "datasets", "deepspeed", "sklearn")
CLUSTER_MAY_IMPORT_FROM_JOBS = ("jobs.specbase", "jobs.storage")


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(module: str, path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, relative imports made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            found.add(target)
            if not node.module:  # `from . import x`: x is a module
                found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _project(name: str) -> str | None:
    top = name.split(".")[0]
    return top if top in PACKAGES else None


def test_imports_run_one_way():
    problems = []
    for module, path in _modules():
        own = module.split(".")[0]
        for imported in sorted(_imports(module, path)):
            other = _project(imported)
            if other is None or other == own:
                continue
            where = f"{path.relative_to(REPO)} imports {imported}"
            if own == "ckd":
                problems.append(f"{where}: ckd imports nothing of the project")
            elif own == "jobs" and other in ("orchestrator", "cluster"):
                problems.append(f"{where}: jobs never imports orchestrator or cluster")
            elif own == "cluster" and other == "orchestrator":
                problems.append(f"{where}: cluster never imports orchestrator (the orchestrator calls cluster.base)")
            elif own == "cluster" and other == "jobs" and not imported.startswith(CLUSTER_MAY_IMPORT_FROM_JOBS):
                problems.append(f"{where}: cluster imports only {' and '.join(CLUSTER_MAY_IMPORT_FROM_JOBS)} of jobs")
            elif own == "cluster" and other == "ckd":
                problems.append(f"{where}: cluster never imports ckd")
            elif own == "orchestrator" and other == "cluster" and imported != "cluster.base":
                problems.append(f"{where}: the orchestrator reaches a backend only through cluster.base "
                                "(backend_class, config_model)")
    assert problems == []


def test_the_import_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from orchestrator.state import SweepDir\n    import cluster.base\n"
                      "from .sibling import x\n")
    assert _imports("cluster.ray.mod", source) == {"orchestrator.state", "cluster.base", "cluster.ray.sibling"}


def test_no_module_is_too_long():
    long = {str(path.relative_to(REPO)): n for _, path in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: split them by responsibility"


_DOC = REPO / "docs" / "architecture.md"


def _top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level (what `module.name` in a doc can refer to)."""
    names: set[str] = set()
    body = ast.parse(path.read_text(), str(path)).body
    for node in [*body, *(n for top in body if isinstance(top, (ast.If, ast.Try)) for n in top.body)]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:  # a package that loads its public names lazily lists them here
                names.update(ast.literal_eval(node.value))
            except ValueError:
                pass
    return names


def _mlflow_tag_names() -> set[str]:
    """The MLflow tags the code writes (`ckd.sweep_id`, ...): named in the doc, but not modules."""
    tree = ast.parse((REPO / "orchestrator" / "records.py").read_text())
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def _doc_reference_problem(ref: str) -> str | None:
    """Why `ref` (a path like cluster/base.py or a dotted name like cluster.base.Backend.submit) names
    nothing in the tree, or None when it does."""
    if "/" in ref:
        return None if (REPO / ref.rstrip("/")).exists() else "no such file"
    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module
        base = REPO.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[cut:]
            if not rest or rest[0] in _top_level_names(module):
                return None
            return f"{'.'.join(parts[:cut])} has no {rest[0]!r}"
    return "no such module"


def test_architecture_doc_names_only_what_exists():
    import re

    text = _DOC.read_text()
    refs = {m for m in re.findall(r"`([^`\s]+)`", text)
            if m.split("/")[0].split(".")[0] in PACKAGES and re.fullmatch(r"[\w./]+", m)
            and ("/" in m or "." in m)}
    refs -= _mlflow_tag_names()
    assert len(refs) > 40, "the doc should name the modules it describes"
    problems = {ref: why for ref in sorted(refs) if (why := _doc_reference_problem(ref))}
    assert problems == {}, f"docs/architecture.md names what does not exist: {problems}"


def test_the_doc_check_catches_a_missing_name():
    assert _doc_reference_problem("orchestrator.sweep") == "orchestrator has no 'sweep'"
    assert _doc_reference_problem("orchestrator.submit.RemoteSweeps") == "orchestrator has no 'submit'"
    assert _doc_reference_problem("cluster.base.Executor") == "cluster.base has no 'Executor'"
    assert _doc_reference_problem("cluster/slurm/sweeps.py") == "no such file"
    assert _doc_reference_problem("cluster.base.Backend") is None


# ---------------------------------------------------------------------------------- light commands

_RUNNER = """
import json, sys
from orchestrator.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("MODULES " + json.dumps(sorted(sys.modules)))
sys.exit(code or 0)
"""


def _sweep_dir(root: Path, name: str) -> Path:
    """A sweep directory as `submit` leaves it before its driver started (nothing run, nothing imported)."""
    sweep = root / name
    (sweep / "logs").mkdir(parents=True)
    (sweep / "logs" / "driver.log").write_text("driver started\n")
    (sweep / "grid.yaml").write_text("job: job.yaml\n")
    grid = {"job": {}, "cluster": {"backend": "local", "num_cpus": 2, "num_gpus": 0},
            "sweep": {"metric": "eval/accuracy", "mode": "max"},
            "mlflow": {"experiment": "light", "registered_model": "light-student", "alias": "champion",
                       "tracking_uri": None},
            "root": str(root)}
    (sweep / "sweep.json").write_text(json.dumps({"sweep_id": name, "grid_file": str(sweep / "grid.yaml"),
                                                  "grid": grid, "created": "now", "git_commit": None}))
    (sweep / "state.json").write_text(json.dumps({"status": "pending"}))
    return sweep


def _run(*args: str, cache: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    env = {**os.environ, "CKD_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("MODULES ")]
    assert marker, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, set(json.loads(marker[-1].removeprefix("MODULES ")))


@pytest.mark.parametrize("command", ["--help", "status", "logs", "best", "cancel"])
def test_light_commands_import_no_heavy_library(tmp_path, command):
    sweep = _sweep_dir(tmp_path / "sweeps", "light-20260101-000000-abcd")
    args = [command] if command == "--help" else [command, str(sweep)]
    proc, modules = _run(*args, cache=tmp_path / "cache")
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # best: 1, no champion yet
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
    if command == "status":
        assert "light-20260101-000000-abcd: pending" in proc.stdout
    if command == "logs":
        assert "driver started" in proc.stdout
    if command == "cancel":
        assert json.loads((sweep / "state.json").read_text())["status"] == "cancelled"


def test_plan_of_a_remote_backend_imports_no_heavy_library(tmp_path):
    """The whole plan: the grid validated (every trial's job spec, its objective), the packaged teacher's
    config read, the estimate table, the backend's checks (a Ray cluster nobody runs: listed as a problem)."""
    grid = tmp_path / "quickstart_ray.yaml"
    shutil.copy(REPO / "examples" / "quickstart_ray.yaml", grid)
    subprocess.run([sys.executable, str(REPO / "examples" / "quickstart_data.py"), str(tmp_path / "data" / "quickstart")],
                   check=True, capture_output=True)
    proc, modules = _run("plan", str(grid), "--set", "cluster.address=http://127.0.0.1:9",
                         "--set", f"root={tmp_path / 'sweeps'}", cache=tmp_path / "cache")
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
    assert "4 trial(s)" in proc.stdout and "GFLOP" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cluster.address: cannot use the Ray cluster" in proc.stdout.replace("\n", " ")


def _registered_student(root: Path) -> str:
    """A SQLite MLflow store holding a run whose `student` artifacts are a (tiny) Hugging Face directory,
    registered as light-student@champion; returns the store's URI."""
    from mlflow import MlflowClient

    root.mkdir(parents=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("light", artifact_location=str(root / "artifacts")))
    student = root / "student"
    student.mkdir()
    (student / "config.json").write_text('{"model_type": "bert"}')
    (student / "model.safetensors").write_bytes(b"\0" * 8)
    client.log_artifacts(run.info.run_id, str(student), "student")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("light-student")
    version = client.create_model_version("light-student", f"runs:/{run.info.run_id}/student", run_id=run.info.run_id)
    client.set_registered_model_alias("light-student", "champion", version.version)
    return uri


def test_pull_and_ui_import_no_heavy_library(tmp_path):
    uri = _registered_student(tmp_path / "store")
    dest = tmp_path / "pulled"
    proc, modules = _run("pull", "models:/light-student@champion", "--dest", str(dest), "--tracking-uri", uri,
                         cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
    proc, modules = _run("pull", "models:/missing@champion", "--dest", str(tmp_path / "none"), "--tracking-uri", uri,
                         cache=tmp_path / "cache")
    assert proc.returncode == 2 and "no registered model named 'missing'" in proc.stderr
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
    # `ui` execs the MLflow server once it has found the sweep's store: only its parsing runs here.
    proc, modules = _run("ui", "--help", cache=tmp_path / "cache")
    assert proc.returncode == 0 and "--port" in proc.stdout
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []


_LIGHT_IMPORTS = """
import json, sys
import ckd, ckd.config, jobs.spec
assert ckd.resolve_terms({"preset": "ckd-paper", "task": "sst2"})["wr_angle"]["window"] == 21
print("MODULES " + json.dumps(sorted(sys.modules)))
"""


def test_the_config_side_of_the_loss_core_loads_no_torch():
    """Checking an objective (ckd.config, what jobs.spec validates with) needs no torch."""
    proc = subprocess.run([sys.executable, "-c", _LIGHT_IMPORTS], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("MODULES ")]
    assert marker, proc.stdout[-3000:] + proc.stderr[-3000:]
    modules = json.loads(marker[-1].removeprefix("MODULES "))
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
