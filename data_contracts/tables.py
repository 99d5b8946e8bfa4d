"""Checks of the feature tables `users.parquet` and `items.parquet` (ids, listed features, leakage)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from data_contracts.report import N_EXAMPLES, ValidationReport, example_rows
from data_contracts.rules import label_like
from data_contracts.schema import (
    KEY_COLUMNS,
    DatasetSpec,
    TableFeatures,
    categorical_feature_ok,
    check_id_column,
    infer_features,
    inferred_feature_kind,
)

READ_ERRORS = (pl.exceptions.PolarsError, OSError)


def check_table(
    root: Path, filename: str, id_column: str, features: TableFeatures | None, report: ValidationReport
) -> tuple[pl.Series | None, list[str]]:
    """Check users.parquet or items.parquet. `features`: dataset.yaml's lists for the table, None when
    it lists none (features inferred from the dtypes; the caller maps empty lists to None, as prep does).

    Returns its unique non-null ids (None when they cannot be trusted, which turns the unknown-id
    check off) and its non-id columns (for the leakage check, which needs the events columns first).
    Only the id column is loaded; float feature columns are scanned for inf.
    """
    path = root / filename
    if not path.is_file():
        fix = f"write {filename} with an int64 {id_column} column (and feature columns, if any)"
        report.add("missing_path", filename, None, f"{filename} is missing", fix)
        return None, []
    try:
        schema = pl.scan_parquet(path).collect_schema()
    except READ_ERRORS as exc:
        report.add("corrupt_file", filename, None, f"cannot be read as Parquet ({exc})", "rewrite the file")
        return None, []
    columns = [c for c in schema.names() if c != id_column]
    for col in features.columns if features else ():
        if col not in schema:
            msg = f"feature column {col} (listed in dataset.yaml) is missing"
            report.add(
                "missing_column", filename, col, msg, f"add {col} to {filename} or remove it from features"
            )
    for col in features.numeric if features else ():
        if col in schema and not (schema[col].is_numeric() or schema[col] == pl.Boolean):
            fix = f"cast {col} to a number or list it under categorical in dataset.yaml"
            report.add("wrong_type", filename, col, f"numeric feature {col} has type {schema[col]}", fix)
    for col in features.categorical if features else ():
        if col in schema and not categorical_feature_ok(schema[col]):
            msg = (
                f"categorical feature {col} has type {schema[col]}: a categorical feature is a string, "
                "boolean, integer, float or categorical column (one code per distinct value)"
            )
            fix = (
                f"flatten it into scalar columns (e.g. pl.col('{col}').list.first()) or remove it from features"
                if schema[col].is_nested()
                else f"cast {col} to a string (pl.col('{col}').cast(pl.String)), or remove it from features"
            )
            report.add("wrong_type", filename, col, msg, fix)
    if features is None:  # inferred from the dtypes (csmf_core/prep.py)
        for col in columns:
            if inferred_feature_kind(schema[col]) is None:
                msg = (
                    f"column {col} has type {schema[col]}, which is not a feature type: the model does "
                    "not use it (features are inferred from string, boolean, integer and float columns)"
                )
                fix = (
                    f"to use it, derive a string or number column from it (e.g. a list's length or a "
                    f"date's day of week); to silence this, drop {col} or list the features in dataset.yaml"
                )
                report.add("unused_column", filename, col, msg, fix, severity="warning")
    _check_finite(path, filename, id_column, schema, features, report)
    problem = check_id_column(schema, id_column)
    if problem is not None:
        report.add(problem.rule, filename, id_column, problem.message, problem.fix)
        return None, columns
    try:
        ids = pl.scan_parquet(path).select(id_column).collect().get_column(id_column)
    except READ_ERRORS as exc:
        report.add("corrupt_file", filename, id_column, f"cannot be read ({exc})", "rewrite the file")
        return None, columns
    nulls = ids.null_count()
    if nulls:
        msg, fix = f"{nulls} rows have a null {id_column}", f"drop those rows or give them an {id_column}"
        report.add("null_key", filename, id_column, msg, fix, rows=nulls)
    dups = ids.drop_nulls().value_counts().filter(pl.col("count") > 1)
    if dups.height:
        n_rows = int(dups["count"].sum() - dups.height)  # rows beyond the first of each id
        msg = f"{n_rows} rows repeat an {id_column} ({dups.height} distinct ids have several rows)"
        examples = example_rows(dups.sort("count", descending=True))
        fix = f"keep one feature row per {id_column}"
        report.add("duplicate_id", filename, id_column, msg, fix, rows=n_rows, examples=examples)
    _record_features(path, filename, id_column, features, report)
    return ids.drop_nulls().unique(), columns


def _record_features(
    path: Path, filename: str, id_column: str, features: TableFeatures | None, report: ValidationReport
) -> None:
    """The feature columns the model will read from this table, into report.counts["features"]: the
    lists of dataset.yaml, or the ones prep infers from the dtypes (`infer_features`, on the table as
    prep reads it: rows with an id, the first row of each id)."""
    if features is not None:
        found = {"categorical": list(features.categorical), "numeric": list(features.numeric)}
        source = "dataset.yaml"
    else:
        rows = pl.scan_parquet(path).filter(pl.col(id_column).is_not_null())
        try:  # only the id and the integer columns are read (their distinct counts decide their kind)
            found = infer_features(rows.unique(subset=id_column, keep="first"), id_column)
        except READ_ERRORS as exc:
            report.add("corrupt_file", filename, None, f"cannot be read ({exc})", "rewrite the file")
            return
        source = "inferred from dtypes"
    report.counts.setdefault("features", {})[filename] = {**found, "source": source}


def _check_finite(
    path: Path, filename: str, id_column: str, schema: pl.Schema, features: TableFeatures | None, report
) -> None:
    """`non_finite`: inf / -inf in the float columns used as numeric features.

    Prep standardises numeric features with the table's mean and std: one inf makes them inf/NaN for
    every row, and training then fails with a non-finite loss that points at the learning rate.
    NaN is not flagged: prep reads it as null (the feature's mean). Float columns listed as
    categorical are codes of distinct values, where inf is just one more value.
    """
    if features is None:  # inferred: every float column is a numeric feature (csmf_core/prep.py)
        columns = [c for c, t in schema.items() if c != id_column and t.is_float()]
    else:
        columns = [c for c in features.numeric if c in schema and schema[c].is_float()]
    if not columns:
        return
    try:
        counts = (
            pl.scan_parquet(path)
            .select(pl.col(c).is_infinite().sum().alias(c) for c in columns)
            .collect()
            .row(0, named=True)
        )
    except READ_ERRORS as exc:
        report.add("corrupt_file", filename, None, f"cannot be read ({exc})", "rewrite the file")
        return
    keys = [id_column] if id_column in schema else []
    for col, n in counts.items():
        if not n:
            continue
        bad = pl.scan_parquet(path).filter(pl.col(col).is_infinite()).select(*keys, col)
        examples = example_rows(bad.head(N_EXAMPLES).collect())
        fix = (
            f"replace them upstream with a finite value or null (null = the column mean), e.g. "
            f"pl.when(pl.col('{col}').is_infinite()).then(None).otherwise(pl.col('{col}'))"
        )
        msg = f"{n} rows have an infinite {col} (numeric feature)"
        report.add("non_finite", filename, col, msg, fix, rows=int(n), examples=examples)


def check_leakage(
    report: ValidationReport,
    filename: str,
    columns: list[str],
    features: TableFeatures | None,
    spec: DatasetSpec | None,
    event_columns: set[str],
) -> None:
    """Flag label-like or events-derived columns of a feature table.

    A column used as a feature (listed in dataset.yaml, or any column when features are inferred) is
    an error; one present but unused is a warning, since dtype inference would pick it up later.
    """
    derived = event_columns - set(KEY_COLUMNS)
    if spec is not None:
        derived |= set(spec.objective_columns) | set(spec.objective_names)
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
        fix = (
            "drop it; if it is a genuine attribute known before the event, rename it "
            "(e.g. is_author -> author_flag)"
        )
        report.add(
            "leakage",
            filename,
            col,
            f"column {col} {why} and {status}",
            fix,
            severity="error" if used else "warning",
        )
