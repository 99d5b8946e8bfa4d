"""Stable id maps: which row of the model's tables each original user / item id has, across runs.

A model-ready dataset (csmf_core/prep.py) numbers its users and items: row r of users.parquet is user
index r (row 0 = unknown). A run from scratch numbers the ids it reads in ascending id order. A run
that starts from a previous model (`train.mode: incremental`, csmf_core/warm.py) passes that model's
maps as a `BaseMaps` and `assign_rows` keeps them:

* every id of the base keeps its row (so its embedding rows carry over unchanged);
* ids new since then get rows after the base's rows, in ascending id order; a warm start initialises
  them exactly as a model built from scratch with the run's `model.init_seed` initialises that row;
* with `evict_after_days = N`, an id of the base whose last-seen day is N or more days before the
  run's last training day (and before its first: an id with training rows is never evicted) is
  *evicted when a row is needed*: new ids take the rows of evicted ids first (oldest
  last-seen first, then lowest row), and such a recycled row is initialised like a new row. Evicted
  ids not needed for a new id keep their row and stay served until a later run needs it. So the map
  never has holes (every row >= 1 has one id), a kept id's row never moves, and the tables grow only
  when no evictable row is left (they never shrink: shrinking would move rows). An evicted id is
  unknown from then on: its events in older partitions drop out of behaviour sequences (as items
  outside a model's vocabulary do in the serving bundle), and it is served as a cold start.

Last-seen day (int32 UTC day number, csmf_core/item_stats.day_number) = the last day the id occurs in
an event partition the run read (any row, exposed or not); an id seen only in the feature table keeps
its base value (a feature table listing every id does not keep them all from eviction), or, when new,
the run's last training day. An evicted id still listed in the feature table is such a new id in the
next run: it gets a fresh row again (ids are not remembered once evicted). Stored per row in `users_seen.parquet` /
`items_seen.parquet` (columns `last_seen`, `recycled`: the row was given to a new id by this run), which
travel with the model-ready features into the serving bundle (csmf_core/bundle.py).

`model.id_buckets = B` bounds the id-embedding tables for unbounded vocabularies: the id feature of a
row (`c_uid` / `c_iid`) is 1 + splitmix64(id) mod B instead of the row itself, so the table has B + 1
rows whatever the number of ids. Rows of users.parquet / items.parquet (features, behaviour sequences,
the serving index) stay one per id; only the id embedding is shared. Ids sharing a bucket share its
embedding row: `collisions` = ids - distinct buckets used, logged by prep (meta.json `id_maps`) and in
MLflow (`prep/<side>/id_collisions`). The hash is stateless, so buckets are stable across runs.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SEEN_FILES = {"users": "users_seen.parquet", "items": "items_seen.parquet"}
ID_COLUMNS = {"users": "user_id", "items": "item_id"}
_M64 = (1 << 64) - 1


def hash_buckets(ids: np.ndarray, buckets: int) -> np.ndarray:
    """(n,) int64 ids -> (n,) int64 buckets in [1, buckets]: 1 + splitmix64(id as uint64) mod buckets."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(buckets)).astype(np.int64) + 1


def collisions(buckets: np.ndarray) -> int:
    """Ids that share their bucket with another id: ids - distinct buckets used."""
    return int(len(buckets) - len(np.unique(buckets)))


@dataclass
class SideMap:
    """One side's map: ids[r - 1] = the id of row r (r >= 1), last_seen[r - 1] its last-seen day."""

    ids: np.ndarray  # (n - 1,) int64, unique
    last_seen: np.ndarray  # (n - 1,) int32 UTC day numbers


@dataclass
class BaseMaps:
    """The id maps (and feature encodings) of the model a run starts from."""

    users: SideMap
    items: SideMap
    features: dict  # meta.json "features" of the base: categorical values and numeric mean / std
    source: str = ""
    # the base's item id codes (items.parquet c_iid, row r at r): 0 = an item it did not train
    # (csmf_core/prep.py cold_item_codes); read with the maps, so a reduce worker needs no base files
    item_codes: np.ndarray | None = None

    def side(self, name: str) -> SideMap:
        return {"users": self.users, "items": self.items}[name]

    @classmethod
    def read(cls, features_dir: str | Path) -> BaseMaps:
        """The maps of a model-ready directory or a bundle's `features/` (users/items.parquet, meta.json,
        and the *_seen.parquet files; a base without them counts every id as seen on its last
        training day)."""
        from csmf_core.bundle import read_vocab
        from csmf_core.item_stats import day_number

        d = Path(features_dir)
        meta = json.loads((d / "meta.json").read_text())
        default_day = day_number(max(meta["train_dates"]))
        sides = {}
        for side, col in ID_COLUMNS.items():
            ids = read_vocab(d / f"{side}.parquet", col)
            seen_path = d / SEEN_FILES[side]
            if seen_path.is_file():
                seen = pq.read_table(seen_path, columns=["last_seen"])["last_seen"].to_numpy()[1:]
                if len(seen) != len(ids):
                    raise ValueError(f"{seen_path}: {len(seen) + 1} rows, {side}.parquet has {len(ids) + 1}")
            else:
                seen = np.full(len(ids), default_day, np.int32)
            sides[side] = SideMap(ids, seen.astype(np.int32))
        codes = pq.read_table(d / "items.parquet", columns=["c_iid"])["c_iid"].to_numpy()
        return cls(sides["users"], sides["items"], meta["features"], str(d), codes)


