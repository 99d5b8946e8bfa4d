"""Serving bundle writer: everything one trained CSMF model needs to answer requests, in one directory.

How to run (usually through csmf_core.serving, which re-exports `write_bundle`):

    from csmf_core.bundle import write_bundle
    write_bundle("bundle", checkpoint_dir="ckpt", model_ready_dir="mr", dataset_dir="data/synth-small",
                 config=cfg)

Bundle layout (built in a temp dir beside `out_dir` and renamed into place):

    checkpoint/          copy of the csmf_core.checkpoint directory (model.pt, masks/, checkpoint.json)
    index/               csmf_core.index.ItemIndex over the full-mode vectors of item indices >= 1,
                         ids = original item_id (index.faiss, ids.npy, index.json)
    features/            users.parquet, items.parquet, meta.json of the model-ready dataset, and
                         item_stats.parquet with data.item_stats as of the day after
                         history_until (training days and the evaluation days up to it counted,
                         standardised as in training; appended to the items' numeric columns)
    user_state.parquet   user_id int64, u int32 (user index >= 1), hist_<objective>
                         fixed_size_list<int32>[L] for every objective after the first, as of the end
                         of `history_until` (item indices of features/items.parquet)
    config.yaml          the CSMFConfig
    bundle.json          format_version, objectives, dim, n_items, n_users, seq_len, default_weights,
                         output_owners (D,), segment_sizes, index kind, history_until, item_stats
                         (windows, columns, as_of, mean, std; null without), dates,
                         config_digest, data_digest, created_at, extra

Only the full-mode item vectors are indexed: ownership is per unit and only the *user* side
changes with the mode or the objective weights (csmf_core.fusion), so one index serves them all.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from csmf_core.checkpoint import load_checkpoint
from csmf_core.config import CSMFConfig, check_objectives
from csmf_core.evaluate import item_matrix
from csmf_core.fsutil import local_dataset, reject_uri
from csmf_core.idmap import SEEN_FILES
from csmf_core.ids import as_id_array
from csmf_core.index import ItemIndex
from csmf_core.item_stats import (
    day_number,
    day_to_date,
    model_ready_item_stats,
    model_ready_rows,
    serving_row,
)
from csmf_core.model import TwoTower
from csmf_core.prep import DAY_US, HistoryIndex, ts_us
from csmf_core.rows import FeatureTables
from data_contracts import load_spec, partition_files, scan_partition

FORMAT_VERSION = 1
FEATURE_FILES = ("users.parquet", "items.parquet", "meta.json")
ITEM_STATS_FILE = "item_stats.parquet"  # features/: data.item_stats as of the day after history_until


# ---- reading model-ready pieces ------------------------------------------------------------------
def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file as an Arrow table, through `pq.ParquetFile`: unlike `pq.read_table`, it does not
    import pyarrow.dataset (and pandas with it), which is most of a serving command's start-up after
    torch."""
    with pq.ParquetFile(path) as f:
        return f.read(columns=columns)


