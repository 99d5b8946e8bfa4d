"""Point-in-time item statistics (`data.item_stats`): how often each item reached each objective
on the days before, as numeric inputs of the item tower.

Why: a popularity ranking (items by their positives in the training window) is a strong floor on
sparse objectives, and the item tower sees ids and content features but no count. On the KuaiRand
slice they raise every objective's mean over 5 seeds and take the conversion stage's own nDCG@50
from below popularity's to level with it (docs/method-notes.md).
They are built the way the behaviour sequences are, point in time:

    raw[d, i, (t, w)] = log(1 + positives of objective t for item i per day, over the days
                        [d - w, d - 1] that have train rows)

for each objective t and each window w (days) in ``windows``; a positive of objective t is a train
row with level >= t. Row d only counts days strictly before d: a training row never sees its own
day or later. Dividing by the days that have data (instead of w) keeps the first days of the window
on the same scale; the first day has no earlier day and gets zeros. Each column is standardised
with the mean and std of its cells over the training days (every day before the evaluation day, the
validation days included: item frequencies only, as for the popularity counts) and real items.

Which day reads which row: in training, a row scores its positive, its in-batch negatives and its
request negatives all with its own day's row (csmf_core/train.py), as the catalog is scored at
serving. Scoring another row's positive with *that* row's day was measured to be a shortcut: the
statistics and the behaviour sequences both tell the day, the model learned to match users to
items by day, training loss fell and validation recall fell with it (generated data: exposure
Recall@50 0.23 instead of 0.32). The catalog is encoded (for
evaluation and the per-stage metrics) with the row of the first evaluation day, which
counts every training day and none of the evaluation days; the validation users of
``data.val_days`` see the row of the first validation day. The serving bundle stores the row as of
the day after its users' histories end (``history_until``, the last evaluation day by default),
every event up to then included (csmf_core/bundle.py): a request on that day reads that day's row,
as a training row reads its own day's.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from csmf_core.prep import DAY_US


def column_names(objectives: list[str], windows: tuple[int, ...]) -> list[str]:
    """Names of the statistics columns, objective-major: ``stat_<objective>_<w>d``."""
    return [f"stat_{o}_{w}d" for o in objectives for w in windows]


def check_windows(windows) -> tuple[int, ...]:
    w = tuple(int(x) for x in windows)
    if not w or min(w) < 1 or len(set(w)) != len(w):
        raise ValueError(f"item statistics windows must be distinct whole days >= 1, got {list(windows)}")
    return w


def item_rates(
    day: np.ndarray,
    item: np.ndarray,
    level: np.ndarray,
    *,
    n_items: int,
    n_objectives: int,
    first_day: int,
    last_day: int,
    windows: tuple[int, ...],
) -> np.ndarray:
    """(last_day - first_day + 1, n_items, n_objectives * len(windows)) float32 raw statistics.

    day, item, level: (R,) per train row (UTC day number, item index, deepest objective reached);
    rows outside [first_day, last_day - 1] are ignored. Row d of the output is as of the start of day
    first_day + d. Columns as `column_names`.
    """
    windows = check_windows(windows)
    n_days = last_day - first_day + 1
    if n_days < 1:
        raise ValueError(
            f"item statistics: the first train day ({day_to_date(first_day)}) is after the evaluation day "
            f"({day_to_date(last_day)})"
        )
    day, item, level = (np.asarray(a, dtype=np.int64) for a in (day, item, level))
    keep = (day >= first_day) & (day < last_day)
    day, item, level = day[keep] - first_day, item[keep], level[keep]
    has_data = np.zeros(n_days, dtype=np.int64)
    has_data[np.unique(day)] = 1
    cum_days = np.concatenate([[0], np.cumsum(has_data)])  # cum_days[d] = days with data before d
    d_idx = np.arange(n_days)
    out = np.zeros((n_days, n_items, n_objectives * len(windows)), dtype=np.float32)
    for t in range(n_objectives):
        m = level >= t
        counts = np.bincount(day[m] * n_items + item[m], minlength=n_days * n_items)
        counts = counts.reshape(n_days, n_items).astype(np.float64)
        cum = np.concatenate([np.zeros((1, n_items)), np.cumsum(counts, axis=0)])  # cum[d] = days < d
        for k, w in enumerate(windows):
            lo = np.maximum(d_idx - w, 0)
            total = cum[d_idx] - cum[lo]
            n_seen = (cum_days[d_idx] - cum_days[lo]).astype(np.float64)[:, None]
            rate = np.divide(total, n_seen, out=np.zeros_like(total), where=n_seen > 0)
            out[:, :, t * len(windows) + k] = np.log1p(rate)
    return out


@dataclass
class ItemStats:
    """Standardised statistics of a model-ready dataset. values: (D, N_items, k) float32, row d =
    as of UTC day first_day + d; the last row is the first evaluation day (eval_day)."""

    values: np.ndarray
    first_day: int
    eval_day: int
    windows: tuple[int, ...]
    columns: list[str]
    mean: np.ndarray  # (k,) of the raw statistics, for standardising another dataset the same way
    std: np.ndarray

    def at(self, day: int) -> np.ndarray:
        """(N_items, k) as of UTC day `day`."""
        if not self.first_day <= day <= self.eval_day:
            raise ValueError(f"item statistics cover days {self.first_day}..{self.eval_day}, not {day}")
        return self.values[day - self.first_day]

    def describe(self, as_of: int | None = None) -> dict:
        """What a bundle records (bundle.json "item_stats"); as_of: the day of the stored row (default
        the first evaluation day)."""
        return {
            "windows": list(self.windows),
            "columns": self.columns,
            "as_of": day_to_date(self.eval_day if as_of is None else as_of),
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std],
        }


def day_number(date: str) -> int:
    return (dt.date.fromisoformat(date) - dt.date(1970, 1, 1)).days


def day_to_date(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=int(day))).isoformat()


def standardise(raw: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = (raw - mean) / np.where(std > 0, std, 1.0)
    out[..., 0, :] = 0.0  # item row 0 = unknown item: the numeric features' cold-start value
    return out.astype(np.float32)


def model_ready_rows(model_ready_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(day, item, level) int64 of every train row of a model-ready dataset (columns ts, i, level only)."""
    path = Path(model_ready_dir)
    meta = json.loads((path / "meta.json").read_text())
    parts = [pq.read_table(path / p, columns=["ts", "i", "level"]) for p in meta["train_parts"]]
    t = pa.concat_tables(parts) if parts else None
    if t is None or t.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    ts = t["ts"].cast(pa.int64()).to_numpy()
    return (
        np.floor_divide(ts, DAY_US),
        t["i"].to_numpy().astype(np.int64),
        t["level"].to_numpy().astype(np.int64),
    )


