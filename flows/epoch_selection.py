"""Validation days in the daily flow: choose on them, then train the model on the whole window.

    cfg = select_on_validation(ready, cfg, run)   # after ingest, before the cascade steps

`data.val_days` (auto by default) holds out the last days of the training window
(csmf_core/selection.py says how many). With `data.val_refit: true` (the default) the `select` task
runs the whole cascade once with those days held out, every train step keeping its best epoch there
(the selection pass, `csmf_core.tuning.run_trial`), chooses the fusion weights there when
`eval.fused_weights` is auto, and returns the config of the **refit**: the cascade steps then train
on the whole window, validation days included, for the epochs each step kept, and the model carries
the chosen weights. Measured on dates before the evaluation days (docs/method-notes.md, "Validation
days and the refit"): better than training without validation on KuaiRand, level on generated data,
and better than keeping the held-out days out of training.

With `data.val_refit: false` the cascade steps themselves hold the days out and keep their best
epoch (the model never trains on the validation days); auto weights are then chosen on the
validation users after the cascade (`choose_default_weights`). With no validation days (a window
too short, the parquet loader, several processes) the configured epochs are trained and auto weights
fall back to the paper's, each with a log line saying why.

MLflow: a child run `select` with `val/<objective>/...` per train step (the epoch kept, the
validation recall), `val/score` and its parts (csmf_core/selection.py), the weight grid; the parent
gets `csmf.val_days`, `csmf.selected_epochs` and `csmf.fused_weights` tags. Resumed like a stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from csmf_core.cascade import apply_threads, load_cascade_data
from csmf_core.checkpoint import load_checkpoint
from csmf_core.config import CSMFConfig
from csmf_core.selection import PAPER_WEIGHTS, choose_weights
from csmf_core.tuning import refit_config, run_trial, trial_config
from flows.cascade_step import step_bar
from flows.ingest import Ingested
from flows.names import VAL
from flows.progress import PassBars
from flows.runs import RunContext, child_run, device
from flows.tracking import metric_key

SELECT = "select"
VAL_DAYS_TAG = "csmf.val_days"
EPOCHS_TAG = "csmf.selected_epochs"
WEIGHTS_TAG = "csmf.fused_weights"


@task(name="select", task_run_name="select", cache_policy=NO_CACHE)
def select_on_validation(ready: Ingested, cfg: CSMFConfig, run: RunContext) -> CSMFConfig:
    """The config the cascade steps train with (module docstring)."""
    logger = get_run_logger()
    hit = run.cache.lookup(SELECT, -2) if run.cache is not None else None
    if hit is not None:
        chosen = json.loads(Path(hit["outputs"]["select"], "select.json").read_text())
        with child_run(run, SELECT, kind=SELECT, resumed_from=hit["source_run"]) as tracker:
            tracker.log_metrics(hit["metrics"])
        logger.info("select: resumed from MLflow run %s (%s)", hit["source_run"], chosen["why"])
        return _finish(run, cfg, chosen)
    apply_threads(cfg)
    data = load_cascade_data(
        ready.model_ready,
        val_days=cfg.data.val_days,
        item_stats_windows=cfg.data.item_stats,
        loader=cfg.train.loader,
        processes=cfg.train.processes,
    )
    logger.info(data.val_why)
    chosen: dict = {"val_days": data.val_days, "why": data.val_why}
    metrics: dict[str, float] = {}
    with child_run(run, SELECT, kind=SELECT) as tracker:
        tracker.log_params({"select.val_days": data.val_days, "select.refit": cfg.data.val_refit})
        if data.val_days == 0 or not cfg.data.val_refit:
            chosen["config"] = {"data.val_days": data.val_days}
            if data.val_days == 0 and cfg.eval.fused_weights == "auto":
                paper = _paper(len(data.objectives))
                chosen["config"]["eval.fused_weights"] = paper
                logger.info("eval.fused_weights=auto without validation days: the default weights %s", paper)
        else:
            data.tables = data.tables.to(device(cfg))
            sel_cfg = trial_config(cfg, {"data.val_days": data.val_days})
            # on a terminal, a progress bar per training step of the pass, like the refit's
            bars = PassBars(lambda step: step_bar(step, data, sel_cfg, f"{SELECT}: {step.name}"))
            try:
                res = run_trial(data, sel_cfg, on_begin=bars.begin, on_step=bars.update)
            finally:
                bars.close()
            chosen["config"] = _refit_values(cfg, res)
            chosen["epochs"], chosen["weights"] = res.epochs, list(res.weights)
            metrics = {metric_key(k): v for k, v in res.metrics.items() if v == v}
            for rep in res.reports:
                if rep.step.kind == "train" and "val_best_epoch" in rep.info:
                    o = data.objectives[rep.step.stage]
                    metrics |= {
                        metric_key(f"{VAL}/{o}/{k.removeprefix('val_')}"): v
                        for k, v in rep.info.items()
                        if k.startswith("val_")
                    }
            if res.weight_rows:
                tracker.log_table(res.weight_rows, "select/weight_grid.json")
            tracker.log_metrics(metrics)
            logger.info(
                "select: validation score %.4f (model / popularity); refit on the whole window with "
                "epochs %s, fused weights %s",
                res.score,
                res.epochs,
                list(res.weights),
            )
        out = run.workdir / SELECT
        out.mkdir(parents=True, exist_ok=True)
        (out / "select.json").write_text(json.dumps(chosen, indent=1))
        tracker.log_artifact(out / "select.json", SELECT)
    if run.cache is not None:
        run.cache.record(SELECT, -2, {"select": out}, metrics=metrics, source_run=run.parent_run_id)
    return _finish(run, cfg, chosen)


def _paper(n: int) -> list[float]:
    return list(PAPER_WEIGHTS) if n == len(PAPER_WEIGHTS) else [1.0] * n


def _refit_values(cfg: CSMFConfig, res) -> dict:
    refit = refit_config(cfg, res)
    return {
        "train.epochs": list(refit.train.epochs),
        "data.val_days": 0,
        "eval.fused_weights": list(refit.eval.fused_weights),
    }


def _finish(run: RunContext, cfg: CSMFConfig, chosen: dict) -> CSMFConfig:
    new = trial_config(cfg, chosen["config"])
    tags = {VAL_DAYS_TAG: str(chosen["val_days"])}
    if "epochs" in chosen:
        tags[EPOCHS_TAG] = ",".join(map(str, chosen["epochs"]))
    if new.eval.fused_weights != "auto":
        tags[WEIGHTS_TAG] = ",".join(f"{w:g}" for w in new.eval.fused_weights)
    run.parent().set_tags(tags)
    return new


@task(name="choose-weights", task_run_name="choose_weights", cache_policy=NO_CACHE)
def choose_default_weights(final: Path, ready: Ingested, cfg: CSMFConfig, run: RunContext) -> CSMFConfig:
    """`eval.fused_weights: auto` without a refit: the weights of the grid with the best validation
    score, on the validation users the cascade steps held out (csmf_core/selection.py)."""
    data = load_cascade_data(
        ready.model_ready, val_days=cfg.data.val_days, item_stats_windows=cfg.data.item_stats
    )
    model, owners, _ = load_checkpoint(final, device=device(cfg))
    data.tables = data.tables.to(device(cfg))
    with child_run(run, "choose_weights", kind="choose_weights") as tracker:
        weights, rows = choose_weights(
            model,
            owners.output_owners(),
            data.catalog_tables("val"),
            data.val,
            data.objectives,
            data.val_counts,
            cfg.eval.primary_k,
        )
        tracker.log_table(rows, "select/weight_grid.json")
    get_run_logger().info("eval.fused_weights=auto: chose %s on the validation users", list(weights))
    run.parent().set_tags({WEIGHTS_TAG: ",".join(f"{w:g}" for w in weights)})
    return trial_config(cfg, {"eval.fused_weights": list(weights)})
