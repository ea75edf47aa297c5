"""Run one job in this process or in N local processes (`ckd-orchestrate run --nproc N`).

N processes are started as `python -m jobs.launch <job.json>` with the torch.distributed variables
set (gloo on CPU, NCCL on GPUs, one process per GPU). If one of them dies, the others are stopped
and the job's exit status is the first failure's; their DeepSpeed checkpoint stays for a rerun.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jobs.distributed import free_port
from jobs.storage import require_connectable, unredact_uri


def run_in_process(spec: Any, *, resume: bool = True) -> dict[str, float]:
    from jobs.distill import run_job
    from jobs.distributed import init_distributed
    from jobs.reporting import MlflowReporter

    env = init_distributed()
    reporter = MlflowReporter(spec, is_main=env.is_main)
    return run_job(spec, reporter, env=env, resume=resume)


def launch_local(spec: Any, nproc: int, *, resume: bool = True) -> int:
    """Start `nproc` ranks of the job on this machine and wait for them; returns the exit status."""
    from jobs.teacher import prepare_teacher

    prepare_teacher(spec)  # once, here, rather than racing for the lock in every rank
    out = Path(spec.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "job.json"
    # The file holds no credentials: the ranks get the tracking URI itself through their environment.
    job_file.write_text(json.dumps(spec.to_dict(redact=True), indent=1))
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MLFLOW_TRACKING_URI=spec.output.tracking_uri())
        cmd = [sys.executable, "-m", "jobs.launch", str(job_file)] + ([] if resume else ["--no-resume"])
        procs.append(subprocess.Popen(cmd, env=env))
    status = 0
    try:
        while procs:
            for proc in list(procs):
                code = proc.poll()
                if code is None:
                    continue
                procs.remove(proc)
                if code != 0 and status == 0:
                    status = code if code > 0 else 128 - code  # killed by a signal: 128 + signal number
                    for other in procs:
                        other.send_signal(signal.SIGTERM)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait()
        raise
    return status


def _worker_main(argv: list[str]) -> int:
    from jobs.spec import JobSpec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0")
                        + " %(name)s: %(message)s")
    spec = JobSpec.from_mapping(json.loads(Path(argv[0]).read_text()))
    spec.output.mlflow.tracking_uri = require_connectable(unredact_uri(spec.output.mlflow.tracking_uri) or "") or None
    run_in_process(spec, resume="--no-resume" not in argv)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
