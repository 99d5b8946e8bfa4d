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

from data_contracts.layout import (
    Partition,
    list_partitions,
    parse_dates,
    relative,
    scan_event_file,
    select_partitions,
)
from data_contracts.location import local_dataset, redact, reject_uri
from data_contracts.quarantine import flag_partition, source_file_column, write_quarantine
from data_contracts.report import N_EXAMPLES, ValidationReport, example_rows
from data_contracts.rules import ROW_RULES, RowCheck, row_checks, warning_checks
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
    check_event_columns,
    load_spec,
)
from data_contracts.tables import READ_ERRORS, check_leakage, check_table


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


_REEXPORT = "re-export the file; the other files were still checked"
_EMPTY_FIX = "remove the directory or re-export the day"
_STRAY_FIX = (
    "if it holds events, convert it to Parquet in the same directory (e.g. "
    "pl.read_csv(path).write_parquet(...)); otherwise move it out of events/ or prefix its name with _"
)
_NO_POSITIVES_FIX = (
    "check this day's label join upstream (the objective columns of dataset.yaml), "
    "or evaluate on another day (csmf run --date)"
)
_EVENTS_FIX = "write events as events/dt=YYYY-MM-DD/*.parquet (UTC date of ts)"


def _check_spec(root: Path, report: ValidationReport) -> DatasetSpec | None:
    if not (root / SPEC_FILE).is_file():
        fix = "write one with name, provenance and objectives (data_contracts.write_spec)"
        report.add("missing_path", SPEC_FILE, None, "dataset.yaml is missing", fix)
        return None
    try:
        return load_spec(root)
    except SpecError as exc:
        report.add("spec", SPEC_FILE, None, str(exc), "correct dataset.yaml (keys: see docs/architecture.md)")
        return None


def _aggregate(
    root: Path, good: dict[Path, pl.LazyFrame], checks: list[RowCheck], objective_columns, report
) -> tuple[pl.DataFrame | None, pl.LazyFrame | None]:
    """Per-file sums of every check flag (plus rows, positives, per-rule unions) in one pass.

    Files whose footer was fine but whose data pages are not surface here: they are reported as
    corrupt, dropped from `good`, and the pass is repeated without them.
    """
    while good:
        flagged = flag_partition(list(good.values()), checks)
        aggs = [pl.len().alias("__rows"), *(pl.col(c.key).sum() for c in checks)]
        aggs += [pl.col(c).sum().alias(f"__pos:{c}") for c in objective_columns]
        # positives that survive quarantine: a row breaking any row rule is never trained or evaluated on
        clean = ~pl.any_horizontal([pl.col(c.key) for c in checks if c.rule in ROW_RULES])
        aggs += [(pl.col(c) & clean).sum().alias(f"__clean_pos:{c}") for c in objective_columns]
        for rule in ROW_RULES:  # rows breaking the rule on any column (a row counts once)
            keys = [pl.col(c.key) for c in checks if c.rule == rule]
            aggs.append((pl.any_horizontal(keys) if keys else pl.lit(False)).sum().alias(f"__any:{rule}"))
        try:
            return flagged.group_by("source_file").agg(aggs).sort("source_file").collect(), flagged
        except READ_ERRORS:
            broken = []
            for path, lf in good.items():
                try:
                    lf.collect()
                except READ_ERRORS as exc:
                    report.add(
                        "corrupt_file", relative(root, path), None, f"data cannot be read ({exc})", _REEXPORT
                    )
                    broken.append(path)
            if not broken:  # not a file problem after all: let the real error surface
                raise
            for path in broken:
                del good[path]
    return None, None


