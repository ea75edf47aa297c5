"""`ckd-orchestrate`: one entry point for a single job (`run`) and for sweeps."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckd-orchestrate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
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
