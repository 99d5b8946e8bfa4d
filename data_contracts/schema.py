"""The canonical dataset contract (docs/architecture.md section 1): `dataset.yaml` and column types.

A canonical dataset directory holds::

    dataset.yaml
    users.parquet                      user_id:int64 + feature columns
    items.parquet                      item_id:int64 + feature columns
    events/dt=YYYY-MM-DD/*.parquet     one row per (request, user, item) candidate

`DatasetSpec` is the parsed `dataset.yaml` (frozen; unknown keys and bad values are reported together
in one `SpecError`). `check_event_columns` says which event columns are missing or mistyped, with the
fix; `canonical_event_columns` gives the expressions that bring any accepted variant (a `ts` in ms,
a categorical `request_id`) to the exact canonical types, so downstream code sees one schema.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from data_contracts.location import local_dataset

SPEC_FILE = "dataset.yaml"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
EVENTS_DIR = "events"
USER_ID = "user_id"
ITEM_ID = "item_id"
KEY_COLUMNS = ("request_id", USER_ID, ITEM_ID, "ts")
# A feature column f of a users / items table becomes the model-ready column c_f (categorical) or n_f
# (numeric); the row id of each table is c_uid / c_iid, so a categorical feature named like this would
# overwrite it (and inference never picks such a column).
RESERVED_FEATURES = {USER_ID: "uid", ITEM_ID: "iid"}
# Time zone spellings that all mean UTC (polars normalises "+00:00" to "UTC" on read).
UTC_NAMES = frozenset({"UTC", "Etc/UTC", "+00:00", "Z", "GMT", "Etc/GMT"})

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A dataset's name becomes a directory (reports/<name>/): one path component, no '..', no separator.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


class SpecError(ValueError):
    """`dataset.yaml` is invalid; the message lists every problem, one per line."""


@dataclass(frozen=True)
class Objective:
    """One cascade stage: `name` (used in artifact names such as `hist_<name>`) and its bool event column."""

    name: str
    column: str


@dataclass(frozen=True)
class TableFeatures:
    """Feature columns of one table (users or items), split by kind."""

    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return self.categorical + self.numeric


@dataclass(frozen=True)
class Features:
    """Explicit feature lists; when `DatasetSpec.features` is None, features are inferred from dtype."""

    users: TableFeatures = field(default_factory=TableFeatures)
    items: TableFeatures = field(default_factory=TableFeatures)


@dataclass(frozen=True)
class DatasetSpec:
    """Parsed `dataset.yaml`. `objectives` are in cascade order (objective t true implies t-1 true)."""

    name: str
    provenance: str
    objectives: tuple[Objective, ...]
    features: Features | None = None

    @property
    def objective_columns(self) -> tuple[str, ...]:
        return tuple(o.column for o in self.objectives)

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.objectives)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, the inverse of `parse_spec`."""
        out: dict[str, Any] = {
            "name": self.name,
            "provenance": self.provenance,
            "objectives": [{"name": o.name, "column": o.column} for o in self.objectives],
        }
        if self.features is not None:
            out["features"] = {
                table: {"categorical": list(tf.categorical), "numeric": list(tf.numeric)}
                for table, tf in (("users", self.features.users), ("items", self.features.items))
            }
        return out


def _unknown(where: str, data: dict, allowed: tuple[str, ...], errors: list[str]) -> None:
    extra = sorted(str(k) for k in data if k not in allowed)
    if extra:
        errors.append(f"{where}: unknown keys {extra} (allowed: {list(allowed)})")


