"""One distillation job: teacher stage, data, student, DeepSpeed engine, the loop, evaluation, checkpoints.

Reads top-down like the job itself. The same `run_job` serves `ckd-orchestrate run` (one or N local
processes), `srun`, and a Ray Train worker (`worker_loop`). What a job leaves in `output.dir`:

    student/             the best student so far (Hugging Face format; loads with from_pretrained)
    checkpoints/<tag>/   the last DeepSpeed checkpoint (engine, optimizer, scheduler, trainer state)
    metrics.json         every evaluation, the best one, and at the end the summary
    job.json             the resolved spec

Resume: a job started again with the same output dir continues from `checkpoints/latest`, with data
order, dropout RNG and optimizer state restored, so it ends with the same metrics as a run that was
never interrupted. A job that already finished returns its summary without training again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckd
from ckd.features import FeatureNeeds, TaskShape
from jobs.capture import FeatureCapture, ensure_eager_attention
from jobs.data import make_dataloader
from jobs.datacheck import changed_job
from jobs.distributed import DistEnv, barrier, init_distributed
from jobs.evaluation import evaluate, is_better, prepare_data
from jobs.metrics import metric_mode
from jobs.models import (
    PROBLEM_TYPES,
    count_parameters,
    export_student,
    load_teacher,
    load_tokenizer,
    measure_latency,
    model_shape,
    student_from_architecture,
    student_from_pretrained,
    student_from_teacher,
)
from jobs.progress import TrainProgress
from jobs.reporting import Reporter
from jobs.spec import JobSpec
from jobs.storage import write_json_atomic
from jobs.teacher import prepare_teacher, teacher_metrics

log = logging.getLogger(__name__)

STUDENT_DIR = "student"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
# Fault injection for the resume test: SIGKILL this process right after the checkpoint of this step.
KILL_AT_STEP_ENV = "CKD_TEST_KILL_AT_STEP"


@dataclasses.dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint so a resumed job continues exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro batches of `epoch` already consumed
    micro_steps: int = 0
    global_step: int = 0  # optimizer steps
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    finished: bool = False
    summary: dict[str, float] = dataclasses.field(default_factory=dict)


class DistillModule(nn.Module):
    """The student plus the objective's own trainable modules: exactly what DeepSpeed trains. The
    teacher stays outside (frozen, not in the optimizer, not partitioned by ZeRO)."""

    def __init__(self, student: nn.Module, objective: ckd.Objective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self._capture = FeatureCapture(student, objective.needs.student)

    def forward(self, batch: Mapping[str, torch.Tensor], teacher_features: Any) -> tuple[torch.Tensor, dict]:
        _, features = self._capture(batch)
        return self.objective(features, teacher_features, labels=batch["label"], example_ids=batch["idx"])


# ------------------------------------------------------------------------------------------ building


def build_student(spec: JobSpec, teacher: nn.Module, tokenizer: Any, attn: str | None) -> nn.Module:
    s = spec.student
    seed = spec.training.seed
    if s.from_teacher is not None:
        return student_from_teacher(teacher, s.from_teacher.layers, s.from_teacher.copy_classifier, seed=seed,
                                    attn_implementation=attn)
    if s.architecture is not None:
        a = s.architecture
        return student_from_architecture(teacher, a.num_layers, a.hidden_size, a.num_heads, a.intermediate_size,
                                         seed=seed, attn_implementation=attn)
    return student_from_pretrained(s.pretrained, teacher, tokenizer, attn_implementation=attn)


def build_optimizer(module: DistillModule, spec: JobSpec, total_steps: int) -> tuple[Any, Any]:
    """AdamW with no decay on biases and LayerNorm weights, linear warm-up then linear decay."""
    from transformers import get_linear_schedule_with_warmup

    t = spec.training
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if spec.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=t.learning_rate)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(t.warmup_ratio * total_steps), total_steps)
    return optimizer, schedule


# ----------------------------------------------------------------------------------------- checkpoints


def _latest_tag(ckpt_root: Path) -> str | None:
    latest = ckpt_root / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not checkpoint_tag_ok(tag):  # DeepSpeed joins it to the checkpoint dir: never a path out of it
        raise RuntimeError(f"{latest}: {tag[:80]!r} is not a checkpoint tag (expected a plain name such as "
                           "step-00000010); remove the file or the checkpoint directory to start over")
    return tag if (ckpt_root / tag).is_dir() else None


def checkpoint_tag_ok(tag: str) -> bool:
    """Whether `tag` (read from a checkpoint's `latest`) is a plain directory name: letters, digits, '.', '_'
    and '-', no path separator, not '.' or '..'."""
    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._\-]{0,127}", tag)) and ".." not in tag


def save_checkpoint(engine: Any, ckpt_root: Path, state: TrainState, env: DistEnv) -> Path:
    """Every rank saves its shard plus its RNG state; `latest` moves only after all of it is on disk,
    and older checkpoints are removed only then, so a crash at any point leaves a complete one."""
    tag = f"step-{state.global_step:08d}"
    (ckpt_root / tag).mkdir(parents=True, exist_ok=True)
    # Tensors only (and None), read back with weights_only=True: loading it runs no code.
    torch.save({"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               ckpt_root / tag / f"rng-rank{env.rank}.pt")
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"trainer": dataclasses.asdict(state)},
                           save_latest=True)
    barrier()
    if env.is_main:
        for old in ckpt_root.iterdir():
            if old.is_dir() and old.name.startswith("step-") and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ckpt_root / tag


def load_checkpoint(engine: Any, ckpt_root: Path, env: DistEnv) -> TrainState | None:
    tag = _latest_tag(ckpt_root)
    if tag is None:
        return None
    _, client = engine.load_checkpoint(str(ckpt_root), tag=tag)
    if client is None or "trainer" not in client:
        raise RuntimeError(f"{ckpt_root / tag}: not a ckd-orchestrate checkpoint (no trainer state)")
    rng = torch.load(ckpt_root / tag / f"rng-rank{env.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**client["trainer"])


def export_best(engine: Any, student: nn.Module, tokenizer: Any, out: Path, label_names: Any,
                env: DistEnv, zero_stage: int) -> None:
    """All ranks take part (ZeRO-3 must gather the partitioned weights); the main rank writes."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
            if env.is_main:
                export_student(student, tokenizer, out, label_names, overwrite=True)
    elif env.is_main:
        export_student(student, tokenizer, out, label_names, overwrite=True)
    barrier()


# -------------------------------------------------------------------------------------------- the job


def _refuse_changed_job(spec: JobSpec, out: Path) -> None:
    change = changed_job(out / "job.json", spec.to_dict())
    if change is not None:
        key, was, now = change
        raise spec._error(key, f"output dir {str(out)!r} holds the checkpoint of a job with another spec "
                               f"({key} was {was!r}, now {now!r}): use another output.dir, or --no-resume "
                               f"to discard that checkpoint and start over")


def run_job(spec: JobSpec, reporter: Reporter | None = None, *, env: DistEnv | None = None,
            resume: bool = True, show_progress: bool = True) -> dict[str, float]:
    """Train one student and return its summary (`best/<metric>`, `student/parameters`, ...)."""
    env = env or init_distributed()
    reporter = reporter or Reporter()
    out = Path(spec.output.dir)
    ckpt_root = out / CHECKPOINT_DIR
    if resume and _latest_tag(ckpt_root) is not None:  # never another job's checkpoint or summary
        _refuse_changed_job(spec, out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "job.json", spec.to_dict(redact=True), default=float)
    t = spec.training
    task = spec.task.task_info()
    mode = metric_mode(task)
    primary = f"eval/{task.primary_metric}"
    if not resume and env.is_main and ckpt_root.exists():
        shutil.rmtree(ckpt_root)
    barrier()
    resumed = _latest_tag(ckpt_root) is not None

    # --- teacher (fine-tuned once per cache key), tokenizer, data
    teacher_source = prepare_teacher(spec, device=env.device)
    tokenizer = load_tokenizer(teacher_source)
    data = prepare_data(spec, tokenizer, is_main=env.is_main)
    problem = PROBLEM_TYPES[1] if task.is_regression else PROBLEM_TYPES[0]
    torch.manual_seed(t.seed)
    teacher = load_teacher(teacher_source, task.num_labels, task.label_names, problem,
                           dtype=torch.bfloat16 if spec.teacher.dtype == "bf16" else None)
    student = build_student(spec, teacher, tokenizer, attn=None)
    objective = ckd.build_objective(spec.objective, student=model_shape(student), teacher=model_shape(teacher),
                                    task=TaskShape(task.num_labels, task.is_regression, len(data["train"])))
    needs = objective.needs
    # Attention maps exist only under eager attention; keep the faster kernels when none is distilled.
    for model, side in ((teacher, needs.teacher), (student, needs.student)):
        if side.attentions:
            ensure_eager_attention(model)
    teacher.to(env.device)
    teacher_capture = None if needs.teacher == FeatureNeeds() else FeatureCapture(teacher, needs.teacher, grad=False)
    module = DistillModule(student, objective)

    # --- data order, step budget, engine
    micro = t.batch_size // (env.world_size * t.grad_accumulation)
    loader = make_dataloader(data["train"], tokenizer, micro, shuffle=True, seed=t.seed, rank=env.rank,
                             world_size=env.world_size)
    micro_per_epoch = len(loader)
    total_steps = t.max_steps or max(1, (t.epochs * micro_per_epoch) // t.grad_accumulation)
    import deepspeed

    ds_config = spec.deepspeed_config(env.world_size)
    optimizer, schedule = build_optimizer(module, spec, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config)
    torch.manual_seed(t.seed + 1000 * env.rank)  # dropout differs between ranks, reproducibly

    state = load_checkpoint(engine, ckpt_root, env) if resumed else None
    state = state or TrainState()
    if env.is_main:  # one line per start, so a log shows every attempt of the job
        with open(out / "job.log", "a") as handle:
            handle.write(f"job started ({env.world_size} process(es)): "
                         + (f"checkpoint at step {state.global_step}{', finished' if state.finished else ''}\n"
                            if resumed else "fresh\n"))
    if state.finished:
        log.info("job in %s already finished; not training again", out)
        last = state.history[-1] if state.history else {}
        reporter.already_finished({**{k: v for k, v in last.items() if k != "step"}, "step": state.global_step,
                                   f"best/{primary.removeprefix('eval/')}": state.best_value})
        return state.summary
    reporter.start(spec, resumed=resumed)
    progress = TrainProgress(total_steps, enabled=show_progress and env.is_main, title=spec.task.task_name,
                             log_file=str(out / "job.log"))
    if resumed:
        progress.message(f"resumed from step {state.global_step} (epoch {state.epoch})")

    def write_metrics() -> None:
        """metrics.json: every evaluation, the best one, and once the job ends its summary."""
        if env.is_main:
            record = {"primary_metric": primary, "best": state.best_metrics, "best_step": state.best_step,
                      "history": state.history}
            write_json_atomic(out / METRICS_FILE, {**record, **({"summary": state.summary} if state.finished else {})},
                              default=float)

    def evaluate_and_checkpoint() -> None:
        metrics = evaluate(engine.module.student, data, task, tokenizer, batch_size=t.eval_batch_size,
                           device=env.device, rank=env.rank, world_size=env.world_size)
        metrics["epoch"] = state.micro_steps / micro_per_epoch
        improved = is_better(metrics[primary], state.best_value, mode)
        if improved:
            state.best_value, state.best_step, state.best_metrics = metrics[primary], state.global_step, dict(metrics)
            export_best(engine, engine.module.student, tokenizer, out / STUDENT_DIR, task.label_names, env,
                        spec.deepspeed.zero_stage)
        state.history.append({"step": state.global_step, **metrics})
        write_metrics()
        progress.message(f"eval step {state.global_step}: " + " ".join(
            f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items() if k.startswith("eval/"))
            + (" (best)" if improved else ""))
        path = save_checkpoint(engine, ckpt_root, state, env)
        reporter.evaluated(state.global_step, {**metrics, f"best/{primary.removeprefix('eval/')}": state.best_value},
                           checkpoint=path)
        _maybe_kill(state.global_step)

    try:
        window = _Window()
        last_eval_step = state.history[-1]["step"] if state.history else -1
        while state.global_step < total_steps and state.epoch < _max_epochs(t, total_steps, micro_per_epoch):
            loader.sampler.set_epoch(state.epoch)
            for i, batch in enumerate(loader):
                if i < state.batch_in_epoch:
                    continue  # consumed before the checkpoint this job resumed from
                batch = {k: v.to(env.device) for k, v in batch.items()}
                teacher_features = teacher_capture(batch)[1] if teacher_capture is not None else None
                loss, parts = engine(batch, teacher_features)
                engine.backward(loss)
                engine.step()
                state.micro_steps += 1
                state.batch_in_epoch = i + 1
                window.add(loss, parts, len(batch["label"]) * env.world_size)
                if state.micro_steps % t.grad_accumulation:
                    continue
                state.global_step += 1
                if state.global_step % t.log_every_steps == 0 or state.global_step == total_steps:
                    scalars = window.flush()
                    scalars["train/lr"] = engine.get_lr()[0]
                    progress.update(state.global_step, scalars)
                    reporter.train_step(state.global_step, scalars)
                else:
                    progress.update(state.global_step, {})
                if t.eval_every_steps and state.global_step % t.eval_every_steps == 0:
                    evaluate_and_checkpoint()
                    last_eval_step = state.global_step
                elif t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0:
                    save_checkpoint(engine, ckpt_root, state, env)
                    _maybe_kill(state.global_step)
                if state.global_step >= total_steps:
                    break
            else:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if last_eval_step != state.global_step:
                    evaluate_and_checkpoint()
                    last_eval_step = state.global_step
                continue
            break  # step budget reached mid-epoch
        if last_eval_step != state.global_step:
            evaluate_and_checkpoint()
        progress.close()

        summary = _summary(spec, state, out / STUDENT_DIR, teacher_source, env, total_steps)
        state.finished, state.summary = True, summary
        write_metrics()
        save_checkpoint(engine, ckpt_root, state, env)
        reporter.finish(summary, out / STUDENT_DIR)
        return summary
    except BaseException as err:
        progress.close()
        reporter.failed(err)
        raise
    finally:
        if teacher_capture is not None:
            teacher_capture.close()


def _max_epochs(t: Any, total_steps: int, micro_per_epoch: int) -> int:
    if t.max_steps is None:
        return t.epochs
    return math.ceil(total_steps * t.grad_accumulation / max(1, micro_per_epoch)) + 1


def _summary(spec: JobSpec, state: TrainState, student_dir: Path, teacher_source: str, env: DistEnv,
             total_steps: int) -> dict[str, float]:
    summary: dict[str, float] = {f"best/{k.removeprefix('eval/')}": v for k, v in state.best_metrics.items()
                                 if k.startswith("eval/")}
    summary["best/step"] = float(state.best_step or 0)
    summary["train/steps"] = float(total_steps)
    if env.is_main:
        from transformers import AutoModelForSequenceClassification

        exported = AutoModelForSequenceClassification.from_pretrained(student_dir)
        latency = measure_latency(exported, load_tokenizer(str(student_dir)))
        summary["student/parameters"] = float(count_parameters(exported))
        summary["student/latency_ms"] = round(latency["median_ms"], 2)
        summary["student/latency_p90_ms"] = round(latency["p90_ms"], 2)
        summary.update({f"teacher/{k}": v for k, v in teacher_metrics(teacher_source).items()
                        if k.startswith("eval/")})
    from jobs.distributed import broadcast_object

    return broadcast_object(summary)


class _Window:
    """Running means of the loss and each term between two log lines, and throughput."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._count = 0
        self._examples = 0
        self._start = time.perf_counter()

    def add(self, loss: torch.Tensor, parts: Mapping[str, torch.Tensor], examples: int) -> None:
        self._sums["train/loss"] = self._sums.get("train/loss", 0.0) + float(loss.detach())
        for name, value in parts.items():
            self._sums[f"train/{name}"] = self._sums.get(f"train/{name}", 0.0) + float(value)
        self._count += 1
        self._examples += examples

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        out = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        out["train/examples_per_s"] = self._examples / elapsed
        self.__init__()
        return out


def _maybe_kill(step: int) -> None:
    target = os.environ.get(KILL_AT_STEP_ENV)
    if target and step >= int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def worker_loop(config: Mapping[str, Any]) -> None:
    """Entry point for a Ray Train worker (`TorchTrainer(worker_loop, train_loop_config=...)`).

    config: {"spec": JobSpec.to_dict() of the trial, "reporter": a factory (DistEnv, JobSpec) -> Reporter, or None}.
    """
    spec = JobSpec.from_mapping(config["spec"])
    env = init_distributed()
    factory = config.get("reporter")
    reporter = factory(env, spec) if factory is not None else Reporter()
    run_job(spec, reporter, env=env, show_progress=True)
