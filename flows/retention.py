"""Local retention: keep the run dirs (checkpoints, model-ready data, indexes) of the last N days.

    removed = apply_retention(home, keep_days=7, protect=[champion_workdir, this_run_workdir])

Run dirs live at `<home>/runs/<date>/<flow-run-id>/`. A date is kept when it is within `keep_days`
calendar days of the newest run date present (keep_days=7 and newest 2026-01-10 keep 2026-01-04 ..
2026-01-10); older run dirs are deleted unless they hold (or are inside) a protected path (the
flow protects the champion's work dir and its own) or a run for their date is going on (a backfill
holding that date's lock: its dirs are in use; retention holds the lock while it deletes). keep_days=0 keeps everything. The MLflow
artifact store (registered models, logged checkpoints) is never touched: retention only frees the
local working copies. Stage-cache entries (flows/resume.py) whose outputs are gone are removed too.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from flows.lock import RunLocked, date_lock


def _date(name: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(name)
    except ValueError:
        return None


def _protected(run_dir: Path, protect: list[Path]) -> bool:
    r = run_dir.resolve()
    return any(p == r or r in p.parents or p in r.parents for p in protect)


def apply_retention(home: str | Path, keep_days: int, protect: Iterable[str | Path] = ()) -> list[Path]:
    """Delete expired, unprotected run dirs; returns what was removed (module docstring)."""
    runs = Path(home) / "runs"
    if keep_days <= 0 or not runs.is_dir():
        return []
    dated = {d: _date(d.name) for d in runs.iterdir() if d.is_dir()}
    dated = {d: day for d, day in dated.items() if day is not None}
    if not dated:
        return []
    cutoff = max(dated.values()) - dt.timedelta(days=keep_days - 1)
    keep = [Path(p).resolve() for p in protect if p]
    removed = []
    for date_dir, day in sorted(dated.items()):
        if day >= cutoff:
            continue
        try:  # a run for that date (a backfill) holds its date's lock: its dirs are in use
            with date_lock(home, day.isoformat(), who="retention (deleting expired run dirs)"):
                for run_dir in sorted(p for p in date_dir.iterdir() if p.is_dir()):
                    if not _protected(run_dir, keep):
                        shutil.rmtree(run_dir)
                        removed.append(run_dir)
                if not any(date_dir.iterdir()):
                    date_dir.rmdir()
        except RunLocked:
            continue
    if removed:
        _drop_dangling_cache_entries(Path(home) / "cache" / "stages")
    return removed


def _drop_dangling_cache_entries(root: Path) -> None:
    for entry in root.glob("*.json") if root.is_dir() else []:
        try:
            outputs = json.loads(entry.read_text()).get("outputs", {})
        except (OSError, ValueError):
            continue
        if any(not Path(p).exists() for p in outputs.values()):
            entry.unlink(missing_ok=True)