def _check_partition(
    root: Path,
    part: Partition,
    spec: DatasetSpec | None,
    ids: dict[str, pl.Series | None],
    report: ValidationReport,
    event_columns: set[str],
    findings: list[_Finding],
    evaluation: bool = False,
) -> _PartitionResult:
    """File-level checks, then one aggregation over the partition's readable, well-typed files.

    evaluation: the partition is an evaluation day of the run (only changes the no_positives wording).
    """
    objective_columns = spec.objective_columns if spec else ()
    if part.others:
        shown = ", ".join(part.others[:N_EXAMPLES]) + (", ..." if len(part.others) > N_EXAMPLES else "")
        n = len(part.others)
        what = "1 entry is not a *.parquet file" if n == 1 else f"{n} entries are not *.parquet files"
        msg = f"{what} and never read: {shown}"
        report.add("stray_file", f"{EVENTS_DIR}/{part.name}", None, msg, _STRAY_FIX, severity="warning")
    if not part.files:
        report.add(
            "empty_partition", f"{EVENTS_DIR}/{part.name}", None, "partition has no Parquet files", _EMPTY_FIX
        )
        return _PartitionResult()
    # Unknown-id flags; with an unusable id table every id counts as known (that table is an error already).
    known = {
        f"__known_{name}": (pl.col(col).is_in(ids[name].implode()) if ids[name] is not None else pl.lit(True))
        for name, col in (("user", USER_ID), ("item", ITEM_ID))
    }
    good: dict[Path, pl.LazyFrame] = {}
    for path in part.files:
        rel = relative(root, path)
        try:
            schema = pl.scan_parquet(path).collect_schema()
        except READ_ERRORS as exc:
            report.add("corrupt_file", rel, None, f"cannot be read as Parquet ({exc})", _REEXPORT)
            continue
        event_columns.update(schema.names())
        problems = check_event_columns(schema, objective_columns)
        for p in problems:
            report.add(p.rule, rel, p.column, p.message, p.fix)
        if not problems and spec is not None:
            scan = scan_event_file(path, objective_columns)
            good[path] = scan.with_columns(source_file_column(root, path), **known)
    checks = row_checks(objective_columns, part.date) + warning_checks()
    agg, flagged = _aggregate(root, good, checks, objective_columns, report)
    result = _PartitionResult(good_files=list(good))
    if agg is None:
        return result
    result.rows = int(agg["__rows"].sum())
    if result.rows == 0:
        report.add(
            "empty_partition", f"{EVENTS_DIR}/{part.name}", None, "partition has zero event rows", _EMPTY_FIX
        )
        return result
    report.counts["rows_per_partition"][part.date.isoformat()] = result.rows
    positives = report.counts["positives"]
    for obj in spec.objectives:
        positives[obj.name] = positives.get(obj.name, 0) + int(agg[f"__pos:{obj.column}"].sum())
    result.rule_rows = {rule: int(agg[f"__any:{rule}"].sum()) for rule in ROW_RULES}
    _check_positives(part, spec, agg, report, evaluation)
    example_cols = [*KEY_COLUMNS, *objective_columns]
    for row in agg.iter_rows(named=True):
        for check in (c for c in checks if row[c.key]):
            sample = flagged.filter(pl.col("source_file") == row["source_file"], pl.col(check.key))
            examples = example_rows(sample.select(example_cols).head(N_EXAMPLES).collect())
            findings.append(_Finding(check, row["source_file"], int(row[check.key]), examples))
    return result


def _check_positives(
    part: Partition, spec: DatasetSpec, agg: pl.DataFrame, report: ValidationReport, evaluation: bool
) -> None:
    """`no_positives`: objectives without a positive among the partition's rows that break no row rule.

    Metrics average over users with a positive, so an evaluation day without any click silently
    measures nothing for the click objective (and a gate comparing on it compares nothing).
    """
    empty = [o for o in spec.objectives if int(agg[f"__clean_pos:{o.column}"].sum()) == 0]
    if not empty:
        return
    names = ", ".join(f"{o.name} ({o.column})" for o in empty)
    if evaluation:
        msg = (
            f"evaluation partition has no positives of {names} among the rows that break no row rule: "
            "Recall/nDCG of these objectives cannot be measured on this day"
        )
    else:
        msg = (
            f"partition has no positives of {names} among the rows that break no row rule: as an "
            "evaluation day it measures nothing for these objectives, as a training day it adds none"
        )
    column = ", ".join(o.column for o in empty)
    report.add(
        "no_positives", f"{EVENTS_DIR}/{part.name}", column, msg, _NO_POSITIVES_FIX, severity="warning"
    )


