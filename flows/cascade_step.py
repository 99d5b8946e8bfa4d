"""The cascade of the daily flow: one `cascade-step` task per step of `csmf_core.cascade.plan`.

    checkpoints = train_cascade(ready, cfg, run)      # pretrain_exposure -> ... -> finetune_conversion
    checkpoints.final                                 # the last step's checkpoint: the model
    checkpoints.after_pruning()                       # {prune step: checkpoint}: ownership snapshots
    checkpoints.stage_ends()                          # {stage t: checkpoint}: the frozen-parameter check

A step, in order: resume it from an earlier run with identical inputs (flows/resume.py), or load its
inputs (the run's data, the previous step's model), train or prune (under torchrun when
train.processes > 1), save the checkpoint, then measure it. The flow hands each step the previous
step's checkpoint and hands `Checkpoints` on to evaluate and gate, so no later task rebuilds a path
from the work-dir layout.

What a step logs on its child run (and, for the metrics, on the parent at step = step index):

    test/by_step/<objective>/{recall,ndcg}@K   every objective trained so far, under its own mode, on
                                               the evaluation day(s): pruning drops it, recovery
                                               restores it, later stages leave it exactly unchanged
    val/<objective>/{best_epoch, start_recall@K, best_recall@K, last_recall@K}
                                               train steps with data.val_days > 0: the epoch chosen
                                               on the held-out validation days (csmf_core/validation.py)
    train/...                                  the training summary; prune steps: prune/... instead
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from csmf_core.cascade import CascadeData, Step, StepReport, apply_threads, build_model, plan, run_step
from csmf_core.checkpoint import load_checkpoint, save_checkpoint
from csmf_core.config import CSMFConfig
from csmf_core.distributed import run_step_distributed
from csmf_core.evaluate import evaluate_model, metric_dict
from csmf_core.masks import UnitOwners
from csmf_core.model import TwoTower
from csmf_core.optim import AUTO_SPARSE_MIN_ENTRIES, AUTO_SPARSE_RULE
from csmf_core.rows import TrainRows
from flows import reporting
from flows.ingest import Ingested
from flows.names import BY_STEP, RESUMED_PREFIX, VAL
from flows.progress import StepBar, expected_steps
from flows.resume import StageCache
from flows.runs import RunContext, child_run, device, loaded_data
from flows.tracking import MlflowTracker

LOG_EVERY = 50  # training steps between progress lines (and MLflow loss flushes)


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoint of every cascade step run so far, in plan order."""

    steps: tuple[tuple[Step, Path], ...] = ()

    @property
    def last(self) -> Path | None:
        """The latest step's checkpoint, None before the first step (which builds a fresh model)."""
        return self.steps[-1][1] if self.steps else None

    @property
    def final(self) -> Path:
        if not self.steps:
            raise ValueError("no cascade step has run yet: there is no model")
        return self.steps[-1][1]

    def add(self, step: Step, checkpoint: Path) -> Checkpoints:
        return Checkpoints((*self.steps, (step, checkpoint)))

    def after_pruning(self) -> dict[str, Path]:
        """{prune step name: its checkpoint}: the unit ownership after each pruning."""
        return {s.name: path for s, path in self.steps if s.kind == "prune"}

    def stage_ends(self) -> dict[int, Path]:
        """{stage t: the checkpoint of its last step} for every stage before the last one: the entries
        stage t owns must be bit-identical there and in the final model."""
        last = self.steps[-1][0].stage if self.steps else 0
        return {s.stage: path for s, path in self.steps if s.stage < last}


def train_cascade(ready: Ingested, cfg: CSMFConfig, run: RunContext) -> Checkpoints:
    """Every step of the plan as a `cascade-step` task run named after it, each from the previous one's
    checkpoint (call inside a flow)."""
    done = Checkpoints()
    for index, step in enumerate(plan(ready.objectives, cfg)):
        step_task = cascade_step.with_options(task_run_name=step.name)
        done = done.add(step, step_task(step, index, done.last, ready, cfg, run))
    return done


