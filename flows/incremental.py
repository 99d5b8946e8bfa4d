"""`train.mode: incremental` in the daily flow (the method: csmf_core/incremental.py).

    start = choose_start(cfg, window.date, objectives, from_model, home)  # before open_run
    ...                                                  # ingest with start.features (its id maps)
    cfg = select_incremental(ready, cfg, run, start)     # epochs on the validation day(s)
    checkpoints = train_incremental(ready, cfg, run, start)

`choose_start` decides the mode (csmf_core.incremental.decide_mode) from the champion (with
`train.start_from: line`, the newest model the gate verified when it is newer; or the model named by
`--from-model`), logs one line saying which and why (no champion: "falling back to a full
retrain"), and refuses a starting model whose objectives or model shape differ from the run's with a
`WarmStartError` naming each difference, before any work. The parent run and the registered version
get the tags `csmf.train_mode`, `csmf.parent_model_version` and `csmf.last_full_date` (the schedule of
full retrains reads the continued model's).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from csmf_core.cascade import Step, apply_threads, load_cascade_data, load_rehearsal_variants, run_step
from csmf_core.config import CSMFConfig, build_config
from csmf_core.idmap import read_recycled
from csmf_core.incremental import (
    FULL,
    INCREMENTAL,
    UNKNOWN_FULL,
    ModeDecision,
    decide_mode,
    incremental_plan,
    val_days_for,
)
from csmf_core.train import stage_positives
from csmf_core.tuning import refit_config, run_trial, trial_config
from csmf_core.warm import SHAPE_KEYS, WarmStartError, warm_start
from flows import reporting
from flows.cascade_step import (
    Checkpoints,
    _measure,
    _report,
    _save,
    _step_run,
    _validation,
)
from flows.epoch_selection import EPOCHS_TAG, SELECT, VAL_DAYS_TAG, WEIGHTS_TAG
from flows.ingest import Ingested
from flows.names import (
    DATASET_TAG,
    DATE_TAG,
    GATE_TAG,
    LAST_FULL_TAG,
    PARENT_VERSION_TAG,
    TRAIN_MODE_TAG,
    VAL,
)
from flows.progress import StepBar, expected_steps
from flows.runs import RunContext, child_run, device
from flows.tracking import metric_key

MODE_TAG, PARENT_TAG = TRAIN_MODE_TAG, PARENT_VERSION_TAG
LOG_EVERY = 50


@dataclass(frozen=True)
class Start:
    """Where a run starts: the mode decision and, for an incremental run, the previous model's bundle."""

    decision: ModeDecision
    bundle: Path | None = None
    # the model the selection pass continues when not `bundle` (`selection_start`), its version, and
    # the features dirs of the line's models after it up to `bundle` (the rows their runs recycled)
    select_bundle: Path | None = None
    select_version: str | None = None
    select_between: tuple[Path, ...] = ()

    @property
    def incremental(self) -> bool:
        return self.decision.mode == INCREMENTAL

    @property
    def features(self) -> Path | None:
        return None if self.bundle is None else self.bundle / "features"

    @property
    def checkpoint(self) -> Path:
        if self.bundle is None:
            raise ValueError("a full run has no starting checkpoint")
        return self.bundle / "checkpoint"

    def trained_through(self, train_dates: list[str]) -> str:
        """The last day this run's model has learned from, its lineage included: its own last training
        day, or, continuing a model, that model's `trained_through` when later (a model named with
        --from-model may have been trained for a later date than this run's). The gate compares models
        only on days after it (flows/promotion.py)."""
        own = max(train_dates)
        if not self.incremental or self.bundle is None:
            return own
        return max(own, lineage_end(json.loads((self.bundle / "bundle.json").read_text())) or own)

    def tags(self) -> dict[str, str]:
        d = self.decision
        return {
            MODE_TAG: d.mode,
            PARENT_TAG: d.parent_version or "none",
            LAST_FULL_TAG: d.last_full_date or "",
        }


def lineage_end(info: dict) -> str | None:
    """The last day a bundle's model has learned from (bundle.json): `extra.trained_through`, written
    since lineages are tracked, else its own last training day."""
    through = (info.get("extra") or {}).get("trained_through")
    own = max(info.get("train_dates") or [], default=None)
    return max(d for d in (through, own) if d) if (through or own) else None