def validate_dataset(
    directory: str | os.PathLike,
    *,
    dates: Iterable[str | dt.date] | None = None,
    max_violation_rate: float = 0.0,
    quarantine_dir: str | os.PathLike | None = None,
    eval_dates: Iterable[str | dt.date] | None = None,
) -> ValidationReport:
    """Check `directory` against the canonical dataset contract and return every finding.

    dates: partitions to check (all when None); users/items/dataset.yaml are always checked.
    eval_dates: the evaluation days of the run, if any: a `no_positives` warning on one of them says
        that it is an evaluation partition (every checked partition gets the warning either way).
    max_violation_rate: a row-level rule (`rules.ROW_RULES`) whose offending rows are at most this
        share of the checked event rows is quarantined (a warning) instead of failing (an error).
    quarantine_dir: where quarantined rows go, as `<dir>/dt=YYYY-MM-DD.parquet`; required when
        `max_violation_rate > 0`. Files of checked partitions without quarantined rows are removed so
        that the directory always matches the latest run.
    """
    if not 0.0 <= max_violation_rate <= 1.0:
        raise ValueError(f"max_violation_rate must be in [0, 1], got {max_violation_rate}")
    reject_uri(quarantine_dir, "quarantine directory")
    if max_violation_rate > 0 and quarantine_dir is None:
        raise ValueError("max_violation_rate > 0 needs quarantine_dir (where the offending rows are kept)")
    try:
        root = local_dataset(directory)  # a path or a URI (file://, s3://, gs://: csmf_core.fsutil)
    except ValueError as exc:  # the URI's filesystem cannot be opened / listed: one error, not a traceback
        report = ValidationReport(dataset_dir=Path(redact(str(directory))), counts={"rows": 0})
        report.add(
            "missing_path", redact(str(directory)), None, str(exc), "check the URI and its credentials"
        )
        return report
    report = ValidationReport(dataset_dir=root, counts={"rows": 0, "rows_per_partition": {}, "positives": {}})
    if not root.is_dir():
        fix = "check the path (a canonical dataset is a directory with dataset.yaml)"
        if root.is_file():
            msg, fix = "is a file, not a dataset directory", f"give the folder that holds it: {root.parent}"
        else:
            msg = "dataset directory does not exist"
        report.add("missing_path", str(root), None, msg, fix)
        return report
    spec = _check_spec(root, report)
    features = spec.features if spec else None
    # a table whose lists are empty has its features inferred from the dtypes, as prep does
    # (csmf_core/prep.py `_feature_lists`): None for the checks below, like a table not listed at all
    user_features, item_features = (
        (t if t.columns else None for t in (features.users, features.items)) if features else (None, None)
    )
    users_ids, user_cols = check_table(root, USERS_FILE, USER_ID, user_features, report)
    items_ids, item_cols = check_table(root, ITEMS_FILE, ITEM_ID, item_features, report)
    report.counts["users"] = None if users_ids is None else users_ids.len()
    report.counts["items"] = None if items_ids is None else items_ids.len()

    partitions, stray = list_partitions(root)
    if not (root / EVENTS_DIR).is_dir():
        report.add("missing_path", EVENTS_DIR, None, "events/ directory is missing", _EVENTS_FIX)
    elif not partitions:
        report.add("missing_path", EVENTS_DIR, None, "events/ has no dt=YYYY-MM-DD partitions", _EVENTS_FIX)
    for entry in stray:
        msg = "is not a dt=YYYY-MM-DD partition directory"
        report.add(
            "partition_name", entry, None, msg, "move its files into events/dt=YYYY-MM-DD/ or remove it"
        )
    selected, missing = select_partitions(partitions, parse_dates(dates))
    for d in missing:
        fix = "export that day or drop it from the requested dates"
        report.add(
            "missing_path", f"{EVENTS_DIR}/dt={d.isoformat()}", None, "requested partition is missing", fix
        )
    report.partitions = [p.date.isoformat() for p in selected]

    event_columns: set[str] = set()
    findings: list[_Finding] = []
    ids = {"user": users_ids, "item": items_ids}
    results = {}
    evaluation = set(parse_dates(eval_dates) or ())
    for part in selected:
        results[part.name] = _check_partition(
            root, part, spec, ids, report, event_columns, findings, part.date in evaluation
        )
        report.counts["rows"] += results[part.name].rows
    check_leakage(report, USERS_FILE, user_cols, user_features, spec, event_columns)
    check_leakage(report, ITEMS_FILE, item_cols, item_features, spec, event_columns)
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
            where = f"rows quarantined to {qdir} (rule rate {rate:.3%} <= max_violation_rate {max_rate:.3%})"
            fix = f"{where}; {f.check.fix}"
            severity = "warning"
        else:
            fix, severity = f.check.fix, "error" if f.check.rule in ROW_RULES else "warning"
        msg = f"{f.rows} rows {f.check.what}"
        report.add(
            f.check.rule,
            f.file,
            f.check.column,
            msg,
            fix,
            rows=f.rows,
            examples=f.examples,
            severity=severity,
        )
    if qdir is None or spec is None:
        return
    keep = [*KEY_COLUMNS, *spec.objective_columns, "source_file"]
    for part in selected:
        target = qdir / f"{part.name}.parquet"
        result = results[part.name]
        all_checks = row_checks(spec.objective_columns, part.date)
        checks = [c for c in all_checks if c.rule in quarantined and result.rule_rows.get(c.rule)]
        if not checks:
            target.unlink(missing_ok=True)  # a stale file from an earlier run would mislead
            continue
        frames = [
            scan_event_file(p, spec.objective_columns).with_columns(source_file_column(root, p))
            for p in result.good_files
        ]
        write_quarantine(flag_partition(frames, all_checks), checks, keep, target)
        report.quarantine_files.append(target)
