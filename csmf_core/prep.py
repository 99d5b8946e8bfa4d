"""Canonical dataset -> model-ready dataset (docs/architecture.md sections 1 and 2).

``prepare(dataset_dir, out_dir, train_dates=..., eval_dates=...)`` reads the canonical dataset with
polars lazy scans (only the partitions up to the last evaluation date; source files are only read) and
writes, into a temp dir renamed into place at the end:

* ``users.parquet`` / ``items.parquet``: row r = index r, row 0 = unknown. Vocabularies are the ids of
  the feature table and of the events read, sorted by id. ``c_uid`` / ``c_iid`` = r; categorical
  feature codes 1..K by sorted distinct value (0 = null or not in the feature table); numeric features
  standardised with the mean and (population) std of the feature table, null/NaN -> 0.
* ``train/part-NNNNN.parquet``: events of the training dates whose first objective is true, sorted by
  (ts, user_id, item_id); ``level`` = number of objectives true - 1; ``hist_<objective>`` for every
  objective after the first; ``neg`` = the first M unexposed candidates of the same request in source
  order (distinct, excluding items exposed in that request), right-padded with 0.
* ``eval.parquet``: one row per user (sorted by index) with >= 1 positive of any objective in the
  evaluation dates; ``hist_*`` as of midnight UTC of the first evaluation date; ``pos_<objective>``
  sorted distinct item indices.
* ``popularity.parquet`` (every item index 0..n_items-1: positives per objective in the train rows),
  ``history_counts.parquet`` (the same for every objective after the first, over every partition
  read for the histories, before the first evaluation date) and ``meta.json``.

Point-in-time history: the last L items the user had the label on with ``ts`` strictly before the
row's ``ts`` (events at the same ts or later never count), over every partition read (so history
before the training window counts too), most recent last, left-padded with 0. Ties at the same ts are
ordered by item index, so the result does not depend on the row order of the source files.

Feature kinds when ``dataset.yaml`` has no ``features`` for a table: string, categorical, enum and
boolean columns are categorical; integer columns are categorical when they have at most
``INT_CATEGORICAL_MAX_DISTINCT`` (1,000) distinct values, numeric otherwise; float and decimal
columns are numeric; other dtypes (dates, lists, ...) are not features (`csmf validate` names them:
rule ``unused_column``, and lists the features it will read). One implementation for both:
``data_contracts.schema.infer_features``.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from csmf_core.fsutil import commit_dir, fresh_temp_dir, local_dataset, reject_uri
from csmf_core.idmap import SEEN_FILES, Assigned, BaseMaps, assign_rows, collisions, hash_buckets, write_seen
from data_contracts import DatasetSpec, infer_features, load_spec, partition_files, scan_partition

DAY_US = 86_400_000_000


@dataclass
class PrepSummary:
    """What ``prepare`` wrote. ``train_by_level[k]`` = train rows with level == k."""

    out_dir: Path
    n_users: int  # rows of users.parquet (including row 0)
    n_items: int
    n_train: int
    n_eval: int
    train_by_level: list[int]
    train_dates: list[str]
    eval_dates: list[str]
    train_parts: list[Path] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _resolve_dates(spec: str | list[str] | tuple[str, str]) -> list[str]:
    """A str = one date, a tuple (start, end) = every calendar date in [start, end], a list = those."""
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, tuple):
        start, end = (dt.date.fromisoformat(str(d)) for d in spec)
        return [(start + dt.timedelta(days=k)).isoformat() for k in range((end - start).days + 1)]
    return sorted({dt.date.fromisoformat(str(d)).isoformat() for d in spec})


def _feature_lists(spec: DatasetSpec, table: str) -> dict[str, list[str]] | None:
    """dataset.yaml's feature lists of `table` ("users" or "items"), or None: inferred from the dtypes
    (no `features` in dataset.yaml, or none listed for that table)."""
    tf = getattr(spec.features, table) if spec.features is not None else None
    if tf is None or not tf.columns:
        return None
    return {"categorical": list(tf.categorical), "numeric": list(tf.numeric)}


def _encode_table(
    df: pl.DataFrame,
    id_col: str,
    ids: np.ndarray,
    spec: dict | None,
    idx_name: str,
    base: list[dict] | None = None,
    id_buckets: int | None = None,
):
    """Feature table -> (model-ready table, feature specs). ``ids`` (n,): the id of row r at r - 1
    (sorted ids in a run from scratch; csmf_core/idmap.py with a base). ``base``: the base model's
    feature specs of this table: its categorical codes and numeric standardisation are kept (values new
    since then get the next codes). ``id_buckets``: the id column holds hashed buckets, not the row."""
    df = df.filter(pl.col(id_col).is_not_null()).unique(subset=id_col, keep="first", maintain_order=True)
    spec = spec or infer_features(df, id_col)
    joined = pl.DataFrame({id_col: ids}).join(df, on=id_col, how="left", maintain_order="left")
    n = len(ids) + 1
    base_specs = {s.get("source"): s for s in base or [] if s["name"] != idx_name}
    id_codes = np.arange(n, dtype=np.int32)
    if id_buckets is not None:
        id_codes = np.concatenate([[0], hash_buckets(ids, id_buckets)]).astype(np.int32)
    cols = {id_col: pl.Series(id_col, [None, *ids.tolist()], pl.Int64), idx_name: id_codes}
    card = n if id_buckets is None else id_buckets + 1
    specs = [{"name": idx_name, "kind": "categorical", "cardinality": card, "source": id_col}]
    for f in spec.get("categorical", []):
        values = df[f].drop_nulls().unique().sort()
        prior = base_specs.get(f)
        if prior is not None and prior["kind"] == "categorical":  # the base's codes first, new ones after
            old = pl.Series(f, prior.get("values") or [], dtype=values.dtype, strict=False)
            values = pl.concat([old, values.filter(~values.is_in(old.implode()))])
        codes = joined[f].replace_strict(values, range(1, len(values) + 1), default=0, return_dtype=pl.Int32)
        if f"c_{f}" in cols:  # dataset.yaml's checks refuse it (data_contracts.schema.RESERVED_FEATURES)
            raise ValueError(
                f"feature {f!r} of the {id_col} table would overwrite the model-ready column c_{f}"
            )
        cols[f"c_{f}"] = np.concatenate([[0], codes.fill_null(0).to_numpy()]).astype(np.int32)
        specs.append(
            {"name": f"c_{f}", "kind": "categorical", "cardinality": len(values) + 1, "source": f}
            | {"values": values.to_list()}
        )
    for f in spec.get("numeric", []):
        x = df[f].cast(pl.Float64).fill_nan(None)
        mean, std = x.mean() or 0.0, x.std(ddof=0) or 0.0
        std = std if std > 0 else 1.0  # a constant column standardises to 0, not NaN
        prior = base_specs.get(f)
        if prior is not None and prior["kind"] == "numeric":  # the base model's inputs stay the same
            mean, std = float(prior["mean"]), float(prior["std"])
        z = ((joined[f].cast(pl.Float64).fill_nan(None) - mean) / std).fill_null(0.0).to_numpy()
        cols[f"n_{f}"] = np.concatenate([[0.0], z]).astype(np.float32)
        specs.append({"name": f"n_{f}", "kind": "numeric", "source": f, "mean": mean, "std": std})
    return pl.DataFrame(cols), specs


# per item, the positives of every objective after the first before the first evaluation day, over
# every partition read for the behaviour histories (Rows.counts)
HISTORY_COUNTS = "history_counts.parquet"


class HistoryIndex:
    """Positives (u, i, ts) of one objective, indexed for point-in-time history look-ups.

    Events are sorted by a combined key ``u * stride + rank(ts)`` (ranks over the distinct event ts,
    so the key never overflows whatever the time span) with ties broken by item index.
    """

    def __init__(self, u: np.ndarray, i: np.ndarray, ts: np.ndarray):
        self.uniq_ts = np.unique(ts)
        self.stride = np.int64(len(self.uniq_ts) + 1)
        key = u.astype(np.int64) * self.stride + np.searchsorted(self.uniq_ts, ts)
        order = np.lexsort((i, key))
        self.key, self.items = key[order], i[order].astype(np.int32)

    def count_before(self, ts: int, n_items: int) -> np.ndarray:
        """(n_items,) int64: positives per item index with event ts strictly before `ts` (us)."""
        ranks = self.key % self.stride  # the rank of the event's ts among the distinct ts
        early = ranks < np.searchsorted(self.uniq_ts, ts, "left")
        return np.bincount(self.items[early], minlength=n_items).astype(np.int64)

    def query(self, u: np.ndarray, ts: np.ndarray, seq_len: int, chunk: int = 1 << 20) -> np.ndarray:
        """(Q,) user indices and ts (us) -> (Q, seq_len) int32, most recent last, 0-padded left."""
        out = np.zeros((len(u), seq_len), np.int32)
        if len(self.items) == 0 or len(u) == 0:
            return out
        u64 = u.astype(np.int64)
        # searchsorted 'left' on the distinct ts = number of distinct event ts strictly before ts, so
        # key(event) < key(query) <=> same-or-earlier user, or same user and strictly earlier ts.
        end = np.searchsorted(self.key, u64 * self.stride + np.searchsorted(self.uniq_ts, ts), "left")
        start = np.searchsorted(self.key, u64 * self.stride, "left")
        offs = np.arange(seq_len) - seq_len
        for lo in range(0, len(u), chunk):  # bounds the (chunk, L) int64 temporaries
            pos = end[lo : lo + chunk, None] + offs
            ok = pos >= start[lo : lo + chunk, None]
            out[lo : lo + chunk] = np.where(ok, self.items[np.maximum(pos, 0)], 0)
        return out


def _fixed_list(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), pa.int32()), a.shape[1])


def ts_us(lf: pl.LazyFrame) -> pl.Expr:
    """`ts` as int64 microseconds UTC, whether stored as a timestamp or as integers."""
    ts = pl.col("ts")
    return (ts.dt.epoch("us") if lf.collect_schema()["ts"].is_temporal() else ts.cast(pl.Int64)).alias("ts")


def _scan_events(parts: dict[str, list[Path]], dates: list[str], cols: list[str], train: set, ev: set):
    frames = []
    for d in dates:
        lf = scan_partition(parts[d])
        has_req = "request_id" in lf.collect_schema()
        frames.append(
            lf.select(
                (pl.col("request_id") if has_req else pl.lit(None)).cast(pl.String).alias("request_id"),
                pl.col("user_id").cast(pl.Int64),
                pl.col("item_id").cast(pl.Int64),
                ts_us(lf),
                *[pl.col(c).cast(pl.Boolean).fill_null(False) for c in cols],
                pl.lit(d in train).alias("_train"),
                pl.lit(d in ev).alias("_eval"),
            ).filter(pl.col("user_id").is_not_null() & pl.col("item_id").is_not_null())
        )
    return pl.concat(frames, how="vertical")


def _read_features(path: Path, id_col: str) -> pl.DataFrame:
    """A users/items table with its id column as int64 (the contract also admits narrower integers)."""
    if not path.exists():
        return pl.DataFrame({id_col: []}, schema={id_col: pl.Int64})
    return pl.read_parquet(path).with_columns(pl.col(id_col).cast(pl.Int64))


def _list_column(u_rows: np.ndarray, u: np.ndarray, i: np.ndarray) -> pa.ListArray:
    """Sorted distinct items per user of ``u_rows`` (sorted) from pairs (u, i) -> list<int32>."""
    pairs = np.unique(u.astype(np.int64) << 32 | i.astype(np.int64))
    pu, pi = pairs >> 32, (pairs & 0xFFFFFFFF).astype(np.int32)
    offsets = np.searchsorted(pu, np.append(u_rows, np.iinfo(np.int64).max)).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(pi, pa.int32()))


@dataclass
class Plan:
    """What every part of one prep shares: the dataset, the dates, and the global vocabularies.

    Built by ``plan`` (the vocabulary pass of sharded prep, csmf_core/prep_sharded.py) or inside
    ``prepare``. ``users_tab`` / ``items_tab`` are the finished ``users.parquet`` / ``items.parquet``.
    """

    dataset_dir: Path
    spec: DatasetSpec
    objectives: list[tuple[str, str]]
    train_d: list[str]
    eval_d: list[str]
    needed: list[str]
    parts: dict[str, list[Path]]
    seq_len: int
    n_req_neg: int
    eval_start: int
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    users_tab: pl.DataFrame | None = None
    items_tab: pl.DataFrame | None = None
    user_specs: list = field(default_factory=list)
    item_specs: list = field(default_factory=list)
    # id maps (csmf_core/idmap.py): the maps of the model a run starts from, hashing, eviction
    base: BaseMaps | None = None
    id_buckets: int | None = None
    evict_after_days: int | None = None
    maps: dict[str, Assigned] = field(default_factory=dict)
    # (n_items,) bool per item row: the item occurs in an event of the partitions read (any row, any
    # day, the evaluation days included); items only in items.parquet are False (`cold_item_codes`)
    item_in_events: np.ndarray | None = None

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.objectives]

    @property
    def cols(self) -> list[str]:
        return [c for _, c in self.objectives]

    @property
    def n_users(self) -> int:
        return len(self.user_ids) + 1

    @property
    def n_items(self) -> int:
        return len(self.item_ids) + 1

    def events(self) -> pl.LazyFrame:
        return _scan_events(self.parts, self.needed, self.cols, set(self.train_d), set(self.eval_d))

    def uidx(self, s: pl.Series) -> np.ndarray:
        if self.base is not None:  # rows kept from the base model (csmf_core/idmap.py)
            return self.maps["users"].rows_of(s.to_numpy())
        # ascending ids: a row is the position in the sorted vocabulary (as before id maps)
        return (np.searchsorted(self.user_ids, s.to_numpy()) + 1).astype(np.int32)

    def iidx(self, s: pl.Series) -> np.ndarray:
        if self.base is not None:
            return self.maps["items"].rows_of(s.to_numpy())
        return (np.searchsorted(self.item_ids, s.to_numpy()) + 1).astype(np.int32)

    def set_vocab(self, uids: pl.DataFrame, iids: pl.DataFrame, users_df, items_df) -> None:
        """Rows for the ids of the feature tables and events (``vocab_queries``: each id with its last
        event ts, null when only in the feature table): ascending ids from scratch, the base model's
        rows kept with a base (csmf_core/idmap.py); encode the feature tables."""
        feats = {table: _feature_lists(self.spec, table) for table in ("users", "items")}
        today = int(dt.date.fromisoformat(max(self.train_d)).toordinal() - dt.date(1970, 1, 1).toordinal())
        span = (dt.date.fromisoformat(max(self.train_d)) - dt.date.fromisoformat(min(self.train_d))).days
        for side, col, frame in (("users", "user_id", uids), ("items", "item_id", iids)):
            frame = frame.filter(pl.col(col).is_not_null()).sort(col)
            seen = (frame["ts"].fill_null(-DAY_US).to_numpy() // DAY_US).astype(np.int32)  # -1: table only
            self.maps[side] = assign_rows(
                frame[col].to_numpy(),
                seen,
                self.base.side(side) if self.base is not None else None,
                today=today,
                evict_after_days=self.evict_after_days,
                first_day=today - span,
            )
            if side == "items":
                in_events = np.zeros(len(self.maps[side].ids) + 1, bool)
                in_events[
                    self.maps[side].rows_of(frame.filter(pl.col("ts").is_not_null())[col].to_numpy())
                ] = True
                in_events[0] = False
                self.item_in_events = in_events
        self.user_ids, self.item_ids = self.maps["users"].ids, self.maps["items"].ids
        base_feats = self.base.features if self.base is not None else {}
        self.users_tab, self.user_specs = _encode_table(
            users_df,
            "user_id",
            self.user_ids,
            feats.get("users"),
            "c_uid",
            base_feats.get("users"),
            self.id_buckets,
        )
        self.items_tab, self.item_specs = _encode_table(
            items_df,
            "item_id",
            self.item_ids,
            feats.get("items"),
            "c_iid",
            base_feats.get("items"),
            self.id_buckets,
        )
        for side, tab in (("users", self.users_tab), ("items", self.items_tab)):
            stats = self.maps[side].stats
            stats["buckets"] = self.id_buckets
            codes = tab["c_uid" if side == "users" else "c_iid"].to_numpy()[1:]
            stats["collisions"] = collisions(codes) if self.id_buckets is not None else 0


def plan(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    train_dates: str | list[str] | tuple[str, str],
    eval_dates: str | list[str] | tuple[str, str],
    seq_len: int = 20,
    n_req_neg: int = 10,
    overwrite: bool = False,
    base: BaseMaps | None = None,
    id_buckets: int | None = None,
    evict_after_days: int | None = None,
) -> Plan:
    """Check the arguments and the dataset (``prepare``'s rules) and resolve the dates; no vocabulary yet."""
    reject_uri(out_dir, "model-ready output directory")
    dataset_dir, out_dir = local_dataset(dataset_dir), Path(out_dir)
    spec = load_spec(dataset_dir)
    objectives = [(o.name, o.column) for o in spec.objectives]
    train_d, eval_d = _resolve_dates(train_dates), _resolve_dates(eval_dates)
    if not train_d or (eval_d and max(train_d) >= min(eval_d)):
        raise ValueError("need non-empty train dates, every train date before the first eval date")
    if seq_len < 1 or n_req_neg < 1:  # arrow has no fixed_size_list of size 0; all-0 rows mean "none"
        raise ValueError("need seq_len >= 1 and n_req_neg >= 1")
    fresh_temp_dir(out_dir, overwrite, check_only=True, marker="meta.json")  # fail before the heavy work
    parts = partition_files(dataset_dir)
    missing = [d for d in train_d if d not in parts], [d for d in eval_d if d not in parts]
    if len(missing[0]) == len(train_d) or (eval_d and len(missing[1]) == len(eval_d)):
        raise ValueError(f"no event partitions for the train or eval dates in {dataset_dir / 'events'}")
    # history needs every earlier partition; nothing after the last date asked for is ever opened
    needed = [d for d in parts if d <= max(eval_d or train_d)]
    first_eval = (
        dt.date.fromisoformat(min(eval_d))
        if eval_d
        else dt.date.fromisoformat(max(train_d)) + dt.timedelta(1)
    )
    eval_start = (
        int(dt.datetime(first_eval.year, first_eval.month, first_eval.day, tzinfo=dt.UTC).timestamp()) * 10**6
    )
    return Plan(
        dataset_dir, spec, objectives, train_d, eval_d, needed, parts, seq_len, n_req_neg, eval_start,
        base=base, id_buckets=id_buckets, evict_after_days=evict_after_days,
    )  # fmt: skip


def vocab_queries(ev: pl.LazyFrame, users_df: pl.DataFrame, items_df: pl.DataFrame) -> list[pl.LazyFrame]:
    """The user and item ids of the feature tables and the events, each with its last event ts (null
    when it is only in the feature table): the vocabulary pass (last-seen days feed the id maps)."""

    def last_seen(df: pl.DataFrame, col: str) -> pl.LazyFrame:
        table_ids = df.lazy().select(pl.col(col).cast(pl.Int64), pl.lit(None, pl.Int64).alias("ts"))
        return pl.concat([table_ids, ev.select(col, "ts")]).group_by(col).agg(pl.col("ts").max())

    return [last_seen(users_df, "user_id"), last_seen(items_df, "item_id")]


def row_queries(ev: pl.LazyFrame, cols: list[str], n_req_neg: int) -> tuple[pl.DataFrame, list[pl.LazyFrame]]:
    """(request codes, [train, negatives, eval, *history positives]) of the events `ev` (lazy).

    Bounded memory (bench/bench_scaling.py): request ids become dense uint32 codes once (a table of
    n_requests strings), so no event-sized frame below carries a string column (a 16-character id
    costs ~32 B a row in polars, its code 4 B); the queries run on polars' streaming engine, and the
    wide train columns (histories, negatives) are built part by part. Codes are an internal detail:
    the output is the same as with the ids themselves (tests/unit/test_prep_bounded.py).
    """
    c0, is_train, rid = pl.col(cols[0]), pl.col("_train"), pl.col("request_id")
    # a request is one user's: an id another user reuses (a per-user counter) is another request, whose
    # candidates are not pooled; one user's id stays one request across days (a request that spans
    # midnight has rows in two partitions)
    key = ["request_id", "user_id"]
    req = (
        ev.filter(is_train & rid.is_not_null())
        .select(key)
        .unique()
        .collect(engine="streaming")
        .with_row_index("rc", offset=1)
    )
    coded = ev.filter(is_train).join(req.lazy(), on=key, how="left", maintain_order="left")
    train_lf = coded.filter(c0).select("rc", "user_id", "item_id", "ts", *cols)
    train_lf = train_lf.sort(["ts", "user_id", "item_id"], maintain_order=True)
    neg_lf = (
        coded.filter(~c0 & pl.col("rc").is_not_null())
        .select("rc", "item_id")
        .join(
            coded.filter(c0 & pl.col("rc").is_not_null()).select("rc", "item_id"),
            on=["rc", "item_id"],
            how="anti",
            maintain_order="left",
        )
        .unique(maintain_order=True)
        .with_columns(k=pl.int_range(pl.len()).over("rc"))
        .filter(pl.col("k") < n_req_neg)
    )
    eval_lf = ev.filter(pl.col("_eval") & pl.any_horizontal(cols)).select("user_id", "item_id", *cols)
    hist_lfs = [ev.filter(pl.col(c)).select("user_id", "item_id", "ts") for c in cols[1:]]
    return req, [train_lf, neg_lf, eval_lf, *hist_lfs]


@dataclass
class Rows:
    """The training and evaluation rows of some users (all of them, or one shard), in index space.

    Train rows in output order ((ts, user, item), ties in source order) with the narrow columns; the
    wide ones (histories, negatives) are built slice by slice by ``train_slice``.
    """

    t_u: np.ndarray
    t_i: np.ndarray
    t_ts: np.ndarray
    flags: np.ndarray  # (n_train, n_objectives) bool
    train_rc: np.ndarray
    neg_mat: np.ndarray
    index: dict[str, HistoryIndex]
    e_u: np.ndarray
    e_i: np.ndarray
    e_flags: dict[str, np.ndarray]

    @property
    def level(self) -> np.ndarray:
        return (self.flags.sum(1) - 1).astype(np.int8)

    def train_slice(self, p: Plan, s: slice, level: np.ndarray) -> pa.Table:
        table = {"u": pa.array(self.t_u[s]), "i": pa.array(self.t_i[s]), "level": pa.array(level[s])}
        table["ts"] = self.t_ts[s]
        for n in p.names[1:]:
            table[f"hist_{n}"] = _fixed_list(self.index[n].query(self.t_u[s], self.t_ts[s], p.seq_len))
        table["neg"] = _fixed_list(self.neg_mat[self.train_rc[s]])
        return pa.table(table)

    def eval_table(self, p: Plan) -> pa.Table:
        eval_users = np.unique(self.e_u)
        etab = {"u": pa.array(eval_users, pa.int32())}
        for n in p.names[1:]:
            etab[f"hist_{n}"] = _fixed_list(
                self.index[n].query(eval_users, np.full(len(eval_users), p.eval_start), p.seq_len)
            )
        for n, c in p.objectives:
            m = self.e_flags[c]
            etab[f"pos_{n}"] = _list_column(eval_users, self.e_u[m], self.e_i[m])
        return pa.table(etab)

    def counts(self, p: Plan) -> np.ndarray:
        """(2 n_objectives - 1, n_items) int64: positives per item of each objective in the train rows
        (``popularity.parquet``), then, for every objective after the first, its positives before the
        first evaluation day in every partition read for the behaviour histories
        (``history_counts.parquet``: the log-Q counts of `train.incremental_logq: history`)."""
        train = [np.bincount(self.t_i[self.flags[:, k]], minlength=p.n_items) for k in range(len(p.names))]
        hist = [self.index[n].count_before(p.eval_start, p.n_items) for n in p.names[1:]]
        return np.stack(train + hist).astype(np.int64)


def build_rows(p: Plan, req: pl.DataFrame, frames: list[pl.DataFrame]) -> Rows:
    """The collected ``row_queries`` frames -> ``Rows`` (needs the plan's vocabularies)."""
    cols, names = p.cols, p.names
    train, negs, evals, *hists = frames

    def history_index(h: pl.DataFrame) -> HistoryIndex:
        u, i, ts = p.uidx(h["user_id"]), p.iidx(h["item_id"]), h["ts"].to_numpy()
        known = (u > 0) & (i > 0)  # only evicted ids (csmf_core/idmap.py) have row 0 here
        return HistoryIndex(u[known], i[known], ts[known])

    index = {n: history_index(h) for n, h in zip(names[1:], hists)}
    del hists
    # Request negatives: one (n_requests + 1, M) matrix, row 0 = no negatives, gathered per train row.
    neg_mat = np.zeros((len(req) + 1, p.n_req_neg), np.int32)
    neg_mat[negs["rc"].to_numpy(), negs["k"].to_numpy()] = p.iidx(negs["item_id"])
    del negs, req
    flags = np.stack([train[c].to_numpy() for c in cols], 1) if len(train) else np.zeros((0, len(cols)), bool)
    return Rows(
        t_u=p.uidx(train["user_id"]),
        t_i=p.iidx(train["item_id"]),
        t_ts=train["ts"].to_numpy(),
        flags=flags,
        train_rc=train["rc"].fill_null(0).to_numpy(),
        neg_mat=neg_mat,
        index=index,
        e_u=p.uidx(evals["user_id"]),
        e_i=p.iidx(evals["item_id"]),
        e_flags={c: evals[c].to_numpy() for c in cols},
    )


def cold_item_codes(p: Plan) -> pl.DataFrame:
    """``p.items_tab`` with id code 0 for every item the run knows only from items.parquet: no event in
    the partitions read (so no train row, no same-request negative, no evaluation row). Such an item's own id-embedding
    row would never get a gradient and keep its random start, which then ranks it anywhere in the
    whole-catalog retrieval, above the trained items as often as not (a catalog listing many items
    never shown: items.parquet 5,000 rows beyond the events' 300 took the tiny world's exposure
    Recall@50 from 0.49 to 0.15). Coded 0, its id embedding is row 0, which starts at zero
    (csmf_core/model.py), and it is scored by its other features. An item of the event logs that the
    window does not train (first shown on an evaluation day) keeps its own, untrained row, as before
    (a choice, not a measurement: coding those 0 as well gave the same figures on the KuaiRand replay's
    first day). Measured cost where most of a catalog is cold: that KuaiRand model (one training day,
    1,688 catalog-only items of 7,583) went from conversion Recall@50 0.124 to 0.119 and fused
    exposure 0.181 to 0.179 (features-only vectors, an input the towers never trained on, rank those
    items a little higher than random rows did); the 3-day KuaiRand run moved in the 4th decimal.
    With `model.id_buckets` its bucket's
    row may be trained by other items; it is coded 0 all the same (not scored as those items). An item
    a base model trained (its code there not 0, its row not recycled since) keeps its code: its row
    holds what it learned. A base prepared before this rule (2026-12-05) coded every item, so a line
    started then keeps every code it had until its next full retrain. Ids keep their rows
    (csmf_core/idmap.py); only the id feature's code changes. With `loss.request_negatives: none` a
    same-request negative gets no gradient, but keeps its row here (prep does not read the loss).
    (Every item with a train row or a same-request negative is in the events: `p.item_in_events`.)"""
    trained = p.item_in_events.copy()
    if p.base is not None and p.base.item_codes is not None:
        base_codes = p.base.item_codes
        known = np.zeros(len(trained), bool)
        n = min(len(base_codes), len(trained))
        known[:n] = base_codes[:n] != 0
        known[1:][p.maps["items"].recycled] = False
        trained |= known
    trained[0] = False
    codes = p.items_tab["c_iid"].to_numpy()
    p.maps["items"].stats["untrained"] = int(len(codes) - 1 - trained[1:].sum())
    return p.items_tab.with_columns(pl.Series("c_iid", np.where(trained, codes, 0).astype(codes.dtype)))


def write_outputs(
    p: Plan,
    tmp: Path,
    train_tables,
    eval_table: pa.Table,
    counts: np.ndarray,
    by_level: list[int],
    n_train: int,
) -> dict:
    """Write users/items, the train parts (``train_tables``: an iterable of pa.Table, one per part),
    eval, popularity and meta.json into ``tmp``; returns the meta dict. ``counts``: `Rows.counts`."""
    p.items_tab = cold_item_codes(p)
    p.users_tab.write_parquet(tmp / "users.parquet")
    p.items_tab.write_parquet(tmp / "items.parquet")
    for side, name in SEEN_FILES.items():
        write_seen(tmp / name, p.maps[side])
    (tmp / "train").mkdir()
    train_parts = []
    for k, table in enumerate(train_tables):
        train_parts.append(tmp / "train" / f"part-{k:05d}.parquet")
        pq.write_table(table, train_parts[-1], row_group_size=max(table.num_rows, 1))
    pq.write_table(eval_table, tmp / "eval.parquet")
    pop = {"i": np.arange(p.n_items, dtype=np.int32)}
    for k, n in enumerate(p.names):
        pop[f"count_{n}"] = counts[k]
    pq.write_table(pa.table(pop), tmp / "popularity.parquet")
    hist = {"i": pop["i"]}
    for k, n in enumerate(p.names[1:]):
        hist[f"count_{n}"] = counts[len(p.names) + k]
    pq.write_table(pa.table(hist), tmp / HISTORY_COUNTS)
    meta = {
        "format_version": 1,
        "dataset": {"name": p.spec.name, "dir": str(p.dataset_dir)},
        "objectives": [{"name": n, "column": c} for n, c in p.objectives],
        "features": {"users": p.user_specs, "items": p.item_specs},
        "n_users": p.n_users,
        "n_items": p.n_items,
        "seq_len": p.seq_len,
        "n_req_neg": p.n_req_neg,
        "train_dates": p.train_d,
        "eval_dates": p.eval_d,
        "history_dates": p.needed,
        "eval_start_ts": p.eval_start,
        "rows": {"train": n_train, "eval": eval_table.num_rows, "train_by_level": by_level},
        "train_parts": [str(q.relative_to(tmp)) for q in train_parts],
        "id_maps": {"base": p.base.source if p.base is not None else None}
        | {side: p.maps[side].stats for side in ("users", "items")},
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return meta


def summary(p: Plan, out_dir: Path, meta: dict) -> PrepSummary:
    return PrepSummary(
        out_dir=out_dir,
        n_users=p.n_users,
        n_items=p.n_items,
        n_train=meta["rows"]["train"],
        n_eval=meta["rows"]["eval"],
        train_by_level=meta["rows"]["train_by_level"],
        train_dates=p.train_d,
        eval_dates=p.eval_d,
        train_parts=[out_dir / q for q in meta["train_parts"]],
        meta=meta,
    )


def read_feature_tables(p: Plan) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (
        _read_features(p.dataset_dir / "users.parquet", "user_id"),
        _read_features(p.dataset_dir / "items.parquet", "item_id"),
    )


def prepare(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    train_dates: str | list[str] | tuple[str, str],
    eval_dates: str | list[str] | tuple[str, str],
    seq_len: int = 20,
    n_req_neg: int = 10,
    overwrite: bool = False,
    part_rows: int = 1_000_000,
    base: BaseMaps | None = None,
    id_buckets: int | None = None,
    evict_after_days: int | None = None,
) -> PrepSummary:
    """Build the model-ready dataset of ``dataset_dir`` (a path or a URI, csmf_core.fsutil) into ``out_dir``.

    Dates: a ``tuple`` (start, end) means every calendar date from start to end inclusive, a ``list``
    means exactly those dates, a ``str`` one date. Every training date must precede the first
    evaluation date. ``seq_len`` = L (history length), ``n_req_neg`` = M (request negatives per row),
    ``part_rows`` = rows per train part (one row group each). Datasets without request ids or
    unexposed rows get all-zero ``neg`` lists. The objectives come from dataset.yaml. ``eval_dates=[]``
    builds training rows only (an empty ``eval`` table) and opens no partition after the last
    training date: what `csmf tune` trains on, so evaluation days are never read while tuning.
    A non-empty out_dir is refused unless ``overwrite``. The same output, sharded by user across
    processes or machines: csmf_core/prep_sharded.py.

    Id maps (csmf_core/idmap.py): without ``base`` users and items get rows in ascending id order; with
    the maps of a previous model (``BaseMaps.read(bundle / "features")``) every id it knew keeps its
    row and its feature encodings, new ids get the next rows, and with ``evict_after_days`` new ids
    take the rows of ids unseen for that many days first. ``id_buckets`` hashes the id features
    (``c_uid`` / ``c_iid``) into that many rows. Each row's last-seen day goes to
    ``users_seen.parquet`` / ``items_seen.parquet``; the counts to meta.json ``id_maps``.
    """
    p = plan(
        dataset_dir,
        out_dir,
        train_dates=train_dates,
        eval_dates=eval_dates,
        seq_len=seq_len,
        n_req_neg=n_req_neg,
        overwrite=overwrite,
        base=base,
        id_buckets=id_buckets,
        evict_after_days=evict_after_days,
    )
    out_dir = Path(out_dir)
    ev = p.events()
    users_df, items_df = read_feature_tables(p)
    req, queries = row_queries(ev, p.cols, n_req_neg)
    *frames, uids, iids = pl.collect_all(
        [*queries, *vocab_queries(ev, users_df, items_df)], engine="streaming"
    )
    p.set_vocab(uids, iids, users_df, items_df)
    rows = build_rows(p, req, frames)
    del frames
    level, n_train = rows.level, len(rows.t_u)

    tmp = fresh_temp_dir(out_dir, overwrite, marker="meta.json")
    try:
        slices = [slice(lo, lo + part_rows) for lo in range(0, max(n_train, 1), part_rows)]
        by_level = np.bincount(level, minlength=len(p.names))[: len(p.names)].tolist()
        meta = write_outputs(
            p,
            tmp,
            (rows.train_slice(p, s, level) for s in slices),
            rows.eval_table(p),
            rows.counts(p),
            by_level,
            n_train,
        )
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary(p, out_dir, meta)