def _str_list(where: str, value: Any, errors: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        errors.append(f"{where}: must be a list of column names, got {value!r}")
        return ()
    if len(set(value)) != len(value):
        errors.append(f"{where}: duplicate column names in {value}")
    return tuple(value)


def _parse_table_features(where: str, data: Any, id_column: str, errors: list[str]) -> TableFeatures:
    if data is None:
        return TableFeatures()
    if not isinstance(data, dict):
        errors.append(f"{where}: must be a mapping with keys categorical, numeric; got {data!r}")
        return TableFeatures()
    _unknown(where, data, ("categorical", "numeric"), errors)
    tf = TableFeatures(
        categorical=_str_list(f"{where}.categorical", data.get("categorical"), errors),
        numeric=_str_list(f"{where}.numeric", data.get("numeric"), errors),
    )
    both = sorted(set(tf.categorical) & set(tf.numeric))
    if both:
        errors.append(f"{where}: columns listed as both categorical and numeric: {both}")
    if id_column in tf.columns:
        errors.append(f"{where}: {id_column} is the key, not a feature; remove it from the lists")
    reserved = RESERVED_FEATURES.get(id_column)
    if reserved in tf.categorical:
        errors.append(
            f"{where}: a categorical feature named {reserved!r} would take the name of the model's row-id "
            f"column (c_{reserved}); rename the column in the table (and here), or remove it from the lists"
        )
    return tf


def _parse_objectives(data: Any, errors: list[str]) -> tuple[Objective, ...]:
    if not isinstance(data, list) or len(data) < 2:
        errors.append(
            "objectives: must be a list of at least 2 {name, column} entries in cascade order, "
            f"got {data!r}"
        )
        if not isinstance(data, list):
            return ()
    out = []
    for i, entry in enumerate(data):
        where = f"objectives[{i}]"
        if not isinstance(entry, dict):
            errors.append(f"{where}: must be a mapping {{name, column}}, got {entry!r}")
            continue
        _unknown(where, entry, ("name", "column"), errors)
        name, column = entry.get("name"), entry.get("column")
        for key, value in (("name", name), ("column", column)):
            if not isinstance(value, str) or not _IDENT.match(value):
                errors.append(f"{where}.{key}: must be an identifier like 'click', got {value!r}")
        if column in KEY_COLUMNS:
            errors.append(f"{where}.column: {column!r} is a key column; use a bool label column")
        out.append(Objective(str(name), str(column)))
    for attr in ("name", "column"):
        values = [getattr(o, attr) for o in out]
        dups = sorted({v for v in values if values.count(v) > 1})
        if dups:
            errors.append(f"objectives: duplicate {attr}s {dups}")
    return tuple(out)


def parse_spec(data: Any, *, source: str = SPEC_FILE) -> DatasetSpec:
    """Build a `DatasetSpec` from plain data (parsed YAML). Raises `SpecError` listing every problem."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: must be a mapping with keys name, provenance, objectives, features")
    errors: list[str] = []
    _unknown("dataset.yaml", data, ("name", "provenance", "objectives", "features"), errors)
    name, provenance = data.get("name"), data.get("provenance")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"name: must be a non-empty string, got {name!r}")
    elif not NAME_PATTERN.fullmatch(name):
        errors.append(
            f"name: must be {NAME_RULE} (it names directories such as reports/<name>/), got {name!r}; "
            "e.g. 'my-shop-2026'"
        )
    if not isinstance(provenance, str) or not provenance.strip():
        errors.append(
            f"provenance: must be a non-empty string saying where the data came from, got {provenance!r}"
        )
    objectives = _parse_objectives(data.get("objectives"), errors)
    features = None
    if data.get("features") is not None:
        fdata = data["features"]
        if not isinstance(fdata, dict):
            errors.append(f"features: must be a mapping with keys users, items; got {fdata!r}")
        else:
            _unknown("features", fdata, ("users", "items"), errors)
            features = Features(
                users=_parse_table_features("features.users", fdata.get("users"), USER_ID, errors),
                items=_parse_table_features("features.items", fdata.get("items"), ITEM_ID, errors),
            )
    if errors:
        raise SpecError(f"{source} is invalid:\n" + "\n".join(f"- {e}" for e in errors))
    return DatasetSpec(name=str(name), provenance=str(provenance), objectives=objectives, features=features)


def load_spec(directory: str | os.PathLike) -> DatasetSpec:
    """Read and validate `<directory>/dataset.yaml`."""
    path = local_dataset(directory) / SPEC_FILE  # a path or a URI (csmf_core.fsutil)
    if not path.is_file():
        raise SpecError(f"{path} not found; every canonical dataset needs one (see docs/architecture.md)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from exc
    return parse_spec(data, source=str(path))


def read_name(directory: str | os.PathLike) -> str | None:
    """The `name` written in `<directory>/dataset.yaml`, unchecked, or None when the file, the YAML or
    the key is missing or broken.

    For labels that exist before validation has run (a run's tags, the report directory, which is
    checked where it is built): `load_spec` would refuse the whole file for an unrelated problem,
    which validation then reports with its own message."""
    try:
        data = yaml.safe_load((Path(directory) / SPEC_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return str(name) if name else None


def write_spec(directory: str | os.PathLike, spec: DatasetSpec) -> Path:
    """Write `<directory>/dataset.yaml` atomically (temp file then rename). Returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    parse_spec(spec.to_dict())  # refuse to write what we could not read back
    text = "# canonical dataset description (docs/architecture.md section 1)\n" + yaml.safe_dump(
        spec.to_dict(), sort_keys=False, default_flow_style=None, width=110
    )
    # A uniquely named sibling (not mkstemp: its 0600 mode would outlive the rename) then rename.
    tmp = directory / f".{SPEC_FILE}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / SPEC_FILE)
    return directory / SPEC_FILE


# ---------------------------------------------------------------- event column types


@dataclass(frozen=True)
class ColumnProblem:
    """One missing or mistyped column: `rule` is `missing_column`, `wrong_type` or `naive_timestamp`."""

    rule: str
    column: str
    message: str
    fix: str


# integer types whose every value is an int64 value: read as int64 (`canonical_event_columns`, prep)
ID_DTYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32)