def _recorded_lineage(bundle: Path) -> str | None:
    """The `trained_through` a flow run recorded in a bundle (None for bundles written before it, or
    by the library: their dates then decide alone, as before)."""
    return (json.loads((bundle / "bundle.json").read_text()).get("extra") or {}).get("trained_through")


def check_start_model(bundle: Path, cfg: CSMFConfig, objectives: list[str]) -> None:
    """Refuse (WarmStartError, every difference named) a starting model whose objectives or model shape
    (model.dim, hidden, embedding sizes, id_buckets) differ from this run's: no silent mix."""
    info = json.loads((bundle / "bundle.json").read_text())
    raw = yaml.safe_load((bundle / "config.yaml").read_text()) or {}
    theirs = build_config({"model": raw.get("model") or {}}).model
    problems = []
    if list(info["objectives"]) != list(objectives):
        problems.append(f"objectives: the model has {info['objectives']}, the run {list(objectives)}")
    for key in SHAPE_KEYS:
        a, b = getattr(theirs, key), getattr(cfg.model, key)
        if a != b:
            problems.append(f"model.{key}: the model has {a!r}, the run {b!r}")
    if problems:
        raise WarmStartError(
            f"train.mode=incremental cannot continue the model in {bundle}: it differs from this run:\n  "
            + "\n  ".join(problems)
            + "\nrun with --set train.mode=full, or match the run's configuration to the model's"
        )


def _line_or_champion(current, run_date: str, dataset: str | None = None):
    """train.start_from=line: (the model to continue, its role, one line for the log). The line's head
    (flows.registry.line_head, among models of `dataset`) when it is newer than the champion (a later
    run date, or the same date and a later version); else the champion, which also covers a re-run or
    backfill (a champion trained for this date or later: decide_mode retrains in full)."""
    from flows.registry import line_head

    head = line_head(run_date, dataset=dataset)
    if head is None:
        return (
            current,
            "champion",
            "train.start_from=line: no verified model trained before "
            + (f"{run_date}; the champion decides" if current is not None else f"{run_date} yet"),
        )

    def key(v):
        return ((v.tags or {}).get(DATE_TAG) or "", int(v.version))

    if current is not None and key(current) >= key(head):
        return current, "champion", f"train.start_from=line: the champion v{current.version} heads the line"
    gate = (head.tags or {}).get(GATE_TAG, "?")
    champ = f"v{current.version}" if current is not None else "none"
    return (
        head,
        "line's head",
        f"train.start_from=line: continuing the line's head v{head.version} (trained for "
        f"{(head.tags or {}).get(DATE_TAG)}, gate: {gate}); the champion ({champ}) keeps serving",
    )


def _registered_as(bundle: Path):
    """The registered version whose checkpoint is the one in `bundle` (same model digest), or None."""
    from flows.names import MODEL_DIGEST_TAG
    from flows.registry import find_version, model_digest

    try:
        import mlflow

        return find_version(mlflow.MlflowClient(), {MODEL_DIGEST_TAG: model_digest(bundle / "checkpoint")})
    except (OSError, ValueError, LookupError):  # not a readable checkpoint, no registry yet
        return None


def _parent_facts(version, role: str = "champion") -> dict:
    tags = version.tags or {}
    return {
        "role": role,
        "version": str(version.version),
        # a version from before train.mode existed was a full retrain on its own run date
        "last_full_date": tags.get(LAST_FULL_TAG) or tags.get(DATE_TAG) or None,
        "date": tags.get(DATE_TAG) or None,
    }


