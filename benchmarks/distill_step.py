"""Time of one full distillation training step: CE only vs logit KD vs full CKD, same models and batch.

One step = teacher forward under no_grad (skipped for CE only: nothing reads the teacher) + student
forward + loss + backward + AdamW step (and zero_grad). Features are captured with the jobs' forward
hooks (``jobs.capture.FeatureCapture``), exactly what a training job does, and only what each
objective asks for. The three objectives are:

- ``CE``: ``{ce: 1}``
- ``logit KD``: ``{ce: 1, logit_kd: 1}`` at the preset task's temperature, no T^2 (as ``ckd-paper``)
- ``CKD``: the ``ckd-paper`` preset of the task (CE + logit KD + WR pair/angle + LTR pair/angle)

Each objective trains its own copy of the same initial student with its own AdamW. Steps are
interleaved (one step of each objective per round) so that a slow patch of a noisy machine hits all
three alike. Target (issue 3): the CKD step <= 1.15x the logit-KD step. The table gives median, p90 and
min ms per step; on a machine shared with other work the min is the closest to an undisturbed step, so
the ratios are printed both ways. Nothing here asserts a time.

Where the time goes: every step is split into phases (teacher forward, student forward, loss forward,
backward, optimizer), and afterwards each objective's loss is timed alone (forward and forward +
backward on detached feature copies, so no model is involved), term by term for CKD.

Two scales. The default is the toy pair the tests train (the packaged all-MiniLM-L6-v2 teacher, a
2-layer student cut from it), where the student is so small that the relation terms weigh most.
``--teacher-shape bert-large`` builds a BERT-large-shaped teacher (24 layers, width 1024, 16 heads)
from its config with random weights, the teacher size users distil from; a step's time does not depend
on the weights' values, and the Hub (where the real checkpoint lives) is not needed. Its vocabulary is
the packaged tokenizer's (BERT uncased, 30522 ids).

Usage: python benchmarks/distill_step.py [--steps 20] [--batch-size 32] [--seq-len 128]
       [--device cpu|cuda] [--teacher package:all-MiniLM-L6-v2] [--teacher-shape bert-large]
       [--student-layers 0 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ckd import FeatureNeeds, Features, Targets, TaskShape, build_objective, ckd_paper_training  # noqa: E402
from ckd.presets import CKD_PAPER_TASKS  # noqa: E402
from jobs.capture import FeatureCapture  # noqa: E402
from jobs.models import (  # noqa: E402
    count_parameters,
    latency_batch,
    load_teacher,
    load_tokenizer,
    model_shape,
    student_from_teacher,
)

# Teacher shapes buildable from a config (layers, width, heads, FFN width), as in the published checkpoints.
TEACHER_SHAPES = {"bert-base": (12, 768, 12, 3072), "bert-large": (24, 1024, 16, 4096)}

PHASES = ("teacher_fwd", "student_fwd", "loss_fwd", "backward", "optimizer")


def objectives(task: str) -> dict[str, dict]:
    temperature = float(CKD_PAPER_TASKS[task][0])
    return {
        "CE": {"terms": {"ce": {"weight": 1.0}}},
        "logit KD": {"terms": {"ce": {"weight": 1.0},
                               "logit_kd": {"weight": 1.0, "temperature": temperature, "t_squared": False}}},
        "CKD": {"preset": "ckd-paper", "task": task},
    }


def machine(device: torch.device, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = (f"{cpu}, {cores} usable cores, {torch.get_num_threads()} torch threads (asked {threads}), "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


class Clock:
    """perf_counter laps; on CUDA each lap waits for the queued kernels so it times work, not launches."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class Runner:
    """One objective, its own student copy and optimizer; ``step`` is one training step."""

    def __init__(self, name, config, student, teacher, task_shape, lr, device) -> None:
        self.name = name
        self.student = copy.deepcopy(student).to(device).train()
        self.objective = build_objective(config, model_shape(self.student), model_shape(teacher), task_shape).to(device)
        needs = self.objective.needs
        self.needs = needs
        self.s_cap = FeatureCapture(self.student, needs.student)
        self.t_cap = FeatureCapture(teacher, needs.teacher, grad=False) if needs.teacher != FeatureNeeds() else None
        params = list(self.student.parameters()) + list(self.objective.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=lr)
        self.times: list[float] = []
        self.phases: dict[str, list[float]] = {p: [] for p in PHASES}
        self.features: tuple[Features, Features | None] | None = None

    def step(self, batch, labels, clock: Clock, record: bool) -> None:
        t0 = clock.now()
        t_feats = self.t_cap(batch)[1] if self.t_cap is not None else None
        t1 = clock.now()
        _, s_feats = self.s_cap(batch)
        t2 = clock.now()
        loss, _ = self.objective(s_feats, t_feats if t_feats is not None else s_feats.detach(), labels=labels)
        t3 = clock.now()
        loss.backward()
        t4 = clock.now()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t5 = clock.now()
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss {loss.item()}")
        if record:
            self.times.append(t5 - t0)
            for phase, (a, b) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
                self.phases[phase].append(b - a)

    def close(self) -> None:
        self.s_cap.close()
        if self.t_cap is not None:
            self.t_cap.close()


