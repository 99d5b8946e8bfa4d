"""Validate a canonical dataset directory against the contract (docs/architecture.md section 1).

    report = validate_dataset("data/kuairand", dates=["2022-05-06"])
    print(report)                 # markdown: counts, errors, warnings
    report.raise_if_errors()      # ContractError listing every error

The rules and their names are listed in `data_contracts.rules`. Everything is checked and reported
together (a broken file does not hide problems elsewhere). Event partitions are scanned lazily one
at a time, so memory is bounded by the largest partition plus the user and item id columns.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from data_contracts.layout import Partition, list_partitions, parse_dates, relative, select_partitions
from data_contracts.layout import scan_event_file
from data_contracts.quarantine import flag_partition, source_file_column, write_quarantine
from data_contracts.report import ValidationReport, Violation
from data_contracts.rules import ROW_RULES, RowCheck, label_like, row_checks, warning_checks
from data_contracts.schema import (
    EVENTS_DIR,
    ITEM_ID,
    ITEMS_FILE,
    KEY_COLUMNS,
    SPEC_FILE,
    USER_ID,
    USERS_FILE,
    DatasetSpec,
    SpecError,
    TableFeatures,
    check_event_columns,
    check_id_column,
    load_spec,
)

_READ_ERRORS = (pl.exceptions.PolarsError, OSError)
_N_EXAMPLES = 5


@dataclass
class _Finding:
    """Row-level counts of one check in one file, turned into a `Violation` once quarantine is decided."""

    check: RowCheck
    file: str
    rows: int
    examples: list[dict[str, Any]]


@dataclass
class _PartitionResult:
    """What `_decide_quarantine` needs from one partition."""

    rows: int = 0
    good_files: list[Path] = field(default_factory=list)  # files that passed the file-level checks
    rule_rows: dict[str, int] = field(default_factory=dict)  # rows breaking each row rule


def _error(report: ValidationReport, rule: str, file: str, column: str | None, message: str, fix: str,
           rows: int = 0, examples: list[dict] | None = None, severity: str = "error") -> None:  # fmt: skip
    report.violations.append(Violation(rule, file, column, rows, examples or [], severity, fix, message))


def _examples(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts, timestamps as ISO strings so that messages stay readable."""
    out = []
    for row in frame.head(_N_EXAMPLES).to_dicts():
        out.append({k: (v.isoformat() if isinstance(v, dt.datetime | dt.date) else v) for k, v in row.items()})
    return out


def _check_spec(root: Path, report: ValidationReport) -> DatasetSpec | None:
    if not (root / SPEC_FILE).is_file():
        _error(report, "missing_path", SPEC_FILE, None, "dataset.yaml is missing",
               "write one with name, provenance and objectives (data_contracts.write_spec)")  # fmt: skip
        return None
    try:
        return load_spec(root)
    except SpecError as exc:
        _error(report, "spec", SPEC_FILE, None, str(exc), "correct dataset.yaml (keys: see docs/architecture.md)")
        return None


