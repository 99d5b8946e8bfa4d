"""One training run per date: an exclusive, non-blocking file lock under the home.

    with date_lock(home, "2026-01-06", who="flow run 1234"):
        ...  # train, evaluate, register

A second run for the same date (another worker process, another terminal, a thread of the same
process) fails at once with `RunLocked`, naming the holder (pid, host, flow run, start time). The
lock is `fcntl.flock` on `<home>/locks/csmf-daily-<date>.lock`: the kernel releases it when the
holding process exits, even after a crash or kill -9, so a stale lock cannot block a later run.
Local file systems only (POSIX); on a shared cluster use the Prefect deployment's concurrency
limit instead (prefect.yaml sets both).

Process identity, for everything that outlives a process: a pid alone can be reused by an unrelated
process, so a process is (host, pid, start time). `process_identity()` records it, `process_alive()`
checks it (the recorded pid still runs and started at the recorded time), `stop_process_group()`
stops a process and what it spawned. flows/deploy.py (the local server stack), flows/doctor.py (runs
and servers of a killed csmf process) and `csmf ui` use them.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil


class RunLocked(RuntimeError):
    """Another run for the same date holds the lock."""


@contextmanager
def date_lock(home: str | os.PathLike, date: str, who: str = "", kind: str = "csmf-daily") -> Iterator[Path]:
    """Hold the lock of `date` for the duration of the block (module docstring). kind: whose lock
    (`csmf-daily` runs lock a date, `csmf-tune` a study)."""
    path = Path(home) / "locks" / f"{kind}-{date}.lock"

    def refused(holder: dict) -> RunLocked:
        return RunLocked(
            f"another {kind} run for {date} is training (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, {holder.get('who') or 'unknown run'}, since "
            f"{holder.get('since', '?')}; lock {path}). Two runs for the same date never train at "
            "once: wait for it to finish, then re-run (completed stages are resumed from the cache)."
        )

    with _flock(path, who, refused) as held:
        yield held


@contextmanager
def registry_lock(home: str | os.PathLike, who: str = "", timeout: float = 600.0) -> Iterator[Path]:
    """Hold the home's registry lock (`<home>/locks/csmf-registry.lock`) for the block, waiting up to
    `timeout` seconds for it: the gate reads the champion, decides and promotes under it, so two runs
    for different dates (a backfill beside the daily run) cannot both decide against the same champion
    and the later promotion silently win. RunLocked, naming the holder, when the wait runs out."""
    path = Path(home) / "locks" / "csmf-registry.lock"

    def refused(holder: dict) -> RunLocked:
        return RunLocked(
            f"the registry of {home} has been locked for over {timeout:g} s by pid "
            f"{holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"({holder.get('who') or 'unknown'}, since {holder.get('since', '?')}; lock {path}): "
            "this run's model is registered but not gated; re-run it once that one ends"
        )

    with _flock(path, who, refused, wait=timeout) as held:
        yield held


@contextmanager
def _flock(path: Path, who: str, refused: Callable[[dict], Exception], wait: float = 0.0) -> Iterator[Path]:
    """An exclusive `flock` on `path` for the block, with its holder (pid, host, who, since) written
    into the file; taken at once or within `wait` seconds, else `refused(holder)` is raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise refused(_read(fd)) from None
                time.sleep(0.05)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "who": who,
            "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


# ---- process identity ------------------------------------------------------------------------------
def process_identity(pid: int | None = None) -> dict:
    """{"host", "pid", "create_time"} of process `pid` (default: this process)."""
    proc = psutil.Process(pid if pid is not None else os.getpid())
    return {"host": socket.gethostname(), "pid": proc.pid, "create_time": proc.create_time()}


START_TIME_SLACK_S = 1.5


def process_alive(pid: int | str, create_time: float | str) -> bool:
    """Does the process `pid` that started at `create_time` (psutil's seconds since the epoch) still run?

    False for a pid now held by a process that started at another time (a recycled pid), for a zombie
    (exited, not yet reaped) and for anything unreadable.

    A start time in epoch seconds is the kernel's start tick plus the boot time, which Linux gives as
    whole seconds of the wall clock: as NTP slews the clock over the days a deployment runs, the boot
    time read later can differ by a second from the one read at the start. A second and a half of
    slack keeps such a process alive; a recycled pid cannot start that close to the original (the pid
    space would have to wrap within it)."""
    try:
        proc = psutil.Process(int(pid))
        same = abs(proc.create_time() - float(create_time)) < START_TIME_SLACK_S
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError, TypeError):
        return False


def stop_process_group(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM to the process group of `pid` (a process started with start_new_session=True, and the
    children it spawned), SIGKILL to whatever still runs after `timeout` seconds; children that left
    the group are signalled one by one."""
    try:
        group = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        group = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        _, alive = psutil.wait_procs(group, timeout=timeout if sig == signal.SIGTERM else 10)
        if not alive:
            return
        for p in alive:  # children that left the group
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