def choose_start(
    cfg: CSMFConfig, run_date: str, dataset: Path, from_model: str | None, home: Path, log
) -> Start:
    """The run's mode and starting model (module docstring). `log(line)` gets the decision."""
    if cfg.train.mode == FULL and from_model is None:
        return Start(decide_mode(FULL, run_date, cfg.train.full_every_days, None))
    import mlflow

    from data_contracts import load_spec
    from flows.env import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())  # the registry of this home (open_run sets it again)
    from flows.registry import champion, resolve_model

    if from_model is not None:
        resolved = resolve_model(from_model, home=home)
        version = resolved.version or _registered_as(resolved.bundle)  # a bundle named by its path
        parent = (
            _parent_facts(version)
            if version is not None
            # not a registered model: its line's last full retrain is unknown, so the next scheduled
            # run of this line retrains in full (decide_mode)
            else {"version": str(resolved.bundle), "last_full_date": UNKNOWN_FULL}
        )
        bundle = resolved.bundle
        parent["trained_through"] = _recorded_lineage(bundle)
        decision = decide_mode(INCREMENTAL, run_date, cfg.train.full_every_days, parent, explicit=True)
    else:
        from flows.runs import dataset_name

        name = dataset_name(dataset)
        current, role = champion(), "champion"
        theirs = None if current is None else (current.tags or {}).get(DATASET_TAG)
        if theirs is not None and theirs != name:  # one registry per home: another dataset's champion
            log(
                f"the champion v{current.version} is a model of dataset {theirs!r}, this run's is {name!r}: not continued"
            )
            current = None
        if cfg.train.start_from == "line":
            current, role, note = _line_or_champion(current, run_date, name)
            log(note)
        parent = _parent_facts(current, role) if current is not None else None
        bundle = resolve_model(f"models:/csmf/{current.version}", home=home).bundle if current else None
        if parent is not None:
            parent["trained_through"] = _recorded_lineage(bundle)
        decision = decide_mode(INCREMENTAL, run_date, cfg.train.full_every_days, parent)
    log(decision.reason)
    if decision.mode != INCREMENTAL:
        return Start(decision)
    check_start_model(bundle, cfg, list(load_spec(dataset).objective_names))
    return Start(decision, bundle)


def incremental_overrides(cfg: CSMFConfig, decision: ModeDecision, available: int | None = None) -> dict:
    """The config of an incremental run: train.incremental_days = the days new to the starting model
    (at least the configured ones), data.train_days = those plus the validation days. `available`:
    the training days a full run for the same date would have (the partitions before it); the days
    are clipped to them, keeping the validation days (a dataset's first days, a long catch-up)."""
    days, v = decision.train_days(cfg.train.incremental_days), val_days_for(cfg.data.val_days)
    if available is not None:
        days = max(1, min(days, available - v))
    # rehearsal: the days before the new ones that the steps draw rows from (as many as there are)
    older = (
        rehearsal_window(cfg)
        if available is None
        else min(rehearsal_window(cfg), max(0, available - days - v))
    )
    return {
        "train.mode": INCREMENTAL,
        "train.incremental_days": days,
        "data.train_days": days + v + older,
    }


def rehearsal_window(cfg: CSMFConfig) -> int:
    """The partitions before an incremental run's new day(s) its ingest reads for rehearsal rows:
    `train.rehearsal_days` when some stage may rehearse (a ratio > 0, or auto with a candidate > 0 and
    validation days to choose on: `CSMFConfig.rehearsal_ratios`), else none."""
    return cfg.train.rehearsal_days if any(r > 0 for r in cfg.rehearsal_ratios()) else 0


def selection_from(train_dates: list[str], cfg: CSMFConfig) -> str:
    """The first training day of an incremental selection pass: the `train.incremental_days` partitions
    before the validation day(s) (the window's first day when it has no rehearsal days)."""
    return sorted(train_dates)[-(cfg.train.incremental_days + val_days_for(cfg.data.val_days))]


def train_from(run: RunContext, cfg: CSMFConfig) -> str:
    """The first of the last `train.incremental_days` training days (the refit's rows): partitions,
    so a day missing from the data inside them does not cut the days short."""
    return sorted(run.window.train_dates)[-cfg.train.incremental_days]


def _warm(start: Start, ready: Ingested, data, cfg: CSMFConfig, *, selection: bool = False):
    """The starting model on `data`; `selection`: the model the selection pass continues (`selection_start`),
    whose rows recycled later in the line (and by this run) start fresh as this run's recycled rows do."""
    dirs = [ready.model_ready]
    checkpoint = start.checkpoint
    if selection and start.select_bundle is not None:
        dirs += list(start.select_between)
        checkpoint = start.select_bundle / "checkpoint"
    recycled = {}
    for side in ("users", "items"):
        flags = [read_recycled(d, side) for d in dirs]
        union = np.zeros(max(len(f) for f in flags), bool)
        for f in flags:
            union[: len(f)] |= f
        recycled[side] = union
    model, owners, info = warm_start(checkpoint, data, cfg, recycled)
    return model.to(device(cfg)), owners, info


