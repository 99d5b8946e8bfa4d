"""The `ingest` task of both flows: the data contract, then model-ready data for the run's window.

    ready = ingest(run, cfg, max_violation_rate)      # inside a flow, after open_run
    ready.model_ready, ready.source, ready.objectives

Validation (data_contracts) runs first and fails the run on a broken contract, with the rule, file
and row count; rows of row-level rules are quarantined instead when `max_violation_rate` allows it,
and prep then reads a clean copy. The objectives come from dataset.yaml and are checked against the
config (`check_objectives`: one fused weight each) before prep, so no training is wasted on a config
that cannot fit. A daily run whose stage cache has this window's ingest (identical dataset digest,
config and code) copies that run's outputs instead (flows/resume.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from csmf_core.config import CSMFConfig, check_objectives
from csmf_core.idmap import BaseMaps
from csmf_core.prep import prepare
from csmf_core.prep_sharded import n_shards
from csmf_core.train import MIN_STAGE_ROWS
from data_contracts import load_spec, validate_dataset
from flows import reporting
from flows.names import RESUMED_PREFIX
from flows.resume import StageCache
from flows.runs import RunContext, child_run, transient


@dataclass(frozen=True)
class Ingested:
    """The validated, model-ready data of a run. source: the canonical dataset prep read."""

    model_ready: Path
    source: Path
    objectives: list[str]


@task(
    name="ingest",
    task_run_name="ingest",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def ingest(
    run: RunContext, cfg: CSMFConfig, max_violation_rate: float = 0.0, base: Path | None = None
) -> Ingested:
    """Validate the dataset (data contract), quarantine within the allowed rate, build model-ready data.
    base: the `features/` of the model an incremental run continues: its id maps are kept
    (csmf_core/idmap.py)."""
    logger = get_run_logger()
    hit = run.cache.lookup("ingest", -1) if run.cache is not None else None
    if hit is not None:
        return _resume(run, hit)
    with child_run(run, "ingest", kind="ingest") as tracker:
        qdir = run.workdir / "quarantine"
        report = validate_dataset(
            run.dataset_dir,
            dates=run.window.validate_dates,
            max_violation_rate=max_violation_rate,
            quarantine_dir=qdir if max_violation_rate > 0 else None,
            eval_dates=run.window.eval_dates,
        )
        reporting.log_validation(tracker, report)
        create_markdown_artifact(
            report.to_markdown(), key="csmf-validation", description=report.summary_line()
        )
        logger.info(report.summary_line())
        report.raise_if_errors()
        objectives = list(load_spec(run.dataset_dir).objective_names)
        check_objectives(cfg, objectives)  # dataset-dependent settings, before prep and training
        source = run.dataset_dir
        if report.quarantined:
            source = reporting.clean_copy(run.dataset_dir, run.window.validate_dates, run.workdir / "clean")
            logger.info("quarantined %s; training on the clean copy %s", report.quarantined, source)
        prep_args = {
            "train_dates": run.window.train_dates,
            "eval_dates": run.window.eval_dates,
            "seq_len": cfg.data.seq_len,
            "n_req_neg": cfg.data.n_req_neg,
            "overwrite": True,
            "id_buckets": cfg.model.id_buckets,
            "evict_after_days": cfg.model.evict_after_days,
        }
        if cfg.ingest.dask == "off":
            base_maps = BaseMaps.read(base) if base is not None else None
            summary = prepare(source, run.workdir / "model_ready", base=base_maps, **prep_args)
        else:  # sharded by user on a Dask cluster (flows/ingest_dask.py); the same model-ready output
            from flows.ingest_dask import prepare_on_dask

            logger.info("prep sharded on Dask (%s, %d shards)", cfg.ingest.dask, n_shards(cfg.ingest))
            shards = run.workdir / "prep-shards"
            summary = prepare_on_dask(
                cfg.ingest, source, run.workdir / "model_ready", shards, base_dir=base, **prep_args
            )
            shutil.rmtree(shards, ignore_errors=True)
        check_positives(summary.train_by_level, load_spec(run.dataset_dir), summary.train_dates, cfg)
        ids = summary.meta["id_maps"]
        logger.info(
            "id maps: users %s, items %s%s",
            ids["users"],
            ids["items"],
            f" (kept from {base})" if base is not None else "",
        )
        reporting.log_prep(tracker, summary)
    if run.cache is not None:
        outputs = {"model_ready": summary.out_dir} | ({"clean": source} if report.quarantined else {})
        run.cache.record(
            "ingest", -1, outputs, source_run=run.parent_run_id, extra={"objectives": objectives}
        )
    return Ingested(summary.out_dir, source, objectives)


def check_positives(by_level: list[int], spec, train_dates: list[str], cfg: CSMFConfig) -> None:
    """Fail before any training when an objective has fewer than 2 positive rows in the training
    days (a cascade stage trains on its objective's positives with in-batch negatives: one row has
    no negative), naming the objective, its column, the days and the count. by_level[k]: training
    rows whose deepest true objective is k (prep), so objective t's positives are sum(by_level[t:]).
    An incremental run is not checked: a stage with too few rows keeps what the model it continues
    had (csmf_core.cascade.Step.keep_if_few), so a sparse objective's quiet day updates the others."""
    if cfg.train.mode == "incremental":
        return
    for t, obj in enumerate(spec.objectives):
        n = sum(by_level[t:])
        if n < MIN_STAGE_ROWS:
            days = f"{train_dates[0]} .. {train_dates[-1]}" if train_dates else "(none)"
            raise ValueError(
                f"objective {obj.name} (column {obj.column}): {n} positive row(s) in the {len(train_dates)} "
                f"training day(s) {days}; its cascade stage needs at least 2 to train. " + _more_days(cfg)
            )


def _more_days(cfg: CSMFConfig) -> str:
    """What a user can do about an objective with too few training positives."""
    if cfg.data.train_days:
        return (
            f"Train on more days (data.train_days={cfg.data.train_days}; 0 = every partition before the "
            "evaluation day), evaluate on a later day, or leave the objective out of dataset.yaml"
        )
    return (
        "Every partition before the evaluation day is already used: evaluate on a later day or leave the "
        "objective out of dataset.yaml"
    )


def _resume(run: RunContext, hit: dict) -> Ingested:
    """Ingest of an earlier run with the same dataset digest, config and window: copy its outputs."""
    out = hit["outputs"]
    with child_run(run, "ingest", kind="ingest", resumed_from=hit["source_run"]):
        ready = StageCache.restore(out["model_ready"], run.workdir / "model_ready")
        source = (
            StageCache.restore(out["clean"], run.workdir / "clean") if "clean" in out else run.dataset_dir
        )
        run.parent().set_tags({f"{RESUMED_PREFIX}ingest": hit["source_run"]})
        create_markdown_artifact(
            f"Validation and prep resumed from MLflow run {hit['source_run']} (identical dataset digest "
            f"{run.data_digest}, config and window).",
            key="csmf-validation",
            description="resumed",
        )
    get_run_logger().info("ingest: resumed from MLflow run %s (%s)", hit["source_run"], out["model_ready"])
    return Ingested(ready, source, list(hit["objectives"]))
