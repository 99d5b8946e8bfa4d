"""Sharded prep (csmf_core/prep_sharded.py) writes exactly what single-process prep writes.

The per-shard and reduction logic is compared in one process here; the same passes as Prefect tasks
on a local Dask cluster: tests/integration/test_ingest_dask.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from csmf_core import prep
from csmf_core.prep_sharded import prepare_sharded, shard_of, shard_pass, vocab_pass
from tests.conftest import assert_same_model_ready

TRAIN = ("2026-01-01", "2026-01-05")
EVAL = "2026-01-06"
KW = {"train_dates": TRAIN, "eval_dates": EVAL, "seq_len": 5, "n_req_neg": 4}


@pytest.mark.parametrize("n_shards", [1, 3])
def test_sharded_prep_equals_single_process_prep(tiny_world, tmp_path, n_shards):
    ds = tiny_world["ds"]
    single = prep.prepare(ds, tmp_path / "single", part_rows=700, **KW)
    assert len(single.train_parts) > 1  # the reduction's part boundaries are exercised
    sharded = prepare_sharded(
        ds, tmp_path / "sharded", n_shards=n_shards, work_dir=tmp_path / "w", part_rows=700, **KW
    )
    assert sharded.n_train == single.n_train and sharded.train_by_level == single.train_by_level
    assert_same_model_ready(tmp_path / "single", tmp_path / "sharded")


def test_shards_partition_the_users_and_rows(tiny_world, tmp_path):
    ds, n = tiny_world["ds"], 3
    plan_file = vocab_pass(ds, tmp_path / "w", tmp_path / "out", **KW)
    shards = [shard_pass(plan_file, k, n, tmp_path / "w") for k in range(n)]
    users = []
    for s in shards:
        table = pa.ipc.open_file(pa.memory_map(s["train"])).read_all()
        assert table.num_rows == s["n_train"] > 0
        users.append(set(table["u"].to_pylist()))
        ts = table["ts"].to_numpy()
        assert (np.diff(ts) >= 0).all()  # each shard is in output order already
    assert not (users[0] & users[1]) and not (users[0] & users[2]) and not (users[1] & users[2])
    single = prep.prepare(ds, tmp_path / "single", **KW)
    assert sum(s["n_train"] for s in shards) == single.n_train
    # the shard map is the user hash, independent of anything but the id
    ids = pl.DataFrame({"user_id": [1, 2, 3, 1]}).select(shard_of(n))["user_id"].to_list()
    assert ids[0] == ids[3] and all(0 <= k < n for k in ids)


def test_a_request_id_shared_by_two_users_shards_as_one_process_preps_it(tiny_world, tmp_path):
    """A request id two users share is one request per user (csmf_core.prep.row_queries), so shards
    of users write what one process writes (sharded prep refused such data before)."""
    ds = tmp_path / "ds"
    shutil.copytree(tiny_world["ds"], ds)
    part = sorted((ds / "events" / "dt=2026-01-02").glob("*.parquet"))[0]
    df = pl.read_parquet(part)
    users = pl.DataFrame({"user_id": df["user_id"].unique().sort()}).with_columns(k=shard_of(3))
    a = users.row(0, named=True)
    b = users.filter(pl.col("k") != a["k"]).row(0, named=True)  # a user of another shard
    rid = df.filter(pl.col("user_id") == a["user_id"])["request_id"][0]
    other = df.with_row_index().filter(pl.col("user_id") == b["user_id"])["index"]
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()).is_in(other.implode()))
        .then(pl.lit(rid))
        .otherwise(pl.col("request_id"))
        .alias("request_id")
    )
    df.write_parquet(part)
    single = prep.prepare(ds, tmp_path / "single", **KW)
    sharded = prepare_sharded(ds, tmp_path / "sharded", n_shards=3, work_dir=tmp_path / "w", **KW)
    assert sharded.n_train == single.n_train
    assert_same_model_ready(tmp_path / "single", tmp_path / "sharded")