def _is_id_dtype(dtype: pl.DataType) -> bool:
    """An id type that int64 holds exactly: int64 itself, or a narrower (unsigned) integer."""
    return dtype in ID_DTYPES


def inferred_feature_kind(dtype: pl.DataType) -> str | None:
    """The kind prep gives a users/items column when dataset.yaml lists no features for its table:
    "categorical" (strings, booleans, categoricals, enums), "integer" (categorical or numeric by its
    count of distinct values: csmf_core/prep.py decides on the values), "numeric" (floats, decimals),
    or None: any other type (lists, arrays, structs, dates, times, binary) is not a feature."""
    if dtype in (pl.String, pl.Boolean) or isinstance(dtype, pl.Categorical | pl.Enum):
        return "categorical"
    if dtype.is_integer():
        return "integer"
    if dtype.is_float() or dtype.is_decimal():
        return "numeric"
    return None


# an integer column inferred as a feature is categorical up to this many distinct values, numeric above
INT_CATEGORICAL_MAX_DISTINCT = 1000


def infer_features(table: pl.DataFrame | pl.LazyFrame, id_column: str) -> dict[str, list[str]]:
    """The feature lists of a users/items table whose dataset.yaml lists none, as prep reads it
    (`table` with one row per id; a LazyFrame reads only the integer columns' values):
    {"categorical": [...], "numeric": [...]} in column order, by `inferred_feature_kind`; an integer
    column is categorical with at most INT_CATEGORICAL_MAX_DISTINCT distinct values, numeric above. A
    column named as the table's row-id column would be encoded (`RESERVED_FEATURES`, e.g. `uid` in
    users.parquet) is not a feature: list the features in dataset.yaml to use it under another name."""
    schema = table.collect_schema() if isinstance(table, pl.LazyFrame) else table.schema
    skip = {id_column, RESERVED_FEATURES.get(id_column)}  # (a column named like the row id's: not inferred)
    kinds = {n: inferred_feature_kind(d) for n, d in schema.items() if n not in skip}
    ints = [n for n, k in kinds.items() if k == "integer"]
    distinct: dict[str, int] = {}
    if ints:
        counts = table.select(pl.col(c).n_unique() for c in ints)
        distinct = (counts.collect() if isinstance(counts, pl.LazyFrame) else counts).row(0, named=True)
    spec: dict[str, list[str]] = {"categorical": [], "numeric": []}
    for name, kind in kinds.items():
        if kind == "integer":
            kind = "categorical" if distinct[name] <= INT_CATEGORICAL_MAX_DISTINCT else "numeric"
        if kind is not None:
            spec[kind].append(name)
    return spec


def categorical_feature_ok(dtype: pl.DataType) -> bool:
    """Whether a column listed as categorical in dataset.yaml can be coded (one code per distinct
    value, the values kept in the model's metadata): strings, booleans, categoricals, enums, integers
    and floats. Lists, structs, dates, times, decimals and binary cannot."""
    kind = inferred_feature_kind(dtype)
    return kind in ("categorical", "integer") or dtype.is_float() or dtype == pl.Null  # all-null: one code