@task(name="cascade-step", cache_policy=NO_CACHE)
def cascade_step(
    step: Step, index: int, previous: Path | None, ready: Ingested, cfg: CSMFConfig, run: RunContext
) -> Path:
    """Run one step of the cascade from the previous checkpoint; returns `<workdir>/<step>/checkpoint`."""
    resumed = _resume(step, index, ready, run)
    if resumed is not None:
        return resumed
    data, model, owners = _inputs(previous, ready, cfg)
    with _step_run(run, step, index, ready) as tracker:
        tracker.log_params(
            {
                **cfg.flat(),
                "step.name": step.name,
                "step.kind": step.kind,
                "step.stage": step.stage,
                "step.index": index,
            }
        )
        owners, report = _run(step, model, owners, data, ready, cfg, run, tracker)
        out = _save(step, index, previous is None, model, owners, report, run, tracker)
        metrics = _measure(step, model, owners, data, cfg) | _validation(report, ready.objectives[step.stage])
        tracker.log_metrics(metrics)
        run.parent().log_metrics(metrics, step=index)
        _report(step, metrics, report, cfg)
    if run.cache is not None:
        run.cache.record(step.name, index, {"checkpoint": out}, metrics=metrics, source_run=run.parent_run_id)
    return out


def _step_run(run: RunContext, step: Step, index: int, ready: Ingested, **tags):
    """The step's child run, tagged with its kind, stage and position in the plan."""
    return child_run(
        run,
        step.name,
        kind=step.kind,
        stage=step.stage,
        stage_name=ready.objectives[step.stage],
        step_index=index,
        **tags,
    )


def _resume(step: Step, index: int, ready: Ingested, run: RunContext) -> Path | None:
    """The step's checkpoint from an earlier run with identical inputs (flows/resume.py), or None.

    The child run is still created (tag csmf.resumed_from) with the step's metrics, so the MLflow
    compare view and the parent's per-step history stay complete."""
    hit = run.cache.lookup(step.name, index) if run.cache is not None else None
    if hit is None:
        return None
    with _step_run(run, step, index, ready, resumed_from=hit["source_run"]) as tracker:
        out = StageCache.restore(hit["outputs"]["checkpoint"], run.workdir / step.name / "checkpoint")
        tracker.log_metrics(hit["metrics"])
        run.parent().log_metrics(hit["metrics"], step=index)
        run.parent().set_tags({f"{RESUMED_PREFIX}{step.name}": hit["source_run"]})
    get_run_logger().info("%s: resumed from MLflow run %s", step.name, hit["source_run"])
    return out


def _inputs(
    previous: Path | None, ready: Ingested, cfg: CSMFConfig
) -> tuple[CascadeData, TwoTower, UnitOwners]:
    """The run's data and the model to continue (the previous checkpoint, or a fresh model for the
    first step), both on the run's device. With train.processes > 1 the torchrun ranks read the train
    rows themselves, so this process loads only what evaluation needs."""
    apply_threads(cfg)
    data = loaded_data(ready.model_ready, cfg, load_train=cfg.train.processes == 1)
    if previous is None:
        model, owners = build_model(data, cfg)
        model.to(device(cfg))
    else:
        model, owners, _ = load_checkpoint(previous, device=device(cfg))
    return data, model, owners


def _run(
    step: Step,
    model: TwoTower,
    owners: UnitOwners,
    data: CascadeData,
    ready: Ingested,
    cfg: CSMFConfig,
    run: RunContext,
    tracker: MlflowTracker,
) -> tuple[UnitOwners, StepReport]:
    """Train or prune `model` in place: DDP under torchrun for train.processes > 1 (rank 0 reports
    back; pruning always runs here), else in this process. The loss curve goes to the child run."""
    logger = get_run_logger()
    bar = step_bar(step, data, cfg)
    curve = reporting.LossCurve(tracker, logger, step.name, every=LOG_EVERY, bar=bar)
    try:
        if cfg.train.processes > 1 and step.kind != "prune":
            result = run_step_distributed(
                step, model, owners, ready.model_ready, cfg, run.workdir / step.name / "ddp",
                on_step=curve, log=logger.info,
            )  # fmt: skip
        else:
            result = run_step(step, model, owners, data, cfg, on_step=curve)
    finally:
        if bar is not None:
            bar.close()
    curve.flush()
    return result


def step_bar(
    step: Step, data: CascadeData, cfg: CSMFConfig, label: str | None = None, stream: TextIO | None = None
) -> StepBar | None:
    """The terminal progress bar of a train or recover step (None for a pruning): its expected
    optimiser steps over the rows `data` trains it on, and its epochs under `cfg` (flows/progress.py)."""
    if step.kind == "prune":
        return None
    epochs = cfg.recover.epochs if step.kind == "recover" else cfg.epochs_for(step.stage)
    total = expected_steps(_step_rows(step, data, cfg), cfg.train.batch_size, epochs)
    return StepBar(label or step.name, total, epochs, stream=stream)


