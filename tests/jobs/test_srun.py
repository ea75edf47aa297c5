"""One distillation job under `srun` on the test Slurm (cluster/slurm/testbed.sh): 2 tasks on one node, each
`ckd-orchestrate run job.yaml`, which builds its process group from SLURM_PROCID / SLURM_NTASKS /
SLURM_STEP_NODELIST (gloo on CPU, DeepSpeed ZeRO-2). Tiny teacher, slices of the real RTE files."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest
from jobkit import REPO, tiny_job, write_yaml
from slurmkit import sacct_state, slurm, wait_until  # noqa: F401
from test_distill import independent_accuracy

pytestmark = pytest.mark.slow


def test_zero2_job_with_two_srun_tasks(slurm, tmp_path, glue_dir, tiny_teacher):  # noqa: F811
    out = tmp_path / "srun"
    job = write_yaml(tmp_path / "job.yaml", tiny_job(glue_dir, tiny_teacher, out, deepspeed={"zero_stage": 2}))
    # what `ckd-orchestrate run --nproc` would set must not leak in: the ranks come from srun
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["CKD_CACHE_DIR"] = str(tmp_path / "cache")
    name = f"ckd-srun-{secrets.token_hex(4)}"  # to find this job in sacct
    task_out = tmp_path / "task-%t.out"  # each rank's output in a file of its own
    proc = subprocess.run(["srun", "-N1", "-n2", "--cpus-per-task=1", "--time=15", f"--job-name={name}",
                           f"--output={task_out}", f"--error={tmp_path / 'task-%t.err'}",
                           sys.executable, "-m", "orchestrator.cli", "run", str(job)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("task-*")))
    assert proc.returncode == 0, f"{proc.stderr[-2000:]}\n{logs}"

    # both ranks joined one job: one start line for 2 processes, and each rank's ZeRO-2 optimizer shard; both
    # print the job's summary
    printed = [json.loads(text[text.index("{"):]) for text in (
        (tmp_path / f"task-{rank}.out").read_text() for rank in (0, 1))]
    assert printed[0] == printed[1], logs
    assert (out / "job.log").read_text().splitlines()[0] == "job started (2 process(es)): fresh"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [4, 8]
    ckpt = out / "checkpoints" / "step-00000008"
    assert sorted(p.name for p in ckpt.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # evaluation is sharded over the two ranks and combined: the exported student's accuracy on the 32 dev
    # rows, recomputed from the raw TSV, is the reported best
    assert independent_accuracy(out / "student", glue_dir) == pytest.approx(metrics["summary"]["best/accuracy"])
    assert printed[0] == metrics["summary"]

    # Slurm's accounting: one job, COMPLETED, whose step ran 2 tasks
    def steps() -> list[list[str]]:
        out = subprocess.run(["sacct", "-n", "-P", f"--name={name}", "-o", "JobID,NTasks,State"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        return [line.split("|") for line in out.splitlines() if line]

    rows = wait_until("sacct to record the srun step", lambda: [r for r in steps() if r[0].endswith(".0")], 60)
    assert [r[1:] for r in rows] == [["2", "COMPLETED"]], steps()
    assert sacct_state(rows[0][0].split(".")[0]) == "COMPLETED"


def test_srun_rendezvous_ports_differ_per_job_and_step_and_avoid_rays_blocks():
    from cluster.slurm.commands import PORT_RANGE_START
    from jobs.distributed import srun_master_port

    ports = {(job, step): srun_master_port(job, step) for job in range(100, 140) for step in range(4)}
    assert len(set(ports.values())) == len(ports)  # 160 concurrent steps of neighbouring jobs: no clash
    assert all(1024 < port < PORT_RANGE_START for port in ports.values())
