"""POSIX process control for the Slurm launcher: start a child with Slurm's warning signal ignored, stop it in
order (a signal, a grace period, SIGKILL), and find what is left below us.

Nothing here is Slurm-specific. Slurm tracks a job's processes by parent links, and a Ray process whose parent
dies (raylet agents when the raylet is killed) would otherwise escape both Slurm and the teardown: the
launcher therefore makes itself a subreaper (`become_subreaper`) and sweeps its descendants at the end
(`kill_descendants`). `stop` is safe inside a signal handler that interrupted a poll() of the same process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "RAY_STARTED_MARKER", "RayNode", "become_subreaper", "descendants", "kill_descendants", "log", "spawn", "stop",
    "wait_for", "write_private",
]  # fmt: skip

RAY_STARTED_MARKER = "Ray runtime started"


def log(message: str) -> None:
    """One time-stamped line of the launcher's own output (the node's Slurm log)."""
    print(f"[ckd-launcher {time.strftime('%H:%M:%S')}] {message}", flush=True)


# Environment variables never passed on from the submitting shell (sbatch exports it): the allocation has its
# own Ray cluster and token.
_DROPPED_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")


def spawn(cmd: Sequence[str], extra_env: Mapping[str, str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start `cmd` with USR2 ignored (inherited through exec by everything it starts): Slurm's walltime warning
    must reach only the launcher, which stops things in order (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(extra_env)
    wrapped = ["/bin/sh", "-c", 'trap "" USR2; exec "$@"', "sh", *cmd]
    return subprocess.Popen(wrapped, env=env, stdin=subprocess.DEVNULL, **kwargs)


def _gone(proc: subprocess.Popen[Any]) -> bool:
    """Whether `proc` has exited; safe inside a signal handler that interrupted a poll() of the same process
    (Popen's wait lock is then held, so /proc tells instead)."""
    if proc.poll() is not None:
        return True
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _wait_gone(proc: subprocess.Popen[Any], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not _gone(proc):
        if time.monotonic() >= end:
            return False
        time.sleep(0.1)
    return True


def stop(proc: subprocess.Popen[Any] | None, what: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Send `sig`, wait up to `timeout` s, then SIGKILL."""
    if proc is None or _gone(proc):
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    if not _wait_gone(proc, timeout):
        log(f"{what} (pid {proc.pid}) still running {timeout:.0f} s after {signal.Signals(sig).name}; SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        _wait_gone(proc, 10)
    proc.poll()  # reap it when no one else holds Popen's wait lock (sets returncode)


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux PR_SET_CHILD_SUBREAPER): a Ray process
    whose parent dies (raylet agents when the raylet is killed) stays under the launcher, so that Slurm's
    process tracking still sees it (proctrack/linuxproc follows parent links) and the teardown finds it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), fields[0])
            except (OSError, IndexError, ValueError):
                continue
    return table


def descendants(pid: int) -> list[int]:
    """Living (not zombie) descendants of `pid`."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        todo += children.get(child, [])
        if table.get(child, (0, "Z"))[1] not in ("Z", "X"):
            found.append(child)
    return found


def kill_descendants(timeout: float) -> None:
    """SIGTERM whatever this process still has below it (Ray processes orphaned by a killed parent), then
    SIGKILL after `timeout` seconds; reap the orphans that were handed to us."""
    me = os.getpid()
    left = descendants(me)
    if left:
        log(f"stopping {len(left)} leftover process(es) of this node: {left}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            end = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
            while (left := descendants(me)) and time.monotonic() < end:
                time.sleep(0.1)
            if not left:
                break
    table = _process_table()
    for pid, (parent, state) in table.items():  # orphans handed to us exit as our zombies
        if parent == me and state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def write_private(path: Path, text: str) -> None:
    """Create `path` with mode 0600 (never readable by others, not even briefly)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def wait_for(what: str, check: Callable[[], Any], timeout: float, *, alive: Callable[[], bool] | None = None,
             interval: float = 0.5) -> Any:
    """Poll `check()` every `interval` s until it returns something true (returned).

    Raises:
        RuntimeError: `alive()` says the process the wait depends on has exited.
        TimeoutError: `timeout` seconds passed.
    """
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if alive is not None and not alive():
            raise RuntimeError(f"gave up waiting for {what}: the process it depends on exited")
        if time.monotonic() >= end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class RayNode:
    """One `ray start --block` process; its output is copied to this task's stdout with a prefix."""

    def __init__(self, cmd: list[str], env: Mapping[str, str], label: str) -> None:
        self.cmd = cmd
        self.label = label
        self.started = threading.Event()
        self.proc = spawn(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _pump(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            if RAY_STARTED_MARKER in line:
                self.started.set()
            sys.stdout.write(f"[{self.label}] {line}")
            sys.stdout.flush()

    def wait_started(self, timeout: float) -> bool:
        """True once Ray says it started; False if the process exited first or `timeout` passed."""
        end = time.monotonic() + timeout
        while not self.started.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() >= end:
                return self.started.is_set()
        return True

    def stop(self, timeout: float = 30.0) -> None:
        stop(self.proc, f"ray start ({self.label})", timeout=timeout)
        self._reader.join(timeout=5)
