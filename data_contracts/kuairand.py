"""Import the KuaiRand-Pure slice (../shared/data/kuairand) into the canonical dataset format.

    from data_contracts import import_kuairand
    summary = import_kuairand("../shared/data/kuairand", "data/kuairand")   # conversion="like"

Mapping (docs/architecture.md section 1; the source README describes the columns):

* events: one row per log row. `exposed` = true for every row (the slice has no unexposed candidates),
  `clicked` = `is_click`, `converted` = `is_click & is_like` (default) or `is_click & long_view`
  (`conversion="long_view"`); the cascade therefore holds by construction. `request_id` is null (the
  source has none), `ts` = `time_ms` as UTC. Partitions are the UTC date of `ts`: the source `date`
  column is the Beijing (UTC+8) day, so its last 8 hours land in the next UTC partition.
* users.parquet: `user_features_pure.csv`, every user. Categorical: `user_active_degree`, the
  `*_range` buckets, the `onehot_feat*` codes (float codes stored as int64, nulls kept) and the three
  profile flags, renamed without their `is_` prefix (`lowactive_period`, `live_streamer`,
  `video_author`) because `is_*` is the label naming the leakage rule rejects. Numeric: the raw counts
  `follow_user_num`, `fans_user_num`, `friend_user_num`, `register_days`.
* items.parquet: `video_features_basic_pure.csv`, every video (`video_id` -> `item_id`), including the
  ones never exposed in the slice. Categorical: `author_id`, `video_type`, `upload_type`,
  `visible_status`, `music_type`, `tag` (the first of its comma-separated tags, int64). Numeric:
  `video_duration`, `server_width`, `server_height`. Dropped: `upload_dt` (a date; an item's age is
  relative to the event and belongs to prep), `music_id` (7,202 values for 7,583 videos, nearly an id).
  Logged items without a feature row would be allowed by the contract (handled as unknown); the
  slice has none.
* Never used as features: the log's label and label-derived columns (`is_*`, `long_view`,
  `play_time_ms`, `watch_ratio`, `finish`, `like`, `long_watch`, `is_positive`, ...) and its upstream
  copies of video attributes (`author_id`, `tag`, `video_duration`, `freshness_days`, ...): item
  attributes come from the feature table only.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from data_contracts.location import check_replaceable
from data_contracts.schema import (
    EVENTS_DIR,
    ITEMS_FILE,
    SPEC_FILE,
    USERS_FILE,
    DatasetSpec,
    Features,
    Objective,
    TableFeatures,
    write_spec,
)

NAME = "kuairand-pure-slice"
LOG_GLOB = "log_standard_*.parquet"
LOG_CSV_GLOB = "log_standard_*.csv"
USER_CSV_GLOB = "user_features*.csv"  # user_features_pure.csv, user_features_1k.csv, ...
VIDEO_CSV_GLOB = "video_features_basic*.csv"
CONVERSIONS = {"like": "is_like", "long_view": "long_view"}
_LOG_COLUMNS = ("user_id", "video_id", "time_ms", "is_click", "is_like", "long_view")

USER_RENAMES = {
    "is_lowactive_period": "lowactive_period",
    "is_live_streamer": "live_streamer",
    "is_video_author": "video_author",
}
USER_CATEGORICAL = (
    "user_active_degree",
    "lowactive_period",
    "live_streamer",
    "video_author",
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
    *(f"onehot_feat{i}" for i in range(18)),
)
USER_NUMERIC = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")
ITEM_CATEGORICAL = ("author_id", "video_type", "upload_type", "visible_status", "music_type", "tag")
ITEM_NUMERIC = ("video_duration", "server_width", "server_height")


@dataclass(frozen=True)
class ImportSummary:
    """What `import_kuairand` wrote. `positives` maps objective name -> rows with that label."""

    out_dir: Path
    name: str  # the dataset's name (dataset.yaml; tuned configs are looked up by it)
    rows: int
    positives: dict[str, int]
    partitions: tuple[str, ...]  # "2022-04-24", ... (UTC dates)
    rows_per_partition: dict[str, int]
    users: int  # rows of users.parquet
    items: int  # rows of items.parquet
    event_users: int  # distinct users in the events
    event_items: int
    unknown_user_rows: int  # events whose user has no feature row
    unknown_item_rows: int
    seconds: float


def _one(src: Path, pattern: str, what: str) -> Path:
    """The one file of `src` matching `pattern` (a clear error for none or several)."""
    found = sorted(p for p in src.glob(pattern) if p.is_file())
    if not found:
        raise FileNotFoundError(
            f"{src}: no {pattern} ({what}); point the source at the KuaiRand slice directory or at the "
            "official download's data/ directory"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{src}: {len(found)} files match {pattern} ({what}): {names}; keep one")
    return found[0]


def _log_files(src: Path) -> tuple[list[Path], str]:
    """The exposure logs of `src` and their format ("parquet" or "csv"): one kind, not both."""
    if not src.is_dir():
        raise FileNotFoundError(
            f"{src} is not a directory (give the KuaiRand slice or the official download's data/ directory)"
        )
    parquet, csv = sorted(src.glob(LOG_GLOB)), sorted(src.glob(LOG_CSV_GLOB))
    if parquet and csv:
        raise ValueError(
            f"{src}: both Parquet ({', '.join(p.name for p in parquet)}) and CSV "
            f"({', '.join(p.name for p in csv)}) exposure logs would count the same exposures twice; "
            "keep one kind in the directory"
        )
    if not parquet and not csv:
        raise FileNotFoundError(
            f"{src}: no {LOG_GLOB} or {LOG_CSV_GLOB} files (log_random_* files are not read); point the "
            "source at the KuaiRand slice directory or at the official download's data/ directory"
        )
    return (parquet, "parquet") if parquet else (csv, "csv")


def _dataset_name(src: Path, kind: str) -> str:
    """The canonical dataset's name: `kuairand-pure-slice` for the slice's Parquet logs,
    `kuairand-<variant>` for the official CSV logs (`pure`, `1k`, `27k`: the user feature file's
    suffix), so a config tuned on one is never applied to the other (tuned configs go by name); an
    import with `conversion="long_view"` adds `-long-view` (`_spec`)."""
    if kind == "parquet":
        return NAME
    stem = _one(src, USER_CSV_GLOB, "user feature table").stem.lower()  # user_features_pure
    variant = re.sub(r"[^a-z0-9]+", "-", stem.removeprefix("user_features")).strip("-")
    return f"kuairand-{variant}" if variant else "kuairand"


_FLAGS = ("is_click", "is_like", "long_view")


def _read_log(path: Path, kind: str) -> pl.DataFrame:
    """The columns the mapping reads from one exposure log, read once, with the rules it relies on
    checked (a row breaking one is an error naming the file, column, rule and rows, never silently
    a negative)."""
    names = pl.read_parquet_schema(path) if kind == "parquet" else pl.read_csv(path, n_rows=0).columns
    missing = sorted(set(_LOG_COLUMNS) - set(names))
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; is this a KuaiRand log_standard file?")
    try:
        if kind == "parquet":
            log = pl.read_parquet(path, columns=list(_LOG_COLUMNS))
        else:  # only these columns are parsed; every one an integer in the official files
            log = pl.read_csv(
                path, columns=list(_LOG_COLUMNS), schema_overrides=dict.fromkeys(_LOG_COLUMNS, pl.Int64)
            )
    except pl.exceptions.PolarsError as exc:
        raise ValueError(f"{path}: columns {list(_LOG_COLUMNS)} must be integers: {exc}") from exc
    counts = log.select(
        *((pl.col(c).is_null() | ~pl.col(c).is_in([0, 1])).sum().alias(c) for c in _FLAGS),
        *(pl.col(c).is_null().sum().alias(c) for c in ("user_id", "video_id", "time_ms")),
    ).row(0, named=True)
    broken = [(c, int(n)) for c, n in counts.items() if n]
    if broken:
        rules = "; ".join(
            f"column {c}: {n:,} row{'s' if n != 1 else ''} {'not 0 or 1' if c in _FLAGS else 'null'}"
            for c, n in broken
        )
        raise ValueError(f"{path}: {rules} (of {log.height:,})")
    return log


def _events(logs: list[Path], kind: str, conversion: str) -> pl.DataFrame:
    clicked = pl.col("is_click") == 1
    return (
        pl.concat([_read_log(path, kind) for path in logs])
        .select(
            pl.lit(None, dtype=pl.String).alias("request_id"),
            pl.col("user_id").cast(pl.Int64),
            pl.col("video_id").cast(pl.Int64).alias("item_id"),
            pl.from_epoch(pl.col("time_ms"), time_unit="ms")
            .dt.replace_time_zone("UTC")
            .dt.cast_time_unit("us")
            .alias("ts"),
            pl.lit(True).alias("exposed"),
            clicked.alias("clicked"),
            (clicked & (pl.col(CONVERSIONS[conversion]) == 1)).alias("converted"),
        )
        .sort("ts", "user_id", "item_id")  # deterministic output for identical input
    )


def _read_table(path: Path, columns: tuple[str, ...]) -> pl.DataFrame:
    """Read a KuaiRand feature CSV (types inferred from every row), insisting on `columns`."""
    table = pl.read_csv(path, infer_schema_length=None)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; is this the official KuaiRand-Pure table?")
    return table


def _users(src: Path) -> pl.DataFrame:
    source_name = {new: old for old, new in USER_RENAMES.items()}
    needed = ("user_id", *(source_name.get(c, c) for c in (*USER_CATEGORICAL, *USER_NUMERIC)))
    users = _read_table(_one(src, USER_CSV_GLOB, "user feature table"), needed)
    users = users.rename(USER_RENAMES)
    # onehot codes are read as float where the column has nulls; they are integer category codes.
    codes = [pl.col(c).cast(pl.Int64) for c in USER_CATEGORICAL if users.schema[c].is_float()]
    return users.with_columns(codes).select("user_id", *USER_CATEGORICAL, *USER_NUMERIC)


def _items(src: Path) -> pl.DataFrame:
    needed = ("video_id", *ITEM_CATEGORICAL, *ITEM_NUMERIC)
    items = _read_table(_one(src, VIDEO_CSV_GLOB, "video feature table"), needed)
    return items.select(
        pl.col("video_id").cast(pl.Int64).alias("item_id"),
        pl.col("author_id").cast(pl.Int64),
        pl.col("video_type"),
        pl.col("upload_type"),
        pl.col("visible_status").cast(pl.Int64),
        pl.col("music_type").cast(pl.Int64),
        pl.col("tag").cast(pl.String).str.split(",").list.first().str.strip_chars().cast(pl.Int64),
        *(pl.col(c).cast(pl.Float64) for c in ITEM_NUMERIC),
    )


def _spec(src: Path, logs: list[Path], kind: str, conversion: str) -> DatasetSpec:
    name = _dataset_name(src, kind)
    slice_ = name == NAME
    if conversion != "like":  # another third objective: another dataset (tuned configs go by name)
        name = f"{name}-{conversion.replace('_', '-')}"
    if slice_:
        commit_file = src / "SOURCE_COMMIT"
        commit = commit_file.read_text().strip() if commit_file.is_file() else "unknown"
        origin = (
            f"KuaiRand-Pure slice (Gao et al., CIKM 2022; CC BY-SA 4.0) from {src.resolve()}, "
            f"wmyh-0416/kuairand-short-video-recommender@{commit}"
        )
    else:
        origin = f"KuaiRand (Gao et al., CIKM 2022; CC BY-SA 4.0), the official files in {src.resolve()}"
    provenance = (
        f"{origin}; logs {', '.join(p.name for p in logs)}; imported by data_contracts.import_kuairand: "
        f"exposure = every log row, click = is_click, conversion = is_click & {CONVERSIONS[conversion]}; "
        "request_id null; ts = time_ms (UTC); partitions = UTC date of ts"
    )
    return DatasetSpec(
        name=name,
        provenance=provenance,
        objectives=(
            Objective("exposure", "exposed"),
            Objective("click", "clicked"),
            Objective("conversion", "converted"),
        ),
        features=Features(
            users=TableFeatures(categorical=USER_CATEGORICAL, numeric=USER_NUMERIC),
            items=TableFeatures(categorical=ITEM_CATEGORICAL, numeric=ITEM_NUMERIC),
        ),
    )


def _write(out: Path, spec: DatasetSpec, events: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame):
    users.write_parquet(out / USERS_FILE)
    items.write_parquet(out / ITEMS_FILE)
    dates = events.get_column("ts").dt.date()
    for (day,), part in events.with_columns(dates.alias("__dt")).partition_by("__dt", as_dict=True).items():
        target = out / EVENTS_DIR / f"dt={day.isoformat()}"
        target.mkdir(parents=True)
        part.drop("__dt").write_parquet(target / "part-0.parquet")
    write_spec(out, spec)


def import_kuairand(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    conversion: str = "like",
    overwrite: bool = False,
) -> ImportSummary:
    """Convert the KuaiRand slice in `src_dir` into a canonical dataset at `out_dir`.

    conversion: "like" (is_click & is_like, sparse) or "long_view" (is_click & long_view, dense).
    overwrite: replace an existing `out_dir`; without it an existing `out_dir` is an error.
    The dataset is written to a temporary sibling directory and renamed into place, so `out_dir` is
    either the old dataset or the complete new one, never a half-written mix.
    """
    start = time.perf_counter()
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion must be one of {sorted(CONVERSIONS)}, got {conversion!r}")
    src, out = Path(src_dir), Path(out_dir)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(
            f"{out} is inside the source directory {src}: the source is never modified; write the dataset "
            "elsewhere"
        )
    check_replaceable(out, SPEC_FILE)  # overwrite replaces an earlier dataset, never other files
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    logs, kind = _log_files(src)
    events, users, items = _events(logs, kind, conversion), _users(src), _items(src)
    spec = _spec(src, logs, kind, conversion)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Sibling names made unique by hand (mkdtemp's 0700 mode would outlive the rename).
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _write(tmp, spec, events, users, items)
        if out.exists():
            if not overwrite:  # appeared while we were working
                raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    days = events.group_by(pl.col("ts").dt.date().alias("d")).len().sort("d")
    per_day = {d.isoformat(): int(n) for d, n in days.iter_rows()}
    return ImportSummary(
        out_dir=out,
        name=spec.name,
        rows=events.height,
        positives={o.name: int(events.get_column(o.column).sum()) for o in spec.objectives},
        partitions=tuple(per_day),
        rows_per_partition=per_day,
        users=users.height,
        items=items.height,
        event_users=events.get_column("user_id").n_unique(),
        event_items=events.get_column("item_id").n_unique(),
        unknown_user_rows=int(
            (~events.get_column("user_id").is_in(users.get_column("user_id").implode())).sum()
        ),
        unknown_item_rows=int(
            (~events.get_column("item_id").is_in(items.get_column("item_id").implode())).sum()
        ),
        seconds=time.perf_counter() - start,
    )