@dataclass
class Assigned:
    """What `assign_rows` decided for one side."""

    ids: np.ndarray  # (n - 1,) id of row r at [r - 1]
    last_seen: np.ndarray  # (n - 1,) int32
    recycled: np.ndarray  # (n - 1,) bool: a base row given to a new id (initialised afresh)
    stats: dict

    @functools.cached_property
    def _order(self) -> np.ndarray:
        """argsort of ``ids``, computed once: prep looks up train, eval and every history frame."""
        return np.argsort(self.ids, kind="stable")

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Original ids -> rows (int32); 0 for an id not in the map (an evicted id)."""
        if not len(self.ids):
            return np.zeros(len(ids), np.int32)
        order = self._order
        pos = np.searchsorted(self.ids, ids, sorter=order)
        rows = order[np.clip(pos, 0, len(order) - 1)]
        return np.where(self.ids[rows] == ids, rows + 1, 0).astype(np.int32)


def assign_rows(
    ids: np.ndarray,
    seen: np.ndarray,
    base: SideMap | None,
    *,
    today: int,
    evict_after_days: int | None = None,
    first_day: int | None = None,
) -> Assigned:
    """Rows for the ids a run reads. ids (m,) sorted unique int64; seen (m,) int32 their last-seen day
    in this run (-1 = only in the feature table). Without a base: ascending id order (a run from
    scratch). With one: the module docstring's rules. `today` = the run's last training day; an id
    seen on or after `first_day` (the run's first training day) is never evicted, whatever
    `evict_after_days`: it has training or evaluation rows."""
    ids = np.asarray(ids, np.int64)
    read = np.asarray(seen, np.int32)
    seen = np.where(read >= 0, read, today).astype(np.int32)  # a new id only in the feature table: today
    if base is None:
        n = len(ids)
        return Assigned(ids, seen, np.zeros(n, bool), {"ids": n, "kept": 0, "new": n, "recycled": 0})
    b_ids, b_seen = base.ids, base.last_seen.copy()
    known = np.isin(ids, b_ids)
    new_ids, new_seen = ids[~known], seen[~known]
    # base ids seen again in an event: their last-seen day moves forward; one only in the feature
    # table (-1) keeps the base's day, or a feature table that lists every id would keep each one
    # from ever being evicted
    order = np.argsort(b_ids, kind="stable")
    if known.any():
        pos = order[np.searchsorted(b_ids, ids[known], sorter=order)]
        b_seen[pos] = np.maximum(b_seen[pos], read[known])
    out_ids, out_seen = b_ids.copy(), b_seen
    recycled = np.zeros(len(b_ids), bool)
    n_recycled = 0
    if evict_after_days is not None and len(new_ids):
        old_enough = today - b_seen >= evict_after_days
        if first_day is not None:
            old_enough &= b_seen < first_day
        evictable = np.flatnonzero(old_enough)
        evictable = evictable[np.lexsort((evictable, b_seen[evictable]))]  # oldest first, then row
        take = evictable[: len(new_ids)]
        n_recycled = len(take)
        out_ids[take], out_seen[take], recycled[take] = new_ids[:n_recycled], new_seen[:n_recycled], True
        new_ids, new_seen = new_ids[n_recycled:], new_seen[n_recycled:]
    out_ids = np.concatenate([out_ids, new_ids])
    out_seen = np.concatenate([out_seen, new_seen]).astype(np.int32)
    recycled = np.concatenate([recycled, np.zeros(len(new_ids), bool)])
    stats = {
        "ids": int(len(out_ids)),
        "kept": int(len(b_ids) - n_recycled),
        "new": int(len(new_ids) + n_recycled),
        "recycled": int(n_recycled),
        "base_rows": int(len(b_ids) + 1),
    }
    return Assigned(out_ids, out_seen, recycled, stats)


def write_seen(path: Path, a: Assigned) -> None:
    """users_seen.parquet / items_seen.parquet: row r = row r of the table (row 0: the unknown id)."""
    table = {
        "last_seen": pa.array(np.concatenate([[-1], a.last_seen]).astype(np.int32)),
        "recycled": pa.array(np.concatenate([[False], a.recycled])),
    }
    pq.write_table(pa.table(table), path)


def read_recycled(features_dir: Path, side: str) -> np.ndarray:
    """(n,) bool per row of `side`: rows this run gave to a new id (all False without the file)."""
    path = Path(features_dir) / SEEN_FILES[side]
    if not path.is_file():
        return np.zeros(0, bool)
    return pq.read_table(path, columns=["recycled"])["recycled"].to_numpy(zero_copy_only=False)
