"""`ckd-orchestrate`: one entry point for a single job (`run`) and for sweeps."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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


def _sweep_or_exit(ref: str | None):
    from orchestrator.state import find_sweep, latest_sweep

    try:
        sweep = find_sweep(ref) if ref else latest_sweep()
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    if sweep is None:
        print("error: no sweep submitted yet; pass a sweep id or directory", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    return sweep


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

    sweep = _sweep_or_exit(args.sweep)
    text = driver_log(sweep, args.tail) if args.trial is None else None
    return print_logs(sweep, args.trial, args.tail, text)


def _cmd_cancel(args: argparse.Namespace) -> int:
    from orchestrator.control import cancel

    return cancel(_sweep_or_exit(args.sweep))


def _cmd_best(args: argparse.Namespace) -> int:
    from orchestrator.console import print_best

    return print_best(_sweep_or_exit(args.sweep))


def _cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.grid import GridSpec
    from orchestrator.report import front_report

    sweep = _sweep_or_exit(args.sweep)
    state = sweep.state()
    if not state.get("parent_run_id"):
        print(f"error: sweep {sweep.sweep_id} has not started yet (no MLflow parent run)", file=sys.stderr)
        return EXIT_BAD_INPUT
    grid = GridSpec.from_record(sweep.record())
    out = front_report(state["parent_run_id"], grid.metric_name, Path(args.out or sweep.path / "report.png"),
                       mode=grid.metric_mode, tracking_uri=state["tracking_uri"])
    print(f"report: {out} (and {out.with_suffix('.csv')}), logged to the sweep's parent run")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from orchestrator.registry import PullError, pull

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        sweep = _sweep_or_exit(args.sweep)
        uri = sweep.state().get("tracking_uri")
    try:
        dest = pull(args.model_uri, Path(args.dest), tracking_uri=uri)
    except (PullError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"pulled {args.model_uri} to {dest} "
          "(load with AutoModelForSequenceClassification.from_pretrained and AutoTokenizer.from_pretrained)")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    sweep = _sweep_or_exit(args.sweep)
    uri = sweep.state().get("tracking_uri")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    os.execv(sys.executable, cmd)


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

    def sweep_command(name: str, func, help: str, optional: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("sweep", nargs="?" if optional else None,
                       help="sweep id or directory" + (" (default: the latest submitted)" if optional else ""))
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
    logs.add_argument("--tail", type=int, default=None, help="only the last N lines")
    sweep_command("cancel", _cmd_cancel, "stop a running sweep and mark it cancelled", optional=False)
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
    ui.add_argument("--port", type=int, default=5000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