def read_feature_tables(features_dir: Path, meta: dict) -> FeatureTables:
    """users/items.parquet of a model-ready dataset -> FeatureTables (row r = index r; row 0 = unknown:
    every categorical code 0 and every numeric 0, i.e. the cold-start row)."""

    def side(path: Path, specs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        table = read_parquet(path)
        n = table.num_rows
        cat = [table[s["name"]].to_numpy() for s in specs if s["kind"] == "categorical"]
        num = [table[s["name"]].to_numpy() for s in specs if s["kind"] == "numeric"]
        c = np.stack(cat, 1).astype(np.int64) if cat else np.zeros((n, 0), np.int64)
        v = np.stack(num, 1).astype(np.float32) if num else np.zeros((n, 0), np.float32)
        return torch.from_numpy(c), torch.from_numpy(v)

    uc, un = side(features_dir / "users.parquet", meta["features"]["users"])
    ic, inum = side(features_dir / "items.parquet", meta["features"]["items"])
    stats_path = features_dir / ITEM_STATS_FILE
    if stats_path.is_file():  # a bundle's item statistics (data.item_stats): more numeric columns
        t = read_parquet(stats_path)
        if t.num_rows != inum.shape[0] or not np.array_equal(t["i"].to_numpy(), np.arange(t.num_rows)):
            raise ValueError(f"{stats_path}: expected one row per item index 0..{inum.shape[0] - 1} in order")
        cols = [t[c].to_numpy().astype(np.float32) for c in t.column_names if c != "i"]
        inum = torch.cat([inum, torch.from_numpy(np.stack(cols, 1))], 1)
    return FeatureTables(uc, un, ic, inum)


def write_item_stats(path: Path, columns: list[str], values: np.ndarray) -> None:
    """(N_items, k) statistics of one day -> ``item_stats.parquet`` (i, then one column each)."""
    table = {"i": pa.array(np.arange(values.shape[0]), pa.int32())}
    table |= {c: pa.array(values[:, k], pa.float32()) for k, c in enumerate(columns)}
    pq.write_table(pa.table(table), path)


def read_vocab(path: Path, column: str) -> np.ndarray:
    """(n - 1,) original ids of rows 1..n-1 of a model-ready users/items.parquet (prep sorts them).

    Row 0 (the unknown user/item) holds a null, so the column must never go through `to_numpy` as a
    whole: pyarrow turns an int64 column with a null into float64, which corrupts every id above 2**53
    (csmf_core/ids.py). Rows >= 1 are sliced off first and read as int64, exactly.
    """
    col = read_parquet(path, columns=[column])[column]
    if col.type != pa.int64():
        raise ValueError(f"{path}: {column} has type {col.type}, expected int64 (as prep writes it)")
    rest = col.slice(1)
    if rest.null_count:
        raise ValueError(
            f"{path}: {column} has {rest.null_count} nulls in rows >= 1 (only row 0 may be null)"
        )
    ids = np.asarray(rest.to_numpy(), dtype=np.int64)
    if ids.size > 1 and not bool((ids[1:] > ids[:-1]).all()) and len(np.unique(ids)) != ids.size:
        raise ValueError(
            f"{path}: {column} of rows >= 1 must be unique (one row per id, as prep writes them)"
        )
    return ids


def vocab_order(vocab: np.ndarray) -> np.ndarray | None:
    """None when `vocab` is ascending (a run from scratch), else the permutation that sorts it (a
    warm-started model's id map, csmf_core/idmap.py): compute once and pass to `lookup_index`."""
    if vocab.size < 2 or bool((vocab[1:] > vocab[:-1]).all()):
        return None
    return np.argsort(vocab, kind="stable")


def lookup_index(vocab: np.ndarray, ids: np.ndarray, order: np.ndarray | None | bool = False) -> np.ndarray:
    """Original ids -> model-ready indices (row of the id: its position in `vocab` + 1); unknown ids -> 0.
    `vocab`: the ids of rows 1.. in row order (`read_vocab`); `order`: `vocab_order(vocab)` when known
    (False = work it out here)."""
    ids = as_id_array(ids, "ids")  # never through float: a float64 id above 2**53 may be a neighbour's
    if vocab.size == 0:
        return np.zeros(ids.shape, np.int64)
    if order is False:
        order = vocab_order(vocab)
    if order is None:
        pos = np.clip(np.searchsorted(vocab, ids), 0, vocab.size - 1)
    else:
        pos = order[np.clip(np.searchsorted(vocab, ids, sorter=order), 0, vocab.size - 1)]
    return np.where(vocab[pos] == ids, pos + 1, 0).astype(np.int64)


def _check_compatible(model: TwoTower, meta: dict, where: Path, n_item_stats: int = 0) -> None:
    """The checkpoint must have been trained on this vocabulary and these feature columns (plus
    `n_item_stats` item statistics columns, data.item_stats)."""
    for tower, side in ((model.user.spec, "users"), (model.item.spec, "items")):
        specs = meta["features"][side]
        cat = tuple((s["name"], int(s["cardinality"])) for s in specs if s["kind"] == "categorical")
        n_num = sum(s["kind"] == "numeric" for s in specs) + (n_item_stats if side == "items" else 0)
        if cat != tower.cat or n_num != tower.n_num:
            raise ValueError(
                f"{where}: the checkpoint's {side} tower expects categorical {list(tower.cat)} and "
                f"{tower.n_num} numeric columns, the model-ready features have {list(cat)} and {n_num}"
                + (
                    f" (with {n_item_stats} item statistics columns)"
                    if side == "items" and n_item_stats
                    else ""
                )
                + "; pass the model-ready directory and the config the checkpoint was trained with"
            )
    if model.user.spec.hist and model.user.spec.n_items != meta["n_items"]:
        raise ValueError(
            f"{where}: checkpoint has {model.user.spec.n_items} items, features {meta['n_items']}"
        )


# ---- user state ------------------------------------------------------------------------------------
def _label_columns(dataset_dir: Path, objectives: list[str]) -> dict[str, str]:
    cols = {o.name: o.column for o in load_spec(dataset_dir).objectives}
    if list(cols) != objectives:
        raise ValueError(
            f"{dataset_dir}/dataset.yaml has objectives {list(cols)} but the model was trained on "
            f"{objectives}; pass the canonical dataset the model-ready data was prepared from"
        )
    return cols


def user_histories(
    dataset_dir: str | Path,
    user_vocab: np.ndarray,
    item_vocab: np.ndarray,
    objectives: list[str],
    until: str,
    seq_len: int,
) -> dict[str, np.ndarray]:
    """Behaviour sequences of every user as of the end of day `until` (UTC).

    user_vocab (U-1,), item_vocab (N-1,): sorted original ids of user/item indices >= 1.
    Returns {objective: (U, L) int32} for every objective after the first, row u = user index u
    (row 0 = the unknown user: all zeros), most recent last, 0-padded on the left. Only events with
    ts strictly before midnight after `until` count (the same point-in-time rule as prep); events of
    items outside the model's vocabulary are dropped (they have no embedding), so the window holds
    the last L known items. Reads only the needed columns of the partitions up to `until`.
    """
    dataset_dir = local_dataset(dataset_dir)  # a path or a URI (csmf_core.fsutil)
    cols = _label_columns(dataset_dir, objectives)
    end_us = int(dt.datetime.fromisoformat(until).replace(tzinfo=dt.UTC).timestamp()) * 10**6 + DAY_US
    parts = [files for date, files in partition_files(dataset_dir).items() if date <= until]
    n_users = len(user_vocab) + 1
    out = {o: np.zeros((n_users, seq_len), np.int32) for o in objectives[1:]}
    if not parts or n_users == 1:
        return out
    frames = []
    for o in objectives[1:]:
        lfs = []
        for files in parts:
            lf = scan_partition(files)
            lfs.append(
                # null ids would turn the whole id column into floats in to_numpy (csmf_core/ids.py)
                lf.filter(pl.col(cols[o]).fill_null(False) & pl.col("user_id").is_not_null())
                .filter(pl.col("item_id").is_not_null())
                .select(pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64), ts_us(lf))
                .filter(pl.col("ts") < end_us)
            )
        frames.append(pl.concat(lfs))
    users = np.arange(1, n_users)
    for o, ev in zip(objectives[1:], pl.collect_all(frames)):
        u = lookup_index(user_vocab, ev["user_id"].to_numpy())
        i = lookup_index(item_vocab, ev["item_id"].to_numpy())
        keep = (u > 0) & (i > 0)
        index = HistoryIndex(u[keep], i[keep], ev["ts"].to_numpy()[keep])
        out[o][1:] = index.query(users, np.full(len(users), end_us, np.int64), seq_len)
    return out


