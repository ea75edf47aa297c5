"""The sweep driver: `python -m orchestrator.driver <sweep_dir>`, started by every backend where Ray lives.

1. joins Ray (RAY_ADDRESS when a backend started a cluster, else a local Ray in this process);
2. opens (or continues) the sweep's MLflow parent run;
3. fine-tunes the teacher(s) once, before any trial, into the sweep's cache;
4. runs the Ray Tune sweep, or restores it when `tune/` already holds one (a `resume`, a requeued
   Slurm job, a retried RayJob): finished trials stay finished, unfinished ones continue from their
   last checkpoint;
5. registers the best trial's student and moves the alias to it; writes the accuracy/size/latency
   report; records the outcome in state.json and on the parent run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from cluster.base import SweepStatus
from jobs.storage import redact_text, redact_uri, require_connectable
from orchestrator import records
from orchestrator.grid import GridSpec
from orchestrator.launch import RECORD_ENV, bootstrap_sweep
from orchestrator.space import Sampled
from orchestrator.state import StatusMoveError, SweepDir
from orchestrator.trial import TrialContext
from orchestrator.tune import build_tuner

log = logging.getLogger("orchestrator.driver")

TEACHER_KEYS = ("teacher.", "task.")


def start_parent_run(sweep: SweepDir, grid: Any) -> str:
    import mlflow

    from jobs import tracking

    tracking.use_tracking_store(grid.tracking_uri())
    tracking.ensure_experiment(grid.mlflow.experiment)
    record = sweep.record()
    tags = {records.SWEEP_ID_TAG: sweep.sweep_id, records.ROLE_TAG: records.ROLE_SWEEP,
            records.SWEEP_DIR_TAG: str(sweep.path)}
    if record.get("git_commit"):
        tags[records.GIT_COMMIT_TAG] = record["git_commit"]
    run_id = tracking.start_or_resume_run(grid.mlflow.experiment, sweep.sweep_id, tags, sweep.path / "parent_run_id")
    s = grid.sweep
    params = {"sweep.search": s.search.algorithm, "sweep.scheduler": s.scheduler.kind, "sweep.metric": grid.metric_name,
              "sweep.mode": grid.metric_mode, "sweep.samples": str(s.samples), "sweep.trials": str(grid.total_trials()),
              "sweep.workers_per_trial": str(s.resources.workers), "sweep.backend": grid.backend}
    tracking.log_params_batched(None, run_id, params)
    client = mlflow.MlflowClient()
    client.log_artifact(run_id, str(sweep.path / "grid.yaml"))
    client.log_artifact(run_id, str(sweep.path / "sweep.json"))
    return run_id


def prepare_teachers(grid: GridSpec) -> None:
    """Fine-tune every teacher the grid's points need, once, before trials compete for the lock."""
    from jobs.teacher import prepare_teacher

    seen: set[str] = set()
    for config in grid.trial_configs_for_plan():
        relevant = {k: v for k, v in config.items() if k.startswith(TEACHER_KEYS) and not isinstance(v, Sampled)}
        spec = grid.job_spec_for(relevant)
        if spec.teacher.finetune is None or spec.teacher_cache_key() in seen:
            continue
        seen.add(spec.teacher_cache_key())
        log.info("teacher stage: %s (fine-tune, cached by key %s)", spec.teacher.source, spec.teacher_cache_key()[:12])
        prepare_teacher(spec)


def init_ray(sweep: SweepDir, grid: Any) -> None:
    import ray

    env_vars = {"CKD_CACHE_DIR": str(sweep.cache_dir), "MLFLOW_TRACKING_URI": grid.tracking_uri(),
                # Ray Train V2 is the default since 2.51; keep it explicit for older installs.
                "RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false"}
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        if os.environ.get("CKD_RAY_DASHBOARD_URL"):  # a Slurm allocation's head: see the comment below
            env_vars["RAY_ADDRESS"] = os.environ["CKD_RAY_DASHBOARD_URL"]
        ray.init(address=address, runtime_env={"env_vars": env_vars}, **kwargs)
        return
    from jobs.distributed import free_port

    cluster = grid.cluster
    # The dashboard serves the State API, which Ray Train uses to release the workers of a trial that ASHA
    # stopped; without it their CPUs stay reserved and later trials wait for workers forever. Its address
    # is given to the workers explicitly: auto-detection fails when another Ray runs on the machine.
    port = free_port()
    env_vars["RAY_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=getattr(cluster, "num_cpus", None), num_gpus=getattr(cluster, "num_gpus", None),
             include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": env_vars}, **kwargs)
    # Kept with the job's reference, where `cancel` (LocalBackend.cancel) looks for them.
    sweep.update_state(backend={"ray_pids": _local_ray_pids()})


def _local_ray_pids() -> list[int]:
    """The processes of the Ray this driver started, so `cancel` (or a test) can stop exactly those."""
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        return sorted({info.process.pid for infos in node.all_processes.values() for info in infos
                       if info.process is not None})
    except Exception:  # private API: best effort only
        return []


def finish_children(parent_run_id: str, tracking_uri: str) -> int:
    """Child runs left RUNNING were stopped early by the scheduler (ASHA): end them as FINISHED with the tag
    `ckd.stopped_early=true` (being outperformed is not a failure, and the UI shows KILLED as an error)."""
    from orchestrator.registry import child_runs

    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    stopped = 0
    for run in child_runs(parent_run_id, tracking_uri=tracking_uri):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "ckd.stopped_early", "true")
            client.set_terminated(run.info.run_id, "FINISHED")
            stopped += 1
    return stopped