MAX_LINE_WALK = 60  # versions looked back through by `selection_start`


def selection_start(start: Start, first_day: str, cfg: CSMFConfig, home: Path, log) -> Start:
    """`train.incremental_select_from: unseen`: the model the selection pass continues.

    The selection pass trains the start on the days before the validation day(s), from `first_day`, and
    keeps each step's best epoch there; the refit then trains the start on the new day(s). A line's
    start has usually trained on those earlier days already (the previous run's refit was that day), so
    continuing it measured extra epochs on a seen day, and chose few (epoch 0 of the click and
    conversion steps, often). The pass now continues the newest model of the line that has not trained
    on them: the start, or its parent (`csmf.parent_model_version`), or that one's, ... read from the
    registry. None such (the line reaches a full retrain whose window covers them, a model named by
    directory): the start, with a log line. The models of one line share their id maps (a later one
    only adds rows), so the run's data fits any of them."""
    if not start.incremental or start.bundle is None or cfg.train.incremental_select_from != "unseen":
        return start
    import mlflow
    from mlflow.exceptions import MlflowException

    from flows.registry import REGISTERED_MODEL, resolve_model

    client = mlflow.MlflowClient()
    bundle, version, between = start.bundle, start.decision.parent_version, []
    for _ in range(MAX_LINE_WALK):
        through = lineage_end(json.loads((bundle / "bundle.json").read_text()))
        if through is not None and through < first_day:
            break
        parent = None
        if version is not None and str(version).isdigit():
            try:
                parent = (client.get_model_version(REGISTERED_MODEL, str(version)).tags or {}).get(PARENT_TAG)
            except MlflowException:
                parent = None
        if not (parent and parent.isdigit()):
            log(
                f"incremental selection: no model of the line trained before {first_day} (v{version} trained "
                f"through {through}, {'a full retrain' if parent == 'none' else 'no parent recorded'}): the "
                "selection pass continues the starting model, which has trained on its days"
            )
            return start
        try:
            older = resolve_model(f"models:/csmf/{parent}", home=home).bundle
        except (MlflowException, LookupError, OSError, ValueError) as exc:  # deleted, artifacts gone
            log(
                f"incremental selection: v{parent}, the parent of v{version}, cannot be loaded "
                f"({type(exc).__name__}: {exc}): the selection pass continues the starting model"
            )
            return start
        between.append(bundle / "features")
        bundle, version = older, parent
    else:
        return start
    if bundle == start.bundle:
        return start
    log(
        f"incremental selection: the selection pass continues v{version} (trained through {through}), the "
        f"newest model of the line not trained on its days from {first_day}; the refit continues "
        f"v{start.decision.parent_version}"
    )
    return dataclasses.replace(
        start, select_bundle=bundle, select_version=str(version), select_between=tuple(between)
    )