def event_rows(
    dataset_dir: str | Path, objectives: list[str], item_vocab: np.ndarray, parts: list[list[Path]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(day, item, level) of the canonical events in `parts` (file lists of partitions) whose first
    objective is true, as prep's train rows (item index in `item_vocab`, 0 = unknown; level =
    objectives true - 1): the rows the serving bundle's item statistics add after the training window."""
    cols = _label_columns(local_dataset(dataset_dir), objectives)
    labels = [pl.col(cols[o]).cast(pl.Boolean).fill_null(False).cast(pl.Int64) for o in objectives]
    keys = pl.col("user_id").is_not_null() & pl.col("item_id").is_not_null()
    first = pl.col(cols[objectives[0]]).cast(pl.Boolean).fill_null(False)
    frames = []
    for files in parts:
        lf = scan_partition(files)
        frames.append(
            lf.filter(keys & first).select(
                pl.col("item_id").cast(pl.Int64), ts_us(lf), (pl.sum_horizontal(labels) - 1).alias("level")
            )
        )
    if not frames:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    ev = pl.concat(frames).collect()
    item = lookup_index(item_vocab, ev["item_id"].to_numpy())
    return np.floor_divide(ev["ts"].to_numpy(), DAY_US), item, ev["level"].to_numpy().astype(np.int64)


# ---- writing ---------------------------------------------------------------------------------------
def write_bundle(
    out_dir: str | Path,
    *,
    checkpoint_dir: str | Path,
    model_ready_dir: str | Path,
    dataset_dir: str | Path,
    config: CSMFConfig,
    index_kind: str = "flat",
    history_until: str | None = None,
    data_digest: str | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a serving bundle (layout in the module docstring) to `out_dir`; returns `out_dir`.

    history_until: last day (YYYY-MM-DD, UTC) whose events count in the users' behaviour sequences;
    default the last evaluation date of the model-ready dataset. data_digest / extra are recorded in
    bundle.json as given. A non-empty `out_dir` is refused unless overwrite=True; the bundle is built
    in a temp dir beside it and renamed into place, so readers see the old bundle or the new one.
    """
    reject_uri(out_dir, "bundle directory")
    out_dir, ckpt, mr = Path(out_dir), Path(checkpoint_dir), Path(model_ready_dir)
    data = local_dataset(dataset_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    missing = [str(mr / f) for f in FEATURE_FILES if not (mr / f).is_file()]
    if missing:
        raise FileNotFoundError(f"not a model-ready dataset (missing {missing}); run csmf_core.prep.prepare")
    meta = json.loads((mr / "meta.json").read_text())
    objectives = [o["name"] for o in meta["objectives"]]
    check_objectives(config, objectives)  # one fused weight per objective; before the heavy work
    model, owners, _ = load_checkpoint(ckpt)
    stats = model_ready_item_stats(mr, config.data.item_stats) if config.data.item_stats else None
    _check_compatible(model, meta, mr, len(stats.columns) if stats is not None else 0)
    until = history_until or meta["eval_dates"][-1]
    until = dt.date.fromisoformat(until).isoformat()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shutil.copytree(ckpt, tmp / "checkpoint")
        (tmp / "features").mkdir()
        for f in FEATURE_FILES:
            shutil.copy2(mr / f, tmp / "features" / f)
        for (
            f
        ) in SEEN_FILES.values():  # the id maps' last-seen days (csmf_core/idmap.py), when prep wrote them
            if (mr / f).is_file():
                shutil.copy2(mr / f, tmp / "features" / f)
        item_ids = read_vocab(mr / "items.parquet", "item_id")
        if stats is not None:  # as of the day after history_until, the day a request reads them
            stats_as_of = day_number(until) + 1
            if stats_as_of < stats.first_day:
                raise ValueError(
                    f"history_until {until} is before the first training day {day_to_date(stats.first_day)}"
                )
            # every partition after the training window up to history_until (the histories' days)
            last_train = max(meta["train_dates"])
            after = [f for date, f in partition_files(data).items() if last_train < date <= until]
            rows = [model_ready_rows(mr), event_rows(data, objectives, item_ids, after)]
            day, item, level = (np.concatenate(x) for x in zip(*rows))
            row = serving_row(stats, day, item, level, stats_as_of)
            write_item_stats(tmp / "features" / ITEM_STATS_FILE, stats.columns, row)
        tables = read_feature_tables(tmp / "features", meta)
        vecs = item_matrix(model, tables).numpy()[1:]
        index = ItemIndex.build(item_ids, vecs, index_kind)
        index.save(tmp / "index")

        user_ids = read_vocab(mr / "users.parquet", "user_id")
        hists = user_histories(data, user_ids, item_ids, objectives, until, int(meta["seq_len"]))
        state = {
            "user_id": pa.array(user_ids, pa.int64()),
            "u": pa.array(np.arange(1, len(user_ids) + 1), pa.int32()),
        }
        for o, h in hists.items():
            state[f"hist_{o}"] = pa.FixedSizeListArray.from_arrays(
                pa.array(h[1:].ravel(), pa.int32()), h.shape[1]
            )
        pq.write_table(pa.table(state), tmp / "user_state.parquet")

        cfg_plain = json.loads(json.dumps(config.to_dict()))  # tuples -> lists for safe_dump
        (tmp / "config.yaml").write_text(
            "# csmf config of this bundle (load with csmf_core.config.load_config)\n"
            + yaml.safe_dump(cfg_plain, sort_keys=False)
        )
        out_owners = owners.output_owners().long()
        info = {
            "format_version": FORMAT_VERSION,
            "objectives": objectives,
            "dim": int(model.cfg.dim),
            "n_items": int(len(item_ids)),
            "n_users": int(len(user_ids)),
            "seq_len": int(meta["seq_len"]),
            "default_weights": [float(w) for w in config.eval.fused_weights],
            "output_owners": out_owners.tolist(),
            "segment_sizes": dict(
                zip(objectives, torch.bincount(out_owners, minlength=len(objectives)).tolist())
            ),
            "index": {"kind": index.kind, "params": index.params},
            "history_until": until,
            "item_stats": stats.describe(stats_as_of) if stats is not None else None,
            "train_dates": meta.get("train_dates"),
            "eval_dates": meta.get("eval_dates"),
            "dataset": meta.get("dataset"),
            "id_maps": meta.get("id_maps"),
            "config_digest": config.digest(),
            "data_digest": data_digest,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "extra": extra or {},
        }
        (tmp / "bundle.json").write_text(json.dumps(info, indent=1, default=str))
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return out_dir