def describe_parent(parent_run_id: str, champion: dict[str, Any], version: Any, tracking_uri: str) -> None:
    """The parent run is the first row a user sees: give it the champion's numbers and a description."""
    import mlflow

    from jobs import tracking

    client = mlflow.MlflowClient(tracking_uri)
    best = client.get_run(champion["run_id"]).data
    numbers = {k: v for k, v in best.metrics.items() if k.startswith(("best/", "student/"))}
    tracking.log_metrics_at(parent_run_id, numbers, 0)
    label = best.tags.get("ckd.trial_label", champion["trial_id"])
    text = (f"Champion: {label} — {champion['metric']} {champion['value']:.4f}, registered as "
            f"{champion['uri']} (version {champion['version']}).")
    client.set_tag(parent_run_id, "mlflow.note.content", text)
    client.update_model_version(champion["model"], champion["version"], description=text)


def run_sweep(sweep: SweepDir) -> dict[str, Any]:
    import mlflow

    from orchestrator import registry, report

    grid = GridSpec.from_record(sweep.record())  # the tracking URI with its credentials from the environment
    os.environ["CKD_CACHE_DIR"] = str(sweep.cache_dir)
    os.environ["MLFLOW_TRACKING_URI"] = require_connectable(grid.tracking_uri())
    sweep.set_status(SweepStatus.RUNNING, driver_pid=os.getpid())
    parent = start_parent_run(sweep, grid)
    sweep.update_state(parent_run_id=parent, tracking_uri=redact_uri(grid.tracking_uri()),
                       experiment=grid.mlflow.experiment)
    try:
        prepare_teachers(grid)
        cancel_handler = signal.getsignal(signal.SIGTERM)
        init_ray(sweep, grid)
        if callable(cancel_handler):  # ray.init installs a SIGTERM handler that exits: keep a cancel a cancel
            signal.signal(signal.SIGTERM, cancel_handler)
        # Built once, after the parent run exists; a restored Tuner gets the same trainable and context.
        results = build_tuner(sweep, grid, TrialContext.for_sweep(sweep, grid, parent)).fit()
        # Nothing below needs Ray. Disconnecting now stops the output Ray forwards from trial workers (their
        # teardown, which can end in a crash dump) from landing after the sweep's closing lines.
        shutdown_ray()
        stop_file = os.environ.get("CKD_STOP_FILE")
        if stop_file and Path(stop_file).exists():
            # Slurm's walltime warning: Tune has saved its state; the requeued job restores it.
            log.info("stopped for a requeue; the sweep continues in the requeued job")
            sweep.set_status(SweepStatus.PENDING)
            return sweep.state()
        errors = [r for r in results if r.error is not None]
        stopped = finish_children(parent, grid.tracking_uri())
        version = registry.register_champion(parent, grid.metric_name, grid.metric_mode, grid.mlflow.registered_model,
                                             alias=grid.mlflow.alias, tracking_uri=grid.tracking_uri())
        champion = records.champion_record(version, model=grid.mlflow.registered_model, alias=grid.mlflow.alias,
                                           metric=grid.metric_name)
        describe_parent(parent, champion, version, grid.tracking_uri())
        try:
            report.front_report(parent, grid.metric_name, sweep.path / "report.png", mode=grid.metric_mode,
                                tracking_uri=grid.tracking_uri())
        except Exception as err:  # a report problem must not fail a finished sweep
            log.warning("could not write the report: %s", err)
        mlflow.MlflowClient(grid.tracking_uri()).set_terminated(parent, "FINISHED")
        state = sweep.set_status(SweepStatus.FINISHED, champion=champion, trials=len(results),
                                 failed_trials=len(errors), stopped_early=stopped)
        log.info("sweep %s finished: champion %s (%s %s = %.4f)", sweep.sweep_id, champion["uri"],
                 champion["trial_id"], grid.metric_name, champion["value"])
        return state
    except BaseException as err:
        stop_file = os.environ.get("CKD_STOP_FILE")
        if stop_file and Path(stop_file).exists():
            # Slurm is requeueing the job (whatever the stop made Tune raise): the next run restores the sweep
            # and continues its parent run.
            sweep.set_status(SweepStatus.PENDING)
            raise
        status = SweepStatus.CANCELLED if isinstance(err, KeyboardInterrupt) else SweepStatus.FAILED
        mlflow.MlflowClient(grid.tracking_uri()).set_terminated(
            parent, "KILLED" if status == SweepStatus.CANCELLED else "FAILED")
        # `cancel` may have marked the sweep cancelled already (it stops waiting for a slow driver): a failure
        # while stopping does not turn a cancel into a failure.
        with contextlib.suppress(StatusMoveError):
            sweep.set_status(status, error=redact_text(f"{type(err).__name__}: {err}")[:2000])
        raise
    finally:
        shutdown_ray()


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m orchestrator.driver", description="Run (or continue) a sweep.")
    parser.add_argument("sweep_dir", help="the sweep directory (created from --bootstrap-env when missing)")
    parser.add_argument("--bootstrap-env", metavar="NAME",
                        help=f"environment variable holding the sweep's record (normally {RECORD_ENV}), for a "
                             "driver on a cluster that may not see the submitting machine's files")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sweep = SweepDir(args.sweep_dir)
    if args.bootstrap_env:
        text = os.environ.get(args.bootstrap_env)
        if not text:
            print(f"error: --bootstrap-env {args.bootstrap_env}: the variable is not set", file=sys.stderr)
            return 2
        try:
            created = bootstrap_sweep(sweep, text)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        log.info("%s sweep directory %s", "created the" if created else "continuing the", sweep.path)
    elif not sweep.exists():
        print(f"error: {sweep.path} is not a sweep directory (no sweep.json)", file=sys.stderr)
        return 2
    # `cancel` sends SIGTERM: unwind like Ctrl-C so Tune stops its trials and the state says cancelled.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        run_sweep(sweep)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