@task(name="select", task_run_name="select", cache_policy=NO_CACHE)
def select_incremental(ready: Ingested, cfg: CSMFConfig, run: RunContext, start: Start) -> CSMFConfig:
    """The epochs of each incremental step, chosen on the validation day(s) by a selection pass from
    the starting model (csmf_core/incremental.py); the config of the refit."""
    logger = get_run_logger()
    apply_threads(cfg)  # (before 2026-12-05 the selection pass ran with the process's threads)
    v = val_days_for(cfg.data.val_days)
    if v == 0:
        logger.info("incremental: data.val_days=0, training train.epochs %s", list(cfg.train.epochs))
        new = trial_config(cfg, {"data.val_days": 0})
        if cfg.train.incremental_rehearsal == "auto":  # CSMFConfig.rehearsal_for: 0 for every stage
            logger.info(
                "incremental: train.incremental_rehearsal=auto chooses on validation days and data.val_days=0 "
                "holds none out: no rehearsal (set a ratio, or a list of one per stage, to rehearse without)"
            )
        if new.eval.fused_weights == "auto":
            new = trial_config(new, {"eval.fused_weights": [1.0] * len(ready.objectives)})
        return new
    by_ratio = selection_data(ready, cfg, run, v)
    data = next(iter(by_ratio.values()))
    model, owners, _ = _warm(start, ready, data, cfg, selection=True)
    auto = cfg.train.incremental_rehearsal == "auto"
    # auto: the ratios whose rows differ (a larger ratio that draws no more rows than a smaller one,
    # as when the pass has no earlier day, would train the same rows again: it is the smaller one)
    ratios = sorted(by_ratio)  # (selection_data maps such a ratio to the data of the one before it)
    distinct = [r for i, r in enumerate(ratios) if i == 0 or by_ratio[r] is not by_ratio[ratios[i - 1]]]
    stage_ratios = (lambda t: distinct) if auto else (lambda t: [cfg.rehearsal_for(t)])
    with child_run(run, SELECT, kind=SELECT) as tracker:
        tracker.log_params(
            {"select.val_days": v, "select.refit": True, "select.mode": INCREMENTAL,
             "select.from_version": start.select_version or start.decision.parent_version,
             "select.rehearsal_rows": ",".join(f"{r:g}:{by_ratio[r].rehearsal_rows}" for r in distinct)
             if len(distinct) > 1 else data.rehearsal_rows}
        )  # fmt: skip
        res = run_trial(
            data,
            trial_config(cfg, {"data.val_days": v}),
            start=(model, owners),
            steps=incremental_plan(data.objectives),
            choices=lambda step: [(r, by_ratio[r]) for r in stage_ratios(step.stage)],
        )
        tracker.log_params({"select.rehearsal": ",".join(f"{r:g}" for r in res.rehearsal)})
        metrics = {metric_key(k): x for k, x in res.metrics.items() if x == x}
        for rep in res.reports:
            if "val_best_epoch" in rep.info:
                o = data.objectives[rep.step.stage]
                metrics |= {
                    metric_key(f"{VAL}/{o}/{k.removeprefix('val_')}"): x
                    for k, x in rep.info.items()
                    if k.startswith("val_")
                }
        tracker.log_metrics(metrics)
    for rep in res.reports:
        if rep.info.get("kept"):
            logger.info(
                "select (incremental): %s has %d positive row(s) before the validation day(s): kept (epoch 0)",
                rep.step.name,
                rep.info["rows"],
            )
    if auto:
        for rep in res.reports:
            tried = {k.removeprefix("val_score_rehearsal_"): x for k, x in rep.info.items()
                     if k.startswith("val_score_rehearsal_")}  # fmt: skip
            logger.info(
                "select (incremental): %s keeps rehearsal %g (validation Recall@%d by ratio: %s)",
                rep.step.name,
                rep.info.get("rehearsal", 0.0),
                cfg.eval.primary_k,
                ", ".join(f"{r}: {x:.6f}" for r, x in tried.items())
                or ("one candidate: the others draw the same rows" if len(distinct) == 1 else "none scored"),
            )
    logger.info(
        "select (incremental): validation score %.4f; refit on the last %d day(s) with epochs %s, "
        "rehearsal %s, weights %s",
        res.score,
        cfg.train.incremental_days,
        res.epochs,
        [f"{r:g}" for r in res.rehearsal],
        list(res.weights),
    )
    run.parent().set_tags(
        {
            VAL_DAYS_TAG: str(v),
            EPOCHS_TAG: ",".join(map(str, res.epochs)),
            WEIGHTS_TAG: ",".join(f"{w:g}" for w in res.weights),
        }
    )
    return refit_config(cfg, res)


def selection_data(ready: Ingested, cfg: CSMFConfig, run: RunContext, v: int) -> dict:
    """{rehearsal ratio: CascadeData} of an incremental selection pass, one per ratio its steps may
    train with (`CSMFConfig.rehearsal_ratios`), in ascending order; they share the first one's feature
    tables and validation rows (the same for every ratio) and differ in their train rows (and the
    log-Q counts of those); a ratio that draws as many rows as the next smaller one maps to that one's
    data (the same rows: a draw is a prefix of one permutation under the seed). With rehearsal, the
    pass trains on its own day(s) and a draw from the days before them (the window's older days), never
    on its validation day(s)."""
    ratios = sorted(set(cfg.rehearsal_ratios()))
    options = dict(
        val_days=v,
        item_stats_windows=cfg.data.item_stats,
        logq_history=cfg.train.incremental_logq == "history",
        rehearsal_seed=cfg.train.seed,
    )
    if rehearsal_window(cfg):  # the data read once, a draw per ratio
        loaded = load_rehearsal_variants(
            ready.model_ready, ratios, train_from=selection_from(run.window.train_dates, cfg), **options
        )
    else:  # no earlier day to draw from: every ratio trains on the same rows
        loaded = dict.fromkeys(ratios, load_cascade_data(ready.model_ready, **options))
    out = {}
    for r in ratios:
        d = loaded[r]
        if not out:
            d.tables = d.tables.to(device(cfg))
            out[r] = d
        elif d.rehearsal_rows == out[max(out)].rehearsal_rows:  # no earlier day, or every earlier row
            out[r] = out[max(out)]
        else:
            out[r] = dataclasses.replace(
                out[ratios[0]],
                rows=d.rows,
                counts=d.counts,
                logq_counts=d.logq_counts,
                rehearsal_rows=d.rehearsal_rows,
            )
    return out


