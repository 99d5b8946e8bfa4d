"""The validation rules: their names, the label-name patterns, and the row-level predicates.

Rule names (the `rule` of every `Violation`):

=================  ========  =====================================================================
rule               severity  what
=================  ========  =====================================================================
missing_path       error     dataset.yaml, users.parquet, items.parquet, events/ or a requested
                             dt= partition does not exist
spec               error     dataset.yaml does not parse (unknown keys, < 2 objectives, ...)
partition_name     error     an entry of events/ is not a `dt=YYYY-MM-DD` directory
stray_file         warning   an entry of a dt= directory that is not a `*.parquet` file (a CSV, a
                             README, a sub-directory): it is never read, so it is named, not ignored
corrupt_file       error     a Parquet file cannot be read (footer, schema or data pages)
missing_column     error     a required column (or a feature listed in dataset.yaml) is absent
wrong_type         error     a column has the wrong type (e.g. user_id as string, label as int)
naive_timestamp    error     events `ts` has no time zone
empty_partition    error     a dt= directory with no Parquet file or zero rows
null_key           row       user_id, item_id or ts is null (request_id may be null)
null_label         row       an objective column is null
cascade            row       objective t is true while objective t-1 is not
duplicate_event    row       a (request_id, user_id, item_id) row repeats within a partition
                             (rows with a null request_id are never duplicates)
partition_date     row       the UTC date of `ts` differs from the partition's dt value. Training and
                             evaluation days are chosen by partition, so such a row would be trained
                             on as its partition's day: an evaluation-day event in a training
                             partition leaks the evaluation labels into the model
duplicate_id       error     users.parquet / items.parquet repeats a user_id / item_id
non_finite         error     a numeric feature of users.parquet / items.parquet holds inf or -inf
                             (NaN is read as null, i.e. the feature's mean)
leakage            error     a users/items feature column is label-like (see LABEL_NAME_PATTERNS) or
                             carries an events column's name; a warning when the column is present
                             but not used as a feature (dataset.yaml lists features without it)
unknown_id         warning   events whose user or item has no feature row (handled as unknown)
unused_column      warning   a users/items column of a type that is not a feature (a list, struct,
                             date, binary...) while dataset.yaml lists no features for that table:
                             inference skips it, so it is named, not dropped in silence
no_positives       warning   a partition has no positive of an objective among its rows that break
                             no row rule: as an evaluation day it measures nothing for that objective
                             (the pipeline names it an evaluation partition), as a training day it
                             usually means a broken label join
=================  ========  =====================================================================

"row" rules are errors unless quarantined: when the share of event rows breaking the rule is at most
`max_violation_rate`, its rows go to the quarantine directory and the rule is reported as a warning.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import polars as pl

from data_contracts.schema import ITEM_ID, USER_ID

RULES = (
    "missing_path",
    "spec",
    "partition_name",
    "corrupt_file",
    "missing_column",
    "wrong_type",
    "naive_timestamp",
    "empty_partition",
    "stray_file",
    "null_key",
    "null_label",
    "cascade",
    "duplicate_event",
    "partition_date",
    "duplicate_id",
    "non_finite",
    "leakage",
    "unknown_id",
    "unused_column",
    "no_positives",
)
ROW_RULES = ("null_key", "null_label", "cascade", "duplicate_event", "partition_date")

# Feature names that look like outcomes of the event rather than attributes known before it.
# Matched with re.search on the lower-cased column name. Deliberately not included: "follow"
# (KuaiRand's follow_user_num is a profile count) and "duration" (video length is an item attribute).
LABEL_NAME_PATTERNS = (
    r"click",  # is_click, clicks, ctr proxies such as click_rate
    r"conver",  # converted, conversion, conversions
    r"(?<![a-z])like",  # is_like, likes, like_cnt (not "unlikely" style words)
    r"label",
    r"target",
    r"(^|_)is_",  # is_follow, is_comment, is_hate, is_positive: the usual label naming
    r"watch",  # watch_ratio, long_watch
    r"play_?time",  # play_time_ms
    r"long_?view",
    r"finish",  # finish (derived from watch_ratio)
    r"positive",
    r"(^|_)(ctr|cvr)(_|$)",
)
_LABEL_RES = tuple(re.compile(p) for p in LABEL_NAME_PATTERNS)


def label_like(column: str) -> str | None:
    """The first `LABEL_NAME_PATTERNS` entry matching `column` (lower-cased), or None."""
    lowered = column.lower()
    for pattern in _LABEL_RES:
        if pattern.search(lowered):
            return pattern.pattern
    return None


@dataclass(frozen=True)
class RowCheck:
    """One row-level predicate: `expr` is true on offending rows of a canonical event frame."""

    rule: str
    column: str
    what: str  # completes "<n> rows <what>"
    fix: str
    expr: pl.Expr

    @property
    def key(self) -> str:
        """Flag column name in the working frame and the quarantine `reason` token."""
        return f"{self.rule}:{self.column}"


def row_checks(objective_columns: tuple[str, ...], day: dt.date) -> list[RowCheck]:
    """The row-level rules for partition `day` of a dataset whose cascade is `objective_columns`."""
    checks = [
        RowCheck(
            "null_key",
            c,
            f"have a null {c}",
            f"drop or repair rows without {c} upstream",
            pl.col(c).is_null(),
        )
        for c in (USER_ID, ITEM_ID, "ts")
    ]
    checks += [
        RowCheck(
            "null_label", c, f"have a null {c}", f"write false instead of null in {c}", pl.col(c).is_null()
        )
        for c in objective_columns
    ]
    for prev, cur in zip(objective_columns, objective_columns[1:]):
        checks.append(
            RowCheck(
                "cascade",
                cur,
                f"have {cur}=true but {prev}=false",
                f"every {cur} event must also be {prev}; fix the label join upstream or set {prev}=true",
                (pl.col(cur) & ~pl.col(prev)).fill_null(False),
            )
        )
    keys = ["request_id", USER_ID, ITEM_ID]
    checks.append(
        RowCheck(
            "duplicate_event",
            ", ".join(keys),
            "repeat an earlier (request_id, user_id, item_id) of the partition",
            "deduplicate upstream (one row per request and candidate; merge the labels of the copies)",
            pl.col("request_id").is_not_null() & ~pl.struct(keys).is_first_distinct(),
        )
    )
    # Runs pick training and evaluation days by partition (csmf_core/prep.py), so a row filed under
    # the wrong day is trained or evaluated as that day: an evaluation-day event inside a training
    # partition would put evaluation labels into the model. Hence a row rule, not a warning.
    checks.append(
        RowCheck(
            "partition_date",
            "ts",
            f"have a UTC date of ts other than the partition's {day} (they would be used as {day})",
            "write each row into the partition of its UTC date, events/dt=<pl.col('ts').dt.date()>/",
            (pl.col("ts").dt.date() != pl.lit(day)).fill_null(False),
        )
    )
    return checks


def warning_checks() -> list[RowCheck]:
    """Row-level warnings (never quarantined): unknown ids need the id tables as `__known_*` flags."""
    return [
        RowCheck(
            "unknown_id",
            USER_ID,
            "have a user_id without a row in users.parquet (handled as unknown)",
            "add the users to users.parquet if they have features; otherwise nothing to do",
            pl.col(USER_ID).is_not_null() & ~pl.col("__known_user"),
        ),
        RowCheck(
            "unknown_id",
            ITEM_ID,
            "have an item_id without a row in items.parquet (handled as unknown)",
            "add the items to items.parquet if they have features; otherwise nothing to do",
            pl.col(ITEM_ID).is_not_null() & ~pl.col("__known_item"),
        ),
    ]