def _check_table(
    root: Path, filename: str, id_column: str, features: TableFeatures | None, report: ValidationReport
) -> tuple[pl.Series | None, list[str]]:
    """Check users.parquet or items.parquet; return (its unique ids or None, its feature columns)."""
    path = root / filename
    if not path.is_file():
        _error(report, "missing_path", filename, None, f"{filename} is missing",
               f"write {filename} with an int64 {id_column} column (and feature columns, if any)")  # fmt: skip
        return None, []
    try:
        schema = pl.scan_parquet(path).collect_schema()
    except _READ_ERRORS as exc:
        _error(report, "corrupt_file", filename, None, f"cannot be read as Parquet ({exc})", "rewrite the file")
        return None, []
    columns = [c for c in schema.names() if c != id_column]
    for col in features.columns if features else ():
        if col not in schema:
            _error(report, "missing_column", filename, col, f"feature column {col} (listed in dataset.yaml) is missing",
                   f"add {col} to {filename} or remove it from dataset.yaml features")  # fmt: skip
    for col in features.numeric if features else ():
        if col in schema and not (schema[col].is_numeric() or schema[col] == pl.Boolean):
            _error(report, "wrong_type", filename, col, f"numeric feature {col} has type {schema[col]}",
                   f"cast {col} to a number or list it under categorical in dataset.yaml")  # fmt: skip
    problem = check_id_column(schema, id_column)
    if problem is not None:
        _error(report, problem.rule, filename, id_column, problem.message, problem.fix)
        return None, columns
    try:
        ids = pl.scan_parquet(path).select(id_column).collect().get_column(id_column)
    except _READ_ERRORS as exc:
        _error(report, "corrupt_file", filename, id_column, f"cannot be read ({exc})", "rewrite the file")
        return None, columns
    nulls = ids.null_count()
    if nulls:
        _error(report, "null_key", filename, id_column, f"{nulls} rows have a null {id_column}",
               f"drop those rows or give them an {id_column}", rows=nulls)  # fmt: skip
    dups = ids.drop_nulls().value_counts().filter(pl.col("count") > 1)
    if dups.height:
        n_rows = int(dups["count"].sum() - dups.height)
        _error(report, "duplicate_id", filename, id_column,
               f"{n_rows} rows repeat an {id_column} ({dups.height} distinct ids have several rows)",
               f"keep one feature row per {id_column}", rows=n_rows,
               examples=_examples(dups.sort("count", descending=True)))  # fmt: skip
    return ids.drop_nulls().unique(), columns


def _check_leakage(
    report: ValidationReport,
    filename: str,
    columns: list[str],
    features: TableFeatures | None,
    spec: DatasetSpec | None,
    event_columns: set[str],
) -> None:
    """Label-like or events-derived feature columns; used features are errors, unused ones warnings."""
    derived = (event_columns - set(KEY_COLUMNS)) | set(spec.objective_columns if spec else ())
    derived |= set(spec.objective_names if spec else ())
    for col in columns:
        pattern = label_like(col)
        if col in derived:
            why = "has the name of an events column / objective"
        elif pattern is not None:
            why = f"looks like a label (matches {pattern!r} in data_contracts.rules.LABEL_NAME_PATTERNS)"
        else:
            continue
        used = features is None or col in features.columns
        status = "is used as a feature" if used else "is present but not listed as a feature"
        _error(report, "leakage", filename, col, f"column {col} {why} and {status}",
               "drop it; if it is a genuine attribute known before the event, rename it "
               "(e.g. is_author -> author_flag)", severity="error" if used else "warning")  # fmt: skip