def train_incremental(ready: Ingested, cfg: CSMFConfig, run: RunContext, start: Start) -> Checkpoints:
    """One `cascade-step` task run per stage (incremental_<objective>), the first from the starting
    model, each from the previous one's checkpoint."""
    done = Checkpoints()
    first_day = train_from(run, cfg)
    for index, step in enumerate(incremental_plan(ready.objectives)):
        step_task = incremental_step.with_options(task_run_name=step.name)
        done = done.add(step, step_task(step, index, done.last, ready, cfg, run, start, first_day))
    return done


@task(name="cascade-step", cache_policy=NO_CACHE)
def incremental_step(
    step: Step,
    index: int,
    previous: Path | None,
    ready: Ingested,
    cfg: CSMFConfig,
    run: RunContext,
    start: Start,
    first_day: str,
) -> Path:
    """Train stage `step.stage`'s owned entries on the rows from `first_day` on; returns the checkpoint."""
    from csmf_core.checkpoint import load_checkpoint

    logger = get_run_logger()
    apply_threads(cfg)
    data = load_cascade_data(
        ready.model_ready,
        val_days=0,
        item_stats_windows=cfg.data.item_stats,
        train_from=first_day,
        logq_history=cfg.train.incremental_logq == "history",
        rehearsal=cfg.rehearsal_for(step.stage),
        rehearsal_seed=cfg.train.seed,
    )
    data.tables = data.tables.to(device(cfg))
    if previous is None:
        model, owners, info = _warm(start, ready, data, cfg)
        changed = {k: v for k, v in info.items() if v["new"] or v["recycled"]}
        logger.info(
            "%s: warm start from model v%s: %s",
            step.name,
            start.decision.parent_version,
            changed or "every table's rows copied (no new or recycled ids)",
        )
    else:
        model, owners, _ = load_checkpoint(previous, device=device(cfg))
    with _step_run(run, step, index, ready, train_mode=INCREMENTAL) as tracker:
        tracker.log_params(
            {**cfg.flat(), "step.name": step.name, "step.kind": step.kind, "step.stage": step.stage,
             "step.index": index, "step.train_from": first_day, "step.rehearsal_rows": data.rehearsal_rows}
        )  # fmt: skip
        if data.rehearsal_rows:
            logger.info(
                "%s: the rows from %s on and %d rehearsal row(s) drawn from the %d day(s) before "
                "(train.incremental_rehearsal=%g)",
                step.name,
                first_day,
                data.rehearsal_rows,
                sum(d < first_day for d in run.window.train_dates),
                cfg.rehearsal_for(step.stage),
            )
        epochs = cfg.epochs_for(step.stage)
        n = stage_positives(data.rows, step.stage)
        bar = StepBar(step.name, expected_steps(n, cfg.train.batch_size, epochs), epochs)
        curve = reporting.LossCurve(tracker, logger, step.name, every=LOG_EVERY, bar=bar)
        try:
            owners, report = run_step(step, model, owners, data, cfg, on_step=curve)
        finally:
            bar.close()
        curve.flush()
        report.info["rows"] = n
        if report.info.get("kept"):
            logger.warning(
                "%s: %d positive row(s) in %s .. %s: the stage is kept as model v%s had it",
                step.name,
                n,
                first_day,
                max(run.window.train_dates),
                start.decision.parent_version,
            )
        out = _save(step, index, previous is None, model, owners, report, run, tracker)
        metrics = _measure(step, model, owners, data, cfg) | _validation(report, ready.objectives[step.stage])
        tracker.log_metrics(metrics)
        run.parent().log_metrics(metrics, step=index)
        _report(step, metrics, report, cfg)
    return out