def _step_rows(step: Step, data: CascadeData, cfg: CSMFConfig) -> int:
    """The rows a train or recover step trains on (csmf_core.train.train_stage's count), for the
    progress bar's total: positives of the stage, a recover.fraction subset for recovery."""
    recover = step.kind == "recover"
    fraction = cfg.recover.fraction if recover else 1.0
    rows = data.rows
    if isinstance(rows, TrainRows):
        n = int((rows.level >= step.stage).sum())
        return max(2, math.ceil(n * fraction)) if recover else n
    return rows.n_rows(step.stage, fraction=fraction, seed=cfg.train.seed, salt=int(recover))


def _save(
    step: Step,
    index: int,
    first: bool,
    model: TwoTower,
    owners: UnitOwners,
    report: StepReport,
    run: RunContext,
    tracker: MlflowTracker,
) -> Path:
    """The step's checkpoint in `<workdir>/<step>/checkpoint`, logged to its child run with the masks
    when ownership changed (a pruning, or the initial state), and the step's own summary: the
    pruning table, or the training summary (validation figures go under val/, `_validation`)."""
    meta = {"step": step.name, "kind": step.kind, "stage": step.stage, "index": index, "info": report.info}
    out = save_checkpoint(run.workdir / step.name / "checkpoint", model, owners, meta=meta)
    tracker.log_artifact(out, "checkpoint")
    if step.kind == "prune" or first:
        tracker.log_artifact(out / "masks", "masks")
    if step.kind == "prune":
        reporting.log_pruning(tracker, report.info, list(owners.stages), step.name, run.figures)
    else:
        tracker.log_metrics({f"train/{k}": v for k, v in report.info.items() if not k.startswith("val_")})
    return out


def _measure(
    step: Step, model: TwoTower, owners: UnitOwners, data: CascadeData, cfg: CSMFConfig
) -> dict[str, float]:
    """test/by_step/<objective>/{recall,ndcg}@K of every objective trained so far, under its own mode,
    on the evaluation day(s) (the first eval.max_users users)."""
    rows = evaluate_model(
        model,
        owners.output_owners(),
        data.catalog_tables("eval"),
        data.eval.head(cfg.eval.max_users),
        data.objectives,
        ks=cfg.eval.ks,
        objectives_upto=step.stage,
        scorers="own",
    )
    return metric_dict(rows, prefix=BY_STEP)


def _validation(report: StepReport, objective: str) -> dict[str, float]:
    """val/<objective>/{best_epoch, start_recall@K, best_recall@K, last_recall@K}: the epoch selection
    of a train step on the held-out validation days (data.val_days > 0); empty otherwise."""
    info = report.info
    return {f"{VAL}/{objective}/{k.removeprefix('val_')}": v for k, v in info.items() if k.startswith("val_")}


def _report(step: Step, metrics: dict[str, float], report: StepReport, cfg: CSMFConfig) -> None:
    """The step's progress line(s) in the flow's log."""
    logger = get_run_logger()
    k = cfg.eval.primary_k
    primary = {
        key.removeprefix(f"{BY_STEP}/"): round(v, 4)
        for key, v in metrics.items()
        if key.startswith(BY_STEP) and key.endswith(f"recall@{k}")
    }
    logger.info("%s done: evaluation day(s) %s", step.name, primary)
    if cfg.train.embedding_optimizer == "auto" and report.info.get("sparse_embeddings") == 1.0:
        logger.info(
            "%s: train.embedding_optimizer=auto -> %s (embedding tables over %s entries; set "
            "train.embedding_optimizer=dense to keep fused Adam over whole tables)",
            step.name,
            AUTO_SPARSE_RULE,
            f"{AUTO_SPARSE_MIN_ENTRIES:,}",
        )
    if "val_best_epoch" in report.info:  # data.val_days > 0 (csmf_core/validation.py)
        logger.info(
            "%s: kept epoch %d of %d (validation recall@%d: start %.4f, best %.4f, last %.4f)",
            step.name,
            int(report.info["val_best_epoch"]),
            report.info.get("epochs", -1),
            k,
            report.info[f"val_start_recall@{k}"],
            report.info[f"val_best_recall@{k}"],
            report.info[f"val_last_recall@{k}"],
        )