def serving_row(
    stats: ItemStats, day: np.ndarray, item: np.ndarray, level: np.ndarray, as_of: int
) -> np.ndarray:
    """(N_items, k) statistics as of the start of UTC day `as_of` from these rows (the training rows
    plus, for a serving bundle, the evaluation days' rows), standardised as `stats` (the training's)."""
    first = max(stats.first_day, as_of - max(stats.windows))  # the last row reads no earlier day
    raw = item_rates(
        day, item, level, n_items=stats.values.shape[1], n_objectives=len(stats.columns) // len(stats.windows),
        first_day=first, last_day=as_of, windows=stats.windows,
    )[-1]  # fmt: skip
    return standardise(raw, stats.mean, stats.std)


def model_ready_item_stats(
    model_ready_dir: str | Path,
    windows,
    *,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> ItemStats:
    """Statistics of a model-ready dataset (csmf_core/prep.py) from its train rows' ts, i and level
    (read column by column, whatever the train loader). mean / std: standardise with these (another
    model's) instead of this dataset's own."""
    path = Path(model_ready_dir)
    meta = json.loads((path / "meta.json").read_text())
    windows = check_windows(windows)
    objectives = [o["name"] for o in meta["objectives"]]
    # the first evaluation day, or for training-only data (prep(eval_dates=[])) the day after the last
    # training date: the statistics end where the rows do
    eval_day = (
        day_number(meta["eval_dates"][0]) if meta["eval_dates"] else int(meta["eval_start_ts"]) // DAY_US
    )
    day, item, level = model_ready_rows(path)
    first = int(day.min()) if len(day) else eval_day
    raw = item_rates(
        day, item, level, n_items=int(meta["n_items"]), n_objectives=len(objectives),
        first_day=first, last_day=eval_day, windows=windows,
    )  # fmt: skip
    if mean is None or std is None:
        n_train_days = len(np.unique(day[day < eval_day]))
        if n_train_days < 2:
            raise ValueError(
                f"{path}: data.item_stats needs train rows on at least 2 days before the evaluation day "
                f"(found {n_train_days}): the first day has no earlier day, so every training row would see "
                "empty statistics; widen data.train_days or turn data.item_stats off"
            )
        train_cells = raw[: max(len(raw) - 1, 1), 1:].reshape(-1, raw.shape[2])
        mean, std = train_cells.mean(axis=0), train_cells.std(axis=0)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    values = standardise(raw, mean, std)
    return ItemStats(values, first, eval_day, windows, column_names(objectives, windows), mean, std)
