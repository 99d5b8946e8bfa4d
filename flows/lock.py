"""One training run per date: an exclusive, non-blocking file lock under the home.

    with date_lock(home, "2026-01-06", who="flow run 1234"):
        ...  # train, evaluate, register

A second run for the same date (another worker process, another terminal, a thread of the same
process) fails at once with `RunLocked`, naming the holder (pid, host, flow run, start time). The
lock is `fcntl.flock` on `<home>/locks/csmf-daily-<date>.lock`: the kernel releases it when the
holding process exits, even after a crash or kill -9, so a stale lock cannot block a later run.
Local file systems only (POSIX); on a shared cluster use the Prefect deployment's concurrency
limit instead (prefect.yaml sets both).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RunLocked(RuntimeError):
    """Another run for the same date holds the lock."""


@contextmanager
def date_lock(home: str | os.PathLike, date: str, who: str = "") -> Iterator[Path]:
    """Hold the lock of `date` for the duration of the block (module docstring)."""
    path = Path(home) / "locks" / f"csmf-daily-{date}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            raise RunLocked(
                f"another csmf-daily run for {date} is training (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, {holder.get('who') or 'unknown run'}, since "
                f"{holder.get('since', '?')}; lock {path}). Two runs for the same date never train at "
                "once: wait for it to finish, then re-run (completed stages are resumed from the cache)."
            ) from None
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
