"""Sharded prep as Prefect tasks on prefect-dask's DaskTaskRunner (`ingest.dask: local | <address>`).

    summary = prepare_on_dask(cfg.ingest, source, out_dir, work_dir, train_dates=..., eval_dates=...)

The flow `csmf-ingest-sharded` runs csmf_core/prep_sharded.py's passes as tasks: `prep-vocab`
(once), `prep-shard-<k>` (one per user shard, in parallel on the Dask workers), `prep-reduce`
(once). Tasks pass file paths, never tables: the vocabulary plan and every shard's output live in
`work_dir`, which every worker must be able to read and write (on a remote cluster: storage shared
by the workers and the flow at the same path). `ingest.dask: local` starts a LocalCluster of
`ingest.workers` processes with one thread each for the duration of the flow; a scheduler address
connects to that cluster instead. The local workers get this process's Prefect API
(`PREFECT_API_URL`, or the temporary local API) in their environment; the workers of a remote
cluster need `PREFECT_API_URL` of the production Prefect server set where they are started, and the
csmf package installed. Each shard task returns its worker's pid and peak RSS
(`PrepSummary.meta["sharded"]`), which bench/bench_ingest_dask.py prints.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from csmf_core.config import IngestConfig
from csmf_core.prep import PrepSummary, _resolve_dates
from csmf_core.prep_sharded import n_shards, peak_rss_bytes, reduce_pass, shard_pass, vocab_pass
from flows import prefect_compat

prefect_compat.install()  # a flow run's end does not wait for its heartbeat thread (flows/prefect_compat.py)


def api_url() -> str:
    """The Prefect API this process talks to: PREFECT_API_URL, or the temporary local API (started now
    when no flow has started it yet; the flow then uses the same one)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def task_runner(ingest: IngestConfig):
    """prefect-dask's DaskTaskRunner for `ingest.dask` (local cluster or a scheduler address)."""
    from prefect_dask import DaskTaskRunner

    if ingest.dask == "local":
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": ingest.workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
                "host": "127.0.0.1",
                # the workers report task states to this process's Prefect API: without it each worker
                # would start a temporary API of its own (minutes on a loaded machine, and invisible)
                "env": {"PREFECT_API_URL": api_url()},
            },
        )
    if ingest.dask == "off":
        raise ValueError("ingest.dask is off: call csmf_core.prep.prepare instead")
    return DaskTaskRunner(address=ingest.dask)


@task(name="prep-vocab", task_run_name="prep-vocab", cache_policy=NO_CACHE)
def prep_vocab(source: str, work_dir: str, out_dir: str, kwargs: dict) -> str:
    return str(vocab_pass(source, work_dir, out_dir, **kwargs))


@task(name="prep-shard", task_run_name="prep-shard-{k}", cache_policy=NO_CACHE)
def prep_shard(plan_file: str, k: int, n: int, work_dir: str) -> dict:
    return shard_pass(plan_file, k, n, work_dir)


@task(name="prep-reduce", task_run_name="prep-reduce", cache_policy=NO_CACHE)
def prep_reduce(plan_file: str, shards: list[dict], out_dir: str, overwrite: bool, part_rows: int) -> dict:
    s = reduce_pass(plan_file, shards, out_dir, overwrite=overwrite, part_rows=part_rows)
    return {"summary": s, "pid": os.getpid(), "peak_rss": peak_rss_bytes()}


@flow(name="csmf-ingest-sharded", flow_run_name="csmf-ingest-sharded")
def ingest_sharded(
    source: str, out_dir: str, work_dir: str, n: int, kwargs: dict, overwrite: bool, part_rows: int
) -> dict:
    plan_file = prep_vocab.submit(source, work_dir, out_dir, kwargs).result()
    shards = [f.result() for f in [prep_shard.submit(plan_file, k, n, work_dir) for k in range(n)]]
    reduced = prep_reduce.submit(plan_file, shards, out_dir, overwrite, part_rows).result()
    return {"shards": shards, **reduced}


def prepare_on_dask(
    ingest: IngestConfig,
    source: str | Path,
    out_dir: str | Path,
    work_dir: str | Path,
    *,
    part_rows: int = 1_000_000,
    **plan_kw,
) -> PrepSummary:
    """`csmf_core.prep.prepare`'s output, built by the sharded flow on the Dask cluster of `ingest`.
    ``plan_kw``: `prep_sharded.vocab_pass`'s keywords (id maps: ``base_dir`` is the starting model's
    features directory, read by the vocabulary pass)."""
    n = n_shards(ingest)
    overwrite = plan_kw.get("overwrite", False)
    kwargs = plan_kw | {
        "train_dates": _resolve_dates(plan_kw["train_dates"]),  # explicit lists: a tuple (a range)
        "eval_dates": _resolve_dates(plan_kw["eval_dates"]),  # would not survive Prefect's serialisation
        "base_dir": None if plan_kw.get("base_dir") is None else str(plan_kw["base_dir"]),
    }
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    runner_flow = ingest_sharded.with_options(task_runner=task_runner(ingest))
    out = runner_flow(str(source), str(out_dir), str(work_dir), n, kwargs, overwrite, part_rows)
    summary: PrepSummary = out["summary"]
    summary.meta["sharded"] = {
        "dask": ingest.dask,
        "shards": n,
        "workers": sorted({s["pid"] for s in out["shards"]}),
        "peak_rss": {
            **{f"shard-{s['shard']}": s["peak_rss"] for s in out["shards"]},
            "reduce": out["peak_rss"],
        },
        "shard_pid": {f"shard-{s['shard']}": s["pid"] for s in out["shards"]},
        "shard_rows": [s["n_train"] for s in out["shards"]],
    }
    return summary