def _check_partition(
    root: Path,
    part: Partition,
    spec: DatasetSpec | None,
    ids: dict[str, pl.Series | None],
    report: ValidationReport,
    event_columns: set[str],
    findings: list[_Finding],
) -> _PartitionResult:
    """File-level checks, then one aggregation over the partition's readable, well-typed files."""
    objective_columns = spec.objective_columns if spec else ()
    if not part.files:
        _error(report, "empty_partition", f"{EVENTS_DIR}/{part.name}", None, "partition has no Parquet files",
               "remove the directory or re-export the day")  # fmt: skip
        return _PartitionResult()
    good: dict[Path, pl.LazyFrame] = {}
    for path in part.files:
        rel = relative(root, path)
        try:
            schema = pl.scan_parquet(path).collect_schema()
        except _READ_ERRORS as exc:
            _error(report, "corrupt_file", rel, None, f"cannot be read as Parquet ({exc})",
                   "re-export the file; the other files were still checked")  # fmt: skip
            continue
        event_columns.update(schema.names())
        problems = check_event_columns(schema, objective_columns)
        for p in problems:
            _error(report, p.rule, rel, p.column, p.message, p.fix)
        if not problems and spec is not None:
            good[path] = scan_event_file(path, objective_columns).with_columns(source_file_column(root, path))
    if not good:
        return _PartitionResult()
    known = {
        f"__known_{name}": (pl.col(col).is_in(ids[name].implode()) if ids[name] is not None else pl.lit(True))
        for name, col in (("user", USER_ID), ("item", ITEM_ID))
    }
    checks = row_checks(objective_columns) + warning_checks(part.date)
    agg = None
    while good and agg is None:
        flagged = flag_partition([lf.with_columns(**known) for lf in good.values()], checks)
        aggs = [pl.len().alias("__rows"), *(pl.col(c.key).sum() for c in checks)]
        aggs += [pl.col(c).sum().alias(f"__pos:{c}") for c in objective_columns]
        for rule in ROW_RULES:  # rows breaking the rule on any column (a row counts once)
            keys = [pl.col(c.key) for c in checks if c.rule == rule]
            aggs.append((pl.any_horizontal(keys) if keys else pl.lit(False)).sum().alias(f"__any:{rule}"))
        try:
            agg = flagged.group_by("source_file").agg(aggs).collect()
        except _READ_ERRORS:
            # Metadata was fine but data pages are not: find the broken files, drop them, retry.
            for path, lf in list(good.items()):
                try:
                    lf.collect()
                except _READ_ERRORS as exc:
                    _error(report, "corrupt_file", relative(root, path), None, f"data cannot be read ({exc})",
                           "re-export the file; the other files were still checked")  # fmt: skip
                    del good[path]
    result = _PartitionResult(good_files=list(good))
    if agg is None:
        return result
    result.rows = int(agg["__rows"].sum())
    if result.rows == 0:
        _error(report, "empty_partition", f"{EVENTS_DIR}/{part.name}", None, "partition has zero event rows",
               "remove the directory or re-export the day")  # fmt: skip
        return result
    report.counts["rows_per_partition"][part.date.isoformat()] = result.rows
    positives = report.counts["positives"]
    for obj in spec.objectives:
        positives[obj.name] = positives.get(obj.name, 0) + int(agg[f"__pos:{obj.column}"].sum())
    result.rule_rows = {rule: int(agg[f"__any:{rule}"].sum()) for rule in ROW_RULES}
    example_cols = [*KEY_COLUMNS, *objective_columns]
    for row in agg.sort("source_file").iter_rows(named=True):
        for check in checks:
            if row[check.key]:
                sample = flagged.filter(pl.col("source_file") == row["source_file"], pl.col(check.key))
                sample = sample.select(example_cols).head(_N_EXAMPLES).collect()
                findings.append(_Finding(check, row["source_file"], int(row[check.key]), _examples(sample)))
    return result


