"""Training progress for a person watching: a live bar on a terminal, plain lines in a log file."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping


def format_scalars(scalars: Mapping[str, float]) -> str:
    return " ".join(f"{k.removeprefix('train/')} {v:.4g}" for k, v in scalars.items())


class TrainProgress:
    """Shows step / total, loss and every loss term, and examples per second.

    On a terminal a rich progress bar is redrawn in place; otherwise (Ray workers, srun, CI) a line is
    printed every `log_every` steps so log files stay readable. Only the main rank should show progress.
    """

    def __init__(self, total_steps: int, *, enabled: bool = True, title: str = "distil",
                 live: bool | None = None, log_file: str | None = None) -> None:
        self.total = total_steps
        # Lines also go to the job's own log (what `ckd-orchestrate logs SWEEP TRIAL` shows).
        self._log = open(log_file, "a", buffering=1) if enabled and log_file else None
        self.enabled = enabled
        self.title = title
        self.live = sys.stderr.isatty() if live is None else live
        self._progress = None
        self._task = None
        self._start = time.perf_counter()
        if self.enabled and self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self._progress.start()
            self._task = self._progress.add_task(title, total=total_steps, info="")

    def update(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        text = format_scalars(scalars)
        elapsed = time.perf_counter() - self._start
        if text and self._log is not None:
            self._log.write(f"step {step}/{self.total} | {text} | {elapsed:.0f}s\n")
        if self._progress is not None:
            self._progress.update(self._task, completed=step, **({"info": text} if text else {}))
        elif text:
            elapsed = time.perf_counter() - self._start
            print(f"[{self.title}] step {step}/{self.total} | {text} | {elapsed:.0f}s", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._log is not None:
            self._log.write(text + "\n")
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(f"[{self.title}] {text}", flush=True)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
