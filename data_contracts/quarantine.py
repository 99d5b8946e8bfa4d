"""Quarantine: set aside the rows that break row-level rules, and read the rows that remain.

Source files are never modified. `validate_dataset(..., max_violation_rate=r, quarantine_dir=Q)`
copies the offending rows of every quarantined rule to `Q/dt=YYYY-MM-DD.parquet` (canonical columns
plus `source_file` and `reason`, e.g. "cascade:converted;partition_date:ts"). Because the row rules are
pure functions of the partition (its rows and its dt= date), `clean_events_lazy` re-applies them
instead of reading those files: the quarantined rows and the clean rows partition the source rows
exactly.

Example::

    report = validate_dataset(d, max_violation_rate=0.001, quarantine_dir=d / "_quarantine")
    report.raise_if_errors()
    events = clean_events_lazy(d, dates=report.partitions).collect()
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from data_contracts.layout import list_partitions, parse_dates, relative, scan_event_file, select_partitions
from data_contracts.rules import ROW_RULES, RowCheck, row_checks
from data_contracts.schema import KEY_COLUMNS, DatasetSpec, load_spec


def flag_partition(frames: list[pl.LazyFrame], checks: list[RowCheck]) -> pl.LazyFrame:
    """Concatenate one partition's file scans (in file order) and add one bool column per check.

    The checks see the whole partition at once because `duplicate_event` spans files.
    """
    lf = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    return lf.with_columns([c.expr.alias(c.key) for c in checks])


def reason_expr(checks: list[RowCheck]) -> pl.Expr:
    """`reason` string of a flagged row: the keys of its true flags joined by ";"."""
    return pl.concat_str(
        [pl.when(pl.col(c.key)).then(pl.lit(c.key)) for c in checks], separator=";", ignore_nulls=True
    ).alias("reason")


def write_quarantine(flagged: pl.LazyFrame, checks: list[RowCheck], keep: list[str], path: Path) -> int:
    """Write the rows of `flagged` hit by any of `checks` to `path` (atomically); returns the row count.

    `keep` are the columns copied from the source (canonical columns and `source_file`).
    """
    hit = pl.any_horizontal([pl.col(c.key) for c in checks])
    rows = flagged.filter(hit).select(*keep, reason_expr(checks)).collect()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        rows.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return rows.height


def clean_events_lazy(
    directory: str | os.PathLike,
    dates: Iterable[str | dt.date] | None = None,
    *,
    drop: Iterable[str] = ROW_RULES,
    spec: DatasetSpec | None = None,
) -> pl.LazyFrame:
    """Lazy frame of the canonical event columns of `dates` (all partitions when None), rows breaking
    any rule in `drop` removed, partitions in date order, files in name order.

    `drop` defaults to every row-level rule (`ROW_RULES`): exactly the rows `validate_dataset` would
    quarantine are left out. Validate first: file-level problems (a corrupt file, a missing column)
    are not handled here and surface as polars errors on collect.
    """
    root = Path(directory)
    spec = spec if spec is not None else load_spec(root)
    drop = set(drop)
    unknown = drop - set(ROW_RULES)
    if unknown:
        raise ValueError(f"drop: {sorted(unknown)} are not row-level rules; choose from {list(ROW_RULES)}")
    partitions, _ = list_partitions(root)
    selected, missing = select_partitions(partitions, parse_dates(dates))
    if missing:
        raise FileNotFoundError(
            f"{root}: no partition for {[d.isoformat() for d in missing]}; "
            f"available: {[p.date.isoformat() for p in partitions]}"
        )
    columns = [*KEY_COLUMNS, *spec.objective_columns]
    out = []
    for part in selected:
        if not part.files:
            continue
        checks = [c for c in row_checks(spec.objective_columns, part.date) if c.rule in drop]
        frames = [scan_event_file(f, spec.objective_columns) for f in part.files]
        lf = flag_partition(frames, checks)
        if checks:
            lf = lf.filter(~pl.any_horizontal([pl.col(c.key) for c in checks]))
        out.append(lf.select(columns))
    if not out:
        raise FileNotFoundError(f"{root}: no event files in {[p.name for p in selected] or 'events/'}")
    return pl.concat(out, how="vertical")


def source_file_column(root: Path, path: Path) -> pl.Expr:
    """The `source_file` column added to each file scan (path relative to the dataset root)."""
    return pl.lit(relative(root, path)).alias("source_file")