def validate_dataset(
    directory: str | os.PathLike,
    *,
    dates: Iterable[str | dt.date] | None = None,
    max_violation_rate: float = 0.0,
    quarantine_dir: str | os.PathLike | None = None,
) -> ValidationReport:
    """Check `directory` against the canonical dataset contract and return every finding.

    dates: partitions to check (all when None); users/items/dataset.yaml are always checked.
    max_violation_rate: a row-level rule (`rules.ROW_RULES`) whose offending rows are at most this
        share of the checked event rows is quarantined (a warning) instead of failing (an error).
    quarantine_dir: where quarantined rows go, as `<dir>/dt=YYYY-MM-DD.parquet`; required when
        `max_violation_rate > 0`. Files of checked partitions without quarantined rows are removed so
        that the directory always matches the latest run.
    """
    if not 0.0 <= max_violation_rate <= 1.0:
        raise ValueError(f"max_violation_rate must be in [0, 1], got {max_violation_rate}")
    if max_violation_rate > 0 and quarantine_dir is None:
        raise ValueError("max_violation_rate > 0 needs quarantine_dir (where the offending rows are kept)")
    root = Path(directory)
    report = ValidationReport(dataset_dir=root, counts={"rows": 0, "rows_per_partition": {}, "positives": {}})
    if not root.is_dir():
        _error(report, "missing_path", str(root), None, "dataset directory does not exist",
               "check the path (a canonical dataset is a directory with dataset.yaml)")  # fmt: skip
        return report
    spec = _check_spec(root, report)
    features = spec.features if spec else None
    users_ids, user_cols = _check_table(root, USERS_FILE, USER_ID, features.users if features else None, report)
    items_ids, item_cols = _check_table(root, ITEMS_FILE, ITEM_ID, features.items if features else None, report)
    report.counts["users"] = None if users_ids is None else users_ids.len()
    report.counts["items"] = None if items_ids is None else items_ids.len()

    partitions, stray = list_partitions(root)
    if not (root / EVENTS_DIR).is_dir():
        _error(report, "missing_path", EVENTS_DIR, None, "events/ directory is missing",
               "write events as events/dt=YYYY-MM-DD/*.parquet")  # fmt: skip
    elif not partitions:
        _error(report, "missing_path", EVENTS_DIR, None, "events/ has no dt=YYYY-MM-DD partitions",
               "write events as events/dt=YYYY-MM-DD/*.parquet")  # fmt: skip
    for entry in stray:
        _error(report, "partition_name", entry, None, "is not a dt=YYYY-MM-DD partition directory",
               "move its files into events/dt=YYYY-MM-DD/ (UTC date of ts) or remove it")  # fmt: skip
    selected, missing = select_partitions(partitions, parse_dates(dates))
    for d in missing:
        _error(report, "missing_path", f"{EVENTS_DIR}/dt={d.isoformat()}", None, "requested partition is missing",
               "export that day or drop it from the requested dates")  # fmt: skip
    report.partitions = [p.date.isoformat() for p in selected]

    event_columns: set[str] = set()
    findings: list[_Finding] = []
    ids = {"user": users_ids, "item": items_ids}
    results = {}
    for part in selected:
        results[part.name] = _check_partition(root, part, spec, ids, report, event_columns, findings)
        report.counts["rows"] += results[part.name].rows
    _check_leakage(report, USERS_FILE, user_cols, features.users if features else None, spec, event_columns)
    _check_leakage(report, ITEMS_FILE, item_cols, features.items if features else None, spec, event_columns)
    _decide_quarantine(root, report, spec, selected, results, findings, max_violation_rate, quarantine_dir)
    return report


def _decide_quarantine(
    root: Path,
    report: ValidationReport,
    spec: DatasetSpec | None,
    selected: list[Partition],
    results: dict[str, _PartitionResult],
    findings: list[_Finding],
    max_rate: float,
    quarantine_dir: str | os.PathLike | None,
) -> None:
    """Turn row findings into violations, quarantining the rules within `max_rate`."""
    total = report.counts["rows"]
    quarantined = {}
    for rule in ROW_RULES:
        n = sum(r.rule_rows.get(rule, 0) for r in results.values())
        if n and total and n / total <= max_rate:
            quarantined[rule] = n
    report.quarantined = quarantined
    qdir = Path(quarantine_dir) if quarantine_dir is not None else None
    for f in findings:
        if f.check.rule in quarantined:
            rate = quarantined[f.check.rule] / total
            fix = f"rows quarantined to {qdir} (rule rate {rate:.4%} <= {max_rate:.4%}); {f.check.fix}"
            severity = "warning"
        else:
            fix, severity = f.check.fix, "error" if f.check.rule in ROW_RULES else "warning"
        _error(report, f.check.rule, f.file, f.check.column, f"{f.rows} rows {f.check.what}", fix,
               rows=f.rows, examples=f.examples, severity=severity)  # fmt: skip
    if qdir is None or spec is None:
        return
    keep = [*KEY_COLUMNS, *spec.objective_columns, "source_file"]
    for part in selected:
        target = qdir / f"{part.name}.parquet"
        result = results[part.name]
        checks = [c for c in row_checks(spec.objective_columns) if result.rule_rows.get(c.rule) and c.rule in quarantined]
        if not checks:
            target.unlink(missing_ok=True)  # a stale file from an earlier run would mislead
            continue
        frames = [
            scan_event_file(p, spec.objective_columns).with_columns(source_file_column(root, p))
            for p in result.good_files
        ]
        write_quarantine(flag_partition(frames, row_checks(spec.objective_columns)), checks, keep, target)
        report.quarantine_files.append(target)
