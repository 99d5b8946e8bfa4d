"""Sharded prep as Prefect tasks on prefect-dask's DaskTaskRunner (a LocalCluster of 2 worker
processes): the model-ready output equals single-process prep's, and the shards ran in the workers.

The run is started from inside a Prefect task of a flow, as the daily flow's `ingest` task starts it.
"""

from __future__ import annotations

import os

import pytest
from prefect import flow, task

from csmf_core import prep, synth
from csmf_core.config import build_config
from flows.ingest_dask import prepare_on_dask
from tests.conftest import assert_same_model_ready

pytestmark = pytest.mark.integration

KW = {"train_dates": ("2026-01-01", "2026-01-05"), "eval_dates": "2026-01-06", "seq_len": 5, "n_req_neg": 4}


@task
def _ingest_like(ds: str, out: str, work: str) -> prep.PrepSummary:
    cfg = build_config(None, ["ingest.dask=local", "ingest.workers=2", "ingest.shards=3"])
    return prepare_on_dask(cfg.ingest, ds, out, work, part_rows=700, **KW)


@flow
def _outer(ds: str, out: str, work: str) -> prep.PrepSummary:
    return _ingest_like(ds, out, work)


def test_sharded_prep_on_a_local_dask_cluster_equals_single_process_prep(prefect_harness, tmp_path):
    ds = tmp_path / "ds"
    synth.generate(ds, "tiny", seed=0)
    single = prep.prepare(ds, tmp_path / "single", part_rows=700, **KW)
    got = _outer(ds.as_uri(), str(tmp_path / "sharded"), str(tmp_path / "work"))
    assert_same_model_ready(tmp_path / "single", tmp_path / "sharded")
    assert got.n_train == single.n_train and len(got.train_parts) == len(single.train_parts) > 1
    info = got.meta["sharded"]
    assert info["shards"] == 3 and sum(info["shard_rows"]) == single.n_train
    assert info["workers"] and os.getpid() not in info["workers"]  # the shards ran in Dask's workers
    assert all(v > 0 for v in info["peak_rss"].values())
