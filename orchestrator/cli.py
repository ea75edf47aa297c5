"""`ckd-orchestrate`: one entry point for a single job (`run`) and for sweeps."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jobs.storage import redact_uri

EXIT_BAD_INPUT = 2


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one distillation job (no Ray): one process or --nproc N local processes",
                       description="Train one student from a job spec. Rerunning with the same output.dir resumes "
                                   "from its last checkpoint.")
    p.add_argument("job", help="job spec YAML (see examples/jobs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set training.learning_rate=3e-5 (repeatable)")
    p.add_argument("--nproc", type=int, default=1, help="local processes (data parallel; gloo on CPU, NCCL on GPUs)")
    p.add_argument("--no-resume", action="store_true", help="discard the output dir's checkpoint and start over")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from jobs.spec import SpecError, load_job_spec

    if args.nproc < 1:
        print(f"error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        spec = load_job_spec(args.job, args.overrides)
        spec.deepspeed_config(args.nproc)  # batch split and DeepSpeed conflicts, before any model is loaded
    except SpecError as err:
        print(f"error: invalid job spec\n{err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from jobs.launch import launch_local, run_in_process

    if args.nproc == 1:
        summary = run_in_process(spec, resume=not args.no_resume)
        print(json.dumps(summary, indent=1))
        return 0
    status = launch_local(spec, args.nproc, resume=not args.no_resume)
    if status == 0:
        metrics = os.path.join(spec.output.dir, "metrics.json")
        with open(metrics) as handle:
            print(json.dumps(json.load(handle).get("summary", {}), indent=1))
    return status


def _load_grid_or_exit(path: str, overrides: Sequence[str]):
    from jobs.spec import SpecError
    from orchestrator.grid import load_grid

    try:
        return load_grid(path, overrides)
    except SpecError as err:
        print(f"error: invalid grid\n{err}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> SystemExit:
    """Print one `error: ...` line on stderr; the SystemExit to raise."""
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(code)


def _sweep_or_exit(ref: str | None, *, exact: bool = False):
    """The sweep named by `ref` (a directory, an exact id or, unless `exact`, a unique id prefix: the match
    is printed before the command acts), else the latest submitted; its sweep.json and state.json read once,
    so that a broken sweep is refused before anything is done to it."""
    from orchestrator.state import SweepFileError, find_sweep, latest_sweep

    try:
        sweep = find_sweep(ref, prefix=not exact) if ref else latest_sweep()
        if sweep is None:
            raise _fail("no sweep submitted yet; pass a sweep id or directory")
        if ref and sweep.sweep_id != ref and Path(ref).expanduser().resolve() not in (sweep.path,
                                                                                      sweep.path / "sweep.json"):
            print(f"{ref!r} matches sweep {sweep.sweep_id} ({sweep.path})", file=sys.stderr)
        sweep.check()
    except SweepFileError as err:
        raise _fail(str(err)) from None
    return sweep


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port between 1 and 65535, got {text!r}")
    return value


def _mlflow_error(err: Exception) -> str:
    """An MLflow exception's message, first line only (MLflow appends long hints)."""
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _cmd_plan(args: argparse.Namespace) -> int:
    from orchestrator.plan import check_plan, print_plan

    grid = _load_grid_or_exit(args.grid, args.overrides)
    problems = check_plan(grid)
    print_plan(grid, problems)
    return EXIT_BAD_INPUT if problems else 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.control import submit
    from orchestrator.plan import check_plan

    grid = _load_grid_or_exit(args.grid, args.overrides)
    problems = check_plan(grid)
    if problems:
        print("error: the plan does not hold:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return EXIT_BAD_INPUT
    return submit(grid, Path(args.grid), detach=args.detach)


def _cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.control import resume

    return resume(_sweep_or_exit(args.sweep), detach=args.detach)


def _cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.control import show_status

    show_status(_sweep_or_exit(args.sweep))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from orchestrator.console import print_logs
    from orchestrator.control import driver_log

    if args.trial is not None and (not args.trial or Path(args.trial).name != args.trial or args.trial in (".", "..")):
        raise _fail(f"{args.trial!r} is not a trial id (see `ckd-orchestrate status`)")
    sweep = _sweep_or_exit(args.sweep)
    text = driver_log(sweep, args.tail) if args.trial is None else None
    return print_logs(sweep, args.trial, args.tail, text)


def _cmd_cancel(args: argparse.Namespace) -> int:
    from orchestrator.control import cancel

    return cancel(_sweep_or_exit(args.sweep, exact=True))


def _cmd_best(args: argparse.Namespace) -> int:
    from orchestrator.console import print_best

    return print_best(_sweep_or_exit(args.sweep))


def _cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.control import grid_of

    sweep = _sweep_or_exit(args.sweep)
    state = sweep.state()
    if not state.get("parent_run_id"):
        print(f"error: sweep {sweep.sweep_id} has not started yet (no MLflow parent run)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not state.get("tracking_uri"):
        raise _fail(f"{sweep.path / 'state.json'}: a parent run but no tracking_uri; the file is corrupt")
    out = Path(args.out or sweep.path / "report.png")
    if out.is_dir() or out.suffix.lower() != ".png":
        raise _fail(f"--out {out}: expected the path of a .png file")
    grid = grid_of(sweep)
    from mlflow.exceptions import MlflowException

    from orchestrator.report import front_report

    uri = _connect_uri(state)
    try:
        out = front_report(state["parent_run_id"], grid.metric_name, out, mode=grid.metric_mode,
                           tracking_uri=uri)
    except MlflowException as err:
        raise _fail(f"cannot read sweep {sweep.sweep_id}'s runs from {state['tracking_uri']}: "
                    f"{_mlflow_error(err)}", 1) from None
    print(f"report: {out} (and {out.with_suffix('.csv')}), logged to the sweep's parent run")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from jobs.storage import sqlite_path
    from orchestrator.registry import PullError, pull

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        sweep = _sweep_or_exit(args.sweep)
        state = sweep.state()
        if not state.get("tracking_uri"):
            raise _fail(f"sweep {sweep.sweep_id} has no MLflow store yet (its driver has not started); "
                        "pass --tracking-uri")
        uri = _connect_uri(state)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # pull reads a store: it never creates an empty one
        raise _fail(f"no MLflow store at {redact_uri(uri)} ({db} does not exist)")
    try:
        dest = pull(args.model_uri, Path(args.dest), tracking_uri=uri)
    except (PullError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MlflowException as err:
        raise _fail(f"cannot use the MLflow store {redact_uri(uri)!r}: {_mlflow_error(err)}", 1) from None
    print(f"pulled {args.model_uri} to {dest} "
          "(load with AutoModelForSequenceClassification.from_pretrained and AutoTokenizer.from_pretrained)")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    import socket

    sweep = _sweep_or_exit(args.sweep)
    state = sweep.state()
    if not state.get("tracking_uri"):
        raise _fail(f"sweep {sweep.sweep_id} has no MLflow store yet (its driver has not started)")
    uri = _connect_uri(state)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError as err:
            raise _fail(f"--port {args.port}: cannot listen on 127.0.0.1:{args.port} ({err.strerror or err}); "
                        "choose another port") from None
    # The store through the environment, not the command line (which every user of the machine can read).
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(args.port)]
    print(f"MLflow UI for {redact_uri(uri)} at http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    os.execve(sys.executable, cmd, {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri})


def _connect_uri(state: Mapping[str, Any]) -> str:
    """The MLflow store to read a sweep's runs from (state.json keeps it without credentials: see
    `records.stored_tracking_uri`); a stored URI that cannot be completed ends with one line."""
    from orchestrator.records import stored_tracking_uri

    try:
        return stored_tracking_uri(state)
    except ValueError as err:
        raise _fail(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckd-orchestrate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)

    def grid_command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("grid", help="grid.yaml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a grid key, e.g. --set job.training.epochs=1 (repeatable)")
        p.set_defaults(func=func)
        return p

    def sweep_command(name: str, func, help: str, optional: bool = True,
                      exact: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        what = "sweep directory or exact sweep id" if exact else \
            "sweep directory, sweep id, or a unique prefix of one (the matched sweep is printed first)"
        p.add_argument("sweep", nargs="?" if optional else None,
                       help=what + (" (default: the latest submitted)" if optional else ""))
        p.set_defaults(func=func)
        return p

    grid_command("plan", _cmd_plan, "validate a grid and print its trials, resources and a compute estimate; "
                                    "submits nothing")
    submit = grid_command("submit", _cmd_submit, "run a sweep: trials on Ray Tune, results in MLflow, the best "
                                                 "student in the registry")
    submit.add_argument("--detach", action="store_true", help="return at once and print the sweep id")
    sweep_command("status", _cmd_status, "the sweep's state and its trials (state, progress, metric)")
    logs = sweep_command("logs", _cmd_logs, "the sweep driver's log, or one trial's job log", optional=False)
    logs.add_argument("trial", nargs="?", help="trial id (see status)")
    logs.add_argument("--tail", type=_positive_int, default=None, metavar="N", help="only the last N lines (N >= 1)")
    cancel = sweep_command("cancel", _cmd_cancel, "stop a running sweep and mark it cancelled (the exact sweep id "
                                                  "or directory: no prefix)", optional=False, exact=True)
    cancel.description = ("stop a running sweep and mark it cancelled. It takes the sweep directory or its exact "
                          "id: a prefix, enough for the other commands (which print the sweep it matched), is "
                          "refused here, so that a short id never stops the wrong sweep")
    resume = sweep_command("resume", _cmd_resume, "continue a stopped sweep: finished trials are not rerun",
                           optional=False)
    resume.add_argument("--detach", action="store_true", help="return at once")
    sweep_command("best", _cmd_best, "the sweep's champion: trial, metric, registered model version")
    report = sweep_command("report", _cmd_report, "plot each student's metric against its size and latency")
    report.add_argument("--out", help="PNG path (default: <sweep dir>/report.png)")
    pull = sub.add_parser("pull", help="download a registered student as a Hugging Face directory")
    pull.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/student")
    pull.add_argument("--dest", required=True, help="directory to create")
    pull.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else --sweep's store)")
    pull.add_argument("--sweep", help="take the MLflow store of this sweep (default: the latest submitted)")
    pull.set_defaults(func=_cmd_pull)
    ui = sweep_command("ui", _cmd_ui, "open the MLflow UI on the sweep's store, bound to 127.0.0.1")
    ui.add_argument("--port", type=_port, default=5000, help="port on 127.0.0.1 (1-65535, free; default 5000)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except Exception as err:  # the known refusals as one line; anything else is a bug and keeps its traceback
        from cluster.base import BackendUnavailable
        from orchestrator.state import StatusMoveError, SweepFileError

        if not isinstance(err, (SweepFileError, StatusMoveError, BackendUnavailable)):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