def check_id_column(schema: pl.Schema, column: str) -> ColumnProblem | None:
    """The key column of a users/items/events file must exist and be an integer type that int64 holds
    exactly (int8 .. int64, uint8 .. uint32; uint64 is refused: its upper half is not an int64)."""
    if column not in schema:
        return ColumnProblem(
            "missing_column", column, f"column {column} is missing", f"add an int64 {column} column"
        )
    if not _is_id_dtype(schema[column]):
        return ColumnProblem(
            "wrong_type",
            column,
            f"column {column} has type {schema[column]}, expected int64 (or an integer type int64 holds: "
            "int8 .. int32, uint8 .. uint32)",
            f"cast it: pl.col('{column}').cast(pl.Int64) (map string ids to integers first if needed)",
        )
    return None


def check_event_columns(schema: pl.Schema, objective_columns: tuple[str, ...]) -> list[ColumnProblem]:
    """Every problem with the required event columns of one file's schema (empty list = fine)."""
    problems: list[ColumnProblem] = []
    if "request_id" not in schema:
        problems.append(
            ColumnProblem(
                "missing_column",
                "request_id",
                "column request_id is missing",
                "add a string request_id column (all null when the source has none)",
            )
        )
    elif not isinstance(schema["request_id"], pl.String | pl.Categorical | pl.Enum | pl.Null):
        problems.append(
            ColumnProblem(
                "wrong_type",
                "request_id",
                f"column request_id has type {schema['request_id']}, expected string",
                "cast it: pl.col('request_id').cast(pl.String)",
            )
        )
    for column in (USER_ID, ITEM_ID):
        problem = check_id_column(schema, column)
        if problem is not None:
            problems.append(problem)
    ts = schema.get("ts")
    if ts is None:
        problems.append(
            ColumnProblem(
                "missing_column",
                "ts",
                "column ts is missing",
                "add a timestamp[us, UTC] ts column with the event time",
            )
        )
    elif not isinstance(ts, pl.Datetime):
        problems.append(
            ColumnProblem(
                "wrong_type",
                "ts",
                f"column ts has type {ts}, expected timestamp[us, UTC]",
                "convert it, e.g. from epoch milliseconds: pl.from_epoch('ts', time_unit='ms')"
                ".dt.replace_time_zone('UTC')",
            )
        )
    elif ts.time_zone is None:
        problems.append(
            ColumnProblem(
                "naive_timestamp",
                "ts",
                f"column ts is a naive timestamp ({ts}) without time zone",
                "declare the zone it was recorded in, then convert: if the values are UTC, "
                "pl.col('ts').dt.replace_time_zone('UTC'); if local, .dt.replace_time_zone('<zone>')"
                ".dt.convert_time_zone('UTC')",
            )
        )
    elif ts.time_zone not in UTC_NAMES:
        problems.append(
            ColumnProblem(
                "wrong_type",
                "ts",
                f"column ts has time zone {ts.time_zone}, expected UTC",
                "convert it: pl.col('ts').dt.convert_time_zone('UTC')",
            )
        )
    for column in objective_columns:
        if column not in schema:
            problems.append(
                ColumnProblem(
                    "missing_column",
                    column,
                    f"objective column {column} is missing",
                    f"add the bool label column {column} (see dataset.yaml objectives)",
                )
            )
        elif schema[column] != pl.Boolean:
            problems.append(
                ColumnProblem(
                    "wrong_type",
                    column,
                    f"objective column {column} has type {schema[column]}, expected bool",
                    f"cast it: pl.col('{column}').cast(pl.Boolean) (0/1 -> false/true)",
                )
            )
    return problems


def canonical_event_columns(objective_columns: tuple[str, ...]) -> list[pl.Expr]:
    """Expressions selecting the canonical event columns with their exact types.

    Apply only to a frame whose schema passed `check_event_columns`: the casts then only change the
    representation (ms -> us, categorical -> string), never the values.
    """
    return [
        pl.col("request_id").cast(pl.String),
        pl.col(USER_ID).cast(pl.Int64),
        pl.col(ITEM_ID).cast(pl.Int64),
        pl.col("ts").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
        *(pl.col(c) for c in objective_columns),
    ]