def leaf_copy(features: Features) -> Features:
    """Detached copies of the student's features that require grad: the loss's own graph, no model."""

    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_(t.is_floating_point())

    return dataclasses.replace(
        features,
        hidden_states=tuple(leaf(h) for h in features.hidden_states),
        logits=leaf(features.logits),
        **{k: {i: leaf(v) for i, v in getattr(features, k).items()}
           for k in ("attentions", "queries", "keys", "values", "attention_outputs")},
    )


def time_loss(fn, s_feats: Features, clock: Clock, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of fn(student leaves) forward, and of forward + backward (the minimum:
    what the loss costs when nothing else disturbs it)."""
    fwd, both = [], []
    fn(leaf_copy(s_feats)).backward()  # warm-up
    for _ in range(repeats):
        leaves = leaf_copy(s_feats)
        t0 = clock.now()
        value = fn(leaves)
        t1 = clock.now()
        value.backward()
        t2 = clock.now()
        fwd.append(t1 - t0)
        both.append(t2 - t0)
    return min(fwd), min(both)


def loss_breakdown(runner: Runner, batch, labels, clock: Clock, repeats: int) -> list[dict]:
    """The loss alone: the whole objective and (for more than two terms) each term, forward and fwd+bwd."""
    with torch.no_grad():
        t_feats = runner.t_cap(batch)[1] if runner.t_cap is not None else None
    _, s_feats = runner.s_cap(batch)
    s_feats = s_feats.detach()
    t_feats = t_feats if t_feats is not None else s_feats
    targets = Targets(labels=labels)
    rows = []
    fwd, both = time_loss(lambda s: runner.objective(s, t_feats, labels=labels)[0], s_feats, clock, repeats)
    rows.append({"objective": runner.name, "term": "(whole loss)", "fwd_s": fwd, "fwd_bwd_s": both})
    if len(runner.objective.terms) > 2:
        for name, term in runner.objective.terms.items():
            fwd, both = time_loss(lambda s, term=term: term(s, t_feats, targets).float().sum(), s_feats, clock, repeats)
            rows.append({"objective": runner.name, "term": name, "fwd_s": fwd, "fwd_bwd_s": both})
    return rows


def shaped_teacher(shape: str, vocab_size: int, num_labels: int, problem: str) -> torch.nn.Module:
    layers, width, heads, ffn = TEACHER_SHAPES[shape]
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=ffn, num_labels=num_labels,
                                     problem_type=problem)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval().requires_grad_(False)


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="package:all-MiniLM-L6-v2", help="Hub id, directory or package:<alias>")
    parser.add_argument("--teacher-shape", choices=sorted(TEACHER_SHAPES),
                        help="build a teacher of this shape from its config (random weights; --teacher then "
                             "only supplies the tokenizer)")
    parser.add_argument("--student-layers", type=int, nargs="+",
                        help="0-based teacher layers the student copies (default: the first and last of a "
                             "6-layer teacher, 6 evenly spaced layers of a deeper one)")
    parser.add_argument("--task", default="rte", choices=sorted(CKD_PAPER_TASKS),
                        help="GLUE task of the ckd-paper preset (weights, temperature, learning rate)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per objective")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per objective first")
    parser.add_argument("--loss-repeats", type=int, default=3, help="repetitions of each loss-alone timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int,
                        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                        help="torch intra-op threads (default: the usable cores)")
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # the untrained head's load report is expected here
    transformers.logging.disable_progress_bar()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    torch.manual_seed(0)

    num_labels = 1 if args.task == "stsb" else 2
    problem = "regression" if args.task == "stsb" else "single_label_classification"
    names = ["score"] if num_labels == 1 else ["label_0", "label_1"]
    tokenizer = load_tokenizer(args.teacher)
    if args.teacher_shape:
        teacher = shaped_teacher(args.teacher_shape, len(tokenizer), num_labels, problem).to(device)
        teacher_name = f"{args.teacher_shape}-shaped (random weights)"
    else:
        teacher = load_teacher(args.teacher, num_labels=num_labels, label_names=names, problem_type=problem).to(device)
        teacher_name = args.teacher
    if args.student_layers is None:
        depth = teacher.config.num_hidden_layers
        args.student_layers = [0, depth - 1] if depth <= 6 else [round((i + 1) * depth / 6) - 1 for i in range(6)]
    student = student_from_teacher(teacher, layers=args.student_layers, seed=0)
    batch = {k: v.to(device) for k, v in latency_batch(tokenizer, args.batch_size, args.seq_len).items()}
    generator = torch.Generator().manual_seed(1)
    if num_labels == 1:
        labels = (torch.rand(args.batch_size, generator=generator) * 5).to(device)
    else:
        labels = torch.randint(num_labels, (args.batch_size,), generator=generator).to(device)
    task_shape = TaskShape(num_labels=num_labels, is_regression=num_labels == 1)
    lr = ckd_paper_training(args.task)["learning_rate"]

    clock = Clock(device)
    runners = [Runner(name, config, student, teacher, task_shape, lr, device)
               for name, config in objectives(args.task).items()]
    t_shape, s_shape = model_shape(teacher), model_shape(student)
    ckd_terms = ", ".join(f"{n} x{t.weight:g}" for n, t in runners[-1].objective.terms.items())
    print(f"machine: {machine(device, args.threads)}")
    print(f"device: {device}; teacher {teacher_name} ({t_shape.num_layers} layers, width {t_shape.hidden_size}, "
          f"{count_parameters(teacher) / 1e6:.1f}M params, {getattr(teacher.config, '_attn_implementation', '?')} attention); "
          f"student layers {args.student_layers} ({s_shape.num_layers} layers, "
          f"{count_parameters(student) / 1e6:.1f}M params)")
    print(f"batch {args.batch_size} x {args.seq_len} tokens (no padding), task {args.task}, AdamW lr {lr:g}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per objective, interleaved")
    print(f"CKD = ckd-paper/{args.task}: {ckd_terms}")
    print(flush=True)

    started = time.perf_counter()
    for round_ in range(args.warmup + args.steps):
        for runner in runners:
            runner.step(batch, labels, clock, record=round_ >= args.warmup)
    bench_s = time.perf_counter() - started

    med = {r.name: statistics.median(r.times) for r in runners}
    ce, kd, ckd = med["CE"], med["logit KD"], med["CKD"]
    best = {r.name: min(r.times) for r in runners}
    print(f"| objective | median ms/step | p90 ms/step | min ms/step | teacher fwd | student fwd | loss fwd | "
          f"backward | optimizer | / CE | / logit KD |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for r in runners:
        phases = {p: statistics.median(v) for p, v in r.phases.items()}
        results.append({"objective": r.name, "median_s": med[r.name], "p90_s": p90(r.times), "min_s": best[r.name],
                        "times_s": r.times, "phase_median_s": phases, "phase_times_s": r.phases})
        cells = " | ".join(f"{phases[p] * 1e3:.0f}" for p in PHASES)
        print(f"| {r.name} | {med[r.name] * 1e3:.0f} | {p90(r.times) * 1e3:.0f} | {best[r.name] * 1e3:.0f} | {cells} | "
              f"{med[r.name] / ce:.2f}x | {med[r.name] / kd:.2f}x |")
    print("(phase columns: median ms of each phase; they need not add up to the step median; ratios: of medians)")
    ratio = ckd / kd
    best_ratio = best["CKD"] / best["logit KD"]
    verdict = "met" if ratio <= 1.15 else "MISSED"
    print(f"\nCKD / logit KD = {ratio:.2f}x by median, {best_ratio:.2f}x by min (target <= 1.15x: {verdict}); "
          f"logit KD / CE = {kd / ce:.2f}x by median, {best['logit KD'] / best['CE']:.2f}x by min")

    ckd_runner, kd_runner = runners[-1], runners[1]
    ckd_ph, kd_ph = results[-1]["phase_median_s"], results[1]["phase_median_s"]
    extra = ckd - kd
    print(f"\nExtra time of the CKD step over logit KD: {extra * 1e3:.0f} ms per step; by phase (CKD - logit KD, ms): "
          + ", ".join(f"{p} {(ckd_ph[p] - kd_ph[p]) * 1e3:+.0f}" for p in PHASES))

    rows = loss_breakdown(kd_runner, batch, labels, clock, args.loss_repeats)
    rows += loss_breakdown(ckd_runner, batch, labels, clock, args.loss_repeats)
    print(f"\nThe loss alone (on detached copies of the student's features; best of {args.loss_repeats}):")
    print("| objective | term | fwd ms | fwd+bwd ms | share of the CKD step |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['objective']} | {row['term']} | {row['fwd_s'] * 1e3:.0f} | {row['fwd_bwd_s'] * 1e3:.0f} | "
              f"{row['fwd_bwd_s'] / ckd:.0%} |")
    print(f"\n(timed part took {bench_s:.0f} s)")

    for r in runners:
        r.close()
    if args.json:
        out = {"machine": machine(device, args.threads), "device": str(device), "args": {**vars(args), "json": str(args.json)},
               "ckd_terms": {n: t.weight for n, t in ckd_runner.objective.terms.items()},
               "steps": results, "ratios": {"ckd_over_logit_kd": ratio, "logit_kd_over_ce": kd / ce,
                                            "ckd_over_logit_kd_min": best_ratio,
                                            "logit_kd_over_ce_min": best["logit KD"] / best["CE"],
                                            "target": 1.15, "met": ratio <= 1.15},
               "loss_alone": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
