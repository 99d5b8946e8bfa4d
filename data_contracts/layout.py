"""Where the parts of a canonical dataset live, and how event partitions are found and scanned.

Partitions are `events/dt=YYYY-MM-DD/` directories; their `*.parquet` files are read in name order
(hidden `.x` and `_x` entries, such as `_SUCCESS`, are skipped everywhere). Scans are lazy and per
file so that memory stays bounded by one partition.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from data_contracts.location import local_dataset
from data_contracts.schema import EVENTS_DIR, canonical_event_columns

_DT_DIR = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


@dataclass(frozen=True)
class Partition:
    """One `events/dt=YYYY-MM-DD/` directory and its Parquet files (sorted by name).

    `others` names the entries that are read by nobody (not hidden, not a `*.parquet` file: a CSV, a
    README, a sub-directory), so that validation can say so instead of ignoring them silently.
    """

    date: dt.date
    path: Path
    files: tuple[Path, ...]
    others: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"dt={self.date.isoformat()}"


def _hidden(path: Path) -> bool:
    return path.name.startswith((".", "_"))


def list_partitions(root: str | os.PathLike) -> tuple[list[Partition], list[str]]:
    """All partitions under `root/events` (sorted by date) and the entries that are not partitions.

    The second list holds paths relative to `root` of stray entries (a `foo/` directory, a Parquet file
    directly under `events/`, a `dt=2026-13-40` name); an absent `events/` gives two empty lists.
    """
    events = local_dataset(root) / EVENTS_DIR  # a path or a URI (csmf_core.fsutil)
    partitions, stray = [], []
    if not events.is_dir():
        return [], []
    for entry in sorted(events.iterdir()):
        if _hidden(entry):
            continue
        match = _DT_DIR.match(entry.name) if entry.is_dir() else None
        try:
            date = dt.date.fromisoformat(match.group(1)) if match else None
        except ValueError:
            date = None
        if date is None:
            stray.append(f"{EVENTS_DIR}/{entry.name}")
            continue
        files = tuple(sorted(p for p in entry.glob("*.parquet") if p.is_file() and not _hidden(p)))
        others = tuple(sorted(p.name for p in entry.iterdir() if not _hidden(p) and p not in files))
        partitions.append(Partition(date=date, path=entry, files=files, others=others))
    return partitions, stray


def partition_files(root: str | os.PathLike) -> dict[str, list[Path]]:
    """ISO date -> the Parquet files of every partition that has one: what a reader of events scans.

    The partitions and files of `list_partitions`, so readers see exactly what validation checked
    (`dt=20260101`, `dt=..`, `dt=2026-13-40` and hidden files are never read); partitions without a
    Parquet file are left out, since there is nothing in them to read."""
    partitions, _ = list_partitions(root)
    return {p.date.isoformat(): list(p.files) for p in partitions if p.files}


def parse_dates(dates: Iterable[str | dt.date] | None) -> list[dt.date] | None:
    """Normalise `dates` ("2022-04-25" strings or `date`s) to sorted unique dates; None stays None."""
    if dates is None:
        return None
    if isinstance(dates, str | dt.date):
        dates = [dates]
    out = set()
    for d in dates:
        if isinstance(d, dt.datetime):
            out.add(d.date())
        elif isinstance(d, dt.date):
            out.add(d)
        else:
            try:
                out.add(dt.date.fromisoformat(str(d)))
            except ValueError as exc:
                raise ValueError(f"date {d!r} is not YYYY-MM-DD") from exc
    return sorted(out)


def select_partitions(
    partitions: list[Partition], dates: list[dt.date] | None
) -> tuple[list[Partition], list[dt.date]]:
    """The partitions for `dates` (all when None) and the requested dates that have no partition."""
    if dates is None:
        return list(partitions), []
    by_date = {p.date: p for p in partitions}
    return [by_date[d] for d in dates if d in by_date], [d for d in dates if d not in by_date]


def relative(root: Path, path: Path) -> str:
    """`path` relative to the dataset root, with forward slashes (how violations name files)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def scan_event_file(path: Path, objective_columns: tuple[str, ...]) -> pl.LazyFrame:
    """Lazy scan of one events file reduced to the canonical columns and types.

    Only for files whose schema passed `check_event_columns`.
    """
    return pl.scan_parquet(path).select(canonical_event_columns(objective_columns))


def scan_partition(files: Iterable[str | os.PathLike]) -> pl.LazyFrame:
    """One lazy frame over a partition's event files, each scanned on its own and stacked with common
    supertypes (`diagonal_relaxed`): files that each passed the contract may still differ in types the
    contract admits (an int32 and an int64 id column, ms and us timestamps, an all-null request_id), which
    one `pl.scan_parquet(files)` refuses (it takes the first file's schema as the target). Rows keep the
    files' order; read the columns through casts (`canonical_event_columns`, prep's own)."""
    frames = [pl.scan_parquet(f) for f in files]
    if not frames:
        raise ValueError("scan_partition: no files")
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
